"""``wsireg warp``, ``wsireg warp-points``, ``wsireg warp-geojson`` and ``wsireg transform
export``.

Each verb imports the library inside its function, so that ``wsireg --help`` and the other verbs
do not pay for importing torch, dask and zarr.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .main import cli, examples, quiet_option
from .options import (
    TIFF_COMPRESSIONS,
    FiniteFloat,
    channels_option,
    check_output_place,
    chunk_option,
    ngff_version_option,
    tile_option,
)

if TYPE_CHECKING:  # annotations only: importing it loads zarr
    from wsireg.engine.transform import Direction

TRANSFORM = click.Path(path_type=Path)


@cli.command(
    epilog=examples(
        "wsireg warp out/ he.svs -o he-warped.ome.zarr",
        "wsireg warp out/transform mask.tif -o mask.ome.tif --interpolation nearest",
        "wsireg warp out/ he.svs -o he-warped.ome.tif --compression zstd --tile 256",
        "wsireg warp out/ cycif.ome.tif -o cycif-warped.ome.zarr --channels DAPI,CD3,CD8",
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
    help="nearest for label masks (required for label images: values kept exactly).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ome-zarr", "ome-tiff"]),
    default=None,
    help="Output format (default: from OUT's suffix).",
)
@chunk_option("Output chunk side (px).")
@ngff_version_option("an OME-Zarr output")
@click.option(
    "--compression",
    type=click.Choice(TIFF_COMPRESSIONS),
    default=None,
    help="OME-TIFF: jpeg|zlib|zstd|none (default jpeg for brightfield RGB; zlib with "
    "--interpolation nearest and for fluorescence and labels, which refuse jpeg); "
    "OME-Zarr: zstd|zlib|none (default zstd, Blosc).",
)
@tile_option("; an OME-Zarr's chunks are --chunk")
@channels_option()
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
    compression: str | None,
    tile: int,
    channels: tuple[str, ...] | None,
    scheduler: str | None,
    workers: int | None,
    threads: int | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Resample SOURCE (any slide in the source's frame) into target space through TRANSFORM.

    Every channel is warped at its own dtype with its name: brightfield as RGB, fluorescence
    (all channels, or --channels) and label images (--interpolation nearest) as stored.

    TRANSFORM is a transform directory, a `wsireg register` output directory, an ITK
    displacement image (.mha, .nrrd, .nii, .nii.gz) or an OME-NGFF 0.6 displacements zarr
    (level-0 pixels, target -> source; see `wsireg transform export`).
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
        compression=compression,
        tile=tile,
        channels=channels,
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
    """Map the landmarks of an ANHIR CSV (,X,Y) through TRANSFORM.

    TRANSFORM is a transform directory, a `wsireg register` output directory, an ITK
    displacement image (.mha, .nrrd, .nii, .nii.gz) or an OME-NGFF 0.6 displacements zarr.
    """
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
    "--tolerance",
    type=FiniteFloat(min=0, min_open=True),
    default=0.25,
    show_default=True,
    help="Add vertices only where the transform bends an edge by more than this (level-0 px "
    "of the output); coordinates keep the decimals it justifies (2 for 0.25 px).",
)
@click.option(
    "--max-segment",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Instead: densify every edge to pieces of at most this length (level-0 px).",
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
def warp_geojson(  # noqa: PLR0913 - click passes each option as one argument
    transform: Path,
    annotations: Path,
    out: Path,
    inverse: bool,
    tolerance: float,
    max_segment: float | None,
    no_densify: bool,
    pixel_origin: str,
    overwrite: bool,
) -> None:
    """Map GeoJSON annotations (e.g. a QuPath export) through TRANSFORM.

    By default an edge gets vertices only where the transform bends it by more than
    --tolerance (halving it while a probe at 1/4, 1/2 or 3/4 of a piece maps further than that
    from the chord of its mapped ends), only over the slide the annotations are on;
    coordinates are rounded to k decimals, the fewest with 0.5 * 10^-k <= tolerance / 10.
    Positions off that slide are mapped by extrapolation, with a warning saying how many.
    """
    from wsireg.engine.transform import Transform
    from wsireg.io.annotations import (
        coordinate_decimals,
        map_annotations,
        read_geojson,
        write_geojson,
    )

    check_output_place(out, [transform, annotations])
    if no_densify and max_segment is not None:
        raise click.UsageError("give --max-segment or --no-densify, not both")
    loaded = Transform.load(transform)
    document = read_geojson(annotations)
    # the slide the annotations are drawn on: densification covers it only
    drawn_on, which = (loaded.target, "target") if inverse else (loaded.source, "source")
    height, width = drawn_on.shape

    def mapper(xy):  # type: ignore[no-untyped-def]
        return loaded.map_points(xy, _direction(inverse))

    result = map_annotations(
        document,
        mapper,
        max_segment=max_segment,
        tolerance=None if (no_densify or max_segment is not None) else tolerance,
        pixel_origin=pixel_origin,
        extent=(width, height) if drawn_on.known else None,
        decimals=coordinate_decimals(tolerance),
        name=annotations,
    )
    write_geojson(out, result.document, overwrite=overwrite)
    if result.outside:
        click.echo(
            f"warning: {result.outside} of {result.positions} positions lie outside the "
            f"{which} slide ({width} x {height} px); their mapping extrapolates the transform",
            err=True,
        )
    click.echo(str(out))


@cli.group(
    "transform",
    epilog=examples(
        "wsireg transform export out/ -o field.zarr      # OME-NGFF 0.6 displacements",
        "wsireg transform export out/ -o field.mha       # ITK displacement image",
    ),
)
def transform_group() -> None:
    """Transforms exchanged with other tools (ITK, OME-NGFF 0.6)."""


@transform_group.command(
    "export",
    epilog=examples(
        "wsireg transform export out/transform --format ngff -o field.zarr",
        "wsireg transform export out/ --format itk -o field.mha       # elastix, ITK, TIAToolbox",
        "wsireg transform export out/ -o field.nii.gz --downsample 64",
    ),
)
@quiet_option
@click.argument("transform", type=TRANSFORM)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output: an NGFF zarr (.zarr) or an ITK image (.mha, .nrrd, .nii, .nii.gz).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ngff", "itk"]),
    default=None,
    help="ngff: OME-NGFF 0.6 displacements, written chunk by chunk; itk: one in-memory "
    "displacement image (at most 2^26 nodes). Default: from OUT's ending.",
)
@click.option(
    "--downsample",
    type=FiniteFloat(min=1, min_open=False),
    default=None,
    help="Target level-0 px per field node (default: the finest field's; a power of two "
    "keeping an affine-only transform within 1024 nodes).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def transform_export(
    transform: Path, out: Path, fmt: str | None, downsample: float | None, overwrite: bool
) -> None:
    """Write TRANSFORM as one dense displacement field other tools read.

    The whole transform (affine and fields, every stage) becomes d(x) = T(x) - x on the target
    grid: in level-0 pixels, node [i, j] at (D (j + 0.5) - 0.5, D (i + 0.5) - 0.5), so
    x + d(x) is the source position of target point x (ITK: fixed -> moving; origin
    D/2 - 0.5, spacing D). wsireg reads both back (warp, warp-points, warp-geojson).
    """
    from wsireg.engine.exchange import export_format, export_transform
    from wsireg.engine.transform import Transform

    check_output_place(out, [transform])
    loaded = Transform.load(transform)
    export_transform(loaded, out, export_format(out, fmt), downsample, overwrite=overwrite)
    click.echo(str(out))
