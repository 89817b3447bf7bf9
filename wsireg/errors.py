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


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"
