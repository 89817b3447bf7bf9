"""The quality gate of ``register`` (issue 18, item 9): a registration of two unrelated tissues
is flagged (a warning on stderr and ``report.json``; ``--strict`` fails), a real section pair
is not.

The thresholds (:data:`wsireg.run.register.MIN_SIMILARITY`, ``MIN_TISSUE_OVERLAP``) were
chosen on these pairs: every real pair of ``../shared/data`` (anhir-5pc, anhir-lobes) must
pass, every unrelated pair must fail. The default suite runs the real pair closest to the
threshold, one more and one unrelated pair; the whole set is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from wsireg.run.register import MIN_SIMILARITY, register

REPO = Path(__file__).resolve().parents[1]

OPTIONS = {"write_warped": False}
KIDNEY = "anhir-5pc/rat-kidney_/scale-5pc/Rat-Kidney_"
LESIONS = "anhir-5pc/lesions_/scale-5pc/Izd2-29-041-w35_"


def gate_benchmark() -> ModuleType:
    """``benchmarks/quality_gate.py`` (its pair lists and the loop over them)."""
    spec = importlib.util.spec_from_file_location(
        "quality_gate", REPO / "benchmarks" / "quality_gate.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_real_pair_passes_the_gate(shared_data: Path, tmp_path: Path) -> None:
    # the lesions pair has the lowest final similarity of the real pairs
    result = register(
        shared_data / f"{LESIONS}proSPC.jpg", shared_data / f"{LESIONS}HE.jpg", tmp_path / "o",
        **OPTIONS,
    )  # fmt: skip
    quality = json.loads((tmp_path / "o" / "report.json").read_text())["quality"]
    assert quality == result.report["quality"]
    assert quality["plausible"] and not quality["reasons"]
    assert quality["similarity"] > MIN_SIMILARITY * 1.1


def test_unrelated_tissues_warn_and_strict_fails(
    shared_data: Path, tmp_path: Path, run_cli
) -> None:
    source, target = (shared_data / p for p in gate_benchmark().UNRELATED[0])
    out = tmp_path / "o"
    result = run_cli("register", source, target, "-o", out, "--no-warp")
    assert result.exit_code == 0, result.output
    warning = result.stderr.strip().splitlines()[-1]
    assert warning.startswith("wsireg: warning:") and "implausible" in warning
    quality = json.loads((out / "report.json").read_text())["quality"]
    assert not quality["plausible"] and "similarity" in quality["reasons"][0]
    strict = tmp_path / "strict"
    result = run_cli("register", source, target, "-o", strict, "--no-warp", "--strict")
    assert result.exit_code == 1
    assert "implausible" in result.stderr and "Traceback" not in result.output
    assert not strict.exists() and not (tmp_path / ".strict.partial").exists()


@pytest.mark.slow
def test_every_real_pair_passes_and_every_unrelated_pair_fails(shared_data: Path) -> None:
    verdicts = gate_benchmark().verdicts(shared_data, OPTIONS)
    wrong = {k: v for k, v in verdicts.items() if v["plausible"] != (k[0] == "real")}
    assert not wrong, wrong
