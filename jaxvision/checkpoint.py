"""Checkpoints: the train state (a pytree of arrays) and the data position (JSON) of each saved
step, through orbax-checkpoint's `CheckpointManager`.

Saving
- Saves are asynchronous: `save` returns once the arrays are copied on the devices and the step
  directory exists; the files are written in the background. The state is refused if it holds
  NaN or Inf (`NonFiniteError`): a non-finite state never becomes the latest checkpoint.
- A step is written to `STEP.orbax-checkpoint-tmp` and renamed to `STEP` when complete, so a
  process killed mid-save (even between writing and renaming) leaves the previous step as the
  latest; leftovers are removed when the next `Checkpointer` on the directory starts.
- Write errors are never swallowed. A full disk or a read-only directory fails the write of some
  step S; `save` of the next step, `wait` or `close` raises `CheckpointWriteError` naming S, its
  path and the reason, and every later call raises it again. Directories are created before
  `save` returns (orbax's `create_directories_asynchronously=False`): a directory that cannot be
  written fails that `save` at once (with asynchronous creation, orbax's writer threads wait
  300 s for a directory that never comes before the process can exit). After waiting, the step
  must exist under its final name, or the wait fails: orbax logs some failures of the
  background commit instead of raising them.
- `close` waits, so the final checkpoint is on disk when the training loop returns.

Damage: fingerprints and the fallback policy
- Every step stores a fingerprint of the state in its JSON item: for each leaf, the uint32 sum
  of its bits and an odd-weighted sum over positions (`checksums`; computed in one jit with the
  finiteness check, so the only extra cost is a few reductions on the device). Integer sums
  wrap mod 2^32 and do not depend on the order of reduction, so a state restored on another
  device count or sharding has the same fingerprint. Orbax and tensorstore do not check array
  data: flipped bytes in an array file restore without any error (tested), so `restore`
  compares the fingerprint of what it read with the stored one. One changed 32-bit word always
  changes both sums.
- `restore(step, like)` raises `DamagedCheckpointError` (naming the step directory and the
  reason) when the step cannot be read (truncated or missing files, missing metadata) or its
  fingerprint differs. A structure that differs from `like` is not damage: that is a changed
  model or optimizer, reported as `StructureMismatchError` with the key paths, and nothing is
  moved.
- `restore_latest(like)` (what the training loop calls) tries the steps newest first. A damaged
  step is logged as a warning (path and reason) and moved to the sibling directory
  `DIRECTORY.damaged/STEP` (kept for inspection, never deleted), so it is never "latest" again
  and the resumed run can save that step number again; the next older step is tried. If every
  step is damaged, it raises `DamagedCheckpointError` naming each damaged path and moves
  nothing: the run never silently starts from scratch, and rerunning fails the same way until
  someone looks. A checkpoint written before fingerprints existed restores with a warning that
  it is unverified.
- With several processes, all processes agree on "damaged" (a gather of each one's verdict)
  and only process 0 moves directories.

Restores go into the shardings of a `like` tree (the freshly created state), so a checkpoint
restores on any device count, and the structure is checked first.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

# Key of the fingerprint in each step's JSON item (stripped from what `restore` returns).
CHECKSUMS_KEY = "_checksums"
# Where damaged steps go: a sibling of the checkpoint directory.
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A loss, gradient or state with NaN or Inf; the message names the step."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only directory...); names the step."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint step that cannot be read or whose data differs from its fingerprint."""

    def __init__(self, message: str, *, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class StructureMismatchError(ValueError):
    """The checkpoint's tree differs from the run's state (a changed model or optimizer)."""


@jax.jit
def copy_tree(tree):
    """A fresh copy of every array of `tree`, on the same shardings.

    Used (1) before an async save, so the next step can donate the state's buffers while the
    save still reads its copy (donation vs. async save: "Array has been deleted", an open orbax
    issue), and (2) after a restore, because restored arrays cannot be donated in place.
    """
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True iff no floating-point leaf of `tree` holds a NaN or Inf. A scalar bool array."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words, same shape (8-byte types: one more axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in (4, 8):  # bitcast of an 8-byte type to uint32 appends an axis of 2
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: (sum of the words, sum of word * (2 * position + 1)), both mod 2^32.

    The position is built from iotas of the leaf's own shape (no reshape), so a sharded leaf
    is summed where it lives. Odd weights are invertible mod 2^32, so changing any one word
    changes both sums; the weighted sum also notices most reorderings of words.
    """
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
        stride = (stride * w.shape[axis]) % 2**32
    weights = position * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])


def _has_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@jax.jit
def _finite_and_checksums(leaves: list) -> tuple[jax.Array, jax.Array]:
    """(all floating leaves finite: bool [], checksums: uint32 [len(leaves), 2])."""
    sums = (jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves
            else jnp.zeros((0, 2), jnp.uint32))
    return all_finite(leaves), sums


def checksums(tree) -> dict[str, list]:
    """The fingerprint of `tree`: {key path: [dtype, sum, weighted sum]} (JSON-able).

    One jitted computation and one transfer of 8 bytes per leaf; see the module docstring.
    """
    return _checksums_and_finite(tree)[0]


def _checksums_and_finite(tree) -> tuple[dict[str, list], bool]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(path, leaf) for path, leaf in flat if _has_array(leaf)]
    finite, sums = jax.device_get(_finite_and_checksums([leaf for _, leaf in flat]))
    table = {_path_str(path): [str(leaf.dtype), int(s[0]), int(s[1])]
             for (path, leaf), s in zip(flat, sums)}
    return table, bool(finite)


def _verify(tree, data: dict, where: str) -> dict[str, Any]:
    """Compares `tree` with the fingerprint stored in `data`; returns `data` without it.

    Raises DamagedCheckpointError naming the first differing leaves.
    """
    data = dict(data)
    stored = data.pop(CHECKSUMS_KEY, None)
    if stored is None:
        log.warning("checkpoint %s has no fingerprint (written before jaxvision stored them): "
                    "restored unverified", where)
        return data
    mine, _ = _checksums_and_finite(tree)
    stored = stored["leaves"]
    bad = [path for path, (dtype, *sums) in stored.items()
           if path in mine and mine[path][0] == dtype and mine[path][1:] != sums]
    if bad:
        reason = (f"the data differs from the fingerprint saved with it in {len(bad)} of "
                  f"{len(stored)} leaves (flipped bytes?): {', '.join(bad[:5])}"
                  + (" ..." if len(bad) > 5 else ""))
        raise DamagedCheckpointError(f"checkpoint {where} is damaged: {reason}",
                                     path=where, reason=reason)
    return data


def abstract_like(tree) -> Any:
    """`jax.ShapeDtypeStruct` with the sharding of each array: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Keeps the last `keep` steps of (state, data position) under `directory`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Leftovers of a save killed mid-write; latest_step() ignores them either way.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # Create the step directories inside `save` (see the module docstring).
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_item_handlers())
        self._pending: int | None = None  # the step being written in the background
        self._error: CheckpointWriteError | None = None  # sticky: raised by every later call

    @property
    def damaged_directory(self) -> str:
        """Where `restore_latest` moves damaged steps: `DIRECTORY.damaged`."""
        return self.directory + DAMAGED_SUFFIX

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data: dict[str, Any]) -> None:
        """Saves `state` and the JSON-able `data` as `step`; refuses a non-finite state.

        Raises CheckpointWriteError if this or the previous save could not be written.
        """
        if self._error is not None:
            raise self._error
        if CHECKSUMS_KEY in data:
            raise ValueError(f"data key {CHECKSUMS_KEY!r} is reserved for the fingerprint")
        copy = copy_tree(state)
        sums, finite = _checksums_and_finite(copy)
        if not finite:
            raise NonFiniteError(
                f"refusing to save step {step}: the train state holds NaN or Inf")
        self._settle()  # the previous write must have succeeded before we start this one
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(copy),
                    data=ocp.args.JsonSave({**data, CHECKSUMS_KEY: {"leaves": sums}})),
                force=True,  # the loop decides when to save; orbax's own interval is not used
            )
        except Exception as e:  # noqa: BLE001 (any failure to write is reported the same way)
            self._fail(e, step)
        self._pending = step

    def reached_preemption(self, step: int) -> bool:
        """Several processes: True at the same step on every process once any received a
        preemption notice (jax's preemption sync manager). Always False on one process."""
        return bool(self._manager.reached_preemption(step))

    def wait(self) -> None:
        """Blocks until pending saves are written; raises CheckpointWriteError if one failed."""
        self._settle()

    def close(self) -> None:
        """Waits for the pending save (raising its error) and releases orbax's threads."""
        try:
            self._settle()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001
                # Orbax raises a failed write again here; we reported it already.
                if self._error is None:
                    self._fail(e, self._pending)

    def _settle(self) -> None:
        """Waits for the background write; raises (and remembers) its failure."""
        if self._error is not None:
            raise self._error
        step = self._pending
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._fail(e, step)
        if (step is not None and jax.process_index() == 0
                and not os.path.isdir(self.step_path(step))):
            self._fail(RuntimeError("the background write ended without committing the step "
                                    "(orbax logged the error above)"), step)
        self._pending = None

    def _fail(self, error: BaseException, step: int | None) -> None:
        good = _committed_steps(self.directory)
        reason = f"{type(error).__name__}: {_first_line(error)}"
        what = (f"could not write checkpoint step {step} to {self.step_path(step)}"
                if step is not None else f"could not finish writing to {self.directory}")
        self._error = CheckpointWriteError(
            f"{what}: {reason}. The last complete checkpoint is "
            f"{self.step_path(good[-1]) if good else 'none'}.")
        self._error.__cause__ = error
        raise self._error

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` into the structure, dtypes and shardings of the `like` tree.

        Raises StructureMismatchError (a ValueError) naming the key paths if the saved tree
        differs, and DamagedCheckpointError naming the path if the step cannot be read or its
        data differs from its fingerprint. Nothing is moved (see `restore_latest`).
        """
        self.check_structure(step, like)
        where = self.step_path(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_like(like)),
                    data=ocp.args.JsonRestore()),
            )
        except jax.errors.JaxRuntimeError:
            raise  # the device (out of memory...), not the files
        except Exception as e:  # noqa: BLE001 (tensorstore raises bare Exceptions)
            reason = f"cannot read the arrays ({type(e).__name__}: {_first_line(e)})"
            raise DamagedCheckpointError(f"checkpoint {where} is damaged: {reason}",
                                         path=where, reason=reason) from e
        state = copy_tree(restored["state"])
        return state, _verify(state, restored["data"], where)

    def restore_latest(self, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data) of the newest intact step, or None if there is no step.

        Damaged steps are logged, moved to `damaged_directory` and skipped, as long as an older
        intact step remains; if none does, raises DamagedCheckpointError naming every damaged
        path and moves nothing (never a silent fresh start). See the module docstring.
        """
        steps = sorted(self.all_steps(), reverse=True)
        damaged: list[DamagedCheckpointError] = []
        for step in steps:
            try:
                state, data = self.restore(step, like)
                error = None
            except DamagedCheckpointError as e:
                error = e
            if _agree_damaged(error is not None):
                error = error or DamagedCheckpointError(
                    f"checkpoint {self.step_path(step)} is damaged on another process",
                    path=self.step_path(step), reason="damaged on another process")
                log.warning("%s; trying the previous step", error)
                damaged.append(error)
                continue
            for e in damaged:
                moved = self._move_aside(e.path)
                log.warning("moved damaged checkpoint %s to %s (reason: %s); resuming from %s",
                            e.path, moved, e.reason, self.step_path(step))
            if damaged:
                self._manager.reload()
            return step, state, data
        if damaged:
            raise DamagedCheckpointError(
                f"no intact checkpoint under {self.directory}; every step is damaged:\n  "
                + "\n  ".join(f"{e.path}: {e.reason}" for e in damaged)
                + "\nNothing was moved or deleted. Inspect or remove them; jaxvision will not "
                  "start this run from scratch on its own.",
                path=self.directory, reason="every step is damaged")
        return None

    def _move_aside(self, path: str) -> str:
        """Moves a damaged step directory into `damaged_directory` (process 0 only)."""
        target = os.path.join(self.damaged_directory, os.path.basename(path))
        n = 0
        while os.path.exists(target):  # the same step number damaged twice: keep both
            n += 1
            target = os.path.join(self.damaged_directory, f"{os.path.basename(path)}.{n}")
        if jax.process_index() == 0:
            os.makedirs(self.damaged_directory, exist_ok=True)
            os.replace(path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxvision_checkpoint_move_{path}")
        return target

    def check_structure(self, step: int, like: Any) -> None:
        """Raises StructureMismatchError naming each key path whose presence, shape or dtype
        differs on disk (DamagedCheckpointError if the step's metadata cannot be read).

        A dtype change is refused rather than cast: restoring float32 parameters into a
        bfloat16 state would silently drop bits, and the resumed run would not be the run
        that was saved."""
        where = self.step_path(step)
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 (tensorstore raises bare Exceptions)
            reason = (f"cannot read the state's metadata or array index ({type(e).__name__}: "
                      f"{_first_line(e)})")
            raise DamagedCheckpointError(f"checkpoint {where} is damaged: {reason}",
                                         path=where, reason=reason) from e
        if metadata is None:  # orbax returns None when state/_METADATA is gone
            reason = "the state's metadata is missing (state/_METADATA)"
            raise DamagedCheckpointError(f"checkpoint {where} is damaged: {reason}",
                                         path=where, reason=reason)
        saved = _flat_shapes(metadata.tree)
        mine = _flat_shapes(like)
        problems = []
        for path in sorted(set(saved) | set(mine)):
            if path not in mine:
                problems.append(f"{path}: in the checkpoint, not in this run's state")
            elif path not in saved:
                problems.append(f"{path}: in this run's state, not in the checkpoint")
            elif saved[path][0] != mine[path][0]:
                problems.append(f"{path}: shape {saved[path][0]} in the checkpoint, "
                                f"{mine[path][0]} in this run's state")
            elif saved[path][1] != mine[path][1]:
                problems.append(f"{path}: dtype {saved[path][1]} in the checkpoint, "
                                f"{mine[path][1]} in this run's state")
        if problems:
            raise StructureMismatchError(
                f"checkpoint {where} does not match this run's state (a changed "
                "model or optimizer?):\n  " + "\n  ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _agree_damaged(damaged_here: bool) -> bool:
    """True if any process found the step damaged (all processes take the same branch)."""
    if jax.process_count() == 1:
        return damaged_here
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(damaged_here))))


def _committed_steps(directory: str) -> list[int]:
    """Complete steps on disk (names that are plain integers), ascending."""
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except OSError:
        return []


def _first_line(e: BaseException, limit: int = 600) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return text if len(text) <= limit else text[:limit] + "..."


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    # Named handlers let a new process read a step's metadata before restoring it.
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key path: (shape, dtype name)} of every array-like leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in flat if hasattr(leaf, "shape")}


def _path_str(path) -> str:
    """'params.conv_0_0.kernel': dict keys, attribute names and indices joined by dots."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def load_latest(directory: str) -> tuple[int, Any, dict[str, Any]]:
    """(step, state as numpy, data position) of the latest intact checkpoint under `directory`.

    No target structure is needed: for notebooks, plots and comparing runs on one host. Steps
    are verified against their fingerprints; a damaged one is skipped with a warning (nothing
    is moved: this function only reads). To train on, restore with `Checkpointer.restore_latest`
    into a created state instead (shardings, structure checks, damaged steps moved aside).
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_item_handlers())
    try:
        damaged = []
        for step in sorted(manager.all_steps(), reverse=True):
            where = os.path.join(os.path.abspath(directory), str(step))
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
                state = jax.device_get(restored["state"])
                return step, state, _verify(state, restored["data"], where)
            except DamagedCheckpointError as e:
                damaged.append(f"{where}: {e.reason}")
            except jax.errors.JaxRuntimeError:
                raise
            except Exception as e:  # noqa: BLE001
                damaged.append(f"{where}: cannot read it ({type(e).__name__}: {_first_line(e)})")
            log.warning("skipping damaged checkpoint %s", damaged[-1])
        if damaged:
            raise DamagedCheckpointError(
                f"no intact checkpoint under {directory}:\n  " + "\n  ".join(damaged),
                path=os.path.abspath(directory), reason="every step is damaged")
        raise FileNotFoundError(f"no checkpoint under {directory}")
    finally:
        manager.close()
