"""Convert one level of any readable slide to a multiscale OME-Zarr or a pyramidal OME-TIFF.

The output format comes from ``fmt`` or from the output's suffix (:func:`output_format`); the
level is checked by :func:`wsireg.io.slide.check_level`; the output's pixel size is the slide's
``mpp`` times the level's downsample (:meth:`wsireg.io.slide.Slide.level_mpp`). The writers are
:func:`wsireg.io.ngff.write_ome_zarr` and :func:`wsireg.io.tiff.write_ome_tiff`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from wsireg.errors import InputError, SlideError
from wsireg.io.channels import Channels
from wsireg.io.extras import SlideExtras
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
    channels: Sequence[str | int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``level`` of ``slide`` (a slide or its path) to ``out``; returns ``out``.

    An existing ``out`` is refused before the slide is opened (unless ``overwrite``). An
    OME-Zarr output is laid out as ``zarr_layout``, an OME-TIFF as ``tiff_layout``; either is
    named after the slide file and keeps its associated images and vendor properties
    (:func:`slide_extras`, stored as :mod:`wsireg.io.extras` says). The samples are written
    as stored (:meth:`Slide.channel_level`): brightfield as RGB, fluorescence and labels at
    their dtype with their names, ``channels`` (names or indices) a selection of a
    fluorescence slide's. A slide given as a path is opened here and closed at the end.
    """
    out = check_output(out, overwrite)
    with _opened(slide) as opened:
        check_output_path(out, [opened.path])
        check_level(opened.path, level, opened.level_count)
        info, indices = written_channels(opened, channels)
        tiff = output_format(out, fmt) == "ome-tiff"
        if tiff:
            check_compression(opened, info, tiff_layout.compression)
        image = opened.level(level) if indices is None else opened.channel_level(level, indices)
        mpp, name, extras = opened.level_mpp(level), Path(opened.path).name, slide_extras(opened)
        if tiff:
            write_ome_tiff(
                image,
                out,
                layout=tiff_layout,
                mpp=mpp,
                name=name,
                extras=extras,
                channel_info=info,
                overwrite=overwrite,
            )
        else:
            write_ome_zarr(
                image,
                out,
                layout=zarr_layout,
                mpp=mpp,
                name=name,
                extras=extras,
                channel_info=info,
                overwrite=overwrite,
            )
    return out


def written_channels(
    slide: Slide, channels: Sequence[str | int] | None
) -> tuple[Channels, list[int] | None]:
    """What a copy of ``slide`` holds: its channels (``channels`` selected, by name or index)
    and their indices as stored (``None``: brightfield RGB, read as :meth:`Slide.level`).
    A selection of a brightfield slide's channels is an :class:`InputError`."""
    info = slide.channels
    if info.kind == "brightfield":
        if channels is not None:
            raise InputError(
                slide.path, "is brightfield RGB: its channels are written together (no --channels)"
            )
        return info, None
    indices = (
        list(range(info.count))
        if channels is None
        else info.resolve_many(channels, str(slide.path))
    )
    return info.select(indices), indices


def check_compression(slide: Slide, info: Channels, compression: str) -> None:
    """JPEG (lossy, 8-bit) only for brightfield RGB: otherwise an :class:`InputError` naming
    ``slide``, whose channels ``info`` are written."""
    if compression == "jpeg" and info.kind != "brightfield":
        raise InputError(
            slide.path,
            f"is {info.kind} ({info.dtype}): JPEG is lossy and 8-bit, only for brightfield RGB; "
            "use zlib, zstd or none",
        )


def default_tiff_compression(slide: Slide) -> str:
    """The OME-TIFF compression of a copy of ``slide``: ``"jpeg"`` for brightfield RGB,
    lossless ``"zlib"`` for fluorescence and labels."""
    return "jpeg" if slide.channels.kind == "brightfield" else "zlib"


def slide_extras(slide: Slide) -> SlideExtras:
    """The associated images (read when the writer asks, after the pyramid; a failed read is a
    :class:`~wsireg.errors.SlideError` naming the slide) and the vendor properties of
    ``slide``."""
    properties = {str(k): str(v) for k, v in slide.properties.items()}
    return SlideExtras(_AssociatedImages(slide), properties)


class _AssociatedImages(Mapping[str, np.ndarray]):
    """The associated images of a slide, read on access; errors name the slide."""

    def __init__(self, slide: Slide) -> None:
        self._slide = slide
        self._names = list(slide.associated_images)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._slide.associated_images[name])
        except SlideError:
            raise
        except Exception as exc:  # a reader's own error type: named as the slide's
            raise SlideError(
                self._slide.path,
                f"cannot read the associated image {name!r}: {type(exc).__name__}: {exc}",
            ) from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _opened(slide: Slide | str | Path) -> contextlib.AbstractContextManager[Slide]:
    """A context giving the slide: one opened here is closed on exit, a given one is not."""
    if isinstance(slide, Slide):
        return contextlib.nullcontext(slide)
    return open_slide(slide)
