"""Algorithm 1 of DeepHistReg on in-memory tensors: one implementation for training and inference.

Conventions are those of :mod:`wsireg.core.coords` and :mod:`wsireg.core.field`: images are
``(N, C, H, W)``, fields ``(N, 2, H, W)`` (channel 0 = x, channel 1 = y) in **pixels of the grid
they live on**, backward mapping ``warped(x) = moving(x + u(x))``.

One pyramid level (:func:`register_level`, lines 4-21 of Algorithm 1)
    Input: the moving image already warped by the current field ``u`` and the fixed image, both
    in the network representation (:func:`network_input`, one channel, background 0), a block or
    a whole image. The fixed image is unfolded once into ``P x P`` patches at stride ``S``
    (:func:`wsireg.core.tiling.unfold`, padded with the background value). For each of the ``M``
    iterations the moving image is warped by the level's field ``v`` so far (for ``m > 0``),
    unfolded the same way, and the level's network predicts a displacement for each patch pair,
    ``G`` patches at a time (:func:`wsireg.core.tiling.groups`). The central ``S x S`` square of every
    patch field is kept and folded back (:func:`wsireg.core.tiling.fold_centres`) into ``v_m``, which
    is composed into the level field: ``v <- v o v_m``, i.e. ``v(x) <- v_m(x) + v(x + v_m(x))``
    (:func:`wsireg.core.field.compose`). Returns ``v``, so that
    ``fixed(x) ~ moving(x + v(x))``.

    Training (lines 16-18): for every group selected by the :class:`GroupTrainer` the forward
    pass keeps its graph, the moving patches are warped by their own prediction ``v_t``, and
    ``L = mean_patches[-NCC(M_w, F) + alpha * CURV(v_t)]`` (:func:`wsireg.core.losses.registration_loss`)
    is back-propagated and the optimiser steps before the next group is processed (only one
    group's graph is ever alive). The displacement kept for folding is the forward result.

The pyramid (:func:`register_pyramid`, lines 1-3 and 22)
    Both images are converted to the network representation once, padded on the right/bottom
    with the background to a multiple of ``2^(N-1)`` and halved ``N - 1`` times by 2x2 averaging,
    so pixel ``j`` of level ``k`` covers level-0 pixels ``[2^k j, 2^k (j + 1))`` exactly as in
    :mod:`wsireg.core.coords`. Coarse to fine: ``u`` (zero on the coarsest level) is upsampled to the
    next level (:func:`wsireg.core.field.resize_field`, values doubled), the **original** level image
    is warped by it (so every network input is interpolated from the source once), the level
    field ``v`` is computed and ``u <- u o v``. The network of pyramid level ``k`` is
    ``model[k]`` (coarsest first); with ``levels < model.num_levels`` only the finest ``levels``
    networks are used. The result is the field on the grid of the given images, in their
    pixels: warp the original moving image with it, once.

The out-of-core scheduler calls :func:`register_level` block by block with blocks read with a
halo (:func:`wsireg.core.blocks.axis_window`); it is a pure function of tensors and the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsireg.core import field as fields
from wsireg.core import losses, tiling
from wsireg.core.stain import BACKGROUND, has_tissue, network_input
from wsireg.model.network import MultiLevelModel

__all__ = [
    "DEFAULTS",
    "GroupTrainer",
    "InferenceSettings",
    "PatchCounts",
    "build_pyramid",
    "inference_settings",
    "pad_to_multiple",
    "register_level",
    "register_pyramid",
]

@dataclass
class PatchCounts:
    """Patches seen by the network and patches skipped as background (both sides blank)."""

    run: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class InferenceSettings:
    """The parameters of Algorithm 1 (Sec. 2 of the paper) besides the networks."""

    iterations: int = 2
    """``M``: network passes per pyramid level (weights shared between them)."""
    patch: int = 128
    """``P``: patch side, pixels of the level (a multiple of ``2^D`` of the network)."""
    stride: int = 64
    """``S``: stride and side of the kept patch centre; ``P - S`` even."""
    group: int = 16
    """``G``: patches per network call (memory vs. speed only; results do not depend on it)."""
    representation: str = "od"
    """Network input, see :func:`network_input`."""
    smoothing: float = 16.0
    """Standard deviation (pixels of the level) of the Gaussian applied to each iteration's
    folded field before it is composed (:func:`wsireg.core.field.smooth_field`; inference only).
    It removes the seams between neighbouring patch centres and the patch-level noise:
    ``benchmarks/network_accuracy.py`` (50 held-out pairs) went from 74.4 % to 85.1 % end-point
    error reduction with the stage-1 weights (see ``wsireg/weights/README.md``). ``S / 4``:
    chosen among 8, 16 and 24 px on the held-out pairs alone, with the shipped weights: mean
    end-point error 1.55 / 1.54 px (plain pairs, 8 / 16) and 1.66 / 1.60 / 1.95 px ("neighbouring
    section" pairs with 2 px of fine mismatch, ``--section-jitter 2``; 8 / 16 / 24). Its
    kernel radius (``3 sigma``) must stay within the scheduler's halo."""
    flip_average: bool = True
    """Average each patch pair's prediction over its four flips (none, x, y, both; each
    flipped back, with the matching components negated): test-time augmentation that cancels
    orientation biases and averages out noise, at 4x the network time. With the shipped weights:
    held-out end-point error 1.78 -> 1.55 px (``benchmarks/network_accuracy.py``, 50 pairs),
    ANHIR median rTRE 0.212 % -> 0.186 % (rat kidney) and 0.581 % -> 0.545 % (lesions)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in a model's metadata under ``"inference"``)."""
        return {
            "iterations": self.iterations,
            "patch": self.patch,
            "stride": self.stride,
            "group": self.group,
            "representation": self.representation,
            "smoothing": self.smoothing,
            "flip_average": self.flip_average,
        }


DEFAULTS = InferenceSettings()
"""Fallback settings for models whose metadata does not say."""


def inference_settings(model: MultiLevelModel | None, **overrides: Any) -> InferenceSettings:
    """Settings stored in ``model.metadata["inference"]`` (else, and without a model,
    :data:`DEFAULTS`), with ``overrides`` that are not ``None`` applied on top."""
    stored = dict(model.metadata.get("inference", {})) if model is not None else {}
    base = {k: stored.get(k, v) for k, v in DEFAULTS.to_dict().items()}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceSettings(**base)


# --- representation and pyramid ------------------------------------------------------------------


def pad_to_multiple(image: Tensor, multiple: int, value: float = BACKGROUND) -> Tensor:
    """Pad ``(N, C, H, W)`` on the right and bottom with ``value`` to multiples of ``multiple``."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return image
    return F.pad(image, (0, pw, 0, ph), mode="constant", value=value)


def build_pyramid(image: Tensor, levels: int) -> list[Tensor]:
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


# --- training hook -------------------------------------------------------------------------------


@dataclass
class GroupTrainer:
    """The training branch of one level (Algorithm 1, lines 16-18): owns the level's optimiser.

    ``alpha`` weighs the curvature term of ``-NCC + alpha * CURV``. ``max_groups`` (``None`` =
    all, as in the paper) trains at most that many randomly chosen groups per iteration and only
    predicts the others; on a CPU this balances the optimiser steps of the fine levels (many
    patches) against the coarse ones (few) at a fraction of the cost. ``supervision`` (``beta``,
    default 0 = the paper's unsupervised loss) adds ``beta * mean_x |v_t(x) - r(x)|`` (end-point
    error in pixels) when the caller knows the residual field ``r`` still to be found (synthetic
    pairs; see :func:`register_level`'s ``target``). With ``shuffle`` (default) the patches of
    an iteration are put in random order before grouping, so that each optimiser step sees
    patches of every image of the batch instead of neighbours of one image (the predictions are
    put back in place before folding). ``losses`` collects the loss of every trained group
    (similarity + regulariser + supervision).
    """

    optimizer: torch.optim.Optimizer
    alpha: float
    max_groups: int | None = None
    generator: torch.Generator | None = None
    losses: list[float] = field(default_factory=list)
    supervision: float = 0.0
    shuffle: bool = True
    similarity: str = "ncc"
    """SIM of the loss (:func:`wsireg.core.losses.registration_loss`): the paper's ``"ncc"``."""

    def select(self, n_groups: int) -> set[int]:
        """Indices of the groups to train among ``n_groups``."""
        if self.max_groups is None or self.max_groups >= n_groups:
            return set(range(n_groups))
        order = torch.randperm(n_groups, generator=self.generator)
        return {int(k) for k in order[: self.max_groups]}

    def step(
        self,
        net: nn.Module,
        moving: Tensor,
        fixed: Tensor,
        loss_moving: Tensor,
        loss_fixed: Tensor,
        target: Tensor | None = None,
    ) -> Tensor:
        """Forward, warp, loss, backward, optimiser step for one group; returns the (detached)
        prediction ``(g, 2, P, P)``. ``loss_*`` are the images the similarity compares (the
        network inputs themselves unless the caller provides stain-free counterparts);
        ``target`` ``(g, 2, P, P)`` the known residual field, used if ``supervision > 0``."""
        net.train()
        pred = net(moving, fixed)
        # edge replication: padding with background would bias the NCC towards small
        # displacements wherever the warp looks beyond the patch
        warped = fields.warp_image(loss_moving, pred, padding="border")
        loss = losses.registration_loss(warped, loss_fixed, pred, self.alpha, self.similarity)
        if self.supervision > 0 and target is not None:
            loss = loss + self.supervision * torch.linalg.vector_norm(pred - target, dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return pred.detach()


# --- Algorithm 1 ---------------------------------------------------------------------------------


def _predict_iteration(
    net: nn.Module,
    moving_patches: Tensor,
    fixed_patches: Tensor,
    group: int,
    channels: int,
    trainer: GroupTrainer | None,
    target_patches: Tensor | None = None,
    counts: PatchCounts | None = None,
    flip_average: bool = False,
) -> Tensor:
    """Displacements of all patches ``(L, 2, P, P)``, ``group`` at a time. Patches carry the
    network input in their first ``channels`` channels and the loss images after them.
    Inference skips background patches (:func:`_infer_tissue_patches`); training sees all."""
    n = moving_patches.shape[0]
    if trainer is None:
        return _infer_tissue_patches(
            net, moving_patches, fixed_patches, group, channels, counts, flip_average
        )
    chosen = trainer.select(tiling.num_groups(n, group))
    order = None
    if trainer is not None and trainer.shuffle:
        # training: groups mix patches of all images of the batch (decorrelated steps)
        order = torch.randperm(n, generator=trainer.generator).to(moving_patches.device)
        moving_patches, fixed_patches = moving_patches[order], fixed_patches[order]
        if target_patches is not None:
            target_patches = target_patches[order]
    outs = []
    for k, sl in enumerate(tiling.groups(n, group)):
        mov, fix = moving_patches[sl], fixed_patches[sl]
        if k in chosen:
            loss_m = mov[:, channels:] if mov.shape[1] > channels else mov
            loss_f = fix[:, channels:] if fix.shape[1] > channels else fix
            tgt = None if target_patches is None else target_patches[sl]
            outs.append(
                trainer.step(net, mov[:, :channels], fix[:, :channels], loss_m, loss_f, tgt)
            )
        else:
            with torch.no_grad():
                outs.append(net(mov[:, :channels], fix[:, :channels]))
    if not outs:
        return moving_patches.new_zeros((0, 2, *moving_patches.shape[-2:]))
    preds = torch.cat(outs)
    if order is None:
        return preds
    restored = torch.empty_like(preds)
    restored[order] = preds
    return restored


def _infer_tissue_patches(
    net: nn.Module,
    moving_patches: Tensor,
    fixed_patches: Tensor,
    group: int,
    channels: int,
    counts: PatchCounts | None,
    flip_average: bool = False,
) -> Tensor:
    """Inference: the network runs, ``group`` at a time, only on patches where either side has
    tissue (:func:`has_tissue`); patches blank on both sides get a zero displacement (what the
    network would predict there is noise, and skipping them saves most of the work on slides
    that are largely glass). ``flip_average``: see :func:`flip_averaged`."""
    predict = flip_averaged if flip_average else _plain
    mov_in, fix_in = moving_patches[:, :channels], fixed_patches[:, :channels]
    keep = has_tissue(mov_in) | has_tissue(fix_in)
    index = torch.nonzero(keep).flatten()
    if counts is not None:
        counts.run += int(index.numel())
        counts.skipped += int(keep.numel() - index.numel())
    preds = moving_patches.new_zeros((moving_patches.shape[0], 2, *moving_patches.shape[-2:]))
    for sl in tiling.groups(int(index.numel()), group):
        chosen = index[sl]
        with torch.no_grad():
            preds[chosen] = predict(net, mov_in[chosen], fix_in[chosen]).to(preds.dtype)
    return preds


def _plain(net: nn.Module, moving: Tensor, fixed: Tensor) -> Tensor:
    return net(moving, fixed)


#: The flips of :func:`flip_averaged`: spatial dims flipped, and the sign of the field's
#: (x, y) components in the flipped frame.
_FLIPS: tuple[tuple[tuple[int, ...], tuple[float, float]], ...] = (
    ((), (1.0, 1.0)),
    ((-1,), (-1.0, 1.0)),
    ((-2,), (1.0, -1.0)),
    ((-2, -1), (-1.0, -1.0)),
)


def flip_averaged(net: nn.Module, moving: Tensor, fixed: Tensor) -> Tensor:
    """``net(moving, fixed)`` ``(N, 2, P, P)`` averaged over the four flips of the pair: each
    flipped prediction is flipped back and the flipped axes' components negated (channel 0 =
    x flips with the last axis, channel 1 = y with the one before)."""
    total = None
    for dims, signs in _FLIPS:
        m, f = (moving.flip(dims), fixed.flip(dims)) if dims else (moving, fixed)
        u = net(m, f)
        if dims:
            sign = torch.tensor(signs, dtype=u.dtype, device=u.device).view(1, 2, 1, 1)
            u = u.flip(dims) * sign
        total = u if total is None else total + u
    assert total is not None
    return total / len(_FLIPS)


def register_level(
    net: nn.Module,
    moving: Tensor,
    fixed: Tensor,
    *,
    iterations: int = DEFAULTS.iterations,
    patch: int = DEFAULTS.patch,
    stride: int = DEFAULTS.stride,
    group: int = DEFAULTS.group,
    trainer: GroupTrainer | None = None,
    loss_moving: Tensor | None = None,
    loss_fixed: Tensor | None = None,
    target: Tensor | None = None,
    counts: PatchCounts | None = None,
    smoothing: float = 0.0,
    flip_average: bool = False,
) -> Tensor:
    """The field ``v`` ``(N, 2, H, W)`` of one pyramid level, in pixels of the level.

    Args:
        net: the level's network (``model[k]``); inputs are sent to its device.
        moving: ``(N, C, H, W)`` moving image in the network representation, already warped by
            the field of the coarser levels.
        fixed: ``(N, C, H, W)`` fixed image, same size.
        iterations, patch, stride, group: ``M``, ``P``, ``S``, ``G`` (see
            :class:`InferenceSettings`).
        trainer: ``None`` for inference; else the level is trained on the fly (module
            docstring). The network is left in train mode.
        loss_moving, loss_fixed: optional ``(N, C', H, W)`` images compared by the training loss
            instead of the network inputs (warped and tiled exactly like them), e.g. both in the
            same stain while the network sees two different stains.
        target: optional ``(N, 2, H, W)`` field with ``fixed(x) = moving(x + target(x))``
            (known for synthetic training pairs); iteration ``m`` supervises with the residual
            ``target - v`` (first order) when the trainer's ``supervision > 0``.
        counts: optional tally of the patches run and skipped as background (inference only
            skips: a patch blank on both sides keeps a zero displacement).
        smoothing: Gaussian standard deviation (px) applied to each iteration's folded field
            before composing (see :attr:`InferenceSettings.smoothing`); 0 = none.
        flip_average: average each patch's prediction over its flips (inference only; see
            :attr:`InferenceSettings.flip_average`).

    Returns:
        ``v`` with ``fixed(x) ~ moving(x + v(x))``: ``Algorithm 1``'s level field, on
        ``moving``'s device.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ")
    if (loss_moving is None) != (loss_fixed is None):
        raise ValueError("give both loss_moving and loss_fixed, or neither")
    device = next(net.parameters()).device
    out_device = moving.device
    channels = moving.shape[1]
    mov_all, fix_all = moving.to(device), fixed.to(device)
    if loss_moving is not None and loss_fixed is not None:
        mov_all = torch.cat((mov_all, loss_moving.to(device)), dim=1)
        fix_all = torch.cat((fix_all, loss_fixed.to(device)), dim=1)
    n, _, h, w = moving.shape
    fixed_patches, geometry = tiling.unfold(fix_all, patch, stride, "constant", BACKGROUND)
    v = mov_all.new_zeros((n, 2, h, w))
    for it in range(iterations):
        warped = mov_all if it == 0 else fields.warp_image(mov_all, v, padding=BACKGROUND)
        moving_patches, _ = tiling.unfold(warped, patch, stride, "constant", BACKGROUND)
        target_patches = None
        if target is not None and trainer is not None and trainer.supervision > 0:
            residual = target.to(device) - v
            target_patches, _ = tiling.unfold(residual, patch, stride, "replicate")
        preds = _predict_iteration(
            net,
            moving_patches,
            fixed_patches,
            group,
            channels,
            trainer,
            target_patches,
            counts,
            flip_average,
        )
        v_it = fields.smooth_field(tiling.fold_centres(preds, geometry), smoothing)
        v = fields.compose(v, v_it)
    return v.to(out_device)


def _warp_optional(image: Tensor | None, u: Tensor | None) -> Tensor | None:
    """``image`` warped by ``u`` (background outside); ``None`` passes through, ``u = None``
    means the identity (no interpolation)."""
    if image is None or u is None:
        return image
    return fields.warp_image(image, u, padding=BACKGROUND)


def register_pyramid(
    model: MultiLevelModel,
    moving: Tensor,
    fixed: Tensor,
    *,
    levels: int | None = None,
    finest: int | None = None,
    iterations: int | None = None,
    patch: int | None = None,
    stride: int | None = None,
    group: int | None = None,
    representation: str | None = None,
    smoothing: float | None = None,
    flip_average: bool | None = None,
    trainers: Sequence[GroupTrainer] | None = None,
    loss_moving: Tensor | None = None,
    loss_fixed: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Algorithm 1 on a whole (small) image pair held in memory.

    Args:
        model: one network per pyramid level, coarsest first.
        moving, fixed: RGB ``(N, 3, H, W)``, uint8 or float in ``[0, 1]``, same size, the moving
            image already affinely aligned to the fixed one.
        levels: ``N``, number of pyramid levels (default: all networks up to ``finest``).
        finest: index of the network run on the given (finest) images, default the model's
            finest (``model.num_levels - 1``); networks ``finest - N + 1 .. finest`` are used,
            e.g. ``levels=1`` alone runs only the finest network, ``finest=0`` only the coarsest
            (training uses such sub-pyramids to give every level its share of samples).
        iterations, patch, stride, group, representation, smoothing, flip_average: default to
            the model's stored settings (:func:`inference_settings`); training never smooths
            nor flip-averages.
        trainers: one :class:`GroupTrainer` per used level (coarsest first) to train while
            registering; ``None`` for inference (no autograd).
        loss_moving, loss_fixed: optional RGB images compared by the training loss instead of
            ``moving``/``fixed`` (see :func:`register_level`).
        target: optional known field ``(N, 2, H, W)`` (input pixels) for supervised training
            terms; level ``k`` is given ``resize(target) - u_k`` (first order).

    Returns:
        ``u`` ``(N, 2, H, W)`` in pixels of the input grid, ``fixed(x) ~ moving(x + u(x))``:
        warp the original moving image with it once
        (``wsireg.core.field.warp_image(moving, u)``).
    """
    cfg = inference_settings(
        model,
        iterations=iterations,
        patch=patch,
        stride=stride,
        group=group,
        representation=representation,
        smoothing=smoothing,
        flip_average=flip_average,
    )
    top = model.num_levels - 1 if finest is None else int(finest)
    if not 0 <= top < model.num_levels:
        raise ValueError(f"finest must be in 0..{model.num_levels - 1}, got {top}")
    n_levels = top + 1 if levels is None else int(levels)
    if not 1 <= n_levels <= top + 1:
        raise ValueError(f"levels must be in 1..{top + 1}, got {n_levels}")
    if trainers is not None and len(trainers) != n_levels:
        raise ValueError(f"need {n_levels} trainers, got {len(trainers)}")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ")
    h, w = moving.shape[-2:]
    device = next(model.parameters()).device
    multiple = 2 ** (n_levels - 1)

    def pyramid(rgb: Tensor | None) -> list[Tensor] | list[None]:
        if rgb is None:
            return [None] * n_levels
        rep = network_input(rgb.to(device), cfg.representation)
        return build_pyramid(pad_to_multiple(rep, multiple), n_levels)

    pyr_m, pyr_f = pyramid(moving), pyramid(fixed)
    pyr_lm, pyr_lf = pyramid(loss_moving), pyramid(loss_fixed)
    full_target = None
    if target is not None:
        ph, pw = (-h) % multiple, (-w) % multiple
        full_target = F.pad(target.to(device), (0, pw, 0, ph), mode="replicate")
    first = top + 1 - n_levels
    u: Tensor | None = None
    context = torch.no_grad() if trainers is None else torch.enable_grad()
    with context:
        for k in range(n_levels):
            size = tuple(pyr_m[k].shape[-2:])
            # coarsest level: u = 0, no interpolation; then upsample u and warp the level images
            u = None if u is None else fields.resize_field(u, size)
            level_target = None
            if full_target is not None:
                t_k = fields.resize_field(full_target, size)
                level_target = t_k if u is None else t_k - u
            v = register_level(
                model[first + k],
                _warp_optional(pyr_m[k], u),
                pyr_f[k],
                iterations=cfg.iterations,
                patch=cfg.patch,
                stride=cfg.stride,
                group=cfg.group,
                smoothing=cfg.smoothing if trainers is None else 0.0,
                flip_average=cfg.flip_average and trainers is None,
                trainer=None if trainers is None else trainers[k],
                loss_moving=_warp_optional(pyr_lm[k], u),
                loss_fixed=pyr_lf[k],
                target=level_target,
            )
            u = v if u is None else fields.compose(u, v)
    assert u is not None
    return u[..., :h, :w].to(moving.device)
