"""Landmarks and annotations: ANHIR landmark CSVs and (QuPath) GeoJSON, mapped by a transform.

Landmark CSV (ANHIR): header ``,X,Y``, then one row per point: a 1-based index, X (column),
Y (row), in level-0 pixels with pixel centres at integers (the convention of
:mod:`wsireg.core.coords`).

GeoJSON from QuPath puts pixel *corners* at integers (the first pixel's centre is (0.5, 0.5)),
so coordinates are shifted by -0.5 on the way in and +0.5 on the way out
(``pixel_origin="corner"``, the default; ``"centre"`` takes them as they are). Geometries:
Point, MultiPoint, LineString, MultiLineString, Polygon (with holes), MultiPolygon,
GeometryCollection, inside Features or FeatureCollections; properties and ids are kept.
Edges longer than ``max_segment`` are densified before mapping, so a straight edge follows a
curved deformation.
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


# --------------------------------------------------------------------------------------------
# Landmark CSVs
# --------------------------------------------------------------------------------------------
def read_landmarks(path: str | Path) -> np.ndarray:
    """Points ``(N, 2)`` ``(x, y)`` of an ANHIR landmark CSV (``,X,Y`` header)."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise InputError(path, f"cannot read landmarks: {exc.strerror or exc}") from exc
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
    with staged_output(path, overwrite) as stage:
        stage.write_text(json.dumps(document))
    return path


def map_geojson(
    document: GeoJSON,
    mapper: PointMapper,
    *,
    max_segment: float | None = None,
    pixel_origin: str = "corner",
) -> GeoJSON:
    """A copy of a GeoJSON document (dict, or a list of features as QuPath writes) with every
    coordinate mapped by ``mapper`` (level-0 points ``(N, 2)`` -> ``(N, 2)``).

    All coordinates are gathered and mapped in one call. ``max_segment`` (level-0 px)
    densifies long edges first; ``None`` keeps the vertices as they are.
    """
    if pixel_origin not in ("corner", "centre"):
        raise ValueError("pixel_origin must be 'corner' or 'centre'")
    shift = 0.5 if pixel_origin == "corner" else 0.0
    geometries: list[dict[str, Any]] = []
    copy = _copy_collecting(document, geometries)
    rings: list[np.ndarray] = []
    slots: list[tuple[dict[str, Any], tuple[int, ...]]] = []
    for geometry in geometries:
        for path_index, coords in _coordinate_arrays(geometry):
            ring = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
            if max_segment and len(ring) > 1 and geometry["type"] not in _POINT_TYPES:
                ring = densify(ring, max_segment)
            rings.append(ring)
            slots.append((geometry, path_index))
    if not rings:
        return copy
    sizes = [len(r) for r in rings]
    mapped = mapper(np.concatenate(rings) - shift) + shift
    for (geometry, path_index), part in zip(
        slots, np.split(mapped, np.cumsum(sizes)[:-1]), strict=True
    ):
        _set_coordinates(geometry, path_index, part)
    return copy


def densify(line: np.ndarray, max_segment: float) -> np.ndarray:
    """Insert points so no segment of the polyline ``(N, 2)`` is longer than ``max_segment``."""
    seg = np.diff(line, axis=0)
    steps = np.maximum(1, np.ceil(np.linalg.norm(seg, axis=1) / max_segment)).astype(int)
    pieces = [line[i] + seg[i] * (np.arange(n)[:, None] / n) for i, n in enumerate(steps)]
    return np.concatenate([*pieces, line[-1:]])


_POINT_TYPES = {"Point", "MultiPoint"}
_GEOMETRY_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
}


def _copy_collecting(node: Any, geometries: list[dict[str, Any]]) -> Any:
    """Deep copy of a GeoJSON tree, collecting the (copied) simple geometries."""
    if isinstance(node, list):
        return [_copy_collecting(item, geometries) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "coordinates" and node.get("type") in _GEOMETRY_TYPES:
            out[key] = json.loads(json.dumps(value))
        else:
            out[key] = _copy_collecting(value, geometries)
    if out.get("type") in _GEOMETRY_TYPES and "coordinates" in out:
        geometries.append(out)
    return out


def _coordinate_arrays(geometry: dict[str, Any]) -> Iterator[tuple[tuple[int, ...], list]]:
    """Yield ``(path, coordinates)`` for each point list of a geometry."""
    kind, coords = geometry["type"], geometry["coordinates"]
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
