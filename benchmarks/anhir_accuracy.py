"""ANHIR accuracy and time: wsireg (and optionally elastix) on a pair table in the ANHIR format.

For each pair (columns ``Target image``, ``Source image``, ``Target landmarks``,
``Source landmarks``, paths relative to the CSV) wsireg registers the source onto the target,
the source landmarks are mapped into the target with the transform (``T^-1``, what ANHIR
evaluates) and rTRE = |mapped source landmark - target landmark| / target diagonal. Prints one
JSON line per pair and method (median/mean rTRE, seconds), then a summary line per method
(median and mean over pairs of the per-pair medians, mean time). Landmarks are used for
evaluation only.

``--peer elastix`` runs itk-elastix (affine + B-spline; inverted grey, mutual information,
multi-resolution) on the same pairs in the same run; itk-elastix is installed into its own
virtual environment (``--peer-env``) if absent. elastix registers with the source as the fixed
image, so transformix maps source landmarks into the target directly.

    python benchmarks/anhir_accuracy.py ../shared/data/anhir-5pc/pairs.csv --peer elastix
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsireg.engine.transform import Transform
from wsireg.io.annotations import write_landmarks
from wsireg.progress import set_quiet
from wsireg.run.evaluate import landmarks as pair_landmarks
from wsireg.run.evaluate import rtre
from wsireg.run.register import register

PEER_SCRIPT = r"""
import json, sys, time
import itk
import numpy as np
fixed_path, moving_path, points_in, points_out = sys.argv[1:5]

def grey(path):
    rgb = itk.imread(path, itk.RGBPixel[itk.UC])
    arr = itk.array_from_image(rgb).astype(np.float32)
    g = 255.0 - arr.mean(axis=-1)          # inverted grey: tissue bright, background dark
    img = itk.image_from_array(g.astype(np.float32))
    return img

t0 = time.perf_counter()
fixed, moving = grey(fixed_path), grey(moving_path)
params = itk.ParameterObject.New()
affine = params.GetDefaultParameterMap("affine", 4)
affine["Metric"] = ["AdvancedMattesMutualInformation"]
affine["MaximumNumberOfIterations"] = ["500"]
affine["AutomaticTransformInitialization"] = ["true"]
affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
bspline = params.GetDefaultParameterMap("bspline", 4, 40.0)
bspline["Metric"] = ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]
bspline["Metric0Weight"] = ["1.0"]
bspline["Metric1Weight"] = ["50.0"]
bspline["MaximumNumberOfIterations"] = ["500"]
params.AddParameterMap(affine)
params.AddParameterMap(bspline)
result, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params,
                                                    log_to_console=False)
pts = np.loadtxt(points_in, delimiter=",", skiprows=1, usecols=(1, 2), ndmin=2)
with open(points_in + ".txt", "w") as f:
    f.write("point\n%d\n" % len(pts))
    for x, y in pts:
        f.write("%f %f\n" % (x, y))
import os
outdir = os.path.dirname(points_out)
itk.transformix_pointset(moving, transform, fixed_point_set_file_name=points_in + ".txt",
                         output_directory=outdir)
mapped = []
for line in open(os.path.join(outdir, "outputpoints.txt")):
    part = line.split("OutputPoint = [")[1].split("]")[0].split()
    mapped.append([float(part[0]), float(part[1])])
np.savetxt(points_out, np.array(mapped), delimiter=",")
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def read_pairs(table: Path) -> list[dict[str, str]]:
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    base = table.parent
    pairs = []
    for row in rows:
        pairs.append(
            {
                "name": Path(row["Source image"]).parent.parent.name.strip("_")
                or Path(row["Source image"]).stem,
                "source": str(base / row["Source image"]),
                "target": str(base / row["Target image"]),
                "source_landmarks": str(base / row["Source landmarks"]),
                "target_landmarks": str(base / row["Target landmarks"]),
            }
        )
    return pairs


def landmarks(pair: dict[str, str]) -> tuple[np.ndarray, np.ndarray, float]:
    """First min(n_source, n_target) landmarks and the target diagonal (wsireg.run.evaluate)."""
    marks = pair_landmarks(pair["source_landmarks"], pair["target_landmarks"], pair["target"])
    return marks.source, marks.target, marks.diagonal


def run_wsireg(pair: dict[str, str], workdir: Path, options: dict) -> dict:
    src, tgt, diag = landmarks(pair)
    start = time.perf_counter()
    result = register(
        pair["source"], pair["target"], workdir / pair["name"], overwrite=True, **options
    )
    seconds = time.perf_counter() - start
    mapped, residual = result.transform.map_points(src, "source_to_target")
    affine = Transform.from_affine(
        result.transform.initial_affine, result.transform.target, result.transform.source
    )
    affine_mapped, _ = affine.map_points(src, "source_to_target")
    errors, affine_errors = rtre(mapped, tgt, diag), rtre(affine_mapped, tgt, diag)
    return {
        "method": "wsireg",
        "pair": pair["name"],
        "median_rtre": float(np.median(errors)),
        "mean_rtre": float(errors.mean()),
        "affine_median_rtre": float(np.median(affine_errors)),
        "inverse_residual_px_max": float(residual.max()),
        "seconds": seconds,
        "timings": result.report["timings_s"],
    }


def peer_python(env: Path) -> Path:
    python = env / "bin" / "python"
    if (
        not python.exists()
        or subprocess.run([str(python), "-c", "import itk"], capture_output=True).returncode
    ):
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "itk-elastix"], check=True)
    return python


def run_elastix(pair: dict[str, str], python: Path) -> dict:
    src, tgt, diag = landmarks(pair)
    with tempfile.TemporaryDirectory() as tmp:
        points_in = Path(tmp) / "source.csv"
        write_landmarks(points_in, src)
        points_out = Path(tmp) / "mapped.csv"
        start = time.perf_counter()
        done = subprocess.run(
            [
                str(python),
                "-c",
                PEER_SCRIPT,
                pair["source"],
                pair["target"],
                str(points_in),
                str(points_out),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        inner = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        mapped = np.loadtxt(points_out, delimiter=",", ndmin=2)
    errors = rtre(mapped, tgt, diag)
    return {
        "method": "elastix",
        "pair": pair["name"],
        "median_rtre": float(np.median(errors)),
        "mean_rtre": float(errors.mean()),
        "seconds": seconds,
        "registration_seconds": inner,
    }


def summary(method: str, rows: list[dict]) -> dict:
    medians = [r["median_rtre"] for r in rows]
    return {
        "method": method,
        "summary": True,
        "pairs": len(rows),
        "median_of_medians_rtre": statistics.median(medians),
        "mean_of_medians_rtre": statistics.fmean(medians),
        "mean_seconds": statistics.fmean(r["seconds"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--peer", choices=["elastix"], default=None)
    parser.add_argument("--peer-env", type=Path, default=Path("/tmp/wsireg-elastix-env"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--weights", default="none", help="none | default | PATH")
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--level", type=int, default=None)
    parser.add_argument("--levels", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args()
    set_quiet(True)
    options = {
        "weights": None if args.weights == "none" else args.weights,
        "refine": args.refine,
        "level": args.level,
        "levels": args.levels,
        "iterations": args.iterations,
        "write_warped": True,
    }
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsireg-anhir-"))
    pairs = read_pairs(args.pairs)
    results: dict[str, list[dict]] = {"wsireg": []}
    for pair in pairs:
        row = run_wsireg(pair, workdir, options)
        results["wsireg"].append(row)
        print(json.dumps(row), flush=True)
    if args.peer == "elastix":
        python = peer_python(args.peer_env)
        results["elastix"] = []
        for pair in pairs:
            row = run_elastix(pair, python)
            results["elastix"].append(row)
            print(json.dumps(row), flush=True)
    for method, rows in results.items():
        print(json.dumps(summary(method, rows)), flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
