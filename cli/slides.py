"""``wsireg info`` and ``wsireg convert``.

Each verb imports the library inside its function, so that ``wsireg --help`` and the other verbs
do not pay for importing dask, zarr and the slide readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import cli, examples, quiet_option
from .options import (
    TIFF_COMPRESSIONS,
    channels_option,
    check_output_place,
    chunk_option,
    format_option,
    ngff_version_option,
    tile_option,
)


@cli.command(epilog=examples("wsireg info he.svs", "wsireg info he.svs --json > he.json"))
@quiet_option
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def info(slide: Path, as_json: bool) -> None:
    """Levels, sizes, microns per pixel, vendor, channels (kind, dtype, names) and associated
    images of SLIDE, and the channel registration reads by default."""
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
    pixels = data["pixels"]
    click.echo(f"  pixels: {pixels['kind']}, {pixels['dtype']}, {len(pixels['channels'])} channels")
    for channel in pixels["channels"]:
        click.echo(f"    {channel['index']}: {channel['name']}  (#{channel['color']})")
    click.echo(f"  registered on: {data['shown']}")
    images = data["associated_images"]
    if images:
        listed = ", ".join(f"{name} {shape[1]}x{shape[0]}" for name, shape in images.items())
        click.echo(f"  associated images: {listed}")
    else:
        click.echo("  associated images: none")


@cli.command(
    epilog=examples(
        "wsireg convert he.svs he.ome.zarr", "wsireg convert he.svs he.ome.tif --level 1"
    )
)
@quiet_option
@click.argument("slide", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@format_option()
@click.option(
    "--level",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Slide level to convert.",
)
@chunk_option("OME-Zarr chunk side (px).")
@tile_option()
@click.option(
    "--compression",
    type=click.Choice(TIFF_COMPRESSIONS),
    default=None,
    help="OME-TIFF tile compression (default: jpeg for brightfield RGB, zlib for "
    "fluorescence and labels).",
)
@channels_option()
@ngff_version_option("an OME-Zarr output")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(  # noqa: PLR0913 - click passes each option as one argument
    slide: Path,
    out: Path,
    fmt: str | None,
    level: int,
    chunk: int,
    tile: int,
    compression: str | None,
    channels: tuple[str, ...] | None,
    ngff_version: str,
    overwrite: bool,
) -> None:
    """Convert any readable SLIDE to a multiscale OME-Zarr or pyramidal OME-TIFF (OUT)."""
    from wsireg.io.convert import convert as convert_slide
    from wsireg.io.convert import default_tiff_compression
    from wsireg.io.ngff import ZarrLayout
    from wsireg.io.slide import open_slide
    from wsireg.io.tiff import TiffLayout

    with open_slide(slide) as opened:  # a bad input is named before a bad output place
        check_output_place(out, [slide])
        convert_slide(
            opened,
            out,
            level=level,
            fmt=fmt,
            zarr_layout=ZarrLayout(chunk=chunk, ngff_version=ngff_version),
            tiff_layout=TiffLayout(
                tile=tile, compression=compression or default_tiff_compression(opened)
            ),
            channels=channels,
            overwrite=overwrite,
        )
    click.echo(str(out))


@cli.command(
    epilog=examples(
        "wsireg merge cycif.ome.zarr round1.ome.tif r2/warped.ome.zarr r3/warped.ome.zarr",
        "wsireg merge panel.ome.tif he.svs if-warped.ome.zarr --prefix HE,IF",
    )
)
@quiet_option
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--prefix",
    "prefixes",
    default=None,
    metavar="NAMES",
    help="Channel-name prefix of each slide, comma-separated, one per slide (default: the "
    "image name each file stores, else its file name).",
)
@format_option()
@chunk_option("OME-Zarr chunk side (px).")
@tile_option()
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def merge(  # noqa: PLR0913 - click passes each option as one argument
    out: Path,
    slides: tuple[Path, ...],
    prefixes: str | None,
    fmt: str | None,
    chunk: int,
    tile: int,
    overwrite: bool,
) -> None:
    """Merge SLIDES of one reference frame (the target and the sources warped onto it) into
    one multichannel OUT: every channel of each, in order, named PREFIX NAME."""
    from wsireg.io.merge import merge as run_merge

    check_output_place(out, list(slides))
    names = None if prefixes is None else [p.strip() for p in prefixes.split(",")]
    run_merge(slides, out, prefixes=names, fmt=fmt, chunk=chunk, tile=tile, overwrite=overwrite)
    click.echo(str(out))
