"""Linear classifiers: loops == vectorised == jax.grad of an independent reference (the library
losses) == centred differences, for every loss and penalty; the course's sanity checks; SGD and
random search."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision import gradcheck, linear, losses

LOSSES = {
    "svm": (linear.svm_loss_naive, linear.svm_loss_vectorized),
    "softmax": (linear.softmax_loss_naive, linear.softmax_loss_vectorized),
    "logistic": (linear.logistic_loss_naive, linear.logistic_loss_vectorized),
}


def _reference_loss(name, w, x, y, *, reg, penalty, l1_ratio):
    """Written independently of jaxvision.linear: the library losses, optax's sigmoid
    cross-entropy, and each penalty's definition; differentiated by jax.grad."""
    scores = x @ w
    if name == "svm":
        data = jnp.mean(losses.multiclass_hinge(logits=scores, labels=y))
    elif name == "softmax":
        data = jnp.mean(losses.softmax_cross_entropy(logits=scores, labels=y))
    else:
        data = jnp.mean(optax.sigmoid_binary_cross_entropy(scores, y.astype(scores.dtype)))
    l1, l2 = jnp.sum(jnp.abs(w)), jnp.sum(w ** 2)
    r = {"l2": l2, "l1": l1, "elastic": l1_ratio * l1 + (1 - l1_ratio) * l2}[penalty]
    return data + reg * r


def _problem(name, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n, d, c = rng.integers(3, 9), rng.integers(2, 7), rng.integers(2, 6)
    x = rng.normal(size=(n, d)).astype(dtype)
    if name == "logistic":
        w = rng.normal(size=(d,)).astype(dtype)
        y = rng.integers(0, 2, n)
    else:
        # Weights large enough that some margins are violated and some are not.
        w = rng.normal(size=(d, c)).astype(dtype)
        y = rng.integers(0, c, n)
    return w, x, y


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("penalty", linear.PENALTIES)
def test_loop_equals_vectorized_equals_jax_grad_and_numeric(name, penalty):
    seed = list(LOSSES).index(name) * 10 + linear.PENALTIES.index(penalty)
    naive, vectorized = LOSSES[name]
    w, x, y = _problem(name, seed)
    kw = dict(reg=0.3, penalty=penalty, l1_ratio=0.3)
    with jax.enable_x64(True):
        loss_loop, dw_loop = naive(w, x, y, **kw)
        # jitted: one compilation per case instead of one per primitive and random shape.
        vec = jax.jit(functools.partial(vectorized, **kw))
        loss_vec, dw_vec = vec(w, x, y)
        ref = functools.partial(_reference_loss, name, x=x, y=y, **kw)
        loss_ref, dw_ref = jax.jit(jax.value_and_grad(ref))(w)
        numeric = gradcheck.check(lambda v: vec(v, x, y)[0], w, analytic=dw_vec)
    assert dw_loop.dtype == np.float64 and dw_vec.dtype == jnp.float64
    assert dw_loop.shape == dw_vec.shape == w.shape
    np.testing.assert_allclose(loss_loop, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(loss_vec, loss_ref, rtol=1e-12)
    assert gradcheck.relative_error(dw_loop, dw_ref).max() < 1e-6
    assert gradcheck.relative_error(dw_vec, dw_ref).max() < 1e-6
    assert max(numeric.values()) < 1e-6, numeric


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_goes_up_with_regularisation(name):
    naive, vectorized = LOSSES[name]
    w, x, y = _problem(name, 40, np.float32)
    for penalty in linear.PENALTIES:
        base = float(vectorized(w, x, y, reg=0.0, penalty=penalty)[0])
        assert float(vectorized(w, x, y, reg=0.1, penalty=penalty)[0]) > base
        assert float(naive(w, x, y, reg=0.1, penalty=penalty)[0]) > base


def test_penalty_conventions():
    w = np.array([[0.0, 2.0], [-3.0, 0.5]])
    x, y = np.zeros((1, 2)), np.array([0])  # zero inputs: the data gradient vanishes
    with jax.enable_x64(True):
        _, g_l1 = linear.softmax_loss_vectorized(w, x, y, reg=1.0, penalty="l1")
        np.testing.assert_array_equal(g_l1, [[0.0, 1.0], [-1.0, 1.0]])  # sign, 0 at 0
        loss_l2, g_l2 = linear.softmax_loss_vectorized(w, x, y, reg=1.0, penalty="l2")
        np.testing.assert_allclose(loss_l2 - np.log(2), 13.25)  # reg * sum(w^2), not half
        np.testing.assert_allclose(g_l2, 2 * w)
        for ratio, same in ((0.0, "l2"), (1.0, "l1")):
            a = linear.svm_loss_vectorized(w, x, y, reg=0.7, penalty="elastic", l1_ratio=ratio)
            b = linear.svm_loss_vectorized(w, x, y, reg=0.7, penalty=same)
            np.testing.assert_allclose(a[0], b[0])
            np.testing.assert_allclose(a[1], b[1])


def test_initial_losses_sanity():
    """The course's checks: W ~ 1e-4 randn gives softmax loss ~ log(C), SVM loss ~ C - 1."""
    rng = np.random.default_rng(0)
    x = np.asarray(linear.add_bias_column(rng.normal(size=(200, 300)).astype(np.float32)))
    y = rng.integers(0, 10, 200)
    w = 1e-4 * rng.normal(size=(301, 10)).astype(np.float32)
    softmax, _ = jax.jit(functools.partial(linear.softmax_loss_vectorized, reg=0.0))(w, x, y)
    svm, _ = jax.jit(functools.partial(linear.svm_loss_vectorized, reg=0.0))(w, x, y)
    assert abs(float(softmax) - np.log(10)) < 1e-2
    assert abs(float(svm) - 9.0) < 1e-1


def test_bad_inputs():
    w, x, y = _problem("svm", 0, np.float32)
    with pytest.raises(ValueError, match="penalty"):
        linear.svm_loss_vectorized(w, x, y, reg=0.1, penalty="l3")
    with pytest.raises(ValueError, match="l1_ratio"):
        linear.softmax_loss_naive(w, x, y, reg=0.1, penalty="elastic", l1_ratio=1.5)
    with pytest.raises(ValueError, match=r"x \[N, D\]"):
        linear.svm_loss_naive(w, x[:, :-1], y, reg=0.1)
    with pytest.raises(ValueError, match=r"w \[D\]"):
        linear.logistic_loss_vectorized(w, x, y, reg=0.1)
    with pytest.raises(ValueError, match="lr_range"):
        linear.random_search(linear.svm_loss_vectorized, x, y, x, y, lr_range=(0, 1),
                             reg_range=(1, 2), trials=1, steps=1, batch_size=1, seed=0)


def _blobs(seed, n=120, c=3, noise=0.3):
    """c Gaussian blobs in 2-D (separable at the default noise), with the bias column."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.stack([np.cos(2 * np.pi * np.arange(c) / c),
                              np.sin(2 * np.pi * np.arange(c) / c)], 1)
    y = rng.integers(0, c, n)
    x = centres[y] + noise * rng.normal(size=(n, 2))
    return np.asarray(linear.add_bias_column(x.astype(np.float32))), y


@pytest.mark.parametrize("name", list(LOSSES))
def test_train_sgd_drives_loss_down(name):
    x, y = _blobs(1, c=2 if name == "logistic" else 3)
    w0 = np.zeros(3, np.float32) if name == "logistic" else None
    w, history = linear.train_sgd(LOSSES[name][1], x, y, lr=0.1, reg=1e-4, steps=150,
                                  batch_size=16, seed=0, w0=w0)
    assert history.shape == (150,)
    assert history[-20:].mean() < 0.2 * history[:5].mean()
    assert linear.accuracy(w, x, y) == 1.0
    # Same seed, same run (minibatches and init come from the seed only).
    w2, history2 = linear.train_sgd(LOSSES[name][1], x, y, lr=0.1, reg=1e-4, steps=150,
                                    batch_size=16, seed=0, w0=w0)
    np.testing.assert_array_equal(history, history2)


def test_random_search_samples_in_range_and_picks_best():
    # Overlapping blobs, and rates up to 30 (some trials diverge): accuracies differ by trial.
    x, y = _blobs(2, n=90, noise=2.0)
    xv, yv = _blobs(3, n=60, noise=2.0)
    out = linear.random_search(linear.softmax_loss_vectorized, x, y, xv, yv,
                               lr_range=(1e-3, 30.0), reg_range=(1e-3, 10.0), trials=6, steps=30,
                               batch_size=16, seed=0)
    trials = out["trials"]
    assert len(trials) == 6
    assert all(1e-3 <= t["lr"] <= 30.0 and 1e-3 <= t["reg"] <= 10.0 for t in trials)
    # Log-uniform: the samples spread over decades, not bunched at the top of the range.
    assert np.ptp(np.log10([t["lr"] for t in trials])) > 1.0
    accs = [t["val_accuracy"] for t in trials]
    assert out["best"]["index"] == int(np.argmax(accs))
    assert out["best"]["val_accuracy"] == max(accs)
    assert linear.accuracy(out["w"], xv, yv) == max(accs)
    assert len(set(accs)) > 1  # the (lr, reg) samples matter


def test_bias_predict_and_templates():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    xb = linear.add_bias_column(x)
    np.testing.assert_array_equal(xb[:, -1], 1.0)
    np.testing.assert_array_equal(xb[:, :2], x)
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]], np.float32)  # bias favours class 1
    np.testing.assert_array_equal(linear.predict(w, xb), [1, 1, 1])
    np.testing.assert_array_equal(linear.predict(np.array([1.0, -1.0, 0.5]), xb), [0, 0, 0])
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4 * 4 * 3 + 1, 5))
    t = linear.templates(w, (4, 4, 3))
    assert t.shape == (5, 4, 4, 3) and t.min() == 0.0 and t.max() == 1.0
    np.testing.assert_allclose(t[2, 1, 2], (w[1 * 12 + 2 * 3:1 * 12 + 2 * 3 + 3, 2] - w[:-1].min())
                               / (w[:-1].max() - w[:-1].min()), rtol=1e-6)
    per = linear.templates(w, (4, 4, 3), per_class=True)
    assert np.allclose(per.reshape(5, -1).min(1), 0) and np.allclose(per.reshape(5, -1).max(1), 1)
    with pytest.raises(ValueError, match="bias row"):
        linear.templates(w[:-1], (4, 4, 3))
