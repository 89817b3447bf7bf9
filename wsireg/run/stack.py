"""``wsireg stack``: serial sections registered into the frame of a reference section.

Each slide ``i`` is registered to its neighbour towards the reference ``K`` (``i + 1`` below
``K``, ``i - 1`` above): neighbouring sections are more alike than distant ones. The pairwise
transforms are then composed along the chain (:meth:`wsireg.engine.transform.Transform.then`:
reference -> K -/+ 1 -> ... -> i), so each slide is interpolated once, by one :func:`warp` of
the composed chain, into the reference frame. ``stack(slides, out, reference)`` writes::

    OUT/<name>.ome.zarr              every slide in the reference frame (the reference too)
    OUT/transforms/<name>/           its composed transform (reference -> slide), all stages
    OUT/registrations/<a>-to-<b>/    the pairwise register outputs (qc/, report.json, ...)
    OUT/stack.json                   slides, names, reference, chains, timings

Names are ``<position>-<slide stem>`` (``00-section``, ...). The pairwise registrations are
independent and run like a :func:`wsireg.run.batch.batch` (in process, on a LocalCluster of
``workers``, or on the cluster at ``scheduler``); the warps fan out their chunks the same way.
``resume`` keeps every complete output and continues the incomplete ones.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsireg.errors import WsiregError
from wsireg.io.output import check_output
from wsireg.run.batch import PairTask, check_batch_output, cluster_client, run_tasks
from wsireg.run.evaluate import Pair, slide_stem, slug, write_json

STACK_JSON = "stack.json"


@dataclass
class StackResult:
    """What :func:`stack` produced, by slide name (in slide order)."""

    out: Path
    names: list[str]
    reference: str
    transforms: dict[str, Path]
    warped: dict[str, Path]
    report: dict[str, Any] = field(default_factory=dict)


def slide_names(slides: Sequence[str | Path]) -> list[str]:
    """``<position>-<stem>`` per slide: readable, ordered and unique."""
    width = max(2, len(str(len(slides) - 1)))
    return [f"{i:0{width}d}-{slug(slide_stem(s))}" for i, s in enumerate(slides)]


def neighbour(index: int, reference: int) -> int:
    """The slide ``index`` is registered to: its neighbour towards ``reference``."""
    return index + 1 if index < reference else index - 1


def chain(index: int, reference: int) -> list[int]:
    """Slides from the reference's neighbour to ``index``: the order the pairwise transforms
    (each ``neighbour(k) -> k``) are composed in."""
    if index == reference:
        return []
    step = -1 if index < reference else 1
    return list(range(reference + step, index + step, step))


def stack(
    slides: Sequence[str | Path],
    out: str | Path,
    reference: int,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    resources: dict[str, float] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    warp_level: int = 0,
    write_warped: bool = True,
    **register_options: Any,
) -> StackResult:
    """Register serial sections ``slides`` into the frame of ``slides[reference]``.

    ``reference`` is a 0-based position in ``slides``. ``scheduler``/``workers``/``threads``/
    ``resources`` run the pairwise registrations as :func:`wsireg.run.batch.batch` runs pairs (and
    the warps on the same kind of cluster); ``warp_level``: target level of the warped slides;
    ``write_warped=False`` writes only the transforms. Other keyword arguments go to
    :func:`wsireg.run.register.register`.
    """
    from wsireg.io.slide import open_slide

    slides = [Path(s) for s in slides]
    if len(slides) < 2:
        raise ValueError("a stack needs at least two slides")
    if not 0 <= reference < len(slides):
        raise ValueError(f"reference must be a position 0..{len(slides) - 1}, not {reference}")
    for path in slides:  # a bad slide fails now, before any registration
        open_slide(path)
    out = Path(out).absolute()
    check_batch_output(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    names = slide_names(slides)
    if threads is None and workers and scheduler is None:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
    with contextlib.ExitStack() as context:
        if workers and scheduler is None:  # one local cluster for registrations and warps
            client = context.enter_context(cluster_client(None, workers, resources))
            scheduler, workers = client.scheduler.address, None
        cluster = {"scheduler": scheduler, "workers": workers, "threads": threads}
        level = warp_level if write_warped else None
        flags = {"resume": resume, "overwrite": overwrite, "warp_level": level}
        report = _run(slides, names, reference, out, register_options, cluster, resources, **flags)
    write_json(out / STACK_JSON, report, overwrite=True)
    transforms = {e["name"]: Path(e["transform"]) for e in report["slides"]}
    warped = {e["name"]: Path(e["warped"]) for e in report["slides"] if e["warped"]}
    return StackResult(out, names, names[reference], transforms, warped, report)


def _run(
    slides: list[Path],
    names: list[str],
    reference: int,
    out: Path,
    register_options: dict[str, Any],
    cluster: dict[str, Any],
    resources: dict[str, float] | None,
    resume: bool,
    overwrite: bool,
    warp_level: int | None,
) -> dict[str, Any]:
    """Register the neighbours, compose, warp (unless ``warp_level`` is None); the report."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    options = dict(register_options, write_warped=False)
    folders = _register_neighbours(
        slides, names, reference, out, options, cluster, resources, resume, overwrite
    )
    timings["register_s"] = time.perf_counter() - start
    transforms = {}
    for i, name in enumerate(names):
        path = out / "transforms" / name
        transforms[name] = _compose(i, reference, slides, folders, path, resume, overwrite)
    timings["compose_s"] = time.perf_counter() - start - timings["register_s"]
    warped: dict[str, Path] = {}
    if warp_level is not None:
        for i, name in enumerate(names):
            path = out / f"{name}.ome.zarr"
            warped[name] = _warp(
                transforms[name], slides[i], path, warp_level, cluster, resume, overwrite
            )
    timings["warp_s"] = time.perf_counter() - start - timings["register_s"] - timings["compose_s"]
    timings["total_s"] = time.perf_counter() - start
    return _report(slides, names, reference, folders, transforms, warped, options, timings)


def _register_neighbours(
    slides: list[Path],
    names: list[str],
    reference: int,
    out: Path,
    options: dict[str, Any],
    cluster: dict[str, Any],
    resources: dict[str, float] | None,
    resume: bool,
    overwrite: bool,
) -> dict[int, Path]:
    """Register each slide onto its neighbour towards the reference; their output folders."""
    from wsireg.progress import is_quiet, progress

    scheduler, workers, threads = cluster["scheduler"], cluster["workers"], cluster["threads"]
    quiet = True if (scheduler is not None or workers) else is_quiet()
    folders: dict[int, Path] = {}
    tasks = []
    for i in range(len(slides)):
        if i == reference:
            continue
        j = neighbour(i, reference)
        folders[i] = out / "registrations" / f"{names[i]}-to-{names[j]}"
        if resume and folders[i].is_dir():
            continue
        pair = Pair(i, folders[i].name, str(slides[i].absolute()), str(slides[j].absolute()))
        tasks.append(PairTask(pair, str(folders[i]), options, resume, overwrite, threads, quiet))
    with progress(len(tasks), "stack: register", unit="pair") as bar:
        rows = run_tasks(
            tasks,
            scheduler=scheduler,
            workers=workers,
            resources=resources,
            on_row=lambda _: bar.update(1),
        )
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise WsiregError(
            f"{failed[0]['error']} (registering {failed[0]['name']}; "
            f"{len(failed)} of {len(rows)} registrations failed)"
        )
    return folders


def _compose(
    index: int,
    reference: int,
    slides: list[Path],
    folders: dict[int, Path],
    path: Path,
    resume: bool,
    overwrite: bool,
) -> Path:
    """Save the composed transform reference -> slide ``index`` at ``path``."""
    from wsireg.engine.transform import SlideRef, Transform
    from wsireg.io.slide import open_slide

    if resume and path.is_dir():
        return path
    check_output(path, overwrite)
    if index == reference:
        composed = Transform.identity(SlideRef.from_slide(open_slide(slides[reference])))
        composed.parameters = {"stack": {"reference": str(slides[reference])}}
    else:
        steps = chain(index, reference)
        composed = Transform.compose([Transform.load(folders[k] / "transform") for k in steps])
        composed.parameters = {
            "stack": {
                "reference": str(slides[reference]),
                "chain": [str(slides[k]) for k in steps],
            },
            **composed.parameters,
        }
    composed.save(path, overwrite=overwrite)
    return path


def _warp(
    transform: Path,
    slide: Path,
    path: Path,
    level: int,
    cluster: dict[str, Any],
    resume: bool,
    overwrite: bool,
) -> Path:
    """One interpolation of ``slide`` through its composed transform into ``path``."""
    from wsireg.engine.warp import warp

    if resume and path.exists():
        return path
    return warp(transform, slide, path, level=level, resume=resume, overwrite=overwrite, **cluster)


def _report(
    slides: list[Path],
    names: list[str],
    reference: int,
    folders: dict[int, Path],
    transforms: dict[str, Path],
    warped: dict[str, Path],
    options: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    from wsireg import __version__

    entries = []
    for i, (slide, name) in enumerate(zip(slides, names, strict=True)):
        entries.append(
            {
                "position": i,
                "name": name,
                "slide": str(slide.absolute()),
                "registered_to": None if i == reference else names[neighbour(i, reference)],
                "registration": str(folders[i]) if i in folders else None,
                "chain": [names[k] for k in chain(i, reference)],
                "transform": str(transforms[name]),
                "warped": str(warped[name]) if name in warped else None,
            }
        )
    return {
        "wsireg_version": __version__,
        "reference": names[reference],
        "slides": entries,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


__all__ = ["StackResult", "chain", "neighbour", "slide_names", "stack"]
