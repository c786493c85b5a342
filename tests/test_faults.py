"""Faults during training (issue 7, points 1-6): a job killed, preempted, starved of disk or fed
NaNs resumes to exactly the result of an uninterrupted run, or stops saying why.

Points 1-5 run tests/fault_job.py (a tiny CNN, 40 steps, async checkpoints every 5) in
subprocesses on 2 emulated CPU devices and compare with one uninterrupted reference run of the
same command, leaf by leaf and bitwise (params, optimizer state, batch statistics, step, RNG)
plus the data position. The parent learns the child's step from its "step K" lines; the child
pauses where told (FAULT_PAUSE_AT), so every kill lands at a known step. Kill steps are drawn
from a seeded generator. The children share one jit cache, fresh for this test session (the
reference run fills it; a killed child is only killed once its programs are compiled).
Point 6 (NaN/Inf) runs in this process.
"""
from __future__ import annotations

import os
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fault_job
from jaxvision import loop, train
from jaxvision.checkpoint import (Checkpointer, DamagedCheckpointError, NonFiniteError,
                                  abstract_like, all_finite, load_latest)
from jaxvision.pipelines.loader import DeviceLoader
from jaxvision.sharding import make_mesh
from test_checkpoint import Interrupt, InterruptingLoader
from test_train import MODEL, pieces
from tiny_task import tiny_source

REPO = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "fault_job.py"
STEPS, EVERY = 40, 5  # fault_job's defaults
SEED = 20240607  # draws the kill steps


# ---------------------------------------------------------------------------------------------
# Running the job


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fault-job-jit-cache")  # fresh for this session
    return {**os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(REPO),
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


class Job:
    """fault_job.py in a subprocess; its stdout lines are read as they come."""

    def __init__(self, workdir: Path, env: dict, **faults):
        self.workdir = Path(workdir)
        env = {**env, **{k: str(v) for k, v in faults.items()}}
        # Pipes, not files: a file would be subject to the job's RLIMIT_FSIZE too.
        self.proc = subprocess.Popen([sys.executable, str(JOB), str(workdir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO)
        self.lines: list[str] = []
        self._stderr: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._stderr.extend,
                                               args=(self.proc.stderr,), daemon=True)
        self._stderr_reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Reads lines until one equals `text`."""
        deadline = time.time() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no {text!r} within {timeout} s: {self.lines[-5:]}")
            if line is None:
                self.proc.wait()
                raise AssertionError(f"the job exited ({self.proc.returncode}) before printing "
                                     f"{text!r}; stderr:\n{self.stderr()[-3000:]}")
            self.lines.append(line)
            if line == text:
                return

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 180) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        assert self.finish() == -signal.SIGKILL

    def stderr(self) -> str:
        if self.proc.poll() is not None:
            self._stderr_reader.join(timeout=10)
        return "".join(self._stderr)

    @property
    def steps(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if re.fullmatch(r"step \d+", line)]

    def resumed_from(self) -> int | None:
        for line in self.lines:
            if m := re.fullmatch(r"resumed from .*/(\d+)", line):
                return int(m.group(1))
        return None


def run_to_end(workdir: Path, env: dict, **faults) -> Job:
    job = Job(workdir, env, **faults)
    rc = job.finish()
    assert rc == 0, job.stderr()[-3000:]
    assert job.lines[-1] == f"done at step {STEPS}"
    return job


def ckpt_dir(workdir: Path) -> Path:
    return Path(workdir) / "checkpoints"


def steps_on_disk(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir(workdir).iterdir() if p.name.isdigit())


def leftovers(workdir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir(workdir).iterdir() if not p.name.isdigit())


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), f"{key} differs"


def assert_same_as_reference(workdir: Path, reference: Path) -> None:
    """Final state (every leaf: params, opt state, batch stats, step, RNG), bitwise, and the
    final checkpoint (state and data position) equal the uninterrupted run's."""
    with np.load(Path(workdir) / "final_state.npz") as a, \
            np.load(reference / "final_state.npz") as b:
        assert_bitwise_equal(dict(a), dict(b))
        assert int(a["['step']"]) == STEPS
    step, state, data = load_latest(str(ckpt_dir(workdir)))
    ref_step, ref_state, ref_data = load_latest(str(ckpt_dir(reference)))
    assert step == ref_step == STEPS
    assert data == ref_data and data["loader"]["next_batch"] == STEPS  # the data position
    flat = lambda t: {jax.tree_util.keystr(p): x  # noqa: E731
                      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert_bitwise_equal(flat(state), flat(ref_state))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, job_env) -> Path:
    """One uninterrupted run of the job, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(workdir, job_env)
    return workdir


def like_state():
    """The job's state as shapes and shardings on 2 of this process's devices: a restore
    target (nothing computed or compiled)."""
    return fault_job.abstract_state(STEPS, make_mesh(jax.devices()[:2]))


def restored_step(directory: Path, step: int):
    ckpt = Checkpointer(str(directory))
    try:
        state, data = ckpt.restore(step, like_state())
    finally:
        ckpt.close()
    return jax.device_get(state), data


# ---------------------------------------------------------------------------------------------
# 4 (normal run): the final checkpoint is on disk when the process has exited


def test_normal_run_has_its_final_checkpoint_on_disk_at_exit(reference):
    assert steps_on_disk(reference) == list(range(EVERY, STEPS + 1, EVERY))
    assert leftovers(reference) == []
    state, data = restored_step(ckpt_dir(reference), STEPS)  # verified against its fingerprint
    with np.load(reference / "final_state.npz") as final:
        flat = {jax.tree_util.keystr(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        assert_bitwise_equal(flat, dict(final))
    assert data["loader"]["next_batch"] == STEPS


# ---------------------------------------------------------------------------------------------
# 1: SIGKILL at seeded random steps, one of them while an async save is being written


def test_sigkill_at_random_steps_and_during_an_async_save_resumes_bitwise(
        tmp_path, job_env, reference):
    draw = random.Random(SEED)
    k1 = draw.choice([s for s in range(1, 13) if s % EVERY])
    k2 = draw.choice([s for s in range(k1 + 1, 25) if s % EVERY])
    slow = draw.choice([s for s in range(EVERY, STEPS, EVERY) if s > k2])
    k3 = slow + draw.randint(1, EVERY - 1)  # killed while step `slow` is still being written
    workdir = tmp_path / "run"
    ckpt = ckpt_dir(workdir)

    job = Job(workdir, job_env, FAULT_PAUSE_AT=k1)
    job.wait_for(f"paused at step {k1}")
    job.kill()
    assert steps_on_disk(workdir) == list(range(EVERY, k1 + 1, EVERY))

    job = Job(workdir, job_env, FAULT_PAUSE_AT=k2)
    job.wait_for(f"paused at step {k2}")
    job.kill()
    assert job.resumed_from() == (k1 // EVERY * EVERY or None)
    assert steps_on_disk(workdir) == list(range(EVERY, k2 + 1, EVERY))

    job = Job(workdir, job_env, FAULT_SLOW_SAVE=slow, FAULT_PAUSE_AT=k3)
    job.wait_for(f"slow save {slow} in flight")
    job.wait_for(f"paused at step {k3}")
    assert (ckpt / f"{slow}.orbax-checkpoint-tmp").is_dir() and not (ckpt / str(slow)).exists()
    job.kill()
    assert job.resumed_from() == k2 // EVERY * EVERY
    assert steps_on_disk(workdir)[-1] == slow - EVERY

    job = run_to_end(workdir, job_env)
    assert job.resumed_from() == slow - EVERY
    assert leftovers(workdir) == []  # the half-written step was cleaned up
    assert_same_as_reference(workdir, reference)
    print(f"\n[1] SIGKILL at steps {k1}, {k2}, {k3} (save {slow} in flight); resumed from "
          f"{k1 // EVERY * EVERY}, {k2 // EVERY * EVERY}, {slow - EVERY}; final state bitwise "
          "equal to the uninterrupted run")


# ---------------------------------------------------------------------------------------------
# 2: killed inside a checkpoint commit, between writing and renaming


def test_crash_inside_a_checkpoint_commit_resumes_from_the_previous_step(
        tmp_path, job_env, reference):
    workdir, n = tmp_path / "run", 20
    job = Job(workdir, job_env, FAULT_KILL_IN_COMMIT=n)
    assert job.finish() == -signal.SIGKILL
    assert f"killed in the commit of step {n}" in job.lines
    partial = ckpt_dir(workdir) / f"{n}.orbax-checkpoint-tmp"
    # Everything was written (orbax's success marker too); only the final rename is missing.
    assert (partial / "commit_success.txt").is_file() and (partial / "state").is_dir()
    assert steps_on_disk(workdir) == [5, 10, 15]

    job = run_to_end(workdir, job_env)
    assert job.resumed_from() == 15
    assert "Traceback" not in job.stderr() and "Error" not in job.stderr()
    assert leftovers(workdir) == []
    assert_same_as_reference(workdir, reference)
    print(f"\n[2] SIGKILL in the commit of step {n}: resumed from 15, leftover removed, "
          "no error, final state bitwise equal")


# ---------------------------------------------------------------------------------------------
# 3: damaged checkpoints


def _array_files(step_dir: Path) -> list[Path]:
    """The step's array data files, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def truncate(step_dir: Path) -> None:
    """Cuts every array data file of the step in half (OCDBT leaves some bytes of a file
    unreferenced, so one cut file may go unnoticed)."""
    for f in _array_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def _flip(f: Path, offset: int) -> None:
    data = bytearray(f.read_bytes())
    for i in range(offset, offset + 4):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def flip_bytes(step_dir: Path, like) -> str:
    """Flips 4 bytes of the step's array data where orbax still restores it without any error,
    but with other values (arrays are stored compressed, so the place is found by trying on a
    scratch copy). Returns where, and which leaves orbax then returns changed."""
    scratch = step_dir.parent.parent / "scratch"
    target = abstract_like(like)
    with ocp.StandardCheckpointer() as plain:
        intact = jax.device_get(plain.restore(step_dir / "state", target))
        for f in _array_files(step_dir):
            size = f.stat().st_size
            for offset in (size // 2, size // 4, 3 * size // 4, size // 8):
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.copytree(step_dir, scratch)
                _flip(scratch / f.relative_to(step_dir), offset)
                try:
                    restored = jax.device_get(plain.restore(scratch / "state", target))
                except Exception:  # noqa: BLE001 (that flip was caught by a decoder: try on)
                    continue
                changed = [jax.tree_util.keystr(p) for (p, a), b in zip(
                    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(intact))
                    if not np.array_equal(a, b)]
                if changed:
                    shutil.rmtree(scratch)
                    _flip(f, offset)
                    return f"{f.name}@{offset}: orbax restores it silently, changed {changed}"
    raise AssertionError(f"no silent flip found in {step_dir}")


def remove_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def copy_checkpoints(reference: Path, workdir: Path) -> Path:
    shutil.copytree(ckpt_dir(reference), ckpt_dir(workdir))
    return ckpt_dir(workdir)


def test_damaged_latest_steps_fall_back_with_warnings_and_are_moved_aside(
        tmp_path, job_env, reference):
    workdir = tmp_path / "run"
    ckpt = copy_checkpoints(reference, workdir)
    truncate(ckpt / "40")
    flipped = flip_bytes(ckpt / "35", like_state())  # orbax alone loads it without a word
    remove_metadata(ckpt / "30")

    job = run_to_end(workdir, job_env)
    assert job.resumed_from() == 25
    stderr = job.stderr()
    warnings = [ln for ln in stderr.splitlines() if "moved damaged checkpoint" in ln]
    for step, reason in [(40, "cannot read"), (35, "differs from the fingerprint"),
                         (30, "the state's metadata is missing (state/_METADATA)")]:
        assert any(f"{ckpt}/{step} to {ckpt}.damaged/{step} (reason: " in ln and reason in ln
                   for ln in warnings), (step, warnings)
    assert sorted(p.name for p in Path(f"{ckpt}.damaged").iterdir()) == ["30", "35", "40"]
    assert steps_on_disk(workdir)[-1] == 40  # saved again under the damaged step's number
    assert_same_as_reference(workdir, reference)
    print("\n[3] damaged 40 (truncated), 35 (flipped bytes), 30 (no metadata): warnings name "
          "each path and reason, moved to checkpoints.damaged/, resumed from 25, final bitwise "
          f"equal\n    35: {flipped}\n    " + "\n    ".join(warnings))


# Orbax's reader leaves an asyncio callback behind when tensorstore fails to open an array.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_step_damaged_fails_naming_the_paths_and_never_starts_from_scratch(
        tmp_path, reference):
    ckpt = copy_checkpoints(reference, tmp_path / "run")
    like = like_state()
    for step in range(EVERY, STEPS + 1, EVERY):
        damage = [truncate, lambda d: flip_bytes(d, like), remove_metadata][step // EVERY % 3]
        damage(ckpt / str(step))
    checkpointer = Checkpointer(str(ckpt))
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint .*/35 is damaged: the data "
                                                     r"differs from the fingerprint saved with it "
                                                     r"in \d+ of 27 leaves \(flipped bytes\?\): "):
        checkpointer.restore(35, like)  # flipped bytes
    with pytest.raises(DamagedCheckpointError) as e:
        checkpointer.restore_latest(like)
    checkpointer.close()
    for step in range(EVERY, STEPS + 1, EVERY):
        assert f"{ckpt}/{step}: " in str(e.value)
    assert steps_on_disk(tmp_path / "run") == list(range(EVERY, STEPS + 1, EVERY))  # none moved
    assert not Path(f"{ckpt}.damaged").exists()
    # The training loop refuses too, before training a single step (so the state can be the
    # abstract restore target and the step a stub: neither is reached).
    loader = DeviceLoader(fault_job.tiny_source(), batch_size=8,
                          mesh=make_mesh(jax.devices()[:2]), seed=fault_job.SEED)
    with pytest.raises(DamagedCheckpointError, match="jaxvision will not start this run from"):
        loop.run(state=like, train_step=None, loader=loader, steps=STEPS,
                 workdir=str(tmp_path / "run"), ckpt_every=EVERY, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 4: save errors: a read-only or full checkpoint directory mid-run


def _assert_last_good_step_intact(workdir: Path, reference: Path, step: int) -> None:
    assert steps_on_disk(workdir) == list(range(EVERY, step + 1, EVERY))
    mine, data = restored_step(ckpt_dir(workdir), step)
    ref, ref_data = restored_step(ckpt_dir(reference), step)
    chex.assert_trees_all_equal(mine, ref)
    assert data == ref_data


def test_read_only_checkpoint_directory_stops_the_run_at_the_next_save(
        tmp_path, job_env, reference):
    workdir = tmp_path / "run"
    # As root, the job drops the capability to write through permission bits.
    job = Job(workdir, job_env, FAULT_PAUSE_AT=12, FAULT_NO_DAC_OVERRIDE=1)
    job.wait_for("paused at step 12")
    os.chmod(ckpt_dir(workdir), 0o555)
    try:
        start = time.time()
        job.signal(signal.SIGUSR1)
        rc = job.finish()
        elapsed = time.time() - start
    finally:
        os.chmod(ckpt_dir(workdir), 0o755)
    assert rc == 1
    assert max(job.steps) == 14  # it stopped at the save of step 15
    stderr = job.stderr()
    assert (f"CheckpointWriteError: could not write checkpoint step 15 to {ckpt_dir(workdir)}/15: "
            "PermissionError: [Errno 13] Permission denied") in stderr
    assert elapsed < 30  # no wait for orbax's 300 s timeouts
    _assert_last_good_step_intact(workdir, reference, 10)
    print(f"\n[4] read-only: exit {rc} {elapsed:.1f} s after the change, at the save of step "
          "15; step 10 intact")


def test_full_disk_stops_the_run_by_the_next_save(tmp_path, job_env, reference):
    workdir = tmp_path / "run"
    job = Job(workdir, job_env, FAULT_PAUSE_AT=12, FAULT_IGNORE_SIGXFSZ=1)
    job.wait_for("paused at step 12")
    # From now on no file of the job may grow past 4 KiB: metrics.jsonl stays below, every
    # checkpoint has bigger files. Writes fail with EFBIG, as on a full disk.
    resource.prlimit(job.proc.pid, resource.RLIMIT_FSIZE, (4096, 4096))
    start = time.time()
    job.signal(signal.SIGUSR1)
    rc = job.finish()
    elapsed = time.time() - start
    assert rc == 1
    # Step 15 is written in the background: its failure surfaces at the save of step 20.
    assert max(job.steps) == 19
    stderr = job.stderr()
    assert (f"CheckpointWriteError: could not write checkpoint step 15 to {ckpt_dir(workdir)}/15: "
            in stderr) and "File too large" in stderr
    assert elapsed < 30
    _assert_last_good_step_intact(workdir, reference, 10)
    print(f"\n[4] full disk: exit {rc} {elapsed:.1f} s after the limit, at the save of step 20 "
          "(step 15's write failed); step 10 intact")


# ---------------------------------------------------------------------------------------------
# 5: SIGTERM


def test_sigterm_saves_at_the_next_step_exits_fast_and_resumes_bitwise(
        tmp_path, job_env, reference):
    # Neither k nor k + 1 a multiple of 5: the save at k + 1 is SIGTERM's own.
    k = random.Random(SEED + 5).choice(
        [s for s in range(6, STEPS - 2) if s % EVERY and (s + 1) % EVERY])
    workdir = tmp_path / "run"
    job = Job(workdir, job_env, FAULT_PAUSE_AT=k)
    job.wait_for(f"paused at step {k}")
    start = time.time()
    job.signal(signal.SIGTERM)
    rc = job.finish()
    elapsed = time.time() - start
    assert rc == 143
    assert elapsed < 30
    assert any(ln.startswith(f"SIGTERM: saved step {k + 1} to ") for ln in job.lines)
    assert steps_on_disk(workdir)[-1] == k + 1 and leftovers(workdir) == []
    job = run_to_end(workdir, job_env)
    assert job.resumed_from() == k + 1
    assert_same_as_reference(workdir, reference)
    print(f"\n[5] SIGTERM after step {k}: saved step {k + 1}, exited (143) in {elapsed:.2f} s; "
          "resumed bitwise")


# ---------------------------------------------------------------------------------------------
# 6: NaN / Inf


class NanBatches(InterruptingLoader):
    """Float images (values unchanged) with one NaN pixel in batch `at`."""

    _poison = staticmethod(jax.jit(lambda x, bad: x.astype(jnp.float32).at[0, 0, 0, 0].set(
        jnp.where(bad, jnp.nan, x[0, 0, 0, 0].astype(jnp.float32)))))

    def iterate(self, start=0, stop=None):
        for b, batch in self.inner.iterate(start, stop):
            yield b, {**batch, "image": self._poison(batch["image"], b == self.at)}


def run_nan(workdir: Path, *, nan_at=None, lr=0.1, steps=12, interrupt_at=None, **kw):
    mesh = make_mesh()
    tx, step, _ = pieces(lr=lr)
    state = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    loader = NanBatches(DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=0), nan_at)
    if interrupt_at is not None:
        loader = InterruptingLoader(loader, interrupt_at)
    return loop.run(state=state, train_step=step, loader=loader, steps=steps,
                    workdir=str(workdir), progress=False, **kw)


def _latest_is_finite(workdir: Path) -> int:
    step, state, _ = load_latest(str(ckpt_dir(workdir)))
    assert bool(all_finite(state))
    return step


def test_nan_batch_stops_naming_the_step_range_and_saves_nothing_non_finite(tmp_path):
    # Batch 9 is step 10; metrics are checked at steps 4, 8 and 12 (log_every=4).
    with pytest.raises(NonFiniteError, match=r"non-finite loss and grad_norm at step 10 .*the "
                                             r"first such step of steps 9-12 .*steps up to 8 "
                                             r"were finite.*Last good checkpoint: step 8"):
        run_nan(tmp_path / "run", nan_at=9, ckpt_every=4, log_every=4)
    assert steps_on_disk(tmp_path / "run") == [4, 8]
    assert _latest_is_finite(tmp_path / "run") == 8


def test_huge_learning_rate_stops_naming_the_step_range(tmp_path):
    with pytest.raises(NonFiniteError) as e:
        run_nan(tmp_path / "run", lr=1e8, ckpt_every=2, log_every=4)
    m = re.search(r"at step (\d+) .*steps (\d+)-(\d+)", str(e.value))
    assert m, str(e.value)
    bad, first, last = map(int, m.groups())
    assert first <= bad <= last
    latest = _latest_is_finite(tmp_path / "run")
    assert latest < bad and f"Last good checkpoint: step {latest}" in str(e.value)
    print(f"\n[6] lr=1e8: {e.value}")


def test_skip_nonfinite_leaves_the_state_unchanged_and_advances_step_and_rng():
    mesh = make_mesh()
    tx, step, _ = pieces()
    state = train.create_train_state(model=MODEL, tx=tx, seed=0,
                                     input_shape=(8, 8, 3), mesh=mesh)
    loader = NanBatches(DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=0), 0)
    (_, bad), (_, good) = list(loader.iterate(0, 2))
    skipping = jax.jit(loop.skipping_nonfinite(step))
    before = jax.device_get(state)
    after, metrics = jax.device_get(skipping(state, bad))
    assert int(metrics["skipped"]) == 1 and not np.isfinite(metrics["loss"])
    for key in ("params", "opt_state", "batch_stats"):
        chex.assert_trees_all_equal(after[key], before[key])
    assert int(after["step"]) == 1
    np.testing.assert_array_equal(after["rng"], before["rng"])
    # A finite batch is not skipped: exactly the plain step's result.
    state = train.create_train_state(model=MODEL, tx=tx, seed=0,
                                     input_shape=(8, 8, 3), mesh=mesh)
    plain, _ = jax.jit(step)(state, good)
    kept, metrics = skipping(state, good)
    assert int(metrics["skipped"]) == 0
    chex.assert_trees_all_equal(jax.device_get(kept), jax.device_get(plain))


def test_skip_nonfinite_counts_skips_and_resumes_bitwise(tmp_path):
    kw = dict(nan_at=5, steps=10, ckpt_every=4, log_every=2, skip_nonfinite=True)
    straight, summary = run_nan(tmp_path / "straight", **kw)
    assert summary["skipped_steps"] == 1 and summary["step"] == 10
    skipped = [m.get("train/skipped") for m in loop.read_metrics(str(tmp_path / "straight"))]
    assert skipped == [0, 0, 1, 0, 0]  # batch 5 is step 6, logged at step 6
    with pytest.raises(Interrupt):
        run_nan(tmp_path / "resumed", interrupt_at=9, **kw)  # dies after the save at step 8
    resumed, summary = run_nan(tmp_path / "resumed", **kw)
    assert summary["resumed_from"] == 8 and summary["skipped_steps"] == 1  # kept across resume
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(straight))
