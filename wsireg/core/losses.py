"""Pure tensor similarity measures, regularisers and the network input representation.

Images are ``(N, C, H, W)`` and fields ``(N, 2, H, W)`` as in :mod:`wsireg.core.coords`. Every measure
returns one value per sample, shape ``(N,)``; callers reduce (``.mean()``). Similarities are
"higher is better"; losses to minimise are built from them (see :func:`registration_loss`, the
paper's Eq. 1: ``-NCC(M, F) + alpha * CURV(u)``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "curvature",
    "diffusion",
    "grey_inverted",
    "local_ncc",
    "mind_loss",
    "mind_ssc",
    "ncc",
    "od_magnitude",
    "optical_density",
    "registration_loss",
    "to_network_input",
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


def _box(x: Tensor, window: int) -> Tensor:
    """Mean over a ``window x window`` box, same size output (edges average only inside).

    Separable: a ``1 x window`` then a ``window x 1`` mean, 2w instead of w^2 additions.
    """
    half = window // 2
    rows = F.avg_pool2d(x, (1, window), stride=1, padding=(0, half), count_include_pad=False)
    return F.avg_pool2d(rows, (window, 1), stride=1, padding=(half, 0), count_include_pad=False)


def local_ncc(a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """Mean over pixels of the windowed NCC: ``(N,)``.

    With ``E_w`` the mean over a ``window x window`` box (odd ``window``) around each pixel and
    channel, ``cov = E_w[ab] - E_w[a] E_w[b]`` and ``var_a = E_w[a^2] - E_w[a]^2``,
    ``LNCC = mean_x cov / sqrt(var_a var_b + eps)``. Signed (inverted images give ~ -1);
    ``eps`` (in squared intensity units) makes flat windows (blank background) contribute ~0.
    """
    return local_ncc_map(a, b, window, eps).flatten(1).mean(dim=1)


def squared_local_ncc(a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """Mean over pixels of the squared windowed NCC, ``(N,)`` in ``[0, 1]``: polarity-free (a
    structure dark in one stain and light in the other still matches)."""
    return (local_ncc_map(a, b, window, eps) ** 2).flatten(1).mean(dim=1)


def local_ncc_map(a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """The per-pixel windowed NCC of :func:`local_ncc`, ``(N, C, H, W)``."""
    if window % 2 != 1:
        raise ValueError(f"window must be odd, got {window}")
    c = a.shape[1]
    moments = _box(torch.cat((a, b, a * a, b * b, a * b), dim=1), window)  # one pass, 5 maps
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


def mind_loss(a: Tensor, b: Tensor, radius: int = 1, dilation: int = 2) -> Tensor:
    """Mean squared difference of MIND-SSC descriptors: ``(N,)``, 0 for a perfect match.

    ``L = mean_{k, x} (MIND_k(a)(x) - MIND_k(b)(x))^2`` (lower is better, unlike NCC).
    """
    diff = mind_ssc(a, radius, dilation) - mind_ssc(b, radius, dilation)
    return (diff * diff).flatten(1).mean(dim=1)


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


def diffusion(u: Tensor) -> Tensor:
    """Diffusion regulariser: ``(N,)``.

    ``DIFF(u) = mean_c [mean (d u_c / dx)^2 + mean (d u_c / dy)^2]`` with forward differences.
    Zero for translations; ``u = (a x, 0)`` gives ``a^2 / 2``.
    """
    dx = u[..., :, 1:] - u[..., :, :-1]
    dy = u[..., 1:, :] - u[..., :-1, :]
    return (dx * dx).flatten(1).mean(dim=1) + (dy * dy).flatten(1).mean(dim=1)


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


# --- network input representation ----------------------------------------------------------------

#: The network input representations of :func:`to_network_input`.
REPRESENTATIONS = ("od", "grey", "haematoxylin")

#: Optical-density magnitude mapped to 1 (Beer-Lambert, log10); dense tissue is ~0.5-1.5.
OD_REFERENCE = 1.5


def _unit_rgb(rgb: Tensor) -> Tensor:
    """``(N, 3, H, W)`` RGB as float in ``[0, 1]``: uint8 is divided by 255, floats are kept."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected RGB (N, 3, H, W), got {tuple(rgb.shape)}")
    if rgb.dtype == torch.uint8:
        return rgb.float() / 255.0
    return rgb.float() if not rgb.is_floating_point() else rgb


def optical_density(rgb: Tensor) -> Tensor:
    """Per-channel optical density ``OD_c = -log10((255 I_c + 1) / 256)``: ``(N, 3, H, W)``.

    ``I_c`` in ``[0, 1]`` (uint8 accepted). White background gives 0, black ``log10(256)``.
    """
    unit = _unit_rgb(rgb)
    return -torch.log10((unit * 255.0 + 1.0) / 256.0)


def od_magnitude(rgb: Tensor, reference: float = OD_REFERENCE) -> Tensor:
    """``clamp(|OD|_2 / reference, 0, 1)``: ``(N, 1, H, W)``; the default network input."""
    od = optical_density(rgb)
    return (torch.linalg.vector_norm(od, dim=1, keepdim=True) / reference).clamp(0.0, 1.0)


def grey_inverted(rgb: Tensor) -> Tensor:
    """``1 - (0.299 R + 0.587 G + 0.114 B)`` in ``[0, 1]``: ``(N, 1, H, W)``."""
    unit = _unit_rgb(rgb)
    weights = unit.new_tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    return 1.0 - (unit * weights).sum(dim=1, keepdim=True)


def haematoxylin(rgb: Tensor, reference: float = OD_REFERENCE) -> Tensor:
    """Haematoxylin amount by colour deconvolution, ``clamp(c_H / reference, 0, 1)``:
    ``(N, 1, H, W)``.

    The optical density is split into the unit OD vectors of haematoxylin, eosin and DAB
    (Ruifrok & Johnston, :mod:`wsireg.synthetic.texture`), ``OD = c @ V``, ``c = OD @ V^-1``, and only
    the haematoxylin amount is kept: the nuclear (counter)stain that H&E, immunohistochemistry
    and most special stains share, while eosin and DAB mark structures that differ by stain.
    """
    od = optical_density(rgb)
    unmix = od.new_tensor(_haematoxylin_unmix()).view(1, 3, 1, 1)
    amount = (od * unmix).sum(dim=1, keepdim=True)
    return (amount / reference).clamp(0.0, 1.0)


@functools.cache
def _haematoxylin_unmix() -> tuple[float, float, float]:
    """The column of ``V^-1`` that gives the haematoxylin amount (computed once)."""
    import numpy as np

    from wsireg.core.stain import dye_basis

    return tuple(float(v) for v in np.linalg.inv(dye_basis())[:, 0])


def to_network_input(rgb: Tensor, representation: str = "od") -> Tensor:
    """One stain-robust channel per image for the network: ``(N, 1, H, W)`` float in ``[0, 1]``.

    ``"od"`` (default, :func:`od_magnitude`): the Euclidean norm of the optical density. By
    Beer-Lambert, OD is linear in the amount of each dye and sums over dyes, so its magnitude
    measures "how much stain" independent of the stain's hue: H&E (pink/purple) and IHC
    (brown DAB on blue haematoxylin) both map tissue to positive values and background to 0,
    with nuclei dark in both. ``"grey"`` (:func:`grey_inverted`) is ``1 - 10^{-OD}``-like: it
    saturates dense tissue and weights colours by luminance, so differently stained slides
    differ more. Both are fixed pointwise maps (no per-image statistics such as a principal OD
    component), so a block computed out of core equals the same pixels of a whole-image pass;
    NCC is invariant to the remaining affine intensity differences.
    """
    if representation == "od":
        return od_magnitude(rgb)
    if representation == "grey":
        return grey_inverted(rgb)
    if representation == "haematoxylin":
        return haematoxylin(rgb)
    raise ValueError(
        f"unknown representation {representation!r} (use {', '.join(REPRESENTATIONS)})"
    )
