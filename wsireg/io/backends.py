"""Slide backends: one private reader per format behind :class:`Backend`, and the rule that picks
one for a path (:func:`open_backend`; the formats are listed in :mod:`wsireg.io.slide`).

A backend knows its level shapes ``(H, W)``, native tile sides and :class:`Channels`
(:mod:`wsireg.io.channels`). A brightfield backend reads an in-bounds region of a level as
``(h, w, 3)`` uint8 RGB, transparent or missing pixels composited on white
(:func:`to_rgb_on_white`); every backend reads it as stored, ``(h, w, C)`` at the channels'
dtype (:meth:`Backend.read_native`): for brightfield that is the same RGB.
:class:`wsireg.io.slide.Slide` is the only user (a registered view,
:mod:`wsireg.engine.view`, gives it a backend whose pixels are computed).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt
import openslide
import tifffile
import zarr
from PIL import Image

from wsireg.core.coords import micrometres_per
from wsireg.errors import SlideError
from wsireg.io.channels import RGB, Channels, classify, color_from_ome
from wsireg.io.ngff import read_ome_zarr_levels

_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2"}
#: Largest image a plain (untiled) backend reads into memory: larger ones need a tiled format.
MAX_PLAIN_PIXELS = 1 << 30
#: Bytes of decoded tiles a slide keeps (see :class:`TileCache`).
TILE_CACHE_BYTES = 96 << 20
#: Longest side of the sample of a coarse level a backend classifies its channels on.
SAMPLE_SIDE = 2048


# --------------------------------------------------------------------------------------------
# Pixel helpers shared by the backends
# --------------------------------------------------------------------------------------------
def to_rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    """Convert ``(H, W)``, ``(H, W, 1|2|3|4)`` uint8 pixels to RGB, compositing alpha on white."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    if channels in (2, 4):  # grey+alpha or RGBA (straight alpha)
        colour = pixels[..., :-1]
        if channels == 2:
            colour = np.repeat(colour, 3, axis=-1)
        alpha = pixels[..., -1:]
        if alpha.min(initial=255) == 255:
            return np.ascontiguousarray(colour)
        a = alpha.astype(np.uint16)
        out = (colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return out.astype(np.uint8)
    if channels == 1:
        return np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels: integers by their top 8 bits, floats scaled from [0, 1] (or taken as
    0..255 when larger), NaN (no data) as white like every region without data."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.integer):
        shift = max(0, 8 * pixels.dtype.itemsize - 8)
        return (pixels >> shift).astype(np.uint8) if shift else pixels.astype(np.uint8)
    scale = 255.0 if float(np.nanmax(pixels, initial=0)) <= 1.0 else 1.0
    scaled = np.clip(np.nan_to_num(pixels, posinf=255.0, neginf=0.0) * scale, 0, 255)
    return np.where(np.isnan(pixels), 255.0, scaled).round().astype(np.uint8)


class TileCache:
    """A small LRU cache of decoded tiles, shared by the threads reading one slide.

    Neighbouring warp blocks read overlapping, misaligned source boxes: without it every tile
    under a box edge would be decoded two to four times. Bounded by ``capacity`` bytes
    (:data:`TILE_CACHE_BYTES`); two threads missing the same tile at once both decode it.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = TILE_CACHE_BYTES if capacity is None else capacity
        self._tiles: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[Hashable], np.ndarray]) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = load(key)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > self.capacity and len(self._tiles) > 1:
                    _, old = self._tiles.popitem(last=False)
                    self._bytes -= old.nbytes
        return tile


def read_tiles(
    box: tuple[int, int, int, int],
    tile: tuple[int, int],
    channels: int,
    get_tile: Callable[[int, int], np.ndarray],
    dtype: npt.DTypeLike = np.uint8,
) -> np.ndarray:
    """Pixels ``box = (y0, x0, h, w)`` (inside the grid) of a grid cut into ``tile = (th, tw)``
    tiles (those of the last row and column may be short), assembled from ``get_tile(ty, tx)``
    (the tile of row ``ty``, column ``tx``): ``(h, w, channels)`` of ``dtype``."""
    y0, x0, h, w = box
    th, tw = tile
    out = np.empty((h, w, channels), dtype)
    for ty in range(y0 // th, (y0 + h - 1) // th + 1):
        for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
            pixels = get_tile(ty, tx)
            ay, ax = ty * th, tx * tw
            sy0, sy1 = max(y0, ay), min(y0 + h, ay + pixels.shape[0])
            sx0, sx1 = max(x0, ax), min(x0 + w, ax + pixels.shape[1])
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[
                sy0 - ay : sy1 - ay, sx0 - ax : sx1 - ax
            ]
    return out


# --------------------------------------------------------------------------------------------
# Backends: each knows level shapes and reads an in-bounds region of a level as RGB uint8.
# --------------------------------------------------------------------------------------------
class Backend:
    """What :class:`wsireg.io.slide.Slide` asks of a format: shapes, pixels, metadata."""

    name = "?"
    vendor = "unknown"
    level_shapes: list[tuple[int, int]]
    tile_sides: list[int | None]
    channels: Channels = RGB

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """An in-bounds region as ``(h, w, 3)`` uint8 RGB (brightfield backends)."""
        raise NotImplementedError

    def read_native(
        self, level: int, y0: int, x0: int, h: int, w: int, channels: Sequence[int] | None = None
    ) -> np.ndarray:
        """An in-bounds region as stored: ``(h, w, c)`` at ``self.channels.dtype``, the
        ``channels`` given (indices; ``None``: all). Brightfield: :meth:`read`."""
        pixels = self.read(level, y0, x0, h, w)
        return pixels if channels is None else pixels[..., list(channels)]

    def properties(self) -> dict[str, str]:
        return {}

    def mpp(self) -> tuple[float, float] | None:
        return None

    def associated_names(self) -> list[str]:
        return []

    def associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        pass


class _OpenSlideBackend(Backend):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        self._osr = openslide.OpenSlide(str(path))
        self.vendor = self._osr.properties.get("openslide.vendor", "unknown")
        self.level_shapes = [(h, w) for w, h in self._osr.level_dimensions]
        props = self._osr.properties
        self.tile_sides = [
            _int_or_none(props.get(f"openslide.level[{i}].tile-width"))
            for i in range(self._osr.level_count)
        ]
        self._downsamples = list(self._osr.level_downsamples)

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        ds = self._downsamples[level]
        # OpenSlide divides the level-0 location by the downsample and truncates: ceil() lands
        # exactly on (x0, y0) whatever the (non-integer) downsample.
        location = (math.ceil(x0 * ds - 1e-9), math.ceil(y0 * ds - 1e-9))
        region = self._osr.read_region(location, level, (w, h))
        return to_rgb_on_white(np.asarray(region))

    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        x, y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        return _positive_pair(x, y)

    def associated_names(self) -> list[str]:
        return list(self._osr.associated_images)

    def associated(self, name: str) -> np.ndarray:
        return to_rgb_on_white(np.asarray(self._osr.associated_images[name]))

    def close(self) -> None:
        self._osr.close()


class _TifffileBackend(Backend):
    """What the tifffile backends share: the file's description, OME-XML and pixel size."""

    _tif: tifffile.TiffFile
    _series: tifffile.TiffPageSeries

    def properties(self) -> dict[str, str]:
        page = self._tif.pages[0]
        props = {"tiff.ImageDescription": page.description or ""}
        if self._tif.is_ome:
            props["ome.xml"] = self._tif.ome_metadata or ""
        return props

    def mpp(self) -> tuple[float, float] | None:
        if self._tif.is_ome:
            found = _ome_xml_mpp(self._tif.ome_metadata or "")
            if found:
                return found
        return _tiff_resolution_mpp(self._series.levels[0].pages[0])

    def close(self) -> None:
        self._tif.close()


class _TiffBackend(_TifffileBackend):
    """tifffile's zarr view of a tiled RGB pyramid: tiles decoded straight to RGB."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        self._tif = tifffile.TiffFile(str(path))
        try:
            series = self._tif.series[0]
            if series.dtype != np.uint8 or series.shape[-1] not in (3, 4) or series.ndim != 3:
                raise ValueError(f"series 0 is {series.shape} {series.dtype}, not RGB uint8")
            page = series.levels[0].pages[0]
            if not page.is_tiled:
                raise ValueError("not tiled")
            group = zarr.open(series.aszarr(), mode="r")
            self._levels = (
                [group[str(i)] for i in range(len(series.levels))]
                if isinstance(group, zarr.Group)
                else [group]
            )
            self.level_shapes = [tuple(a.shape[:2]) for a in self._levels]
            self.tile_sides = [int(lv.pages[0].tilewidth) or None for lv in series.levels]
            self._series = series
            self._tiles = TileCache()
            # Decode one tile now: a codec tifffile cannot decode falls back to OpenSlide.
            self._levels[-1][:16, :16]
        except Exception:
            self._tif.close()
            raise
        self.vendor = (
            "ome-tiff" if self._tif.is_ome else ("aperio" if self._tif.is_svs else "generic-tiff")
        )

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        array = self._levels[level]
        out = read_tiles(
            (y0, x0, h, w),
            array.chunks[:2],
            array.shape[2],
            lambda ty, tx: self._tiles.get((level, ty, tx), self._decode),
        )
        return to_rgb_on_white(out)

    def _decode(self, key: tuple[int, int, int]) -> np.ndarray:
        level, ty, tx = key
        array = self._levels[level]
        th, tw = array.chunks[:2]
        return np.asarray(array[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw])


class _MetadataFrom(Backend):
    """Pixels from one backend (fast), metadata and associated images from another."""

    def __init__(self, pixels: Backend, metadata: Backend) -> None:
        self._pixels, self._meta = pixels, metadata
        self.name = f"{pixels.name}+{metadata.name}-metadata"
        self.vendor = metadata.vendor
        self.level_shapes = pixels.level_shapes
        self.tile_sides = pixels.tile_sides
        self.channels = pixels.channels
        self.read = pixels.read  # type: ignore[method-assign]
        self.read_native = pixels.read_native  # type: ignore[method-assign]

    def properties(self) -> dict[str, str]:
        return self._meta.properties()

    def mpp(self) -> tuple[float, float] | None:
        return self._meta.mpp() or self._pixels.mpp()

    def associated_names(self) -> list[str]:
        return self._meta.associated_names()

    def associated(self, name: str) -> np.ndarray:
        return self._meta.associated(name)

    def close(self) -> None:
        self._pixels.close()
        self._meta.close()


class _NamedAxesBackend(Backend):
    """Levels held as arrays whose axes are named (``_axis_names``: ``y``, ``x``, ``c``, or
    anything else, read at its first plane): samples as stored, any dtype; RGB as 8 bits."""

    _levels: list[zarr.Array]
    _axis_names: list[str]

    def _sample(self) -> np.ndarray:
        """The centre of the coarsest level (:func:`centre_box`), what channels are
        classified on."""
        return self._block(len(self._levels) - 1, *centre_box(self.level_shapes[-1]), None)

    def _block(
        self, level: int, y0: int, x0: int, h: int, w: int, channels: Sequence[int] | None
    ) -> np.ndarray:
        return _axes_block(self._levels[level], self._axis_names, (y0, x0, h, w), channels)

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return to_rgb_on_white(_to_uint8(self._block(level, y0, x0, h, w, None)))

    def read_native(
        self, level: int, y0: int, x0: int, h: int, w: int, channels: Sequence[int] | None = None
    ) -> np.ndarray:
        if self.channels.kind == "brightfield":
            return super().read_native(level, y0, x0, h, w, channels)
        return self._block(level, y0, x0, h, w, channels)


class _OmeZarrBackend(_NamedAxesBackend):
    """The first multiscale image of an OME-Zarr; channels from ``omero`` (names, colours)
    and ``image-label`` (labels), classified by :func:`wsireg.io.channels.classify`."""

    name = "ome-zarr"
    vendor = "ome-zarr"

    def __init__(self, path: Path) -> None:
        self._arrays, self._meta = read_ome_zarr_levels(path)
        axes = [a["name"] if isinstance(a, dict) else a for a in self._meta.get("axes", [])]
        self._axes = [str(a).lower() for a in axes] or ["c", "y", "x"]
        if not {"y", "x"} <= set(self._axes):
            raise ValueError(f"multiscale axes {self._axes} have no y and x")
        self._levels, self._axis_names = self._arrays, self._axes
        self.level_shapes = [self._yx_shape(a) for a in self._arrays]
        self.tile_sides = [int(a.chunks[self._axes.index("x")]) for a in self._arrays]
        count = int(self._arrays[0].shape[self._axes.index("c")]) if "c" in self._axes else 1
        omero = (self._meta.get("omero") or {}).get("channels") or []
        names = [c.get("label") for c in omero if isinstance(c, dict)][:count]
        colors = [c.get("color") for c in omero if isinstance(c, dict)][:count]
        self.channels = classify(
            self._arrays[0].dtype,
            count,
            self._sample(),
            names,
            colors,
            declared_labels=_declares_labels(path),
        )

    def _yx_shape(self, array: zarr.Array) -> tuple[int, int]:
        return (int(array.shape[self._axes.index("y")]), int(array.shape[self._axes.index("x")]))

    def mpp(self) -> tuple[float, float] | None:
        scale = self._meta.get("scale_um")
        return tuple(scale) if scale else None  # type: ignore[return-value]

    def properties(self) -> dict[str, str]:
        return {
            "ome-zarr.version": str(self._meta.get("version", "")),
            "ome-zarr.name": str(self._meta.get("name", "")),
        }


def _declares_labels(path: Path) -> bool:
    """Whether the image group (or its bioformats2raw image ``0``) has ``image-label``."""
    with contextlib.suppress(Exception):
        root = zarr.open_group(str(path), mode="r")
        for group in (root, root.get("0")):
            if isinstance(group, zarr.Group):
                attrs = group.attrs.asdict()
                if "image-label" in attrs.get("ome", attrs):
                    return True
    return False


class _ChannelTiffBackend(_TifffileBackend, _NamedAxesBackend):
    """A TIFF / OME-TIFF whose samples are not RGB uint8 (fluorescence, labels, grey): the
    series 0 pyramid through tifffile's zarr view, any dtype, tiled or striped. Axes: ``Y``,
    ``X``, and one channel axis (``C``, ``S``, or another axis of several planes); other axes
    (``T``, ``Z``) at their first plane. Channel names and colours from the OME-XML."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        self._tif = tifffile.TiffFile(str(path))
        try:
            series = self._tif.series[0]
            self._axes = series.axes.upper()
            self._channel_axis = _channel_axis(self._axes, series.shape)
            group = zarr.open(series.aszarr(), mode="r")
            self._levels = (
                [group[str(i)] for i in range(len(series.levels))]
                if isinstance(group, zarr.Group)
                else [group]
            )
            self._axis_names = [
                "c" if i == self._channel_axis else {"Y": "y", "X": "x"}.get(a, "plane")
                for i, a in enumerate(self._axes)
            ]
            y, x = self._axes.index("Y"), self._axes.index("X")
            self.level_shapes = [(int(a.shape[y]), int(a.shape[x])) for a in self._levels]
            page = series.levels[0].pages[0]
            self.tile_sides = [
                (int(lv.pages[0].tilewidth) or None) if lv.pages[0].is_tiled else None
                for lv in series.levels
            ]
            count = 1 if self._channel_axis is None else int(series.shape[self._channel_axis])
            names, colors = _ome_channels(self._tif.ome_metadata if self._tif.is_ome else None)
            self.channels = classify(
                series.dtype,
                count,
                self._sample(),
                names[:count] if len(names) >= count else (),
                colors[:count] if len(colors) >= count else (),
                interleaved_rgb=page.photometric in (2, 6) and self._channel_axis is not None,
            )
            self._series = series
        except Exception:
            self._tif.close()
            raise
        self.vendor = "ome-tiff" if self._tif.is_ome else "generic-tiff"


def centre_box(shape: tuple[int, int], side: int = SAMPLE_SIDE) -> tuple[int, int, int, int]:
    """``(y0, x0, h, w)``: the centre of a level of ``shape``, at most ``side`` a side (what
    a coarse level is sampled on)."""
    h, w = shape
    sh, sw = min(h, side), min(w, side)
    return (h - sh) // 2, (w - sw) // 2, sh, sw


def _axes_block(
    array: zarr.Array,
    axes: Sequence[str],
    box: tuple[int, int, int, int],
    channels: Sequence[int] | None,
) -> np.ndarray:
    """``box = (y0, x0, h, w)`` of an array whose axes are named ``y``, ``x``, ``c`` (the
    ``channels`` given, ``None``: all) or anything else (its first plane): ``(h, w, c)``."""
    y0, x0, h, w = box
    index: list[slice | int | list[int]] = []
    for axis in axes:
        if axis == "y":
            index.append(slice(y0, y0 + h))
        elif axis == "x":
            index.append(slice(x0, x0 + w))
        elif axis == "c":
            index.append(slice(None) if channels is None else list(channels))
        else:
            index.append(0)
    block = np.asarray(array.oindex[tuple(index)])
    kept = [a for a in axes if a in ("c", "y", "x")]
    if "c" not in kept:
        return block[..., None] if kept == ["y", "x"] else block.T[..., None]
    return np.moveaxis(block, [kept.index("y"), kept.index("x"), kept.index("c")], [0, 1, 2])


def _channel_axis(axes: str, shape: Sequence[int]) -> int | None:
    """Index of the channel axis of a tifffile series: ``C`` or ``S`` (not both with several
    planes), else the one other axis of several planes, else ``None`` (one channel)."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"series axes {axes} have no Y and X")
    several = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    named = [i for i in several if axes[i] in "CS"]
    if len(named) == 1 and len(several) <= 2:
        return named[0]
    if not named and len(several) == 1:
        return several[0]
    if not several:
        return None
    raise ValueError(f"series axes {axes} {tuple(shape)}: more than one axis of several planes")


def _ome_channels(xml: str | None) -> tuple[list[str | None], list[str | None]]:
    """Names and colours (``RRGGBB``) of the Channel elements of the first OME Image."""
    if not xml:
        return [], []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return [], []
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            found = [c for c in element if c.tag.endswith("Channel")]
            return (
                [c.get("Name") for c in found],
                [color_from_ome(c.get("Color")) for c in found],
            )
    return [], []


class _PlainImageBackend(Backend):
    """Small untiled images (PNG, JPEG, flat TIFF): read whole once, then sliced in memory."""

    name = "plain"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pixels = _read_plain(path)
        self.level_shapes = [tuple(self._pixels.shape[:2])]
        self.tile_sides = [None]
        self.vendor = path.suffix.lower().lstrip(".") or "image"

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self._pixels[y0 : y0 + h, x0 : x0 + w]


def _read_plain(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        pixels = tifffile.imread(str(path), maxworkers=1)
        if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
            pixels = np.moveaxis(pixels, 0, -1)
        if pixels.ndim > 3:
            raise ValueError(f"unsupported image shape {pixels.shape}")
    else:
        pixels = _read_with_pillow(path)
    if pixels.size == 0:
        raise ValueError(f"image has zero size {pixels.shape}")
    return to_rgb_on_white(_to_uint8(pixels))


def _read_with_pillow(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = MAX_PLAIN_PIXELS
        with Image.open(path) as image:
            if image.width * image.height > MAX_PLAIN_PIXELS:
                raise ValueError("too large for an untiled image: convert it to a tiled TIFF")
            if image.mode.startswith("I;16") or image.mode == "I":
                return _sixteen_bit_grey(np.asarray(image))
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            return np.asarray(image)


def _sixteen_bit_grey(pixels: np.ndarray) -> np.ndarray:
    """Pillow's 16-bit grey modes (``I;16*``, and ``I`` holding 16-bit values) as uint16."""
    if pixels.dtype != np.uint16 and (pixels.min(initial=0) < 0 or pixels.max(initial=0) > 65535):
        raise ValueError(f"grey values beyond 16 bits ({pixels.min()}..{pixels.max()})")
    return pixels.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------
_BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "openslide": _OpenSlideBackend,
    "tifffile": _TiffBackend,
    "ome-zarr": _OmeZarrBackend,
    "plain": _PlainImageBackend,
}


def open_backend(path: Path, backend: str | None = None) -> Backend:
    """The reader of ``path``: the one named ``backend``, else the best one for the file.

    A directory is an OME-Zarr image; a plain-image suffix is read whole; anything else is tried
    with OpenSlide and, for TIFF files, tifffile (:func:`_prefer` decides between the two), and
    a flat TIFF neither takes is read whole. Raises :class:`SlideError` naming the file.
    """
    _check_path(path)
    if backend is not None:
        return _open_named(path, backend)
    if path.is_dir():
        return _open_or_fail(path, _OmeZarrBackend, "not a readable OME-Zarr image")
    suffix = _suffix(path)
    if suffix in _PLAIN_SUFFIXES:
        return _open_or_fail(path, _PlainImageBackend, "cannot read image")
    return _open_tiled(path, suffix)


def _open_named(path: Path, backend: str) -> Backend:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(_BACKENDS)}")
    return _open_or_fail(path, _BACKENDS[backend], f"not readable with {backend}")


def _open_or_fail(path: Path, opener: Callable[[Path], Backend], problem: str) -> Backend:
    try:
        return opener(path)
    except Exception as exc:
        raise SlideError(path, f"{problem}: {exc}") from exc


def _open_tiled(path: Path, suffix: str) -> Backend:
    failures: list[str] = []
    openslide_backend = _try(_OpenSlideBackend, path, "OpenSlide", failures)
    is_tiff = _looks_like_tiff(path)
    tiff_backend = _try(_TiffBackend, path, "tifffile", failures) if is_tiff else None
    if tiff_backend is None and is_tiff:
        channel_backend = _try(_ChannelTiffBackend, path, "tifffile", failures)
        if channel_backend is not None and channel_backend.channels.kind != "brightfield":
            if openslide_backend is not None:
                openslide_backend.close()  # it would show these samples as RGB
            return channel_backend
        if channel_backend is not None:
            channel_backend.close()
    chosen = _prefer(tiff_backend, openslide_backend)
    if chosen is not None:
        return chosen
    if suffix in (".tif", ".tiff"):  # a flat (untiled) TIFF neither tiled reader takes
        plain = _try(_PlainImageBackend, path, "image", failures)
        if plain is not None:
            return plain
    reason = "; ".join(failures) if failures else "unknown format"
    raise SlideError(path, f"not a readable slide ({reason})")


def _try(
    opener: Callable[[Path], Backend], path: Path, label: str, failures: list[str]
) -> Backend | None:
    """``opener(path)``, or ``None`` with ``"label: problem"`` appended to ``failures``."""
    try:
        return opener(path)
    except Exception as exc:
        failures.append(f"{label}: {exc}")
        return None


def _prefer(tiff: Backend | None, osr: Backend | None) -> Backend | None:
    """tifffile pixels with OpenSlide metadata when both see the same levels; otherwise the one
    that sees more levels (closing the other), or the only one that opened."""
    if tiff is None or osr is None:
        return tiff or osr
    if tiff.level_shapes == osr.level_shapes:
        return _MetadataFrom(tiff, osr)
    if len(tiff.level_shapes) > len(osr.level_shapes):
        osr.close()  # e.g. an OME-TIFF SubIFD pyramid OpenSlide cannot see
        return tiff
    tiff.close()
    return osr


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup")
    )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def _check_path(path: Path) -> None:
    if not path.exists():
        raise SlideError(path, "no such file or directory")
    if path.is_dir() and not _is_zarr_dir(path):
        raise SlideError(path, "is a directory, not a slide (nor an OME-Zarr image)")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "empty file")


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------------------------
def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _positive_pair(x: str | float | None, y: str | float | None) -> tuple[float, float] | None:
    try:
        fx, fy = float(x), float(y)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if fx > 0 and fy > 0 and math.isfinite(fx) and math.isfinite(fy):
        return (fx, fy)
    return None


def _ome_xml_mpp(xml: str) -> tuple[float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels"):
            x, y = element.get("PhysicalSizeX"), element.get("PhysicalSizeY")
            fx = micrometres_per(element.get("PhysicalSizeXUnit", "µm"))
            fy = micrometres_per(element.get("PhysicalSizeYUnit", "µm"))
            if x and y and fx and fy:
                return _positive_pair(float(x) * fx, float(y) * fy)
            return None
    return None


def _tiff_resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if unit is None or xres is None or yres is None:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
    if um_per_unit is None:
        return None
    try:
        rx, ry = Fraction(*xres.value), Fraction(*yres.value)
        return _positive_pair(um_per_unit / float(rx), um_per_unit / float(ry))
    except (ZeroDivisionError, TypeError, ValueError):
        return None
