"""Smooth, known deformations: the ground truth of synthetic registration problems.

:class:`SmoothDeformation` is ``T(x) = A @ (x + u(x))`` with ``u`` a sum of compactly supported
radial basis functions -- the same form as a wsireg transform -- mapping level-0 points ``(x, y)``
of the target to the source (the direction of :mod:`wsireg.core.coords`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

PointMap = Callable[[np.ndarray], np.ndarray]
"""A map of points ``(N, 2)`` ``(x, y)`` level-0 pixels to points ``(N, 2)``."""

NODE_STEP = 16
"""Largest spacing (level-0 pixels) of the nodes on which renderers evaluate smooth fields."""
_RENDER_TOL = 0.02  # target bilinear error of an interpolated deformation, level-0 pixels

# --------------------------------------------------------------------------------------------
# Deformations
# --------------------------------------------------------------------------------------------


def _wendland(r: np.ndarray) -> np.ndarray:
    """Wendland C2 kernel ``(1 - r)^4 (4 r + 1)`` for ``r < 1``, else 0."""
    q = np.clip(1.0 - r, 0.0, None)
    q2 = q * q
    return q2 * q2 * (4.0 * r + 1.0)


@dataclass(frozen=True, eq=False)
class SmoothDeformation:
    """``T(x) = A @ (x + u(x))``: a smooth nonrigid displacement then an affine, mapping level-0
    points ``(x, y)`` of the target to the source (the direction of :mod:`wsireg.core.coords`).

    ``u(x) = sum_k w_k phi(|x - c_k| / support)`` with the compactly supported Wendland kernel
    ``phi``; the centres ``c_k`` ``(ny, nx, 2)`` lie on a jittered grid of ``spacing`` pixels
    starting at ``origin`` (at most ``0.25 * spacing`` from their cell centres), weights
    ``(ny, nx, 2)`` in level-0 pixels. ``affine`` is the 3x3 ``A``. ``render_step`` is the node
    spacing at which renderers may interpolate ``T`` bilinearly. Build with :meth:`random`.
    """

    affine: np.ndarray
    centres: np.ndarray
    weights: np.ndarray
    origin: tuple[float, float]
    spacing: float
    support: float
    render_step: int = 8

    def __dask_tokenize__(self) -> tuple[object, ...]:
        return (
            "SmoothDeformation",
            self.affine.tobytes(),
            self.centres.tobytes(),
            self.weights.tobytes(),
            self.origin,
            self.spacing,
            self.support,
            self.render_step,
        )

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u(x)`` ``(N, 2)`` level-0 pixels at points ``(N, 2)``."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out = np.zeros_like(p)
        if self.weights.size == 0 or not np.any(self.weights):
            return out
        for i in range(0, p.shape[0], 8192):
            out[i : i + 8192] = self._displacement(p[i : i + 8192])
        return out

    def _displacement(self, p: np.ndarray) -> np.ndarray:
        ny, nx = self.weights.shape[:2]
        g = self.spacing
        reach = int(math.ceil(self.support / g + 0.75))
        off = np.arange(-reach, reach + 1)
        cell = np.floor((p - np.asarray(self.origin)) / g)
        cell = np.clip(cell, -2 * reach, np.array([nx, ny]) + 2 * reach).astype(np.int64)
        iy = (cell[:, 1, None] + off)[:, :, None]  # (N, n, 1)
        ix = (cell[:, 0, None] + off)[:, None, :]  # (N, 1, n)
        ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)  # (N, n, n)
        iy, ix = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
        d = p[:, None, None, :] - self.centres[iy, ix]  # (N, n, n, 2)
        r = np.sqrt(np.einsum("...k,...k->...", d, d)) * (1.0 / self.support)
        phi = _wendland(r) * ok
        return np.einsum("nij,nijk->nk", phi, self.weights[iy, ix])

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``T(x)`` ``(N, 2)``: source points of target points ``(N, 2)``."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        q = p + self.displacement(p)
        return q @ self.affine[:2, :2].T + self.affine[:2, 2]

    def field(self, shape: tuple[int, int], downsample: float = 1.0) -> np.ndarray:
        """``u`` sampled on the grid of a level-0 image of ``shape`` ``(H, W)`` at
        ``downsample``: ``(2, H_d, W_d)`` float32 (x then y displacement, level-0 pixels), as a
        wsireg transform stores it; ``H_d = ceil(H / downsample)``."""
        hd = int(math.ceil(shape[0] / downsample))
        wd = int(math.ceil(shape[1] / downsample))
        xs = downsample * (np.arange(wd) + 0.5) - 0.5
        ys = downsample * (np.arange(hd) + 0.5) - 0.5
        pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        u = self.displacement(pts).astype(np.float32)
        return np.ascontiguousarray(u.reshape(hd, wd, 2).transpose(2, 0, 1))

    @classmethod
    def random(  # noqa: PLR0913 - public keyword-only API: one keyword per part of the affine
        cls,
        shape: tuple[int, int],
        max_displacement: float,
        scale: float | None = None,
        *,
        rotation: float = 0.0,
        translation: tuple[float, float] = (0.0, 0.0),
        zoom: float = 1.0,
        shear: float = 0.0,
        flip: bool = False,
        seed: int = 0,
    ) -> SmoothDeformation:
        """A random deformation of a level-0 image of ``shape`` ``(H, W)``.

        ``max_displacement``: max ``|u|`` over the image, level-0 pixels. ``scale``: spacing of
        the basis functions (features of ``u`` are ~2x that), default
        ``max(8 * max_displacement, min(H, W) / 5)``; ``max |grad u|`` is about
        ``4 * max_displacement / scale``. The affine, about the image centre
        ``c``, is ``A = Tr(c + translation) R(rotation) Z(zoom) Sh(shear) F Tr(-c)`` with
        ``R`` the matrix ``[[cos, -sin], [sin, cos]]`` of ``rotation`` degrees, ``Sh`` the
        shear ``[[1, shear], [0, 1]]`` and ``F`` ``diag(-1, 1)`` if ``flip`` (a horizontal
        mirror). Raises ``ValueError`` if ``u`` would fold (``|grad u| >= 0.7``).
        """
        h, w = int(shape[0]), int(shape[1])
        if scale is None:
            scale = max(8.0 * max_displacement, min(h, w) / 5.0)
        g = float(scale)
        rng = np.random.default_rng([int(seed), 0xDEF])
        origin = (-1.5 * g, -1.5 * g)
        nx, ny = int(math.ceil(w / g)) + 3, int(math.ceil(h / g)) + 3
        cells = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1) + 0.5
        centres = np.asarray(origin) + (cells + rng.uniform(-0.25, 0.25, (ny, nx, 2))) * g
        weights = rng.normal(0.0, 1.0, (ny, nx, 2))
        affine = _affine(h, w, rotation, translation, zoom, shear, flip)
        deform = cls(affine, centres, weights, origin, g, 2.0 * g)
        if max_displacement <= 0:
            return replace(deform, weights=np.zeros_like(weights), render_step=NODE_STEP)
        step = min(g / 6.0, max(h, w) / 100.0)
        xs = np.arange(0.0, w + step / 2, step)
        ys = np.arange(0.0, h + step / 2, step)
        pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        u = deform.displacement(pts)
        weights = weights * (max_displacement / np.max(np.linalg.norm(u, axis=1)))
        deform = replace(deform, weights=weights)
        grad, curv = _derivative_bounds(deform, pts)
        if grad >= 0.7:
            raise ValueError(
                f"deformation would fold (max |grad u| = {grad:.2f} >= 0.7): "
                f"decrease max_displacement ({max_displacement}) or increase scale ({g:.0f})"
            )
        return replace(deform, render_step=_render_step(curv))


def _affine(
    h: int,
    w: int,
    rotation: float,
    translation: tuple[float, float],
    zoom: float,
    shear: float,
    flip: bool,
) -> np.ndarray:
    """The 3x3 affine of :meth:`SmoothDeformation.random`, about the centre of an ``(h, w)``
    image."""
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    th = math.radians(rotation)
    m = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = m @ (zoom * np.eye(2)) @ np.array([[1.0, shear], [0.0, 1.0]])
    if flip:
        m = m @ np.diag([-1.0, 1.0])
    a = np.eye(3)
    a[:2, :2] = m
    a[:2, 2] = c + np.asarray(translation, dtype=np.float64) - m @ c
    return a


def _derivative_bounds(deform: SmoothDeformation, pts: np.ndarray) -> tuple[float, float]:
    """Max spectral norm of ``grad u`` and max second derivative of ``u`` near ``pts`` (finite
    differences with a step of ``support / 16``, times a 1.5 safety factor for the second)."""
    e = deform.support / 16.0
    u0 = deform.displacement(pts)
    ux = [deform.displacement(pts + [s * e, 0]) for s in (-1, 1)]
    uy = [deform.displacement(pts + [0, s * e]) for s in (-1, 1)]
    jac = np.stack([(ux[1] - ux[0]) / (2 * e), (uy[1] - uy[0]) / (2 * e)], -1)  # (N, 2, 2)
    grad = float(np.max(np.linalg.norm(jac, ord=2, axis=(1, 2))))
    dxx = np.abs(ux[1] + ux[0] - 2 * u0).max() / e**2
    dyy = np.abs(uy[1] + uy[0] - 2 * u0).max() / e**2
    return grad, 1.5 * float(max(dxx, dyy))


def _render_step(curvature: float) -> int:
    """Largest power-of-two node step <= 16 with bilinear error ``s^2 / 8 * curvature`` below
    :data:`_RENDER_TOL` (at least 2)."""
    s = NODE_STEP
    while s > 2 and s * s / 8.0 * curvature > _RENDER_TOL:
        s //= 2
    return s
