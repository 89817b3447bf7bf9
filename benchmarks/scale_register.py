"""Registration at scale: time, patches/s, peak RSS and accuracy against a known deformation.

For each run a synthetic pair is generated on disk (pyramidal OME-TIFFs: an H&E-like source and
an IHC-like target = the same tissue through a known smooth deformation plus a small rotation),
then ``wsireg register`` runs in a fresh subprocess (field down to ``--level`` or the level of
downsample ``--field-downsample``; the warp at level 0), and one JSON line is printed: size,
field level/downsample, wall time, patches/s of the network, peak RSS of the registering
process, mean and 90th-percentile error of the recovered transform at 300 tissue points
against the truth (level-0 pixels), and the error before registration.

The synthetic tissue has the same scale at every slide size (``--texture-downsample 1``: nuclei
~12-15 px, glands ~100-300 px across at level 0, like a 0.5 um/px scan), so a larger slide holds
more tissue, as real ones do (a texture coarsened with the slide size leaves a large slide
with sub-pixel nuclei at level 0 and no structure for a coarse field to follow).

Also printed: seconds per megapixel, the finest level's blocks/s, and the seam measure
(:func:`seam_jumps`: the largest field jump across block borders against the largest between
neighbouring nodes inside blocks). ``--workers N`` / ``--scheduler ADDRESS`` run the blocks on
a dask cluster; ``--check-workers N`` registers again on N one-thread processes and prints
whether the field is the same, byte for byte.

    python benchmarks/scale_register.py --sizes 2500 5000 10000 --level 0
    python benchmarks/scale_register.py --sizes 10000 --level 0 --check-workers 2
    python benchmarks/scale_register.py --sizes 100000 --field-downsample 16
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wsireg.engine.transform import Transform
from wsireg.synthetic.slides import pair_landmarks, synthetic_pair, write_synthetic_slide

CHILD = r"""
import json, sys, time
from wsireg.progress import set_quiet
from wsireg.engine.parallel import limit_malloc_arenas, peak_rss_mib
limit_malloc_arenas()
set_quiet(True)
from wsireg.engine.parallel import Execution
from wsireg.run.register import register
source, target, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
execution = Execution(**options.pop("execution"))
if __name__ == "__main__":
    start = time.perf_counter()
    result = register(source, target, out, overwrite=True, execution=execution, **options)
    report = result.report
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
                      "pyramid": report["pyramid"], "timings_s": report["timings_s"],
                      "finest_downsample": report["parameters"]["finest_downsample"]}))
"""
#: Block side of the scheduler (pixels of a level; the seam measure's block borders).
BLOCK = 1024


def make_pair(
    workdir: Path, size: int, seed: int, texture: float
) -> tuple[Path, Path, object, float]:
    max_displacement = 0.004 * size
    _, _, truth = synthetic_pair(
        (size, size),
        seed,
        max_displacement=max_displacement,
        scale=size / 6,
        rotation=4.0,
        texture_downsample=texture,
    )
    source = workdir / f"source-{size}-t{texture:g}.ome.tif"
    target = workdir / f"target-{size}-t{texture:g}.ome.tif"
    if not source.exists():
        write_synthetic_slide(
            source, (size, size), seed=seed, stain="he", texture_downsample=texture
        )
    if not target.exists():
        write_synthetic_slide(
            target,
            (size, size),
            seed=seed,
            stain="ihc",
            deformation=truth,
            texture_downsample=texture,
        )
    return source, target, truth, texture


def errors(out: Path, size: int, seed: int, truth, texture: float) -> tuple[np.ndarray, ...]:
    target_pts, source_pts = pair_landmarks(
        (size, size), seed, truth, n=300, texture_downsample=texture
    )
    mapped = Transform.load(out / "transform").map_points(target_pts, "target_to_source")
    return (
        np.linalg.norm(mapped - source_pts, axis=1),
        np.linalg.norm(target_pts - source_pts, axis=1),
    )


def seam_jumps(field_path: Path, block: int = BLOCK) -> dict[str, float]:
    """The largest jump of the field (level-0 px, vector norm) between neighbouring nodes
    across a block border, and between neighbouring nodes inside blocks; read in strips of
    ``block`` rows (one row of overlap), so any field size stays out of memory."""
    import zarr

    field = zarr.open_array(str(field_path), mode="r")
    _, height, width = field.shape
    border = inside = 0.0
    for y0 in range(0, height, block):
        strip = np.asarray(field[:, y0 : min(y0 + block + 1, height)], dtype=np.float64)
        across_x = np.linalg.norm(np.diff(strip[:, : min(block, height - y0)], axis=2), axis=0)
        at_border_x = (np.arange(1, width) % block) == 0
        border = max(border, float(across_x[:, at_border_x].max(initial=0)))
        inside = max(inside, float(across_x[:, ~at_border_x].max(initial=0)))
        across_y = np.linalg.norm(np.diff(strip, axis=1), axis=0)
        rows = y0 + np.arange(1, strip.shape[1])
        at_border_y = (rows % block) == 0
        border = max(border, float(across_y[at_border_y].max(initial=0)))
        inside = max(inside, float(across_y[~at_border_y].max(initial=0)))
    return {"seam_max_jump_px": round(border, 4), "inside_max_jump_px": round(inside, 4)}


def fields_identical(a: Path, b: Path) -> bool:
    """Whether two fields hold the same bytes (compared in strips of :data:`BLOCK` rows)."""
    import zarr

    first, second = zarr.open_array(str(a), mode="r"), zarr.open_array(str(b), mode="r")
    if first.shape != second.shape:
        return False
    return all(
        np.array_equal(first[:, y : y + BLOCK], second[:, y : y + BLOCK], equal_nan=True)
        for y in range(0, first.shape[1], BLOCK)
    )


def run_child(source: Path, target: Path, out: Path, options: dict) -> dict:
    """One registration in a fresh process; what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(target), str(out), json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument(
        "--level",
        type=int,
        default=None,
        help="Finest target level of the field (0 = full resolution).",
    )
    parser.add_argument(
        "--field-downsample",
        type=float,
        default=None,
        help="Finest field downsample instead of --level (e.g. 16).",
    )
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--weights", default="default", help="default (as register) | none | PATH")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsireg-scale"))
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument(
        "--texture-downsample",
        type=float,
        default=1.0,
        help="Level-0 pixel size of the synthetic tissue in native texture pixels (1: nuclei "
        "~12-15 px across, like a 0.5 um/px scan, at every slide size: a larger slide holds "
        "more tissue, not coarser tissue).",
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=None, help="Blocks on a LocalCluster of N processes."
    )
    parser.add_argument("--scheduler", default=None, help="Blocks on this dask cluster.")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--check-workers",
        type=int,
        default=None,
        help="Register again on a LocalCluster of N processes of one thread and print "
        "whether its field equals this run's, byte for byte.",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        t0 = time.perf_counter()
        source, target, truth, texture = make_pair(
            args.workdir, size, args.seed, args.texture_downsample
        )
        prepare_s = time.perf_counter() - t0
        level = args.level
        if args.field_downsample is not None:  # the synthetic pyramids halve per level
            level = int(round(math.log2(args.field_downsample)))
        options = {
            "level": level,
            "refine": args.refine,
            "weights": None if args.weights == "none" else args.weights,
            "device": args.device,
            "execution": {"workers": args.workers, "scheduler": args.scheduler},
        }
        out = args.workdir / f"result-{size}"
        child = run_child(source, target, out, options)
        error, before = errors(out, size, args.seed, truth, texture)
        patches = sum(step["patches"] for step in child["pyramid"])
        network_s = sum(step["network_s"] for step in child["pyramid"])
        finest = child["pyramid"][-1]
        checked = {}
        if args.check_workers:
            other = args.workdir / f"result-{size}-workers"
            options["execution"] = {"workers": args.check_workers, "threads": 1}
            again = run_child(source, target, other, options)
            checked = {
                "workers_checked": args.check_workers,
                "workers_seconds": round(again["seconds"], 1),
                "identical_fields": fields_identical(
                    out / "transform" / "field.zarr", other / "transform" / "field.zarr"
                ),
            }
            shutil.rmtree(other, ignore_errors=True)
        print(
            json.dumps(
                {
                    "benchmark": "scale_register",
                    "size": size,
                    "level": level,
                    "field_downsample": child["finest_downsample"],
                    "seconds": round(child["seconds"], 1),
                    "prepare_s": round(prepare_s, 1),
                    "timings_s": child["timings_s"],
                    "patches": patches,
                    "patches_per_s": round(patches / network_s, 2) if network_s else None,
                    "finest_blocks_per_s": finest.get("blocks_per_s"),
                    "seconds_per_megapixel": round(child["seconds"] / (size * size / 1e6), 3),
                    "workers": args.workers,
                    "peak_rss_mib": round(child["peak_rss_mib"], 1),
                    **seam_jumps(out / "transform" / "field.zarr"),
                    **checked,
                    "error_mean_px": round(float(error.mean()), 3),
                    "error_p90_px": round(float(np.percentile(error, 90)), 3),
                    "before_mean_px": round(float(before.mean()), 3),
                }
            ),
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
