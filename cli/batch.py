"""``wsireg batch``, ``wsireg evaluate`` and ``wsireg stack``.

Each verb imports the library inside its function, so that ``wsireg --help`` and the other
verbs do not pay for importing torch, dask and zarr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .main import cli, examples, quiet_option
from .options import check_output_place, cluster_options, execution_from_cli
from .register import options_from_cli, register_options


@cli.command(
    epilog=examples(
        "wsireg batch pairs.csv -o results/ --workers 2",
        "wsireg batch pairs.csv -o results/ --resume",
    )
)
@quiet_option
@click.argument("pairs", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory: one register output per pair, summary.csv, summary.json.",
)
@cluster_options
@click.option(
    "--resume",
    is_flag=True,
    help="Skip complete pairs, continue interrupted ones (same inputs and options, else refused).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing pair outputs.")
@register_options
def batch(pairs: Path, out: Path, resume: bool, overwrite: bool, **values) -> None:
    """Register every pair of the ANHIR pair table PAIRS (CSV) into OUT.

    Columns `Source image`, `Target image`, optional `Source landmarks` and `Target
    landmarks` (paths relative to PAIRS); other columns are kept in the summary. Exit code 1
    if any pair failed (the summary says which and why).
    """
    from wsireg.run.batch import SUMMARY_CSV
    from wsireg.run.batch import batch as run
    from wsireg.run.evaluate import format_table

    check_output_place(out, [pairs])
    execution = execution_from_cli(values)
    options = options_from_cli(values)
    document = run(pairs, out, options, execution=execution, resume=resume, overwrite=overwrite)
    click.echo(format_table(document["pairs"], document["summary"]))
    counts = document["counts"]
    click.echo(
        f"{counts['ok']} of {counts['pairs']} pairs registered in {document['seconds']:.1f} s; "
        f"summary: {out / SUMMARY_CSV}"
    )
    if counts["failed"]:
        for row in document["pairs"]:
            if row["status"] != "ok":
                click.echo(f"wsireg: failed: {row['name']}: {row['error']}", err=True)
        sys.exit(1)


@cli.command(
    epilog=examples(
        "wsireg evaluate pairs.csv results/", "wsireg evaluate pairs.csv results/ --json rtre.json"
    )
)
@quiet_option
@click.argument("pairs", type=click.Path(path_type=Path))
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the metrics (default: RESULTS/evaluation.json).",
)
@click.option("--overwrite", is_flag=True, help="Replace the JSON if it exists.")
def evaluate(pairs: Path, results: Path, json_out: Path | None, overwrite: bool) -> None:
    """ANHIR metrics (rTRE, TRE in um, robustness) of the pairs of PAIRS registered in RESULTS
    (a `wsireg batch` output)."""
    from wsireg.run.evaluate import evaluate as run
    from wsireg.run.evaluate import format_table

    json_out = json_out or results / "evaluation.json"
    document = run(pairs, results, json_out, overwrite=overwrite)
    click.echo(format_table(document["pairs"], document["summary"]))
    click.echo(f"metrics: {json_out}")


@cli.command(epilog=examples("wsireg stack s1.svs s2.svs s3.svs -o stack/ --reference 1"))
@quiet_option
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory: <name>.ome.zarr, transforms/<name>/, registrations/, stack.json.",
)
@click.option(
    "--reference",
    type=int,
    required=True,
    help="Position (0-based) in SLIDES of the reference section.",
)
@cluster_options
@click.option("--resume", is_flag=True, help="Keep complete outputs, continue the others.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@register_options
def stack(
    slides: tuple[Path, ...],
    out: Path,
    reference: int,
    resume: bool,
    overwrite: bool,
    **values,
) -> None:
    """Register serial sections SLIDES (in order) into the frame of one of them: each to its
    neighbour towards the reference, transforms composed, every slide interpolated once."""
    from wsireg.run.stack import stack as run

    if len(slides) < 2:
        raise click.UsageError("a stack needs at least two slides")
    if not 0 <= reference < len(slides):
        raise click.BadParameter(
            f"must be a position 0..{len(slides) - 1}", param_hint="--reference"
        )
    check_output_place(out, list(slides))
    execution = execution_from_cli(values)
    options = options_from_cli(values)
    result = run(
        slides, out, reference, options, execution=execution, resume=resume, overwrite=overwrite
    )
    for name in result.names:
        warped = result.warped.get(name)
        where = f", {warped}" if warped else ""
        click.echo(f"{name}: transform {result.transforms[name]}{where}")
    click.echo(f"reference {result.reference}; {result.report['timings_s']['total_s']:.1f} s")
