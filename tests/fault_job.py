"""A tiny training job that tests/test_faults.py runs as a subprocess, to kill, signal, starve and
relaunch it: a small CNN (BatchNorm, dropout, random flips) trained through `loop.run` with a
fixed seed, a cosine schedule and momentum, saving a checkpoint every 5 steps (asynchronously).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu PYTHONPATH=. \\
        python tests/fault_job.py WORKDIR [--steps 40] [--ckpt-every 5] [--log-every 5]

Rerunning the same command resumes from WORKDIR's latest intact checkpoint. It prints
"step K" (flushed) each time the loop asks for batch K, that is once K updates are dispatched and
step K's periodic actions (log, save) are done, so a parent knows where the job is. At the end it
writes WORKDIR/final_state.npz: every leaf of the final state, keyed by its path.

Fault hooks, from environment variables (none is set in a normal run):
  FAULT_PAUSE_AT=K        after "step K", wait until the checkpoint of the last multiple of
                          ckpt_every <= K is on disk (not with FAULT_SLOW_SAVE), print
                          "paused at step K" and wait for a signal: SIGUSR1 continues, SIGTERM
                          goes on to the loop's handler (preemption), SIGKILL kills.
  FAULT_SLOW_SAVE=N       the background write of step N stalls for 10 minutes (in its JSON
                          item, after printing "slow save N in flight"): a save being written.
  FAULT_KILL_IN_COMMIT=N  SIGKILL this process from orbax's commit of step N, right before it
                          renames N.orbax-checkpoint-tmp to N (everything written, not final).
  FAULT_IGNORE_SIGXFSZ=1  ignore SIGXFSZ: writes beyond RLIMIT_FSIZE then fail with EFBIG, as on
                          a full disk, instead of killing the process.
  FAULT_NO_DAC_OVERRIDE=1 run without the capability that lets root write through permission
                          bits (so a directory made 0555 is read-only even to a root job).
The hooks patch orbax internals (`JsonCheckpointHandler._save_fn`, `async_path.rename`) and fail
loudly if those move.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import signal
import sys
import threading
import time


def _drop_dac_override_and_reexec() -> None:
    """FAULT_NO_DAC_OVERRIDE=1: a root job writes through any permission bits; drop
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set and exec again, so this job
    runs as a root without them and a 0555 directory is read-only to it. Done here, before any
    thread exists (a preexec_fn would run after a fork of the multithreaded test process)."""
    if not os.environ.pop("FAULT_NO_DAC_OVERRIDE", None) or os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    _drop_dac_override_and_reexec()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxvision import loop, losses, optim, train  # noqa: E402
from jaxvision.nets.convnet import ConvNet  # noqa: E402
from jaxvision.pipelines.loader import DeviceLoader  # noqa: E402
from jaxvision import sharding as shd  # noqa: E402
from jaxvision.sharding import make_mesh  # noqa: E402
from tiny_task import preprocess, tiny_source  # noqa: E402

SEED = 0
MODEL = ConvNet(widths=(8, 16), num_classes=4, dense_width=16, dropout=0.25)


def _optimizer(steps: int):
    schedule = optim.make_schedule(kind="cosine", lr=0.2, steps=steps, warmup_steps=5)
    return schedule, optim.make_optimizer(name="momentum", learning_rate=schedule,
                                          weight_decay=5e-4)


def build(steps: int, mesh=None):
    """(state, train_step, loader) of the job: what a resume must reproduce bit for bit."""
    mesh = mesh or make_mesh()
    schedule, tx = _optimizer(steps)
    state = train.create_train_state(model=MODEL, tx=tx, seed=SEED, input_shape=(8, 8, 3),
                                     mesh=mesh)
    step = train.make_classifier_step(model=MODEL, tx=tx, schedule=schedule,
                                      preprocess=preprocess,
                                      loss_fn=losses.softmax_cross_entropy)
    loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=SEED)
    return state, step, loader


def abstract_state(steps: int, mesh):
    """The state's shapes, dtypes and shardings, nothing computed: a restore target."""
    _, tx = _optimizer(steps)
    shapes = jax.eval_shape(lambda: train.create_train_state(
        model=MODEL, tx=tx, seed=SEED, input_shape=(8, 8, 3), mesh=mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shd.state_shardings(shapes, mesh))


class Reporting:
    """Wraps the loader: prints "step K" when batch K is asked for, and pauses where told."""

    def __init__(self, inner, *, ckpt_dir: str, ckpt_every: int, pause_at: int | None,
                 slow_save: bool):
        self.inner, self.ckpt_dir, self.ckpt_every = inner, ckpt_dir, ckpt_every
        self.pause_at, self.slow_save = pause_at, slow_save

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iterate(self, start=0, stop=None):
        for b, batch in self.inner.iterate(start, stop):
            print(f"step {b}", flush=True)
            if b == self.pause_at:
                self._pause(b)
            yield b, batch

    def _pause(self, k: int) -> None:
        last_save = k // self.ckpt_every * self.ckpt_every
        if last_save and not self.slow_save:
            # The async save of `last_save` may still be running: let it land, so the parent
            # knows exactly which step a kill here leaves as the latest.
            _wait_for(lambda: os.path.isdir(os.path.join(self.ckpt_dir, str(last_save))),
                      f"checkpoint {last_save}")
        woken = threading.Event()
        loop_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            woken.set()
            if callable(loop_term):
                loop_term(signum, frame)

        # Handlers first, then the message: a signal sent as soon as the parent reads the
        # message is never lost. Python runs handlers in the main thread, between the sleeps.
        previous_usr1 = signal.signal(signal.SIGUSR1, lambda *_: woken.set())
        signal.signal(signal.SIGTERM, on_term)
        print(f"paused at step {k}", flush=True)
        _wait_for(woken.is_set, "a signal")
        signal.signal(signal.SIGTERM, loop_term)
        signal.signal(signal.SIGUSR1, previous_usr1)


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:  # never hang a test run if the parent is gone
            sys.exit(f"fault_job: gave up waiting for {what}")
        time.sleep(0.01)


def install_orbax_hooks(*, slow_save: int | None, kill_in_commit: int | None) -> None:
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import async_path

    if slow_save is not None:
        save_fn = ocp.JsonCheckpointHandler._save_fn  # AttributeError if orbax moved it
        in_tmp = re.compile(rf"/{slow_save}\.orbax-checkpoint-tmp")

        async def slow(self, x, directory):
            if in_tmp.search(str(directory)):
                print(f"slow save {slow_save} in flight", flush=True)
                await asyncio.sleep(600)
            return await save_fn(self, x, directory)

        ocp.JsonCheckpointHandler._save_fn = slow

    if kill_in_commit is not None:
        rename = async_path.rename  # AttributeError if orbax moved it

        async def rename_or_die(src, dst, *args, **kwargs):
            if os.path.basename(str(src)).startswith(f"{kill_in_commit}.orbax-checkpoint-tmp"):
                print(f"killed in the commit of step {kill_in_commit}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await rename(src, dst, *args, **kwargs)

        async_path.rename = rename_or_die


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args(argv)

    slow_save = _env_int("FAULT_SLOW_SAVE")
    install_orbax_hooks(slow_save=slow_save, kill_in_commit=_env_int("FAULT_KILL_IN_COMMIT"))
    if os.environ.get("FAULT_IGNORE_SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    state, step, loader = build(args.steps)
    loader = Reporting(loader, ckpt_dir=os.path.join(args.workdir, "checkpoints"),
                       ckpt_every=args.ckpt_every, pause_at=_env_int("FAULT_PAUSE_AT"),
                       slow_save=slow_save is not None)
    # keep_checkpoints covers every save: the tests compare any step with the reference run's.
    state, summary = loop.run(state=state, train_step=step, loader=loader, steps=args.steps,
                              workdir=args.workdir, ckpt_every=args.ckpt_every,
                              log_every=args.log_every,
                              keep_checkpoints=args.steps // args.ckpt_every + 1,
                              progress=False)
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
    np.savez(os.path.join(args.workdir, "final_state.npz"),
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat})
    print(f"done at step {summary['step']}", flush=True)


if __name__ == "__main__":
    main()
