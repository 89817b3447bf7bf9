"""Where work runs: thread caps on every dask worker (local or remote), the local cluster's
dashboard announced, an unreachable scheduler a one-line error within seconds."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from wsireg.engine.parallel import CONNECT_TIMEOUT_S, Execution, cluster_client
from wsireg.engine.workers import (
    THREAD_VARIABLES,
    available_cpus,
    cap_worker_threads,
    cpu_share,
    host_threads,
)
from wsireg.errors import WsiregError
from wsireg.progress import LOG_LINE, announce, is_quiet, set_quiet

UNREACHABLE = "tcp://127.0.0.1:1"


def thread_settings() -> tuple[int, str | None, int]:
    """What a task sees: torch's threads, ``OMP_NUM_THREADS`` and the CPUs it may use."""
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), available_cpus()


def test_cpu_share_divides_a_machine_over_the_task_threads_on_it() -> None:
    assert cpu_share(16, 4) == 4 and cpu_share(16, 3) == 5 and cpu_share(2, 8) == 1
    counts = host_threads({"tcp://10.0.0.1:1": 1, "tcp://10.0.0.1:2": 2, "tcp://10.0.0.2:1": 1})
    assert counts == {"10.0.0.1": 3, "10.0.0.2": 1}


def test_local_cluster_caps_worker_threads_and_announces_its_dashboard(capfd) -> None:
    with cluster_client(Execution(workers=1)) as client:
        threads, omp, cpus = client.submit(thread_settings, pure=False).result()
    # one worker of one thread: the machine's CPUs (dask's nanny alone would leave 1)
    assert threads == cpu_share(cpus, 1) and omp == str(threads)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    announced = [line for line in lines if "local cluster: started" in line]
    assert len(announced) == 1, lines
    assert LOG_LINE.match(announced[0]) and "dashboard http://" in announced[0], announced


def test_remote_workers_cap_their_threads_and_give_them_back() -> None:
    from distributed import LocalCluster

    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        with cluster_client(Execution(scheduler=cluster.scheduler_address)) as client:
            expected = cpu_share(available_cpus(), 2)  # two workers of one thread, one host
            assert set(client.run(thread_settings).values()) == {
                (expected, str(expected), available_cpus())
            }
            # a task runs on a worker thread: torch there starts from the cap
            assert client.submit(thread_settings, pure=False).result()[0] == expected
            # registering again (another wsireg client) replaces the caps, same numbers
            assert set(cap_worker_threads(client).values()) == {expected}
    # workers in this process give the settings back when they close
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before


def test_unreachable_scheduler_is_one_line_within_seconds(capfd) -> None:
    start = time.perf_counter()
    with pytest.raises(WsiregError) as error, cluster_client(Execution(scheduler=UNREACHABLE)):
        pass
    assert time.perf_counter() - start < CONNECT_TIMEOUT_S + 3
    message = str(error.value)
    assert UNREACHABLE in message and "\n" not in message and "scheduler" in message
    assert capfd.readouterr().err.strip() == ""  # no logged traceback beside the error
    with pytest.raises(WsiregError, match="not a dask scheduler address"):
        with cluster_client(Execution(scheduler="no-port")):
            pass


def test_unreachable_scheduler_through_the_cli(tmp_path: Path, run_cli) -> None:
    table = tmp_path / "pairs.csv"
    table.write_text("Source image,Target image\na.png,b.png\n")
    result = run_cli("batch", table, "-o", tmp_path / "out", "--scheduler", UNREACHABLE)
    assert result.exit_code == 1
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)
    ]
    assert len(lines) == 1 and UNREACHABLE in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_announce_is_one_log_line_and_silent_when_quiet(capsys) -> None:
    was_quiet = is_quiet()
    try:
        set_quiet(False)
        announce("local cluster", "2 workers, dashboard http://host:1/status")
        set_quiet(True)
        announce("local cluster", "never shown")
    finally:
        set_quiet(was_quiet)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and LOG_LINE.match(lines[0]) and "http://host:1/status" in lines[0]
