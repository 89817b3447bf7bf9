"""What a slide holds besides its pyramid, kept by ``convert``: the associated images and the
vendor metadata.

:class:`SlideExtras` (built by :func:`wsireg.io.convert.slide_extras`) holds the associated
images (label, macro, thumbnail, ...: name -> ``(H, W, 3)`` uint8 RGB, as
:attr:`wsireg.io.slide.Slide.associated_images`) and the vendor properties (name -> text, as
:attr:`wsireg.io.slide.Slide.properties`, OpenSlide's names). The writers store them as:

* OME-TIFF (:mod:`wsireg.io.tiff`): each associated image one more OME ``Image`` (a
  series after the pyramid) named as the slide names it; the properties one
  ``MapAnnotation`` of the first image, namespace :data:`PROPERTIES_NAMESPACE`;
* OME-Zarr (:mod:`wsireg.io.ngff`): each associated image a one-level multiscale image group
  ``associated/NAME`` (not ``labels``: they are pictures, not segmentations); the root
  group's attributes ``vendor_properties`` (the properties) and ``associated_images`` (name
  -> group path).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: The namespace of the OME-TIFF ``MapAnnotation`` holding the vendor properties.
PROPERTIES_NAMESPACE = "openslide.properties"
#: The OME-Zarr group holding the associated images.
ASSOCIATED_GROUP = "associated"


@dataclass(frozen=True)
class SlideExtras:
    """A slide's associated images (name -> ``(H, W, 3)`` uint8 RGB; the mapping may read
    them on access, which the writers do last, after the pyramid) and vendor properties
    (name -> text)."""

    associated: Mapping[str, np.ndarray] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)


def group_name(name: str) -> str:
    """The OME-Zarr group name of the associated image ``name``: characters other than
    letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def checked_picture(name: str, image: np.ndarray) -> np.ndarray:
    """The associated image ``name`` as a C-contiguous ``(H, W, 3)`` uint8 array, else a
    one-line ``ValueError``."""
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"associated image {name!r} must be (H, W, 3) uint8 RGB, "
            f"got {image.shape} {image.dtype}"
        )
    return image
