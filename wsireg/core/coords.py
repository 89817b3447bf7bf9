"""Coordinate conventions of wsireg, written once and used everywhere.

Images
    A slide level is an array indexed ``[y, x, c]`` of shape ``(H, W, 3)``, uint8 RGB, white
    (255, 255, 255) where the slide has no data. OME-Zarr stores the same pixels as ``[c, y, x]``
    (NGFF axes ``c, y, x``). torch tensors of images are ``(N, C, H, W)``.

Points
    Points are ``(x, y)``: x is the column, y the row, as in ANHIR landmark CSVs and GeoJSON.
    Arrays of points have shape ``(N, 2)``.

Units and pixel centres
    Coordinates are **level-0 pixels** of the slide they belong to, with pixel centres at
    integers: pixel ``[i, j]`` of level 0 covers ``[j - 0.5, j + 0.5) x [i - 0.5, i + 0.5)``.
    A grid at downsample ``d`` (a pyramid level, a stored field) has pixel ``[i, j]`` covering
    level-0 pixels ``[d*j, d*(j+1)) x [d*i, d*(i+1))``; its centre is at level-0 coordinate
    ``d * (j + 0.5) - 0.5``.  :func:`to_level0` and :func:`from_level0` convert.

Transforms
    A transform maps a level-0 position ``x`` of the **target** (fixed) slide to a position in the
    **source** (moving) slide: ``T(x) = A @ (x + u(x))`` (backward mapping, what resampling needs).
    ``A`` is a 3x3 homogeneous affine in level-0 pixels. ``u`` is a displacement field stored as
    an array ``(2, H_d, W_d)`` float32 on the target grid at downsample ``d``; channel 0 is the
    x-displacement and channel 1 the y-displacement, both in **level-0 pixels** (so the numbers
    do not depend on ``d``). Field tensors in torch are ``(N, 2, H, W)`` with the same channel
    order, in pixels of the grid they live on (multiply by ``d`` to store).

Physical units
    Pixel sizes are micrometres per level-0 pixel (``mpp``), ``(x, y)``; :func:`micrometres_per`
    converts the length units of OME-XML and OME-NGFF.
"""

from __future__ import annotations

import numpy as np


def to_level0(index: np.ndarray | float, downsample: float) -> np.ndarray | float:
    """Level-0 coordinate of the centre of pixel ``index`` of a grid at ``downsample``."""
    return downsample * (np.asarray(index, dtype=np.float64) + 0.5) - 0.5


def from_level0(coord: np.ndarray | float, downsample: float) -> np.ndarray | float:
    """Continuous pixel index, on a grid at ``downsample``, of level-0 coordinate ``coord``."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) / downsample - 0.5


def grid_to_level0_affine(downsample: float) -> np.ndarray:
    """3x3 affine taking ``(x, y, 1)`` grid indices at ``downsample`` to level-0 coordinates."""
    d = float(downsample)
    off = 0.5 * d - 0.5
    return np.array([[d, 0.0, off], [0.0, d, off], [0.0, 0.0, 1.0]])


_MICROMETRES = {
    "angstrom": 1e-4,
    "å": 1e-4,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
}


def micrometres_per(unit: str) -> float | None:
    """Micrometres in one ``unit`` (OME-XML symbols such as ``"µm"`` or OME-NGFF names such as
    ``"micrometer"``, any case); ``None`` for an unknown unit."""
    return _MICROMETRES.get(unit.strip().lower())
