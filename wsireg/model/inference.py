"""Algorithm 1's inference branch: the networks predict, nothing learns.

:func:`register_level` runs one pyramid level and :func:`register_pyramid` a whole (small)
image pair held in memory, both through the loop of :mod:`wsireg.model.algorithm` with the
:class:`TissuePatches` strategy: the network sees only patch pairs where either side has
tissue, ``G`` at a time, optionally averaged over the four flips of each pair, and every
iteration's folded field is smoothed before it is composed. The settings of Algorithm 1
(:class:`InferenceSettings`) are stored with a model (``metadata["inference"]``,
:func:`inference_settings`). The out-of-core scheduler (:mod:`wsireg.engine.scheduler`) calls
:func:`register_level` block by block; it is a pure function of tensors and the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wsireg.core import tiling
from wsireg.core.stain import has_tissue
from wsireg.model.algorithm import (
    level_field,
    network_pyramid,
    pyramid_field,
    pyramid_networks,
    warp_optional,
)
from wsireg.model.network import MultiLevelModel, UNet

__all__ = [
    "DEFAULTS",
    "InferenceSettings",
    "PatchCounts",
    "TissuePatches",
    "FLIP_SETS",
    "PRECISIONS",
    "check_precision",
    "flip_averaged",
    "inference_settings",
    "network_dtype",
    "register_level",
    "register_pyramid",
]


@dataclass
class PatchCounts:
    """Patches seen by the network and patches skipped as background (both sides blank)."""

    run: int = 0
    skipped: int = 0


Flip = tuple[tuple[int, ...], tuple[float, float]]
_NONE: Flip = ((), (1.0, 1.0))
_ROTATION: Flip = ((-2, -1), (-1.0, -1.0))
_MIRRORS: tuple[Flip, Flip] = (((-1,), (-1.0, 1.0)), ((-2,), (1.0, -1.0)))
FLIP_SETS: dict[int, tuple[Flip, ...]] = {
    1: (_NONE,),
    2: (_NONE, _ROTATION),
    4: (_NONE, _ROTATION, *_MIRRORS),
}
"""The flips of :func:`flip_averaged` by count: spatial dims flipped, and the sign of the
field's (x, y) components in the flipped frame."""


PRECISIONS = ("auto", "float32", "bfloat16")
"""What the networks compute in at inference (:func:`network_dtype`)."""


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX instructions (elsewhere bfloat16 is emulated in software)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def network_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the networks' arithmetic for ``precision`` (:data:`PRECISIONS`) on
    ``device``: ``"auto"`` is bfloat16 where the device computes it natively
    (:func:`native_bfloat16`), else float32. Weights and fields stay float32 (autocast);
    bfloat16 keeps about 3 significant digits of each prediction (its effect on accuracy and
    speed: ``wsireg/weights/README.md``)."""
    if check_precision(precision) == "bfloat16" or (
        precision == "auto" and native_bfloat16(device)
    ):
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class InferenceSettings:
    """The parameters of Algorithm 1 (Sec. 2 of the paper) besides the networks. The values
    of the shipped weights and how they were chosen: ``wsireg/weights/README.md``."""

    iterations: int = 2
    """``M``: network passes per pyramid level (weights shared between them)."""
    patch: int = 128
    """``P``: patch side, pixels of the level (a multiple of ``2^D`` of the network)."""
    stride: int = 64
    """``S``: stride and side of the kept patch centre; ``P - S`` even."""
    group: int = 16
    """``G``: patches per network call (memory vs. speed only; results do not depend on it)."""
    representation: str = "od"
    """Network input, see :func:`wsireg.core.stain.network_input`."""
    smoothing: float = 16.0
    """Standard deviation (pixels of the level) of the Gaussian applied to each iteration's
    folded field before it is composed (:func:`wsireg.core.field.smooth_field`; inference
    only): it removes the seams between neighbouring patch centres and the patch-level noise.
    ``S / 4``, chosen on the held-out pairs of ``benchmarks/network_accuracy.py``. Its kernel
    radius (``3 sigma``) must stay within the scheduler's halo."""
    flips: int = 4
    """Flips of each patch pair its prediction is averaged over (:func:`flip_averaged`): 1
    (none), 2 (the pair and its 180-degree rotation: cancels a bias of either component) or 4
    (the rotation and both mirrors). Test-time augmentation that cancels orientation biases
    and averages out noise, at ``flips`` times the network time (its effect:
    ``benchmarks/anhir_accuracy.py --set flips=N``)."""

    precision: str = "auto"
    """The networks' arithmetic (:data:`PRECISIONS`, :func:`network_dtype`): ``"auto"``
    (bfloat16 where the device computes it natively, else float32), ``"float32"`` (the same
    numbers on every machine) or ``"bfloat16"``."""

    def __post_init__(self) -> None:
        if self.flips not in FLIP_SETS:
            raise ValueError(f"flips must be 1, 2 or 4, not {self.flips!r}")
        check_precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in a model's metadata under ``"inference"``)."""
        return {
            "iterations": self.iterations,
            "patch": self.patch,
            "stride": self.stride,
            "group": self.group,
            "representation": self.representation,
            "smoothing": self.smoothing,
            "flips": self.flips,
            "precision": self.precision,
        }


DEFAULTS = InferenceSettings()
"""Fallback settings for models whose metadata does not say."""


def inference_settings(model: MultiLevelModel | None, **overrides: Any) -> InferenceSettings:
    """Settings stored in ``model.metadata["inference"]`` (else, and without a model,
    :data:`DEFAULTS`), with ``overrides`` that are not ``None`` applied on top."""
    stored = dict(model.metadata.get("inference", {})) if model is not None else {}
    if "flip_average" in stored:  # the boolean of earlier models: all four flips or none
        stored.setdefault("flips", 4 if stored.pop("flip_average") else 1)
    base = {k: stored.get(k, v) for k, v in DEFAULTS.to_dict().items()}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceSettings(**base)


# --- the inference strategy ----------------------------------------------------------------------


def flip_averaged(net: UNet, moving: Tensor, fixed: Tensor, flips: int = 4) -> Tensor:
    """``net(moving, fixed)`` ``(N, 2, P, P)`` averaged over ``flips`` flips of the pair
    (:data:`FLIP_SETS`): each flipped prediction is flipped back and the flipped axes'
    components negated (channel 0 = x flips with the last axis, channel 1 = y with the one
    before)."""
    total = None
    for dims, signs in FLIP_SETS[flips]:
        m, f = (moving.flip(dims), fixed.flip(dims)) if dims else (moving, fixed)
        u = net(m, f)
        if dims:
            sign = torch.tensor(signs, dtype=u.dtype, device=u.device).view(1, 2, 1, 1)
            u = u.flip(dims) * sign
        total = u if total is None else total + u
    assert total is not None
    return total / flips


@dataclass
class TissuePatches:
    """Inference's :class:`~wsireg.model.algorithm.PredictPatches`: the network runs,
    ``group`` at a time and without autograd, only on patch pairs where either side has tissue
    (:func:`wsireg.core.stain.has_tissue`); pairs blank on both sides get a zero displacement
    (what the network would predict there is noise, and skipping them saves most of the work
    on slides that are largely glass). ``flips``: :func:`flip_averaged`. ``counts``
    tallies the patches run and skipped."""

    net: UNet
    group: int
    flips: int = 1
    counts: PatchCounts | None = None
    dtype: torch.dtype = torch.float32
    """The networks' arithmetic (autocast; the predictions are returned as float32)."""

    def __call__(self, moving: Tensor, fixed: Tensor, v: Tensor) -> Tensor:
        keep = has_tissue(moving) | has_tissue(fixed)
        index = torch.nonzero(keep).flatten()
        if self.counts is not None:
            self.counts.run += int(index.numel())
            self.counts.skipped += int(keep.numel() - index.numel())
        preds = moving.new_zeros((moving.shape[0], 2, *moving.shape[-2:]))
        for sl in tiling.groups(int(index.numel()), self.group):
            chosen = index[sl]
            with torch.no_grad():
                preds[chosen] = self._predict(moving[chosen], fixed[chosen]).to(preds.dtype)
        return preds

    def _predict(self, moving: Tensor, fixed: Tensor) -> Tensor:
        low = self.dtype != torch.float32
        with torch.autocast(moving.device.type, dtype=self.dtype, enabled=low):
            if self.flips > 1:
                return flip_averaged(self.net, moving, fixed, self.flips).float()
            return self.net(moving, fixed).float()


# --- entry points --------------------------------------------------------------------------------


def register_level(
    net: UNet,
    moving: Tensor,
    fixed: Tensor,
    settings: InferenceSettings,
    counts: PatchCounts | None = None,
) -> Tensor:
    """The field ``v`` ``(N, 2, H, W)`` of one pyramid level, in pixels of the level.

    Args:
        net: the level's network (``model[k]``); inputs are sent to its device.
        moving: ``(N, C, H, W)`` moving image in the network representation, already warped by
            the field of the coarser levels.
        fixed: ``(N, C, H, W)`` fixed image, same size.
        settings: ``M``, ``P``, ``S``, ``G``, the smoothing, flip averaging and precision (its
            ``representation`` is the caller's business: the images are already converted).
        counts: optional tally of the patches run and skipped as background (a patch blank on
            both sides keeps a zero displacement).

    Returns:
        ``v`` with ``fixed(x) ~ moving(x + v(x))``: ``Algorithm 1``'s level field, on
        ``moving``'s device.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ")
    device = next(net.parameters()).device
    dtype = network_dtype(settings.precision, device)
    predict = TissuePatches(net, settings.group, settings.flips, counts, dtype)
    v = level_field(
        moving.to(device),
        fixed.to(device),
        predict,
        iterations=settings.iterations,
        patch=settings.patch,
        stride=settings.stride,
        smoothing=settings.smoothing,
    )
    return v.to(moving.device)


def register_pyramid(
    model: MultiLevelModel,
    moving: Tensor,
    fixed: Tensor,
    settings: InferenceSettings | None = None,
    *,
    levels: int | None = None,
    top_network: int | None = None,
) -> Tensor:
    """Algorithm 1 on a whole (small) image pair held in memory.

    Args:
        model: one network per pyramid level, coarsest first.
        moving, fixed: RGB ``(N, 3, H, W)``, uint8 or float in ``[0, 1]``, same size, the moving
            image already affinely aligned to the fixed one.
        settings: Algorithm 1's settings, default the model's stored ones
            (:func:`inference_settings`).
        levels: ``N``, number of pyramid levels (default: all networks up to ``top_network``).
        top_network: index of the network run on the given (finest) images, default the
            model's finest (``model.num_levels - 1``); networks ``top_network - N + 1 ..
            top_network`` are used, e.g. ``levels=1`` alone runs only the finest network.

    Returns:
        ``u`` ``(N, 2, H, W)`` in pixels of the input grid, ``fixed(x) ~ moving(x + u(x))``:
        warp the original moving image with it once
        (``wsireg.core.field.warp_image(moving, u)``).
    """
    cfg = inference_settings(model) if settings is None else settings
    networks = pyramid_networks(model, top_network, levels)
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ")
    h, w = moving.shape[-2:]
    device = next(model.parameters()).device
    pyr_m, pyr_f = (
        network_pyramid(rgb, cfg.representation, len(networks), device) for rgb in (moving, fixed)
    )

    def level(k: int, u: Tensor | None) -> Tensor:
        return register_level(model[networks[k]], warp_optional(pyr_m[k], u), pyr_f[k], cfg)

    with torch.no_grad():
        u = pyramid_field([tuple(p.shape[-2:]) for p in pyr_m], level)
    return u[..., :h, :w].to(moving.device)
