"""``wsireg deform``: a slide seen through a known random deformation, and its truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from wsireg.engine.transform import SlideRef, Transform, create_field
from wsireg.engine.warp import WarpOptions, warp
from wsireg.io.convert import output_format
from wsireg.io.output import check_output
from wsireg.io.slide import open_slide
from wsireg.synthetic.deformation import SmoothDeformation


def deformation_transform(
    deformation: SmoothDeformation,
    slide_ref: SlideRef,
    field_downsample: float = 8.0,
    path: str | Path | None = None,
) -> Transform:
    """The transform (target -> source) of ``deformation`` on the grid of ``slide_ref`` (both
    frames), its field sampled band by band at ``field_downsample`` (in memory, or in a zarr
    at ``path``)."""
    h, w = slide_ref.shape
    shape = (math.ceil(h / field_downsample), math.ceil(w / field_downsample))
    fld = (
        np.zeros((2, *shape), np.float32)
        if path is None
        else create_field(path, shape, field_downsample)
    )
    xs = field_downsample * (np.arange(shape[1]) + 0.5) - 0.5
    for r0 in range(0, shape[0], 256):
        ys = field_downsample * (np.arange(r0, min(r0 + 256, shape[0])) + 0.5) - 0.5
        pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        band = deformation.displacement(pts).reshape(len(ys), len(xs), 2).transpose(2, 0, 1)
        fld[:, r0 : r0 + len(ys)] = band.astype(np.float32)
    return Transform.from_field(deformation.affine, fld, field_downsample, slide_ref, slide_ref)


def deform_slide(
    slide_path: str | Path,
    out: str | Path,
    *,
    rotation: float = 0.0,
    max_displacement: float | None = None,
    scale: float | None = None,
    flip: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``out`` (an OME-TIFF or OME-Zarr, by suffix): the slide at ``slide_path`` seen
    through a known random deformation (rotation about the centre, optional mirror, smooth
    nonrigid part of ``max_displacement`` level-0 px, default 0.5 % of the shorter side), and
    the truth as a transform directory ``<out>.truth`` mapping the new slide (target) to the
    original (source) -- exactly what registering the original onto ``out`` must recover.

    Done out of core by the warp engine, so any slide size works. Returns ``(out, truth)``.
    """
    out = Path(out)
    truth_dir = out.with_name(out.name + ".truth")
    check_output(out, overwrite)
    check_output(truth_dir, overwrite)
    slide = open_slide(slide_path)
    ref = SlideRef.from_slide(slide)
    if max_displacement is None:
        max_displacement = 0.005 * min(ref.shape)
    deformation = SmoothDeformation.random(
        ref.shape, max_displacement, scale, rotation=rotation, flip=flip, seed=seed
    )
    downsample = float(max(1, 2 ** math.floor(math.log2(max(1.0, min(ref.shape) / 512)))))
    truth = deformation_transform(deformation, ref, downsample)
    truth.save(truth_dir, overwrite=overwrite)
    warp(truth_dir, slide, out, WarpOptions(fmt=output_format(out)), overwrite=overwrite)
    return out, truth_dir
