"""The registered view: a source read in the target's frame through the warp's block function,
equal to `wsireg warp`'s output pixel for pixel, at every level, nothing written."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import wsireg
from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.view import RegisteredSlide, open_registered
from wsireg.engine.warp import warp
from wsireg.errors import InputError, TransformError
from wsireg.io.slide import Slide, open_slide

from .test_transform import rotation, smooth_field
from .test_warp import read_level, write_pattern_slide

BLOCK = 256
#: The target: 1500 x 2000 px at level 0, two coarser levels, its own pixel size.
TARGET = SlideRef(None, (1500, 2000), (0.5, 0.5), ((1500, 2000), (750, 1000), (375, 500)))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pattern_slide(tmp_path_factory.mktemp("src") / "pattern.tif", (1400, 1900))


@pytest.fixture(scope="module")
def transform_dir(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = SlideRef.from_slide(open_slide(source))
    fld = smooth_field((1500 // 16 + 1, 2000 // 16 + 1), 16.0, amplitude=12)
    transform = Transform.from_field(rotation(7, (950, 700), (20, -15)), fld, 16.0, TARGET, ref)
    return transform.save(tmp_path_factory.mktemp("t") / "transform")


@pytest.fixture(scope="module")
def warped(source: Path, transform_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Level 0 of `wsireg warp --level L --chunk BLOCK` for L = 0, 1, 2."""
    out = tmp_path_factory.mktemp("warped")
    return {
        level: read_level(
            warp(transform_dir, source, out / f"l{level}.ome.zarr", level=level, chunk=BLOCK)
        )
        for level in (0, 1, 2)
    }


def files_under(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def test_view_has_the_targets_geometry(source: Path, transform_dir: Path) -> None:
    view = wsireg.open_slide(source, transform=transform_dir)
    assert isinstance(view, RegisteredSlide) and isinstance(view, Slide)
    assert view.level_count == 3
    assert [view.level_shape(i) for i in range(3)] == list(TARGET.levels)
    assert view.level_dimensions[1] == (1000, 750)
    np.testing.assert_allclose(view.level_downsamples, [1.0, 2.0, 4.0])
    assert view.mpp == (0.5, 0.5) and view.level_mpp(2) == (2.0, 2.0)
    assert view.get_best_level_for_downsample(3.0) == 1
    assert wsireg.open_slide(source).level_shape(0) == (1400, 1900)  # no transform: the source


@pytest.mark.parametrize("level", [0, 1, 2])
def test_view_equals_the_warp_at_every_level(
    source: Path, transform_dir: Path, warped: dict, level: int, tmp_path: Path
) -> None:
    before = files_under(source.parent, transform_dir, tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        view = open_registered(source, transform_dir, block=BLOCK)
        expected = warped[level]
        # the whole level through the lazy dask array
        np.testing.assert_array_equal(view.level(level).compute(), expected)
        # tiles straddling block borders (BLOCK = 256), read fresh (no cached block)
        fresh = open_registered(source, transform_dir, block=BLOCK)
        height, width = view.level_shape(level)
        for y0, x0, h, w in [(200, 240, 100, 40), (250, 250, 300, 270), (0, 0, 17, 600)]:
            y0, x0 = min(y0, height - 1), min(x0, width - 1)
            tile = fresh.read(level, y0, x0, h, w)
            inside = expected[y0 : y0 + h, x0 : x0 + w]
            np.testing.assert_array_equal(tile[: inside.shape[0], : inside.shape[1]], inside)
            assert (tile[inside.shape[0] :] == 255).all() and (
                tile[:, inside.shape[1] :] == 255
            ).all()
        view.close()
        fresh.close()
    finally:
        os.chdir(cwd)
    assert files_under(source.parent, transform_dir, tmp_path) == before  # nothing written


def test_view_with_default_blocks_and_a_transform_object(
    source: Path, transform_dir: Path, tmp_path: Path
) -> None:
    transform = Transform.load(transform_dir)
    reference = read_level(warp(transform, source, tmp_path / "w.ome.zarr", level=1))
    view = wsireg.open_slide(source, transform=transform)  # the warp's default 1024 chunks
    np.testing.assert_array_equal(view.read(1, 100, 300, 500, 600), reference[100:600, 300:900])


def test_view_pickles_as_paths_and_names_its_own_dask_keys(
    source: Path, transform_dir: Path
) -> None:
    view = open_registered(source, transform_dir, block=BLOCK)
    again = pickle.loads(pickle.dumps(view))
    assert isinstance(again, RegisteredSlide) and again.block == BLOCK
    np.testing.assert_array_equal(again.read(1, 10, 20, 64, 64), view.read(1, 10, 20, 64, 64))
    raw = open_slide(source)
    assert view.level(0).name != raw.level(0).name
    nearest = open_registered(source, transform_dir, block=BLOCK, interpolation="nearest")
    assert nearest.level(0).name != view.level(0).name
    unsaved = open_registered(
        source,
        Transform.load(transform_dir).then(Transform.identity(SlideRef.from_slide(raw))),
        block=BLOCK,
    )
    with pytest.raises(TransformError, match="save the transform"):
        pickle.dumps(unsaved)


def test_bad_views_are_refused(source: Path, transform_dir: Path, tmp_path: Path) -> None:
    other = write_pattern_slide(tmp_path / "other.tif", (300, 400))
    with pytest.raises(TransformError, match="transform's source"):
        open_registered(other, transform_dir)
    with pytest.raises(ValueError, match="interpolation"):
        open_registered(source, transform_dir, interpolation="cubic")
    view = open_registered(source, transform_dir)
    with pytest.raises(InputError, match="registered view"):
        warp(Transform.identity(SlideRef.from_slide(view)), view, tmp_path / "twice.ome.zarr")
