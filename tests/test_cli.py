"""What the ``wsireg`` command shows a user: progress that suits a log file (no carriage
returns when stderr is redirected), a closing summary that names its numbers and says where
the outputs are, ``--quiet``, an example in every verb's ``--help``, and explicit data paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from wsireg.progress import LOG_LINE
from wsireg.synthetic.slides import synthetic_pair, write_synthetic_slide
from wsireg_cli.main import cli

SHAPE = (1024, 1024)
FAST_CLI = ["--weights", "none", "--refine", "24", "--levels", "2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-pair")
    _, _, truth = synthetic_pair(SHAPE, 5, max_displacement=6, rotation=10.0)
    source = write_synthetic_slide(root / "source.ome.tif", SHAPE, seed=5, stain="he")
    target = write_synthetic_slide(
        root / "target.ome.tif", SHAPE, seed=5, stain="ihc", deformation=truth
    )
    return source, target


def run_redirected(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``wsireg ARGS`` in a subprocess with stderr redirected to a file (a log)."""
    log = cwd / "stderr.log"
    with open(log, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "wsireg_cli", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    return done, log.read_text()


def test_register_logs_lines_and_names_its_summary(pair: tuple[Path, Path], tmp_path: Path):
    source, target = pair
    done, log = run_redirected(
        ["register", str(source), str(target), "-o", "out", *FAST_CLI], tmp_path
    )
    assert done.returncode == 0, log
    assert "\r" not in log and "\r" not in done.stdout
    lines = log.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), log
    for stage in ("alignment", "register", "quality control"):
        assert any(f" {stage}: started" in line for line in lines), (stage, log)
        assert any(f" {stage}: done" in line and " s" in line for line in lines), (stage, log)
    # the summary: the similarity named, the outputs where they are (absolute paths)
    summary = done.stdout
    out = (tmp_path / "out").resolve()
    assert "local NCC" in summary and "higher is better" in summary
    assert "before" in summary and "after the affine" in summary and "final" in summary
    for part in ("transform", "warped.ome.zarr", "qc", "report.json"):
        assert str(out / part) in summary, (part, summary)
    report = json.loads((out / "report.json").read_text())
    assert f"final {report['similarity']['final']:.3f}" in summary


def test_quiet_silences_the_log_of_a_redirected_run(pair: tuple[Path, Path], tmp_path: Path):
    source, _ = pair
    done, log = run_redirected(["convert", str(source), "a.ome.zarr"], tmp_path)
    assert done.returncode == 0 and log and "\r" not in log
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    done, log = run_redirected(["-q", "convert", str(source), "b.ome.zarr"], tmp_path)
    assert done.returncode == 0 and log == ""
    done, log = run_redirected(["convert", "--quiet", str(source), "c.ome.zarr"], tmp_path)
    assert done.returncode == 0 and log == ""


def test_every_verb_has_an_example_in_its_help(run_cli) -> None:
    for name in cli.commands:
        result = run_cli(name, "--help")
        assert result.exit_code == 0, name
        examples = result.output.split("Examples:", 1)
        assert len(examples) == 2, f"wsireg {name} --help has no example"
        assert f"wsireg {name}" in examples[1], name
        if isinstance(cli.commands[name], click.Group):
            continue  # `wsireg transform`: its verbs have their own help
        # options listed under headings; every option of the verb under one of them
        headings = [line[:-1] for line in result.output.splitlines() if line.endswith(":")]
        assert "Runs" in headings and "Options" not in headings, (name, headings)
        listed = result.output.split("Examples:", 1)[0]
        for param in cli.commands[name].params:
            if isinstance(param, click.Option):
                assert param.opts[-1] in listed, (name, param.opts)


def test_train_needs_an_explicit_slides_folder(run_cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WSIREG_SLIDES_DIR", raising=False)
    result = run_cli("-q", "train", "-o", tmp_path / "model", "--epochs", "1")
    assert result.exit_code == 2
    assert "--slides-dir" in result.stderr and "cmu, tcga" in result.stderr
    assert not (tmp_path / "model" / "model.pt").exists()


def test_the_cli_offers_what_the_writers_take() -> None:
    # the CLI starts without zarr: it keeps its own copies of the writers' choices
    from wsireg.engine.warp import MAX_TILE, MIN_TILE
    from wsireg.io.ngff import NGFF_VERSIONS
    from wsireg.io.tiff import TIFF_COMPRESSIONS
    from wsireg_cli import options

    assert options.NGFF_VERSIONS == NGFF_VERSIONS
    assert options.TIFF_COMPRESSIONS == TIFF_COMPRESSIONS
    assert (options.MIN_TILE, options.MAX_TILE) == (MIN_TILE, MAX_TILE)
