"""OME-Zarr / OME-TIFF writers (wsireg.io.ngff, wsireg.io.tiff) and the dask pyramid
(wsireg.io.pyramid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from wsireg.errors import OutputExistsError
from wsireg.io.ngff import (
    ZarrLayout,
    create_ome_zarr,
    fill_pyramid,
    read_ome_zarr_levels,
    write_level0,
    write_ome_zarr,
)
from wsireg.io.output import partial_path
from wsireg.io.pyramid import downsample2, downsample2_block, halved_shapes, level_shapes
from wsireg.io.tiff import TiffLayout, write_ome_tiff, write_ome_tiff_levels
from wsireg.progress import set_quiet

set_quiet(True)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255) // w, (y * 255) // h, 128 + 0 * x], axis=-1).astype(np.uint8)


def _levels_yxc(path: Path) -> list[np.ndarray]:
    arrays, _ = read_ome_zarr_levels(path)
    return [np.asarray(a[:]).transpose(1, 2, 0) for a in arrays]


# ---------------------------------------------------------------------------- pyramid.py
def test_downsample2_block_mean_rounds_and_replicates_edges():
    image = np.array([[0, 1, 10], [1, 1, 20], [100, 200, 7]], dtype=np.uint8)[..., None]
    out = downsample2_block(image)[..., 0]
    # (0+1+1+1+2)//4 = 1 ; (10+10+20+20+2)//4 = 15 ; (100+200+100+200+2)//4 = 150 ; 7
    assert out.tolist() == [[1, 15], [150, 7]]
    assert out.dtype == np.uint8
    halves = np.array([[1, 2], [2, 2]], dtype=np.uint8)[..., None]  # 7 / 4 = 1.75 -> 2
    assert downsample2_block(halves)[0, 0, 0] == 2
    floats = np.array([[0.0, 1.0], [1.0, 1.0]], dtype=np.float32)[..., None]
    out = downsample2_block(floats)
    assert out.dtype == np.float32 and out[0, 0, 0] == pytest.approx(0.75)


def test_downsample2_block_nearest_keeps_labels():
    labels = np.arange(35, dtype=np.uint16).reshape(5, 7, 1)
    out = downsample2_block(labels, "nearest")
    assert out.shape == (3, 4, 1)
    np.testing.assert_array_equal(out, labels[::2, ::2])
    with pytest.raises(ValueError):
        downsample2_block(labels, "median")


@pytest.mark.parametrize("method", ["mean", "nearest"])
def test_downsample2_dask_matches_numpy_with_any_chunks(method):
    image = _image(101, 77)
    expected = downsample2_block(image, method)
    for chunks in [(32, 32, 3), (33, 17, 3), (101, 77, 3), (20, 78, 1)]:
        lazy = downsample2(da.from_array(image, chunks=chunks), method)
        assert lazy.shape == (51, 39, 3)
        np.testing.assert_array_equal(lazy.compute(), expected)
    aligned = downsample2(da.from_array(image, chunks=(64, 64, 3)), method)
    assert aligned.chunks[:2] == ((32, 19), (32, 7))
    gray = image[..., 0].astype(np.float32)  # 2-D arrays (registration pyramid) work too
    np.testing.assert_array_equal(
        downsample2(da.from_array(gray, chunks=30), method).compute(),
        downsample2_block(gray, method),
    )


def test_level_shapes():
    assert level_shapes((100, 50), chunk=1024) == [(100, 50)]
    assert level_shapes((3000, 1000), chunk=1024) == [
        (3000, 1000),
        (1500, 500),
        (750, 250),
        (375, 125),
    ]
    assert level_shapes((513, 2), chunk=1024, min_size=512) == [(513, 2), (257, 1)]
    assert level_shapes((300, 300), chunk=64)[-1] == (38, 38)
    shapes = level_shapes((100_000, 100_000), chunk=1024)
    assert len(shapes) == 9 and max(shapes[-1]) <= 512
    assert halved_shapes((5, 3), 10) == [(5, 3), (3, 2), (2, 1), (1, 1)]


# ---------------------------------------------------------------------------- OME-Zarr
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_round_trip_odd_size(tmp_path, version):
    image = _image(301, 517)
    lazy = da.from_array(image, chunks=(100, 90, 3))  # not on the chunk grid: rechunked
    out = write_ome_zarr(
        lazy,
        tmp_path / "a.ome.zarr",
        layout=ZarrLayout(chunk=64, ngff_version=version),
        mpp=(0.25, 0.5),
        name="slide",
    )
    assert out == tmp_path / "a.ome.zarr"
    levels = _levels_yxc(out)
    assert [lv.shape[:2] for lv in levels] == level_shapes((301, 517), chunk=64)
    np.testing.assert_array_equal(levels[0], image)
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(levels[k], downsample2_block(levels[k - 1]))

    arrays, meta = read_ome_zarr_levels(out)
    assert [a.chunks for a in arrays][:2] == [(1, 64, 64)] * 2
    assert arrays[-1].chunks == (1, *arrays[-1].shape[1:])
    assert meta["version"] == version and meta["name"] == "slide"
    assert meta["scale_um"] == pytest.approx((0.25, 0.5))
    assert meta["scales"][2] == pytest.approx([1.0, 2.0, 1.0])
    assert [a["name"] for a in meta["axes"]] == ["c", "y", "x"]
    assert arrays[0].metadata.zarr_format == (2 if version == "0.4" else 3)
    assert not partial_path(out).exists()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_metadata_validates_and_ome_zarr_py_reads(tmp_path, version):
    import ome_zarr_models
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image as Image04
    from ome_zarr_models.v05 import Image as Image05

    image = _image(200, 130)
    path = write_ome_zarr(
        image,
        tmp_path / "v.ome.zarr",
        layout=ZarrLayout(chunk=64, ngff_version=version),
        mpp=(0.5, 0.5),
    )
    group = zarr.open_group(str(path), mode="r")
    model = (Image04 if version == "0.4" else Image05).from_zarr(group)
    assert isinstance(ome_zarr_models.open_ome_zarr(group), type(model))

    nodes = list(Reader(parse_url(str(path)))())
    assert [tuple(d.shape) for d in nodes[0].data] == [(3, 200, 130), (3, 100, 65), (3, 50, 33)]
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), image.transpose(2, 0, 1))


def test_metadata_content(tmp_path):
    path = write_ome_zarr(
        _image(130, 70), tmp_path / "m.ome.zarr", layout=ZarrLayout(chunk=64), mpp=(0.25, 0.5)
    )
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    (multiscale,) = attrs["multiscales"]
    assert multiscale["version"] == "0.4" and multiscale["type"] == "mean"
    assert multiscale["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    scales = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert scales == [
        [{"type": "scale", "scale": [1.0, 0.5 * 2**k, 0.25 * 2**k]}] for k in range(3)
    ]
    omero = attrs["omero"]
    assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert [c["label"] for c in omero["channels"]] == ["red", "green", "blue"]
    assert omero["channels"][0]["window"] == {"min": 0.0, "max": 255.0, "start": 0.0, "end": 255.0}
    assert omero["rdefs"]["model"] == "color"

    bare = write_ome_zarr(
        _image(130, 70), tmp_path / "p.ome.zarr", layout=ZarrLayout(chunk=64, ngff_version="0.5")
    )
    ome = zarr.open_group(str(bare), mode="r").attrs["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    assert all("unit" not in a for a in ome["multiscales"][0]["axes"])
    assert ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] == [
        1.0,
        2.0,
        2.0,
    ]
    assert read_ome_zarr_levels(bare)[1]["scale_um"] is None


def test_small_image_single_level_and_levels_option(tmp_path):
    small = write_ome_zarr(_image(40, 30), tmp_path / "s.ome.zarr", layout=ZarrLayout(chunk=64))
    arrays, meta = read_ome_zarr_levels(small)
    assert len(arrays) == 1 and arrays[0].chunks == (1, 40, 30)
    two = write_ome_zarr(
        _image(300, 300), tmp_path / "t.ome.zarr", layout=ZarrLayout(chunk=64, levels=2)
    )
    assert [a.shape for a in read_ome_zarr_levels(two)[0]] == [(3, 300, 300), (3, 150, 150)]
    one_px = write_ome_zarr(_image(3, 2), tmp_path / "u.ome.zarr", layout=ZarrLayout(levels=5))
    assert [a.shape[1:] for a in read_ome_zarr_levels(one_px)[0]] == [(3, 2), (2, 1), (1, 1)]


def test_label_mask_nearest(tmp_path):
    mask = (np.arange(90 * 70).reshape(90, 70, 1) % 7).astype(np.uint8)
    path = write_ome_zarr(
        mask, tmp_path / "mask.ome.zarr", layout=ZarrLayout(chunk=32), downsample_method="nearest"
    )
    levels = _levels_yxc(path)
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(levels[k], levels[k - 1][::2, ::2])
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    assert "omero" not in attrs and attrs["multiscales"][0]["type"] == "nearest"


def test_create_write_build_pieces(tmp_path):
    """The warp engine's path: create, write level 0 itself, then build the pyramid."""
    image = _image(150, 200)
    group = create_ome_zarr(
        tmp_path / "w.ome.zarr",
        (150, 200),
        3,
        np.uint8,
        layout=ZarrLayout(chunk=64, levels=None, ngff_version="0.5", compressor=None),
        mpp=None,
        name=None,
    )
    level0 = group["0"]
    assert level0.shape == (3, 150, 200) and level0.chunks == (1, 64, 64)
    np.testing.assert_array_equal(level0[:], 255)  # unwritten RGB reads as white
    for y in range(0, 150, 64):
        level0[:, y : y + 64] = image[y : y + 64].transpose(2, 0, 1)
    fill_pyramid(group)
    levels = _levels_yxc(tmp_path / "w.ome.zarr")
    np.testing.assert_array_equal(levels[1], downsample2_block(image))
    with pytest.raises(ValueError):
        write_level0(group, _image(10, 10))
    with pytest.raises(Exception):  # noqa: B017 - zarr's own "exists" error
        create_ome_zarr(
            tmp_path / "w.ome.zarr",
            (10, 10),
            3,
            np.uint8,
            layout=ZarrLayout(chunk=64, levels=None, ngff_version="0.4", compressor=None),
            mpp=None,
            name=None,
        )


def test_read_bioformats2raw_layout(tmp_path):
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(
        _image(100, 80), tmp_path / "b2r.zarr" / "0", layout=ZarrLayout(chunk=32), mpp=(0.5, 0.5)
    )
    arrays, meta = read_ome_zarr_levels(tmp_path / "b2r.zarr")
    assert arrays[0].shape == (3, 100, 80) and meta["scale_um"] == (0.5, 0.5)
    with pytest.raises(ValueError, match="not a zarr group"):
        read_ome_zarr_levels(tmp_path / "b2r.zarr" / "0" / "1")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(ValueError, match="no OME-Zarr multiscales"):
        read_ome_zarr_levels(tmp_path / "plain.zarr")


def test_custom_compressor_both_versions(tmp_path):
    from numcodecs import Zstd

    image = _image(70, 70)
    for version in ("0.4", "0.5"):
        path = write_ome_zarr(
            image,
            tmp_path / f"z{version}.ome.zarr",
            layout=ZarrLayout(chunk=32, compressor=Zstd(level=1), ngff_version=version),
        )
        np.testing.assert_array_equal(_levels_yxc(path)[0], image)


# ---------------------------------------------------------------------------- staging
def test_failure_leaves_no_output(tmp_path):
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"][:2] == (1, 1):
            raise RuntimeError("reader failed")
        return block

    image = da.from_array(_image(200, 200), chunks=(64, 64, 3)).map_blocks(boom, dtype=np.uint8)
    target = tmp_path / "f.ome.zarr"
    with pytest.raises(RuntimeError, match="reader failed"):
        write_ome_zarr(image, target, layout=ZarrLayout(chunk=64))
    assert not target.exists() and not partial_path(target).exists()

    write_ome_zarr(_image(60, 60), target)  # a failed overwrite keeps the old output
    with pytest.raises(RuntimeError, match="reader failed"):
        write_ome_zarr(image, target, layout=ZarrLayout(chunk=64), overwrite=True)
    np.testing.assert_array_equal(_levels_yxc(target)[0], _image(60, 60))
    assert not partial_path(target).exists()


def test_existing_output_needs_overwrite(tmp_path):
    target = write_ome_zarr(_image(50, 50, seed=1), tmp_path / "e.ome.zarr")
    with pytest.raises(OutputExistsError):
        write_ome_zarr(_image(50, 50, seed=2), target)
    np.testing.assert_array_equal(_levels_yxc(target)[0], _image(50, 50, seed=1))
    write_ome_zarr(_image(50, 50, seed=2), target, overwrite=True)
    np.testing.assert_array_equal(_levels_yxc(target)[0], _image(50, 50, seed=2))

    tiff = write_ome_tiff(
        _image(50, 50), tmp_path / "e.ome.tif", layout=TiffLayout(compression="zlib")
    )
    with pytest.raises(OutputExistsError):
        write_ome_tiff(_image(50, 50), tiff)
    assert write_ome_tiff(_image(60, 50), tiff, overwrite=True) == tiff
    assert tifffile.imread(tiff).shape == (60, 50, 3)


# ---------------------------------------------------------------------------- OME-TIFF
@pytest.mark.parametrize("compression", ["zlib", "zstd", "none"])
def test_ome_tiff_lossless_round_trip(tmp_path, compression):
    image = _image(301, 517)
    path = write_ome_tiff(
        da.from_array(image, chunks=(100, 100, 3)),
        tmp_path / "a.ome.tif",
        layout=TiffLayout(tile=64, compression=compression),
        mpp=(0.25, 0.5),
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lv.shape[:2] for lv in series.levels] == level_shapes((301, 517), chunk=64)
        assert series.pages[0].is_tiled and series.pages[0].tilewidth == 64
        assert len(series.pages[0].subifds) == len(series.levels) - 1
        previous = image
        for k, level in enumerate(series.levels):
            pixels = level.asarray()
            expected = image if k == 0 else downsample2_block(previous)
            np.testing.assert_array_equal(pixels, expected)
            previous = pixels
        xml = tif.ome_metadata
    assert 'PhysicalSizeX="0.25"' in xml and 'PhysicalSizeY="0.5"' in xml
    assert not list(tmp_path.glob(".*"))  # no staging or temporary leftovers


def test_ome_tiff_from_existing_ome_zarr(tmp_path):
    image = _image(200, 150)
    zarr_path = write_ome_zarr(image, tmp_path / "w.ome.zarr", layout=ZarrLayout(chunk=64))
    arrays, _ = read_ome_zarr_levels(zarr_path)
    tiff = write_ome_tiff_levels(
        arrays, tmp_path / "w.ome.tif", layout=TiffLayout(tile=32, compression="zlib")
    )
    with tifffile.TiffFile(tiff) as tif:
        pixels = [level.asarray() for level in tif.series[0].levels]
    assert len(pixels) == len(arrays)
    for level, array in zip(pixels, arrays, strict=True):
        np.testing.assert_array_equal(level, np.asarray(array[:]).transpose(1, 2, 0))


def test_ome_tiff_jpeg_is_close(tmp_path):
    image = _smooth(300, 400)
    path = write_ome_tiff(image, tmp_path / "j.ome.tif", layout=TiffLayout(tile=128, quality=90))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 7  # JPEG
        levels = [level.asarray() for level in tif.series[0].levels]
    assert len(levels) == 3  # 300 x 400 -> 150 x 200 -> 75 x 100 (top fits a 128 tile)
    assert np.abs(levels[0].astype(int) - image).mean() < 2
    assert np.abs(levels[1].astype(int) - downsample2_block(image)).mean() < 2


def test_ome_tiff_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError):
        write_ome_tiff(
            _image(20, 20), tmp_path / "x.ome.tif", layout=TiffLayout(compression="lzma")
        )
    with pytest.raises(ValueError):
        write_ome_tiff(_image(20, 20), tmp_path / "x.ome.tif", layout=TiffLayout(tile=100))
    with pytest.raises(ValueError):
        write_ome_tiff(_image(20, 20)[..., :1], tmp_path / "x.ome.tif")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- memory
_BOUNDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import dask.array as da, numpy as np
    from wsireg.io.ngff import write_ome_zarr
    from wsireg.progress import set_quiet
    from wsireg.engine.parallel import peak_rss_mib

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        y = np.arange(y0, y1, dtype=np.uint16)[:, None]
        x = np.arange(x0, x1, dtype=np.uint16)[None, :]
        tissue = (x // 700 + y // 900) % 3 == 0
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for c in range(3):
            out[..., c] = np.where(tissue, 150 + ((x + 2 * y + 40 * c) & 63), 255)
        return out

    set_quiet(True)
    n = int(sys.argv[1])
    image = da.map_blocks(block, chunks=((1024,) * (n // 1024),) * 2 + ((3,),), dtype=np.uint8)
    write_ome_zarr(image, sys.argv[2])
    peak = peak_rss_mib()  # VmHWM: ru_maxrss would count the parent's memory at exec
    print(json.dumps({"peak_mib": peak, "array_mib": image.nbytes / 2**20}))
    """
)


def test_bounded_memory_16k(tmp_path):
    """A 16k x 16k RGB image (768 MiB) is written with a small, size-independent footprint."""
    out = tmp_path / "big.ome.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED_SCRIPT, "16384", str(out)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=300,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["array_mib"] == 768
    assert result["peak_mib"] < 400, result
    arrays, _ = read_ome_zarr_levels(out)
    assert arrays[0].shape == (3, 16384, 16384) and arrays[-1].shape[1:] == (512, 512)
    np.testing.assert_array_equal(arrays[0][:, :4, 700:702], 255)
