"""Real neighbouring sections made ready for training (wsireg.run.sections)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wsireg.errors import InputError
from wsireg.run.sections import aligned_sections, without_marker
from wsireg.synthetic.slides import synthetic_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_green_marker_lines_become_glass_and_stains_stay() -> None:
    rgb = np.full((40, 40, 3), 255, np.uint8)
    rgb[5:35, 5] = (60, 230, 60)  # a green frame line
    rgb[10:20, 10:20] = (200, 40, 40)  # red blood cells
    rgb[25:30, 25:30] = (90, 60, 160)  # haematoxylin
    out = without_marker(rgb)
    assert (out[5:35, 4:7] == 255).all()
    assert np.array_equal(out[10:20, 10:20], rgb[10:20, 10:20])
    assert np.array_equal(out[25:30, 25:30], rgb[25:30, 25:30])


def test_neighbouring_sections_are_aligned_onto_the_earlier_one(tmp_path) -> None:
    first = np.asarray(synthetic_slide((320, 320), seed=3, texture_downsample=4.0))
    turn = cv2.getRotationMatrix2D((160.0, 160.0), 8.0, 1.0)
    turn[:, 2] += (12.0, -7.0)
    second = cv2.warpAffine(first, turn, (320, 320), borderValue=(255, 255, 255))
    paths = []
    for k, image in enumerate((first, second)):
        paths.append(tmp_path / f"section{k}.png")
        cv2.imwrite(str(paths[-1]), image[..., ::-1])
    ((earlier, later),) = aligned_sections(paths)
    inner = (slice(60, 260), slice(60, 260))
    before = np.abs(first[inner].astype(int) - second[inner].astype(int)).mean()
    after = np.abs(earlier[inner].astype(int) - later[inner].astype(int)).mean()
    assert after < 0.3 * before, (before, after)
    with pytest.raises(InputError, match="two sections"):
        aligned_sections(paths[:1])
