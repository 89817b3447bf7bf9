"""Nothing silently wrong (issue 18): each numbered item of the issue reproduced small, and a
table of bad options and input files through the CLI (exit code != 0 => one line on stderr
naming the file or option, no traceback, no complete-looking output).

Item 1 (mixed pixel sizes) is ``tests/test_mixed_resolution.py``; the quality gate of item 9
is ``tests/test_quality_gate.py``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import wsireg.engine.parallel as parallel_module
import wsireg.engine.warp as warp_module
import wsireg.io.output as output_module
import wsireg.run.register as register_module
from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.warp import warp
from wsireg.errors import OutputError, TransformError
from wsireg.io.annotations import MAX_VERTICES, write_landmarks
from wsireg.io.output import output_lock, partial_path
from wsireg.io.slide import open_slide
from wsireg.progress import LOG_LINE
from wsireg.run.batch import batch
from wsireg.run.register import register
from wsireg.synthetic.slides import synthetic_pair, write_synthetic_slide

from .test_transform import rotation, smooth_field

SHAPE = (512, 512)
FAST = {"weights": None, "refine": 12, "levels": 2, "write_warped": False}
FAST_CLI = ["--weights", "none", "--refine", "12", "--levels", "2", "--no-warp"]


@pytest.fixture(autouse=True)
def short_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable scheduler is given up on after 2 s here (10 s in use)."""
    monkeypatch.setattr(parallel_module, "CONNECT_TIMEOUT_S", 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> dict[str, Path]:
    """A small synthetic pair, a transform with a field between them, landmarks, GeoJSON, and
    bad files of every kind."""
    root = tmp_path_factory.mktemp("files")
    _, _, truth = synthetic_pair(SHAPE, 3, max_displacement=4, rotation=8.0)
    source = write_synthetic_slide(root / "source.ome.tif", SHAPE, seed=3, stain="he")
    target = write_synthetic_slide(
        root / "target.ome.tif", SHAPE, seed=3, stain="ihc", deformation=truth
    )
    ref = SlideRef.from_slide(open_slide(source))
    fld = smooth_field((SHAPE[0] // 16, SHAPE[1] // 16), 16.0, amplitude=3)
    transform = Transform.from_field(rotation(2, (256, 256)), fld, 16.0, ref, ref)
    transform.save(root / "transform")
    points = write_landmarks(root / "points.csv", np.array([[10.0, 20.0], [300.0, 400.0]]))
    geojson = root / "shapes.geojson"
    polygon = [[[10, 10], [500, 10], [500, 500], [10, 10]]]
    geojson.write_text(json.dumps({"type": "Polygon", "coordinates": polygon}))
    binary = root / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    text_slide = root / "notes.tif"
    text_slide.write_text("not an image")
    empty = root / "empty.csv"
    empty.write_text("")
    folder = root / "folder"
    folder.mkdir()
    return {
        "root": root,
        "source": source,
        "target": target,
        "transform": root / "transform",
        "points": points,
        "geojson": geojson,
        "binary": binary,
        "text_slide": text_slide,
        "empty": empty,
        "folder": folder,
        "missing": root / "missing.svs",
        "unreadable": slides_dir / "unreadable.svs",
        "broken": slides_dir / "broken.svs",
    }


def one_line_error(result, *names: str) -> str:  # type: ignore[no-untyped-def]
    """The CLI failed with one line on stderr naming each of ``names`` and no traceback."""
    assert result.exit_code not in (0, None), result.output
    # stderr is no terminal here: progress is log lines (LOG_LINE), never a "\r"
    assert "\r" not in result.stderr
    lines = [
        line for line in result.stderr.split("\n") if line.strip() and not LOG_LINE.match(line)
    ]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def nothing_at(out: Path) -> None:
    """No output and no staged output at ``out``."""
    assert not out.exists() and not partial_path(out).exists()


def copy_transform(files: dict[str, Path], where: Path) -> Path:
    return Transform.load(files["transform"]).save(where)


# --------------------------------------------------------------------------------------------
# 2. --resume trusts only its own staged output
# --------------------------------------------------------------------------------------------
def interrupt_after_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``register`` stop like a killed run once the field is estimated (before QC)."""

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(register_module, "_quality_control", killed)


def test_2_register_resume_refuses_a_staged_output_of_other_inputs_or_options(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_the_field(patch)
        with pytest.raises(KeyboardInterrupt):
            register(files["source"], files["target"], out, **FAST)
    assert partial_path(out).is_dir() and not out.exists()
    # another pair into the same staged output (the issue: the kidney's affine for the lesions)
    with pytest.raises(OutputError, match="cannot resume.*source.path"):
        register(files["target"], files["source"], out, resume=True, **FAST)
    # other options
    result = run_cli(
        "register", files["source"], files["target"], "-o", out, *FAST_CLI[:-3], "--refine",
        "5", "--no-warp", "--resume",
    )  # fmt: skip
    one_line_error(result, ".out.partial", "options.refine 12 -> 5")
    assert partial_path(out).is_dir() and not out.exists()  # still resumable
    # the same run resumes, and the fingerprint goes into the report, not the output's files
    result = register(files["source"], files["target"], out, resume=True, **FAST)
    assert result.report["fingerprint"]["options"]["refine"] == 12
    assert not output_module.fingerprint_path(out).exists()


def test_2_batch_resume_refuses_finished_pairs_of_other_options(
    files: dict[str, Path], tmp_path: Path
) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text(f"Source image,Target image\n{files['source']},{files['target']}\n")
    out = tmp_path / "batch"
    batch(table, out, **FAST)
    before = (out / "summary.json").read_text()
    with pytest.raises(OutputError, match=r"000-source.*options.refine 12 -> 5"):
        batch(table, out, resume=True, **{**FAST, "refine": 5})
    assert (out / "summary.json").read_text() == before
    document = batch(table, out, resume=True, **FAST)  # the same options: the pair is kept
    assert document["pairs"][0]["run"] == "skipped"


def test_2_warp_resume_refuses_chunks_of_another_field(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transform = copy_transform(files, tmp_path / "t")
    out = tmp_path / "warped.ome.zarr"
    reference = warp(transform, files["source"], tmp_path / "reference.ome.zarr", chunk=128)

    def interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
        def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt

        monkeypatch.setattr(warp_module, "fill_pyramid", killed)

    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(KeyboardInterrupt):
            warp(transform, files["source"], out, chunk=128)
    # the same job resumes to the uninterrupted result
    warp(transform, files["source"], out, chunk=128, resume=True)
    a = zarr.open_group(str(reference), mode="r")["0"][:]
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], a)
    # the field changes, the affine does not: the staged chunks are refused
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(KeyboardInterrupt):
            warp(transform, files["source"], out, chunk=128, overwrite=True)
    field = zarr.open_array(str(transform / "field.zarr"), mode="r+")
    field[:] = field[:] + 1.0
    with pytest.raises(OutputError, match=r"transform\.stages"):
        warp(transform, files["source"], out, chunk=128, overwrite=True, resume=True)


# --------------------------------------------------------------------------------------------
# 3. Densification is bounded
# --------------------------------------------------------------------------------------------
def test_3_densification_is_bounded_by_the_slide_and_a_vertex_budget(
    files: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    huge = tmp_path / "huge.geojson"
    huge.write_text(json.dumps({"type": "LineString", "coordinates": [[0, 0], [1e9, 1e9]]}))
    out = tmp_path / "huge-out.geojson"
    result = run_cli("warp-geojson", files["transform"], huge, "-o", out)
    assert result.exit_code == 0, result.output
    coordinates = json.loads(out.read_text())["coordinates"]
    diagonal = np.hypot(*SHAPE)
    assert len(coordinates) < diagonal / 8 + 10  # half the field spacing over the slide only
    assert np.hypot(*coordinates[-1]) == pytest.approx(np.hypot(1e9, 1e9), rel=0.01)  # mapped
    tiny = tmp_path / "tiny.geojson"
    result = run_cli(
        "warp-geojson", files["transform"], files["geojson"], "-o", tiny, "--max-segment", "1e-6"
    )
    one_line_error(result, "shapes.geojson", str(MAX_VERTICES), "--max-segment")
    nothing_at(tiny)
    for bad in ("0", "-1", "nan", "inf"):
        result = run_cli(
            "warp-geojson", files["transform"], files["geojson"], "-o", tiny, "--max-segment", bad
        )
        one_line_error(result, "--max-segment")
        nothing_at(tiny)


# --------------------------------------------------------------------------------------------
# 4. A transform with a missing or corrupt field chunk, or a bad affine, is an error
# --------------------------------------------------------------------------------------------
def test_4_missing_or_corrupt_field_chunks_and_bad_affines(
    files: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    missing = copy_transform(files, tmp_path / "missing")
    chunks = sorted(p for p in (missing / "field.zarr" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 1  # a 32 x 32 field in one chunk: every node of it on disk
    chunks[0].unlink()
    with pytest.raises(TransformError, match="1 of 1 field chunks are missing"):
        Transform.load(missing)
    out = tmp_path / "w.ome.zarr"
    one_line_error(run_cli("warp", missing, files["source"], "-o", out), "field.zarr", "missing")
    nothing_at(out)
    csv_out = tmp_path / "p.csv"
    result = run_cli("warp-points", missing, files["points"], "-o", csv_out)
    one_line_error(result, "field.zarr", "missing")
    nothing_at(csv_out)

    corrupt = copy_transform(files, tmp_path / "corrupt")
    chunk = next(p for p in (corrupt / "field.zarr" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage" * 10)
    result = run_cli("warp-points", corrupt, files["points"], "-o", csv_out)
    one_line_error(result, "field.zarr", "cannot read the field")
    one_line_error(run_cli("warp", corrupt, files["source"], "-o", out), "field.zarr")
    nothing_at(out)

    for name, affine in {
        "nan": [[1, 0, float("nan")], [0, 1, 0], [0, 0, 1]],
        "singular": [[1, 2, 0], [2, 4, 0], [0, 0, 1]],
    }.items():
        bad = copy_transform(files, tmp_path / name)
        document = json.loads((bad / "transform.json").read_text())
        document["stages"][0]["affine"] = affine
        (bad / "transform.json").write_text(json.dumps(document))
        reason = "non-finite" if name == "nan" else "singular"
        one_line_error(run_cli("warp", bad, files["source"], "-o", out), "transform.json", reason)
        nothing_at(out)


def test_4_a_new_field_reads_missing_nodes_as_nan(tmp_path: Path) -> None:
    from wsireg.engine.transform import create_field

    fld = create_field(tmp_path / "f.zarr", (300, 300), 4.0)
    fld[:, :256, :256] = 0.0  # one of four chunks written: zero displacement is stored
    assert fld.nchunks_initialized == 1
    assert np.isnan(fld[0, 299, 299]) and fld[0, 0, 0] == 0.0


# --------------------------------------------------------------------------------------------
# 5. Outputs never replace an input, the working directory or an ancestor
# --------------------------------------------------------------------------------------------
def test_5_outputs_never_replace_inputs_or_ancestors(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli
) -> None:
    source_bytes = files["source"].read_bytes()
    result = run_cli(
        "register", "--overwrite", files["source"], files["target"], "-o", files["source"]
    )
    one_line_error(result, "-o/--out", "is the input")
    assert files["source"].read_bytes() == source_bytes
    result = run_cli("register", files["source"], files["target"], "-o", files["root"])
    one_line_error(result, "contains the input")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for out in (".", "sub/..", str(tmp_path.parent)):
        result = run_cli("register", files["source"], files["target"], "-o", out, "--overwrite")
        one_line_error(result, "working directory")
    plain = tmp_path / "plain-file"
    plain.write_text("")
    result = run_cli("convert", files["source"], plain / "x.ome.zarr")
    one_line_error(result, "plain-file", "is not a directory")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(OutputError, match="is the input"):
        warp(files["transform"], files["source"], files["source"], overwrite=True)
    assert files["source"].read_bytes() == source_bytes


# --------------------------------------------------------------------------------------------
# 6. One writer per output
# --------------------------------------------------------------------------------------------
def test_6_a_second_writer_fails_at_once(files: dict[str, Path], tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    with output_lock(out):  # another run is writing `out`
        with pytest.raises(OutputError, match="another run is writing"):
            register(files["source"], files["target"], out, **FAST)
        result = run_cli("register", files["source"], files["target"], "-o", out, *FAST_CLI)
        one_line_error(result, str(out), "another run is writing")
    nothing_at(out)
    assert not output_module.lock_path(out).exists()
    register(files["source"], files["target"], out, **FAST)  # free again
    assert not output_module.lock_path(out).exists()


# --------------------------------------------------------------------------------------------
# 8. Errors from the file system and from data are one line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_8_disk_full_or_read_only_is_one_line_and_leaves_nothing(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli, code: int
) -> None:
    def refuse(stage: Path, final: Path) -> None:
        raise OSError(code, os.strerror(code), str(final))

    monkeypatch.setattr(output_module, "commit", refuse)
    for args, out in (
        (["convert", files["source"]], tmp_path / "c.ome.zarr"),
        (["warp", files["transform"], files["source"], "-o"], tmp_path / "w.ome.zarr"),
        (["warp-points", files["transform"], files["points"], "-o"], tmp_path / "p.csv"),
    ):
        one_line_error(run_cli(*args, out), str(out), os.strerror(code))
        nothing_at(out)


def test_8_debug_shows_the_traceback(files: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsireg_cli.main import cli

    args = ["warp-points", str(files["transform"]), str(files["binary"]), "-o", "x.csv"]
    quiet = CliRunner().invoke(cli, args)
    assert quiet.exit_code == 1 and "Traceback" not in quiet.output
    loud = CliRunner().invoke(cli, ["--debug", *args])
    assert loud.exit_code == 1 and loud.exception is not None


# --------------------------------------------------------------------------------------------
# 9. Bad data is refused, not passed through
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("geometry", "reason"),
    [
        ({"type": "Circle", "coordinates": [10, 10], "radius": 5}, "'Circle'"),
        ({"type": "Point", "coordinates": [[1, 2], [3, 4]]}, "Point coordinate is not a number"),
        ({"type": "LineString", "coordinates": [[0, 0], [float("inf"), 1]]}, "not finite"),
        ({"type": "LineString", "coordinates": [[0, 0], [float("nan"), 1]]}, "not finite"),
        ({"type": "Point", "coordinates": [1, 2, 3]}, "not [x, y]"),
        ({"type": "Point", "coordinates": ["1", 2]}, "not a number"),
        ({"type": "Polygon", "coordinates": [0, 1]}, "nested lists"),
    ],
)
def test_9_geojson_that_cannot_be_mapped_is_refused(
    files: dict[str, Path], tmp_path: Path, run_cli, geometry: dict, reason: str
) -> None:
    document = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": geometry, "properties": {}}],
    }
    path = tmp_path / "in.geojson"
    path.write_text(json.dumps(document))  # NaN and Infinity as Python's json writes them
    out = tmp_path / "out.geojson"
    one_line_error(
        run_cli("warp-geojson", files["transform"], path, "-o", out), "in.geojson", reason
    )
    nothing_at(out)


def test_9_nan_pixels_read_as_no_data(tmp_path: Path) -> None:
    pixels = np.full((64, 64, 3), 0.25, np.float32)
    pixels[10:20, 10:20] = np.nan
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, pixels, photometric="rgb")
    read = open_slide(path).read(0, 0, 0, 64, 64)
    assert (read[10:20, 10:20] == 255).all()  # white, like every region without data
    assert (read[30:, 30:] == 64).all()


def test_9_evaluate_of_a_folder_that_is_no_batch_output(
    files: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text(f"Source image,Target image\n{files['source']},{files['target']}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one_line_error(run_cli("evaluate", table, elsewhere), "elsewhere", "not its batch output")
    nothing_at(elsewhere / "evaluation.json")


# --------------------------------------------------------------------------------------------
# 7, 8: the table of bad options and input files
# --------------------------------------------------------------------------------------------
#: ``(arguments, names the one-line error must contain)``; ``{key}`` is a path of ``files``,
#: ``OUT`` the output that must not appear.
CASES: list[tuple[str, str]] = [
    # options out of range (7)
    ("register {source} {target} -o OUT --level 99", "no level 99"),
    ("register {source} {target} -o OUT --level -1", "--level"),
    ("register {source} {target} -o OUT --warp-level 99", "no output level 99"),
    ("register {source} {target} -o OUT --warp-level -1", "--warp-level"),
    ("register {source} {target} -o OUT --patch 0", "--patch"),
    ("register {source} {target} -o OUT --patch 100", "--patch"),
    ("register {source} {target} -o OUT --stride 0", "--stride"),
    ("register {source} {target} -o OUT --stride 100", "--stride"),
    ("register {source} {target} -o OUT --patch 64 --stride 128", "--stride"),
    ("register {source} {target} -o OUT --group 0", "--group"),
    ("register {source} {target} -o OUT --levels 0", "--levels"),
    ("register {source} {target} -o OUT --iterations 0", "--iterations"),
    ("register {source} {target} -o OUT --refine -1", "--refine"),
    ("register {source} {target} -o OUT --device tpu", "--device"),
    ("register {source} {target} -o OUT --precision float16", "--precision"),
    ("register {source} {target} -o OUT --weights {missing}", "missing.svs"),
    ("register {source} {target} -o OUT --weights {binary}", "binary.csv"),
    ("warp {transform} {source} -o OUT --level 99", "no output level 99"),
    ("warp {transform} {source} -o OUT --level -1", "--level"),
    ("warp {transform} {source} -o OUT --workers 0", "--workers"),
    ("warp {transform} {source} -o OUT --workers -1", "--workers"),
    ("warp {transform} {source} -o OUT --threads 0", "--threads"),
    ("warp {transform} {source} -o OUT --chunk 0", "--chunk"),
    ("warp {transform} {source} -o OUT --interpolation cubic", "--interpolation"),
    ("batch {points} -o OUT --workers 0", "--workers"),
    ("batch {points} -o OUT --threads 0", "--threads"),
    ("convert {source} OUT --tile 100", "--tile"),
    ("convert {source} OUT --chunk 0", "--chunk"),
    ("convert {source} OUT --level 5", "no level 5"),
    ("deform {source} -o OUT --rotation nan", "--rotation"),
    ("deform {source} -o OUT --max-displacement -3", "--max-displacement"),
    ("demo OUT --size 0", "--size"),
    ("stack {source} {target} -o OUT --reference 5", "--reference"),
    ("register {source} {target} -o OUT --no-such-option", "--no-such-option"),
    # input files (8)
    ("info {unreadable}", "unreadable.svs"),
    ("info {broken}", "broken.svs"),
    ("info {text_slide}", "notes.tif"),
    ("info {missing}", "missing.svs"),
    ("info {folder}", "folder"),
    ("register {unreadable} {target} -o OUT", "unreadable.svs"),
    ("register {source} {text_slide} -o OUT", "notes.tif"),
    ("convert {broken} OUT", "broken.svs"),
    ("warp {folder} {source} -o OUT", "folder"),
    ("warp {points} {source} -o OUT", "points.csv"),
    ("warp {transform} {unreadable} -o OUT", "unreadable.svs"),
    ("warp-points {transform} {binary} -o OUT", "binary.csv"),
    ("warp-points {transform} {empty} -o OUT", "empty.csv"),
    ("warp-points {transform} {missing} -o OUT", "missing.svs"),
    ("warp-points {transform} {geojson} -o OUT", "shapes.geojson"),
    ("warp-geojson {transform} {binary} -o OUT", "binary.csv"),
    ("warp-geojson {transform} {points} -o OUT", "points.csv"),
    ("warp-geojson {missing} {geojson} -o OUT", "missing.svs"),
    ("batch {binary} -o OUT", "binary.csv"),
    ("batch {empty} -o OUT", "empty.csv"),
    ("evaluate {binary} {folder} --json OUT", "binary.csv"),
    ("warp {transform} {source} -o OUT --scheduler tcp://127.0.0.1:9", "127.0.0.1:9"),
]


@pytest.mark.parametrize(("command", "names"), CASES, ids=[c for c, _ in CASES])
def test_bad_options_and_inputs_give_one_line(
    files: dict[str, Path], tmp_path: Path, run_cli, command: str, names: str
) -> None:
    out = tmp_path / "result.out"
    args = [
        str(out) if word == "OUT" else word.format(**{k: str(v) for k, v in files.items()})
        for word in command.split()
    ]
    result = run_cli(*args)
    one_line_error(result, *names.split("|"))
    nothing_at(out)
    assert not output_module.lock_path(out).exists()
