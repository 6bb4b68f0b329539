"""Test session set-up: CPU only, eight simulated devices for the shard_map path.

The environment variables must be set before JAX is imported anywhere, so this
file imports nothing from scgcm at module level.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
