"""``wsireg batch``: register every pair of an ANHIR pair table, in parallel, resumably.

``batch(pairs_csv, out)`` reads the pair table (:func:`wsireg.run.evaluate.read_pairs`: columns
``Source image``, ``Target image``, optional ``Source landmarks``/``Target landmarks``, other
columns kept as metadata, paths relative to the CSV) and writes::

    OUT/<row>-<source>-to-<target>/   one wsireg.register output per pair (transform/,
                                      warped.ome.zarr, qc/, report.json)
    OUT/summary.csv, summary.json     one row per pair: status (ok/failed), one-line error,
                                      seconds, peak RSS of the task, rTRE statistics when the
                                      pair has landmarks, the table's other columns; the JSON
                                      adds the options and the summary over pairs

Each pair is one task (:class:`PairTask`, plain paths and options, so it pickles): run in this
process one after the other (default), on a LocalCluster of ``workers`` processes, or on an
existing dask.distributed cluster (``scheduler``); ``resources`` (e.g. ``{"GPU": 1}``) makes
each task claim worker resources, so a worker started with ``--resources GPU=1`` runs one pair
at a time. A failing pair never stops the others: it is reported as failed with its one-line
error. ``resume`` skips pairs whose output folder exists (``register`` renames it into place
only when complete) and continues the staged output of the others (``register(resume=True)``);
either must come from the same inputs and options (the run fingerprint): a finished pair of
other ones refuses the batch before anything runs (:func:`check_finished_pair`), an
interrupted one fails that pair; both errors name the pair's folder and what differs.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wsireg.engine.options import no_overrides_left, take_overrides
from wsireg.engine.parallel import (
    Execution,
    cluster_client,
    map_on_cluster,
    peak_rss_mib,
    reset_peak_rss,
    torch_threads,
)
from wsireg.errors import OutputError, OutputExistsError, error_line
from wsireg.io.output import fingerprint_differences, partial_path, staged_output
from wsireg.io.slide import open_slide
from wsireg.model.network import resolve_device
from wsireg.progress import is_quiet, progress, set_quiet
from wsireg.run.evaluate import (
    METRICS,
    Landmarks,
    Pair,
    evaluate_pair,
    landmark_metrics,
    landmarks,
    read_pairs,
    summarize,
    write_json,
)
from wsireg.run.register import register, run_fingerprint, weights_identity
from wsireg.run.settings import RegisterOptions

#: Columns of ``summary.csv`` before the metrics and the table's own columns.
HEAD_COLUMNS = ("index", "name", "status", "error", "run", "seconds", "peak_rss_mib")
TAIL_COLUMNS = ("source", "target", "out")
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------
# One pair: the task
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairTask:
    """Everything one pair needs, as plain values (pickled to dask workers).

    ``options`` are the registration's (:class:`wsireg.run.settings.RegisterOptions`; their
    ``threads`` also cap torch's threads during the task); ``quiet`` silences its progress
    bars.
    """

    pair: Pair
    out: str
    options: RegisterOptions = field(default_factory=RegisterOptions)
    resume: bool = False
    overwrite: bool = False
    quiet: bool = True


def run_pair(task: PairTask) -> Row:
    """Register one pair and measure it; returns its summary row and never raises for a
    failing pair (status ``failed`` and the one-line error instead)."""
    reset_peak_rss()
    start = time.perf_counter()
    out = Path(task.out)
    row = base_row(task.pair, out)
    row["run"] = "resumed" if task.resume and partial_path(out).exists() else "new"
    was_quiet = is_quiet()
    set_quiet(task.quiet)
    try:
        with torch_threads(task.options.threads):
            marks = _pair_landmarks(task.pair)
            result = register(
                task.pair.source,
                task.pair.target,
                out,
                task.options,
                resume=task.resume,
                overwrite=task.overwrite,
            )
            if marks is not None:
                row.update(landmark_metrics(result.transform, marks))
    except Exception as exc:  # one failing pair must not stop the others
        row.update(status="failed", error=error_line(exc))
    finally:
        set_quiet(was_quiet)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return row


def _pair_landmarks(pair: Pair) -> Landmarks | None:
    """The pair's landmarks (read before registering, so bad ones fail the pair at once)."""
    if not pair.has_landmarks:
        return None
    assert pair.source_landmarks is not None and pair.target_landmarks is not None
    return landmarks(pair.source_landmarks, pair.target_landmarks, pair.target)


def base_row(pair: Pair, out: Path) -> Row:
    """A row with every column, status ``ok`` and no metrics yet."""
    row: Row = dict.fromkeys(HEAD_COLUMNS)
    row.update(index=pair.index, name=pair.name, status="ok", error="")
    row.update(dict.fromkeys(METRICS))
    row.update(source=pair.source, target=pair.target, out=str(out), metadata=dict(pair.metadata))
    return row


def completed_row(pair: Pair, out: Path) -> Row:
    """The row of a pair completed by an earlier run: metrics recomputed from its folder,
    seconds and peak RSS from its ``report.json``."""
    row = base_row(pair, out)
    evaluated = evaluate_pair(pair, out)
    row.update({k: evaluated[k] for k in METRICS})
    if evaluated["status"] == "failed":
        row.update(status="failed", error=evaluated["error"])
    row["run"] = "skipped"
    try:
        report = json.loads((out / "report.json").read_text())
        row["seconds"] = report.get("timings_s", {}).get("total_s")
        row["peak_rss_mib"] = report.get("peak_rss_mib")
    except (OSError, ValueError):
        pass
    return row


def check_finished_pair(pair: Pair, folder: Path, options: RegisterOptions) -> None:
    """Raise :class:`~wsireg.errors.OutputError` unless the finished output ``folder`` was
    registered from the pair's slides with ``options`` (the run fingerprint in its
    ``report.json``, :func:`wsireg.run.register.run_fingerprint`): ``resume`` must not keep
    results of other inputs or options."""
    try:
        report = json.loads((folder / "report.json").read_text())
        staged = report["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        staged = None
    if not isinstance(staged, dict):
        raise OutputError(folder, "cannot resume: no run fingerprint in its report.json")
    device = str(resolve_device(options.device))
    expected = run_fingerprint(
        open_slide(pair.source), open_slide(pair.target), options, device, weights_identity(options)
    )
    differences = fingerprint_differences(staged, expected)
    if differences:
        raise OutputError(
            folder,
            f"finished with other inputs or options: {differences} "
            "(use --overwrite, or another output folder)",
        )


# --------------------------------------------------------------------------------------------
# Running tasks: in process or on dask.distributed
# --------------------------------------------------------------------------------------------
def run_tasks(
    tasks: Sequence[PairTask],
    execution: Execution,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run ``tasks`` (one after the other here, or on the cluster of ``execution``, each
    claiming its ``resources``); rows in the order of ``tasks``. ``on_row`` is called with
    each row as its task finishes; a task whose worker died gives a failed row."""
    if not tasks:
        return []
    if not execution.distributed:
        rows = []
        for task in tasks:
            rows.append(run_pair(task))
            if on_row:
                on_row(rows[-1])
        return rows
    ordered: list[Row | None] = [None] * len(tasks)
    with cluster_client(execution) as client:
        for position, future in map_on_cluster(
            client,
            run_pair,
            tasks,
            name=lambda task: f"wsireg-pair-{task.pair.name}",
            resources=execution.resources,
        ):
            try:
                row = future.result()
            except Exception as exc:  # the worker died (killed, out of memory, ...)
                task = tasks[position]
                row = base_row(task.pair, Path(task.out))
                row.update(status="failed", error=f"task failed on the cluster: {error_line(exc)}")
            ordered[position] = row
            if on_row:
                on_row(row)
    return [r for r in ordered if r is not None]


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------
def batch(
    pairs_csv: str | Path,
    out: str | Path,
    options: RegisterOptions | None = None,
    *,
    execution: Execution | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Register every pair of ``pairs_csv`` into ``out`` and write the summaries.

    ``options``: the registrations' (:class:`wsireg.run.settings.RegisterOptions`).
    ``execution`` (:class:`wsireg.engine.parallel.Execution`): a ``scheduler`` address or a
    LocalCluster of ``workers`` processes runs the pairs in parallel, neither here one by one;
    ``threads`` per pair (default: the CPUs shared out over the local workers, or torch's
    default); ``resources`` each pair claims, e.g. ``{"GPU": 1}``. Keyword ``overrides``
    replace fields of either (``batch(csv, out, workers=4, level=0)``). ``resume`` skips
    complete pairs and continues interrupted ones; ``overwrite`` replaces existing pair
    outputs. Returns the document written to ``summary.json``.
    """
    execution = take_overrides(execution or Execution(), overrides)
    options = take_overrides(options or RegisterOptions(), overrides)
    no_overrides_left("batch", overrides)
    out = Path(out).absolute()
    pairs = read_pairs(pairs_csv)
    check_batch_output(out, resume, overwrite)
    options = task_options(options, execution)
    start = time.perf_counter()
    rows: dict[int, Row] = {}
    tasks = []
    quiet = True if execution.distributed else is_quiet()
    for pair in pairs:
        folder = out / pair.name
        if resume and folder.is_dir():
            check_finished_pair(pair, folder, options)
            rows[pair.index] = completed_row(pair, folder)
            continue
        tasks.append(PairTask(pair, str(folder), options, resume, overwrite, quiet))
    with progress(len(pairs), "batch", unit="pair") as bar:
        bar.update(len(rows))
        failed = [r for r in rows.values() if r["status"] != "ok"]

        def on_row(row: Row) -> None:
            if row["status"] != "ok":
                failed.append(row)
            bar.set_postfix(failed=len(failed), refresh=False)
            bar.update(1)

        for row in run_tasks(tasks, execution, on_row):
            rows[row["index"]] = row
    ordered = [rows[p.index] for p in pairs]
    document = summary_document(pairs_csv, out, ordered, options, start)
    document["run"] = {**execution.to_json(), "threads": options.threads, "resume": resume}
    write_summaries(out, document)
    return document


def task_options(options: RegisterOptions, execution: Execution) -> RegisterOptions:
    """The options of each pair task: their ``threads`` are the execution's threads per task
    when it has them."""
    threads = execution.threads_per_task()
    return options if threads is None else replace(options, threads=threads)


def check_batch_output(out: Path, resume: bool, overwrite: bool) -> None:
    """A batch writes into a new or empty directory unless resuming or overwriting."""
    if resume or overwrite or not out.exists():
        return
    if not out.is_dir() or any(out.iterdir()):
        raise OutputExistsError(out)


def summary_document(
    pairs_csv: str | Path,
    out: Path,
    rows: list[Row],
    options: RegisterOptions,
    start: float,
) -> dict[str, Any]:
    """What ``summary.json`` holds: inputs, options, counts, summary over pairs, rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "pairs_csv": str(Path(pairs_csv).absolute()),
        "out": str(out.absolute()),
        "options": options.to_json(),
        "seconds": round(time.perf_counter() - start, 3),
        "counts": {"pairs": len(rows), "ok": len(ok), "failed": len(rows) - len(ok)},
        "summary": summarize(ok),
        "pairs": rows,
    }


def write_summaries(out: Path, document: dict[str, Any]) -> None:
    """``summary.json`` and ``summary.csv`` in ``out``, each staged and replaced atomically."""
    write_json(out / SUMMARY_JSON, document, overwrite=True)
    with staged_output(out / SUMMARY_CSV, overwrite=True) as stage:
        stage.write_text(summary_csv(document["pairs"]))


def summary_csv(rows: list[Row]) -> str:
    """The rows as CSV: fixed columns, metrics, paths, then the table's other columns."""
    fixed = [*HEAD_COLUMNS, *METRICS, *TAIL_COLUMNS]
    extra: list[str] = []
    for row in rows:
        for key in row.get("metadata", {}):
            name = key if key not in fixed else f"metadata:{key}"
            if name not in extra:
                extra.append(name)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*fixed, *extra])
    for row in rows:
        meta = {
            (k if k not in fixed else f"metadata:{k}"): v
            for k, v in row.get("metadata", {}).items()
        }
        values = [row.get(k) for k in fixed] + [meta.get(k, "") for k in extra]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


__all__ = ["PairTask", "batch", "run_pair", "run_tasks"]
