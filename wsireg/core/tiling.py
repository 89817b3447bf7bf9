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

Axes follow :mod:`wsireg.core.coords`; patches are ordered batch-major, then row-major over the
patch grid: ``index = (n * rows + i) * cols + j``.

The out-of-core scheduler unfolds blocks read with a halo (:mod:`wsireg.core.blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from wsireg.core.blocks import ceil_div, margin

__all__ = [
    "TileGeometry",
    "extract_patches",
    "fold_centres",
    "groups",
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


def tile_geometry(size: tuple[int, int], patch: int, stride: int, batch: int = 1) -> TileGeometry:
    """Geometry of a whole-image unfold of an image of ``size = (H, W)``."""
    h, w = size
    m = margin(patch, stride)
    rows, cols = ceil_div(h, stride), ceil_div(w, stride)
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
    return ceil_div(n, group_size)


def groups(n: int, group_size: int) -> Iterator[slice]:
    """Consecutive slices ``[k G, min((k + 1) G, n))`` of patch indices (the last may be short)."""
    for k in range(num_groups(n, group_size)):
        yield slice(k * group_size, min((k + 1) * group_size, n))
