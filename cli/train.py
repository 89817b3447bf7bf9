"""``wsireg train``: train the multi-level registration network (unsupervised, on CPU or GPU)."""

from __future__ import annotations

from pathlib import Path

import click

from .main import cli


@cli.command()
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
    "--slides-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder with the real training slides (default: ../shared/data/slides).",
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
    model = run_train(cfg, out_dir, resume=resume, slides_dir=slides_dir)
    click.echo(str(out_dir / MODEL))
    final = model.metadata.get("training", {}).get("final_loss")
    if final is not None:
        click.echo(f"final loss {final:.4f}", err=True)
