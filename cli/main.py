"""Entry point of the ``wsireg`` command: the click group and the error policy.

Every verb is a thin layer over :mod:`wsireg`. Whatever stops a verb ends as one line
``wsireg: error: <file or option>: <problem>`` on stderr and a non-zero exit, never a
traceback (``wsireg --debug VERB ...`` shows it): a bad option (exit 2, click's message on one
line), a :class:`wsireg.errors.WsiregError` (it names the file), an ``OSError`` (its file and
cause: a read-only folder, a full disk), a ``ValueError`` from the data (a decode error), and,
last, any other error, named by its type (exit 1; :func:`wsireg.errors.error_line`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from wsireg import __version__
from wsireg.engine.parallel import limit_malloc_arenas
from wsireg.errors import WsiregError, error_line
from wsireg.progress import set_quiet

#: click >= 8.2 raises this for a group called without arguments (older versions print the help).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


#: The headings of ``--help`` and the options under each (by parameter name); options of a
#: verb not named here are listed under "Other options".
OPTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Output", ("out", "out_dir", "json_out", "fmt", "ngff_version", "warp_level", "no_warp",
                "level", "interpolation", "chunk", "tile", "compression", "reference")),
    ("Algorithm 1 (the networks)", ("weights", "levels", "iterations", "patch", "stride",
                                    "group", "flips", "precision")),
    ("Channels", ("source_channel", "target_channel", "channel", "channels", "prefixes")),
    ("Instance optimisation", ("refine",)),
    ("Where it runs", ("device", "scheduler", "workers", "threads", "gpu_resources")),
    ("Training data", ("sources", "sections", "section_gap", "slides_dir", "crop",
                       "max_displacement", "stain_changes", "representation", "section_change",
                       "content_change")),
    ("Training", ("epochs", "steps_per_epoch", "batch", "train_groups", "alpha", "lr",
                  "lr_decay", "stain_loss", "supervision", "supervision_epochs", "similarity",
                  "init_weights", "seed")),
    ("Runs", ("resume", "overwrite", "strict", "quiet", "help")),
)  # fmt: skip


class GroupedCommand(click.Command):
    """A verb whose ``--help`` lists its options under the headings of
    :data:`OPTION_GROUPS`, in that order (headings without options of the verb left out)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {
            param.name: record
            for param in self.get_params(ctx)
            if isinstance(param, click.Option) and (record := param.get_help_record(ctx))
        }
        listed: set[str | None] = set()
        for heading, names in OPTION_GROUPS:
            rows = [records[name] for name in names if name in records]
            listed.update(name for name in names if name in records)
            if rows:
                with formatter.section(heading):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if name not in listed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)


class _Group(click.Group):
    """Turns every error into one line on stderr and a non-zero exit; its verbs list their
    options by heading (:class:`GroupedCommand`)."""

    command_class = GroupedCommand

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `wsireg` alone: the help, as click prints it
            click.echo(exc.format_message(), err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"wsireg: error: {' '.join(exc.format_message().split())}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("wsireg: error: aborted", err=True)
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # every error ends as one line (a traceback with --debug)
            if ctx.params.get("debug"):
                raise
            hint = "" if isinstance(exc, (WsiregError, OSError)) else " (--debug shows where)"
            click.echo(f"wsireg: error: {error_line(exc)}{hint}", err=True)
            sys.exit(1)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nStart with:\n  wsireg demo demo-out\n  wsireg register he.svs ihc.svs -o out/"
    "\n  wsireg VERB --help",
)
@click.version_option(__version__, prog_name="wsireg")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress (bars on a terminal, log lines elsewhere).",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def cli(quiet: bool, debug: bool) -> None:
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
        help="No progress (bars on a terminal, log lines elsewhere).",
    )(function)


def examples(*lines: str) -> str:
    """A verb's ``--help`` epilog: ``Examples:`` and ``lines`` as typed (not rewrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def main() -> None:
    cli()


# Each module adds its verbs to `cli` (imported last: they import `cli` from here).
from . import batch, register, slides, train, transforms  # noqa: E402,F401
