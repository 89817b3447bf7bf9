"""One channel of a slide shown as a brightfield grey picture: what the registration sees.

Alignment, networks and refinement read slides as brightfield RGB (uint8, glass white,
:mod:`wsireg.core.stain`). A slide registered on one channel is shown to them as a grey
brightfield picture of that channel's *amount* ``a`` in ``[0, 1]`` (0 = glass / no signal):
``I = 255 * 10 ** (-SHOWN_OD * a)`` on each of R, G, B (:func:`brightfield_grey`), so the
channel's amount becomes optical density and every representation of the registration reads it
as stain. The amounts:

* **fluorescence** (:func:`amount_in_window`): the intensity rescaled linearly within the
  slide's *window* ``(lo, hi)`` (:func:`intensity_window`: the 0.5th and 99.9th percentiles of
  the channel on a coarse level, read once), clipped to ``[0, 1]``: 16-bit fluorescence uses a
  small, slide-dependent part of its range; the window maps background to 0 and the brightest
  signal to 1 whatever the exposure.
* **haematoxylin** of a brightfield RGB slide (:func:`haematoxylin_amount`): colour
  deconvolution, the nuclear stain that shows the same nuclei a DAPI channel shows, rescaled
  within its own window the same way, so both sides of an H&E / DAPI pair span ``[0, 1]``.
* **labels** (:func:`label_amount`): :data:`LABEL_AMOUNT` where the label is non-zero.

:data:`SHOWN_OD` keeps a full amount below the saturation of the network input
(:data:`wsireg.core.stain.OD_REFERENCE` for the OD magnitude of three equal channels).
All are pointwise once the window is fixed, so a block equals the same pixels of a whole-image
pass.
"""

from __future__ import annotations

import numpy as np

from wsireg.core.dyes import haematoxylin_unmix

#: Optical density of a shown amount of 1 (each of R, G, B).
SHOWN_OD = 0.7
#: Percentiles of a fluorescence channel's coarse level that bound its window.
WINDOW_PERCENTILES = (0.5, 99.9)
#: Amount shown for a non-zero label.
LABEL_AMOUNT = 0.5


def intensity_window(values: np.ndarray) -> tuple[float, float]:
    """``(lo, hi)``: the :data:`WINDOW_PERCENTILES` of the finite ``values``, ``hi > lo``."""
    finite = np.asarray(values, dtype=np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES))
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-6)
    return lo, hi


def amount_in_window(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``clip((v - lo) / (hi - lo), 0, 1)`` as float32; NaN is 0."""
    lo, hi = window
    amount = (np.asarray(values, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(np.nan_to_num(amount, nan=0.0), 0.0, 1.0)


def haematoxylin_amount(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin amount ``[y, x]`` float32 (OD units, at least 0) of a uint8 RGB image
    ``[y, x, 3]``: the colour-deconvolved haematoxylin of the OD ``log10(256 / (I + 1))``
    (:func:`wsireg.core.stain.optical_density` with ``o = 1``, ``I0 = 255``)."""
    od = np.log10(np.float32(256.0) / (rgb.astype(np.float32) + np.float32(1.0)))
    amount = od @ np.asarray(haematoxylin_unmix(), dtype=np.float32)
    return np.maximum(amount, np.float32(0.0))


def label_amount(values: np.ndarray) -> np.ndarray:
    """:data:`LABEL_AMOUNT` where ``values`` is non-zero, 0 elsewhere (float32)."""
    return np.where(np.asarray(values) != 0, np.float32(LABEL_AMOUNT), np.float32(0.0))


def brightfield_grey(amount: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8 grey brightfield of amounts ``(h, w)`` in ``[0, 1]``:
    ``round(255 * 10 ** (-SHOWN_OD * a))`` on each channel (0 -> white)."""
    grey = np.rint(255.0 * np.power(np.float32(10.0), -np.float32(SHOWN_OD) * amount))
    grey = grey.astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
