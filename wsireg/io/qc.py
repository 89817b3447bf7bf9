"""Quality-control pictures and tissue overlap of a registration, at a viewable size.

Pictures are ``(H, W, 3)`` uint8 RGB on the target grid at a thumbnail downsample:

* checkerboard: squares alternate between the target and the warped source;
* overlay: the target's stain amount in magenta, the warped source's in green (where they
  coincide the tissue is grey/white-ish; misalignment shows as coloured fringes);
* deformation grid: a square grid carried by the nonrigid field, drawn on the target
  (:func:`deformation_grid`): straight lines where the field is a translation, bent where it
  deforms, crossing where it folds.

The tissue overlap is the Dice coefficient of their tissue masks (:func:`tissue_overlap`). The
similarity a registration reports is the alignment's local NCC
(:func:`wsireg.engine.align.similarity_on_grid`, computed on these pictures by
:mod:`wsireg.run.register`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wsireg.core.stain import od_magnitude_rgb, tissue_mask
from wsireg.errors import WsiregError


def checkerboard(target: np.ndarray, warped: np.ndarray, squares: int = 8) -> np.ndarray:
    """Alternate ``squares`` x ``squares`` (along the longest side) tiles of both images."""
    h, w = target.shape[:2]
    side = max(1, max(h, w) // squares)
    yy, xx = np.mgrid[0:h, 0:w]
    pick = ((yy // side + xx // side) % 2).astype(bool)
    return np.where(pick[..., None], warped, target)


def overlay(target: np.ndarray, warped: np.ndarray) -> np.ndarray:
    """Target's stain amount in magenta, the warped source's in green, on black."""
    t = _normalised(od_magnitude_rgb(target))
    s = _normalised(od_magnitude_rgb(warped))
    return (np.stack([t, s, t], -1) * 255).round().astype(np.uint8)


def _normalised(values: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(values, 99.5)) or 1.0
    return np.clip(values / hi, 0, 1)


def tissue_overlap(target: np.ndarray, warped: np.ndarray) -> float:
    """Dice coefficient of the tissue masks (:func:`wsireg.core.stain.tissue_mask`) of the
    two images, in [0, 1]; 0 when either has no tissue."""
    try:
        a, b = tissue_mask(target), tissue_mask(warped)
    except WsiregError:  # no tissue on one side
        return 0.0
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 0.0


def deformation_grid(target: np.ndarray, moved: np.ndarray, spacing: float) -> np.ndarray:
    """``target`` ``(H, W, 3)`` dimmed, with red lines where ``moved`` ``(2, H, W)`` (the
    positions ``x + u(x)`` of the picture's pixels, x then y, any unit) crosses a multiple of
    ``spacing`` (same unit) between neighbouring pixels: the grid of lines ``spacing`` apart,
    carried by the field."""
    cells = np.floor(np.asarray(moved, dtype=np.float64) / spacing)
    line = np.zeros(target.shape[:2], dtype=bool)
    for axis in (-2, -1):
        steps = np.diff(cells, axis=axis) != 0
        edge = steps.any(axis=0)
        if axis == -2:
            line[1:] |= edge
        else:
            line[:, 1:] |= edge
    picture = (target.astype(np.float32) * 0.6 + 255 * 0.4).astype(np.uint8)
    picture[line] = (220, 30, 30)
    return picture


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write ``rgb`` as PNG at zlib's fastest level (QC pictures are written by every run)."""
    path = Path(path)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, compress_level=1)
    return path


def write_qc(directory: str | Path, target: np.ndarray, stages: dict[str, np.ndarray]) -> Path:
    """Write ``checkerboard-<stage>.png`` and ``overlay-<stage>.png`` for each warped source
    of ``stages`` (e.g. before / affine / final) plus ``target.png``; returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_png(directory / "target.png", target)
    for name, warped in stages.items():
        save_png(directory / f"checkerboard-{name}.png", checkerboard(target, warped))
        save_png(directory / f"overlay-{name}.png", overlay(target, warped))
    return directory
