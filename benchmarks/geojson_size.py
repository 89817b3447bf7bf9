"""Size and accuracy of ``wsireg warp-geojson`` output (:func:`wsireg.io.annotations.
map_annotations`) for the ways of densifying edges.

Data: the QuPath-style export of :func:`wsireg.synthetic.annotations.qupath_export` over a
3900 x 3200 px source slide (QuPath's one decimal): a brush annotation (an ellipse of 400
vertices with a hole), a multipolygon of rectangles, a polyline, points, 150 cell objects with
their ``nucleusGeometry``, and a rectangle and a point partly off the slide. Transform (in
memory, public API :meth:`wsireg.engine.transform.Transform.from_field`): a 30 degree
rotation plus a smooth displacement of up to 12 px, field at downsample 16; annotations
mapped source -> target with QuPath's pixel corners (``pixel_origin="corner"``) and densified
over the source slide only, as the CLI does.

Settings: ``uniform`` (the old behaviour: every edge cut into pieces of at most 8 px, half the
field spacing, full float digits), ``default`` (adaptive, tolerance 0.25 px, 2 decimals),
``tolerance-0.05`` (adaptive, 2 decimals: ``coordinate_decimals(0.05)``) and ``none`` (the
vertices mapped as they are, 2 decimals, like ``--no-densify``).

Prints one JSON line per setting: input and output bytes (compact JSON as
:func:`~wsireg.io.annotations.write_geojson` writes it), input positions and output vertices,
``max_edge_error_px``: the largest distance from the exact image of every edge (sampled every
0.25 px over the slide, each sample mapped with the transform) to the written polyline, and
``max_vertex_error_px``: the largest distance of a written vertex (or point) from the exact
image of its edge (whole edges, off the slide too). Runs in about 10 s on one core.

    python benchmarks/geojson_size.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from wsireg.core.coords import to_level0
from wsireg.engine.transform import SlideRef, Transform
from wsireg.io.annotations import coordinate_decimals, map_annotations, write_geojson
from wsireg.synthetic.annotations import (
    QUPATH_SLIDE_SHAPE,
    coordinate_arrays,
    distance_to_polyline,
    qupath_export,
)

TARGET = SlideRef(path="target.svs", shape=(3000, 4000), mpp=(0.5, 0.5))
SOURCE = SlideRef(path="source.svs", shape=QUPATH_SLIDE_SHAPE, mpp=(0.5, 0.5))
FIELD_DOWNSAMPLE = 16.0
SAMPLE_STEP = 0.25  # px between samples of the exact image of an edge


def rotation(deg: float, centre: tuple[float, float], shift=(0.0, 0.0)) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    cx, cy = centre
    rotate = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
    back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1.0]])
    return back @ rotate @ to_origin


def make_transform(amplitude: float = 12.0) -> Transform:
    """Rotation by 30 degrees plus a smooth analytic displacement (level-0 px)."""
    h, w = (int(np.ceil(n / FIELD_DOWNSAMPLE)) for n in TARGET.shape)
    gy, gx = np.meshgrid(
        to_level0(np.arange(h), FIELD_DOWNSAMPLE),
        to_level0(np.arange(w), FIELD_DOWNSAMPLE),
        indexing="ij",
    )
    u = amplitude * np.sin(2 * np.pi * gx / 1500.0) * np.cos(2 * np.pi * gy / 1900.0)
    v = 0.7 * amplitude * np.cos(2 * np.pi * gx / 1700.0 + 0.3) * np.sin(2 * np.pi * gy / 1300.0)
    field = np.stack([u, v]).astype(np.float32)
    affine = rotation(30, (2000, 1500), (25, -40))
    return Transform.from_field(affine, field, FIELD_DOWNSAMPLE, TARGET, SOURCE)


def exact_images(arrays: list[tuple[bool, np.ndarray]], transform: Transform) -> list[dict]:
    """Per coordinate array: its edges sampled every :data:`SAMPLE_STEP` px, mapped exactly
    (source -> target, pixel corners), and which samples lie on the source slide."""
    height, width = SOURCE.shape
    out = []
    for is_line, before in arrays:
        if is_line:
            steps = np.ceil(np.linalg.norm(np.diff(before, axis=0), axis=1) / SAMPLE_STEP)
            pieces = [
                a + (b - a) * np.arange(n)[:, None] / n
                for a, b, n in zip(
                    before[:-1], before[1:], np.maximum(steps, 1).astype(int), strict=True
                )
            ]
            samples = np.concatenate([*pieces, before[-1:]])
        else:
            samples = before
        on_slide = (samples >= 0).all(1) & (samples[:, 0] <= width) & (samples[:, 1] <= height)
        exact = transform.map_points(samples - 0.5, "source_to_target") + 0.5
        out.append({"line": is_line, "exact": exact, "on_slide": on_slide})
    return out


def main() -> None:
    transform = make_transform()
    document = qupath_export()
    arrays = coordinate_arrays(document)
    images = exact_images(arrays, transform)
    height, width = SOURCE.shape
    input_bytes = len(json.dumps(document).encode())

    def mapper(xy: np.ndarray) -> np.ndarray:
        return transform.map_points(xy, "source_to_target")

    default_decimals = coordinate_decimals(0.25)
    settings = [
        ("uniform", {"max_segment": FIELD_DOWNSAMPLE / 2, "decimals": None}),
        ("default", {"tolerance": 0.25, "decimals": default_decimals}),
        ("tolerance-0.05", {"tolerance": 0.05, "decimals": coordinate_decimals(0.05)}),
        ("none", {"decimals": default_decimals}),
    ]
    with tempfile.TemporaryDirectory(prefix="wsireg-geojson-size-") as tmp:
        for label, options in settings:
            start = time.perf_counter()
            result = map_annotations(
                document, mapper, pixel_origin="corner", extent=(width, height), **options
            )
            seconds = time.perf_counter() - start
            path = write_geojson(Path(tmp) / f"{label}.geojson", result.document)
            written = coordinate_arrays(result.document)
            edge_error = vertex_error = 0.0
            for image, (_, after) in zip(images, written, strict=True):
                exact = image["exact"]
                if image["line"] and image["on_slide"].any():
                    edge = distance_to_polyline(exact[image["on_slide"]], after).max()
                    edge_error = max(edge_error, float(edge))
                vertex_error = max(vertex_error, float(distance_to_polyline(after, exact).max()))
            row = {
                "setting": label,
                "densify": "uniform"
                if "max_segment" in options
                else ("adaptive" if "tolerance" in options else "none"),
                "max_segment_px": options.get("max_segment"),
                "tolerance_px": options.get("tolerance"),
                "decimals": options["decimals"],
                "input_bytes": input_bytes,
                "output_bytes": path.stat().st_size,
                "bytes_ratio": round(path.stat().st_size / input_bytes, 3),
                "positions": result.positions,
                "vertices": result.vertices,
                "max_edge_error_px": round(edge_error, 4),
                "max_vertex_error_px": round(vertex_error, 4),
                "map_seconds": round(seconds, 3),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
