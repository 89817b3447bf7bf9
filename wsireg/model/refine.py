"""Instance-optimisation refinement of a displacement field (beyond the paper).

Starting from a field ``v0`` (the network's, or zero when there are no weights), ``steps`` Adam
steps minimise the same objective as the network's training, on the pair itself:

    L(v) = -SIM(moving(x + v(x)), fixed(x)) + alpha * CURV(v - v0)

with SIM the mean squared local NCC by default (see :class:`RefineSettings`) and the curvature
of the correction (the network's field is taken as it is), with ``v = v0 + up(delta)``: the
correction ``delta`` lives on a grid ``scale`` times coarser (smoothness for free, fewer
unknowns) and is upsampled bilinearly. Tensors follow :mod:`wsireg.core.coords` /
:mod:`wsireg.core.field`: images ``(1, C, H, W)`` in the network representation (background 0),
fields ``(1, 2, H, W)`` in pixels of the image grid. A pure function of tensors: the scheduler
calls it block by block, and it runs on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wsireg.core import field as fields
from wsireg.core import losses

#: Gradient scale below which Adam's steps shrink (similarity units per pixel of the grid).
ADAM_EPS = 1e-4
#: Scales the MIND distance to the range of LNCC, so ``alpha`` means the same for both.
MIND_WEIGHT = 10.0


@dataclass(frozen=True)
class RefineSettings:
    """Knobs of :func:`refine_field`."""

    steps: int = 0
    """Adam steps at the coarsest level (0: no refinement), :attr:`decay` times fewer per finer
    level."""
    alone_steps: int | None = None
    """The same for the levels that have no network (all levels without a model; with one,
    those coarser than its networks): ``None`` = :attr:`steps`. There the optimisation is all
    that moves the field, so it runs even when the networks' levels are not refined."""
    learning_rate: float = 0.5
    """Adam step size, pixels of the level."""
    alpha: float = 1.0
    """Weight of the curvature of ``v`` (pixels of the level)."""
    window: int = 7
    """Local NCC window, pixels of the level (odd)."""
    scale: int = 16
    """The correction lives on a grid ``scale`` times coarser than the image: smoothness for
    free and fewer unknowns (the choice: ``wsireg/weights/README.md``, "Instance
    optimisation")."""
    similarity: str = "lncc2"
    """``"lncc2"`` (mean squared local NCC: polarity-free, so structures a stain shows dark and
    the other light still match; the default, see ``wsireg/weights/README.md``), ``"lncc"``
    (signed local NCC) or ``"mind"`` (MSE of MIND-SSC descriptors, computed once per image and
    warped)."""
    decay: float = 0.5
    """Each finer pyramid level gets ``decay`` times the steps of the coarser one (fine levels
    cost 4x more per step and start closer to the optimum)."""

    def steps_at(self, level: int, has_network: bool = True) -> int:
        """Steps at pyramid level ``level`` (0 = coarsest), with or without a network there."""
        steps = self.steps if has_network or self.alone_steps is None else self.alone_steps
        if steps <= 0:
            return 0
        return max(1, round(steps * self.decay**level))


def refine_field(
    moving: Tensor, fixed: Tensor, v0: Tensor | None, settings: RefineSettings
) -> Tensor:
    """``v`` minimising ``-LNCC(moving o (id + v), fixed) + alpha CURV(v)`` from ``v0``."""
    n, _, h, w = fixed.shape
    if v0 is None:
        v0 = fixed.new_zeros((n, 2, h, w))
    if settings.steps <= 0:
        return v0
    coarse = (max(2, -(-h // settings.scale)), max(2, -(-w // settings.scale)))
    delta = torch.zeros((n, 2, *coarse), device=fixed.device, dtype=fixed.dtype)
    delta.requires_grad_(True)
    # Adam normalises gradient magnitudes, so without care it keeps stepping ~lr where the
    # gradient is only noise (e.g. an already perfect match): a floor on the gradient scale
    # (eps) and a cosine decay of the step to zero make it settle instead of jitter.
    optimiser = torch.optim.Adam([delta], lr=settings.learning_rate, eps=ADAM_EPS)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps)
    moving, fixed, v0 = moving.detach(), fixed.detach(), v0.detach()
    similarity = _similarity(moving, fixed, settings)
    with torch.enable_grad():
        for _ in range(settings.steps):
            v = v0 + F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)
            # v0 is fixed: only the correction is regularised, on its own grid (the Laplacian
            # per fine pixel^2 is the coarse one / scale^2, squared: / scale^4).
            curvature = losses.curvature(delta).mean() / settings.scale**4
            loss = -similarity(v) + settings.alpha * curvature
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    with torch.no_grad():
        return v0 + F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)


def _similarity(
    moving: Tensor, fixed: Tensor, settings: RefineSettings
) -> Callable[[Tensor], Tensor]:
    """``v -> similarity`` (higher is better) of the moving image warped by ``v``."""
    if settings.similarity == "lncc":

        def lncc(v: Tensor) -> Tensor:
            warped = fields.warp_image(moving, v, padding=0.0)
            return losses.local_ncc(warped, fixed, settings.window).mean()

        return lncc
    if settings.similarity == "lncc2":

        def lncc2(v: Tensor) -> Tensor:
            warped = fields.warp_image(moving, v, padding=0.0)
            return losses.squared_local_ncc(warped, fixed, settings.window).mean()

        return lncc2
    if settings.similarity == "mind":
        mind_m, mind_f = losses.mind_ssc(moving), losses.mind_ssc(fixed)

        def mind(v: Tensor) -> Tensor:
            warped = fields.warp_image(mind_m, v, padding="border")
            return -MIND_WEIGHT * ((warped - mind_f) ** 2).mean()

        return mind
    raise ValueError(f"unknown similarity {settings.similarity!r}")
