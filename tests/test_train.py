"""The train step and state: sharded equals single-device, shardings, no recompiles, seeds,
non-finite values stop the run naming the step."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import loop, losses, optim, train
from jaxvision.checkpoint import Checkpointer, NonFiniteError
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines.loader import DeviceLoader
from jaxvision.sharding import make_mesh
from tiny_task import preprocess, tiny_source

MODEL = ConvNet(widths=(8, 16), num_classes=4)


def pieces(lr=0.1, schedule=None):
    schedule = schedule or optim.make_schedule(kind="constant", lr=lr, steps=100)
    tx = optim.make_optimizer(name="momentum", learning_rate=schedule, weight_decay=1e-4)

    def loss_fn(*, logits, labels):
        return losses.softmax_cross_entropy(logits=logits, labels=labels)

    step = train.make_classifier_step(model=MODEL, tx=tx, schedule=schedule,
                                      preprocess=preprocess, loss_fn=loss_fn)
    return tx, step, loss_fn


def test_step_on_8_devices_equals_1_device():
    tx, step, _ = pieces()
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        state = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3),
                                         mesh=mesh)
        loader = DeviceLoader(tiny_source(), batch_size=16, mesh=mesh, seed=0)
        jstep = jax.jit(step)
        for _, batch in loader.iterate(0, 3):
            state, metrics = jstep(state, batch)
        results.append((jax.device_get(state), jax.device_get(metrics)))
    assert len(mesh.devices.flat) == 8
    # BatchNorm statistics over the global batch in both cases: no per-device pmean needed.
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_parameters_carry_the_expected_shardings():
    mesh = make_mesh()
    tx, _, _ = pieces()
    dp = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    for leaf in jax.tree.leaves(dp):
        assert leaf.sharding.is_fully_replicated
    big = ConvNet(widths=(64, 128), num_classes=4)
    fsdp = train.create_train_state(model=big, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh,
                                    fsdp=True)
    kernel = fsdp["params"]["conv_1_0"]["kernel"]  # (3, 3, 64, 128): split on its largest axis
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "data")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 64, 16)
    # The optimizer state (momentum) follows the parameters.
    traces = [x for x in jax.tree.leaves(fsdp["opt_state"]) if x.shape == kernel.shape]
    assert len(traces) == 1 and traces[0].sharding.spec == kernel.sharding.spec
    assert fsdp["params"]["head"]["bias"].sharding.is_fully_replicated  # small: replicated
    # Same initial values either way.
    dp_big = train.create_train_state(model=big, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(dp_big["params"]["conv_1_0"]["kernel"]))


def test_no_recompile_across_an_epoch_with_a_partial_batch():
    mesh = make_mesh()
    tx, step, loss_fn = pieces()
    state = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    loader = DeviceLoader(tiny_source(44), batch_size=16, mesh=mesh, drop_remainder=False)
    assert loader.steps_per_epoch == 3  # 16 + 16 + 12 real rows
    jstep = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
    for _, batch in loader.iterate(0, 2 * loader.steps_per_epoch):
        state, _ = jstep(state, batch)
    eval_step = jax.jit(chex.assert_max_traces(
        train.make_classifier_eval(model=MODEL, preprocess=preprocess, loss_fn=loss_fn), n=1))
    result = train.evaluate(eval_step, state, loader.epoch())
    assert result["count"] == 44


def test_masked_rows_do_not_change_the_loss():
    """A padded row (mask 0) contributes nothing: same loss as the batch without it."""
    mesh = make_mesh()
    tx, step, _ = pieces()
    state = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    src = tiny_source(16)
    batch = {"image": jnp.asarray(src.images), "label": jnp.asarray(src.labels, jnp.int32),
             "mask": jnp.ones(16)}
    poisoned = dict(batch, image=batch["image"].at[-1].set(255), label=batch["label"].at[-1].set(0),
                    mask=batch["mask"].at[-1].set(0))
    eval_step = jax.jit(train.make_classifier_eval(
        model=MODEL, preprocess=preprocess,
        loss_fn=lambda **kw: losses.softmax_cross_entropy(**kw)))
    full = jax.device_get(eval_step(state, dict(batch, mask=batch["mask"].at[-1].set(0))))
    masked = jax.device_get(eval_step(state, poisoned))
    assert masked["count"] == 15
    np.testing.assert_allclose(masked["loss_sum"], full["loss_sum"], rtol=1e-6)


def run_tiny(tmp_path, *, seed=0, steps=12, name="run", **kw):
    mesh = make_mesh()
    tx, step, _ = pieces(**{k: kw.pop(k) for k in ("lr", "schedule") if k in kw})
    state = train.create_train_state(model=MODEL, tx=tx, seed=seed, input_shape=(8, 8, 3),
                                     mesh=mesh)
    loader = DeviceLoader(tiny_source(), batch_size=8, mesh=mesh, seed=seed)
    kw.setdefault("log_every", 4)
    return loop.run(state=state, train_step=step, loader=loader, steps=steps,
                    workdir=str(tmp_path / name), progress=False, **kw)


def test_same_seed_same_result_different_seed_different(tmp_path):
    a, _ = run_tiny(tmp_path, seed=0, name="a")
    b, _ = run_tiny(tmp_path, seed=0, name="b")
    c, _ = run_tiny(tmp_path, seed=1, name="c")
    chex.assert_trees_all_equal(jax.device_get(a["params"]), jax.device_get(b["params"]))
    assert not np.array_equal(np.asarray(a["params"]["head"]["kernel"]),
                              np.asarray(c["params"]["head"]["kernel"]))


def test_nan_stops_the_run_naming_the_step_and_is_never_saved(tmp_path):
    # The learning rate turns NaN from update 5 on: the state after update 6 is NaN, and the
    # loss of update 7 (computed from it) too.
    schedule = lambda s: jnp.where(s < 5, 0.1, jnp.nan)  # noqa: E731
    with pytest.raises(NonFiniteError, match="step 6") as e:
        run_tiny(tmp_path, schedule=schedule, ckpt_every=2, log_every=1)
    assert "refusing to save step 6" in str(e.value)
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.latest_step() == 4  # the last finite state; 6 was refused
    ckpt.close()


def test_nan_loss_names_the_step_between_logs(tmp_path):
    """Metrics are fetched every 4 steps, yet the error names the exact step."""
    schedule = lambda s: jnp.where(s < 5, 0.1, jnp.nan)  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"non-finite loss and grad_norm at step 7"):
        run_tiny(tmp_path, schedule=schedule, log_every=4)


def test_run_writes_metrics_and_summary(tmp_path):
    _, summary = run_tiny(tmp_path, steps=8, evaluate=lambda s: {"accuracy": 0.5})
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines if "train/loss" in m] == [4, 8]
    assert {"train/loss", "train/accuracy", "train/grad_norm", "train/param_norm",
            "train/update_norm", "train/lr"} <= set(lines[0])
    assert "train/images_per_s" in lines[-2]
    on_disk = json.load(open(tmp_path / "run" / "summary.json"))
    assert on_disk["eval"] == {"accuracy": 0.5} and on_disk["step"] == 8
    assert on_disk["versions"]["jax"] == jax.__version__
    assert "git_commit" in on_disk and len(on_disk["devices"]) == 8


def _one_step(**step_kw):
    mesh = make_mesh()
    schedule = optim.make_schedule(kind="constant", lr=0.1, steps=10)
    tx = optim.make_optimizer(name="sgd", learning_rate=schedule)
    state = train.create_train_state(model=MODEL, tx=tx, seed=0, input_shape=(8, 8, 3), mesh=mesh)
    step_kw.setdefault("loss_fn", losses.softmax_cross_entropy)
    step = jax.jit(train.make_classifier_step(model=MODEL, tx=tx, schedule=schedule,
                                              preprocess=preprocess, **step_kw))
    src = tiny_source(8)
    batch = {"image": jnp.asarray(src.images), "label": jnp.asarray(src.labels, jnp.int32),
             "mask": jnp.ones(8)}
    return state, step(state, batch)


def test_mix_hands_soft_labels_to_the_loss_and_one_hot_mix_changes_nothing():
    seen = {}

    def loss_fn(*, logits, labels):
        seen["labels"] = labels
        return losses.softmax_cross_entropy(logits=logits, labels=labels)

    def one_hot_mix(images, labels, *, key):  # a "mix" that mixes nothing
        return images, jax.nn.one_hot(labels, 4)

    _, (plain, m_plain) = _one_step()
    _, (mixed, m_mixed) = _one_step(mix=one_hot_mix, loss_fn=loss_fn)
    assert seen["labels"].shape == (8, 4)
    chex.assert_trees_all_close(mixed["params"], plain["params"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m_mixed["accuracy"], m_plain["accuracy"])


def test_loss_can_read_the_activations():
    """With loss_takes_acts the loss sees `acts` and its gradient reaches the net through them
    (how GoogLeNet's auxiliary classifiers are trained)."""
    def loss_fn(*, logits, labels, acts):
        # Only the features: the head gets no gradient, the convs do.
        return jnp.sum(acts["features"] ** 2, axis=-1) + 0.0 * logits[:, 0]

    state, (new, _) = _one_step(loss_fn=loss_fn, loss_takes_acts=True)
    np.testing.assert_array_equal(new["params"]["head"]["kernel"], state["params"]["head"]["kernel"])
    assert not np.array_equal(new["params"]["conv_0_0"]["kernel"],
                              state["params"]["conv_0_0"]["kernel"])


def test_soft_labels_in_the_loss_and_accuracy():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    labels = jnp.asarray([0, 3, 1, 1, 2])
    hard = losses.softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=0.1)
    soft = losses.softmax_cross_entropy(logits=logits, labels=jax.nn.one_hot(labels, 4),
                                        label_smoothing=0.1)
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    # Mixup's targets: the loss is linear in the target distribution.
    other = jnp.asarray([2, 2, 0, 3, 1])
    mixed = 0.3 * jax.nn.one_hot(labels, 4) + 0.7 * jax.nn.one_hot(other, 4)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits=logits, labels=mixed),
        0.3 * losses.softmax_cross_entropy(logits=logits, labels=labels)
        + 0.7 * losses.softmax_cross_entropy(logits=logits, labels=other), rtol=1e-6)
    np.testing.assert_array_equal(losses.accuracy(logits=logits, labels=mixed),
                                  losses.accuracy(logits=logits, labels=other))
    with pytest.raises(ValueError, match="soft labels must have the logits' shape"):
        losses.softmax_cross_entropy(logits=logits, labels=jnp.ones((5, 3)))
