"""Synthetic slides: determinism, chunk independence, stains, deformations, pairs, files."""

from __future__ import annotations

import time

import numpy as np
import pytest

from wsireg.io.tiff import TiffLayout
from wsireg.synthetic import deformation, slides
from wsireg.synthetic import texture as S

SEED = 5
SHAPE = (1024, 1024)


@pytest.fixture(scope="module")
def texture() -> S.TissueTexture:
    return S.get_texture(SEED, SHAPE)


@pytest.fixture(scope="module")
def pair():
    source, target, truth = slides.synthetic_pair(
        SHAPE, SEED, max_displacement=20, scale=256, rotation=10, translation=(12, -7)
    )
    return source, target, truth


def _grid_points(shape: tuple[int, int], step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    return ys.ravel(), xs.ravel(), np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)


# -- texture ------------------------------------------------------------------------------------


def test_same_seed_same_pixels_and_chunking_does_not_show(texture):
    a = slides.synthetic_slide(SHAPE, SEED, chunk=512).compute()
    b = slides.synthetic_slide(SHAPE, SEED, chunk=1024).compute()
    c = slides.synthetic_slide(SHAPE, SEED, chunk=300).compute()  # chunks not aligned to blocks
    assert a.shape == (*SHAPE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(texture.render(137, 611, 301, 250, "he"), a[137:438, 611:861])
    assert np.array_equal(S.TissueTexture(SEED, SHAPE).render(0, 0, 512, 512), a[:512, :512])


def test_base_tiles_are_deterministic_and_depend_on_seed():
    rng = np.random.default_rng
    cell = [S._cell_tile(rng([s, 1]), 512) for s in (1, 1, 2)]
    gland = [S._gland_tile(rng([s, 2]), 512) for s in (1, 1, 2)]
    for tiles in (cell, gland):
        assert np.array_equal(tiles[0], tiles[1])
        assert np.mean(tiles[0] != tiles[2]) > 0.2


def test_seeds_give_different_slides(texture):
    other = S.get_texture(SEED + 1, SHAPE)
    a, b = texture.render(0, 0, 512, 1024), other.render(0, 0, 512, 1024)
    assert np.mean(np.any(a != b, axis=-1)) > 0.3


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
def test_white_background_outside_tissue_and_tissue_fraction(seed):
    tex = S.get_texture(seed, SHAPE)
    structure = tex.structure(0, 0, *SHAPE)
    rgb = S.H_AND_E.rgb(structure)
    assert np.array_equal(rgb, tex.render(0, 0, *SHAPE, "he"))
    tissue = structure[..., 3]
    assert np.all(rgb[tissue == 0] == 255)
    assert 0.25 < np.mean(tissue > 0.5) < 0.85
    assert np.mean(rgb[tissue > 0.5].min(axis=-1) < 235) > 0.95  # tissue is stained
    corners = np.concatenate([tissue[:24, :24].ravel(), tissue[-24:, -24:].ravel()])
    assert np.mean(corners == 0) > 0.9


def test_exact_and_block_paths_agree(texture):
    ys, xs, pts = _grid_points(SHAPE, 5)
    block = texture.structure(0, 0, *SHAPE)[ys, xs]
    exact = texture.structure_at(pts)
    shifted = texture.structure_at(pts + [2.0, 0.0])
    err = np.abs(exact - block).mean(axis=0)
    assert np.all(err < 0.001)
    assert np.abs(shifted - block)[:, 0].mean() > 5 * err[0] + 0.005  # nuclei are fine structure


def test_texture_downsample_shrinks_structure():
    fine = S.get_texture(SEED, (512, 512))
    coarse = S.get_texture(SEED, (512, 512), texture_downsample=4.0)
    f, c = fine.structure(0, 0, 512, 512), coarse.structure(0, 0, 512, 512)
    # nuclei get 4x smaller: the nuclei map varies much faster from one pixel to the next
    var_f = np.abs(np.diff(f[..., 0], axis=1)).mean() / (f[..., 0].std() + 1e-6)
    var_c = np.abs(np.diff(c[..., 0], axis=1)).mean() / (c[..., 0].std() + 1e-6)
    assert var_c > 1.8 * var_f


# -- stains -------------------------------------------------------------------------------------


def test_stains_differ_in_colour():
    cyto = np.array([[0.0, 1.0, 0.0, 1.0]], np.float32)
    nuclei = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)
    stroma = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    he = [S.H_AND_E.rgb(s)[0].astype(int) for s in (cyto, nuclei, stroma)]
    ihc = [S.IHC_DAB.rgb(s)[0].astype(int) for s in (cyto, nuclei, stroma)]
    r, g, b = ihc[0]
    assert r > g > b and r - b > 40  # DAB cytoplasm is brown
    r, g, b = he[0]
    assert r > g and b > g  # eosin is pink
    for rgb in (he[1], ihc[1]):  # hematoxylin nuclei are blue-purple
        assert rgb[2] > rgb[1] and rgb[2] > 100
    assert np.abs(he[2] - ihc[2]).max() > 40  # stroma: pink in H&E, pale in IHC
    assert np.all(S.H_AND_E.rgb(np.zeros((1, 4), np.float32)) == 255)


def test_stain_jitter_is_deterministic_and_small():
    s = np.random.default_rng(0).random((1000, 4)).astype(np.float32)
    base = S.H_AND_E.rgb(s).astype(int)
    j1 = S.H_AND_E.jitter(3, 0.05).rgb(s).astype(int)
    assert np.array_equal(j1, S.H_AND_E.jitter(3, 0.05).rgb(s))
    assert not np.array_equal(j1, S.H_AND_E.jitter(4, 0.05).rgb(s))
    assert 1 < np.abs(j1 - base).mean() < 25
    assert S.H_AND_E.jitter(3, 0.0) is S.H_AND_E
    with pytest.raises(ValueError, match="unknown stain"):
        S.get_stain("trichrome")


# -- deformations -------------------------------------------------------------------------------


def test_deformation_magnitude_field_and_folding():
    shape = (1500, 2000)
    d = deformation.SmoothDeformation.random(
        shape,
        40,
        300,
        rotation=35,
        translation=(20, -10),
        zoom=1.05,
        shear=0.03,
        flip=True,
        seed=3,
    )
    _, _, grid = _grid_points(shape, 10)
    u = np.linalg.norm(d.displacement(grid), axis=1)
    assert 0.95 * 40 < u.max() <= 40 * 1.001
    field = d.field(shape, downsample=8)
    assert field.shape == (2, 188, 250) and field.dtype == np.float32
    centre = np.array([[8 * (17 + 0.5) - 0.5, 8 * (30 + 0.5) - 0.5]])  # grid pixel [30, 17]
    assert np.allclose(field[:, 30, 17], d.displacement(centre)[0], atol=1e-4)
    with pytest.raises(ValueError, match="fold"):
        deformation.SmoothDeformation.random(shape, 200, 150, seed=3)


def test_deformation_affine_part():
    h, w = 101, 201
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    rot = deformation.SmoothDeformation.random((h, w), 0, rotation=90, translation=(5, 0))
    assert np.allclose(rot(np.array([c, c + [1, 0]])), [c + [5, 0], c + [5, 1]])
    flip = deformation.SmoothDeformation.random((h, w), 0, flip=True)
    assert np.allclose(flip(np.array([[0.0, 3.0]])), [[w - 1, 3.0]])


# -- pairs --------------------------------------------------------------------------------------


def test_pair_target_is_texture_at_truth(pair, texture):
    source, target, truth = pair
    assert source.shape == target.shape == (*SHAPE, 3)
    ys, xs, pts = _grid_points(SHAPE, 4)
    rendered = texture.structure(0, 0, *SHAPE, deformation=truth)[ys, xs]
    exact = texture.structure_at(truth(pts))
    wrong = texture.structure_at(truth(pts + [3.0, 0.0]))
    err = np.abs(rendered - exact).mean(axis=0)
    assert np.all(err < 0.001)
    assert np.abs(wrong - rendered)[:, 0].mean() > 5 * err[0] + 0.005


def test_pair_source_at_truth_matches_target_across_stains(pair):
    source, target, truth = pair
    src, tgt = source.compute(), target.compute()
    assert np.abs(src.astype(int).mean((0, 1)) - tgt.astype(int).mean((0, 1))).max() > 10
    ys, xs, pts = _grid_points(SHAPE, 3)

    def tissue(img: np.ndarray, p: np.ndarray) -> np.ndarray:
        j, i = np.round(p).astype(int).T
        inside = (i >= 0) & (i < SHAPE[0]) & (j >= 0) & (j < SHAPE[1])
        out = np.zeros(len(p), bool)
        out[inside] = img[i[inside], j[inside]].min(axis=-1) < 245
        return out

    fixed = tgt[ys, xs].min(axis=-1) < 245
    agree = np.mean(tissue(src, truth(pts)) == fixed)
    agree_identity = np.mean(tissue(src, pts) == fixed)
    assert agree > 0.97
    assert agree - agree_identity > 0.03


def test_pair_landmarks(pair, texture):
    _, _, truth = pair
    tgt, src = slides.pair_landmarks(SHAPE, SEED, truth, n=50)
    assert tgt.shape == src.shape == (50, 2)
    assert np.allclose(src, truth(tgt))
    assert np.all(texture.structure_at(src)[:, 3] > 0.8)


# -- speed and files ----------------------------------------------------------------------------


def test_chunk_sampling_speed():
    slide = S.get_texture(SEED, (100_000, 100_000))  # same seed: the base tiles are built
    best = min(_timed(lambda: slide.render(50176, 50176, 1024, 1024)) for _ in range(3))
    assert 1.048576 / best > 3.0  # MPx/s: a floor that holds on a busy, shared machine


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_write_synthetic_slide_ome_tiff(tmp_path, texture):
    tifffile = pytest.importorskip("tifffile")
    shape = (700, 1100)
    path = slides.write_synthetic_slide(
        tmp_path / "s.ome.tiff",
        shape,
        seed=SEED,
        mpp=0.25,
        layout=TiffLayout(tile=256, compression="zlib"),
        extent=SHAPE,
    )
    with tifffile.TiffFile(path) as tif:
        level0 = tif.series[0].levels[0].asarray()
        assert len(tif.series[0].levels) >= 2
    assert level0.shape == (*shape, 3)
    assert np.array_equal(level0, texture.render(0, 0, *shape, "he"))
