"""Merge registered slides of one reference frame into one multichannel image.

Multiplexed imaging registers each round (or each serial section) onto one reference slide;
:func:`merge` writes the reference and the warped rounds as one multiscale OME-Zarr or pyramidal
OME-TIFF whose channels are every input's channels in order, at one dtype, named
``PREFIX NAME`` (:func:`channel_names`), out of core (level 0 chunk by chunk, then the pyramid).

The rules: every input has the level-0 size of the first (the reference frame); label images
are not merged (warp them on their own); the output dtype is the inputs' common dtype
(:func:`numpy.result_type`: uint8 and uint16 give uint16, values unchanged); brightfield RGB
contributes its red, green and blue; the pixel size is the first input's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np

from wsireg.errors import InputError
from wsireg.io.channels import Channels, fluorescence
from wsireg.io.convert import output_format
from wsireg.io.ngff import DEFAULT_ZARR_LAYOUT, ZarrLayout, write_ome_zarr
from wsireg.io.output import check_output, check_output_path
from wsireg.io.slide import Slide, open_slide
from wsireg.io.tiff import TiffLayout, write_ome_tiff

#: Extensions dropped from a file name to make its channel prefix.
_EXTENSIONS = re.compile(r"(\.ome)?\.(tiff?|zarr|svs|ndpi|png|jpe?g)$", re.IGNORECASE)


def slide_prefix(slide: Slide) -> str:
    """The channel prefix of ``slide``: the image name its file stores (an OME-Zarr's
    multiscale name or an OME-TIFF's first Image name, as ``wsireg warp`` writes the source's
    file name; not a writer's placeholder like ``Image0``), else its file name, without image
    extensions."""
    stored = slide.properties.get("ome-zarr.name") or _ome_image_name(
        slide.properties.get("ome.xml", "")
    )
    default = re.fullmatch(r"(Image:?\d*|None)?", stored)  # a writer's placeholder
    name = Path(slide.path).name if default else stored
    return _EXTENSIONS.sub("", name) or name


def _ome_image_name(xml: str) -> str:
    """The ``Name`` of the first ``Image`` of an OME-XML document ("" if none)."""
    found = re.search(r"<(?:\w+:)?Image\b[^>]*\bName=\"([^\"]*)\"", xml)
    return found.group(1) if found else ""


def channel_names(prefixes: Sequence[str], channels: Sequence[Channels]) -> list[str]:
    """``"PREFIX NAME"`` for every channel of every input; a prefix given twice gets
    ``#2``, ``#3``... after its first use, so names stay unique."""
    seen: dict[str, int] = {}
    names = []
    for prefix, info in zip(prefixes, channels, strict=True):
        seen[prefix] = seen.get(prefix, 0) + 1
        unique = prefix if seen[prefix] == 1 else f"{prefix}#{seen[prefix]}"
        names.extend(f"{unique} {name}" for name in info.names)
    return names


def merge(
    slides: Sequence[str | Path],
    out: str | Path,
    *,
    prefixes: Sequence[str] | None = None,
    fmt: str | None = None,
    chunk: int = DEFAULT_ZARR_LAYOUT.chunk,
    tile: int = 512,
    overwrite: bool = False,
) -> Path:
    """Write ``slides`` (paths; the reference first or any one of them) as one multichannel
    image at ``out`` (format from ``fmt`` or the suffix, :func:`output_format`): level 0 of
    each, channels in order, names prefixed by ``prefixes`` (default :func:`slide_prefix`).
    Raises :class:`InputError` naming the offending slide (another size, a label image) or
    the prefixes (not one per slide)."""
    if len(slides) < 2:
        raise InputError(out, "merge needs at least two slides")
    if prefixes is not None and len(prefixes) != len(slides):
        raise InputError(out, f"{len(prefixes)} prefixes for {len(slides)} slides")
    out = check_output(check_output_path(out, list(slides)), overwrite)
    opened = [open_slide(path) for path in slides]
    try:
        _check_merge(opened)
        infos = [slide.channels for slide in opened]
        names = channel_names(
            list(prefixes) if prefixes else [slide_prefix(s) for s in opened], infos
        )
        dtype = np.result_type(*(info.dtype for info in infos))
        colors = [color for info in infos for color in info.colors]
        merged = fluorescence(len(names), dtype, names, colors)
        image = _stacked(opened, dtype, chunk)
        if output_format(out, fmt) == "ome-tiff":
            layout = TiffLayout(tile=tile, compression="zlib")
            write_ome_tiff(
                image, out, layout=layout, mpp=opened[0].mpp, name=out.name,
                channel_info=merged, overwrite=overwrite,
            )  # fmt: skip
        else:
            layout = ZarrLayout(chunk=chunk)
            write_ome_zarr(
                image, out, layout=layout, mpp=opened[0].mpp, name=out.name,
                channel_info=merged, overwrite=overwrite,
            )  # fmt: skip
    finally:
        for slide in opened:
            slide.close()
    return out


def _check_merge(slides: Sequence[Slide]) -> None:
    """Every slide of the first one's level-0 size, none a label image."""
    reference = slides[0].level_shape(0)
    for slide in slides:
        if slide.channels.kind == "labels":
            raise InputError(slide.path, "is a label image: labels are not merged as channels")
        if slide.level_shape(0) != reference:
            h, w = slide.level_shape(0)
            raise InputError(
                slide.path,
                f"is {w} x {h} px but {slides[0].path} is {reference[1]} x {reference[0]} px: "
                "merge slides of one reference frame (the target and sources warped onto it)",
            )


def _stacked(slides: Sequence[Slide], dtype: np.dtype, chunk: int) -> da.Array:
    """Level 0 of every slide as stored, ``(H, W, sum C)`` of ``dtype``, on one chunk grid."""
    parts = [slide.channel_level(0).rechunk((chunk, chunk, -1)).astype(dtype) for slide in slides]
    return da.concatenate(parts, axis=2).rechunk((chunk, chunk, -1))
