"""Training of the multi-level network: its configuration and the epoch loop around the
training branch of Algorithm 1 (:mod:`wsireg.model.trainer`).

Loop (paper Sec. 2, "The framework was trained ...")
    Every step registers a batch of ``batch`` pairs (:mod:`wsireg.model.training_data`) with
    :func:`wsireg.model.trainer.train_pyramid` and one :class:`~wsireg.model.trainer.GroupTrainer`
    per level: coarse to fine, ``M`` iterations per level, and for each group of ``G`` patches
    forward -> warp -> ``-NCC + alpha CURV`` -> backward -> Adam step (one group's graph alive at
    a time). Each level has its own Adam optimiser and its own exponential learning-rate
    schedule (times ``lr_decay`` after every epoch); a fixed number of epochs, no early
    stopping. A checkpoint is written after every epoch (``checkpoint.pt``, plus the current
    ``model.pt``), ``resume`` continues from it, and ``log.csv`` gets one row per epoch.

Where the defaults differ from the paper (a CPU budget; the reasons and the measurements behind
them: ``wsireg/weights/README.md``, "Training choices")
    * Training patches are ``P = S = 64`` on crops of 64 px, one patch per pair, ``batch = 16``
      independent pairs per step (one group, ``G = 16``); inference uses ``P = 128``,
      ``S = 64``. The network is fully convolutional and its receptive field (127 px) covers a
      64 px patch.
    * ``train_depth = 1``: each step trains one network ``j`` (drawn uniformly) alone, on crops
      of its own level with displacements of up to ``level_max_displacement[j]`` px -- the
      coarsest the whole deformation at 1/4 resolution, finer ones the residual left by coarser
      levels. ``train_depth = None`` runs the sub-pyramid ``0..j`` as in Algorithm 1 (the
      finer networks then train on the residuals of the coarser ones).
    * ``supervision`` (a deviation from the paper, which is unsupervised): the synthetic
      displacement of every training pair is known, and an end-point-error term
      ``beta |v - r|`` is added to ``-NCC + alpha CURV`` (``beta`` decays linearly to 0 at
      ``supervision_epochs``). ``supervision = 0`` trains purely unsupervised, as in the paper.
    * ``alpha = 0.01`` (curvature in pixels of the level).
    * One torch thread (``threads = 1``): fastest for these small tensors on a shared CPU.

Configuration (:class:`TrainConfig`, ``config.json`` of the model directory)
    Nested sections: ``network`` (:class:`~wsireg.model.network.UNetConfig`), ``inference``
    (the :class:`~wsireg.model.inference.InferenceSettings` stored with the model; training
    uses its ``M`` and representation), ``step`` (what one step registers), ``loss``,
    ``optimiser``, ``crops`` and ``pairs`` (:mod:`wsireg.model.training_data`).
    :meth:`TrainConfig.from_dict` also reads the flat form of earlier versions and of the
    command line (one name per option, :data:`FLAT_OPTIONS`).
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsireg.core.losses import SIMILARITIES
from wsireg.core.stain import REPRESENTATIONS
from wsireg.errors import InputError, WsiregError
from wsireg.model.inference import InferenceSettings
from wsireg.model.network import MultiLevelModel, UNetConfig
from wsireg.model.trainer import GroupTrainer, train_pyramid
from wsireg.model.training_data import (
    HOLDOUT,
    CropSettings,
    Pair,
    PairSettings,
    SectionPair,
    TrainingData,
)
from wsireg.progress import progress

__all__ = [
    "CONFIG",
    "FLAT_OPTIONS",
    "MODEL",
    "LossSettings",
    "OptimiserSettings",
    "StepSettings",
    "TrainConfig",
    "resolve_config",
    "train",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.csv"
CONFIG = "config.json"


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """What one training step registers: Algorithm 1's ``P``, ``S``, ``G`` of the training
    passes (``M`` and the representation are the inference ones) and which networks run."""

    batch: int = 16
    """Pairs registered together (all the same sub-pyramid)."""
    patch: int = 64
    """``P`` training patch side (pixels of each level)."""
    stride: int = 64
    """``S`` training stride; ``P - S`` even."""
    group: int = 16
    """``G`` patches per optimiser step."""
    train_groups: int | None = None
    """Groups trained per level and iteration (the others are only predicted); ``None`` = all."""
    train_depth: int | None = 1
    """Networks run per training step, ending at the drawn network ``j``: ``None`` = all of
    ``0..j`` (a sub-pyramid), ``1`` = network ``j`` alone on a crop of its own level with the
    displacement of ``level_max_displacement`` (many small independent crops: see
    ``wsireg/weights/README.md``)."""
    level_max_displacement: tuple[float, ...] | None = (10.0, 5.0, 4.0)
    """Largest displacement (px of the level) each network trains on when it runs alone:
    the coarsest sees the whole deformation (``max_displacement / 2^(N-1)``), finer ones the
    residual of the coarser levels."""
    top_network_probs: tuple[float, ...] | None = None
    """Probability that a step ends at network ``j`` (sub-pyramid ``0..j`` on the crop, the
    random displacement scaled by ``2^(j - N + 1)``); ``None``: uniform over ``j``; an empty
    tuple: always the full pyramid, as in the paper. (Flat name: ``finest_level_probs``.)"""


@dataclass(frozen=True)
class LossSettings:
    """The training loss ``-SIM + alpha CURV (+ beta EPE)``."""

    alpha: float = 0.01
    """Curvature weight in ``-SIM + alpha * CURV`` (field in pixels of the level). ``CURV`` is
    the mean squared 5-point Laplacian: pixel noise of std ``s`` costs ``~20 alpha s^2``, a
    smooth field almost nothing, so 0.01 penalises 1 px noise about as much as the NCC gains
    by aligning (why not larger: ``wsireg/weights/README.md``)."""
    similarity: str = "ncc"
    """SIM: ``"ncc"`` (the paper's) or ``"lncc2"`` (mean squared local NCC, polarity-free, for
    ``stain_loss = "cross"``)."""
    supervision: float = 1.0
    """Initial weight ``beta`` of the end-point error to the known synthetic displacement,
    added to ``-SIM + alpha CURV`` (0 = the paper's purely unsupervised loss)."""
    supervision_epochs: int = 1000
    """``beta`` decays linearly to 0 at this epoch; the later epochs are unsupervised. The
    default keeps it almost constant over a run (why: ``wsireg/weights/README.md``)."""

    def __post_init__(self) -> None:
        """Reject unknown choices at once (not at the first training step)."""
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"bad similarity {self.similarity!r} (use {', '.join(SIMILARITIES)})")

    def beta(self, epoch: int) -> float:
        """The supervision weight of epoch ``epoch`` (0-based)."""
        return self.supervision * max(0.0, 1.0 - epoch / max(self.supervision_epochs, 1))


@dataclass(frozen=True)
class OptimiserSettings:
    """Adam, its schedule and the initial weights."""

    lr: float = 2e-3
    """Initial Adam learning rate of every level."""
    lr_decay: float = 0.9
    """Per-epoch multiplicative decay of each level's learning rate."""
    epochs: int = 24
    """Epochs of the run (a resumed run may raise it)."""
    steps_per_epoch: int = 300
    """Training steps per epoch; a step registers a batch of ``batch`` pairs."""
    head_init_std: float = 1e-3
    """Standard deviation of the initial weights of each network's last layer (the network's
    own near-zero start slows the first steps down: ``wsireg/weights/README.md``)."""
    init_weights: str | None = None
    """Start from the networks of this model file (fine-tuning; same levels and widths)
    instead of a random initialisation."""


#: Sections of :class:`TrainConfig` and their types.
_SECTIONS: dict[str, type] = {
    "network": UNetConfig,
    "inference": InferenceSettings,
    "step": StepSettings,
    "loss": LossSettings,
    "optimiser": OptimiserSettings,
    "crops": CropSettings,
    "pairs": PairSettings,
}
_TOP = ("levels", "seed", "threads")

FLAT_OPTIONS: dict[str, tuple[str, str]] = {
    **{f.name: (s, f.name) for s in ("step", "loss", "optimiser", "crops", "pairs")
       for f in fields(_SECTIONS[s])},
    "finest_level_probs": ("step", "top_network_probs"),
    "widths": ("network", "widths"),
    "head_width": ("network", "head_width"),
    "iterations": ("inference", "iterations"),
    "representation": ("inference", "representation"),
    "inference_patch": ("inference", "patch"),
    "inference_stride": ("inference", "stride"),
    "inference_group": ("inference", "group"),
}  # fmt: skip
"""Flat option name (``config.json`` of earlier versions, ``wsireg train`` options) ->
(section, field) of :class:`TrainConfig`; ``levels``, ``seed`` and ``threads`` are top-level."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (JSON: ``config.json`` of the model directory)."""

    levels: int = 3
    """``N`` pyramid levels (one network each)."""
    seed: int = 0
    """Seed of the initial weights, of every epoch's data and of the synthetic crop bank."""
    threads: int | None = 1
    """torch CPU threads (``None``: torch's default)."""
    network: UNetConfig = field(default_factory=UNetConfig)
    """Each level's network."""
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    """Stored with the model; training runs Algorithm 1 with its ``M`` and representation.
    Unless given, its smoothing is ``S / 4`` of its stride (the rule of the shipped weights)."""
    step: StepSettings = field(default_factory=StepSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optimiser: OptimiserSettings = field(default_factory=OptimiserSettings)
    crops: CropSettings = field(default_factory=CropSettings)
    pairs: PairSettings = field(default_factory=PairSettings)

    def __post_init__(self) -> None:
        """Reject an unknown network input at once (not at the first training step)."""
        representation = self.inference.representation
        if representation not in REPRESENTATIONS:
            raise ValueError(
                f"bad representation {representation!r} (use {', '.join(REPRESENTATIONS)})"
            )

    @property
    def passes(self) -> InferenceSettings:
        """Algorithm 1's settings of the training passes: the inference ``M`` and
        representation with the training ``P``, ``S``, ``G``, never smoothed nor
        flip-averaged, in float32."""
        return replace(
            self.inference,
            patch=self.step.patch,
            stride=self.step.stride,
            group=self.step.group,
            smoothing=0.0,
            flips=1,
            precision="float32",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, one object per section."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _TOP}
        for name in _SECTIONS:
            section = getattr(self, name)
            values = section.to_dict() if hasattr(section, "to_dict") else asdict(section)
            data[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; also reads flat options (:data:`FLAT_OPTIONS`, the form
        of earlier versions' ``config.json``), alone or on top of the sections. The stored
        smoothing follows a stride given without it (``S / 4``). Unknown keys raise
        :class:`ValueError`."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        flat: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in _TOP:
                top[key] = value
            elif key in _SECTIONS and isinstance(value, Mapping):
                sections[key].update(value)
            elif key in FLAT_OPTIONS:
                flat[key] = value
            else:
                unknown.append(key)
        for name, values in sections.items():
            known = {f.name for f in fields(_SECTIONS[name])}
            unknown += [f"{name}.{k}" for k in values if k not in known]
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        inference = sections["inference"]
        if "stride" in inference and "smoothing" not in inference:
            inference["smoothing"] = inference["stride"] / 4.0
        for key, value in flat.items():  # flat options override the sections
            section, name = FLAT_OPTIONS[key]
            sections[section][name] = value
        if "inference_stride" in flat:
            inference["smoothing"] = flat["inference_stride"] / 4.0
        built = {name: _section(_SECTIONS[name], values) for name, values in sections.items()}
        return cls(**top, **built)

    def with_options(self, options: Mapping[str, Any]) -> TrainConfig:
        """This configuration with flat ``options`` (:data:`FLAT_OPTIONS` names) replaced."""
        return TrainConfig.from_dict({**self.to_dict(), **options})


def _section(kind: type, values: dict[str, Any]) -> Any:
    """A section dataclass from JSON values (lists become tuples)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if kind is UNetConfig:
        return UNetConfig.from_dict(values)
    return kind(**values)


def resolve_config(
    config_path: str | Path | None,
    options: Mapping[str, Any],
    out_dir: str | Path,
    resume: bool = False,
) -> TrainConfig:
    """The configuration of a training run, from the layers the user gives.

    A fresh run: the JSON object of ``config_path`` (nested or flat; none: the defaults), then
    the flat ``options`` that are not ``None`` (:data:`FLAT_OPTIONS` names; ``train_groups = 0``
    means all groups). A resumed run (``resume`` and ``out_dir/config.json`` exists): the stored
    configuration, of which only ``epochs`` and ``threads`` may change. Errors are
    :class:`~wsireg.errors.InputError` naming the file they come from.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("train_groups") == 0:
        given["train_groups"] = None
    stored = Path(out_dir) / CONFIG
    source: Path = Path(out_dir)
    data: dict[str, Any] = {}
    if resume and stored.is_file():
        source = stored
        data = _read_json(stored, "not a JSON training config")
        extra = set(given) - {"epochs", "threads"}
        if extra:
            raise InputError(
                stored,
                "a resumed run keeps its stored configuration; only epochs and threads may "
                f"change, not {', '.join(sorted(extra))}",
            )
    elif config_path is not None:
        source = Path(config_path)
        data = _read_json(source, "not a JSON training config")
    try:
        return TrainConfig.from_dict(data).with_options(given)
    except (TypeError, ValueError) as exc:
        raise InputError(source, str(exc)) from exc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"{what} ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, f"{what} (not a JSON object)")
    return data


# --- the loop ------------------------------------------------------------------------------------


def _new_model(cfg: TrainConfig) -> MultiLevelModel:
    """Fresh networks; the last layer starts at ``head_init_std`` (see
    :attr:`OptimiserSettings.head_init_std`)."""
    torch.manual_seed(cfg.seed)
    model = MultiLevelModel.uniform(cfg.levels, cfg.network)
    for net in model.levels:
        nn.init.normal_(net.head[-1].weight, std=cfg.optimiser.head_init_std)
    return model


def _metadata(cfg: TrainConfig, epochs_done: int, history: list[dict[str, Any]]) -> dict:
    return {
        "inference": cfg.inference.to_dict(),
        "training": {
            "config": cfg.to_dict(),
            "epochs": epochs_done,
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
            "heldout": HOLDOUT,
        },
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (float(v) if k != "epoch" else int(v)) for k, v in r.items()} for r in rows]


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


#: Draws a training pair from a random generator and a displacement scale.
PairSource = Callable[[np.random.Generator, float], Pair]


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    slides_dir: str | Path | None = None,
    data: PairSource | None = None,
    sections: tuple[SectionPair, ...] = (),
) -> MultiLevelModel:
    """Train a :class:`~wsireg.model.network.MultiLevelModel` and save it to ``out_dir/model.pt``.

    ``out_dir`` receives ``config.json``, ``log.csv`` (per epoch: wall seconds, mean loss of
    every level and overall, learning rates), ``checkpoint.pt`` (after every epoch) and
    ``model.pt`` (+ checksum sidecar). With ``resume`` the run continues after the last
    checkpointed epoch (``epochs`` may be larger than before); without it an existing
    checkpoint is an error. ``data`` replaces :class:`~wsireg.model.training_data.TrainingData`
    (tests): it maps an RNG and a displacement scale to a :class:`Pair`. ``sections``: the
    aligned section pairs of ``cfg.crops.sections`` (:func:`wsireg.run.sections.
    aligned_sections`), for the ``"sections"`` source. Epoch ``e`` draws its
    pairs from ``numpy.random.default_rng([seed, e])``, so a resumed run sees the same data as
    an uninterrupted one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise WsiregError(f"{ckpt_path}: a training run exists here (use --resume)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = _new_model(cfg)
    opt = cfg.optimiser
    optimizers = [torch.optim.Adam(net.parameters(), lr=opt.lr) for net in model.levels]
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, opt.lr_decay) for o in optimizers]
    start = 0
    history = _read_log(out / LOG)
    if resume and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, model, optimizers, schedulers)
        history = history[:start]
    elif opt.init_weights:  # a fresh run fine-tuning given networks (copied in place)
        _load_initial(model, Path(opt.init_weights))
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    sample = data or TrainingData(cfg.crops, cfg.pairs, cfg.seed, slides_dir, sections).pair
    for epoch in range(start, opt.epochs):
        history.append(_run_epoch(model, optimizers, cfg, epoch, sample))
        with warnings.catch_warnings():  # a level may have had no step in a short epoch
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in schedulers:
                scheduler.step()
        _write_log(out / LOG, history)
        model.metadata = _metadata(cfg, epoch + 1, history)
        model.save(out / MODEL)
        _save_checkpoint(ckpt_path, model, optimizers, schedulers, epoch + 1)
    model.metadata = _metadata(cfg, max(opt.epochs, start), history)
    model.save(out / MODEL)
    return model.eval()


def _load_initial(model: MultiLevelModel, path: Path) -> None:
    """Copy the networks of the model file ``path`` into ``model`` (checksum verified)."""
    init = MultiLevelModel.load(path)
    try:
        model.load_state_dict(init.state_dict())
    except RuntimeError as exc:
        raise InputError(path, "its networks do not match the training config") from exc


def _run_epoch(
    model: MultiLevelModel,
    optimizers: list[torch.optim.Optimizer],
    cfg: TrainConfig,
    epoch: int,
    sample: PairSource,
) -> dict[str, Any]:
    """One epoch; returns its log row. Each step runs the sub-pyramid ending at network ``j``,
    drawn from ``step.top_network_probs`` (see :class:`StepSettings`)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, epoch])
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    lrs = [o.param_groups[0]["lr"] for o in optimizers]
    beta = cfg.loss.beta(epoch)
    trainers = [
        GroupTrainer(
            o, cfg.loss.alpha, cfg.step.train_groups, gen, supervision=beta,
            similarity=cfg.loss.similarity,
        )
        for o in optimizers
    ]  # fmt: skip
    passes = cfg.passes
    model.train()
    steps = cfg.optimiser.steps_per_epoch
    with progress(steps, f"epoch {epoch + 1}/{cfg.optimiser.epochs}", unit="step") as bar:
        for _ in range(steps):
            top = _draw_top_network(cfg, rng)
            depth = top + 1 if cfg.step.train_depth is None else min(cfg.step.train_depth, top + 1)
            scale = _displacement_scale(cfg, top, depth)
            pairs = [sample(rng, scale) for _ in range(cfg.step.batch)]
            batch = Pair(*(torch.cat(images) for images in zip(*pairs, strict=True)))
            train_pyramid(model, batch, passes, trainers[top + 1 - depth : top + 1], top)
            bar.update(1)
            bar.set_postfix(loss=f"{_overall(trainers):.4f}")
    row: dict[str, Any] = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1)}
    row["supervision"] = round(beta, 5)
    for k, (t, lr) in enumerate(zip(trainers, lrs, strict=True)):
        row[f"loss_level{k}"] = round(_mean(t.losses), 5)
        row[f"lr_level{k}"] = lr
    row["loss"] = round(_overall(trainers), 5)
    return row


def _displacement_scale(cfg: TrainConfig, top: int, depth: int) -> float:
    """Factor on ``max_displacement`` (and the translation) for a step ending at network
    ``top``: ``2^(top - N + 1)`` when the coarser networks run too (the sub-pyramid sees the
    whole deformation at its resolution), else ``level_max_displacement[top]`` relative to
    ``max_displacement`` (one network alone sees the residual its level is left with)."""
    level_max = cfg.step.level_max_displacement
    if depth == top + 1 or not level_max:
        return 2.0 ** (top - cfg.levels + 1)
    return float(level_max[top]) / cfg.pairs.max_displacement


def _draw_top_network(cfg: TrainConfig, rng: np.random.Generator) -> int:
    """Index of the network the next training step ends at (its finest)."""
    probs = cfg.step.top_network_probs
    if probs is not None and len(probs) == 0:
        return cfg.levels - 1
    p = np.full(cfg.levels, 1.0 / cfg.levels) if probs is None else np.asarray(probs, float)
    if p.shape != (cfg.levels,) or p.min() < 0 or p.sum() <= 0:
        raise ValueError(f"top_network_probs needs {cfg.levels} non-negative weights")
    return int(rng.choice(cfg.levels, p=p / p.sum()))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _overall(trainers: list[GroupTrainer]) -> float:
    """Mean over levels of each level's mean loss (levels without steps yet are skipped)."""
    means = [_mean(t.losses) for t in trainers if t.losses]
    return float(np.mean(means)) if means else float("nan")


def _save_checkpoint(
    path: Path,
    model: MultiLevelModel,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    epoch: int,
) -> None:
    payload = {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_checkpoint(
    path: Path,
    model: MultiLevelModel,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
) -> int:
    """Restore ``model``, ``optimizers`` and ``schedulers`` in place; returns the epochs done."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    for obj, state in zip(
        optimizers + schedulers, ckpt["optimizers"] + ckpt["schedulers"], strict=True
    ):
        obj.load_state_dict(state)
    return int(ckpt["epoch"])
