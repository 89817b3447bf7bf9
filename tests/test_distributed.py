"""The blocks of a level as dask tasks: the same field, byte for byte, on threads here or on a
LocalCluster of worker processes, and after a kill -9 during a distributed level."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsireg.engine.parallel import Execution
from wsireg.run.register import register
from wsireg.synthetic.slides import synthetic_pair, write_synthetic_slide

SHAPE = (2048, 2048)  # level 0 in 4 blocks of 1024


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    _, _, truth = synthetic_pair(SHAPE, 4, max_displacement=12, rotation=6.0)
    source = write_synthetic_slide(root / "source.ome.tif", SHAPE, seed=4, stain="he")
    target = write_synthetic_slide(
        root / "target.ome.tif", SHAPE, seed=4, stain="ihc", deformation=truth
    )
    return {"source": source, "target": target}


def field(out: Path) -> np.ndarray:
    return zarr.open_array(str(out / "transform" / "field.zarr"), mode="r")[:]


def test_two_workers_give_the_threaded_field(pair: dict[str, Path], tmp_path: Path) -> None:
    """The networks' path (the default weights loaded by each worker), level 0."""
    here = register(pair["source"], pair["target"], tmp_path / "here", level=0, write_warped=False)
    cluster = register(
        pair["source"],
        pair["target"],
        tmp_path / "cluster",
        level=0,
        write_warped=False,
        execution=Execution(workers=2, threads=1),
    )
    np.testing.assert_array_equal(field(here.out), field(cluster.out))
    finest = cluster.report["pyramid"][-1]
    assert finest["blocks"] == 4 and sum(finest["workers"].values()) == 4
    assert all(name.startswith("tcp://") and name.endswith(" cpu") for name in finest["workers"])
    assert here.report["pyramid"][-1]["workers"] == {"local cpu": 4}


def test_kill_during_a_distributed_level_then_resume(pair: dict[str, Path], tmp_path: Path) -> None:
    options = ["--level", "0", "--levels", "2", "--weights", "none", "--refine", "24", "--no-warp"]
    base = [sys.executable, "-m", "wsireg_cli", "-q", "register", str(pair["source"])]
    base.append(str(pair["target"]))
    reference = tmp_path / "reference"
    subprocess.run([*base, "-o", str(reference), *options], check=True)
    out = tmp_path / "out"
    workers = ["--workers", "2", "--threads", "1"]
    proc = subprocess.Popen([*base, "-o", str(out), *options, *workers], start_new_session=True)
    done_file = tmp_path / ".out.partial" / "work" / "fields" / "done-1.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if done_file.exists() and done_file.read_text().strip():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster's processes
    proc.wait()
    assert not out.exists()
    assert 1 <= len(done_file.read_text().split()) < 4  # killed inside the finest level
    subprocess.run([*base, "-o", str(out), *options, *workers, "--resume"], check=True)
    np.testing.assert_array_equal(field(reference), field(out))
