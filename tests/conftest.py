"""Test session set-up: CPU only, eight simulated devices for the shard_map path, and a persistent
compilation cache shared with the training subprocesses the CLI tests start.

The environment variables must be set before JAX is imported anywhere, so this file imports
nothing from scgcm at module level.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_cpu_enable_xprof_traceme=true"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="scgcm-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """An uninterrupted 8-update tiny run through the CLI: checkpoints at 4 and 8, grids, metrics, samples."""
    from cli import run_train

    workdir = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
