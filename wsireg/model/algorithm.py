"""Algorithm 1 of DeepHistReg on in-memory tensors: the loop that inference and training share.

Conventions are those of :mod:`wsireg.core.coords` and :mod:`wsireg.core.field`: images are
``(N, C, H, W)``, fields ``(N, 2, H, W)`` (channel 0 = x, channel 1 = y) in **pixels of the grid
they live on**, backward mapping ``warped(x) = moving(x + u(x))``.

One pyramid level (:func:`level_field`, lines 4-21 of Algorithm 1)
    Input: the moving image already warped by the current field ``u`` and the fixed image, both
    in the network representation (:func:`wsireg.core.stain.network_input`, background 0). The
    fixed image is unfolded once into ``P x P`` patches at stride ``S``
    (:func:`wsireg.core.tiling.unfold`, padded with the background value). For each of the
    ``M`` iterations the moving image is warped by the level's field ``v`` so far (for
    ``m > 0``), unfolded the same way, and a :class:`PredictPatches` strategy gives a
    displacement for each patch pair: inference (:mod:`wsireg.model.inference`: tissue patches
    only, ``G`` at a time, optionally flip-averaged) or training (:mod:`wsireg.model.trainer`:
    ``G`` at a time, each group an optimiser step). The central ``S x S`` square of every patch
    field is kept and folded back (:func:`wsireg.core.tiling.fold_centres`) into ``v_m``, which
    is composed into the level field: ``v <- v o v_m``, i.e. ``v(x) <- v_m(x) + v(x + v_m(x))``
    (:func:`wsireg.core.field.compose`). The result ``v`` has ``fixed(x) ~ moving(x + v(x))``.

The pyramid (:func:`pyramid_field`, lines 1-3 and 22)
    Both images are converted to the network representation once, padded on the right/bottom
    with the background to a multiple of ``2^(N-1)`` and halved ``N - 1`` times by 2x2
    averaging (:func:`network_pyramid`), so pixel ``j`` of level ``k`` covers level-0 pixels
    ``[2^k j, 2^k (j + 1))`` exactly as in :mod:`wsireg.core.coords`. Coarse to fine: ``u``
    (zero on the coarsest level) is upsampled to the next level
    (:func:`wsireg.core.field.resize_field`, values doubled), the **original** level image is
    warped by it (so every network input is interpolated from the source once), the level field
    ``v`` is computed and ``u <- u o v``. The network of pyramid level ``k`` is ``model[k]``
    (coarsest first); a sub-pyramid of ``levels`` networks ending at network ``top_network``
    uses networks ``top_network - levels + 1 .. top_network`` (:func:`pyramid_networks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from wsireg.core import field as fields
from wsireg.core import tiling
from wsireg.core.stain import BACKGROUND, network_input
from wsireg.model.network import MultiLevelModel

__all__ = [
    "PredictPatches",
    "average_pyramid",
    "level_field",
    "network_pyramid",
    "pad_to_multiple",
    "pyramid_field",
    "pyramid_networks",
    "warp_optional",
]


class PredictPatches(Protocol):
    """One iteration's displacements of all patch pairs.

    ``moving`` and ``fixed`` are ``(L, C, P, P)`` patches (the strategy knows which channels
    are the network input); ``v`` is the level field so far ``(N, 2, H, W)`` (training uses it
    for the supervised residual). Returns ``(L, 2, P, P)`` in pixels of the level.
    """

    def __call__(self, moving: Tensor, fixed: Tensor, v: Tensor) -> Tensor: ...


def level_field(
    moving: Tensor,
    fixed: Tensor,
    predict: PredictPatches,
    *,
    iterations: int,
    patch: int,
    stride: int,
    smoothing: float = 0.0,
) -> Tensor:
    """Algorithm 1's level field ``v`` ``(N, 2, H, W)`` (module docstring), on the images'
    device: ``M = iterations`` passes of ``P = patch``, ``S = stride`` patches through
    ``predict``. Each iteration's folded field is low-passed by a Gaussian of standard
    deviation ``smoothing`` (pixels of the level, :func:`wsireg.core.field.smooth_field`; 0 =
    none) before it is composed. ``moving`` and ``fixed`` may carry extra channels (training's
    loss images): they are warped and tiled with the network input."""
    n, _, h, w = moving.shape
    fixed_patches, geometry = tiling.unfold(fixed, patch, stride, "constant", BACKGROUND)
    v = moving.new_zeros((n, 2, h, w))
    for it in range(iterations):
        warped = moving if it == 0 else fields.warp_image(moving, v, padding=BACKGROUND)
        moving_patches, _ = tiling.unfold(warped, patch, stride, "constant", BACKGROUND)
        preds = predict(moving_patches, fixed_patches, v)
        v_it = fields.smooth_field(tiling.fold_centres(preds, geometry), smoothing)
        v = fields.compose(v, v_it)
    return v


# --- the pyramid ---------------------------------------------------------------------------------


def pad_to_multiple(image: Tensor, multiple: int, value: float = BACKGROUND) -> Tensor:
    """Pad ``(N, C, H, W)`` on the right and bottom with ``value`` to multiples of ``multiple``."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return image
    return F.pad(image, (0, pw, 0, ph), mode="constant", value=value)


def average_pyramid(image: Tensor, levels: int) -> list[Tensor]:
    """``levels`` images, **coarsest first**: level ``k`` (from the finest) is ``image``
    averaged over ``2^k x 2^k`` blocks. ``H`` and ``W`` must be multiples of ``2^(levels - 1)``
    (see :func:`pad_to_multiple`)."""
    if levels < 1:
        raise ValueError(f"need at least one level, got {levels}")
    m = 2 ** (levels - 1)
    if image.shape[-1] % m or image.shape[-2] % m:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {m}")
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))
    return pyramid[::-1]


def network_pyramid(
    rgb: Tensor, representation: str, levels: int, device: torch.device
) -> list[Tensor]:
    """RGB ``(N, 3, H, W)`` (uint8 or float in ``[0, 1]``) in the network ``representation``,
    padded with the background to a multiple of ``2^(levels - 1)`` and averaged into
    ``levels`` images, coarsest first, on ``device``."""
    rep = network_input(rgb.to(device), representation)
    return average_pyramid(pad_to_multiple(rep, 2 ** (levels - 1)), levels)


def pyramid_networks(model: MultiLevelModel, top_network: int | None, levels: int | None) -> range:
    """Indices into ``model`` of the networks of a sub-pyramid, coarsest first: ``levels``
    networks (default: all up to the top one) ending at ``top_network`` (default: the model's
    finest, ``model.num_levels - 1``). ``ValueError`` when out of range."""
    top = model.num_levels - 1 if top_network is None else int(top_network)
    if not 0 <= top < model.num_levels:
        raise ValueError(f"top_network must be in 0..{model.num_levels - 1}, got {top}")
    n_levels = top + 1 if levels is None else int(levels)
    if not 1 <= n_levels <= top + 1:
        raise ValueError(f"levels must be in 1..{top + 1}, got {n_levels}")
    return range(top + 1 - n_levels, top + 1)


def warp_optional(image: Tensor, u: Tensor | None) -> Tensor:
    """``image`` warped by ``u`` (background outside); ``u = None`` means the identity (no
    interpolation)."""
    if u is None:
        return image
    return fields.warp_image(image, u, padding=BACKGROUND)


def pyramid_field(
    sizes: list[tuple[int, int]], level: Callable[[int, Tensor | None], Tensor]
) -> Tensor:
    """Coarse to fine over the pyramid levels of ``sizes`` (coarsest first): ``u`` (``None``
    on the coarsest level: no field, no interpolation) is upsampled to level ``k``, ``level(k,
    u)`` gives the level field ``v`` of the images warped by ``u``, and ``u <- u o v``. Returns
    ``u`` on the finest grid, in its pixels."""
    u: Tensor | None = None
    for k, size in enumerate(sizes):
        u = None if u is None else fields.resize_field(u, size)
        v = level(k, u)
        u = v if u is None else fields.compose(u, v)
    if u is None:
        raise ValueError("a pyramid needs at least one level")
    return u
