"""Transforms exchanged with other tools: ITK displacement-field images and OME-NGFF 0.6
``displacements`` (RFC-5) fields, written and read.

Export
    The whole transform ``T`` (every stage: affines and fields) is baked into **one dense
    displacement** ``d(x) = T(x) - x`` sampled on the **target** grid at downsample ``D`` (default
    the finest field's, :func:`default_export_downsample`). Coordinates are **level-0 pixels**
    (not micrometres): grid node ``[i, j]`` sits at level-0 ``(D (j + 1/2) - 1/2,
    D (i + 1/2) - 1/2)`` of the target (:func:`wsireg.core.coords.to_level0`), and ``x + d(x)``
    is the matching position in level-0 pixels of the source. So in ITK terms the image has
    origin ``(D/2 - 1/2, D/2 - 1/2)``, spacing ``(D, D)``, identity direction, and a
    ``DisplacementFieldTransform`` of it maps a target (fixed) point to the source (moving)
    point, ``p -> p + d(p)``, as ``Transform.map_points(p, "target_to_source")``. Values are
    float64 (a baked affine makes displacements of thousands of pixels, which float32 would
    round to 1e-3 px).

    At the nodes the export equals ``T`` exactly. Between nodes readers interpolate ``d``
    bilinearly; for a one-stage transform exported at its field's downsample that is ``T``
    exactly too (``A x - x`` is affine, which bilinear interpolation reproduces); otherwise it
    is ``T`` sampled every ``D`` pixels. Past the outermost nodes wsireg replicates the edge
    values, ITK returns zero displacement: compare inside the grid.

    * ITK (``.mha``, ``.nrrd``, ``.nii``, ``.nii.gz``, through SimpleITK): one in-memory vector
      image ``(H_D, W_D)`` of 2 float64 components (x, y), at most :data:`MAX_ITK_NODES` nodes
      (refused above: give a coarser downsample, or NGFF). ``.mha`` and ``.nrrd`` also carry
      the key ``wsireg`` (JSON: units, direction, the target and source slides).
    * NGFF 0.6 (a ``.zarr`` directory, written chunk by chunk, any size): a zarr v3 group whose
      ``ome`` attributes declare a multiscales with one dataset ``"0"``, an array
      ``(2, H_D, W_D)`` float64 with axes ``c`` (type ``displacement``), ``y``, ``x`` (components
      in the order of the spatial axes, **y then x**, as RFC-5 says), mapped to level-0 pixels by
      ``scale [1, D, D]`` and ``translation [0, D/2 - 1/2, D/2 - 1/2]``, and the transformation
      ``{"type": "displacements", "path": "0", "input": "target", "output": "source"}``; the
      ``wsireg`` attributes hold what ``.mha`` carries.

Import
    :func:`load_exchanged` reads either back as a :class:`Transform` (``Transform.load``
    dispatches here), so ``wsireg warp``, ``warp-points`` and ``warp-geojson`` accept them. A
    field is taken to be in level-0 pixels; its grid may have any origin but must have equal
    x and y spacing and no rotation. An ITK image is read into memory; an NGFF field stays on
    disk. Without ``wsireg`` metadata the source slide is unknown (any source slide is warped)
    and the target is the field's extent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsireg.core.blocks import blocks
from wsireg.core.coords import to_level0
from wsireg.engine.transform import FIELD_UNITS, FieldArray, SlideRef, Stage, Transform
from wsireg.errors import TransformError
from wsireg.io.output import staged_output

#: File name endings of the ITK images read and written (SimpleITK picks the format by them).
ITK_SUFFIXES = (".mha", ".nrrd", ".nii", ".nii.gz")
#: Export formats of ``wsireg transform export``.
EXPORT_FORMATS = ("ngff", "itk")
#: Most grid nodes of an ITK export: one in-memory image of 2 float64 per node (1 GiB), which
#: SimpleITK copies once more while writing.
MAX_ITK_NODES = 2**26
#: NGFF version written (RFC-5 transformations are part of 0.6).
NGFF_VERSION = "0.6"
#: Chunk side of an NGFF export (nodes).
NGFF_CHUNK = 1024
#: Nodes baked per call of ``Transform.map_points`` while exporting.
BAND_NODES = 1 << 21
#: Longest side (nodes) of the grid of an affine-only transform's default export.
AFFINE_GRID_SIDE = 1024
#: The ``wsireg`` metadata's ``format`` value.
METADATA_FORMAT = "wsireg-displacement"


# --------------------------------------------------------------------------------------------
# The baked displacement
# --------------------------------------------------------------------------------------------
def default_export_downsample(transform: Transform) -> float:
    """The finest field downsample of ``transform``; for an affine-only transform the smallest
    power of two that keeps the grid within :data:`AFFINE_GRID_SIDE` nodes."""
    spacings = [stage.field_downsample for stage in transform.stages if stage.field is not None]
    if spacings:
        return float(min(spacings))
    side = max(transform.target.shape)
    return float(2 ** max(0, math.ceil(math.log2(side / AFFINE_GRID_SIDE))))


def export_grid_shape(transform: Transform, downsample: float) -> tuple[int, int]:
    """``(H_D, W_D)`` of the target grid at ``downsample``: the first stage's field shape at its
    own downsample, else ``ceil(H / D), ceil(W / D)`` of the target's level 0."""
    first = transform.stages[0]
    if first.field is not None and first.field_downsample == downsample:
        return tuple(first.field.shape[1:])
    height, width = transform.target.shape
    return max(1, math.ceil(height / downsample)), max(1, math.ceil(width / downsample))


def baked_displacement(
    transform: Transform, y0: int, x0: int, h: int, w: int, downsample: float
) -> np.ndarray:
    """``T(x) - x`` ``(h, w, 2)`` float64 ``(x, y)`` in level-0 pixels at the nodes
    ``[y0:y0+h, x0:x0+w]`` of the target grid at ``downsample`` (exact point mapping)."""
    gx = to_level0(np.arange(x0, x0 + w), downsample)
    gy = to_level0(np.arange(y0, y0 + h), downsample)
    points = np.stack(np.broadcast_arrays(gx[None, :], gy[:, None]), axis=-1).reshape(-1, 2)
    moved = transform.map_points(points, "target_to_source")
    return (moved - points).reshape(h, w, 2)


def _band_rows(width: int) -> int:
    return max(1, BAND_NODES // max(width, 1))


def _metadata(transform: Transform, downsample: float) -> dict[str, Any]:
    return {
        "format": METADATA_FORMAT,
        "units": FIELD_UNITS,
        "direction": "target_to_source",
        "convention": "x + d(x) maps target level-0 (x, y) to source level-0 (x, y); node "
        "[i, j] at (D (j + 0.5) - 0.5, D (i + 0.5) - 0.5)",
        "downsample": downsample,
        "target": transform.target.to_json(),
        "source": transform.source.to_json(),
    }


# --------------------------------------------------------------------------------------------
# ITK
# --------------------------------------------------------------------------------------------
def is_itk_path(path: str | Path) -> bool:
    """Whether ``path`` names an ITK image wsireg reads and writes (by its ending)."""
    return str(path).lower().endswith(ITK_SUFFIXES)


def export_itk(
    transform: Transform,
    path: str | Path,
    downsample: float | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``transform`` as an ITK displacement-field image (see the module's rules), staged.

    :class:`TransformError` when the grid exceeds :data:`MAX_ITK_NODES` nodes (it names the
    smallest downsample that fits) or ``path`` has no ITK ending.
    """
    path = Path(path)
    if not is_itk_path(path):
        raise TransformError(path, f"an ITK field must end in {', '.join(ITK_SUFFIXES)}")
    downsample = float(downsample or default_export_downsample(transform))
    height, width = export_grid_shape(transform, downsample)
    if height * width > MAX_ITK_NODES:
        raise TransformError(
            path,
            f"a {width} x {height} node field at downsample {downsample:g} exceeds the "
            f"{MAX_ITK_NODES} nodes of one in-memory ITK image: give --downsample "
            f"{_fitting_downsample(transform, downsample):g} or more, or --format ngff",
        )
    sitk = _simpleitk()
    vectors = np.empty((height, width, 2), np.float64)
    rows = _band_rows(width)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        vectors[r0:r1] = baked_displacement(transform, r0, 0, r1 - r0, width, downsample)
    image = sitk.GetImageFromArray(vectors, isVector=True)
    del vectors
    offset = float(to_level0(0, downsample))
    image.SetSpacing((downsample, downsample))
    image.SetOrigin((offset, offset))
    image.SetMetaData("wsireg", json.dumps(_metadata(transform, downsample)))
    with staged_output(path, overwrite, inputs=(transform.path,)) as stage:
        # SimpleITK picks the format by the ending: write beside the stage, then rename
        scratch = stage.with_name(stage.name + _itk_suffix(path))
        try:
            sitk.WriteImage(image, str(scratch), useCompression=path.name.endswith(".gz"))
            os.replace(scratch, stage)
        finally:
            scratch.unlink(missing_ok=True)
    return path


def _itk_suffix(path: Path) -> str:
    return next(s for s in ITK_SUFFIXES[::-1] if path.name.lower().endswith(s))


def _fitting_downsample(transform: Transform, downsample: float) -> float:
    coarser = downsample
    while math.prod(export_grid_shape(transform, coarser)) > MAX_ITK_NODES:
        coarser *= 2
    return coarser


def _simpleitk() -> Any:
    try:
        import SimpleITK
    except ImportError as exc:  # a plain dependency; only a broken install lacks it
        raise TransformError(
            "SimpleITK", "ITK fields need SimpleITK: pip install SimpleITK"
        ) from exc
    return SimpleITK


def read_itk(path: str | Path) -> Transform:
    """An ITK displacement-field image (2-D, 2 components, level-0 pixels) as a Transform."""
    path = Path(path)
    sitk = _simpleitk()
    if not path.is_file():
        raise TransformError(path, "no such ITK displacement field")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise TransformError(path, f"not a readable ITK image: {_first_line(exc)}") from exc
    if image.GetDimension() != 2 or image.GetNumberOfComponentsPerPixel() != 2:
        raise TransformError(
            path,
            f"not a 2-D displacement field: {image.GetDimension()}-D image of "
            f"{image.GetNumberOfComponentsPerPixel()} components per pixel",
        )
    if not np.allclose(image.GetDirection(), (1.0, 0.0, 0.0, 1.0)):
        raise TransformError(path, f"a rotated grid (direction {image.GetDirection()})")
    vectors = sitk.GetArrayViewFromImage(image)  # (H, W, 2): components x, y
    fld = np.ascontiguousarray(np.moveaxis(vectors, -1, 0), dtype=np.float64)
    keys = image.GetMetaDataKeys()
    metadata = _parse_metadata(image.GetMetaData("wsireg") if "wsireg" in keys else None, path)
    return _field_transform(fld, image.GetOrigin(), image.GetSpacing(), metadata, path, "itk")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    if not text:
        return {}
    try:
        metadata = json.loads(text)
    except ValueError as exc:
        raise TransformError(path, f"corrupted wsireg metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise TransformError(path, "the wsireg metadata is not a wsireg displacement record")
    return metadata


def _field_transform(
    fld: FieldArray,
    origin: tuple[float, float],
    spacing: tuple[float, float],
    metadata: dict[str, Any],
    path: Path,
    kind: str,
) -> Transform:
    """``x -> x + d(x)`` for a field ``(2, H, W)`` (channels x, y; level-0 px) whose node
    ``[i, j]`` is at ``origin + spacing * (j, i)``: one stage when the origin is wsireg's
    (:func:`to_level0` of node 0), else a shift onto wsireg's grid, the field, and back."""
    sx, sy = (float(v) for v in spacing)
    if not (sx > 0 and math.isclose(sx, sy, rel_tol=1e-9)):
        raise TransformError(path, f"grid spacing {sx:g} x {sy:g}: x and y must be equal")
    if metadata.get("units", FIELD_UNITS) != FIELD_UNITS:
        raise TransformError(path, f"field units {metadata['units']!r}, not {FIELD_UNITS}")
    shift = np.asarray(origin, np.float64) - float(to_level0(0, sx))
    try:
        if np.allclose(shift, 0.0, atol=1e-9 * max(1.0, sx)):
            stages = [Stage(np.eye(3), fld, sx)]
        else:
            stages = [Stage(_translation(-shift)), Stage(_translation(shift), fld, sx)]
    except ValueError as exc:
        raise TransformError(path, f"unusable field: {exc}") from exc
    height, width = fld.shape[1:]
    extent = (
        max(1, round(origin[1] + (height - 0.5) * sx + 0.5)),
        max(1, round(origin[0] + (width - 0.5) * sx + 0.5)),
    )
    target = _slide_ref(metadata.get("target"), SlideRef(None, extent), path)
    source = _slide_ref(metadata.get("source"), SlideRef(None, (0, 0)), path)
    parameters = {"imported_from": {"format": kind, "path": str(path)}}
    return Transform(stages, target, source, parameters, path)


def _translation(shift: np.ndarray) -> np.ndarray:
    affine = np.eye(3)
    affine[:2, 2] = shift
    return affine


def _slide_ref(data: Any, default: SlideRef, path: Path) -> SlideRef:
    if data is None:
        return default
    try:
        return SlideRef.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise TransformError(path, f"corrupted slide record in the wsireg metadata: {exc}") from exc


# --------------------------------------------------------------------------------------------
# OME-NGFF 0.6 (RFC-5)
# --------------------------------------------------------------------------------------------
def export_ngff(
    transform: Transform,
    path: str | Path,
    downsample: float | None = None,
    *,
    overwrite: bool = False,
    chunk: int = NGFF_CHUNK,
) -> Path:
    """Write ``transform`` as an OME-NGFF 0.6 ``displacements`` field (see the module's rules),
    chunk by chunk into a staged zarr v3 group: memory is one chunk, whatever the size."""
    path = Path(path)
    downsample = float(downsample or default_export_downsample(transform))
    height, width = export_grid_shape(transform, downsample)
    with staged_output(path, overwrite, inputs=(transform.path,)) as stage:
        group = zarr.open_group(str(stage), mode="w", zarr_format=3)
        group.attrs.update(
            {
                "ome": ngff_attributes(downsample),
                "wsireg": _metadata(transform, downsample),
            }
        )
        array = group.create_array(
            "0",
            shape=(2, height, width),
            chunks=(2, min(chunk, height), min(chunk, width)),
            dtype="float64",
            fill_value=float("nan"),
            dimension_names=("c", "y", "x"),
        )
        for y0, x0, h, w in blocks((height, width), chunk):
            d = baked_displacement(transform, y0, x0, h, w, downsample)
            array[:, y0 : y0 + h, x0 : x0 + w] = np.stack([d[..., 1], d[..., 0]])  # y, x
    return path


def ngff_attributes(downsample: float) -> dict[str, Any]:
    """The ``ome`` attributes of an exported field: the multiscales and its RFC-5
    ``displacements`` transformation from the ``target`` to the ``source`` system."""
    offset = float(to_level0(0, downsample))

    def space(name: str) -> dict[str, Any]:
        return {"name": name, "type": "space"}

    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": "wsireg displacement field",
                "coordinateSystems": [
                    {
                        "name": "field",
                        "axes": [
                            {"name": "c", "type": "displacement", "discrete": True},
                            space("y"),
                            space("x"),
                        ],
                    },
                    {"name": "target", "axes": [space("y"), space("x")]},
                    {"name": "source", "axes": [space("y"), space("x")]},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {
                                "type": "sequence",
                                "name": "0_to_field",
                                "input": {"path": "0"},
                                "output": {"name": "field"},
                                "transformations": [
                                    {"type": "scale", "scale": [1.0, downsample, downsample]},
                                    {"type": "translation", "translation": [0.0, offset, offset]},
                                ],
                            }
                        ],
                    }
                ],
                "coordinateTransformations": [
                    {
                        "type": "displacements",
                        "name": "target_to_source",
                        "path": "0",
                        "input": {"name": "target"},
                        "output": {"name": "source"},
                        "interpolation": "linear",
                    }
                ],
            }
        ],
    }


def ngff_displacements(path: str | Path) -> dict[str, Any] | None:
    """The ``multiscales`` entry of an NGFF group at ``path`` that declares a ``displacements``
    transformation, or ``None`` (not a zarr group, or none declared)."""
    document = Path(path) / "zarr.json"
    if not document.is_file():
        return None
    try:
        attributes = json.loads(document.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    ome = attributes.get("ome") if isinstance(attributes, dict) else None
    for multiscale in (ome or {}).get("multiscales", []) if isinstance(ome, dict) else []:
        if any(
            isinstance(t, dict) and t.get("type") == "displacements"
            for t in multiscale.get("coordinateTransformations") or []
        ):
            return multiscale
    return None


def read_ngff(path: str | Path) -> Transform:
    """An NGFF 0.6 ``displacements`` field (level-0 pixels) as a Transform; the field stays on
    disk (read chunk by chunk)."""
    path = Path(path)
    multiscale = ngff_displacements(path)
    if multiscale is None:
        raise TransformError(path, "not an OME-NGFF group with a displacements transformation")
    try:
        group = zarr.open_group(str(path), mode="r")
        entry = next(
            t for t in multiscale["coordinateTransformations"] if t.get("type") == "displacements"
        )
        array = group[entry["path"]]
        scale, translation, axes = _dataset_grid(multiscale, entry["path"])
    except (KeyError, TypeError, ValueError, StopIteration) as exc:
        raise TransformError(path, f"corrupted NGFF displacements metadata: {exc}") from exc
    spatial = [a for a in axes if a.get("type") == "space"]
    names = [a.get("name") for a in spatial]
    if array.ndim != 3 or array.shape[0] != 2 or sorted(names) != ["x", "y"]:
        raise TransformError(path, f"not a 2-D displacement field: shape {array.shape}, {names}")
    units = {a.get("unit") for a in spatial} - {None}
    recorded = group.attrs.get("wsireg")
    metadata = _parse_metadata(None if recorded is None else json.dumps(recorded), path)
    if units and not metadata:
        raise TransformError(path, f"a field in {sorted(units)}: only level-0 pixels are read")
    iy, ix = 1 + names.index("y"), 1 + names.index("x")  # array axes after the component axis
    if (iy, ix) != (1, 2):
        raise TransformError(path, "the field's spatial axes must be y then x")
    order = (names.index("x"), names.index("y"))  # stored component of wsireg's x, y
    fld: FieldArray = array if order == (0, 1) else ComponentView(array, order)
    origin = (translation[ix], translation[iy])
    return _field_transform(fld, origin, (scale[ix], scale[iy]), metadata, path, "ngff")


def _dataset_grid(
    multiscale: dict[str, Any], dataset_path: str
) -> tuple[list[float], list[float], list[dict[str, Any]]]:
    """``(scale, translation, axes)`` of the dataset at ``dataset_path``: its transformations
    (scale and translation, alone or in a sequence) and the axes of its output system."""
    dataset = next(d for d in multiscale["datasets"] if d["path"] == dataset_path)
    systems = {s["name"]: s["axes"] for s in multiscale.get("coordinateSystems", [])}
    transforms = list(dataset["coordinateTransformations"])
    output = transforms[-1].get("output")
    axes = systems[output["name"] if isinstance(output, dict) else output]
    flat: list[dict[str, Any]] = []
    for item in transforms:
        flat += item["transformations"] if item["type"] == "sequence" else [item]
    scale, translation = [1.0] * len(axes), [0.0] * len(axes)
    for item in flat:
        if item["type"] == "scale":
            scale = [s * float(v) for s, v in zip(scale, item["scale"], strict=True)]
        elif item["type"] == "translation":
            translation = [
                t + float(v) for t, v in zip(translation, item["translation"], strict=True)
            ]
        elif item["type"] != "identity":
            raise ValueError(f"dataset transformation {item['type']!r} is not scale/translation")
    return scale, translation, axes


class ComponentView:
    """A stored field ``(2, H, W)`` whose components are in another order, seen as wsireg's
    ``(x, y)``: ``order[k]`` is the stored component of wsireg's channel ``k``. Reads go to the
    stored array (chunk by chunk), nothing is copied."""

    def __init__(self, array: zarr.Array, order: tuple[int, int]) -> None:
        self.array = array
        self.order = np.asarray(order)
        self.shape = array.shape
        self.ndim = array.ndim
        self.dtype = array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        channels, rest = key[0], key[1:]
        stored = np.asarray(self.array[(slice(None), *rest)])
        return stored[self.order][channels]

    def get_coordinate_selection(self, selection: tuple[np.ndarray, ...]) -> np.ndarray:
        channels, *rest = selection
        return self.array.get_coordinate_selection((self.order[channels], *rest))

    def get_orthogonal_selection(self, selection: tuple[Any, ...]) -> np.ndarray:
        channels, *rest = selection
        stored = np.asarray(self.array.get_orthogonal_selection((slice(None), *rest)))
        return stored[self.order][channels]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def content_identity(self) -> str:
        """The stored array's identity and the component order (see ``field_identity``)."""
        from wsireg.engine.transform import field_identity

        text = f"{field_identity(self.array)}:{self.order.tolist()}"
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def exchanged_format(path: str | Path) -> str | None:
    """``"itk"`` or ``"ngff"`` when ``path`` is a field of another tool (an ITK image by its
    ending; a zarr group declaring NGFF ``displacements``), else ``None``."""
    path = Path(path)
    if is_itk_path(path) and not path.is_dir():
        return "itk"
    if path.is_dir() and ngff_displacements(path) is not None:
        return "ngff"
    return None


def load_exchanged(path: str | Path) -> Transform:
    """The Transform of an ITK or NGFF field at ``path`` (:func:`exchanged_format`)."""
    kind = exchanged_format(path)
    if kind == "itk":
        return read_itk(path)
    if kind == "ngff":
        return read_ngff(path)
    raise TransformError(path, "neither an ITK displacement image nor an NGFF displacements field")


def export_transform(
    transform: Transform,
    path: str | Path,
    fmt: str,
    downsample: float | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``transform`` as ``fmt`` (:data:`EXPORT_FORMATS`) at ``path``."""
    if fmt == "itk":
        return export_itk(transform, path, downsample, overwrite=overwrite)
    if fmt == "ngff":
        return export_ngff(transform, path, downsample, overwrite=overwrite)
    raise ValueError(f"format must be one of {EXPORT_FORMATS}, not {fmt!r}")


def export_format(path: str | Path, fmt: str | None) -> str:
    """``fmt``, else the format ``path``'s ending implies (ITK endings; ``.zarr``: NGFF)."""
    if fmt is not None:
        return fmt
    if is_itk_path(path):
        return "itk"
    if str(path).rstrip("/").lower().endswith(".zarr"):
        return "ngff"
    raise TransformError(
        path, f"give --format: the ending is neither .zarr nor one of {', '.join(ITK_SUFFIXES)}"
    )
