"""Option types and checks shared by the verbs: every number is checked at the entrance, with
its range shown in ``--help``, before anything is read or written.

Imports nothing heavy (the CLI starts without torch, dask and zarr).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from wsireg.engine.parallel import Execution
from wsireg.errors import WsiregError
from wsireg.io.output import check_output_path

F = TypeVar("F", bound=Callable[..., Any])

#: Side of a scheduler block (px of a level): a stride must divide it.
BLOCK = 1024
#: Chunk sides of outputs (px): smaller ones make millions of files, larger ones huge reads.
MIN_CHUNK, MAX_CHUNK = 16, 16384
#: OME-TIFF tile sides (px, multiples of 16), as :data:`wsireg.engine.warp.MIN_TILE`.
MIN_TILE, MAX_TILE = 16, 4096
#: Patch sides are multiples of this (the networks halve them four times or more).
PATCH_MULTIPLE = 16
#: OME-NGFF versions of the writers (:data:`wsireg.io.ngff.NGFF_VERSIONS`; not imported here:
#: that module imports zarr).
NGFF_VERSIONS = ("0.4", "0.5")
#: OME-TIFF tile compressions (:data:`wsireg.io.tiff.TIFF_COMPRESSIONS`).
TIFF_COMPRESSIONS = ("jpeg", "zlib", "zstd", "none")


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite (``nan`` and ``inf`` are refused)."""

    name = "finite float"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Multiple(click.IntRange):
    """An int in a range that is a multiple of ``step``."""

    def __init__(self, step: int, min: int | None = None, max: int | None = None) -> None:
        super().__init__(min=min, max=max)
        self.step = step

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        number = super().convert(value, param, ctx)
        if number % self.step:
            self.fail(f"{number} is not a multiple of {self.step}", param, ctx)
        return number

    def _describe_range(self) -> str:
        return f"{super()._describe_range()}, multiple of {self.step}"


class Divisor(click.IntRange):
    """An int in a range that divides ``whole``."""

    def __init__(self, whole: int, min: int | None = None) -> None:
        super().__init__(min=min, max=whole)
        self.whole = whole

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        number = super().convert(value, param, ctx)
        if self.whole % number:
            self.fail(f"{number} does not divide {self.whole}", param, ctx)
        return number

    def _describe_range(self) -> str:
        return f"{super()._describe_range()}, divides {self.whole}"


def check_patch_and_stride(patch: int | None, stride: int | None) -> None:
    """``--stride`` at most ``--patch`` and ``P - S`` even, when both are given."""
    if patch is None or stride is None:
        return
    if stride > patch:
        raise click.BadParameter(f"{stride} is larger than --patch {patch}", param_hint="--stride")
    if (patch - stride) % 2:
        raise click.BadParameter(
            f"--patch {patch} minus --stride {stride} must be even", param_hint="--stride"
        )


def check_output_place(out: Path, inputs: Sequence[Path | None]) -> None:
    """The output ``out`` must not be an input, lie inside one or contain one, nor be the
    working directory or an ancestor (:func:`wsireg.io.output.check_output_path`)."""
    try:
        check_output_path(out, inputs)
    except WsiregError as exc:
        raise click.BadParameter(str(exc), param_hint="-o/--out") from exc


def ngff_version_option(output: str) -> Callable[[F], F]:
    """``--ngff-version`` (default 0.4) of ``output`` (how the verb's help names it)."""
    return click.option(
        "--ngff-version",
        type=click.Choice(NGFF_VERSIONS),
        default=NGFF_VERSIONS[0],
        show_default=True,
        help=f"OME-NGFF version of {output} (0.4: zarr v2 format, 0.5: zarr v3).",
    )


def tile_option(note: str = "") -> Callable[[F], F]:
    """``--tile``: the OME-TIFF tile side (default 512 px); ``note`` ends its help."""
    return click.option(
        "--tile",
        type=Multiple(16, MIN_TILE, MAX_TILE),
        default=512,
        show_default=True,
        help=f"OME-TIFF tile side (px{note}).",
    )


def chunk_option(help: str) -> Callable[[F], F]:
    """``--chunk``: the output chunk side (default 1024 px)."""
    return click.option(
        "--chunk",
        type=click.IntRange(MIN_CHUNK, MAX_CHUNK),
        default=1024,
        show_default=True,
        help=help,
    )


def channels_option(what: str = "OUT") -> Callable[[F], F]:
    """``--channels``: the channels of a fluorescence slide to write, by name or index,
    comma-separated (``None``: all)."""
    return click.option(
        "--channels",
        callback=_split_channels,
        default=None,
        metavar="NAMES",
        help=f"Channels of a fluorescence slide written to {what}, by name or index, "
        "comma-separated, in that order (default: all).",
    )


def _split_channels(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise click.BadParameter("name at least one channel", ctx=ctx, param=param)
    return names


def format_option(default: str | None = None, what: str = "OUT") -> Callable[[F], F]:
    """``--format ome-zarr|ome-tiff`` of an output (``None``: from its suffix)."""
    if default is None:
        text = (
            f"Output format (default: from {what}'s suffix; .tif/.tiff -> OME-TIFF, else OME-Zarr)."
        )
    else:
        text = f"Format of {what}."
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["ome-zarr", "ome-tiff"]),
        default=default,
        show_default=default is not None,
        help=text,
    )


def cluster_options(function):  # type: ignore[no-untyped-def]
    """Where tasks run: ``--scheduler``, ``--workers``, ``--threads``, ``--gpu-resources``."""
    options = [
        click.option("--scheduler", default=None, help="Address of a dask.distributed scheduler."),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=None,
            help="Start a local dask.distributed cluster of N worker processes (default "
            "without --scheduler: here, in threads).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Tasks at once here, or threads per task on a local cluster (default: the "
            "CPU count here, CPUs / workers on a local cluster).",
        ),
        click.option(
            "--gpu-resources",
            is_flag=True,
            help="Each task (a pair, a block) claims the worker resource GPU=1: one at a "
            "time per worker started with `dask worker ADDRESS --resources GPU=1`.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def execution_from_cli(values: dict) -> Execution:
    """The :class:`~wsireg.engine.parallel.Execution` of the cluster options (removed from
    ``values``)."""
    scheduler, workers = values.pop("scheduler"), values.pop("workers")
    if scheduler is not None and workers is not None:
        raise click.UsageError("give --scheduler or --workers, not both")
    return Execution(
        scheduler=scheduler,
        workers=workers,
        threads=values.pop("threads"),
        resources={"GPU": 1} if values.pop("gpu_resources") else None,
    )
