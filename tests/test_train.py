"""Training (wsireg.model.train, wsireg.model.training_data): data pairs, the configuration, a
tiny run that learns, checkpoints and the CLI verb."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from wsireg.core import field, losses
from wsireg.core.stain import network_input
from wsireg.errors import InputError, WsiregError
from wsireg.model.inference import DEFAULTS, inference_settings, register_pyramid
from wsireg.model.network import MultiLevelModel, default_weights_path
from wsireg.model.train import (
    FLAT_OPTIONS,
    OptimiserSettings,
    TrainConfig,
    resolve_config,
    train,
)
from wsireg.model.trainer import end_point_error
from wsireg.model.training_data import (
    Crop,
    CropSettings,
    PairSettings,
    TrainingData,
    heldout_region,
    load_real_image,
    make_pair,
    random_displacement,
    restain,
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


def _config(**options) -> TrainConfig:
    """:data:`TINY` with flat ``options`` on top."""
    return TrainConfig.from_dict({**TINY, **options})


def _crop_source(cfg: TrainConfig):
    side = cfg.pairs.crop + 2 * cfg.pairs.margin

    def sample(rng: np.random.Generator, scale: float = 1.0):
        clean = _tissue_rgb(side, int(rng.integers(1 << 30)))
        return make_pair(Crop(clean, restain(clean, rng, "he"), "test"), cfg.pairs, rng, scale)

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
    cfg = _config()
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"step": {"epochz": 3}})


def test_a_flat_config_of_earlier_versions_loads_to_the_same_configuration() -> None:
    # the training config stored with the shipped stage-4 weights, in the flat form of the
    # versions before the configuration had sections
    flat = {
        "alpha": 0.01, "batch": 16, "content_change": 0.5, "crop": 64,
        "deformation_spacing": [120.0, 480.0], "epochs": 6, "finest_level_probs": None,
        "group": 16, "head_init_std": 0.001, "head_width": 16, "inference_group": 16,
        "inference_patch": 128, "inference_stride": 64,
        "init_weights": "wsireg/weights/default.pt", "iterations": 2,
        "level_max_displacement": [10.0, 5.0, 4.0], "levels": 3, "lr": 0.0005, "lr_decay": 0.9,
        "margin": 32, "max_displacement": 40.0, "max_rotation": 2.0, "max_shear": 0.02,
        "max_translation": 10.0, "max_zoom": 0.03, "missing_tissue": 0.3, "patch": 64,
        "representation": "haematoxylin", "scale_range": [0.75, 12.0], "section_change": 0.5,
        "section_jitter": 2.0, "section_spacing": [6.0, 16.0], "seed": 0, "similarity": "ncc",
        "sources": {"cmu": 0.2, "ihc": 0.15, "synthetic": 0.4, "tcga": 0.25},
        "stain_changes": ["he", "ihc", "single", "swap"], "stain_loss": "same",
        "steps_per_epoch": 300, "stride": 64, "supervision": 1.0, "supervision_epochs": 1000,
        "synthetic_bank": 384, "synthetic_downsample": [1.0, 24.0],
        "synthetic_seeds": [100, 101, 102, 103, 104, 105, 106, 107], "threads": 1,
        "train_depth": 1, "train_groups": None,
        "widths": [16, 32, 64, 128, 256],
    }  # fmt: skip
    cfg = TrainConfig.from_dict(flat)
    expected = TrainConfig(
        inference=replace(DEFAULTS, representation="haematoxylin"),
        optimiser=OptimiserSettings(lr=0.0005, epochs=6, init_weights="wsireg/weights/default.pt"),
        pairs=PairSettings(section_change=0.5, content_change=0.5),
    )
    assert cfg == expected
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # and the sectioned form round-trips
    # the inference settings stored with a model trained from it are those shipped
    if default_weights_path().is_file():
        shipped = MultiLevelModel.load(default_weights_path())
        # but M, the flips and the smoothing, chosen after training on the validation table
        # (weights README)
        chosen = {"iterations": 3, "flips": 2, "smoothing": 12.0}
        assert replace(cfg.inference, **chosen) == inference_settings(shipped)
    # every option of every earlier flat config is known, and the stored smoothing is S / 4
    assert set(flat) <= set(FLAT_OPTIONS) | {"levels", "seed", "threads"}
    small = TrainConfig.from_dict({"inference_stride": 32})
    assert small.inference.stride == 32 and small.inference.smoothing == 8.0
    assert small.inference.flips == 4


def test_resolve_config_layers_a_file_the_options_and_a_resumed_run(tmp_path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"crop": 128, "lr": 0.01}))
    cfg = resolve_config(path, {"lr": 0.5, "train_groups": 0, "epochs": None}, tmp_path / "out")
    assert (cfg.pairs.crop, cfg.optimiser.lr, cfg.step.train_groups) == (128, 0.5, None)
    assert cfg.optimiser.epochs == TrainConfig().optimiser.epochs
    assert resolve_config(None, {}, tmp_path / "out") == TrainConfig()
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    resumed = resolve_config(path, {"epochs": 40, "threads": 2}, out, resume=True)
    assert resumed.optimiser.epochs == 40 and resumed.threads == 2
    assert resumed.pairs == cfg.pairs and resumed.optimiser.lr == 0.5
    with pytest.raises(InputError, match="config.json.*patch"):
        resolve_config(None, {"patch": 32}, out, resume=True)
    path.write_text("{not json")
    with pytest.raises(InputError, match="cfg.json"):
        resolve_config(path, {}, tmp_path / "out")
    path.write_text(json.dumps({"epochz": 1}))
    with pytest.raises(InputError, match="cfg.json.*epochz"):
        resolve_config(path, {}, tmp_path / "out")


def test_pair_truth_maps_the_moving_side_onto_the_fixed_side() -> None:
    cfg = _config(crop=128, margin=32, max_displacement=8.0)
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
        TrainConfig.from_dict({"stain_changes": ("he", "bogus")})
    with pytest.raises(ValueError, match="similarity"):
        TrainConfig.from_dict({"similarity": "mi"})
    with pytest.raises(ValueError, match="stain_loss"):
        TrainConfig.from_dict({"stain_loss": "both"})
    with pytest.raises(ValueError, match="representation"):
        TrainConfig.from_dict({"representation": "rgb"})
    cfg = TrainConfig.from_dict({"stain_changes": ["fade", "he"]})
    assert cfg.crops.stain_changes == ("fade", "he")


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
    cfg = _config(max_displacement=3.0, max_translation=3.0)
    pair = _crop_source(cfg)(np.random.default_rng(5))

    def same_pair(rng: np.random.Generator, scale: float = 1.0):
        return pair

    torch.manual_seed(cfg.seed)
    untrained = MultiLevelModel.uniform(cfg.levels, cfg.network, inference=cfg.inference.to_dict())
    model = train(cfg, tmp_path, data=same_pair)
    before, after = _ncc_after(untrained, [pair]), _ncc_after(model, [pair])
    assert after > before + 0.01, (before, after)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + cfg.optimiser.epochs
    loaded = MultiLevelModel.load(tmp_path / "model.pt")
    assert loaded.metadata["inference"]["patch"] == cfg.inference.patch
    assert loaded.metadata["training"]["epochs"] == cfg.optimiser.epochs


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    cfg = _config(steps_per_epoch=2, epochs=2)
    sample = _crop_source(cfg)
    straight = train(cfg, tmp_path / "a", data=sample)
    train(_config(steps_per_epoch=2, epochs=1), tmp_path / "b", data=sample)
    with pytest.raises(WsiregError, match="resume"):
        train(cfg, tmp_path / "b", data=sample)
    resumed = train(cfg, tmp_path / "b", data=sample, resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    assert len((tmp_path / "b" / "log.csv").read_text().splitlines()) == 3


def test_cli_train_writes_a_loadable_model(run_cli, tmp_path, slides_dir) -> None:
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
        "--representation", "haematoxylin", "--slides-dir", slides_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = MultiLevelModel.load(out / "model.pt")
    assert model.num_levels == 2 and model.metadata["inference"]["iterations"] == 1
    assert model.metadata["inference"]["representation"] == "haematoxylin"
    assert json.loads((out / "config.json").read_text())["pairs"]["crop"] == 64
    bad = run_cli("-q", "train", config, "-o", out, "--resume", "--patch", "32")
    assert bad.exit_code != 0


def test_section_change_leaves_the_fine_mismatch_out_of_the_truth() -> None:
    # the truth aligns a "neighbouring section" pair, but less well than a plain pair: the
    # fine-scale mismatch is in the images and not in the truth
    base = _config(crop=128, margin=32, max_displacement=8.0)
    section = base.with_options({"section_change": 1.0, "section_jitter": 3.0})

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
    cfg = _config(steps_per_epoch=1, epochs=1)
    sample = _crop_source(cfg)
    first = train(cfg, tmp_path / "a", data=sample)
    zero = cfg.with_options({"lr": 0.0, "init_weights": str(tmp_path / "a" / "model.pt")})
    again = train(TrainConfig.from_dict(zero.to_dict()), tmp_path / "b", data=sample)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # lr 0: the fine-tuned networks are the initial ones
    other = zero.with_options({"widths": (8, 8, 16, 16, 32)})
    with pytest.raises(WsiregError, match="do not match"):
        train(TrainConfig.from_dict(other.to_dict()), tmp_path / "c", data=sample)


def test_content_change_shows_other_tissue_in_part_of_the_fixed_side() -> None:
    base = _config(crop=128, margin=32, max_displacement=8.0)
    changed = base.with_options({"content_change": 1.0})
    clean = _tissue_rgb(192, 11)
    crop = Crop(clean, restain(clean, np.random.default_rng(1), "he"), "test")
    a = make_pair(crop, base.pairs, np.random.default_rng(4))
    b = make_pair(crop, changed.pairs, np.random.default_rng(4))
    # same draws up to the change: the truth and the moving side are the same
    assert torch.equal(a.truth, b.truth) and torch.equal(a.loss_moving, b.loss_moving)
    diff = (a.loss_fixed - b.loss_fixed).abs().amax(1)[0]
    changed_share = float((diff > 0.02).float().mean())
    assert 0.03 < changed_share < 0.6, changed_share  # a blob, not the whole crop


def test_a_section_pair_has_unknown_truth_and_both_sections_as_loss_images() -> None:
    cfg = PairSettings(crop=64, margin=16, max_displacement=3.0, missing_tissue=0.0)
    side = cfg.crop + 2 * cfg.margin
    first, second = _tissue_rgb(side, 1), _tissue_rgb(side, 2)
    pair = make_pair(Crop(first, second, "test", known=False), cfg, np.random.default_rng(0))
    assert pair.truth.shape == (1, 2, cfg.crop, cfg.crop) and torch.isnan(pair.truth).all()
    # the loss compares the two sections themselves: they differ (not one stain twice)
    assert float((pair.loss_moving - pair.loss_fixed).abs().mean()) > 0.02
    assert torch.isfinite(pair.moving).all() and torch.isfinite(pair.fixed).all()


def test_training_data_crops_the_same_place_of_both_sections() -> None:
    image = _tissue_rgb(256, 3)
    crops = CropSettings(sources={"sections": 1.0}, section_grey=1.0, section_scale_range=(1, 1))
    with pytest.raises(ValueError, match="sections"):
        TrainingData(crops, PairSettings(crop=64, margin=16))
    data = TrainingData(crops, PairSettings(crop=64, margin=16), sections=((image, image),))
    crop = data.crop(np.random.default_rng(0))
    assert not crop.known and crop.clean.shape == (96, 96, 3)
    assert np.array_equal(crop.clean, crop.other)  # one window of two identical sections
    assert np.array_equal(crop.clean[..., 0], crop.clean[..., 2])  # grey as R, G and B


def test_training_on_sections_alone_runs_the_unsupervised_loss(tmp_path) -> None:
    # sections only and beta > 0: the supervised term has no known truth and adds nothing,
    # the loss stays finite and the networks change
    image = _tissue_rgb(192, 4)
    shifted = np.roll(image, 2, axis=1)
    cfg = _config(sources={"sections": 1.0}, supervision=1.0, steps_per_epoch=2, epochs=1)
    torch.manual_seed(cfg.seed)
    start = MultiLevelModel.uniform(cfg.levels, cfg.network, inference=cfg.inference.to_dict())
    model = train(cfg, tmp_path, sections=((image, shifted),))
    history = model.metadata["training"]["history"]
    assert np.isfinite(history[-1]["loss"])
    changed = [
        not torch.equal(a, b)
        for a, b in zip(start.state_dict().values(), model.state_dict().values(), strict=True)
    ]
    assert any(changed)


def test_end_point_error_skips_patches_of_unknown_truth() -> None:
    pred = torch.zeros(2, 2, 4, 4, requires_grad=True)
    target = torch.ones(2, 2, 4, 4)
    assert float(end_point_error(pred, target).detach()) == pytest.approx(2**0.5)
    target[1] = float("nan")
    loss = end_point_error(pred, target)
    assert float(loss.detach()) == pytest.approx(2**0.5 / 2)  # half of the patches add nothing
    loss.backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[1].abs().sum()) == 0.0
    assert float(end_point_error(pred, torch.full_like(target, float("nan")))) == 0.0
