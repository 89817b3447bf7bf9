"""Tests of wsireg.core.losses: NCC, local NCC, MIND-SSC, regularisers and the network input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsireg.core import losses as ls
from wsireg.core.field import identity_grid


def _texture(n: int = 2, size: int = 48) -> torch.Tensor:
    torch.manual_seed(0)
    noise = torch.rand(n, 1, size, size, dtype=torch.float64)
    return F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)


def test_ncc_identical_inverted_affine() -> None:
    a = _texture()
    assert ls.ncc(a, a).shape == (2,)
    assert torch.allclose(ls.ncc(a, a), torch.ones(2).double())
    assert torch.allclose(ls.ncc(a, 1 - a), -torch.ones(2).double())
    b = torch.rand_like(a)
    assert torch.allclose(ls.ncc(a, 3.0 * b + 7.0), ls.ncc(a, b))
    assert torch.isfinite(ls.ncc(torch.zeros_like(a), a)).all()


def test_local_ncc_identical_inverted_affine() -> None:
    a = _texture()
    assert torch.allclose(ls.local_ncc(a, a, eps=1e-12), torch.ones(2).double(), atol=1e-4)
    assert torch.allclose(ls.local_ncc(a, 1 - a, eps=1e-12), -torch.ones(2).double(), atol=1e-4)
    b = torch.rand_like(a)
    assert torch.allclose(
        ls.local_ncc(a, 2.0 * b + 1.0, eps=1e-12), ls.local_ncc(a, b, eps=1e-12), atol=1e-4
    )
    with pytest.raises(ValueError):
        ls.local_ncc(a, a, window=4)


def test_curvature_linear_is_zero_quadratic_is_known() -> None:
    g = identity_grid((20, 24), dtype=torch.float64)
    x, y = g[:, 0], g[:, 1]
    linear = torch.stack((0.3 * x - 0.2 * y + 1, 0.1 * x + 2.0), dim=1)
    assert torch.allclose(ls.curvature(linear), torch.zeros(1).double(), atol=1e-20)
    a, b = 0.05, -0.02
    quad = torch.stack((a * x**2 + b * y**2, 0.5 * x + 1.0), dim=1)
    assert torch.allclose(ls.curvature(quad), torch.tensor([(2 * a + 2 * b) ** 2 / 2]).double())


def test_diffusion_values() -> None:
    g = identity_grid((10, 12), dtype=torch.float64)
    translation = torch.ones(1, 2, 10, 12, dtype=torch.float64)
    assert ls.diffusion(translation).item() == 0.0
    stretch = torch.cat((0.5 * g[:, :1], torch.zeros_like(g[:, :1])), dim=1)
    assert torch.allclose(ls.diffusion(stretch), torch.tensor([0.25 / 2]).double())


def test_mind_is_invariant_to_intensity_inversion() -> None:
    a = _texture()
    d = ls.mind_ssc(a)
    assert d.shape == (2, 4, 48, 48)
    assert d.min() >= 0 and d.max() <= 1 + 1e-12
    assert torch.allclose(ls.mind_ssc(1 - a), d, atol=1e-6)
    assert torch.allclose(ls.mind_ssc(5 * a + 2), d, atol=1e-6)
    assert ls.mind_loss(a, 1 - a).max() < 1e-10
    shifted = torch.roll(a, 3, dims=-1)
    assert (ls.mind_loss(a, shifted) > 1e-3).all()


def test_mind_loss_is_differentiable() -> None:
    a = _texture(1).float()
    b = a.clone().requires_grad_(True)
    ls.mind_loss(a, torch.roll(b, 1, dims=-2)).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_registration_loss_identity() -> None:
    a = _texture()
    loss = ls.registration_loss(a, a, torch.zeros(2, 2, 48, 48, dtype=torch.float64), alpha=10)
    assert loss.dim() == 0 and torch.isclose(loss, torch.tensor(-1.0).double())


def test_squared_local_ncc_loss_ignores_polarity_unlike_ncc() -> None:
    a = _texture()
    zero = torch.zeros(2, 2, 48, 48, dtype=torch.float64)
    same = ls.registration_loss(a, a, zero, alpha=0, similarity="lncc2")
    inverted = ls.registration_loss(1 - a, a, zero, alpha=0, similarity="lncc2")
    assert float(same) < -0.8 and torch.isclose(same, inverted)  # eps damps flat windows
    assert torch.isclose(ls.registration_loss(1 - a, a, zero, alpha=0), torch.tensor(1.0).double())
    shifted = ls.registration_loss(torch.roll(a, 3, dims=-1), a, zero, alpha=0, similarity="lncc2")
    assert float(shifted) > float(same) + 0.2  # misalignment costs
    with pytest.raises(ValueError, match="unknown similarity"):
        ls.registration_loss(a, a, zero, alpha=0, similarity="mi")


def test_network_input_representations() -> None:
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    rgb[:, :, 0, 0] = 255
    rgb[:, :, 0, 1] = 0
    for rep in ("od", "grey"):
        x = ls.to_network_input(rgb, rep)
        assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
        assert torch.all(x[:, :, 0, 0] == 0)  # white background -> 0
        assert torch.all(x[:, :, 0, 1] == 1)  # black -> saturated
        assert torch.allclose(ls.to_network_input(rgb.float() / 255, rep), x, atol=1e-6)
    with pytest.raises(ValueError):
        ls.to_network_input(rgb, "pca")
    with pytest.raises(ValueError):
        ls.to_network_input(rgb[:, :1])


def test_haematoxylin_unmixes_the_nuclear_stain() -> None:
    from wsireg.core.stain import EOSIN, HEMATOXYLIN

    def dyed(vector: tuple[float, float, float], amount: float) -> torch.Tensor:
        v = torch.tensor(vector, dtype=torch.float64)
        od = amount * v / v.norm()  # log10 optical density of ``amount`` of the dye
        unit = ((256.0 * 10.0 ** (-od) - 1.0) / 255.0).clamp(0, 1)
        return unit.float().view(1, 3, 1, 1)

    h = [float(ls.haematoxylin(dyed(HEMATOXYLIN, a))) for a in (0.3, 0.6)]
    assert h[0] == pytest.approx(0.3 / ls.OD_REFERENCE, rel=0.02)
    assert h[1] == pytest.approx(2 * h[0], rel=0.02)  # linear in the dye amount
    assert float(ls.haematoxylin(dyed(EOSIN, 0.8))) < 0.02  # eosin alone is not haematoxylin
    white = torch.ones(1, 3, 2, 2)
    assert torch.all(ls.to_network_input(white, "haematoxylin") == 0)
