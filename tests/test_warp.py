"""The warp engine: exactness, analytic accuracy, resume, distributed runs, memory, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.warp import existing_chunks, warp, warp_block
from wsireg.io.slide import open_slide

from .test_transform import rotation, smooth_field


def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth RGB test pattern at continuous level-0 coordinates (periods 60-150 px)."""
    r = 128 + 100 * np.sin(2 * np.pi * x / 97.0) * np.cos(2 * np.pi * y / 131.0)
    g = 128 + 90 * np.cos(2 * np.pi * (x + y) / 151.0)
    b = 128 + 80 * np.sin(2 * np.pi * (x - 0.5 * y) / 63.0)
    return np.clip(np.stack([r, g, b], -1), 0, 255)


def write_pattern_slide(path: Path, shape: tuple[int, int], tile: int = 256) -> Path:
    h, w = shape
    pixels = np.empty((h, w, 3), np.uint8)
    for y0 in range(0, h, 256):  # in bands, to keep the test process small
        yy, xx = np.mgrid[y0 : min(y0 + 256, h), 0:w]
        pixels[y0 : y0 + 256] = pattern(xx.astype(float), yy.astype(float)).round()
    tifffile.imwrite(path, pixels, tile=(tile, tile), photometric="rgb", compression="zlib")
    return path


def read_level(path: Path, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[str(level)][:]).transpose(1, 2, 0)


@pytest.fixture(scope="module")
def pattern_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_slide(tmp_path_factory.mktemp("src") / "pattern.tif", (1500, 2000))


def test_identity_warp_reproduces_exact_pixels(pattern_slide: Path, tmp_path: Path) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    out = warp(Transform.identity(ref), slide, tmp_path / "id.ome.zarr", chunk=512)
    np.testing.assert_array_equal(read_level(out), slide.level(0).compute())
    assert zarr.open_group(str(out), mode="r").attrs["multiscales"]


def test_integer_affine_reproduces_exact_pixels(pattern_slide: Path) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    # target (x, y) -> source (y + 7, 1200 - x): a quarter turn plus an integer shift
    A = np.array([[0.0, 1.0, 7.0], [-1.0, 0.0, 1200.0], [0.0, 0.0, 1.0]])
    target = SlideRef(None, (1000, 1100))
    T = Transform.from_affine(A, target, ref)
    block = warp_block(T, slide, (0, 0, 1000, 1100))
    src = slide.level(0).compute()
    yy, xx = np.mgrid[0:1000, 0:1100]
    sx, sy = yy + 7, 1200 - xx
    inside = (sx >= 0) & (sx < 2000) & (sy >= 0) & (sy < 1500)
    np.testing.assert_array_equal(block[inside], src[sy[inside], sx[inside]])
    assert (block[~inside] == 255).all()


@pytest.mark.parametrize("affine", [np.eye(3), rotation(23, (1000, 750), (15, -10))])
def test_nonrigid_warp_matches_analytic_sampling(pattern_slide: Path, affine: np.ndarray) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    fld = smooth_field((1500 // 8, 2000 // 8), 8.0, amplitude=15)
    T = Transform.from_field(affine, fld, 8.0, ref, ref)
    y0, x0, h, w = 300, 400, 600, 700
    block = warp_block(T, slide, (y0, x0, h, w)).astype(float)
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    pts = T.map_points(np.stack([xx.ravel(), yy.ravel()], 1).astype(float), "target_to_source")
    expected = pattern(pts[:, 0], pts[:, 1]).reshape(h, w, 3)
    inside = (pts[:, 0] > 1) & (pts[:, 0] < 1998) & (pts[:, 1] > 1) & (pts[:, 1] < 1498)
    inside = inside.reshape(h, w)
    error = np.abs(block - expected)[inside]
    # bilinear resampling of a pattern with periods >= 63 px, plus uint8 rounding
    assert error.mean() < 1.0 and np.percentile(error, 99) < 3.0


def test_output_level_and_pyramid(pattern_slide: Path, tmp_path: Path) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    fld = smooth_field((1500 // 16 + 1, 2000 // 16 + 1), 16.0)
    T = Transform.from_field(np.eye(3), fld, 16.0, ref, ref)
    full = warp(T, slide, tmp_path / "l0.ome.zarr", chunk=512)
    half = warp(T, slide, tmp_path / "l1.ome.zarr", level=1, chunk=512)
    a, b = read_level(full, 1).astype(float), read_level(half, 0).astype(float)
    assert a.shape == b.shape == (750, 1000, 3)
    assert np.abs(a - b).mean() < 3  # mean-downsampled full warp vs a warp on the coarse grid


def test_resume_after_kill_is_byte_identical(pattern_slide: Path, tmp_path: Path) -> None:
    big = write_pattern_slide(tmp_path / "big.tif", (4096, 4096), tile=512)
    ref = SlideRef.from_slide(open_slide(big))
    fld = smooth_field((4096 // 16, 4096 // 16), 16.0, amplitude=20)
    tdir = Transform.from_field(rotation(4, (2048, 2048)), fld, 16.0, ref, ref).save(tmp_path / "t")
    reference = warp(tdir, big, tmp_path / "ref.ome.zarr", chunk=256)
    out = tmp_path / "out.ome.zarr"
    cmd = [
        sys.executable,
        "-m",
        "wsireg_cli",
        "-q",
        "warp",
        str(tdir),
        str(big),
        "-o",
        str(out),
        "--chunk",
        "256",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)
    stage = tmp_path / ".out.ome.zarr.partial" / "0"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "the warp ended before it could be killed"
        if stage.exists() and sum(1 for _ in stage.rglob("*")) > 60:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed warp must not leave a complete-looking output"
    # a chunk counts as finished when every channel of it is on disk; one killed between its
    # channels is (rightly) recomputed, so only finished chunks are held to "not rewritten"
    finished = existing_chunks(zarr.open_array(str(stage), mode="r"))
    assert finished, "the warp was killed before it finished a chunk"
    done_before = [
        p
        for p in stage.rglob("*")
        if p.is_file()
        and p.name.isdigit()
        and p.parent.parent.parent == stage
        and (int(p.parent.name), int(p.name)) in finished
    ]
    assert done_before
    mtimes = {p: p.stat().st_mtime_ns for p in done_before}
    subprocess.run([*cmd, "--resume"], check=True)
    assert out.exists()
    # finished chunks were kept, not recomputed
    for p in done_before:
        assert (out / p.relative_to(stage.parent)).stat().st_mtime_ns == mtimes[p]
    assert _tree_bytes(out) == _tree_bytes(reference)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_distributed_equals_threaded(pattern_slide: Path, tmp_path: Path) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    fld = smooth_field((1500 // 16 + 1, 2000 // 16 + 1), 16.0)
    tdir = Transform.from_field(rotation(-8, (1000, 750)), fld, 16.0, ref, ref).save(tmp_path / "t")
    threaded = warp(tdir, pattern_slide, tmp_path / "threads.ome.zarr", chunk=512)
    distributed = warp(tdir, pattern_slide, tmp_path / "dist.ome.zarr", chunk=512, workers=2)
    assert _tree_bytes(threaded) == _tree_bytes(distributed)


def test_bad_inputs_through_the_cli(pattern_slide: Path, tmp_path: Path, run_cli) -> None:
    slide = open_slide(pattern_slide)
    ref = SlideRef.from_slide(slide)
    other = SlideRef("other.svs", (999, 888))
    mismatched = Transform.identity(ref, other).save(tmp_path / "mismatch")
    result = run_cli("warp", mismatched, pattern_slide, "-o", tmp_path / "a.ome.zarr")
    assert result.exit_code == 1
    assert "888 x 999" in result.stderr and str(pattern_slide) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    fld = smooth_field((94, 125), 16.0)
    good = Transform.from_field(np.eye(3), fld, 16.0, ref, ref).save(tmp_path / "good")
    (good / "transform.json").write_text("{broken")
    result = run_cli("warp", good, pattern_slide, "-o", tmp_path / "b.ome.zarr")
    assert result.exit_code == 1 and "corrupted transform.json" in result.stderr

    nofield = Transform.from_field(np.eye(3), fld, 16.0, ref, ref).save(tmp_path / "nofield")
    import shutil

    shutil.rmtree(nofield / "field.zarr")
    result = run_cli("warp", nofield, pattern_slide, "-o", tmp_path / "c.ome.zarr")
    assert result.exit_code == 1 and "field" in result.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".a", ".b", ".c"))]
    assert not (tmp_path / "a.ome.zarr").exists() and not leftovers

    existing = tmp_path / "exists.ome.zarr"
    existing.mkdir()
    result = run_cli("warp", mismatched, pattern_slide, "-o", existing)
    assert result.exit_code == 1 and "--overwrite" in result.stderr


def test_warp_memory_is_bounded(tmp_path: Path) -> None:
    """A 12k x 12k warp (432 MB of RGB) in a subprocess stays far below the image size."""
    side = 12288
    src = tmp_path / "big.tif"
    tiles = (np.full((512, 512, 3), (17 * i) % 251, np.uint8) for i in range((side // 512) ** 2))
    tifffile.imwrite(
        src,
        tiles,
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(512, 512),
        photometric="rgb",
        compression="zlib",
    )
    ref = SlideRef.from_slide(open_slide(src))
    fld = smooth_field((side // 32, side // 32), 32.0, amplitude=25)
    tdir = Transform.from_field(rotation(2, (side / 2, side / 2)), fld, 32.0, ref, ref).save(
        tmp_path / "t"
    )
    code = (
        "import sys\n"
        "from wsireg.engine.parallel import peak_rss_mib\n"
        "from wsireg.engine.warp import warp\n"
        "warp(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "print(peak_rss_mib())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tdir), str(src), str(tmp_path / "w.ome.zarr")],
        check=True,
        capture_output=True,
        text=True,
    )
    peak_mib = float(out.stdout.split()[-1])
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB for a 432 MB image"


def test_warp_to_ome_tiff(pattern_slide: Path, tmp_path: Path, run_cli) -> None:
    slide = open_slide(pattern_slide)
    tdir = Transform.identity(SlideRef.from_slide(slide)).save(tmp_path / "t")
    out = tmp_path / "w.ome.tif"
    result = run_cli("-q", "warp", tdir, pattern_slide, "-o", out, "--chunk", "512")
    assert result.exit_code == 0, result.output
    with open_slide(out) as warped:
        assert warped.level_count >= 2
        diff = np.abs(warped.level(0).compute().astype(int) - slide.level(0).compute())
        assert diff.mean() < 2  # JPEG tiles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "w.ome.tif"]
