"""A registered view: a source slide read in its target's frame, nothing written.

:func:`open_registered` (and ``wsireg.open_slide(source, transform=T)``, :func:`open_slide`)
returns a :class:`RegisteredSlide`: a :class:`~wsireg.io.slide.Slide` with the target's
geometry (the level shapes, downsamples and mpp of the transform's target
:class:`~wsireg.engine.transform.SlideRef`) whose pixels are the source's, resampled on demand
by the block warp of ``wsireg warp`` (:func:`wsireg.engine.warp.warp_block`, the source level
chosen as the warp chooses it); a fluorescence or label source also reads its samples as stored
(``read_channels``, ``channel_level``: :func:`wsireg.engine.warp.warp_channels_block`).
``read``, ``read_region``, ``level`` (lazy dask arrays),
``get_thumbnail``, ... work as on any slide; analysis code reads aligned tiles of every stain
directly.

The rule that makes its pixels those of ``wsireg warp``: level ``L`` is computed in blocks of
``block`` px on the level's grid (the output chunks of ``wsireg warp --level L --chunk
block``), each block exactly as the warp's chunk task computes it, and every read is cut from
those blocks. So any region of level ``L`` equals the same region of level 0 of ``wsireg warp
--level L --chunk block`` with the same interpolation, byte for byte (level 0 of the view:
the full-resolution warp). The last blocks computed are kept (:data:`BLOCK_CACHE_BYTES`), so
tiles read in raster order compute each block once. The view pickles as its source's path and
its transform's directory (a dask worker reopens both), so its transform must be saved first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from dask.base import tokenize

from wsireg.engine.transform import Transform
from wsireg.engine.warp import (
    REGISTERED_BACKEND,
    WarpOptions,
    check_source,
    choose_source_level,
    warp_block,
    warp_channels_block,
)
from wsireg.errors import TransformError
from wsireg.io.backends import Backend, TileCache, read_tiles
from wsireg.io.slide import Slide
from wsireg.io.slide import open_slide as open_source_slide

#: Bytes of warped blocks a view keeps (16 blocks of 1024 x 1024 RGB).
BLOCK_CACHE_BYTES = 48 << 20


class _RegisteredBackend(Backend):
    """Level shapes of the transform's target; pixels from :func:`warp_block`, block by block."""

    name = REGISTERED_BACKEND
    vendor = "wsireg"

    def __init__(self, source: Slide, transform: Transform, interpolation: str, block: int) -> None:
        self.source, self.transform = source, transform
        self.interpolation, self.block = interpolation, block
        target = transform.target
        count = max(1, len(target.levels))
        self.level_shapes = [target.level_shape(level) for level in range(count)]
        self.tile_sides = [block] * count
        self.downsamples = [target.level_downsample(level) for level in range(count)]
        self.source_levels = [choose_source_level(source, transform, d) for d in self.downsamples]
        self.channels = source.channels
        self._blocks = TileCache(BLOCK_CACHE_BYTES)

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return read_tiles(
            (y0, x0, h, w),
            (self.block, self.block),
            3,
            lambda by, bx: self._blocks.get((level, by, bx, "rgb"), self._warp_block),
        )

    def read_native(
        self, level: int, y0: int, x0: int, h: int, w: int, channels: Sequence[int] | None = None
    ) -> np.ndarray:
        """The source's samples as stored, warped block by block as ``wsireg warp`` writes
        them (every channel; ``channels`` selected afterwards)."""
        if self.channels.kind == "brightfield":
            return super().read_native(level, y0, x0, h, w, channels)
        pixels = read_tiles(
            (y0, x0, h, w),
            (self.block, self.block),
            self.channels.count,
            lambda by, bx: self._blocks.get((level, by, bx, "native"), self._warp_block),
            self.channels.dtype,
        )
        return pixels if channels is None else pixels[..., list(channels)]

    def _warp_block(self, key: Any) -> np.ndarray:
        """Block ``(level, by, bx, samples)`` (``"rgb"`` or ``"native"``), as the warp's chunk
        task computes that output chunk."""
        level, by, bx, samples = key
        height, width = self.level_shapes[level]
        y0, x0 = by * self.block, bx * self.block
        box = (y0, x0, min(self.block, height - y0), min(self.block, width - x0))
        resample = warp_block if samples == "rgb" else warp_channels_block
        return resample(
            self.transform,
            self.source,
            box,
            self.downsamples[level],
            source_level=self.source_levels[level],
            interpolation=self.interpolation,
        )

    def mpp(self) -> tuple[float, float] | None:
        return self.transform.target.mpp

    def properties(self) -> dict[str, str]:
        return {
            "wsireg.source": str(self.source.path),
            "wsireg.transform": str(self.transform.path or ""),
            "wsireg.target": str(self.transform.target.path or ""),
            "wsireg.interpolation": self.interpolation,
        }


class RegisteredSlide(Slide):
    """The source slide ``source`` seen through ``transform`` in its target's frame (module
    docstring): ``interpolation`` ``"linear"`` (or ``"nearest"`` for label masks), computed in
    blocks of ``block`` px. ``path`` is the source's; ``source`` and ``transform`` are kept.
    Closing the view closes the source only when the view opened it."""

    def __init__(
        self,
        source: Slide,
        transform: Transform,
        *,
        interpolation: str = "linear",
        block: int = WarpOptions.chunk,
        owns_source: bool = False,
    ) -> None:
        # the warp's checks of both, and of the source's channels (labels: nearest only)
        WarpOptions(interpolation=interpolation, chunk=block).written_channels(source)
        check_source(transform, source)
        self.path = source.path
        self._backend_choice = None
        self.source, self.transform = source, transform
        self.interpolation, self.block = interpolation, block
        self._owns_source = owns_source
        self._attach(_RegisteredBackend(source, transform, interpolation, block))

    def _dask_token(self) -> str:
        return tokenize(super()._dask_token(), self._transform_identity, self.interpolation)

    @cached_property
    def _transform_identity(self) -> dict[str, Any]:
        return {"transform": self.transform.fingerprint(), "block": self.block}

    def close(self) -> None:
        if self._owns_source:
            self.source.close()

    def __repr__(self) -> str:
        return (
            f"RegisteredSlide({str(self.path)!r}, transform={str(self.transform.path)!r}, "
            f"levels={self.level_dimensions})"
        )

    def __reduce__(self) -> tuple[Callable[..., RegisteredSlide], tuple[Any, ...]]:
        # Pickled as paths: a dask worker reopens the source and loads the transform.
        if self.transform.path is None:
            raise TransformError("transform", "save the transform before sending a view")
        return (
            _reopen,
            (
                str(self.source.path),
                self.source._backend_choice,
                str(self.transform.path),
                self.interpolation,
                self.block,
            ),
        )


def _reopen(
    source: str, backend: str | None, transform: str, interpolation: str, block: int
) -> RegisteredSlide:
    return open_registered(
        source, transform, backend=backend, interpolation=interpolation, block=block
    )


def open_registered(
    source: Slide | str | Path,
    transform: Transform | str | Path,
    *,
    backend: str | None = None,
    interpolation: str = "linear",
    block: int = WarpOptions.chunk,
) -> RegisteredSlide:
    """The registered view of ``source`` (a slide or its path, opened with ``backend``) in
    the target's frame of ``transform`` (a :class:`Transform`, a transform directory or a
    ``wsireg register`` output): pixels equal to ``wsireg warp --interpolation INTERPOLATION
    --chunk BLOCK`` (module docstring), nothing written. Raises
    :class:`~wsireg.errors.TransformError` when the source is not the transform's."""
    if not isinstance(transform, Transform):
        transform = Transform.load(transform)
    if isinstance(source, Slide):
        return RegisteredSlide(source, transform, interpolation=interpolation, block=block)
    slide = open_source_slide(source, backend)
    try:
        return RegisteredSlide(
            slide, transform, interpolation=interpolation, block=block, owns_source=True
        )
    except BaseException:
        slide.close()
        raise


def open_slide(
    path: str | Path,
    backend: str | None = None,
    *,
    transform: Transform | str | Path | None = None,
) -> Slide:
    """Open a slide lazily (:func:`wsireg.io.slide.open_slide`; ``backend`` forces one).

    With ``transform`` (a :class:`Transform`, a transform directory or a ``wsireg register``
    output) the slide is its source, read in its target's frame: the registered view of
    :func:`open_registered` (linear interpolation, the warp's default chunks).
    """
    if transform is None:
        return open_source_slide(path, backend)
    return open_registered(path, transform, backend=backend)
