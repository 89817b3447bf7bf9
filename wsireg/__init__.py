"""wsireg: out-of-core deep nonrigid registration of whole-slide histology images.

The method is DeepHistReg (Wodzinski & Mueller): affine initial alignment, then a resolution
pyramid on which per-level U-Nets predict displacement fields patch by patch, composed into one
field; the source slide is interpolated once, by the out-of-core warp engine, into OME-Zarr.

Coordinate, axis and unit conventions are stated once, in :mod:`wsireg.core.coords`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so that `import wsireg` (and the CLI) start fast. A public name
# is never the name of a subpackage or module of wsireg (importing `wsireg.engine.warp` sets
# `wsireg.engine.warp`, not `wsireg.warp`; tests/test_public_api.py checks that this holds).
_LAZY = {
    "open_slide": "wsireg.engine.view",
    "open_registered": "wsireg.engine.view",
    "Slide": "wsireg.io.slide",
    "write_ome_zarr": "wsireg.io.ngff",
    "write_ome_tiff": "wsireg.io.tiff",
    "Transform": "wsireg.engine.transform",
    "warp": "wsireg.engine.warp",
    "register": "wsireg.run.register",
    "batch": "wsireg.run.batch",
    "evaluate": "wsireg.run.evaluate",
    "stack": "wsireg.run.stack",
    "merge": "wsireg.io.merge",
    "Execution": "wsireg.engine.parallel",
    "WsiregError": "wsireg.errors",
    "SlideError": "wsireg.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """The public object ``name`` of :data:`_LAZY`, imported on first use and kept."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsireg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
