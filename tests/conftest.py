"""Shared fixtures: the real data beside the repository and small synthetic files."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (the real slides and ANHIR pairs)."""
    assert SHARED.is_dir(), f"expected the shared data at {SHARED} (see README)"
    return SHARED


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture()
def run_cli():
    """Run the ``wsireg`` CLI in-process; returns the click Result."""
    from click.testing import CliRunner

    from wsireg_cli.main import cli

    def run(*args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture()
def one_torch_thread():
    """Tiny networks run ~10x faster on one thread when the CPU is shared (no spin-waiting)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def progress_reports_on():
    """Every test starts as a fresh process does, progress reports on: an in-process
    ``wsireg -q`` (:func:`run_cli`) sets the process-wide switch."""
    from wsireg.progress import set_quiet

    set_quiet(False)
    yield
    set_quiet(False)


@pytest.fixture(autouse=True)
def no_dask_client_left_behind():
    """A test leaves dask's default scheduler as it found it: a dask.distributed client it
    started is closed (else every later ``.compute()`` of the process goes to a dead client)."""
    import dask

    before = dask.config.get("scheduler", None)
    yield
    after = dask.config.get("scheduler", None)
    if after != before:
        dask.config.refresh()  # drop what leaked (the defaults are re-read), for later tests
        dask.config.set(scheduler=before)
        pytest.fail(f"dask's default scheduler left as {after!r} (was {before!r})")
