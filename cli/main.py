"""Entry point of the ``wsireg`` command: the click group and the error policy.

Every verb is a thin layer over :mod:`wsireg`. A :class:`wsireg.errors.WsiregError` is printed as
one line ``wsireg: error: <file>: <problem>`` on stderr with exit code 1.
"""

from __future__ import annotations

import sys

import click

from wsireg import __version__
from wsireg.engine.parallel import limit_malloc_arenas
from wsireg.errors import WsiregError
from wsireg.progress import set_quiet


class _Group(click.Group):
    """Turns library errors into one-line messages and a non-zero exit."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except WsiregError as exc:
            click.echo(f"wsireg: error: {exc}", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("wsireg: error: out of memory", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsireg")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def cli(quiet: bool) -> None:
    """Register whole-slide histology images out of core and write OME-Zarr."""
    limit_malloc_arenas()
    set_quiet(quiet)


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        set_quiet(True)


def quiet_option(function):  # type: ignore[no-untyped-def]
    """``-q/--quiet`` after the verb too (``wsireg register --quiet ...``)."""
    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_quiet,
        help="No progress bars.",
    )(function)


def main() -> None:
    cli()


# Each module adds its verbs to `cli` (imported last: they import `cli` from here).
from . import batch, register, slides, train, transforms  # noqa: E402,F401
