"""How well each network input representation matches across stains on the real ANHIR pairs.

For each pair of ``anhir-5pc/pairs.csv`` the source is resampled onto the target through the
affine fitted to the landmarks by least squares (so the remaining misalignment is the pair's
true non-affine part plus landmark noise, a few px at most). Both images are converted to each
representation of :data:`wsireg.core.stain.REPRESENTATIONS` and averaged down by 4, 2 and 1. On a
grid of tissue patches (64 px, stride 32) the patch NCC is searched exhaustively over integer
shifts of up to +-8 px; a representation in which the two stains correspond gives its best NCC
near zero shift. Prints per pair, factor and representation the mean and median distance of
the best shift from zero (px of that level; a random best shift averages about 5.6 px) and the
mean best NCC. One JSON line each. The landmarks are used to fit the affine only; this is a
diagnostic of the input, measured on the evaluation pairs (it chose nothing by itself: see
``wsireg/weights/README.md``).

Then, per image (the ANHIR images and the held-out regions of the training slides,
:func:`wsireg.model.training_data.heldout_region`): the angle between the image's own
haematoxylin vector, estimated the way of Macenko et al. (2009: the plane of the two main
optical-density directions of tissue pixels, its 1st and 99th angle percentiles, haematoxylin
the one with the larger red component), and the fixed Ruifrok & Johnston vector that
:func:`haematoxylin` uses; and the mean of the ``"haematoxylin"`` representation over tissue
pixels.

    python benchmarks/representation_similarity.py
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsireg.core import field, losses, stain
from wsireg.core.stain import TISSUE_LEVEL, dye_basis
from wsireg.io.annotations import read_landmarks
from wsireg.model.training_data import heldout_region

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PATCH, STEP, SEARCH = 64, 32, 8


def _rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0


def fitted_affine(source_pts: np.ndarray, target_pts: np.ndarray) -> np.ndarray:
    """Least-squares ``(2, 3)`` affine mapping target points onto source points."""
    design = np.c_[target_pts, np.ones(len(target_pts))]
    coef, *_ = np.linalg.lstsq(design, source_pts, rcond=None)
    return coef.T


def resample(source: torch.Tensor, matrix: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """``source`` read at ``matrix @ (x, y, 1)`` for every target pixel (white outside)."""
    grid = field.identity_grid(shape, dtype=torch.float64)
    positions = torch.einsum("ij,njhw->nihw", torch.from_numpy(matrix[:, :2]), grid)
    positions = positions + torch.from_numpy(matrix[:, 2]).view(1, 2, 1, 1)
    return field.sample(source, positions.float(), padding=1.0)


def best_shifts(moving: torch.Tensor, fixed: torch.Tensor, tissue: torch.Tensor) -> np.ndarray:
    """Per tissue patch of ``fixed``: (distance of the best-NCC shift, best NCC)."""
    h, w = fixed.shape[-2:]
    rows = []
    for y in range(SEARCH, h - PATCH - SEARCH, STEP):
        for x in range(SEARCH, w - PATCH - SEARCH, STEP):
            if tissue[..., y : y + PATCH, x : x + PATCH].mean() < 0.05:
                continue
            ref = fixed[..., y : y + PATCH, x : x + PATCH]
            window = moving[..., y - SEARCH : y + PATCH + SEARCH, x - SEARCH : x + PATCH + SEARCH]
            cands = window.unfold(-2, PATCH, 1).unfold(-2, PATCH, 1)  # (1,1,17,17,P,P)
            cands = cands.reshape(-1, 1, PATCH, PATCH)
            scores = losses.ncc(cands, ref.expand_as(cands)).reshape(-1)
            k = int(torch.argmax(scores))
            dy, dx = divmod(k, 2 * SEARCH + 1)
            rows.append((np.hypot(dx - SEARCH, dy - SEARCH), float(scores[k])))
    return np.array(rows)


def macenko_haematoxylin(rgb: torch.Tensor) -> np.ndarray:
    """Unit haematoxylin OD vector (R, G, B) of ``(1, 3, H, W)`` RGB (module docstring)."""
    od = stain.optical_density(rgb.float())[0].reshape(3, -1).T.double().numpy()
    od = od[np.linalg.norm(od, axis=1) > 0.15]
    plane = np.linalg.svd(od, full_matrices=False)[2][:2]
    plane[0] *= np.sign(plane[0].sum())
    angle = np.arctan2(od @ plane[1], od @ plane[0])
    ends = [np.cos(a) * plane[0] + np.sin(a) * plane[1] for a in np.percentile(angle, [1, 99])]
    ends = [v * np.sign(v.sum()) / np.linalg.norm(v) for v in ends]
    return max(ends, key=lambda v: v[0])


def stain_rows(images: dict[str, torch.Tensor]) -> None:
    """Print the stain-vector line of each image (module docstring)."""
    ref = dye_basis()[0]
    for name, rgb in images.items():
        est = macenko_haematoxylin(rgb)
        od = stain.od_magnitude(rgb)
        tissue = od > TISSUE_LEVEL
        row = {
            "benchmark": "representation_similarity",
            "image": name,
            "haematoxylin_vector": [round(float(v), 3) for v in est],
            "angle_to_ruifrok_deg": round(float(np.degrees(np.arccos(min(1.0, est @ ref)))), 1),
            "mean_haematoxylin_in_tissue": round(float(stain.haematoxylin(rgb)[tissue].mean()), 3),
            "mean_od_in_tissue": round(float(od[tissue].mean()), 3),
        }
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anhir", type=Path, default=SHARED / "anhir-5pc")
    parser.add_argument("--slides-dir", type=Path, default=SHARED / "slides")
    args = parser.parse_args()
    with open(args.anhir / "pairs.csv", newline="") as fh:
        pairs = list(csv.DictReader(fh))
    images = {}
    for row in pairs:
        target = _rgb(args.anhir / row["Target image"])
        source = _rgb(args.anhir / row["Source image"])
        images[row["Target image"]] = target
        images[row["Source image"]] = source
        lm_t = read_landmarks(args.anhir / row["Target landmarks"])
        lm_s = read_landmarks(args.anhir / row["Source landmarks"])
        n = min(len(lm_t), len(lm_s))
        matrix = fitted_affine(lm_s[:n], lm_t[:n])
        moving = resample(source, matrix, tuple(target.shape[-2:]))
        inputs = {
            rep: (stain.network_input(moving, rep), stain.network_input(target, rep))
            for rep in stain.REPRESENTATIONS
        }
        target_od = stain.od_magnitude(target)
        for factor in (4, 2, 1):
            tissue = F.avg_pool2d(target_od, factor) > TISSUE_LEVEL
            for rep, (moving_in, target_in) in inputs.items():
                a = F.avg_pool2d(moving_in, factor)
                b = F.avg_pool2d(target_in, factor)
                res = best_shifts(a, b, tissue.float())
                print(
                    json.dumps(
                        {
                            "benchmark": "representation_similarity",
                            "pair": row["Target image"].split("_")[0],
                            "downsample": factor,
                            "representation": rep,
                            "patches": len(res),
                            "mean_best_shift_px": round(float(res[:, 0].mean()), 2),
                            "median_best_shift_px": round(float(np.median(res[:, 0])), 2),
                            "mean_best_ncc": round(float(res[:, 1].mean()), 3),
                        }
                    ),
                    flush=True,
                )
    for name in ("cmu", "tcga", "ihc"):
        region = heldout_region(name, args.slides_dir)[::2, ::2]  # every 2nd px is plenty
        images[f"held-out {name}"] = torch.from_numpy(region.copy()).permute(2, 0, 1)[None] / 255.0
    stain_rows(images)


if __name__ == "__main__":
    main()
