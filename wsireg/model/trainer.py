"""Algorithm 1's training branch (lines 16-18): the networks learn while they register.

The loop is the one of :mod:`wsireg.model.algorithm`; the :class:`GroupPatches` strategy runs
the patch pairs ``G`` at a time and, for every group selected by the level's
:class:`GroupTrainer`, keeps the forward pass's graph, warps the moving patches by their own
prediction ``v_t`` and back-propagates ``L = mean_patches[-SIM(M_w, F) + alpha * CURV(v_t)]``
(:func:`wsireg.core.losses.registration_loss`, plus an optional supervised term) before the
optimiser steps and the next group is processed (only one group's graph is ever alive). The
displacement kept for folding is the forward result. Training never smooths the folded field
nor flip-averages. The epoch loop around it is :func:`wsireg.model.train.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from wsireg.core import field as fields
from wsireg.core import losses, tiling
from wsireg.model.algorithm import (
    level_field,
    network_pyramid,
    pyramid_field,
    pyramid_networks,
    warp_optional,
)
from wsireg.model.inference import InferenceSettings
from wsireg.model.network import MultiLevelModel, UNet
from wsireg.model.training_data import Pair

__all__ = ["GroupPatches", "GroupTrainer", "end_point_error", "train_level", "train_pyramid"]


def end_point_error(pred: Tensor, target: Tensor) -> Tensor:
    """The end-point error ``|pred - target|`` (pixels) summed over the pixels of the patches
    ``(g, 2, P, P)`` whose ``target`` is known and divided by all pixels: the mean error when
    every target is known; a patch with a NaN target (a pair of real sections) adds nothing."""
    known = torch.isfinite(target).flatten(1).all(dim=1)
    if not bool(known.any()):
        return pred.new_zeros(())
    error = torch.linalg.vector_norm(pred[known] - target[known], dim=1)
    return error.mean() * (known.float().mean())


@dataclass
class GroupTrainer:
    """The training branch of one level (Algorithm 1, lines 16-18): owns the level's optimiser.

    ``alpha`` weighs the curvature term of ``-SIM + alpha * CURV``. ``max_groups`` (``None`` =
    all, as in the paper) trains at most that many randomly chosen groups per iteration and only
    predicts the others; on a CPU this balances the optimiser steps of the fine levels (many
    patches) against the coarse ones (few) at a fraction of the cost. ``supervision`` (``beta``,
    default 0 = the paper's unsupervised loss) adds ``beta * mean_x |v_t(x) - r(x)|`` (end-point
    error in pixels) when the caller knows the residual field ``r`` still to be found (synthetic
    pairs; see :func:`train_level`'s ``target``). With ``shuffle`` (default) the patches of
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
        net: UNet,
        moving: Tensor,
        fixed: Tensor,
        loss_images: tuple[Tensor, Tensor],
        target: Tensor | None = None,
    ) -> Tensor:
        """Forward, warp, loss, backward, optimiser step for one group; returns the (detached)
        prediction ``(g, 2, P, P)``. ``loss_images`` (moving, fixed) are what the similarity
        compares (the network inputs themselves unless the caller provides stain-free
        counterparts); ``target`` ``(g, 2, P, P)`` the known residual field, used if
        ``supervision > 0``."""
        loss_moving, loss_fixed = loss_images
        net.train()
        pred = net(moving, fixed)
        # edge replication: padding with background would bias the NCC towards small
        # displacements wherever the warp looks beyond the patch
        warped = fields.warp_image(loss_moving, pred, padding="border")
        loss = losses.registration_loss(warped, loss_fixed, pred, self.alpha, self.similarity)
        if self.supervision > 0 and target is not None:
            loss = loss + self.supervision * end_point_error(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        return pred.detach()


@dataclass
class GroupPatches:
    """Training's :class:`~wsireg.model.algorithm.PredictPatches`: every patch pair is seen
    (no tissue skip), ``group`` at a time; the groups the trainer selects are trained
    (:meth:`GroupTrainer.step`), the others only predicted. Patches carry the network input in
    their first ``channels`` channels and the loss images after them (if any). ``target``: the
    level's known field ``(N, 2, H, W)``; each iteration supervises with the residual
    ``target - v`` (first order) when the trainer's ``supervision > 0``."""

    net: UNet
    trainer: GroupTrainer
    group: int
    channels: int
    target: Tensor | None = None
    patch: int = 0
    stride: int = 0

    def __call__(self, moving: Tensor, fixed: Tensor, v: Tensor) -> Tensor:
        trainer = self.trainer
        targets = None
        if self.target is not None and trainer.supervision > 0:
            targets, _ = tiling.unfold(self.target - v, self.patch, self.stride, "replicate")
        n = moving.shape[0]
        chosen = trainer.select(tiling.num_groups(n, self.group))
        order = None
        if trainer.shuffle:
            # groups mix patches of all images of the batch (decorrelated steps)
            order = torch.randperm(n, generator=trainer.generator).to(moving.device)
            moving, fixed = moving[order], fixed[order]
            if targets is not None:
                targets = targets[order]
        outs = []
        for k, sl in enumerate(tiling.groups(n, self.group)):
            tgt = None if targets is None or k not in chosen else targets[sl]
            outs.append(self._group(moving[sl], fixed[sl], k in chosen, tgt))
        if not outs:
            return moving.new_zeros((0, 2, *moving.shape[-2:]))
        preds = torch.cat(outs)
        if order is None:
            return preds
        restored = torch.empty_like(preds)
        restored[order] = preds
        return restored

    def _group(self, moving: Tensor, fixed: Tensor, train: bool, target: Tensor | None) -> Tensor:
        c = self.channels
        if not train:
            with torch.no_grad():
                return self.net(moving[:, :c], fixed[:, :c])
        loss_moving = moving[:, c:] if moving.shape[1] > c else moving
        loss_fixed = fixed[:, c:] if fixed.shape[1] > c else fixed
        return self.trainer.step(
            self.net, moving[:, :c], fixed[:, :c], (loss_moving, loss_fixed), target
        )


def train_level(
    net: UNet,
    moving: Tensor,
    fixed: Tensor,
    settings: InferenceSettings,
    trainer: GroupTrainer,
    *,
    loss_images: tuple[Tensor, Tensor] | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Train ``net`` on one pyramid level while computing its field ``v`` ``(N, 2, H, W)``
    (pixels of the level, on ``moving``'s device); the network is left in train mode.

    Args:
        net: the level's network; inputs are sent to its device.
        moving, fixed: ``(N, C, H, W)`` in the network representation, ``moving`` already
            warped by the field of the coarser levels.
        settings: ``M``, ``P``, ``S``, ``G`` (its smoothing and flip averaging are not used:
            training does neither).
        trainer: the level's :class:`GroupTrainer`.
        loss_images: optional ``(N, C', H, W)`` (moving, fixed) compared by the training loss
            instead of the network inputs (warped and tiled exactly like them), e.g. both in the
            same stain while the network sees two different stains.
        target: optional ``(N, 2, H, W)`` field with ``fixed(x) = moving(x + target(x))``
            (known for synthetic training pairs), see :class:`GroupPatches`.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ")
    device = next(net.parameters()).device
    mov_all, fix_all = moving.to(device), fixed.to(device)
    if loss_images is not None:
        mov_all = torch.cat((mov_all, loss_images[0].to(device)), dim=1)
        fix_all = torch.cat((fix_all, loss_images[1].to(device)), dim=1)
    level_target = None if target is None else target.to(device)
    predict = GroupPatches(
        net, trainer, settings.group, moving.shape[1], level_target, settings.patch, settings.stride
    )
    v = level_field(
        mov_all,
        fix_all,
        predict,
        iterations=settings.iterations,
        patch=settings.patch,
        stride=settings.stride,
    )
    return v.to(moving.device)


def train_pyramid(
    model: MultiLevelModel,
    pair: Pair,
    settings: InferenceSettings,
    trainers: Sequence[GroupTrainer],
    top_network: int | None = None,
) -> Tensor:
    """Algorithm 1 with training on a batch of pairs held in memory: the sub-pyramid of
    ``len(trainers)`` networks ending at ``top_network`` (default the model's finest), one
    :class:`GroupTrainer` each (coarsest first), as :func:`wsireg.model.inference.
    register_pyramid` runs it. The pair's loss images are compared by the loss; its ``truth``
    supervises the levels whose trainer has ``supervision > 0`` (level ``k`` is given
    ``resize(truth) - u_k``, first order). Returns the field ``u`` in pixels of the input grid.
    """
    networks = pyramid_networks(model, top_network, len(trainers))
    if pair.moving.shape != pair.fixed.shape:
        raise ValueError(f"moving {tuple(pair.moving.shape)} and fixed differ in shape")
    h, w = pair.moving.shape[-2:]
    n_levels = len(networks)
    device = next(model.parameters()).device
    pyr_m, pyr_f, pyr_lm, pyr_lf = (
        network_pyramid(rgb, settings.representation, n_levels, device)
        for rgb in (pair.moving, pair.fixed, pair.loss_moving, pair.loss_fixed)
    )
    full_target = None
    if any(t.supervision > 0 for t in trainers):
        multiple = 2 ** (n_levels - 1)
        ph, pw = (-h) % multiple, (-w) % multiple
        full_target = F.pad(pair.truth.to(device), (0, pw, 0, ph), mode="replicate")

    def level(k: int, u: Tensor | None) -> Tensor:
        level_target = None
        if full_target is not None:
            t_k = fields.resize_field(full_target, tuple(pyr_m[k].shape[-2:]))
            level_target = t_k if u is None else t_k - u
        return train_level(
            model[networks[k]],
            warp_optional(pyr_m[k], u),
            pyr_f[k],
            settings,
            trainers[k],
            loss_images=(warp_optional(pyr_lm[k], u), pyr_lf[k]),
            target=level_target,
        )

    with torch.enable_grad():
        u = pyramid_field([tuple(p.shape[-2:]) for p in pyr_m], level)
    return u[..., :h, :w].to(pair.moving.device)
