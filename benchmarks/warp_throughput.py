"""Warp throughput against a plain copy, and peak memory (issue: the out-of-core warp engine).

Generates a synthetic slide of ``--size``² on disk (pyramidal OME-TIFF, JPEG tiles), a smooth
nonrigid transform (small rotation + smooth displacement up to ``--max-displacement`` px, field
at downsample 16, written band by band), then in fresh subprocesses:

* ``copy``: the slide's level 0 copied chunk by chunk into an OME-Zarr (same chunks and
  compressor as the warp output), pyramid included;
* ``warp``: ``wsireg warp`` of the slide through the transform into an OME-Zarr, pyramid
  included.

Prints one JSON line: MPx/s of both (whole job and level-0 phase), their ratios and the peak
RSS of each subprocess. ``--size 100000`` is the scale run.

    python benchmarks/warp_throughput.py --size 20000 --workdir /tmp/wsireg-bench
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

from wsireg.engine.transform import SlideRef, Transform, create_field
from wsireg.io.slide import open_slide
from wsireg.progress import set_quiet
from wsireg.synthetic.deformation import SmoothDeformation
from wsireg.synthetic.slides import write_synthetic_slide

CHILD = r"""
import json, sys, time
from wsireg.progress import set_quiet
from wsireg.engine.parallel import peak_rss_mib
set_quiet(True)
mode, slide_path, out, transform_path, threads = sys.argv[1:6]
threads = int(threads) or None
t0 = time.perf_counter()
timings = {}
if mode == "copy":
    import dask
    from wsireg.io.ngff import ZarrLayout, create_ome_zarr, fill_pyramid, write_level0
    from wsireg.io.slide import open_slide
    slide = open_slide(slide_path)
    image = slide.level(0)
    group = create_ome_zarr(
        out, slide.level_shape(0), 3, "uint8", mpp=slide.mpp, layout=ZarrLayout(chunk=1024)
    )
    with dask.config.set(num_workers=threads):
        write_level0(group, image)
        timings["level0_s"] = time.perf_counter() - t0
        fill_pyramid(group)
else:
    from wsireg.engine.warp import warp
    warp(transform_path, slide_path, out, threads=threads, timings=timings)
timings["total_s"] = time.perf_counter() - t0
timings["peak_rss_mib"] = peak_rss_mib()
print(json.dumps(timings))
"""


def make_inputs(workdir: Path, size: int, max_displacement: float, seed: int) -> tuple[Path, Path]:
    set_quiet(True)
    slide_path = workdir / f"synthetic-{size}.ome.tif"
    if not slide_path.exists():
        write_synthetic_slide(slide_path, (size, size), seed=seed, stain="he")
    transform_path = workdir / f"transform-{size}"
    if not transform_path.exists():
        ref = SlideRef.from_slide(open_slide(slide_path))
        deform = SmoothDeformation.random(
            (size, size), max_displacement, scale=size / 8, rotation=1.5, seed=seed
        )
        d = 16.0
        shape = (math.ceil(size / d), math.ceil(size / d))
        fld = create_field(workdir / "field-tmp.zarr", shape, d)
        xs = d * (np.arange(shape[1]) + 0.5) - 0.5
        for r0 in range(0, shape[0], 256):  # band by band: bounded memory at any size
            ys = d * (np.arange(r0, min(r0 + 256, shape[0])) + 0.5) - 0.5
            pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
            band = deform.displacement(pts).reshape(len(ys), len(xs), 2).transpose(2, 0, 1)
            fld[:, r0 : r0 + len(ys)] = band.astype(np.float32)
        Transform.from_field(deform.affine, fld, d, ref, ref).save(transform_path)
        shutil.rmtree(workdir / "field-tmp.zarr")
    return slide_path, transform_path


def run_child(mode: str, slide: Path, out: Path, transform: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(slide), str(out), str(transform), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsireg-bench"))
    parser.add_argument("--max-displacement", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=0, help="0: wsireg's default")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="Keep the outputs.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    slide, transform = make_inputs(args.workdir, args.size, args.max_displacement, args.seed)
    prepare_s = time.perf_counter() - t0
    mpx = args.size * args.size / 1e6
    copy = run_child("copy", slide, args.workdir / "copy.ome.zarr", transform, args.threads)
    warped = run_child("warp", slide, args.workdir / "warp.ome.zarr", transform, args.threads)
    result = {
        "benchmark": "warp_throughput",
        "size": args.size,
        "megapixels": round(mpx, 1),
        "prepare_s": round(prepare_s, 1),
        "copy_mpx_s": round(mpx / copy["total_s"], 2),
        "warp_mpx_s": round(mpx / warped["total_s"], 2),
        "ratio": round(copy["total_s"] / warped["total_s"], 3),
        "copy_level0_mpx_s": round(mpx / copy["level0_s"], 2),
        "warp_level0_mpx_s": round(mpx / warped["level0_s"], 2),
        "ratio_level0": round(copy["level0_s"] / warped["level0_s"], 3),
        "copy_peak_rss_mib": round(copy["peak_rss_mib"], 1),
        "warp_peak_rss_mib": round(warped["peak_rss_mib"], 1),
    }
    print(json.dumps(result), flush=True)
    if not args.keep:
        for name in ("copy.ome.zarr", "warp.ome.zarr"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)


if __name__ == "__main__":
    main()
