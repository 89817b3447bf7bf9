"""Patch tiling shared by training and the out-of-core inference scheduler (one implementation).

Model (DeepHistReg, Sec. 2): an image is cut into overlapping ``P x P`` patches at stride ``S``;
only the central ``S x S`` square of each predicted patch field is kept, because displacements
near a patch edge may point outside the patch. With margin ``m = (P - S) / 2``:

* patch ``(i, j)`` keeps its centre ``[i S, (i + 1) S) x [j S, (j + 1) S)`` (rows x columns, in
  pixels of the image) and reads the context ``[i S - m, i S - m + P)`` around it;
* the image is padded by ``m`` on every side plus ``ceil(H / S) S - H`` rows at the bottom and
  ``ceil(W / S) S - W`` columns on the right, so the centres tile the padded image exactly and
  cover the whole original image;
* padding replicates the edge pixels by default (``mode="replicate"``); ``mode="constant"`` with
  ``value`` pads with a constant, e.g. the white of the slide background.

Axes follow :mod:`wsireg.core.coords`; patches are ordered batch-major, then row-major over the patch
grid: ``index = (n * rows + i) * cols + j``.

The out-of-core scheduler processes blocks of the target grid (dask ``map_overlap`` model). A
block is read with a halo so that each of its patches sees the same context as in a whole-image
unfold; :func:`axis_window` gives, per axis, what to read, how to pad it, and how to trim the
result. With blocks whose origins are multiples of ``S``, block-wise and whole-image results are
identical (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AxisWindow",
    "TileGeometry",
    "axis_window",
    "block_geometry",
    "block_starts",
    "extract_patches",
    "fold_centres",
    "groups",
    "halo",
    "margin",
    "num_groups",
    "pad_for_tiling",
    "tile_geometry",
    "unfold",
]


class TileGeometry(NamedTuple):
    """Everything needed to fold patch results back (see module docstring)."""

    patch: int
    """``P``: patch side in pixels."""
    stride: int
    """``S``: stride, and side of the kept centre."""
    grid: tuple[int, int]
    """``(rows, cols)`` of patches per image."""
    size: tuple[int, int]
    """``(H, W)`` of the folded result (the original image size)."""
    pad: tuple[int, int, int, int]
    """``(left, right, top, bottom)`` padding, in :func:`torch.nn.functional.pad` order."""
    batch: int = 1
    """Number of images ``N`` unfolded together."""

    @property
    def margin(self) -> int:
        """``(P - S) / 2``."""
        return margin(self.patch, self.stride)

    @property
    def num_patches(self) -> int:
        """``L = N * rows * cols``."""
        return self.batch * self.grid[0] * self.grid[1]


def margin(patch: int, stride: int) -> int:
    """``(P - S) / 2``; requires ``0 < S <= P`` and ``P - S`` even."""
    if not 0 < stride <= patch or (patch - stride) % 2:
        raise ValueError(
            f"need 0 < stride <= patch and patch - stride even, got {patch=} {stride=}"
        )
    return (patch - stride) // 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tile_geometry(size: tuple[int, int], patch: int, stride: int, batch: int = 1) -> TileGeometry:
    """Geometry of a whole-image unfold of an image of ``size = (H, W)``."""
    h, w = size
    m = margin(patch, stride)
    rows, cols = _ceil_div(h, stride), _ceil_div(w, stride)
    pad = (m, m + cols * stride - w, m, m + rows * stride - h)
    return TileGeometry(patch, stride, (rows, cols), (h, w), pad, batch)


def pad_for_tiling(
    image: Tensor, geometry: TileGeometry, mode: str = "replicate", value: float = 0.0
) -> Tensor:
    """Pad ``image (N, C, H, W)`` by ``geometry.pad``.

    ``mode`` is ``"replicate"`` (edge pixels repeated) or ``"constant"``
    (filled with ``value``).
    """
    if not any(geometry.pad):
        return image
    if mode == "constant":
        return F.pad(image, geometry.pad, mode="constant", value=value)
    return F.pad(image, geometry.pad, mode=mode)


def extract_patches(padded: Tensor, patch: int, stride: int) -> Tensor:
    """All ``P x P`` windows at stride ``S`` of an already padded ``(N, C, H, W)`` image.

    Returns ``(L, C, P, P)`` with ``L = N * rows * cols``, ``rows = (H - P) / S + 1`` (the padded
    size must be ``(rows - 1) S + P``). A view is unfolded with :meth:`Tensor.unfold`, then
    copied once into the patch batch.
    """
    n, c, h, w = padded.shape
    if (h - patch) % stride or (w - patch) % stride or h < patch or w < patch:
        raise ValueError(f"padded size {(h, w)} is not (k - 1) * {stride} + {patch}")
    windows = padded.unfold(2, patch, stride).unfold(3, patch, stride)  # (N, C, r, c, P, P)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, patch, patch)


def unfold(
    image: Tensor, patch: int, stride: int, mode: str = "replicate", value: float = 0.0
) -> tuple[Tensor, TileGeometry]:
    """Cut ``image (N, C, H, W)`` into overlapping patches covering all of it.

    Returns ``(patches (L, C, P, P), geometry)``; see the module docstring for the layout and
    :func:`pad_for_tiling` for ``mode``/``value``.
    """
    geometry = tile_geometry(tuple(image.shape[-2:]), patch, stride, batch=image.shape[0])
    padded = pad_for_tiling(image, geometry, mode=mode, value=value)
    return extract_patches(padded, patch, stride), geometry


def fold_centres(patches: Tensor, geometry: TileGeometry) -> Tensor:
    """Tile the central ``S x S`` squares of ``patches (L, C, P, P)`` back into ``(N, C, H, W)``.

    Inverse of :func:`unfold` on the centres: ``fold_centres(unfold(x)[0], g) == x`` exactly.
    Works for any channel count (fields ``C = 2`` in pixels of the level; values untouched).
    """
    if patches.shape[0] != geometry.num_patches:
        raise ValueError(f"expected {geometry.num_patches} patches, got {patches.shape[0]}")
    s, m = geometry.stride, geometry.margin
    rows, cols = geometry.grid
    h, w = geometry.size
    c = patches.shape[1]
    centres = patches[:, :, m : m + s, m : m + s]
    tiled = centres.reshape(geometry.batch, rows, cols, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return tiled.reshape(geometry.batch, c, rows * s, cols * s)[:, :, :h, :w]


def num_groups(n: int, group_size: int) -> int:
    """Number of ``G``-sized groups needed for ``n`` patches."""
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    return _ceil_div(n, group_size)


def groups(n: int, group_size: int) -> Iterator[slice]:
    """Consecutive slices ``[k G, min((k + 1) G, n))`` of patch indices (the last may be short)."""
    for k in range(num_groups(n, group_size)):
        yield slice(k * group_size, min((k + 1) * group_size, n))


# --- block geometry for the out-of-core scheduler (pure functions of integers) -------------------


def halo(patch: int, stride: int, extra: int = 0) -> int:
    """Halo read around a block: ``(P - S) / 2`` plus ``extra`` rounded up to a multiple of ``S``.

    Rounding keeps every block's patch grid on the global one, so block-wise results equal the
    whole-image result; ``extra`` adds whole rings of patches around the block (e.g. context
    for smoothing or composing across block edges before trimming).
    """
    return margin(patch, stride) + _ceil_div(extra, stride) * stride


def block_starts(size: int, block: int, stride: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` chunks of one axis of length ``size``; ``block % S == 0``."""
    if block <= 0 or block % stride:
        raise ValueError(f"block {block} must be a positive multiple of the stride {stride}")
    return [(s, min(s + block, size)) for s in range(0, size, block)]


class AxisWindow(NamedTuple):
    """One axis of a block and its halo (all in pixels of the level; half-open ranges)."""

    start: int
    """Block start on the target grid (a multiple of ``S``)."""
    stop: int
    """Block stop (a multiple of ``S`` or the axis size)."""
    centre_start: int
    """Start of the union of the kept patch centres (``start - extra``, clipped at 0)."""
    centre_stop: int
    """Stop of the union of the kept centres (a multiple of ``S``)."""
    read_start: int
    """First pixel to read from the image (``centre_start - m``, clipped at 0)."""
    read_stop: int
    """Stop of the read (``centre_stop + m``, clipped at the axis size)."""
    pad_before: int
    """Pixels to pad before the read (outside the image)."""
    pad_after: int
    """Pixels to pad after the read."""

    @property
    def trim(self) -> slice:
        """Slice of the folded block result (starting at ``centre_start``) to keep."""
        return slice(self.start - self.centre_start, self.stop - self.centre_start)


def axis_window(
    start: int, stop: int, size: int, patch: int, stride: int, extra: int = 0
) -> AxisWindow:
    """Read/pad/trim geometry along one axis for the block ``[start, stop)`` of an axis ``size``.

    ``start`` must be a multiple of ``S``. The kept centres span
    ``[max(start - e, 0), min(ceil(stop / S) S + e, ceil(size / S) S))`` with ``e`` the
    ``extra`` rounded up to a multiple of ``S``; the read adds ``m = (P - S) / 2`` on both sides,
    clipped to the image, and the clipped part is padded (replicate, as in :func:`unfold`).
    """
    if start % stride or not 0 <= start < stop <= size:
        raise ValueError(f"bad block [{start}, {stop}) of axis {size} with stride {stride}")
    m = margin(patch, stride)
    e = halo(patch, stride, extra) - m
    centre_start = max(start - e, 0)
    centre_stop = min(_ceil_div(stop, stride) * stride + e, _ceil_div(size, stride) * stride)
    lo, hi = centre_start - m, centre_stop + m
    read_start, read_stop = max(lo, 0), min(hi, size)
    return AxisWindow(
        start,
        stop,
        centre_start,
        centre_stop,
        read_start,
        read_stop,
        read_start - lo,
        hi - read_stop,
    )


def block_geometry(
    rows: AxisWindow, cols: AxisWindow, patch: int, stride: int, batch: int = 1
) -> TileGeometry:
    """Tile geometry of a block read ``image[..., rows.read_start:rows.read_stop,
    cols.read_start:cols.read_stop]``.

    Use it exactly like the whole-image case: ``pad_for_tiling(read, g)`` then
    ``extract_patches(padded, P, S)``; after prediction ``fold_centres(fields, g)`` gives the
    centre span, and ``[..., rows.trim, cols.trim]`` the block.
    """
    n_rows = (rows.centre_stop - rows.centre_start) // stride
    n_cols = (cols.centre_stop - cols.centre_start) // stride
    size = (rows.centre_stop - rows.centre_start, cols.centre_stop - cols.centre_start)
    pad = (cols.pad_before, cols.pad_after, rows.pad_before, rows.pad_after)
    return TileGeometry(patch, stride, (n_rows, n_cols), size, pad, batch)
