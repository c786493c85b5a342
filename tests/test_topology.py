"""Checkpoints across topologies and dependency versions.

- A state sharded over 8 devices (FSDP over the "data" mesh) restores bitwise in a process that
  has 1 device, and a 1-device state restores bitwise into 8 shards. The device count is fixed
  when jax starts, so the 1-device side is a subprocess (this file run as a script).
- A changed optimizer (momentum -> adam, momentum -> sgd) fails naming the key paths
  (tests/test_checkpoint.py covers a wider and a deeper net).
- tests/golden/: a checkpoint written once with an older stack (see made_with.json) restores with
  the current code to exactly its stored values.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from golden import make_golden  # tests/golden/make_golden.py (tests/ is on the path)
from jaxvision import optim, train
from jaxvision.checkpoint import Checkpointer
from jaxvision.nets.convnet import ConvNet
from jaxvision.sharding import make_mesh, state_shardings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEP = 2
INPUT_SHAPE = (8, 8, 3)


def _model_and_tx(optimizer="momentum"):
    # conv_1_0's kernel (3, 3, 16, 128) has 18,432 elements, over FSDP's 2**14 threshold: it and
    # its momentum are split 8 ways; the small leaves stay replicated.
    model = ConvNet(widths=(16, 128), num_classes=4)
    return model, optim.make_optimizer(name=optimizer, learning_rate=0.1, weight_decay=1e-4)


def _state(mesh, optimizer="momentum", seed=0):
    """A state with the structure, dtypes and shardings `train.create_train_state(fsdp=True)`
    gives (`jax.eval_shape` of it, `sharding.state_shardings`), every leaf filled with random
    values: no two leaves alike and no zeros (a fresh optimizer state is all zeros, which a
    broken restore could match by chance), and nothing to compile."""
    model, tx = _model_and_tx(optimizer)
    abstract = jax.eval_shape(lambda: train.create_train_state(
        model=model, tx=tx, seed=0, input_shape=INPUT_SHAPE, mesh=mesh, fsdp=True))
    shardings = state_shardings(abstract, mesh, fsdp=True)
    rng = np.random.default_rng(seed)

    def leaf(x, sharding):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            value = rng.standard_normal(x.shape).astype(x.dtype)
        else:
            value = rng.integers(1, 2**31 - 1, x.shape).astype(x.dtype)
        return jax.device_put(value, sharding)

    return jax.tree.map(leaf, abstract, shardings)


def _save(directory, state):
    ckpt = Checkpointer(str(directory))
    ckpt.save(STEP, state, {"devices": jax.device_count()})
    ckpt.close()
    np.savez(f"{directory}.npz", **make_golden.flat(state))


def _restore_and_compare(directory, like) -> tuple[dict, dict, int]:
    """Restores STEP of `directory` into `like`; asserts every leaf equals the saved one, bit
    for bit. Returns the restored state, its data dict and the number of leaves compared."""
    ckpt = Checkpointer(str(directory))
    restored, data = ckpt.restore(STEP, like)
    ckpt.close()
    return restored, data, _assert_bitwise(restored, f"{directory}.npz")


def _assert_bitwise(tree, npz) -> int:
    """Asserts the leaves of `tree` equal those stored in `npz` (same paths, dtypes, shapes and
    bytes); returns how many leaves were compared."""
    got = make_golden.flat(tree)
    with np.load(npz) as z:
        want = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert got[key].tobytes() == want[key].tobytes(), f"{key} differs from {npz}"
    return len(want)


def child(ck8: str, ck1: str) -> None:
    """The 1-device side (a fresh process): restore the 8-device checkpoint, save its own."""
    assert jax.device_count() == 1, jax.devices()
    mesh = make_mesh()
    restored, data, n = _restore_and_compare(ck8, _state(mesh, seed=2))
    assert data == {"devices": 8}
    kernel = restored["params"]["conv_1_0"]["kernel"]
    assert kernel.sharding.device_set == {jax.devices()[0]}
    print(f"8 -> 1 device: {n} leaves restored bitwise; conv_1_0 kernel {kernel.shape} whole on "
          f"{jax.devices()[0]}")
    _save(ck1, _state(mesh, seed=1))


@pytest.fixture(scope="module")
def one_device_child(tmp_path_factory):
    """Saves an 8-device checkpoint here, runs the 1-device child on it; returns the dirs."""
    root = tmp_path_factory.mktemp("topology")
    state = _state(make_mesh(), seed=0)
    kernel = state["params"]["conv_1_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "data")
    _save(root / "ck8", state)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, __file__, str(root / "ck8"), str(root / "ck1")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return root, out


def test_8_devices_restore_bitwise_on_1(one_device_child):
    _, out = one_device_child
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("8 -> 1 device"))
    print(line)


def test_1_device_restores_bitwise_into_8_shards(one_device_child):
    root, out = one_device_child
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    restored, data, n = _restore_and_compare(root / "ck1", _state(make_mesh(), seed=3))
    assert data == {"devices": 1}
    kernel = restored["params"]["conv_1_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 16, 16)}
    print(f"1 -> 8 devices: {n} leaves restored bitwise; conv_1_0 kernel split into 8 shards of "
          f"(3, 3, 16, 16)")


@pytest.fixture(scope="module")
def momentum_checkpoint(tmp_path_factory):
    """A checkpoint of a momentum-SGD state (on one device: the structure check does not depend
    on the device count)."""
    directory = tmp_path_factory.mktemp("momentum")
    ckpt = Checkpointer(str(directory))
    ckpt.save(1, _state(make_mesh(jax.devices()[:1])), {})
    ckpt.close()
    return directory


@pytest.mark.parametrize("optimizer, path, where", [
    ("adam", "opt_state.1.mu.conv_0_0.kernel", "in this run's state, not in the checkpoint"),
    ("sgd", "opt_state.1.trace.conv_0_0.kernel", "in the checkpoint, not in this run's state"),
])
def test_changed_optimizer_fails_naming_the_key_path(momentum_checkpoint, optimizer, path, where):
    ckpt = Checkpointer(str(momentum_checkpoint))
    with pytest.raises(ValueError) as e:
        ckpt.restore(1, _state(make_mesh(jax.devices()[:1]), optimizer=optimizer))
    ckpt.close()
    print(str(e.value).splitlines()[0], "/", f"{path}: {where}")
    assert "does not match this run's state" in str(e.value)
    assert f"{path}: {where}" in str(e.value)


def test_golden_checkpoint_restores_with_the_current_code(tmp_path):
    """Written once by tests/golden/make_golden.py (1 device); restored here on 8."""
    golden = HERE / "golden"
    shutil.copytree(golden / "checkpoint", tmp_path / "checkpoint")  # never touch the original
    model, tx = make_golden.model_and_tx()
    like = train.create_train_state(model=model, tx=tx, seed=123, input_shape=INPUT_SHAPE,
                                    mesh=make_mesh())
    ckpt = Checkpointer(str(tmp_path / "checkpoint"))
    assert ckpt.latest_step() == make_golden.STEP
    restored, data = ckpt.restore(make_golden.STEP, like)
    ckpt.close()
    n = _assert_bitwise(restored, golden / "expected.npz")
    assert data == json.loads((golden / "expected_data.json").read_text())
    made = json.loads((golden / "made_with.json").read_text())
    print(f"golden checkpoint made with orbax-checkpoint {made['versions']['orbax-checkpoint']} "
          f"(jax {made['versions']['jax']}, optax {made['versions']['optax']}): {n} "
          f"leaves equal bitwise")


if __name__ == "__main__":
    child(*sys.argv[1:])
