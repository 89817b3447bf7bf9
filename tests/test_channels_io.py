"""Fluorescence and label images through the OME-Zarr and OME-TIFF writers (wsireg.io.ngff,
wsireg.io.tiff) with a wsireg.io.channels.Channels description."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsireg.io.channels import Channels, color_from_ome, fluorescence, labels
from wsireg.io.ngff import (
    ZarrLayout,
    create_ome_zarr,
    read_ome_zarr_levels,
    write_ome_zarr,
)
from wsireg.io.pyramid import downsample2_block, level_shapes
from wsireg.io.tiff import TiffLayout, write_ome_tiff, write_ome_tiff_levels
from wsireg.progress import set_quiet

set_quiet(True)

NAMES = ("DAPI", "CD3", "CD8", "PanCK", "FOXP3")
COLORS = ("0000FF", "00FF00", "FF0000", "FFFF00", "FF00FF")
PANEL = fluorescence(5, np.dtype(np.uint16), NAMES, COLORS)
SHAPE = (200, 150)  # with 64 px chunks / tiles: 3 levels


def _fluorescence(h: int = SHAPE[0], w: int = SHAPE[1], dtype: type = np.uint16) -> np.ndarray:
    """``(h, w, 5)``: smooth waves of a different frequency and brightness per channel, plus a
    little noise, scaled to the dtype (0 .. 1 for floats)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    noise = np.random.default_rng(0).random((h, w, 5))
    planes = [
        (0.5 + 0.5 * np.sin(x / (7 + 3 * c) + y / (11 + c))) * (0.2 + 0.15 * c)
        + 0.02 * noise[..., c]
        for c in range(5)
    ]
    unit = np.clip(np.stack(planes, axis=-1), 0.0, 1.0)
    if np.issubdtype(dtype, np.floating):
        return unit.astype(dtype)
    return np.round(unit * np.iinfo(dtype).max).astype(dtype)


def _labels(dtype: type, h: int = 180, w: int = 130) -> np.ndarray:
    """``(h, w, 1)``: rectangular cells on a 0 background, ids near the top of the dtype."""
    y, x = np.mgrid[0:h, 0:w]
    ids = (y // 23) * 7 + (x // 19) + 1
    cells = ((y % 23) > 2) & ((x % 19) > 2)
    top = np.iinfo(dtype).max
    return np.where(cells, top - ids, 0).astype(dtype)[..., None]


def _zarr_levels(path: Path) -> list[np.ndarray]:
    arrays, _ = read_ome_zarr_levels(path)
    return [np.asarray(a[:]) for a in arrays]


def _omero(path: Path) -> dict:
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs).get("omero")


# ---------------------------------------------------------------------------- OME-Zarr
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_fluorescence_ome_zarr_round_trip_and_metadata(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image as Image04
    from ome_zarr_models.v05 import Image as Image05

    image = _fluorescence()
    path = write_ome_zarr(
        image,
        tmp_path / "f.ome.zarr",
        layout=ZarrLayout(chunk=64, ngff_version=version),
        mpp=(0.5, 0.5),
        channel_info=PANEL,
    )
    levels = _zarr_levels(path)
    assert [lv.shape[1:] for lv in levels] == level_shapes(SHAPE, chunk=64)
    assert all(lv.dtype == np.uint16 for lv in levels)
    np.testing.assert_array_equal(levels[0], image.transpose(2, 0, 1))
    for k in range(1, len(levels)):  # "mean" keeps uint16, rounding half up
        np.testing.assert_array_equal(levels[k], downsample2_block(levels[k - 1], axes=(1, 2)))

    omero = _omero(path)
    assert [c["label"] for c in omero["channels"]] == list(NAMES)
    assert [c["color"] for c in omero["channels"]] == list(COLORS)
    for channel, plane in zip(omero["channels"], levels[-1], strict=True):
        window = channel["window"]
        assert (window["min"], window["max"]) == (0.0, 65535.0)
        assert 0 <= window["start"] < window["end"] <= 65535
        low, high = np.percentile(plane, (0.1, 99.9))
        assert window["start"] == np.floor(low) and window["end"] == np.ceil(high)
        assert channel["family"] == "linear" and channel["active"] and not channel["inverted"]
    assert omero["rdefs"]["model"] == "color"

    group = zarr.open_group(str(path), mode="r")
    (Image04 if version == "0.4" else Image05).from_zarr(group)
    (node,) = list(Reader(parse_url(str(path)))())[:1]
    assert [tuple(d.shape) for d in node.data] == [lv.shape for lv in levels]
    np.testing.assert_array_equal(np.asarray(node.data[0]), levels[0])
    assert node.metadata["channel_names"] == list(NAMES)


def test_float_fluorescence_keeps_dtype_and_gets_windows(tmp_path):
    image = _fluorescence(70, 90, np.float32)
    channels = fluorescence(5, np.dtype(np.float32), NAMES)
    path = write_ome_zarr(
        image, tmp_path / "f32.ome.zarr", layout=ZarrLayout(chunk=32), channel_info=channels
    )
    levels = _zarr_levels(path)
    assert all(lv.dtype == np.float32 for lv in levels) and len(levels) == 3
    np.testing.assert_array_equal(levels[0], image.transpose(2, 0, 1))
    for channel in _omero(path)["channels"]:
        window = channel["window"]
        assert window["min"] <= window["start"] < window["end"] <= window["max"]
        assert (window["min"], window["max"]) == (0.0, 1.0)


def test_display_window_of_constant_channels_is_not_empty(tmp_path):
    image = np.zeros((40, 40, 3), np.uint16)
    image[..., 1] = 65535
    image[..., 2] = 300
    path = write_ome_zarr(
        image,
        tmp_path / "c.ome.zarr",
        layout=ZarrLayout(chunk=16),
        channel_info=fluorescence(3, np.dtype(np.uint16)),
    )
    windows = [(c["window"]["start"], c["window"]["end"]) for c in _omero(path)["channels"]]
    assert windows == [(0.0, 1.0), (65534.0, 65535.0), (300.0, 301.0)]


def test_default_channels_and_checks(tmp_path):
    four = np.ones((40, 40, 4), np.uint16)
    path = write_ome_zarr(four, tmp_path / "d.ome.zarr")
    assert [c["label"] for c in _omero(path)["channels"]] == [f"channel {i}" for i in range(4)]
    with pytest.raises(ValueError, match="channel_info"):
        create_ome_zarr(tmp_path / "n.ome.zarr", (40, 40), 4, np.uint16, channel_info=PANEL)
    with pytest.raises(ValueError, match="channel_info"):
        create_ome_zarr(tmp_path / "n.ome.zarr", (40, 40), 5, np.uint8, channel_info=PANEL)
    with pytest.raises(ValueError, match="channel_info"):
        write_ome_tiff(four, tmp_path / "n.ome.tif", channel_info=PANEL)


# ---------------------------------------------------------------------------- OME-TIFF
def _check_tiff(path: Path, expected: list[np.ndarray], channels: Channels) -> None:
    """Series 0 is ``(C, H, W)`` with every level of ``expected`` (``(C, H_k, W_k)``) exactly,
    and the OME-XML names and colours the channels in order."""
    import ome_types

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        squeezed = 0 if channels.count > 1 else 1  # tifffile drops an axis C of 1
        assert series.axes == "CYX"[squeezed:]
        assert series.shape == expected[0].shape[squeezed:]
        assert series.dtype == channels.dtype
        assert len(series.levels) == len(expected)
        assert len(series.pages[0].subifds) == len(expected) - 1
        for level, want in zip(series.levels, expected, strict=True):
            np.testing.assert_array_equal(level.asarray().reshape(want.shape), want)
        xml = tif.ome_metadata
    ome = ome_types.from_xml(xml, validate=True)
    found = ome.images[0].pixels.channels
    assert [c.name for c in found] == list(channels.names)
    assert [color_from_ome(str(c.color.as_int32())) for c in found] == list(channels.colors)


@pytest.mark.parametrize("source", ["image", "zarr"])
def test_fluorescence_ome_tiff(tmp_path, source):
    image = _fluorescence()
    layout = TiffLayout(tile=64, compression="zlib")
    if source == "image":
        path = write_ome_tiff(
            image, tmp_path / "f.ome.tif", layout=layout, mpp=(0.5, 0.5), channel_info=PANEL
        )
        expected = [image.transpose(2, 0, 1)]
        for _ in level_shapes(SHAPE, chunk=64)[1:]:
            expected.append(downsample2_block(expected[-1], axes=(1, 2)))
    else:
        zarr_path = write_ome_zarr(
            image, tmp_path / "f.ome.zarr", layout=ZarrLayout(chunk=48), channel_info=PANEL
        )
        arrays, _ = read_ome_zarr_levels(zarr_path)
        path = write_ome_tiff_levels(
            arrays, tmp_path / "f.ome.tif", layout=layout, channel_info=PANEL
        )
        expected = [np.asarray(a[:]) for a in arrays]
    _check_tiff(path, expected, PANEL)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 64


# ---------------------------------------------------------------------------- labels
@pytest.mark.parametrize("dtype", [np.uint32, np.uint8])
def test_labels_keep_their_values(tmp_path, dtype):
    mask = _labels(dtype)
    channels = labels(np.dtype(dtype), "cells")
    values = set(np.unique(mask).tolist())

    zarr_path = write_ome_zarr(
        mask, tmp_path / "m.ome.zarr", layout=ZarrLayout(chunk=32), channel_info=channels
    )
    levels = _zarr_levels(zarr_path)
    assert len(levels) > 2 and _omero(zarr_path) is None
    np.testing.assert_array_equal(levels[0], mask.transpose(2, 0, 1))
    for level in levels:
        assert level.dtype == dtype and set(np.unique(level).tolist()) <= values
    attrs = zarr.open_group(str(zarr_path), mode="r").attrs.asdict()
    assert attrs["multiscales"][0]["type"] == "nearest"

    tiff = write_ome_tiff(
        mask,
        tmp_path / "m.ome.tif",
        layout=TiffLayout(tile=32, compression="zlib"),
        channel_info=channels,
    )
    with tifffile.TiffFile(tiff) as tif:
        tiff_levels = [level.asarray() for level in tif.series[0].levels]
    np.testing.assert_array_equal(tiff_levels[0], mask[..., 0])
    assert len(tiff_levels) == len(level_shapes(mask.shape[:2], chunk=32))
    for level in tiff_levels:
        assert level.dtype == dtype and set(np.unique(level).tolist()) <= values
    _check_tiff(tiff, [lv[None] for lv in tiff_levels], channels)


def test_jpeg_only_for_brightfield(tmp_path):
    jpeg = TiffLayout(compression="jpeg")
    with pytest.raises(ValueError, match="JPEG is lossy and 8-bit"):
        write_ome_tiff(_fluorescence(40, 40), tmp_path / "j.ome.tif", channel_info=PANEL)
    with pytest.raises(ValueError, match="JPEG is lossy and 8-bit"):
        write_ome_tiff(
            _labels(np.uint8), tmp_path / "j.ome.tif", layout=jpeg, channel_info=labels(np.uint8)
        )
    zarr_path = write_ome_zarr(_fluorescence(40, 40), tmp_path / "f.ome.zarr", channel_info=PANEL)
    arrays, _ = read_ome_zarr_levels(zarr_path)
    with pytest.raises(ValueError, match="JPEG is lossy and 8-bit"):
        write_ome_tiff_levels(arrays, tmp_path / "j.ome.tif", layout=jpeg, channel_info=PANEL)
    assert not list(tmp_path.glob("*.tif")) and not list(tmp_path.glob(".*"))
