"""Makes the golden checkpoint that tests/test_topology.py restores with the current code.

    python tests/golden/make_golden.py      # once; commit tests/golden/ (a few KB)

The checkpoint (tests/golden/checkpoint/2) is a tiny train state after 2 Adam steps, written by
`jaxvision.checkpoint.Checkpointer` with the orbax-checkpoint of the day (made_with.json says which
versions). expected.npz holds every leaf as saved, keyed by its path, and expected_data.json the
data position saved with it. If a dependency upgrade (orbax, optax's state layout, flax) stops
this checkpoint from restoring, or restores other values, the test fails: a user's checkpoints
from before the upgrade would be lost the same way. Do not remake it to make that test pass;
remake it only on purpose (a deliberate format change), and say so in the commit.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP = 2
INPUT_SHAPE = (8, 8, 3)


def model_and_tx():
    """The net and optimizer the golden state belongs to (imported by the test too)."""
    from jaxvision import optim
    from jaxvision.nets.convnet import ConvNet

    model = ConvNet(widths=(4,), num_classes=3)
    tx = optim.make_optimizer(name="adam", learning_rate=0.01, weight_decay=1e-4)
    return model, tx


def batch(n: int = 4):
    """A fixed batch: images uint8 [n, 8, 8, 3], labels int32 [n], mask float32 [n]."""
    import numpy as np

    rng = np.random.default_rng(7)
    return {"image": rng.integers(0, 256, (n, *INPUT_SHAPE), dtype=np.uint8),
            "label": (np.arange(n) % 3).astype(np.int32), "mask": np.ones(n, np.float32)}


def flat(tree) -> dict:
    """{"params/conv_0_0/kernel": numpy array, ...}: every leaf of `tree`, keyed by its path."""
    import jax
    import numpy as np

    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {"/".join(_key(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


def _key(k) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    from jaxvision import losses, train
    from jaxvision.checkpoint import Checkpointer
    from jaxvision.sharding import global_batch, make_mesh

    mesh = make_mesh()
    model, tx = model_and_tx()
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=INPUT_SHAPE,
                                     mesh=mesh)

    def loss_fn(*, logits, labels):
        return losses.softmax_cross_entropy(logits=logits, labels=labels)

    step = jax.jit(train.make_classifier_step(
        model=model, tx=tx, schedule=lambda s: 0.01,
        preprocess=lambda x, *, key, train: x.astype("float32") / 255.0, loss_fn=loss_fn))
    for _ in range(STEP):
        state, _ = step(state, global_batch(batch(), mesh))
    data = {"loader": {"next_batch": STEP, "num_examples": 4, "batch_size": 4, "seed": 0,
                       "shuffle": True}}

    ckpt_dir = HERE / "checkpoint"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt = Checkpointer(str(ckpt_dir), async_save=False)
    ckpt.save(STEP, state, data)
    ckpt.close()
    np.savez(HERE / "expected.npz", **flat(state))
    (HERE / "expected_data.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    versions = {p: importlib.metadata.version(p)
                for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")}
    made = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0],
            "versions": versions, "step": STEP}
    (HERE / "made_with.json").write_text(json.dumps(made, indent=2) + "\n")
    size = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {ckpt_dir} and expected values; tests/golden holds {size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
