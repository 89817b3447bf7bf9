"""``wsireg train``: train the multi-level registration network (unsupervised, on CPU or GPU)."""

from __future__ import annotations

from pathlib import Path

import click

from .main import cli, examples


def _weights(value: str | None) -> dict[str, float] | None:
    """``name=weight,...`` as a dict (``None`` when not given)."""
    if value is None:
        return None
    weights = {}
    for item in value.split(","):
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not NAME=WEIGHT") from None
    return weights


#: Training sources read from the folder of --slides-dir (wsireg.model.training_data).
SLIDE_SOURCES = ("cmu", "tcga")


def _check_slides_dir(sources: dict[str, float], slides_dir: Path | None) -> None:
    """A usage error when ``sources`` draw from real slides and no folder holds them (the
    data is never looked for beside the installed package)."""
    needed = [name for name in SLIDE_SOURCES if float(sources.get(name, 0)) > 0]
    if needed and slides_dir is None:
        raise click.UsageError(
            f"the sources {', '.join(needed)} read real slides: give --slides-dir FOLDER "
            "(e.g. ../shared/data/slides) or set WSIREG_SLIDES_DIR, or leave them out "
            "with --sources"
        )


@cli.command(
    epilog=examples(
        "wsireg train -o base/ --slides-dir ../shared/data/slides",
        "wsireg train --init-weights base/model.pt --section-change 0.5 --lr 5e-4 --epochs 6 \\",
        "    --slides-dir ../shared/data/slides -o mid/",
        "wsireg train -o base/ --resume --epochs 40 --slides-dir ../shared/data/slides",
    )
)
@click.argument("config", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Model directory (model.pt, log.csv, checkpoint.pt, ...).",
)
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in OUT.")
@click.option("--epochs", type=int, help="Number of epochs (with --resume: the new total).")
@click.option("--steps-per-epoch", type=int, help="Training steps per epoch.")
@click.option("--batch", type=int, help="Pairs per training step.")
@click.option("--levels", type=int, help="Pyramid levels N (one network each).")
@click.option("--iterations", type=int, help="Iterations M per level.")
@click.option("--patch", type=int, help="Patch side P (multiple of 32).")
@click.option("--stride", type=int, help="Stride S (P - S even).")
@click.option("--group", type=int, help="Group size G (patches per optimiser step).")
@click.option(
    "--train-groups",
    type=int,
    help="Groups trained per level and iteration (others only predicted); 0 = all.",
)
@click.option("--alpha", type=float, help="Curvature weight in -NCC + alpha*CURV.")
@click.option("--lr", type=float, help="Initial Adam learning rate.")
@click.option("--lr-decay", type=float, help="Per-epoch learning-rate factor.")
@click.option("--crop", type=int, help="Training pair side at the finest level (px).")
@click.option("--max-displacement", type=float, help="Largest random displacement (px).")
@click.option(
    "--stain-loss",
    type=click.Choice(["same", "cross"]),
    help="Loss on both sides in the original stain (same) or on the inputs (cross).",
)
@click.option(
    "--supervision",
    type=float,
    help="Initial weight of the end-point error to the synthetic truth (0 = off).",
)
@click.option("--supervision-epochs", type=int, help="Epochs over which it decays to 0.")
@click.option(
    "--section-change",
    type=float,
    help="Probability of a 'neighbouring section' pair (fine mismatch left out of the truth).",
)
@click.option(
    "--content-change",
    type=float,
    help="Probability that a blob of the fixed side shows other tissue (left out of the truth).",
)
@click.option(
    "--similarity",
    type=click.Choice(["ncc", "lncc2"]),
    help="SIM of -SIM + alpha*CURV (default ncc, the paper's).",
)
@click.option(
    "--stain-changes",
    callback=lambda _ctx, _param, value: None if value is None else value.split(","),
    help="Stain changes of real crops, comma-separated among he,ihc,single,swap,fade "
    "(default: he,ihc,single,swap).",
)
@click.option(
    "--representation",
    type=click.Choice(["od", "grey", "haematoxylin"]),
    help="Network input: optical-density magnitude (od, default), inverted grey, or the "
    "haematoxylin amount by colour deconvolution.",
)
@click.option(
    "--init-weights",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from the networks of this model file (fine-tuning).",
)
@click.option("--seed", type=int, help="Random seed (data and initialisation).")
@click.option("--threads", type=int, help="torch CPU threads.")
@click.option(
    "--sources",
    callback=lambda _ctx, _param, value: _weights(value),
    help="Sampling weights of the data sources, e.g. synthetic=0.3,cmu=0.15,tcga=0.2,ihc=0.1,"
    "sections=0.25 (default: synthetic=0.4,cmu=0.2,tcga=0.25,ihc=0.15).",
)
@click.option(
    "--sections",
    multiple=True,
    callback=lambda _ctx, _param, value: tuple(str(Path(v).resolve()) for v in value) or None,
    type=click.Path(exists=True, dir_okay=False),
    help="Image of a real section, in section order (repeat; the 'sections' source: "
    "neighbouring sections aligned affinely, trained with the unsupervised loss).",
)
@click.option(
    "--section-gap", type=int, help="Sections up to this far apart make pairs (default 1)."
)
@click.option(
    "--slides-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    envvar="WSIREG_SLIDES_DIR",
    help="Folder with the real training slides (cmu-1-small-region.svs, "
    "tcga-cr-7395-01a-01-ts1.svs), or $WSIREG_SLIDES_DIR; needed when the sources include "
    "cmu or tcga (the default ones do).",
)
def train(
    config: Path | None, out_dir: Path, resume: bool, slides_dir: Path | None, **options: object
) -> None:
    """Train per-level U-Nets with Algorithm 1's training branch and save OUT/model.pt.

    CONFIG is an optional JSON object of training options (see wsireg.model.train.TrainConfig);
    command-line options override it. With --resume the configuration stored in OUT is used
    (only --epochs and --threads may change it).
    """
    # imported here, not at the top: `wsireg --help` and the other verbs need no torch
    from wsireg.model.train import MODEL, resolve_config
    from wsireg.model.train import train as run_train

    cfg = resolve_config(config, options, out_dir, resume)
    _check_slides_dir(cfg.crops.sources, slides_dir)
    sections = ()
    if cfg.crops.sections:
        from wsireg.run.sections import aligned_sections

        sections = aligned_sections(cfg.crops.sections, cfg.crops.section_gap)
    model = run_train(cfg, out_dir, resume=resume, slides_dir=slides_dir, sections=sections)
    click.echo(str(out_dir / MODEL))
    final = model.metadata.get("training", {}).get("final_loss")
    if final is not None:
        click.echo(f"final loss {final:.4f}", err=True)
