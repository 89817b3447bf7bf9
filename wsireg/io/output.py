"""Outputs that never look complete before they are, and that one run at a time writes.

Every writer stages its output under a hidden sibling name (``.NAME.partial``) and renames it
into place only when everything was written (:func:`staged_output`). Around that:

* **where**: an output never resolves to or inside one of its inputs, never contains one, and
  is never the working directory or one of its ancestors (:func:`check_output_path`);
* **one writer**: while it is staged, an output is locked (an exclusive ``flock`` on the
  sibling ``.NAME.lock``); a second writer fails at once (:func:`output_lock`);
* **replace**: an existing output is replaced only with ``overwrite=True``;
* **resume**: a staged output left by a killed run is what ``resume`` continues from, and
  only when the run is the same one: beside it lies the fingerprint of the run that started it
  (``.NAME.run.json``, :func:`fingerprint_path`: inputs, options, versions, as the writer
  describes them), compared on ``resume``; a difference is refused, naming it
  (:func:`check_fingerprint`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsireg.errors import OutputError, OutputExistsError

#: Differences named in a refused resume (the rest are counted).
SHOWN_DIFFERENCES = 3


def partial_path(path: str | Path) -> Path:
    """Where the output ``path`` is staged while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def fingerprint_path(path: str | Path) -> Path:
    """Where the fingerprint of the run writing the output ``path`` lies while it is staged."""
    path = Path(path)
    return path.with_name(f".{path.name}.run.json")


def lock_path(path: str | Path) -> Path:
    """The lock file of the output ``path`` while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(path)
    return path


def check_output_path(path: str | Path, inputs: Sequence[str | Path | None] = ()) -> Path:
    """``path`` if an output may be written there, else :class:`OutputError`: not the working
    directory or an ancestor of it, not an input, inside one or containing one, and no
    existing ancestor that is not a directory."""
    path = Path(path)
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(path, "is the working directory or one of its parents")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if resolved == source:
            raise OutputError(path, f"is the input {given}")
        if source in resolved.parents:
            raise OutputError(path, f"lies inside the input {given}")
        if resolved in source.parents:
            raise OutputError(path, f"contains the input {given}")
    for ancestor in resolved.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(path, f"{ancestor} is not a directory")
            break
    return path


def remove(path: str | Path) -> None:
    """Remove a file or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of the output ``path`` for the block; :class:`OutputError` at
    once when another process holds it. The lock file is removed afterwards (a waiter that
    opened the removed file notices and retries on the new one)."""
    lock = lock_path(path)
    while True:
        try:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(path, f"cannot write here: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputError(path, "another run is writing this output") from None
        if _same_file(descriptor, lock):
            break
        os.close(descriptor)  # the lock file was removed meanwhile: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def staged_output(
    path: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    inputs: Sequence[str | Path | None] = (),
) -> Iterator[Path]:
    """Yield the staging path of ``path``; move it into place when the block succeeds.

    The output is checked against ``inputs`` (:func:`check_output_path`) and locked while the
    block runs (:func:`output_lock`). ``fingerprint`` is stored beside the stage
    (:func:`fingerprint_path`) until the output is in place. With ``resume`` a
    staged output left by an interrupted run is kept (the caller continues it) if its
    fingerprint is ``fingerprint`` (:func:`check_fingerprint`); otherwise it is cleared first.
    On an exception the staging path is removed, except on ``KeyboardInterrupt`` and in a
    ``resume`` run, which leave it for (another) ``resume``.
    """
    final = check_output_path(path, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(final, f"cannot create its folder: {exc.strerror or exc}") from exc
    with output_lock(final):
        check_output(final, overwrite)
        stage, run = partial_path(final), fingerprint_path(final)
        if resume and (stage.exists() or stage.is_symlink()):
            check_fingerprint(final, fingerprint)
        else:
            remove(stage)
        remove(run)
        if fingerprint is not None:
            run.write_text(json.dumps(fingerprint, indent=1))
        try:
            yield stage
            commit(stage, final)
        except KeyboardInterrupt:
            raise
        except BaseException:
            if not resume:
                remove(stage)
                remove(run)
            raise
        remove(run)


def check_fingerprint(path: Path, fingerprint: Mapping[str, Any] | None) -> None:
    """Raise :class:`OutputError` naming the staged output of ``path`` unless it was started
    by the run ``fingerprint`` describes (the message names what differs)."""
    if fingerprint is None:
        return
    stage = partial_path(path)
    try:
        staged = json.loads(fingerprint_path(path).read_text())
    except (OSError, ValueError):
        staged = None
    if not isinstance(staged, dict):
        raise OutputError(
            stage, "cannot resume: no run fingerprint in the staged output (run without --resume)"
        )
    differences = fingerprint_differences(staged, json.loads(json.dumps(fingerprint)))
    if differences:
        raise OutputError(
            stage,
            f"cannot resume a run with other inputs or options: {differences} "
            "(run without --resume to start again)",
        )


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The keys (dotted paths) whose values differ between two fingerprints, as
    ``key old -> new`` (the first :data:`SHOWN_DIFFERENCES`); empty when they are equal."""
    before, after = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = [f"{k} {_short(before.get(k))} -> {_short(after.get(k))}" for k in keys]
    text = "; ".join(shown[:SHOWN_DIFFERENCES])
    if len(shown) > SHOWN_DIFFERENCES:
        text += f"; and {len(shown) - SHOWN_DIFFERENCES} more"
    return text


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
