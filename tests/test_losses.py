"""jaxvision.losses against slow loop-per-example numpy references, plus gradient checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxvision import losses

B, K = 7, 5


def _logits_labels(seed, *, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, K))).astype(np.float32)
    labels = rng.integers(0, K, size=(B,)).astype(np.int32)
    return logits, labels


# ---- slow references: one example at a time, straight from the definitions ----------------


def _ref_cross_entropy(logits, labels, eps):
    out = []
    for s, y in zip(logits.astype(np.float64), labels):
        m = max(s)
        log_z = m + math.log(sum(math.exp(v - m) for v in s))
        target = [(1 - eps) * (k == y) + eps / K for k in range(K)]
        out.append(-sum(t * (v - log_z) for t, v in zip(target, s)))
    return np.array(out)


def _ref_hinge(logits, labels, margin):
    out = []
    for s, y in zip(logits.astype(np.float64), labels):
        out.append(sum(max(0.0, s[j] - s[y] + margin) for j in range(K) if j != y))
    return np.array(out)


def _ref_accuracy(logits, labels):
    return np.array([float(np.argmax(s) == y) for s, y in zip(logits, labels)])


# ---- cross-entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_reference(eps, seed):
    logits, labels = _logits_labels(seed)
    got = losses.softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=eps)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, _ref_cross_entropy(logits, labels, eps), rtol=1e-5, atol=1e-5)


def test_cross_entropy_without_smoothing_equals_optax():
    logits, labels = _logits_labels(2)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits=logits, labels=labels),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6,
        atol=1e-6,
    )


def test_cross_entropy_is_stable_for_huge_logits():
    # A naive log(softmax) gives inf/nan here; log-softmax gives the exact answer.
    logits = jnp.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]])
    labels = jnp.array([0, 0])
    got = losses.softmax_cross_entropy(logits=logits, labels=labels)
    np.testing.assert_allclose(got, [0.0, 1000.0], atol=1e-4)


def test_cross_entropy_bfloat16_logits_are_computed_in_float32():
    logits, labels = _logits_labels(3)
    got = losses.softmax_cross_entropy(logits=jnp.asarray(logits, jnp.bfloat16), labels=labels)
    assert got.dtype == jnp.float32


# ---- hinge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_hinge_matches_reference(margin, seed):
    logits, labels = _logits_labels(seed)
    got = losses.multiclass_hinge(logits=logits, labels=labels, margin=margin)
    assert got.shape == (B,)
    np.testing.assert_allclose(got, _ref_hinge(logits, labels, margin), rtol=1e-5, atol=1e-5)


def test_hinge_is_zero_when_true_class_wins_by_the_margin():
    logits = jnp.array([[5.0, 3.9, 0.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([0, 2])
    # Row 0: 3.9 - 5 + 1 = -0.1 -> 0. Row 1: two wrong classes each at the margin: 1 + 1.
    np.testing.assert_allclose(losses.multiclass_hinge(logits=logits, labels=labels), [0.0, 2.0])


# ---- gradient checks (the course's numerical gradient check) ---------------------------------


def _x64_inputs(seed):
    logits, labels = _logits_labels(seed)
    return jnp.asarray(logits, jnp.float64), jnp.asarray(labels)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_gradients(eps):
    # float64 so that second-order finite differences are accurate (`jax.enable_x64` is the
    # public context manager; `jax.experimental.enable_x64` is gone in jax 0.10).
    with jax.enable_x64(True):
        logits, labels = _x64_inputs(4)
        f = lambda x: jnp.sum(
            losses.softmax_cross_entropy(logits=x, labels=labels, label_smoothing=eps)
            * jnp.arange(1.0, B + 1.0)  # weight examples differently so per-row errors show
        )
        check_grads(f, (logits,), order=2, modes=["rev"])


def test_hinge_gradients():
    with jax.enable_x64(True):
        logits, labels = _x64_inputs(5)
        # Finite differences are wrong across a kink of max(0, .): stay well away from them.
        gaps = np.asarray(logits - jnp.take_along_axis(logits, labels[:, None], axis=1) + 1.0)
        assert np.min(np.abs(gaps)) > 1e-3
        f = lambda x: jnp.sum(losses.multiclass_hinge(logits=x, labels=labels))
        check_grads(f, (logits,), order=2, modes=["rev"])
        # And the analytic gradient of CS231n: +1 on each violating class, -count on the true.
        grad = jax.grad(f)(logits)
        violate = (gaps > 0) & ~np.eye(K, dtype=bool)[np.asarray(labels)]
        expected = violate.astype(np.float64)
        expected[np.arange(B), np.asarray(labels)] = -violate.sum(axis=1)
        np.testing.assert_allclose(grad, expected)


# ---- accuracy, masked mean, l2 ---------------------------------------------------------------


def test_accuracy_matches_reference():
    logits, labels = _logits_labels(6)
    labels[:3] = np.argmax(logits[:3], axis=1)  # make sure both outcomes occur
    got = losses.accuracy(logits=logits, labels=labels)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, _ref_accuracy(logits, labels))


def test_masked_mean_ignores_masked_out_entries():
    values = jnp.array([1.0, 2.0, 3.0, 100.0, jnp.nan])
    mask = jnp.array([True, True, True, False, False])
    # The 100 and the NaN (e.g. from a padding example) must not leak in.
    np.testing.assert_allclose(losses.masked_mean(values, mask), 2.0)
    np.testing.assert_allclose(losses.masked_mean(values, mask.astype(jnp.float32)), 2.0)


def test_masked_mean_float_mask_weights_and_empty_mask():
    values = jnp.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(losses.masked_mean(values, jnp.array([1.0, 3.0, 0.0])), 10.0 / 4.0)
    np.testing.assert_allclose(losses.masked_mean(values, jnp.zeros(3, bool)), 0.0)


def test_masked_mean_gradient_is_zero_on_masked_entries():
    values = jnp.array([1.0, 2.0, 3.0])
    mask = jnp.array([1.0, 0.0, 1.0])
    np.testing.assert_allclose(jax.grad(losses.masked_mean)(values, mask), [0.5, 0.0, 0.5])


def _params():
    return {
        "dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.array([1.0, -2.0, 3.0])},
        "bn": {"scale": jnp.array([2.0, 2.0])},
    }


def test_l2_penalty_all_leaves():
    # 0.5 * (0+1+4+9+16+25 + 1+4+9 + 4+4)
    np.testing.assert_allclose(losses.l2_penalty(_params()), 0.5 * (55 + 14 + 8))


def test_l2_penalty_with_mask_tree_and_callable():
    mask = {"dense": {"kernel": True, "bias": False}, "bn": {"scale": False}}
    np.testing.assert_allclose(losses.l2_penalty(_params(), mask=mask), 0.5 * 55)
    ndim_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    np.testing.assert_allclose(losses.l2_penalty(_params(), mask=ndim_mask), 0.5 * 55)
    none = jax.tree.map(lambda _: False, _params())
    np.testing.assert_allclose(losses.l2_penalty(_params(), mask=none), 0.0)


def test_l2_penalty_gradient_is_the_weights_on_masked_leaves():
    mask = {"dense": {"kernel": True, "bias": False}, "bn": {"scale": True}}
    grads = jax.grad(lambda p: losses.l2_penalty(p, mask=mask))(_params())
    np.testing.assert_allclose(grads["dense"]["kernel"], _params()["dense"]["kernel"])
    np.testing.assert_allclose(grads["dense"]["bias"], 0.0)
    np.testing.assert_allclose(grads["bn"]["scale"], _params()["bn"]["scale"])


def test_l2_penalty_rejects_mask_of_wrong_structure():
    with pytest.raises(ValueError):
        losses.l2_penalty(_params(), mask={"dense": {"kernel": True}})


def test_losses_jit():
    logits, labels = _logits_labels(7)
    f = jax.jit(
        lambda lg, lb: losses.softmax_cross_entropy(logits=lg, labels=lb, label_smoothing=0.1)
    )
    np.testing.assert_allclose(
        f(logits, labels), _ref_cross_entropy(logits, labels, 0.1), rtol=1e-5
    )
