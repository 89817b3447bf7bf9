"""A QuPath-style annotation export made up for tests and benchmarks, and the geometry that
checks a mapped copy of it.

:func:`qupath_export` is what QuPath's "Export objects as GeoJSON" writes (a list of features,
one decimal per coordinate) over a slide of :data:`QUPATH_SLIDE_SHAPE`: a brush annotation
(an ellipse of 400 vertices with a hole), a multipolygon of rectangles, a polyline, points,
cell objects with their ``nucleusGeometry``, and a rectangle and a point partly off the slide.
Coordinates are level-0 pixels with QuPath's pixel corners.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUPATH_SLIDE_SHAPE", "coordinate_arrays", "distance_to_polyline", "qupath_export"]

QUPATH_SLIDE_SHAPE = (3200, 3900)
"""``(H, W)`` of the slide :func:`qupath_export` annotates (level-0 px)."""


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int) -> list[list[float]]:
    """A closed ring of ``n`` vertices, one decimal each."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.round(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), 1).tolist()
    return ring + ring[:1]


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry: dict, **properties: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def qupath_export(cells: int = 150, seed: int = 7) -> list[dict]:
    """The QuPath-style document of the module docstring; ``cells`` cell objects at places
    drawn with ``seed``, after the six annotations."""
    brush = _feature(
        {
            "type": "Polygon",
            "coordinates": [_ellipse(1500, 1200, 500, 350, 400), _ellipse(1450, 1150, 120, 80, 80)],
        },
        objectType="annotation",
        classification={"name": "Tumor"},
    )
    brush["id"] = "brush"
    features = [
        brush,
        _feature(
            {
                "type": "MultiPolygon",
                "coordinates": [
                    [_rectangle(2200, 300, 3500, 900)],
                    [_rectangle(300, 2300, 1400, 3000), _rectangle(600, 2500, 900, 2700)],
                ],
            },
            objectType="annotation",
        ),
        _feature(
            {
                "type": "LineString",
                "coordinates": [[200, 200], [1900, 350], [2600, 1900], [3600, 2900]],
            },
            objectType="annotation",
        ),
        _feature(
            {"type": "MultiPoint", "coordinates": [[500.5, 700.5], [2500, 2500]]},
            objectType="annotation",
        ),
        _feature(
            {"type": "Polygon", "coordinates": [_rectangle(3700, 3000, 4100, 3400)]},
            objectType="annotation",
            name="off the edge",
        ),
        _feature({"type": "Point", "coordinates": [-50, 100]}, objectType="annotation"),
    ]
    rng = np.random.default_rng(seed)
    for index, (cx, cy) in enumerate(rng.uniform([2000, 1500], [3500, 2800], (cells, 2))):
        cell = _feature(
            {"type": "Polygon", "coordinates": [_ellipse(cx, cy, 7, 6, 24)]},
            objectType="cell",
            nucleusGeometry={
                "type": "Polygon",
                "coordinates": [_ellipse(cx + 0.5, cy, 3.5, 3, 12)],
            },
            measurements={"Nucleus: Area": 33.0},
        )
        cell["id"] = f"cell-{index}"
        features.append(cell)
    return features


def coordinate_arrays(node: object) -> list[tuple[bool, np.ndarray]]:
    """Every coordinate array of a GeoJSON tree in document order (properties such as
    ``nucleusGeometry`` included), as ``(is_line, (N, 2))``: lines and rings, or points."""
    found: list[tuple[bool, np.ndarray]] = []
    if isinstance(node, list):
        for item in node:
            found += coordinate_arrays(item)
    elif isinstance(node, dict):
        kind, coords = node.get("type"), node.get("coordinates")
        if kind == "Point":
            found.append((False, np.array([coords], float)))
        elif kind == "MultiPoint":
            found.append((False, np.array(coords, float)))
        elif kind == "LineString":
            found.append((True, np.array(coords, float)))
        elif kind in ("Polygon", "MultiLineString"):
            found += [(True, np.array(ring, float)) for ring in coords]
        elif kind == "MultiPolygon":
            found += [(True, np.array(ring, float)) for polygon in coords for ring in polygon]
        for key, value in node.items():
            if key != "coordinates":
                found += coordinate_arrays(value)
    return found


def distance_to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of each point ``(M, 2)`` to the polyline ``(K, 2)`` (``K >= 1``)."""
    if len(line) == 1:
        return np.linalg.norm(points - line[0], axis=1)
    a, b = line[:-1], line[1:]
    ab = b - a
    length2 = np.maximum((ab**2).sum(1), 1e-12)
    best = np.full(len(points), np.inf)
    for start in range(0, len(points), 256):
        p = points[start : start + 256, None, :]
        t = np.clip(((p - a) * ab).sum(-1) / length2, 0, 1)
        best[start : start + 256] = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(1)
    return best
