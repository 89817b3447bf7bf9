"""ANHIR accuracy and time: wsireg (and elastix, side by side) on the validation table.

Give one or more ANHIR pair tables (columns ``Target image``, ``Source image``, ``Target
landmarks``, ``Source landmarks``, paths relative to the CSV; default: the validation table,
``../shared/data/anhir-5pc`` and ``../shared/data/anhir-lobes``). For each pair wsireg registers
the source onto the target, the source landmarks are mapped into the target
(``source_to_target``, what ANHIR evaluates) and rTRE = |mapped source landmark - target
landmark| / target diagonal. Landmarks are used for evaluation only. Each pair's row also holds
two baselines: ``initial`` (no registration) and ``fitted_affine`` (the least-squares affine
fitted to the landmarks themselves, the best any affine could do).

Prints one JSON line per pair and method, then per method a summary line per table and one
pooled over all tables: the median and mean of the per-pair median rTRE, the share of pairs
whose median is below the fitted affine's, the pairs worse than without registration, and the
mean seconds per pair (and of the nonrigid stage, for wsireg).

``--peer elastix`` runs itk-elastix (affine + B-spline; inverted grey, mutual information,
multi-resolution) on the same pairs in the same run; itk-elastix is installed into its own
virtual environment (``--peer-env``) if absent. elastix registers with the source as the fixed
image, so transformix maps source landmarks into the target directly. ``--set KEY=VALUE``
passes any :class:`wsireg.run.settings.RegisterOptions` field (JSON values).

    python benchmarks/anhir_accuracy.py --peer elastix
    python benchmarks/anhir_accuracy.py ../shared/data/anhir-5pc/pairs.csv --set weights=default
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsireg.engine.transform import Transform
from wsireg.io.annotations import write_landmarks
from wsireg.progress import set_quiet
from wsireg.run.evaluate import Landmarks, Pair, landmarks, read_pairs, rtre
from wsireg.run.register import register
from wsireg.run.settings import RegisterOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VALIDATION = (SHARED / "anhir-5pc" / "pairs.csv", SHARED / "anhir-lobes" / "pairs.csv")

PEER_SCRIPT = r"""
import json, sys, time
import itk
import numpy as np
fixed_path, moving_path, points_in, points_out = sys.argv[1:5]

def grey(path):
    arr = itk.array_from_image(itk.imread(path)).astype(np.float32)
    if arr.ndim == 3:                      # colour: mean of the channels
        arr = arr[..., :3].mean(axis=-1)
    g = arr.max() - arr                    # inverted grey: tissue bright, background dark
    return itk.image_from_array(np.ascontiguousarray(g))

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


@dataclass(frozen=True)
class Case:
    """One pair of one table, its landmarks and their baselines."""

    table: str
    pair: Pair
    marks: Landmarks
    initial: float
    """Median rTRE without registration."""
    fitted_affine: float
    """Median rTRE of the least-squares affine fitted to the landmarks."""


def fitted_affine_rtre(marks: Landmarks) -> np.ndarray:
    """rTRE of the affine ``source -> target`` fitted to the landmarks by least squares."""
    design = np.hstack([marks.source, np.ones((len(marks.source), 1))])
    coef, *_ = np.linalg.lstsq(design, marks.target, rcond=None)
    return rtre(design @ coef, marks.target, marks.diagonal)


def cases(tables: list[Path]) -> list[Case]:
    out = []
    for table in tables:
        name = table.parent.name
        for pair in read_pairs(table):
            if not pair.has_landmarks:
                continue
            marks = landmarks(pair.source_landmarks, pair.target_landmarks, pair.target)
            initial = float(np.median(rtre(marks.source, marks.target, marks.diagonal)))
            fitted = float(np.median(fitted_affine_rtre(marks)))
            out.append(Case(name, pair, marks, initial, fitted))
    return out


def row(case: Case, method: str, mapped: np.ndarray, seconds: float) -> dict:
    errors = rtre(mapped, case.marks.target, case.marks.diagonal)
    return {
        "method": method,
        "table": case.table,
        "pair": case.pair.name,
        "median_rtre": float(np.median(errors)),
        "mean_rtre": float(errors.mean()),
        "initial_median_rtre": case.initial,
        "fitted_affine_median_rtre": case.fitted_affine,
        "seconds": seconds,
    }


def run_wsireg(case: Case, workdir: Path, options: RegisterOptions) -> dict:
    src = case.marks.source
    start = time.perf_counter()
    out = workdir / case.table / case.pair.name
    result = register(case.pair.source, case.pair.target, out, options, overwrite=True)
    seconds = time.perf_counter() - start
    mapped, residual = result.transform.map_points_with_residual(src, "source_to_target")
    affine = Transform.from_affine(
        result.transform.initial_affine, result.transform.target, result.transform.source
    )
    affine_mapped = affine.map_points(src, "source_to_target")
    affine_errors = rtre(affine_mapped, case.marks.target, case.marks.diagonal)
    return row(case, "wsireg", mapped, seconds) | {
        "affine_median_rtre": float(np.median(affine_errors)),
        "inverse_residual_px_max": float(residual.max()),
        "nonrigid_seconds": result.report["timings_s"]["nonrigid_s"],
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


def run_elastix(case: Case, python: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        points_in = Path(tmp) / "source.csv"
        write_landmarks(points_in, case.marks.source)
        points_out = Path(tmp) / "mapped.csv"
        start = time.perf_counter()
        done = subprocess.run(
            [str(python), "-c", PEER_SCRIPT, case.pair.source, case.pair.target]
            + [str(points_in), str(points_out)],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        inner = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        mapped = np.loadtxt(points_out, delimiter=",", ndmin=2)
    return row(case, "elastix", mapped, seconds) | {"registration_seconds": inner}


def summary(method: str, table: str, rows: list[dict]) -> dict:
    medians = [r["median_rtre"] for r in rows]
    below = sum(r["median_rtre"] < r["fitted_affine_median_rtre"] for r in rows)
    out = {
        "method": method,
        "summary": table,
        "pairs": len(rows),
        "median_of_medians_rtre": statistics.median(medians),
        "mean_of_medians_rtre": statistics.fmean(medians),
        "share_below_fitted_affine": below / len(rows),
        "pairs_worse_than_initial": sum(r["median_rtre"] > r["initial_median_rtre"] for r in rows),
        "mean_seconds": statistics.fmean(r["seconds"] for r in rows),
    }
    if "nonrigid_seconds" in rows[0]:
        out["mean_nonrigid_seconds"] = statistics.fmean(r["nonrigid_seconds"] for r in rows)
    return out


def register_options(args: argparse.Namespace) -> RegisterOptions:
    values = {"weights": args.weights, "refine": args.refine, "write_warped": True}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            values[key] = ast.literal_eval(value)  # 3, 0.5, True, None; else a string
        except (ValueError, SyntaxError):
            values[key] = value
    return RegisterOptions(**{k: v for k, v in values.items() if v is not None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", type=Path, nargs="*", default=list(VALIDATION))
    parser.add_argument("--peer", choices=["elastix"], default=None)
    parser.add_argument("--peer-env", type=Path, default=Path("/tmp/wsireg-elastix-env"))
    parser.add_argument("--no-wsireg", action="store_true", help="run only the peer")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--weights", default=None, help="none | default | PATH")
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    set_quiet(True)
    options = register_options(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsireg-anhir-"))
    todo = cases(args.tables)
    results: dict[str, list[dict]] = {}
    if not args.no_wsireg:
        print(json.dumps({"options": options.to_json()}), flush=True)
        for case in todo:
            results.setdefault("wsireg", []).append(run_wsireg(case, workdir, options))
            print(json.dumps(results["wsireg"][-1]), flush=True)
    if args.peer == "elastix":
        python = peer_python(args.peer_env)
        for case in todo:
            results.setdefault("elastix", []).append(run_elastix(case, python))
            print(json.dumps(results["elastix"][-1]), flush=True)
    for method, rows in results.items():
        for table in dict.fromkeys(r["table"] for r in rows):
            print(json.dumps(summary(method, table, [r for r in rows if r["table"] == table])))
        print(json.dumps(summary(method, "pooled", rows)), flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
