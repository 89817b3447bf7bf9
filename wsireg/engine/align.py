"""Initial (affine) alignment of two differently stained sections, at low resolution.

Conventions are those of :mod:`wsireg.core.coords`: images ``[y, x, c]`` uint8 RGB with a white
background, points ``(x, y)``, coordinates in **level-0 pixels** with pixel centres at integers,
and an affine ``A`` (3x3, homogeneous) maps a **target** (fixed) level-0 position to the
**source** (moving) level-0 position (backward mapping). The images given to :func:`align` are
levels of their slides at ``source_downsample`` / ``target_downsample`` (e.g. thumbnails of
<= 1024 px); the result is in level-0 pixels of each slide. Slides whose level-0 pixels differ
in size (``physical_scale``: source level-0 pixels per target level-0 pixel) are matched in one
physical frame, the target's pixel grid (:func:`_to_target_units`), and the result is converted
back to source level-0 pixels at the end.

Algorithm (:func:`align`; sizes are pixels across the tissue's bounding box, not the slide):

1. **Tissue** (:func:`tissue_mask`): optical density (OD) relative to the background colour,
   Otsu threshold on log(OD) clamped to [0.05, 0.1], morphological clean-up; each image is
   cropped to its tissue (+10 %), so the working resolution follows the tissue, not the slide.
2. **Representation** (:func:`stain_representation`): the OD magnitude normalised within the
   tissue, 0 on the background (so ``grid_sample``'s zero padding is background). Matching
   uses the **local NCC** of these images (window 7 % of the tissue size), invariant to the
   per-window gain/offset between stains and, unlike a global NCC, not pulled towards covering
   the target when tissue is missing.
3. **Pose search** (:func:`rotation_search`): rotations every 5 degrees x {no flip, mirror} x
   families of linear maps (isotropic scale 0.9 / 1 / 1.1 and the map between the tissues'
   second moments, which absorbs anisotropic shrinkage), each about the tissue centres of mass,
   each with its best translation from an FFT cross-correlation of the locally normalised
   images; 64 px for all poses, the best 16 re-scored at +-2.5 degrees at 128 px, the best 4
   polished (+-1.25 degrees, +-4 % scale).
4. **Affine optimisation** (:func:`optimise_affine`): the 6 parameters, by Adam on
   ``affine_grid`` / ``grid_sample`` (torch, CPU), every candidate at 128 px, the best by local
   NCC then at 256 px.

Each choice above (local NCC rather than a global NCC or NGF, the 128 / 256 px optimisation
levels, the OD representation) is the most accurate and robust of the variants
``benchmarks/align_accuracy.py`` measures on the ANHIR stain pairs, their rotated / mirrored /
torn / rescaled variants and synthetic pairs; README reports the figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from wsireg.core.coords import grid_to_level0_affine
from wsireg.core.losses import box_mean_replicate, local_ncc
from wsireg.core.stain import background_rgb, check_rgb, relative_od_magnitude, tissue_mask
from wsireg.engine.parallel import torch_threads
from wsireg.errors import WsiregError

__all__ = [
    "AlignConfig",
    "AlignResult",
    "align",
    "decompose_affine",
    "similarity_on_grid",
    "stain_representation",
]


# ----------------------------------------------------------------------------------------------
# Results and configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignConfig:
    """Knobs of :func:`align`. Sizes are working-image sizes in pixels across the tissue (the
    longest side of the tissue bounding box), not across the slide."""

    search_size: int = 128  # resolution of the exhaustive rotation search
    angle_step_deg: float = 5.0  # rotation search step (degrees)
    try_flip: bool = True  # also search mirrored sections
    moment_family: bool = True  # also search rotations between moment-normalised tissue shapes
    scales: tuple[float, ...] = (0.9, 1.0, 1.1)  # isotropic scales (source / target) searched
    n_coarse: int = 16  # poses kept from the coarse search (at search_size / 2) for the fine one
    n_candidates: int = 4  # poses kept from the search and optimised on the coarsest level
    pyramid: tuple[int, ...] = (128, 256)  # optimisation levels, coarse to fine
    iterations: tuple[int, ...] = (60, 40)  # Adam iterations per level
    select_level: int = 0  # candidates compete after optimisation up to this pyramid level
    step_px: float = 0.5  # initial Adam step in working pixels (cosine-annealed to 10 %)
    window_fraction: float = 9 / 128  # local-NCC window as a fraction of the working size
    representation: str = "od"  # see stain_representation
    # torch threads during align(): the tensors are small, so one thread is about as fast and
    # avoids OpenMP spin-waiting on busy shared cores (None: leave torch's setting)
    threads: int | None = 1


@dataclass(frozen=True)
class AlignResult:
    """Outcome of :func:`align`.

    ``matrix`` is the 3x3 homogeneous affine mapping **target** level-0 ``(x, y, 1)`` to
    **source** level-0 ``(x, y, 1)`` (see :mod:`wsireg.core.coords`). ``similarity_before`` is the
    similarity of the stain representations with the identity (level-0 to level-0) transform,
    ``similarity_after`` with ``matrix``: the local NCC the optimisation maximises, on the
    finest working level, averaged over the target's tissue crop (background counts 0), so in
    [-1, 1] but typically 0.1-0.4 for a good alignment of two stains.
    ``rotation_deg`` is the angle, in degrees in ``[0, 360)``, of the rotation
    part of ``matrix`` (after removing the mirror, if any), measured from +x towards +y (i.e.
    clockwise on screen, since y points down). ``flipped`` means the source is the mirror image
    of the target (``det(matrix[:2, :2]) < 0``). ``timings`` are wall-clock seconds per stage.
    ``candidates`` lists the poses that competed, as ``(rotation_deg, flipped, similarity)``
    after optimisation on the selection level, best first: a runner-up with a similarity close
    to the winner's flags an ambiguous pose (e.g. a nearly symmetric section).
    """

    matrix: np.ndarray
    similarity_before: float
    similarity_after: float
    rotation_deg: float
    flipped: bool
    timings: dict[str, float] = field(default_factory=dict)
    candidates: tuple[tuple[float, bool, float], ...] = ()


# ----------------------------------------------------------------------------------------------
# Tissue masks and representation
# ----------------------------------------------------------------------------------------------


def stain_representation(rgb: np.ndarray, mask: np.ndarray, kind: str = "od") -> np.ndarray:
    """Stain-robust float32 ``[y, x]`` image in [0, 1], 0 outside the tissue ``mask``.

    ``kind``:
      * ``"od"`` (default): optical-density magnitude (how much light any dye absorbs) divided
        by its 99th percentile in the mask, clipped;
      * ``"od_rank"``: optical-density magnitude, rank-normalised (histogram-equalised) within
        the mask, so both stains have the same (uniform) intensity distribution on tissue;
      * ``"grey"``: inverted grey level (``1 - grey / background``), rank-normalised in the mask.

    All three align the ANHIR pairs equally well; ``"od"`` was the only one to survive every
    stress case of ``benchmarks/align_accuracy.py --stress``. The local NCC used for matching is
    invariant to the remaining per-window gain and offset between stains.
    """
    if kind not in ("od", "od_rank", "grey"):
        raise ValueError(f"unknown representation {kind!r}")
    if kind == "grey":
        grey = rgb.astype(np.float32).mean(axis=2)
        sig = np.clip(1.0 - grey / background_rgb(rgb).mean(), 0.0, None)
    else:
        sig = relative_od_magnitude(rgb)
    out = np.zeros(sig.shape, np.float32)
    vals = sig[mask]
    if vals.size == 0:
        return out
    if kind == "od":
        out[mask] = np.clip(vals / max(np.percentile(vals, 99.0), 1e-6), 0.0, 1.0)
    else:
        order = np.argsort(vals, kind="stable")
        ranks = np.empty(vals.size, np.float32)
        ranks[order] = (np.arange(vals.size, dtype=np.float32) + 1.0) / vals.size
        out[mask] = ranks
    return out


# ----------------------------------------------------------------------------------------------
# Working grids (image pixel <-> level-0)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    """A working image and the 3x3 affine taking its ``(x, y, 1)`` pixel indices to level 0."""

    data: np.ndarray  # float32 [y, x]
    to_level0: np.ndarray  # 3x3


def _resize_affine(old_shape: tuple[int, int], new_shape: tuple[int, int]) -> np.ndarray:
    """3x3 affine from pixel indices of a resized image to those of the original one.

    Resizing ``old -> new`` makes pixel ``j`` of the new image cover old pixels
    ``[j f, (j + 1) f)`` with ``f = old / new`` per axis, i.e. a grid at downsample ``f``.
    """
    fy = old_shape[0] / new_shape[0]
    fx = old_shape[1] / new_shape[1]
    gx, gy = grid_to_level0_affine(fx), grid_to_level0_affine(fy)
    return np.array([[fx, 0.0, gx[0, 2]], [0.0, fy, gy[1, 2]], [0.0, 0.0, 1.0]])


def _resize(image: _Image, scale: float) -> _Image:
    """Resize ``image`` by ``scale`` (area averaging when shrinking); keeps ``to_level0`` exact."""
    h, w = image.data.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    data = cv2.resize(image.data, (nw, nh), interpolation=interp)
    return _Image(data, image.to_level0 @ _resize_affine((h, w), (nh, nw)))


def _pixel_to_normalised(shape: tuple[int, int]) -> np.ndarray:
    """3x3 affine from pixel indices to ``grid_sample`` coordinates (``align_corners=False``)."""
    h, w = shape
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0, 0, 1.0]])


# ----------------------------------------------------------------------------------------------
# The parametrisation: A = P @ M @ Q, M a 2x3 affine in centred, scaled coordinates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Centred, scaled coordinates: ``A = T(c_s) S M S^-1 T(-c_t)`` (all level 0)."""

    centre_target: np.ndarray  # (x, y) level 0
    centre_source: np.ndarray  # (x, y) level 0
    scale: float  # level-0 pixels per unit

    def pre(self) -> np.ndarray:
        """``P = T(c_s) S``."""
        cx, cy = self.centre_source
        s = self.scale
        return np.array([[s, 0.0, cx], [0.0, s, cy], [0.0, 0.0, 1.0]])

    def post(self) -> np.ndarray:
        """``Q = S^-1 T(-c_t)``."""
        cx, cy = self.centre_target
        s = self.scale
        return np.array([[1 / s, 0.0, -cx / s], [0.0, 1 / s, -cy / s], [0.0, 0.0, 1.0]])

    def to_matrix(self, m: np.ndarray) -> np.ndarray:
        """Level-0 ``A`` from a 2x3 (or 3x3) ``M``."""
        m3 = np.vstack([np.asarray(m, np.float64)[:2], [0.0, 0.0, 1.0]])
        return self.pre() @ m3 @ self.post()

    def from_matrix(self, a: np.ndarray) -> np.ndarray:
        """2x3 ``M`` of a level-0 ``A``."""
        return (np.linalg.inv(self.pre()) @ a @ np.linalg.inv(self.post()))[:2]


def _theta_factors(
    frame: _Frame, target: _Image, source: _Image
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constants ``L, R`` with ``theta = L @ M3 @ R`` (normalised target -> normalised source)."""
    left = _pixel_to_normalised(source.data.shape) @ np.linalg.inv(source.to_level0) @ frame.pre()
    right = frame.post() @ target.to_level0 @ np.linalg.inv(_pixel_to_normalised(target.data.shape))
    return torch.tensor(left, dtype=torch.float32), torch.tensor(right, dtype=torch.float32)


def _warp(source: torch.Tensor, theta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Warp ``source`` (1, C, Hs, Ws) by ``theta`` (N, 2, 3) onto a (N, C, H, W) grid."""
    n = theta.shape[0]
    grid = F.affine_grid(theta, [n, source.shape[1], shape[0], shape[1]], align_corners=False)
    return F.grid_sample(
        source.expand(n, -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )


# ----------------------------------------------------------------------------------------------
# Similarities (higher is better) between a target (1, C, H, W) and warped sources (N, C, H, W)
# ----------------------------------------------------------------------------------------------


def _lncc(target: torch.Tensor, warped: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Mean local NCC of each warped image with the target over ``window`` boxes, ``(N,)``."""
    t = target.expand(warped.shape[0], -1, -1, -1)
    return local_ncc(t, warped, window, eps=_LNCC_EPS, box=box_mean_replicate)


_LNCC_EPS = 1e-3 * 1e-3  # squared intensity units: flat windows (background) score about 0


# ----------------------------------------------------------------------------------------------
# Rotation search
# ----------------------------------------------------------------------------------------------


def _rotation_flip(angle_deg: float, flip: bool) -> np.ndarray:
    """2x2 ``R(angle) @ diag(-1 if flip else 1, 1)`` (angle from +x towards +y)."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([-1.0 if flip else 1.0, 1.0])


@dataclass(frozen=True)
class Candidate:
    """A pose hypothesis: ``M`` (2x3, in the frame's centred coordinates) and its score."""

    m: np.ndarray
    score: float
    angle_deg: float
    flip: bool
    family: int = 0  # index of the (pre, post) linear maps the rotation was searched within


def _local_normalise(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(x - local mean) / local std`` over ``window`` boxes; ~0 where ``x`` is flat."""
    stats = box_mean_replicate(torch.cat([x, x * x], 1), window)
    mean = stats[:, :1]
    var = (stats[:, 1:] - mean * mean).clamp_min(0)
    return (x - mean) / torch.sqrt(var + 1e-3)


def _fft_correlation(target: torch.Tensor, warped: torch.Tensor, pad: int) -> torch.Tensor:
    """``c[n, dy, dx] = sum_x t(x) w_n(x - d)``, (N, H + pad, W + pad); unaliased for
    ``|dx|, |dy| <= pad`` (index ``d mod size``)."""
    h, w = warped.shape[-2:]
    size = (h + pad, w + pad)
    ft = torch.fft.rfft2(target[:, 0], s=size)
    fw = torch.fft.rfft2(warped[:, 0], s=size)
    return torch.fft.irfft2(ft * fw.conj(), s=size)


def _best_shift(
    target: torch.Tensor, warped: torch.Tensor, max_frac: float, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best integer shift ``(dx, dy)`` (N, 2) moving each ``warped`` onto ``target``, and score.

    Both images are locally normalised over ``window`` boxes, so that the cross-correlation at a
    shift is (about) the sum of the local NCC over the overlap: unlike a global correlation of
    the tissue, it is not pulled towards covering the target when tissue is missing. Shifts are
    limited to ``max_frac`` of the longest side. Scores (mean local NCC over the target image)
    are comparable across the ``warped`` images.
    """
    _, _, h, w = warped.shape
    pad = int(math.ceil(max_frac * max(h, w)))
    t, wn = _local_normalise(target, window), _local_normalise(warped, window)
    score = _fft_correlation(t, wn, pad) / float(h * w)
    dy = torch.fft.fftfreq(h + pad, 1.0 / (h + pad)).round()
    dx = torch.fft.fftfreq(w + pad, 1.0 / (w + pad)).round()
    allowed = (dy.abs()[:, None] <= pad) & (dx.abs()[None, :] <= pad)
    score = torch.where(allowed[None], score, torch.full_like(score, -1e9))
    best, idx = score.flatten(1).max(1)
    iy, ix = idx // (w + pad), idx % (w + pad)
    return torch.stack([dx[ix], dy[iy]], dim=1), best


def _homogeneous(ms: np.ndarray) -> torch.Tensor:
    """(N, 2, 3) -> (N, 3, 3) float32 tensor."""
    bottom = np.tile([[[0.0, 0.0, 1.0]]], (len(ms), 1, 1))
    return torch.tensor(np.concatenate([ms, bottom], 1), dtype=torch.float32)


@dataclass(frozen=True)
class _Pose:
    """A searched pose: rotation ``angle_deg`` and ``flip`` within family ``family``."""

    family: int
    angle_deg: float
    flip: bool


def _score_poses(
    target: _Image,
    source: _Image,
    frame: _Frame,
    linear: np.ndarray,
    window: int,
    max_shift: float,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Best translation and score of each linear map ``linear`` (N, 2, 2) in frame units.

    Each map sends the target's tissue centre to the source's (``frame``); the translation is
    then the best FFT shift (see :func:`_best_shift`). Returns ``M`` (N, 2, 3) and scores (N,).
    """
    ms = np.concatenate([linear, np.zeros((len(linear), 2, 1))], axis=2)
    left, right = _theta_factors(frame, target, source)
    t = torch.from_numpy(target.data)[None, None]
    s = torch.from_numpy(source.data)[None, None]
    shifts, scores = [], []
    with torch.no_grad():
        for k in range(0, len(ms), chunk):
            theta = (left @ _homogeneous(ms[k : k + chunk]) @ right)[:, :2]
            shift, score = _best_shift(t, _warp(s, theta, target.data.shape), max_shift, window)
            shifts.append(shift.double().numpy())
            scores.append(score.double().numpy())
    # sampling the warped image at x - d: M' = M @ T(-d), d in frame units
    d = np.concatenate(shifts) @ (target.to_level0[:2, :2] / frame.scale).T
    ms[:, :, 2] = -np.einsum("nij,nj->ni", ms[:, :, :2], d)
    return ms, np.concatenate(scores)


def _distinct(
    poses: list[_Pose],
    linear: np.ndarray,
    order: np.ndarray,
    n: int,
    min_deg: float,
    min_change: float = 0.06,
) -> list[int]:
    """Indices of the first ``n`` of ``order`` that are at least ``min_deg`` from every chosen
    pose of the same family and flip (non-maximum suppression), and whose linear maps
    (``linear``, (N, 2, 2)) differ from every chosen one by ``min_change`` (Frobenius norm)."""
    chosen: list[int] = []
    for k in order:
        p = poses[k]
        if all(
            (
                q.family != p.family
                or q.flip != p.flip
                or abs((q.angle_deg - p.angle_deg + 180) % 360 - 180) >= min_deg
            )
            and np.linalg.norm(linear[k] - linear[j]) >= min_change
            for j, q in ((j, poses[j]) for j in chosen)
        ):
            chosen.append(int(k))
        if len(chosen) >= n:
            break
    return chosen


def rotation_search(
    coarse: tuple[_Image, _Image],
    fine: tuple[_Image, _Image],
    frame: _Frame,
    families: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: AlignConfig,
    windows: tuple[int, int] = (5, 9),
    max_shift: float = 0.25,
) -> list[Candidate]:
    """Exhaustive search of rotations (0-360) x {no flip, flip} x ``families``, coarse to fine.

    A pose has linear part ``pre @ R(angle) @ D @ post`` (``D`` the optional mirror) for each
    ``(pre, post)`` of ``families`` (frame coordinates): ``(s I, I)`` is a rotation with scale
    ``s``; see :func:`_moment_family` for another. Each pose maps the target's tissue centre to
    the source's and gets its best translation (within ``max_shift`` of the image size) by FFT
    cross-correlation of the representations locally normalised over ``windows`` (coarse, fine)
    pixels (:func:`_best_shift`). Every ``cfg.angle_step_deg`` (mirrored too with
    ``cfg.try_flip``) is scored on the ``coarse`` (target, source) images; the ``cfg.n_coarse``
    best (distinct by 10 degrees) are re-scored, with their neighbours at +-half a step, on the
    ``fine`` ones. Returns the ``cfg.n_candidates`` best
    candidates, distinct by 30 degrees within a family and flip, and not duplicates across
    families.
    """
    angle_step_deg = cfg.angle_step_deg
    flips = (False, True) if cfg.try_flip else (False,)
    poses = [
        _Pose(i, float(a), f)
        for i in range(len(families))
        for f in flips
        for a in np.arange(0.0, 360.0, angle_step_deg)
    ]

    def linear(ps: list[_Pose]) -> np.ndarray:
        return np.stack(
            [
                families[p.family][0] @ _rotation_flip(p.angle_deg, p.flip) @ families[p.family][1]
                for p in ps
            ]
        )

    lin = linear(poses)
    _, scores = _score_poses(*coarse, frame, lin, windows[0], max_shift)
    kept = _distinct(poses, lin, np.argsort(-scores), cfg.n_coarse, 10.0)
    half = angle_step_deg / 2.0
    poses = [
        _Pose(poses[k].family, (poses[k].angle_deg + da) % 360.0, poses[k].flip)
        for k in kept
        for da in (-half, 0.0, half)
    ]
    lin = linear(poses)
    ms, scores = _score_poses(*fine, frame, lin, windows[1], max_shift)
    chosen = _distinct(poses, lin, np.argsort(-scores), cfg.n_candidates, 30.0)
    return [
        _polish(poses[k], lin[k], fine, frame, angle_step_deg, windows[1], max_shift)
        for k in chosen
    ]


def _polish(
    pose: _Pose,
    lin: np.ndarray,
    fine: tuple[_Image, _Image],
    frame: _Frame,
    angle_step_deg: float,
    window: int,
    max_shift: float,
) -> Candidate:
    """Best of ``lin`` turned by 0, +-a quarter step and scaled by 0.96, 1, 1.04 (FFT scores on
    ``fine``): a closer start for the optimisation, whose capture range is a few pixels."""
    quarter = angle_step_deg / 4.0
    variants = [
        (da, sc, sc * _rotation_flip(da, False) @ lin)
        for da in (-quarter, 0.0, quarter)
        for sc in (0.96, 1.0, 1.04)
    ]
    ms, scores = _score_poses(*fine, frame, np.stack([v[2] for v in variants]), window, max_shift)
    k = int(np.argmax(scores))
    angle = (pose.angle_deg + variants[k][0]) % 360.0
    return Candidate(ms[k], float(scores[k]), angle, pose.flip, pose.family)


def _covariance(image: _Image, frame: _Frame) -> np.ndarray:
    """2x2 covariance of the tissue (representation > 0) positions, in frame units."""
    ys, xs = np.nonzero(image.data > 0)
    pts = image.to_level0[:2] @ np.stack([xs, ys, np.ones(xs.size)]) / frame.scale
    return np.cov(pts)


def _sqrtm(c: np.ndarray, power: float) -> np.ndarray:
    """``c ** power`` of a symmetric positive definite 2x2 matrix."""
    vals, vecs = np.linalg.eigh(c)
    return (vecs * np.maximum(vals, 1e-12) ** power) @ vecs.T


def _moment_family(
    target: _Image, source: _Image, frame: _Frame, max_scale: float = 1.5
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(C_s^(1/2), C_t^(-1/2))``: every ``pre @ R @ D @ post`` maps the target tissue's second
    moments ``C_t`` onto the source's ``C_s``, absorbing a different (even anisotropic)
    shrinkage of the two sections. None when the principal axes would be scaled by more than
    ``max_scale`` (or less than its inverse), or all by less than 3 % (the rigid family then
    covers it)."""
    ct, cs = _covariance(target, frame), _covariance(source, frame)
    et, es = np.linalg.eigvalsh(ct), np.linalg.eigvalsh(cs)
    if min(et.min(), es.min()) <= 1e-9:  # degenerate (line-like) tissue
        return None
    ratios = np.sqrt(es / et)  # per principal axis
    if ratios.max() > max_scale or ratios.min() < 1.0 / max_scale:
        return None
    if np.abs(ratios - 1.0).max() < 0.03:
        return None
    return _sqrtm(cs, 0.5), _sqrtm(ct, -0.5)


# ----------------------------------------------------------------------------------------------
# Affine optimisation
# ----------------------------------------------------------------------------------------------


def optimise_affine(
    target: _Image,
    source: _Image,
    frame: _Frame,
    m_init: np.ndarray,
    *,
    iterations: int = 50,
    step_px: float = 0.5,
    window: int = 9,
) -> tuple[np.ndarray, float]:
    """Maximise the local NCC (``window`` pixels) of ``target`` and ``source`` warped by ``M``.

    ``M`` (2x3, ``frame`` coordinates: ``A = frame.to_matrix(M)`` maps target level 0 to source
    level 0) starts at ``m_init``; its 6 parameters are optimised by Adam for ``iterations``
    steps of initially ``step_px`` working pixels, cosine-annealed to a tenth.
    Returns the optimised ``M`` and its similarity (evaluated after the last step).
    """
    left, right = _theta_factors(frame, target, source)
    t = torch.from_numpy(target.data)[None, None]
    s = torch.from_numpy(source.data)[None, None]

    m0 = torch.tensor(np.asarray(m_init, np.float64)[:2], dtype=torch.float32)
    delta = torch.zeros(2, 3, requires_grad=True)
    bottom = torch.tensor([[0.0, 0.0, 1.0]])
    # one unit of M moves points by frame.scale level-0 pixels: express the step in pixels
    spacing = float(np.sqrt(abs(np.linalg.det(target.to_level0[:2, :2]))))
    opt = torch.optim.Adam([delta], lr=step_px * spacing / frame.scale)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(iterations, 1), eta_min=0.1 * step_px * spacing / frame.scale
    )

    def theta_of(d: torch.Tensor) -> torch.Tensor:
        return (left @ torch.cat([m0 + d, bottom]) @ right)[None, :2]

    for _ in range(iterations):
        opt.zero_grad()
        loss = -_lncc(t, _warp(s, theta_of(delta), target.data.shape), window)[0]
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        score = float(_lncc(t, _warp(s, theta_of(delta), target.data.shape), window)[0])
    return (m0 + delta.detach()).double().numpy(), score


def _score(target: _Image, source: _Image, frame: _Frame, m: np.ndarray, window: int) -> float:
    """Local NCC (``window`` pixels) of ``target`` and ``source`` warped by ``M`` (2x3)."""
    left, right = _theta_factors(frame, target, source)
    m3 = torch.tensor(np.vstack([np.asarray(m)[:2], [0, 0, 1.0]]), dtype=torch.float32)
    t = torch.from_numpy(target.data)[None, None]
    s = torch.from_numpy(source.data)[None, None]
    with torch.no_grad():
        return float(
            _lncc(t, _warp(s, (left @ m3 @ right)[None, :2], target.data.shape), window)[0]
        )


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def decompose_affine(matrix: np.ndarray) -> tuple[float, bool]:
    """``(rotation_deg, flipped)`` of a 3x3 (or 2x3) affine (see :class:`AlignResult`).

    The linear part ``L`` is written ``R(angle) @ D @ P`` with ``D = diag(-1, 1)`` when
    ``det(L) < 0`` (mirror in x) and ``P`` symmetric positive definite (polar decomposition).
    """
    lin = np.asarray(matrix, np.float64)[:2, :2]
    flipped = bool(np.linalg.det(lin) < 0)
    if flipped:
        lin = lin @ np.diag([-1.0, 1.0])
    u, _, vt = np.linalg.svd(lin)
    rot = u @ vt
    angle = math.degrees(math.atan2(rot[1, 0], rot[0, 0])) % 360.0
    return angle, flipped


def similarity_on_grid(
    target_rgb: np.ndarray, warped_rgb: np.ndarray, config: AlignConfig | None = None
) -> float:
    """The similarity :func:`align` reports (:attr:`AlignResult.similarity_after`: local NCC
    of the stain representations over the target's tissue crop, at the finest working size)
    of a target and a source already warped onto the same grid (e.g. a registration's QC
    thumbnails); 0 when the warped source shows no tissue there."""
    cfg = config or AlignConfig()
    with torch_threads(cfg.threads):
        target = _find_tissue(target_rgb, 1.0, "target")
        y0, x0 = int(target.to_level0[1, 2]), int(target.to_level0[0, 2])
        h, w = target.mask.shape
        crop = warped_rgb[y0 : y0 + h, x0 : x0 + w]
        try:
            mask = tissue_mask(crop, "warped source")
        except WsiregError:
            return 0.0
        warped = _Tissue(crop, mask, target.to_level0, target.extent)
        size = cfg.pyramid[-1]
        spacing = target.extent / size
        images = [_represent(t, spacing, cfg.representation) for t in (target, warped)]
        window = _odd(cfg.window_fraction * size)
        t, s = (torch.from_numpy(image.data)[None, None] for image in images)
        with torch.no_grad():
            return float(_lncc(t, s, window)[0])


def _odd(x: float) -> int:
    """Nearest odd integer >= 3."""
    return max(3, 2 * int(round((x - 1) / 2)) + 1)


@dataclass(frozen=True)
class _Tissue:
    """The tissue of one input image: its RGB crop, mask on the crop, and crop pixel -> level 0."""

    rgb: np.ndarray  # uint8 [y, x, 3]
    mask: np.ndarray  # bool [y, x]
    to_level0: np.ndarray  # 3x3
    extent: float  # level-0 longest side of the tissue bounding box


_MASK_SIZE = 1024  # longest side at which tissue masks are computed inside align()


def _find_tissue(rgb: np.ndarray, downsample: float, name: str, margin: float = 0.1) -> _Tissue:
    """Crop ``rgb`` (a level at ``downsample``) to its tissue's bounding box grown by ``margin``
    of its longest side. The mask is computed at <= ``_MASK_SIZE`` pixels."""
    check_rgb(rgb, name)
    h, w = rgb.shape[:2]
    f = min(1.0, _MASK_SIZE / max(h, w))
    small = rgb
    if f < 1.0:
        small = cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
    mask = tissue_mask(small, name)
    ys, xs = np.nonzero(mask)
    sy, sx = h / small.shape[0], w / small.shape[1]  # mask pixel -> rgb pixel
    y0, y1, x0, x1 = ys.min() * sy, (ys.max() + 1) * sy, xs.min() * sx, (xs.max() + 1) * sx
    extent = max(y1 - y0, x1 - x0)
    y0, x0 = max(0, int(y0 - margin * extent)), max(0, int(x0 - margin * extent))
    y1 = min(h, int(math.ceil(y1 + margin * extent)))
    x1 = min(w, int(math.ceil(x1 + margin * extent)))
    shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    to_mask = np.linalg.inv(_resize_affine((h, w), mask.shape)) @ shift  # crop px -> mask px
    crop_mask = cv2.warpAffine(
        mask.astype(np.uint8),
        to_mask[:2],
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
    ).astype(bool)
    return _Tissue(
        rgb[y0:y1, x0:x1], crop_mask, grid_to_level0_affine(downsample) @ shift, extent * downsample
    )


def _represent(tissue: _Tissue, spacing: float, kind: str) -> _Image:
    """The stain representation of ``tissue`` at ``spacing`` level-0 pixels per pixel (or at its
    own resolution when that is coarser)."""
    h, w = tissue.mask.shape
    f = min(1.0, abs(tissue.to_level0[0, 0]) / spacing)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    rgb, mask, to_level0 = tissue.rgb, tissue.mask, tissue.to_level0
    if (nh, nw) != (h, w):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
        to_level0 = to_level0 @ _resize_affine((h, w), (nh, nw))
    return _Image(stain_representation(rgb, mask.astype(bool), kind), to_level0)


def _centre_of_mass(image: _Image) -> np.ndarray:
    """Level-0 ``(x, y)`` of the centre of mass of the tissue (representation > 0)."""
    ys, xs = np.nonzero(image.data > 0)
    return (image.to_level0 @ np.array([xs.mean(), ys.mean(), 1.0]))[:2]


def _level(image: _Image, extent: float, size: int) -> _Image:
    """``image`` resampled so that ``extent`` level-0 pixels span ``size`` working pixels."""
    return _resize(image, abs(image.to_level0[0, 0]) * size / extent)


def _optimise_levels(
    levels: list[tuple[_Image, _Image]],
    frame: _Frame,
    m: np.ndarray,
    cfg: AlignConfig,
    lo: int,
    hi: int,
) -> tuple[np.ndarray, float]:
    """Optimise ``M`` on pyramid levels ``lo .. hi-1``; the score is that of the last level."""
    score = -np.inf
    for k in range(lo, hi):
        m, score = optimise_affine(
            *levels[k],
            frame,
            m,
            iterations=cfg.iterations[k],
            step_px=cfg.step_px,
            window=_odd(cfg.window_fraction * cfg.pyramid[k]),
        )
    return m, score


def _best_candidate(
    levels: list[tuple[_Image, _Image]], frame: _Frame, cands: list[Candidate], cfg: AlignConfig
) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """Optimise every candidate up to level ``cfg.select_level``, refine the best on the rest.

    Returns the final ``M`` and every candidate's ``(M, score)`` at the selection level.
    """
    split = min(cfg.select_level, len(levels) - 1) + 1
    scored = [_optimise_levels(levels, frame, c.m, cfg, 0, split) for c in cands]
    best_m = max(scored, key=lambda r: r[1])[0]
    if split < len(levels):
        best_m, _ = _optimise_levels(levels, frame, best_m, cfg, split, len(levels))
    return best_m, scored


def align(
    source_rgb: np.ndarray,
    target_rgb: np.ndarray,
    *,
    source_downsample: float = 1.0,
    target_downsample: float = 1.0,
    physical_scale: float = 1.0,
    source_name: str = "source",
    target_name: str = "target",
    config: AlignConfig | None = None,
) -> AlignResult:
    """Affine alignment of a source (moving) image onto a target (fixed) one.

    ``source_rgb`` / ``target_rgb`` are uint8 ``[y, x, 3]`` levels of their slides at the given
    downsamples (e.g. thumbnails with longest side <= 1024). ``physical_scale`` is the number of
    source level-0 pixels per target level-0 pixel (target mpp / source mpp; 1 when both have
    the same pixel size): the search and the optimisation run in the target's physical units,
    so only the few % of scale between two sections is left for them to absorb.
    The returned :attr:`AlignResult.matrix` maps **target level-0** ``(x, y, 1)`` to **source
    level-0** ``(x, y, 1)``. Robust to any rotation, to a mirrored section, to stain differences
    and to partially missing tissue. Raises :class:`~wsireg.errors.InputError` (naming
    ``source_name`` / ``target_name``) when an image has no tissue.
    """
    cfg = config or AlignConfig()
    with torch_threads(cfg.threads):
        start = time.perf_counter()
        target_tissue = _find_tissue(target_rgb, target_downsample, target_name)
        source_tissue = _to_target_units(
            _find_tissue(source_rgb, source_downsample, source_name), physical_scale
        )
        result = _align(source_tissue, target_tissue, cfg, start)
    # the matrix maps target level 0 to the source in target units: on to source level 0
    to_source = grid_to_level0_affine(physical_scale)
    return replace(result, matrix=to_source @ result.matrix)


def _to_target_units(tissue: _Tissue, physical_scale: float) -> _Tissue:
    """``tissue`` of the source with its positions in target level-0 pixels (same physical
    origin, the slide's top-left corner): a source level-0 pixel is ``physical_scale`` times
    smaller, so the source's level 0 is a grid at downsample ``1 / physical_scale`` of the
    target's (:func:`wsireg.core.coords.grid_to_level0_affine`)."""
    if physical_scale == 1.0:
        return tissue
    from_source = np.linalg.inv(grid_to_level0_affine(physical_scale))
    return replace(
        tissue, to_level0=from_source @ tissue.to_level0, extent=tissue.extent / physical_scale
    )


def _align(
    source_tissue: _Tissue, target_tissue: _Tissue, cfg: AlignConfig, start: float
) -> AlignResult:
    """:func:`align` on the two tissues, both in target level-0 pixels (found since
    ``start``, a ``perf_counter`` time): the matrix maps target level 0 to the source in those
    units."""
    timings: dict[str, float] = {}
    t0 = start
    extent = max(target_tissue.extent, source_tissue.extent)  # level 0; working sizes refer to it
    spacing = extent / max(cfg.pyramid)
    target = _represent(target_tissue, spacing, cfg.representation)
    source = _represent(source_tissue, spacing, cfg.representation)
    frame = _Frame(_centre_of_mass(target), _centre_of_mass(source), extent / 2.0)
    timings["masks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    families = [(sc * np.eye(2), np.eye(2)) for sc in cfg.scales]
    moments = _moment_family(target, source, frame) if cfg.moment_family else None
    families += [moments] if moments is not None else []
    coarse, fine = cfg.search_size // 2, cfg.search_size
    cands = rotation_search(
        (_level(target, extent, coarse), _level(source, extent, coarse)),
        (_level(target, extent, fine), _level(source, extent, fine)),
        frame,
        families,
        cfg,
        windows=(_odd(cfg.window_fraction * coarse), _odd(cfg.window_fraction * fine)),
    )
    timings["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    levels = [(_level(target, extent, n), _level(source, extent, n)) for n in cfg.pyramid]
    best_m, scored = _best_candidate(levels, frame, cands, cfg)
    timings["optimise"] = time.perf_counter() - t0

    window = _odd(cfg.window_fraction * cfg.pyramid[-1])
    before = _score(*levels[-1], frame, frame.from_matrix(np.eye(3)), window)
    after = _score(*levels[-1], frame, best_m, window)
    matrix = frame.to_matrix(best_m)
    if before >= after:  # never worse than no alignment (e.g. identical slides)
        matrix, after = np.eye(3), before
    angle, flipped = decompose_affine(matrix)
    timings["total"] = sum(timings.values())
    reports = sorted(
        ((*decompose_affine(frame.to_matrix(m)), score) for m, score in scored),
        key=lambda r: -r[2],
    )
    return AlignResult(matrix, before, after, angle, flipped, timings, tuple(reports))
