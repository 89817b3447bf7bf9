"""``wsireg info`` and ``wsireg convert``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import cli, quiet_option


@cli.command()
@quiet_option
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def info(slide: Path, as_json: bool) -> None:
    """Levels, sizes, microns per pixel, vendor and associated images of SLIDE."""
    from wsireg.io.slide import open_slide

    with open_slide(slide) as opened:
        data = opened.info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{data['path']}")
    click.echo(f"  vendor: {data['vendor']} (read with {data['backend']})")
    mpp = data["mpp"]
    click.echo(f"  mpp: {f'{mpp[0]:.4g} x {mpp[1]:.4g} um/px' if mpp else 'unknown'}")
    click.echo(f"  levels: {data['level_count']}")
    for level in data["levels"]:
        click.echo(
            f"    {level['level']}: {level['width']} x {level['height']} px"
            f"  (downsample {level['downsample']:g})"
        )
    images = data["associated_images"]
    if images:
        listed = ", ".join(f"{name} {shape[1]}x{shape[0]}" for name, shape in images.items())
        click.echo(f"  associated images: {listed}")
    else:
        click.echo("  associated images: none")


def output_format(path: Path, given: str | None) -> str:
    """``ome-zarr`` or ``ome-tiff``, from ``--format`` or the output's suffix."""
    if given:
        return given
    name = path.name.lower()
    if name.endswith((".tif", ".tiff")):
        return "ome-tiff"
    return "ome-zarr"


@cli.command()
@quiet_option
@click.argument("slide", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ome-zarr", "ome-tiff"]),
    default=None,
    help="Output format (default: from OUT's suffix; .tif/.tiff -> OME-TIFF, else OME-Zarr).",
)
@click.option("--level", default=0, show_default=True, help="Slide level to convert.")
@click.option("--chunk", default=1024, show_default=True, help="OME-Zarr chunk side (px).")
@click.option("--tile", default=512, show_default=True, help="OME-TIFF tile side (px).")
@click.option(
    "--compression",
    type=click.Choice(["jpeg", "zlib", "zstd", "none"]),
    default="jpeg",
    show_default=True,
    help="OME-TIFF tile compression.",
)
@click.option(
    "--ngff-version",
    type=click.Choice(["0.4", "0.5"]),
    default="0.4",
    show_default=True,
    help="OME-NGFF version of an OME-Zarr output (0.4: zarr v2 format, 0.5: zarr v3).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(
    slide: Path,
    out: Path,
    fmt: str | None,
    level: int,
    chunk: int,
    tile: int,
    compression: str,
    ngff_version: str,
    overwrite: bool,
) -> None:
    """Convert any readable SLIDE to a multiscale OME-Zarr or pyramidal OME-TIFF (OUT)."""
    from wsireg.io.ngff import write_ome_tiff, write_ome_zarr
    from wsireg.io.output import check_output
    from wsireg.io.slide import open_slide

    check_output(out, overwrite)
    with open_slide(slide) as opened:
        if not 0 <= level < opened.level_count:
            raise click.BadParameter(
                f"{slide} has levels 0..{opened.level_count - 1}", param_hint="--level"
            )
        mpp = opened.mpp
        if mpp is not None:
            ds = opened.level_downsamples[level]
            mpp = (mpp[0] * ds, mpp[1] * ds)
        image = opened.level(level)
        if output_format(out, fmt) == "ome-tiff":
            write_ome_tiff(
                image, out, mpp=mpp, tile=tile, compression=compression, overwrite=overwrite
            )
        else:
            write_ome_zarr(
                image,
                out,
                mpp=mpp,
                chunk=chunk,
                ngff_version=ngff_version,
                name=Path(slide).name,
                overwrite=overwrite,
            )
    click.echo(str(out))
