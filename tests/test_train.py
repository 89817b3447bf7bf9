"""Training (wsireg.model.train): data pairs, a tiny run that learns, checkpoints and the CLI verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsireg.core import field, losses
from wsireg.core.stain import network_input
from wsireg.errors import WsiregError
from wsireg.model.inference import register_pyramid
from wsireg.model.network import MultiLevelModel
from wsireg.model.train import (
    Crop,
    TrainConfig,
    heldout_region,
    load_real_image,
    make_pair,
    random_displacement,
    restain,
    train,
    training_region,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(
    levels=2,
    iterations=2,
    patch=64,
    stride=32,
    group=4,
    inference_group=8,
    train_groups=None,
    crop=64,
    margin=16,
    max_displacement=4.0,
    max_translation=2.0,
    max_rotation=1.0,
    widths=(8, 8, 16, 16, 16),
    head_width=8,
    lr=3e-3,
    lr_decay=0.9,
    steps_per_epoch=6,
    batch=1,
    epochs=3,
    missing_tissue=0.0,
    alpha=1.0,
    train_depth=None,  # sub-pyramids, as in Algorithm 1
    supervision=0.0,  # the paper's unsupervised loss only
    inference_patch=64,
    inference_stride=32,
)


def _tissue_rgb(side: int, seed: int) -> np.ndarray:
    """A smooth, H&E-coloured random "tissue" blob on white, ``[y, x, 3]`` uint8."""
    g = np.random.default_rng(seed)
    noise = torch.from_numpy(g.random((1, 1, side // 4, side // 4)).astype(np.float32))
    amount = torch.nn.functional.interpolate(noise, (side, side), mode="bicubic")[0, 0].numpy()
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    amount = np.clip(amount, 0, 1) * (xx**2 + yy**2 < 0.16)
    od = amount[..., None] * np.array([0.6, 1.2, 0.5])  # a purple dye
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


def _crop_source(cfg: TrainConfig):
    side = cfg.crop + 2 * cfg.margin

    def sample(rng: np.random.Generator, scale: float = 1.0):
        clean = _tissue_rgb(side, int(rng.integers(1 << 30)))
        return make_pair(Crop(clean, restain(clean, rng, "he"), "test"), cfg, rng, scale)

    return sample


def _ncc_after(model: MultiLevelModel, pairs) -> float:
    """Mean NCC of the loss images after registering each pair with ``model``."""
    scores = []
    for p in pairs:
        u = register_pyramid(model, p.moving, p.fixed)
        warped = field.warp_image(network_input(p.loss_moving), u)
        scores.append(float(losses.ncc(warped, network_input(p.loss_fixed))))
    return float(np.mean(scores))


def test_config_json_round_trip_and_unknown_keys() -> None:
    cfg = TrainConfig(**TINY)
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochz": 3})


def test_pair_truth_maps_the_moving_side_onto_the_fixed_side() -> None:
    cfg = TrainConfig(**{**TINY, "crop": 128, "margin": 32, "max_displacement": 8.0})
    pair = _crop_source(cfg)(np.random.default_rng(0))
    assert pair.moving.shape == (1, 3, 128, 128) and pair.truth.shape == (1, 2, 128, 128)
    fixed = network_input(pair.loss_fixed)
    moved = field.warp_image(network_input(pair.loss_moving), pair.truth, padding=0.0)
    before = float(losses.ncc(network_input(pair.loss_moving), fixed))
    after = float(losses.ncc(moved, fixed))
    assert after > 0.93 and after > before + 0.1, (before, after)


def test_restain_changes_colour_but_keeps_structure_and_white() -> None:
    rgb = _tissue_rgb(96, 3)
    rep = network_input(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    for i, kind in enumerate(("he", "ihc", "single", "swap")):
        out = restain(rgb, np.random.default_rng(i), kind)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert (out[0, 0] >= 254).all()  # background stays white
        assert np.abs(out.astype(int) - rgb).mean() > 2  # colours changed
        rep2 = network_input(torch.from_numpy(out).permute(2, 0, 1)[None])
        assert float(losses.ncc(rep, rep2)) > 0.3, kind


def test_fade_reverses_the_contrast_of_dense_tissue_and_keeps_white() -> None:
    rgb = _tissue_rgb(96, 3)
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0).sum(-1)
    dense = od > np.quantile(od, 0.95)
    medium = (od > np.quantile(od, 0.6)) & (od < np.quantile(od, 0.7))
    for i in range(4):
        out = restain(rgb, np.random.default_rng(i), "fade")
        assert (out[0, 0] >= 254).all()
        od_out = -np.log((out.astype(np.float64) + 1.0) / 256.0).sum(-1)
        # the densest tissue comes out lighter than tissue of medium density
        assert od_out[dense].mean() < od_out[medium].mean(), i


def test_training_choices_are_checked_when_configured() -> None:
    with pytest.raises(ValueError, match="stain_changes"):
        TrainConfig(stain_changes=("he", "bogus"))
    with pytest.raises(ValueError, match="similarity"):
        TrainConfig.from_dict({"similarity": "mi"})
    with pytest.raises(ValueError, match="stain_loss"):
        TrainConfig(stain_loss="both")
    with pytest.raises(ValueError, match="representation"):
        TrainConfig(representation="rgb")
    assert TrainConfig.from_dict({"stain_changes": ["fade", "he"]}).stain_changes == ("fade", "he")


def test_random_displacement_amplitude_and_no_folding() -> None:
    d = random_displacement(128, 20.0, np.random.default_rng(0))
    norm = torch.linalg.vector_norm(d, dim=1)
    assert float(norm.max()) <= 20.0 + 1e-4
    assert float(field.jacobian_determinant(d).min()) > 0.3
    assert float(random_displacement(64, 0.0, np.random.default_rng(0)).abs().max()) == 0.0


def test_heldout_regions_are_disjoint_from_training(slides_dir) -> None:
    for name in ("cmu", "tcga", "ihc"):
        full = load_real_image(name, slides_dir)
        tr, ho = training_region(name, slides_dir), heldout_region(name, slides_dir)
        assert tr.size + ho.size == full.size and min(tr.size, ho.size) > 0
        axis = 0 if tr.shape[1] == full.shape[1] else 1
        assert np.array_equal(np.concatenate([tr, ho], axis=axis), full)


def test_tiny_training_run_lowers_the_loss(tmp_path) -> None:
    # overfit one pair: after a few epochs the trained model registers it better than the
    # untrained one (which predicts ~identity)
    cfg = TrainConfig(**{**TINY, "max_displacement": 3.0, "max_translation": 3.0})
    pair = _crop_source(cfg)(np.random.default_rng(5))

    def same_pair(rng: np.random.Generator, scale: float = 1.0):
        return pair

    torch.manual_seed(cfg.seed)
    untrained = MultiLevelModel.uniform(
        cfg.levels, cfg.network(), inference=cfg.inference().to_dict()
    )
    model = train(cfg, tmp_path, data=same_pair)
    before, after = _ncc_after(untrained, [pair]), _ncc_after(model, [pair])
    assert after > before + 0.01, (before, after)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + cfg.epochs
    loaded = MultiLevelModel.load(tmp_path / "model.pt")
    assert loaded.metadata["inference"]["patch"] == cfg.inference_patch
    assert loaded.metadata["training"]["epochs"] == cfg.epochs


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    cfg = TrainConfig(**{**TINY, "steps_per_epoch": 2, "epochs": 2})
    sample = _crop_source(cfg)
    straight = train(cfg, tmp_path / "a", data=sample)
    train(TrainConfig(**{**TINY, "steps_per_epoch": 2, "epochs": 1}), tmp_path / "b", data=sample)
    with pytest.raises(WsiregError, match="resume"):
        train(cfg, tmp_path / "b", data=sample)
    resumed = train(cfg, tmp_path / "b", data=sample, resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    assert len((tmp_path / "b" / "log.csv").read_text().splitlines()) == 3


def test_cli_train_writes_a_loadable_model(run_cli, tmp_path) -> None:
    out = tmp_path / "model"
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "steps_per_epoch": 1,
                "batch": 2,
                "synthetic_bank": 4,  # the default bank of 384 crops takes minutes to draw
                "crop": 64,
                "margin": 16,
                "levels": 2,
                "patch": 64,
                "stride": 32,
                "group": 4,
            }
        )
    )
    result = run_cli(
        "-q", "train", config, "-o", out, "--epochs", "1", "--iterations", "1",
        "--representation", "haematoxylin",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = MultiLevelModel.load(out / "model.pt")
    assert model.num_levels == 2 and model.metadata["inference"]["iterations"] == 1
    assert model.metadata["inference"]["representation"] == "haematoxylin"
    assert json.loads((out / "config.json").read_text())["crop"] == 64
    bad = run_cli("-q", "train", config, "-o", out, "--resume", "--patch", "32")
    assert bad.exit_code != 0


def test_section_change_leaves_the_fine_mismatch_out_of_the_truth() -> None:
    # the truth aligns a "neighbouring section" pair, but less well than a plain pair: the
    # fine-scale mismatch is in the images and not in the truth
    base = TrainConfig(**{**TINY, "crop": 128, "margin": 32, "max_displacement": 8.0})
    section = TrainConfig.from_dict(
        {**base.to_dict(), "section_change": 1.0, "section_jitter": 3.0}
    )

    def scores(cfg: TrainConfig) -> tuple[float, float]:
        before, after = [], []
        for seed in range(4):
            pair = _crop_source(cfg)(np.random.default_rng(seed))
            fixed = network_input(pair.loss_fixed)
            moved = field.warp_image(network_input(pair.loss_moving), pair.truth, padding=0.0)
            before.append(float(losses.ncc(network_input(pair.loss_moving), fixed)))
            after.append(float(losses.ncc(moved, fixed)))
        return float(np.mean(before)), float(np.mean(after))

    plain_before, plain_after = scores(base)
    section_before, section_after = scores(section)
    assert section_after > section_before + 0.05, (section_before, section_after)
    assert section_after < plain_after - 0.02, (section_after, plain_after)


def test_init_weights_start_from_a_given_model(tmp_path) -> None:
    cfg = TrainConfig(**{**TINY, "steps_per_epoch": 1, "epochs": 1})
    sample = _crop_source(cfg)
    first = train(cfg, tmp_path / "a", data=sample)
    zero = TrainConfig(
        **{**cfg.to_dict(), "lr": 0.0, "init_weights": str(tmp_path / "a" / "model.pt")}
    )
    again = train(TrainConfig.from_dict(zero.to_dict()), tmp_path / "b", data=sample)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # lr 0: the fine-tuned networks are the initial ones
    other = TrainConfig(**{**zero.to_dict(), "widths": (8, 8, 16, 16, 32)})
    with pytest.raises(WsiregError, match="do not match"):
        train(TrainConfig.from_dict(other.to_dict()), tmp_path / "c", data=sample)


def test_content_change_shows_other_tissue_in_part_of_the_fixed_side() -> None:
    base = TrainConfig(**{**TINY, "crop": 128, "margin": 32, "max_displacement": 8.0})
    changed = TrainConfig.from_dict({**base.to_dict(), "content_change": 1.0})
    clean = _tissue_rgb(192, 11)
    crop = Crop(clean, restain(clean, np.random.default_rng(1), "he"), "test")
    a = make_pair(crop, base, np.random.default_rng(4))
    b = make_pair(crop, changed, np.random.default_rng(4))
    # same draws up to the change: the truth and the moving side are the same
    assert torch.equal(a.truth, b.truth) and torch.equal(a.loss_moving, b.loss_moving)
    diff = (a.loss_fixed - b.loss_fixed).abs().amax(1)[0]
    changed_share = float((diff > 0.02).float().mean())
    assert 0.03 < changed_share < 0.6, changed_share  # a blob, not the whole crop
