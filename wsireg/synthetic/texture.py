"""Synthetic slides with exact ground truth, for tests, benchmarks, the demo and network training.

Coordinates, axes and the direction of transforms follow :mod:`wsireg.core.coords`.

Texture
    :class:`TissueTexture` is a procedural, tissue-like texture defined at every continuous
    level-0 position ``(x, y)``: a few blobby tissue pieces on white background, glands with white
    lumina lined by crowded epithelial nuclei, stroma of wavy fibres with sparse elongated nuclei
    and lymphocytic infiltrates, vessels, and low-frequency variation of gland prevalence,
    stroma density and stain intensity. It is built from two small periodic base tiles per seed
    (cells: 2048 texture units; glands: 8192 units stored at 1/4 resolution; 32 MB together)
    sampled with ``cv2.remap`` through rotated, domain-warped coordinates so that the result is
    not visibly periodic, plus analytic, non-periodic low-frequency fields. The texture is first
    evaluated as four *structure maps* (nuclei, cytoplasm, stroma, tissue; see
    :meth:`TissueTexture.structure_at`), which a :class:`Stain` turns into RGB.

    Regions are rendered in fixed, globally aligned blocks of 512 x 512 pixels, so a pixel's value
    does not depend on how a region is cut into chunks (chunks that are multiples of 512 waste no
    work).

Stains
    Beer-Lambert: ``OD = sum_i c_i * v_i`` over two dyes, ``RGB = 255 * exp(-OD)``. ``c_i`` is
    ``tissue * (w_i . [nuclei, cytoplasm, stroma, 1])``. :data:`H_AND_E` and :data:`IHC_DAB`
    (hematoxylin counterstain + brown DAB on epithelial cytoplasm) are provided;
    :meth:`Stain.jitter` perturbs dye colours and intensities.

Deformations and pairs
    :class:`wsireg.synthetic.deformation.SmoothDeformation` is ``T(x) = A @ (x + u(x))`` with
    ``u`` a sum of compactly supported radial basis functions -- the same form as a wsireg
    transform. :func:`wsireg.synthetic.slides.synthetic_pair` renders the *source* as the plain
    texture and the *target* as the texture sampled at ``T(x)``, so the returned ``truth`` is
    ``T`` itself, exact and analytic: ``source(truth(x)) ~ target(x)`` in structure (the two are
    in different stains).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, replace

import cv2
import numpy as np
import scipy.fft
from scipy import ndimage

from wsireg.core.stain import DAB, EOSIN_HE, HEMATOXYLIN, HEMATOXYLIN_HE
from wsireg.synthetic.deformation import NODE_STEP, PointMap

BLOCK = 512
"""Side of the globally aligned render blocks, in level-0 pixels."""

_CELL_PERIOD = 2048  # cell tile side, pixels = texture units
_GLAND_PERIOD = 2048  # gland tile side, pixels
_GLAND_UNIT = 4  # texture units per gland-tile pixel
_AUX = 5  # smooth fields evaluated on nodes, see TissueTexture._smooth


# --------------------------------------------------------------------------------------------
# Stains
# --------------------------------------------------------------------------------------------

_C_MAX = 3.0  # concentration quantised to uint8 over [0, _C_MAX]


@dataclass(frozen=True)
class Stain:
    """A two-dye stain.

    ``vectors[i]`` is the optical density (R, G, B) of unit concentration of dye ``i`` (unit
    norm); ``weights[i]`` gives the concentration of dye ``i`` per unit of the structure maps
    ``(nuclei, cytoplasm, stroma, 1)``, the last entry being the uniform tissue background.
    Concentrations are multiplied by the tissue map and clipped to ``[0, 3]``.
    """

    name: str
    vectors: tuple[tuple[float, float, float], tuple[float, float, float]]
    weights: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]

    def weight_matrix(self) -> np.ndarray:
        """``(2, 4)`` float32 weights of dyes (rows) on ``(nuclei, cytoplasm, stroma, 1)``."""
        return np.asarray(self.weights, dtype=np.float32)

    def lut(self) -> np.ndarray:
        """``(65536, 3)`` uint8 RGB for quantised concentrations ``q0 * 256 + q1``."""
        return _stain_lut(self.vectors)

    def rgb(self, structure: np.ndarray) -> np.ndarray:
        """RGB uint8 ``(..., 3)`` of structure maps ``(..., 4)``: nuclei, cytoplasm, stroma,
        tissue."""
        s = np.asarray(structure, dtype=np.float32)
        return _apply_stain(self, s[..., 0], s[..., 1], s[..., 2], s[..., 3])

    def jitter(self, seed: int, amount: float = 0.1) -> Stain:
        """A randomly perturbed copy: dye directions turned by ~``amount`` rad, intensities scaled
        by ~``exp(N(0, 2 * amount))``; ``amount=0`` returns ``self``."""
        if amount <= 0:
            return self
        rng = np.random.default_rng([int(seed), 0x57A1])
        vec = np.asarray(self.vectors, dtype=np.float64)
        vec = vec + rng.normal(0.0, amount, vec.shape) * np.linalg.norm(vec, axis=1)[:, None]
        vec = np.abs(vec)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        w = np.asarray(self.weights, dtype=np.float64)
        w = w * np.exp(rng.normal(0.0, 2 * amount, (2, 1)))
        return replace(
            self,
            name=f"{self.name}~{seed}",
            vectors=tuple(tuple(float(v) for v in row) for row in vec),
            weights=tuple(tuple(float(v) for v in row) for row in w),
        )


H_AND_E = Stain(
    "H&E",
    (HEMATOXYLIN_HE, EOSIN_HE),
    ((1.15, 0.08, 0.05, 0.06), (0.15, 0.8, 0.85, 0.16)),
)
"""Hematoxylin (purple nuclei) and eosin (pink cytoplasm and stroma)."""

IHC_DAB = Stain(
    "IHC",
    (HEMATOXYLIN, DAB),
    ((0.75, 0.04, 0.15, 0.06), (0.05, 1.10, 0.05, 0.02)),
)
"""Hematoxylin counterstain and brown DAB on epithelial cytoplasm (e.g. a cytokeratin IHC)."""

STAINS: dict[str, Stain] = {"he": H_AND_E, "ihc": IHC_DAB}
"""Stains by short name."""


def get_stain(stain: str | Stain) -> Stain:
    """A :class:`Stain` from itself or its short name in :data:`STAINS`."""
    if isinstance(stain, Stain):
        return stain
    try:
        return STAINS[stain.lower()]
    except KeyError:
        raise ValueError(f"unknown stain {stain!r}; known: {', '.join(STAINS)}") from None


@functools.lru_cache(maxsize=16)
def _stain_lut(vectors: tuple) -> np.ndarray:
    c = np.arange(256, dtype=np.float64) * (_C_MAX / 255.0)
    vec = np.asarray(vectors, dtype=np.float64)
    od = c[:, None, None] * vec[0] + c[None, :, None] * vec[1]
    lut = np.clip(255.0 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(lut.reshape(65536, 3))


def _apply_stain(
    stain: Stain, nuc: np.ndarray, cyto: np.ndarray, strom: np.ndarray, tissue: np.ndarray
) -> np.ndarray:
    """RGB uint8 ``(..., 3)`` from the four structure maps (float32, same shape)."""
    w = stain.weight_matrix()
    nuc, cyto, strom, tissue = np.broadcast_arrays(nuc, cyto, strom, tissue)
    index = None
    tmp = np.empty_like(nuc)
    for i in range(2):
        c = np.multiply(nuc, w[i, 0])
        for s, wk in ((cyto, w[i, 1]), (strom, w[i, 2])):
            np.multiply(s, wk, out=tmp)
            c += tmp
        c += w[i, 3]
        c *= tissue
        # rounds and saturates to uint8
        q = cv2.convertScaleAbs(c.reshape(1, -1), alpha=255.0 / _C_MAX).reshape(c.shape)
        if index is None:
            index = q.astype(np.uint16)
            index <<= 8
        else:
            index |= q
    return np.take(stain.lut(), index, axis=0)


# --------------------------------------------------------------------------------------------
# Smooth fields
# --------------------------------------------------------------------------------------------


class _FourierField:
    """Non-periodic smooth scalar fields ``(N,) -> (N, k)``: sums of random plane waves with
    wavelengths in ``[lo, hi]`` texture units, each output of unit standard deviation."""

    def __init__(
        self, rng: np.random.Generator, k: int, lo: float, hi: float, terms: int = 10
    ) -> None:
        wl = np.exp(rng.uniform(np.log(lo), np.log(hi), terms * k))
        ang = rng.uniform(0, 2 * np.pi, terms * k)
        self.freq = 2 * np.pi * np.stack([np.cos(ang), np.sin(ang)]) / wl  # (2, terms * k)
        self.phase = rng.uniform(0, 2 * np.pi, terms * k)
        self.k = k
        self.amp = np.sqrt(2.0 / terms)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        waves = np.cos(pts @ self.freq + self.phase)
        return waves.reshape(pts.shape[0], -1, self.k).sum(axis=1) * self.amp


class _PeriodicField:
    """A smooth scalar field of unit std, periodic with period ``P`` in x and y."""

    def __init__(
        self, rng: np.random.Generator, period: int, max_wavenumber: int, terms: int = 16
    ) -> None:
        k = rng.integers(-max_wavenumber, max_wavenumber + 1, (terms, 2))
        k[(k == 0).all(axis=1), 0] = 1
        self.k = 2 * np.pi * k / period
        self.amp = 1.0 / np.linalg.norm(k, axis=1)
        self.amp *= np.sqrt(2.0 / np.sum(self.amp**2))
        self.phase = rng.uniform(0, 2 * np.pi, terms)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
        arg = np.multiply.outer(x, self.k[:, 0]) + np.multiply.outer(y, self.k[:, 1]) + self.phase
        return np.cos(arg) @ self.amp


def _band_noise(
    rng: np.random.Generator, size: int, sigma_lo: float, sigma_hi: float
) -> np.ndarray:
    """Periodic band-pass noise ``(size, size)`` float32 of zero mean and unit std: white noise
    blurred by ``sigma_lo`` minus the same blurred by ``sigma_hi`` (pixels), through the FFT."""
    spec = scipy.fft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None] ** 2
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :] ** 2
    k = np.float32(-2 * np.pi**2)
    spec *= np.exp(k * sigma_lo**2 * (fy + fx)) - np.exp(k * sigma_hi**2 * (fy + fx))
    out = scipy.fft.irfft2(spec, s=(size, size))
    out -= out.mean()
    out /= out.std() + 1e-12
    return out.astype(np.float32, copy=False)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _blur_wrap(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a periodic image (wrap-around borders)."""
    m = int(math.ceil(4 * sigma)) + 1
    pad = np.pad(img, ((m, m), (m, m)), mode="wrap")
    return cv2.GaussianBlur(pad, (0, 0), sigma)[m:-m, m:-m]


def _fold(canvas: np.ndarray, m: int, op: np.ufunc = np.maximum) -> np.ndarray:
    """Fold a canvas drawn with a margin ``m`` onto the periodic tile it pads (combining with
    ``op``), so shapes crossing a tile edge reappear on the opposite edge."""
    p = canvas.shape[0] - 2 * m
    out = canvas[m : m + p, m : m + p].copy()
    parts = [(slice(0, m), slice(p - m, p)), (slice(m + p, p + 2 * m), slice(0, m))]
    parts.append((slice(m, m + p), slice(0, p)))
    for cy, ty in parts:
        for cx, tx in parts:
            if cy.start == m and cx.start == m:
                continue
            op(out[ty, tx], canvas[cy, cx], out=out[ty, tx])
    return out


def _jittered_grid(
    rng: np.random.Generator, period: int, spacing: float, jitter: float, keep: float
) -> np.ndarray:
    """Points ``(N, 2)`` on a jittered square grid over ``[0, period)^2``, each kept with
    probability ``keep``."""
    n = max(1, int(round(period / spacing)))
    g = (np.arange(n) + 0.5) * (period / n)
    pts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    pts += rng.uniform(-jitter, jitter, pts.shape) * (period / n)
    pts = pts[rng.random(len(pts)) < keep]
    return np.mod(pts, period)


# --------------------------------------------------------------------------------------------
# Base tiles
# --------------------------------------------------------------------------------------------

_SHIFT = 4  # sub-pixel bits of cv2 drawing calls


def _fx(v: np.ndarray | float) -> np.ndarray:
    return np.round(np.asarray(v) * (1 << _SHIFT)).astype(np.int32)


def _draw_ellipses(
    canvas: np.ndarray,
    centres: np.ndarray,
    axes: np.ndarray,
    angles: np.ndarray,
    values: np.ndarray,
    m: int,
) -> None:
    c = _fx(centres + m)
    a = _fx(axes)
    for (cx, cy), (ax, ay), ang, v in zip(c, a, angles, values, strict=True):
        cv2.ellipse(
            canvas,
            (int(cx), int(cy)),
            (int(ax), int(ay)),
            float(ang),
            0,
            360,
            int(v),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )


def _cell_tile(rng: np.random.Generator, p: int = _CELL_PERIOD) -> np.ndarray:
    """Cell-scale tile ``(p, p, 4)`` uint8, 1 texture unit per pixel: epithelial nuclei,
    stromal nuclei and lymphocytes (both with chromatin texture), collagen fibres, fine grain."""
    m = 160
    orient = _PeriodicField(rng, p, 3)

    dense = np.zeros((p + 2 * m,) * 2, np.uint8)
    pts = _jittered_grid(rng, p, 15.5, 0.3, 0.92)
    a = rng.uniform(5.0, 7.5, len(pts))
    axes = np.stack([a, a * rng.uniform(0.65, 1.0, len(pts))], -1)
    _draw_ellipses(
        dense, pts, axes, rng.uniform(0, 180, len(pts)), rng.uniform(150, 255, len(pts)), m
    )

    sparse = np.zeros_like(dense)
    pts = _jittered_grid(rng, p, 40.0, 0.45, 0.55)
    ang = np.degrees(0.35 * np.pi * orient(pts[:, 0], pts[:, 1]))
    axes = np.stack([rng.uniform(7, 11, len(pts)), rng.uniform(2.2, 3.3, len(pts))], -1)
    _draw_ellipses(sparse, pts, axes, ang, rng.uniform(150, 235, len(pts)), m)
    pts = _jittered_grid(rng, p, 13.0, 0.35, 0.01)  # scattered lymphocytes
    r = rng.uniform(3.4, 4.6, len(pts))
    _draw_ellipses(
        sparse, pts, np.stack([r, r], -1), np.zeros(len(pts)), rng.uniform(220, 255, len(pts)), m
    )

    fibres = _draw_fibres(rng, p, m, orient)
    grain = _band_noise(rng, p, 0.8, 3.0) * 45 + 128
    chromatin = np.clip(0.7 + 0.6 * grain / 255.0, 0.0, 1.3)
    nd = _blur_wrap(_fold(dense, m), 0.6) * chromatin
    ns = _blur_wrap(_fold(sparse, m), 0.6) * chromatin
    return np.stack([_to_u8(nd), _to_u8(ns), fibres, _to_u8(grain)], -1)


def _draw_fibres(rng: np.random.Generator, p: int, m: int, orient: _PeriodicField) -> np.ndarray:
    """Wavy collagen fibres following the orientation field, as a periodic uint8 tile."""
    n, steps, step = 7000, 28, 4.5
    pos = rng.uniform(0, p, (n, 2))
    path = [pos]
    prev = None
    wobble = rng.normal(0, 0.25, n)
    for i in range(steps):
        th = 0.35 * np.pi * orient(pos[:, 0], pos[:, 1]) + wobble * np.sin(0.4 * i)
        d = np.stack([np.cos(th), np.sin(th)], -1)
        if prev is not None:
            d *= np.sign(np.sum(d * prev, axis=1, keepdims=True) + 1e-9)
        pos = pos + step * d
        prev = d
        path.append(pos)
    lines = _fx(np.stack(path, 1) + m)
    canvas = np.zeros((p + 2 * m,) * 2, np.uint8)
    group = rng.integers(0, 6, n)
    for g in range(6):
        sel = list(lines[group == g])
        cv2.polylines(canvas, sel, False, int(110 + 29 * g), 1 + g % 2, cv2.LINE_AA, _SHIFT)
    return _blur_wrap(_fold(canvas, m), 0.7)


def _gland_tile(rng: np.random.Generator, p: int = _GLAND_PERIOD) -> np.ndarray:
    """Gland-scale tile ``(p, p, 4)`` uint8, ``_GLAND_UNIT`` texture units per pixel: epithelium,
    lumina (glands and vessels), stroma density, and a random id per group of touching glands
    (255 outside glands, 0 in vessels) with which whole glands are switched on and off."""
    m = 160  # > the largest gland radius (lobes included), so folding never cuts a gland
    epi = np.zeros((p + 2 * m,) * 2, np.uint8)
    lumen = np.zeros_like(epi)
    region = np.zeros_like(epi)  # glands dilated by 5 px
    vessel = np.zeros_like(epi)
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for c in _jittered_grid(rng, p, 125.0, 0.3, 0.8):
        r0 = rng.uniform(20, 45)
        lumen_p = 0.85 if rng.random() < 0.85 else 0.0
        for j in range(int(rng.choice([1, 1, 2, 3]))):  # 2-3 lobes: budding, branching glands
            r = r0 * (1.0 if j == 0 else rng.uniform(0.5, 0.85))
            off = c + (0 if j == 0 else np.clip(rng.normal(0, 0.6, 2), -1.2, 1.2) * r0)
            aspect, rot = rng.uniform(0.4, 1.0), rng.uniform(0, np.pi)
            outer = _blob(rng, t, r, 5, 0.1)
            _fill(region, off + m, _blob_xy(outer + 5, t, aspect, rot), 255, aa=False)
            _fill(epi, off + m, _blob_xy(outer, t, aspect, rot), 255)
            thick = rng.uniform(8, 14)
            if (r - thick) * aspect > 3 and rng.random() < lumen_p:
                inner = np.maximum(outer - thick + _blob(rng, t, 0, 7, 0.1) * r, 2.0)
                _fill(lumen, off + m, _blob_xy(inner, t, aspect, rot), 255)
    region = _fold(region, m)
    vessels = rng.uniform(0, p, (400, 2))
    vessels = vessels[region[vessels[:, 1].astype(int), vessels[:, 0].astype(int)] == 0]
    for c in vessels:
        r, aspect, rot = rng.uniform(2.5, 8), rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
        xy = _blob_xy(_blob(rng, t, r, 3, 0.1), t, aspect, rot)
        _fill(lumen, c + m, xy, 255)
        _fill(vessel, c + m, xy + 1.5 * np.sign(xy), 255, aa=False)
    gid = _periodic_ids(rng, region > 0)
    gid[_fold(vessel, m) > 0] = 0
    stroma = _band_noise(rng, p, 2.0, 25.0) * 0.22 + 0.72
    return np.stack(
        [
            _blur_wrap(_fold(epi, m), 0.8),
            _blur_wrap(_fold(lumen, m), 0.6),
            _to_u8(np.clip(stroma, 0.25, 1.0) * 255),
            gid,
        ],
        -1,
    )


def _periodic_ids(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """uint8 map: one random value in [1, 254] per connected component of ``mask`` on the
    periodic tile (components touching across opposite edges are one), 255 elsewhere."""
    labels, n = ndimage.label(mask)
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in ((labels[0], labels[-1]), (labels[:, 0], labels[:, -1])):
        for i, j in zip(a[(a > 0) & (b > 0)], b[(a > 0) & (b > 0)], strict=True):
            parent[root(int(i))] = root(int(j))
    roots = np.array([root(i) for i in range(n + 1)])
    values = rng.integers(1, 255, n + 1).astype(np.uint8)
    values[0] = 255
    return values[roots][labels]


def _blob(rng: np.random.Generator, t: np.ndarray, r: float, kmax: int, amp: float) -> np.ndarray:
    """Radius ``r`` perturbed by random angular harmonics ``2..kmax`` at angles ``t``."""
    out = np.full_like(t, r if r else 0.0)
    scale = r if r else 1.0
    for k in range(2, kmax + 1):
        out += scale * rng.normal(0, amp / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return out


def _blob_xy(radius: np.ndarray, t: np.ndarray, aspect: float, rot: float) -> np.ndarray:
    x, y = radius * np.cos(t), radius * np.sin(t) * aspect
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([c * x - s * y, s * x + c * y], -1)


def _fill(
    canvas: np.ndarray, centre: np.ndarray, xy: np.ndarray, value: int, aa: bool = True
) -> None:
    line = cv2.LINE_AA if aa else cv2.LINE_8
    cv2.fillPoly(canvas, [_fx(xy + centre)], int(value), line, _SHIFT)


class _Tiles:
    """The base tiles of one seed, with lazily built 2x mip levels."""

    def __init__(self, seed: int) -> None:
        self.cell = [_cell_tile(np.random.default_rng([seed, 1]))]
        self.gland = [_gland_tile(np.random.default_rng([seed, 2]))]
        self._lock = threading.Lock()

    def level(self, which: str, k: int) -> np.ndarray:
        levels = self.cell if which == "cell" else self.gland
        with self._lock:
            while len(levels) <= k:
                t = levels[-1]
                h, w, c = t.shape
                mean = t.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))
                levels.append(np.round(mean).astype(np.uint8))
            return levels[k]


_tiles_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _cached_tiles(seed: int) -> _Tiles:
    return _Tiles(seed)


def _tiles(seed: int) -> _Tiles:
    """The base tiles of ``seed``; the last two seeds' tiles stay cached (32 MB each)."""
    with _tiles_lock:
        return _cached_tiles(seed)


# --------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------


#: One base-tile layer of a texture: tile name, mip level, 2x3 affine from texture units to
#: pixels of that mip level, period in those pixels (see ``TissueTexture._layer``).
_Layer = tuple[str, int, np.ndarray, int]


class TissueTexture:
    """A procedural tissue texture, deterministic from ``seed``.

    ``extent`` ``(H, W)`` is the level-0 area in which tissue pieces are laid out (outside it
    there is only background). ``texture_downsample`` draws the texture as if the slide were
    downsampled by that factor: level-0 pixel ``p`` shows texture position
    ``texture_downsample * p`` (1 = native, nuclei ~12-15 px across, about 0.5 um/px).
    Use :func:`get_texture` to share instances (building the base tiles is the slow part).

    :meth:`structure_at` evaluates the texture exactly at any points; :meth:`render` and
    :meth:`structure` evaluate whole regions fast, interpolating the smooth fields between
    nodes every 16 px (the tissue outline every ``node_step`` = 4-16 px, finer for small
    extents); the two agree to well under a pixel in position (checked by
    ``tests/test_synthetic.py::test_exact_and_block_paths_agree``).
    """

    def __init__(
        self, seed: int = 0, extent: tuple[int, int] = (4096, 4096), texture_downsample: float = 1.0
    ) -> None:
        if texture_downsample <= 0:
            raise ValueError("texture_downsample must be positive")
        self.seed = int(seed)
        self.extent = (int(extent[0]), int(extent[1]))
        self.texture_downsample = float(texture_downsample)
        _tiles(self.seed)  # build the base tiles now
        rng = np.random.default_rng([self.seed, 3])
        self._layers = [self._layer(rng, _CELL_PERIOD, 1.0, "cell")]
        self._layers.append(self._layer(rng, _GLAND_PERIOD, float(_GLAND_UNIT), "gland"))
        # domain warps (texture units), smooth enough that bilinear interpolation between
        # render nodes is off by < 0.01 texture units
        self._warp_cell = _FourierField(rng, 2, 1500, 4000)
        self._warp_gland = _FourierField(rng, 2, 6000, 20000)
        self._prevalence = _FourierField(rng, 1, 6000, 25000)
        self._intensity = _FourierField(rng, 1, 3000, 15000)
        self._density = _FourierField(rng, 1, 1500, 8000)
        self._infiltrate = _FourierField(rng, 1, 600, 2500)
        self._pieces = _Pieces(rng, self.extent)
        # render node spacing: finer for small extents, whose tissue outlines curve more
        octave = math.floor(math.log2(max(min(self.extent), 1) / 512))
        self.node_step = int(min(NODE_STEP, max(4, 2**octave)))

    def _layer(self, rng: np.random.Generator, period: int, unit: float, which: str) -> _Layer:
        """One base-tile layer: (tile name, mip level, 2x3 affine from texture units to pixels
        of that mip level, period in those pixels), with a random rotation and offset."""
        spacing = self.texture_downsample / unit  # tile pixels per level-0 pixel
        k = max(0, int(math.floor(math.log2(spacing))) if spacing > 1 else 0)
        k = min(k, int(math.log2(period)) - 6)
        ang = rng.uniform(0, 2 * np.pi)
        c, s = math.cos(ang), math.sin(ang)
        mat = np.array([[c, -s, rng.uniform(0, period)], [s, c, rng.uniform(0, period)]])
        mat[:, :2] /= unit * 2**k
        mat[:, 2] /= 2**k
        return which, k, mat, period // 2**k

    # -- smooth per-position quantities ------------------------------------------------------

    def _smooth(
        self, p: np.ndarray, with_mask: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At level-0 positions ``p`` ``(N, 2)`` float64: tile coordinates of the cell and gland
        layers ``(N, 2)`` each (not reduced by the period) and ``(N, 5)`` float32 aux fields
        (soft tissue mask, gland prevalence, stain intensity, stroma density, inflammatory
        infiltrate); the tissue mask is left 0 unless ``with_mask``."""
        t = p * self.texture_downsample
        coords = []
        for (_, _, mat, _), warp, amp in zip(
            self._layers, (self._warp_cell, self._warp_gland), (20.0, 350.0), strict=True
        ):
            tw = t + amp * warp(t)
            coords.append(tw @ mat[:, :2].T + mat[:, 2])
        aux = np.empty((p.shape[0], _AUX), np.float32)
        aux[:, 0] = self._pieces.mask(p, edge=12.0) if with_mask else 0.0
        aux[:, 1] = np.clip(0.7 + 0.3 * self._prevalence(t)[:, 0], 0.15, 1.0)
        aux[:, 2] = np.clip(1.0 + 0.12 * self._intensity(t)[:, 0], 0.7, 1.3)
        aux[:, 3] = np.clip(0.9 + 0.25 * self._density(t)[:, 0], 0.4, 1.4)
        aux[:, 4] = np.clip(3.0 * (self._infiltrate(t)[:, 0] - 1.5), 0.0, 1.0)
        return coords[0], coords[1], aux

    # -- structure ---------------------------------------------------------------------------

    def structure_at(self, points: np.ndarray) -> np.ndarray:
        """Structure maps ``(N, 4)`` float32 (nuclei, cytoplasm, stroma, tissue) at level-0
        points ``(N, 2)`` ``(x, y)``, evaluated exactly at each point.

        The first three are in ``[0, 1]``; tissue is 0 on background and lumina and ~1 in
        tissue, times a low-frequency stain-intensity variation in ``[0.7, 1.3]``."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out = np.empty((p.shape[0], 4), np.float32)
        for i in range(0, p.shape[0], 1 << 18):
            out[i : i + (1 << 18)] = self._structure_at(p[i : i + (1 << 18)])
        return out

    def _structure_at(self, p: np.ndarray) -> np.ndarray:
        n, cols = p.shape[0], 1024  # cv2.remap wants maps narrower than 32767
        rows = max(1, -(-n // cols))
        pad = np.zeros((rows * cols, 2))
        pad[:n] = p
        c1, c2, aux = self._smooth(pad)
        maps = [
            np.mod(c, per).astype(np.float32).reshape(rows, cols, 2)
            for c, (_, _, _, per) in zip((c1, c2), self._layers, strict=True)
        ]
        out = self._compose(maps[0], maps[1], aux.reshape(rows, cols, _AUX))
        return np.stack(out, -1).reshape(-1, 4)[:n]

    def structure(
        self, y0: int, x0: int, h: int, w: int, deformation: PointMap | None = None
    ) -> np.ndarray:
        """Structure maps ``(h, w, 4)`` float32 of the level-0 region starting at row ``y0``,
        column ``x0``; with ``deformation``, pixel ``x`` shows the texture at ``deformation(x)``."""
        return self._render(y0, x0, h, w, None, deformation)

    def render(
        self,
        y0: int,
        x0: int,
        h: int,
        w: int,
        stain: str | Stain = "he",
        deformation: PointMap | None = None,
    ) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the level-0 region starting at row ``y0``, column ``x0``;
        with ``deformation``, pixel ``x`` shows the texture at ``deformation(x)`` (see
        :func:`wsireg.synthetic.slides.synthetic_slide` for the smoothness it needs)."""
        return self._render(y0, x0, h, w, get_stain(stain), deformation)

    def _render(
        self,
        y0: int,
        x0: int,
        h: int,
        w: int,
        stain: Stain | None,
        deformation: PointMap | None,
    ) -> np.ndarray:
        ch = 4 if stain is None else 3
        out = np.empty((h, w, ch), np.float32 if stain is None else np.uint8)
        step = _node_step(deformation)
        for by in range(BLOCK * (y0 // BLOCK), y0 + h, BLOCK):
            for bx in range(BLOCK * (x0 // BLOCK), x0 + w, BLOCK):
                ya, yb = max(y0, by), min(y0 + h, by + BLOCK)
                xa, xb = max(x0, bx), min(x0 + w, bx + BLOCK)
                block = self._block(by, bx, step, stain, deformation)
                part = block[ya - by : yb - by, xa - bx : xb - bx]
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = part
        return out

    def _block(
        self, by: int, bx: int, s: int, stain: Stain | None, deformation: PointMap | None
    ) -> np.ndarray:
        """One aligned ``BLOCK`` x ``BLOCK`` block: smooth fields on nodes every ``s`` pixels
        (the tissue mask on nodes every ``min(s, node_step)``), bilinearly upsampled, then the
        tiles are remapped."""
        p = self._nodes(by, bx, s, deformation)
        sm = min(s, self.node_step)
        c1, c2, aux = self._smooth(p, with_mask=sm == s)
        maps = []
        n = BLOCK // s + 2
        for c, (_, _, _, per) in zip((c1, c2), self._layers, strict=True):
            centre = c[(n // 2) * n + n // 2]
            c = (c - per * np.floor(centre / per)).astype(np.float32)
            maps.append(_upsample(c, s))
        aux = _upsample(aux, s)
        if sm < s:
            mask = self._pieces.mask(self._nodes(by, bx, sm, deformation), edge=12.0)
            aux[..., 0] = _upsample(mask.astype(np.float32)[:, None], sm)[..., 0]
        parts = self._compose(maps[0], maps[1], aux)
        if stain is None:
            return np.stack(parts, -1)
        return _apply_stain(stain, *parts)

    @staticmethod
    def _nodes(by: int, bx: int, s: int, deformation: PointMap | None) -> np.ndarray:
        """Positions ``(n * n, 2)`` shown at the nodes, every ``s`` pixels, of the block at
        ``(by, bx)`` (one node beyond each edge): the nodes or their image by ``deformation``."""
        n = BLOCK // s + 2
        g = np.arange(n) * s + (s - 1) / 2.0 - s
        nodes = np.stack(np.meshgrid(g + bx, g + by), -1).reshape(-1, 2)
        return nodes if deformation is None else np.asarray(deformation(nodes), dtype=np.float64)

    def _compose(
        self, map_cell: np.ndarray, map_gland: np.ndarray, aux: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Nuclei, cytoplasm, stroma and tissue maps (float32, in [0, 1]) from the tile
        coordinates ``(h, w, 2)`` of both layers and the aux fields ``(h, w, 5)``; in stroma,
        crowded nuclei (the epithelial nuclei pattern) show where there is infiltrate.
        In-place arithmetic: fresh arrays are expensive at this size."""
        (_, k1, _, _), (_, k2, _, _) = self._layers
        tiles = _tiles(self.seed)
        cell = cv2.remap(
            tiles.level("cell", k1), map_cell, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP
        )
        gland = cv2.remap(
            tiles.level("gland", k2), map_gland, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP
        )
        f = np.float32(1.0 / 255.0)
        present = gland[..., 3] <= aux[..., 1] * np.float32(255.0)
        epi = np.multiply(gland[..., 0], f, dtype=np.float32)
        epi *= present
        nuc = np.multiply(cell[..., 0], f, dtype=np.float32)  # crowded nuclei
        other = np.multiply(cell[..., 1], f, dtype=np.float32)  # stromal nuclei
        mix = np.maximum(epi, aux[..., 4])
        nuc -= other
        nuc *= mix
        nuc += other
        grain = np.multiply(cell[..., 3], f, dtype=np.float32)
        cyto = np.multiply(grain, np.float32(0.8))
        cyto += np.float32(0.45)
        cyto *= epi
        strom = np.multiply(cell[..., 2], np.float32(0.6 / 255.0), dtype=np.float32)
        strom += np.float32(0.1)
        strom *= gland[..., 2]
        strom *= f
        strom *= aux[..., 3]
        np.subtract(np.float32(1.0), epi, out=other)
        strom *= other
        tissue = np.multiply(aux[..., 0], np.float32(5.0))
        grain -= np.float32(0.5)
        grain *= np.float32(1.75)
        tissue += grain
        tissue -= np.float32(2.0)
        np.clip(tissue, 0.0, 1.0, out=tissue)
        np.multiply(gland[..., 1], -f, out=other, dtype=np.float32)
        other *= present
        other += np.float32(1.0)
        tissue *= other
        tissue *= aux[..., 2]
        return nuc, cyto, strom, tissue


class _Pieces:
    """A few blobby tissue pieces laid out in an extent; :meth:`mask` is a soft inside mask."""

    def __init__(self, rng: np.random.Generator, extent: tuple[int, int]) -> None:
        h, w = extent
        size = min(h, w)
        n = int(rng.integers(2, 5))
        # the main piece, elongated along the long side of the extent, then smaller ones, all
        # kept (but for their outline noise) inside the extent
        self.centres = [np.array([w, h]) / 2.0 + rng.uniform(-0.04, 0.04, 2) * size]
        self.radii = [rng.uniform(0.3, 0.36) * size]
        self.aspect = [min(1.5, max(w, h) / size) * rng.uniform(0.85, 1.15)]
        self.angle = [(0.0 if w >= h else np.pi / 2) + rng.uniform(-0.2, 0.2)]
        for _ in range(n - 1):
            r = rng.uniform(0.08, 0.18) * size
            margin = r + 0.05 * size
            self.centres.append(rng.uniform([margin, margin], [w - margin, h - margin]))
            self.radii.append(r)
            self.aspect.append(rng.uniform(0.6, 1.0))
            self.angle.append(rng.uniform(0, np.pi))
        self.harm = rng.normal(0, 1, (n, 6)) * (0.12 / np.arange(2, 8))
        self.phase = rng.uniform(0, 2 * np.pi, (n, 6))
        # two octaves of outline noise, smooth at the scale of the render nodes
        lo = max(0.05 * size, 300.0)
        self.edge_noise = _FourierField(rng, 1, lo, max(0.25 * size, 2 * lo))
        self.edge_amp = min(0.025 * size, 0.02 * lo)
        self.edge_noise_fine = _FourierField(rng, 1, 400.0, 1200.0)

    def mask(self, p: np.ndarray, edge: float) -> np.ndarray:
        """Soft inside mask at points ``(N, 2)``: 0.5 on the outline, +-0.5 ``edge`` px inside or
        outside (not clipped, so that it interpolates well)."""
        sd = np.full(p.shape[0], -np.inf)
        coef = self.harm * np.exp(1j * self.phase)  # harmonics 2..7 as complex coefficients
        for i, (c, r) in enumerate(zip(self.centres, self.radii, strict=True)):
            ca, sa = math.cos(self.angle[i]), math.sin(self.angle[i])
            d = p - c
            u = (ca * d[:, 0] + sa * d[:, 1]) / self.aspect[i]
            v = -sa * d[:, 0] + ca * d[:, 1]
            rho = np.hypot(u, v)
            z = (u + 1j * v) / np.maximum(rho, 1e-9)  # exp(i theta)
            acc = np.full(p.shape[0], coef[i, -1])
            for ck in coef[i, -2::-1]:  # Horner: sum_k c_k z^k, k = 2..7
                acc = acc * z + ck
            rr = r * (1.0 + (acc * z * z).real)
            np.maximum(sd, rr - rho, out=sd)
        sd += self.edge_amp * self.edge_noise(p)[:, 0] + 6.0 * self.edge_noise_fine(p)[:, 0]
        return sd / edge + 0.5


def _upsample(values: np.ndarray, s: int) -> np.ndarray:
    """Bilinear upsampling of node values ``(n * n, k)`` float32 (see ``TissueTexture._nodes``)
    to the ``(BLOCK, BLOCK, k)`` pixels of their block: cv2.resize by ``s`` and crop, so that
    every pixel lies between nodes."""
    n = BLOCK // s + 2
    k = values.shape[1]
    up = cv2.resize(values.reshape(n, n, k), (n * s, n * s), interpolation=cv2.INTER_LINEAR)
    return up.reshape(n * s, n * s, k)[s : s + BLOCK, s : s + BLOCK]


_texture_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _cached_texture(seed: int, extent: tuple[int, int], texture_downsample: float) -> TissueTexture:
    return TissueTexture(seed, extent, texture_downsample)


def get_texture(
    seed: int, extent: tuple[int, int], texture_downsample: float = 1.0
) -> TissueTexture:
    """A shared :class:`TissueTexture` (built once per process; thread-safe)."""
    with _texture_lock:
        ext = (int(extent[0]), int(extent[1]))
        return _cached_texture(int(seed), ext, float(texture_downsample))


def _node_step(deformation: PointMap | None) -> int:
    if deformation is None:
        return NODE_STEP
    return int(getattr(deformation, "render_step", 8))
