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
from dataclasses import dataclass
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
#: Default bend tolerance of adaptive densification (level-0 px of the output slide).
DEFAULT_TOLERANCE = 0.25
#: Most halvings of one edge piece in adaptive densification (2^16 pieces at most).
MAX_DEPTH = 16
#: Pieces no longer than this (level-0 px) are not split further.
MIN_PIECE = 0.5
#: Where a piece is probed, as fractions of its length.
PROBES = (0.25, 0.5, 0.75)


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


@dataclass(frozen=True)
class MappedGeoJSON:
    """What :func:`map_annotations` returns: the mapped ``document``, the number of input
    ``positions``, how many of them lie ``outside`` the slide's extent (mapped by extrapolating
    the transform; 0 without an extent) and the number of ``vertices`` written."""

    document: GeoJSON
    positions: int
    outside: int
    vertices: int


def coordinate_decimals(tolerance: float) -> int:
    """Decimals kept of a coordinate mapped to within ``tolerance`` (level-0 px): the fewest
    ``k`` with ``0.5 * 10^-k <= tolerance / 10``, so rounding moves a point by at most a tenth
    of the tolerance (1 decimal for 1 px, 2 for 0.25 px, 3 for 0.01 px)."""
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number of pixels, not {tolerance}")
    return max(0, math.ceil(-math.log10(tolerance / 5) - 1e-9))


def map_annotations(
    document: GeoJSON,
    mapper: PointMapper,
    *,
    max_segment: float | None = None,
    tolerance: float | None = None,
    pixel_origin: str = "corner",
    extent: tuple[float, float] | None = None,
    decimals: int | None = None,
    name: str | Path = "GeoJSON",
) -> MappedGeoJSON:
    """A copy of a GeoJSON document (dict, or a list of features as QuPath writes) with every
    coordinate mapped by ``mapper`` (level-0 points ``(N, 2)`` -> ``(N, 2)``).

    Edges of lines and rings are densified in one of two ways, only where they lie over
    ``extent`` ``(W, H)`` (level-0 px of the slide the annotations are on; ``None``:
    everywhere): with ``tolerance`` (level-0 px of the output, > 0) adaptively
    (:func:`densify_mapped`: a vertex is added only where the mapping bends an edge by more than
    ``tolerance``); with ``max_segment`` (level-0 px, > 0) uniformly (:func:`densify`); with
    neither, the vertices are mapped as they are. ``decimals`` rounds the mapped coordinates
    (``None``: full precision; :func:`coordinate_decimals` gives the rule for a tolerance).
    :class:`InputError` naming ``name`` for a geometry that is not GeoJSON, positions that are
    not two finite numbers, more than :data:`MAX_VERTICES` vertices after densification, or
    mapped positions that are not finite.
    """
    if pixel_origin not in ("corner", "centre"):
        raise ValueError("pixel_origin must be 'corner' or 'centre'")
    for label, value in (("max_segment", max_segment), ("tolerance", tolerance)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be a positive number of pixels, not {value}")
    if max_segment is not None and tolerance is not None:
        raise ValueError("give max_segment or tolerance, not both")
    shift = 0.5 if pixel_origin == "corner" else 0.0
    box = (
        None
        if extent is None
        else (shift - 0.5, shift - 0.5, extent[0] + shift - 0.5, extent[1] + shift - 0.5)
    )
    geometries: list[dict[str, Any]] = []
    copy = _copy_collecting(document, geometries, name)
    rings: list[np.ndarray] = []
    lines: list[bool] = []
    slots: list[tuple[dict[str, Any], tuple[int, ...]]] = []
    for geometry in geometries:
        for path_index, coords in _coordinate_arrays(geometry, name):
            ring = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
            rings.append(ring)
            lines.append(len(ring) > 1 and geometry["type"] not in _POINT_TYPES)
            slots.append((geometry, path_index))
    if not rings:
        return MappedGeoJSON(copy, 0, 0, 0)
    positions = sum(len(r) for r in rings)
    outside = 0 if box is None else int((~_inside_box(np.concatenate(rings), box)).sum())

    def shifted(points: np.ndarray) -> np.ndarray:
        return mapper(points - shift) + shift

    try:
        mapped = _map_rings(rings, lines, shifted, max_segment, tolerance, box)
    except ValueError as exc:
        raise InputError(name, str(exc)) from exc
    if not all(np.isfinite(part).all() for part in mapped):
        raise InputError(name, "some positions map to non-finite coordinates")
    for (geometry, path_index), part in zip(slots, mapped, strict=True):
        _set_coordinates(geometry, path_index, part, decimals)
    return MappedGeoJSON(copy, positions, outside, sum(len(p) for p in mapped))


def _inside_box(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def _map_rings(
    rings: list[np.ndarray],
    lines: list[bool],
    mapper: PointMapper,
    max_segment: float | None,
    tolerance: float | None,
    box: tuple[float, float, float, float] | None,
) -> list[np.ndarray]:
    """Every ring mapped (lines and rings densified as :func:`map_annotations` says); the
    points of the rings that are not adaptively densified are mapped in one call."""
    if max_segment is not None:
        rings = [
            densify(r, max_segment, box) if line else r
            for r, line in zip(rings, lines, strict=True)
        ]
        if sum(len(r) for r in rings) > MAX_VERTICES:
            raise ValueError(_too_many_vertices(max_segment))
    adaptive = [i for i, line in enumerate(lines) if line] if tolerance is not None else []
    result: list[np.ndarray | None] = [None] * len(rings)
    if adaptive:
        dense = densify_mapped([rings[i] for i in adaptive], mapper, tolerance, box)
        for i, (_, mapped) in zip(adaptive, dense, strict=True):
            result[i] = mapped
    plain = [i for i in range(len(rings)) if result[i] is None]
    if plain:
        sizes = [len(rings[i]) for i in plain]
        mapped = mapper(np.concatenate([rings[i] for i in plain]))
        for i, part in zip(plain, np.split(mapped, np.cumsum(sizes)[:-1]), strict=True):
            result[i] = part
    return result  # type: ignore[return-value]


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


def densify_mapped(
    lines: list[np.ndarray],
    mapper: PointMapper,
    tolerance: float,
    box: tuple[float, float, float, float] | None = None,
    max_vertices: int = MAX_VERTICES,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Polylines ``(N, 2)`` densified where ``mapper`` bends them, with their mapped points:
    ``[(points, mapped), ...]`` per line, in order.

    The rule: every edge is first cut where it crosses ``box`` ``(x0, y0, x1, y1)`` (``None``:
    no box); each piece over the box is split in half, recursively, while the mapping of a
    probe at 1/4, 1/2 or 3/4 of it lies more than ``tolerance`` from the same fraction of the
    chord between its mapped ends, the piece is longer than :data:`MIN_PIECE` px and has been
    halved fewer than :data:`MAX_DEPTH` times. So the mapped polyline follows the mapped edge
    to within ``tolerance`` wherever the probes see the bend (a field bends an edge smoothly
    over its node spacing). Pieces off the box keep their ends only. Every level of all
    lines is mapped in one ``mapper`` call. :class:`ValueError` past ``max_vertices`` points.
    """
    points = np.concatenate(lines)
    owner = np.repeat(np.arange(len(lines)), [len(line) for line in lines])
    edges = np.flatnonzero(owner[:-1] == owner[1:])  # edge e runs from points[e] to points[e+1]
    start, seg = points[edges], points[edges + 1] - points[edges]
    t0, t1 = _inside_span(start, seg, box)
    over = t1 > t0
    cuts = np.stack(
        [
            np.zeros(len(edges)),
            np.where(over, np.clip(t0, 0, 1), 0),
            np.where(over, np.clip(t1, 0, 1), 0),
        ],
        axis=1,
    )
    # the vertices: every input point (key = its index) and the box crossings (key = e + t)
    keys = [np.arange(len(points), dtype=np.float64)]
    inner = (cuts[:, 1:] > 0) & (cuts[:, 1:] < 1)
    keys.append((edges[:, None] + cuts[:, 1:])[inner])
    all_keys = np.unique(np.concatenate(keys))
    xy = _at_keys(all_keys, points)
    mapped = mapper(xy)
    # the pieces over the box: [key_a, key_b] = e + [t0, t1]
    ka = edges[over] + cuts[over, 1]
    kb = edges[over] + cuts[over, 2]
    keep = kb > ka
    ka, kb = ka[keep], kb[keep]
    found_keys, found_xy, found_mapped = [all_keys], [xy], [mapped]
    ta, tb = _lookup(all_keys, mapped, ka), _lookup(all_keys, mapped, kb)
    count = len(all_keys)
    for _ in range(MAX_DEPTH):
        if not len(ka):
            break
        pa, pb = _at_keys(ka, points), _at_keys(kb, points)
        fractions = np.asarray(PROBES)
        probes = pa[None] + fractions[:, None, None] * (pb - pa)[None]  # (3, n, 2)
        probed = mapper(probes.reshape(-1, 2)).reshape(probes.shape)
        chord = ta[None] + fractions[:, None, None] * (tb - ta)[None]
        bend = np.linalg.norm(probed - chord, axis=2).max(axis=0)
        split = (bend > tolerance) & (np.linalg.norm(pb - pa, axis=1) > MIN_PIECE)
        if not split.any():
            break
        km = (ka[split] + kb[split]) / 2
        tm = probed[list(PROBES).index(0.5)][split]
        count += len(km)
        if count > max_vertices:
            raise ValueError(
                f"more than {max_vertices} vertices after densifying to a tolerance of "
                f"{tolerance} px (give a larger --tolerance)"
            )
        found_keys.append(km)
        found_xy.append(_at_keys(km, points))
        found_mapped.append(tm)
        ka, kb = np.concatenate([ka[split], km]), np.concatenate([km, kb[split]])
        ta, tb = np.concatenate([ta[split], tm]), np.concatenate([tm, tb[split]])
    all_keys = np.concatenate(found_keys)
    order = np.argsort(all_keys, kind="stable")
    all_keys = all_keys[order]
    xy, mapped = np.concatenate(found_xy)[order], np.concatenate(found_mapped)[order]
    firsts = np.concatenate([[0], np.cumsum([len(line) for line in lines])])
    bounds = np.searchsorted(all_keys, firsts[:-1], side="left")
    ends = np.searchsorted(all_keys, firsts[1:] - 1, side="right")
    return [(xy[a:b], mapped[a:b]) for a, b in zip(bounds, ends, strict=True)]


def _at_keys(keys: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Positions of vertex keys ``e + t`` (``t`` in [0, 1)): ``points[e] + t (points[e+1] -
    points[e])``; an integer key is the point itself."""
    index = np.floor(keys).astype(np.int64)
    frac = keys - index
    nxt = np.minimum(index + 1, len(points) - 1)
    return points[index] + frac[:, None] * (points[nxt] - points[index])


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``values`` at ``wanted`` keys, all among the sorted unique ``keys``."""
    return values[np.searchsorted(keys, wanted)]


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


def _set_coordinates(
    geometry: dict[str, Any], path: tuple[int, ...], points: np.ndarray, decimals: int | None
) -> None:
    if decimals is not None:
        points = np.round(points, decimals)
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
