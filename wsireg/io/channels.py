"""What the samples of a slide's pixels are: their kind, storage type, names and colours.

Pixels are ``[y, x, c]`` (:mod:`wsireg.core.coords`); :class:`Channels` describes the ``c``
axis of a slide as its file stores it:

* ``"brightfield"``: transmitted-light RGB, uint8, channels ``red, green, blue``; glass is
  white (255) and so is every region without data. Every brightfield slide is read as RGB,
  whatever the file holds (grey, RGBA, 16-bit grey PNG).
* ``"fluorescence"``: one or more emission channels (immunofluorescence, cyclic multiplexed
  imaging) at the file's dtype (uint8, uint16, float32, ...); background and regions without
  data are 0.
* ``"labels"``: one channel of integer label values (segmentation masks); background 0.

:func:`classify` is the one rule that tells them apart; :meth:`Channels.resolve` turns a
channel a user names (by name or index) into an index, or a one-line error listing them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsireg.errors import InputError

KINDS = ("brightfield", "fluorescence", "labels")
#: Display colours (``RRGGBB``) given in turn to channels whose file names none.
DEFAULT_COLORS = ("0000FF", "00FF00", "FF0000", "FFFF00", "FF00FF", "00FFFF", "FFFFFF")
#: Channel names that hold a nuclear stain (matched case-insensitively as whole words).
NUCLEAR_NAMES = ("dapi", "hoechst", "nuclei", "nuclear", "nucblue", "draq5", "dna", "sytox")
#: A one-channel integer image with at most this many distinct values (on its coarsest
#: level) is a label image.
MAX_LABEL_VALUES = 64


@dataclass(frozen=True)
class Channels:
    """The channel axis of a slide: ``kind`` (one of :data:`KINDS`), the ``dtype`` the pixels
    are read in, and per channel a ``name`` and a display ``color`` (``"RRGGBB"``)."""

    kind: str
    dtype: np.dtype
    names: tuple[str, ...]
    colors: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if len(self.names) != len(self.colors) or not self.names:
            raise ValueError("channels need one name and one colour each, and at least one")
        if self.kind == "brightfield" and (self.dtype != np.uint8 or len(self.names) != 3):
            raise ValueError("brightfield pixels are RGB uint8")
        if self.kind == "labels" and (
            len(self.names) != 1 or not np.issubdtype(self.dtype, np.integer)
        ):
            raise ValueError("a label image has one integer channel")

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def background(self) -> int:
        """The value of glass and of regions without data: 255 for brightfield, else 0."""
        return 255 if self.kind == "brightfield" else 0

    def select(self, indices: Sequence[int]) -> Channels:
        """These channels in the order of ``indices`` (brightfield RGB keeps its three)."""
        if self.kind == "brightfield":
            if list(indices) != [0, 1, 2]:
                raise ValueError("the channels of a brightfield RGB slide are kept together")
            return self
        return Channels(
            self.kind,
            self.dtype,
            tuple(self.names[i] for i in indices),
            tuple(self.colors[i] for i in indices),
        )

    def resolve(self, channel: str | int, path: str) -> int:
        """The index of ``channel``: a name (case-insensitive, exact) or an index (an int or
        its decimal text). Raises :class:`InputError` naming ``path`` and listing the
        channels."""
        if isinstance(channel, int) or (isinstance(channel, str) and channel.isdigit()):
            index = int(channel)
            if 0 <= index < self.count:
                return index
        else:
            folded = [name.casefold() for name in self.names]
            if str(channel).casefold() in folded:
                return folded.index(str(channel).casefold())
        raise InputError(path, f"no channel {channel!r} (channels: {self.listing()})")

    def resolve_many(self, channels: Sequence[str | int], path: str) -> list[int]:
        """:meth:`resolve` of each; a channel named twice is an error."""
        indices = [self.resolve(c, path) for c in channels]
        if len(set(indices)) != len(indices):
            raise InputError(path, f"a channel is named twice in {list(channels)}")
        return indices

    def listing(self) -> str:
        """``"0 DAPI, 1 CD3, ..."``: every channel with its index."""
        return ", ".join(f"{i} {name}" for i, name in enumerate(self.names))

    def nuclear(self) -> int | None:
        """The first channel whose name is a nuclear stain (:data:`NUCLEAR_NAMES`), if any."""
        pattern = re.compile(r"\b(" + "|".join(NUCLEAR_NAMES) + r")", re.IGNORECASE)
        for i, name in enumerate(self.names):
            if pattern.search(name.replace("_", " ")):
                return i
        return None

    def as_dict(self) -> dict[str, object]:
        """Plain data for ``wsireg info`` and reports."""
        return {
            "kind": self.kind,
            "dtype": self.dtype.name,
            "channels": [
                {"index": i, "name": n, "color": c}
                for i, (n, c) in enumerate(zip(self.names, self.colors, strict=True))
            ],
        }


#: Brightfield RGB: what every brightfield slide is read as.
RGB = Channels(
    "brightfield", np.dtype(np.uint8), ("red", "green", "blue"), ("FF0000", "00FF00", "0000FF")
)


def fluorescence(
    count: int,
    dtype: np.dtype,
    names: Sequence[str | None] = (),
    colors: Sequence[str | None] = (),
) -> Channels:
    """Fluorescence channels; missing names are ``"channel I"``, missing colours come from
    :data:`DEFAULT_COLORS` in turn."""
    named = [names[i] if i < len(names) and names[i] else f"channel {i}" for i in range(count)]
    coloured = [
        colors[i] if i < len(colors) and colors[i] else DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
        for i in range(count)
    ]
    return Channels("fluorescence", dtype, tuple(named), tuple(c.upper() for c in coloured))


def labels(dtype: np.dtype, name: str | None = None) -> Channels:
    """One channel of integer labels."""
    return Channels("labels", dtype, (name or "labels",), ("FFFFFF",))


def classify(
    dtype: np.dtype,
    count: int,
    coarse: np.ndarray,
    names: Sequence[str | None] = (),
    colors: Sequence[str | None] = (),
    *,
    interleaved_rgb: bool | None = None,
    declared_labels: bool = False,
) -> Channels:
    """The one rule for what a file's samples are (``coarse``: its coarsest level,
    ``(h, w, count)`` at ``dtype``; ``interleaved_rgb``: whether the file stores RGB(A) samples
    per pixel, ``None`` when its format does not say):

    * 3 or 4 samples stored as RGB(A) (any dtype, read as 8 bits), or 3 or 4 uint8 channels
      unnamed or named red, green, blue in a format that does not say: brightfield RGB
      (alpha composited on white);
    * ``declared_labels`` (an NGFF ``image-label``), or one integer channel with at most
      :data:`MAX_LABEL_VALUES` distinct values: labels;
    * one channel whose median is in the upper half of its 1st-99th percentile range (bright
      glass around tissue, any dtype): brightfield grey, read as 8 bits;
    * anything else: fluorescence, named and coloured as the file says.
    """
    dtype = np.dtype(dtype)
    if count in (3, 4) and interleaved_rgb:
        return RGB
    silent_rgb = interleaved_rgb is None and (not any(names) or _rgb_names(names))
    if count in (3, 4) and dtype == np.uint8 and silent_rgb:
        return RGB
    if count == 1 and np.issubdtype(dtype, np.integer):
        values = np.unique(coarse[..., 0]) if coarse.size else np.zeros(0)
        if declared_labels or len(values) <= MAX_LABEL_VALUES:
            return labels(dtype, names[0] if names else None)
    if count == 1 and coarse.size and _bright_glass(coarse[..., 0]):
        return RGB
    return fluorescence(count, dtype, names, colors)


def _bright_glass(values: np.ndarray) -> bool:
    """Whether most of a one-channel image lies in the upper half of its range (its 1st to
    99th percentile): bright glass around stained tissue, not fluorescence on black."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return False
    lo, median, hi = np.percentile(finite, (1, 50, 99))
    return bool(hi > lo and median >= (lo + hi) / 2)


def _rgb_names(names: Sequence[str | None]) -> bool:
    return [str(n).casefold() for n in names[:3]] == ["red", "green", "blue"]


def color_from_ome(value: str | None) -> str | None:
    """An OME-XML ``Color`` (a signed 32-bit RGBA integer) as ``"RRGGBB"``."""
    if value is None:
        return None
    try:
        rgba = int(value) & 0xFFFFFFFF
    except ValueError:
        return None
    return f"{rgba >> 24 & 0xFF:02X}{rgba >> 16 & 0xFF:02X}{rgba >> 8 & 0xFF:02X}"


def color_to_ome(color: str) -> int:
    """``"RRGGBB"`` as an OME-XML ``Color``: a signed 32-bit RGBA integer, opaque."""
    rgba = (int(color, 16) << 8) | 0xFF
    return rgba - (1 << 32) if rgba >= 1 << 31 else rgba
