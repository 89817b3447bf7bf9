"""Convert one level of any readable slide to a multiscale OME-Zarr or a pyramidal OME-TIFF.

The output format comes from ``fmt`` or from the output's suffix (:func:`output_format`); the
level is checked by :func:`wsireg.io.slide.check_level`; the output's pixel size is the slide's
``mpp`` times the level's downsample (:meth:`wsireg.io.slide.Slide.level_mpp`). The writers are
:func:`wsireg.io.ngff.write_ome_zarr` and :func:`wsireg.io.tiff.write_ome_tiff`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from wsireg.io.ngff import DEFAULT_ZARR_LAYOUT, ZarrLayout, write_ome_zarr
from wsireg.io.output import check_output, check_output_path
from wsireg.io.slide import Slide, check_level, open_slide
from wsireg.io.tiff import DEFAULT_TIFF_LAYOUT, TiffLayout, write_ome_tiff

#: Output formats, in the spelling of ``--format``.
FORMATS = ("ome-zarr", "ome-tiff")


def output_format(path: str | Path, given: str | None = None) -> str:
    """``given`` when set, else from ``path``'s suffix: ``.tif``/``.tiff`` -> ``"ome-tiff"``,
    anything else -> ``"ome-zarr"``."""
    if given:
        return given
    name = Path(path).name.lower()
    if name.endswith((".tif", ".tiff")):
        return "ome-tiff"
    return "ome-zarr"


def convert(
    slide: Slide | str | Path,
    out: str | Path,
    *,
    level: int = 0,
    fmt: str | None = None,
    zarr_layout: ZarrLayout = DEFAULT_ZARR_LAYOUT,
    tiff_layout: TiffLayout = DEFAULT_TIFF_LAYOUT,
    overwrite: bool = False,
) -> Path:
    """Write ``level`` of ``slide`` (a slide or its path) to ``out``; returns ``out``.

    An existing ``out`` is refused before the slide is opened (unless ``overwrite``). An
    OME-Zarr output is laid out as ``zarr_layout`` and named after the slide file; an OME-TIFF
    as ``tiff_layout``. A slide given as a path is opened here and closed at the end.
    """
    out = check_output(out, overwrite)
    with _opened(slide) as opened:
        check_output_path(out, [opened.path])
        check_level(opened.path, level, opened.level_count)
        image = opened.level(level)
        mpp = opened.level_mpp(level)
        if output_format(out, fmt) == "ome-tiff":
            write_ome_tiff(image, out, layout=tiff_layout, mpp=mpp, overwrite=overwrite)
        else:
            name = Path(opened.path).name
            write_ome_zarr(image, out, layout=zarr_layout, mpp=mpp, name=name, overwrite=overwrite)
    return out


def _opened(slide: Slide | str | Path) -> contextlib.AbstractContextManager[Slide]:
    """A context giving the slide: one opened here is closed on exit, a given one is not."""
    if isinstance(slide, Slide):
        return contextlib.nullcontext(slide)
    return open_slide(slide)
