"""Checkpoints: the train state (a pytree of arrays) and the data position (JSON) of each saved
step, through orbax-checkpoint's `CheckpointManager`.

- Saves are asynchronous: `save` returns once the arrays are copied off the devices; the write
  runs in the background. A write error surfaces at the next `save`, `wait` or `close`, which
  raise it (never swallowed). `close` waits, so the final checkpoint is on disk at exit.
- A step is written to `STEP.orbax-checkpoint-tmp` and renamed when complete, so a process killed
  mid-save leaves the previous step as the latest; such leftovers are removed on start.
- Restores go into the shardings of a `like` tree (the freshly created state), so a checkpoint
  restores on any device count, and the structure is checked first: a different model or
  optimizer fails with the key paths that differ instead of loading into the wrong leaves.
- A non-finite state is refused (`NonFiniteError`): it never becomes the latest checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class NonFiniteError(FloatingPointError):
    """A loss, gradient or state with NaN or Inf; the message names the step."""


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
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data: dict[str, Any]) -> None:
        """Saves `state` and the JSON-able `data` as `step`; refuses a non-finite state."""
        if not bool(all_finite(state)):
            raise NonFiniteError(
                f"refusing to save step {step}: the train state holds NaN or Inf")
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(copy_tree(state)), data=ocp.args.JsonSave(data)),
            force=True,  # the loop decides when to save; orbax's own interval is not used
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` into the structure, dtypes and shardings of the `like` tree."""
        self.check_structure(step, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(like)), data=ocp.args.JsonRestore()),
        )
        return copy_tree(restored["state"]), dict(restored["data"])

    def check_structure(self, step: int, like: Any) -> None:
        """Raises ValueError naming each key path whose presence or shape differs on disk."""
        saved = _flat_shapes(self._manager.item_metadata(step)["state"].tree)
        mine = _flat_shapes(like)
        problems = []
        for path in sorted(set(saved) | set(mine)):
            if path not in mine:
                problems.append(f"{path}: in the checkpoint, not in this run's state")
            elif path not in saved:
                problems.append(f"{path}: in this run's state, not in the checkpoint")
            elif saved[path] != mine[path]:
                problems.append(f"{path}: shape {saved[path]} in the checkpoint, "
                                f"{mine[path]} in this run's state")
        if problems:
            raise ValueError(
                f"checkpoint {self.directory}/{step} does not match this run's state (a changed "
                "model or optimizer?):\n  " + "\n  ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))

    def wait(self) -> None:
        """Blocks until pending saves are written; raises a failed write's error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    # Named handlers let a new process read a step's metadata before restoring it.
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts)


def load_latest(directory: str) -> tuple[int, Any, dict[str, Any]]:
    """(step, state as numpy, data position) of the latest checkpoint under `directory`.

    No target structure is needed: for notebooks, plots and comparing runs on one host. To train
    on, restore with `Checkpointer.restore` into a created state instead (shardings, checks).
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_item_handlers())
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        return step, jax.device_get(restored["state"]), dict(restored["data"])
    finally:
        manager.close()
