"""Joining a multi-process run: when to call `jax.distributed.initialize`, with what, and one-line errors.

JAX is multi-controller: the same program runs in every process (one per host, or one per GPU), each
process drives its own devices, and `jax.distributed.initialize` joins them into one set of global
devices through a coordinator (process 0's address). Settings come from, in this order:

- the CLI: `--config.coordinator HOST:PORT --config.num-processes N --config.process-id I`;
- the environment: `JAX_COORDINATOR_ADDRESS` (read by JAX itself), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (read here: JAX does not read these two);
- JAX's cluster auto-detection for what is still unset: SLURM (`srun`: SLURM_NTASKS, SLURM_PROCID,
  SLURM_STEP_NODELIST; one process per task, and on GPUs one GPU per task), Open MPI (`mpirun`), Cloud
  TPU (the worker list from the VM's metadata or TPU_WORKER_HOSTNAMES).

`mode` "auto" initializes when any of those says there is more than one process (a SLURM step or MPI
job of several tasks, a TPU worker list of several hosts); "on" always does (a TPU pod slice whose
workers are found through the metadata server, which no environment variable announces); "off" never.

Time limits: a process waits `init_timeout` seconds for all others to join, then stops: a process other
than 0 with a one-line error if process 0's port never answers, otherwise with JAX's fatal
`DEADLINE_EXCEEDED ... RegisterTask` (after the line printed on joining, which says what is awaited);
after the start, a process whose heartbeats stop for `heartbeat_timeout` seconds (killed, host down,
network cut) is declared dead by the coordinator, and every other process is stopped by JAX.
"""

import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scgcm.errors import UserError, run_cli

Mode = Literal["auto", "on", "off"]


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def _cluster_size(env: Mapping[str, str]) -> int:
    """The number of processes a scheduler's environment announces (1 if none)."""
    sizes = [1]
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")):
        sizes.append(_int_env(env, "SLURM_NTASKS") or 1)  # inside an srun step
    if "OMPI_COMM_WORLD_SIZE" in env:
        sizes.append(_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1)
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    sizes.append(len([w for w in workers.split(",") if w.strip()]) * (_int_env(env, "MEGASCALE_NUM_SLICES") or 1))
    return max(sizes)


def distributed_args(mode: Mode, coordinator: str | None, num_processes: int | None, process_id: int | None,
                     env: Mapping[str, str] = os.environ) -> dict | None:
    """The arguments for `jax.distributed.initialize` (None values are left to JAX's auto-detection),
    or None for a single-process run."""
    if mode == "off":
        return None
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
    given = coordinator is not None or num_processes is not None or process_id is not None
    if mode == "auto" and not given and _cluster_size(env) <= 1:
        return None
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--config.num-processes must be positive (got {num_processes})")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--config.process-id {process_id} must be in [0, {num_processes}) "
                        f"(--config.num-processes {num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(mode: Mode = "auto", coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout: int = 300, heartbeat_timeout: int = 100,
               env: Mapping[str, str] = os.environ) -> bool:
    """Join the run's other processes if there are any (see the module docstring); True if joined.
    A process that cannot join within `init_timeout` seconds stops with a one-line UserError."""
    args = distributed_args(mode, coordinator, num_processes, process_id, env)
    if args is None:
        return False
    who = (f"process {args['process_id'] if args['process_id'] is not None else '?'} of {args['num_processes'] or '?'}, "
           f"coordinator {args['coordinator_address'] or '(found by JAX)'}")
    # JAX ends a process that cannot join with a fatal log line (no Python exception): say first what is awaited
    print(f"joining a multi-process run ({who}); waiting up to {init_timeout} s for every process "
          "(--config.distributed-timeout)", file=sys.stderr, flush=True)
    if args["coordinator_address"] and args["process_id"]:
        _wait_for_coordinator(args["coordinator_address"], init_timeout, who)
    try:
        jax.distributed.initialize(**args, initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"could not join the multi-process run ({who}): {type(e).__name__}: {first}") from None
    _open_collectives()
    return True


def _wait_for_coordinator(address: str, timeout: int, who: str) -> None:
    """Until `timeout`, try to reach process 0's coordinator port; a one-line UserError if it never answers."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise UserError(f"could not join the multi-process run ({who}): nothing answered at {address} within "
                                f"--config.distributed-timeout {timeout} s ({type(e).__name__}: {e}); is process 0 "
                                "started, with this address, and is the port reachable from here?") from None
            time.sleep(1)


def _open_collectives() -> None:
    """One collective over all devices and one over a device per process, right after joining, while the
    processes are in step. On CPU (gloo), the first collective over a set of devices opens its connections
    and gives up if a peer is not there within 30 s; later collectives over the same set wait for as long
    as it takes. Without this, one process compiling the train step (or loading it from the cache) faster
    than another makes the run fail. On GPUs and TPUs it costs two tiny programs."""

    devices = sorted(jax.devices(), key=lambda d: d.process_index)  # the order of parallel.make_mesh
    mesh = Mesh(np.asarray(devices), ("all",))
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), np.ones(jax.local_device_count(), np.int32))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(ones)
    assert int(total) == jax.device_count() and len(multihost_utils.process_allgather(np.int32(0))) == jax.process_count()


def joined() -> bool:
    """Whether this process is part of a multi-process run."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (each process must call this at the same point); the value
    itself in a single-process run. Used so that all processes act on a signal at the same step."""
    if jax.process_count() == 1:
        return value

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def layout() -> tuple[int, int]:
    """(processes, devices per process) of this run."""
    return jax.process_count(), jax.local_device_count()


def describe_layout(processes: int, devices_per_process: int) -> str:
    return (f"{processes} process{'es' if processes != 1 else ''} × {devices_per_process} "
            f"device{'s' if devices_per_process != 1 else ''}")


def run_cli_or_leave(main, argv: list[str] | None = None, normal: tuple[int, ...] = (0,)) -> int:
    """`errors.run_cli(main, argv)` (one-line errors, exit code 2); in a multi-process run a process that
    fails (an exception, or an exit code not in `normal`) prints why and leaves at once (`exit_now`)."""
    try:
        code = run_cli(main, argv)
    except BaseException:
        if not joined():
            raise
        traceback.print_exc()
        code = 1
    if code not in normal and joined():
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Leave a multi-process run at once with `code`, after flushing stdout and stderr: without the
    distributed shutdown barrier, where a failed process would otherwise wait for the others (up to
    JAX's shutdown timeout, 5 minutes) while they wait for it in a collective. The others then stop
    within the heartbeat timeout (or at once, when process 0, which hosts the coordinator, is gone)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
