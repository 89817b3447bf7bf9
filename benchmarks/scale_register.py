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

    python benchmarks/scale_register.py --sizes 2500 5000 10000 --level 0
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
from wsireg.run.register import register
source, target, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
start = time.perf_counter()
result = register(source, target, out, overwrite=True, **options)
report = result.report
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
                  "pyramid": report["pyramid"], "timings_s": report["timings_s"],
                  "finest_downsample": report["parameters"]["finest_downsample"]}))
"""


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
        }
        out = args.workdir / f"result-{size}"
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(source), str(target), str(out), json.dumps(options)],
            check=True,
            capture_output=True,
            text=True,
        )
        child = json.loads(done.stdout.strip().splitlines()[-1])
        error, before = errors(out, size, args.seed, truth, texture)
        patches = sum(step["patches"] for step in child["pyramid"])
        network_s = sum(step["network_s"] for step in child["pyramid"])
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
                    "peak_rss_mib": round(child["peak_rss_mib"], 1),
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
