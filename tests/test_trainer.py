"""Algorithm 1's training branch (wsireg.model.trainer) with stand-in networks: the same loop as
inference (tests/test_algorithm.py), with optimiser steps per group."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from wsireg.core import field
from wsireg.model.inference import register_level
from wsireg.model.trainer import GroupTrainer, train_level

from .test_algorithm import ConstantNet, _texture, plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_trainer_steps_only_the_selected_groups() -> None:
    net = ConstantNet(0.0, 0.0)
    calls = []

    class Counting(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            calls.append(1)
            return super().step(closure)

    trainer = GroupTrainer(Counting(net.parameters(), lr=0.0), alpha=1.0, max_groups=2)
    img = _texture(128, 128)
    train_level(net, img, img, plain(iterations=3, patch=64, stride=32, group=3), trainer)
    assert len(calls) == 3 * 2  # 16 patches = 6 groups of <= 3; 2 trained per iteration
    assert len(trainer.losses) == 6


def test_training_branch_moves_a_translation_net_towards_the_truth() -> None:
    # fixed(x) = moving(x + t) for "tissue" on a zero background: minimising -NCC drives a
    # constant-field "network" to t
    moving = torch.nn.functional.pad(_texture(64, 64, 7), (16, 16, 16, 16))
    t = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1).expand(1, 2, 96, 96)
    fixed = field.warp_image(moving, t, padding=0.0)
    net = ConstantNet(0.0, 0.0)
    trainer = GroupTrainer(torch.optim.Adam(net.parameters(), lr=0.1), alpha=0.0)
    for _ in range(20):
        train_level(net, moving, fixed, plain(iterations=1, patch=64, stride=32, group=4), trainer)
    assert torch.allclose(net.value.detach(), torch.tensor([2.0, -1.0]), atol=0.25)
    assert trainer.losses[-1] < trainer.losses[0] - 0.05


class ContentNet(nn.Module):
    """An input-dependent stand-in: ``u = w * (moving - fixed)`` in both channels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        return self.w * torch.cat((moving - fixed, fixed - moving), dim=1)


def test_training_mode_shuffles_groups_but_returns_the_inference_field() -> None:
    # with a zero learning rate, training only reorders the patches into groups: the folded
    # field must equal the inference one (every prediction is put back in place)
    net = ContentNet()
    a = torch.cat([_texture(96, 96, 11), _texture(96, 96, 12)])
    b = torch.cat([_texture(96, 96, 13), _texture(96, 96, 14)])
    settings = plain(iterations=2, patch=64, stride=32, group=3)
    ref = register_level(net, a, b, settings)
    trainer = GroupTrainer(
        torch.optim.SGD(net.parameters(), lr=0.0),
        alpha=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    got = train_level(net, a, b, settings, trainer)
    assert float(ref.abs().max()) > 0.1
    assert torch.allclose(ref, got, atol=1e-5)


def test_supervision_pulls_towards_the_known_residual() -> None:
    # blank images carry no similarity gradient: only the end-point-error term acts
    blank = torch.zeros(1, 1, 64, 64)
    target = torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1).expand(1, 2, 64, 64)
    net = ConstantNet(0.0, 0.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    trainer = GroupTrainer(opt, alpha=0.0, supervision=1.0)
    for _ in range(30):
        train_level(
            net, blank, blank, plain(iterations=1, patch=64, stride=32), trainer, target=target
        )
    assert torch.allclose(net.value.detach(), torch.tensor([1.0, -0.5]), atol=0.1)
    # without supervision the same run does not move
    still = ConstantNet(0.0, 0.0)
    idle = GroupTrainer(torch.optim.Adam(still.parameters(), lr=0.05), alpha=0.0)
    train_level(still, blank, blank, plain(iterations=1, patch=64, stride=32), idle, target=target)
    assert float(still.value.detach().abs().max()) < 1e-6
