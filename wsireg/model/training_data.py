"""Training data: real and procedural tissue crops, stain changes and random displacements,
made into pairs with a known displacement (what :func:`wsireg.model.train.train` learns from).

Conventions (axes, ``(x, y)`` order, pixel centres, backward fields) are those of
:mod:`wsireg.core.coords`; images handled here are ``[y, x, c]`` uint8 RGB (white background) until
they become ``(1, 3, H, W)`` float tensors in ``[0, 1]`` (:class:`Pair`).

Sources (:class:`TrainingData`, :class:`CropSettings`), never the ANHIR evaluation pairs
    Crops of real H&E tissue (``cmu-1-small-region.svs``, ``tcga-cr-7395-01a-01-ts1.svs``, read
    with :func:`wsireg.io.slide.open_slide` and resampled to a random scale between
    ``scale_range``), real IHC (``skimage.data.immunohistochemistry()``), and procedural tissue
    of :mod:`wsireg.synthetic.texture` (training seeds only, random ``texture_downsample``). The
    held-out regions of :data:`HOLDOUT` are cut away before any crop is taken.
    ``"sections"``: pairs of real neighbouring sections in two stains, affinely aligned by the
    caller (:func:`wsireg.run.sections.aligned_sections`), cropped at the same place in both;
    their remaining displacement is unknown, so they train with the paper's unsupervised loss
    alone (the pair's ``truth`` is NaN, see :func:`make_section_pair`).

Pairs (:func:`make_pair`, :class:`PairSettings`): a crop of side ``crop + 2 * margin`` becomes
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsireg.core import field as wfield
from wsireg.core.stain import dye_basis, stained
from wsireg.errors import InputError
from wsireg.io.slide import open_slide
from wsireg.progress import progress
from wsireg.synthetic.texture import H_AND_E, IHC_DAB, get_texture

__all__ = [
    "HOLDOUT",
    "KNOWN_STAIN_CHANGES",
    "SOURCES",
    "STAIN_CHANGES",
    "SectionPair",
    "Crop",
    "CropSettings",
    "Pair",
    "PairSettings",
    "TrainingData",
    "crop_region",
    "crop_regions",
    "default_slides_dir",
    "heldout_region",
    "load_real_image",
    "make_pair",
    "make_section_pair",
    "random_displacement",
    "restain",
    "smooth_mask",
    "tissue_fraction",
    "training_region",
]

STAIN_CHANGES = ("he", "ihc", "single", "swap")
"""The stain changes :func:`restain` draws from by default (those the shipped weights were
trained with, ``wsireg/weights/README.md``)."""
KNOWN_STAIN_CHANGES = (*STAIN_CHANGES, "fade")
"""Every stain change :func:`restain` knows (``"fade"`` is opt-in)."""
SOURCES = ("synthetic", "cmu", "tcga", "ihc", "sections")
"""The data sources :class:`TrainingData` draws crops from."""


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSettings:
    """Where training crops come from (:class:`TrainingData`)."""

    sources: dict[str, float] = field(
        default_factory=lambda: {"synthetic": 0.4, "cmu": 0.2, "tcga": 0.25, "ihc": 0.15}
    )
    """Sampling weights of the data sources (:data:`SOURCES`)."""
    scale_range: tuple[float, float] = (0.75, 12.0)
    """Real crops are resampled by a log-uniform factor in this range (1 = level 0)."""
    stain_changes: tuple[str, ...] = STAIN_CHANGES
    """Stain changes of real crops, drawn uniformly (:func:`restain`)."""
    synthetic_seeds: tuple[int, ...] = tuple(range(100, 108))
    """Synthetic training seeds (evaluation uses seeds >= 900)."""
    synthetic_downsample: tuple[float, float] = (1.0, 24.0)
    """Log-uniform range of ``texture_downsample`` of synthetic tissue."""
    sections: tuple[str, ...] = ()
    """Image files of consecutive real sections, in section order, for the ``"sections"``
    source (aligned pairwise before training by :func:`wsireg.run.sections.aligned_sections`)."""
    section_gap: int = 1
    """Sections up to this far apart make pairs (1: neighbours only)."""
    section_scale_range: tuple[float, float] = (0.5, 2.0)
    """Crops of neighbouring sections are resampled by a log-uniform factor in this range."""
    section_grey: float = 0.25
    """Probability that both crops of a section pair are turned into grey (luminance as R, G
    and B), as grey slides reach the networks."""
    synthetic_bank: int = 384
    """Synthetic crops drawn once and then reused (each use gets its own rotation, flip,
    deformation and degradation): rendering procedural tissue costs far more than cutting a
    real crop. 0 = always fresh."""

    def __post_init__(self) -> None:
        """Reject unknown choices at once (not at the first training step)."""
        if not self.stain_changes or set(self.stain_changes) - set(KNOWN_STAIN_CHANGES):
            raise ValueError(
                f"bad stain_changes {self.stain_changes!r} (use {', '.join(KNOWN_STAIN_CHANGES)})"
            )


@dataclass(frozen=True)
class PairSettings:
    """How a crop becomes a training pair (:func:`make_pair`)."""

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
    """Shear jitter (uniform in +-)."""
    max_translation: float = 10.0
    """Translation jitter, pixels."""
    missing_tissue: float = 0.3
    """Probability that one side loses a region (ellipse) or gets a tear (white strip)."""
    section_change: float = 0.0
    """Probability that the fixed side is a "neighbouring section": resampled through an extra
    fine-scale random displacement (control points every ``section_spacing`` px, up to
    ``section_jitter`` px) that is *not* part of the known displacement, so structures shift
    individually as between consecutive sections and the networks learn to follow only the
    smooth part (0 = off; the training stages: ``wsireg/weights/README.md``)."""
    content_change: float = 0.0
    """Probability that part of the fixed side (a smooth random blob, 10-40 % of the crop) shows
    other tissue (the crop turned and shifted), as structures that end between two sections;
    the known displacement stays the smooth one (0 = off)."""
    section_jitter: float = 2.0
    """Largest fine-scale displacement of a "neighbouring section", pixels of the crop."""
    section_spacing: tuple[float, float] = (6.0, 16.0)
    """Range of the control-point spacing of that fine-scale displacement, pixels."""
    stain_loss: str = "same"
    """The loss images of a pair: ``"same"``: both sides in the crop's original stain;
    ``"cross"``: the network inputs themselves."""

    def __post_init__(self) -> None:
        """Reject unknown choices at once (not at the first training step)."""
        if self.stain_loss not in ("same", "cross"):
            raise ValueError(f"bad stain_loss {self.stain_loss!r} (use same or cross)")


# --- data sources and held-out regions --------------------------------------------------------

HOLDOUT: dict[str, str] = {
    "cmu": "cmu-1-small-region.svs level 0 (2967 x 2220 px): rows y >= 2225 (bottom quarter)",
    "tcga": "tcga-cr-7395-01a-01-ts1.svs level 0 (3567 x 4443 px): columns x >= 3332 "
    "(right quarter)",
    "ihc": "skimage.data.immunohistochemistry() (512 x 512 px): columns x >= 384 (right quarter)",
    "synthetic": "wsireg.synthetic.texture seeds >= 900 "
    "(training uses CropSettings.synthetic_seeds)",
}
"""Regions never used for training, for evaluation (also written to the model's README)."""

_REAL_SOURCES = ("cmu", "tcga", "ihc")
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
        # scikit-image is imported here only: its data module is slow to import and only the
        # IHC training image needs it
        from skimage import data

        return np.ascontiguousarray(data.immunohistochemistry()[..., :3])
    if name not in _REAL_FILES:
        raise ValueError(f"unknown real image {name!r}; known: cmu, tcga, ihc")
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


def _window(image: np.ndarray, y0: int, x0: int, src: int, fill: np.ndarray | None) -> np.ndarray:
    """The ``src x src`` window of ``image`` at ``(y0, x0)``, ``fill`` (default white) beyond
    the image."""
    h, w = image.shape[:2]
    canvas = np.empty((src, src, 3), np.uint8)
    canvas[:] = 255 if fill is None else fill
    ya, yb, xa, xb = max(y0, 0), min(y0 + src, h), max(x0, 0), min(x0 + src, w)
    canvas[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
    return canvas


def _resized(window: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if window.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(window, (size, size), interpolation=interp)


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
    return crop_regions((image,), size, scale, rng, fill, tries)[0]


def crop_regions(
    images: tuple[np.ndarray, ...],
    size: int,
    scale: float,
    rng: np.random.Generator,
    fill: np.ndarray | None = None,
    tries: int = 8,
) -> tuple[np.ndarray, ...]:
    """:func:`crop_region` at the same place of several images of one shape: the window whose
    least tissue-rich image has the most tissue."""
    h, w = images[0].shape[:2]
    src = max(1, int(round(size * scale)))
    best, best_frac = None, -1.0
    for _ in range(tries):
        y0 = int(rng.integers(min(0, h - src), max(1, h - src + 1)))
        x0 = int(rng.integers(min(0, w - src), max(1, w - src + 1)))
        windows = tuple(_window(image, y0, x0, src, fill) for image in images)
        frac = min(tissue_fraction(win, step=max(1, src // 64)) for win in windows)
        if frac > best_frac:
            best, best_frac = windows, frac
        if frac > 0.4:
            break
    assert best is not None
    return tuple(_resized(win, size) for win in best)


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
    size: int, cfg: PairSettings, rng: np.random.Generator, translation_scale: float = 1.0
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
    ``[y, x, 3]`` uint8 of side ``crop + 2 * margin``. With ``known=False`` ``other`` is the
    same place of a neighbouring section (aligned up to an unknown displacement)."""

    clean: np.ndarray
    other: np.ndarray
    source: str
    known: bool = True


class Pair(NamedTuple):
    """A training pair as ``(1, 3, H, W)`` float RGB in ``[0, 1]``."""

    moving: Tensor
    fixed: Tensor
    loss_moving: Tensor
    loss_fixed: Tensor
    truth: Tensor
    """``u`` ``(1, 2, H, W)`` with ``fixed(x) = moving(x + u(x))`` (pixels); NaN where unknown
    (pairs of real sections)."""


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R 601) as R, G and B."""
    luma = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return np.repeat(luma[..., None], 3, axis=2)


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


def _oriented(crop: Crop, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Both images of ``crop`` turned by the same random multiple of 90 degrees and flipped
    alike."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    images = [np.rot90(img, k) for img in (crop.clean, crop.other)]
    if flip:
        images = [img[:, ::-1] for img in images]
    clean, other = (np.ascontiguousarray(img) for img in images)
    return clean, other


def _random_geometry(
    cfg: PairSettings, rng: np.random.Generator, displacement_scale: float
) -> tuple[Tensor, Tensor]:
    """The random displacement ``(1, 2, crop, crop)`` of a pair (smooth part plus affine
    jitter, pixels) and the identity grid of the crop inside its margin."""
    size, m = cfg.crop, cfg.margin
    amplitude = cfg.max_displacement * displacement_scale * float(rng.uniform(0.0, 1.0))
    spacing = float(rng.uniform(*cfg.deformation_spacing)) * displacement_scale
    affine = _affine_positions(size, cfg, rng, displacement_scale)
    disp = random_displacement(size, amplitude, rng, spacing) + affine
    return disp, wfield.identity_grid((size, size)) + m


def _sub_pixel_offset(rng: np.random.Generator) -> Tensor:
    return torch.from_numpy(rng.uniform(-0.5, 0.5, 2).astype(np.float32)).reshape(1, 2, 1, 1)


def make_section_pair(
    crop: Crop, cfg: PairSettings, rng: np.random.Generator, displacement_scale: float = 1.0
) -> Pair:
    """A training pair from two aligned neighbouring sections (``crop.known`` is False): one
    section resampled through a random displacement as in :func:`make_pair`, the other at the
    crop's centre; the loss compares the two sections themselves (the paper's setting) and the
    truth is NaN, as the sections' own displacement is unknown (the supervised term skips
    it)."""
    first, second = _oriented(crop, rng)
    disp, grid = _random_geometry(cfg, rng, displacement_scale)
    if rng.random() < 0.5:
        first, second = second, first
    net = [_sample_rgb(first, grid + disp), _sample_rgb(second, grid + _sub_pixel_offset(rng))]
    if rng.random() < cfg.missing_tissue:
        side = int(rng.integers(2))
        net[side][_missing((cfg.crop, cfg.crop), rng)] = 255
    loss = [_to_tensor(img) for img in net]
    net = [_degrade(img, rng) for img in net]
    unknown = torch.full_like(disp, float("nan"))
    return Pair(_to_tensor(net[1]), _to_tensor(net[0]), loss[1], loss[0], unknown)


def make_pair(
    crop: Crop, cfg: PairSettings, rng: np.random.Generator, displacement_scale: float = 1.0
) -> Pair:
    """A training pair of side ``cfg.crop`` from a :class:`Crop` (module docstring); the
    smooth displacement and the translation are multiplied by ``displacement_scale``."""
    if not crop.known:
        return make_section_pair(crop, cfg, rng, displacement_scale)
    clean, other = _oriented(crop, rng)
    disp, grid = _random_geometry(cfg, rng, displacement_scale)
    size = cfg.crop
    deformed = grid + disp
    # a neighbouring section: fine mismatch, same truth (no random draw when off, so that
    # settings without it draw the same sequence as before it existed)
    if cfg.section_change > 0 and rng.random() < cfg.section_change:
        jitter = float(rng.uniform(0.0, cfg.section_jitter))
        fine = random_displacement(size, jitter, rng, float(rng.uniform(*cfg.section_spacing)))
        deformed = deformed + fine
    # Side 0 is resampled at `deformed`, side 1 at the centre of the crop shifted by a random
    # sub-pixel offset: both sides are interpolated alike, so that no side is systematically
    # sharper (else the network learns to blur the moving image by half-pixel shifts, which
    # raises the NCC of misaligned pairs).
    # zero-mean, so that the truth has no systematic shift the networks could learn as a prior
    offset = _sub_pixel_offset(rng)
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
    # the deformed side is the fixed image: fixed(x) = C(x + m + d(x)) and
    # moving(y) = C(y + m + offset), so fixed(x) = moving(x + d(x) - offset)
    return Pair(
        _to_tensor(net[1]),
        _to_tensor(net[0]),
        _to_tensor(loss[1]),
        _to_tensor(loss[0]),
        disp - offset,
    )


#: Two neighbouring sections, uint8 RGB ``[y, x, 3]`` of one shape, the second affinely aligned
#: onto the first.
SectionPair = tuple[np.ndarray, np.ndarray]


class TrainingData:
    """Random crops of the training sources (:data:`HOLDOUT` excluded), as :class:`Crop`, and
    the pairs made of them. ``seed`` seeds the bank of synthetic crops. ``sections``: the
    aligned pairs of neighbouring sections the ``"sections"`` source draws from."""

    def __init__(
        self,
        crops: CropSettings,
        pairs: PairSettings,
        seed: int = 0,
        slides_dir: str | Path | None = None,
        sections: tuple[SectionPair, ...] = (),
    ) -> None:
        self.crops = crops
        self.pairs = pairs
        self.seed = seed
        weights = {k: float(v) for k, v in crops.sources.items() if float(v) > 0}
        unknown = set(weights) - set(SOURCES)
        if unknown or not weights:
            raise ValueError(f"bad sources {crops.sources!r} (use {', '.join(SOURCES)})")
        if "sections" in weights and not sections:
            raise ValueError("the source 'sections' needs aligned section pairs (--sections)")
        for first, second in sections:
            if first.shape != second.shape or first.ndim != 3 or first.dtype != np.uint8:
                raise ValueError("a section pair must be two uint8 RGB images of one shape")
        self.names = sorted(weights)
        total = sum(weights.values())
        self.probs = np.array([weights[n] / total for n in self.names])
        self.real = {n: training_region(n, slides_dir) for n in self.names if n in _REAL_SOURCES}
        self.sections = sections
        self._bank: list[Crop] = []

    def crop(self, rng: np.random.Generator) -> Crop:
        """One random crop of side ``crop + 2 * margin`` with its second staining (or its
        neighbouring section)."""
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        side = self.pairs.crop + 2 * self.pairs.margin
        if name == "synthetic":
            return self._banked_synthetic(side, rng)
        if name == "sections":
            return self._section_crop(side, rng)
        lo, hi = self.crops.scale_range
        scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        clean = crop_region(self.real[name], side, scale, rng)
        other = restain(clean, rng, kinds=tuple(self.crops.stain_changes))
        return Crop(clean, other, f"{name}@{scale:.2f}")

    def _section_crop(self, side: int, rng: np.random.Generator) -> Crop:
        """The same window of both sections of a random pair, grey (both) with probability
        ``section_grey``."""
        index = int(rng.integers(len(self.sections)))
        lo, hi = self.crops.section_scale_range
        scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        first, second = crop_regions(self.sections[index], side, scale, rng)
        if rng.random() < self.crops.section_grey:
            first, second = _grey(first), _grey(second)
        return Crop(first, second, f"sections{index}@{scale:.2f}", known=False)

    def _banked_synthetic(self, side: int, rng: np.random.Generator) -> Crop:
        """A synthetic crop from the bank (filled on first use with its own generator, so the
        bank does not depend on when it is first needed)."""
        size = self.crops.synthetic_bank
        if size <= 0:
            return self._synthetic(side, rng)
        if not self._bank:
            bank_rng = np.random.default_rng([self.seed, 7919])
            with progress(size, "synthetic crops", unit="crop") as bar:
                for _ in range(size):
                    self._bank.append(self._synthetic(side, bank_rng))
                    bar.update(1)
        return self._bank[int(rng.integers(len(self._bank)))]

    def _synthetic(self, side: int, rng: np.random.Generator) -> Crop:
        seed = int(rng.choice(self.crops.synthetic_seeds))
        lo, hi = self.crops.synthetic_downsample
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
        return make_pair(self.crop(rng), self.pairs, rng, displacement_scale)
