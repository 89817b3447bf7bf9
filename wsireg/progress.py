"""The one progress reporter of wsireg.

Long work reports through :func:`progress` (a context manager yielding an object with
``update(n)`` and ``set_postfix(**values)``), and dask computations through
:func:`dask_progress`. :func:`set_quiet` (the CLI's ``--quiet``) silences both. dask is
imported inside :func:`dask_progress`: the CLI imports this module at start-up.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or enable (False) every progress bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it") -> Iterator[Any]:
    """A progress bar on stderr for ``total`` steps (silent when quiet)."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=_quiet,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def dask_progress(desc: str) -> Iterator[None]:
    """Report the tasks of dask computations run inside the block (local schedulers)."""
    if _quiet:
        yield
        return
    from dask.callbacks import Callback

    class _Bar(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="task",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.5,
            )

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self._bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            self._bar.close()

    with _Bar():
        yield
