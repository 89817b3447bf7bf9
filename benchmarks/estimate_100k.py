"""A 100k x 100k level-0 registration on paper: the plan per pyramid step and its time on W
workers, from the per-block seconds a real run measured.

The plan (exact, from the code): ``wsireg register --level 0`` with the default networks on a
``SIZE`` x ``SIZE`` target (:func:`wsireg.run.settings.resolve_settings`): per pyramid step
the grid, its blocks (:data:`~wsireg.engine.scheduler.SchedulerSettings.block` px of the
step), the network patch passes of a block on tissue (``M`` iterations x flips x patches of
the block's halo span at P / S) or its instance-optimisation steps, and the bytes a block
reads (target and warped source over the halo span, RGB, plus the coarser field under it).

The time (an estimate): each step's blocks cost what the same kind of step cost per block in
``--report`` (a ``report.json`` of ``register --level 0`` with the default networks, e.g.
``scale_register.py --sizes 10000 --level 0 --keep``: its ``pyramid``, seconds x concurrent
blocks / blocks), network steps matched by downsample, instance-optimisation steps by the
seconds of one step of a block (the largest of the report's) times their steps; a step on W
workers takes ``ceil(blocks / W)`` block times, levels one after the other. The rate of one
worker is one block at a time with one torch thread, as measured on the report's machine;
GPU rates need a GPU run (``--device cuda``) and are not assumed here.

    python benchmarks/estimate_100k.py --report /tmp/wsireg-scale/result-10000/report.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from wsireg.core.blocks import count_blocks
from wsireg.engine.scheduler import grid_shape
from wsireg.engine.transform import SlideRef
from wsireg.model.network import default_weights_path, load_default, sha256_file
from wsireg.run.settings import RegisterOptions, resolve_settings


def plan(size: int) -> list[dict]:
    """Blocks, patch passes and bytes per pyramid step of a ``size``² level-0 registration."""
    target = SlideRef(path=None, shape=(size, size), mpp=(0.5, 0.5))
    model = load_default("cpu")
    weights = {"path": str(default_weights_path()), "sha256": sha256_file(default_weights_path())}
    settings = resolve_settings(RegisterOptions(level=0), target, model, weights, "cpu")
    scheduler = settings.scheduler
    inference = scheduler.inference
    span = scheduler.block + 2 * scheduler.extra + inference.patch - inference.stride
    patches = ((span - inference.patch) // inference.stride + 1) ** 2
    networks = model.num_levels
    steps = []
    for k, downsample in enumerate(scheduler.downsamples()):
        shape = grid_shape(target, downsample)
        blocks = count_blocks(shape, scheduler.block)
        has_network = k >= scheduler.levels - networks
        refine = scheduler.refine.steps_at(k, has_network=has_network)
        steps.append(
            {
                "pyramid_step": k,
                "downsample": downsample,
                "grid": list(shape),
                "blocks": blocks,
                "network": has_network,
                "patch_passes_per_block": patches * inference.iterations * inference.flips
                if has_network
                else 0,
                "refine_steps": refine,
                "read_mib_per_block": round(
                    (2 * 3 * span**2 + 2 * 4 * scheduler.block**2) / 2**20, 1
                ),
            }
        )
    return steps


def block_seconds(report: dict, threads: int) -> tuple[dict[float, float], float]:
    """Seconds per block of one worker: per network step (by downsample), and per
    instance-optimisation step of a block without a network (the report's IO steps)."""
    from wsireg.model.refine import RefineSettings

    refine = RefineSettings(**report["parameters"]["refine"])
    network: dict[float, float] = {}
    per_io_step = []
    for step in report["pyramid"]:
        computed = step["blocks"] - step.get("resumed", 0)
        if not computed:
            continue
        per_block = step["seconds"] * threads / computed
        if step["patches"]:
            network[float(step["downsample"])] = per_block
        else:
            steps = refine.steps_at(step["pyramid_step"], has_network=False)
            per_io_step.append(per_block / max(1, steps))
    return network, max(per_io_step, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="Concurrent blocks of --report.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    network, io_step_seconds = block_seconds(report, args.threads)
    steps = plan(args.size)
    for step in steps:
        if step["network"]:
            nearest = min(network, key=lambda d: abs(math.log2(d / step["downsample"])))
            step["seconds_per_block"] = round(network[nearest], 2)
        else:
            step["seconds_per_block"] = round(io_step_seconds * step["refine_steps"], 2)
        print(json.dumps(step))
    for workers in args.workers:
        seconds = sum(math.ceil(s["blocks"] / workers) * s["seconds_per_block"] for s in steps)
        print(
            json.dumps(
                {
                    "size": args.size,
                    "workers": workers,
                    "worker": "one block at a time, one torch thread (this CPU)",
                    "blocks": sum(s["blocks"] for s in steps),
                    "estimated_hours": round(seconds / 3600, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
