"""The slide reader on the real and broken files of ../shared/data/slides and on plain images."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsireg.core.stain import tissue_mask
from wsireg.errors import SlideError
from wsireg.io.convert import convert, output_format
from wsireg.io.slide import check_level, open_slide

# name -> (vendor, level (width, height)s, mpp or None) as OpenSlide 4.0.1 reports them
READABLE = {
    "cmu-1-small-region.svs": ("aperio", [(2220, 2967)], (0.499, 0.499)),
    "tcga-cr-7395-01a-01-ts1.svs": ("aperio", [(4443, 3567), (2221, 1783)], None),
    "boxes.tiff": ("generic-tiff", [(300, 250), (150, 125), (75, 62), (37, 31)], "any"),
    "small.svs": ("aperio", [(16, 16)], (0.499, 0.499)),
    "boxes_0.dcm": ("dicom", [(16, 16)], (0.499, 0.499)),
    "boxes_1.dcm": ("dicom", [(16, 16)], (0.499, 0.499)),
}
UNOPENABLE = ["broken.svs", "unopenable.tiff"]


@pytest.mark.parametrize("name", sorted(READABLE))
def test_readable_slides(slides_dir: Path, name: str) -> None:
    vendor, dims, mpp = READABLE[name]
    with open_slide(slides_dir / name) as slide:
        assert slide.vendor == vendor
        assert list(slide.level_dimensions) == dims
        if mpp != "any":
            assert slide.mpp == (pytest.approx(mpp) if mpp else None)
        for level in range(slide.level_count):
            array = slide.level(level)
            w, h = dims[level]
            assert array.shape == (h, w, 3) and array.dtype == np.uint8
            corner = array[: min(h, 40), : min(w, 40)].compute()
            assert corner.shape == (min(h, 40), min(w, 40), 3)


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_backends_agree_on_real_slides(slides_dir: Path, name: str) -> None:
    fast = open_slide(slides_dir / name, backend="tifffile")
    reference = open_slide(slides_dir / name, backend="openslide")
    assert fast.level_dimensions == reference.level_dimensions
    for level in range(fast.level_count):
        h, w = fast.level_shape(level)
        window = (level, 0, 0, 700, 900)  # crosses tile boundaries
        np.testing.assert_array_equal(fast.read(*window), reference.read(*window))
        # Elsewhere OpenSlide resamples by the fractional part of location / downsample on
        # levels whose downsample is not an integer (tcga level 1: 2.0005): equal up to that.
        window = (level, h // 3, w // 4, 700, 900)
        diff = np.abs(fast.read(*window).astype(int) - reference.read(*window).astype(int))
        assert diff.mean() < (0.01 if fast.level_downsamples[level] == 1 else 8)
    # Default choice: tifffile pixels with OpenSlide metadata.
    with open_slide(slides_dir / name) as slide:
        assert slide.backend.startswith("tifffile")
        assert slide.properties.get("openslide.vendor") == "aperio"


def test_real_slide_has_tissue_and_associated_images(slides_dir: Path) -> None:
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        thumb = slide.associated_images["thumbnail"]
        assert thumb.ndim == 3 and thumb.shape[2] == 3
        small = slide.get_thumbnail(256)
        assert max(small.shape[:2]) == 256
        assert small.mean() < 240  # H&E tissue, not a blank image


@pytest.mark.parametrize("name", UNOPENABLE)
def test_unopenable_slides_raise_one_line_error(slides_dir: Path, name: str) -> None:
    with pytest.raises(SlideError) as info:
        open_slide(slides_dir / name)
    message = str(info.value)
    assert name in message and "\n" not in message


def test_unreadable_pixels_raise_one_line_error(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "unreadable.svs")
    with pytest.raises(SlideError) as info:
        slide.level(0).compute()
    assert "unreadable.svs" in str(info.value) and "cannot read pixels" in str(info.value)


def test_bad_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cases = {
        tmp_path / "missing.svs": "no such file",
        tmp_path: "is a directory",
        empty: "empty file",
    }
    for path, reason in cases.items():
        with pytest.raises(SlideError, match=reason):
            open_slide(path)


@pytest.mark.filterwarnings("ignore:.*zero-size")
def test_zero_size_image(tmp_path: Path) -> None:
    path = tmp_path / "zero.tif"
    tifffile.imwrite(path, np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(SlideError, match="zero"):
        open_slide(path)


def test_plain_images_and_transparency(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    rgba = np.dstack([rgb, np.full((37, 53), 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba).save(tmp_path / "b.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    yy, xx = np.mgrid[:37, :53]
    smooth = np.dstack([yy * 6, xx * 4, 255 - yy * 3]).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    tifffile.imwrite(tmp_path / "flat.tif", rgb)

    np.testing.assert_array_equal(open_slide(tmp_path / "a.png").level(0).compute(), rgb)
    b = open_slide(tmp_path / "b.png").level(0).compute()
    assert (b[:10, :10] == 255).all()
    np.testing.assert_array_equal(b[10:, 10:], rgb[10:, 10:])
    grey = open_slide(tmp_path / "grey.png").level(0).compute()
    np.testing.assert_array_equal(grey, np.repeat(rgb[..., :1], 3, axis=2))
    jpg = open_slide(tmp_path / "c.jpg").level(0).compute().astype(int)
    assert np.abs(jpg - smooth).mean() < 3
    np.testing.assert_array_equal(open_slide(tmp_path / "flat.tif").level(0).compute(), rgb)


def test_sixteen_bit_grey_png_reads_as_grey_rgb(tmp_path: Path) -> None:
    """ANHIR-style 16-bit grey PNGs (the anhir-lobes table): the top 8 bits, as grey RGB."""
    grey = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21).astype(np.uint16)
    grey[0, 0], grey[0, 1] = 65535, 0
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")  # Pillow's 16-bit modes, not 8-bit L
    rgb = open_slide(tmp_path / "g16.png").level(0).compute()
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 48, 3)
    assert np.array_equal(rgb[..., 0], (grey >> 8).astype(np.uint8))
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 0


def test_real_sixteen_bit_lobes_image_has_tissue(shared_data: Path) -> None:
    path = shared_data / "anhir-lobes" / "lung-lobes_1" / "1-he.png"
    rgb = open_slide(path).level(0).compute()
    mask = tissue_mask(rgb, str(path))
    assert 0.3 < mask.mean() < 0.9


def test_read_outside_is_white_and_pickles(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "cmu-1-small-region.svs")
    h, w = slide.level_shape(0)
    region = slide.read(0, h - 10, w - 10, 30, 40)
    assert region.shape == (30, 40, 3)
    assert (region[10:] == 255).all() and (region[:, 10:] == 255).all()
    np.testing.assert_array_equal(region[:10, :10], slide.read(0, h - 10, w - 10, 10, 10))
    assert (slide.read(0, -100, -100, 50, 50) == 255).all()
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read(0, 500, 600, 64, 64), slide.read(0, 500, 600, 64, 64))


def test_level_slicing_reads_only_touched_tiles(tmp_path: Path, monkeypatch) -> None:
    """A window of a large tiled slide decodes only the tiles under it."""
    path = tmp_path / "big.tif"
    side, tile = 8192, 512
    tiles = (np.full((tile, tile, 3), (i * 7) % 256, np.uint8) for i in range((side // tile) ** 2))
    tifffile.imwrite(
        path,
        tiles,
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
    )
    slide = open_slide(path)
    assert slide.backend.startswith("tifffile")
    calls: list[tuple[int, ...]] = []
    backend = slide._backend
    original = backend.read

    def counting(level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        calls.append((y0, x0, h, w))
        return original(level, y0, x0, h, w)

    monkeypatch.setattr(backend, "read", counting)
    window = slide.level(0)[5000:5100, 3000:3100].compute()
    assert window.shape == (100, 100, 3)
    # The window straddles one chunk border: two 1024² chunks read, not the 8192² slide.
    assert sum(h * w for _, _, h, w in calls) == 2 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# CLI: info and convert, good and bad input
# --------------------------------------------------------------------------------------------
def test_info_cli(slides_dir: Path, run_cli) -> None:
    import json

    result = run_cli("info", slides_dir / "cmu-1-small-region.svs")
    assert result.exit_code == 0 and "aperio" in result.stdout and "0.499" in result.stdout
    data = json.loads(run_cli("info", "--json", slides_dir / "tcga-cr-7395-01a-01-ts1.svs").stdout)
    assert data["level_count"] == 2 and data["mpp"] is None
    assert data["levels"][1]["width"] == 2221


@pytest.mark.parametrize("suffix", [".ome.zarr", ".ome.tif"])
def test_convert_round_trip_and_reopen(
    slides_dir: Path, tmp_path: Path, run_cli, suffix: str
) -> None:
    src = slides_dir / "cmu-1-small-region.svs"
    out = tmp_path / f"cmu{suffix}"
    extra = ["--compression", "zlib"] if suffix == ".ome.tif" else []
    result = run_cli("convert", src, out, *extra)
    assert result.exit_code == 0, result.output
    original = open_slide(src).level(0).compute()
    with open_slide(out) as converted:
        assert converted.mpp == pytest.approx((0.499, 0.499))
        assert converted.level_count >= 3
        np.testing.assert_array_equal(converted.level(0).compute(), original)
        assert converted.backend.startswith("ome-zarr" if suffix == ".ome.zarr" else "tifffile")
    # no overwrite without --overwrite, then with it
    assert run_cli("convert", src, out, *extra).exit_code == 1
    assert run_cli("convert", src, out, *extra, "--overwrite").exit_code == 0


def test_one_level_rule(slides_dir: Path, tmp_path: Path, run_cli) -> None:
    assert check_level("s.svs", 1, 2) == 1
    for level in (-1, 2):
        with pytest.raises(SlideError, match=rf"s.svs: no level {level} \(levels 0..1\)"):
            check_level("s.svs", level, 2)
    src = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(src) as slide, pytest.raises(SlideError, match="levels 0..1"):
        slide.level(2)
    result = run_cli("convert", src, tmp_path / "o.ome.zarr", "--level", "2")
    assert result.exit_code == 1
    assert f"{src}: no level 2 (levels 0..1)" in result.stderr
    result = run_cli("convert", src, tmp_path / "o.ome.zarr", "--level", "-1")
    assert result.exit_code == 2 and "--level" in result.stderr  # refused by its range
    assert not (tmp_path / "o.ome.zarr").exists()


def test_convert_a_level_keeps_its_pixels_and_pixel_size(slides_dir: Path, tmp_path: Path) -> None:
    src = slides_dir / "boxes.tiff"
    out = tmp_path / "boxes.tiff"
    assert output_format(out) == "ome-tiff" and output_format(out, "ome-zarr") == "ome-zarr"
    assert output_format(tmp_path / "x.ome.zarr") == "ome-zarr"
    with open_slide(src) as slide:
        assert convert(slide, out, level=1, fmt="ome-zarr") == out
        expected, (mpp_x, mpp_y), ds = (
            slide.level(1).compute(),
            slide.mpp,
            slide.level_downsamples[1],
        )
    with open_slide(out) as converted:
        assert converted.backend == "ome-zarr"
        np.testing.assert_array_equal(converted.level(0).compute(), expected)
        assert converted.mpp == pytest.approx((mpp_x * ds, mpp_y * ds))


BAD = {
    "broken.svs": "not a readable slide",
    "unopenable.tiff": "not a readable slide",
    "unreadable.svs": "cannot read pixels",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_convert_bad_slides_leaves_nothing(
    slides_dir: Path, tmp_path: Path, run_cli, name: str
) -> None:
    out = tmp_path / "out.ome.zarr"
    result = run_cli("convert", slides_dir / name, out)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and name in lines[0] and BAD[name] in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_paths(tmp_path: Path, run_cli) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    zero = tmp_path / "zero.tif"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(zero, np.zeros((0, 4, 3), np.uint8))
    cases = {
        tmp_path / "missing.svs": "no such file",
        tmp_path: "is a directory",
        empty: "empty file",
        zero: "zero size",
    }
    for path, reason in cases.items():
        for verb in (["info"], ["convert"]):
            args = [*verb, path] + ([tmp_path / "o.ome.zarr"] if verb == ["convert"] else [])
            result = run_cli(*args)
            assert result.exit_code == 1, (path, verb)
            assert reason in result.stderr and str(path) in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.ome.zarr").exists()


def test_tile_cache_is_bounded_and_reuses_tiles() -> None:
    from wsireg.io.backends import TileCache

    loads: list[int] = []

    def load(key: int) -> np.ndarray:
        loads.append(key)
        return np.zeros(1000, np.uint8)

    cache = TileCache(capacity=3000)
    for key in (1, 2, 1, 3, 1, 4, 2):
        cache.get(key, load)
    # 1 stays hot; 2 was evicted by 4 (3 tiles fit) and decoded again
    assert loads == [1, 2, 3, 4, 2]
    assert cache._bytes <= 3000
