"""What a user asks of a registration, validated once, and what it resolves to for one pair.

:class:`RegisterOptions` is the request (``None``: the default), the same for ``register``,
``batch`` and ``stack``, from Python or from the CLI. :func:`check_options` validates it against
the target slide at the entrance, before anything is written: a field ``level`` must be one of
the slide's levels (:func:`wsireg.io.slide.check_level`, the rule of every slide level argument),
a ``warp_level`` an output grid (:func:`wsireg.engine.warp.check_output_level`).
:func:`resolve_settings` turns it, with the target's size and the model, into
:class:`RegistrationSettings`: the scheduler's settings (Algorithm 1's ``N``, ``M``, ``P``,
``S``, ``G`` and the refinement), the device and the weights' identity. Those feed both the
transform's ``parameters`` (``transform.json``) and the ``parameters`` of ``report.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsireg.engine.scheduler import SchedulerSettings
from wsireg.engine.transform import SlideRef
from wsireg.engine.warp import check_output_level
from wsireg.io.slide import Slide, check_level
from wsireg.model.inference import check_precision, inference_settings, network_dtype
from wsireg.model.network import MultiLevelModel
from wsireg.model.refine import RefineSettings

#: Default longest side of the finest grid of the field (chosen from the slide size).
DEFAULT_FIELD_SIDE = 2048
#: Longest side of the coarsest pyramid level.
COARSEST_SIDE = 256
#: Default instance-optimisation steps per block at the coarsest level without networks.
REFINE_STEPS = 40


_INTEGER_OPTIONS = (
    "level",
    "levels",
    "iterations",
    "patch",
    "stride",
    "group",
    "refine",
    "flips",
    "warp_level",
    "threads",
)
_FLAG_OPTIONS = ("write_warped",)


@dataclass(frozen=True)
class RegisterOptions:
    """What a user asks of a registration (``None``: the default, resolved per pair).

    ``level``: target level of the finest field (0 = full resolution; default: from the slide
    size, :func:`default_finest_downsample`). ``levels``, ``iterations``, ``patch``,
    ``stride``, ``group``: Algorithm 1's N, M, P, S, G (defaults: the model's; N see
    :func:`default_levels`). ``refine``: instance-optimisation steps per block at the coarsest
    level, halved per finer level (default: 0 at the networks' levels; levels without a network
    get at least :data:`REFINE_STEPS`). ``weights``: ``"default"`` (the shipped networks, the
    default), ``None`` or ``"none"`` (pure instance optimisation) or a path; the accuracy of
    each on real and synthetic pairs is measured by ``benchmarks/anhir_accuracy.py`` and
    ``benchmarks/network_accuracy.py`` (README).
    ``flips``: average the networks' predictions over 1, 2 or 4 flips of each patch
    (default: the model's setting). ``precision``: the networks' arithmetic, ``"auto"``
    (bfloat16 where the device computes it natively, else float32; the default),
    ``"float32"`` or ``"bfloat16"`` (:func:`wsireg.model.inference.network_dtype`).
    ``device``: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    ``warp_level``: target level of ``warped.ome.zarr``; ``write_warped=False`` skips it.
    ``threads``: blocks of the field and chunks of the warp computed at once in this process
    (default: the CPU count; ``register(..., execution=...)`` runs them elsewhere).
    ``source_channel`` / ``target_channel``: the channel each slide is registered on, a name
    or an index, or ``"haematoxylin"`` of a brightfield slide (default:
    :func:`wsireg.run.register.registration_channels`).
    """

    level: int | None = None
    levels: int | None = None
    iterations: int | None = None
    patch: int | None = None
    stride: int | None = None
    group: int | None = None
    refine: int | None = None
    weights: str | Path | None = "default"
    flips: int | None = None
    precision: str | None = None
    device: str = "auto"
    warp_level: int = 0
    write_warped: bool = True
    threads: int | None = None
    source_channel: str | int | None = None
    target_channel: str | int | None = None

    def __post_init__(self) -> None:
        """Reject a value of the wrong type at once (``TypeError`` naming the option): the
        string ``"False"`` is not a flag, ``2.5`` not a level."""
        for name in _INTEGER_OPTIONS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"option {name} must be an integer, not {value!r}")
        for name in _FLAG_OPTIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"option {name} must be True or False, not {value!r}")
        if self.precision is not None:
            check_precision(self.precision)

    @property
    def uses_networks(self) -> bool:
        return self.weights is not None and str(self.weights) != "none"

    def to_json(self) -> dict[str, Any]:
        """The options as plain JSON values (paths as strings)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def check_options(options: RegisterOptions, target: Slide) -> None:
    """Every level argument of ``options`` checked against the ``target`` slide (one-line
    :class:`~wsireg.errors.WsiregError` naming the slide)."""
    if options.level is not None:
        check_level(target.path, options.level, target.level_count)
    if options.write_warped:
        check_output_level(SlideRef.from_slide(target), options.warp_level)


@dataclass(frozen=True)
class RegistrationSettings:
    """The options resolved for one pair: what the scheduler runs, where, with which weights
    (``{"path", "sha256"}`` or ``None``), and the level of the warped output (``None``: no
    warped output)."""

    scheduler: SchedulerSettings
    device: str
    weights: dict[str, str] | None
    warp_level: int | None

    def transform_parameters(self) -> dict[str, Any]:
        """How the transform was made (its ``parameters`` in ``transform.json``)."""
        s = self.scheduler
        return {
            **self._algorithm(),
            "refine": asdict(s.refine),
            "finest_downsample": s.finest_downsample,
            "weights": self.weights,
        }

    def report_parameters(self) -> dict[str, Any]:
        """The ``parameters`` of ``report.json``."""
        s = self.scheduler
        return {
            **self._algorithm(),
            "block": s.block,
            "smoothing": s.inference.smoothing,
            "flips": s.inference.flips,
            "precision": s.inference.precision,
            "network_dtype": self.network_dtype,
            "refine": asdict(s.refine),
            "finest_downsample": s.finest_downsample,
            "warp_level": self.warp_level,
        }

    @property
    def network_dtype(self) -> str:
        """What the networks computed in on this pair's device (``"float32"``,
        ``"bfloat16"``)."""
        dtype = network_dtype(self.scheduler.inference.precision, torch.device(self.device))
        return str(dtype).removeprefix("torch.")

    def _algorithm(self) -> dict[str, int]:
        """Algorithm 1's N, M, P, S, G."""
        s = self.scheduler
        return {
            "levels": s.levels,
            "iterations": s.inference.iterations,
            "patch": s.inference.patch,
            "stride": s.inference.stride,
            "group": s.inference.group,
        }


def resolve_settings(
    options: RegisterOptions,
    target: SlideRef,
    model: MultiLevelModel | None,
    weights: dict[str, str] | None,
    device: str,
) -> RegistrationSettings:
    """``options`` resolved for a pair whose target is ``target``: Algorithm 1's settings are
    the model's stored ones under the given ones (0 counts as not given), the depth and the
    finest downsample from the slide size unless given."""
    inference = inference_settings(
        model,
        iterations=options.iterations or None,
        patch=options.patch or None,
        stride=options.stride or None,
        group=options.group or None,
        flips=options.flips,
        precision=options.precision,
    )
    steps = options.refine
    if steps is None:
        steps = 0 if model is not None else REFINE_STEPS
    alone = max(steps, REFINE_STEPS) if model is not None else None
    finest = (
        default_finest_downsample(target)
        if options.level is None
        else target.level_downsample(options.level)
    )
    if options.levels is None:
        networks = model.num_levels if model is not None else 0
        levels = default_levels(target, finest, networks)
    else:
        stored = model.metadata.get("inference", {}).get("levels") if model else None
        levels = options.levels or stored or SchedulerSettings.levels
    scheduler = SchedulerSettings(
        levels=levels,
        finest_downsample=finest,
        inference=inference,
        refine=RefineSettings(steps=steps, alone_steps=alone),
    )
    warp_level = options.warp_level if options.write_warped else None
    return RegistrationSettings(scheduler, device, weights, warp_level)


def default_finest_downsample(target: SlideRef, side: int = DEFAULT_FIELD_SIDE) -> float:
    """The smallest power of two keeping the finest field grid within ``side`` pixels."""
    longest = max(target.shape)
    return float(2 ** max(0, math.ceil(math.log2(longest / side))))


def default_levels(target: SlideRef, finest: float, networks: int = 0) -> int:
    """Levels until the coarsest grid is about :data:`COARSEST_SIDE` pixels (1 to 8), and at
    least the model's ``networks`` (Algorithm 1's ``N`` is the model's). Levels coarser than
    the networks are registered by instance optimisation alone
    (:func:`wsireg.engine.scheduler.estimate_field`, :data:`REFINE_STEPS` at the coarsest). A
    coarse start matters at level 0 of large slides, and is cheap (refinement steps halve per
    finer level): ``benchmarks/scale_register.py`` measures the error and time per depth."""
    longest = max(target.shape) / finest
    levels = int(np.clip(math.floor(math.log2(max(longest, 1) / COARSEST_SIDE)) + 1, 1, 8))
    return max(levels, networks)
