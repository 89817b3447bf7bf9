"""Real neighbouring sections made ready for training (the ``"sections"`` source of
:class:`wsireg.model.training_data.TrainingData`).

The images of consecutive sections (a list of files, in section order) are read whole at level
0, their glass made white (:func:`wsireg.core.stain.on_white_glass`) and green marker lines
(pen strokes or frames drawn around the tissue, as in ``../shared/data/serial-ihc``) turned into
glass; then
each section is aligned onto the previous one (and, with ``gap > 1``, onto those up to ``gap``
before it) by the affine initial alignment of ``wsireg register``
(:func:`wsireg.engine.align.align`) and resampled into its frame. What the affine leaves between
two sections is what the networks learn to find, with the paper's unsupervised loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from wsireg.core.stain import background_rgb, on_white_glass
from wsireg.engine.align import align
from wsireg.errors import InputError
from wsireg.io.slide import open_slide
from wsireg.model.training_data import SectionPair

__all__ = ["aligned_sections", "read_section", "without_marker"]

MARKER_EXCESS = 80
"""A pixel whose green exceeds both red and blue by more than this (uint8 grey levels) is
marker ink, not stain (red blood cells and blue haematoxylin are not markers; a green
counterstain such as Masson's light green is not expected in these training sections)."""

MAX_SIDE = 2048
"""Sections larger than this (longest side, pixels) are read at the first level below it."""


def without_marker(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` ``[y, x, 3]`` uint8 with green marker pixels (:data:`MARKER_EXCESS`) and their
    one-pixel rim turned white."""
    r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
    marker = (g - np.maximum(r, b)) > MARKER_EXCESS
    marker = cv2.dilate(marker.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    out = rgb.copy()
    out[marker] = 255
    return out


def read_section(path: str | Path) -> np.ndarray:
    """A section image as uint8 RGB ``[y, x, 3]`` on white glass without marker lines, at the
    finest level whose longest side is at most :data:`MAX_SIDE`."""
    with open_slide(path) as slide:
        level = next(
            (i for i in range(slide.level_count) if max(slide.level_shape(i)) <= MAX_SIDE),
            slide.level_count - 1,
        )
        h, w = slide.level_shape(level)
        rgb = slide.read(level, 0, 0, h, w)
    rgb = without_marker(rgb)
    return on_white_glass(rgb, tuple(background_rgb(rgb)))


def aligned_sections(paths: Sequence[str | Path], gap: int = 1) -> tuple[SectionPair, ...]:
    """Pairs ``(earlier, later)`` of the sections ``paths`` (section order) at most ``gap``
    apart, the later one affinely aligned onto the earlier one (white where it has no data)."""
    if len(paths) < 2:
        raise InputError(Path(paths[0]) if paths else Path("."), "need two sections or more")
    images = [read_section(p) for p in paths]
    pairs = []
    for i in range(len(images)):
        for j in range(i + 1, min(i + gap, len(images) - 1) + 1):
            pairs.append((images[i], _onto(images[j], images[i], str(paths[j]), str(paths[i]))))
    return tuple(pairs)


def _onto(source: np.ndarray, target: np.ndarray, source_name: str, target_name: str) -> np.ndarray:
    """``source`` resampled into ``target``'s frame by the affine that aligns them."""
    result = align(source, target, source_name=source_name, target_name=target_name)
    h, w = target.shape[:2]
    # the matrix maps target pixels to source pixels (pixel centres at integers, as OpenCV)
    return cv2.warpAffine(
        source,
        result.matrix[:2].astype(np.float64),
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255),
    )
