"""``wsireg register``, ``wsireg demo`` and ``wsireg deform``.

Each verb imports the library inside its function, so that ``wsireg --help`` and the other
verbs do not pay for importing torch, dask and zarr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .main import cli, examples, quiet_option
from .options import (
    BLOCK,
    PATCH_MULTIPLE,
    Divisor,
    FiniteFloat,
    Multiple,
    check_output_place,
    check_patch_and_stride,
    cluster_options,
    execution_from_cli,
    ngff_version_option,
)

if TYPE_CHECKING:  # annotations only: importing it loads torch
    from wsireg.run.settings import RegisterOptions


def register_options(function):  # type: ignore[no-untyped-def]
    """Options shared by ``register`` and ``batch``."""
    options = [
        click.option(
            "--level",
            type=click.IntRange(min=0),
            default=None,
            help="Finest target level of the field (0 = full resolution; default: "
            "from the slide size, about 2048 px on the longest side).",
        ),
        click.option(
            "--levels", type=click.IntRange(1, 12), default=None, help="Pyramid levels N."
        ),
        click.option(
            "--iterations",
            type=click.IntRange(1, 100),
            default=None,
            help="Iterations per level M.",
        ),
        click.option(
            "--patch",
            type=Multiple(PATCH_MULTIPLE, min=PATCH_MULTIPLE, max=BLOCK),
            default=None,
            help="Patch size P (px of a level).",
        ),
        click.option(
            "--stride",
            type=Divisor(BLOCK, min=2),
            default=None,
            help="Stride S (at most P, P - S even).",
        ),
        click.option(
            "--group",
            type=click.IntRange(1, 4096),
            default=None,
            help="Patches per network call G.",
        ),
        click.option(
            "--refine",
            type=click.IntRange(0, 10000),
            default=None,
            help="Instance-optimisation steps per block at the coarsest level, halved per "
            "finer level (default: 0 where the networks run; 40 at levels without a network "
            "and with --weights none).",
        ),
        click.option(
            "--weights",
            default="default",
            show_default=True,
            help="'default' (the shipped networks, Algorithm 1), 'none' (pure instance "
            "optimisation) or a .pt path; README compares their accuracy.",
        ),
        click.option(
            "--flips",
            type=click.Choice(["1", "2", "4"]),
            default=None,
            help="Average the networks' predictions over 1, 2 or 4 flips of each patch "
            "(more flips: less noise, that many times the network time; default: the "
            "model's setting).",
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "float32", "bfloat16"]),
            default=None,
            help="The networks' arithmetic: auto (bfloat16 where the CPU or GPU computes it "
            "natively, else float32; the default), float32 (the same numbers on every "
            "machine) or bfloat16.",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
        ),
        click.option(
            "--warp-level",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Target level of the warped source (warped.ome.zarr).",
        ),
        click.option("--no-warp", is_flag=True, help="Do not write the warped source."),
        click.option(
            "--source-channel",
            default=None,
            metavar="NAME|INDEX",
            help="Channel of SOURCE to register on: a name or index of a fluorescence "
            "slide's channels, or 'haematoxylin' of a brightfield slide (default: a "
            "fluorescence slide's DAPI/Hoechst channel, else its first; brightfield as "
            "stored, its haematoxylin against fluorescence). `wsireg info` lists them.",
        ),
        click.option(
            "--target-channel",
            default=None,
            metavar="NAME|INDEX",
            help="Channel of TARGET to register on (as --source-channel).",
        ),
        click.option(
            "--channel",
            default=None,
            metavar="NAME|INDEX",
            help="The same channel of both slides (e.g. DAPI across cyclic rounds).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def options_from_cli(values: dict) -> RegisterOptions:
    """The :class:`~wsireg.run.settings.RegisterOptions` of the shared options (removed from
    ``values``)."""
    from wsireg.run.settings import RegisterOptions  # here: the CLI starts without torch

    weights, flips = values.pop("weights"), values.pop("flips")
    check_patch_and_stride(values["patch"], values["stride"])
    both = values.pop("channel")
    source_channel, target_channel = values.pop("source_channel"), values.pop("target_channel")
    if both is not None and (source_channel is not None or target_channel is not None):
        raise click.UsageError("give --channel or --source-channel/--target-channel, not both")
    return RegisterOptions(
        level=values.pop("level"),
        levels=values.pop("levels"),
        iterations=values.pop("iterations"),
        patch=values.pop("patch"),
        stride=values.pop("stride"),
        group=values.pop("group"),
        refine=values.pop("refine"),
        weights=None if weights == "none" else weights,
        flips=None if flips is None else int(flips),
        precision=values.pop("precision"),
        device=values.pop("device"),
        warp_level=values.pop("warp_level"),
        write_warped=not values.pop("no_warp"),
        source_channel=both if both is not None else source_channel,
        target_channel=both if both is not None else target_channel,
    )


@cli.command(
    epilog=examples(
        "wsireg register he.svs ihc.svs -o out/            # SOURCE (moving), TARGET (fixed)",
        "wsireg register he.svs ihc.svs -o out/ --level 0 --device cuda",
        "wsireg register he.svs ihc.svs -o out/ --level 0 --workers 4   # blocks on 4 processes",
        "wsireg register he.svs ihc.svs -o out/ --level 0 --scheduler tcp://head:8786 "
        "--gpu-resources",
        "wsireg register he.svs ihc.svs -o out/ --weights none --no-warp",
        "wsireg register he.svs ihc.svs -o out/ --format ome-tiff   # out/warped.ome.tif",
        "wsireg register if.ome.tif he.svs -o out/      # DAPI against haematoxylin",
        "wsireg register round2.ome.tif round1.ome.tif -o out/ --channel DAPI",
        "wsireg -q register he.svs ihc.svs -o out/ 2> register.log",
    )
)
@quiet_option
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory (transform/, warped.ome.zarr or warped.ome.tif, qc/, report.json).",
)
@register_options
@cluster_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ome-zarr", "ome-tiff"]),
    default="ome-zarr",
    show_default=True,
    help="Format of the warped source: warped.ome.zarr or warped.ome.tif (as `wsireg warp`).",
)
@ngff_version_option("warped.ome.zarr")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run into OUT (same inputs and options, else refused).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--strict",
    is_flag=True,
    help="Fail (exit 1, nothing written) when the quality gate finds the registration "
    "implausible (default: a warning on stderr, the verdict in report.json).",
)
def register(  # noqa: PLR0913 - click passes each option as one argument
    source: Path,
    target: Path,
    out: Path,
    resume: bool,
    overwrite: bool,
    strict: bool,
    fmt: str,
    ngff_version: str,
    **values,
) -> None:
    """Register SOURCE (moving) onto TARGET (fixed) and warp it into target space.

    Brightfield, fluorescence and label slides: registration reads one channel of each
    (--source-channel/--target-channel), the warp writes every channel of SOURCE at its dtype.
    """
    from wsireg.run.register import quality_warning, summary_lines
    from wsireg.run.register import register as run

    check_output_place(out, [source, target])
    execution = execution_from_cli(values)
    options = options_from_cli(values)
    result = run(
        source,
        target,
        out,
        options,
        execution=execution,
        resume=resume,
        overwrite=overwrite,
        strict=strict,
        fmt=fmt,
        ngff_version=ngff_version,
    )
    quality = result.report["quality"]
    if not quality["plausible"]:
        click.echo(f"wsireg: warning: {result.out}: {quality_warning(quality)}", err=True)
    click.echo("\n".join(summary_lines(result)))


@cli.command(
    epilog=examples("wsireg demo demo-out", "wsireg demo demo-out --size 2048 --overwrite")
)
@quiet_option
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--size",
    type=click.IntRange(512, 65536),
    default=4096,
    show_default=True,
    help="Side of the synthetic slides.",
)
@click.option("--seed", type=click.IntRange(min=0), default=7, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def demo(out: Path, size: int, seed: int, overwrite: bool) -> None:
    """Register a synthetic pair with a known deformation and print the error."""
    from wsireg.run.demo import run_demo

    check_output_place(out, [])

    summary = run_demo(out, size=size, seed=seed, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))


@cli.command(
    epilog=examples(
        "wsireg deform he.svs -o he-deformed.ome.tif --rotation 30",
        "wsireg register he-deformed.ome.tif he.svs -o out/",
    )
)
@quiet_option
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The deformed slide (.ome.tif or .ome.zarr); the truth goes to OUT.truth/.",
)
@click.option(
    "--rotation",
    type=FiniteFloat(-360, 360),
    default=0.0,
    show_default=True,
    help="Degrees about the centre.",
)
@click.option(
    "--max-displacement",
    type=FiniteFloat(min=0),
    default=None,
    help="Largest nonrigid displacement, level-0 px (default 0.5 % of the size).",
)
@click.option("--flip", is_flag=True, help="Mirror the slide too.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def deform(
    slide: Path,
    out: Path,
    rotation: float,
    max_displacement: float | None,
    flip: bool,
    seed: int,
    overwrite: bool,
) -> None:
    """Write SLIDE through a known random deformation (a test pair with exact truth)."""
    from wsireg.run.deform import deform_slide

    check_output_place(out, [slide])

    written, truth = deform_slide(
        slide,
        out,
        rotation=rotation,
        max_displacement=max_displacement,
        flip=flip,
        seed=seed,
        overwrite=overwrite,
    )
    click.echo(f"{written}\n{truth}")
