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
only when complete) and continues the staged output of the others (``register(resume=True)``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsireg.errors import OutputExistsError, WsiregError
from wsireg.run.evaluate import (
    METRICS,
    Pair,
    alignment_matrix,
    evaluate_pair,
    landmark_metrics,
    landmarks,
    read_pairs,
    summarize,
    write_json,
)

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

    ``options`` are :func:`wsireg.run.register.register` keyword arguments; ``threads`` caps
    torch's and the warp's threads of the task; ``quiet`` silences its progress bars.
    """

    pair: Pair
    out: str
    options: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    quiet: bool = True


def run_pair(task: PairTask) -> Row:
    """Register one pair and measure it; returns its summary row and never raises for a
    failing pair (status ``failed`` and the one-line error instead)."""
    from wsireg.io.output import partial_path
    from wsireg.progress import is_quiet, set_quiet
    from wsireg.run.register import register

    reset_peak_rss()
    start = time.perf_counter()
    out = Path(task.out)
    row = base_row(task.pair, out)
    row["run"] = "resumed" if task.resume and partial_path(out).exists() else "new"
    was_quiet = is_quiet()
    set_quiet(task.quiet)
    try:
        with torch_threads(task.threads):
            marks = _pair_landmarks(task.pair)
            result = register(
                task.pair.source,
                task.pair.target,
                out,
                resume=task.resume,
                overwrite=task.overwrite,
                threads=task.threads,
                **task.options,
            )
            if marks is not None:
                mpp, affine = result.transform.target.mpp, alignment_matrix(result.report)
                row.update(landmark_metrics(result.transform, marks, mpp, affine))
    except Exception as exc:  # one failing pair must not stop the others
        row.update(status="failed", error=error_line(exc))
    finally:
        set_quiet(was_quiet)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["peak_rss_mib"] = round(_peak_rss(), 1)
    return row


def _pair_landmarks(pair: Pair) -> Any:
    """The pair's landmarks (read before registering, so bad ones fail the pair at once)."""
    if not pair.has_landmarks:
        return None
    return landmarks(pair.source_landmarks, pair.target_landmarks, pair.target)


def base_row(pair: Pair, out: Path) -> Row:
    """A row with every column, status ``ok`` and no metrics yet."""
    row: Row = dict.fromkeys(HEAD_COLUMNS)
    row.update(index=pair.index, name=pair.name, status="ok", error="")
    row.update(dict.fromkeys(METRICS))
    row.update(source=pair.source, target=pair.target, out=str(out), metadata=dict(pair.metadata))
    return row


def error_line(exc: BaseException) -> str:
    """One line describing ``exc`` (wsireg errors already name the file)."""
    if isinstance(exc, WsiregError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "out of memory"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def completed_row(pair: Pair, out: Path) -> Row:
    """The row of a pair completed by an earlier run: metrics recomputed from its folder,
    seconds and peak RSS from its ``report.json``."""
    import json

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


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux ``clear_refs``), so it measures the next task."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def _peak_rss() -> float:
    from wsireg.engine.parallel import peak_rss_mib

    return peak_rss_mib()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch limited to ``threads`` intra-op threads (None: unchanged)."""
    if not threads:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# Running tasks: in process or on dask.distributed
# --------------------------------------------------------------------------------------------
def run_tasks(
    tasks: Sequence[PairTask],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    resources: dict[str, float] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run ``tasks`` (sequentially here, or on a cluster); rows in the order of ``tasks``.

    ``on_row`` is called with each row as its task finishes.
    """
    if not tasks:
        return []
    if scheduler is None and not workers:
        rows = []
        for task in tasks:
            rows.append(run_pair(task))
            if on_row:
                on_row(rows[-1])
        return rows
    with cluster_client(scheduler, workers, resources) as client:
        return _run_on_client(client, tasks, resources, on_row)


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None, workers: int | None, resources: dict[str, float] | None = None
) -> Iterator[Any]:
    """A dask.distributed client of the cluster at ``scheduler``, or of a LocalCluster of
    ``workers`` processes (one thread each; given ``resources`` each, so tasks claiming them
    can run)."""
    import logging

    from distributed import Client, LocalCluster

    cluster = None
    if scheduler is not None:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(
            n_workers=int(workers or 1),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            resources=resources or None,
        )
        client = Client(cluster)
    try:
        if resources:
            check_resources(client, resources, scheduler or "local cluster")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def check_resources(client: Any, resources: dict[str, float], where: str) -> None:
    """Fail early (instead of waiting forever) if no connected worker has ``resources``."""
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        return  # workers may still join
    for info in workers.values():
        have = info.get("resources") or {}
        if all(have.get(name, 0) >= amount for name, amount in resources.items()):
            return
    wanted = ",".join(f"{k}={v:g}" for k, v in resources.items())
    raise WsiregError(
        f"{where}: no worker has the resources {wanted} "
        f"(start workers with `dask worker ADDRESS --resources {wanted}`)"
    )


def _run_on_client(
    client: Any,
    tasks: Sequence[PairTask],
    resources: dict[str, float] | None,
    on_row: Callable[[Row], None] | None,
) -> list[Row]:
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            run_pair,
            task,
            key=f"wsireg-pair-{task.pair.name}-{run_id}",
            pure=False,
            resources=resources or None,
            retries=0,
        ): position
        for position, task in enumerate(tasks)
    }
    rows: list[Row | None] = [None] * len(tasks)
    for future in as_completed(futures):
        position = futures[future]
        try:
            row = future.result()
        except Exception as exc:  # the worker died (killed, out of memory, ...)
            task = tasks[position]
            row = base_row(task.pair, Path(task.out))
            row.update(status="failed", error=f"task failed on the cluster: {error_line(exc)}")
        rows[position] = row
        if on_row:
            on_row(row)
    return [r for r in rows if r is not None]


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------
def batch(
    pairs_csv: str | Path,
    out: str | Path,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    resources: dict[str, float] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **register_options: Any,
) -> dict[str, Any]:
    """Register every pair of ``pairs_csv`` into ``out`` and write the summaries.

    ``scheduler`` (address of a dask.distributed scheduler) or ``workers`` (a LocalCluster of
    that many processes) run the pairs in parallel; neither runs them here one by one.
    ``threads``: threads per pair (default: the CPUs shared out over the local workers, or
    torch's default). ``resources``: worker resources each pair claims, e.g. ``{"GPU": 1}``.
    ``resume`` skips complete pairs and continues interrupted ones; ``overwrite`` replaces
    existing pair outputs. Other keyword arguments go to :func:`wsireg.run.register.register`.
    Returns the document written to ``summary.json``.
    """
    from wsireg.progress import is_quiet, progress

    if scheduler is not None and workers:
        raise ValueError("give either a scheduler address or a number of workers, not both")
    out = Path(out).absolute()
    pairs = read_pairs(pairs_csv)
    check_batch_output(out, resume, overwrite)
    if threads is None and workers and scheduler is None:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
    start = time.perf_counter()
    rows: dict[int, Row] = {}
    tasks = []
    for pair in pairs:
        folder = out / pair.name
        if resume and folder.is_dir():
            rows[pair.index] = completed_row(pair, folder)
            continue
        quiet = True if (scheduler is not None or workers) else is_quiet()
        tasks.append(
            PairTask(pair, str(folder), dict(register_options), resume, overwrite, threads, quiet)
        )
    with progress(len(pairs), "batch", unit="pair") as bar:
        bar.update(len(rows))
        failed = [r for r in rows.values() if r["status"] != "ok"]

        def on_row(row: Row) -> None:
            if row["status"] != "ok":
                failed.append(row)
            bar.set_postfix(failed=len(failed), refresh=False)
            bar.update(1)

        for row in run_tasks(
            tasks, scheduler=scheduler, workers=workers, resources=resources, on_row=on_row
        ):
            rows[row["index"]] = row
    ordered = [rows[p.index] for p in pairs]
    document = summary_document(pairs_csv, out, ordered, register_options, start)
    document["run"] = {
        "scheduler": scheduler,
        "workers": workers,
        "threads": threads,
        "resources": resources,
        "resume": resume,
    }
    write_summaries(out, document)
    return document


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
    options: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """What ``summary.json`` holds: inputs, options, counts, summary over pairs, rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "pairs_csv": str(Path(pairs_csv).absolute()),
        "out": str(out.absolute()),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "counts": {"pairs": len(rows), "ok": len(ok), "failed": len(rows) - len(ok)},
        "summary": summarize(ok),
        "pairs": rows,
    }


def write_summaries(out: Path, document: dict[str, Any]) -> None:
    """``summary.json`` and ``summary.csv`` in ``out``, each staged and replaced atomically."""
    from wsireg.io.output import staged_output

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
