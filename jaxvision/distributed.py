"""Several processes (hosts): join the run before anything else touches jax.

Every experiment's `__main__` calls `initialize_from_env()`; on one host it does nothing. Launch
the same command on every host with:

- TPU VM pod slices, SLURM, Open MPI: `JAXVISION_DISTRIBUTED=auto` (jax finds the coordinator).
- Anything else (e.g. several GPU hosts): `JAXVISION_COORDINATOR=HOST:PORT` (process 0's address),
  `JAXVISION_NUM_PROCESSES=N` and `JAXVISION_PROCESS_ID=i` (0..N-1) on each host.

After that `jax.devices()` lists every process's devices, the mesh spans them all, each process
reads only its rows of every batch, only process 0 logs, and every process writes its own shards
of each checkpoint (orbax coordinates the commit).
"""
from __future__ import annotations

import os

import jax


def initialize_from_env() -> bool:
    """Calls `jax.distributed.initialize` when the environment asks for it; returns whether."""
    coordinator = os.environ.get("JAXVISION_COORDINATOR")
    if os.environ.get("JAXVISION_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    if not coordinator:
        return False
    missing = [k for k in ("JAXVISION_NUM_PROCESSES", "JAXVISION_PROCESS_ID") if k not in os.environ]
    if missing:
        raise ValueError(f"JAXVISION_COORDINATOR is set but {' and '.join(missing)} is not")
    # Cross-process collectives on CPU hosts go through gloo (the default in recent jax; set so
    # that other versions agree). GPUs and TPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAXVISION_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAXVISION_PROCESS_ID"]))
    return True
