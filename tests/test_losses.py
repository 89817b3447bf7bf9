"""Tests of wsireg.core.losses: NCC, local NCC, MIND-SSC and the regulariser."""

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


def test_mind_is_invariant_to_intensity_inversion() -> None:
    a = _texture()
    d = ls.mind_ssc(a)
    assert d.shape == (2, 4, 48, 48)
    assert d.min() >= 0 and d.max() <= 1 + 1e-12
    assert torch.allclose(ls.mind_ssc(1 - a), d, atol=1e-6)
    assert torch.allclose(ls.mind_ssc(5 * a + 2), d, atol=1e-6)
    shifted = torch.roll(a, 3, dims=-1)
    assert ((ls.mind_ssc(shifted) - d) ** 2).flatten(1).mean(1).min() > 1e-3


def test_mind_is_differentiable() -> None:
    a = _texture(1).float()
    b = a.clone().requires_grad_(True)
    ((ls.mind_ssc(a) - ls.mind_ssc(torch.roll(b, 1, dims=-2))) ** 2).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_box_means_agree_inside_and_differ_only_at_edges() -> None:
    a = _texture(1, 32).float()
    inner, replicated = ls.box_mean(a, 7), ls.box_mean_replicate(a, 7)
    assert inner.shape == replicated.shape == a.shape
    assert torch.allclose(inner[..., 3:-3, 3:-3], replicated[..., 3:-3, 3:-3], atol=1e-5)
    assert not torch.allclose(inner[..., 0, 0], replicated[..., 0, 0], atol=1e-4)
    # the same local NCC whichever box mean, away from the edges
    b = torch.roll(a, 1, dims=-1)
    maps = [ls.local_ncc_map(a, b, 7, box=box) for box in (ls.box_mean, ls.box_mean_replicate)]
    assert torch.allclose(maps[0][..., 3:-3, 3:-3], maps[1][..., 3:-3, 3:-3], atol=1e-4)


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
