"""jaxvision.evaluation: TTA views against slices, TTA of a linear net against the net on the
averaged view, ensembles against hand averages and loops, snapshot loading round-trips real
checkpoints. Tiny nets; variables from numpy (`fill_variables`), no flax init compiles."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import evaluation, losses, train
from jaxvision.checkpoint import Checkpointer
from jaxvision.nets.convnet import ConvNetTiny
from nets_testing import fill_variables

K = 4
CONV = ConvNetTiny(num_classes=K)


class LinearNet(nn.Module):
    """Logits linear in the input: `flatten(x) @ W + b`; returns (logits, acts) like the nets."""

    num_classes: int = K

    @nn.compact
    def __call__(self, x, *, train):
        logits = nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
        return logits, {}


def conv_variables(seed, hw=8):
    shapes = jax.eval_shape(lambda x: CONV.init(jax.random.PRNGKey(0), x, train=False),
                            jnp.zeros((1, hw, hw, 3)))
    return fill_variables(shapes, seed=seed, gain=np.sqrt(2))


def conv_state(seed):
    v = conv_variables(seed)
    return {"step": jnp.asarray(seed, jnp.int32), "params": v["params"],
            "batch_stats": v["batch_stats"], "opt_state": {"mu": v["params"]},
            "rng": jnp.asarray([0, seed], jnp.uint32)}


def preprocess(images, *, key, train):
    return images.astype(jnp.float32) / 255.0 - 0.5


def loss_fn(*, logits, labels):
    return losses.softmax_cross_entropy(logits=logits, labels=labels)


def batches(seed, n=12, hw=8, batch_size=8):
    """Uint8 batches padded to `batch_size` with mask 0, as the loader yields them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
    labels = rng.integers(0, K, n)
    out = []
    for start in range(0, n, batch_size):
        img, lab = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(img)
        out.append({"image": jnp.asarray(np.pad(img, ((0, pad), (0, 0), (0, 0), (0, 0)))),
                    "label": jnp.asarray(np.pad(lab, (0, pad))),
                    "mask": jnp.asarray(np.r_[np.ones(len(img)), np.zeros(pad)], jnp.float32)})
    return images, labels, out


def hand_metrics(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                keepdims=True)) - logits.max(1, keepdims=True)
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return loss, np.mean(logits.argmax(1) == labels)


# --- views ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_flip_views_are_the_image_and_its_mirror(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(int(rng.integers(1, 4)), 5, int(rng.integers(3, 7)), 2)).astype(np.float32)
    views = np.asarray(evaluation.flip_views(jnp.asarray(x)))
    assert views.shape == (2,) + x.shape
    np.testing.assert_array_equal(views[0], x)
    for w in range(x.shape[2]):
        np.testing.assert_array_equal(views[1][:, :, w], x[:, :, x.shape[2] - 1 - w])


@pytest.mark.parametrize("seed", [0, 1])
def test_ten_crop_views_are_the_corners_centre_and_mirrors(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(6, 11)), int(rng.integers(6, 11))
    crop = int(rng.integers(2, min(h, w) + 1))
    x = rng.normal(size=(3, h, w, 2)).astype(np.float32)
    views = np.asarray(evaluation.ten_crop_views(jnp.asarray(x), crop=crop))
    assert views.shape == (10, 3, crop, crop, 2)
    expected = [x[:, :crop, :crop], x[:, :crop, w - crop:], x[:, h - crop:, :crop],
                x[:, h - crop:, w - crop:]]
    top, left = (h - crop) // 2, (w - crop) // 2
    expected.append(x[:, top:top + crop, left:left + crop])
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(views[i], e)
        np.testing.assert_array_equal(views[5 + i], e[:, :, ::-1])


def test_ten_crop_rejects_a_crop_larger_than_the_image():
    with pytest.raises(ValueError, match="crop must be in"):
        evaluation.ten_crop_views(jnp.zeros((1, 6, 8, 3)), crop=7)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        evaluation.flip_views(jnp.zeros((6, 8, 3)))


# --- TTA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("views_fn", [evaluation.flip_views,
                                      functools.partial(evaluation.ten_crop_views, crop=5)],
                         ids=["flip", "ten_crop"])
def test_tta_of_a_linear_net_is_the_net_on_the_mean_view(views_fn):
    model = LinearNet()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 7, 2))
    v = views_fn(x)
    variables = fill_variables(jax.eval_shape(
        lambda a: model.init(jax.random.PRNGKey(0), a, train=False), v[0]), seed=2)

    def apply_fn(a):
        return model.apply(variables, a, train=False)[0]

    got = evaluation.tta_logits(apply_fn, x, views_fn)
    np.testing.assert_allclose(got, apply_fn(jnp.mean(v, axis=0)), rtol=1e-5, atol=1e-5)
    # "probs": log of the mean softmax over the views.
    probs = jnp.mean(jax.nn.softmax(jnp.stack([apply_fn(view) for view in v]), axis=-1), axis=0)
    got = evaluation.tta_logits(apply_fn, x, views_fn, average="probs")
    np.testing.assert_allclose(jax.nn.softmax(got), probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, jnp.log(probs), rtol=1e-5, atol=1e-5)


def test_tta_eval_with_train_evaluate_equals_a_hand_computation():
    state = conv_state(0)
    images, labels, data = batches(0)
    step = jax.jit(evaluation.make_tta_eval(model=CONV, preprocess=preprocess, loss_fn=loss_fn,
                                            views_fn=evaluation.flip_views))
    got = train.evaluate(step, state, data)
    x = preprocess(jnp.asarray(images), key=None, train=False)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    logits = (CONV.apply(variables, x, train=False)[0]
              + CONV.apply(variables, x[:, :, ::-1], train=False)[0]) / 2
    loss, accuracy = hand_metrics(logits, labels)
    assert got["count"] == len(labels)
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], accuracy)


def test_bad_average_is_named():
    with pytest.raises(ValueError, match="average must be one of"):
        evaluation.tta_logits(lambda a: a, jnp.zeros((1, 2, 2, 1)), evaluation.flip_views,
                              average="mean")


# --- ensembles --------------------------------------------------------------------------------


def test_ensemble_logits_is_the_hand_average_of_separate_models():
    x = preprocess(jnp.asarray(batches(1)[0]), key=None, train=False)
    variables = [conv_variables(seed) for seed in range(3)]
    fns = evaluation.apply_fns_of(CONV, variables)
    separate = [np.asarray(CONV.apply(v, x, train=False)[0]) for v in variables]
    np.testing.assert_allclose(evaluation.ensemble_logits(fns, x), sum(separate) / 3,
                               rtol=1e-5, atol=1e-6)
    probs = sum(np.asarray(jax.nn.softmax(z)) for z in separate) / 3
    np.testing.assert_allclose(jax.nn.softmax(evaluation.ensemble_logits(fns, x,
                                                                         average="probs")),
                               probs, rtol=1e-5, atol=1e-7)


def test_vmapped_ensemble_eval_equals_a_loop_and_copies_equal_one_model():
    states = [conv_state(seed) for seed in range(3)]
    images, labels, data = batches(2)
    step = jax.jit(evaluation.make_ensemble_eval(model=CONV, preprocess=preprocess,
                                                 loss_fn=loss_fn))
    got = train.evaluate(step, evaluation.stack_states(states), data)
    x = preprocess(jnp.asarray(images), key=None, train=False)
    loop_logits = sum(np.asarray(CONV.apply(evaluation.variables_of(s), x, train=False)[0])
                      for s in states) / 3
    loss, accuracy = hand_metrics(loop_logits, labels)
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], accuracy)
    assert got["count"] == len(labels)

    # An ensemble of three copies of one model is that model (same compiled step: M = 3).
    copies = train.evaluate(step, evaluation.stack_states([states[1]] * 3), data)
    single = train.evaluate(jax.jit(train.make_classifier_eval(
        model=CONV, preprocess=preprocess, loss_fn=loss_fn)), states[1], data)
    np.testing.assert_allclose(copies["loss"], single["loss"], rtol=1e-5)
    assert copies["accuracy"] == single["accuracy"]


def test_stack_states_rejects_different_architectures():
    other = {"params": {"w": jnp.zeros((2, 3))}, "batch_stats": {}}
    with pytest.raises(ValueError, match="state 1 differs from state 0"):
        evaluation.stack_states([conv_state(0), other])


# --- snapshots --------------------------------------------------------------------------------


def test_snapshots_round_trip_real_checkpoints(tmp_path):
    states = {step: conv_state(step) for step in (10, 20, 30)}
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step, state in states.items():
        ckpt.save(step, state, {"epoch": step})
    ckpt.close()

    loaded = evaluation.load_snapshots(str(tmp_path))  # host numpy, all steps
    assert [s for s, _ in loaded] == [10, 20, 30]
    for step, state in loaded:
        chex.assert_trees_all_equal(state, jax.device_get(states[step]))

    like = jax.tree.map(jnp.zeros_like, states[10])
    loaded = evaluation.load_snapshots(str(tmp_path), steps=[30, 20], like=like)
    assert [s for s, _ in loaded] == [30, 20]
    for step, state in loaded:
        chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(states[step]))
    stacked = evaluation.stack_states([s for _, s in loaded])
    assert jax.tree.leaves(stacked)[0].shape[0] == 2

    with pytest.raises(FileNotFoundError, match=r"steps \[40\] are not saved.*\[10, 20, 30\]"):
        evaluation.load_snapshots(str(tmp_path), steps=[40])
