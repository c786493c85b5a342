"""The one training loop: resume, step, log, evaluate, checkpoint, summarise.

    state, summary = loop.run(state=state, train_step=step, loader=train_loader, steps=1000,
                              workdir="workdirs/x", evaluate=lambda s: {...}, config=config)

Periodic actions (every `log_every`, `eval_every`, `ckpt_every` steps, and always at the end):
- log: fetch the steps' metrics since the last fetch (one host sync), stop with `NonFiniteError`
  naming the first step whose loss or gradient norm is NaN/Inf and the range of steps checked
  together, append one JSON object to `WORKDIR/metrics.jsonl` (and TensorBoard), update the
  progress bar;
- evaluate: call `evaluate(state)` and log its dict under "eval/";
- checkpoint: save the state and the loader's position (async), after the finiteness check; a
  non-finite state is never saved (`checkpoint.Checkpointer.save` refuses it).
At the end: the final checkpoint is written and waited for, and `WORKDIR/summary.json` holds the
final metrics, the config, the git commit and the package versions.

Rerunning the same command with the same workdir resumes from the latest intact checkpoint
(damaged steps are moved aside, see `jaxvision.checkpoint`): the state, its RNG and the data
position are restored, so the run continues bit for bit. SIGTERM (a preemption notice) saves at
the next step boundary and exits with `Preempted`. A checkpoint that cannot be written stops
the run with `checkpoint.CheckpointWriteError` at the next save or at the end.

`skip_nonfinite=True` keeps training through non-finite updates: a step whose loss, gradient
norm or new state is NaN/Inf leaves params, optimizer state and batch statistics unchanged,
while the step counter, the RNG and the data position advance as usual (so a resumed run sees
the same batches). Skipped steps are counted: `train/skipped` per logged interval in
metrics.jsonl, `skipped_steps` in summary.json (kept across resumes in the checkpoint).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxvision import checkpoint as ckpt_lib
from jaxvision import sharding as shd
from jaxvision import train
from jaxvision.checkpoint import NonFiniteError

# Measurements that must be finite; a NaN in any of them stops the run.
_MUST_BE_FINITE = ("loss", "grad_norm")


class Preempted(SystemExit):
    """Raised after a SIGTERM was handled: the state is saved; rerun the command to resume."""

    def __init__(self, step: int):
        super().__init__(143)  # 128 + SIGTERM: what a shell reports for a TERM-killed process
        self.step = step


def run(*, state: dict, train_step: Callable, loader, steps: int, workdir: str,
        evaluate: Callable[[dict], dict] | None = None, log_every: int = 50,
        eval_every: int = 0, ckpt_every: int = 0, keep_checkpoints: int = 3,
        config: Any = None, tensorboard: bool = False,
        progress: bool | None = None, skip_nonfinite: bool = False) -> tuple[dict, dict]:
    """Trains `state` for `steps` updates of `train_step` on `loader`'s batches.

    train_step: `(state, batch) -> (state, metrics)`, unjitted; jitted here with the state
      donated and its shardings pinned. The state must come born-sharded
      (`train.create_train_state`); its structure is the restore target.
    loader: a `DeviceLoader` or `HostLoader` over the training data.
    evaluate: `state -> dict of floats`, run every `eval_every` steps (0: only at the end).
    ckpt_every: 0 saves only at the end.
    progress: show a tqdm bar (None: only on a terminal).
    skip_nonfinite: skip (and count) non-finite updates instead of stopping; see the module
      docstring.
    Returns the final state and the summary dict (also written to `WORKDIR/summary.json`).
    """
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         keep=keep_checkpoints)
    writer = MetricWriter(workdir, tensorboard=tensorboard, enabled=is_main)
    t_start = time.time()
    try:
        state, start, saved_data = _restore_or_start(checkpointer, state, loader)
        writer.truncate_after(start)
        if start:
            _print(is_main, f"resumed from {checkpointer.directory}/{start}")
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        if skip_nonfinite:
            train_step = skipping_nonfinite(train_step)
        step_fn = jax.jit(train_step, donate_argnums=0,
                          out_shardings=(state_shardings, shd.replicated(loader.mesh)))

        meter = _Meter(writer, batch_size=loader.batch_size)
        meter.last_saved = start or None
        meter.last_checked = start
        meter.skipped_total = int(saved_data.get("skipped_steps", 0))
        last_eval: dict = {}
        # tqdm's disable=None: a bar on a terminal only, so CI logs stay readable.
        disable = True if (not is_main or progress is False) else (False if progress else None)
        bar = tqdm(total=steps, initial=start, disable=disable, unit="step", dynamic_ncols=True)
        preempted = _Preemption(checkpointer)
        step = start
        with preempted:
            for b, batch in loader.iterate(start, steps):
                state, metrics = step_fn(state, batch)
                step = b + 1
                preempted.check(step)  # a preemption notice: save this step and stop
                meter.add(step, metrics)
                bar.update(1)
                if step == start + 1:  # the first step pays compilation: time it apart
                    jax.block_until_ready(metrics)
                    meter.restart_clock(note="first_step_s")
                final = step == steps
                if step % log_every == 0 or final or preempted.is_set():
                    meter.log(step)
                    bar.set_postfix(loss=f"{meter.last.get('loss', math.nan):.4f}",
                                    img_s=f"{meter.last.get('images_per_s', 0):.0f}")
                if evaluate is not None and (final or (eval_every and step % eval_every == 0)):
                    meter.check()
                    last_eval = evaluate(state)
                    writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
                    _print(is_main, f"step {step}: " + ", ".join(
                        f"eval/{k}={v:.4f}" if isinstance(v, float) else f"eval/{k}={v}"
                        for k, v in last_eval.items()))
                    meter.restart_clock()  # evaluation time is not training throughput
                if final or preempted.is_set() or (ckpt_every and step % ckpt_every == 0):
                    meter.check()  # a non-finite step raises here, before anything is saved
                    data = {"loader": loader.state_dict(step)}
                    if skip_nonfinite:
                        data["skipped_steps"] = meter.skipped_total
                    try:
                        checkpointer.save(step, state, data)
                    except NonFiniteError as e:
                        # Finite metrics up to here, yet a NaN/Inf state (e.g. the last update
                        # overflowed): it appeared in the steps since the last save.
                        raise NonFiniteError(
                            f"{e} (it became non-finite within steps "
                            f"{(meter.last_saved or 0) + 1}-{step}, whose loss and gradient "
                            f"norm were finite). Last good checkpoint: step "
                            f"{meter.last_saved}.") from None
                    meter.last_saved = step
                if preempted.is_set():
                    checkpointer.wait()
                    _print(is_main, f"SIGTERM: saved step {step} to {checkpointer.directory}; "
                                    "rerun the same command to resume")
                    raise Preempted(step)
        bar.close()
        if start >= steps and evaluate is not None:  # already finished: report, don't retrain
            last_eval = evaluate(state)
        checkpointer.close()  # waits: the final checkpoint is on disk before we return
    except BaseException as original:
        # Pending good saves still complete; their errors must not hide the original one.
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001
            if e is not original:  # a failed write is raised again by close: say it once
                logging.error("checkpoint close failed while handling another error: %s", e)
        writer.close()
        raise
    summary = {
        "step": int(step),
        "resumed_from": int(start) if start else None,
        "train": meter.last,
        "eval": last_eval,
        "skipped_steps": meter.skipped_total,
        **_skipped_examples(loader),
        "wall_time_s": time.time() - t_start,
        **writer.notes,
        "config": _config_dict(config),
        **run_info(),
    }
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    writer.close()
    return state, summary


def _skipped_examples(loader) -> dict:
    """The bad examples a `HostLoader` in skip mode met in this run (summed over processes);
    the first 100 of process 0's by name. Empty for loaders that cannot skip."""
    if not hasattr(loader, "num_skipped"):
        return {}
    count = loader.num_skipped
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        count = int(np.sum(multihost_utils.process_allgather(np.array(count))))
    return {"skipped_examples": {"count": int(count), "first": loader.skipped[:100]}}


class _Meter:
    """The train metrics between host syncs: kept on the device as the steps run, fetched and
    checked together (`check`), averaged and written (`log`)."""

    def __init__(self, writer: "MetricWriter", *, batch_size: int):
        self.writer = writer
        self.batch_size = batch_size
        self.pending: list[tuple[int, dict]] = []  # (step, device metrics), not yet fetched
        self.fetched: list[dict] = []  # checked host values since the last log
        self.last: dict[str, float] = {}  # the last logged means
        self.last_saved: int | None = None
        self.last_checked = 0  # steps up to this one had finite metrics
        self.skipped_total = 0  # updates skipped by `skip_nonfinite`, over the whole run
        self.restart_clock()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.steps_timed += 1

    def restart_clock(self, note: str | None = None) -> None:
        """Restarts the throughput clock; `note` records the time since the last restart."""
        now = time.time()
        if note:
            self.writer.note(note, now - self.clock)
        self.clock, self.steps_timed = now, 0

    def check(self) -> None:
        """Fetches pending metrics (one host sync); raises on the first non-finite step.

        Steps that `skipping_nonfinite` skipped (metric "skipped" = 1) are counted, not raised.
        """
        if not self.pending:
            return
        values = jax.device_get([m for _, m in self.pending])
        first, last = self.pending[0][0], self.pending[-1][0]
        for (step, _), m in zip(self.pending, values):
            if m.get("skipped", 0):
                self.skipped_total += 1
                continue
            bad = [k for k in _MUST_BE_FINITE if k in m and not math.isfinite(float(m[k]))]
            if bad:
                raise NonFiniteError(
                    f"non-finite {' and '.join(bad)} at step {step} "
                    f"({', '.join(f'{k}={float(m[k])}' for k in bad)}), the first such step of "
                    f"steps {first}-{last} (checked together; steps up to {self.last_checked} "
                    f"were finite). The state after it is not saved. Last good checkpoint: "
                    f"step {self.last_saved}.")
        self.fetched += values
        self.pending.clear()
        self.last_checked = last

    def log(self, step: int) -> None:
        """Checks, then writes the mean of every metric since the last log, and images/s."""
        self.check()
        if not self.fetched:
            return
        # Skipped steps' losses are NaN: the means are over the steps that updated the state.
        kept = [m for m in self.fetched if not m.get("skipped", 0)]
        mean = {k: float(np.mean([m[k] for m in kept])) for k in self.fetched[0]
                if k != "skipped" and kept}
        if "skipped" in self.fetched[0]:
            mean["skipped"] = float(sum(int(m["skipped"]) for m in self.fetched))
        self.fetched.clear()
        if self.steps_timed:
            mean["images_per_s"] = self.steps_timed * self.batch_size / (time.time() - self.clock)
        self.restart_clock()
        self.writer.write(step, {f"train/{k}": v for k, v in mean.items()})
        self.last = mean if kept else {**self.last, **mean}  # all skipped: keep the last means


def skipping_nonfinite(train_step: Callable) -> Callable:
    """Wraps `train_step` so that a non-finite update leaves the state as it was.

    The update counts as non-finite if a metric of `_MUST_BE_FINITE` or any floating leaf of the
    new state is NaN/Inf. Then every leaf keeps its old value except "step" and "rng", which
    take the new ones (the step counter, the step's randomness and the loader's position stay
    in lockstep). Adds the metric "skipped" (int32 0/1). Still one jitted function: the choice
    is a `jnp.where` per leaf, no host sync.
    """
    def step(state, batch):
        new, metrics = train_step(state, batch)
        watched = {k: metrics[k] for k in _MUST_BE_FINITE if k in metrics}
        ok = jnp.logical_and(ckpt_lib.all_finite(watched), ckpt_lib.all_finite(new))
        kept = {k: (v if k in ("step", "rng") else
                    jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, state[k]))
                for k, v in new.items()}
        return kept, {**metrics, "skipped": jnp.logical_not(ok).astype(jnp.int32)}

    return step


def _restore_or_start(checkpointer, state, loader) -> tuple[dict, int, dict]:
    found = checkpointer.restore_latest(state)
    if found is None:
        return state, 0, {}
    latest, restored, data = found
    position = loader.position_from(data["loader"])
    saved_step = int(jax.device_get(restored["step"]))
    if not position == saved_step == latest:
        raise ValueError(f"checkpoint {checkpointer.directory}/{latest} is inconsistent: "
                         f"state step {saved_step}, data position {position}")
    return restored, latest, data


class _Preemption:
    """Context manager: while active, a preemption notice (SIGTERM) is noticed at a step boundary
    instead of killing the process. `check(step)` is called once per step, on every process.

    One process: our own SIGTERM handler sets a flag (orbax's preemption check is always False
    without `jax.distributed`; see the shared NOTES).
    Several processes: every host must save the same step, or the collective save hangs. jax's
    preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM on any host,
    spreads the notice to all, and `reached_preemption_sync_point(step)` turns True at the same
    step everywhere; orbax's `CheckpointManager.reached_preemption` wraps it. A Python handler
    would replace jax's, so none is installed then.
    """

    def __init__(self, checkpointer):
        self._checkpointer = checkpointer
        self._event = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1

    def check(self, step: int) -> bool:
        if self._multi and not self._event.is_set():
            if self._checkpointer.reached_preemption(step):
                self._event.set()
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class MetricWriter:
    """One JSON object per logged step in `WORKDIR/metrics.jsonl`, optionally TensorBoard too."""

    def __init__(self, workdir: str, *, tensorboard: bool = False, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.notes: dict[str, Any] = {}
        self._tb = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("config.tensorboard=True needs tensorboardX: "
                                  "pip install 'jaxvision[tensorboard]'") from None
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def note(self, key: str, value: Any) -> None:
        """A one-off figure for the summary (e.g. the first step's compile time)."""
        self.notes[key] = value

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict]:
    """The lines of `WORKDIR/metrics.jsonl` as dicts (for plots and notebooks)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def package_versions(names) -> dict[str, str | None]:
    """The installed version of each distribution in `names`; None where it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info() -> dict[str, Any]:
    """What a run needs to be reproduced: git commit, package versions, devices."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    versions = package_versions(("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex",
                                 "numpy", "tensorflow-datasets", "jaxvision"))
    versions["python"] = platform.python_version()
    status = git("status", "--porcelain")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "versions": versions,
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "argv": sys.argv,
    }


def _config_dict(config) -> Any:
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _print(enabled: bool, message: str) -> None:
    if enabled:
        tqdm.write(message)


def fit_classifier(*, model, tx, schedule, preprocess, loss_fn, train_loader, eval_loader,
                   input_shape: tuple[int, ...], seed: int, steps: int, workdir: str,
                   fsdp: bool = False, l2: float = 0.0, mix=None, loss_takes_acts: bool = False,
                   **run_kwargs) -> tuple[dict, dict]:
    """Creates the state and trains a classifier: the wiring every classification experiment
    shares, so experiment files only assemble the pieces (data, net, loss, optimizer).

    Evaluation runs `eval_loader`'s first epoch (use `shuffle=False, drop_remainder=False`, so
    every example counts once). `run_kwargs` go to `run` (log_every, eval_every, ckpt_every,
    keep_checkpoints, config, tensorboard, progress, skip_nonfinite). `mix` and
    `loss_takes_acts` go to `train.make_classifier_step` (mixup/cutmix; losses that read the
    activations, such as `googlenet.googlenet_loss`, which trains GoogLeNet's auxiliary
    classifiers).
    """
    state = train.create_train_state(model=model, tx=tx, seed=seed, input_shape=input_shape,
                                     mesh=train_loader.mesh, fsdp=fsdp)
    train_step = train.make_classifier_step(model=model, tx=tx, schedule=schedule,
                                            preprocess=preprocess, loss_fn=loss_fn, l2=l2,
                                            mix=mix, loss_takes_acts=loss_takes_acts)
    eval_step = jax.jit(train.make_classifier_eval(model=model, preprocess=preprocess,
                                                   loss_fn=loss_fn,
                                                   loss_takes_acts=loss_takes_acts))
    return run(state=state, train_step=train_step, loader=train_loader, steps=steps,
               workdir=workdir, evaluate=lambda s: train.evaluate(eval_step, s, eval_loader.epoch()),
               **run_kwargs)
