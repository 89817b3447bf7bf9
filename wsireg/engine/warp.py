"""The out-of-core warp engine: a source slide resampled into target space, chunk by chunk.

:func:`warp_block` is the one block function: for a block of a target grid it computes the
transform on the block (:mod:`wsireg.engine.transform`), reads only the bounding box of the source
region it needs from the source level closest in resolution, and resamples it (OpenCV
``remap``: bilinear with 1/32-pixel fixed-point weights on uint8, or nearest for label masks).
Source pixels are interpolated once, whatever the number of composed stages. The registration
scheduler uses the same function to warp the source by the current transform.

:func:`warp` writes a whole output in three steps: the chunk job (:class:`_WarpJob`: one
:func:`warp_block` per output chunk, written into level 0 of a staged OME-Zarr), the run (the
chunk tasks on dask's threaded scheduler or a dask.distributed cluster,
:mod:`wsireg.engine.parallel`, then the pyramid, :func:`wsireg.io.ngff.fill_pyramid`) and the
output format (the OME-Zarr renamed into place, or streamed into an OME-TIFF). What is written
is a :class:`WarpOptions`, where it runs an :class:`~wsireg.engine.parallel.Execution`.
``resume`` continues a staged output left by a killed run of the same job (the same options,
source and transform, fields included: :meth:`Transform.fingerprint`; another job is refused),
computing only the chunks that are missing (zarr writes each chunk atomically, so a chunk on
disk is complete).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zarr

from wsireg.core.blocks import blocks
from wsireg.core.coords import grid_to_level0_affine
from wsireg.engine.options import no_overrides_left, take_overrides
from wsireg.engine.parallel import Execution, cluster_client, map_on_cluster, run_threaded
from wsireg.engine.transform import SlideRef, Transform
from wsireg.errors import InputError, TransformError
from wsireg.io.channels import Channels
from wsireg.io.convert import FORMATS, check_compression, written_channels
from wsireg.io.ngff import (
    NGFF_VERSIONS,
    ZARR_COMPRESSIONS,
    ZarrLayout,
    create_ome_zarr,
    fill_pyramid,
    level_arrays,
)
from wsireg.io.output import check_output, check_output_path, remove, staged_output
from wsireg.io.slide import Slide, open_slide
from wsireg.io.tiff import TIFF_COMPRESSIONS, TiffLayout, write_ome_tiff_levels
from wsireg.progress import progress

#: Largest source box (pixels) one block may read; beyond it a coarser level is used.
MAX_BOX_PIXELS = 24 << 20
INTERPOLATIONS = ("linear", "nearest")
#: Output chunk sides (px).
MIN_CHUNK, MAX_CHUNK = 16, 16384
#: OME-TIFF tile sides (px; multiples of 16).
MIN_TILE, MAX_TILE = 16, 4096
#: Backend name of a registered view (:mod:`wsireg.engine.view`): a slide warped on reading.
REGISTERED_BACKEND = "registered"


# --------------------------------------------------------------------------------------------
# One block
# --------------------------------------------------------------------------------------------
def scale_of(affine: np.ndarray) -> float:
    """Mean linear scale of an affine (source pixels per target pixel)."""
    return math.sqrt(abs(np.linalg.det(np.asarray(affine)[:2, :2]))) or 1.0


def transform_scale(transform: Transform) -> float:
    """Source level-0 pixels per target level-0 pixel (affine parts; fields are local)."""
    scale = 1.0
    for stage in transform.stages:
        scale *= scale_of(stage.affine)
    return scale


def choose_source_level(source: Slide, transform: Transform, out_downsample: float) -> int:
    """The coarsest source level at least as fine as one output pixel needs (OpenSlide's
    rule)."""
    return source.get_best_level_for_downsample(out_downsample * transform_scale(transform))


def source_pixel_maps(
    transform: Transform,
    y0: int,
    x0: int,
    h: int,
    w: int,
    out_downsample: float,
    source_downsample: float,
) -> _AffinePlusDisplacement | _DenseMaps:
    """Source-level pixel coordinates of the target-grid block ``[y0:y0+h, x0:x0+w]``.

    For one stage, ``map = M [j, i, 1] + B u`` with ``M`` the affine from output pixel indices
    to source-level indices and ``B`` its linear part: the affine part stays separable (a row
    and a column vector per axis, float64) and only ``B u`` is interpolated (float32). Chains
    of stages are mapped densely in float64.
    """
    to_source_index = np.linalg.inv(grid_to_level0_affine(source_downsample))
    if len(transform.stages) == 1:
        stage = transform.stages[0]
        M = to_source_index @ stage.affine @ grid_to_level0_affine(out_downsample)
        B = to_source_index[:2, :2] @ stage.affine[:2, :2]
        disp = stage.displacement_block(y0, x0, h, w, out_downsample, matrix=B)
        j = np.arange(x0, x0 + w, dtype=np.float64)
        i = np.arange(y0, y0 + h, dtype=np.float64)
        return _AffinePlusDisplacement(
            row_x=M[0, 0] * j + M[0, 2],
            col_x=M[0, 1] * i,
            row_y=M[1, 0] * j + M[1, 2],
            col_y=M[1, 1] * i,
            disp=disp,
        )
    coords = transform.source_coordinates(y0, x0, h, w, out_downsample)
    return _DenseMaps(coords @ to_source_index[:2, :2].T + to_source_index[:2, 2])


@dataclass
class _AffinePlusDisplacement:
    """``map = row(j) + col(i) [+ disp]`` per axis, kept separable until made relative."""

    row_x: np.ndarray
    col_x: np.ndarray
    row_y: np.ndarray
    col_y: np.ndarray
    disp: np.ndarray | None

    def bounds(self) -> tuple[float, float, float, float]:
        x_lo = self.row_x.min() + self.col_x.min()
        x_hi = self.row_x.max() + self.col_x.max()
        y_lo = self.row_y.min() + self.col_y.min()
        y_hi = self.row_y.max() + self.col_y.max()
        if self.disp is not None:
            x_lo += float(self.disp[..., 0].min())
            x_hi += float(self.disp[..., 0].max())
            y_lo += float(self.disp[..., 1].min())
            y_hi += float(self.disp[..., 1].max())
        return x_lo, x_hi, y_lo, y_hi

    def relative(self, ox: float, oy: float) -> tuple[np.ndarray, np.ndarray]:
        map_x = np.add.outer(self.col_x.astype(np.float32), (self.row_x - ox).astype(np.float32))
        map_y = np.add.outer((self.col_y - oy).astype(np.float32), self.row_y.astype(np.float32))
        if self.disp is not None:
            map_x += self.disp[..., 0]
            map_y += self.disp[..., 1]
        return map_x, map_y


@dataclass
class _DenseMaps:
    """Dense source-level coordinates (h, w, 2) float64."""

    coords: np.ndarray

    def bounds(self) -> tuple[float, float, float, float]:
        cx, cy = self.coords[..., 0], self.coords[..., 1]
        return float(cx.min()), float(cx.max()), float(cy.min()), float(cy.max())

    def relative(self, ox: float, oy: float) -> tuple[np.ndarray, np.ndarray]:
        return (
            (self.coords[..., 0] - ox).astype(np.float32),
            (self.coords[..., 1] - oy).astype(np.float32),
        )


def warp_block(
    transform: Transform,
    source: Slide,
    box: tuple[int, int, int, int],
    out_downsample: float = 1.0,
    *,
    source_level: int | None = None,
    interpolation: str = "linear",
) -> np.ndarray:
    """Pixels ``[y0:y0+h, x0:x0+w]`` (``box = (y0, x0, h, w)``) of the target grid at
    ``out_downsample``, taken from ``source`` through ``transform``: (h, w, 3) uint8, the RGB
    :meth:`Slide.read` gives (a brightfield slide, or its shown channel).

    Outside the source slide the result is white.
    """
    return _resample(
        transform,
        source,
        box,
        out_downsample,
        source_level,
        interpolation,
        _Samples(source.read, 3, np.dtype(np.uint8), 255),
    )


def warp_channels_block(
    transform: Transform,
    source: Slide,
    box: tuple[int, int, int, int],
    out_downsample: float = 1.0,
    *,
    source_level: int | None = None,
    interpolation: str = "linear",
    channels: Sequence[int] | None = None,
) -> np.ndarray:
    """As :func:`warp_block`, of the samples as stored (:meth:`Slide.read_channels`): ``(h, w,
    c)`` at the source's dtype, the ``channels`` given (``None``: all). Outside the source
    slide: the channels' background (255 brightfield, else 0). Linear interpolation of
    integers rounds to the nearest value; nearest keeps values exactly."""
    info = source.channels
    count = info.count if channels is None else len(channels)

    def read(level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return source.read_channels(level, y0, x0, h, w, channels)

    return _resample(
        transform,
        source,
        box,
        out_downsample,
        source_level,
        interpolation,
        _Samples(read, count, info.dtype, info.background),
    )


@dataclass(frozen=True)
class _Samples:
    """What a block resamples: ``read(level, y0, x0, h, w)`` gives ``(h, w, count)`` of
    ``dtype``; ``fill`` outside the source."""

    read: Callable[[int, int, int, int, int], np.ndarray]
    count: int
    dtype: np.dtype
    fill: int


def _resample(
    transform: Transform,
    source: Slide,
    box: tuple[int, int, int, int],
    out_downsample: float,
    source_level: int | None,
    interpolation: str,
    samples: _Samples,
) -> np.ndarray:
    """The block warp of :func:`warp_block` for any :class:`_Samples`."""
    y0, x0, h, w = box
    needed = out_downsample * transform_scale(transform)
    level = source.get_best_level_for_downsample(needed) if source_level is None else source_level
    while True:
        ds = source.level_downsamples[level]
        # A level much finer than the output needs is area-averaged first (anti-aliasing).
        factor = max(1, int(needed / ds + 1e-6)) if interpolation == "linear" else 1
        maps = source_pixel_maps(transform, y0, x0, h, w, out_downsample, ds)
        x_lo, x_hi, y_lo, y_hi = maps.bounds()
        if not all(map(math.isfinite, (x_lo, x_hi, y_lo, y_hi))):
            raise TransformError(transform.path or "transform", "non-finite coordinates")
        sh, sw = source.level_shape(level)
        bx0, by0 = max(math.floor(x_lo) - factor, -factor), max(math.floor(y_lo) - factor, -factor)
        bx1 = min(math.floor(x_hi) + 2 + 2 * factor, sw + factor)
        by1 = min(math.floor(y_hi) + 2 + 2 * factor, sh + factor)
        if bx1 <= bx0 or by1 <= by0:  # the whole block maps outside the source
            return np.full((h, w, samples.count), samples.fill, samples.dtype)
        if (bx1 - bx0) * (by1 - by0) <= MAX_BOX_PIXELS or level == source.level_count - 1:
            break
        level += 1
    if factor > 1:  # whole factor x factor cells, on the level's own cell grid
        bx0, by0 = (bx0 // factor) * factor, (by0 // factor) * factor
        bx1, by1 = (
            bx0 + -(-(bx1 - bx0) // factor) * factor,
            by0 + -(-(by1 - by0) // factor) * factor,
        )
    pixels = samples.read(level, by0, bx0, by1 - by0, bx1 - bx0)
    map_x, map_y = maps.relative(bx0, by0)
    if factor > 1:
        size = ((bx1 - bx0) // factor, (by1 - by0) // factor)
        pixels = _area_mean(pixels, size)
        shift = (factor - 1) / 2.0
        map_x = (map_x - shift) / factor
        map_y = (map_y - shift) / factor
    return _remap(pixels, map_x, map_y, interpolation, samples.fill)


#: dtypes OpenCV resamples natively; others are resampled in float32 (linear) or gathered
#: (nearest).
_OPENCV_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)


def _area_mean(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` ``(h, w, c)`` area-averaged to ``size = (w', h')`` (whole cells), same dtype."""
    if pixels.dtype in _OPENCV_DTYPES:
        out = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    else:
        out = _cast(
            cv2.resize(pixels.astype(np.float32), size, interpolation=cv2.INTER_AREA), pixels.dtype
        )
    return out.reshape(size[1], size[0], pixels.shape[2])


def _remap(
    pixels: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, interpolation: str, fill: int
) -> np.ndarray:
    """``pixels`` ``(h, w, c)`` sampled at ``(map_x, map_y)`` (OpenCV ``remap``, bilinear or
    nearest; ``fill`` outside), ``(h', w', c)`` of the same dtype."""
    count = pixels.shape[2]
    shape = (*map_x.shape, count)
    if pixels.dtype in _OPENCV_DTYPES:
        flag = cv2.INTER_NEAREST if interpolation == "nearest" else cv2.INTER_LINEAR
        border = (fill,) * min(count, 4)
        out = cv2.remap(
            pixels, map_x, map_y, flag, borderMode=cv2.BORDER_CONSTANT, borderValue=border
        )
        return out.reshape(shape)
    if interpolation == "nearest":
        return _gather_nearest(pixels, map_x, map_y, fill)
    widened = cv2.remap(
        pixels.astype(np.float32),
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(float(fill),) * min(count, 4),
    )
    return _cast(widened.reshape(shape), pixels.dtype)


def _gather_nearest(
    pixels: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, fill: int
) -> np.ndarray:
    """Nearest sampling of any dtype, exactly as OpenCV's: indices rounded half to even,
    ``fill`` where an index lies outside ``pixels``."""
    h, w = pixels.shape[:2]
    ix = np.rint(map_x).astype(np.int64)
    iy = np.rint(map_y).astype(np.int64)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.full((*map_x.shape, pixels.shape[2]), fill, pixels.dtype)
    out[inside] = pixels[iy[inside], ix[inside]]
    return out


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float ``values`` as ``dtype``: integers rounded and clipped to the dtype's range."""
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        return np.clip(np.rint(values), limits.min, limits.max).astype(dtype)
    return values.astype(dtype)


# --------------------------------------------------------------------------------------------
# The whole slide: options, the chunk job, the run, the output format
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarpOptions:
    """What a warp writes: target level ``level`` of the transform's target (0 = full
    resolution; levels past the target slide's own are halvings), resampled with
    ``interpolation`` (``"linear"``, or ``"nearest"`` for label masks), as ``fmt``
    (``"ome-zarr"`` or ``"ome-tiff"``) with ``chunk`` px chunks and OME-NGFF ``ngff_version``.

    ``compression`` (``None``: the format's default, :meth:`output_compression`): an OME-Zarr
    takes one of :data:`~wsireg.io.ngff.ZARR_COMPRESSIONS`, an OME-TIFF one of
    :data:`~wsireg.io.tiff.TIFF_COMPRESSIONS`; ``"jpeg"`` (lossy) is refused with
    ``"nearest"``, whose labels must stay exact. ``tile``: the OME-TIFF tile side (px, a
    multiple of 16 in :data:`MIN_TILE` .. :data:`MAX_TILE`); an OME-Zarr's is ``chunk``.
    ``channels``: the channels of a fluorescence source to write (names or indices, in
    order; ``None``: all). A brightfield source is written as RGB, a label image (one
    channel) with ``"nearest"`` only.
    """

    level: int = 0
    interpolation: str = "linear"
    fmt: str = "ome-zarr"
    chunk: int = 1024
    ngff_version: str = "0.4"
    compression: str | None = None
    tile: int = 512
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be {MIN_CHUNK}..{MAX_CHUNK} px, not {self.chunk}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.fmt!r}")
        if self.ngff_version not in NGFF_VERSIONS:
            raise ValueError(
                f"NGFF version must be one of {NGFF_VERSIONS}, not {self.ngff_version!r}"
            )
        if not MIN_TILE <= self.tile <= MAX_TILE or self.tile % 16:
            raise ValueError(
                f"tile must be a multiple of 16 in {MIN_TILE}..{MAX_TILE} px, not {self.tile}"
            )
        self._check_compression()

    def _check_compression(self) -> None:
        if self.compression is None:
            return
        allowed = TIFF_COMPRESSIONS if self.fmt == "ome-tiff" else ZARR_COMPRESSIONS
        if self.compression not in allowed:
            raise ValueError(
                f"{self.fmt} compression must be one of {allowed}, not {self.compression!r}"
            )
        if self.compression == "jpeg" and self.interpolation == "nearest":
            raise ValueError(
                "jpeg is lossy and would change the labels of nearest interpolation; "
                "use zlib, zstd or none"
            )

    def output_compression(self, kind: str = "brightfield") -> str:
        """``compression``, or the format's default for a source of ``kind``
        (:data:`wsireg.io.channels.KINDS`): ``"zstd"`` for an OME-Zarr; for an OME-TIFF
        ``"jpeg"`` for brightfield RGB, ``"zlib"`` (lossless) for ``"nearest"`` interpolation
        and for fluorescence and labels."""
        if self.compression is not None:
            return self.compression
        if self.fmt == "ome-zarr":
            return "zstd"
        if self.interpolation == "nearest" or kind != "brightfield":
            return "zlib"
        return "jpeg"

    def zarr_layout(self) -> ZarrLayout:
        """The layout of the (staged) OME-Zarr: the output's compression for an OME-Zarr, the
        fast default for the one an OME-TIFF is transcoded from."""
        compression = self.output_compression() if self.fmt == "ome-zarr" else "zstd"
        return ZarrLayout(chunk=self.chunk, ngff_version=self.ngff_version, compression=compression)

    def tiff_layout(self, kind: str = "brightfield") -> TiffLayout:
        """The layout of an OME-TIFF output of a source of ``kind``."""
        return TiffLayout(tile=self.tile, compression=self.output_compression(kind))

    def written_channels(self, source: Slide) -> tuple[Channels, list[int] | None]:
        """What the output holds of ``source``'s channels, and their indices as stored
        (:attr:`channels` resolved; ``None`` for brightfield RGB, warped as
        :meth:`Slide.read` gives it). Else a one-line :class:`~wsireg.errors.InputError`
        naming the source: a selection of a brightfield slide, linear interpolation of
        labels, JPEG of anything but RGB."""
        info, indices = written_channels(source, self.channels)
        if info.kind == "labels" and self.interpolation != "nearest":
            raise InputError(
                source.path,
                "is a label image: warp it with --interpolation nearest "
                "(linear would blend label values)",
            )
        check_compression(source, info, self.output_compression(info.kind))
        return info, indices


#: Past a slide's own levels, output grids keep halving while their longest side is this long.
MIN_OUTPUT_SIDE = 256


def output_levels(target: SlideRef) -> int:
    """How many output grids ``target`` has: its own levels, and past them halvings of level 0
    while the longest side stays at least :data:`MIN_OUTPUT_SIDE` px."""
    count = max(1, len(target.levels))
    while max(target.level_shape(count)) >= MIN_OUTPUT_SIDE:
        count += 1
    return count


def check_output_level(target: SlideRef, level: int) -> int:
    """``level`` when it names an output grid of ``target`` (:func:`output_levels`), else a
    one-line :class:`~wsireg.errors.InputError` naming the slide and the valid levels."""
    count = output_levels(target)
    if not 0 <= level < count:
        raise InputError(
            target.path or "target", f"no output level {level} (output levels are 0..{count - 1})"
        )
    return level


def check_source(transform: Transform, source: Slide) -> None:
    """The source slide must have the level-0 size of the transform's source (any slide for a
    transform whose source is unknown: an imported field without wsireg's metadata)."""
    if not transform.source.known:
        return
    expected = tuple(transform.source.shape)
    got = tuple(source.level_shape(0))
    if expected != got:
        raise TransformError(
            source.path,
            f"source slide is {got[1]} x {got[0]} px but the transform's source is "
            f"{expected[1]} x {expected[0]} px",
        )


def check_not_a_view(slide: Slide) -> None:
    """A registered view (:mod:`wsireg.engine.view`) is not warped again: its pixels are
    interpolated already (compose the transforms and warp the source once)."""
    if slide.backend == REGISTERED_BACKEND:
        raise InputError(
            slide.path,
            "is a registered view: compose the transforms (Transform.then) and warp its "
            "source once",
        )


def output_grid(transform: Transform, level: int) -> tuple[tuple[int, int], float]:
    """Shape ``(H, W)`` and downsample of target level ``level`` (the output grid)."""
    check_output_level(transform.target, level)
    return transform.target.level_shape(level), transform.target.level_downsample(level)


@dataclass
class _WarpJob:
    """One chunk task: what it needs, pickled as paths so dask workers reopen everything."""

    transform_path: str | None
    source_path: str
    output_path: str
    out_downsample: float
    source_level: int
    interpolation: str
    channels: list[int] | None = None  # the source's channels as stored; None: RGB
    transform: Transform | None = None
    source: Slide | None = None
    output: zarr.Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(transform=None, source=None, output=None)
        return state

    def open(self) -> _WarpJob:
        if self.transform is None:
            self.transform = _load_transform(self.transform_path)
        if self.source is None:
            self.source = open_slide(self.source_path)
        if self.output is None:
            self.output = zarr.open_array(self.output_path, mode="r+")
        return self

    def write_chunk(self, box: tuple[int, int, int, int]) -> None:
        """Warp the output chunk ``box = (y0, x0, h, w)`` and write it."""
        cv2.setNumThreads(1)  # the scheduler provides the parallelism
        self.open()
        assert self.transform is not None and self.source is not None and self.output is not None
        if self.channels is None:
            block = warp_block(
                self.transform,
                self.source,
                box,
                self.out_downsample,
                source_level=self.source_level,
                interpolation=self.interpolation,
            )
        else:
            block = warp_channels_block(
                self.transform,
                self.source,
                box,
                self.out_downsample,
                source_level=self.source_level,
                interpolation=self.interpolation,
                channels=self.channels,
            )
        y0, x0, h, w = box
        self.output[:, y0 : y0 + h, x0 : x0 + w] = np.moveaxis(block, -1, 0)


@lru_cache(maxsize=4)
def _load_transform(path: str | None) -> Transform:
    if path is None:
        raise TransformError("transform", "an unsaved transform cannot be sent to a cluster")
    return Transform.load(path)


def existing_chunks(array: zarr.Array) -> set[tuple[int, int]]:
    """Chunk indices ``(iy, ix)`` of a ``(C, H, W)`` zarr array (C in one chunk or per channel)
    whose every channel is on disk."""
    store_root = Path(str(array.store.root)) / array.path
    nc = math.ceil(array.shape[0] / array.chunks[0])
    if array.metadata.zarr_format == 3:
        encode = array.metadata.chunk_key_encoding.encode_chunk_key
    else:
        encode = zarr.core.chunk_key_encodings.V2ChunkKeyEncoding(
            separator=array.metadata.dimension_separator
        ).encode_chunk_key
    ny = math.ceil(array.shape[1] / array.chunks[1])
    nx = math.ceil(array.shape[2] / array.chunks[2])
    return {
        (iy, ix)
        for iy in range(ny)
        for ix in range(nx)
        if all((store_root / encode((c, iy, ix))).is_file() for c in range(nc))
    }


def warp(
    transform: Transform | str | Path,
    source: Slide | str | Path,
    out: str | Path,
    options: WarpOptions | None = None,
    *,
    execution: Execution | None = None,
    resume: bool = False,
    overwrite: bool = False,
    timings: dict[str, float] | None = None,
    **overrides: Any,
) -> Path:
    """Warp ``source`` (a slide or its path) into the target space of ``transform``.

    Writes a multiscale OME-Zarr or a pyramidal OME-TIFF (transcoded from a staged OME-Zarr)
    of the target level ``options.level`` (:class:`WarpOptions`). ``execution``
    (:class:`wsireg.engine.parallel.Execution`) runs the chunk tasks: on dask's threaded
    scheduler (``threads`` threads), on a LocalCluster of ``workers`` processes (``threads``
    each) or on the cluster at ``scheduler``; the output is identical either way. Keyword
    ``overrides`` replace fields of either (``warp(t, slide, out, level=1, workers=2)``).
    ``timings``, if given, receives the seconds of the level-0 and pyramid phases. ``resume``
    continues a staged output of the same job left by a killed run.
    """
    options = take_overrides(options or WarpOptions(), overrides)
    execution = take_overrides(execution or Execution(), overrides)
    no_overrides_left("warp", overrides)
    if not isinstance(transform, Transform):
        transform = Transform.load(transform)
    slide = source if isinstance(source, Slide) else open_slide(source)
    check_not_a_view(slide)
    out = check_output(check_output_path(out, (transform.path, slide.path)), overwrite)
    check_source(transform, slide)
    written, indices = options.written_channels(slide)
    # an OME-TIFF is transcoded from an OME-Zarr staged beside it, then removed
    zarr_out = out if options.fmt == "ome-zarr" else out.with_name(f"{out.name}.zarr-tmp")
    replace_zarr = overwrite or zarr_out != out
    timings = {} if timings is None else timings
    inputs = (transform.path, slide.path)
    fingerprint = _job_fingerprint(transform, slide, options, written)
    with staged_output(
        zarr_out, replace_zarr, resume, fingerprint=fingerprint, inputs=inputs
    ) as stage:
        group, job = _staged_job(transform, slide, stage, options, (written, indices))
        done = existing_chunks(group["0"])
        chunk = options.chunk
        todo = [
            c
            for c in blocks(group["0"].shape[1:], chunk)
            if (c[0] // chunk, c[1] // chunk) not in done
        ]
        start = time.perf_counter()
        _run_chunks(job, todo, execution)
        timings["level0_s"] = time.perf_counter() - start
        fill_pyramid(group, "nearest" if options.interpolation == "nearest" else "mean")
        timings["pyramid_s"] = time.perf_counter() - start - timings["level0_s"]
        for leftover in stage.rglob("*.partial"):  # temp files of chunks killed mid-write
            leftover.unlink()
    if options.fmt == "ome-tiff":
        mpp = _output_mpp(transform, job.out_downsample)
        layout = options.tiff_layout(written.kind)
        _transcode_to_tiff(zarr_out, out, layout, mpp, overwrite, written, Path(slide.path).name)
    return out


def _job_fingerprint(
    transform: Transform, slide: Slide, options: WarpOptions, written: Channels
) -> dict[str, Any]:
    """What a staged warp output is made of: the transform (affines and the identity of each
    field's content), the source slide, the channels written and the options; a resumed warp
    must match it."""
    return {
        "channels": list(written.names),
        "transform": transform.fingerprint(),
        "source": str(Path(slide.path).resolve()),
        "source_shape": list(slide.level_shape(0)),
        "level": options.level,
        "interpolation": options.interpolation,
        "chunk": options.chunk,
        "ngff_version": options.ngff_version,
        "zarr_compression": options.zarr_layout().compression,
    }


def _staged_job(
    transform: Transform,
    slide: Slide,
    stage: Path,
    options: WarpOptions,
    channels: tuple[Channels, list[int] | None],
) -> tuple[zarr.Group, _WarpJob]:
    """The staged OME-Zarr of the output (the one a killed run of the same job left when
    resuming, else a new one) and the chunk job writing its level 0: ``channels`` as
    :meth:`WarpOptions.written_channels` gives them."""
    written, indices = channels
    shape, out_ds = output_grid(transform, options.level)
    mpp = _output_mpp(transform, out_ds)
    if (stage / "0").exists():
        group = zarr.open_group(str(stage), mode="r+")
    else:
        group = create_ome_zarr(
            stage,
            shape,
            written.count,
            written.dtype,
            layout=options.zarr_layout(),
            mpp=mpp,
            name=Path(slide.path).name,
            channel_info=written,
        )
    job = _WarpJob(
        str(transform.path) if transform.path else None,
        str(slide.path),
        str(stage / "0"),
        out_ds,
        choose_source_level(slide, transform, out_ds),
        options.interpolation,
        indices,
        transform=transform,
        source=slide,
        output=group["0"],
    )
    return group, job


def _output_mpp(transform: Transform, downsample: float) -> tuple[float, float] | None:
    mpp = transform.target.mpp
    return None if mpp is None else (mpp[0] * downsample, mpp[1] * downsample)


def _run_chunks(
    job: _WarpJob, chunks: list[tuple[int, int, int, int]], execution: Execution
) -> None:
    """Every chunk task: threaded here, or on the cluster of ``execution``."""
    if not chunks:
        return
    if not execution.distributed:
        run_threaded(job.write_chunk, chunks, execution.threads, "warp")
        return
    if job.transform_path is None:
        raise TransformError("transform", "save the transform before warping on a cluster")
    with (
        cluster_client(execution, threads_per_worker=execution.threads or 1) as client,
        progress(len(chunks), "warp", unit="chunk") as bar,
    ):
        for _, future in map_on_cluster(
            client,
            job.write_chunk,
            chunks,
            name=lambda c: f"wsireg-warp-{c[0]}-{c[1]}",
            resources=execution.resources,
        ):
            future.result()
            bar.update(1)


def _transcode_to_tiff(
    zarr_path: Path,
    out: Path,
    layout: TiffLayout,
    mpp: tuple[float, float] | None,
    overwrite: bool,
    written: Channels,
    name: str,
) -> None:
    """The output format step of an OME-TIFF: the finished OME-Zarr streamed into ``out``
    laid out as ``layout`` (:func:`wsireg.io.tiff.write_ome_tiff_levels`), the image named
    ``name``, then removed."""
    try:
        levels = level_arrays(zarr.open_group(str(zarr_path), mode="r"))
        write_ome_tiff_levels(
            levels,
            out,
            layout=layout,
            mpp=mpp,
            name=name,
            overwrite=overwrite,
            channel_info=written,
        )
    finally:
        remove(zarr_path)
