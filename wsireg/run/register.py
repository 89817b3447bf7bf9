"""The pipeline behind ``wsireg register`` and :func:`wsireg.register`.

``register(source, target, out)`` registers the source (moving) slide onto the target (fixed)
slide and writes, in the directory ``out``::

    transform/          the transform (wsireg.engine.transform format): T(x) = A (x + u(x))
    warped.ome.zarr     the source warped into target space (level ``warp_level``), a pyramid
                        (``warped.ome.tif`` with ``fmt="ome-tiff"``, :func:`warped_name`)
    qc/                 target.png, checkerboard-*.png and overlay-*.png before / affine / final
    report.json         inputs, outputs, parameters, timings per stage, peak RSS, device, the
                        similarity before / after the affine / final (:func:`similarity_report`),
                        the pyramid steps of the estimation (:func:`pyramid_report`), where
                        the blocks ran (``execution``; per step the blocks of each worker)

Stages (:func:`register`, one call each): the options are checked against the slides and
resolved (:mod:`wsireg.run.settings`); (1) thumbnails at equal physical resolution (mpp) and
the affine initial alignment (:mod:`wsireg.engine.align`); (2) the nonrigid field, streamed
level by level down to the target level ``level`` (:mod:`wsireg.engine.scheduler`), its finest
level written straight into ``transform/field.zarr``, then ``transform.json``; (3) the warp
(:mod:`wsireg.engine.warp`); (4) QC and report.
Slides of different pixel sizes are registered in physical units: the thumbnails and the
alignment (``physical_scale``), and the field on the target's grid.
The output is staged under ``.OUT.partial`` (:func:`wsireg.io.output.staged_output`: locked
while written, never at or around an input) and renamed at the end; ``resume`` continues a
staged output left by a killed run of the same inputs and options (the run fingerprint,
:func:`run_fingerprint`; alignment, finished field blocks and warp chunks are kept) and gives
the same result as an uninterrupted run. ``report.json`` ends with the quality gate's verdict
(:func:`quality_gate`) and the fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsireg import __version__
from wsireg.core.coords import grid_to_level0_affine, to_level0
from wsireg.core.stain import background_rgb
from wsireg.engine.align import AlignConfig, align, similarity_on_grid
from wsireg.engine.options import no_overrides_left, take_overrides
from wsireg.engine.parallel import Execution, local_cluster, peak_rss_mib
from wsireg.engine.scheduler import FieldStore, LevelReport, SlidePair, estimate_field
from wsireg.engine.transform import SlideRef, Stage, Transform, field_name
from wsireg.engine.warp import WarpOptions, warp, warp_block
from wsireg.errors import InputError, WsiregError
from wsireg.io.channels import Channels
from wsireg.io.ngff import write_ome_zarr
from wsireg.io.output import remove, staged_output
from wsireg.io.qc import deformation_grid, save_png, tissue_overlap, write_qc
from wsireg.io.slide import HAEMATOXYLIN, Slide, open_slide
from wsireg.model.network import (
    MultiLevelModel,
    default_weights_path,
    load_default,
    resolve_device,
    sha256_file,
)
from wsireg.progress import announce, progress, stage_progress
from wsireg.run.settings import (
    RegisterOptions,
    RegistrationSettings,
    check_options,
    resolve_settings,
)

#: Longest side of the thumbnails used by the alignment and the QC pictures.
THUMBNAIL_SIDE = 1024
#: Scale mismatch tolerated when the mpp of a slide is unknown.
MAX_UNKNOWN_SCALE = 1.5
#: Quality gate: least final similarity and tissue overlap (Dice) of a plausible registration.
MIN_SIMILARITY = 0.15
MIN_TISSUE_OVERLAP = 0.5
#: The parts of a register output.
TRANSFORM, QC, REPORT = "transform", "qc", "report.json"
#: The name of the warped source in each output format (:data:`wsireg.io.convert.FORMATS`).
WARPED = {"ome-zarr": "warped.ome.zarr", "ome-tiff": "warped.ome.tif"}


#: The fields of :class:`~wsireg.engine.warp.WarpOptions` that :func:`register` takes.
WARPED_OPTIONS = ("fmt", "ngff_version")


def warped_name(fmt: str) -> str:
    """The name of the warped source of a register output written as ``fmt``."""
    if fmt not in WARPED:
        raise ValueError(f"format must be one of {tuple(WARPED)}, not {fmt!r}")
    return WARPED[fmt]


@dataclass
class Result:
    """What :func:`register` produced: ``out`` and ``warped`` are absolute paths."""

    out: Path
    transform: Transform
    warped: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def register(
    source: str | Path,
    target: str | Path,
    out: str | Path,
    options: RegisterOptions | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    execution: Execution | None = None,
    **overrides: Any,
) -> Result:
    """Register ``source`` (moving) onto ``target`` (fixed) and write the outputs in ``out``.

    ``options`` (:class:`wsireg.run.settings.RegisterOptions`) say what to compute; keyword
    ``overrides`` replace fields of it (``register(a, b, out, level=0, weights="default")``).
    ``overwrite`` replaces an existing ``out``; ``resume`` continues a killed run into ``out``
    (of the same inputs and options, else :class:`~wsireg.errors.OutputError`). The quality
    gate (:func:`quality_gate`) is reported in ``report.json``; with ``strict`` an implausible
    registration is a :class:`QualityError` and nothing is written. The keywords
    :data:`WARPED_OPTIONS` of :class:`wsireg.engine.warp.WarpOptions` say how the warped
    source is written: ``fmt="ome-zarr"`` (``warped.ome.zarr``, the default) of OME-NGFF
    ``ngff_version="0.4"`` or ``"0.5"``, or ``fmt="ome-tiff"`` (``warped.ome.tif``).
    ``execution`` (:class:`~wsireg.engine.parallel.Execution`) says where the field's blocks
    and the warp's chunks run: threads here (the default), a LocalCluster of ``workers``
    processes started for the run, or the dask.distributed cluster at ``scheduler``
    (``resources`` each task claims, e.g. ``{"GPU": 1}``); the result is the same, byte for
    byte.
    """
    options = take_overrides(options or RegisterOptions(), overrides)
    warp_options = warped_options(options, overrides)
    no_overrides_left("register", overrides)
    fmt = warp_options.fmt
    out = Path(out)
    timings = _Timings()
    source_slide, target_slide = open_slide(source), open_slide(target)
    check_options(options, target_slide)
    source_shown, target_shown = registration_slides(options, source_slide, target_slide)
    if source_slide.channels.kind == "labels":  # label values are kept, never blended
        warp_options = replace(warp_options, interpolation="nearest")
    device = str(resolve_device(options.device))
    model, weights = _load_model(options, device)
    fingerprint = run_fingerprint(
        source_slide, target_slide, options, device, weights, warp_options
    )
    staging = staged_output(
        out, overwrite, resume, fingerprint=fingerprint, inputs=(source, target)
    )
    execution = execution or Execution(threads=options.threads)
    requested = execution.to_json()
    with local_cluster(execution) as execution, staging as stage:
        work = stage / "work"
        work.mkdir(parents=True, exist_ok=True)
        slides = _slide_pair(source_shown, target_shown, work)
        settings = resolve_settings(options, slides.target_ref, model, weights, device)
        with timings.measure("align_s"), stage_progress("alignment"):
            alignment = _align(slides, work, resume)
        with timings.measure("nonrigid_s"):
            on_glass = alignment.slides_on_glass(slides)
            transform, levels = _estimate(
                on_glass, alignment, settings, model, stage, resume, execution
            )
        with timings.measure("save_s"):
            transform.parameters = settings.transform_parameters()
            transform.write_document(stage / TRANSFORM)
        if settings.warp_level is not None:
            with timings.measure("warp_s"):
                path = stage / warped_name(fmt)
                _warp(stage / TRANSFORM, source_slide, path, warp_options, resume, execution)
        with timings.measure("qc_s"), stage_progress("quality control"):
            similarity, quality = _quality_control(
                stage / QC, slides, alignment, transform, out / QC
            )
        timings.finish()
        report = _report(source_shown, target_shown, settings, alignment, levels, similarity)
        report["outputs"] = output_paths(out, fmt if settings.warp_level is not None else None)
        report["quality"] = quality
        report["execution"] = requested
        if strict and not report["quality"]["plausible"]:
            raise QualityError(out, quality_warning(report["quality"]))
        report["timings_s"] = timings.rounded()
        report["peak_rss_mib"] = round(peak_rss_mib(), 1)
        report["host"] = {"python": platform.python_version(), "machine": platform.machine()}
        report["fingerprint"] = fingerprint
        (stage / REPORT).write_text(json.dumps(report, indent=2))
        remove(work)
    out = out.resolve()
    warped = out / warped_name(fmt) if settings.warp_level is not None else None
    return Result(out, Transform.load(out / TRANSFORM), warped, report)


def warped_options(options: RegisterOptions, overrides: dict[str, Any]) -> WarpOptions:
    """The options of the warped source: level ``options.warp_level`` and the keywords of
    :data:`WARPED_OPTIONS` taken out of ``overrides``."""
    chosen = {name: overrides.pop(name) for name in WARPED_OPTIONS if name in overrides}
    return WarpOptions(level=options.warp_level, **chosen)


def registration_channels(
    source: Channels, target: Channels, options: RegisterOptions
) -> tuple[str | int | None, str | int | None]:
    """The channel each slide is registered on (:meth:`Slide.showing`): the one the options
    name, else ``None`` (a brightfield slide as stored; a fluorescence slide's nuclear
    channel, else its first), except that a brightfield slide registered to a fluorescence
    one shows its haematoxylin (the nuclei a nuclear channel shows)."""

    def default(mine: Channels, other: Channels) -> str | None:
        if mine.kind == "brightfield" and other.kind == "fluorescence":
            return HAEMATOXYLIN
        return None

    source_choice = options.source_channel
    target_choice = options.target_channel
    if source_choice is None:
        source_choice = default(source, target)
    if target_choice is None:
        target_choice = default(target, source)
    return source_choice, target_choice


def registration_slides(
    options: RegisterOptions, source: Slide, target: Slide
) -> tuple[Slide, Slide]:
    """``source`` and ``target`` showing the channels they are registered on
    (:func:`registration_channels`), announced in one line when either is not RGB."""
    source_choice, target_choice = registration_channels(source.channels, target.channels, options)
    shown = (
        source
        if source_choice is None and source.shown == "RGB"
        else source.showing(source_choice),
        target
        if target_choice is None and target.shown == "RGB"
        else target.showing(target_choice),
    )
    if (shown[0].shown, shown[1].shown) != ("RGB", "RGB"):
        announce(
            "channels",
            f"registering source {Path(source.path).name} on {shown[0].shown}, "
            f"target {Path(target.path).name} on {shown[1].shown}",
        )
    return shown


def output_paths(out: Path, warped_format: str | None) -> dict[str, str | None]:
    """Absolute paths of the parts of the register output ``out`` (``warped``: the warped
    source in ``warped_format``, ``None`` when it is not written)."""
    out = Path(out).resolve()
    return {
        "folder": str(out),
        "transform": str(out / TRANSFORM),
        "warped": str(out / warped_name(warped_format)) if warped_format else None,
        "qc": str(out / QC),
        "report": str(out / REPORT),
    }


class _Timings(dict[str, float]):
    """Seconds per stage, and the total since this object was made."""

    def __init__(self) -> None:
        super().__init__()
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start

    def finish(self) -> None:
        self["total_s"] = time.perf_counter() - self._start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.items()}


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------
def _slide_pair(source: Slide, target: Slide, work: Path) -> SlidePair:
    """The slides to read (each given a pyramid first when it has no coarse levels: every
    stage but the final warp reads coarse grids) and their identities, computed once."""
    return SlidePair(
        ensure_pyramid(source, work),
        ensure_pyramid(target, work),
        SlideRef.from_slide(source),
        SlideRef.from_slide(target),
    )


def ensure_pyramid(slide: Slide, workdir: Path, side: int = THUMBNAIL_SIDE) -> Slide:
    """``slide`` itself, or, when it has no level coarse enough for a thumbnail of about
    ``side`` px and its finest level is large, an OME-Zarr pyramid of it built out of core in
    ``workdir`` (so no step reads a whole large level at once)."""
    h, w = slide.level_shape(slide.level_count - 1)
    if max(h, w) <= 8 * side or h * w <= 64 << 20:
        return slide
    path = workdir / f"pyramid-{Path(slide.path).name}.ome.zarr"
    if not path.exists():
        write_ome_zarr(slide.level(0), path, mpp=slide.mpp, name=Path(slide.path).name)
    return open_slide(path)


def _load_model(
    options: RegisterOptions, device: str
) -> tuple[MultiLevelModel | None, dict[str, str] | None]:
    """The networks of ``options.weights`` on ``device`` and their identity (path, sha256)."""
    if not options.uses_networks:
        return None, None
    if str(options.weights) == "default":
        model = load_default(device)
    else:
        model = MultiLevelModel.load(Path(str(options.weights)), device=device)
    return model, weights_identity(options)


def weights_identity(options: RegisterOptions) -> dict[str, str] | None:
    """Path and sha256 of the weights ``options`` name (``None`` without networks)."""
    if not options.uses_networks:
        return None
    path = (
        default_weights_path() if str(options.weights) == "default" else Path(str(options.weights))
    )
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


#: Options that do not change what a registration computes (left out of its fingerprint).
UNFINGERPRINTED = ("threads",)


def run_fingerprint(
    source: Slide,
    target: Slide,
    options: RegisterOptions,
    device: str,
    weights: dict[str, str] | None,
    warp_options: WarpOptions | None = None,
) -> dict[str, Any]:
    """What a registration's result depends on: the slides' identities (path, file size,
    level-0 size, mpp), every option but :data:`UNFINGERPRINTED` (the device resolved), the
    warped source's format and NGFF version (``warp_options``, default
    :class:`~wsireg.engine.warp.WarpOptions`), the weights' sha256 and wsireg's version.
    Stored with the staged output and in ``report.json``; ``resume`` refuses a staged output
    of another run (:func:`wsireg.io.output.check_fingerprint`)."""
    chosen = {k: v for k, v in options.to_json().items() if k not in UNFINGERPRINTED}
    chosen["device"] = device
    warp_options = warp_options or WarpOptions()
    chosen["warped_format"] = {"fmt": warp_options.fmt, "ngff_version": warp_options.ngff_version}
    return {
        "wsireg": __version__,
        "source": slide_identity(source),
        "target": slide_identity(target),
        "options": chosen,
        "weights": weights["sha256"] if weights else None,
    }


def slide_identity(slide: Slide) -> dict[str, Any]:
    """A slide as a run fingerprint names it: resolved path, bytes (of a single file; ``None``
    for a folder), level-0 ``[H, W]`` and mpp."""
    path = Path(slide.path).resolve()
    return {
        "path": str(path),
        "bytes": path.stat().st_size if path.is_file() else None,
        "shape": list(slide.level_shape(0)),
        "mpp": list(slide.mpp) if slide.mpp else None,
    }


def physical_scale(source: SlideRef, target: SlideRef) -> float:
    """Source level-0 pixels per target level-0 pixel, from the mpp (1 when unknown)."""
    if source.mpp and target.mpp:
        return math.sqrt((target.mpp[0] * target.mpp[1]) / (source.mpp[0] * source.mpp[1]))
    diag_s = math.hypot(*source.shape)
    diag_t = math.hypot(*target.shape)
    ratio = max(diag_s, diag_t) / min(diag_s, diag_t)
    if ratio > MAX_UNKNOWN_SCALE:
        missing = source.path if not source.mpp else target.path
        raise InputError(
            missing or "slide",
            f"microns per pixel unknown and the slides' sizes differ by x{ratio:.2f}: "
            "cannot tell their relative scale",
        )
    return 1.0


def thumbnail(slide: Slide, ref: SlideRef, downsample: float) -> np.ndarray:
    """The whole slide (level 0 of ``ref``) on the grid at ``downsample``, area-averaged from
    the closest level of ``slide``."""
    h = max(1, math.ceil(ref.shape[0] / downsample))
    w = max(1, math.ceil(ref.shape[1] / downsample))
    return warp_block(Transform.identity(ref), slide, (0, 0, h, w), downsample)


@dataclass
class _Alignment:
    """The initial alignment: its matrix (target level 0 -> source level 0), what the report
    says of it, and the target thumbnail the QC pictures reuse."""

    matrix: np.ndarray
    info: dict[str, Any]
    target_thumbnail: np.ndarray
    target_downsample: float

    def slides_on_glass(self, slides: SlidePair) -> SlidePair:
        """``slides`` with the glass colours the alignment measured on the thumbnails."""
        glass = self.info["glass"]
        return replace(
            slides, source_glass=tuple(glass["source"]), target_glass=tuple(glass["target"])
        )


def _align(slides: SlidePair, work: Path, resume: bool) -> _Alignment:
    """Affine initial alignment on thumbnails at equal physical resolution; cached in
    ``work/align.json`` for ``resume``."""
    scale = physical_scale(slides.source_ref, slides.target_ref)
    d_t = max(1.0, max(slides.target_ref.shape) / THUMBNAIL_SIDE)
    d_s = d_t * scale  # equal physical pixel size (may upsample a coarser source)
    target_thumb = thumbnail(slides.target, slides.target_ref, d_t)
    cached = work / "align.json"
    if resume and cached.is_file():
        info = json.loads(cached.read_text())
        return _Alignment(np.array(info["matrix"]), info, target_thumb, d_t)
    source_thumb = thumbnail(slides.source, slides.source_ref, d_s)
    glass = {"source": glass_colour(source_thumb), "target": glass_colour(target_thumb)}
    result = align(
        source_thumb,
        target_thumb,
        source_downsample=d_s,
        target_downsample=d_t,
        physical_scale=scale,
        source_name=str(slides.source.path),
        target_name=str(slides.target.path),
    )
    info = {
        "matrix": result.matrix.tolist(),
        "rotation_deg": result.rotation_deg,
        "flipped": result.flipped,
        "similarity_before": result.similarity_before,
        "similarity_after": result.similarity_after,
        "physical_scale": scale,
        "thumbnail_downsample": {"source": d_s, "target": d_t},
        "glass": glass,
        "timings": result.timings,
    }
    cached.write_text(json.dumps(info))
    return _Alignment(result.matrix, info, target_thumb, d_t)


def glass_colour(thumbnail: np.ndarray) -> list[float]:
    """A slide's glass colour (RGB grey levels, rounded to 0.1) from its thumbnail
    (:func:`wsireg.core.stain.background_rgb`)."""
    return [round(float(c), 1) for c in background_rgb(thumbnail)]


def _estimate(
    slides: SlidePair,
    alignment: _Alignment,
    settings: RegistrationSettings,
    model: MultiLevelModel | None,
    stage: Path,
    resume: bool,
    execution: Execution,
) -> tuple[Transform, list[LevelReport]]:
    """The nonrigid field, its finest level estimated straight into ``transform/``, its
    blocks run where ``execution`` says."""
    store = FieldStore(stage / "work" / "fields", stage / TRANSFORM / field_name(0))
    with progress(None, "register", unit="block") as bar:

        def on_block(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return estimate_field(
            slides,
            alignment.matrix,
            store,
            settings.scheduler,
            model=model,
            weights=None if settings.weights is None else settings.weights["path"],
            device=settings.device,
            resume=resume,
            execution=execution,
            on_block=on_block,
        )


def _warp(
    transform: Path,
    source: Slide,
    path: Path,
    options: WarpOptions,
    resume: bool,
    execution: Execution,
) -> None:
    """The warped source, its chunks where ``execution`` says (the saved ``transform``)."""
    warp(transform, source, path, options, execution=execution, overwrite=True, resume=resume)


def _quality_control(
    directory: Path,
    slides: SlidePair,
    alignment: _Alignment,
    transform: Transform,
    final_directory: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """QC pictures (in ``directory``, which becomes ``final_directory``) of the source before
    (the slides' top-left corners and pixel sizes matched), after the affine, after everything;
    their similarities to the target (:func:`similarity_report`), the quality gate's verdict
    on the final one and the field's deformation (:func:`deformation_report`)."""
    d = alignment.target_downsample
    h, w = alignment.target_thumbnail.shape[:2]
    t_ref, s_ref = slides.target_ref, slides.source_ref
    unaligned = grid_to_level0_affine(physical_scale(s_ref, t_ref))
    stages = {
        "before": Transform([Stage(unaligned)], t_ref, s_ref),
        "affine": Transform([Stage(alignment.matrix)], t_ref, s_ref),
        "final": transform,
    }
    warped = {name: warp_block(t, slides.source, (0, 0, h, w), d) for name, t in stages.items()}
    target = alignment.target_thumbnail
    write_qc(directory, target, warped)
    scores = {name: similarity_on_grid(target, image) for name, image in warped.items()}
    similarity = similarity_report(scores, d)
    deformation = deformation_report(directory, target, d, transform)
    deformation["grid_picture"] = str(final_directory.resolve() / GRID_PICTURE)
    quality = quality_gate(scores["final"], tissue_overlap(target, warped["final"]))
    return similarity, {**quality, "deformation": deformation}


#: Spacing of the QC deformation grid, pixels of the QC thumbnail.
GRID_SPACING = 16
#: The QC picture of the deformation grid.
GRID_PICTURE = "deformation-grid.png"


def deformation_report(
    directory: Path, target: np.ndarray, downsample: float, transform: Transform
) -> dict[str, Any]:
    """The nonrigid field of ``transform`` (its last stage with a field) in QC:
    :data:`GRID_PICTURE` in ``directory`` (:func:`wsireg.io.qc.deformation_grid`, a grid of
    :data:`GRID_SPACING` thumbnail px carried by ``x + u(x)`` on the target thumbnail at
    ``downsample``) and the share of the field's nodes where it folds
    (:meth:`~wsireg.engine.transform.Stage.folding_share`; 0 is what a plausible
    registration has)."""
    fields = [stage for stage in transform.stages if stage.field is not None]
    h, w = target.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    points = np.stack([to_level0(xs.ravel(), downsample), to_level0(ys.ravel(), downsample)], 1)
    moved = points + (fields[-1].displacement(points) if fields else 0.0)
    spacing = GRID_SPACING * downsample
    save_png(directory / GRID_PICTURE, deformation_grid(target, moved.T.reshape(2, h, w), spacing))
    return {
        "folding_share": fields[-1].folding_share() if fields else 0.0,
        "folding_measure": "share of the field's nodes where det(I + grad u) <= 0",
        "grid_spacing_px": spacing,
    }


#: What each entry of :func:`similarity_report` compares with the target.
SIMILARITY_STAGES = {
    "before": "the source unregistered (top-left corners and pixel sizes matched)",
    "affine": "the source after the affine initial alignment",
    "final": "the source through the whole transform (affine and nonrigid field)",
}


#: The name of the similarity that ``register`` reports (:func:`similarity_description`).
SIMILARITY_MEASURE = "local NCC of the tissue's optical density on the QC thumbnails"


def similarity_description() -> str:
    """What the similarities of ``report.json`` measure, in words: the measure the alignment
    maximises and the quality gate reads (:func:`wsireg.engine.align.similarity_on_grid`)."""
    config = AlignConfig()
    size = config.pyramid[-1]
    window = max(3, 2 * round((config.window_fraction * size - 1) / 2) + 1)
    return (
        f"local normalised cross-correlation ({window} px windows) of the optical-density "
        f"magnitude ('{config.representation}' stain representation) of the target and the "
        f"warped source, both resampled to {size} px across the target's tissue, averaged over "
        "the tissue's bounding box (background counts 0). In [-1, 1], higher is better; "
        f"the quality gate wants at least {MIN_SIMILARITY} for the final one (what real "
        "section pairs and unrelated tissues reach: benchmarks/quality_gate.py)"
    )


def similarity_report(scores: dict[str, float], thumbnail_downsample: float) -> dict[str, Any]:
    """``report.json``'s ``similarity``: the local NCC of the target with the source
    ``before`` registration, after the ``affine`` and ``final`` (:data:`SIMILARITY_STAGES`),
    rounded to 4 digits, with what is measured (:func:`similarity_description`) and on what: the
    QC thumbnails, the target's grid at ``thumbnail_downsample`` (target level-0 pixels per
    pixel) with the source warped onto it, the images of ``qc/``."""
    return {
        "measure": SIMILARITY_MEASURE,
        "description": similarity_description(),
        "images": "the QC thumbnails (qc/target.png and the warped source of each stage)",
        "thumbnail_downsample": thumbnail_downsample,
        "stages": SIMILARITY_STAGES,
        **{name: round(float(scores[name]), 4) for name in SIMILARITY_STAGES},
    }


class QualityError(WsiregError):
    """The quality gate found a registration implausible (with ``strict``)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


def quality_gate(similarity: float, overlap: float) -> dict[str, Any]:
    """Whether a registration is plausible: its final local similarity (the alignment's
    measure, :func:`wsireg.engine.align.similarity_on_grid`, on the QC thumbnails) at least
    :data:`MIN_SIMILARITY` and the tissue overlap (:func:`wsireg.io.qc.tissue_overlap`) at
    least :data:`MIN_TISSUE_OVERLAP`. The thresholds lie between the real section pairs of
    ``../shared/data`` and pairs of unrelated tissues (``tests/test_quality_gate.py``; the
    figures in README). The ``report.json`` entry: both values, the thresholds, the verdict
    and its reasons."""
    reasons = []
    if not (similarity >= MIN_SIMILARITY):  # NaN (no tissue) fails too
        reasons.append(f"final similarity {similarity:.3f} < {MIN_SIMILARITY}")
    if not (overlap >= MIN_TISSUE_OVERLAP):
        reasons.append(f"tissue overlap {overlap:.3f} < {MIN_TISSUE_OVERLAP}")
    return {
        "plausible": not reasons,
        "similarity": round(similarity, 4),
        "tissue_overlap": round(overlap, 4),
        "min_similarity": MIN_SIMILARITY,
        "min_tissue_overlap": MIN_TISSUE_OVERLAP,
        "reasons": reasons,
    }


def quality_warning(quality: dict[str, Any]) -> str:
    """One line saying why the gate finds a registration implausible."""
    return "registration implausible (different tissues?): " + "; ".join(quality["reasons"])


#: Entries of the alignment's record left out of ``report.json``: its own similarities are
#: computed on other crops and sizes than the report's one ``similarity`` (kept in the
#: ``work/align.json`` cache only).
ALIGNMENT_UNREPORTED = ("similarity_before", "similarity_after")


def pyramid_report(levels: list[LevelReport]) -> list[dict[str, Any]]:
    """``report.json``'s ``pyramid``: one entry per step of the field's estimation, coarsest
    first: ``pyramid_step`` (0 = the coarsest), ``downsample`` (target level-0 pixels per
    grid pixel) and ``shape`` of its grid, blocks, patches and seconds. A pyramid step is not
    a slide level: ``level`` in wsireg's options and outputs always means a level of a slide
    (``--level 0``: full resolution)."""
    return [report.to_json() for report in levels]


def _report(
    source: Slide,
    target: Slide,
    settings: RegistrationSettings,
    alignment: _Alignment,
    levels: list[LevelReport],
    similarity: dict[str, Any],
) -> dict[str, Any]:
    """``report.json`` but the outputs, timings, peak memory and host (added last). Paths
    are absolute."""

    def slide_info(slide: Slide) -> dict[str, Any]:
        return {
            "path": str(Path(slide.path).resolve()),
            "size": list(slide.level_shape(0)),
            "mpp": list(slide.mpp) if slide.mpp else None,
            "vendor": slide.vendor,
            "pixels": {
                "kind": slide.channels.kind,
                "dtype": slide.channels.dtype.name,
                "channels": list(slide.channels.names),
            },
            "registered_on": slide.shown,
        }

    return {
        "wsireg_version": __version__,
        "source": slide_info(source),
        "target": slide_info(target),
        "parameters": settings.report_parameters(),
        "weights": settings.weights,
        "device": settings.device,
        "alignment": {k: v for k, v in alignment.info.items() if k not in ALIGNMENT_UNREPORTED},
        "pyramid": pyramid_report(levels),
        "similarity": similarity,
    }


def summary_lines(result: Result) -> list[str]:
    """What ``wsireg register`` prints at the end: the similarities, named, and where each
    output is (absolute paths)."""
    report = result.report
    similarity = report["similarity"]
    outputs = report["outputs"]
    lines = [
        f"registered in {report['timings_s']['total_s']:.1f} s: {outputs['folder']}",
        f"similarity to the target ({similarity['measure']}; in [-1, 1], higher is better): "
        f"before {similarity['before']:.3f}, after the affine {similarity['affine']:.3f}, "
        f"final {similarity['final']:.3f}",
    ]
    for name in ("transform", "warped", "qc", "report"):
        if outputs[name] is not None:
            lines.append(f"{name + ':':11} {outputs[name]}")
    return lines


__all__ = ["RegisterOptions", "Result", "register", "summary_lines", "WsiregError"]
