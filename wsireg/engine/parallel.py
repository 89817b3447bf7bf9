"""Where work runs: threads, dask clusters and process resources, in one place.

:class:`Execution` says where independent tasks run: here (threads), on a LocalCluster of
``workers`` processes started for the job, or on the dask.distributed cluster at ``scheduler``,
with worker ``resources`` (e.g. ``{"GPU": 1}``) each task claims. :func:`cluster_client` starts
(:func:`start_local_cluster`, announcing its dashboard) or connects to (:func:`connect`, a
one-line error within :data:`CONNECT_TIMEOUT_S` seconds) the cluster and caps the threads of
every worker (:mod:`wsireg.engine.workers`): the one copy of that set-up.
:func:`local_cluster` keeps one LocalCluster for several steps (``wsireg stack``),
:func:`map_on_cluster` submits tasks and yields them as they finish, :func:`run_threaded` runs
tasks on dask's threaded scheduler.
:func:`torch_threads` caps torch's intra-op threads for a block. :func:`peak_rss_mib`,
:func:`reset_peak_rss` and :func:`limit_malloc_arenas` measure and bound the process's memory.

torch, dask and distributed are imported inside the functions that use them: the CLI imports
this module at start-up (:func:`limit_malloc_arenas`), before any verb needs them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import resource
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from wsireg.errors import WsiregError, error_line
from wsireg.progress import announce, dask_progress

if TYPE_CHECKING:  # only for annotations: distributed is imported when a cluster is used
    from distributed import Client, Future, LocalCluster

T = TypeVar("T")

#: Seconds to wait for a dask.distributed scheduler to answer (a wrong address fails then).
CONNECT_TIMEOUT_S = 4


# --------------------------------------------------------------------------------------------
# Where tasks run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Execution:
    """Where independent tasks run.

    ``scheduler``: address of a running dask.distributed scheduler; ``workers``: start a
    LocalCluster of that many processes; neither: here, in this process. ``threads``: threads
    per task (its meaning per caller: torch threads of a registration, threads of a warp).
    ``resources``: worker resources each task claims (e.g. ``{"GPU": 1}``).
    """

    scheduler: str | None = None
    workers: int | None = None
    threads: int | None = None
    resources: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.workers:
            raise ValueError("give either a scheduler address or a number of workers, not both")
        for name in ("workers", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")

    @property
    def distributed(self) -> bool:
        """Whether tasks run on a dask.distributed cluster."""
        return self.scheduler is not None or bool(self.workers)

    def threads_per_task(self) -> int | None:
        """``threads``, else on a LocalCluster the CPUs shared out over its workers."""
        if self.threads is None and self.workers and self.scheduler is None:
            return max(1, (os.cpu_count() or 1) // int(self.workers))
        return self.threads

    def to_json(self) -> dict[str, object]:
        return {
            "scheduler": self.scheduler,
            "workers": self.workers,
            "threads": self.threads,
            "resources": dict(self.resources) if self.resources else None,
        }


@contextlib.contextmanager
def cluster_client(execution: Execution, threads_per_worker: int = 1) -> Iterator[Client]:
    """A dask.distributed client of the cluster at ``execution.scheduler``
    (:func:`connect`), or of a LocalCluster of ``execution.workers`` processes of
    ``threads_per_worker`` threads (:func:`start_local_cluster`, each given
    ``execution.resources``, so tasks claiming them can run), closed after the block.

    Every worker, local or remote, caps its thread pools at its share of its machine's CPUs
    (:mod:`wsireg.engine.workers`). Fails early when no connected worker has the resources.
    """
    from wsireg.engine.workers import cap_worker_threads

    resources = dict(execution.resources or {})
    cluster = None
    if execution.scheduler is not None:
        client = connect(execution.scheduler)
    else:
        cluster, client = start_local_cluster(
            int(execution.workers or 1), threads_per_worker, resources
        )
    try:
        cap_worker_threads(client)
        if resources:
            check_resources(client, resources, execution.scheduler or "local cluster")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def connect(address: str) -> Client:
    """A client of the dask.distributed scheduler at ``address``; a one-line
    :class:`~wsireg.errors.WsiregError` naming it when it does not answer within
    :data:`CONNECT_TIMEOUT_S` seconds (or is no address)."""
    import dask
    from distributed import Client

    default = dask.config.get("scheduler", None)
    try:
        try:
            return Client(address, timeout=CONNECT_TIMEOUT_S)
        except BaseException:
            # a Client that failed to connect may already have made itself dask's default
            dask.config.set(scheduler=default)
            raise
    except OSError as exc:  # refused, unknown host, timed out
        raise WsiregError(
            f"{address}: cannot connect to the dask scheduler ({error_line(exc)})"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise WsiregError(f"{address}: not a dask scheduler address ({exc})") from exc


def start_local_cluster(
    workers: int, threads_per_worker: int, resources: Mapping[str, float] | None = None
) -> tuple[LocalCluster, Client]:
    """A LocalCluster of ``workers`` processes of ``threads_per_worker`` threads (each
    offering ``resources``) and its client; its dashboard (on a free port) is announced on
    stderr (:func:`wsireg.progress.announce`, silent when quiet)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
        resources=dict(resources) if resources else None,
    )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    plural = "" if workers == 1 else "s"
    announce("local cluster", f"{workers} worker{plural}, dashboard {dashboard_note(cluster)}")
    return cluster, client


def dashboard_note(cluster: LocalCluster) -> str:
    """Where the dashboard of ``cluster`` is, and what it needs when bokeh is missing."""
    link = cluster.dashboard_link or "not started"
    if importlib.util.find_spec("bokeh") is None:
        return f"{link} (install bokeh to see it)"
    return link


@contextlib.contextmanager
def local_cluster(execution: Execution) -> Iterator[Execution]:
    """``execution`` itself, or, when it asks for a LocalCluster, one started for the whole
    block and the execution pointing at its scheduler (so several steps share it)."""
    if not execution.workers or execution.scheduler is not None:
        yield execution
        return
    with cluster_client(execution) as client:
        yield replace(execution, scheduler=client.scheduler.address, workers=None)


def check_resources(client: Client, resources: Mapping[str, float], where: str) -> None:
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


def map_on_cluster(
    client: Client,
    function: Callable[[T], object],
    items: Sequence[T],
    *,
    name: Callable[[T], str],
    resources: Mapping[str, float] | None = None,
) -> Iterator[tuple[int, Future]]:
    """Submit ``function(item)`` for every item (task keys ``name(item)`` plus a run id, no
    retries, claiming ``resources``); yield ``(position in items, future)`` as each finishes.
    ``future.result()`` raises what the task raised, or why its worker died."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            function,
            item,
            key=f"{name(item)}-{run_id}",
            pure=False,
            resources=dict(resources) if resources else None,
            retries=0,
        ): position
        for position, item in enumerate(items)
    }
    for future in as_completed(futures):
        yield futures[future], future


def run_threaded(
    function: Callable[[T], object], items: Sequence[T], threads: int | None, label: str
) -> None:
    """``function(item)`` for every item on dask's threaded scheduler, ``threads`` threads
    (default: the CPU count, at least 2), with a progress bar named ``label``."""
    import dask

    tasks = [dask.delayed(function, pure=False)(item) for item in items]
    with dask_progress(label):
        dask.compute(*tasks, scheduler="threads", num_workers=threads or default_threads())


def default_threads() -> int:
    """Threads of a local threaded run: the CPU count, at least 2."""
    return max(2, os.cpu_count() or 2)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch limited to ``threads`` intra-op threads (None or 0: unchanged),
    restoring the setting after."""
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
# Process memory
# --------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` would also count the parent's
    memory at fork time, which a freshly exec'ed child inherits). Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux ``clear_refs``), so it measures the next task."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


_arenas_limited = False


def limit_malloc_arenas(arenas: int | None = None) -> None:
    """Cap glibc's malloc arenas at ``arenas`` (default: CPU count, at least 2), once per process.

    The codec and dask threads churn through megabyte buffers; with glibc's default of 8 arenas
    per core the freed memory stays spread over many arenas and peak RSS creeps up with the
    image size (``benchmarks/convert_memory.py --malloc-arena-max`` measures it). Only
    effective before the process created its extra arenas (zarr's and dask's threads do): the
    CLI calls it first thing, scripts may too. No-op off glibc or when ``MALLOC_ARENA_MAX`` is set.
    """
    global _arenas_limited
    if _arenas_limited or not sys.platform.startswith("linux"):
        return
    _arenas_limited = True
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_arena_max = -8
        libc.mallopt(m_arena_max, int(arenas or max(2, os.cpu_count() or 2)))
    except (OSError, AttributeError):
        pass
