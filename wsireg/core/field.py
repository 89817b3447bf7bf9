"""Pure tensor functions on 2-D displacement fields (no ``nn.Module``, no state).

Axes, channel order, units and the backward-mapping convention are those of
:mod:`wsireg.core.coords`:
images are ``(N, C, H, W)``, fields ``(N, 2, H, W)`` (channel 0 = x, channel 1 = y) in pixels of
the grid they live on, pixel centres at integers, and a field ``u`` warps by
``warped(x) = moving(x + u(x))``.

``grid_sample`` convention
    :func:`to_grid_sample` is the only place where pixel positions are converted to the
    normalised ``[-1, 1]`` coordinates of :func:`torch.nn.functional.grid_sample`. It uses
    ``align_corners=True``: normalised ``-1`` and ``+1`` are the centres of the first and last
    pixels, i.e. ``n = 2 x / (W - 1) - 1``. With pixel centres at integers this is an exact
    affine change of variables with no half-pixel offset, so a constant integer displacement
    moves pixels exactly.

Resampling between pyramid levels (:func:`resize_field`) instead follows the pixel-*area*
geometry of :mod:`wsireg.core.coords` (``F.interpolate(..., align_corners=False)``): a grid at
downsample ``d`` has its pixel ``j`` centred at level-0 ``d (j + 0.5) - 0.5``.

Borders
    Unless stated otherwise, sampling outside the grid replicates the nearest edge value
    (``padding_mode="border"``): a field is extrapolated as constant beyond its grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Padding = str | float | Sequence[float]

__all__ = [
    "compose",
    "identity_grid",
    "jacobian_determinant",
    "rescale_field",
    "resize_field",
    "sample",
    "smooth_field",
    "to_grid_sample",
    "warp_image",
]


def identity_grid(
    size: tuple[int, int], *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Pixel coordinates of a ``(H, W)`` grid as a field-shaped tensor ``(1, 2, H, W)``.

    Channel 0 holds ``x`` (the column index), channel 1 ``y`` (the row index), so the
    positions a field ``u`` samples are ``identity_grid(size) + u``.
    """
    h, w = size
    ys = torch.arange(h, dtype=dtype, device=device)
    xs = torch.arange(w, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy)).unsqueeze(0)


def to_grid_sample(positions: Tensor, size: tuple[int, int]) -> Tensor:
    """Convert pixel positions ``(..., 2)`` (x, y) to ``grid_sample`` coordinates.

    ``n_x = 2 x / (W - 1) - 1`` and ``n_y = 2 y / (H - 1) - 1`` (``align_corners=True``) for a
    sampled grid of size ``size = (H, W)``. A dimension of size 1 uses a denominator of 1 (any
    finite value samples its only pixel).
    """
    h, w = size
    scale = positions.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    return positions * scale - 1.0


def sample(
    image: Tensor, positions: Tensor, *, mode: str = "bilinear", padding: Padding = "border"
) -> Tensor:
    """Sample ``image`` at pixel ``positions``: the one wrapper around ``grid_sample``.

    Args:
        image: ``(N | 1, C, H, W)``; integer images are converted to float32.
        positions: ``(N | 1, 2, H', W')`` field-shaped (x, y) pixel positions in ``image``'s
            grid. A batch of 1 on either side is broadcast to the other's ``N``.
        mode: ``"bilinear"``, ``"nearest"`` or ``"bicubic"``.
        padding: ``"border"`` (replicate the edge), ``"zeros"``, ``"reflection"``, or a constant
            (a float, or one float per channel) used outside the image, e.g. white.

    Returns:
        ``(N, C, H', W')``, ``out[n, c, i, j] = image[n, c](positions[n, :, i, j])``.
    """
    if not image.is_floating_point():
        image = image.float()
    positions = positions.to(image.dtype)
    n = max(image.shape[0], positions.shape[0])  # a batch of 1 broadcasts
    image = image.expand(n, -1, -1, -1) if image.shape[0] != n else image
    positions = positions.expand(n, -1, -1, -1) if positions.shape[0] != n else positions
    grid = to_grid_sample(positions.permute(0, 2, 3, 1), image.shape[-2:])
    if isinstance(padding, str):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    # Constant padding: sample (image - c) with zeros outside, then add c back. Interpolation
    # weights sum to one, so this equals sampling an image padded with c.
    value = torch.as_tensor(padding, dtype=image.dtype, device=image.device).reshape(1, -1, 1, 1)
    out = F.grid_sample(image - value, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out + value


def warp_image(
    image: Tensor, u: Tensor, *, mode: str = "bilinear", padding: Padding = "border"
) -> Tensor:
    """Backward-warp ``image`` by ``u``: ``warped(x) = image(x + u(x))``.

    Args:
        image: moving image ``(N | 1, C, Hm, Wm)``; ``x + u(x)`` is read in its pixels (it may be
            larger than the field's grid, e.g. a moving block read with a halo, as long as both
            share the same origin and pixel size).
        u: field ``(N | 1, 2, H, W)`` on the output (fixed) grid.
        mode, padding: see :func:`sample`.

    Returns:
        ``(N, C, H, W)``.
    """
    grid = identity_grid(u.shape[-2:], dtype=u.dtype, device=u.device)
    return sample(image, grid + u, mode=mode, padding=padding)


def compose(u: Tensor, v: Tensor) -> Tensor:
    """Field ``w`` of ``T_w = T_u o T_v`` (apply ``v`` first, then ``u``).

    ``w(x) = v(x) + u(x + v(x))``, with ``u`` bilinearly interpolated and replicated beyond
    its border (constant extrapolation). With backward mapping this is how a field ``v``,
    estimated between the fixed image and the moving image already warped by ``u``, is folded
    into ``u``: ``warp(warp(M, u), v) ~= warp(M, compose(u, v))`` (one interpolation of ``M``).

    Both fields live on the same grid: ``(N | 1, 2, H, W)``.
    """
    grid = identity_grid(v.shape[-2:], dtype=v.dtype, device=v.device)
    if u.shape[0] != v.shape[0] and u.shape[0] == 1:
        u = u.expand(v.shape[0], -1, -1, -1)
    return v + sample(u, grid + v, mode="bilinear", padding="border")


def rescale_field(u: Tensor, factor: float | tuple[float, float]) -> Tensor:
    """Multiply the displacement values by ``factor`` (or ``(fx, fy)`` per component).

    Use it to change units without resampling, e.g. ``rescale_field(u, d)`` turns a field in
    pixels of a grid at downsample ``d`` into level-0 pixels (the stored unit of
    :mod:`wsireg.core.coords`), and ``rescale_field(u, 1 / d)`` goes back.
    """
    fx, fy = (factor, factor) if isinstance(factor, int | float) else factor
    return u * u.new_tensor([fx, fy]).reshape(1, 2, 1, 1)


def resize_field(u: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``u`` to a grid of ``size = (H', W')`` covering the same area (pyramid step).

    Positions follow the pixel-area geometry of :mod:`wsireg.core.coords` (bilinear,
    ``align_corners=False``, edges replicated); values are rescaled to the new pixels:
    ``u'_x = u_x * W' / W`` and ``u'_y = u_y * H' / H``. Shrinking does not low-pass filter
    first; fields are smooth at the scale of one pyramid step.
    """
    h, w = u.shape[-2:]
    new_h, new_w = size
    if (new_h, new_w) == (h, w):
        return u
    resized = F.interpolate(u, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return rescale_field(resized, (new_w / w, new_h / h))


def jacobian_determinant(u: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)``: ``(N, H, W)``.

    ``det = (1 + du_x/dx) (1 + du_y/dy) - (du_x/dy) (du_y/dx)``, with central differences in the
    interior and one-sided differences at the border (:func:`torch.gradient`). Values ``<= 0``
    mark folding; ``1`` is volume-preserving. Needs ``H, W >= 2``.
    """
    dux_dy, dux_dx = torch.gradient(u[:, 0], dim=(-2, -1))
    duy_dy, duy_dx = torch.gradient(u[:, 1], dim=(-2, -1))
    return (1.0 + dux_dx) * (1.0 + duy_dy) - dux_dy * duy_dx


def smooth_field(u: Tensor, sigma: float) -> Tensor:
    """``u`` ``(N, C, H, W)`` low-passed by a Gaussian of standard deviation ``sigma`` (pixels
    of the grid), separable, edges replicated; ``sigma <= 0`` returns ``u`` unchanged."""
    if sigma <= 0:
        return u
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=u.dtype, device=u.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = u.shape
    flat = u.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)
