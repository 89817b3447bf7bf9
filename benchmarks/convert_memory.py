"""Peak memory and speed of ``wsireg convert`` (slide -> OME-Zarr) against slide size.

First writes synthetic slides (pyramidal JPEG OME-TIFF, :func:`wsireg.synthetic.slides.
write_synthetic_slide`) of each size into ``--workdir`` (reused when already there), then
converts each with ``wsireg convert SLIDE OUT.ome.zarr`` in a fresh process and prints one JSON
line per size: size, wall time, MPx/s (level-0 pixels per second, whole pyramid included), CPU
seconds (user + system; steadier than wall time on a shared machine), peak RSS of the converting
process (its own ``VmHWM``, MiB, read at exit: ``ru_maxrss`` of a child would also count the
parent's memory at exec) and the size of the output.

Requirement checked at the end when both 10k and 100k are measured: peak RSS at 100k^2 at most
1.5 GiB and at most 1.5 x the 10k^2 figure (exit code 1 otherwise).

    python benchmarks/convert_memory.py --sizes 10000 --workdir /tmp/wsireg-bench
    python benchmarks/convert_memory.py            # 10k, 30k, 100k: hours and ~40 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
DEFAULT_SIZES = (10_000, 30_000, 100_000)

_GENERATE = (
    "import sys; from wsireg.progress import set_quiet; set_quiet(True); "
    "from wsireg.synthetic.slides import write_synthetic_slide; "
    "write_synthetic_slide(sys.argv[1], (int(sys.argv[2]),) * 2, seed=int(sys.argv[3]))"
)


def generate(path: Path, size: int, seed: int) -> float | None:
    """Write the synthetic slide of ``size`` x ``size`` px (in a subprocess); seconds taken,
    or ``None`` when ``path`` already exists."""
    if path.exists():
        return None
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _GENERATE, str(path), str(size), str(seed)], check=True, env=_env()
    )
    return time.perf_counter() - start


def convert(slide: Path, out: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``wsireg convert`` in a fresh process; (wall seconds, CPU seconds, peak RSS MiB) of
    that process."""
    command = [
        sys.executable,
        "-c",
        PEAK_WRAPPER,
        "--quiet",
        "convert",
        str(slide),
        str(out),
        "--overwrite",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"convert of {slide} failed with exit code {process.returncode}")
    peak = [line.split()[1] for line in stderr.splitlines() if line.startswith("PEAK_RSS_MIB ")]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, float(peak[-1])


# The CLI in a child process that prints its own peak RSS (VmHWM) on the way out.
PEAK_WRAPPER = (
    "import atexit, sys\n"
    "from wsireg.engine.parallel import peak_rss_mib\n"
    "atexit.register(lambda: print('PEAK_RSS_MIB', peak_rss_mib(), file=sys.stderr))\n"
    "from wsireg_cli.main import main\n"
    "sys.argv[0] = 'wsireg'\n"
    "main()\n"
)


def directory_mib(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def check(results: dict[int, dict]) -> dict | None:
    """The memory requirement, when both the 10k and the 100k sizes were measured."""
    if 10_000 not in results or 100_000 not in results:
        return None
    small, large = results[10_000]["peak_rss_mib"], results[100_000]["peak_rss_mib"]
    return {
        "check": "peak RSS at 100k <= 1.5 GiB and <= 1.5 x 10k",
        "ratio_100k_to_10k": round(large / small, 3),
        "le_1_5_gib": large * 2**20 <= 1.5 * GIB,
        "le_1_5_x_10k": large <= 1.5 * small,
    }


def _env(malloc_arena_max: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(malloc_arena_max)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated square slide sides in px (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where slides and outputs go (default: a temporary directory)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated slides and the converted outputs"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic slide seed")
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        default=None,
        help="set MALLOC_ARENA_MAX for the converting process (glibc)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsireg-convert-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    slides = {n: workdir / f"synthetic_{n}_seed{args.seed}.ome.tif" for n in sizes}
    generated = {}
    for n in sizes:
        generated[n] = generate(slides[n], n, args.seed)
        print(f"slide {slides[n]} ready", file=sys.stderr)

    results: dict[int, dict] = {}
    env = _env(args.malloc_arena_max)
    for n in sizes:
        out = workdir / f"synthetic_{n}.ome.zarr"
        wall, cpu, peak = convert(slides[n], out, env)
        results[n] = {
            "size": n,
            "megapixels": round(n * n / 1e6, 1),
            "wall_s": round(wall, 2),
            "mpx_per_s": round(n * n / 1e6 / wall, 2),
            "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(peak, 1),
            "output_mib": round(directory_mib(out), 1),
            "slide_mib": round(directory_mib(slides[n]), 1),
            "generate_s": None if generated[n] is None else round(generated[n], 1),
            "malloc_arena_max": args.malloc_arena_max,
        }
        print(json.dumps(results[n]), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    if not args.keep:  # slides found already there are left alone
        for n, slide in slides.items():
            if generated[n] is not None:
                slide.unlink(missing_ok=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    verdict = check(results)
    if verdict is not None:
        print(json.dumps(verdict), flush=True)
        return 0 if verdict["le_1_5_gib"] and verdict["le_1_5_x_10k"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
