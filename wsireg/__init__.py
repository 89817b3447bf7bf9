"""wsireg: out-of-core deep nonrigid registration of whole-slide histology images.

The method is DeepHistReg (Wodzinski & Mueller): affine initial alignment, then a resolution
pyramid on which per-level U-Nets predict displacement fields patch by patch, composed into one
field; the source slide is interpolated once, by the out-of-core warp engine, into OME-Zarr.

Coordinate, axis and unit conventions are stated once, in :mod:`wsireg.coords`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so that `import wsireg` (and the CLI) start fast.
_LAZY = {
    "open_slide": "wsireg.slide",
    "Slide": "wsireg.slide",
    "write_ome_zarr": "wsireg.ngff",
    "write_ome_tiff": "wsireg.ngff",
    "Transform": "wsireg.transform",
    "register": "wsireg.pipeline",
    "batch": "wsireg.batches",
    "evaluate": "wsireg.evaluation",
    "stack": "wsireg.serial",
    "WsiregError": "wsireg.errors",
    "SlideError": "wsireg.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsireg' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
