"""Test session set-up: CPU only, eight simulated devices for the shard_map path, and a persistent
compilation cache shared with the training subprocesses the CLI tests start.

The environment variables must be set before JAX is imported anywhere, so this file imports
nothing from scgcm at module level.
"""

import os
import shutil
import tempfile
from pathlib import Path

from cli import FAST_XLA  # tests/cli.py imports no JAX at module level

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count=8 --xla_cpu_enable_xprof_traceme=true {FAST_XLA}"
).strip()
# One cache for the whole run: pytest-xdist's workers inherit the controller's environment, so they
# and every training subprocess share it (a program compiled by one is read by the others).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="scgcm-jax-cache-"))
# Only programs that took 0.2 s or more to compile: the steps, samplers and evaluators the subprocesses
# reuse. Not the thousands of one-op programs of eager code (10-50 ms each), whose locked cache writes
# cost more than they save (~25% of an eager-heavy test's time, measured).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size limit turns on JAX's file lock around cache reads and writes (needed with several writers).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))


import pytest  # noqa: E402


def shared_once(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` run once per test run, even across pytest-xdist workers: the first worker to get
    the lock makes `folder` (tests only read it, or copy it), the others wait and reuse it."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # one process: the session's own temporary folder
        folder = tmp_path_factory.mktemp(name) / name
        make(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / f"shared-{run_id}"  # common to this run's workers
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """An uninterrupted 8-update tiny run through the CLI: checkpoints at 4 and 8, grids, metrics, samples."""
    from cli import run_train

    def make(workdir: Path) -> None:
        result = run_train(workdir, "--config.sample.sampling-step", "4")  # the one tiny run with grids
        assert result.returncode == 0, result.stderr[-3000:]

    return shared_once(tmp_path_factory, "smoke", make)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's default): one worker per core, at most 4 (each worker compiles its own
    programs in memory; more would mostly repeat that work). `-n 0` runs in one process."""
    return max(1, min(os.cpu_count() or 1, 4))


HEAVY_FIRST = ("test_learning.py", "test_multihost.py", "test_robustness.py", "test_parallel.py")
"""The longest files (2-5 CPU-minutes each), handed to the xdist workers first (pyproject: --dist loadfile
--no-loadscope-reorder), so that the many short files fill in behind them. In pytest's own order the
learning test came last and ran alone for its last two minutes (measured 2026-12-04)."""


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest as collected
