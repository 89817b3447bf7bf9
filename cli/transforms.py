"""``wsireg warp``, ``wsireg warp-points`` and ``wsireg warp-geojson``.

Each verb imports the library inside its function, so that ``wsireg --help`` and the other verbs
do not pay for importing torch, dask and zarr.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .main import cli, examples, quiet_option
from .options import MAX_CHUNK, MIN_CHUNK, FiniteFloat, check_output_place

if TYPE_CHECKING:  # annotations only: importing it loads zarr
    from wsireg.engine.transform import Direction

TRANSFORM = click.Path(path_type=Path)


@cli.command(
    epilog=examples(
        "wsireg warp out/ he.svs -o he-warped.ome.zarr",
        "wsireg warp out/transform mask.tif -o mask.ome.tif --interpolation nearest",
    )
)
@quiet_option
@click.argument("transform", type=TRANSFORM)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output OME-Zarr (.ome.zarr) or OME-TIFF (.ome.tif).",
)
@click.option(
    "--level",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Target level of the output grid (0 = full resolution).",
)
@click.option(
    "--interpolation",
    type=click.Choice(["linear", "nearest"]),
    default="linear",
    show_default=True,
    help="nearest for label masks.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ome-zarr", "ome-tiff"]),
    default=None,
    help="Output format (default: from OUT's suffix).",
)
@click.option(
    "--chunk",
    type=click.IntRange(MIN_CHUNK, MAX_CHUNK),
    default=1024,
    show_default=True,
    help="Output chunk side (px).",
)
@click.option("--ngff-version", type=click.Choice(["0.4", "0.5"]), default="0.4", show_default=True)
@click.option("--scheduler", default=None, help="Address of a dask.distributed scheduler.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Start a local dask.distributed cluster of N worker processes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads (threaded scheduler) or threads per worker (cluster).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted warp of the same inputs, transform and options (else refused).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def warp(  # noqa: PLR0913 - click passes each option as one argument
    transform: Path,
    source: Path,
    out: Path,
    level: int,
    interpolation: str,
    fmt: str | None,
    chunk: int,
    ngff_version: str,
    scheduler: str | None,
    workers: int | None,
    threads: int | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Resample SOURCE (any slide in the source's frame) into target space through TRANSFORM.

    TRANSFORM is a transform directory or a `wsireg register` output directory.
    """
    from wsireg.engine.warp import warp as run_warp
    from wsireg.io.convert import output_format

    if scheduler and workers:
        raise click.UsageError("give --scheduler or --workers, not both")
    check_output_place(out, [transform, source])
    run_warp(
        transform,
        source,
        out,
        level=level,
        interpolation=interpolation,
        fmt=output_format(out, fmt),
        chunk=chunk,
        ngff_version=ngff_version,
        scheduler=scheduler,
        workers=workers,
        threads=threads,
        resume=resume,
        overwrite=overwrite,
    )
    click.echo(str(out))


def _direction(inverse: bool) -> Direction:
    # Default: points of the source slide go to the target, as `wsireg warp` moves pixels.
    return "target_to_source" if inverse else "source_to_target"


@cli.command(
    "warp-points",
    epilog=examples(
        "wsireg warp-points out/ he-landmarks.csv -o in-target.csv    # source -> target",
        "wsireg warp-points out/ ihc-landmarks.csv -o in-source.csv --inverse",
        'Python: Transform.map_points(points, "source_to_target") / "target_to_source"',
    ),
)
@quiet_option
@click.argument("transform", type=TRANSFORM)
@click.argument("points", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--inverse",
    is_flag=True,
    help="Map target-slide points into the source (default: source -> target).",
)
@click.option("--overwrite", is_flag=True)
def warp_points(transform: Path, points: Path, out: Path, inverse: bool, overwrite: bool) -> None:
    """Map the landmarks of an ANHIR CSV (,X,Y) through TRANSFORM."""
    from wsireg.engine.transform import Transform
    from wsireg.io.annotations import read_landmarks, write_landmarks

    check_output_place(out, [transform, points])
    loaded = Transform.load(transform)
    mapped, residual = loaded.map_points_with_residual(read_landmarks(points), _direction(inverse))
    write_landmarks(out, mapped, overwrite=overwrite)
    if len(residual) and residual.max() > 0.05:
        click.echo(f"warning: inverse residual up to {residual.max():.3g} px", err=True)
    click.echo(str(out))


@cli.command(
    "warp-geojson",
    epilog=examples(
        "wsireg warp-geojson out/ he-annotations.geojson -o in-target.geojson",
        "wsireg warp-geojson out/ ihc.geojson -o in-source.geojson --inverse",
    ),
)
@quiet_option
@click.argument("transform", type=TRANSFORM)
@click.argument("annotations", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--inverse",
    is_flag=True,
    help="Map target-slide annotations into the source (default: source -> target).",
)
@click.option(
    "--max-segment",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Densify edges longer than this (level-0 px; default: half the field "
    "spacing, none for affine-only transforms).",
)
@click.option("--no-densify", is_flag=True, help="Map the vertices only (no densification).")
@click.option(
    "--pixel-origin",
    type=click.Choice(["corner", "centre"]),
    default="corner",
    show_default=True,
    help="corner: QuPath's convention (pixel centres at +0.5).",
)
@click.option("--overwrite", is_flag=True)
def warp_geojson(
    transform: Path,
    annotations: Path,
    out: Path,
    inverse: bool,
    max_segment: float | None,
    no_densify: bool,
    pixel_origin: str,
    overwrite: bool,
) -> None:
    """Map GeoJSON annotations (e.g. a QuPath export) through TRANSFORM."""
    from wsireg.engine.transform import Transform
    from wsireg.io.annotations import map_geojson, read_geojson, write_geojson

    check_output_place(out, [transform, annotations])
    loaded = Transform.load(transform)
    document = read_geojson(annotations)
    if no_densify and max_segment is not None:
        raise click.UsageError("give --max-segment or --no-densify, not both")
    if max_segment is None and not no_densify:
        spacing = [s.field_downsample for s in loaded.stages if s.field is not None]
        max_segment = min(spacing) / 2 if spacing else None
    # the slide the annotations are drawn on: densification covers it only
    height, width = (loaded.target if inverse else loaded.source).shape

    def mapper(xy):  # type: ignore[no-untyped-def]
        return loaded.map_points(xy, _direction(inverse))

    mapped = map_geojson(
        document,
        mapper,
        max_segment=max_segment,
        pixel_origin=pixel_origin,
        extent=(width, height),
        name=annotations,
    )
    write_geojson(out, mapped, overwrite=overwrite)
    click.echo(str(out))
