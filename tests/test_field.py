"""Tests of wsireg.core.field: warping, composition, resizing, inversion, Jacobian, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from wsireg.core import field as fl


def _sinusoid(h: int, w: int, amp: float = 3.0, period: float = 40.0) -> torch.Tensor:
    g = fl.identity_grid((h, w), dtype=torch.float64)
    x, y = g[:, 0], g[:, 1]
    k = 2 * math.pi / period
    return torch.stack((amp * torch.sin(k * y), amp * torch.cos(k * x)), dim=1)


def _translation(h: int, w: int, tx: float, ty: float) -> torch.Tensor:
    u = torch.zeros(1, 2, h, w, dtype=torch.float64)
    u[:, 0], u[:, 1] = tx, ty
    return u


def test_identity_grid_channels_are_x_then_y() -> None:
    g = fl.identity_grid((3, 5))
    assert g.shape == (1, 2, 3, 5)
    assert g[0, 0, 2, 4] == 4 and g[0, 1, 2, 4] == 2


def test_to_grid_sample_maps_corner_centres_to_pm1() -> None:
    pts = torch.tensor([[0.0, 0.0], [9.0, 4.0], [4.5, 2.0]])
    n = fl.to_grid_sample(pts, (5, 10))
    assert torch.allclose(n, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))


def test_warp_constant_integer_displacement_shifts_exactly() -> None:
    torch.manual_seed(0)
    moving = torch.rand(2, 3, 20, 30, dtype=torch.float64)
    u = _translation(20, 30, 3.0, -2.0)
    warped = fl.warp_image(moving, u)
    # warped[y, x] = moving[y - 2, x + 3] where both are inside
    assert torch.allclose(warped[:, :, 2:, :-3], moving[:, :, :-2, 3:], atol=1e-12)
    # border replicated outside
    assert torch.allclose(warped[:, :, 0, :-3], moving[:, :, 0, 3:], atol=1e-12)


def test_warp_zero_field_is_identity_and_constant_padding() -> None:
    moving = torch.rand(1, 3, 8, 9)
    assert torch.allclose(fl.warp_image(moving, torch.zeros(1, 2, 8, 9)), moving, atol=1e-6)
    far = torch.full((1, 2, 8, 9), 100.0)
    out = fl.warp_image(moving, far, padding=(1.0, 0.5, 0.25))
    assert torch.allclose(out, torch.tensor([1.0, 0.5, 0.25]).reshape(1, 3, 1, 1).expand_as(out))
    assert torch.all(fl.warp_image(moving, far, padding="zeros") == 0)


def test_warp_reads_a_larger_moving_grid_in_its_own_pixels() -> None:
    moving = torch.rand(1, 1, 40, 50, dtype=torch.float64)
    u = _translation(10, 12, 5.0, 7.0)
    out = fl.warp_image(moving, u)
    assert out.shape == (1, 1, 10, 12)
    assert torch.allclose(out, moving[:, :, 7:17, 5:17], atol=1e-12)


def test_warp_is_differentiable_in_the_field() -> None:
    moving = torch.rand(1, 1, 16, 16)
    u = torch.zeros(1, 2, 16, 16, requires_grad=True)
    fl.warp_image(moving, u + 0.3).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_compose_two_translations_adds_them() -> None:
    w = fl.compose(_translation(16, 20, 1.5, -2.0), _translation(16, 20, 0.25, 3.0))
    assert torch.allclose(w, _translation(16, 20, 1.75, 1.0), atol=1e-12)


def test_compose_translation_after_sinusoid_is_exact() -> None:
    v = _sinusoid(48, 64)
    w = fl.compose(_translation(48, 64, 2.0, -1.0), v)  # u constant: w = v + t
    assert torch.allclose(w, v + _translation(48, 64, 2.0, -1.0), atol=1e-12)


def test_compose_sinusoid_after_translation_matches_analytic() -> None:
    h, w_ = 48, 64
    t = (2.3, -1.7)
    amp, period = 3.0, 40.0
    w = fl.compose(_sinusoid(h, w_, amp, period), _translation(h, w_, *t))
    g = fl.identity_grid((h, w_), dtype=torch.float64)
    k = 2 * math.pi / period
    x, y = g[:, 0] + t[0], g[:, 1] + t[1]
    expected = torch.stack((t[0] + amp * torch.sin(k * y), t[1] + amp * torch.cos(k * x)), dim=1)
    err = (w - expected)[:, :, 3:-3, 3:-3].abs().max()
    assert err < amp * k**2 / 8 + 1e-9  # bilinear interpolation error bound


def test_compose_matches_warping_twice() -> None:
    h, w_ = 64, 64
    g = fl.identity_grid((h, w_), dtype=torch.float64)
    moving = torch.sin(g[:, :1] / 7.0) * torch.cos(g[:, 1:] / 9.0)
    u, v = 0.5 * _sinusoid(h, w_, 2.0, 50.0), _translation(h, w_, 1.25, -0.75)
    twice = fl.warp_image(fl.warp_image(moving, u), v)
    once = fl.warp_image(moving, fl.compose(u, v))
    # twice interpolates `moving` twice: error ~ 2 * |k|^2 / 8 = 2 * (1/7)^2 / 8 ~ 5e-3
    assert (twice - once)[:, :, 4:-4, 4:-4].abs().max() < 1e-2


def test_rescale_field_per_axis() -> None:
    u = torch.ones(1, 2, 3, 3)
    out = fl.rescale_field(u, (2.0, 0.5))
    assert torch.all(out[:, 0] == 2.0) and torch.all(out[:, 1] == 0.5)
    assert torch.all(fl.rescale_field(u, 4) == 4.0)


def test_resize_constant_field_scales_values_by_size_ratio() -> None:
    u = torch.stack((torch.full((10, 20), 2.0), torch.full((10, 20), 3.0))).unsqueeze(0)
    up = fl.resize_field(u, (30, 40))
    assert up.shape == (1, 2, 30, 40)
    assert torch.allclose(up[:, 0], torch.tensor(4.0)) and torch.allclose(
        up[:, 1], torch.tensor(9.0)
    )


def test_resize_of_affine_field_follows_pyramid_geometry() -> None:
    # coarse field u_c(x_c) = (a x_c + b, c y_c) in coarse pixels; fine pixel x_f sits at
    # x_c = (x_f + 0.5) / 2 - 0.5 (wsireg.core.coords) and its displacement is 2 u_c(x_c) fine
    # pixels.
    a, b, c = 0.1, 1.0, -0.2
    gc = fl.identity_grid((16, 16), dtype=torch.float64)
    uc = torch.stack((a * gc[:, 0] + b, c * gc[:, 1]), dim=1)
    uf = fl.resize_field(uc, (32, 32))
    gf = fl.identity_grid((32, 32), dtype=torch.float64)
    xc, yc = (gf[:, 0] + 0.5) / 2 - 0.5, (gf[:, 1] + 0.5) / 2 - 0.5
    expected = torch.stack((2 * (a * xc + b), 2 * c * yc), dim=1)
    assert torch.allclose(uf[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-12)


def test_jacobian_determinant() -> None:
    g = fl.identity_grid((10, 12), dtype=torch.float64)
    assert torch.allclose(
        fl.jacobian_determinant(_translation(10, 12, 3, 4)), torch.tensor(1.0).double()
    )
    u = torch.cat((0.5 * g[:, :1], -0.25 * g[:, 1:]), dim=1)
    det = fl.jacobian_determinant(u)
    assert det.shape == (1, 10, 12)
    assert torch.allclose(det, torch.tensor(1.5 * 0.75).double())
    folded = torch.cat((-2.0 * g[:, :1], torch.zeros_like(g[:, :1])), dim=1)
    assert torch.all(fl.jacobian_determinant(folded) < 0)


@pytest.mark.parametrize("size", [(1, 5), (5, 1)])
def test_degenerate_axis_does_not_divide_by_zero(size: tuple[int, int]) -> None:
    img = torch.rand(1, 1, *size)
    out = fl.warp_image(img, torch.zeros(1, 2, *size))
    assert torch.allclose(out, img)


def test_batch_of_one_broadcasts() -> None:
    moving = torch.rand(1, 1, 8, 8)
    u = torch.zeros(3, 2, 8, 8)
    u[1] += 1.0
    out = fl.warp_image(moving, u)
    assert out.shape == (3, 1, 8, 8)
    assert torch.allclose(out[0], moving[0], atol=1e-6)
    assert fl.compose(torch.zeros(1, 2, 8, 8), u).shape == (3, 2, 8, 8)
