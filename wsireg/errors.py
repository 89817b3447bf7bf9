"""Errors a user can act on. Each carries a one-line message naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class WsiregError(Exception):
    """Base of every error the CLI reports as one line (exit code 1)."""


class SlideError(WsiregError):
    """A slide cannot be opened or its pixels cannot be read."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class OutputExistsError(WsiregError):
    """An output exists and ``overwrite`` was not given."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: output exists (use --overwrite to replace it)")


class OutputError(WsiregError):
    """An output cannot be written where it was asked for: it would replace or lie inside an
    input, it is the working directory or an ancestor, another run is writing it, a staged
    output belongs to another run, or the file system refuses it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class TransformError(WsiregError):
    """A transform directory is missing, corrupted or does not fit its slides."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class InputError(WsiregError):
    """Any other bad input file (points, annotations, pair tables, configs)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = _one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


def error_line(exc: BaseException) -> str:
    """One line describing ``exc``: a wsireg error as it is (it names the file), an
    ``OSError`` as its file and cause (a read-only folder, a full disk), else its type and
    message."""
    if isinstance(exc, WsiregError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "out of memory"
    elif isinstance(exc, OSError):
        cause = exc.strerror or str(exc) or type(exc).__name__
        text = f"{exc.filename}: {cause}" if exc.filename is not None else cause
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _one_line(text) if text.strip() else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"
