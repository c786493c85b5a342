"""Device mesh and sharding rules.

jaxvision uses one mesh axis, "data", over all devices of all processes. Batches are split along it
(data parallel). Parameters and optimizer state are replicated by default; with `fsdp=True` every
leaf of at least `min_size` elements is split along its largest axis that the device count divides
(ZeRO-3 / FSDP style: each device holds 1/N of the state, XLA inserts the all-gathers). The train
step is written once for the global batch; `jax.jit` with these shardings makes it parallel, so
BatchNorm statistics are global batch statistics without any `pmean` in the model.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int = 2**14) -> P:
    """Splits the largest axis that `num_devices` divides; small leaves stay replicated.

    Small leaves (biases, BN scales) are not worth the all-gather latency, hence `min_size`.
    """
    if num_devices == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % num_devices == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Shardings for a pytree of `jax.ShapeDtypeStruct` (from `jax.eval_shape(init)`)."""
    n = mesh.devices.size

    def rule(leaf):
        if not fsdp or not hasattr(leaf, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), n))

    return jax.tree.map(rule, abstract_state)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's slice of a batch into global arrays sharded along "data".

    local: each value `[B / process_count, ...]`; returns `[B, ...]` global arrays. On one process
    this is a sharded `device_put`; on several, each contributes its own rows.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a host array that every process holds in full (e.g. a whole data set) on `sharding`.

    `make_array_from_callback` works for any sharding and any number of processes.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
