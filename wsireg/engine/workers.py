"""What every dask worker of a wsireg cluster sets up first: thread caps.

A worker runs ``nthreads`` tasks at a time, and each task's torch, OpenMP/MKL/OpenBLAS and
OpenCV code would otherwise start its own pool of threads: dask's nanny sets
``OMP_NUM_THREADS=1`` (torch then runs on one thread, however many cores the machine has),
a plain worker leaves every core to every task (oversubscribed when several workers share a
machine). The rule, the same as the local path's (:meth:`Execution.threads_per_task`): each
task thread of a worker gets an equal share of its machine's CPUs, ``CPUs // (sum of nthreads
of the workers on that host)``, at least 1. A task may still ask for its own number
(:func:`wsireg.engine.parallel.torch_threads`).

:class:`ThreadCaps` applies the rule as a dask ``WorkerPlugin``: on every worker connected when
it is registered and on every worker joining later (a late joiner counts the workers its host
had at registration). :func:`cap_worker_threads` registers it on a client. The caps are the
environment variables of :data:`THREAD_VARIABLES` (for libraries loaded later, torch
included) and, where already loaded, torch's and OpenCV's thread counts; a worker living in
this process (``LocalCluster(processes=False)``) gives the settings back when it closes.
This module imports distributed at the top: :mod:`wsireg.engine.parallel` imports it only when
it connects to a cluster.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from distributed import Client, Worker
from distributed.comm import get_address_host
from distributed.diagnostics.plugin import WorkerPlugin

#: Environment variables that size the thread pools of OpenMP, MKL and OpenBLAS (and torch's).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_share(cpus: int, host_threads: int) -> int:
    """Threads of one task: ``cpus`` shared out over the ``host_threads`` task threads of the
    workers on the machine, at least 1."""
    return max(1, cpus // max(1, host_threads))


def host_of(address: str) -> str:
    """The host part of a worker's address (the address itself when it has none)."""
    try:
        return str(get_address_host(address))
    except ValueError:
        return address


def host_threads(nthreads: Mapping[str, int]) -> dict[str, int]:
    """Task threads per host (``host -> sum of nthreads``) of the workers ``nthreads``
    (``client.nthreads()``: address -> nthreads)."""
    totals: dict[str, int] = {}
    for address, count in nthreads.items():
        host = host_of(address)
        totals[host] = totals.get(host, 0) + int(count or 1)
    return totals


# --------------------------------------------------------------------------------------------
# The settings of this process
# --------------------------------------------------------------------------------------------
_lock = threading.Lock()
_active = 0
_saved: dict[str, Any] = {}


def apply_thread_caps(threads: int) -> None:
    """Cap this process's thread pools at ``threads``: :data:`THREAD_VARIABLES`, and torch's
    and OpenCV's counts where they are loaded. Reference-counted with
    :func:`release_thread_caps`: the settings before the first cap come back after the last
    release."""
    global _active
    with _lock:
        if _active == 0:
            _saved.clear()
            _saved.update(_current_settings())
        _active += 1
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)
        cv2 = sys.modules.get("cv2")
        if cv2 is not None:
            cv2.setNumThreads(threads)


def release_thread_caps() -> None:
    """Undo one :func:`apply_thread_caps`; the last one restores the earlier settings."""
    global _active
    with _lock:
        if _active == 0:
            return
        _active -= 1
        if _active == 0:
            _restore_settings(_saved)


def _current_settings() -> dict[str, Any]:
    settings: dict[str, Any] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    if torch is not None:
        settings["torch"] = torch.get_num_threads()
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        settings["cv2"] = cv2.getNumThreads()
    return settings


def _restore_settings(settings: Mapping[str, Any]) -> None:
    for name in THREAD_VARIABLES:
        value = settings.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    torch = sys.modules.get("torch")
    if torch is not None:
        # torch imported while capped: back to what the restored environment gives
        torch.set_num_threads(int(settings.get("torch") or _env_threads() or available_cpus()))
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and "cv2" in settings:
        cv2.setNumThreads(int(settings["cv2"]))


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


# --------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------
class ThreadCaps(WorkerPlugin):
    """Caps a worker's thread pools at its share of its machine's CPUs (module docstring).

    ``nthreads``: the workers connected at registration (address -> nthreads); a worker not
    among them (joined later) adds its own threads to its host's count.
    """

    name = "wsireg-thread-caps"

    def __init__(self, nthreads: Mapping[str, int]) -> None:
        self.known = frozenset(nthreads)
        self.host_threads = host_threads(nthreads)
        self.threads: dict[str, int] = {}  # worker address -> its cap, while applied

    def setup(self, worker: Worker) -> None:
        on_host = self.host_threads.get(host_of(worker.address), 0)
        if worker.address not in self.known:
            on_host += worker.state.nthreads
        threads = cpu_share(available_cpus(), on_host)
        apply_thread_caps(threads)
        self.threads[worker.address] = threads

    def teardown(self, worker: Worker) -> None:
        if self.threads.pop(worker.address, None) is not None:
            release_thread_caps()


def cap_worker_threads(client: Client) -> dict[str, int]:
    """Register :class:`ThreadCaps` on the cluster of ``client`` (replacing an earlier one):
    every connected worker and every later one caps its threads. Returns the threads of each
    connected worker (address -> threads)."""
    client.register_plugin(ThreadCaps(client.nthreads()))
    return client.run(_worker_threads)


def _worker_threads(dask_worker: Worker) -> int:
    plugin = dask_worker.plugins.get(ThreadCaps.name)
    return plugin.threads.get(dask_worker.address, 0) if isinstance(plugin, ThreadCaps) else 0
