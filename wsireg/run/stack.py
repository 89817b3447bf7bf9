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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wsireg import __version__
from wsireg.engine.options import no_overrides_left, take_overrides
from wsireg.engine.parallel import Execution, local_cluster
from wsireg.engine.transform import SlideRef, Transform
from wsireg.engine.warp import WarpOptions, warp
from wsireg.errors import WsiregError
from wsireg.io.output import check_output
from wsireg.io.slide import open_slide
from wsireg.progress import is_quiet, progress
from wsireg.run.batch import PairTask, check_batch_output, run_tasks, task_options
from wsireg.run.evaluate import Pair, slide_stem, slug, write_json
from wsireg.run.settings import RegisterOptions

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


@dataclass(frozen=True)
class _Sections:
    """The serial sections of a stack, their names, the reference's position, the output."""

    slides: list[Path]
    names: list[str]
    reference: int
    out: Path

    def registration(self, index: int) -> Path:
        """Output folder of the registration of slide ``index`` onto its neighbour."""
        other = self.names[neighbour(index, self.reference)]
        return self.out / "registrations" / f"{self.names[index]}-to-{other}"


def stack(
    slides: Sequence[str | Path],
    out: str | Path,
    reference: int,
    options: RegisterOptions | None = None,
    *,
    execution: Execution | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> StackResult:
    """Register serial sections ``slides`` into the frame of ``slides[reference]``.

    ``reference`` is a 0-based position in ``slides``. ``options``: the pairwise
    registrations' (:class:`wsireg.run.settings.RegisterOptions`; ``warp_level``: target level
    of the warped slides, ``write_warped=False`` writes only the transforms). ``execution``
    runs the pairwise registrations as :func:`wsireg.run.batch.batch` runs pairs, and the
    warps on the same cluster (one LocalCluster for both when it asks for ``workers``).
    Keyword ``overrides`` replace fields of either.
    """
    execution = take_overrides(execution or Execution(), overrides)
    options = take_overrides(options or RegisterOptions(), overrides)
    no_overrides_left("stack", overrides)
    paths = [Path(s) for s in slides]
    if len(paths) < 2:
        raise ValueError("a stack needs at least two slides")
    if not 0 <= reference < len(paths):
        raise ValueError(f"reference must be a position 0..{len(paths) - 1}, not {reference}")
    for path in paths:  # a bad slide fails now, before any registration
        open_slide(path)
    sections = _Sections(paths, slide_names(paths), reference, Path(out).absolute())
    check_batch_output(sections.out, resume, overwrite)
    sections.out.mkdir(parents=True, exist_ok=True)
    options = task_options(options, execution)
    with local_cluster(execution) as running:
        report = _run(sections, options, running, resume, overwrite)
    write_json(sections.out / STACK_JSON, report, overwrite=True)
    transforms = {e["name"]: Path(e["transform"]) for e in report["slides"]}
    warped = {e["name"]: Path(e["warped"]) for e in report["slides"] if e["warped"]}
    return StackResult(
        sections.out, sections.names, sections.names[reference], transforms, warped, report
    )


def _run(
    sections: _Sections,
    options: RegisterOptions,
    execution: Execution,
    resume: bool,
    overwrite: bool,
) -> dict[str, Any]:
    """Register the neighbours, compose, warp (unless ``options.write_warped`` is off); the
    report."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    pairwise = replace(options, write_warped=False)
    folders = _register_neighbours(sections, pairwise, execution, resume, overwrite)
    timings["register_s"] = time.perf_counter() - start
    transforms = {}
    for i, name in enumerate(sections.names):
        path = sections.out / "transforms" / name
        transforms[name] = _compose(sections, i, folders, path, resume, overwrite)
    timings["compose_s"] = time.perf_counter() - start - timings["register_s"]
    warped: dict[str, Path] = {}
    if options.write_warped:
        what = WarpOptions(level=options.warp_level)
        on = replace(execution, resources=None)  # warp chunks need no GPU: they claim nothing
        for i, name in enumerate(sections.names):
            path = sections.out / f"{name}.ome.zarr"
            if not (resume and path.exists()):  # one interpolation of the composed chain
                warp(
                    transforms[name],
                    sections.slides[i],
                    path,
                    what,
                    execution=on,
                    resume=resume,
                    overwrite=overwrite,
                )
            warped[name] = path
    timings["warp_s"] = time.perf_counter() - start - timings["register_s"] - timings["compose_s"]
    timings["total_s"] = time.perf_counter() - start
    return _report(sections, folders, transforms, warped, pairwise, timings)


def _register_neighbours(
    sections: _Sections,
    options: RegisterOptions,
    execution: Execution,
    resume: bool,
    overwrite: bool,
) -> dict[int, Path]:
    """Register each slide onto its neighbour towards the reference; their output folders."""
    quiet = True if execution.distributed else is_quiet()
    folders: dict[int, Path] = {}
    tasks = []
    for i, slide in enumerate(sections.slides):
        if i == sections.reference:
            continue
        folders[i] = sections.registration(i)
        if resume and folders[i].is_dir():
            continue
        target = sections.slides[neighbour(i, sections.reference)]
        pair = Pair(i, folders[i].name, str(slide.absolute()), str(target.absolute()))
        tasks.append(PairTask(pair, str(folders[i]), options, resume, overwrite, quiet))
    with progress(len(tasks), "stack: register", unit="pair") as bar:
        rows = run_tasks(tasks, execution, on_row=lambda _: bar.update(1))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise WsiregError(
            f"{failed[0]['error']} (registering {failed[0]['name']}; "
            f"{len(failed)} of {len(rows)} registrations failed)"
        )
    return folders


def _compose(
    sections: _Sections,
    index: int,
    folders: dict[int, Path],
    path: Path,
    resume: bool,
    overwrite: bool,
) -> Path:
    """Save the composed transform reference -> slide ``index`` at ``path``."""
    if resume and path.is_dir():
        return path
    check_output(path, overwrite)
    reference = sections.slides[sections.reference]
    if index == sections.reference:
        composed = Transform.identity(SlideRef.from_slide(open_slide(reference)))
        composed.parameters = {"stack": {"reference": str(reference)}}
    else:
        steps = chain(index, sections.reference)
        composed = Transform.compose([Transform.load(folders[k] / "transform") for k in steps])
        composed.parameters = {
            "stack": {
                "reference": str(reference),
                "chain": [str(sections.slides[k]) for k in steps],
            },
            **composed.parameters,
        }
    composed.save(path, overwrite=overwrite)
    return path


def _report(
    sections: _Sections,
    folders: dict[int, Path],
    transforms: dict[str, Path],
    warped: dict[str, Path],
    options: RegisterOptions,
    timings: dict[str, float],
) -> dict[str, Any]:
    names, reference = sections.names, sections.reference
    entries = []
    for i, (slide, name) in enumerate(zip(sections.slides, names, strict=True)):
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
        "options": options.to_json(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


__all__ = ["StackResult", "chain", "neighbour", "slide_names", "stack"]
