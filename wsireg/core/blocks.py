"""Block geometry of out-of-core work: pure functions of integers (no arrays).

A grid of ``(H, W)`` pixels is processed in ``block x block`` tiles, row by row
(:func:`blocks`; the last row and column may be short), the one iterator of the scheduler and
the warp. The scheduler reads each block with a halo (dask's ``map_overlap`` model: halo,
compute, trim): :func:`axis_window` gives, per axis, the span of ``P x P`` patch centres at
stride ``S`` to read around a block and the slice that trims the result back to the block. With
block origins on multiples of ``S`` and a halo of at least the patch margin ``m = (P - S) / 2``,
every patch of a block sees the same context as in a whole-image unfold
(:mod:`wsireg.core.tiling`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["AxisWindow", "axis_window", "blocks", "ceil_div", "count_blocks", "halo", "margin"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers."""
    return -(-a // b)


def margin(patch: int, stride: int) -> int:
    """``(P - S) / 2``; requires ``0 < S <= P`` and ``P - S`` even."""
    if not 0 < stride <= patch or (patch - stride) % 2:
        raise ValueError(
            f"need 0 < stride <= patch and patch - stride even, got {patch=} {stride=}"
        )
    return (patch - stride) // 2


def halo(patch: int, stride: int, extra: int = 0) -> int:
    """Halo read around a block: ``(P - S) / 2`` plus ``extra`` rounded up to a multiple of ``S``.

    Rounding keeps every block's patch grid on the global one, so block-wise results equal the
    whole-image result; ``extra`` adds whole rings of patches around the block (e.g. context
    for smoothing or composing across block edges before trimming).
    """
    return margin(patch, stride) + ceil_div(extra, stride) * stride


def blocks(shape: tuple[int, int], block: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, x0, h, w)`` of the ``block x block`` tiles of a grid of ``shape = (H, W)``, row
    by row (the last row and column may be short): the one iterator over blocks and chunks."""
    if block <= 0:
        raise ValueError(f"block side must be positive, got {block}")
    rows, cols = shape
    for y0 in range(0, rows, block):
        for x0 in range(0, cols, block):
            yield y0, x0, min(block, rows - y0), min(block, cols - x0)


def count_blocks(shape: tuple[int, int], block: int) -> int:
    """Number of tiles :func:`blocks` yields."""
    return ceil_div(shape[0], block) * ceil_div(shape[1], block)


class AxisWindow(NamedTuple):
    """One axis of a block and the span of patch centres read around it (pixels of the level;
    half-open ranges)."""

    start: int
    """Block start on the target grid (a multiple of ``S``)."""
    stop: int
    """Block stop (a multiple of ``S`` or the axis size)."""
    centre_start: int
    """Start of the union of the kept patch centres (``start - e``, clipped at 0)."""
    centre_stop: int
    """Stop of the union of the kept centres (a multiple of ``S``)."""

    @property
    def trim(self) -> slice:
        """Slice of the folded span result (starting at ``centre_start``) to keep."""
        return slice(self.start - self.centre_start, self.stop - self.centre_start)


def axis_window(
    start: int, stop: int, size: int, patch: int, stride: int, extra: int = 0
) -> AxisWindow:
    """The span of patch centres to read along one axis for the block ``[start, stop)`` of an
    axis of ``size`` pixels: ``[max(start - e, 0), min(ceil(stop / S) S + e, ceil(size / S)
    S))`` with ``e = halo(P, S, extra) - m``. The span is read (beyond the image: background)
    and unfolded like a whole image; while ``e >= m`` every patch of the block sees the same
    context as in a whole-image unfold, and ``trim`` keeps the block. ``start`` must be a
    multiple of ``S``.
    """
    if start % stride or not 0 <= start < stop <= size:
        raise ValueError(f"bad block [{start}, {stop}) of axis {size} with stride {stride}")
    e = halo(patch, stride, extra) - margin(patch, stride)
    centre_start = max(start - e, 0)
    centre_stop = min(ceil_div(stop, stride) * stride + e, ceil_div(size, stride) * stride)
    return AxisWindow(start, stop, centre_start, centre_stop)
