"""Tests of wsireg.core.tiling and wsireg.core.blocks: unfold/fold, groups, block geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsireg.core import blocks as bl
from wsireg.core import tiling as tl


def test_unfold_shapes_and_geometry() -> None:
    image = torch.rand(1, 3, 100, 130)
    patches, g = tl.unfold(image, 64, 32)
    assert g.grid == (4, 5) and g.size == (100, 130) and g.margin == 16
    assert g.pad == (16, 16 + 160 - 130, 16, 16 + 128 - 100)
    assert patches.shape == (20, 3, 64, 64) and g.num_patches == 20


@pytest.mark.parametrize(
    ("batch", "h", "w", "p", "s"),
    [(1, 100, 130, 64, 32), (2, 64, 96, 64, 32), (1, 37, 41, 16, 16), (3, 50, 20, 24, 8)],
)
def test_unfold_fold_is_exact_in_the_centres(batch: int, h: int, w: int, p: int, s: int) -> None:
    u = torch.randn(batch, 2, h, w)
    patches, g = tl.unfold(u, p, s)
    assert torch.equal(tl.fold_centres(patches, g), u)


def test_patch_centres_and_context_are_where_documented() -> None:
    image = torch.arange(60 * 70, dtype=torch.float32).reshape(1, 1, 60, 70)
    p, s, m = 24, 8, 8
    patches, g = tl.unfold(image, p, s)
    rows, cols = g.grid
    i, j = 3, 4
    patch = patches[i * cols + j, 0]
    assert torch.equal(
        patch[m : m + s, m : m + s], image[0, 0, i * s : (i + 1) * s, j * s : (j + 1) * s]
    )
    assert torch.equal(patch, image[0, 0, i * s - m : i * s - m + p, j * s - m : j * s - m + p])
    # top-left patch: replicated edge
    assert torch.all(patches[0, 0, :m, :m] == image[0, 0, 0, 0])


def test_constant_padding_mode() -> None:
    image = torch.zeros(1, 1, 20, 20)
    patches, _ = tl.unfold(image, 16, 8, mode="constant", value=1.0)
    assert torch.all(patches[0, 0, :4, :] == 1.0) and torch.all(patches[0, 0, 4:, 4:12] == 0.0)


def test_bad_patch_and_stride_raise() -> None:
    with pytest.raises(ValueError):
        tl.unfold(torch.zeros(1, 1, 8, 8), 16, 5)
    with pytest.raises(ValueError):
        tl.unfold(torch.zeros(1, 1, 8, 8), 8, 16)
    g = tl.tile_geometry((8, 8), 8, 4)
    with pytest.raises(ValueError):
        tl.fold_centres(torch.zeros(3, 2, 8, 8), g)


def test_groups() -> None:
    assert list(tl.groups(10, 4)) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(tl.groups(0, 4)) == []
    assert tl.num_groups(8, 4) == 2 and tl.num_groups(9, 4) == 3
    with pytest.raises(ValueError):
        tl.num_groups(3, 0)


def test_axis_window_values() -> None:
    # P = 32, S = 16, m = 8; axis of 150 px, block [48, 96), extra 10 -> 16
    w = bl.axis_window(48, 96, 150, 32, 16, extra=10)
    assert (w.centre_start, w.centre_stop) == (32, 112)
    assert w.trim == slice(16, 64)
    first = bl.axis_window(0, 48, 150, 32, 16)
    assert (first.centre_start, first.centre_stop) == (0, 48)
    last = bl.axis_window(144, 150, 150, 32, 16, extra=5)
    assert (last.centre_start, last.centre_stop) == (128, 160)
    assert bl.halo(32, 16, 10) == 24 and bl.halo(256, 128) == 64
    with pytest.raises(ValueError):
        bl.axis_window(40, 96, 150, 32, 16)  # not on the stride


def test_blocks_cover_a_grid_once() -> None:
    tiles = list(bl.blocks((100, 70), 48))
    assert tiles[0] == (0, 0, 48, 48) and tiles[-1] == (96, 48, 4, 22)
    assert len(tiles) == bl.count_blocks((100, 70), 48) == 6
    cover = torch.zeros(100, 70, dtype=torch.int32)
    for y0, x0, h, w in tiles:
        cover[y0 : y0 + h, x0 : x0 + w] += 1
    assert torch.all(cover == 1)
    with pytest.raises(ValueError):
        list(bl.blocks((10, 10), 0))


def _patch_fn(patches: torch.Tensor) -> torch.Tensor:
    """A stand-in network that uses the whole patch context (7x7 box sum minus the patch sum).

    On small integer images every value is an exact float integer, so results do not depend on
    the summation order and block-wise and whole-image results can be compared with equality.
    """
    c = patches.shape[1]
    ones = torch.ones(c, 1, 7, 7, dtype=patches.dtype)
    return F.conv2d(patches, ones, padding=3, groups=c) - patches.sum(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("extra", [0, 8, 20])
def test_blockwise_equals_whole_image(extra: int) -> None:
    """The scheduler's path: each block reads its centre span (background beyond the image),
    unfolds it like a whole image and keeps its trimmed centres. With a halo of at least the
    patch margin (``extra >= m = 8``) every kept patch saw the same context as in a
    whole-image unfold; without one the patches at block edges see background instead."""
    torch.manual_seed(0)
    h, w, p, s, block = 150, 170, 32, 16, 48
    image = torch.randint(1, 10, (1, 2, h, w)).float()
    patches, g = tl.unfold(image, p, s, "constant", 0.0)
    whole = tl.fold_centres(_patch_fn(patches), g)

    out = torch.full_like(whole, float("nan"))
    for r0, c0, bh, bw in bl.blocks((h, w), block):
        rows = bl.axis_window(r0, r0 + bh, h, p, s, extra)
        cols = bl.axis_window(c0, c0 + bw, w, p, s, extra)
        span = image[..., rows.centre_start : rows.centre_stop, :]
        span = span[..., cols.centre_start : cols.centre_stop]
        block_patches, bg = tl.unfold(span, p, s, "constant", 0.0)
        folded = tl.fold_centres(_patch_fn(block_patches), bg)
        out[..., r0 : r0 + bh, c0 : c0 + bw] = folded[..., rows.trim, cols.trim]
    assert torch.equal(out, whole) == (extra >= bl.margin(p, s))
