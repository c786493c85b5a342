"""Transfer learning: path rules, freezing that really freezes, per-group learning rates, last-k
stages, features on disk and the linear classifier on them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision import losses, optim, train, transfer
from jaxvision.nets import resnet
from tests.nets_testing import fill_variables

# A tiny CIFAR-layout ResNet: stem, 2 stages of one block (projection shortcut in stage 2), head.
TinyNet = functools.partial(resnet.ResNet, stage_sizes=(1, 1), widths=(4, 8), stem="cifar",
                            stem_width=4, shortcut="B", num_classes=3)
IMAGE = (8, 8, 3)


def _variables(model, seed=0):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE)), train=False))
    return fill_variables(shapes, seed=seed, gain=np.sqrt(2))


def _preprocess(images, *, key, train):
    del key, train
    return images.astype(jnp.float32) / 255.0 - 0.5


def _sizes(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# ---- path rules ------------------------------------------------------------------------------


def test_path_labels_first_match_wins_and_default():
    params = _variables(TinyNet())["params"]
    labels = transfer.path_labels(
        params, [("^head/", "head"), (r"^stage_2_.*/kernel$", "s2k"), ("^stage_2_", "s2")],
        default="body")
    assert labels["head"] == {"kernel": "head", "bias": "head"}
    assert labels["stage_2_block_1"]["conv_1"]["kernel"] == "s2k"
    assert labels["stage_2_block_1"]["shortcut_conv"]["kernel"] == "s2k"
    assert labels["stage_2_block_1"]["bn_1"]["scale"] == "s2"  # not a kernel: the next rule
    assert labels["stem_conv"]["kernel"] == "body"
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert transfer.leaf_paths({"a": {"b": 1}, "c": [2, 3]}) == ["a/b", "c/0", "c/1"]


def test_path_labels_typo_and_unmatched_errors():
    params = _variables(TinyNet())["params"]
    with pytest.raises(ValueError, match=r"\['\^stage_9_', 'haed'\] match no parameter"):
        transfer.path_labels(params, [("^stage_9_", "x"), ("^head/", "h"), ("haed", "y")],
                             default="body")
    with pytest.raises(ValueError, match="match none of the rules .* no default label"):
        transfer.path_labels(params, [("^head/", "h")])
    with pytest.raises(ValueError, match="match no parameter"):
        transfer.freeze(optax.sgd(0.1), ["^head/", "stage_7"]).init(params)
    with pytest.raises(ValueError, match=r"labels \['c'\] of the rules have no optimizer"):
        transfer.multi_lr({"a": optax.sgd(0.1)}, [("^head/", "c")], default="a")


# ---- freezing really freezes -----------------------------------------------------------------


@pytest.mark.parametrize("use_inference_mode", [False, True])
def test_freeze_keeps_frozen_params_bitwise_through_classifier_steps(use_inference_mode):
    model = TinyNet()
    variables = _variables(model, seed=1)
    params = variables["params"]
    # SGD + momentum + (coupled) weight decay: decay alone would move a frozen leaf if it were
    # applied outside the trainable group.
    inner = optim.make_optimizer(name="momentum", learning_rate=0.1, momentum=0.9,
                                 weight_decay=1e-2, decay_mask=None)
    tx = transfer.freeze(inner, ["^stage_2_", "^head/"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": variables["batch_stats"], "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    mask = transfer.trainable_mask(params, ["^stage_2_", "^head/"])
    # The optimizer holds momentum for the trainable leaves only.
    trainable_size = _sizes([p for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                             if t])
    assert 0 < trainable_size < _sizes(params)
    assert _sizes(state["opt_state"]) == trainable_size

    net = transfer.inference_mode(model) if use_inference_mode else model
    step = jax.jit(train.make_classifier_step(
        model=net, tx=tx, schedule=optax.constant_schedule(0.1), preprocess=_preprocess,
        loss_fn=losses.softmax_cross_entropy))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (6, *IMAGE), dtype=np.uint8),
             "label": rng.integers(0, 3, 6).astype(np.int32), "mask": np.ones(6, np.float32)}
    new = state
    for _ in range(3):
        new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"]))
    for path, before, after, trainable in zip(
            transfer.leaf_paths(params), jax.tree.leaves(params),
            jax.tree.leaves(new["params"]), jax.tree.leaves(mask)):
        if trainable:
            assert not np.array_equal(before, after), path
        else:
            np.testing.assert_array_equal(np.asarray(before), np.asarray(after), err_msg=path)
    stats_same = jax.tree.map(np.array_equal, variables["batch_stats"], new["batch_stats"])
    # Inference mode: no running statistic moves; training mode: they all do (BN is not frozen
    # by freezing its scale and offset: see the transfer module docstring).
    expected = {True} if use_inference_mode else {False}
    assert set(jax.tree.leaves(stats_same)) == expected


def test_multi_lr_updates_are_minus_lr_times_grad_per_group():
    params = _variables(TinyNet())["params"]
    a, b = 0.01, 0.3
    tx = transfer.multi_lr({"body": optax.sgd(a), "head": optax.sgd(b), "stem": None},
                           [("^head/", "head"), ("^stem_", "stem")], default="body")
    grads = fill_variables(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                        params), seed=3)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, g, u in zip(transfer.leaf_paths(params), jax.tree.leaves(grads),
                          jax.tree.leaves(updates)):
        g, u = np.asarray(g), np.asarray(u)
        if path.startswith("head/"):
            np.testing.assert_allclose(u, -b * g, rtol=1e-6, err_msg=path)
        elif path.startswith("stem_"):
            np.testing.assert_array_equal(u, np.zeros_like(g), err_msg=path)
        else:
            np.testing.assert_allclose(u, -a * g, rtol=1e-6, err_msg=path)


# ---- last k stages ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110"])
def test_last_stages_trainable_on_cifar_resnet(name):
    model = resnet.VARIANTS[name]()
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))["params"]
    assert transfer.resnet_stages(params) == ["stage_1_", "stage_2_", "stage_3_"]
    for k in range(4):
        mask = transfer.last_stages_trainable(params, k)
        for top, sub in mask.items():
            stage = int(top.split("_")[1]) if top.startswith("stage_") else None
            expected = (top in ("head", "final_bn")
                        or (stage is not None and stage > 3 - k))
            assert set(jax.tree.leaves(sub)) == {expected}, (k, top)
    assert "final_bn" in params or name == "resnet20"
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        transfer.last_stages_trainable(params, 4)


# ---- features on disk, linear classifier -----------------------------------------------------


def test_extract_features_npz_round_trip(tmp_path):
    model = TinyNet()
    variables = _variables(model, seed=2)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, *IMAGE), dtype=np.uint8)
    labels = rng.integers(0, 3, 7)
    path = tmp_path / "f" / "feats.npz"
    feats = transfer.extract_features(model, state, images, _preprocess, labels=labels,
                                      batch_size=3, path=path, progress=False)  # 3 + 3 + 1 (pad)
    loaded, loaded_labels = transfer.load_features(path)
    _, acts = model.apply(variables, _preprocess(images, key=None, train=False), train=False)
    assert loaded.shape == (7, 8) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, feats)
    np.testing.assert_array_equal(loaded_labels, labels)
    np.testing.assert_allclose(loaded, np.asarray(acts["features"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 32])
def test_linear_classifier_learns_separable_toy_set(batch_size):
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((4, 10)) * 4
    labels = rng.integers(0, 4, 400)
    feats = centres[labels] + rng.standard_normal((400, 10)) * 0.5
    w, accuracy = transfer.train_linear_on_features(
        feats[:300], labels[:300], num_classes=4, lr=0.05, steps=200, batch_size=batch_size)
    assert w["w"].shape == (10, 4) and w["b"].shape == (4,)
    assert accuracy(feats[:300], labels[:300]) == 1.0
    assert accuracy(feats[300:], labels[300:]) == 1.0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        transfer.train_linear_on_features(feats, labels, num_classes=3)
