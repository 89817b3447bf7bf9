"""The streaming patch scheduler: Algorithm 1 (inference) out of core, level by level.

Pyramid: ``levels`` grids of the target slide at downsamples ``d_k = d_fine * 2^(N-1-k)``,
``k = 0`` coarsest (:mod:`wsireg.core.coords` grids). Each level owns a displacement field on disk
``(2, H_k, W_k)`` in level-0 pixels (the transform convention), so that
``T_k(x) = A (x + u_k(x))``; the finest level's field is written where the caller says (a
transform directory's ``field.zarr``: nothing is copied afterwards), the coarser ones in a work
directory (:class:`FieldStore`). For level ``k`` the scheduler walks the target grid in blocks
of ``block`` pixels (:func:`wsireg.core.blocks.blocks`), each as dask's ``map_overlap`` does
(halo, compute, trim), one step per function:

1. **halo** (:meth:`_Level.block`): the span of patch centres around the block
   (:func:`wsireg.core.blocks.axis_window`, ``extra`` pixels of context);
2. **read** (:meth:`_Level.read`): the target over that span
   (:func:`wsireg.engine.warp.warp_block` through the identity: area-averaged from the closest
   slide level) and the source through the coarser level's transform ``T_{k-1}`` (the same
   block function as the final warp: source pixels are interpolated once; ``u_{k-1}`` is
   upsampled chunk by chunk by the transform);
3. **compute** (:meth:`_Level.estimate`): nothing when neither image has tissue there; else the
   level's network (:func:`wsireg.model.inference.register_level`: unfold P/S, G-sized groups,
   centres, fold, compose M times) and, with ``refine`` steps, instance optimisation
   (:mod:`wsireg.model.refine`), giving ``v`` in pixels of the level;
4. **trim** (:func:`_trim`) the halo off ``v``, and **compose**
   (:meth:`_Level.compose`) ``u_k(x) = d_k v(x) + u_{k-1}(x + d_k v(x))`` (level-0 units);
5. **write** (:func:`_write`) the block's field chunks and log the block as done.

Within a level every block depends only on the slides and the previous level's field, so
the blocks are independent tasks (:class:`_BlockJob`, steps 2-5): run by a thread pool here
(one block's reads overlap another's compute), or as dask tasks on a LocalCluster or an
existing dask.distributed cluster (:class:`~wsireg.engine.parallel.Execution`), each worker
reading the slides and the previous field from shared storage, loading the weights file once
and writing its own field chunks (blocks are multiples of the 256-node field chunks, so no
two blocks write one chunk). Levels are barriers. Every block runs torch on
:data:`BLOCK_TORCH_THREADS` threads, so the field is the same, byte for byte, however many
threads or workers run it. Finished blocks are listed in ``done-k.txt`` as they come, so
``resume`` skips them (the result does not change). Nothing holds a whole level.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
import zarr

from wsireg.core.blocks import AxisWindow, axis_window, blocks, count_blocks
from wsireg.core.coords import to_level0
from wsireg.core.stain import WHITE, has_tissue, network_input, on_white_glass
from wsireg.engine.parallel import (
    Execution,
    cluster_client,
    default_threads,
    map_on_cluster,
    torch_threads,
)
from wsireg.engine.transform import SlideRef, Stage, Transform, create_field
from wsireg.engine.warp import warp_block
from wsireg.io.slide import Slide
from wsireg.model.inference import DEFAULTS, InferenceSettings, PatchCounts, register_level
from wsireg.model.network import MultiLevelModel, UNet
from wsireg.model.refine import RefineSettings, refine_field

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SchedulerSettings:
    """Algorithm 1's parameters and the streaming geometry."""

    levels: int = 3
    """``N``: pyramid levels, ending at ``finest_downsample``."""
    finest_downsample: float = 1.0
    """Level-0 target pixels per pixel of the finest field."""
    inference: InferenceSettings = DEFAULTS
    """``M``, ``P``, ``S``, ``G``, the network input, smoothing and flip averaging."""
    refine: RefineSettings = field(default_factory=RefineSettings)
    """Instance optimisation per block (0 steps: none)."""
    block: int = 1024
    """Side of a scheduler block (pixels of a level; a multiple of ``S`` and of 256)."""
    extra: int = 64
    """Halo beyond the block whose patches give context and are then trimmed (pixels)."""

    def __post_init__(self) -> None:
        if self.block % self.inference.stride or self.block % 256:
            raise ValueError(f"block {self.block} must be a multiple of the stride and of 256")

    def downsamples(self) -> list[float]:
        """Downsamples of the pyramid, coarsest first."""
        return level_downsamples(self.finest_downsample, self.levels)


@dataclass(frozen=True)
class SlidePair:
    """The slides a registration reads and the identities its transform records.

    ``source`` / ``target`` are what is read (the slides, or pyramids built from them);
    ``source_ref`` / ``target_ref`` identify the slides themselves (same level-0 size).
    """

    source: Slide
    target: Slide
    source_ref: SlideRef
    target_ref: SlideRef
    source_glass: tuple[float, float, float] = WHITE
    """Glass colour (RGB grey levels) of the source, made white before the network input
    (:func:`wsireg.core.stain.on_white_glass`)."""
    target_glass: tuple[float, float, float] = WHITE
    """Glass colour of the target."""


@dataclass(frozen=True)
class FieldStore:
    """Where the fields of the pyramid go: the finest level's at ``finest`` (e.g.
    ``transform/field.zarr``), the coarser ones and every level's ``done-k.txt`` in ``work``."""

    work: Path
    finest: Path

    def field(self, level: int, levels: int) -> Path:
        return self.finest if level == levels - 1 else self.work / f"field-{level}.zarr"

    def done(self, level: int) -> Path:
        return self.work / f"done-{level}.txt"


@dataclass
class LevelReport:
    """What one step of the estimation pyramid did (``report.json``'s ``pyramid``)."""

    pyramid_step: int
    """Index of the step, 0 = the coarsest (not a slide level)."""
    downsample: float
    """Target level-0 pixels per pixel of the step's grid."""
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
    workers: dict[str, int] = field(default_factory=dict)
    """Blocks computed per worker (``"WORKER DEVICE"``; ``"local DEVICE"`` in this process)."""

    def add(self, block: LevelReport) -> None:
        """Count the work of one block (a report of the same step) in this one."""
        for name in ("blocks", "skipped", "patches", "background_patches"):
            setattr(self, name, getattr(self, name) + getattr(block, name))
        for name in ("network_s", "refine_s", "read_s"):
            setattr(self, name, getattr(self, name) + getattr(block, name))
        for worker, count in block.workers.items():
            self.workers[worker] = self.workers.get(worker, 0) + count

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["shape"] = list(self.shape)
        data["patches_per_s"] = round(self.patches / self.network_s, 2) if self.network_s else None
        data["blocks_per_s"] = round(self.blocks / self.seconds, 3) if self.seconds else None
        return data


def level_downsamples(finest: float, levels: int) -> list[float]:
    """Downsamples of the pyramid, coarsest first."""
    return [finest * 2 ** (levels - 1 - k) for k in range(levels)]


def grid_shape(ref: SlideRef, downsample: float) -> tuple[int, int]:
    """``(H, W)`` of the grid at ``downsample`` covering level 0 of ``ref``."""
    return (math.ceil(ref.shape[0] / downsample), math.ceil(ref.shape[1] / downsample))


def _network_indices(model: MultiLevelModel | None, levels: int) -> list[int | None]:
    """The model level of each pyramid level (coarsest first): the model's finest ``levels``.
    Levels coarser than the model's coarsest network get none (``None``: instance
    optimisation alone there), since a network is not run at a scale it was not trained for.
    ``None`` everywhere without a model."""
    if model is None:
        return [None] * levels
    indices: list[int | None] = list(range(model.num_levels))
    if levels <= len(indices):
        return indices[len(indices) - levels :]
    return [None] * (levels - len(indices)) + indices


@functools.lru_cache(maxsize=4)
def _worker_model(weights: str, device: str) -> MultiLevelModel:
    """The model at ``weights`` on ``device``, loaded once per worker process."""
    return MultiLevelModel.load(Path(weights), device=device)


class _Progress:
    """Blocks done over all levels, reported to ``on_block(done, total)``."""

    def __init__(self, total: int, on_block: Callable[[int, int], None] | None) -> None:
        self.total, self.done, self.on_block = total, 0, on_block

    def skip(self, count: int) -> None:
        self.done += count

    def advance(self) -> None:
        self.done += 1
        if self.on_block is not None:
            self.on_block(self.done, self.total)


def estimate_field(  # noqa: PLR0913 - keyword-only: one keyword per documented input
    slides: SlidePair,
    affine: np.ndarray,
    store: FieldStore,
    settings: SchedulerSettings,
    *,
    model: MultiLevelModel | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    resume: bool = False,
    execution: Execution | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> tuple[Transform, list[LevelReport]]:
    """Algorithm 1 (inference) out of core: the transform ``A (x + u(x))`` of ``slides.source``
    onto ``slides.target`` with ``u`` estimated down to ``settings.finest_downsample``, its
    field at ``store.finest``. ``model``: the networks, or ``None`` (pure instance
    optimisation; needs ``settings.refine.steps > 0`` to move anything); ``weights``: the file
    it was loaded from (what dask workers load). ``resume`` keeps the blocks a killed run
    finished. ``execution`` (:class:`~wsireg.engine.parallel.Execution`) says where the blocks
    of a level run: threads here (``threads`` blocks at once; default the CPU count), a
    LocalCluster of ``workers`` processes, or the cluster at ``scheduler``, each block claiming
    ``resources``; the field is the same, byte for byte, wherever they run (every block is
    computed with one torch thread). ``on_block(done, total)`` reports progress."""
    execution = execution or Execution()
    if execution.distributed and model is not None and weights is None:
        raise ValueError("blocks on a dask cluster need the weights file of the model")
    store.work.mkdir(parents=True, exist_ok=True)
    indices = _network_indices(model, settings.levels)
    downsamples = settings.downsamples()
    total = sum(count_blocks(grid_shape(slides.target_ref, d), settings.block) for d in downsamples)
    counter = _Progress(total, on_block)
    previous = Stage(affine)
    reports = []
    with _block_runner(execution) as run:
        for k, d in enumerate(downsamples):
            level = _Level(
                k,
                d,
                grid_shape(slides.target_ref, d),
                settings,
                None if indices[k] is None else (str(weights) if weights else None, indices[k]),
                device,
                previous,
                slides,
            )
            if indices[k] is not None and model is not None:
                level.net = model[indices[k]].to(device).eval()
            u, report = _run_level(level, store, resume, counter, run)
            reports.append(report)
            previous = Stage(affine, u, d)
    return Transform([previous], slides.target_ref, slides.source_ref), reports


#: Runs a level's block job over blocks; yields each block's outcome as it finishes.
BlockRunner = Callable[["_BlockJob", Sequence["_Block"]], Iterator["_BlockDone"]]


@contextlib.contextmanager
def _block_runner(execution: Execution) -> Iterator[BlockRunner]:
    """Where the blocks of every level run (:func:`estimate_field`): a thread pool here, or
    the cluster of ``execution`` for the whole estimation (levels are barriers)."""
    if not execution.distributed:
        threads = execution.threads or default_threads()
        with ThreadPoolExecutor(threads, thread_name_prefix="wsireg-block") as pool:
            with torch_threads(BLOCK_TORCH_THREADS):
                yield lambda job, todo: (f.result() for f in as_completed(
                    [pool.submit(job, block) for block in todo]
                ))  # fmt: skip
        return
    with cluster_client(execution, threads_per_worker=execution.threads or 1) as client:

        def on_cluster(job: _BlockJob, todo: Sequence[_Block]) -> Iterator[_BlockDone]:
            for _, future in map_on_cluster(
                client,
                job,
                todo,
                name=lambda b: f"wsireg-block-{job.level.index}-{b.index}",
                resources=execution.resources,
            ):
                yield future.result()

        yield on_cluster


def _run_level(
    level: _Level, store: FieldStore, resume: bool, counter: _Progress, run: BlockRunner
) -> tuple[zarr.Array, LevelReport]:
    """Every block of one level, wherever ``run`` runs them (each: read -> compute -> trim
    -> compose -> write, :class:`_BlockJob`); finished blocks logged as they come."""
    report = LevelReport(level.index, level.downsample, level.shape)
    start = time.perf_counter()
    done_path = store.done(level.index)
    field_path = store.field(level.index, level.settings.levels)
    u, finished = _level_field(field_path, done_path, level, resume)
    todo = []
    for index, box in enumerate(blocks(level.shape, level.settings.block)):
        if index in finished:
            report.resumed += 1
        else:
            todo.append(level.block(index, box))
    counter.skip(report.resumed)
    job = _BlockJob(level, str(field_path))
    with open(done_path, "a") as done_log:
        for done in run(job, todo):
            report.add(done.report)
            done_log.write(f"{done.index}\n")
            done_log.flush()
            counter.advance()
    report.seconds = time.perf_counter() - start
    return u, report


def _level_field(
    path: Path, done_path: Path, level: _Level, resume: bool
) -> tuple[zarr.Array, set[int]]:
    """The level's field and the blocks already in it: those a killed run finished when
    resuming, else none (a new, zero field)."""
    finished = _read_done(done_path) if resume and path.exists() else set()
    if finished:
        return zarr.open_array(str(path), mode="r+"), finished
    done_path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return create_field(path, level.shape, level.downsample), set()


def _read_done(path: Path) -> set[int]:
    try:
        return {int(line) for line in path.read_text().split()}
    except (OSError, ValueError):
        return set()


class _Block(NamedTuple):
    """One block of a level and its halo: ``box = (y0, x0, h, w)``, and per axis the span of
    patch centres read around it."""

    index: int
    box: tuple[int, int, int, int]
    rows: AxisWindow
    cols: AxisWindow


@dataclass
class _Reads:
    """The two images of one block over its halo span, as read from the slides."""

    target: np.ndarray
    source: np.ndarray
    seconds: float


def _trim(v: torch.Tensor | None, block: _Block) -> np.ndarray:
    """``v`` (1, 2, span) cut back to the block (2, h, w), pixels of the level; zero where
    nothing was estimated."""
    _, _, h, w = block.box
    if v is None:
        return np.zeros((2, h, w))
    return v[0, :, block.rows.trim, block.cols.trim].detach().cpu().double().numpy()


def _write(u: zarr.Array, block: _Block, u_block: np.ndarray) -> None:
    y0, x0, h, w = block.box
    u[:, y0 : y0 + h, x0 : x0 + w] = u_block


#: torch intra-op threads of every block: results depend on it (float reduction order), so it
#: is the same whether blocks run in threads here or in processes on a cluster.
BLOCK_TORCH_THREADS = 1


class _BlockDone(NamedTuple):
    """A finished block: its index in the level and what it did."""

    index: int
    report: LevelReport


@dataclass
class _BlockJob:
    """One level's block task, sent to dask workers as data: the level (slides pickled as
    paths, the network as its weights file) and the field it writes."""

    level: _Level
    field_path: str

    def __call__(self, block: _Block) -> _BlockDone:
        """read -> compute -> trim -> compose -> write one block (one torch thread)."""
        if torch.get_num_threads() != BLOCK_TORCH_THREADS:
            torch.set_num_threads(BLOCK_TORCH_THREADS)
        level = self.level
        report = LevelReport(level.index, level.downsample, level.shape, blocks=1)
        reads = level.read(block)
        report.read_s = reads.seconds
        v = level.estimate(reads, report)
        u = zarr.open_array(self.field_path, mode="r+")
        _write(u, block, level.compose(_trim(v, block), block))
        report.workers = {f"{_worker_name()} {level.device}": 1}
        return _BlockDone(block.index, report)


def _worker_name() -> str:
    """The dask worker running this task, or ``"local"``."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


@dataclass
class _Level:
    """One pyramid level: the halo, read, compute and compose steps of its blocks."""

    index: int
    downsample: float
    shape: tuple[int, int]
    settings: SchedulerSettings
    network: tuple[str | None, int] | None
    """The level's network: ``(weights file, model level)``, or ``None`` (none)."""
    device: str
    previous: Stage
    slides: SlidePair
    net: UNet | None = None
    """The network, when loaded (this process's model; a worker loads ``network``)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["net"] = None  # a worker loads the weights file once (_worker_model)
        return state

    def network_module(self) -> UNet | None:
        """The level's network: the one given, else loaded from ``network`` on this worker."""
        if self.net is None and self.network is not None and self.network[0] is not None:
            weights, index = self.network
            self.net = _worker_model(weights, self.device)[index]
        return self.net

    def block(self, index: int, box: tuple[int, int, int, int]) -> _Block:
        """The block and its halo (the span of patch centres to read around it)."""
        y0, x0, h, w = box
        cfg = self.settings.inference
        extra = self.settings.extra
        rows = axis_window(y0, y0 + h, self.shape[0], cfg.patch, cfg.stride, extra)
        cols = axis_window(x0, x0 + w, self.shape[1], cfg.patch, cfg.stride, extra)
        return _Block(index, box, rows, cols)

    def read(self, block: _Block) -> _Reads:
        """Target and warped source over the block's halo span."""
        start = time.perf_counter()
        ry, rx = block.rows.centre_start, block.cols.centre_start
        rh, rw = block.rows.centre_stop - ry, block.cols.centre_stop - rx
        target_ref, source_ref = self.slides.target_ref, self.slides.source_ref
        identity = Transform([Stage(np.eye(3))], target_ref, target_ref)
        span = (ry, rx, rh, rw)
        target = warp_block(identity, self.slides.target, span, self.downsample)
        moving = Transform([self.previous], target_ref, source_ref)
        source = warp_block(moving, self.slides.source, span, self.downsample)
        return _Reads(target, source, time.perf_counter() - start)

    def estimate(self, reads: _Reads, report: LevelReport) -> torch.Tensor | None:
        """``v`` (1, 2, span) over the halo span, pixels of the level: the network's, then
        refined; ``None`` when neither image has tissue there."""
        representation = self.settings.inference.representation
        fixed = _to_tensor(reads.target, self.slides.target_glass, representation, self.device)
        moving = _to_tensor(reads.source, self.slides.source_glass, representation, self.device)
        if not (_has_tissue(fixed) or _has_tissue(moving)):
            report.skipped += 1
            return None
        v = None
        net = self.network_module()
        if net is not None:
            v = self._network(net, moving, fixed, report)
        steps = self.settings.refine.steps_at(self.index, has_network=net is not None)
        if steps > 0:
            start = time.perf_counter()
            v = refine_field(moving, fixed, v, replace(self.settings.refine, steps=steps))
            report.refine_s += time.perf_counter() - start
        return v

    def _network(
        self, net: UNet, moving: torch.Tensor, fixed: torch.Tensor, report: LevelReport
    ) -> torch.Tensor:
        start = time.perf_counter()
        counts = PatchCounts()
        with torch.inference_mode():
            v = register_level(net, moving, fixed, self.settings.inference, counts)
        report.network_s += time.perf_counter() - start
        report.patches += counts.run
        report.background_patches += counts.skipped
        return v.clone()  # leave inference mode: refinement needs autograd

    def compose(self, v: np.ndarray, block: _Block) -> np.ndarray:
        """``u_k(x) = d v(x) + u_{k-1}(x + d v(x))`` (2, h, w) float32 on the block, level-0
        pixels, from ``v`` (2, h, w) in pixels of the level."""
        y0, x0, h, w = block.box
        v0 = v * self.downsample
        xs = to_level0(np.arange(x0, x0 + w), self.downsample)
        ys = to_level0(np.arange(y0, y0 + h), self.downsample)
        gx, gy = np.meshgrid(xs, ys)
        points = np.stack([gx + v0[0], gy + v0[1]], -1).reshape(-1, 2)
        previous = self.previous.displacement(points).reshape(h, w, 2)
        return (v0 + np.moveaxis(previous, -1, 0)).astype(np.float32)


def _to_tensor(
    rgb: np.ndarray, glass: tuple[float, float, float], representation: str, device: str
) -> torch.Tensor:
    white = on_white_glass(rgb, glass)
    tensor = torch.from_numpy(np.ascontiguousarray(white)).permute(2, 0, 1)[None]
    return network_input(tensor, representation).to(device)


def _has_tissue(image: torch.Tensor) -> bool:
    return bool(has_tissue(image).any())
