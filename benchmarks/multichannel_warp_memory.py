"""Peak memory and time of ``wsireg warp`` of a 16-channel uint16 slide, out of core.

Data: a synthetic fluorescence slide (:func:`wsireg.synthetic.slides.synthetic_fluorescence`,
16 channels of uint16) of ``SIZE`` x ``SIZE`` px written once as a multiscale OME-Zarr (zstd,
1024 px chunks) in a temporary folder; a transform of the slide onto itself: a 3 degree
rotation about the centre plus a smooth displacement of up to 12 px (field at downsample 32),
saved to disk. The warp (``wsireg warp TRANSFORM SOURCE -o OUT.ome.zarr``, every channel, the
default threads) runs in a fresh process, which prints its own peak resident memory
(:func:`wsireg.engine.parallel.peak_rss_mib`).

Prints one JSON line: size, channels, raw bytes of level 0 (all channels), seconds of the
warp, the child's peak RSS (MiB), the output's level-0 shape and dtype.

    python benchmarks/multichannel_warp_memory.py [--size 20000] [--channels 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsireg.core.coords import to_level0
from wsireg.engine.transform import SlideRef, Transform
from wsireg.io.channels import fluorescence
from wsireg.io.ngff import write_ome_zarr
from wsireg.io.slide import open_slide
from wsireg.progress import set_quiet
from wsireg.synthetic.slides import synthetic_fluorescence

FIELD_DOWNSAMPLE = 32.0
#: The warp as the CLI runs it, in a fresh process that prints its own peak RSS (VmHWM: a
#: child's ``ru_maxrss`` would include the parent's memory at fork).
CHILD = (
    "import sys\n"
    "from wsireg.engine.parallel import peak_rss_mib\n"
    "from wsireg_cli.main import cli\n"
    "cli.main(['-q', 'warp', sys.argv[1], sys.argv[2], '-o', sys.argv[3]], standalone_mode=False)\n"
    "print(peak_rss_mib())\n"
)


def transform_of(path: Path, size: int) -> Transform:
    """A rotation plus a smooth displacement of the slide onto itself."""
    ref = SlideRef.from_slide(open_slide(path))
    t = np.deg2rad(3.0)
    centre = size / 2
    rotate = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    move = np.array([[1, 0, centre], [0, 1, centre], [0, 0, 1.0]])
    affine = move @ rotate @ np.linalg.inv(move)
    n = int(np.ceil(size / FIELD_DOWNSAMPLE))
    grid = to_level0(np.arange(n), FIELD_DOWNSAMPLE)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    u = 12.0 * np.sin(2 * np.pi * gx / 5000.0) * np.cos(2 * np.pi * gy / 7000.0)
    v = 8.0 * np.cos(2 * np.pi * gx / 6000.0) * np.sin(2 * np.pi * gy / 4000.0)
    field = np.stack([u, v]).astype(np.float32)
    return Transform.from_field(affine, field, FIELD_DOWNSAMPLE, ref, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    set_quiet(True)
    names = tuple(f"marker-{k}" if k else "DAPI" for k in range(args.channels))
    with tempfile.TemporaryDirectory(prefix="wsireg-mc-warp-", dir=".") as tmp:
        folder = Path(tmp)
        source = folder / "panel.ome.zarr"
        image = synthetic_fluorescence(
            (args.size, args.size), 1, names, texture_downsample=max(1.0, args.size / 4096)
        )
        start = time.perf_counter()
        write_ome_zarr(
            image, source, channel_info=fluorescence(len(names), np.dtype(np.uint16), names)
        )
        written_s = time.perf_counter() - start
        transform_dir = transform_of(source, args.size).save(folder / "transform")
        out = folder / "warped.ome.zarr"
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(transform_dir), str(source), str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        peak_mib = float(child.stdout.split()[-1])
        level0 = zarr.open_group(str(out), mode="r")["0"]
        print(
            json.dumps(
                {
                    "size": args.size,
                    "channels": args.channels,
                    "raw_level0_gib": round(args.size**2 * args.channels * 2 / 2**30, 2),
                    "source_written_s": round(written_s, 1),
                    "warp_s": round(seconds, 1),
                    "warp_peak_rss_mib": round(peak_mib, 1),
                    "output": [list(level0.shape), str(level0.dtype)],
                }
            )
        )


if __name__ == "__main__":
    main()
