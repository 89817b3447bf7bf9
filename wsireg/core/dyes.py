"""Dyes of brightfield stains: unit optical-density vectors and colour deconvolution.

Torch-free (the slide reader uses it; :mod:`wsireg.core.stain` builds the network input on
it). ``OD = c @ dye_basis()`` for dye amounts ``c`` (Ruifrok & Johnston); optical density as
:func:`wsireg.core.stain.optical_density` defines it.
"""

from __future__ import annotations

import functools

import numpy as np

HEMATOXYLIN = (0.650, 0.704, 0.286)
"""Optical density (R, G, B) of unit hematoxylin (Ruifrok & Johnston)."""
EOSIN = (0.072, 0.990, 0.105)
"""Optical density (R, G, B) of unit eosin (Ruifrok & Johnston)."""
HEMATOXYLIN_HE = (0.5626, 0.7201, 0.4062)
"""Hematoxylin as seen in typical H&E scans (Macenko reference vector)."""
EOSIN_HE = (0.2159, 0.8012, 0.5581)
"""Eosin as seen in typical H&E scans (Macenko reference vector)."""
DAB = (0.268, 0.570, 0.776)
"""Optical density (R, G, B) of unit DAB (Ruifrok & Johnston)."""


def dye_basis() -> np.ndarray:
    """``(3, 3)`` rows: the unit optical-density vectors (R, G, B) of :data:`HEMATOXYLIN`,
    :data:`EOSIN` and :data:`DAB`, so ``OD = c @ dye_basis()`` for dye amounts ``c``."""
    basis = np.array([HEMATOXYLIN, EOSIN, DAB], dtype=np.float64)
    return basis / np.linalg.norm(basis, axis=1, keepdims=True)


@functools.cache
def haematoxylin_unmix() -> tuple[float, float, float]:
    """The column of ``dye_basis()^-1`` that gives the haematoxylin amount."""
    return tuple(float(v) for v in np.linalg.inv(dye_basis())[:, 0])
