"""Fluorescence, multiplexed and label slides: read as stored, registered on a chosen channel,
every channel warped at its dtype with its name, merged; bad channels named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ome_types
import pytest
import tifffile
import zarr
from ome_zarr_models.v04 import Image as Image04
from scipy import ndimage

import wsireg
from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.warp import warp
from wsireg.io.channels import RGB, classify, fluorescence
from wsireg.io.merge import merge
from wsireg.io.slide import open_slide
from wsireg.io.tiff import TiffLayout, write_ome_tiff
from wsireg.run.register import register, registration_channels
from wsireg.run.settings import RegisterOptions
from wsireg.synthetic.slides import (
    pair_landmarks,
    synthetic_pair,
    write_synthetic_fluorescence,
    write_synthetic_slide,
)

from .test_hostile_inputs import nothing_at, one_line_error
from .test_transform import rotation, smooth_field

NAMES = ("CD3", "DAPI", "CD8", "PanCK", "FOXP3")
SHAPE = (600, 800)


def panel(shape: tuple[int, int] = SHAPE, count: int = 5) -> np.ndarray:
    """Smooth uint16 channels ``(H, W, count)`` with a small signal range, as 16-bit
    fluorescence has."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    channels = [
        300 + 150 * k + 900 * (1 + np.sin(x / (23.0 + 4 * k) + k) * np.cos(y / (31.0 + 3 * k)))
        for k in range(count)
    ]
    return np.rint(np.stack(channels, -1)).astype(np.uint16)


@pytest.fixture(scope="module")
def if_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A tiled pyramidal 5-channel uint16 OME-TIFF with channel names."""
    path = tmp_path_factory.mktemp("if") / "panel.ome.tif"
    data = panel()
    info = fluorescence(len(NAMES), np.dtype(np.uint16), NAMES)
    layout = TiffLayout(tile=256, compression="zlib")
    write_ome_tiff(data, path, layout=layout, mpp=(0.5, 0.5), channel_info=info)
    return path, data


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def test_a_user_ome_tiff_reads_with_every_channel_and_its_dtype(tmp_path: Path, run_cli) -> None:
    """The issue's case: tifffile.imwrite(..., ome=True) of 5 uint16 channels with names."""
    data = panel()
    path = tmp_path / "user.ome.tif"
    tifffile.imwrite(
        path,
        np.moveaxis(data, -1, 0),
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": list(NAMES)}},
    )
    slide = open_slide(path)
    assert slide.channels.kind == "fluorescence"
    assert slide.channels.dtype == np.uint16 and slide.channels.names == NAMES
    assert np.array_equal(slide.read_channels(0, 0, 0, *SHAPE), data)
    assert np.array_equal(
        slide.read_channels(0, 10, 20, 5, 7, [3, 1]), data[10:15, 20:27][..., [3, 1]]
    )
    outside = slide.read_channels(0, -4, -4, 8, 8)
    assert (outside[:4] == 0).all() and np.array_equal(outside[4:, 4:], data[:4, :4])
    assert slide.shown == "DAPI"  # the nuclear channel, wherever it is
    shown = run_cli("info", path)
    assert shown.exit_code == 0
    assert "fluorescence, uint16, 5 channels" in shown.output
    for name in NAMES:
        assert name in shown.output
    as_json = json.loads(run_cli("info", path, "--json").output)
    assert [c["name"] for c in as_json["pixels"]["channels"]] == list(NAMES)


def test_classification_of_samples() -> None:
    grey = np.full((8, 8, 1), 230, np.uint8)
    assert classify(np.uint8, 3, np.zeros((8, 8, 3), np.uint8), interleaved_rgb=True) == RGB
    assert classify(np.float32, 3, np.zeros((8, 8, 3)), interleaved_rgb=True) == RGB
    assert classify(np.uint8, 3, np.zeros((8, 8, 3), np.uint8)) == RGB  # format silent, unnamed
    named = classify(np.uint8, 3, np.zeros((8, 8, 3), np.uint8), ["DAPI", "CD3", "CD8"])
    assert named.kind == "fluorescence" and named.names == ("DAPI", "CD3", "CD8")
    assert classify(np.uint32, 1, np.arange(40, dtype=np.uint32).reshape(5, 8, 1)).kind == "labels"
    rng = np.random.default_rng(0)
    nuclei = rng.integers(90, 110, (64, 64, 1)).astype(np.uint16)  # dark background
    nuclei[rng.random((64, 64)) < 0.2] = rng.integers(1000, 4000, 1)[0]
    nuclei[:8] += np.arange(512, dtype=np.uint16).reshape(8, 64, 1)  # many distinct values
    assert classify(np.uint16, 1, nuclei).kind == "fluorescence"
    scan = 65535 - nuclei * 8  # 16-bit grey brightfield: bright glass, darker tissue
    assert classify(np.uint16, 1, scan) == RGB
    grey = np.random.default_rng(0).integers(150, 256, (64, 64, 1), dtype=np.uint8)
    assert classify(np.uint8, 1, grey) == RGB  # bright glass: a grey brightfield scan


# --------------------------------------------------------------------------------------------
# Warping every channel
# --------------------------------------------------------------------------------------------
def reference_warp(data: np.ndarray, transform: Transform, order: int) -> np.ndarray:
    """An in-memory warp of ``data`` (``(H, W, C)``) through ``transform`` with scipy."""
    h, w = data.shape[:2]
    coords = transform.source_coordinates(0, 0, h, w, 1.0)  # (h, w, 2) source (x, y)
    out = np.stack(
        [
            ndimage.map_coordinates(
                data[..., c].astype(np.float64), [coords[..., 1], coords[..., 0]], order=order,
                mode="constant", cval=0.0,
            )
            for c in range(data.shape[2])
        ],
        -1,
    )  # fmt: skip
    return out


def moved(ref: SlideRef) -> Transform:
    affine = rotation(7.0, (400, 300), shift=(12.5, -8.25))
    field = smooth_field((38, 50), 16.0, amplitude=6.0)
    return Transform.from_field(affine, field, 16.0, ref, ref)


def test_every_channel_is_warped_at_its_dtype_with_its_name(if_slide, tmp_path: Path) -> None:
    path, data = if_slide
    slide = open_slide(path)
    transform = moved(SlideRef.from_slide(slide))
    out = warp(transform, slide, tmp_path / "w.ome.zarr", chunk=256)
    level0 = zarr.open_group(str(out), mode="r")["0"]
    assert level0.shape == (5, *SHAPE) and level0.dtype == np.uint16
    got = np.moveaxis(level0[:], 0, -1).astype(np.float64)
    expected = reference_warp(data, transform, order=1)
    on_source = reference_warp(np.ones((*SHAPE, 1)), transform, 0)[..., 0] > 0.5
    inside = ndimage.binary_erosion(on_source, iterations=3)
    difference = np.abs(got - expected)[inside]
    assert difference.mean() < 1.0 and difference.max() <= 12, (difference.mean(), difference.max())
    assert (got[~ndimage.binary_dilation(on_source, iterations=2)] == 0).all()  # background 0
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    Image04.from_zarr(zarr.open_group(str(out), mode="r"))  # validates NGFF 0.4
    assert [c["label"] for c in attrs["omero"]["channels"]] == list(NAMES)
    for channel in attrs["omero"]["channels"]:
        window = channel["window"]
        assert 0 <= window["start"] < window["end"] <= 65535


def test_a_channel_subset_to_ome_tiff_keeps_names_and_is_lossless(
    if_slide, tmp_path: Path, run_cli
) -> None:
    path, data = if_slide
    slide = open_slide(path)
    ref = SlideRef.from_slide(slide)
    shift = np.array([[1.0, 0, 7], [0, 1.0, -5], [0, 0, 1]])  # integer: pixels move exactly
    transform_dir = Transform.from_affine(shift, ref, ref).save(tmp_path / "t")
    out = tmp_path / "sub.ome.tif"
    result = run_cli("-q", "warp", transform_dir, path, "-o", out, "--channels", "CD8,DAPI")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.shape == (2, *SHAPE) and series.dtype == np.uint16
        assert tif.pages[0].compression != tifffile.COMPRESSION.JPEG
        ome = ome_types.from_xml(tif.ome_metadata, validate=True)
        pixels = series.asarray()
    assert [c.name for c in ome.images[0].pixels.channels] == ["CD8", "DAPI"]
    # target (x, y) shows source (x + 7, y - 5)
    assert np.array_equal(pixels[0, 5:, : 800 - 7], data[: 600 - 5, 7:, 2])
    assert np.array_equal(pixels[1, 5:, : 800 - 7], data[: 600 - 5, 7:, 1])
    assert (pixels[:, :5] == 0).all()


def test_a_label_image_keeps_its_values_exactly(tmp_path: Path, run_cli) -> None:
    labels = np.zeros(SHAPE, np.uint32)
    labels[50:200, 60:300] = 3
    labels[250:500, 100:160] = 70000
    labels[300:420, 500:760] = 12
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, labels, tile=(128, 128))
    slide = open_slide(path)
    assert slide.channels.kind == "labels" and slide.channels.dtype == np.uint32
    transform = moved(SlideRef.from_slide(slide))
    transform_dir = transform.save(tmp_path / "t")
    linear = tmp_path / "linear.ome.tif"
    one_line_error(run_cli("warp", transform_dir, path, "-o", linear), "mask.tif", "nearest")
    nothing_at(linear)
    out = tmp_path / "mask-warped.ome.tif"
    result = run_cli("-q", "warp", transform_dir, path, "-o", out, "--interpolation", "nearest")
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out) as tif:
        warped = tif.series[0].asarray()
        assert tif.pages[0].compression != tifffile.COMPRESSION.JPEG
        levels = [level.asarray() for level in tif.series[0].levels]
    assert warped.dtype == np.uint32 and warped.shape == SHAPE
    assert set(np.unique(warped)) == {0, 3, 12, 70000}
    for level in levels:
        assert set(np.unique(level)) <= {0, 3, 12, 70000}
    expected = reference_warp(labels[..., None].astype(np.float64), transform, order=0)[..., 0]
    assert (warped == expected).mean() > 0.999  # rounding ties aside, the same pixels


# --------------------------------------------------------------------------------------------
# Registration on a channel
# --------------------------------------------------------------------------------------------
def test_default_registration_channels() -> None:
    dapi = fluorescence(2, np.dtype(np.uint16), ["CD3", "DAPI"])
    assert registration_channels(RGB, RGB, RegisterOptions()) == (None, None)
    assert registration_channels(RGB, dapi, RegisterOptions()) == ("haematoxylin", None)
    assert registration_channels(dapi, RGB, RegisterOptions()) == (None, "haematoxylin")
    chosen = RegisterOptions(source_channel="CD3", target_channel=1)
    assert registration_channels(dapi, dapi, chosen) == ("CD3", 1)


def test_bad_channels_are_one_line_errors(if_slide, tmp_path: Path, run_cli) -> None:
    path, _ = if_slide
    out = tmp_path / "out"
    line = one_line_error(
        run_cli("register", path, path, "-o", out, "--source-channel", "CD99"), "panel.ome.tif"
    )
    assert "CD99" in line and "0 CD3, 1 DAPI, 2 CD8, 3 PanCK, 4 FOXP3" in line
    nothing_at(out)
    line = one_line_error(
        run_cli("register", path, path, "-o", out, "--channel", "haematoxylin"), "panel.ome.tif"
    )
    assert "brightfield" in line
    nothing_at(out)
    converted = tmp_path / "c.ome.tif"
    line = one_line_error(
        run_cli("convert", path, converted, "--compression", "jpeg"), "panel.ome.tif"
    )
    assert "JPEG" in line
    nothing_at(converted)
    one_line_error(run_cli("convert", path, converted, "--channels", "DAPI,Nope"), "Nope")
    nothing_at(converted)


def test_rounds_register_on_dapi_and_merge(tmp_path: Path) -> None:
    """Two cyclic-IF rounds of one tissue, the second deformed: registered on DAPI (not the
    first channel), every channel warped, merged with the reference."""
    shape = (1024, 1024)
    reference = write_synthetic_fluorescence(
        tmp_path / "r1.ome.tif", shape, seed=3, channels=("CD45", "DAPI", "PanCK")
    )
    _, _, deformation = synthetic_pair(shape, 11, max_displacement=8.0, rotation=5.0)
    round2 = write_synthetic_fluorescence(
        tmp_path / "r2.ome.tif",
        shape,
        seed=3,
        channels=("SMA", "DAPI"),
        deformation=deformation,
        extent=shape,
    )
    result = register(round2, reference, tmp_path / "out", weights=None, refine=20)
    assert result.report["source"]["registered_on"] == "DAPI"
    assert result.report["target"]["registered_on"] == "DAPI"
    round_pts, reference_pts = pair_landmarks(shape, 3, deformation, n=100)
    mapped = result.transform.map_points(reference_pts, "target_to_source")
    error = np.linalg.norm(mapped - round_pts, axis=1)
    initial = np.linalg.norm(reference_pts - round_pts, axis=1)
    assert error.mean() < 1.5 and error.mean() < 0.2 * initial.mean(), (
        error.mean(),
        initial.mean(),
    )
    warped = open_slide(result.warped)
    assert warped.channels.names == ("SMA", "DAPI") and warped.channels.dtype == np.uint16

    merged = merge([reference, result.warped], tmp_path / "merged.ome.tif")
    with open_slide(merged) as image:
        assert image.channels.names == (
            "r1 CD45", "r1 DAPI", "r1 PanCK", "r2 SMA", "r2 DAPI",
        )  # fmt: skip
        assert image.channels.dtype == np.uint16
        stacked = image.read_channels(0, 100, 200, 64, 64)
    assert np.array_equal(
        stacked[..., :3], open_slide(reference).read_channels(0, 100, 200, 64, 64)
    )
    assert np.array_equal(stacked[..., 3:], warped.read_channels(0, 100, 200, 64, 64))
    with tifffile.TiffFile(merged) as tif:
        ome = ome_types.from_xml(tif.ome_metadata, validate=True)
    assert len(ome.images[0].pixels.channels) == 5


def test_merge_refuses_other_frames_and_labels(if_slide, tmp_path: Path, run_cli) -> None:
    path, _ = if_slide
    small = tmp_path / "small.ome.tif"
    write_ome_tiff(panel((300, 400), 2), small, layout=TiffLayout(tile=256, compression="zlib"),
                   channel_info=fluorescence(2, np.dtype(np.uint16)))  # fmt: skip
    out = tmp_path / "m.ome.zarr"
    line = one_line_error(run_cli("merge", out, path, small), "small.ome.tif")
    assert "400 x 300" in line
    nothing_at(out)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, (panel(SHAPE, 1)[..., 0] > 1500).astype(np.uint8), tile=(128, 128))
    one_line_error(run_cli("merge", out, path, mask), "mask.tif", "label")
    nothing_at(out)


def test_merge_promotes_rgb_and_prefixes(if_slide, tmp_path: Path, run_cli) -> None:
    path, data = if_slide
    rgb = np.random.default_rng(1).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    he = tmp_path / "he.ome.tif"
    write_ome_tiff(rgb, he, layout=TiffLayout(tile=256, compression="zlib"))
    out = tmp_path / "m.ome.zarr"
    result = run_cli("-q", "merge", out, he, path, "--prefix", "HE,IF")
    assert result.exit_code == 0, result.output
    with open_slide(out) as merged:
        assert merged.channels.names[:4] == ("HE red", "HE green", "HE blue", "IF CD3")
        pixels = merged.read_channels(0, 0, 0, *SHAPE)
    assert pixels.dtype == np.uint16
    assert np.array_equal(pixels[..., :3], rgb) and np.array_equal(pixels[..., 3:], data)


def test_convert_keeps_every_channel_and_its_dtype(if_slide, tmp_path: Path, run_cli) -> None:
    """The issue's case: convert used to write three identical uint8 channels named RGB."""
    path, data = if_slide
    zarr_out, tiff_out = tmp_path / "c.ome.zarr", tmp_path / "c.ome.tif"
    assert run_cli("-q", "convert", path, zarr_out).exit_code == 0
    assert run_cli("-q", "convert", path, tiff_out, "--channels", "4,DAPI").exit_code == 0
    with open_slide(zarr_out) as converted:
        assert converted.channels.names == NAMES and converted.channels.dtype == np.uint16
        assert np.array_equal(converted.read_channels(0, 0, 0, *SHAPE), data)
    with tifffile.TiffFile(tiff_out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        ome = ome_types.from_xml(tif.ome_metadata, validate=True)
        assert np.array_equal(np.moveaxis(tif.series[0].asarray(), 0, -1), data[..., [4, 1]])
    assert [c.name for c in ome.images[0].pixels.channels] == ["FOXP3", "DAPI"]


def test_he_registers_to_dapi_by_default(tmp_path: Path) -> None:
    """An H&E source onto a fluorescence target of the same tissue with a known deformation:
    the default registers the H&E's haematoxylin on the target's DAPI (not its first
    channel), and warps the H&E as RGB."""
    shape = (1024, 1024)
    _, _, truth = synthetic_pair(shape, 5, max_displacement=8.0, rotation=6.0)
    source = write_synthetic_slide(tmp_path / "he.ome.tif", shape, seed=5, stain="he")
    target = write_synthetic_fluorescence(
        tmp_path / "if.ome.tif", shape, seed=5, channels=("PanCK", "DAPI"), deformation=truth
    )
    result = register(source, target, tmp_path / "out")
    assert result.report["source"]["registered_on"] == "haematoxylin"
    assert result.report["target"]["registered_on"] == "DAPI"
    target_pts, source_pts = pair_landmarks(shape, 5, truth, n=100)
    mapped = result.transform.map_points(target_pts, "target_to_source")
    error = np.linalg.norm(mapped - source_pts, axis=1)
    initial = np.linalg.norm(target_pts - source_pts, axis=1)
    assert error.mean() < 1.0 and error.mean() < 0.1 * initial.mean(), (
        error.mean(),
        initial.mean(),
    )
    assert open_slide(result.warped).channels == RGB


def test_a_registered_view_reads_every_channel_as_the_warp_writes_it(
    if_slide, tmp_path: Path
) -> None:
    path, _ = if_slide
    slide = open_slide(path)
    transform = moved(SlideRef.from_slide(slide))
    transform_dir = transform.save(tmp_path / "t")
    out = warp(transform_dir, slide, tmp_path / "w.ome.zarr", chunk=256)
    written = np.moveaxis(zarr.open_group(str(out), mode="r")["0"][:], 0, -1)
    view = wsireg.open_registered(path, transform_dir, block=256)
    assert view.channels.names == NAMES
    assert np.array_equal(view.read_channels(0, 100, 150, 300, 400), written[100:400, 150:550])
    assert np.array_equal(view.read_channels(0, 0, 0, 64, 64, [1]), written[:64, :64, 1:2])
