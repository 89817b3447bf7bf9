"""Tests of wsireg.core.stain: optical density, the network input and the tissue rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsireg.core import stain
from wsireg.errors import InputError


def test_optical_density_is_one_formula_for_numpy_and_torch() -> None:
    grey = np.array([0.0, 9.0, 99.0, 254.0, 255.0], np.float32)
    expected = -np.log10((grey + 1.0) / 256.0)
    assert np.allclose(stain.optical_density(grey), expected, atol=1e-6)
    assert torch.allclose(stain.optical_density(torch.from_numpy(grey)), torch.from_numpy(expected))
    # against a glass colour, without the dark offset: black is floored at one grey level
    rel = stain.optical_density(grey, background=200.0, offset=0.0)
    assert rel[0] == pytest.approx(math.log10(200.0), rel=1e-6)
    assert rel[2] == pytest.approx(-math.log10(99.0 / 200.0), rel=1e-6)
    assert rel[-1] == 0.0 and rel[-2] == 0.0  # brighter than the glass: clipped at 0


def test_od_magnitude_and_the_stained_rule() -> None:
    rgb = np.full((4, 4, 3), 255, np.uint8)
    rgb[0, 0] = (250, 250, 250)  # faint: below the tissue threshold
    rgb[1, 1] = (200, 150, 210)  # stained
    mag = stain.od_magnitude_rgb(rgb)
    assert mag.shape == (4, 4) and mag[3, 3] == 0.0
    assert mag[0, 0] < stain.TISSUE_OD < mag[1, 1]
    assert stain.stained(rgb).sum() == 1 and stain.stained(rgb)[1, 1]
    # the torch network input is the same magnitude, over the reference
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    assert torch.allclose(
        stain.od_magnitude(t)[0, 0], torch.from_numpy(mag / stain.OD_REFERENCE), atol=1e-6
    )


def test_has_tissue_counts_a_share_of_stained_pixels() -> None:
    images = torch.zeros(3, 1, 32, 32)
    images[1, :, :4, :4] = 0.5  # 16 / 1024 pixels: above the share
    images[2, :, 0, 0] = 0.5  # 1 / 1024: below
    assert stain.has_tissue(images).tolist() == [False, True, False]


def test_tissue_mask_finds_a_stained_disc_and_refuses_a_blank_image() -> None:
    yy, xx = np.mgrid[0:200, 0:300]
    rgb = np.full((200, 300, 3), 245, np.uint8)
    disc = (yy - 100) ** 2 + (xx - 150) ** 2 < 60**2
    rgb[disc] = (180, 120, 190)
    mask = stain.tissue_mask(rgb, "disc.png")
    assert abs(int(mask.sum()) - int(disc.sum())) < 0.05 * disc.sum()
    with pytest.raises(InputError, match="blank.png: no tissue found"):
        stain.tissue_mask(np.full((64, 64, 3), 240, np.uint8), "blank.png")
    with pytest.raises(InputError, match="grey.png"):
        stain.tissue_mask(np.zeros((64, 64), np.uint8), "grey.png")


def test_network_input_representations() -> None:
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    rgb[:, :, 0, 0] = 255
    rgb[:, :, 0, 1] = 0
    for rep in ("od", "grey"):
        x = stain.network_input(rgb, rep)
        assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
        assert torch.all(x[:, :, 0, 0] == 0)  # white background -> 0
        assert torch.all(x[:, :, 0, 1] == 1)  # black -> saturated
        assert torch.allclose(stain.network_input(rgb.float() / 255, rep), x, atol=1e-6)
    with pytest.raises(ValueError):
        stain.network_input(rgb, "pca")
    with pytest.raises(ValueError):
        stain.network_input(rgb[:, :1])


def test_haematoxylin_unmixes_the_nuclear_stain() -> None:
    def dyed(vector: tuple[float, float, float], amount: float) -> torch.Tensor:
        v = torch.tensor(vector, dtype=torch.float64)
        od = amount * v / v.norm()  # log10 optical density of ``amount`` of the dye
        unit = ((256.0 * 10.0 ** (-od) - 1.0) / 255.0).clamp(0, 1)
        return unit.float().view(1, 3, 1, 1)

    h = [float(stain.haematoxylin(dyed(stain.HEMATOXYLIN, a))) for a in (0.3, 0.6)]
    assert h[0] == pytest.approx(0.3 / stain.OD_REFERENCE, rel=0.02)
    assert h[1] == pytest.approx(2 * h[0], rel=0.02)  # linear in the dye amount
    # eosin alone is not haematoxylin
    assert float(stain.haematoxylin(dyed(stain.EOSIN, 0.8))) < 0.02
    white = torch.ones(1, 3, 2, 2)
    assert torch.all(stain.network_input(white, "haematoxylin") == 0)


def test_on_white_glass_makes_the_slides_glass_white() -> None:
    rgb = np.array([[[220, 220, 220], [110, 55, 0], [230, 240, 250]]], np.uint8)
    white = stain.on_white_glass(rgb, (220.0, 220.0, 220.0))
    assert white.dtype == np.uint8
    assert white[0, 0].tolist() == [255, 255, 255]  # the glass
    assert white[0, 1].tolist() == [128, 64, 0]  # stain keeps its transmittance ratio
    assert white[0, 2].tolist() == [255, 255, 255]  # brighter than the glass: clipped
    assert stain.on_white_glass(rgb, stain.WHITE) is rgb
    # grey glass reads as stained everywhere, white glass does not
    assert stain.stained(rgb)[0, 0] and not stain.stained(white)[0, 0]
