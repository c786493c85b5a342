"""Regularisation layers of jaxvision.nets.layers: DropConnect (eval = Dense, train-mode mask rate
and expectation) and fractional max-pooling (shape, regions against a reference loop, coverage,
determinism)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.nets import layers


def dense_params(rng, d, f):
    return {"params": {"kernel": jnp.asarray(rng.normal(size=(d, f)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=(f,)), jnp.float32)}}


# --- DropConnect ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_dropconnect_eval_is_the_dense_layer_with_the_same_params(seed):
    rng = np.random.default_rng(seed)
    d, f = int(rng.integers(2, 9)), int(rng.integers(1, 6))
    variables = dense_params(rng, d, f)
    x = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
    layer = layers.DropConnect(f, rate=0.5)
    # Same parameter tree as nn.Dense (init shapes), so checkpoints are interchangeable.
    shapes = jax.eval_shape(lambda a: layer.init(jax.random.PRNGKey(0), a, train=False), x)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_array_equal(layer.apply(variables, x, train=False),
                                  nn.Dense(f).apply(variables, x))


@pytest.mark.parametrize("per_example", [False, True])
def test_dropconnect_train_mask_rate_and_expectation(per_example):
    rate, d, f, draws = 0.3, 6, 5, 400
    rng = np.random.default_rng(2)
    variables = dense_params(rng, d, f)
    kernel, bias = (np.asarray(variables["params"][k]) for k in ("kernel", "bias"))
    layer = layers.DropConnect(f, rate=rate, per_example=per_example)
    eye = jnp.eye(d)  # row i of the output is row i of the masked, rescaled kernel (+ bias)

    @jax.jit
    def sample(keys):
        return jax.vmap(lambda k: layer.apply(variables, eye, train=True,
                                              rngs={"dropout": k}))(keys)

    out = np.asarray(sample(jax.random.split(jax.random.PRNGKey(0), draws))) - bias
    kept = ~np.isclose(out, 0.0)
    # Kept weights are rescaled by 1 / (1 - rate), dropped ones are 0.
    np.testing.assert_allclose(out[kept], np.broadcast_to(kernel / (1 - rate), out.shape)[kept],
                               rtol=1e-5)
    n = kept.size
    assert abs((1 - kept.mean()) - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    # E[y] = Dense: the mean over draws is within 5 standard errors of the kernel.
    stderr = np.abs(kernel) * math.sqrt(rate / (1 - rate) / draws)
    assert np.all(np.abs(out.mean(0) - kernel) < 5 * stderr + 1e-6)
    # Two identical examples: their own masks per example, one shared mask otherwise.
    twins = layer.apply(variables, jnp.ones((2, d)), train=True,
                        rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.array_equal(twins[0], twins[1]) == (not per_example)


def test_dropconnect_rejects_a_bad_rate():
    with pytest.raises(ValueError, match="rate must be in"):
        layers.DropConnect(3, rate=1.0).apply(dense_params(np.random.default_rng(0), 2, 3),
                                              jnp.ones((1, 2)), train=False)


# --- fractional max-pooling -------------------------------------------------------------------


def reference_pool(x, rows, cols):
    """Loop over output cells: the max over the rectangular region (rows[i] x cols[j])."""
    (r0, r1), (c0, c1) = (np.asarray(a) for a in rows), (np.asarray(a) for a in cols)
    out = np.empty((x.shape[0], len(r0), len(c0), x.shape[3]), x.dtype)
    for i in range(len(r0)):
        for j in range(len(c0)):
            out[:, i, j] = x[:, r0[i]:r1[i] + 1, c0[j]:c1[j] + 1].max(axis=(1, 2))
    return out


CASES = [(32, 32, math.sqrt(2), False), (9, 13, 1.5, True), (10, 7, 2.0, False),
         (17, 11, 1.25, True)]


@pytest.mark.parametrize("h,w,ratio,overlapping", CASES)
def test_fractional_max_pool_against_a_reference_loop(h, w, ratio, overlapping):
    rng = np.random.default_rng(h * w)
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    key = jax.random.PRNGKey(h + w)
    got = np.asarray(layers.fractional_max_pool(jnp.asarray(x), ratio=ratio, key=key,
                                                overlapping=overlapping))
    out_h, out_w = int(h // ratio), int(w // ratio)
    assert got.shape == (2, out_h, out_w, 3)
    key_h, key_w = jax.random.split(key)
    rows = layers.fractional_pool_regions(h, out_h, key_h, overlapping=overlapping)
    cols = layers.fractional_pool_regions(w, out_w, key_w, overlapping=overlapping)
    np.testing.assert_array_equal(got, reference_pool(x, rows, cols))


@pytest.mark.parametrize("size,out", [(32, 22), (7, 4), (10, 5), (5, 5), (9, 8), (7, 3)])
@pytest.mark.parametrize("overlapping", [False, True])
def test_fractional_regions_cover_the_input(size, out, overlapping):
    # (7, 3): ratio 2 on an odd size; like 2x2 max-pooling, the last row is left out (disjoint).
    covered = min(size, 2 * out)
    for seed in range(3):
        starts, ends = (np.asarray(a) for a in layers.fractional_pool_regions(
            size, out, jax.random.PRNGKey(seed), overlapping=overlapping))
        lengths = ends - starts + 1
        assert starts[0] == 0
        assert np.all(np.isin(np.diff(np.r_[starts, covered]), [1, 2]))  # increments 1 or 2
        if overlapping:
            assert ends[-1] == min(covered, size - 1)
            assert np.all(ends[:-1] == starts[1:])  # each region reaches the next one's start
            assert np.all((lengths >= 1) & (lengths <= 3))
        else:
            # Disjoint tiling: each of the covered rows in exactly one region.
            assert ends[-1] == covered - 1
            assert np.all(ends[:-1] + 1 == starts[1:])
            assert np.all(np.isin(lengths, [1, 2])) and lengths.sum() == covered
        if size <= 2 * out:
            assert covered == size  # the whole input is covered


def test_fractional_max_pool_is_deterministic_given_the_key():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 2))
    pool = jax.jit(lambda k: layers.fractional_max_pool(x, ratio=1.4, key=k))
    a, b = pool(jax.random.PRNGKey(3)), pool(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(a, b)
    regions = [np.asarray(layers.fractional_pool_regions(16, 11, jax.random.PRNGKey(s))[0])
               for s in range(6)]
    assert len({r.tobytes() for r in regions}) > 1  # different keys, different regions


def test_fractional_max_pool_rejects_bad_ratios():
    x = jnp.zeros((1, 5, 5, 1))
    with pytest.raises(ValueError, match=r"ratio must be in \(1, 2\]"):
        layers.fractional_max_pool(x, ratio=2.5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="0 < out <= size"):
        layers.fractional_pool_regions(3, 4, jax.random.PRNGKey(0))
