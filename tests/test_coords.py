"""Tests of wsireg.core.coords: level-0 grids and physical units."""

from __future__ import annotations

import numpy as np

from wsireg.core import coords


def test_grid_centres_round_trip() -> None:
    index = np.arange(5, dtype=float)
    level0 = coords.to_level0(index, 4.0)
    assert np.allclose(level0, 4.0 * (index + 0.5) - 0.5)
    assert np.allclose(coords.from_level0(level0, 4.0), index)
    m = coords.grid_to_level0_affine(4.0)
    assert np.allclose(m @ np.array([2.0, 3.0, 1.0]), [9.5, 13.5, 1.0])


def test_micrometres_per_unit_reads_ome_xml_and_ngff_spellings() -> None:
    assert coords.micrometres_per("µm") == coords.micrometres_per("micrometer") == 1.0
    assert coords.micrometres_per("MILLIMETER") == coords.micrometres_per("mm") == 1e3
    assert coords.micrometres_per("nm") == 1e-3
    assert coords.micrometres_per("furlong") is None
