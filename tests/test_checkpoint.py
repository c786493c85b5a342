"""Checkpoints: round trip, interrupted-then-resumed equals uninterrupted (bitwise), retention,
structure mismatches named by key path, restore onto another device count."""
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import loop, train
from jaxvision.checkpoint import Checkpointer
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines.loader import DeviceLoader
from jaxvision.sharding import make_mesh
from test_train import MODEL, pieces
from tiny_task import tiny_source


def fresh_state(mesh=None, model=MODEL):
    tx, step, _ = pieces()
    mesh = mesh or make_mesh()
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    return state, step, mesh


def test_round_trip_is_bitwise(tmp_path):
    state, step, mesh = fresh_state()
    loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh)
    for _, batch in loader.iterate(0, 3):
        state, _ = jax.jit(step)(state, batch)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, state, {"loader": loader.state_dict(3)})
    ckpt.wait()
    like, _, _ = fresh_state()
    restored, data = ckpt.restore(3, like)
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    assert data == {"loader": loader.state_dict(3)}
    assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(lambda x: x.sharding, like)


class Interrupt(Exception):
    pass


class InterruptingLoader:
    """Wraps a loader and raises when batch `at` is requested, like a crash mid-run."""

    def __init__(self, inner, at):
        self.inner, self.at = inner, at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iterate(self, start=0, stop=None):
        for b, batch in self.inner.iterate(start, stop):
            if b == self.at:
                raise Interrupt(f"crash before batch {b}")
            yield b, batch


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    def run(workdir, interrupt_at=None):
        state, step, mesh = fresh_state()
        loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=3)
        if interrupt_at is not None:
            loader = InterruptingLoader(loader, interrupt_at)
        return loop.run(state=state, train_step=step, loader=loader, steps=17,
                        workdir=str(workdir), ckpt_every=5, log_every=3, progress=False)

    straight, _ = run(tmp_path / "straight")
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", interrupt_at=13)  # dies 3 steps after the save at step 10
    resumed, summary = run(tmp_path / "resumed")
    assert summary["resumed_from"] == 10
    # Every leaf, bitwise: params, batch stats, optimizer state, step, RNG.
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(straight))
    # The line logged at step 12 before the crash was dropped on resume and written again.
    steps = [m["step"] for m in loop.read_metrics(str(tmp_path / "resumed"))]
    assert steps == [3, 6, 9, 12, 15, 17]


def test_finished_run_reruns_without_training(tmp_path):
    state, step, mesh = fresh_state()
    loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh)
    first, _ = loop.run(state=state, train_step=step, loader=loader, steps=4,
                        workdir=str(tmp_path), progress=False)
    state2, _, _ = fresh_state()
    again, summary = loop.run(state=state2, train_step=step, loader=loader, steps=4,
                              workdir=str(tmp_path), progress=False)
    assert summary["resumed_from"] == 4
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(first))


def test_retention_keeps_the_last_n(tmp_path):
    state, _, _ = fresh_state()
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for s in (1, 2, 3, 4):
        ckpt.save(s, state, {"s": s})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    ckpt.close()


def test_restore_into_a_different_structure_names_the_key_path(tmp_path):
    state, _, _ = fresh_state()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, state, {})
    ckpt.wait()
    wider, _, _ = fresh_state(model=ConvNet(widths=(8, 32), num_classes=4))
    with pytest.raises(ValueError, match=r"params\.conv_1_0\.kernel: shape \(3, 3, 8, 16\) in the "
                                         r"checkpoint, \(3, 3, 8, 32\) in this run's state"):
        ckpt.restore(1, wider)
    deeper, _, _ = fresh_state(model=ConvNet(widths=(8, 16, 16), num_classes=4))
    with pytest.raises(ValueError, match=r"params\.conv_2_0\.kernel: in this run's state, not in "
                                         r"the checkpoint"):
        ckpt.restore(1, deeper)
    # A dtype change is refused, not cast (a cast would resume a different run).
    half = dict(state, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), state["params"]))
    with pytest.raises(ValueError, match=r"params\.conv_0_0\.kernel: dtype float32 in the "
                                         r"checkpoint, bfloat16 in this run's state"):
        ckpt.restore(1, half)
    ckpt.close()


def test_restore_across_device_counts(tmp_path):
    state8, _, _ = fresh_state(make_mesh())
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, state8, {})
    ckpt.wait()
    like1, _, mesh1 = fresh_state(make_mesh(jax.devices()[:1]))
    restored, _ = ckpt.restore(1, like1)
    ckpt.close()
    leaf = restored["params"]["conv_0_0"]["kernel"]
    assert leaf.sharding.device_set == {jax.devices()[0]}
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state8))


def test_non_finite_state_is_refused(tmp_path):
    state, _, _ = fresh_state()
    state["params"]["head"]["bias"] = state["params"]["head"]["bias"].at[0].set(np.nan)
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(FloatingPointError, match="refusing to save step 7"):
        ckpt.save(7, state, {})
    assert ckpt.latest_step() is None
    ckpt.close()


class SigtermLoader(InterruptingLoader):
    """Sends this process a SIGTERM (a preemption notice) when batch `at` is requested."""

    def iterate(self, start=0, stop=None):
        for b, batch in self.inner.iterate(start, stop):
            if b == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b, batch


def test_sigterm_saves_at_the_next_step_and_resumes_bitwise(tmp_path):
    def run(workdir, loader_wrapper=None):
        state, step, mesh = fresh_state()
        loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=3)
        if loader_wrapper is not None:
            loader = loader_wrapper(loader)
        return loop.run(state=state, train_step=step, loader=loader, steps=12,
                        workdir=str(workdir), ckpt_every=0, log_every=4, progress=False)

    straight, _ = run(tmp_path / "straight")
    with pytest.raises(loop.Preempted) as e:
        run(tmp_path / "preempted", lambda inner: SigtermLoader(inner, at=6))
    assert e.value.step == 7 and e.value.code == 143  # batch 6 is step 7: saved right after it
    assert Checkpointer(str(tmp_path / "preempted" / "checkpoints")).all_steps() == [7]
    resumed, summary = run(tmp_path / "preempted")
    assert summary["resumed_from"] == 7
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(straight))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed
