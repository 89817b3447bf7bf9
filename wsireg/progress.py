"""The one progress reporter of wsireg.

Long work reports through :func:`progress` (a context manager yielding an object with
``update(n)``, ``set_postfix(**values)``, settable ``total`` and ``n`` and ``refresh()``), a
stage without a count (the alignment, QC) through :func:`stage_progress`, dask computations
through :func:`dask_progress`, and a lasting note that something started (where a cluster's
dashboard is) through :func:`announce`. Where stderr is a terminal they are tqdm bars, redrawn
in place and cleared at the end. Anywhere else (a log file, a pipe, a batch system) they are
log lines, never a carriage return: ``HH:MM:SS DESC: started``, a percentage line at most
every :data:`LOG_INTERVAL_S` seconds, and ``HH:MM:SS DESC: done, N UNIT in S s`` (``stopped
after`` when an error ends the work); every such line matches :data:`LOG_LINE`. :func:`set_quiet`
(the CLI's ``--quiet``) silences all of them. dask is imported inside :func:`dask_progress`:
the CLI imports this module at start-up.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

#: Seconds between two percentage lines of a log (not a terminal).
LOG_INTERVAL_S = 15.0
#: What every progress line of a log looks like (a time of day, then what is running).
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d [^:\r\n]+: (started|done|stopped|\d)")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or enable (False) every progress report of this process."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (where bars may be redrawn)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


class LogLines:
    """The log form of a progress bar: one line when it starts, a percentage line at most every
    :data:`LOG_INTERVAL_S` seconds, one when it ends with the elapsed seconds (tqdm's
    ``update``, ``set_postfix``, ``total``, ``n``, ``refresh`` and ``close``)."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO) -> None:
        self.total, self.n, self.desc, self.unit = total, 0, desc, unit
        self.stream = stream
        self.postfix = ""
        self.failed = False
        self._start = self._last = time.monotonic()
        self._closed = False
        self._write("started" + (f", {total} {unit}" if total else ""))

    def _write(self, message: str) -> None:
        self.stream.write(f"{time.strftime('%H:%M:%S')} {self.desc}: {message}\n")
        self.stream.flush()

    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def refresh(self) -> None:
        """A percentage line if :data:`LOG_INTERVAL_S` passed since the last line."""
        if time.monotonic() - self._last < LOG_INTERVAL_S or self._closed:
            return
        self._last = time.monotonic()
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        total = f"/{self.total}" if self.total else ""
        suffix = f", {self.postfix}" if self.postfix else ""
        self._write(f"{self.n}{total} {self.unit}{share}, {self._elapsed():.1f} s{suffix}")

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seconds = f"{self._elapsed():.1f} s" + (f" ({self.postfix})" if self.postfix else "")
        count = f"{self.n} {self.unit}" if self.n else ""
        if self.failed:
            self._write(f"stopped after {count + ', ' if count else ''}{seconds}")
        else:
            self._write(f"done{', ' + count if count else ''} in {seconds}")


def _bar(total: int | None, desc: str, unit: str, **tqdm_options: Any) -> Any:
    """A tqdm bar on a terminal, :class:`LogLines` elsewhere, a silent bar when quiet."""
    stream = sys.stderr
    if not _quiet and not is_terminal(stream):
        return LogLines(total, desc, unit, stream)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=_quiet,
        file=stream,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
        **tqdm_options,
    )


@contextlib.contextmanager
def _closing(bar: Any) -> Iterator[Any]:
    try:
        yield bar
    except BaseException:
        bar.failed = True  # a LogLines says "stopped"; a tqdm bar ignores it
        raise
    finally:
        bar.close()


def announce(desc: str, message: str) -> None:
    """One lasting line on stderr that ``desc`` started, with ``message`` (e.g. where a
    dashboard is), silent when quiet: ``HH:MM:SS DESC: started, MESSAGE`` in a log (a
    :data:`LOG_LINE`), ``DESC: started, MESSAGE`` above any bars on a terminal."""
    if _quiet:
        return
    stream = sys.stderr
    if is_terminal(stream):
        tqdm.write(f"{desc}: started, {message}", file=stream)
    else:
        stream.write(f"{time.strftime('%H:%M:%S')} {desc}: started, {message}\n")
        stream.flush()


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it") -> Iterator[Any]:
    """Progress of ``total`` steps (``None``: unknown yet) on stderr (silent when quiet)."""
    with _closing(_bar(total, desc, unit)) as bar:
        yield bar


@contextlib.contextmanager
def stage_progress(desc: str) -> Iterator[None]:
    """A stage of no countable steps (e.g. the alignment): its name while it runs on a
    terminal; in a log a line when it starts and one with its seconds when it ends."""
    with _closing(_bar(None, desc, "", bar_format="{desc} ... {elapsed}")):
        yield


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
            self._bar = _bar(total, desc, "task")

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self._bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            self._bar.failed = errored
            self._bar.close()

    with _Bar():
        yield
