"""One process of tests/test_multihost.py: a tiny CNN trained data-parallel through `loop.run`.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
    JAXVISION_COORDINATOR=127.0.0.1:PORT JAXVISION_NUM_PROCESSES=2 JAXVISION_PROCESS_ID=i \\
    python tests/multihost_job.py WORKDIR STEPS

Without the JAXVISION_* variables it is a single process (give it the whole device count).
Every process reads only its rows of each global batch (HostLoader), and records which examples
it read in WORKDIR/reads_p{i}.json; at the end it writes the final state, gathered whole, to
WORKDIR/final_p{i}.npz. The state is sharded FSDP-style over all devices of all processes, so each
process writes its own shards of every checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import time

T0 = time.time()

from jaxvision import distributed  # noqa: E402

distributed.initialize_from_env()  # before anything else touches jax

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxvision import loop, losses, optim, train  # noqa: E402
from jaxvision.nets.convnet import ConvNet  # noqa: E402
from jaxvision.pipelines import sources  # noqa: E402
from jaxvision.pipelines.loader import HostLoader  # noqa: E402
from jaxvision.sharding import make_mesh  # noqa: E402
from tiny_task import preprocess  # noqa: E402

BATCH = 16  # global batch
SLOW_READ_S = float(os.environ.get("MULTIHOST_JOB_SLOW_READ_S", "0"))
CKPT_EVERY = 5


def data_source(n: int = 64) -> sources.ArraySource:
    """A learnable synthetic set: the class sets the mean brightness. uint8 (n, 8, 8, 3)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    images = np.clip(rng.normal(60 * labels[:, None, None, None], 20, (n, 8, 8, 3)), 0, 255)
    return sources.ArraySource(images.astype(np.uint8), labels, num_classes=4, name="synthetic")


class RecordingSource:
    """Wraps a source and records every index this process reads, in order."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []
        self.name, self.num_classes = inner.name, inner.num_classes
        self.image_shape, self.class_names = inner.image_shape, inner.class_names

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if SLOW_READ_S:  # lets a test send a signal mid-run
            time.sleep(SLOW_READ_S)
        self.reads.append(int(i))
        return self.inner[i]


def main(workdir: str, steps: int) -> None:
    t_init = time.time() - T0
    mesh = make_mesh()  # all devices of all processes
    source = RecordingSource(data_source())
    loader = HostLoader(source, batch_size=BATCH, mesh=mesh, seed=3)
    # conv_1_0's kernel (3, 3, 16, 128) is over FSDP's size threshold: split over the 4 devices.
    model = ConvNet(widths=(16, 128), num_classes=4)
    schedule = optim.make_schedule(kind="constant", lr=0.05, steps=steps)
    tx = optim.make_optimizer(name="momentum", learning_rate=schedule, weight_decay=1e-4)

    step = train.make_classifier_step(model=model, tx=tx, schedule=schedule,
                                      preprocess=preprocess,
                                      loss_fn=losses.softmax_cross_entropy)
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=(8, 8, 3),
                                     mesh=mesh, fsdp=True)
    t_state = time.time() - T0 - t_init
    t_run = time.time()
    try:
        state, summary = loop.run(state=state, train_step=step, loader=loader, steps=steps,
                                  workdir=workdir, ckpt_every=CKPT_EVERY, log_every=1,
                                  progress=False)
    except loop.Preempted as e:
        print(f"process {jax.process_index()}: preempted, saved step {e.step}", flush=True)
        raise
    t_run = time.time() - t_run
    p = jax.process_index()
    kernel = state["params"]["conv_1_0"]["kernel"]
    print(f"process {p} of {jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices; conv_1_0 kernel {kernel.shape}, local shards "
          f"{[s.data.shape for s in kernel.addressable_shards]}; read {len(source.reads)} "
          f"examples; final loss {summary['train']['loss']:.6f}; {t_init:.1f} s to start, "
          f"{t_state:.1f} s to create the state, {t_run:.1f} s in loop.run", flush=True)
    whole = multihost_utils.process_allgather(state, tiled=True)  # every process: the full state
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from golden.make_golden import flat

    np.savez(os.path.join(workdir, f"final_p{p}.npz"), **flat(whole))
    with open(os.path.join(workdir, f"reads_p{p}.json"), "w") as f:
        json.dump(source.reads, f)
    print(f"process {p}: done at {time.time() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
