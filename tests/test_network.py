"""Tests of wsireg.model.network: shapes, gradients, near-identity init, save/load, device."""

from __future__ import annotations

import json

import pytest
import torch

from wsireg.errors import WsiregError
from wsireg.model import network as nw

SMALL = nw.UNetConfig(widths=(4, 8, 16), head_width=4, norm_groups=2)


def test_default_network_shapes_and_size() -> None:
    net = nw.UNet()
    assert 0.8e6 < nw.num_parameters(net) < 1.0e6
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        out = net(x, x)
    assert out.shape == (2, 2, 64, 64)
    assert out.abs().max() < 1e-2  # last layer initialised near zero: ~identity


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = nw.UNet(SMALL)
    moving, fixed = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    out = net(moving, fixed)
    assert out.shape == (3, 2, 32, 32)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.encoder[0][0].weight.grad.abs().sum() > 0


def test_patch_size_must_be_a_multiple_of_two_to_the_depth() -> None:
    with pytest.raises(ValueError):
        nw.UNet(SMALL)(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20))


def test_output_scale() -> None:
    torch.manual_seed(0)
    a = nw.UNet(SMALL)
    b = nw.UNet(nw.UNetConfig(**{**SMALL.to_dict(), "widths": SMALL.widths, "output_scale": 4.0}))
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(b(x, x), 4.0 * a(x, x))


def test_config_json_round_trip() -> None:
    cfg = nw.UNetConfig(widths=(8, 16), head_width=8, output_scale=2.0)
    assert nw.UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _model() -> nw.MultiLevelModel:
    torch.manual_seed(0)
    model = nw.MultiLevelModel.uniform(2, SMALL, patch=32, stride=16)
    torch.nn.init.normal_(model[1].head[-1].weight, std=0.1)
    return model


def test_save_load_round_trip(tmp_path) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    digest = model.save(path)
    side = nw.checksum_path(path)
    assert side.name == "model.pt.json"
    manifest = json.loads(side.read_text())
    assert manifest["sha256"] == digest == nw.sha256_file(path)
    loaded = nw.MultiLevelModel.load(path)
    assert loaded.num_levels == 2 and loaded.metadata == {"patch": 32, "stride": 16}
    assert not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same weights, bit for bit
    conv = loaded[0].encoder[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # held NHWC for inference
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        for level in range(2):
            expected = model(level, x, x)  # NCHW kernels: equal to float rounding (px)
            torch.testing.assert_close(loaded(level, x, x), expected, rtol=1e-4, atol=1e-5)


def test_checksum_mismatch_and_missing_sidecar_raise(tmp_path) -> None:
    path = tmp_path / "model.pt"
    _model().save(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(nw.WeightsError, match="sha256"):
        nw.MultiLevelModel.load(path)
    assert issubclass(nw.WeightsError, WsiregError)

    path2 = tmp_path / "other.pt"
    _model().save(path2)
    nw.checksum_path(path2).unlink()
    with pytest.raises(nw.WeightsError, match="sidecar"):
        nw.MultiLevelModel.load(path2)
    assert nw.MultiLevelModel.load(path2, verify=False).num_levels == 2


def test_not_a_model_raises(tmp_path) -> None:
    path = tmp_path / "junk.pt"
    torch.save({"something": torch.zeros(3)}, path)
    nw.checksum_path(path).write_text(json.dumps({"sha256": nw.sha256_file(path)}))
    with pytest.raises(nw.WeightsError, match="not a wsireg model"):
        nw.MultiLevelModel.load(path)
    with pytest.raises(nw.WeightsError, match="not found"):
        nw.MultiLevelModel.load(tmp_path / "absent.pt")


def test_load_default(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "weights" / "default.pt"
    monkeypatch.setattr(nw, "default_weights_path", lambda: missing)
    with pytest.raises(nw.WeightsError, match="no default weights"):
        nw.load_default()
    missing.parent.mkdir()
    _model().save(missing)
    assert nw.load_default().num_levels == 2


def test_resolve_device() -> None:
    assert nw.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert nw.resolve_device("auto").type == expected
    assert nw.resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(WsiregError):
        nw.resolve_device("tpu-of-dreams")
    if not torch.cuda.is_available():
        with pytest.raises(WsiregError, match="CUDA"):
            nw.resolve_device("cuda")
