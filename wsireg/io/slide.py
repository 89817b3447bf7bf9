"""Slide I/O: one small reader class with an OpenSlide-like face and lazy chunked levels.

:func:`open_slide` picks a backend (:mod:`wsireg.io.backends`) for a path:

* **tifffile** (zarr view of the TIFF tiles) for tiled RGB TIFF/SVS/OME-TIFF whose tiles it can
  decode: no RGBA round trip, the fastest path. Metadata still come from OpenSlide when it can
  open the file (vendor, properties, associated images);
* **OpenSlide** for the other vendor formats (.svs with unusual codecs, .ndpi, .mrxs, .scn, .bif,
  DICOM, generic tiled TIFF);
* **OME-Zarr** (our own outputs, and other NGFF images);
* **plain images** (PNG, JPEG, flat TIFF, ...) read whole, for small ANHIR-style images.

Every level is exposed as a lazy dask array ``(H, W, 3)`` uint8 RGB (axes and units as in
:mod:`wsireg.core.coords`); transparent or missing regions read as white, whatever the backend.
Slicing ``slide.level(0)[y0:y1, x0:x1]`` reads only the tiles it touches. That RGB is what the
registration reads: a brightfield slide as stored, or the *shown channel* of any slide as a
grey brightfield picture (:mod:`wsireg.core.shown`; ``open_slide(path, shown=...)``, default:
a fluorescence slide's nuclear channel, else its first). Every slide also reads its samples as
stored (:attr:`Slide.channels`, :meth:`Slide.read_channels`, :meth:`Slide.channel_level`):
``(H, W, C)`` at the file's dtype, fluorescence channels and labels included (regions without
data: 255 for brightfield, 0 otherwise). Errors are
:class:`~wsireg.errors.SlideError` with a one-line message naming the file; a level argument is
checked by :func:`check_level`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import dask.array as da
import numpy as np
from dask.base import tokenize

from wsireg.core.shown import (
    amount_in_window,
    brightfield_grey,
    haematoxylin_amount,
    intensity_window,
    label_amount,
)
from wsireg.errors import InputError, SlideError
from wsireg.io.backends import Backend, centre_box, open_backend
from wsireg.io.channels import Channels

#: The shown channel of a brightfield slide that is its haematoxylin (colour deconvolution).
HAEMATOXYLIN = "haematoxylin"

#: Preferred side of a dask chunk of a level, rounded to a multiple of the native tile size.
CHUNK = 1024


def check_level(path: str | Path, level: int, level_count: int) -> int:
    """``level`` when it is a level of the slide at ``path`` (``0 .. level_count - 1``).

    The one rule for every level a user gives (convert, warp, register): no negative levels, no
    levels past the coarsest. Raises :class:`SlideError` naming the slide and the valid range.
    """
    if not 0 <= level < level_count:
        raise SlideError(path, f"no level {level} (levels 0..{level_count - 1})")
    return level


def _chunk_side(tile: int | None) -> int:
    """A dask chunk side near :data:`CHUNK` that is a multiple of the native tile side."""
    if not tile or tile <= 0:
        return CHUNK
    return tile * max(1, round(CHUNK / tile))


# --------------------------------------------------------------------------------------------
# The slide
# --------------------------------------------------------------------------------------------
class Slide:
    """A whole-slide image opened lazily (see the module docstring and :mod:`wsireg.core.coords`).

    OpenSlide-like attributes: ``level_count``, ``dimensions`` and ``level_dimensions``
    (``(width, height)`` as in OpenSlide), ``level_downsamples``, ``properties``, ``vendor``,
    ``mpp`` (``(x, y)`` micrometres per level-0 pixel, or ``None`` when unknown) and
    ``associated_images`` (name -> RGB array, read on access). wsireg code uses ``level(i)``
    (lazy ``(H, W, 3)`` dask array), ``level_shape(i)`` (``(H, W)``), ``level_mpp(i)`` and
    ``read()``.
    """

    def __init__(
        self, path: str | Path, backend: str | None = None, shown: str | int | None = None
    ) -> None:
        self.path = Path(path)
        self._backend_choice = backend
        self._attach(open_backend(self.path, backend))
        try:
            self._shown = _Shown.choose(self, shown)
        except BaseException:
            self._backend.close()
            raise

    def _attach(self, backend: Backend) -> None:
        """Read pixels and metadata from ``backend`` (closed and refused if it has no size).
        A subclass whose pixels are computed (a registered view) attaches its own."""
        if not backend.level_shapes or min(backend.level_shapes[0]) <= 0:
            shape = backend.level_shapes[0] if backend.level_shapes else ()
            backend.close()
            raise SlideError(self.path, f"image has zero size {shape}")
        self._backend: Backend = backend
        self._shown: _Shown | None = None

    # -- OpenSlide-like face ---------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def vendor(self) -> str:
        return self._backend.vendor

    @property
    def channels(self) -> Channels:
        """The samples as the file stores them (:mod:`wsireg.io.channels`)."""
        return self._backend.channels

    @property
    def shown(self) -> str:
        """What :meth:`read` shows: ``"RGB"`` (a brightfield slide as stored), or the shown
        channel (``"haematoxylin"``, or a channel's name)."""
        return "RGB" if self._shown is None else self._shown.label

    def showing(self, channel: str | int | None) -> Slide:
        """This slide (reopened) with ``channel`` shown by :meth:`read`: a channel name or
        index, ``"haematoxylin"`` (brightfield only), or ``None`` (the default)."""
        return open_slide(self.path, self._backend_choice, shown=channel)

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

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(x, y)`` micrometres per pixel of ``level``: :attr:`mpp` times its downsample."""
        if self.mpp is None:
            return None
        ds = self.level_downsamples[level]
        return (self.mpp[0] * ds, self.mpp[1] * ds)

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
        """Pixels ``[y0:y0+h, x0:x0+w]`` of ``level`` as ``(h, w, 3)`` uint8 RGB: the slide as
        stored (brightfield) or its shown channel (:attr:`shown`).

        The region may extend past the level's edges; what lies outside reads as white.
        """
        if self._shown is None:
            return self._region(level, (y0, x0, h, w), 3, np.dtype(np.uint8), 255, None)
        return self._shown.render(self, level, (y0, x0, h, w))

    def read_channels(
        self,
        level: int,
        y0: int,
        x0: int,
        h: int,
        w: int,
        channels: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Pixels ``[y0:y0+h, x0:x0+w]`` of ``level`` as stored: ``(h, w, c)`` at
        :attr:`channels` ``.dtype``, the ``channels`` given (indices; ``None``: all). Outside
        the level: :attr:`Channels.background`."""
        info = self.channels
        count = info.count if channels is None else len(channels)
        return self._region(
            level, (y0, x0, h, w), count, info.dtype, info.background, channels, native=True
        )

    def _region(
        self,
        level: int,
        box: tuple[int, int, int, int],
        count: int,
        dtype: np.dtype,
        fill: int,
        channels: Sequence[int] | None,
        native: bool = False,
    ) -> np.ndarray:
        """The backend's pixels of ``box = (y0, x0, h, w)``, ``fill`` outside the level."""
        y0, x0, h, w = box
        if h <= 0 or w <= 0:
            return np.full((max(h, 0), max(w, 0), count), fill, dtype)
        H, W = self.level_shape(level)
        iy0, ix0 = max(y0, 0), max(x0, 0)
        iy1, ix1 = min(y0 + h, H), min(x0 + w, W)
        if iy0 >= iy1 or ix0 >= ix1:
            return np.full((h, w, count), fill, dtype)
        try:
            if native:
                inside = self._backend.read_native(level, iy0, ix0, iy1 - iy0, ix1 - ix0, channels)
            else:
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
        out = np.full((h, w, count), fill, dtype)
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = inside
        return out

    def channel_level(self, level: int, channels: Sequence[int] | None = None) -> da.Array:
        """``level`` as stored, a lazy dask array ``(H, W, c)`` (:meth:`read_channels`)."""
        check_level(self.path, level, self.level_count)
        side = self.chunk_side(level)
        count = self.channels.count if channels is None else len(channels)
        adapter = _LevelArray(
            (*self.level_shape(level), count),
            self.channels.dtype,
            functools.partial(self.read_channels, level, channels=channels),
        )
        return da.from_array(
            adapter,
            chunks=(side, side, adapter.shape[2]),
            asarray=True,
            lock=False,
            fancy=False,
            name=f"slide-{self._dask_token()}-level{level}-channels-{tokenize(channels)}",
        )

    def level(self, level: int) -> da.Array:
        """``level`` as a lazy dask array ``(H, W, 3)`` uint8, chunked along native tiles."""
        check_level(self.path, level, self.level_count)
        side = self.chunk_side(level)
        adapter = _LevelArray(
            (*self.level_shape(level), 3), np.dtype(np.uint8), functools.partial(self.read, level)
        )
        return da.from_array(
            adapter,
            chunks=(side, side, 3),
            asarray=True,
            lock=False,
            fancy=False,
            name=f"slide-{self._dask_token()}-level{level}-{tokenize(self.shown)}",
        )

    def _dask_token(self) -> str:
        """What names this slide's pixels in dask keys: the file (path, size, mtime)."""
        return _token(self.path)

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

    def __reduce__(
        self,
    ) -> tuple[Callable[..., Slide], tuple[str, str | None, str | int | None]]:
        # Pickled as its path: a dask worker reopens the slide (handles are not picklable).
        shown = None if self._shown is None else self._shown.choice
        return (open_slide, (str(self.path), self._backend_choice, shown))

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
            "pixels": self.channels.as_dict(),
            "shown": self.shown,
            "associated_images": {
                name: list(self._backend_associated_shape(name))
                for name in self._backend.associated_names()
            },
        }

    def _backend_associated_shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._backend.associated(name).shape)
        except SlideError:
            raise
        except Exception as exc:  # a decode error of the vendor library
            raise SlideError(
                self.path, f"cannot read the associated image {name!r}: {type(exc).__name__}: {exc}"
            ) from exc


class _LevelArray:
    """Array-like view of one level for ``dask.array.from_array``: ``read(y0, x0, h, w)``
    gives its ``(h, w, C)`` pixels (a bound method of the slide: it pickles as the slide's
    path)."""

    def __init__(
        self, shape: tuple[int, int, int], dtype: np.dtype, read: Callable[..., np.ndarray]
    ) -> None:
        self.shape, self.dtype, self.read = shape, np.dtype(dtype), read
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.read(y0, x0, y1 - y0, x1 - x0)
        return block[(slice(None), slice(None), *key[2:])] if len(key) > 2 else block


class _Shown:
    """One channel of a slide shown as a grey brightfield picture (:mod:`wsireg.core.shown`):
    the ``choice`` a user made (``None``: the default), its ``label``, and what renders it."""

    def __init__(self, choice: str | int | None, label: str, index: int | None) -> None:
        self.choice, self.label, self.index = choice, label, index
        self.window: tuple[float, float] | None = None

    @staticmethod
    def choose(slide: Slide, choice: str | int | None) -> _Shown | None:
        """What ``slide`` shows for ``choice``; ``None`` for a brightfield slide as stored.
        A choice the slide does not have is an :class:`InputError` listing its channels."""
        info = slide.channels
        if info.kind == "brightfield":
            if choice is None or str(choice).casefold() == "rgb":
                return None
            if str(choice).casefold() == HAEMATOXYLIN:
                return _Shown(choice, HAEMATOXYLIN, None)
            index = info.resolve(choice, str(slide.path))
            return _Shown(choice, info.names[index], index)
        if choice is not None and str(choice).casefold() in (HAEMATOXYLIN, "rgb"):
            raise InputError(
                slide.path,
                f"{choice!r} needs a brightfield RGB slide; this one is {info.kind} "
                f"(channels: {info.listing()})",
            )
        if choice is None:
            found = info.nuclear()
            index = 0 if found is None else found
        else:
            index = info.resolve(choice, str(slide.path))
        return _Shown(choice, info.names[index], index)

    def amount_window(self, slide: Slide) -> tuple[float, float]:
        """The window of the shown amount (:func:`~wsireg.core.shown.intensity_window` of
        the coarsest level's centre), measured on the first render and kept."""
        if self.window is None:
            if self.index is None:
                self.window = intensity_window(haematoxylin_amount(_coarse_rgb(slide)))
            else:
                self.window = intensity_window(_coarse_sample(slide, self.index))
        return self.window

    def render(self, slide: Slide, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """``(h, w, 3)`` uint8 grey brightfield of ``box = (y0, x0, h, w)`` of ``level``."""
        y0, x0, h, w = box
        info = slide.channels
        if info.kind == "brightfield":
            rgb = slide._region(level, box, 3, np.dtype(np.uint8), 255, None)
            if self.index is None:
                window = self.amount_window(slide)
                return brightfield_grey(amount_in_window(haematoxylin_amount(rgb), window))
            return np.repeat(rgb[..., self.index : self.index + 1], 3, axis=-1)
        values = slide.read_channels(level, y0, x0, h, w, [self.index])[..., 0]
        if info.kind == "labels":
            return brightfield_grey(label_amount(values))
        return brightfield_grey(amount_in_window(values, self.amount_window(slide)))


def _coarse_rgb(slide: Slide) -> np.ndarray:
    """The centre of the coarsest level as stored RGB (:func:`centre_box`)."""
    level = slide.level_count - 1
    box = centre_box(slide.level_shape(level))
    return slide._region(level, box, 3, np.dtype(np.uint8), 255, None)


def _coarse_sample(slide: Slide, channel: int) -> np.ndarray:
    """Channel ``channel`` of the centre of the coarsest level (:func:`centre_box`): what the
    window of a shown fluorescence channel is measured on."""
    level = slide.level_count - 1
    return slide.read_channels(level, *centre_box(slide.level_shape(level)), [channel])[..., 0]


class _AssociatedImages(Mapping[str, np.ndarray]):
    def __init__(self, slide: Slide) -> None:
        self._backend = slide._backend

    def __getitem__(self, name: str) -> np.ndarray:
        return self._backend.associated(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._backend.associated_names())

    def __len__(self) -> int:
        return len(self._backend.associated_names())


def open_slide(
    path: str | Path, backend: str | None = None, shown: str | int | None = None
) -> Slide:
    """Open a slide lazily; raise :class:`SlideError` naming the file when it cannot be read.

    ``backend`` forces one of ``openslide``, ``tifffile``, ``ome-zarr``, ``plain`` (default: the
    best one for the file, see the module docstring). ``shown``: the channel :meth:`Slide.read`
    shows (see :meth:`Slide.showing`).
    """
    return Slide(path, backend, shown)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _token(path: Path) -> str:
    try:
        stat = path.stat()
        return tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return tokenize(str(path))
