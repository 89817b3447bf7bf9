"""Colour science of brightfield slides: optical density, dyes, the network's input and tissue.

Intensities are transmitted light in grey levels ``I`` in ``[0, 255]`` (uint8 RGB, white glass
at about 255). Every function here is pointwise or works on whole small images (thumbnails),
so a block computed out of core equals the same pixels of a whole-image pass.

* **Optical density** (Beer-Lambert, log10): ``OD = -log10(max(I + o, 1) / (I0 + o))``,
  clipped at 0, per channel (:func:`optical_density`): ``I0`` the background (glass) intensity,
  ``o`` a dark offset that keeps black finite. The network input counts levels from 1
  (``o = 1``, ``I0 = 255``: black is ``log10(256)``); the alignment measures OD against the
  slide's own glass colour (:func:`background_rgb`, ``o = 0``).
* **Dyes**: unit OD vectors (R, G, B) of haematoxylin, eosin and DAB (Ruifrok & Johnston),
  ``OD = c @ dye_basis()`` for dye amounts ``c``; colour deconvolution inverts it.
* **Network input** (:func:`network_input`): one channel in ``[0, 1]`` per image, background
  0, from ``(N, 3, H, W)`` tensors of slides put on white glass first (:func:`on_white_glass`).
* **Tissue**: a pixel is stained tissue when its OD magnitude exceeds :data:`TISSUE_OD`
  (:func:`stained`); a network patch or block has tissue when more than
  :data:`TISSUE_SHARE` of its network-input pixels exceed :data:`TISSUE_LEVEL`
  (:func:`has_tissue`); a thumbnail's tissue region is :func:`tissue_mask` (an adaptive
  threshold on the same OD magnitude, cleaned morphologically).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from torch import Tensor

from wsireg.core.dyes import (  # noqa: F401 - re-exported: the dyes are part of this module's rules
    DAB,
    EOSIN,
    EOSIN_HE,
    HEMATOXYLIN,
    HEMATOXYLIN_HE,
    dye_basis,
    haematoxylin_unmix,
)
from wsireg.errors import InputError

# --------------------------------------------------------------------------------------------
# Optical density
# --------------------------------------------------------------------------------------------


def optical_density(
    intensity: np.ndarray | Tensor, background: np.ndarray | float = 255.0, offset: float = 1.0
) -> np.ndarray | Tensor:
    """``-log10(max(I + offset, 1) / (background + offset))``, clipped at 0, elementwise.

    ``intensity``: float grey levels (numpy array or torch tensor, any layout);
    ``background``: the glass intensity (a scalar, or per channel broadcasting against
    ``intensity``). Returns the same type as ``intensity``.
    """
    if isinstance(intensity, Tensor):
        ratio = (intensity + offset).clamp_min(1.0) / (background + offset)
        return (-torch.log10(ratio)).clamp_min(0.0)
    ratio = np.maximum(intensity + offset, 1.0) / (background + offset)
    return np.clip(-np.log10(ratio), 0.0, None)


def od_norm(od: np.ndarray | Tensor, axis: int) -> np.ndarray | Tensor:
    """Euclidean norm of optical densities over the channel ``axis`` (removed)."""
    if isinstance(od, Tensor):
        return torch.linalg.vector_norm(od, dim=axis)
    return np.sqrt((od * od).sum(axis=axis))


def od_magnitude_rgb(rgb: np.ndarray) -> np.ndarray:
    """OD magnitude ``[y, x]`` float32 of a uint8 RGB image ``[y, x, 3]`` (network
    convention: ``o = 1``, ``I0 = 255``); 0 on white."""
    return od_norm(optical_density(rgb.astype(np.float32)), axis=-1)


def background_rgb(rgb: np.ndarray) -> np.ndarray:
    """Glass colour (float32 RGB) of an image ``[y, x, 3]``: the median of its brightest 2 %
    pixels, at least 200 per channel."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    brightness = flat.sum(axis=1)
    cut = np.percentile(brightness, 98.0)
    bright = flat[brightness >= cut]
    return np.clip(np.median(bright, axis=0), 200.0, 255.0)


WHITE = (255.0, 255.0, 255.0)
"""The glass colour the network input assumes (:func:`on_white_glass`)."""


def on_white_glass(rgb: np.ndarray, glass: tuple[float, float, float]) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` with each channel rescaled by ``255 / glass`` (rounded, clipped):
    transmitted light relative to the slide's own glass colour ``glass`` (RGB grey levels,
    :func:`background_rgb` of its thumbnail), so that glass is white (OD 0) as in the network
    input's fixed ``I0 = 255``. Scanners and stainings differ in how grey the glass comes
    out; without this a grey glass reads as faint stain everywhere. Pointwise, so blocks
    equal a whole-image pass; ``glass == WHITE`` returns ``rgb`` itself."""
    gain = 255.0 / np.asarray(glass, dtype=np.float32)
    if np.all(gain == 1.0):
        return rgb
    return np.clip(np.rint(rgb.astype(np.float32) * gain), 0.0, 255.0).astype(np.uint8)


def relative_od_magnitude(rgb: np.ndarray) -> np.ndarray:
    """OD magnitude ``[y, x]`` float32 of a uint8 RGB image ``[y, x, 3]`` against its own glass
    colour (:func:`background_rgb`, ``o = 0``): stain-independent absorbance."""
    od = optical_density(rgb.astype(np.float32), background_rgb(rgb), offset=0.0)
    return od_norm(od.astype(np.float32), axis=2)


# --------------------------------------------------------------------------------------------
# Dyes
# --------------------------------------------------------------------------------------------

# The dye vectors and colour deconvolution live in the torch-free :mod:`wsireg.core.dyes`.


# --------------------------------------------------------------------------------------------
# Network input: (N, 3, H, W) RGB -> (N, 1, H, W) in [0, 1], background 0
# --------------------------------------------------------------------------------------------

REPRESENTATIONS = ("od", "grey", "haematoxylin")
"""The network input representations of :func:`network_input`."""

OD_REFERENCE = 1.5
"""Optical density mapped to 1 in the network input; dense tissue is about 0.5-1.5."""

BACKGROUND = 0.0
"""Network-input value of slide background (white): pads patches and fills warped images
outside the moving image."""


def _unit_rgb(rgb: Tensor) -> Tensor:
    """``(N, 3, H, W)`` RGB as float in ``[0, 1]``: uint8 is divided by 255, floats are kept."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected RGB (N, 3, H, W), got {tuple(rgb.shape)}")
    if rgb.dtype == torch.uint8:
        return rgb.float() / 255.0
    return rgb.float() if not rgb.is_floating_point() else rgb


def _network_od(rgb: Tensor) -> Tensor:
    """Per-channel OD ``(N, 3, H, W)`` of RGB in ``[0, 1]`` (uint8 accepted), ``o = 1``."""
    return optical_density(_unit_rgb(rgb) * 255.0)


def od_magnitude(rgb: Tensor, reference: float = OD_REFERENCE) -> Tensor:
    """``clamp(|OD|_2 / reference, 0, 1)``: ``(N, 1, H, W)``."""
    return (od_norm(_network_od(rgb), axis=1)[:, None] / reference).clamp(0.0, 1.0)


def grey_inverted(rgb: Tensor) -> Tensor:
    """``1 - (0.299 R + 0.587 G + 0.114 B)`` in ``[0, 1]``: ``(N, 1, H, W)``."""
    unit = _unit_rgb(rgb)
    weights = unit.new_tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    return 1.0 - (unit * weights).sum(dim=1, keepdim=True)


def haematoxylin(rgb: Tensor, reference: float = OD_REFERENCE) -> Tensor:
    """Haematoxylin amount by colour deconvolution, ``clamp(c_H / reference, 0, 1)``:
    ``(N, 1, H, W)``.

    ``OD = c @ V`` with ``V`` = :func:`dye_basis`, ``c = OD @ V^-1``, and only the
    haematoxylin amount is kept: the nuclear (counter)stain that H&E, immunohistochemistry and
    most special stains share, while eosin and DAB mark structures that differ by stain.
    """
    od = _network_od(rgb)
    unmix = od.new_tensor(haematoxylin_unmix()).view(1, 3, 1, 1)
    amount = (od * unmix).sum(dim=1, keepdim=True)
    return (amount / reference).clamp(0.0, 1.0)


def network_input(rgb: Tensor, representation: str = "od") -> Tensor:
    """One stain-robust channel per image for the networks: ``(N, 1, H, W)`` in ``[0, 1]``.

    ``"od"`` (:func:`od_magnitude`): the OD magnitude, "how much stain" whatever its hue (OD is
    linear in each dye's amount and sums over dyes), so H&E and IHC both map tissue to positive
    values and background to 0. ``"grey"`` (:func:`grey_inverted`): inverted luminance.
    ``"haematoxylin"`` (:func:`haematoxylin`): the nuclear counterstain alone. All are fixed
    pointwise maps (no per-image statistics); NCC is invariant to the remaining affine
    intensity differences.
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


# --------------------------------------------------------------------------------------------
# Tissue
# --------------------------------------------------------------------------------------------

TISSUE_OD = 0.15 / math.log(10.0)
"""OD magnitude (:func:`od_magnitude_rgb`) above which a pixel is stained tissue."""

TISSUE_LEVEL = 0.06
"""Network-input value (:func:`network_input`) above which a pixel counts as stained."""
TISSUE_SHARE = 0.002
"""Share of stained pixels below which a patch (or a scheduler block) counts as background."""


def stained(rgb: np.ndarray) -> np.ndarray:
    """Boolean ``[y, x]``: the pixels of a uint8 RGB image ``[y, x, 3]`` with an OD magnitude
    above :data:`TISSUE_OD`."""
    return od_magnitude_rgb(rgb) > TISSUE_OD


def has_tissue(images: Tensor) -> Tensor:
    """Per item of ``(L, C, H, W)`` network-input images: more than :data:`TISSUE_SHARE` of the
    pixels above :data:`TISSUE_LEVEL` (bool ``(L,)``)."""
    return (images > TISSUE_LEVEL).flatten(1).float().mean(dim=1) > TISSUE_SHARE


MIN_TISSUE_OD = 0.05
"""OD magnitude below which nothing is tissue in :func:`tissue_mask` (pale background noise)."""
MAX_TISSUE_THRESHOLD = 0.1
"""OD magnitude above which everything is tissue in :func:`tissue_mask`."""
MIN_TISSUE_FRACTION = 0.001
"""A :func:`tissue_mask` smaller than this fraction of the image means no tissue."""
MASK_CLOSE_RADIUS = 0.01
"""Radius of the morphological clean-up of :func:`tissue_mask`, fraction of the image size."""


def check_rgb(rgb: np.ndarray, name: str) -> None:
    """Raise :class:`~wsireg.errors.InputError` naming ``name`` unless ``rgb`` is a uint8 image
    ``[y, x, 3]`` of at least 8 px per side."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 8:
        raise InputError(
            name, f"expected a uint8 RGB image [y, x, 3] of >= 8 px, got {rgb.dtype} {rgb.shape}"
        )


def tissue_mask(rgb: np.ndarray, name: str = "image") -> np.ndarray:
    """Boolean ``[y, x]`` mask of the tissue of a thumbnail, uint8 RGB ``[y, x, 3]``.

    The OD magnitude against the image's glass colour (:func:`relative_od_magnitude`) is
    smoothed and thresholded by Otsu on its logarithm (which separates background from pale and
    dense tissue alike), clamped to ``[MIN_TISSUE_OD, MAX_TISSUE_THRESHOLD]``; the result is
    closed and opened with a disk of diameter about 1 % of the image size, its holes are filled
    and components smaller than 1 % of the largest one are dropped. Near-black pixels (every
    channel < 20: scanner padding, no-data areas) are never tissue.

    Raises :class:`~wsireg.errors.InputError` naming ``name`` when no tissue is found: nothing
    absorbs more than :data:`MIN_TISSUE_OD`, or the mask covers less than
    :data:`MIN_TISSUE_FRACTION` of the image.
    """
    check_rgb(rgb, name)
    h, w = rgb.shape[:2]
    mag = relative_od_magnitude(rgb)
    mag[rgb.max(axis=2) < 20] = 0.0
    sigma = max(1.0, 0.002 * max(h, w))
    mag = cv2.GaussianBlur(mag, (0, 0), sigma)
    if float(mag.max()) < MIN_TISSUE_OD:
        raise InputError(name, "no tissue found")
    otsu = float(np.exp(_otsu(np.log(mag.ravel() + 0.01)))) - 0.01
    threshold = min(max(otsu, MIN_TISSUE_OD), MAX_TISSUE_THRESHOLD)
    mask = (mag > threshold).astype(np.uint8)
    mask = _clean_mask(mask, max(1, round(MASK_CLOSE_RADIUS * max(h, w))))
    if mask.sum() < MIN_TISSUE_FRACTION * h * w:
        raise InputError(name, "no tissue found")
    return mask.astype(bool)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D float array."""
    hist, edges = np.histogram(values, bins=256)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _clean_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Close, open, fill holes and drop components < 1 % of the largest (uint8 0/1)."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, dtype=np.uint8)
    keep[1:] = areas >= 0.01 * areas.max()
    return _fill_holes(keep[labels])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a 0/1 uint8 mask (background connected to the border stays)."""
    padded = np.pad(mask, 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    return (flood[1:-1, 1:-1] != 2).astype(np.uint8)
