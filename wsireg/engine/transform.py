"""The transform model: what a registration produces and what the warp engine applies.

A :class:`Transform` maps level-0 positions of the **target** (fixed) slide to level-0 positions
of the **source** (moving) slide, ``T(x) = A @ (x + u(x))`` (the convention of
:mod:`wsireg.core.coords`). Points go either way, named by where they start and end:
``map_points(points, "target_to_source")`` is ``T``, ``"source_to_target"`` is ``T^-1``.
It is a chain of :class:`Stage` s, applied first to last, so that the transforms of serial
sections compose without resampling anything: source pixels are interpolated once, whatever
the number of stages.

On disk a transform is a directory::

    transform.json   format version, source/target identity (path, level-0 size, levels, mpp),
                     the stages (affine, field path, field downsample and units), parameters
    field.zarr       the displacement field u of stage 0: zarr array (2, H_d, W_d) float32,
                     channel 0 = x, 1 = y, level-0 pixels, on the target grid at downsample d
    field-1.zarr...  fields of later stages of a chain, if any

Field values anywhere are bilinear interpolations of the stored nodes (edge values replicated
past the last node), read box by box: nothing loads a whole field.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from wsireg.core.coords import from_level0, to_level0
from wsireg.errors import TransformError
from wsireg.io.output import staged_output
from wsireg.io.slide import Slide

FORMAT_VERSION = 1
FIELD_UNITS = "level-0 pixels"
#: Smallest |det| of an affine's linear part (a smaller one is singular).
MIN_DETERMINANT = 1e-12
#: Largest field window (bytes) read at once to map scattered points.
POINT_WINDOW_BYTES = 64 << 20

#: A displacement field ``(2, H_d, W_d)``: on disk (zarr) or in memory.
FieldArray = zarr.Array | np.ndarray
#: Which way :meth:`Transform.map_points` maps, named by where the points start and end:
#: ``"target_to_source"`` is ``T``, ``"source_to_target"`` is ``T^-1`` (what ``wsireg
#: warp-points`` does without ``--inverse``). The same words in the API and the CLI.
Direction = Literal["target_to_source", "source_to_target"]
DIRECTIONS: tuple[Direction, ...] = ("target_to_source", "source_to_target")
#: Direction words refused (ambiguous between API and CLI), each with the word for what it
#: meant in :meth:`Transform.map_points`, which its error names.
RETIRED_DIRECTIONS = {"forward": "target_to_source", "inverse": "source_to_target"}


def check_direction(direction: str) -> Direction:
    """``direction`` if it is one of :data:`DIRECTIONS`, else a ``ValueError`` naming them
    (a retired word such as ``"forward"`` is never mapped silently: its error says which new
    word it meant in ``Transform.map_points``)."""
    if direction in DIRECTIONS:
        return direction  # type: ignore[return-value]
    if direction in RETIRED_DIRECTIONS:
        raise ValueError(
            f"direction {direction!r} is no longer accepted: use 'target_to_source' (T: target "
            "points into the source) or 'source_to_target' (T^-1: source points into the "
            "target, what `wsireg warp-points` does without --inverse); "
            f"{direction!r} used to mean {RETIRED_DIRECTIONS[direction]!r} here"
        )
    raise ValueError(
        f"direction must be 'target_to_source' or 'source_to_target', not {direction!r}"
    )


@dataclass(frozen=True)
class SlideRef:
    """Identity of a slide a transform refers to: path, level-0 ``(H, W)``, levels, mpp."""

    path: str | None
    shape: tuple[int, int]
    mpp: tuple[float, float] | None = None
    levels: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_slide(cls, slide: Slide) -> SlideRef:
        return cls(
            path=str(slide.path),
            shape=tuple(slide.level_shape(0)),
            mpp=tuple(slide.mpp) if slide.mpp else None,
            levels=tuple(tuple(slide.level_shape(i)) for i in range(slide.level_count)),
        )

    @property
    def known(self) -> bool:
        """False for a slide whose size is unknown (shape ``(0, 0)``): the source of a field
        imported from another tool without wsireg's metadata."""
        return tuple(self.shape) != (0, 0)

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(H, W)`` of ``level``: the slide's own, else halvings of level 0."""
        if level < len(self.levels):
            return self.levels[level]
        h, w = self.shape
        return (max(1, math.ceil(h / 2**level)), max(1, math.ceil(w / 2**level)))

    def level_downsample(self, level: int) -> float:
        h, w = self.level_shape(level)
        return math.sqrt(self.shape[0] * self.shape[1] / (h * w))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "mpp": list(self.mpp) if self.mpp else None,
            "levels": [list(s) for s in self.levels],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlideRef:
        return cls(
            path=data.get("path"),
            shape=tuple(int(v) for v in data["shape"]),
            mpp=tuple(float(v) for v in data["mpp"]) if data.get("mpp") else None,
            levels=tuple(tuple(int(v) for v in s) for s in data.get("levels", [])),
        )


#: Bytes of float32 field values :meth:`Stage.folding_share` reads at a time.
FOLDING_STRIP_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------
# One stage: x -> A (x + u(x))
# --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """``x -> A @ (x + u(x))``; ``field`` is ``None`` (affine only) or ``(2, H_d, W_d)``.

    ``field`` may be a zarr array or a numpy array (level-0 pixel units, target grid at
    ``field_downsample``).
    """

    affine: np.ndarray
    field: FieldArray | None = None
    field_downsample: float = 1.0

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64).reshape(3, 3)
        if not np.isfinite(self.affine).all():
            raise ValueError("the affine has non-finite entries")
        if not np.array_equal(self.affine[2], [0.0, 0.0, 1.0]):
            raise ValueError("the affine's last row is not [0, 0, 1]")
        if abs(np.linalg.det(self.affine[:2, :2])) < MIN_DETERMINANT:
            raise ValueError("the affine is singular (it maps the plane onto a line)")

    @property
    def field_shape(self) -> tuple[int, int] | None:
        return None if self.field is None else tuple(self.field.shape[1:])

    def folding_share(self, rows: int | None = None) -> float:
        """Share of the field's nodes where ``x -> x + u(x)`` folds (Jacobian determinant
        ``<= 0``, :func:`wsireg.core.field.jacobian_determinant`, differences between
        neighbouring nodes), 0 without a field or with fewer than 2 nodes a side. Read ``rows``
        node rows at a time (default: as many as fit :data:`FOLDING_STRIP_BYTES`; one row of
        overlap), so a level-0 field of any size stays out of memory (its whole field is read
        once)."""
        if self.field is None or min(self.field_shape) < 2:
            return 0.0
        import torch  # here: the CLI imports this module at start-up

        from wsireg.core.field import jacobian_determinant

        height, width = self.field_shape
        rows = rows or max(1, FOLDING_STRIP_BYTES // (2 * 4 * width))
        folded = 0
        for y0 in range(0, height, rows):
            lo, hi = max(0, y0 - 1), min(height, y0 + rows + 1)  # >= 2 rows
            strip = self._checked(lambda lo=lo, hi=hi: np.asarray(self.field[:, lo:hi]))
            grid = torch.from_numpy(strip.astype(np.float32))[None] / self.field_downsample
            det = jacobian_determinant(grid)[0, y0 - lo : y0 - lo + min(rows, height - y0)]
            folded += int((det <= 0).sum())
        return folded / float(height * width)

    # -- scattered points ---------------------------------------------------------------------
    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u`` at level-0 ``points`` (N, 2), bilinear between field nodes."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.field is None or len(points) == 0:
            return np.zeros_like(points)
        d = self.field_downsample
        gx = from_level0(points[:, 0], d)
        gy = from_level0(points[:, 1], d)
        return self._checked(lambda: _bilinear_points(self.field, gx, gy))

    def _checked(self, read: Callable[[], np.ndarray]) -> np.ndarray:
        """``read()`` of field values, every failure a :class:`TransformError` naming the
        field: an undecodable chunk, or values that are not finite (a missing chunk of a field
        made by :func:`create_field` reads as NaN)."""
        where = _stored_at(self.field) or "field"
        try:
            values = read()
        except Exception as exc:  # a decode error of any codec: the field's data is corrupt
            raise TransformError(where, f"cannot read the field: {exc}") from exc
        if not np.isfinite(values).all():
            raise TransformError(
                where, "the field has missing or non-finite values (an incomplete or corrupt chunk)"
            )
        return values

    def target_to_source(self, points: np.ndarray) -> np.ndarray:
        """``A (x + u(x))`` at level-0 ``points`` (N, 2)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        moved = points + self.displacement(points)
        return _apply_affine(self.affine, moved)

    def source_to_target(
        self, points: np.ndarray, iterations: int = 100, tol: float = 1e-4
    ) -> tuple[np.ndarray, np.ndarray]:
        """Solve ``A (x + u(x)) = p`` for x at level-0 source ``points`` p, point by point
        (vectorised).

        With ``q = A^-1 p`` the equation is ``F(x) = x + u(x) - q = 0``. The iteration starts
        with fixed-point steps ``x <- q - u(x)`` (convergent where ``u`` is a contraction,
        ``|grad u| < 1``) and continues with damped Newton steps
        ``x <- x - t (I + grad u(x))^-1 F(x)`` (``grad u`` by central differences over one
        field node, ``t`` halved until ``|F|`` decreases), which also converge where the field
        stretches or compresses strongly but does not fold. Returns ``(x, residual)`` with the
        residual ``|T(x) - p|`` in level-0 pixels of the source, per point.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        q = _apply_affine(np.linalg.inv(self.affine), points)
        x = q.copy()
        if self.field is not None and len(x):
            x = self._solve(q, iterations, tol)
        residual = np.linalg.norm(self.target_to_source(x) - points, axis=1)
        return x, residual

    def _solve(self, q: np.ndarray, iterations: int, tol: float) -> np.ndarray:
        x = q - self.displacement(q)
        for _ in range(min(10, iterations)):  # cheap fixed-point steps first
            x = q - self.displacement(x)
        f = x + self.displacement(x) - q
        h = self.field_downsample
        for _ in range(iterations):
            norm = np.linalg.norm(f, axis=1)
            active = norm > tol
            if not active.any():
                break
            xa, fa = x[active], f[active]
            dx = (self.displacement(xa + [h, 0]) - self.displacement(xa - [h, 0])) / (2 * h)
            dy = (self.displacement(xa + [0, h]) - self.displacement(xa - [0, h])) / (2 * h)
            jac = np.stack([dx, dy], axis=-1) + np.eye(2)  # (n, 2, 2): d(x + u)/dx
            det = np.linalg.det(jac)
            ok = np.abs(det) > 1e-6
            step = np.where(
                ok[:, None],
                np.linalg.solve(np.where(ok[:, None, None], jac, np.eye(2)), fa[..., None])[..., 0],
                fa,
            )
            t = np.ones(len(xa))
            best_x, best_f = xa, fa
            for _ in range(8):  # backtracking: accept where the residual decreases
                trial = xa - t[:, None] * step
                f_trial = trial + self.displacement(trial) - q[active]
                better = np.linalg.norm(f_trial, axis=1) < np.linalg.norm(best_f, axis=1)
                best_x = np.where(better[:, None], trial, best_x)
                best_f = np.where(better[:, None], f_trial, best_f)
                if better.all():
                    break
                t = np.where(better, t, t / 2)
            x[active], f[active] = best_x, best_f
        return x

    # -- a block of an output grid --------------------------------------------------------------
    def displacement_block(
        self,
        y0: int,
        x0: int,
        h: int,
        w: int,
        downsample: float,
        matrix: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """``u`` (h, w, 2) float32 at the centres of pixels ``[y0:y0+h, x0:x0+w]`` of a target
        grid at ``downsample`` (``matrix @ u`` if a 2x2 ``matrix`` is given: linear maps commute
        with interpolation, so it is applied to the few nodes); ``None`` for an affine-only stage.

        Reads only the field nodes under the block (plus one node of halo). Bilinear with
        weights quantised to 1/32 of a node spacing (OpenCV's remap), so the error is at most
        1/64 of the difference between neighbouring nodes, far below a pixel for any smooth
        field.
        """
        if self.field is None:
            return None
        d = self.field_downsample
        # An output much coarser than the field reads every `step`-th node only (bounded
        # memory for thumbnails and coarse levels of a huge field; u is smooth at that scale).
        step = max(1, int(downsample / d))
        fy = from_level0(to_level0(np.arange(y0, y0 + h), downsample), d)
        fx = from_level0(to_level0(np.arange(x0, x0 + w), downsample), d)
        iy0, ix0 = math.floor(fy[0]), math.floor(fx[0])
        ny, nx = math.floor((fy[-1] - iy0) / step) + 2, math.floor((fx[-1] - ix0) / step) + 2
        fld = self.field
        u = self._checked(
            lambda: read_field_window(fld, iy0, iy0 + ny * step, ix0, ix0 + nx * step, step)
        )
        fy, fx = iy0 + (fy - iy0) / step, ix0 + (fx - ix0) / step
        if matrix is not None:
            u = np.einsum("ij,jyx->iyx", np.asarray(matrix, np.float64), u)
        nodes = np.ascontiguousarray(np.moveaxis(u, 0, -1), dtype=np.float32)
        map_x = np.empty((h, w), np.float32)
        map_y = np.empty((h, w), np.float32)
        map_x[:] = (fx - ix0).astype(np.float32)[None, :]
        map_y[:] = (fy - iy0).astype(np.float32)[:, None]
        return cv2.remap(nodes, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def read_field_window(
    fld: FieldArray, iy0: int, iy1: int, ix0: int, ix1: int, step: int = 1
) -> np.ndarray:
    """Field nodes ``[:, iy0:iy1:step, ix0:ix1:step]``; indices past the field are clamped to
    its edge (edge nodes replicated). Reads one strided window."""
    _, H, W = fld.shape
    ry = np.clip(np.arange(iy0, iy1, step), 0, H - 1)
    rx = np.clip(np.arange(ix0, ix1, step), 0, W - 1)
    inside_y = np.unique(ry)
    inside_x = np.unique(rx)
    if step == 1:
        window = fld[:, inside_y[0] : inside_y[-1] + 1, inside_x[0] : inside_x[-1] + 1]
        window = np.asarray(window, dtype=np.float64)
        return window[:, (ry - inside_y[0])[:, None], (rx - inside_x[0])[None, :]]
    # strided: read only the rows/columns needed (orthogonal selection), then replicate
    window = _orthogonal(fld, inside_y, inside_x)
    return window[:, np.searchsorted(inside_y, ry)[:, None], np.searchsorted(inside_x, rx)[None, :]]


def _orthogonal(fld: FieldArray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if hasattr(fld, "get_orthogonal_selection"):
        return np.asarray(fld.get_orthogonal_selection((slice(None), rows, cols)), np.float64)
    return np.asarray(fld, dtype=np.float64)[:, rows[:, None], cols[None, :]]


def _bilinear_points(fld: FieldArray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear field values (N, 2) at continuous node coordinates, edges replicated."""
    _, H, W = fld.shape
    gx = np.clip(gx, 0, W - 1)
    gy = np.clip(gy, 0, H - 1)
    x0 = np.minimum(np.floor(gx).astype(np.int64), max(W - 2, 0))
    y0 = np.minimum(np.floor(gy).astype(np.int64), max(H - 2, 0))
    fx, fy = gx - x0, gy - y0
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    wy0, wy1 = int(y0.min()), int(y1.max()) + 1
    wx0, wx1 = int(x0.min()), int(x1.max()) + 1
    window_bytes = 2 * (wy1 - wy0) * (wx1 - wx0) * 8
    if window_bytes <= POINT_WINDOW_BYTES:
        window = np.asarray(fld[:, wy0:wy1, wx0:wx1], dtype=np.float64)

        def gather(iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
            return window[:, iy - wy0, ix - wx0]
    else:  # points spread over a huge field: read only the chunks under them

        def gather(iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
            return np.stack([_coordinate_selection(fld, c, iy, ix) for c in range(2)]).astype(
                np.float64
            )

    v00, v01 = gather(y0, x0), gather(y0, x1)
    v10, v11 = gather(y1, x0), gather(y1, x1)
    top = v00 * (1 - fx) + v01 * fx
    bottom = v10 * (1 - fx) + v11 * fx
    return (top * (1 - fy) + bottom * fy).T


def _coordinate_selection(
    fld: FieldArray, channel: int, iy: np.ndarray, ix: np.ndarray
) -> np.ndarray:
    if hasattr(fld, "get_coordinate_selection"):
        return fld.get_coordinate_selection((np.full_like(iy, channel), iy, ix))
    return np.asarray(fld)[channel, iy, ix]


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:2, :2].T + affine[:2, 2]


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------
@dataclass
class Transform:
    """Target level-0 -> source level-0 mapping, a chain of :class:`Stage` s (first to last).

    ``parameters`` records how it was made (registration options, timings); free-form JSON.
    """

    stages: list[Stage]
    target: SlideRef
    source: SlideRef
    parameters: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def identity(cls, target: SlideRef, source: SlideRef | None = None) -> Transform:
        return cls([Stage(np.eye(3))], target, source or target)

    @classmethod
    def from_affine(cls, affine: np.ndarray, target: SlideRef, source: SlideRef) -> Transform:
        return cls([Stage(affine)], target, source)

    @classmethod
    def from_field(
        cls,
        affine: np.ndarray,
        fld: FieldArray,
        field_downsample: float,
        target: SlideRef,
        source: SlideRef,
    ) -> Transform:
        return cls([Stage(affine, fld, field_downsample)], target, source)

    def then(self, other: Transform) -> Transform:
        """Apply ``self`` then ``other``: ``x -> other(self(x))``.

        ``self`` maps its target to an intermediate slide (its source), which is ``other``'s
        target; e.g. serial sections: reference -> neighbour, then neighbour -> next slide.
        """
        return Transform(
            [*self.stages, *other.stages],
            self.target,
            other.source,
            {"composed_of": [self.parameters, other.parameters]},
        )

    @staticmethod
    def compose(transforms: Sequence[Transform]) -> Transform:
        """``transforms[0]`` first, then the next one, ...: a chain of serial sections."""
        if not transforms:
            raise ValueError("nothing to compose")
        result = transforms[0]
        for nxt in transforms[1:]:
            result = result.then(nxt)
        return result

    # -- points -------------------------------------------------------------------------------
    def map_points(
        self,
        points: np.ndarray,
        direction: Direction,
        iterations: int = 100,
        tol: float = 1e-4,
    ) -> np.ndarray:
        """Level-0 points ``(N, 2)`` ``(x, y)`` mapped ``direction`` (:data:`DIRECTIONS`):
        ``"target_to_source"``: ``T(x)``, exact; ``"source_to_target"``: ``T^-1(p)``, solved
        stage by stage (last stage first, :meth:`Stage.source_to_target`; ``iterations`` and
        ``tol`` in level-0 pixels bound its fixed-point iteration). Returns ``(N, 2)`` float64;
        :meth:`map_points_with_residual` also says how exact ``T^-1`` came out.
        Any other direction (also the retired ``"forward"`` / ``"inverse"``) is a ``ValueError``.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if check_direction(direction) == "target_to_source":
            for stage in self.stages:
                points = stage.target_to_source(points)
            return points
        for stage in reversed(self.stages):
            points, _ = stage.source_to_target(points, iterations, tol)
        return points

    def map_points_with_residual(
        self,
        points: np.ndarray,
        direction: Direction,
        iterations: int = 100,
        tol: float = 1e-4,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`map_points` and its residual ``(N,)``: for ``"source_to_target"``
        ``|T(mapped) - points|`` in source level-0 pixels (how far the inversion is from
        exact; one more pass of ``T``), zeros for ``"target_to_source"`` (exact)."""
        mapped = self.map_points(points, direction, iterations, tol)
        if direction == "target_to_source":
            return mapped, np.zeros(len(mapped))
        original = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        forward = self.map_points(mapped, "target_to_source")
        return mapped, np.linalg.norm(forward - original, axis=1)

    def fingerprint(self) -> dict[str, Any]:
        """What the mapping is made of, as JSON: the slides' identities and, per stage, the
        affine, the field's downsample and the identity of its content (:func:`field_identity`).
        Equal fingerprints mean the same mapping (what a resumed warp relies on)."""
        return {
            "target": self.target.to_json(),
            "source": self.source.to_json(),
            "stages": [
                {
                    "affine": stage.affine.tolist(),
                    "field": field_identity(stage.field),
                    "field_downsample": stage.field_downsample,
                }
                for stage in self.stages
            ],
        }

    @property
    def initial_affine(self) -> np.ndarray:
        """The first stage's affine ``A`` (3x3): for a registration's transform
        ``T(x) = A (x + u(x))``, the initial (affine) alignment."""
        return self.stages[0].affine

    # -- blocks of an output grid --------------------------------------------------------------
    def source_coordinates(self, y0: int, x0: int, h: int, w: int, downsample: float) -> np.ndarray:
        """Level-0 source positions ``(h, w, 2)`` ``(x, y)`` of target-grid pixels
        ``[y0:y0+h, x0:x0+w]`` at ``downsample`` (float64, dense)."""
        first = self.stages[0]
        lx = to_level0(np.arange(x0, x0 + w), downsample)
        ly = to_level0(np.arange(y0, y0 + h), downsample)
        coords = np.empty((h, w, 2), np.float64)
        coords[..., 0], coords[..., 1] = lx[None, :], ly[:, None]
        u = first.displacement_block(y0, x0, h, w, downsample)
        if u is not None:
            coords += u
        coords = _apply_affine(first.affine, coords)
        for stage in self.stages[1:]:
            coords = stage.target_to_source(coords.reshape(-1, 2)).reshape(h, w, 2)
        return coords

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``transform.json`` and a copy of every field into the directory ``path``
        (staged: it appears complete or not at all)."""
        path = Path(path)
        with staged_output(path, overwrite) as stage_dir:
            stage_dir.mkdir(parents=True)
            for index, stage in enumerate(self.stages):
                if stage.field is not None:
                    copy_field(stage.field, stage_dir / field_name(index), stage.field_downsample)
            self._write_document(stage_dir)
        self.path = path
        return path

    def write_document(self, directory: str | Path) -> Path:
        """Write ``transform.json`` into ``directory``, which already holds the fields where
        :func:`field_name` puts them (e.g. estimated there by the scheduler): nothing is
        copied. The caller stages ``directory``."""
        directory = Path(directory)
        for index, stage in enumerate(self.stages):
            where = _stored_at(stage.field)
            if stage.field is not None and where != (directory / field_name(index)).resolve():
                raise ValueError(f"stage {index}'s field is not {directory / field_name(index)}")
        self._write_document(directory)
        self.path = directory
        return directory

    def _write_document(self, directory: Path) -> None:
        stages_json = []
        for index, stage in enumerate(self.stages):
            entry: dict[str, Any] = {"affine": stage.affine.tolist(), "field": None}
            if stage.field is not None:
                entry.update(
                    field=field_name(index),
                    field_downsample=stage.field_downsample,
                    field_units=FIELD_UNITS,
                    field_shape=list(stage.field.shape[1:]),
                )
            stages_json.append(entry)
        document = {
            "format": "wsireg-transform",
            "format_version": FORMAT_VERSION,
            "convention": "T(x) = A (x + u(x)) maps target level-0 (x, y) to source "
            "level-0 (x, y); stages are applied first to last",
            "target": self.target.to_json(),
            "source": self.source.to_json(),
            "stages": stages_json,
            "parameters": self.parameters,
        }
        (directory / "transform.json").write_text(json.dumps(document, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Transform:
        """Read a transform directory (or its ``transform.json``, or a `wsireg register`
        output); fields stay on disk. A displacement field of another tool (an ITK image
        ``.mha``/``.nrrd``/``.nii[.gz]``, an OME-NGFF 0.6 ``displacements`` zarr) is read as
        :func:`wsireg.engine.exchange.load_exchanged` says."""
        from wsireg.engine.exchange import exchanged_format, load_exchanged

        path = Path(path)
        if exchanged_format(path) is not None:
            return load_exchanged(path)
        if path.name == "transform.json":
            path = path.parent
        elif (path / "transform" / "transform.json").is_file():  # a `wsireg register` output
            path = path / "transform"
        if not path.exists():
            raise TransformError(path, "no such transform directory")
        doc_path = path / "transform.json"
        if not doc_path.is_file():
            raise TransformError(path, "not a transform: transform.json is missing")
        document = _read_document(doc_path)
        stages = []
        for entry in document.stages:
            fld = _open_field(path / entry["field"], entry) if entry.get("field") else None
            try:
                stages.append(Stage(entry["affine"], fld, float(entry.get("field_downsample", 1))))
            except (ValueError, KeyError, TypeError) as exc:
                raise TransformError(doc_path, f"corrupted stage: {exc}") from exc
        if not stages:
            raise TransformError(doc_path, "corrupted transform.json: no stages")
        return cls(stages, document.target, document.source, document.parameters, path)


@dataclass(frozen=True)
class _Document:
    """The parts of a ``transform.json``."""

    target: SlideRef
    source: SlideRef
    stages: list[dict[str, Any]]
    parameters: dict[str, Any]


def _read_document(doc_path: Path) -> _Document:
    """``transform.json``, checked for its format and version."""
    try:
        document = json.loads(doc_path.read_text())
        if document.get("format") != "wsireg-transform":
            raise ValueError("not a wsireg transform document")
        version = int(document["format_version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this wsireg")
        return _Document(
            SlideRef.from_json(document["target"]),
            SlideRef.from_json(document["source"]),
            document["stages"],
            document.get("parameters", {}),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TransformError(doc_path, f"corrupted transform.json: {exc}") from exc


def _open_field(fpath: Path, entry: dict[str, Any]) -> zarr.Array:
    """The field of a stage entry, opened read-only and checked against its recorded shape."""
    try:
        fld = zarr.open_array(fpath, mode="r")
    except Exception as exc:
        raise TransformError(fpath, f"missing or unreadable field: {exc}") from exc
    expected = tuple(entry.get("field_shape", fld.shape[1:]))
    if fld.ndim != 3 or fld.shape[0] != 2 or tuple(fld.shape[1:]) != expected:
        raise TransformError(
            fpath, f"field has shape {fld.shape}, expected (2, {expected[0]}, {expected[1]})"
        )
    if np.isnan(fld.fill_value) and fld.nchunks_initialized < fld.nchunks:
        missing = fld.nchunks - fld.nchunks_initialized
        raise TransformError(fpath, f"{missing} of {fld.nchunks} field chunks are missing")
    return fld


def field_identity(fld: FieldArray | None) -> str | None:
    """A digest identifying a field's content: of its bytes for an array in memory; for a
    zarr array on disk, of every stored file's name, size and modification time (any write
    changes it, without reading the field). ``None`` for no field."""
    if fld is None:
        return None
    if hasattr(fld, "content_identity"):  # a view of a stored field (engine.exchange)
        return fld.content_identity()
    digest = hashlib.sha256()
    root = _stored_at(fld)
    if root is None:
        digest.update(np.ascontiguousarray(np.asarray(fld), dtype=np.float32).tobytes())
        return digest.hexdigest()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def field_name(index: int) -> str:
    """File name of stage ``index``'s field in a transform directory."""
    return "field.zarr" if index == 0 else f"field-{index}.zarr"


def _stored_at(fld: FieldArray | None) -> Path | None:
    """The directory a zarr field is stored in (None for other arrays)."""
    if not isinstance(fld, zarr.Array) or not hasattr(fld.store, "root"):
        return None
    return (Path(str(fld.store.root)) / fld.path).resolve()


def create_field(
    path: str | Path, shape: tuple[int, int], downsample: float, chunk: int = 256
) -> zarr.Array:
    """An empty displacement field array on disk: (2, H_d, W_d) float32. Unwritten nodes
    read as NaN (so a missing chunk is an error, not zero displacement: every chunk of a
    finished field is stored)."""
    return zarr.create_array(
        store=str(path),
        shape=(2, *shape),
        chunks=(2, min(chunk, shape[0]), min(chunk, shape[1])),
        dtype="float32",
        fill_value=float("nan"),
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
        zarr_format=3,
        overwrite=True,
        attributes={
            "wsireg": {
                "kind": "displacement field",
                "axes": ["c", "y", "x"],
                "channels": ["dx", "dy"],
                "units": FIELD_UNITS,
                "downsample": downsample,
            }
        },
    )


def copy_field(
    src: FieldArray, dest: Path, downsample: float, rows_per_step: int = 1024
) -> zarr.Array:
    """Copy a field (zarr or numpy) to a new zarr array at ``dest``, a band at a time."""
    out = create_field(dest, tuple(src.shape[1:]), downsample)
    for r0 in range(0, src.shape[1], rows_per_step):
        out[:, r0 : r0 + rows_per_step] = np.asarray(src[:, r0 : r0 + rows_per_step], np.float32)
    return out
