"""Output formats: `register --format/--ngff-version`, `warp --compression/--tile`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.warp import WarpOptions, warp
from wsireg.io.slide import open_slide
from wsireg.run.register import register
from wsireg.synthetic.slides import write_synthetic_slide

from .test_warp import write_pattern_slide

SHAPE = (512, 512)
FAST = {"weights": None, "refine": 4, "levels": 1}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_slide(tmp_path_factory.mktemp("src") / "pattern.tif", (300, 400))


@pytest.fixture(scope="module")
def identity(small_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with open_slide(small_slide) as slide:
        ref = SlideRef.from_slide(slide)
    return Transform.identity(ref).save(tmp_path_factory.mktemp("t") / "identity")


def test_warp_tiff_compression_and_tile(small_slide: Path, identity: Path, tmp_path, run_cli):
    out = tmp_path / "w.ome.tif"
    args = ("-q", "warp", identity, small_slide, "-o", out, "--compression", "zstd")
    result = run_cli(*args, "--tile", "128")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert (page.tilewidth, page.tilelength) == (128, 128)
        assert page.compression == tifffile.COMPRESSION.ZSTD
    with open_slide(out) as warped, open_slide(small_slide) as source:
        np.testing.assert_array_equal(warped.level(0).compute(), source.level(0).compute())


def test_nearest_is_lossless_and_refuses_jpeg(small_slide: Path, identity: Path, tmp_path, run_cli):
    out = tmp_path / "labels.ome.tif"
    result = run_cli("-q", "warp", identity, small_slide, "-o", out, "--interpolation", "nearest")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    bad = tmp_path / "bad.ome.tif"
    args = ("warp", identity, small_slide, "-o", bad, "--interpolation", "nearest")
    result = run_cli(*args, "--compression", "jpeg")
    assert result.exit_code == 1 and "jpeg is lossy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not bad.exists()
    result = run_cli("warp", identity, small_slide, "-o", bad, "--tile", "100")
    assert result.exit_code == 2 and "multiple of 16" in result.output


def test_warp_zarr_compression(small_slide: Path, identity: Path, tmp_path, run_cli):
    raw = warp(identity, small_slide, tmp_path / "raw.ome.zarr", compression="none", chunk=256)
    meta = json.loads((raw / "0" / ".zarray").read_text())
    assert meta["compressor"] is None
    gz = warp(
        identity, small_slide, tmp_path / "gz.ome.zarr", compression="zlib", ngff_version="0.5"
    )
    codecs = json.loads((gz / "0" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs][-1] == "gzip"
    np.testing.assert_array_equal(
        zarr.open_group(str(raw), mode="r")["0"][:], zarr.open_group(str(gz), mode="r")["0"][:]
    )
    result = run_cli(
        "warp", identity, small_slide, "-o", tmp_path / "j.ome.zarr", "--compression", "jpeg"
    )
    assert result.exit_code == 1 and "ome-zarr compression" in result.stderr
    with pytest.raises(ValueError, match="NGFF version"):
        WarpOptions(ngff_version="0.6")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    source = write_synthetic_slide(root / "source.ome.tif", SHAPE, seed=3, stain="he")
    target = write_synthetic_slide(root / "target.ome.tif", SHAPE, seed=3, stain="ihc")
    return source, target


def test_register_writes_ome_tiff(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = register(*pair, out, fmt="ome-tiff", **FAST)
    assert result.warped == (out / "warped.ome.tif").resolve()
    assert sorted(p.name for p in out.iterdir()) == [
        "qc",
        "report.json",
        "transform",
        "warped.ome.tif",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["warped"] == str(result.warped)
    assert report["fingerprint"]["options"]["warped_format"]["fmt"] == "ome-tiff"
    with open_slide(result.warped) as warped:
        assert warped.level_shape(0) == SHAPE
    with pytest.raises(ValueError, match="format must be one of"):
        register(*pair, tmp_path / "bad", fmt="png", **FAST)
    assert not (tmp_path / "bad").exists()


def test_register_cli_ngff_05(pair: tuple[Path, Path], tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out"
    args = ("--weights", "none", "--levels", "1", "--refine", "4", "--ngff-version", "0.5")
    result = run_cli("-q", "register", *pair, "-o", out, *args)
    assert result.exit_code == 0, result.output
    warped = out / "warped.ome.zarr"
    assert str(warped.resolve()) in result.output
    group = json.loads((warped / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["attributes"]["ome"]["version"] == "0.5"


CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


@pytest.mark.skipif(not CMU.is_file(), reason="no cmu-1-small-region.svs")
def test_convert_keeps_associated_images_and_properties(tmp_path: Path) -> None:
    from wsireg.io.convert import convert

    with open_slide(CMU) as slide:
        pictures = {name: np.asarray(image) for name, image in slide.associated_images.items()}
        properties = slide.properties
        convert(slide, tmp_path / "cmu.ome.tif")
        convert(slide, tmp_path / "cmu.ome.zarr", fmt="ome-zarr")
    assert {"label", "macro", "thumbnail"} <= set(pictures)
    with tifffile.TiffFile(tmp_path / "cmu.ome.tif") as tif:
        series = {s.name: s for s in tif.series}
        assert tif.series[0].name == CMU.name and len(tif.series[0].levels) >= 2
        for name, picture in pictures.items():
            np.testing.assert_array_equal(series[name].asarray(), picture)
        xml = tif.ome_metadata
    assert 'Namespace="openslide.properties"' in xml
    assert f'<M K="aperio.AppMag">{properties["aperio.AppMag"]}</M>' in xml
    group = zarr.open_group(str(tmp_path / "cmu.ome.zarr"), mode="r")
    assert group.attrs["vendor_properties"] == properties
    assert group.attrs["multiscales"][0]["name"] == CMU.name
    for name, picture in pictures.items():
        image = group[group.attrs["associated_images"][name]]
        assert image.attrs["multiscales"][0]["name"] == name
        np.testing.assert_array_equal(np.moveaxis(image["0"][:], 0, -1), picture)
    with open_slide(tmp_path / "cmu.ome.zarr") as back:  # the extras do not disturb reading
        assert back.level_count >= 2


def test_readers_of_our_ome_tiff(tmp_path: Path) -> None:
    """README: tiffslide reads the SubIFD pyramid, OpenSlide one level (no SubIFDs)."""
    import openslide

    from wsireg.io.tiff import TiffLayout, write_ome_tiff

    image = np.full((600, 700, 3), 200, np.uint8)
    out = write_ome_tiff(image, tmp_path / "p.ome.tif", layout=TiffLayout(tile=128))
    with openslide.OpenSlide(str(out)) as opened:
        assert opened.level_count == 1
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(str(out)) as opened:
        assert opened.level_count >= 2
