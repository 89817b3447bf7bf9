"""Landmarks and annotations: ANHIR landmark CSVs and (QuPath) GeoJSON, mapped by a transform.

Landmark CSV (ANHIR): header ``,X,Y``, then one row per point: a 1-based index, X (column),
Y (row), in level-0 pixels with pixel centres at integers (the convention of
:mod:`wsireg.core.coords`).

GeoJSON from QuPath puts pixel *corners* at integers (the first pixel's centre is (0.5, 0.5)),
so coordinates are shifted by -0.5 on the way in and +0.5 on the way out
(``pixel_origin="corner"``, the default; ``"centre"`` takes them as they are). Geometries:
Point, MultiPoint, LineString, MultiLineString, Polygon (with holes), MultiPolygon,
GeometryCollection, inside Features or FeatureCollections; properties and ids are kept. Every
position is two finite numbers; anything else (another geometry type such as QuPath's
``Circle``, positions with a third coordinate or not numbers) is refused, naming it, rather
than copied unmapped. Edges longer than ``max_segment`` are densified before mapping, so a
straight edge follows a curved deformation; only their parts over the slide (``extent``) are,
and never to more than :data:`MAX_VERTICES` vertices in all.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsireg.errors import InputError
from wsireg.io.output import staged_output

#: A map of level-0 points ``(N, 2)`` ``(x, y)`` to points ``(N, 2)``.
PointMapper = Callable[[np.ndarray], np.ndarray]
#: A GeoJSON document as parsed: an object, or a list of features as QuPath writes them.
GeoJSON = dict[str, Any] | list[Any]
#: Most vertices a densified document may have (each is mapped and written).
MAX_VERTICES = 5_000_000


# --------------------------------------------------------------------------------------------
# Landmark CSVs
# --------------------------------------------------------------------------------------------
def read_landmarks(path: str | Path) -> np.ndarray:
    """Points ``(N, 2)`` ``(x, y)`` of an ANHIR landmark CSV (``,X,Y`` header)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise InputError(path, f"cannot read landmarks: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"not a landmark CSV (not UTF-8 text): {exc}") from exc
    if not rows:
        raise InputError(path, "empty landmark file")
    header = [cell.strip().upper() for cell in rows[0]]
    if "X" not in header or "Y" not in header:
        raise InputError(path, "not a landmark CSV: the header has no X and Y columns")
    ix, iy = header.index("X"), header.index("Y")
    points = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            points.append((float(row[ix]), float(row[iy])))
        except (IndexError, ValueError) as exc:
            raise InputError(path, f"line {number}: not a point ({exc})") from exc
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(array).all():
        raise InputError(path, "landmarks contain non-finite values")
    return array


def write_landmarks(path: str | Path, points: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write points ``(N, 2)`` as an ANHIR landmark CSV (1-based index column).

    Staged (:func:`wsireg.io.output.staged_output`): an existing ``path`` is replaced only with
    ``overwrite``, else :class:`~wsireg.errors.OutputExistsError`.
    """
    path = Path(path)
    with staged_output(path, overwrite) as stage, open(stage, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "X", "Y"])
        for index, (x, y) in enumerate(np.asarray(points, dtype=np.float64), start=1):
            writer.writerow([index, _fmt(x), _fmt(y)])
    return path


def _fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else "nan"


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------
def read_geojson(path: str | Path) -> GeoJSON:
    """The parsed GeoJSON document of ``path``; :class:`InputError` when it is not one."""
    path = Path(path)
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(path, f"cannot read GeoJSON: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InputError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(document, (dict, list)):
        raise InputError(path, "not a GeoJSON object")
    return document


def write_geojson(path: str | Path, document: GeoJSON, *, overwrite: bool = False) -> Path:
    """Write a GeoJSON document as compact JSON, staged like :func:`write_landmarks`."""
    path = Path(path)
    try:
        text = json.dumps(document, allow_nan=False)
    except ValueError as exc:
        raise InputError(path, f"cannot write non-finite coordinates: {exc}") from exc
    with staged_output(path, overwrite) as stage:
        stage.write_text(text)
    return path


def map_geojson(
    document: GeoJSON,
    mapper: PointMapper,
    *,
    max_segment: float | None = None,
    pixel_origin: str = "corner",
    extent: tuple[float, float] | None = None,
    name: str | Path = "GeoJSON",
) -> GeoJSON:
    """A copy of a GeoJSON document (dict, or a list of features as QuPath writes) with every
    coordinate mapped by ``mapper`` (level-0 points ``(N, 2)`` -> ``(N, 2)``).

    All coordinates are gathered and mapped in one call. ``max_segment`` (level-0 px, > 0)
    densifies long edges first, over ``extent`` ``(W, H)`` (level-0 px of the slide the
    annotations are on; ``None``: everywhere); ``None`` keeps the vertices as they are.
    :class:`InputError` naming ``name`` for a geometry that is not GeoJSON, positions that are
    not two finite numbers, more than :data:`MAX_VERTICES` vertices after densification, or
    mapped positions that are not finite.
    """
    if pixel_origin not in ("corner", "centre"):
        raise ValueError("pixel_origin must be 'corner' or 'centre'")
    if max_segment is not None and not (math.isfinite(max_segment) and max_segment > 0):
        raise ValueError(f"max_segment must be a positive number of pixels, not {max_segment}")
    shift = 0.5 if pixel_origin == "corner" else 0.0
    box = (
        None
        if extent is None
        else (shift - 0.5, shift - 0.5, extent[0] + shift - 0.5, extent[1] + shift - 0.5)
    )
    geometries: list[dict[str, Any]] = []
    copy = _copy_collecting(document, geometries, name)
    rings: list[np.ndarray] = []
    slots: list[tuple[dict[str, Any], tuple[int, ...]]] = []
    for geometry in geometries:
        for path_index, coords in _coordinate_arrays(geometry, name):
            ring = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
            if max_segment and len(ring) > 1 and geometry["type"] not in _POINT_TYPES:
                try:
                    ring = densify(ring, max_segment, box)
                except ValueError as exc:
                    raise InputError(name, str(exc)) from exc
            rings.append(ring)
            slots.append((geometry, path_index))
            if sum(len(r) for r in rings) > MAX_VERTICES:
                raise InputError(name, _too_many_vertices(max_segment))
    if not rings:
        return copy
    sizes = [len(r) for r in rings]
    mapped = mapper(np.concatenate(rings) - shift) + shift
    if not np.isfinite(mapped).all():
        raise InputError(name, "some positions map to non-finite coordinates")
    for (geometry, path_index), part in zip(
        slots, np.split(mapped, np.cumsum(sizes)[:-1]), strict=True
    ):
        _set_coordinates(geometry, path_index, part)
    return copy


def _too_many_vertices(max_segment: float | None) -> str:
    return (
        f"more than {MAX_VERTICES} vertices after densifying edges to {max_segment} px "
        "(give a larger --max-segment)"
    )


def densify(
    line: np.ndarray,
    max_segment: float,
    box: tuple[float, float, float, float] | None = None,
    max_vertices: int = MAX_VERTICES,
) -> np.ndarray:
    """Insert points so no segment of the polyline ``(N, 2)`` is longer than ``max_segment``
    where it lies over ``box`` ``(x0, y0, x1, y1)`` (``None``: everywhere). Past the box a
    segment keeps its ends and the points where it crosses the box edge.
    :class:`ValueError` past ``max_vertices`` points."""
    seg = np.diff(line, axis=0)
    t0, t1 = _inside_span(line[:-1], seg, box)
    covered = np.maximum(t1 - t0, 0.0) * np.linalg.norm(seg, axis=1)
    steps = np.ceil(covered / max_segment)
    if steps.sum() + 2 * len(line) > max_vertices:
        raise ValueError(_too_many_vertices(max_segment))
    pieces = []
    for i, n in enumerate(steps.astype(int)):
        ts = np.zeros(1)
        if n > 0:
            inner = t0[i] + (t1[i] - t0[i]) * (np.arange(n + 1) / n)
            ts = np.unique(np.concatenate([ts, inner[(inner > 0) & (inner < 1)]]))
        pieces.append(line[i] + seg[i] * ts[:, None])
    return np.concatenate([*pieces, line[-1:]])


def _inside_span(
    start: np.ndarray, seg: np.ndarray, box: tuple[float, float, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment ``start + t seg``, ``t`` in [0, 1], the span ``[t0, t1]`` over ``box``
    (Liang-Barsky clipping; ``t1 < t0`` when it misses the box)."""
    n = len(start)
    t0, t1 = np.zeros(n), np.ones(n)
    if box is None:
        return t0, t1
    for axis in range(2):
        lo, hi = box[axis], box[axis + 2]
        p, d = start[:, axis], seg[:, axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            a, b = (lo - p) / d, (hi - p) / d
        inside = (p >= lo) & (p <= hi)
        still_enter = np.where(inside, -np.inf, np.inf)  # a segment parallel to the box edge
        still_leave = np.where(inside, np.inf, -np.inf)
        moving = d != 0
        t0 = np.maximum(t0, np.where(moving, np.minimum(a, b), still_enter))
        t1 = np.minimum(t1, np.where(moving, np.maximum(a, b), still_leave))
    return t0, t1


#: Nesting depth of the positions of each geometry type (0: the coordinates are a position).
_DEPTH = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}


_GEOMETRY_TYPES = set(_DEPTH)
_POINT_TYPES = {"Point", "MultiPoint"}


def _copy_collecting(node: Any, geometries: list[dict[str, Any]], name: str | Path) -> Any:
    """Deep copy of a GeoJSON tree, collecting the (copied) simple geometries; an object with
    coordinates but no GeoJSON geometry type is an :class:`InputError`."""
    if isinstance(node, list):
        return [_copy_collecting(item, geometries, name) for item in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if "coordinates" in node and kind not in _GEOMETRY_TYPES:
        raise InputError(name, f"geometry type {kind!r} is not a GeoJSON geometry")
    out = {}
    for key, value in node.items():
        if key == "coordinates":
            out[key] = json.loads(json.dumps(value))
        else:
            out[key] = _copy_collecting(value, geometries, name)
    if kind in _GEOMETRY_TYPES and "coordinates" in out:
        geometries.append(out)
    return out


def _coordinate_arrays(
    geometry: dict[str, Any], name: str | Path
) -> Iterator[tuple[tuple[int, ...], list]]:
    """Yield ``(path, coordinates)`` for each point list of a geometry, checked: nested as its
    type says, every position two finite numbers (:class:`InputError` naming ``name``)."""
    kind, coords = geometry["type"], geometry["coordinates"]
    _check_positions(kind, coords, _DEPTH[kind], name)
    if kind == "Point":
        yield (), [coords]
    elif kind in ("MultiPoint", "LineString"):
        yield (), coords
    elif kind in ("MultiLineString", "Polygon"):
        for i, line in enumerate(coords):
            yield (i,), line
    elif kind == "MultiPolygon":
        for i, polygon in enumerate(coords):
            for j, ring in enumerate(polygon):
                yield (i, j), ring


def _check_positions(kind: str, coords: Any, depth: int, name: str | Path) -> None:
    if depth > 0:
        if not isinstance(coords, list):
            raise InputError(name, f"{kind} coordinates are not nested lists of positions")
        for item in coords:
            _check_positions(kind, item, depth - 1, name)
        return
    if not (isinstance(coords, list) and len(coords) == 2):
        raise InputError(name, f"a {kind} position is not [x, y]: {_excerpt(coords)}")
    for value in coords:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(name, f"a {kind} coordinate is not a number: {_excerpt(value)}")
        if not math.isfinite(value):
            raise InputError(name, f"a {kind} coordinate is not finite: {value}")


def _excerpt(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _set_coordinates(geometry: dict[str, Any], path: tuple[int, ...], points: np.ndarray) -> None:
    values = [[float(x), float(y)] for x, y in points]
    kind = geometry["type"]
    if kind == "Point":
        geometry["coordinates"] = values[0]
        return
    if not path:
        geometry["coordinates"] = values
        return
    target = geometry["coordinates"]
    for index in path[:-1]:
        target = target[index]
    target[path[-1]] = values
