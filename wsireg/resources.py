"""Process resources for reports and benchmarks."""

from __future__ import annotations

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
