"""Process resources for reports and benchmarks."""

from __future__ import annotations

import ctypes
import os
import resource
import sys


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


_arenas_limited = False


def limit_malloc_arenas(arenas: int | None = None) -> None:
    """Cap glibc's malloc arenas at ``arenas`` (default: CPU count, at least 2), once per process.

    The codec and dask threads churn through megabyte buffers; with glibc's default of 8 arenas
    per core the freed memory stays spread over many arenas and peak RSS creeps up with the
    image size (measured: 222 MiB at 8k^2 -> 304 MiB at 24k^2; capped: 199 -> 213 MiB). Only
    effective before the process created its extra arenas (zarr's and dask's threads do): the
    CLI calls it first thing, scripts may too. No-op off glibc or when ``MALLOC_ARENA_MAX`` is
    set.
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
