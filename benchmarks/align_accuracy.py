"""Accuracy and speed of the initial affine alignment (:mod:`wsireg.engine.align`) on real
stain pairs.

Data: ``../shared/data/anhir-5pc`` (two ANHIR pairs with expert landmarks; read its README).
The landmarks are used for evaluation only. The 5 % images are treated as level 0.

Metric: ANHIR rTRE. The estimated affine ``A`` maps target -> source; the source landmarks are
mapped into the target with ``A^-1`` and compared with the target landmarks; the distance is
divided by the target image diagonal (pairs.csv). Reported: median rTRE per pair (%), next to
no registration and the least-squares affine of the landmarks (the floor of any affine).

Variants (:class:`Variant`): the same pairs with the source rotated about its centre (canvas
enlarged, white fill), mirrored, torn (a side whitened; its landmarks are still evaluated),
rescaled, padded, or with the roles swapped; the source landmarks follow. ``--stress`` adds
harder ones, ``--random N`` N seeded random ones per pair (held-out checks).

Synthetic: ``skimage.data.immunohistochemistry()`` warped by a known affine with a colour
change (mean mapping error, px), and :mod:`wsireg.synthetic.texture` H&E / IHC pairs with any
rotation, mirrors and a smooth nonrigid part (median landmark error vs the affine floor, px).

Run: ``python benchmarks/align_accuracy.py [--quick] [--stress] [--random N] [--set K=V]``
(``--set`` overrides an :class:`~wsireg.engine.align.AlignConfig` field). Timings are per pair,
after a first call that also pays torch's start-up.
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsireg.engine.align import AlignConfig, align

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "anhir-5pc"


@dataclass
class Pair:
    """A target (fixed) / source (moving) image pair with corresponding landmarks ``(x, y)``."""

    name: str
    target: np.ndarray
    source: np.ndarray
    target_points: np.ndarray
    source_points: np.ndarray
    diagonal: float


def read_points(path: Path) -> np.ndarray:
    """ANHIR landmark CSV (header ``,X,Y``) as an ``(N, 2)`` float array of ``(x, y)``."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return np.array([[float(r[1]), float(r[2])] for r in rows if r])


def load_pairs(root: Path = DATA) -> list[Pair]:
    """The pairs listed in ``root/pairs.csv``."""
    pairs = []
    with open(root / "pairs.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            tp = read_points(root / row["Target landmarks"])
            sp = read_points(root / row["Source landmarks"])
            n = min(len(tp), len(sp))
            pairs.append(
                Pair(
                    name=row["Target image"].split("/")[0].strip("_"),
                    target=np.asarray(Image.open(root / row["Target image"]).convert("RGB")),
                    source=np.asarray(Image.open(root / row["Source image"]).convert("RGB")),
                    target_points=tp[:n],
                    source_points=sp[:n],
                    diagonal=float(row["Image diagonal [pixels]"]),
                )
            )
    return pairs


def median_rtre(pair: Pair, matrix: np.ndarray) -> float:
    """Median rTRE (fraction) of a target -> source affine: source landmarks mapped by ``A^-1``."""
    inv = np.linalg.inv(matrix)
    src = np.hstack([pair.source_points, np.ones((len(pair.source_points), 1))])
    warped = (inv @ src.T).T[:, :2]
    return float(np.median(np.linalg.norm(warped - pair.target_points, axis=1)) / pair.diagonal)


def landmark_affine(pair: Pair) -> np.ndarray:
    """Least-squares target -> source affine fitted to the landmarks (the floor of any affine)."""
    tp = np.hstack([pair.target_points, np.ones((len(pair.target_points), 1))])
    sol, *_ = np.linalg.lstsq(tp, pair.source_points, rcond=None)
    return np.vstack([sol.T, [0.0, 0.0, 1.0]])


def rotate_image(
    rgb: np.ndarray, angle_deg: float, mirror: bool, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror (left-right, optional), scale and rotate ``rgb`` about its centre.

    The canvas is enlarged to hold the result (white fill). Returns the new image and the 3x3
    affine taking old pixel ``(x, y)`` to new.
    """
    h, w = rgb.shape[:2]
    a = math.radians(angle_deg)
    c, s = abs(math.cos(a)) * scale, abs(math.sin(a)) * scale
    nw, nh = int(math.ceil(w * c + h * s)), int(math.ceil(w * s + h * c))
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    flip = np.array([[-1.0, 0, w - 1.0], [0, 1, 0], [0, 0, 1]]) if mirror else np.eye(3)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rot[:2, :2] *= scale
    to_origin = np.array([[1.0, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    to_new = np.array([[1.0, 0, (nw - 1) / 2.0], [0, 1, (nh - 1) / 2.0], [0, 0, 1]])
    fwd = to_new @ rot @ to_origin @ flip
    out = cv2.warpAffine(
        rgb,
        fwd[:2],
        (nw, nh),
        flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255),
    )
    return out, fwd


@dataclass(frozen=True)
class Variant:
    """A modification of a pair's source (landmarks follow; applied in the order listed)."""

    swap: bool = False  # exchange source and target first (the reverse registration)
    erase: float = 0.0  # whiten this fraction of the source on side ``erase_side`` (torn tissue)
    erase_side: str = "right"  # right, left, top, bottom
    scale: float = 1.0  # resize the source (different shrinkage / magnification)
    angle: float = 0.0  # rotate the source about its centre (degrees, +x towards +y)
    mirror: bool = False  # mirror the source left-right before rotating
    pad: float = 0.0  # add this fraction of the size as white margin on each side

    def label(self) -> str:
        parts = ["swap"] if self.swap else []
        parts += [f"erase {self.erase_side} {self.erase:g}"] if self.erase else []
        parts += [f"scale {self.scale:g}"] if self.scale != 1 else []
        parts += [f"rot {self.angle:g}"] if self.angle or not parts else []
        parts += ["mirror"] if self.mirror else []
        parts += [f"pad {self.pad:g}"] if self.pad else []
        return " ".join(parts)


def _erase(rgb: np.ndarray, fraction: float, side: str) -> np.ndarray:
    out = rgb.copy()
    h, w = rgb.shape[:2]
    nh, nw = int(round(h * fraction)), int(round(w * fraction))
    region = {
        "right": np.s_[:, w - nw :],
        "left": np.s_[:, :nw],
        "top": np.s_[:nh],
        "bottom": np.s_[h - nh :],
    }[side]
    out[region] = 255
    return out


def transformed_pair(pair: Pair, v: Variant) -> Pair:
    """``pair`` with the source modified by ``v`` (its landmarks transformed consistently).

    Erased tissue keeps its landmarks (they are still evaluated: an affine must extrapolate).
    """
    if v.swap:
        diag = float(math.hypot(*pair.source.shape[:2]))
        pair = Pair(
            pair.name, pair.source, pair.target, pair.source_points, pair.target_points, diag
        )
    source = _erase(pair.source, v.erase, v.erase_side) if v.erase else pair.source
    img, fwd = rotate_image(source, v.angle, v.mirror, v.scale)
    if v.pad:
        m = int(round(v.pad * max(img.shape[:2])))
        img = cv2.copyMakeBorder(img, m, m, m, m, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        fwd = np.array([[1.0, 0, m], [0, 1, m], [0, 0, 1]]) @ fwd
    pts = np.hstack([pair.source_points, np.ones((len(pair.source_points), 1))])
    new_pts = (fwd @ pts.T).T[:, :2]
    return Pair(pair.name, pair.target, img, pair.target_points, new_pts, pair.diagonal)


ROBUSTNESS = (
    Variant(),
    Variant(angle=37),
    Variant(angle=90),
    Variant(angle=180),
    Variant(angle=253),
    Variant(mirror=True),
    Variant(angle=37, mirror=True),
    Variant(angle=200, mirror=True),
    Variant(erase=0.3),
    Variant(erase=0.3, angle=120, mirror=True),
)
STRESS = (
    Variant(swap=True),
    Variant(swap=True, angle=311, mirror=True),
    Variant(erase=0.4, erase_side="top", angle=71),
    Variant(erase=0.25, erase_side="left"),
    Variant(scale=0.9, angle=163),
    Variant(scale=1.1, angle=289, mirror=True),
    Variant(pad=1.0, angle=17),
    Variant(pad=0.5, angle=233, mirror=True, erase=0.2),
)


def ihc_pair(angle_deg: float, mirror: bool, seed: int = 0) -> tuple[Pair, np.ndarray]:
    """IHC image (target) and a known-affine warp of it (source); returns pair and true A.

    The source is the target warped so that source(A x) = target(x) for the true target ->
    source affine ``A`` (rotation about the centre, small anisotropic scale/shear, translation).
    Stain difference is simulated by a colour change of the source.
    """
    from skimage.data import immunohistochemistry

    rng = np.random.default_rng(seed)
    tgt = np.asarray(immunohistochemistry())
    # pad with white so tissue can rotate in view
    tgt = cv2.copyMakeBorder(tgt, 128, 128, 128, 128, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    h, w = tgt.shape[:2]
    a = math.radians(angle_deg)
    lin = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = lin @ np.array(
        [
            [1.0 + rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04)],
            [rng.uniform(-0.04, 0.04), 1.0 + rng.uniform(-0.05, 0.05)],
        ]
    )
    if mirror:
        lin = lin @ np.diag([-1.0, 1.0])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    shift = rng.uniform(-30, 30, size=2)
    true = np.eye(3)
    true[:2, :2] = lin
    true[:2, 2] = c + shift - lin @ c
    # source(y) = target(A^-1 y): warpAffine with the forward map A (target px -> source px)
    src = cv2.warpAffine(
        tgt,
        true[:2],
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255),
    )
    # a stain change: swap/scale the optical densities
    od = -np.log(np.maximum(src.astype(np.float32), 1.0) / 255.0)
    od = od[..., [2, 0, 1]] * np.array([0.8, 1.2, 1.0], np.float32)
    src = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    ys, xs = np.mgrid[0:h:8, 0:w:8]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    return Pair("ihc-synthetic", tgt, src, pts, pts, float(math.hypot(h, w))), true


def synthetic_error(true: np.ndarray, est: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean distance (target px) between true and estimated mappings over the target image."""
    h, w = shape
    ys, xs = np.mgrid[0:h:8, 0:w:8]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 0)
    return float(np.linalg.norm((true @ pts - est @ pts)[:2], axis=0).mean())


def random_variants(n: int, seed: int = 7) -> tuple[Variant, ...]:
    """``n`` random variants: any rotation, mirror or not, and sometimes torn tissue (<= 30 %
    of one side) or a different shrinkage (0.92-1.08)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        erase = float(rng.uniform(0.1, 0.3)) if rng.random() < 0.4 else 0.0
        out.append(
            Variant(
                angle=round(float(rng.uniform(0, 360)), 1),
                mirror=bool(rng.integers(2)),
                erase=round(erase, 2),
                erase_side=str(rng.choice(["right", "left", "top", "bottom"])),
                scale=round(float(rng.uniform(0.92, 1.08)), 3) if rng.random() < 0.4 else 1.0,
            )
        )
    return tuple(out)


def run_pairs(config: AlignConfig, variants: tuple[Variant, ...]) -> dict[str, dict]:
    """Align every pair x variant; print and return rTRE (%), wall and cpu seconds per case."""
    out: dict[str, dict] = {}
    for pair in load_pairs():
        none = median_rtre(pair, np.eye(3))
        floor = median_rtre(pair, landmark_affine(pair))
        print(
            f"{pair.name}: no registration {100 * none:.2f} %, landmark affine {100 * floor:.2f} %"
        )
        for v in variants:
            p = transformed_pair(pair, v)
            t0, c0 = time.perf_counter(), time.process_time()
            res = align(p.source, p.target, config=config)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rtre = 100 * median_rtre(p, res.matrix)
            key = f"{pair.name} {v.label()}"
            out[key] = {"rtre": rtre, "wall": wall, "cpu": cpu}
            print(
                f"  {key:36s} rTRE {rtre:6.3f} %  lncc {res.similarity_before:.3f} -> "
                f"{res.similarity_after:.3f}  rot {res.rotation_deg:5.1f} flip {res.flipped:d}"
                f"  {wall:.2f} s (cpu {cpu:.2f} s)",
                flush=True,
            )
    return out


def run_tissue_synthetic(config: AlignConfig, quick: bool) -> dict[str, float]:
    """:mod:`wsireg.synthetic.texture` H&E source / IHC target pairs: any rotation, mirrors, and the
    default smooth nonrigid deformation (2 % of the size). Error: median distance (px) between
    the estimated affine and the true transform at 100 tissue landmarks, next to the floor (the
    least-squares affine of the landmarks)."""
    from wsireg.synthetic.slides import pair_landmarks, synthetic_pair

    rng = np.random.default_rng(2024)
    out = {}
    shape = (600, 800)
    for seed in range(2 if quick else 8):
        angle, flip = float(rng.uniform(0, 360)), bool(rng.integers(2))
        source, target, truth = synthetic_pair(shape, 100 + seed, rotation=angle, flip=flip)
        tp, sp = pair_landmarks(shape, 100 + seed, truth, 100)
        source, target = np.asarray(source), np.asarray(target)
        t0 = time.perf_counter()
        res = align(source, target, config=config)
        dt = time.perf_counter() - t0
        hom = np.hstack([tp, np.ones((len(tp), 1))])
        err = np.median(np.linalg.norm((res.matrix @ hom.T).T[:, :2] - sp, axis=1))
        sol, *_ = np.linalg.lstsq(hom, sp, rcond=None)
        floor = np.median(np.linalg.norm(hom @ sol - sp, axis=1))
        key = f"tissue-synthetic {seed} rot {angle:.0f}{' mirror' if flip else ''}"
        out[key] = float(err)
        print(
            f"  {key:36s} median error {err:6.2f} px (floor {floor:.2f} px)  "
            f"flip {res.flipped:d}  {dt:.2f} s",
            flush=True,
        )
    return out


def run_synthetic(config: AlignConfig, quick: bool) -> dict[str, float]:
    """Known-affine skimage IHC pairs: mean mapping error (px) per case."""
    out = {}
    for angle, mirror in (
        [(23.0, False)] if quick else [(23.0, False), (131.0, True), (290.0, False)]
    ):
        p, true = ihc_pair(angle, mirror)
        t0 = time.perf_counter()
        res = align(p.source, p.target, config=config)
        err = synthetic_error(true, res.matrix, p.target.shape[:2])
        key = f"synthetic rot {angle:g}{' mirror' if mirror else ''}"
        out[key] = err
        print(
            f"  {key:36s} mean error {err:6.2f} px  flip {res.flipped:d}  "
            f"{time.perf_counter() - t0:.2f} s",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="unmodified pairs only")
    parser.add_argument("--stress", action="store_true", help="also harder variants")
    parser.add_argument("--random", type=int, default=0, help="also N random variants per pair")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an AlignConfig field (Python literal), e.g. --set similarity='\"lncc\"'",
    )
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = ast.literal_eval(value)
    config = AlignConfig(**overrides)
    print(config)
    variants = ROBUSTNESS[:1] if args.quick else ROBUSTNESS + (STRESS if args.stress else ())
    variants += random_variants(args.random)
    results = run_pairs(config, variants)
    ihc = run_synthetic(config, args.quick)
    tissue = run_tissue_synthetic(config, args.quick)
    rtre = [r["rtre"] for r in results.values()]
    print(
        f"summary: median rTRE {np.median(rtre):.3f} %, max {np.max(rtre):.3f} % over "
        f"{len(rtre)} cases; skimage-IHC max {max(ihc.values()):.2f} px; tissue-synthetic max "
        f"{max(tissue.values()):.2f} px; per case median "
        f"{np.median([r['wall'] for r in results.values()]):.2f} s wall, "
        f"{np.median([r['cpu'] for r in results.values()]):.2f} s cpu"
    )


if __name__ == "__main__":
    main()
