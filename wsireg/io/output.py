"""Outputs that never look complete before they are.

Every writer stages its output under a hidden sibling name (``.NAME.partial``) and renames it
into place only when everything was written. An existing output is replaced only with
``overwrite=True``. A staged output left by a killed run is what ``resume`` continues from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from wsireg.errors import OutputExistsError


def partial_path(path: str | Path) -> Path:
    """Where the output ``path`` is staged while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(path)
    return path


def remove(path: str | Path) -> None:
    """Remove a file or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def staged_output(
    path: str | Path, overwrite: bool = False, resume: bool = False
) -> Iterator[Path]:
    """Yield the staging path of ``path``; move it into place when the block succeeds.

    With ``resume`` a staged output left by an interrupted run is kept (the caller continues
    it); otherwise it is cleared first. On an exception the staging path is removed, except on
    ``KeyboardInterrupt`` and in a ``resume`` run, which leave it for (another) ``resume``.
    """
    final = check_output(path, overwrite)
    stage = partial_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        remove(stage)
    try:
        yield stage
    except KeyboardInterrupt:
        raise
    except BaseException:
        if not resume:
            remove(stage)
        raise
    commit(stage, final)


def commit(stage: Path, final: Path) -> None:
    """Atomically (as far as the file system allows) replace ``final`` by ``stage``."""
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        remove(old)
        os.replace(final, old)
        os.replace(stage, final)
        remove(old)
    else:
        os.replace(stage, final)
