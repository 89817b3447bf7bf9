"""`wsireg register`: the pipeline end to end on small synthetic pairs, its outputs, resume,
bad input. Pure instance optimisation (no weights, the default) keeps most of these fast and
independent of training; two tests run the shipped networks through the streaming scheduler,
alone and followed by refinement."""

from __future__ import annotations

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

from wsireg.errors import InputError
from wsireg.io.annotations import read_landmarks
from wsireg.model.network import default_weights_path, verify_checksum
from wsireg.run.register import register
from wsireg.synthetic.slides import pair_landmarks, synthetic_pair, write_synthetic_slide

SHAPE = (1024, 1024)
FAST = {"weights": None, "refine": 24, "levels": 2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An H&E source and an IHC target, rotated by 25 degrees and deformed smoothly."""
    root = tmp_path_factory.mktemp("pair")
    seed = 11
    _, _, truth = synthetic_pair(SHAPE, seed, max_displacement=8, rotation=25.0)
    source = write_synthetic_slide(root / "source.ome.tif", SHAPE, seed=seed, stain="he")
    target = write_synthetic_slide(
        root / "target.ome.tif", SHAPE, seed=seed, stain="ihc", deformation=truth
    )
    target_pts, source_pts = pair_landmarks(SHAPE, seed, truth, n=150)
    return {
        "source": source,
        "target": target,
        "truth": truth,
        "target_pts": target_pts,
        "source_pts": source_pts,
        "root": root,
    }


def landmark_error(transform, pair: dict) -> np.ndarray:
    mapped = transform.map_points(pair["target_pts"], "target_to_source")
    return np.linalg.norm(mapped - pair["source_pts"], axis=1)


def check_named_report(report: dict, out: Path, pair: dict) -> None:
    """report.json names what it holds: one similarity (the quality gate's measure) before /
    after the affine / final, described; pyramid steps, not slide levels; absolute paths."""
    similarity = report["similarity"]
    assert set(similarity["stages"]) == {"before", "affine", "final"}
    assert "local NCC" in similarity["measure"] and "higher is better" in similarity["description"]
    assert similarity["thumbnail_downsample"] > 0
    assert all(-1 <= similarity[name] <= 1 for name in ("before", "affine", "final"))
    assert similarity["final"] == report["quality"]["similarity"]
    # the field's deformation: no folding on a plausible pair, the grid picture in qc/
    deformation = report["quality"]["deformation"]
    assert deformation["folding_share"] == 0.0 and deformation["grid_spacing_px"] > 0
    assert Path(deformation["grid_picture"]) == (out / "qc" / "deformation-grid.png").resolve()
    assert Path(deformation["grid_picture"]).is_file()
    text = json.dumps(report)
    assert text.count("similarity_before") == 0 and "similarity_after" not in text
    steps = report["pyramid"]
    assert [step["pyramid_step"] for step in steps] == list(range(len(steps)))
    assert all("level" not in step for step in steps)
    downsamples = [step["downsample"] for step in steps]
    assert downsamples == sorted(downsamples, reverse=True)  # step 0 is the coarsest
    assert report["outputs"]["report"] == str((out / "report.json").resolve())
    for path in [*report["outputs"].values(), report["source"]["path"], report["target"]["path"]]:
        assert path is None or Path(path).is_absolute(), path
    assert report["source"]["path"] == str(Path(pair["source"]).resolve())


def test_register_recovers_a_rotated_deformed_pair(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = register(pair["source"], pair["target"], out, **FAST)
    before = np.linalg.norm(pair["target_pts"] - pair["source_pts"], axis=1)
    error = landmark_error(result.transform, pair)
    assert before.mean() > 100  # the rotation moves tissue far
    assert error.mean() < 2.0 and np.percentile(error, 90) < 3.5
    # the outputs
    assert sorted(p.name for p in out.iterdir()) == [
        "qc",
        "report.json",
        "transform",
        "warped.ome.zarr",
    ]
    qc = sorted(p.name for p in (out / "qc").iterdir())
    assert {"target.png", "checkerboard-final.png", "overlay-before.png"} <= set(qc)
    report = json.loads((out / "report.json").read_text())
    for key in (
        "source",
        "target",
        "parameters",
        "timings_s",
        "peak_rss_mib",
        "device",
        "similarity",
        "alignment",
        "pyramid",
        "outputs",
    ):
        assert key in report
    check_named_report(report, out, pair)
    assert report["similarity"]["final"] > report["similarity"]["before"]
    assert report["similarity"]["final"] >= report["similarity"]["affine"] - 0.01
    assert (
        abs(report["alignment"]["rotation_deg"] - 25) < 2
        or abs(report["alignment"]["rotation_deg"] - 335) < 2
    )
    level0 = zarr.open_group(str(out / "warped.ome.zarr"), mode="r")["0"]
    assert level0.shape == (3, *SHAPE)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.skipif(not default_weights_path().is_file(), reason="no shipped weights")
def test_networks_then_refinement_below_an_extra_coarse_level(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "hybrid"
    # one pyramid level more than the model has networks: instance optimisation alone there
    result = register(
        pair["source"],
        pair["target"],
        out,
        weights="default",
        refine=40,
        levels=4,
        write_warped=False,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["weights"]["sha256"] == verify_checksum(default_weights_path())
    assert report["parameters"]["refine"]["steps"] == 40
    assert report["parameters"]["flips"] == 2  # the default for the shipped model
    levels = report["pyramid"]
    assert len(levels) == 4
    assert levels[0]["patches"] == 0 and levels[0]["refine_s"] > 0  # no network that coarse
    assert all(level["patches"] > 0 and level["refine_s"] > 0 for level in levels[1:])
    error = landmark_error(result.transform, pair)
    assert error.mean() < 2.0 and np.percentile(error, 90) < 3.5, error.mean()


@pytest.mark.skipif(not default_weights_path().is_file(), reason="no shipped weights")
def test_shipped_networks_alone_register_through_the_scheduler(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "net"
    result = register(pair["source"], pair["target"], out, weights="default", write_warped=False)
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["refine"]["steps"] == 0  # the networks alone
    levels = report["pyramid"]
    assert len(levels) == 3 and all(level["patches"] > 0 for level in levels)
    assert all(level["refine_s"] == 0 for level in levels)
    assert sum(level["background_patches"] for level in levels) > 0  # glass is skipped
    assert report["similarity"]["final"] > report["similarity"]["affine"] + 0.05
    error = landmark_error(result.transform, pair)
    assert error.mean() < 2.0 and np.percentile(error, 90) < 3.5, error.mean()


def test_grey_glass_is_made_white_before_the_networks(shared_data: Path, tmp_path: Path) -> None:
    # anhir-lobes: the IHC sections were scanned on grey glass (about 220 of 255); without
    # the glass made white the whole slide reads as faint stain and this pair ends at 0.69 %
    lobes = shared_data / "anhir-lobes" / "lung-lobes_1"
    result = register(
        lobes / "4-cc10.png", lobes / "1-he.png", tmp_path / "o", weights="default", refine=0,
        write_warped=False,
    )  # fmt: skip
    glass = result.report["alignment"]["glass"]
    assert max(glass["source"]) < 230 and min(glass["target"]) > 245
    moved = result.transform.map_points(read_landmarks(lobes / "4-cc10.csv"), "source_to_target")
    target = read_landmarks(lobes / "1-he.csv")
    rtre = np.linalg.norm(moved - target, axis=1) / np.hypot(400, 800)
    assert np.median(rtre) < 0.004, np.median(rtre)


def test_identical_slides_give_identity(pair: dict, tmp_path: Path) -> None:
    result = register(pair["source"], pair["source"], tmp_path / "same", **FAST)
    pts = pair["target_pts"]
    mapped = result.transform.map_points(pts, "target_to_source")
    assert np.abs(mapped - pts).max() < 0.5


def test_existing_output_and_bad_inputs(
    pair: dict, tmp_path: Path, slides_dir: Path, run_cli
) -> None:
    existing = tmp_path / "exists"
    existing.mkdir()
    result = run_cli(
        "register", pair["source"], pair["target"], "-o", existing, "--weights", "none"
    )
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    out = tmp_path / "bad"
    result = run_cli(
        "register", slides_dir / "unreadable.svs", pair["target"], "-o", out, "--weights", "none"
    )
    assert result.exit_code == 1 and "unreadable.svs" in result.stderr
    assert not out.exists() and not (tmp_path / ".bad.partial").exists()


def test_slide_without_tissue_is_a_clear_error(pair: dict, tmp_path: Path) -> None:
    import tifffile

    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((*SHAPE, 3), 250, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(InputError, match="blank.tif.*tissue"):
        register(blank, pair["target"], tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_resume_after_kill_gives_the_uninterrupted_result(pair: dict, tmp_path: Path) -> None:
    options = ["--weights", "none", "--refine", "24", "--levels", "2"]
    reference = tmp_path / "reference"
    base = [
        sys.executable,
        "-m",
        "wsireg_cli",
        "-q",
        "register",
        str(pair["source"]),
        str(pair["target"]),
    ]
    subprocess.run([*base, "-o", str(reference), *options], check=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([*base, "-o", str(out), *options], start_new_session=True)
    done_file = tmp_path / ".out.partial" / "work" / "fields" / "done-0.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if done_file.exists() and done_file.read_text().strip():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run([*base, "-o", str(out), *options, "--resume"], check=True)
    a = zarr.open_array(str(reference / "transform" / "field.zarr"), mode="r")[:]
    b = zarr.open_array(str(out / "transform" / "field.zarr"), mode="r")[:]
    np.testing.assert_array_equal(a, b)
    wa = zarr.open_group(str(reference / "warped.ome.zarr"), mode="r")["0"][:]
    wb = zarr.open_group(str(out / "warped.ome.zarr"), mode="r")["0"][:]
    np.testing.assert_array_equal(wa, wb)


def test_level_arguments_are_checked_against_the_target_slide(
    pair: dict, tmp_path: Path, run_cli
) -> None:
    from wsireg.io.slide import open_slide

    count = open_slide(pair["target"]).level_count
    for bad, code, name in (
        (["--level", "-1"], 2, "--level"),  # refused by the option's range
        (["--level", str(count)], 1, "target.ome.tif"),  # refused by the slide
        (["--warp-level", "-1"], 2, "--warp-level"),
        (["--warp-level", "99"], 1, "target.ome.tif"),
    ):
        out = tmp_path / "o"
        result = run_cli("register", pair["source"], pair["target"], "-o", out, *bad)
        assert result.exit_code == code, (bad, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "level" in lines[0], bad
        assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_the_field_is_estimated_into_the_transform_and_the_affine_read_from_it(
    pair: dict, tmp_path: Path
) -> None:
    result = register(pair["source"], pair["target"], tmp_path / "out", write_warped=False, **FAST)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    np.testing.assert_array_equal(
        result.transform.initial_affine, np.array(report["alignment"]["matrix"])
    )
    assert result.transform.path == tmp_path / "out" / "transform"
    assert sorted(p.name for p in result.transform.path.iterdir()) == [
        "field.zarr",
        "transform.json",
    ]
    with pytest.raises(TypeError, match="levles"):
        register(pair["source"], pair["target"], tmp_path / "typo", levles=2)
    with pytest.raises(ValueError, match="precision"):
        register(pair["source"], pair["target"], tmp_path / "typo", precision="float16")


def test_unknown_mpp_and_incompatible_sizes_is_an_error(pair: dict, tmp_path: Path) -> None:
    import tifffile

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.full((400, 300, 3), 200, np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="small.tif.*relative scale"):
        register(small, pair["target"], tmp_path / "o", **FAST)
