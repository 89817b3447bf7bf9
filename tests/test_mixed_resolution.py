"""Slides with different known pixel sizes (issue 18, item 1): the ANHIR rat-kidney pair written
as tiled TIFFs whose resolution tags say their pixel size, one slide resampled 2x / 4x / 8x
coarser than the other, must register as well as when both have the coarser pixel size.

The landmarks are moved onto each resampled grid exactly (:func:`wsireg.core.coords.from_level0`),
so the rTRE (relative to the target's diagonal) compares like with like. The default suite runs
the 2x ratios; the whole sweep is marked ``slow``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsireg.core.coords import from_level0
from wsireg.engine.align import align
from wsireg.io.annotations import read_landmarks
from wsireg.run.evaluate import rtre
from wsireg.run.register import register

#: Micrometres per pixel of the JPEGs as given (any value: only the ratios matter).
BASE_MPP = 1.0
#: Registration options: the defaults but no warped output.
OPTIONS = {"write_warped": False}
#: A mixed-resolution result may be this much worse than the same pair at equal pixel sizes.
TOLERANCE = 1.10


class KidneyPair:
    """The kidney pair written at chosen pixel sizes into ``root``; median rTRE per ratio."""

    def __init__(self, data: Path, root: Path) -> None:
        folder = data / "anhir-5pc" / "rat-kidney_" / "scale-5pc"
        self.source = np.asarray(
            Image.open(folder / "Rat-Kidney_PanCytokeratin.jpg").convert("RGB")
        )
        self.target = np.asarray(Image.open(folder / "Rat-Kidney_HE.jpg").convert("RGB"))
        source_points = read_landmarks(folder / "Rat-Kidney_PanCytokeratin.csv")
        target_points = read_landmarks(folder / "Rat-Kidney_HE.csv")
        n = min(len(source_points), len(target_points))
        self.source_points, self.target_points = source_points[:n], target_points[:n]
        self.root = root

    @functools.cache  # noqa: B019 - one object per test session
    def median_rtre(self, source_factor: int, target_factor: int) -> float:
        """Median rTRE of a registration of the source ``source_factor`` times and the target
        ``target_factor`` times coarser than the JPEGs."""
        source = write_resampled(
            self.source, source_factor, self.root / f"source-{source_factor}.tif"
        )
        target = write_resampled(
            self.target, target_factor, self.root / f"target-{target_factor}.tif"
        )
        out = self.root / f"out-{source_factor}-{target_factor}"
        result = register(source, target, out, **OPTIONS)
        mpp = result.report["target"]["mpp"]
        assert mpp == pytest.approx([BASE_MPP * target_factor] * 2, rel=1e-6)
        scale = result.report["alignment"]["physical_scale"]
        assert scale == pytest.approx(target_factor / source_factor)
        moved = np.asarray(from_level0(self.source_points, source_factor))
        expected = np.asarray(from_level0(self.target_points, target_factor))
        mapped = result.transform.map_points(moved, "source_to_target")
        diagonal = float(np.hypot(*result.report["target"]["size"]))
        return float(np.median(rtre(mapped, expected, diagonal)))


def write_resampled(image: np.ndarray, factor: int, path: Path) -> Path:
    """``image`` area-averaged ``factor`` times coarser, as a tiled TIFF whose resolution tags
    say so."""
    if not path.exists():
        h, w = image.shape[:2]
        small = image
        if factor > 1:
            size = (round(w / factor), round(h / factor))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mpp = BASE_MPP * factor
        tifffile.imwrite(
            path,
            small,
            tile=(128, 128),
            photometric="rgb",
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
        )
    return path


@pytest.fixture(scope="module")
def kidney(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> KidneyPair:
    return KidneyPair(shared_data, tmp_path_factory.mktemp("kidney"))


def check_ratio(kidney: KidneyPair, source_factor: int, target_factor: int) -> None:
    coarser = max(source_factor, target_factor)
    equal = kidney.median_rtre(coarser, coarser)
    mixed = kidney.median_rtre(source_factor, target_factor)
    unregistered = 0.02  # the pair's median rTRE without registration is 2.07 %
    assert mixed < TOLERANCE * equal and mixed < unregistered / 4, (mixed, equal)


@pytest.mark.parametrize(("source_factor", "target_factor"), [(2, 1), (1, 2)])
def test_a_twice_coarser_slide_registers_as_well_as_two_coarse_ones(
    kidney: KidneyPair, source_factor: int, target_factor: int
) -> None:
    check_ratio(kidney, source_factor, target_factor)


@pytest.mark.slow
@pytest.mark.parametrize(("source_factor", "target_factor"), [(4, 1), (1, 4), (8, 1), (1, 8)])
def test_four_and_eight_times_coarser_slides_both_ways(
    kidney: KidneyPair, source_factor: int, target_factor: int
) -> None:
    check_ratio(kidney, source_factor, target_factor)


def test_alignment_recovers_the_scale_between_pixel_sizes(shared_data: Path) -> None:
    """The affine alone (thumbnails at equal physical resolution, as ``register`` makes them):
    a source 4x coarser gives a level-0 scale of about 1/4, not about 1."""
    folder = shared_data / "anhir-5pc" / "rat-kidney_" / "scale-5pc"
    source = np.asarray(Image.open(folder / "Rat-Kidney_PanCytokeratin.jpg").convert("RGB"))
    target = np.asarray(Image.open(folder / "Rat-Kidney_HE.jpg").convert("RGB"))
    h, w = source.shape[:2]
    coarse = cv2.resize(source, (round(w / 4), round(h / 4)), interpolation=cv2.INTER_AREA)
    # the coarse source is level 0 of its slide; its thumbnail is it upsampled 4x (downsample 1/4)
    thumbnail = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    result = align(thumbnail, target, source_downsample=0.25, physical_scale=0.25)
    equal = align(source, target)
    scale = np.sqrt(abs(np.linalg.det(result.matrix[:2, :2])))
    assert scale == pytest.approx(np.sqrt(abs(np.linalg.det(equal.matrix[:2, :2]))) / 4, rel=0.05)
    points = read_landmarks(folder / "Rat-Kidney_HE.csv")[:20]
    homogeneous = np.c_[points, np.ones(len(points))]
    mapped = (result.matrix @ homogeneous.T).T[:, :2]
    reference = np.asarray(from_level0((equal.matrix @ homogeneous.T).T[:, :2], 4))
    assert np.median(np.linalg.norm(mapped - reference, axis=1)) < 2.0  # coarse source pixels
