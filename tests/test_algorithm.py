"""Algorithm 1 on tensors (wsireg.model.algorithm, wsireg.model.inference): plumbing checked with
fake networks, then the shipped model. The training branch: tests/test_trainer.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from wsireg.core import tiling
from wsireg.core.stain import has_tissue, network_input
from wsireg.model.algorithm import average_pyramid, pad_to_multiple
from wsireg.model.inference import (
    InferenceSettings,
    PatchCounts,
    flip_averaged,
    inference_settings,
    network_dtype,
    register_level,
    register_pyramid,
)
from wsireg.model.network import (
    MultiLevelModel,
    UNet,
    UNetConfig,
    default_weights_path,
    load_default,
)
from wsireg.synthetic.slides import synthetic_pair
from wsireg.synthetic.texture import get_texture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plain(**settings) -> InferenceSettings:
    """Algorithm 1's settings without smoothing and flip averaging (the bare loop)."""
    return InferenceSettings(smoothing=0.0, flips=1, **settings)


class ConstantNet(nn.Module):
    """Predicts the same displacement ``(dx, dy)`` everywhere (a stand-in for a U-Net)."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor([dx, dy]))

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        ones = moving.new_ones(moving.shape[0], 1, *moving.shape[-2:])
        return self.value.reshape(1, 2, 1, 1) * ones


def _texture(h: int, w: int, seed: int = 0) -> Tensor:
    """A smooth random ``(1, 1, h, w)`` image in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, h // 8 + 2, w // 8 + 2, generator=g)
    img = torch.nn.functional.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    return img.clamp(0, 1)


def test_untrained_network_gives_an_almost_zero_field() -> None:
    torch.manual_seed(0)
    net = UNet().eval()
    a, b = _texture(150, 200, 1), _texture(150, 200, 2)
    v = register_level(net, a, b, plain(iterations=2, patch=64, stride=32, group=5))
    assert v.shape == (1, 2, 150, 200)
    assert float(v.abs().max()) < 0.01  # the last layer starts at ~1e-5


def test_iterations_compose_the_level_field() -> None:
    # a constant prediction c composed M times is M c (fold keeps the centres exactly)
    net = ConstantNet(1.5, -0.5)
    img = _texture(100, 70)
    v = register_level(net, img, img, plain(iterations=3, patch=64, stride=32, group=4))
    assert torch.allclose(v[:, 0], torch.full_like(v[:, 0], 4.5), atol=1e-5)
    assert torch.allclose(v[:, 1], torch.full_like(v[:, 1], -1.5), atol=1e-5)


def test_group_size_does_not_change_the_result() -> None:
    torch.manual_seed(3)
    net = UNet(UNetConfig(widths=(8, 8, 16, 16, 16), head_width=8)).eval()
    with torch.no_grad():
        net.head[-1].weight.normal_(0, 0.05)  # a non-trivial field
    a, b = _texture(96, 128, 4), _texture(96, 128, 5)
    v1 = register_level(net, a, b, plain(iterations=2, patch=64, stride=32, group=1))
    v2 = register_level(net, a, b, plain(iterations=2, patch=64, stride=32, group=100))
    assert float(v1.abs().max()) > 0.05
    assert torch.allclose(v1, v2, atol=1e-4)  # conv kernels may sum in another order


class CountingNet(ConstantNet):
    """A :class:`ConstantNet` that counts the patches it is given."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__(dx, dy)
        self.seen = 0

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        self.seen += moving.shape[0]
        return super().forward(moving, fixed)


def test_inference_skips_patches_that_are_blank_on_both_sides() -> None:
    # tissue in the left 64 columns of the fixed image, in the top-right corner of the moving
    # one, nothing elsewhere: 4 x 6 patches at stride 32, of which those touching either are run
    fixed = torch.zeros(1, 1, 128, 192)
    fixed[..., :, :64] = _texture(128, 64)
    moving = torch.zeros_like(fixed)
    moving[..., :32, 160:] = 0.5
    net, counts = CountingNet(1.0, 0.0), PatchCounts()
    v = register_level(
        net, moving, fixed, plain(iterations=1, patch=64, stride=32, group=5), counts
    )
    geometry = tiling.unfold(fixed, 64, 32)[1]
    run = has_tissue(tiling.unfold(fixed, 64, 32, "constant")[0]) | has_tissue(
        tiling.unfold(moving, 64, 32, "constant")[0]
    )
    assert counts.run == net.seen == int(run.sum()) and counts.skipped == int((~run).sum()) > 0
    # run patches keep the prediction in their centres, skipped ones stay zero
    expected = tiling.fold_centres(run.float()[:, None, None, None].expand(-1, 2, 64, 64), geometry)
    assert torch.equal(v[:, 0], expected[:, 0]) and float(v[:, 1].abs().max()) == 0.0
    # a blank pair never calls the network; training still sees every patch
    blank = torch.zeros(1, 1, 64, 64)
    assert float(register_level(net, blank, blank, plain(patch=64, stride=32)).abs().max()) == 0.0
    assert net.seen == counts.run


def test_pyramid_upsamples_and_composes_between_levels() -> None:
    # levels coarse -> fine each predict c in their own pixels: 2 c (coarse, upsampled) + c
    model = MultiLevelModel.uniform(2, UNetConfig())
    model.levels = nn.ModuleList([ConstantNet(1.0, 0.25), ConstantNet(1.0, 0.25)])
    rgb = (torch.rand(1, 3, 75, 61) * 255).to(torch.uint8)  # odd sizes: padded, then cropped
    # (a constant prediction is a pure bias, which flip averaging cancels: see below)
    flat = dict(iterations=1, patch=64, stride=32, flips=1)
    u = register_pyramid(model, rgb, rgb, inference_settings(model, group=8, **flat))
    assert u.shape == (1, 2, 75, 61)
    assert torch.allclose(u[:, 0], torch.full_like(u[:, 0], 3.0), atol=1e-4)
    assert torch.allclose(u[:, 1], torch.full_like(u[:, 1], 0.75), atol=1e-4)
    # one level (the finest network only)
    u1 = register_pyramid(model, rgb, rgb, inference_settings(model, **flat), levels=1)
    assert torch.allclose(u1[:, 0], torch.full_like(u1[:, 0], 1.0), atol=1e-5)
    # the coarsest network alone, and sub-pyramids beyond the model
    u0 = register_pyramid(model, rgb, rgb, inference_settings(model, **flat), top_network=0)
    assert torch.allclose(u0[:, 0], torch.full_like(u0[:, 0], 1.0), atol=1e-5)
    with pytest.raises(ValueError, match="top_network"):
        register_pyramid(model, rgb, rgb, top_network=2)
    with pytest.raises(ValueError, match="levels"):
        register_pyramid(model, rgb, rgb, top_network=0, levels=2)


def test_pyramid_and_padding_helpers() -> None:
    img = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    padded = pad_to_multiple(img, 4, value=-1.0)
    assert padded.shape == (1, 2, 8, 8)
    assert torch.equal(padded[..., :5, :6], img) and float(padded[..., 5:, :].max()) == -1.0
    pyr = average_pyramid(padded, 3)
    assert [p.shape[-1] for p in pyr] == [2, 4, 8]
    assert torch.allclose(pyr[0].mean(), padded.mean())
    with pytest.raises(ValueError):
        average_pyramid(img, 2)


def test_network_input_is_one_channel_with_zero_background() -> None:
    rgb = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    rgb[..., 1:3, 1:3] = torch.tensor([120, 60, 140], dtype=torch.uint8).reshape(1, 3, 1, 1)
    rep = network_input(rgb)
    assert rep.shape == (1, 1, 4, 4)
    assert float(rep[..., 0, 0]) == 0.0 and float(rep[..., 1, 1]) > 0.3


def _epe(u: Tensor, truth: Tensor, mask: Tensor) -> float:
    return float(torch.linalg.vector_norm(u - truth, dim=1)[mask].mean())


@pytest.mark.skipif(not default_weights_path().is_file(), reason="no shipped weights")
def test_shipped_model_registers_a_synthetic_pair_better_than_identity() -> None:
    model = load_default()
    assert inference_settings(model).patch % 32 == 0
    shape, seed = (256, 256), 912  # an evaluation seed (training uses 100..107)
    source, target, truth = synthetic_pair(
        shape, seed, max_displacement=10.0, texture_downsample=2.0
    )
    src = torch.from_numpy(np.asarray(source)).permute(2, 0, 1)[None]
    tgt = torch.from_numpy(np.asarray(target)).permute(2, 0, 1)[None]
    true_u = torch.from_numpy(truth.field(shape))[None]  # target -> source, level-0 px
    tissue = get_texture(seed, shape, 2.0).structure(0, 0, *shape)[..., 3] > 0.5
    mask = torch.from_numpy(tissue)[None]
    u = register_pyramid(model, src, tgt)
    before = _epe(torch.zeros_like(u), true_u, mask)
    after = _epe(u, true_u, mask)
    assert after < 0.6 * before, (before, after)


class _ConstantNet(torch.nn.Module):
    """Predicts the same (x, y) shift whatever the input: a pure orientation bias."""

    def __init__(self, shift: tuple[float, float]) -> None:
        super().__init__()
        self.shift = torch.tensor(shift).view(1, 2, 1, 1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.shift.expand(moving.shape[0], 2, *moving.shape[-2:]).clone()


class _FlowNet(torch.nn.Module):
    """``u = grad(moving) * (fixed - moving)``: flip-equivariant (channel 0 = x, 1 = y)."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        gy, gx = torch.gradient(moving[:, 0], dim=(-2, -1))
        diff = (fixed - moving)[:, 0]
        return torch.stack((gx * diff, gy * diff), 1)


def test_flip_average_cancels_a_bias_and_keeps_an_equivariant_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(3, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    biased = _ConstantNet((1.5, -0.5))
    assert torch.equal(flip_averaged(biased, moving, fixed, flips=1), biased(moving, fixed))
    for flips in (2, 4):  # the 180-degree rotation alone cancels a bias of both components
        assert float(flip_averaged(biased, moving, fixed, flips).abs().max()) < 1e-6
        net = _FlowNet()
        expected = net(moving, fixed)
        assert float(expected.abs().mean()) > 0.01
        assert torch.allclose(flip_averaged(net, moving, fixed, flips), expected, atol=1e-6)


def test_precision_auto_follows_the_device_and_bfloat16_stays_close(monkeypatch) -> None:
    from wsireg.model import inference

    cpu = torch.device("cpu")
    assert network_dtype("float32", cpu) == torch.float32
    assert network_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: False)
    assert network_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: True)
    assert network_dtype("auto", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        network_dtype("float16", cpu)
    with pytest.raises(ValueError, match="precision"):
        InferenceSettings(precision="half")
    # the shipped networks in bfloat16: the field is close to float32's, not equal
    model = load_default()
    moving, fixed = _texture(128, 128, 1), _texture(128, 128, 2)
    net = model[model.num_levels - 1]
    fields = {
        p: register_level(net, moving, fixed, plain(iterations=2, precision=p))
        for p in ("float32", "bfloat16")
    }
    gap = (fields["float32"] - fields["bfloat16"]).abs()
    assert 0 < float(gap.max()) < 0.05 * max(1.0, float(fields["float32"].abs().max()))
    assert fields["bfloat16"].dtype == torch.float32
