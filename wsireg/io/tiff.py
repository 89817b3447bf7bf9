"""Tiled pyramidal OME-TIFF (with SubIFDs), written out of core.

Pixels come in as ``(H, W, C)`` arrays (see :mod:`wsireg.core.coords`); ``mpp`` is ``(x, y)``
micrometres per level-0 pixel. Level ``k`` is the grid at downsample ``2**k`` of
:mod:`wsireg.io.pyramid`. The tile side, compression and JPEG quality are one
:class:`TiffLayout`.

What the channels are is one :class:`wsireg.io.channels.Channels` (``None``: brightfield RGB).
Brightfield is written as interleaved RGB uint8 (one page per level, OME axes ``YXS``).
Fluorescence and labels, at any dtype OME-XML knows, are written one page per channel (OME
axes ``CYX``, ``minisblack``), with each channel's ``Name`` and ``Color`` in the OME-XML:
tifffile writes one OME ``Channel`` element per page, so names and colours survive (a
``planarconfig="separate"`` page holds all channels as samples of one ``Channel``). JPEG is
for brightfield only.

:func:`write_ome_tiff` builds the pyramid as a temporary zarr (:mod:`wsireg.io.ngff`) and streams
it into the TIFF with :func:`write_ome_tiff_levels`, which also takes an existing pyramid (e.g. an
OME-Zarr written by :mod:`wsireg.io.ngff`). Both are staged like every output.
"""

from __future__ import annotations

import math
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from numcodecs import Blosc
from tqdm import tqdm

from wsireg.io.channels import RGB, Channels, color_to_ome
from wsireg.io.extras import PROPERTIES_NAMESPACE, SlideExtras, checked_picture
from wsireg.io.ngff import (
    ZarrLayout,
    as_dask_image,
    checked_channels,
    create_ome_zarr,
    default_method,
    fill_pyramid,
    level_arrays,
    write_level0,
)
from wsireg.io.output import check_output, staged_output
from wsireg.progress import progress

TIFF_COMPRESSIONS = ("jpeg", "zlib", "zstd", "none")


@dataclass(frozen=True)
class TiffLayout:
    """How an OME-TIFF is tiled and compressed.

    ``tile``: tile side (px, a positive multiple of 16). ``compression``: ``"jpeg"``
    (``quality`` 1-100), ``"zlib"``, ``"zstd"`` or ``"none"``.
    """

    tile: int = 512
    compression: str = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.tile < 16 or self.tile % 16:
            raise ValueError(f"tile must be a positive multiple of 16, not {self.tile}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1..100, not {self.quality}")


#: The layout of OME-TIFF outputs unless a caller gives another.
DEFAULT_TIFF_LAYOUT = TiffLayout()


def write_ome_tiff(  # noqa: PLR0913 - public keyword-only API: one keyword per output knob
    image: da.Array | np.ndarray,
    path: str | Path,
    *,
    layout: TiffLayout = DEFAULT_TIFF_LAYOUT,
    mpp: tuple[float, float] | None = None,
    levels: int | None = None,
    name: str | None = None,
    extras: SlideExtras | None = None,
    overwrite: bool = False,
    channel_info: Channels | None = None,
) -> Path:
    """Write ``image`` as a tiled pyramidal OME-TIFF with SubIFDs: ``(H, W, 3)`` uint8 RGB
    when ``channel_info`` is ``None``, else ``(H, W, C)`` of the count and dtype it describes.

    The pyramid (:func:`wsireg.io.pyramid.level_shapes` with ``chunk=tile``, or ``levels``
    levels; ``"nearest"`` downsampling for labels, ``"mean"`` otherwise) is first built out of
    core as a temporary zarr (zstd level 1, chunks of one tile) in a hidden directory beside
    ``path``, then streamed into the TIFF by :func:`write_ome_tiff_levels`. Physical pixel
    sizes go into the OME-XML when ``mpp`` is known; ``name``, ``extras`` and
    ``channel_info`` as :func:`write_ome_tiff_levels`. Staged like every output; an existing
    ``path`` is replaced only with ``overwrite``.
    """
    image = as_dask_image(image, layout.tile)
    if channel_info is None and (image.shape[2] != 3 or image.dtype != np.uint8):
        raise ValueError(
            f"OME-TIFF output takes (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
        )
    channel_info = checked_channels(channel_info or RGB, image.shape[2], image.dtype)
    _check_layout(layout, channel_info)
    path = Path(check_output(path, overwrite))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = ZarrLayout(chunk=layout.tile, levels=levels, compressor=_scratch_compressor())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels-") as tmp:
        group = create_ome_zarr(
            Path(tmp) / "levels.zarr",
            image.shape[:2],
            image.shape[2],
            image.dtype,
            layout=scratch,
            channel_info=channel_info,
        )
        write_level0(group, image)
        fill_pyramid(group, default_method(channel_info))
        return write_ome_tiff_levels(
            level_arrays(group),
            path,
            layout=layout,
            mpp=mpp,
            name=name,
            extras=extras,
            overwrite=overwrite,
            channel_info=channel_info,
        )


def write_ome_tiff_levels(
    levels: Sequence[zarr.Array],
    path: str | Path,
    *,
    layout: TiffLayout = DEFAULT_TIFF_LAYOUT,
    mpp: tuple[float, float] | None = None,
    name: str | None = None,
    extras: SlideExtras | None = None,
    overwrite: bool = False,
    channel_info: Channels | None = None,
) -> Path:
    """Stream an existing pyramid into a tiled OME-TIFF with SubIFDs, tile by tile.

    ``levels`` are ``(C, H_k, W_k)`` arrays at downsample ``2**k`` (e.g. the levels of an
    OME-Zarr written here, from :func:`wsireg.io.ngff.read_ome_zarr_levels`); any chunking
    works. ``channel_info`` says what the ``C`` channels are (``None``: brightfield RGB, three
    uint8 channels); brightfield is written as interleaved RGB, anything else one page per
    channel with the channels' names and colours in the OME-XML (``ValueError`` for JPEG).
    Tiles are read in groups of 16 one group ahead and encoded by tifffile in two threads, at
    most 64 MiB of raw tiles at a time. The pyramid is OME ``Image`` 0, named ``name``;
    ``extras`` (:mod:`wsireg.io.extras`) adds the vendor properties as its ``MapAnnotation``
    and each associated image as one more ``Image`` of its own name (one level, zlib).
    Options as :func:`write_ome_tiff`; staged output.
    """
    if channel_info is not None:
        channel_info = checked_channels(channel_info, levels[0].shape[0], levels[0].dtype)
    channel_info = channel_info or RGB
    _check_layout(layout, channel_info)
    options = _tiff_options(layout)
    with (
        staged_output(path, overwrite=overwrite) as stage,
        tifffile.TiffWriter(stage, bigtiff=True, ome=True) as tif,
    ):
        for k, array in enumerate(levels):
            extra: dict[str, Any] = (
                {
                    "subifds": len(levels) - 1,
                    "metadata": _ome_metadata(mpp, name, extras, channel_info),
                }
                if k == 0
                else {"subfiletype": 1, "metadata": None}
            )
            if mpp is not None:
                extra["resolution"] = (1e4 / (mpp[0] * 2**k), 1e4 / (mpp[1] * 2**k))
                extra["resolutionunit"] = "CENTIMETER"
            _write_level(tif, array, k, layout.tile, channel_info, {**options, **extra})
        if extras is not None:
            _write_associated(tif, extras)
    return Path(path)


def _write_level(
    tif: tifffile.TiffWriter,
    array: zarr.Array,
    k: int,
    tile: int,
    channel_info: Channels,
    options: dict[str, Any],
) -> None:
    """Write level ``k`` (``(C, H, W)``): brightfield as one interleaved RGB page, anything
    else one ``minisblack`` page per channel (tiles of channel 0 row-major, then channel 1,
    ...)."""
    c, h, w = array.shape
    if channel_info.kind == "brightfield":
        tiles, shape, photometric, count = _tiles(array, tile), (h, w, c), "rgb", 1
    else:
        tiles, shape, photometric, count = _plane_tiles(array, tile), (c, h, w), "minisblack", c
    with progress(count * _tile_count(h, w, tile), f"OME-TIFF level {k}", "tile") as bar:
        tif.write(
            _counted(tiles, bar),
            shape=shape,
            dtype=array.dtype,
            photometric=photometric,
            **options,
        )


def _write_associated(tif: tifffile.TiffWriter, extras: SlideExtras) -> None:
    """Each associated image one more OME ``Image`` (series) of its own name, zlib."""
    for name, picture in extras.associated.items():
        tif.write(
            checked_picture(name, picture),
            photometric="rgb",
            compression="zlib",
            metadata={"axes": "YXS", "Name": name},
        )


def _check_layout(layout: TiffLayout, channel_info: Channels) -> None:
    """Known compression, tiles a multiple of 16 px, and JPEG only for brightfield RGB."""
    if layout.compression not in TIFF_COMPRESSIONS:
        raise ValueError(
            f"unknown compression {layout.compression!r}; use one of {TIFF_COMPRESSIONS}"
        )
    if layout.tile % 16 or layout.tile <= 0:
        raise ValueError(f"TIFF tile size must be a positive multiple of 16, got {layout.tile}")
    if layout.compression == "jpeg" and channel_info.kind != "brightfield":
        raise ValueError(
            f"JPEG is lossy and 8-bit, only for brightfield RGB: write {channel_info.kind} "
            f"({channel_info.dtype}) with zlib, zstd or none"
        )


def _tiff_options(layout: TiffLayout) -> dict[str, Any]:
    # tifffile encodes batches of tiles in threads; cap a batch at 64 MiB of raw tiles
    tile = layout.tile
    options: dict[str, Any] = {"tile": (tile, tile), "maxworkers": 2, "buffersize": 64 << 20}
    if layout.compression == "jpeg":
        options.update(compression="jpeg", compressionargs={"level": int(layout.quality)})
    elif layout.compression != "none":
        options["compression"] = layout.compression
    return options


def _ome_metadata(
    mpp: tuple[float, float] | None,
    name: str | None,
    extras: SlideExtras | None,
    channel_info: Channels,
) -> dict[str, Any]:
    """The OME-XML of the pyramid: axes ``YXS`` for brightfield RGB, else ``CYX`` with each
    channel's ``Name`` and ``Color`` (a signed RGBA integer)."""
    meta: dict[str, Any] = {"axes": "YXS"}
    if channel_info.kind != "brightfield":
        meta["axes"] = "CYX"
        meta["Channel"] = {
            "Name": list(channel_info.names),
            "Color": [color_to_ome(c) for c in channel_info.colors],
        }
    if name is not None:
        meta["Name"] = name
    if extras is not None and extras.properties:
        meta["MapAnnotation"] = {
            "Namespace": PROPERTIES_NAMESPACE,
            "Value": {str(k): str(v) for k, v in extras.properties.items()},
        }
    if mpp is not None:
        meta.update(
            PhysicalSizeX=float(mpp[0]),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(mpp[1]),
            PhysicalSizeYUnit="µm",
        )
    return meta


def _tile_count(h: int, w: int, tile: int) -> int:
    return math.ceil(h / tile) * math.ceil(w / tile)


def _tiles(array: zarr.Array, tile: int, span: int = 16) -> Iterator[np.ndarray]:
    """``(tile, tile, C)`` tiles of a ``(C, H, W)`` array in row-major order (edge tiles
    smaller), reading ``span`` tiles of all channels at a time one group ahead in a
    background thread."""

    def read(group: tuple[int, int, int, int]) -> np.ndarray:
        _, y, x0, x1 = group
        return np.asarray(array[:, y : y + tile, x0:x1]).transpose(1, 2, 0)

    return _prefetched(_bands(array.shape[1:], [None], tile, span), read, tile)


def _plane_tiles(array: zarr.Array, tile: int, span: int = 16) -> Iterator[np.ndarray]:
    """``(tile, tile)`` tiles of a ``(C, H, W)`` array, channel by channel, each channel's in
    row-major order (edge tiles smaller), reading ``span`` tiles of one channel at a time one
    group ahead in a background thread."""

    def read(group: tuple[int, int, int, int]) -> np.ndarray:
        c, y, x0, x1 = group
        return np.asarray(array[c, y : y + tile, x0:x1])

    return _prefetched(_bands(array.shape[1:], range(array.shape[0]), tile, span), read, tile)


def _bands(
    shape_yx: Sequence[int], planes: Sequence[int | None], tile: int, span: int
) -> list[tuple[Any, int, int, int]]:
    """``(plane, y, x0, x1)`` of each band of at most ``span`` tiles of one tile row: per plane,
    row-major."""
    h, w = shape_yx
    return [
        (c, y, x, min(x + span * tile, w))
        for c in planes
        for y in range(0, h, tile)
        for x in range(0, w, span * tile)
    ]


def _prefetched(
    groups: Sequence[tuple[Any, int, int, int]],
    read: Callable[[tuple[Any, int, int, int]], np.ndarray],
    tile: int,
) -> Iterator[np.ndarray]:
    """The tiles of each band ``read(group)`` in order, the next band read in a background
    thread while the current one is consumed (two bands in memory at most)."""
    with ThreadPoolExecutor(1) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for group in groups:
            pending.append(pool.submit(read, group))
            if len(pending) < 2:
                continue
            yield from _split(pending.popleft().result(), tile)
        while pending:
            yield from _split(pending.popleft().result(), tile)


def _split(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The ``tile``-wide pieces of a band (its axis 1 is x), contiguous."""
    for x in range(0, band.shape[1], tile):
        yield np.ascontiguousarray(band[:, x : x + tile])


def _counted(tiles: Iterator[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
    """``tiles``, advancing ``bar`` by one as each is handed on."""
    for tile in tiles:
        bar.update(1)
        yield tile


def _scratch_compressor() -> Blosc:
    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)
