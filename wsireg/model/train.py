"""Training of the multi-level network: the training branch of Algorithm 1 (see below for the
CPU-budget choices, including an optional supervised warm-up on synthetic displacements).

Conventions (axes, ``(x, y)`` order, pixel centres, backward fields) are those of
:mod:`wsireg.core.coords`; images handled here are ``[y, x, c]`` uint8 RGB (white background) until
they become ``(1, 3, H, W)`` float tensors in ``[0, 1]`` for
:func:`wsireg.model.inference.register_pyramid`.

Loop (paper Sec. 2, "The framework was trained ...")
    Every step registers a batch of ``batch`` pairs with
    :func:`wsireg.model.inference.register_pyramid` and one :class:`~wsireg.model.inference.GroupTrainer`
    per level: coarse to fine, ``M`` iterations per level, and for each group of ``G`` patches
    forward -> warp -> ``-NCC + alpha CURV`` -> backward -> Adam step (one group's graph alive at
    a time). Each level has its own Adam optimiser and its own exponential learning-rate
    schedule (times ``lr_decay`` after every epoch); a fixed number of epochs, no early
    stopping. A checkpoint is written after every epoch (``checkpoint.pt``, plus the current
    ``model.pt``), ``--resume`` continues from it, and ``log.csv`` gets one row per epoch.

CPU budget (why the defaults differ from the paper's; all measured on the 2-core dev machine)
    * Training patches are ``P = 64`` with ``S = 64`` on crops of 64 px, one patch per pair,
      ``batch = 16`` independent pairs per step (one group, ``G = 16``); inference uses
      ``P = 128``, ``S = 64``. The network is fully convolutional and its receptive field
      (127 px) covers a 64 px patch; a step on 16 patches of 64 px costs ~1/8 of one group of
      16 at ``P = 256``. Steps whose patches came from a
      few large pairs (many overlapping patches, one displacement per group) left the network
      output independent of its input after hundreds of steps; independent crops per patch
      learned (measured on translated test pairs).
    * ``train_depth = 1``: each step trains one network ``j`` (drawn uniformly) alone, on crops
      of its own level with displacements of up to ``level_max_displacement[j]`` px -- the
      coarsest the whole deformation at 1/4 resolution, finer ones the residual left by coarser
      levels. ``train_depth = None`` runs the sub-pyramid ``0..j`` as in Algorithm 1 (the
      finer networks then train on the residuals of the coarser ones).
    * ``supervision`` (a deviation from the paper, which is unsupervised): the synthetic
      displacement of every training pair is known, and an end-point-error term
      ``beta |v - r|`` is added to ``-NCC + alpha CURV`` (``beta`` decays linearly to 0 at
      ``supervision_epochs``). On this CPU budget (~25 minutes) the purely unsupervised loss did
      not get the networks going, and letting ``beta`` reach 0 half-way made the held-out error
      drift up again; the shipped weights keep ``beta ~ 1`` throughout. ``--supervision 0``
      trains purely unsupervised, as in the paper (e.g. on a GPU with many more steps).
    * ``alpha = 0.01``: with ``alpha >= 1`` (mean squared 5-point Laplacian in px) the
      networks' outputs stayed input-independent in measurements, because any input-dependent
      output is noisy at first.
    * One torch thread (``threads = 1``) is several times faster than two for these small
      tensors when the CPU is shared.

Data (:class:`TrainingData`), never the ANHIR evaluation pairs
    Crops of real H&E tissue (``cmu-1-small-region.svs``, ``tcga-cr-7395-01a-01-ts1.svs``, read
    with :func:`wsireg.open_slide` and resampled to a random scale between ``scale_range``),
    real IHC (``skimage.data.immunohistochemistry()``), and procedural tissue of
    :mod:`wsireg.synthetic.texture` (training seeds only, random ``texture_downsample``). The held-out
    regions of :data:`HOLDOUT` are cut away before any crop is taken. A crop of side
    ``crop + 2 * margin`` becomes a pair (:func:`make_pair`):

    * geometry: random rot90/flip of the crop, then one side is resampled through
      ``p(x) = c + R Z Sh (x - c) + t + d(x)`` (random rotation, zoom, shear, translation and a
      smooth random displacement ``d`` of up to ``max_displacement`` pixels with control points
      every ``deformation_spacing`` pixels, checked not to fold);
    * stain: the two sides get two different stainings of the same tissue -- for real tissue by
      remixing the dye concentrations in optical-density space (:func:`restain`: H&E jitter,
      IHC-like haematoxylin + DAB on a random subset of the eosin structures, a single dye, or
      swapped dyes), for synthetic tissue by rendering the structure maps in H&E and IHC;
    * optionally (``section_change``, ``content_change``) a "neighbouring section": the fixed
      side also goes through a fine-scale displacement, or shows other tissue in a blob, and
      the known displacement leaves both out;
    * missing tissue and tears (white ellipses or strips) on one side; noise and blur;
    * with ``stain_loss = "same"`` (default) the similarity compares both sides **in the crop's
      original stain** while the networks see the two different stains, so the networks learn
      stain invariance with a monomodal NCC; ``"cross"`` compares the network inputs themselves
      (the paper's setting, where both images of a pair are real).
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsireg.core import field as wfield
from wsireg.core.losses import SIMILARITIES
from wsireg.core.stain import REPRESENTATIONS, dye_basis, stained
from wsireg.errors import InputError, WsiregError
from wsireg.model.inference import DEFAULTS, GroupTrainer, InferenceSettings, register_pyramid
from wsireg.model.network import MultiLevelModel, UNetConfig
from wsireg.progress import progress

__all__ = [
    "HOLDOUT",
    "KNOWN_STAIN_CHANGES",
    "STAIN_CHANGES",
    "Crop",
    "Pair",
    "TrainConfig",
    "TrainingData",
    "default_slides_dir",
    "heldout_region",
    "load_real_image",
    "make_pair",
    "random_displacement",
    "restain",
    "crop_region",
    "background_colour",
    "tissue_fraction",
    "train",
    "training_region",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.csv"
CONFIG = "config.json"

STAIN_CHANGES = ("he", "ihc", "single", "swap")
"""The stain changes :func:`restain` draws from by default (those of the shipped weights'
first two training stages)."""
KNOWN_STAIN_CHANGES = (*STAIN_CHANGES, "fade")
"""Every stain change :func:`restain` knows (``"fade"`` is opt-in)."""


# --- configuration ---------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON: ``config.json`` of the model directory)."""

    levels: int = 3
    """``N`` pyramid levels (one network each)."""
    iterations: int = 2
    """``M`` iterations per level, in training and (stored as default) in inference."""
    patch: int = 64
    """``P`` training patch side (pixels of each level)."""
    stride: int = 64
    """``S`` training stride; ``P - S`` even."""
    group: int = 16
    """``G`` patches per optimiser step."""
    inference_patch: int = DEFAULTS.patch
    """``P`` stored as the inference default (the network is fully convolutional)."""
    inference_stride: int = DEFAULTS.stride
    """``S`` stored as the inference default."""
    inference_group: int = DEFAULTS.group
    """``G`` stored as the inference default (memory only)."""
    train_groups: int | None = None
    """Groups trained per level and iteration (the others are only predicted); ``None`` = all."""
    train_depth: int | None = 1
    """Networks run per training step, ending at the drawn network ``j``: ``None`` = all of
    ``0..j`` (a sub-pyramid), ``1`` = network ``j`` alone on a crop of its own level with the
    displacement of ``level_max_displacement`` (measured: steps on many small independent
    crops learn far faster on a CPU budget than many patches of few large pairs)."""
    level_max_displacement: tuple[float, ...] | None = (10.0, 5.0, 4.0)
    """Largest displacement (px of the level) each network trains on when it runs alone:
    the coarsest sees the whole deformation (``max_displacement / 2^(N-1)``), finer ones the
    residual of the coarser levels."""
    finest_level_probs: tuple[float, ...] | None = None
    """Probability that a pair stops at network ``j`` (sub-pyramid ``0..j`` on the crop, the
    random displacement scaled by ``2^(j - N + 1)``); ``None``: uniform over ``j``; an empty
    tuple: always the full pyramid, as in the paper."""
    supervision: float = 1.0
    """Initial weight ``beta`` of the end-point error to the known synthetic displacement,
    added to ``-NCC + alpha CURV`` (0 = the paper's purely unsupervised loss)."""
    supervision_epochs: int = 1000
    """``beta`` decays linearly to 0 at this epoch; the later epochs are unsupervised. The
    default keeps it almost constant (0.977 at epoch 24): decaying it to 0 by epoch 10 (then 6
    epochs of the paper's loss alone) cut the held-out end-point-error reduction from 48 % to
    40 %, keeping it gave 80 % (``benchmarks/network_accuracy.py``, 10 pairs)."""
    alpha: float = 0.01
    """Curvature weight in ``-NCC + alpha * CURV`` (field in pixels of the level). ``CURV`` is
    the mean squared 5-point Laplacian: pixel noise of std ``s`` costs ``~20 alpha s^2``, a
    smooth field almost nothing. 0.01 penalises 1 px noise by 0.2 (as much as the NCC gain of
    aligning) and 0.1 px noise by 0.002; ``alpha >= 1`` made the networks' outputs independent
    of their inputs in measurements (any input-dependent output is noisy at first)."""
    head_init_std: float = 1e-3
    """Standard deviation of the initial weights of each network's last layer."""
    lr: float = 2e-3
    """Initial Adam learning rate of every level."""
    lr_decay: float = 0.9
    """Per-epoch multiplicative decay of each level's learning rate."""
    epochs: int = 24
    steps_per_epoch: int = 300
    """Training steps per epoch; a step registers a batch of ``batch`` pairs (Algorithm 1 with
    every group of every level trained, or ``train_groups`` of them)."""
    batch: int = 16
    """Pairs registered together (all the same sub-pyramid)."""
    crop: int = 64
    """Side of a training pair at the finest level, pixels."""
    margin: int = 32
    """Extra context read around a crop so that deformed sides rarely sample outside it."""
    max_displacement: float = 40.0
    """Largest smooth displacement ``|d|`` at the finest level, pixels."""
    deformation_spacing: tuple[float, float] = (120.0, 480.0)
    """Range of the control-point spacing of the smooth displacement at the finest level (px);
    a sub-pyramid pair scales it like the displacement."""
    max_rotation: float = 2.0
    """Rotation jitter, degrees (uniform in +-)."""
    max_zoom: float = 0.03
    """Zoom jitter: ``exp(U(-z, z))``."""
    max_shear: float = 0.02
    max_translation: float = 10.0
    """Translation jitter, pixels."""
    missing_tissue: float = 0.3
    """Probability that one side loses a region (ellipse) or gets a tear (white strip)."""
    section_change: float = 0.0
    """Probability that the fixed side is a "neighbouring section": resampled through an extra
    fine-scale random displacement (control points every ``section_spacing`` px, up to
    ``section_jitter`` px) that is *not* part of the known displacement, so structures shift
    individually as between consecutive sections and the networks learn to follow only the
    smooth part (0 = off, as in stage 1 of the shipped weights; their stage 2 used 0.5)."""
    content_change: float = 0.0
    """Probability that part of the fixed side (a smooth random blob, 10-40 % of the crop) shows
    other tissue (the crop turned and shifted), as structures that end between two sections;
    the known displacement stays the smooth one (0 = off; stage 3 of the shipped weights used
    0.5: held-out end-point error 1.54 -> 1.34 px, the ANHIR pairs unchanged)."""
    section_jitter: float = 2.0
    """Largest fine-scale displacement of a "neighbouring section", pixels of the crop."""
    section_spacing: tuple[float, float] = (6.0, 16.0)
    """Range of the control-point spacing of that fine-scale displacement, pixels."""
    stain_changes: tuple[str, ...] = STAIN_CHANGES
    """Stain changes of real crops, drawn uniformly (:func:`restain`)."""
    similarity: str = "ncc"
    """SIM of ``-SIM + alpha CURV``: ``"ncc"`` (the paper's) or ``"lncc2"`` (mean squared
    local NCC, polarity-free, for ``stain_loss = "cross"``)."""
    stain_loss: str = "same"
    """``"same"``: loss compares both sides in the original stain; ``"cross"``: the inputs."""
    representation: str = "od"
    """Network input (:func:`wsireg.core.stain.network_input`)."""
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    head_width: int = 16
    seed: int = 0
    sources: dict[str, float] = field(
        default_factory=lambda: {"synthetic": 0.4, "cmu": 0.2, "tcga": 0.25, "ihc": 0.15}
    )
    """Sampling weights of the data sources."""
    scale_range: tuple[float, float] = (0.75, 12.0)
    """Real crops are resampled by a log-uniform factor in this range (1 = level 0)."""
    synthetic_seeds: tuple[int, ...] = tuple(range(100, 108))
    """Synthetic training seeds (evaluation uses seeds >= 900)."""
    synthetic_downsample: tuple[float, float] = (1.0, 24.0)
    """Log-uniform range of ``texture_downsample`` of synthetic tissue."""
    synthetic_bank: int = 384
    """Synthetic crops drawn once and then reused (each use gets its own rotation, flip,
    deformation and degradation); rendering procedural tissue costs ~0.3 s a crop, 20x a real
    crop, and dominated the step time when drawn fresh. 0 = always fresh."""
    init_weights: str | None = None
    """Start from the networks of this model file (fine-tuning; same levels and widths)
    instead of a random initialisation."""
    threads: int | None = 1
    """torch CPU threads (``None``: torch's default; one is fastest for these small steps)."""

    def __post_init__(self) -> None:
        """Reject unknown choices at once (not at the first training step)."""
        if not self.stain_changes or set(self.stain_changes) - set(KNOWN_STAIN_CHANGES):
            raise ValueError(
                f"bad stain_changes {self.stain_changes!r} (use {', '.join(KNOWN_STAIN_CHANGES)})"
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"bad similarity {self.similarity!r} (use {', '.join(SIMILARITIES)})")
        if self.stain_loss not in ("same", "cross"):
            raise ValueError(f"bad stain_loss {self.stain_loss!r} (use same or cross)")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(
                f"bad representation {self.representation!r} (use {', '.join(REPRESENTATIONS)})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ValueError`."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        keys = (
            "level_max_displacement",
            "widths",
            "scale_range",
            "synthetic_seeds",
            "synthetic_downsample",
            "deformation_spacing",
            "section_spacing",
            "stain_changes",
        )
        for key in (*keys, "finest_level_probs"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def inference(self) -> InferenceSettings:
        """The inference settings stored with the trained model (field smoothing ``S / 4``,
        see :attr:`wsireg.model.inference.InferenceSettings.smoothing`)."""
        return InferenceSettings(
            iterations=self.iterations,
            patch=self.inference_patch,
            stride=self.inference_stride,
            group=self.inference_group,
            representation=self.representation,
            smoothing=self.inference_stride / 4.0,
        )

    def network(self) -> UNetConfig:
        """The per-level network configuration."""
        return UNetConfig(widths=tuple(self.widths), head_width=self.head_width)


# --- data sources and held-out regions --------------------------------------------------------

HOLDOUT: dict[str, str] = {
    "cmu": "cmu-1-small-region.svs level 0 (2967 x 2220 px): rows y >= 2225 (bottom quarter)",
    "tcga": "tcga-cr-7395-01a-01-ts1.svs level 0 (3567 x 4443 px): columns x >= 3332 "
    "(right quarter)",
    "ihc": "skimage.data.immunohistochemistry() (512 x 512 px): columns x >= 384 (right quarter)",
    "synthetic": "wsireg.synthetic.texture seeds >= 900 (training uses TrainConfig.synthetic_seeds)",
}
"""Regions never used for training, for evaluation (also written to the model's README)."""

_REAL_FILES = {"cmu": "cmu-1-small-region.svs", "tcga": "tcga-cr-7395-01a-01-ts1.svs"}
# (axis, start) of the held-out part: rows (0) or columns (1) from `start` on.
_SPLITS = {"cmu": (0, 2225), "tcga": (1, 3332), "ihc": (1, 384)}


def default_slides_dir() -> Path:
    """``../shared/data/slides`` beside the repository (where the real training slides live)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "slides"


def load_real_image(name: str, slides_dir: str | Path | None = None) -> np.ndarray:
    """The whole real image ``name`` (``"cmu"``, ``"tcga"`` or ``"ihc"``), ``[y, x, 3]`` uint8,
    at level 0 (held-out part included: use :func:`training_region` / :func:`heldout_region`)."""
    if name == "ihc":
        from skimage import data

        return np.ascontiguousarray(data.immunohistochemistry()[..., :3])
    if name not in _REAL_FILES:
        raise ValueError(f"unknown real image {name!r}; known: cmu, tcga, ihc")
    from wsireg.io.slide import open_slide

    path = Path(slides_dir or default_slides_dir()) / _REAL_FILES[name]
    if not path.is_file():
        raise InputError(path, "training slide not found (use --slides-dir)")
    with open_slide(path) as slide:
        h, w = slide.level_shape(0)
        return slide.read(0, 0, 0, h, w)


def _split(name: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axis, start = _SPLITS[name]
    if axis == 0:
        return image[:start], image[start:]
    return image[:, :start], image[:, start:]


def training_region(name: str, slides_dir: str | Path | None = None) -> np.ndarray:
    """The part of real image ``name`` that training may use (see :data:`HOLDOUT`)."""
    return np.ascontiguousarray(_split(name, load_real_image(name, slides_dir))[0])


def heldout_region(name: str, slides_dir: str | Path | None = None) -> np.ndarray:
    """The held-out part of real image ``name``, for evaluation only."""
    return np.ascontiguousarray(_split(name, load_real_image(name, slides_dir))[1])


def tissue_fraction(rgb: np.ndarray, step: int = 4) -> float:
    """Fraction of stained pixels (:func:`wsireg.core.stain.stained`), every ``step``-th."""
    return float(stained(rgb[::step, ::step]).mean())


def background_colour(image: np.ndarray) -> np.ndarray:
    """Glass colour of a slide image: per-channel 97th percentile of a subsample, uint8 ``(3,)``."""
    sub = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    return np.percentile(sub.reshape(-1, 3), 97, axis=0).astype(np.uint8)


def crop_region(
    image: np.ndarray,
    size: int,
    scale: float,
    rng: np.random.Generator,
    fill: np.ndarray | None = None,
    tries: int = 8,
) -> np.ndarray:
    """A ``size x size`` crop of ``image`` resampled by ``1 / scale`` (``scale`` level-0 px per
    output px), ``fill`` (default white) beyond the image; the most tissue-rich of ``tries``
    random windows."""
    h, w = image.shape[:2]
    src = max(1, int(round(size * scale)))
    best, best_frac = None, -1.0
    for _ in range(tries):
        y0 = int(rng.integers(min(0, h - src), max(1, h - src + 1)))
        x0 = int(rng.integers(min(0, w - src), max(1, w - src + 1)))
        canvas = np.empty((src, src, 3), np.uint8)
        canvas[:] = 255 if fill is None else fill
        ya, yb, xa, xb = max(y0, 0), min(y0 + src, h), max(x0, 0), min(x0 + src, w)
        canvas[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
        frac = tissue_fraction(canvas, step=max(1, src // 64))
        if frac > best_frac:
            best, best_frac = canvas, frac
        if frac > 0.4:
            break
    assert best is not None
    interp = cv2.INTER_AREA if src > size else cv2.INTER_LINEAR
    return cv2.resize(best, (size, size), interpolation=interp)


# --- stain changes ------------------------------------------------------------------------------


def smooth_mask(shape: tuple[int, int], rng: np.random.Generator, fraction: float) -> np.ndarray:
    """A smooth random ``[0, 1]`` mask covering about ``fraction`` of ``shape``."""
    k = int(rng.integers(3, 8))
    noise = rng.normal(size=(k, k)).astype(np.float32)
    up = cv2.resize(noise, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    thr = np.quantile(up, 1.0 - fraction)
    return np.clip((up - thr) / (up.std() * 0.2 + 1e-6) + 0.5, 0.0, 1.0)


def restain(
    rgb: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    kinds: tuple[str, ...] = STAIN_CHANGES,
) -> np.ndarray:
    """The same tissue in another staining, by remixing dye amounts in optical-density space.

    Beer-Lambert: ``OD = -ln((I + 1) / 256) = c @ V`` with ``V`` the H, E, DAB unit vectors
    (rows), so ``c = OD @ V^-1``. The new image is ``I' = 256 exp(-c' @ V') - 1`` with jittered
    dye vectors ``V'`` and new amounts ``c'`` by ``kind`` (random among ``kinds`` if ``None``):
    ``"he"`` (H&E with other intensities), ``"ihc"`` (haematoxylin counterstain + DAB on the
    eosin/DAB structures of a smooth random subset of the image), ``"single"`` (all structure in
    one random dye), ``"swap"`` (haematoxylin and eosin exchanged), ``"fade"`` (all structure in
    one random dye through the non-monotonic ``t -> t exp((1 - (t / t0)^2) / 2)``: denser than
    ``t0`` turns *lighter*, so contrast is reversed between dense and medium structures, as a
    cell-dense region dark in H&E may be pale in an IHC stain). White stays white.
    """
    kind = kind or kinds[int(rng.integers(len(kinds)))]
    basis = dye_basis()
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    conc = np.clip(od @ np.linalg.inv(basis), 0.0, None)
    h, e, d = conc[..., 0], conc[..., 1], conc[..., 2]

    def gain(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    if kind == "he":
        new = np.stack([h * gain(0.6, 1.5), e * gain(0.5, 1.6), d * gain(0.5, 1.5)], -1)
    elif kind == "ihc":
        mask = smooth_mask(h.shape, rng, float(rng.uniform(0.3, 0.9)))
        dab = (e + d) * mask * gain(0.6, 2.0)
        new = np.stack([(h + 0.25 * e) * gain(0.4, 1.0), 0.05 * e, dab], -1)
    elif kind == "single":
        total = h * gain(0.5, 1.5) + e * gain(0.3, 1.5) + d
        new = np.zeros_like(conc)
        new[..., int(rng.integers(3))] = total
    elif kind == "swap":
        new = np.stack([e * gain(0.6, 1.4), h * gain(0.6, 1.4), d], -1)
    elif kind == "fade":
        total = h + e + d
        dense = total[total > 0.1]
        t0 = float(np.quantile(dense, rng.uniform(0.3, 0.8))) if dense.size else 1.0
        new = np.zeros_like(conc)
        ratio = total / t0
        new[..., int(rng.integers(3))] = t0 * ratio * np.exp(0.5 - 0.5 * ratio**2) * gain(0.6, 1.5)
    else:
        raise ValueError(f"unknown stain change {kind!r}")
    vectors = np.abs(basis + rng.normal(0.0, 0.08, basis.shape))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = 256.0 * np.exp(-(new @ vectors)) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --- geometry ----------------------------------------------------------------------------------


def random_displacement(
    size: int,
    max_displacement: float,
    rng: np.random.Generator,
    spacing: float | None = None,
    min_det: float = 0.3,
) -> Tensor:
    """A smooth random field ``(1, 2, size, size)`` (pixels) with ``max |d| = max_displacement``.

    Gaussian noise on a grid of control points every ``spacing`` px (default ``size / 3``),
    bicubically upsampled, plus 25 % of the same at a third of the spacing; a random
    ``size x size`` window of it is scaled to the amplitude, then halved until the Jacobian
    determinant of ``x -> x + d(x)`` stays above ``min_det`` everywhere (no folding). A spacing
    larger than ``size`` gives a locally almost affine field, as a window of a large slide sees.
    """
    if max_displacement <= 0:
        return torch.zeros(1, 2, size, size)
    spacing = float(spacing or size / 3.0)
    d = torch.zeros(1, 2, size, size)
    for step, weight in ((spacing, 1.0), (spacing / 3.0, 0.25)):
        step = max(step, 4.0)
        k = max(2, math.ceil(size / step) + 1)
        extent = max(size, int(round((k - 1) * step)) + 1)
        noise = torch.from_numpy(rng.normal(size=(1, 2, k, k)).astype(np.float32))
        up = F.interpolate(noise, (extent, extent), mode="bicubic", align_corners=True)
        y0, x0 = (int(v) for v in rng.integers(0, extent - size + 1, 2))
        d = d + weight * up[..., y0 : y0 + size, x0 : x0 + size]
    d = d * (max_displacement / float(torch.linalg.vector_norm(d, dim=1).max()))
    while float(wfield.jacobian_determinant(d).min()) < min_det:
        d = d * 0.5
    return d


def _affine_positions(
    size: int, cfg: TrainConfig, rng: np.random.Generator, translation_scale: float = 1.0
) -> Tensor:
    """``c + R Z Sh (x - c) + t - x`` on the ``size`` grid: the affine jitter as a field."""
    theta = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    zoom = math.exp(rng.uniform(-cfg.max_zoom, cfg.max_zoom))
    shear = rng.uniform(-cfg.max_shear, cfg.max_shear)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    mat = torch.from_numpy((rot @ np.array([[1.0, shear], [0.0, 1.0]]) * zoom).astype(np.float32))
    shift = rng.uniform(-1.0, 1.0, 2) * cfg.max_translation * translation_scale
    t = torch.from_numpy(shift.astype(np.float32))
    grid = wfield.identity_grid((size, size))
    c = (size - 1) / 2.0
    pts = grid[0].reshape(2, -1) - c
    moved = mat @ pts + c + t[:, None]
    return moved.reshape(1, 2, size, size) - grid


def _sample_rgb(rgb: np.ndarray, positions: Tensor) -> np.ndarray:
    """``rgb`` ``[y, x, 3]`` uint8 sampled (bicubic, little smoothing) at pixel ``positions``
    ``(1, 2, h, w)``, white outside."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    out = wfield.sample(image, positions, mode="bicubic", padding=255.0)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _missing(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a lost tissue region: a random ellipse, or a tear (thin wavy strip)."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        centre = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.uniform(0.05, 0.3) * w), int(rng.uniform(0.05, 0.3) * h))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        xs = np.linspace(-0.1 * w, 1.1 * w, 12)
        ys = rng.uniform(0.1, 0.9) * h + np.cumsum(rng.normal(0, 0.04 * h, xs.size))
        pts = np.stack([xs, ys], -1).astype(np.int32)
        if rng.random() < 0.5:
            pts = pts[:, ::-1].copy()
        cv2.polylines(mask, [pts], False, 1, int(rng.integers(2, max(3, h // 30))))
    return mask.astype(bool)


# --- pairs -------------------------------------------------------------------------------------


class Crop(NamedTuple):
    """The same tissue twice: ``clean`` (original stain) and ``other`` (another stain),
    ``[y, x, 3]`` uint8 of side ``crop + 2 * margin``."""

    clean: np.ndarray
    other: np.ndarray
    source: str


class Pair(NamedTuple):
    """A training pair as ``(1, 3, H, W)`` float RGB in ``[0, 1]``."""

    moving: Tensor
    fixed: Tensor
    loss_moving: Tensor
    loss_fixed: Tensor
    truth: Tensor
    """``u`` ``(1, 2, H, W)`` with ``fixed(x) = moving(x + u(x))`` (pixels)."""


def _to_tensor(rgb: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0


def _degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner-like degradations of a network input: mild blur and noise."""
    out = rgb.astype(np.float32)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.5, 1.2)))
    out = out + rng.normal(0.0, rng.uniform(0.0, 4.0), out.shape).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _change_content(
    net: np.ndarray,
    loss: np.ndarray,
    net_rgb: np.ndarray,
    clean_rgb: np.ndarray,
    grid: Tensor,
    rng: np.random.Generator,
) -> None:
    """Blend, in place, other tissue of the same crop (turned by 90-270 degrees and shifted)
    into a smooth random blob of the network image ``net`` and the loss image ``loss``."""
    size = net.shape[0]
    k = int(rng.integers(1, 4))
    shift = torch.from_numpy(rng.uniform(-0.5, 0.5, 2).astype(np.float32)).reshape(1, 2, 1, 1)
    positions = grid + shift * float(grid.min())  # up to half the margin either way
    mask = smooth_mask((size, size), rng, float(rng.uniform(0.1, 0.4)))[..., None]
    for out, rgb in ((net, net_rgb), (loss, clean_rgb)):
        donor = _sample_rgb(np.ascontiguousarray(np.rot90(rgb, k)), positions)
        out[:] = np.round(out * (1.0 - mask) + donor * mask).astype(np.uint8)


def make_pair(
    crop: Crop, cfg: TrainConfig, rng: np.random.Generator, displacement_scale: float = 1.0
) -> Pair:
    """A training pair of side ``cfg.crop`` from a :class:`Crop` (module docstring); the
    smooth displacement and the translation are multiplied by ``displacement_scale``."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    images = [np.rot90(img, k) for img in (crop.clean, crop.other)]
    if flip:
        images = [img[:, ::-1] for img in images]
    clean, other = (np.ascontiguousarray(img) for img in images)
    size, m = cfg.crop, cfg.margin
    amplitude = cfg.max_displacement * displacement_scale * float(rng.uniform(0.0, 1.0))
    spacing = float(rng.uniform(*cfg.deformation_spacing)) * displacement_scale
    affine = _affine_positions(size, cfg, rng, displacement_scale)
    disp = random_displacement(size, amplitude, rng, spacing) + affine
    grid = wfield.identity_grid((size, size)) + m
    deformed = grid + disp
    # a neighbouring section: fine mismatch, same truth (no draw when off: the shipped run's
    # random sequence stays as it was)
    if cfg.section_change > 0 and rng.random() < cfg.section_change:
        jitter = float(rng.uniform(0.0, cfg.section_jitter))
        fine = random_displacement(size, jitter, rng, float(rng.uniform(*cfg.section_spacing)))
        deformed = deformed + fine
    # Side 0 is resampled at `deformed`, side 1 at the centre of the crop shifted by a random
    # sub-pixel offset: both sides are interpolated alike, so that no side is systematically
    # sharper (else the network learns to blur the moving image by half-pixel shifts, which
    # raises the NCC of misaligned pairs).
    # zero-mean, so that the truth has no systematic shift the networks could learn as a prior
    offset = torch.from_numpy(rng.uniform(-0.5, 0.5, 2).astype(np.float32)).reshape(1, 2, 1, 1)
    identity = grid + offset
    stains = [clean, other] if rng.random() < 0.5 else [other, clean]
    net = [_sample_rgb(stains[0], deformed), _sample_rgb(stains[1], identity)]
    loss = [_sample_rgb(clean, deformed), _sample_rgb(clean, identity)]
    if cfg.content_change > 0 and rng.random() < cfg.content_change:
        _change_content(net[0], loss[0], stains[0], clean, grid, rng)
    if rng.random() < cfg.missing_tissue:
        side = int(rng.integers(2))
        lost = _missing((size, size), rng)
        net[side][lost] = 255
        loss[side][lost] = 255
    net = [_degrade(img, rng) for img in net]
    if cfg.stain_loss == "cross":
        loss = net
    elif cfg.stain_loss != "same":
        raise ValueError(f"stain_loss must be 'same' or 'cross', got {cfg.stain_loss!r}")
    # the deformed side is the fixed image: fixed(x) = C(x + m + d(x)) and
    # moving(y) = C(y + m + offset), so fixed(x) = moving(x + d(x) - offset)
    return Pair(
        _to_tensor(net[1]),
        _to_tensor(net[0]),
        _to_tensor(loss[1]),
        _to_tensor(loss[0]),
        disp - offset,
    )


class TrainingData:
    """Random crops of the training sources (:data:`HOLDOUT` excluded), as :class:`Crop`."""

    def __init__(self, cfg: TrainConfig, slides_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        weights = {k: float(v) for k, v in cfg.sources.items() if float(v) > 0}
        unknown = set(weights) - {"synthetic", "cmu", "tcga", "ihc"}
        if unknown or not weights:
            raise ValueError(f"bad sources {cfg.sources!r} (use synthetic, cmu, tcga, ihc)")
        self.names = sorted(weights)
        total = sum(weights.values())
        self.probs = np.array([weights[n] / total for n in self.names])
        self.real = {n: training_region(n, slides_dir) for n in self.names if n != "synthetic"}
        self._bank: list[Crop] = []

    def crop(self, rng: np.random.Generator) -> Crop:
        """One random crop of side ``crop + 2 * margin`` with its second staining."""
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        side = self.cfg.crop + 2 * self.cfg.margin
        if name == "synthetic":
            return self._banked_synthetic(side, rng)
        lo, hi = self.cfg.scale_range
        scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        clean = crop_region(self.real[name], side, scale, rng)
        other = restain(clean, rng, kinds=tuple(self.cfg.stain_changes))
        return Crop(clean, other, f"{name}@{scale:.2f}")

    def _banked_synthetic(self, side: int, rng: np.random.Generator) -> Crop:
        """A synthetic crop from the bank (filled on first use with its own generator, so the
        bank does not depend on when it is first needed)."""
        size = self.cfg.synthetic_bank
        if size <= 0:
            return self._synthetic(side, rng)
        if not self._bank:
            bank_rng = np.random.default_rng([self.cfg.seed, 7919])
            with progress(size, "synthetic crops", unit="crop") as bar:
                for _ in range(size):
                    self._bank.append(self._synthetic(side, bank_rng))
                    bar.update(1)
        return self._bank[int(rng.integers(len(self._bank)))]

    def _synthetic(self, side: int, rng: np.random.Generator) -> Crop:
        from wsireg.synthetic.texture import H_AND_E, IHC_DAB, get_texture

        seed = int(rng.choice(self.cfg.synthetic_seeds))
        lo, hi = self.cfg.synthetic_downsample
        ds = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        ds = round(ds, 1)  # few distinct textures -> cache hits
        extent = 4096
        tex = get_texture(seed, (extent, extent), ds)
        best, best_frac = None, -1.0
        for _ in range(6):
            y0, x0 = (int(v) for v in rng.integers(0, extent - side, 2))
            ys, xs = np.meshgrid(np.linspace(y0, y0 + side, 8), np.linspace(x0, x0 + side, 8))
            frac = float(tex.structure_at(np.stack([xs.ravel(), ys.ravel()], -1))[:, 3].mean())
            if frac > best_frac:
                best, best_frac = (y0, x0), frac
            if frac > 0.5:
                break
        assert best is not None
        structure = tex.structure(best[0], best[1], side, side)
        stains = [H_AND_E, IHC_DAB]
        if rng.random() < 0.5:
            stains.reverse()
        jit = [int(v) for v in rng.integers(0, 2**31, 2)]
        clean = stains[0].jitter(jit[0], 0.1).rgb(structure)
        other = stains[1].jitter(jit[1], 0.1).rgb(structure)
        return Crop(clean, other, f"synthetic{seed}@{ds}")

    def pair(self, rng: np.random.Generator, displacement_scale: float = 1.0) -> Pair:
        """A random training :class:`Pair` (see :func:`make_pair`)."""
        return make_pair(self.crop(rng), self.cfg, rng, displacement_scale)


# --- the loop ------------------------------------------------------------------------------------


def _new_model(cfg: TrainConfig) -> MultiLevelModel:
    """Fresh networks; the last layer starts at ``head_init_std`` (the network's own 1e-5
    scales every gradient reaching the body by 1e-5, which delays learning by hundreds of
    steps; 1e-3 still predicts < ~0.05 px)."""
    torch.manual_seed(cfg.seed)
    model = MultiLevelModel.uniform(cfg.levels, cfg.network())
    for net in model.levels:
        nn.init.normal_(net.head[-1].weight, std=cfg.head_init_std)
    return model


def _metadata(cfg: TrainConfig, epochs_done: int, history: list[dict[str, Any]]) -> dict:
    return {
        "inference": cfg.inference().to_dict(),
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


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    slides_dir: str | Path | None = None,
    data: Callable[[np.random.Generator, float], Pair] | None = None,
) -> MultiLevelModel:
    """Train a :class:`~wsireg.model.network.MultiLevelModel` and save it to ``out_dir/model.pt``.

    ``out_dir`` receives ``config.json``, ``log.csv`` (per epoch: wall seconds, mean loss of
    every level and overall, learning rates), ``checkpoint.pt`` (after every epoch) and
    ``model.pt`` (+ checksum sidecar). With ``resume`` the run continues after the last
    checkpointed epoch (``cfg.epochs`` may be larger than before); without it an existing
    checkpoint is an error. ``data`` replaces :class:`TrainingData` (tests): it maps an RNG and
    a displacement scale to a :class:`Pair`. Epoch ``e`` draws its pairs from
    ``numpy.random.default_rng([seed, e])``, so a resumed run sees the same data as an
    uninterrupted one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise WsiregError(f"{ckpt_path}: a training run exists here (use --resume)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = _new_model(cfg)
    optimizers = [torch.optim.Adam(net.parameters(), lr=cfg.lr) for net in model.levels]
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, cfg.lr_decay) for o in optimizers]
    start = 0
    history = _read_log(out / LOG)
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        for obj, state in zip(
            optimizers + schedulers, ckpt["optimizers"] + ckpt["schedulers"], strict=True
        ):
            obj.load_state_dict(state)
        start = int(ckpt["epoch"])
        history = history[:start]
    elif cfg.init_weights:  # a fresh run fine-tuning given networks (copied in place)
        _load_initial(model, Path(cfg.init_weights))
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    sample = data or TrainingData(cfg, slides_dir).pair
    for epoch in range(start, cfg.epochs):
        history.append(_run_epoch(model, optimizers, cfg, epoch, sample))
        with warnings.catch_warnings():  # a level may have had no step in a short epoch
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in schedulers:
                scheduler.step()
        _write_log(out / LOG, history)
        model.metadata = _metadata(cfg, epoch + 1, history)
        model.save(out / MODEL)
        _save_checkpoint(ckpt_path, model, optimizers, schedulers, epoch + 1)
    model.metadata = _metadata(cfg, max(cfg.epochs, start), history)
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
    sample: Callable[[np.random.Generator, float], Pair],
) -> dict[str, Any]:
    """One epoch; returns its log row. Each pair runs the sub-pyramid ``0..j`` with ``j`` drawn
    from ``cfg.finest_level_probs`` (see :class:`TrainConfig`)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, epoch])
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    lrs = [o.param_groups[0]["lr"] for o in optimizers]
    beta = cfg.supervision * max(0.0, 1.0 - epoch / max(cfg.supervision_epochs, 1))
    trainers = [
        GroupTrainer(
            o, cfg.alpha, cfg.train_groups, gen, supervision=beta, similarity=cfg.similarity
        )
        for o in optimizers
    ]
    model.train()
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    with progress(cfg.steps_per_epoch, desc, unit="step") as bar:
        for _ in range(cfg.steps_per_epoch):
            top = _draw_finest(cfg, rng)
            depth = top + 1 if cfg.train_depth is None else min(cfg.train_depth, top + 1)
            scale = _displacement_scale(cfg, top, depth)
            pairs = [sample(rng, scale) for _ in range(cfg.batch)]
            moving, fixed, loss_moving, loss_fixed, truth = (
                torch.cat(images) for images in zip(*pairs, strict=True)
            )
            register_pyramid(
                model,
                moving,
                fixed,
                finest=top,
                levels=depth,
                iterations=cfg.iterations,
                patch=cfg.patch,
                stride=cfg.stride,
                group=cfg.group,
                representation=cfg.representation,
                trainers=trainers[top + 1 - depth : top + 1],
                loss_moving=loss_moving,
                loss_fixed=loss_fixed,
                target=truth if beta > 0 else None,
            )
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
    if depth == top + 1 or not cfg.level_max_displacement:
        return 2.0 ** (top - cfg.levels + 1)
    return float(cfg.level_max_displacement[top]) / cfg.max_displacement


def _draw_finest(cfg: TrainConfig, rng: np.random.Generator) -> int:
    """Index of the finest network of the next training pair."""
    probs = cfg.finest_level_probs
    if probs is not None and len(probs) == 0:
        return cfg.levels - 1
    p = np.full(cfg.levels, 1.0 / cfg.levels) if probs is None else np.asarray(probs, float)
    if p.shape != (cfg.levels,) or p.min() < 0 or p.sum() <= 0:
        raise ValueError(f"finest_level_probs needs {cfg.levels} non-negative weights")
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
    schedulers: list[Any],
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
