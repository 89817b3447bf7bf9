"""Option types and checks shared by the verbs: every number is checked at the entrance, with
its range shown in ``--help``, before anything is read or written.

Imports nothing heavy (the CLI starts without torch, dask and zarr).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import click

from wsireg.errors import WsiregError
from wsireg.io.output import check_output_path

#: Side of a scheduler block (px of a level): a stride must divide it.
BLOCK = 1024
#: Chunk sides of outputs (px): smaller ones make millions of files, larger ones huge reads.
MIN_CHUNK, MAX_CHUNK = 16, 16384
#: OME-TIFF tile sides (px, multiples of 16), as :data:`wsireg.engine.warp.MIN_TILE`.
MIN_TILE, MAX_TILE = 16, 4096
#: Patch sides are multiples of this (the networks halve them four times or more).
PATCH_MULTIPLE = 16


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
