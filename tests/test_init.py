"""jaxvision.init: fans, the initialisers' scales, and the lecture's activation-statistics facts."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import init


def test_fans_dense_and_conv():
    assert init.fans((300, 200)) == (300, 200)
    assert init.fans((3, 5, 16, 32)) == (3 * 5 * 16, 3 * 5 * 32)  # HWIO
    assert init.fans((7, 4, 6)) == (28, 42)  # 1-d conv [W, I, O]
    with pytest.raises(ValueError, match=r"shape must be a kernel.*\(10,\)"):
        init.fans((10,))


# (initialiser, kwargs, variance as a function of (fan_in, fan_out))
VARIANTS = {
    "xavier_in_normal": (init.xavier, {}, lambda i, o: 1 / i),
    "xavier_in_uniform": (init.xavier, {"distribution": "uniform"}, lambda i, o: 1 / i),
    "xavier_avg_normal": (init.xavier, {"fan": "avg"}, lambda i, o: 2 / (i + o)),
    "xavier_avg_uniform": (init.xavier, {"fan": "avg", "distribution": "uniform"},
                           lambda i, o: 2 / (i + o)),
    "he_normal": (init.he, {}, lambda i, o: 2 / i),
    "he_uniform": (init.he, {"distribution": "uniform"}, lambda i, o: 2 / i),
    "small_random": (init.small_random, {"scale": 0.05}, lambda i, o: 0.05**2),
}


def test_empirical_std_matches_the_formula():
    shapes = [(400, 100), (3, 3, 48, 96)]  # dense, conv HWIO

    @jax.jit  # one program for all draws: cheaper to compile than eager draws one by one
    def draws(key):
        keys = iter(jax.random.split(key, 2 * len(VARIANTS)))
        return {name: [fn(next(keys), s, jnp.float32, **kwargs) for s in shapes]
                for name, (fn, kwargs, _) in VARIANTS.items()}

    for name, ws in draws(jax.random.key(1)).items():
        _, kwargs, variance = VARIANTS[name]
        for shape, w in zip(shapes, ws):
            w = np.asarray(w, np.float64)
            assert w.shape == shape
            std = math.sqrt(variance(*init.fans(shape)))
            # 40,000+ draws: the sample std is within ~0.5% of the true one (3% leaves room).
            np.testing.assert_allclose(w.std(), std, rtol=0.03, err_msg=f"{name} {shape}")
            assert abs(w.mean()) < 0.03 * std, (name, shape)
            if kwargs.get("distribution") == "uniform":
                a = math.sqrt(3) * std  # U[-a, a]
                assert a * 0.99 < np.abs(w).max() <= a * (1 + 1e-6), (name, shape)


def test_dtype_is_respected():
    for fn in (init.xavier, init.he, init.small_random):
        out = jax.eval_shape(lambda k: fn(k, (4, 3), jnp.bfloat16), jax.random.key(0))
        assert out.dtype == jnp.bfloat16 and out.shape == (4, 3)


def test_equal_to_jax_variance_scaling():
    shape = (3, 3, 8, 16)
    vs = jax.nn.initializers.variance_scaling

    @jax.jit
    def pairs(key):
        return [
            (init.xavier(key, shape), vs(1.0, "fan_in", "normal")(key, shape)),
            (init.he(key, shape), vs(2.0, "fan_in", "normal")(key, shape)),
            (init.xavier(key, shape, fan="avg", distribution="uniform"),
             jax.nn.initializers.glorot_uniform()(key, shape)),
            (init.he(key, shape, distribution="uniform"),
             jax.nn.initializers.he_uniform()(key, shape)),
        ]

    for ours, theirs in pairs(jax.random.key(3)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_bad_arguments_are_named():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="fan must be one of.*'out'"):
        init.xavier(key, (3, 4), fan="out")
    with pytest.raises(ValueError, match="distribution must be one of.*'truncated'"):
        init.he(key, (3, 4), distribution="truncated")
    with pytest.raises(ValueError, match="nonlinearity must be one of.*'sigmoid'"):
        init.activation_statistics(key, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="width must be a positive integer"):
        init.activation_statistics(key, width=0)


# ---- the lecture's experiment (smaller than its 1000 x 500, same behaviour) ------------------


def _stats(nonlinearity, fn):
    return init.activation_statistics(jax.random.key(0), num_layers=10, width=256, batch=256,
                                      nonlinearity=nonlinearity, init=fn, bins=20)


def _per_layer_ratio(std):
    """Geometric mean of std_{l+1} / std_l over the layers."""
    return (std[-1] / std[0]) ** (1 / (len(std) - 1))


def test_small_random_tanh_collapses_to_zero():
    s = _stats("tanh", functools.partial(init.small_random, scale=0.01))
    # Each layer multiplies the std by ~0.01 * sqrt(256) = 0.16: layer 10 is ~1e-8.
    assert s.std[-1] < 1e-6, s.std
    assert np.all(np.diff(s.std) < 0)
    # The histograms pile up in the central bin(s).
    center = s.counts[-1, 9:11].sum()
    assert center == 256 * 256


def test_xavier_tanh_keeps_the_scale_within_a_factor():
    s = _stats("tanh", init.xavier)
    assert 0.5 < s.std[0] < 0.75  # std of tanh(N(0, 1)) is ~0.63
    assert s.std[-1] > s.std[0] / 4, s.std  # slow decline (tanh' < 1), no collapse
    assert np.all(np.abs(s.mean) < 0.02)
    assert s.counts.sum(axis=1).tolist() == [256 * 256] * 10  # tanh stays in [-1, 1]


def test_he_relu_is_stable_while_xavier_relu_halves_the_variance_per_layer():
    he = _stats("relu", init.he)
    xavier = _stats("relu", init.xavier)
    assert 0.9 < _per_layer_ratio(he.std) < 1.1, he.std
    assert np.all((he.std > 0.6) & (he.std < 1.1)), he.std
    # Xavier + ReLU: E[h^2] halves per layer, so the std shrinks by ~1/sqrt(2) = 0.71.
    assert 0.63 < _per_layer_ratio(xavier.std) < 0.78, xavier.std
    assert xavier.std[-1] < he.std[-1] / 10
    assert np.all(he.edges[:, 0] == 0) and np.all(he.mean > 0)
