"""`wsireg batch` and `wsireg evaluate`: pairs on a local dask.distributed cluster, a failing
pair, kill and resume, the ANHIR metrics of a batch output. Small synthetic pairs registered by
pure instance optimisation keep it fast and independent of training."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsireg.engine.transform import Transform
from wsireg.errors import InputError
from wsireg.io.annotations import write_landmarks
from wsireg.run.batch import batch
from wsireg.run.evaluate import evaluate, read_pairs
from wsireg.synthetic.slides import pair_landmarks, synthetic_pair, write_synthetic_slide

SHAPE = (512, 512)
FAST = {"weights": None, "refine": 16, "levels": 2}
FAST_CLI = ["--weights", "none", "--refine", "16", "--levels", "2"]
REPO = Path(__file__).resolve().parents[1]
#: Fields of a summary row that depend on the run, not on the result.
RUN_FIELDS = {"seconds", "peak_rss_mib", "run"}


def _write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> dict:
    """Two synthetic H&E -> IHC pairs with landmarks (rotated, deformed) in folders named
    alike (the pair folders must still be unique), and a table with an unreadable pair
    between them."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for seed in (1, 2):
        _, _, truth = synthetic_pair(SHAPE, seed, max_displacement=6, rotation=5.0 * seed)
        case = root / f"case{seed}"
        case.mkdir()
        write_synthetic_slide(case / "slide.ome.tif", SHAPE, seed=seed, stain="he")
        write_synthetic_slide(
            case / "target.ome.tif", SHAPE, seed=seed, stain="ihc", deformation=truth
        )
        target_pts, source_pts = pair_landmarks(SHAPE, seed, truth, n=40)
        write_landmarks(case / "slide.csv", source_pts)
        write_landmarks(case / "target.csv", target_pts)
        rows.append(
            {
                "Source image": f"case{seed}/slide.ome.tif",
                "Target image": f"case{seed}/target.ome.tif",
                "Source landmarks": f"case{seed}/slide.csv",
                "Target landmarks": f"case{seed}/target.csv",
                "Tissue": f"synthetic-{seed}",
            }
        )
    bad = {
        "Source image": str(slides_dir / "unreadable.svs"),
        "Target image": "case1/target.ome.tif",
        "Source landmarks": "",
        "Target landmarks": "",
        "Tissue": "corrupt",
    }
    return {
        "root": root,
        "with_failure": _write_table(root / "pairs.csv", [rows[0], bad, rows[1]]),
        "good": _write_table(root / "good.csv", rows),
    }


@pytest.fixture(scope="module")
def cluster_run(pairs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("batch") / "out"
    document = batch(pairs["with_failure"], out, workers=2, **FAST)
    return {"out": out, "document": document}


def test_pair_table_names_are_readable_and_unique(pairs: dict) -> None:
    table = read_pairs(pairs["with_failure"])
    assert [p.name for p in table] == [
        "000-slide-to-target",
        "001-unreadable-to-target",
        "002-slide-to-target",
    ]
    assert table[0].metadata == {"Tissue": "synthetic-1"}
    assert Path(table[0].source).is_absolute() and Path(table[0].source).is_file()
    assert table[0].has_landmarks and not table[1].has_landmarks


def test_local_cluster_reports_the_failing_pair_and_registers_the_others(
    cluster_run: dict,
) -> None:
    out, document = cluster_run["out"], cluster_run["document"]
    rows = document["pairs"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert document["counts"] == {"pairs": 3, "ok": 2, "failed": 1}
    failed = rows[1]
    assert "unreadable.svs" in failed["error"] and "\n" not in failed["error"]
    for row in (rows[0], rows[2]):
        assert row["error"] == "" and row["n_landmarks"] == 40
        assert row["median_rtre"] < 0.002 < row["median_rtre_before"]  # < 1 px of 724
        assert row["robustness"] > 0.9 and row["seconds"] > 0 and row["peak_rss_mib"] > 50
        assert row["median_tre_um"] == pytest.approx(
            row["median_rtre"] * np.hypot(*SHAPE) * 0.5, rel=1e-6
        )
        assert (out / row["name"] / "transform" / "transform.json").is_file()
        assert (out / row["name"] / "warped.ome.zarr").is_dir()
    # no output, not even a staged one, for the failing pair
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == [
        "000-slide-to-target",
        "002-slide-to-target",
        "summary.csv",
        "summary.json",
    ]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["pairs"] == json.loads(json.dumps(rows))
    assert on_disk["summary"]["pairs_evaluated"] == 2
    with open(out / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["status"] for r in table] == ["ok", "failed", "ok"]
    assert table[1]["Tissue"] == "corrupt" and "unreadable.svs" in table[1]["error"]
    assert float(table[0]["median_rtre"]) == rows[0]["median_rtre"]


def test_evaluate_reproduces_the_batch_summary(cluster_run: dict, pairs: dict, run_cli) -> None:
    out, document = cluster_run["out"], cluster_run["document"]
    json_out = out.parent / "evaluation.json"
    result = run_cli("evaluate", pairs["with_failure"], out, "--json", json_out)
    assert result.exit_code == 0, result.output
    assert "000-slide-to-target" in result.output and "median of medians" in result.output
    evaluated = json.loads(json_out.read_text())
    assert [r["status"] for r in evaluated["pairs"]] == ["ok", "missing", "ok"]
    for mine, theirs in zip(evaluated["pairs"], document["pairs"], strict=True):
        if mine["status"] == "ok":
            for key in ("median_rtre", "mean_rtre", "max_rtre", "robustness", "median_tre_um"):
                assert mine[key] == theirs[key], key
    assert evaluated["summary"] == document["summary"]
    # ... and the numbers of benchmarks/anhir_accuracy.py (its rows of a mapped pair)
    bench = _load_benchmark()
    rows = {row["name"]: row for row in evaluated["pairs"] if row["status"] == "ok"}
    checked = 0
    for case in bench.cases([pairs["with_failure"]]):
        if case.pair.name not in rows:
            continue
        row, checked = rows[case.pair.name], checked + 1
        transform = Transform.load(out / case.pair.name)
        mapped = transform.map_points(case.marks.source, "source_to_target")
        bench_row = bench.row(case, "wsireg", mapped, 0.0)
        assert bench_row["median_rtre"] == row["median_rtre"]
        assert bench_row["mean_rtre"] == row["mean_rtre"]
    assert checked == len(rows) > 0
    # the JSON is replaced only with --overwrite
    again = run_cli("evaluate", pairs["with_failure"], out, "--json", json_out)
    assert again.exit_code == 1 and "--overwrite" in again.stderr


def _load_benchmark():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "anhir_accuracy", REPO / "benchmarks" / "anhir_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_killed_batch_resumes_to_the_uninterrupted_result(pairs: dict, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    expected = batch(pairs["good"], reference, **FAST)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wsireg_cli", "-q", "batch", str(pairs["good"])]
    proc = subprocess.Popen([*command, "-o", str(out), *FAST_CLI], start_new_session=True)
    first = out / "000-slide-to-target"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "the batch ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_dir() and not (out / "001-slide-to-target").exists()
    assert not (out / "summary.json").exists() and not (out / "summary.csv").exists()

    done = subprocess.run(
        [*command, "-o", str(out), *FAST_CLI, "--resume"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in resumed["pairs"]][0] == "skipped"
    assert resumed["pairs"][1]["run"] in ("new", "resumed")
    for got, want in zip(resumed["pairs"], expected["pairs"], strict=True):
        assert {k: v for k, v in got.items() if k not in RUN_FIELDS | {"out"}} == {
            k: v for k, v in want.items() if k not in RUN_FIELDS | {"out"}
        }
        a = zarr.open_array(str(Path(want["out"]) / "transform" / "field.zarr"), mode="r")[:]
        b = zarr.open_array(str(Path(got["out"]) / "transform" / "field.zarr"), mode="r")[:]
        np.testing.assert_array_equal(a, b)
    assert resumed["summary"] == expected["summary"]
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_bad_table_and_existing_output(pairs: dict, tmp_path: Path, run_cli) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("Image,Landmarks\na.png,a.csv\n")
    out = tmp_path / "out"
    result = run_cli("batch", bad, "-o", out, *FAST_CLI)
    assert result.exit_code == 1 and "bad.csv" in result.stderr and "Source image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    missing = run_cli("batch", tmp_path / "none.csv", "-o", out)
    assert missing.exit_code == 1 and "none.csv" in missing.stderr and not out.exists()
    out.mkdir()
    (out / "something").write_text("")
    exists = run_cli("batch", pairs["good"], "-o", out, *FAST_CLI)
    assert exists.exit_code == 1 and "--overwrite" in exists.stderr
    both = run_cli("batch", pairs["good"], "-o", out, "--workers", "2", "--scheduler", "x:1")
    assert both.exit_code == 2


def test_no_results_directory_is_an_error(pairs: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing"):
        evaluate(pairs["good"], tmp_path / "nothing")
