"""Pure tensor similarity measures and regularisers.

Images are ``(N, C, H, W)`` and fields ``(N, 2, H, W)`` as in :mod:`wsireg.core.coords`. Every
measure returns one value per sample, shape ``(N,)``; callers reduce (``.mean()``). Similarities are
"higher is better"; losses to minimise are built from them (see :func:`registration_loss`, the
paper's Eq. 1: ``-NCC(M, F) + alpha * CURV(u)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_mean",
    "box_mean_replicate",
    "curvature",
    "local_ncc",
    "local_ncc_map",
    "mind_ssc",
    "ncc",
    "registration_loss",
    "squared_local_ncc",
]


# --- similarity -------------------------------------------------------------------------------


def ncc(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Global normalised cross-correlation of each sample: ``(N,)`` in ``[-1, 1]``.

    ``NCC(a, b) = sum((a - mean a)(b - mean b)) / sqrt(sum (a - mean a)^2 * sum (b - mean b)^2)``
    over ``C, H, W``. 1 for identical images, -1 for inverted ones, invariant to ``a -> s a + t``
    with ``s > 0``. ``eps`` keeps constant patches (blank background) finite (NCC -> 0).
    """
    a = a.flatten(1)
    b = b.flatten(1)
    da = a - a.mean(dim=1, keepdim=True)
    db = b - b.mean(dim=1, keepdim=True)
    cross = (da * db).sum(dim=1)
    return cross / torch.sqrt((da * da).sum(dim=1) * (db * db).sum(dim=1) + eps)


BoxMean = Callable[[Tensor, int], Tensor]
"""A ``window x window`` box mean of ``(N, C, H, W)``, same size output."""


def box_mean(x: Tensor, window: int) -> Tensor:
    """Mean over a ``window x window`` box (odd), same size output; at the edges only the pixels
    inside the image are averaged. Separable: a ``1 x window`` then a ``window x 1`` mean."""
    half = window // 2
    rows = F.avg_pool2d(x, (1, window), stride=1, padding=(0, half), count_include_pad=False)
    return F.avg_pool2d(rows, (window, 1), stride=1, padding=(half, 0), count_include_pad=False)


def box_mean_replicate(x: Tensor, window: int) -> Tensor:
    """Mean over a ``window x window`` box (odd), same size output, edges replicated: separable
    running sums (``cumsum``), faster than :func:`box_mean` on the CPU and exact enough in
    float32 for images of a few hundred pixels."""
    p = window // 2
    x = F.pad(x, (p + 1, p, p + 1, p), mode="replicate")
    c = x.cumsum(-1)
    x = c[..., window:] - c[..., :-window]
    c = x.cumsum(-2)
    return (c[..., window:, :] - c[..., :-window, :]) / float(window * window)


def local_ncc(
    a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5, box: BoxMean = box_mean
) -> Tensor:
    """Mean over pixels of the windowed NCC: ``(N,)``.

    With ``E_w`` the mean over a ``window x window`` box (odd ``window``) around each pixel and
    channel, ``cov = E_w[ab] - E_w[a] E_w[b]`` and ``var_a = E_w[a^2] - E_w[a]^2``,
    ``LNCC = mean_x cov / sqrt(var_a var_b + eps)``. Signed (inverted images give ~ -1);
    ``eps`` (in squared intensity units) makes flat windows (blank background) contribute ~0.
    ``box`` computes ``E_w`` (:func:`box_mean` or :func:`box_mean_replicate`).
    """
    return local_ncc_map(a, b, window, eps, box).flatten(1).mean(dim=1)


def squared_local_ncc(a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """Mean over pixels of the squared windowed NCC, ``(N,)`` in ``[0, 1]``: polarity-free (a
    structure dark in one stain and light in the other still matches)."""
    return (local_ncc_map(a, b, window, eps) ** 2).flatten(1).mean(dim=1)


def local_ncc_map(
    a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5, box: BoxMean = box_mean
) -> Tensor:
    """The per-pixel windowed NCC of :func:`local_ncc`, ``(N, C, H, W)``."""
    if window % 2 != 1:
        raise ValueError(f"window must be odd, got {window}")
    c = a.shape[1]
    moments = box(torch.cat((a, b, a * a, b * b, a * b), dim=1), window)  # one pass, 5 maps
    mean_a, mean_b, sq_a, sq_b, ab = moments.split(c, dim=1)
    var_a = (sq_a - mean_a * mean_a).clamp_min(0)
    var_b = (sq_b - mean_b * mean_b).clamp_min(0)
    cov = ab - mean_a * mean_b
    return cov / torch.sqrt(var_a * var_b + eps)


# --- MIND-SSC ---------------------------------------------------------------------------------


def _shift(padded: Tensor, dx: int, dy: int, offset: int, size: tuple[int, int]) -> Tensor:
    """Window ``size`` of ``padded`` starting at ``(offset + dy, offset + dx)``: a shifted image."""
    h, w = size
    return padded[..., offset + dy : offset + dy + h, offset + dx : offset + dx + w]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> Tensor:
    """MIND with self-similarity context (Heinrich et al. 2012/2013), 2-D: ``(N, 4C, H, W)``.

    Neighbours ``p in {(d, 0), (0, d), (-d, 0), (0, -d)}`` (``d = dilation``) of each pixel; the
    self-similarity context compares the 4 pairs of neighbours that are ``sqrt(2) d`` apart:
    ``D_k(x) = box_{2r+1}[(I(x + p_k) - I(x + q_k))^2]`` (``r = radius``). Then
    ``D_k -= min_k D_k``, ``V(x) = mean_k D_k(x)`` clamped to ``[1e-3, 1e3] * mean_x V`` (and
    ``>= eps``), and ``MIND_k(x) = exp(-D_k(x) / V(x))``. Invariant to ``I -> s I + t`` for any
    ``s != 0`` (including inversion), so it suits stain changes. Edges replicated.
    """
    n, c, h, w = image.shape
    d = dilation
    pad = d + radius
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    neighbours = [(d, 0), (0, d), (-d, 0), (0, -d)]
    pairs = [(0, 1), (1, 2), (2, 3), (3, 0)]
    # Squared differences on the image grown by `radius` (padded index pad - radius = d is pixel
    # -radius), so the valid box filter below returns exactly (H, W).
    ext = (h + 2 * radius, w + 2 * radius)
    dists = []
    for i, j in pairs:
        a = _shift(padded, *neighbours[i], d, ext)
        b = _shift(padded, *neighbours[j], d, ext)
        dists.append(F.avg_pool2d((a - b) ** 2, 2 * radius + 1, stride=1))
    dist = torch.stack(dists, dim=2)  # (N, C, 4, H, W)
    dist = dist - dist.amin(dim=2, keepdim=True)
    var = dist.mean(dim=2, keepdim=True)
    var_mean = var.mean(dim=(2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, var_mean * 1e3), var_mean * 1e-3).clamp_min(eps)
    return torch.exp(-dist / var).reshape(n, c * 4, h, w)


# --- regularisers ------------------------------------------------------------------------------

_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def curvature(u: Tensor) -> Tensor:
    """Curvature regulariser (Fischer & Modersitzki 2003): ``(N,)``.

    ``CURV(u) = mean_{c in (x, y)} mean_x (Laplacian u_c(x))^2`` with the 5-point Laplacian
    ``u(x+1) + u(x-1) + u(y+1) + u(y-1) - 4 u`` on interior pixels only (no border artefacts).
    Zero for affine fields; ``u_x = a x^2 + b y^2, u_y = 0`` gives ``(2a + 2b)^2 / 2``. Units:
    pixels^-2 x pixels^2 of the field's grid.
    """
    kernel = u.new_tensor(_LAPLACIAN).reshape(1, 1, 3, 3).expand(2, 1, 3, 3)
    lap = F.conv2d(u, kernel, groups=2)
    return (lap * lap).flatten(1).mean(dim=1)


SIMILARITIES = ("ncc", "lncc2")
"""Similarities of :func:`registration_loss`."""


def registration_loss(
    warped: Tensor, fixed: Tensor, u: Tensor, alpha: float, similarity: str = "ncc"
) -> Tensor:
    """The paper's objective (Eq. 1), a scalar: ``mean_N[-SIM(warped, fixed) + alpha CURV(u)]``
    with SIM the global NCC of each item (``"ncc"``, the paper's) or the mean squared local NCC
    (``"lncc2"``, 7 px windows: polarity-free, the similarity of :mod:`wsireg.model.refine`)."""
    if similarity == "ncc":
        sim = ncc(warped, fixed)
    elif similarity == "lncc2":
        sim = squared_local_ncc(warped, fixed, 7)
    else:
        raise ValueError(f"unknown similarity {similarity!r} (use {', '.join(SIMILARITIES)})")
    return (-sim + alpha * curvature(u)).mean()
