"""The pipeline behind ``wsireg register`` and :func:`wsireg.register`.

``register(source, target, out)`` registers the source (moving) slide onto the target (fixed)
slide and writes, in the directory ``out``::

    transform/          the transform (wsireg.engine.transform format): T(x) = A (x + u(x))
    warped.ome.zarr     the source warped into target space (level ``warp_level``), a pyramid
    qc/                 target.png, checkerboard-*.png and overlay-*.png before / affine / final
    report.json         inputs, parameters, timings per stage, peak RSS, device, similarity

Stages: (1) thumbnails at equal physical resolution (mpp) and the affine initial alignment
(:mod:`wsireg.engine.align`); (2) the nonrigid field, streamed level by level down to the target level
``level`` (:mod:`wsireg.engine.scheduler`: ``refine`` instance-optimisation steps per block, after
the per-level networks when ``weights`` are given); (3) the warp (:mod:`wsireg.engine.warp`); (4) QC
and report.
The output is staged under ``.OUT.partial`` and renamed at the end; ``resume`` continues a
staged output left by a killed run (alignment, finished field blocks and warp chunks are kept)
and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsireg.engine.scheduler import SchedulerSettings, estimate_field
from wsireg.engine.transform import SlideRef, Stage, Transform
from wsireg.engine.warp import warp, warp_block
from wsireg.errors import InputError, WsiregError
from wsireg.model.inference import inference_settings
from wsireg.model.refine import RefineSettings
from wsireg.progress import progress

#: Longest side of the thumbnails used by the alignment and the QC pictures.
THUMBNAIL_SIDE = 1024
#: Default longest side of the finest grid of the field (chosen from the slide size).
DEFAULT_FIELD_SIDE = 2048
#: Longest side of the coarsest pyramid level.
COARSEST_SIDE = 256
#: Default instance-optimisation steps per block at the coarsest level without networks.
REFINE_STEPS = 40
#: Scale mismatch tolerated when the mpp of a slide is unknown.
MAX_UNKNOWN_SCALE = 1.5


@dataclass
class Result:
    """What :func:`register` produced."""

    out: Path
    transform: Transform
    warped: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    from wsireg.model.network import resolve_device as resolve

    return str(resolve(device))


def physical_scale(source: Any, target: Any) -> float:
    """Source level-0 pixels per target level-0 pixel, from the mpp (1 when unknown)."""
    if source.mpp and target.mpp:
        return math.sqrt((target.mpp[0] * target.mpp[1]) / (source.mpp[0] * source.mpp[1]))
    diag_s = math.hypot(*source.level_shape(0))
    diag_t = math.hypot(*target.level_shape(0))
    ratio = max(diag_s, diag_t) / min(diag_s, diag_t)
    if ratio > MAX_UNKNOWN_SCALE:
        missing = source.path if not source.mpp else target.path
        raise InputError(
            missing,
            f"microns per pixel unknown and the slides' sizes differ by x{ratio:.2f}: "
            "cannot tell their relative scale",
        )
    return 1.0


def thumbnail(slide: Any, downsample: float) -> np.ndarray:
    """The whole slide on the grid at ``downsample`` (area-averaged from the closest level)."""
    ref = SlideRef.from_slide(slide)
    h = max(1, math.ceil(ref.shape[0] / downsample))
    w = max(1, math.ceil(ref.shape[1] / downsample))
    return warp_block(Transform.identity(ref), slide, 0, 0, h, w, downsample)


def default_finest_downsample(target_ref: SlideRef, side: int = DEFAULT_FIELD_SIDE) -> float:
    """The smallest power of two keeping the finest field grid within ``side`` pixels."""
    longest = max(target_ref.shape)
    return float(2 ** max(0, math.ceil(math.log2(longest / side))))


def default_levels(
    target_ref: SlideRef, finest: float, networks: int = 0, refine: bool = True
) -> int:
    """Levels until the coarsest grid is about :data:`COARSEST_SIDE` pixels (1 to 8), and at
    least the model's ``networks`` (Algorithm 1's ``N`` is the model's; the old rule gave the
    ANHIR lesions pair only the two finest networks: 0.563 % median rTRE, networks only,
    against 0.544 % with all three, stage-2 networks). A coarse enough start matters at level
    0 of large slides: a 10k^2 pair (up to 40 px of deformation) ended at 5.8 px mean error with 4
    levels, 2.5 with 5 and 1.95 with 6 (coarsest 32x), and faster (refinement steps halve per
    finer level). Levels coarser than the networks are registered by instance optimisation
    alone (:func:`wsireg.engine.scheduler.estimate_field`), so without ``refine`` the depth is the
    model's."""
    longest = max(target_ref.shape) / finest
    levels = int(np.clip(math.floor(math.log2(max(longest, 1) / COARSEST_SIDE)) + 1, 1, 8))
    if networks and not refine:
        return networks
    return max(levels, networks)


def ensure_pyramid(slide: Any, workdir: Path, side: int = THUMBNAIL_SIDE) -> Any:
    """``slide`` itself, or, when it has no level coarse enough for a thumbnail of about
    ``side`` px and its finest level is large, an OME-Zarr pyramid of it built out of core in
    ``workdir`` (so no step reads a whole large level at once)."""
    from wsireg.io.ngff import write_ome_zarr
    from wsireg.io.slide import open_slide

    h, w = slide.level_shape(slide.level_count - 1)
    if max(h, w) <= 8 * side or h * w <= 64 << 20:
        return slide
    path = workdir / f"pyramid-{Path(slide.path).name}.ome.zarr"
    if not path.exists():
        write_ome_zarr(slide.level(0), path, mpp=slide.mpp, name=Path(slide.path).name)
    return open_slide(path)


def register(
    source: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    level: int | None = None,
    levels: int | None = None,
    iterations: int | None = None,
    patch: int | None = None,
    stride: int | None = None,
    group: int | None = None,
    refine: int | None = None,
    weights: str | Path | None = None,
    flip_average: bool | None = None,
    device: str = "auto",
    warp_level: int = 0,
    write_warped: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    threads: int | None = None,
) -> Result:
    """Register ``source`` (moving) onto ``target`` (fixed) and write the outputs in ``out``.

    ``level``: target level of the finest field (0 = full resolution; default: from the slide
    size, see :func:`default_finest_downsample`). ``levels``, ``iterations``, ``patch``,
    ``stride``, ``group``: Algorithm 1's N, M, P, S, G (defaults: the model's; N see
    :func:`default_levels`). ``refine``: instance-optimisation steps per block at the coarsest
    level, halved per finer level (default: 0 with weights, 40 without).
    ``flip_average``: average the networks' predictions over the four flips of each patch
    (default: the model's setting; see ``InferenceSettings.flip_average``).
    ``weights``: ``None`` (default: pure instance optimisation), ``"default"`` (the shipped
    networks) or a path. The networks are opt-in because on the real ANHIR pairs they are not
    yet as accurate as optimisation alone (``benchmarks/anhir_accuracy.py``, median rTRE rat
    kidney / lesions: networks 0.213 % / 0.547 %, networks + 40 steps 0.204 % / 0.568 %,
    optimisation alone 0.191 % / 0.505 %, affine 0.257 % / 0.536 %); on held-out synthetic
    pairs they are accurate (``benchmarks/network_accuracy.py``).
    """
    from wsireg.io.output import remove, staged_output
    from wsireg.io.slide import open_slide

    out = Path(out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with staged_output(out, overwrite, resume) as stage:
        work = stage / "work"
        work.mkdir(parents=True, exist_ok=True)
        source_slide, target_slide = open_slide(source), open_slide(target)
        # Slides without coarse levels get a pyramid first: every stage but the final warp
        # reads coarse grids.
        source_read = ensure_pyramid(source_slide, work)
        target_read = ensure_pyramid(target_slide, work)
        device = resolve_device(device)
        model, model_info = _load_model(weights, device)
        settings = _settings(model, levels, iterations, patch, stride, group, refine, flip_average)
        target_ref = SlideRef.from_slide(target_slide)
        finest = (
            default_finest_downsample(target_ref)
            if level is None
            else target_ref.level_downsample(level)
        )
        if levels is None:
            networks = model.num_levels if model is not None else 0
            depth = default_levels(target_ref, finest, networks, settings.refine.steps > 0)
            settings = replace(settings, levels=depth)

        start = time.perf_counter()
        affine, align_info, thumbs = _align(source_read, target_read, work, resume)
        timings["align_s"] = time.perf_counter() - start

        start = time.perf_counter()
        with progress(None, "register", unit="block") as bar:

            def on_block(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            transform, level_reports = estimate_field(
                source_read,
                target_read,
                affine,
                finest,
                work / "fields",
                model=model,
                settings=settings,
                device=device,
                resume=resume,
                on_block=on_block,
            )
        timings["nonrigid_s"] = time.perf_counter() - start
        transform.target = SlideRef.from_slide(target_slide)
        transform.source = SlideRef.from_slide(source_slide)
        transform.parameters = {
            "levels": settings.levels,
            "iterations": settings.iterations,
            "patch": settings.patch,
            "stride": settings.stride,
            "group": settings.group,
            "refine": asdict(settings.refine),
            "finest_downsample": finest,
            "weights": model_info,
        }
        start = time.perf_counter()
        transform_dir = stage / "transform"
        transform.save(transform_dir, overwrite=True)
        transform = Transform.load(transform_dir)
        timings["save_s"] = time.perf_counter() - start

        if write_warped:
            start = time.perf_counter()
            warp(
                transform,
                source_slide,
                stage / "warped.ome.zarr",
                level=warp_level,
                overwrite=True,
                resume=resume,
                threads=threads,
            )
            timings["warp_s"] = time.perf_counter() - start

        start = time.perf_counter()
        similarity = _quality_control(
            stage / "qc", source_read, target_read, affine, transform, thumbs
        )
        timings["qc_s"] = time.perf_counter() - start
        timings["total_s"] = time.perf_counter() - t_all
        report = _report(
            source_slide,
            target_slide,
            settings,
            finest,
            device,
            model_info,
            align_info,
            level_reports,
            similarity,
            timings,
            warp_level if write_warped else None,
        )
        (stage / "report.json").write_text(json.dumps(report, indent=2))
        remove(work)
    final = Transform.load(out / "transform")
    return Result(out, final, out / "warped.ome.zarr" if write_warped else None, report)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def _load_model(weights: str | Path | None, device: str) -> tuple[Any, dict[str, Any] | None]:
    from wsireg.model.network import (
        MultiLevelModel,
        default_weights_path,
        load_default,
        sha256_file,
    )

    if weights is None or str(weights) == "none":
        return None, None
    if str(weights) == "default":
        model = load_default(device)
        path = default_weights_path()
    else:
        path = Path(weights)
        model = MultiLevelModel.load(path, device=device)
    return model, {"path": str(path), "sha256": sha256_file(path)}


def _settings(
    model: Any,
    levels: int | None,
    iterations: int | None,
    patch: int | None,
    stride: int | None,
    group: int | None,
    refine: int | None,
    flip_average: bool | None = None,
) -> SchedulerSettings:
    # Algorithm 1's settings: the model's stored ones under the given ones (0 = not given)
    inference = inference_settings(
        model,
        iterations=iterations or None,
        patch=patch or None,
        stride=stride or None,
        group=group or None,
        flip_average=flip_average,
    )
    stored_levels = model.metadata.get("inference", {}).get("levels") if model else None
    steps = refine if refine is not None else (0 if model is not None else REFINE_STEPS)
    return SchedulerSettings(
        levels=levels or stored_levels or SchedulerSettings.levels,
        **asdict(inference),
        refine=RefineSettings(steps=steps),
    )


@dataclass
class _Thumbs:
    target: np.ndarray
    target_downsample: float


def _align(
    source: Any, target: Any, work: Path, resume: bool
) -> tuple[np.ndarray, dict[str, Any], _Thumbs]:
    """Affine initial alignment on thumbnails at equal physical resolution."""
    from wsireg.engine.align import align

    scale = physical_scale(source, target)
    t_ref = SlideRef.from_slide(target)
    d_t = max(1.0, max(t_ref.shape) / THUMBNAIL_SIDE)
    d_s = d_t * scale  # equal physical pixel size (may upsample a coarser source)
    target_thumb = thumbnail(target, d_t)
    cached = work / "align.json"
    if resume and cached.is_file():
        info = json.loads(cached.read_text())
        return np.array(info["matrix"]), info, _Thumbs(target_thumb, d_t)
    source_thumb = thumbnail(source, d_s)
    result = align(
        source_thumb,
        target_thumb,
        source_downsample=d_s,
        target_downsample=d_t,
        source_name=str(source.path),
        target_name=str(target.path),
    )
    info = {
        "matrix": result.matrix.tolist(),
        "rotation_deg": result.rotation_deg,
        "flipped": result.flipped,
        "similarity_before": result.similarity_before,
        "similarity_after": result.similarity_after,
        "physical_scale": scale,
        "thumbnail_downsample": {"source": d_s, "target": d_t},
        "timings": result.timings,
    }
    cached.write_text(json.dumps(info))
    return result.matrix, info, _Thumbs(target_thumb, d_t)


def _quality_control(
    directory: Path,
    source: Any,
    target: Any,
    affine: np.ndarray,
    transform: Transform,
    thumbs: _Thumbs,
) -> dict[str, float]:
    from wsireg.io.qc import write_qc

    d = thumbs.target_downsample
    h, w = thumbs.target.shape[:2]
    t_ref, s_ref = SlideRef.from_slide(target), SlideRef.from_slide(source)
    stages = {
        "before": Transform.identity(t_ref, s_ref),
        "affine": Transform([Stage(affine)], t_ref, s_ref),
        "final": transform,
    }
    warped = {name: warp_block(t, source, 0, 0, h, w, d) for name, t in stages.items()}
    return write_qc(directory, thumbs.target, warped)


def _report(
    source: Any,
    target: Any,
    settings: SchedulerSettings,
    finest: float,
    device: str,
    model_info: dict[str, Any] | None,
    align_info: dict[str, Any],
    levels: list[Any],
    similarity: dict[str, float],
    timings: dict[str, float],
    warp_level: int | None,
) -> dict[str, Any]:
    from wsireg import __version__
    from wsireg.engine.parallel import peak_rss_mib

    def slide_info(slide: Any) -> dict[str, Any]:
        return {
            "path": str(slide.path),
            "size": list(slide.level_shape(0)),
            "mpp": list(slide.mpp) if slide.mpp else None,
            "vendor": slide.vendor,
        }

    return {
        "wsireg_version": __version__,
        "source": slide_info(source),
        "target": slide_info(target),
        "parameters": {
            "levels": settings.levels,
            "iterations": settings.iterations,
            "patch": settings.patch,
            "stride": settings.stride,
            "group": settings.group,
            "block": settings.block,
            "smoothing": settings.smoothing,
            "flip_average": settings.flip_average,
            "refine": asdict(settings.refine),
            "finest_downsample": finest,
            "warp_level": warp_level,
        },
        "weights": model_info,
        "device": device,
        "alignment": align_info,
        "levels": [r.to_json() for r in levels],
        "similarity": similarity,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
    }


__all__ = ["Result", "register", "WsiregError"]
