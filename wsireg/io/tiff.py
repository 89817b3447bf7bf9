"""Tiled pyramidal OME-TIFF (with SubIFDs), written out of core.

Pixels come in as ``(H, W, 3)`` uint8 RGB (see :mod:`wsireg.core.coords`); ``mpp`` is ``(x, y)``
micrometres per level-0 pixel. Level ``k`` is the grid at downsample ``2**k`` of
:mod:`wsireg.io.pyramid`. The tile side, compression and JPEG quality are one
:class:`TiffLayout`.

:func:`write_ome_tiff` builds the pyramid as a temporary zarr (:mod:`wsireg.io.ngff`) and streams
it into the TIFF with :func:`write_ome_tiff_levels`, which also takes an existing pyramid (e.g. an
OME-Zarr written by :mod:`wsireg.io.ngff`). Both are staged like every output.
"""

from __future__ import annotations

import math
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
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

from wsireg.io.extras import PROPERTIES_NAMESPACE, SlideExtras, checked_picture
from wsireg.io.ngff import (
    ZarrLayout,
    as_dask_image,
    create_ome_zarr,
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


def write_ome_tiff(
    image: da.Array | np.ndarray,
    path: str | Path,
    *,
    layout: TiffLayout = DEFAULT_TIFF_LAYOUT,
    mpp: tuple[float, float] | None = None,
    levels: int | None = None,
    name: str | None = None,
    extras: SlideExtras | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``image`` (``(H, W, 3)`` uint8 RGB) as a tiled pyramidal OME-TIFF with SubIFDs.

    The pyramid (:func:`wsireg.io.pyramid.level_shapes` with ``chunk=tile``, or ``levels``
    levels) is first built out of core as a temporary zarr (zstd level 1, chunks of one tile)
    in a hidden directory beside ``path``, then streamed into the TIFF by
    :func:`write_ome_tiff_levels`. Physical pixel sizes go into the OME-XML when ``mpp`` is
    known; ``name`` and ``extras`` as :func:`write_ome_tiff_levels`. Staged like every
    output; an existing ``path`` is replaced only with ``overwrite``.
    """
    image = as_dask_image(image, layout.tile)
    if image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"OME-TIFF output takes (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
        )
    _check_layout(layout)
    path = Path(check_output(path, overwrite))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = ZarrLayout(chunk=layout.tile, levels=levels, compressor=_scratch_compressor())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels-") as tmp:
        group = create_ome_zarr(
            Path(tmp) / "levels.zarr", image.shape[:2], image.shape[2], image.dtype, layout=scratch
        )
        write_level0(group, image)
        fill_pyramid(group)
        return write_ome_tiff_levels(
            level_arrays(group),
            path,
            layout=layout,
            mpp=mpp,
            name=name,
            extras=extras,
            overwrite=overwrite,
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
) -> Path:
    """Stream an existing pyramid into a tiled OME-TIFF with SubIFDs, tile by tile.

    ``levels`` are ``(3, H_k, W_k)`` uint8 arrays at downsample ``2**k`` (e.g. the levels of an
    OME-Zarr written here, from :func:`wsireg.io.ngff.read_ome_zarr_levels`); any chunking
    works. Tiles are read in groups of 16 one group ahead and encoded by tifffile in two
    threads, at most 64 MiB of raw tiles at a time. The pyramid is OME ``Image`` 0, named
    ``name``; ``extras`` (:mod:`wsireg.io.extras`) adds the vendor properties as its
    ``MapAnnotation`` and each associated image as one more ``Image`` of its own name (one
    level, zlib). Options as :func:`write_ome_tiff`; staged output.
    """
    _check_layout(layout)
    options = _tiff_options(layout)
    tile = layout.tile
    with (
        staged_output(path, overwrite=overwrite) as stage,
        tifffile.TiffWriter(stage, bigtiff=True, ome=True) as tif,
    ):
        for k, array in enumerate(levels):
            extra: dict[str, Any] = (
                {"subifds": len(levels) - 1, "metadata": _ome_metadata(mpp, name, extras)}
                if k == 0
                else {"subfiletype": 1, "metadata": None}
            )
            if mpp is not None:
                extra["resolution"] = (1e4 / (mpp[0] * 2**k), 1e4 / (mpp[1] * 2**k))
                extra["resolutionunit"] = "CENTIMETER"
            c, h, w = array.shape
            with progress(_tile_count(h, w, tile), f"OME-TIFF level {k}", "tile") as bar:
                tif.write(
                    _tiles(array, tile, bar),
                    shape=(h, w, c),
                    dtype=array.dtype,
                    photometric="rgb",
                    **options,
                    **extra,
                )
        if extras is not None:
            _write_associated(tif, extras)
    return Path(path)


def _write_associated(tif: tifffile.TiffWriter, extras: SlideExtras) -> None:
    """Each associated image one more OME ``Image`` (series) of its own name, zlib."""
    for name, picture in extras.associated.items():
        tif.write(
            checked_picture(name, picture),
            photometric="rgb",
            compression="zlib",
            metadata={"axes": "YXS", "Name": name},
        )


def _check_layout(layout: TiffLayout) -> None:
    if layout.compression not in TIFF_COMPRESSIONS:
        raise ValueError(
            f"unknown compression {layout.compression!r}; use one of {TIFF_COMPRESSIONS}"
        )
    if layout.tile % 16 or layout.tile <= 0:
        raise ValueError(f"TIFF tile size must be a positive multiple of 16, got {layout.tile}")


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
    mpp: tuple[float, float] | None, name: str | None, extras: SlideExtras | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": "YXS"}
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


def _tiles(array: zarr.Array, tile: int, bar: tqdm, span: int = 16) -> Iterator[np.ndarray]:
    """``(tile, tile, C)`` tiles of a ``(C, H, W)`` array in row-major order (edge tiles
    smaller), reading ``span`` tiles at a time one group ahead in a background thread."""
    _, h, w = array.shape
    groups = [
        (y, x, min(x + span * tile, w)) for y in range(0, h, tile) for x in range(0, w, span * tile)
    ]

    def read(group: tuple[int, int, int]) -> np.ndarray:
        y, x0, x1 = group
        return np.asarray(array[:, y : y + tile, x0:x1]).transpose(1, 2, 0)

    with ThreadPoolExecutor(1) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for group in groups:
            pending.append(pool.submit(read, group))
            if len(pending) < 2:
                continue
            yield from _split(pending.popleft().result(), tile, bar)
        while pending:
            yield from _split(pending.popleft().result(), tile, bar)


def _split(band: np.ndarray, tile: int, bar: tqdm) -> Iterator[np.ndarray]:
    for x in range(0, band.shape[1], tile):
        yield np.ascontiguousarray(band[:, x : x + tile])
        bar.update(1)


def _scratch_compressor() -> Blosc:
    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)
