"""Multiscale OME-Zarr (NGFF 0.4 / 0.5): writing out of core, and reading.

Pixels come in as ``[y, x, c]`` arrays of shape ``(H, W, C)``, level-0 pixels, and are stored as
``[c, y, x]`` with NGFF axes ``c, y, x`` (see :mod:`wsireg.core.coords`). ``mpp`` is ``(x, y)``
micrometres per level-0 pixel, as :attr:`wsireg.io.slide.Slide.mpp`. What the channels are
(brightfield RGB, fluorescence, labels; names, colours) is one
:class:`wsireg.io.channels.Channels`; it sets the fill value and the ``omero`` rendering
metadata, whose fluorescence display windows are set from the data once the pyramid is built
(:func:`update_display_windows`).

Level 0 is written chunk by chunk from a dask array; level ``k`` is then computed from level
``k - 1`` read back from disk (:func:`fill_pyramid`), so the memory used does not depend on the
image size. Level ``k`` is the grid at downsample ``2**k`` of :mod:`wsireg.io.pyramid`; its chunks
are ``(1, min(chunk, H_k), min(chunk, W_k))``. How the image lies on disk (chunk side, number of
levels, NGFF version, compressor) is one :class:`ZarrLayout`.

The pieces: :func:`create_ome_zarr` (arrays and metadata, no pixels), :func:`write_level0`,
:func:`fill_pyramid`; :func:`write_ome_zarr` stages, runs the three and renames into place.
:func:`read_ome_zarr_levels` opens the levels of an OME-Zarr image for reading. The OME-TIFF
writers are in :mod:`wsireg.io.tiff`.

The CLI caps glibc's malloc arenas first (:func:`wsireg.engine.parallel.limit_malloc_arenas`),
which keeps the peak memory of long conversions flat.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import numpy.typing as npt
import zarr
from numcodecs import Blosc, GZip
from numcodecs.abc import Codec
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from wsireg.core.coords import micrometres_per
from wsireg.io.channels import RGB, Channels, fluorescence, labels
from wsireg.io.extras import ASSOCIATED_GROUP, SlideExtras, checked_picture, group_name
from wsireg.io.output import staged_output
from wsireg.io.pyramid import METHODS, downsample2, halved_shapes, level_shapes
from wsireg.progress import dask_progress

#: A chunk compressor: a numcodecs codec (zarr v2, NGFF 0.4) or a zarr v3 bytes-to-bytes codec.
Compressor = Codec | BytesBytesCodec

NGFF_VERSIONS = ("0.4", "0.5")
#: Lossless chunk compressions by name: ``zstd`` (Blosc zstd, :func:`default_compressor`),
#: ``zlib`` (gzip level 6) and ``none``.
ZARR_COMPRESSIONS = ("zstd", "zlib", "none")
RGB_CHANNELS = tuple(zip(RGB.names, RGB.colors, strict=True))
#: Percentiles (of the coarsest level's values) that a fluorescence display window spans.
WINDOW_PERCENTILES = (0.1, 99.9)


@dataclass(frozen=True)
class ZarrLayout:
    """How a multiscale OME-Zarr image lies on disk.

    ``chunk``: side of the spatial chunks (px). ``levels``: how many levels (``None``: halve
    until the top level fits in one chunk of at most 512 px,
    :func:`wsireg.io.pyramid.level_shapes`). ``ngff_version``: ``"0.4"`` (zarr v2 with ``/``
    chunk keys) or ``"0.5"`` (zarr v3). ``compression``: one of :data:`ZARR_COMPRESSIONS`
    (:func:`named_compressor`). ``compressor``: an explicit codec instead, a numcodecs codec
    (0.4) or a zarr v3 bytes-to-bytes codec (0.5; numcodecs Blosc/Zstd/GZip are translated).
    """

    chunk: int = 1024
    levels: int | None = None
    ngff_version: str = "0.4"
    compressor: Compressor | None = None
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if self.chunk < 16:
            raise ValueError(f"chunk must be at least 16 px, not {self.chunk}")
        if self.compression not in ZARR_COMPRESSIONS:
            raise ValueError(
                f"unknown OME-Zarr compression {self.compression!r}; use one of {ZARR_COMPRESSIONS}"
            )
        if self.levels is not None and self.levels < 1:
            raise ValueError(f"levels must be at least 1, not {self.levels}")


#: The layout of OME-Zarr outputs unless a caller gives another.
DEFAULT_ZARR_LAYOUT = ZarrLayout()


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------
def multiscale_metadata(
    shapes: Sequence[tuple[int, int]], mpp: tuple[float, float] | None, name: str | None = None
) -> dict[str, Any]:
    """The one ``multiscales`` entry (without ``version``) for levels ``0 .. len(shapes)-1``.

    Axes ``c`` (channel), ``y``, ``x`` (space, unit micrometer when ``mpp`` is known); level
    ``k`` has the scale ``[1, mpp_y * 2**k, mpp_x * 2**k]`` (``[1, 2**k, 2**k]`` level-0 pixels
    without a unit when ``mpp`` is unknown).
    """
    space: dict[str, Any] = {"type": "space"}
    if mpp is not None:
        space["unit"] = "micrometer"
    sx, sy = (float(mpp[0]), float(mpp[1])) if mpp is not None else (1.0, 1.0)
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, sy * 2**k, sx * 2**k]}],
        }
        for k in range(len(shapes))
    ]
    entry: dict[str, Any] = {
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
        "datasets": datasets,
    }
    if name is not None:
        entry["name"] = name
    return entry


def default_channels(channels: int, dtype: npt.DTypeLike) -> Channels:
    """What ``channels`` samples of ``dtype`` are when a caller does not say: brightfield RGB
    for 3 uint8 samples, labels for one integer sample, else fluorescence with default names
    and colours (:func:`wsireg.io.channels.fluorescence`)."""
    dtype = np.dtype(dtype)
    if channels == 3 and dtype == np.uint8:
        return RGB
    if channels == 1 and np.issubdtype(dtype, np.integer):
        return labels(dtype)
    return fluorescence(channels, dtype)


def checked_channels(
    channel_info: Channels | None, channels: int, dtype: npt.DTypeLike
) -> Channels:
    """``channel_info`` (``None``: :func:`default_channels`) after checking that it describes
    ``channels`` samples of ``dtype``; raises ``ValueError`` when it does not."""
    if channel_info is None:
        return default_channels(channels, dtype)
    if channel_info.count != channels or channel_info.dtype != np.dtype(dtype):
        raise ValueError(
            f"channel_info describes {channel_info.count} x {channel_info.dtype}, "
            f"the image has {channels} x {np.dtype(dtype)}"
        )
    return channel_info


def dtype_range(dtype: npt.DTypeLike) -> tuple[float, float]:
    """The display range of ``dtype``: its whole range for integers, 0.0 .. 1.0 for floats."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def omero_metadata(channel_info: Channels) -> dict[str, Any] | None:
    """``omero`` rendering metadata: for brightfield RGB the three channels with a full 0-255
    window; for fluorescence one linear channel each (label, colour, a window over
    :func:`dtype_range`); ``None`` for labels."""
    if channel_info.kind == "labels":
        return None
    low, high = dtype_range(channel_info.dtype)
    window = {"min": low, "max": high, "start": low, "end": high}
    return {
        "channels": [
            {
                "label": label,
                "color": color,
                "window": dict(window),
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
            }
            for label, color in zip(channel_info.names, channel_info.colors, strict=True)
        ],
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }


def group_attributes(
    shapes: Sequence[tuple[int, int]],
    channel_info: Channels,
    mpp: tuple[float, float] | None,
    name: str | None,
    ngff_version: str,
) -> dict[str, Any]:
    """Group attributes of an NGFF ``ngff_version`` image (0.4: top level; 0.5: under ``ome``)."""
    multiscale = multiscale_metadata(shapes, mpp, name)
    omero = omero_metadata(channel_info)
    if ngff_version == "0.4":
        attrs: dict[str, Any] = {"multiscales": [{"version": "0.4", **multiscale}]}
        if omero is not None:
            attrs["omero"] = omero
        return attrs
    ome: dict[str, Any] = {"version": "0.5", "multiscales": [multiscale]}
    if omero is not None:
        ome["omero"] = omero
    return {"ome": ome}


# --------------------------------------------------------------------------------------------
# Creating and filling a multiscale group
# --------------------------------------------------------------------------------------------
def default_compressor(ngff_version: str = "0.4") -> Compressor:
    """Blosc zstd level 3 with byte shuffle: numcodecs for zarr v2 (0.4), zarr codec for v3."""
    _check_version(ngff_version)
    if ngff_version == "0.4":
        return Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def named_compressor(compression: str, ngff_version: str = "0.4") -> Compressor | None:
    """The codec of a compression in :data:`ZARR_COMPRESSIONS` for ``ngff_version`` (``None``
    for ``"none"``: chunks stored raw)."""
    if compression == "zstd":
        return default_compressor(ngff_version)
    if compression == "zlib":
        return GZip(level=6) if ngff_version == "0.4" else GzipCodec(level=6)
    if compression == "none":
        return None
    raise ValueError(
        f"unknown OME-Zarr compression {compression!r}; use one of {ZARR_COMPRESSIONS}"
    )


def create_ome_zarr(
    path: str | Path,
    shape_yx: tuple[int, int],
    channels: int,
    dtype: npt.DTypeLike,
    *,
    layout: ZarrLayout = DEFAULT_ZARR_LAYOUT,
    mpp: tuple[float, float] | None = None,
    name: str | None = None,
    channel_info: Channels | None = None,
) -> zarr.Group:
    """Create an empty multiscale OME-Zarr image at ``path`` (which must not exist).

    Level arrays ``"0" .. "n-1"`` have shape ``(channels, H_k, W_k)`` and chunks
    ``(1, min(chunk, H_k), min(chunk, W_k))``, laid out as ``layout`` says (:class:`ZarrLayout`).
    ``channel_info`` says what the channels are (``None``: :func:`default_channels`; it must
    describe ``channels`` samples of ``dtype``, else ``ValueError``); unwritten chunks read as
    its background (white for brightfield, 0 otherwise).
    """
    ngff_version, chunk = layout.ngff_version, layout.chunk
    _check_version(ngff_version)
    dtype = np.dtype(dtype)
    channel_info = checked_channels(channel_info, int(channels), dtype)
    shapes = _plan_levels(shape_yx, chunk, layout.levels)
    zarr_format = 2 if ngff_version == "0.4" else 3
    compressor = layout.compressor
    if compressor is None:
        compressor = named_compressor(layout.compression, ngff_version)
    if zarr_format == 3 and compressor is not None:
        compressor = _as_v3_codec(compressor)
    group = zarr.open_group(str(path), mode="w-", zarr_format=zarr_format)
    fill = channel_info.background
    for k, (h, w) in enumerate(shapes):
        options: dict[str, Any] = {}
        if zarr_format == 2:
            options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        else:
            options["dimension_names"] = ("c", "y", "x")
        group.create_array(
            str(k),
            shape=(int(channels), h, w),
            chunks=(1, min(chunk, h), min(chunk, w)),
            dtype=dtype,
            compressors=compressor,
            fill_value=fill,
            **options,
        )
    group.attrs.update(group_attributes(shapes, channel_info, mpp, name, ngff_version))
    return group


def write_level0(group: zarr.Group, image: da.Array | np.ndarray) -> None:
    """Write ``image`` (``(H, W, C)``) into level ``"0"`` of ``group``, chunk by chunk."""
    target = level_arrays(group)[0]
    c, h, w = target.shape
    if tuple(image.shape) != (h, w, c) or image.dtype != target.dtype:
        raise ValueError(
            f"image {tuple(image.shape)} {image.dtype} does not fit level 0 "
            f"{(h, w, c)} {target.dtype}"
        )
    source = _aligned(image, target.chunks[1], target.chunks[2]).transpose(2, 0, 1)
    with _threads(), dask_progress("OME-Zarr level 0"):
        da.store(source, target, lock=False, compute=True)


def fill_pyramid(group: zarr.Group, downsample_method: str = "mean") -> None:
    """Fill levels ``1 .. n-1`` of ``group``, each from the previous level read from disk.

    Level ``k`` is :func:`wsireg.io.pyramid.downsample2` of level ``k - 1`` (``"mean"`` or
    ``"nearest"``), computed block by block: each task reads a ``2 x 2``-chunk region of
    level ``k - 1`` and writes whole chunks of level ``k``. The method is recorded as the
    multiscale ``type``; fluorescence display windows are then set from the data
    (:func:`update_display_windows`).
    """
    if downsample_method not in METHODS:
        raise ValueError(f"unknown downsampling method {downsample_method!r}; use {METHODS}")
    arrays = level_arrays(group)
    _set_multiscale_type(group, downsample_method)
    for k in range(1, len(arrays)):
        previous, target = arrays[k - 1], arrays[k]
        cy, cx = target.chunks[1], target.chunks[2]
        source = da.from_zarr(
            previous, chunks=(previous.shape[0], 2 * cy, 2 * cx), inline_array=True
        )
        smaller = downsample2(source, downsample_method, axes=(1, 2))
        if smaller.shape != target.shape:
            raise ValueError(f"level {k} is {target.shape}, expected {smaller.shape}")
        with _threads(), dask_progress(f"OME-Zarr level {k}"):
            da.store(smaller, target, lock=False, compute=True)
    update_display_windows(group)


def update_display_windows(group: zarr.Group) -> None:
    """Set each fluorescence channel's ``omero`` window ``start`` / ``end`` to the
    :data:`WINDOW_PERCENTILES` of its values on the coarsest level (read once), in the
    channel's pixel units, with ``end > start``; ``min`` / ``max`` widen to hold them (floats
    may leave 0 .. 1). Nothing changes without ``omero`` or for brightfield RGB."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    omero = ome.get("omero")
    coarsest = level_arrays(group)[-1]
    if not omero or _is_brightfield(omero, coarsest.dtype):
        return
    pixels = np.asarray(coarsest[:])
    integer = np.issubdtype(pixels.dtype, np.integer)
    for channel, values in zip(omero["channels"], pixels, strict=True):
        window = channel["window"]
        start, end = _percentile_window(values, (window["min"], window["max"]), integer)
        window.update(
            start=start, end=end, min=min(window["min"], start), max=max(window["max"], end)
        )
    group.attrs.update(attrs)


def _is_brightfield(omero: dict[str, Any], dtype: np.dtype) -> bool:
    """Whether ``omero`` is the rendering of brightfield RGB (:data:`RGB`)."""
    channels = [(c.get("label"), c.get("color")) for c in omero.get("channels", [])]
    return np.dtype(dtype) == np.uint8 and channels == list(RGB_CHANNELS)


def _percentile_window(
    values: np.ndarray, limits: tuple[float, float], integer: bool
) -> tuple[float, float]:
    """The :data:`WINDOW_PERCENTILES` of the finite ``values`` as ``(start, end)`` with
    ``end > start``: integers widen to whole values and by one step within ``limits``; floats
    by a thousandth of ``max(|start|, 1)``. No finite values: ``limits``."""
    finite = values[np.isfinite(values)] if not integer else values.ravel()
    if finite.size == 0:
        return float(limits[0]), float(limits[1])
    start, end = (float(p) for p in np.percentile(finite, WINDOW_PERCENTILES))
    if not integer:
        return start, end if end > start else start + max(abs(start), 1.0) * 1e-3
    start, end = float(np.floor(start)), float(np.ceil(end))
    if end <= start:
        end = start + 1.0
        if end > limits[1]:
            start, end = limits[1] - 1.0, limits[1]
    return start, end


def write_ome_zarr(  # noqa: PLR0913 - public keyword-only API: one keyword per output knob
    image: da.Array | np.ndarray,
    path: str | Path,
    *,
    layout: ZarrLayout = DEFAULT_ZARR_LAYOUT,
    mpp: tuple[float, float] | None = None,
    name: str | None = None,
    downsample_method: str | None = None,
    extras: SlideExtras | None = None,
    overwrite: bool = False,
    channel_info: Channels | None = None,
) -> Path:
    """Write ``image`` (``(H, W, C)``, dask or numpy) as a multiscale OME-Zarr at ``path``.

    See :func:`create_ome_zarr` for the layout and ``channel_info``; ``downsample_method`` as
    :func:`fill_pyramid` (``None``: ``"nearest"`` for labels, else ``"mean"``); ``extras``
    (associated images, vendor properties) as :func:`write_extras`. The output is staged
    under ``.NAME.partial`` and renamed into place at the end; an existing ``path`` is
    replaced only with ``overwrite``. Returns ``path``.
    """
    _check_version(layout.ngff_version)
    image = as_dask_image(image, layout.chunk)
    channel_info = checked_channels(channel_info, image.shape[2], image.dtype)
    method = downsample_method or default_method(channel_info)
    path = Path(path)
    with staged_output(path, overwrite=overwrite) as stage:
        group = create_ome_zarr(
            stage,
            image.shape[:2],
            image.shape[2],
            image.dtype,
            layout=layout,
            mpp=mpp,
            name=name,
            channel_info=channel_info,
        )
        write_level0(group, image)
        fill_pyramid(group, method)
        if extras is not None:
            write_extras(group, extras, layout)
    return path


def default_method(channel_info: Channels) -> str:
    """The pyramid's downsampling method for ``channel_info``: ``"nearest"`` for labels (no
    label value is invented), ``"mean"`` otherwise."""
    return "nearest" if channel_info.kind == "labels" else "mean"


def write_extras(group: zarr.Group, extras: SlideExtras, layout: ZarrLayout) -> None:
    """Store ``extras`` in the image ``group`` (:mod:`wsireg.io.extras`): each associated image
    a one-level multiscale image ``associated/NAME`` (one chunk, ``layout``'s compression and
    NGFF version), and the root attributes ``vendor_properties`` and ``associated_images``
    (name -> group path)."""
    paths: dict[str, str] = {}
    if extras.associated:
        holder = group.create_group(ASSOCIATED_GROUP)
        for name, image in extras.associated.items():
            picture = checked_picture(name, image)
            h, w = picture.shape[:2]
            one_chunk = ZarrLayout(
                chunk=max(16, h, w),
                levels=1,
                ngff_version=layout.ngff_version,
                compressor=layout.compressor,
                compression=layout.compression,
            )
            store = Path(str(holder.store.root)) / holder.path / group_name(name)
            image = create_ome_zarr(store, (h, w), 3, np.uint8, layout=one_chunk, name=name)
            level_arrays(image)[0][:] = np.moveaxis(picture, -1, 0)
            paths[name] = f"{ASSOCIATED_GROUP}/{group_name(name)}"
    group.attrs.update({"vendor_properties": dict(extras.properties), "associated_images": paths})


def level_arrays(group: zarr.Group) -> list[zarr.Array]:
    """The level arrays of a multiscale group written here, finest first."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    return [group[d["path"]] for d in ome["multiscales"][0]["datasets"]]


def as_dask_image(image: da.Array | np.ndarray, chunk: int) -> da.Array:
    """``image`` as an ``(H, W, C)`` dask array (numpy wrapped with ``chunk``-sized blocks)."""
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {tuple(image.shape)}")
    if isinstance(image, da.Array):
        return image
    return da.from_array(np.asarray(image), chunks=(chunk, chunk, -1))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_ome_zarr_levels(path: str | Path) -> tuple[list[zarr.Array], dict[str, Any]]:
    """Open the levels of the (first) multiscale image of an OME-Zarr (NGFF 0.1 - 0.5).

    Returns the level arrays, finest first, and a dict with ``version``, ``name``, ``axes``
    (list of ``{"name", "type", "unit"}`` dicts, array axis order), ``paths``, ``scales`` and
    ``translations`` (per level, one number per axis; a dataset's transforms composed with the
    multiscale-wide ones), ``scale_um`` (``(x, y)`` micrometres per level-0 pixel, or ``None``
    without a known spatial unit) and ``omero`` (or ``None``). A bioformats2raw layout is
    followed into its first image ``"0"``.
    """
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
        raise ValueError(f"{path}: not a zarr group ({exc})") from exc
    group, ome = _find_multiscales(root, path)
    multiscale = ome["multiscales"][0]
    datasets = multiscale["datasets"]
    paths = [str(d["path"]) for d in datasets]
    arrays = [group[p] for p in paths]
    axes = _axes(multiscale.get("axes"), arrays[0].ndim)
    outer = multiscale.get("coordinateTransformations") or []
    scales, translations = [], []
    for d in datasets:
        scale, translation = _transform(d.get("coordinateTransformations") or [], len(axes))
        g_scale, g_translation = _transform(outer, len(axes))
        scales.append([s * g for s, g in zip(scale, g_scale, strict=True)])
        translations.append(
            [t * g + gt for t, g, gt in zip(translation, g_scale, g_translation, strict=True)]
        )
    meta = {
        "version": str(ome.get("version") or multiscale.get("version") or ""),
        "name": multiscale.get("name"),
        "axes": axes,
        "paths": paths,
        "scales": scales,
        "translations": translations,
        "scale_um": _scale_um(axes, scales[0]),
        "omero": ome.get("omero"),
    }
    return arrays, meta


def _find_multiscales(root: zarr.Group, path: str | Path) -> tuple[zarr.Group, dict[str, Any]]:
    for group in (root, _child_group(root, "0")):
        if group is None:
            continue
        attrs = group.attrs.asdict()
        ome = attrs.get("ome", attrs)
        if ome.get("multiscales"):
            return group, ome
    raise ValueError(f"{path}: no OME-Zarr multiscales metadata")


def _child_group(root: zarr.Group, name: str) -> zarr.Group | None:
    with contextlib.suppress(KeyError, FileNotFoundError):
        child = root[name]
        if isinstance(child, zarr.Group):
            return child
    return None


def _axes(axes: Sequence[Any] | None, ndim: int) -> list[dict[str, Any]]:
    if not axes:  # NGFF 0.1 / 0.2: always t, c, z, y, x
        axes = ["t", "c", "z", "y", "x"][-ndim:]
    out = []
    for axis in axes:
        if isinstance(axis, str):
            kind = {"c": "channel", "t": "time"}.get(axis, "space")
            out.append({"name": axis, "type": kind})
        else:
            out.append(dict(axis))
    return out


def _transform(transforms: Sequence[dict[str, Any]], ndim: int) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            scale = [float(s) for s in t["scale"]]
        elif t.get("type") == "translation" and "translation" in t:
            translation = [float(s) for s in t["translation"]]
    return scale, translation


def _scale_um(axes: list[dict[str, Any]], scale: list[float]) -> tuple[float, float] | None:
    names = [a.get("name") for a in axes]
    if "x" not in names or "y" not in names:
        return None
    out = []
    for axis_name in ("x", "y"):
        i = names.index(axis_name)
        factor = micrometres_per(str(axes[i].get("unit", "")))
        if factor is None:
            return None
        out.append(scale[i] * factor)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _check_version(ngff_version: str) -> None:
    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"unsupported NGFF version {ngff_version!r}; use one of {NGFF_VERSIONS}")


def _plan_levels(shape_yx: Sequence[int], chunk: int, levels: int | None) -> list[tuple[int, int]]:
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if levels is None:
        return level_shapes(shape_yx, chunk)
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    return halved_shapes(shape_yx, levels)


def _as_v3_codec(codec: Compressor) -> BytesBytesCodec:
    """Translate common numcodecs compressors to their zarr v3 codecs; pass others through."""
    if not isinstance(codec, Codec):
        return codec
    config = codec.get_config()
    kind = config.pop("id")
    if kind == "blosc":
        shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle", -1: "shuffle"}
        return BloscCodec(
            cname=config["cname"],
            clevel=config["clevel"],
            shuffle=shuffle[config.get("shuffle", 1)],
        )
    if kind == "zstd":
        return ZstdCodec(level=config.get("level", 0))
    if kind == "gzip":
        return GzipCodec(level=config.get("level", 5))
    raise ValueError(f"no zarr v3 equivalent known for the numcodecs codec {kind!r}")


def _set_multiscale_type(group: zarr.Group, method: str) -> None:
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    ome["multiscales"][0]["type"] = method
    group.attrs.update(attrs)


def _aligned(image: da.Array | np.ndarray, cy: int, cx: int) -> da.Array:
    """``image`` as dask with block boundaries on the ``(cy, cx)`` chunk grid (one channel
    block), so every write covers whole zarr chunks and no two tasks touch one chunk."""
    if not isinstance(image, da.Array):
        return da.from_array(np.asarray(image), chunks=(cy, cx, -1))
    if image.numblocks[2] != 1:
        image = image.rechunk({2: -1})
    if not (_on_grid(image.chunks[0], cy) and _on_grid(image.chunks[1], cx)):
        image = image.rechunk((cy, cx, -1))
    return image


def _on_grid(sizes: Sequence[int], step: int) -> bool:
    """Block boundaries at multiples of ``step`` and blocks of at most ``2 * step``."""
    edges = np.cumsum(sizes)[:-1]
    return bool(np.all(edges % step == 0)) and max(sizes) <= 2 * step


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    """Dask's threaded scheduler on a pool of its own that is drained on the way out, so that
    after a failed computation no task is still writing while the caller cleans up."""
    workers = dask.config.get("num_workers", None) or os.cpu_count() or 2
    pool = ThreadPoolExecutor(workers, thread_name_prefix="wsireg-ngff")
    try:
        with dask.config.set(scheduler="threads", pool=pool):
            yield
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
