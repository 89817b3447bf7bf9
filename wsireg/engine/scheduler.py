"""The streaming patch scheduler: Algorithm 1 (inference) out of core, level by level.

Pyramid: ``levels`` grids of the target slide at downsamples ``d_k = d_fine * 2^(N-1-k)``,
``k = 0`` coarsest (:mod:`wsireg.core.coords` grids). Each level owns a displacement field on disk,
``field-k.zarr`` ``(2, H_k, W_k)`` in level-0 pixels (the transform convention), so that
``T_k(x) = A (x + u_k(x))``. For level ``k`` the scheduler walks the target grid in blocks of
``block`` pixels (the dask ``map_overlap`` model: block + halo, compute, trim):

1. read the target block plus a halo of ``extra`` pixels (:func:`wsireg.engine.warp.warp_block` through
   the identity: area-averaged from the closest slide level) and the source through the coarser
   level's transform ``T_{k-1}`` (the same block function as the final warp: source pixels are
   interpolated once; ``u_{k-1}`` is upsampled chunk by chunk by the transform);
2. skip it when neither image has tissue there; else run the level's network
   (:func:`wsireg.model.inference.register_level`: unfold P/S, G-sized groups, centres, fold, compose
   M times) and, with ``refine`` steps, instance optimisation (:mod:`wsireg.model.refine`), giving
   ``v`` in pixels of the level;
3. compose ``u_k(x) = d_k v(x) + u_{k-1}(x + d_k v(x))`` (level-0 units), trim the halo and
   write the block's field chunks.

The next block's reads are prefetched in a thread while the network runs. Finished blocks are
listed in ``done-k.txt``, so ``resume`` skips them (the result does not change: every block
depends only on the previous level's field and the slides). Nothing holds a whole level.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsireg.core.blocks import AxisWindow, axis_window, blocks, count_blocks
from wsireg.core.coords import to_level0
from wsireg.core.stain import has_tissue, network_input
from wsireg.engine.transform import SlideRef, Stage, Transform, create_field
from wsireg.engine.warp import warp_block
from wsireg.model.inference import DEFAULTS, PatchCounts, register_level
from wsireg.model.refine import RefineSettings, refine_field


@dataclass(frozen=True)
class SchedulerSettings:
    """Algorithm 1's parameters and the streaming geometry."""

    levels: int = 3
    """``N``: pyramid levels, ending at the finest downsample."""
    iterations: int = DEFAULTS.iterations
    """``M``: network passes per level."""
    patch: int = DEFAULTS.patch
    """``P``: patch side (pixels of a level)."""
    stride: int = DEFAULTS.stride
    """``S``: stride, side of the kept centres."""
    group: int = DEFAULTS.group
    """``G``: patches per network call."""
    block: int = 1024
    """Side of a scheduler block (pixels of a level; a multiple of ``S`` and of 256)."""
    extra: int = 64
    """Halo beyond the block whose patches give context and are then trimmed (pixels)."""
    representation: str = DEFAULTS.representation
    smoothing: float = DEFAULTS.smoothing
    """Gaussian standard deviation (px of a level) on each iteration's network field."""
    flip_average: bool = DEFAULTS.flip_average
    """Average each patch's prediction over its four flips (4x the network time)."""
    refine: RefineSettings = field(default_factory=RefineSettings)


@dataclass
class LevelReport:
    level: int
    downsample: float
    shape: tuple[int, int]
    blocks: int = 0
    skipped: int = 0
    """Blocks with no tissue on either side (no network, no refinement)."""
    resumed: int = 0
    patches: int = 0
    """Network patch evaluations (patches x iterations) on tissue."""
    background_patches: int = 0
    """Patch evaluations skipped as background inside registered blocks."""
    network_s: float = 0.0
    refine_s: float = 0.0
    read_s: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["shape"] = list(self.shape)
        data["patches_per_s"] = round(self.patches / self.network_s, 2) if self.network_s else None
        return data


def level_downsamples(finest: float, levels: int) -> list[float]:
    """Downsamples of the pyramid, coarsest first."""
    return [finest * 2 ** (levels - 1 - k) for k in range(levels)]


def grid_shape(ref: SlideRef, downsample: float) -> tuple[int, int]:
    """``(H, W)`` of the grid at ``downsample`` covering level 0 of ``ref``."""
    return (math.ceil(ref.shape[0] / downsample), math.ceil(ref.shape[1] / downsample))


def _networks(model: Any, levels: int) -> list[Any]:
    """The network of each pyramid level (coarsest first): the model's finest ``levels``;
    levels coarser than the model's coarsest network get none (``None``: instance
    optimisation alone there; a network run at a scale it was not trained for made the demo's
    error 3x worse). ``None`` everywhere without a model."""
    if model is None:
        return [None] * levels
    nets = [model[k] for k in range(model.num_levels)]
    if levels <= len(nets):
        return nets[len(nets) - levels :]
    return [None] * (levels - len(nets)) + nets


@dataclass
class _Reads:
    """The two images of one block (with halo), as read from the slides."""

    target: np.ndarray
    source: np.ndarray
    seconds: float


def estimate_field(
    source: Any,
    target: Any,
    affine: np.ndarray,
    finest_downsample: float,
    workdir: Path,
    *,
    model: Any = None,
    settings: SchedulerSettings | None = None,
    device: str = "cpu",
    resume: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> tuple[Transform, list[LevelReport]]:
    """Algorithm 1 (inference) out of core: the transform ``A (x + u(x))`` of ``source`` onto
    ``target`` with ``u`` estimated down to ``finest_downsample`` (level-0 target pixels per
    field pixel). ``model``: a :class:`wsireg.model.network.MultiLevelModel` or ``None`` (pure
    instance optimisation; needs ``settings.refine.steps > 0`` to move anything).
    ``on_block(done, total)`` reports progress. Fields are written under ``workdir``.
    """
    cfg = settings or SchedulerSettings()
    if cfg.block % cfg.stride or cfg.block % 256:
        raise ValueError(f"block {cfg.block} must be a multiple of the stride and of 256")
    workdir.mkdir(parents=True, exist_ok=True)
    target_ref, source_ref = SlideRef.from_slide(target), SlideRef.from_slide(source)
    nets = _networks(model, cfg.levels)
    for net in nets:
        if net is not None:
            net.to(device).eval()
    downsamples = level_downsamples(finest_downsample, cfg.levels)
    total = sum(count_blocks(grid_shape(target_ref, d), cfg.block) for d in downsamples)
    done_blocks = 0
    previous = Stage(affine)
    reports = []
    for k, d in enumerate(downsamples):
        shape = grid_shape(target_ref, d)
        report = LevelReport(k, d, shape)
        start = time.perf_counter()
        field_path = workdir / f"field-{k}.zarr"
        done_path = workdir / f"done-{k}.txt"
        finished = _read_done(done_path) if resume and field_path.exists() else set()
        if finished:
            import zarr

            u = zarr.open_array(str(field_path), mode="r+")
        else:
            done_path.unlink(missing_ok=True)
            u = create_field(field_path, shape, d)
        level = _Level(
            k, d, shape, cfg, nets[k], device, previous, source, target, source_ref, target_ref
        )
        todo = []
        for index, blk in enumerate(blocks(shape, cfg.block)):
            if index in finished:
                report.resumed += 1
            else:
                todo.append((index, blk))
        done_blocks += report.resumed
        with ThreadPoolExecutor(max_workers=1) as pool, open(done_path, "a") as done_file:
            future = pool.submit(level.read, *todo[0][1]) if todo else None
            for position, (index, blk) in enumerate(todo):
                assert future is not None
                reads = future.result()
                if position + 1 < len(todo):  # prefetch the next block while this one runs
                    future = pool.submit(level.read, *todo[position + 1][1])
                report.read_s += reads.seconds
                block_field = level.compute(blk, reads, report)
                y0, x0, h, w = blk
                u[:, y0 : y0 + h, x0 : x0 + w] = block_field
                done_file.write(f"{index}\n")
                done_file.flush()
                report.blocks += 1
                done_blocks += 1
                if on_block is not None:
                    on_block(done_blocks, total)
        report.seconds = time.perf_counter() - start
        reports.append(report)
        previous = Stage(affine, u, d)
    transform = Transform([previous], target_ref, source_ref)
    return transform, reports


def _read_done(path: Path) -> set[int]:
    try:
        return {int(line) for line in path.read_text().split()}
    except (OSError, ValueError):
        return set()


@dataclass
class _Level:
    """One pyramid level: reads and computes its blocks."""

    index: int
    downsample: float
    shape: tuple[int, int]
    cfg: SchedulerSettings
    net: Any
    device: str
    previous: Stage
    source: Any
    target: Any
    source_ref: SlideRef
    target_ref: SlideRef

    def window(self, y0: int, x0: int, h: int, w: int) -> tuple[AxisWindow, ...]:
        cfg = self.cfg
        rows = axis_window(y0, y0 + h, self.shape[0], cfg.patch, cfg.stride, cfg.extra)
        cols = axis_window(x0, x0 + w, self.shape[1], cfg.patch, cfg.stride, cfg.extra)
        return rows, cols

    def read(self, y0: int, x0: int, h: int, w: int) -> _Reads:
        """Target and warped source over the block's centre span (block + halo)."""
        start = time.perf_counter()
        rows, cols = self.window(y0, x0, h, w)
        ry, rx = rows.centre_start, cols.centre_start
        rh, rw = rows.centre_stop - ry, cols.centre_stop - rx
        identity = Transform([Stage(np.eye(3))], self.target_ref, self.target_ref)
        target = warp_block(identity, self.target, ry, rx, rh, rw, self.downsample)
        moving = Transform([self.previous], self.target_ref, self.source_ref)
        source = warp_block(moving, self.source, ry, rx, rh, rw, self.downsample)
        return _Reads(target, source, time.perf_counter() - start)

    def compute(
        self, blk: tuple[int, int, int, int], reads: _Reads, report: LevelReport
    ) -> np.ndarray:
        """The block's composed field ``u_k`` (2, h, w), level-0 pixels."""
        y0, x0, h, w = blk
        rows, cols = self.window(y0, x0, h, w)
        fixed = _to_tensor(reads.target, self.cfg.representation, self.device)
        moving = _to_tensor(reads.source, self.cfg.representation, self.device)
        v = None
        if _has_tissue(fixed) or _has_tissue(moving):
            v = self._estimate(moving, fixed, report)
        else:
            report.skipped += 1
        v_block = (
            np.zeros((2, h, w))
            if v is None
            else v[0, :, rows.trim, cols.trim].detach().cpu().double().numpy()
        )
        return self._compose(v_block * self.downsample, y0, x0, h, w)

    def _estimate(self, moving: torch.Tensor, fixed: torch.Tensor, report: LevelReport) -> Any:
        cfg = self.cfg
        v = None
        if self.net is not None:
            start = time.perf_counter()
            counts = PatchCounts()
            with torch.inference_mode():
                v = register_level(
                    self.net,
                    moving,
                    fixed,
                    iterations=cfg.iterations,
                    patch=cfg.patch,
                    stride=cfg.stride,
                    group=cfg.group,
                    counts=counts,
                    smoothing=cfg.smoothing,
                    flip_average=cfg.flip_average,
                )
            v = v.clone()  # leave inference mode: refinement needs autograd
            report.network_s += time.perf_counter() - start
            report.patches += counts.run
            report.background_patches += counts.skipped
        steps = cfg.refine.steps_at(self.index)
        if steps > 0:
            start = time.perf_counter()
            v = refine_field(moving, fixed, v, replace(cfg.refine, steps=steps))
            report.refine_s += time.perf_counter() - start
        return v

    def _compose(self, v0: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """``u_k(x) = v(x) + u_{k-1}(x + v(x))`` on the block (all level-0 pixels)."""
        xs = to_level0(np.arange(x0, x0 + w), self.downsample)
        ys = to_level0(np.arange(y0, y0 + h), self.downsample)
        gx, gy = np.meshgrid(xs, ys)
        points = np.stack([gx + v0[0], gy + v0[1]], -1).reshape(-1, 2)
        previous = self.previous.displacement(points).reshape(h, w, 2)
        return (v0 + np.moveaxis(previous, -1, 0)).astype(np.float32)


def _to_tensor(rgb: np.ndarray, representation: str, device: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return network_input(tensor, representation).to(device)


def _has_tissue(image: torch.Tensor) -> bool:
    return bool(has_tissue(image).any())
