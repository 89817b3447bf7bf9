"""The package as a user installs it: ``pip install .`` into a fresh virtual environment (not
editable: the weights and every runtime dependency must come with it), then ``wsireg demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_then_the_demo_works(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", str(REPOSITORY)], check=True)
    demo = subprocess.run(
        [str(env / "bin" / "wsireg"), "-q", "demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: the installed package, not the sources
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert summary["landmark_error_px"]["after_mean"] < 1.0
    assert Path(summary["outputs"]["transform"]).is_dir()
