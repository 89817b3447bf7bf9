"""Slide I/O: one small reader class with an OpenSlide-like face and lazy chunked levels.

:func:`open_slide` picks a backend for a path:

* **tifffile** (zarr view of the TIFF tiles) for tiled RGB TIFF/SVS/OME-TIFF whose tiles it can
  decode: no RGBA round trip, the fastest path. Metadata still come from OpenSlide when it can
  open the file (vendor, properties, associated images);
* **OpenSlide** for the other vendor formats (.svs with unusual codecs, .ndpi, .mrxs, .scn, .bif,
  DICOM, generic tiled TIFF);
* **OME-Zarr** (our own outputs, and other NGFF images);
* **plain images** (PNG, JPEG, flat TIFF, ...) read whole, for small ANHIR-style images.

Every level is exposed as a lazy dask array ``(H, W, 3)`` uint8 RGB (axes and units as in
:mod:`wsireg.core.coords`); transparent or missing regions read as white, whatever the backend.
Slicing ``slide.level(0)[y0:y1, x0:x1]`` reads only the tiles it touches. Errors are
:class:`~wsireg.errors.SlideError` with a one-line message naming the file.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Mapping
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from wsireg.core.coords import micrometres_per
from wsireg.errors import SlideError

#: Preferred side of a dask chunk of a level, rounded to a multiple of the native tile size.
CHUNK = 1024

_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".qptiff"}
#: Largest image a plain (untiled) backend reads into memory: larger ones need a tiled format.
MAX_PLAIN_PIXELS = 1 << 30


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
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.integer):
        shift = max(0, 8 * pixels.dtype.itemsize - 8)
        return (pixels >> shift).astype(np.uint8) if shift else pixels.astype(np.uint8)
    scale = 255.0 if float(np.nanmax(pixels, initial=0)) <= 1.0 else 1.0
    return np.clip(np.nan_to_num(pixels) * scale, 0, 255).round().astype(np.uint8)


def _chunk_side(tile: int | None) -> int:
    """A dask chunk side near :data:`CHUNK` that is a multiple of the native tile side."""
    if not tile or tile <= 0:
        return CHUNK
    return tile * max(1, round(CHUNK / tile))


class TileCache:
    """A small LRU cache of decoded tiles, shared by the threads reading one slide.

    Neighbouring warp blocks read overlapping, misaligned source boxes: without it every tile
    under a box edge would be decoded two to four times. Bounded by ``capacity`` bytes
    (:data:`TILE_CACHE_BYTES`); two threads missing the same tile at once both decode it.
    """

    def __init__(self, capacity: int | None = None) -> None:
        from collections import OrderedDict

        self.capacity = TILE_CACHE_BYTES if capacity is None else capacity
        self._tiles: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[Any], np.ndarray]) -> np.ndarray:
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


#: Bytes of decoded tiles a slide keeps (see :class:`TileCache`).
TILE_CACHE_BYTES = 96 << 20


# --------------------------------------------------------------------------------------------
# Backends: each knows level shapes and reads an in-bounds region of a level as RGB uint8.
# --------------------------------------------------------------------------------------------
class _Backend:
    name = "?"
    vendor = "unknown"
    level_shapes: list[tuple[int, int]]
    tile_sides: list[int | None]

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

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


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

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


class _TiffBackend(_Backend):
    """tifffile's zarr view of a tiled RGB pyramid: tiles decoded straight to RGB."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

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
        th, tw = array.chunks[:2]
        out = np.empty((h, w, array.shape[2]), np.uint8)
        for ty in range(y0 // th, (y0 + h - 1) // th + 1):
            for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
                tile = self._tiles.get((level, ty, tx), self._decode)
                ay, ax = ty * th, tx * tw
                sy0, sy1 = max(y0, ay), min(y0 + h, ay + tile.shape[0])
                sx0, sx1 = max(x0, ax), min(x0 + w, ax + tile.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ay : sy1 - ay, sx0 - ax : sx1 - ax
                ]
        return to_rgb_on_white(out)

    def _decode(self, key: tuple[int, int, int]) -> np.ndarray:
        level, ty, tx = key
        array = self._levels[level]
        th, tw = array.chunks[:2]
        return np.asarray(array[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw])

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


class _MetadataFrom(_Backend):
    """Pixels from one backend (fast), metadata and associated images from another."""

    def __init__(self, pixels: _Backend, metadata: _Backend) -> None:
        self._pixels, self._meta = pixels, metadata
        self.name = f"{pixels.name}+{metadata.name}-metadata"
        self.vendor = metadata.vendor
        self.level_shapes = pixels.level_shapes
        self.tile_sides = pixels.tile_sides
        self.read = pixels.read  # type: ignore[method-assign]

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


class _OmeZarrBackend(_Backend):
    name = "ome-zarr"
    vendor = "ome-zarr"

    def __init__(self, path: Path) -> None:
        from wsireg.io.ngff import read_ome_zarr_levels

        self._arrays, self._meta = read_ome_zarr_levels(path)
        axes = [a["name"] if isinstance(a, dict) else a for a in self._meta.get("axes", [])]
        self._axes = [str(a).lower() for a in axes] or ["c", "y", "x"]
        if not {"y", "x"} <= set(self._axes):
            raise ValueError(f"multiscale axes {self._axes} have no y and x")
        self.level_shapes = [self._yx_shape(a) for a in self._arrays]
        self.tile_sides = [int(a.chunks[self._axes.index("x")]) for a in self._arrays]

    def _yx_shape(self, array: Any) -> tuple[int, int]:
        return (int(array.shape[self._axes.index("y")]), int(array.shape[self._axes.index("x")]))

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        array = self._arrays[level]
        index: list[Any] = []
        for axis in self._axes:
            if axis == "y":
                index.append(slice(y0, y0 + h))
            elif axis == "x":
                index.append(slice(x0, x0 + w))
            elif axis == "c":
                index.append(slice(None))
            else:  # t, z: first plane
                index.append(0)
        block = np.asarray(array[tuple(index)])
        kept = [a for a in self._axes if a in ("c", "y", "x")]
        if "c" not in kept:
            block = block[None] if kept == ["y", "x"] else block
            kept = ["c", "y", "x"]
        block = np.moveaxis(block, [kept.index("y"), kept.index("x"), kept.index("c")], [0, 1, 2])
        return to_rgb_on_white(_to_uint8(block))

    def mpp(self) -> tuple[float, float] | None:
        scale = self._meta.get("scale_um")
        return tuple(scale) if scale else None  # type: ignore[return-value]

    def properties(self) -> dict[str, str]:
        return {
            "ome-zarr.version": str(self._meta.get("version", "")),
            "ome-zarr.name": str(self._meta.get("name", "")),
        }


class _PlainImageBackend(_Backend):
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
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        pixels = tifffile.imread(str(path), maxworkers=1)
        if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
            pixels = np.moveaxis(pixels, 0, -1)
        if pixels.ndim > 3:
            raise ValueError(f"unsupported image shape {pixels.shape}")
    else:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_PLAIN_PIXELS
            with Image.open(path) as image:
                if image.width * image.height > MAX_PLAIN_PIXELS:
                    raise ValueError("too large for an untiled image: convert it to a tiled TIFF")
                if image.mode not in ("RGB", "RGBA", "L", "LA"):
                    image = image.convert("RGBA")
                pixels = np.asarray(image)
    if pixels.size == 0:
        raise ValueError(f"image has zero size {pixels.shape}")
    return to_rgb_on_white(_to_uint8(pixels))


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------
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


_FORCED = {
    "openslide": lambda p: _OpenSlideBackend(p),
    "tifffile": lambda p: _TiffBackend(p),
    "ome-zarr": lambda p: _OmeZarrBackend(p),
    "plain": lambda p: _PlainImageBackend(p),
}


def _open_backend(path: Path, backend: str | None = None) -> _Backend:
    _check_path(path)
    if backend is not None:
        if backend not in _FORCED:
            raise ValueError(f"unknown backend {backend!r}; choose from {sorted(_FORCED)}")
        try:
            return _FORCED[backend](path)
        except Exception as exc:
            raise SlideError(path, f"not readable with {backend}: {exc}") from exc
    if path.is_dir():
        try:
            return _OmeZarrBackend(path)
        except Exception as exc:
            raise SlideError(path, f"not a readable OME-Zarr image: {exc}") from exc

    suffix = _suffix(path)
    if suffix in _PLAIN_SUFFIXES:
        try:
            return _PlainImageBackend(path)
        except Exception as exc:
            raise SlideError(path, f"cannot read image: {exc}") from exc

    failures: list[str] = []
    openslide_backend: _Backend | None = None
    try:
        openslide_backend = _OpenSlideBackend(path)
    except Exception as exc:
        failures.append(f"OpenSlide: {exc}")

    tiff_backend: _Backend | None = None
    if _looks_like_tiff(path):
        try:
            tiff_backend = _TiffBackend(path)
        except Exception as exc:
            failures.append(f"tifffile: {exc}")

    if tiff_backend is not None and openslide_backend is not None:
        if tiff_backend.level_shapes == openslide_backend.level_shapes:
            return _MetadataFrom(tiff_backend, openslide_backend)
        if len(tiff_backend.level_shapes) > len(openslide_backend.level_shapes):
            openslide_backend.close()  # e.g. an OME-TIFF SubIFD pyramid OpenSlide cannot see
            return tiff_backend
        tiff_backend.close()
        return openslide_backend
    if tiff_backend is not None:
        return tiff_backend
    if openslide_backend is not None:
        return openslide_backend

    if suffix in (".tif", ".tiff"):  # a flat (untiled) TIFF neither tiled reader takes
        try:
            return _PlainImageBackend(path)
        except Exception as exc:
            failures.append(f"image: {exc}")
    reason = "; ".join(failures) if failures else "unknown format"
    raise SlideError(path, f"not a readable slide ({reason})")


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------------------------
# The slide
# --------------------------------------------------------------------------------------------
class Slide:
    """A whole-slide image opened lazily (see the module docstring and :mod:`wsireg.core.coords`).

    OpenSlide-like attributes: ``level_count``, ``dimensions`` and ``level_dimensions``
    (``(width, height)`` as in OpenSlide), ``level_downsamples``, ``properties``, ``vendor``,
    ``mpp`` (``(x, y)`` micrometres per level-0 pixel, or ``None`` when unknown) and
    ``associated_images`` (name -> RGB array, read on access). wsireg code uses ``level(i)``
    (lazy ``(H, W, 3)`` dask array), ``level_shape(i)`` (``(H, W)``) and ``read()``.
    """

    def __init__(self, path: str | Path, backend: str | None = None) -> None:
        self.path = Path(path)
        self._backend_choice = backend
        self._backend = _open_backend(self.path, backend)
        if not self._backend.level_shapes or min(self._backend.level_shapes[0]) <= 0:
            shape = self._backend.level_shapes[0] if self._backend.level_shapes else ()
            self._backend.close()
            raise SlideError(self.path, f"image has zero size {shape}")

    # -- OpenSlide-like face ---------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def vendor(self) -> str:
        return self._backend.vendor

    @property
    def level_count(self) -> int:
        return len(self._backend.level_shapes)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((w, h) for h, w in self._backend.level_shapes)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @cached_property
    def level_downsamples(self) -> tuple[float, ...]:
        h0, w0 = self._backend.level_shapes[0]
        return tuple(math.sqrt((h0 * w0) / (h * w)) for h, w in self._backend.level_shapes)

    @cached_property
    def properties(self) -> dict[str, str]:
        return self._backend.properties()

    @cached_property
    def mpp(self) -> tuple[float, float] | None:
        return self._backend.mpp()

    @property
    def associated_images(self) -> Mapping[str, np.ndarray]:
        return _AssociatedImages(self)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The finest level whose downsample is at most ``downsample`` (OpenSlide's rule)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """OpenSlide's ``read_region`` as an RGB array ``(h, w, 3)``: ``location`` is the
        level-0 ``(x, y)`` of the top-left pixel, ``size`` is ``(w, h)`` at ``level``."""
        ds = self.level_downsamples[level]
        x0, y0 = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        return self.read(level, y0, x0, size[1], size[0])

    def get_thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide, area-downsampled so its longest side is at most ``max_side``."""
        import cv2

        h0, w0 = self.level_shape(0)
        downsample = max(h0, w0) / max_side
        level = self.get_best_level_for_downsample(max(downsample, 1.0))
        pixels = self.read(level, 0, 0, *self.level_shape(level))
        scale = max_side / max(pixels.shape[:2])
        if scale >= 1:
            return pixels
        size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)

    # -- wsireg face ------------------------------------------------------------------------
    def level_shape(self, level: int) -> tuple[int, int]:
        """``(H, W)`` of ``level``."""
        return self._backend.level_shapes[level]

    def chunk_side(self, level: int) -> int:
        """Side of the dask chunks of ``level`` (a multiple of the native tile side)."""
        return _chunk_side(self._backend.tile_sides[level])

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y0:y0+h, x0:x0+w]`` of ``level`` as ``(h, w, 3)`` uint8 RGB.

        The region may extend past the level's edges; what lies outside reads as white.
        """
        if h <= 0 or w <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        H, W = self.level_shape(level)
        iy0, ix0 = max(y0, 0), max(x0, 0)
        iy1, ix1 = min(y0 + h, H), min(x0 + w, W)
        if iy0 >= iy1 or ix0 >= ix1:
            return np.full((h, w, 3), 255, np.uint8)
        try:
            inside = self._backend.read(level, iy0, ix0, iy1 - iy0, ix1 - ix0)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                self.path,
                f"cannot read pixels of level {level} at (x={ix0}, y={iy0}): "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        if (iy0, ix0, iy1, ix1) == (y0, x0, y0 + h, x0 + w):
            return inside
        out = np.full((h, w, 3), 255, np.uint8)
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = inside
        return out

    def level(self, level: int) -> da.Array:
        """``level`` as a lazy dask array ``(H, W, 3)`` uint8, chunked along native tiles."""
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: no level {level} (levels 0..{self.level_count - 1})")
        side = self.chunk_side(level)
        adapter = _LevelArray(self, level)
        return da.from_array(
            adapter,
            chunks=(side, side, 3),
            asarray=True,
            lock=False,
            fancy=False,
            name=f"slide-{_token(self.path)}-level{level}",
        )

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend}, vendor={self.vendor}, "
            f"levels={self.level_dimensions})"
        )

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:
        # Pickled as its path: a dask worker reopens the slide (handles are not picklable).
        return (open_slide, (str(self.path), self._backend_choice))

    def info(self) -> dict[str, Any]:
        """What ``wsireg info`` shows, as plain data."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "backend": self.backend,
            "level_count": self.level_count,
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": round(ds, 6)}
                for i, ((w, h), ds) in enumerate(
                    zip(self.level_dimensions, self.level_downsamples, strict=True)
                )
            ],
            "mpp": list(self.mpp) if self.mpp else None,
            "associated_images": {
                name: list(self._backend_associated_shape(name))
                for name in self._backend.associated_names()
            },
        }

    def _backend_associated_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._backend.associated(name).shape)


class _LevelArray:
    """Array-like view of one level for ``dask.array.from_array``."""

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide, self.level_index = slide, level
        self.shape = (*slide.level_shape(level), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.slide.read(self.level_index, y0, x0, y1 - y0, x1 - x0)
        return block[(slice(None), slice(None), *key[2:])] if len(key) > 2 else block


class _AssociatedImages(Mapping[str, np.ndarray]):
    def __init__(self, slide: Slide) -> None:
        self._backend = slide._backend

    def __getitem__(self, name: str) -> np.ndarray:
        return self._backend.associated(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._backend.associated_names())

    def __len__(self) -> int:
        return len(self._backend.associated_names())


def open_slide(path: str | Path, backend: str | None = None) -> Slide:
    """Open a slide lazily; raise :class:`SlideError` naming the file when it cannot be read.

    ``backend`` forces one of ``openslide``, ``tifffile``, ``ome-zarr``, ``plain`` (default: the
    best one for the file, see the module docstring).
    """
    return Slide(path, backend)


# --------------------------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------------------------
def _token(path: Path) -> str:
    from dask.base import tokenize

    try:
        stat = path.stat()
        return tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return tokenize(str(path))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _positive_pair(x: Any, y: Any) -> tuple[float, float] | None:
    try:
        fx, fy = float(x), float(y)
    except (TypeError, ValueError):
        return None
    if fx > 0 and fy > 0 and math.isfinite(fx) and math.isfinite(fy):
        return (fx, fy)
    return None


def _ome_xml_mpp(xml: str) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

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


def _tiff_resolution_mpp(page: Any) -> tuple[float, float] | None:
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
