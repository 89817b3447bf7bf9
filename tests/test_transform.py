"""The transform model: points both ways, chains, persistence and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsireg.core.coords import to_level0
from wsireg.engine.transform import SlideRef, Stage, Transform
from wsireg.errors import TransformError

TARGET = SlideRef(path="target.svs", shape=(3000, 4000), mpp=(0.5, 0.5))
SOURCE = SlideRef(path="source.svs", shape=(3200, 3900), mpp=(0.5, 0.5))


def smooth_field(shape: tuple[int, int], downsample: float, amplitude: float = 12.0) -> np.ndarray:
    """A smooth analytic displacement (level-0 px) sampled on a grid at ``downsample``."""
    h, w = shape
    gy, gx = np.meshgrid(
        to_level0(np.arange(h), downsample), to_level0(np.arange(w), downsample), indexing="ij"
    )
    u = amplitude * np.sin(2 * np.pi * gx / 1500.0) * np.cos(2 * np.pi * gy / 1900.0)
    v = 0.7 * amplitude * np.cos(2 * np.pi * gx / 1700.0 + 0.3) * np.sin(2 * np.pi * gy / 1300.0)
    return np.stack([u, v]).astype(np.float32)


def rotation(deg: float, centre: tuple[float, float], shift=(0.0, 0.0)) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    cx, cy = centre
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
    back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1.0]])
    return back @ R @ to_origin


def field_transform(downsample: float = 16.0, affine: np.ndarray | None = None) -> Transform:
    shape = (int(np.ceil(3000 / downsample)), int(np.ceil(4000 / downsample)))
    fld = smooth_field(shape, downsample)
    return Transform.from_field(
        np.eye(3) if affine is None else affine, fld, downsample, TARGET, SOURCE
    )


def test_identity_and_affine_points() -> None:
    pts = np.array([[0.0, 0.0], [10.5, 20.25], [3999.0, 2999.0]])
    mapped, residual = Transform.identity(TARGET).map_points_with_residual(pts, "target_to_source")
    np.testing.assert_array_equal(mapped, pts)
    A = rotation(33, (2000, 1500), (40, -25))
    T = Transform.from_affine(A, TARGET, SOURCE)
    fwd = T.map_points(pts, "target_to_source")
    np.testing.assert_allclose(fwd, pts @ A[:2, :2].T + A[:2, 2])
    back, residual = T.map_points_with_residual(fwd, "source_to_target")
    np.testing.assert_allclose(back, pts, atol=1e-9)
    assert residual.max() < 1e-9


def test_directions_are_named_by_where_points_start_and_end() -> None:
    T = Transform.from_affine(rotation(33, (2000, 1500), (40, -25)), TARGET, SOURCE)
    pts = np.array([[10.0, 20.0]])
    # the retired words are refused (never mapped silently), naming the new ones
    for retired in ("forward", "inverse"):
        with pytest.raises(ValueError, match="target_to_source.*source_to_target"):
            T.map_points(pts, retired)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="no longer accepted"):
            T.map_points_with_residual(pts, retired)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_to_source"):
        T.map_points(pts, "source-to-target")  # type: ignore[arg-type]
    assert isinstance(T.map_points(pts, "target_to_source"), np.ndarray)
    np.testing.assert_array_equal(T.initial_affine, rotation(33, (2000, 1500), (40, -25)))


def test_write_document_keeps_fields_in_place(tmp_path: Path) -> None:
    from wsireg.engine.transform import create_field, field_name

    directory = tmp_path / "t"
    fld = create_field(directory / field_name(0), (188, 250), 16.0)
    fld[:] = smooth_field((188, 250), 16.0)
    T = Transform.from_field(np.eye(3), fld, 16.0, TARGET, SOURCE)
    T.write_document(directory)
    loaded = Transform.load(directory)
    pts = np.random.default_rng(5).uniform(0, 2900, (50, 2))
    np.testing.assert_array_equal(
        loaded.map_points(pts, "target_to_source"), T.map_points(pts, "target_to_source")
    )
    elsewhere = field_transform()  # an in-memory field is not in the directory
    with pytest.raises(ValueError, match="field"):
        elsewhere.write_document(tmp_path / "other")


def test_field_values_follow_the_analytic_field() -> None:
    T = field_transform(downsample=8)
    rng = np.random.default_rng(1)
    pts = rng.uniform([0, 0], [3999, 2999], (500, 2))
    analytic = pts.copy()
    u = 12 * np.sin(2 * np.pi * pts[:, 0] / 1500) * np.cos(2 * np.pi * pts[:, 1] / 1900)
    v = 8.4 * np.cos(2 * np.pi * pts[:, 0] / 1700 + 0.3) * np.sin(2 * np.pi * pts[:, 1] / 1300)
    analytic += np.stack([u, v], 1)
    mapped = T.map_points(pts, "target_to_source")
    # bilinear between nodes 8 px apart of a field with wavelength >= 1300 px
    assert np.abs(mapped - analytic).max() < 0.02


@pytest.mark.parametrize("affine", [None, rotation(-71, (2000, 1500), (30, 12))])
def test_inverse_round_trip_is_below_005_px(affine: np.ndarray | None) -> None:
    T = field_transform(downsample=16, affine=affine)
    rng = np.random.default_rng(2)
    target_pts = rng.uniform([50, 50], [3950, 2950], (1000, 2))
    source_pts = T.map_points(target_pts, "target_to_source")
    back, residual = T.map_points_with_residual(source_pts, "source_to_target")
    assert np.linalg.norm(back - target_pts, axis=1).max() < 0.05
    assert residual.max() < 0.05


def test_block_displacement_matches_points() -> None:
    """The block path (warp engine) and the point path agree."""
    T = field_transform(downsample=16, affine=rotation(12, (2000, 1500)))
    coords = T.source_coordinates(1000, 2000, 64, 96, downsample=1.0)
    yy, xx = np.mgrid[1000:1064, 2000:2096]
    pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    mapped = T.map_points(pts, "target_to_source")
    # remap's 1/32-node weight quantisation on a field varying < 1 px per node
    assert np.abs(coords.reshape(-1, 2) - mapped).max() < 0.05
    coarse = T.source_coordinates(10, 20, 16, 16, downsample=4.0)
    yy, xx = np.mgrid[10:26, 20:36]
    pts4 = np.stack([to_level0(xx, 4.0).ravel(), to_level0(yy, 4.0).ravel()], 1)
    assert np.abs(coarse.reshape(-1, 2) - T.map_points(pts4, "target_to_source")).max() < 0.05


def test_chain_equals_sequential_mapping() -> None:
    first = field_transform(downsample=16, affine=rotation(5, (2000, 1500), (10, 3)))
    middle = SOURCE
    second_field = smooth_field((200, 244), 16, amplitude=6)
    second = Transform.from_field(rotation(-3, (1950, 1600)), second_field, 16, middle, SOURCE)
    chain = first.then(second)
    assert chain.target == TARGET and chain.source == SOURCE
    pts = np.random.default_rng(3).uniform([100, 100], [3900, 2900], (200, 2))
    halfway = first.map_points(pts, "target_to_source")
    expected = second.map_points(halfway, "target_to_source")
    np.testing.assert_allclose(chain.map_points(pts, "target_to_source"), expected)
    back, residual = chain.map_points_with_residual(expected, "source_to_target")
    assert np.abs(back - pts).max() < 0.05 and residual.max() < 0.05
    composed = Transform.compose([first, second]).map_points(pts, "target_to_source")
    assert composed == pytest.approx(expected)


def test_save_load_round_trip(tmp_path: Path) -> None:
    T = field_transform(downsample=16, affine=rotation(20, (2000, 1500)))
    T.parameters = {"note": "test"}
    out = T.save(tmp_path / "t")
    assert (out / "transform.json").is_file() and (out / "field.zarr").is_dir()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    loaded = Transform.load(out)
    assert loaded.target == TARGET and loaded.source == SOURCE
    assert loaded.parameters == {"note": "test"}
    assert isinstance(loaded.stages[0].field, zarr.Array)
    pts = np.random.default_rng(4).uniform(0, 2900, (100, 2))
    np.testing.assert_allclose(
        loaded.map_points(pts, "target_to_source"),
        T.map_points(pts, "target_to_source"),
        atol=1e-4,
    )
    with pytest.raises(Exception, match="exists"):
        T.save(tmp_path / "t")
    T.save(tmp_path / "t", overwrite=True)
    # A chain saves one field per stage; affine-only stages have none.
    chain = T.then(Transform.from_affine(rotation(3, (0, 0)), SOURCE, SOURCE))
    loaded_chain = Transform.load(chain.save(tmp_path / "chain"))
    assert len(loaded_chain.stages) == 2 and loaded_chain.stages[1].field is None
    np.testing.assert_allclose(
        loaded_chain.map_points(pts, "target_to_source"),
        chain.map_points(pts, "target_to_source"),
        atol=1e-4,
    )


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TransformError, match="no such"):
        Transform.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransformError, match="transform.json is missing"):
        Transform.load(tmp_path / "empty")
    out = field_transform().save(tmp_path / "t")
    doc = json.loads((out / "transform.json").read_text())
    (out / "transform.json").write_text("{not json")
    with pytest.raises(TransformError, match="corrupted"):
        Transform.load(out)
    (out / "transform.json").write_text(json.dumps(doc))
    import shutil

    shutil.rmtree(out / "field.zarr")
    with pytest.raises(TransformError, match="field"):
        Transform.load(out)


def test_stage_without_field_displacement_is_none() -> None:
    assert Stage(np.eye(3)).displacement_block(0, 0, 4, 4, 1.0) is None


def test_coarse_output_reads_a_strided_field() -> None:
    """A thumbnail-sized block of a fine field reads every k-th node, still close to T."""
    T = field_transform(downsample=4, affine=rotation(7, (2000, 1500)))
    coarse = T.source_coordinates(0, 0, 47, 62, downsample=64.0)
    yy, xx = np.mgrid[0:47, 0:62]
    pts = np.stack([to_level0(xx, 64.0).ravel(), to_level0(yy, 64.0).ravel()], 1)
    exact = T.map_points(pts, "target_to_source")
    inside = (pts[:, 0] < 3990) & (pts[:, 1] < 2990)
    assert np.abs(coarse.reshape(-1, 2) - exact)[inside].max() < 0.5


def test_folding_share_counts_folded_nodes_strip_by_strip() -> None:
    h, w, d = 40, 30, 4.0
    smooth = np.zeros((2, h, w), np.float32)
    assert Stage(np.eye(3), smooth, d).folding_share() == 0.0
    assert Stage(np.eye(3)).folding_share() == 0.0
    folded = smooth.copy()
    xs = np.arange(w, dtype=np.float32) * d
    folded[0, 10:20, 5:15] = -2.0 * (xs[5:15] - xs[5])  # x + u(x) runs backwards there
    share = Stage(np.eye(3), folded, d).folding_share()
    assert 0.05 < share < 0.2
    for rows in (1, 3, 7):  # strips with one row of overlap: the same count
        assert Stage(np.eye(3), folded, d).folding_share(rows=rows) == share
    stored = zarr.create_array(
        store=zarr.storage.MemoryStore(), shape=folded.shape, chunks=(2, 8, 8), dtype="f4"
    )
    stored[:] = folded
    assert Stage(np.eye(3), stored, d).folding_share(rows=8) == share


def test_deformation_grid_draws_the_grid_the_field_carries() -> None:
    from wsireg.io.qc import deformation_grid

    target = np.full((32, 32, 3), 255, np.uint8)
    ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
    straight = deformation_grid(target, np.stack([xs, ys]), 8.0)
    red = (straight == (220, 30, 30)).all(-1)
    assert red[:, 8].all() and red[8, :].all()
    assert np.flatnonzero(red[:, 5]).tolist() == [8, 16, 24]  # only where rows cross it
    shifted = deformation_grid(target, np.stack([xs + 3.0, ys]), 8.0)  # lines move 3 px left
    assert (shifted == (220, 30, 30)).all(-1)[:, 5].all()
