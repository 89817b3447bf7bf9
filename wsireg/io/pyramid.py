"""Resolution pyramids as lazy dask computations.

Images are ``[y, x, c]`` arrays of shape ``(H, W, C)`` (or any array whose two image axes are
given by ``axes``); see :mod:`wsireg.core.coords`. Level ``k`` of a pyramid is the grid at
downsample ``2**k``: its pixel ``[i, j]`` covers level-0 pixels ``[2**k * j, 2**k * (j+1))`` (in
x, same in y), so a level has ``ceil(H / 2**k)`` rows and the last row/column of an odd-sized
level is made of edge-replicated pixels.

Everything here is lazy and block-local: output block ``i`` depends on input block ``i`` only,
so nothing is ever materialised as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

METHODS = ("mean", "nearest")


def level_shapes(
    shape_yx: Sequence[int], chunk: int = 1024, min_size: int = 512
) -> list[tuple[int, int]]:
    """Shapes ``(H_k, W_k)`` of the levels of a pyramid over an image of ``shape_yx`` pixels.

    Level 0 is ``shape_yx``; each next level halves (rounding up) both sides. Levels are added
    until the top one fits in one chunk and in ``min_size`` pixels on its longer side, i.e.
    ``max(H_k, W_k) <= min(chunk, min_size)``; an image already that small has one level.
    """
    h, w = (int(s) for s in shape_yx)
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {tuple(shape_yx)}")
    limit = max(1, min(int(chunk), int(min_size)))
    shapes = [(h, w)]
    while max(h, w) > limit:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def halved_shapes(shape_yx: Sequence[int], levels: int) -> list[tuple[int, int]]:
    """The first ``levels`` shapes of the halving sequence, stopping early at 1 x 1 pixel."""
    h, w = (int(s) for s in shape_yx)
    shapes = [(h, w)]
    while len(shapes) < levels and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def downsample2_block(
    block: np.ndarray, method: str = "mean", axes: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """Halve a numpy array along ``axes`` (the image axes y, x), rounding sizes up.

    ``"mean"`` averages each 2x2 block; an odd last row/column is edge-replicated first (so the
    border pixel is averaged with itself). Integer results are rounded half up, in a wider
    integer type, and returned in the input dtype; floating results keep the input dtype.
    ``"nearest"`` keeps the top-left pixel of each block (for label masks).
    """
    if method == "nearest":
        index = [slice(None)] * block.ndim
        for ax in axes:
            index[ax] = slice(None, None, 2)
        return block[tuple(index)]
    if method != "mean":
        raise ValueError(f"unknown downsampling method {method!r}; use one of {METHODS}")
    block = _pad_even(block, axes)
    ay, ax = axes
    dtype = block.dtype
    acc = _accumulator(dtype)

    def part(dy: int, dx: int) -> np.ndarray:
        index = [slice(None)] * block.ndim
        index[ay] = slice(dy, None, 2)
        index[ax] = slice(dx, None, 2)
        return block[tuple(index)]

    total = part(0, 0).astype(acc)
    total += part(0, 1)
    total += part(1, 0)
    total += part(1, 1)
    if np.issubdtype(acc, np.floating):
        total *= 0.25
        return total.astype(dtype, copy=False)
    total += 2
    total //= 4
    return total.astype(dtype, copy=False)


def downsample2(
    image: da.Array, method: str = "mean", *, axes: tuple[int, int] = (0, 1)
) -> da.Array:
    """Lazily halve an image (``(H, W, C)`` by default) to ``ceil(H/2) x ceil(W/2)``.

    See :func:`downsample2_block` for the methods. Output block ``i`` is computed from input
    block ``i`` alone and has half its size (rounded up), so with input chunks of ``2 * c`` the
    output chunks are ``c`` (chunk-aligned for writing). Input chunks along the image axes must
    be even except the last; odd ones are rechunked to the next even size first.
    """
    if method not in METHODS:
        raise ValueError(f"unknown downsampling method {method!r}; use one of {METHODS}")
    image = _even_chunks(image, axes)
    chunks = list(image.chunks)
    for ax in axes:
        chunks[ax] = tuple(-(-c // 2) for c in image.chunks[ax])
    return image.map_blocks(
        downsample2_block,
        method=method,
        axes=axes,
        chunks=tuple(chunks),
        dtype=image.dtype,
        meta=np.empty((0,) * image.ndim, dtype=image.dtype),
    )


def _pad_even(block: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    pad = [(0, 0)] * block.ndim
    for ax in axes:
        pad[ax] = (0, block.shape[ax] % 2)
    if any(p != (0, 0) for p in pad):
        block = np.pad(block, pad, mode="edge")
    return block


def _accumulator(dtype: np.dtype) -> np.dtype:
    """A dtype that holds the sum of four values of ``dtype`` exactly (or a float)."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        return np.promote_types(dtype, np.float32)
    if np.issubdtype(dtype, np.integer):
        wide = np.dtype(f"{dtype.kind}{min(dtype.itemsize * 2, 8)}")
        if wide.itemsize > dtype.itemsize:
            return wide
        return np.dtype(np.float64)
    raise TypeError(f"cannot average dtype {dtype}")


def _even_chunks(image: da.Array, axes: tuple[int, int]) -> da.Array:
    """Rechunk so that every chunk along ``axes`` except the last has an even size."""
    new = {}
    for ax in axes:
        sizes = image.chunks[ax]
        if any(c % 2 for c in sizes[:-1]):
            new[ax] = max(2, sizes[0] + sizes[0] % 2)
    return image.rechunk(new) if new else image
