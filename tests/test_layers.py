"""jaxvision.layers: every forward against a plain-jnp reference (and the library op or a numpy
formula), every hand-written backward against JAX autodiff of that reference and against centred
differences (relative error < 1e-6), in float64, on random shapes and two seeds.

Speed: everything is computed inside `jax.jit` (one compilation per test function rather than
one per eagerly dispatched primitive), and the shapes are small.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import gradcheck, layers

SEEDS = [0, 1]
GRAD_TOL = 1e-6  # the acceptance bound for numeric gradient checks (relative error)
AUTODIFF_RTOL = 1e-10  # hand-written backward vs autodiff of the reference, in float64


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _away_from_zero(rng, *shape, gap=0.1):
    """Normals pushed at least `gap` away from 0, so that ReLU-like kinks are never straddled by
    a centred difference."""
    x = rng.standard_normal(shape)
    return x + gap * np.sign(x)


def _cotangent(rng, *shape):
    # Away from 0: a gradient coordinate near 0 has a large *relative* error from round-off
    # alone (|f| * 1e-16 / h), which would fail a correct backward.
    return _away_from_zero(rng, *shape, gap=0.5)


def _distinct(rng, *shape):
    """Values at least ~0.08 apart (a shuffled grid plus small noise): no ties for max/maxout."""
    size = int(np.prod(shape))
    grid = (rng.permutation(size) - size / 2) * 0.1 + 0.01 * rng.uniform(size=size)
    return grid.reshape(shape)


def _probe(f, cotangent):
    """`t -> <f(t), cotangent>` (f itself when cotangent is None): the scalar whose gradient is
    the vector-Jacobian product that a backward computes."""
    if cotangent is None:
        return f
    return lambda t: sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(f(t)),
                                                        jax.tree.leaves(cotangent)))


def _numeric_errors(f, tree, analytic, cotangent=None):
    """`gradcheck.check`'s max relative error per leaf between `analytic` and a numeric gradient
    of `<f, cotangent>` at `tree`, with the centred difference D_h Richardson-extrapolated.

    (4 D_{h/2} - D_h) / 3 cancels the O(h^2) truncation term, so h can be 1e-3 and the round-off
    (~|f| 1e-16 / h) stays ~1e-12. Plain centred differences with h = 1e-5 or 1e-6 give relative
    errors of 1e-6..1e-5 on the coordinates where a normalisation layer's gradient nearly
    cancels (|dx_i| ~ 1e-5 against |f| ~ 10), even with a correct backward.

    Both step sizes come from one centred difference (one compilation): with F = <f, c>,
    G(t) = (4 F(t) - F(t0 + 2 (t - t0)) / 2) / 3 has the same gradient as F at t0, and a step of
    h/2 in t is a step of h in the second term, so D_{h/2} G = (4 D_{h/2} F - D_h F) / 3.
    """
    h = 1e-3
    scalar = _probe(f, cotangent)

    def extrapolated(t):
        doubled = jax.tree.map(lambda a, a0: a0 + 2 * (a - a0), t, tree)
        return (4 * scalar(t) - scalar(doubled) / 2) / 3

    return gradcheck.check(extrapolated, tree, analytic=analytic, eps=h / 2)


def _check_backward(layer, reference, args, cotangent, *, library=None, library_tol=1e-12):
    """Checks the custom_vjp gradient of `layer` against autodiff of `reference` (1e-10) and
    against numeric differences (< GRAD_TOL) for every argument, and the forward against
    `reference` and `library` (another implementation, e.g. jax.nn's or flax's);
    returns (layer(*args), its gradients) as numpy."""

    @jax.jit
    def outputs_and_grads(args, cotangent):
        out, vjp = jax.vjp(layer, *args)
        ref_out, ref_vjp = jax.vjp(reference, *args)
        lib_out = None if library is None else library(*args)
        return out, ref_out, lib_out, vjp(cotangent), ref_vjp(cotangent)

    out, ref_out, lib_out, grads, ref_grads = outputs_and_grads(tuple(args), cotangent)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    if library is not None:
        np.testing.assert_allclose(out, lib_out, rtol=library_tol, atol=library_tol)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=AUTODIFF_RTOL, atol=1e-12)
    errors = _numeric_errors(lambda t: layer(*t), tuple(args), grads, cotangent)
    assert max(errors.values()) < GRAD_TOL, errors
    return np.asarray(out), [np.asarray(g) for g in grads]


# ---- affine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_affine_forward_and_backward(x64, seed):
    rng = np.random.default_rng(seed)
    n, d1, d2, m = (int(v) for v in rng.integers(2, 5, size=4))
    x, w, b = _normal(rng, n, d1, d2), _normal(rng, d1 * d2, m), _normal(rng, m)

    def reference(x, w, b):
        return x.reshape(n, -1) @ w + b[None, :]

    out, _ = _check_backward(layers.affine, reference, (x, w, b), _cotangent(rng, n, m))
    assert out.shape == (n, m)
    want = np.einsum("nij,ijm->nm", x, w.reshape(d1, d2, m)) + b[None, :]
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_affine_rejects_bad_shapes():
    x = np.zeros((2, 3, 2))
    with pytest.raises(ValueError, match=r"D = prod\(x.shape\[1:\]\) = 6 \(x: \(2, 3, 2\)\), "
                                         r"got w: \(5, 4\)"):
        layers.affine(x, np.zeros((5, 4)), np.zeros(4))
    with pytest.raises(ValueError, match=r"b must be \[M\] = \(4,\).*got b: \(3,\)"):
        layers.affine(x, np.zeros((6, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="at least 2-D"):
        layers.affine(np.zeros(6), np.zeros((6, 4)), np.zeros(4))


# ---- activations -----------------------------------------------------------------------------

# name -> (layer, plain-jnp reference, library op)
ACTIVATIONS = {
    "relu": (layers.relu, lambda x: jnp.maximum(x, 0.0), jax.nn.relu),
    "leaky_relu": (functools.partial(layers.leaky_relu, alpha=0.1),
                   lambda x: jnp.where(x > 0, x, 0.1 * x),
                   functools.partial(jax.nn.leaky_relu, negative_slope=0.1)),
    "elu": (functools.partial(layers.elu, alpha=0.7),
            lambda x: jnp.where(x > 0, x, 0.7 * (jnp.exp(x) - 1)),
            functools.partial(jax.nn.elu, alpha=0.7)),
    "sigmoid": (layers.sigmoid, lambda x: 1 / (1 + jnp.exp(-x)), jax.nn.sigmoid),
    "tanh": (layers.tanh, lambda x: (jnp.exp(2 * x) - 1) / (jnp.exp(2 * x) + 1), jnp.tanh),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_forward_and_backward(x64, name, seed):
    layer, reference, library = ACTIVATIONS[name]
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 5, size=rng.integers(1, 4)))
    x = 2 * _away_from_zero(rng, *shape)
    out, _ = _check_backward(layer, reference, (x,), _cotangent(rng, *shape), library=library)
    assert out.shape == x.shape and out.dtype == np.float64


def test_activation_defaults_and_extremes(x64):
    x = np.array([-800.0, -30.0, -0.5, 0.0, 0.5, 30.0, 800.0])

    @jax.jit
    def run(x):
        outs = (layers.leaky_relu(x), layers.elu(x), layers.sigmoid(x))
        grads = jax.grad(lambda x: jnp.sum(layers.sigmoid(x) + layers.elu(x)))(x)
        return outs, grads, jax.grad(lambda x: jnp.sum(jax.nn.sigmoid(x) + jax.nn.elu(x)))(x)

    (leaky, elu, sigmoid), grads, lib_grads = run(x)
    np.testing.assert_allclose(leaky, np.where(x > 0, x, 0.01 * x), rtol=1e-15)  # alpha=0.01
    np.testing.assert_allclose(elu, np.where(x > 0, x, np.expm1(np.minimum(x, 0))), rtol=1e-15)
    # No overflow in the branch that is not taken.
    np.testing.assert_allclose(sigmoid, jax.nn.sigmoid(x), rtol=1e-15)
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads[x != 0], lib_grads[x != 0], rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_maxout_forward_and_backward(x64, seed):
    rng = np.random.default_rng(seed)
    n, m, pieces = (int(v) for v in (rng.integers(1, 5), rng.integers(1, 5), rng.integers(2, 4)))
    x = _distinct(rng, n, m * pieces)

    def reference(x):
        return x.reshape(n, m, pieces).max(axis=-1)

    out, _ = _check_backward(functools.partial(layers.maxout, pieces=pieces), reference, (x,),
                             _cotangent(rng, n, m))
    want = np.array([[max(x[i, j * pieces:(j + 1) * pieces]) for j in range(m)]
                     for i in range(n)])
    np.testing.assert_array_equal(out, want)


def test_maxout_rejects_bad_pieces():
    with pytest.raises(ValueError, match=r"M \* pieces, got x: \(2, 7\) with pieces=3"):
        layers.maxout(np.zeros((2, 7)), pieces=3)
    with pytest.raises(ValueError, match="pieces must be an int >= 1"):
        layers.maxout(np.zeros((2, 6)), pieces=0)


# ---- batch norm ------------------------------------------------------------------------------


def _bn_reference(x, gamma, beta, eps=1e-5):
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=0, keepdims=True)
    return gamma[None, :] * (x - mean) / jnp.sqrt(var + eps) + beta[None, :]


def _bn_inputs(rng, n=None, d=None):
    # N >= 3: with N = 2 both normalised values are +-1 whatever x, so dx is ~eps-sized and its
    # relative error meaningless (likewise D >= 3 for layer norm, >= 3 values per group below).
    n = n or int(rng.integers(3, 7))
    d = d or int(rng.integers(1, 8))
    x = 3 * _normal(rng, n, d) + _normal(rng, 1, d)  # per-feature offsets, not centred
    gamma, beta = _away_from_zero(rng, d), _normal(rng, d)
    running_mean, running_var = _normal(rng, d), rng.uniform(0.5, 2.0, size=d)
    return x, gamma, beta, running_mean, running_var


def _flax_batchnorm(x, gamma, beta, rm, rv, *, train, momentum):
    """Flax's BatchNorm has the same momentum convention and the biased variance."""
    bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      use_fast_variance=False)
    variables = {"params": {"scale": gamma, "bias": beta},
                 "batch_stats": {"mean": rm, "var": rv}}
    out, updates = bn.apply(variables, x, mutable=["batch_stats"])
    return out, (updates["batch_stats"]["mean"], updates["batch_stats"]["var"])


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm_train_forward_and_running_averages(x64, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = _bn_inputs(rng)

    @jax.jit
    def run(x, gamma, beta, rm, rv):
        ours = layers.batchnorm(x, gamma, beta, running_mean=rm, running_var=rv, train=True,
                                momentum=0.8)
        return ours, _flax_batchnorm(x, gamma, beta, rm, rv, train=True, momentum=0.8)

    (out, (new_rm, new_rv)), (flax_out, (flax_rm, flax_rv)) = run(x, gamma, beta, rm, rv)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(out, gamma * xhat + beta, rtol=1e-10, atol=1e-12)
    # The course's convention, with the biased batch variance.
    np.testing.assert_allclose(new_rm, 0.8 * rm + 0.2 * x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new_rv, 0.8 * rv + 0.2 * x.var(0), rtol=1e-12)
    np.testing.assert_allclose(out, flax_out, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(new_rm, flax_rm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_rv, flax_rv, rtol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm_test_mode_uses_running_averages(x64, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = _bn_inputs(rng)

    @jax.jit
    def run(x, gamma, beta, rm, rv):
        test_out, same = layers.batchnorm(x, gamma, beta, running_mean=rm, running_var=rv,
                                          train=False, eps=1e-3)

        def step(stats, _):  # 200 train steps on the same batch
            _, stats = layers.batchnorm(x, gamma, beta, running_mean=stats[0],
                                        running_var=stats[1], train=True, momentum=0.9)
            return stats, None

        (conv_rm, conv_rv), _ = jax.lax.scan(step, (rm, rv), None, length=200)
        converged, _ = layers.batchnorm(x, gamma, beta, running_mean=conv_rm,
                                        running_var=conv_rv, train=False)
        return test_out, same, converged, _bn_reference(x, gamma, beta)

    out, (same_rm, same_rv), converged, train_out = run(x, gamma, beta, rm, rv)
    np.testing.assert_allclose(out, gamma * (x - rm) / np.sqrt(rv + 1e-3) + beta, rtol=1e-12)
    np.testing.assert_array_equal(same_rm, rm)
    np.testing.assert_array_equal(same_rv, rv)
    # Running averages that converged (0.9^200 ~ 7e-10) to the batch statistics reproduce the
    # train-mode output.
    np.testing.assert_allclose(converged, train_out, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm_train_backward(x64, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = _bn_inputs(rng)

    def layer(x, gamma, beta):
        return layers.batchnorm(x, gamma, beta, running_mean=rm, running_var=rv, train=True)[0]

    _check_backward(layer, _bn_reference, (x, gamma, beta), _cotangent(rng, *x.shape))


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm_staged_backward_equals_simplified(x64, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = _bn_inputs(rng)
    dout = _normal(rng, *x.shape)

    @jax.jit
    def run(dout, x, gamma, beta):
        staged = layers.batchnorm_backward_staged(dout, x, gamma, eps=1e-4)
        simplified = layers.batchnorm_backward(dout, x, gamma, eps=1e-4)
        _, vjp = jax.vjp(lambda x, g, b: layers.batchnorm(
            x, g, b, running_mean=rm, running_var=rv, train=True, eps=1e-4)[0], x, gamma, beta)
        return staged, simplified, vjp(dout)

    staged, simplified, custom = run(dout, x, gamma, beta)
    for a, b, c in zip(staged, simplified, custom):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm_test_backward(x64, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = _bn_inputs(rng)

    def layer(x, gamma, beta):
        return layers.batchnorm(x, gamma, beta, running_mean=rm, running_var=rv, train=False)[0]

    def reference(x, gamma, beta):
        return gamma[None, :] * (x - rm[None, :]) / jnp.sqrt(rv[None, :] + 1e-5) + beta[None, :]

    _check_backward(layer, reference, (x, gamma, beta), _cotangent(rng, *x.shape))


def test_batchnorm_statistics_gradients(x64):
    """The private custom_vjps also differentiate their statistics correctly; the public
    wrapper stops those gradients (the running averages are buffers, not parameters)."""
    rng = np.random.default_rng(3)
    x, gamma, beta, rm, rv = _bn_inputs(rng, n=5, d=4)
    test_cotangent = _cotangent(rng, 5, 4)
    train_cotangents = (_cotangent(rng, 5, 4), _cotangent(rng, 4), _cotangent(rng, 4))
    test_fn = lambda t: layers._batchnorm_test(1e-5, *t)  # noqa: E731
    train_fn = lambda t: layers._batchnorm_train(1e-5, *t)  # noqa: E731
    test_grads, train_grads = jax.jit(lambda t: (
        jax.grad(_probe(test_fn, test_cotangent))(t + (rm, rv)),
        jax.grad(_probe(train_fn, train_cotangents))(t)))((x, gamma, beta))
    for errors in (_numeric_errors(test_fn, (x, gamma, beta, rm, rv), test_grads, test_cotangent),
                   _numeric_errors(train_fn, (x, gamma, beta), train_grads, train_cotangents)):
        assert max(errors.values()) < GRAD_TOL, errors

    @jax.jit
    def grads_through_public(rm, rv):
        def total(rm, rv, train):
            out, (new_rm, new_rv) = layers.batchnorm(x, gamma, beta, running_mean=rm,
                                                     running_var=rv, train=train)
            return jnp.sum(out) + jnp.sum(new_rm) + jnp.sum(new_rv)

        return [jax.grad(total, argnums=(0, 1))(rm, rv, train) for train in (True, False)]

    for g in jax.tree.leaves(grads_through_public(rm, rv)):
        np.testing.assert_array_equal(g, 0.0)


def test_batchnorm_rejects_bad_input():
    x, g = np.zeros((4, 3)), np.ones(3)
    with pytest.raises(ValueError, match=r"gamma must be \[D\] = \(3,\) for x: \(4, 3\), "
                                         r"got gamma: \(2,\)"):
        layers.batchnorm(x, np.ones(2), g, running_mean=g, running_var=g, train=True)
    with pytest.raises(ValueError, match=r"running_var must be \[D\]"):
        layers.batchnorm(x, g, g, running_mean=g, running_var=np.ones(4), train=True)
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        layers.batchnorm(np.zeros((4, 3, 1)), g, g, running_mean=g, running_var=g, train=True)
    with pytest.raises(ValueError, match="momentum must be in"):
        layers.batchnorm(x, g, g, running_mean=g, running_var=g, train=True, momentum=1.5)
    with pytest.raises(ValueError, match="train must be a Python bool"):
        layers.batchnorm(x, g, g, running_mean=g, running_var=g, train="yes")
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, C\]"):
        layers.spatial_batchnorm(x, g, g, running_mean=g, running_var=g, train=True)


# ---- spatial batch norm ----------------------------------------------------------------------


@pytest.mark.parametrize("seed,train", [(0, True), (1, True), (2, False)])
def test_spatial_batchnorm(x64, seed, train):
    rng = np.random.default_rng(seed)
    n, h, w, c = int(rng.integers(1, 4)), int(rng.integers(2, 4)), int(rng.integers(2, 4)), int(
        rng.integers(1, 4))
    x = 2 * _normal(rng, n, h, w, c) + _normal(rng, 1, 1, 1, c)
    gamma, beta, rm = _away_from_zero(rng, c), _normal(rng, c), _normal(rng, c)
    rv = rng.uniform(0.5, 2.0, size=c)
    kw = dict(running_mean=rm, running_var=rv, train=train, momentum=0.7)

    @jax.jit
    def run(x, gamma, beta):
        return (layers.spatial_batchnorm(x, gamma, beta, **kw),
                layers.batchnorm(x.reshape(-1, c), gamma, beta, **kw),
                _flax_batchnorm(x, gamma, beta, rm, rv, train=train, momentum=0.7))

    (out, stats), (flat_out, flat_stats), (flax_out, flax_stats) = run(x, gamma, beta)
    np.testing.assert_array_equal(out, flat_out.reshape(x.shape))
    # Flax's BatchNorm on NHWC reduces over (N, H, W) per channel.
    np.testing.assert_allclose(out, flax_out, rtol=1e-9, atol=1e-10)
    for a, b, c_ in zip(stats, flat_stats, flax_stats):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c_, rtol=1e-10, atol=1e-12)

    def layer(x, gamma, beta):
        return layers.spatial_batchnorm(x, gamma, beta, **kw)[0]

    def reference(x, gamma, beta):
        flat = x.reshape(-1, c)
        if train:
            return _bn_reference(flat, gamma, beta).reshape(x.shape)
        out = gamma[None, :] * (flat - rm[None, :]) / jnp.sqrt(rv[None, :] + 1e-5) + beta[None, :]
        return out.reshape(x.shape)

    _check_backward(layer, reference, (x, gamma, beta), _cotangent(rng, *x.shape))


# ---- layer norm ------------------------------------------------------------------------------


def _ln_reference(x, gamma, beta, eps=1e-5):
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=1, keepdims=True)
    return gamma[None, :] * (x - mean) / jnp.sqrt(var + eps) + beta[None, :]


@pytest.mark.parametrize("seed", SEEDS)
def test_layernorm_forward_and_backward(x64, seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 7)), int(rng.integers(3, 8))
    x = 3 * _normal(rng, n, d) + _normal(rng, n, 1)
    gamma, beta = _away_from_zero(rng, d), _normal(rng, d)
    ln = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
    out, _ = _check_backward(
        layers.layernorm, _ln_reference, (x, gamma, beta), _cotangent(rng, n, d),
        library=lambda x, g, b: ln.apply({"params": {"scale": g, "bias": b}}, x), library_tol=1e-9)
    want = gamma * (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) + beta
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


def test_layernorm_rejects_bad_input():
    with pytest.raises(ValueError, match=r"beta must be \[D\] = \(3,\) for x: \(2, 3\), "
                                         r"got beta: \(4,\)"):
        layers.layernorm(np.zeros((2, 3)), np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        layers.layernorm(np.zeros((2, 3)), np.ones(3), np.ones(3), eps=0)


# ---- group norm ------------------------------------------------------------------------------


def _gn_numpy(x, gamma, beta, groups, eps=1e-5):
    """One (example, group) block at a time."""
    out = np.empty_like(x)
    size = x.shape[-1] // groups
    for i in range(x.shape[0]):
        for g in range(groups):
            block = x[i, :, :, g * size:(g + 1) * size]
            out[i, :, :, g * size:(g + 1) * size] = (block - block.mean()) / np.sqrt(
                block.var() + eps)
    return out * gamma + beta


def _gn_reference(x, gamma, beta, groups, eps=1e-5):
    n, h, w, c = x.shape
    xg = x.reshape(n, h * w, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean((xg - mean) ** 2, axis=(1, 3), keepdims=True)
    xhat = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    return gamma[None, None, None, :] * xhat + beta[None, None, None, :]


# groups=1 is layer norm over (H, W, C), groups=C instance norm.
@pytest.mark.parametrize("seed,c,groups", [(0, 4, 2), (1, 6, 3), (2, 3, 1), (3, 4, 4)])
def test_groupnorm_forward_and_backward(x64, seed, c, groups):
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 3)), int(rng.integers(2, 4)), int(rng.integers(2, 4))
    x = 2 * _normal(rng, n, h, w, c) + _normal(rng, n, 1, 1, c)
    gamma, beta = _away_from_zero(rng, c), _normal(rng, c)
    gn = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
    out, _ = _check_backward(
        functools.partial(layers.groupnorm, groups=groups),
        functools.partial(_gn_reference, groups=groups), (x, gamma, beta),
        _cotangent(rng, *x.shape),
        library=lambda x, g, b: gn.apply({"params": {"scale": g, "bias": b}}, x), library_tol=1e-9)
    np.testing.assert_allclose(out, _gn_numpy(x, gamma, beta, groups), rtol=1e-10, atol=1e-12)


def test_groupnorm_rejects_bad_groups():
    x, g = np.zeros((1, 2, 2, 6)), np.ones(6)
    with pytest.raises(ValueError, match=r"groups must be a positive int dividing C = 6 "
                                         r"\(x: \(1, 2, 2, 6\)\), got groups=4"):
        layers.groupnorm(x, g, g, groups=4)
    with pytest.raises(ValueError, match=r"gamma must be \[C\] = \(6,\)"):
        layers.groupnorm(x, np.ones(3), g, groups=3)
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, C\]"):
        layers.groupnorm(np.zeros((2, 6)), g, g, groups=3)


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_test_mode_and_zero_rate_are_identity():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(layers.dropout(x, key=None, rate=0.5, train=False), x)
    np.testing.assert_array_equal(
        layers.dropout(x, key=jax.random.key(0), rate=0.0, train=True), x)


def test_dropout_statistics_and_key():
    rate = 0.3

    @jax.jit
    def run(x, key):
        return layers.dropout(x, key=key, rate=rate, train=True)

    x = jnp.ones((1000, 1000), jnp.float32)
    out = np.asarray(run(x, jax.random.key(1)))
    kept = out != 0
    # Inverted dropout: kept units are scaled by 1/(1 - rate), so the mean is preserved.
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 0.005  # the kept fraction's std is ~5e-4
    assert abs(out.mean() - 1.0) < 0.01
    # Same key, same mask; another key, another mask.
    np.testing.assert_array_equal(run(x, jax.random.key(1)), out)
    assert np.any((np.asarray(run(x, jax.random.key(2))) == 0) != ~kept)


@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_backward(x64, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 6, size=2))
    key, rate = jax.random.key(seed), 0.4
    x = _away_from_zero(rng, *shape)

    def layer(x):
        return layers.dropout(x, key=key, rate=rate, train=True)

    def reference(x):
        return x * (jax.random.uniform(key, x.shape, jnp.float32) < 1 - rate) / (1 - rate)

    dy = _cotangent(rng, *shape)
    out, (dx,) = _check_backward(layer, reference, (x,), dy)
    # The gradient goes through exactly the kept units, with the same scale.
    np.testing.assert_allclose(dx, dy * out / x, rtol=1e-12)


def test_dropout_rejects_bad_rate_and_missing_key():
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
            layers.dropout(np.zeros(3), key=jax.random.key(0), rate=rate, train=True)
    with pytest.raises(ValueError, match="a key is needed"):
        layers.dropout(np.zeros(3), key=None, rate=0.5, train=True)


# ---- layer-level losses ----------------------------------------------------------------------


def _scores_labels(rng):
    n, c = int(rng.integers(1, 7)), int(rng.integers(2, 7))
    return 2 * _normal(rng, n, c), rng.integers(0, c, size=n)


def _softmax_loss_reference(scores, labels):
    log_probs = jax.nn.log_softmax(scores, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def _svm_loss_reference(scores, labels):
    true = jnp.take_along_axis(scores, labels[:, None], axis=1)
    margins = jnp.maximum(0.0, scores - true + 1.0)
    not_true = jnp.arange(scores.shape[1])[None, :] != labels[:, None]
    return jnp.sum(jnp.where(not_true, margins, 0.0)) / scores.shape[0]


def _check_loss(loss_fn, reference, scores, labels):
    @jax.jit
    def run(scores, labels):
        return (loss_fn(scores, labels), jax.grad(reference)(scores, labels),
                loss_fn(scores + 1000.0, labels))

    (loss, dscores), ref_grad, (big_loss, big_d) = run(scores, labels)
    np.testing.assert_allclose(dscores, ref_grad, rtol=AUTODIFF_RTOL, atol=1e-14)
    # Both losses are invariant to a shift of all scores, and large scores do not overflow (the
    # softmax subtracts the max first).
    np.testing.assert_allclose(big_loss, loss, rtol=1e-9)
    np.testing.assert_allclose(big_d, dscores, rtol=1e-9, atol=1e-12)
    errors = _numeric_errors(lambda s: loss_fn(s, labels)[0], scores, dscores)
    assert max(errors.values()) < GRAD_TOL, errors
    return loss, dscores


@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_loss(x64, seed):
    rng = np.random.default_rng(seed)
    scores, labels = _scores_labels(rng)
    loss, _ = _check_loss(layers.softmax_loss, _softmax_loss_reference, scores, labels)
    want = np.mean([np.log(np.exp(s).sum()) - s[y] for s, y in zip(scores, labels)])
    np.testing.assert_allclose(loss, want, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_svm_loss(x64, seed):
    rng = np.random.default_rng(seed)
    scores, labels = _scores_labels(rng)
    # Move every margin s_j - s_y + 1 at least 0.05 from the hinge's kink at 0.
    wrong = np.arange(scores.shape[1])[None, :] != labels[:, None]
    margin = scores - scores[np.arange(len(labels)), labels][:, None] + 1
    scores = scores + 0.1 * (wrong & (np.abs(margin) < 0.05))
    loss, _ = _check_loss(layers.svm_loss, _svm_loss_reference, scores, labels)
    want = np.mean([sum(max(0.0, s[j] - s[y] + 1) for j in range(len(s)) if j != y)
                    for s, y in zip(scores, labels)])
    np.testing.assert_allclose(loss, want, rtol=1e-12)


def test_losses_reject_bad_labels():
    for loss_fn in (layers.softmax_loss, layers.svm_loss):
        with pytest.raises(ValueError, match=r"labels must be \[N\] = \(3,\) for scores: "
                                             r"\(3, 4\), got labels: \(2,\)"):
            loss_fn(np.zeros((3, 4)), np.zeros(2, int))
        with pytest.raises(ValueError, match="labels must be integers"):
            loss_fn(np.zeros((3, 4)), np.zeros(3))


# ---- jit and float32 -------------------------------------------------------------------------

_G = np.array([0.5, 1.5, -1.0, 2.0])
_LABELS = np.array([0, 1, 2, 3, 0, 1])


def _bn(x, train):
    return layers.batchnorm(x, _G, _G, running_mean=_G, running_var=np.abs(_G), train=train)[0]


# Each takes x: [6, 4].
JITTABLE = {
    "affine": lambda x: layers.affine(x, np.ones((4, 3)) / 4, np.arange(3.0)),
    "relu": layers.relu,
    "leaky_relu": functools.partial(layers.leaky_relu, alpha=0.2),
    "elu": functools.partial(layers.elu, alpha=0.5),
    "sigmoid": layers.sigmoid,
    "tanh": layers.tanh,
    "maxout": functools.partial(layers.maxout, pieces=2),
    "batchnorm_train": functools.partial(_bn, train=True),
    "batchnorm_test": functools.partial(_bn, train=False),
    "spatial_batchnorm": lambda x: layers.spatial_batchnorm(
        x.reshape(2, 1, 3, 4), _G, _G, running_mean=_G, running_var=np.abs(_G), train=True)[0],
    "layernorm": lambda x: layers.layernorm(x, _G, _G),
    "groupnorm": lambda x: layers.groupnorm(x.reshape(2, 3, 1, 4), _G, _G, groups=2),
    "dropout": lambda x: layers.dropout(x, key=jax.random.key(0), rate=0.5, train=True),
    "softmax_loss": lambda x: layers.softmax_loss(x, _LABELS)[1],
    "svm_loss": lambda x: layers.svm_loss(x, _LABELS)[1],
}


def test_jit_and_float32():
    """Every layer under jit, forward and gradient, in float32 (dtype kept) and float64 (close):
    one program for all of them (two compilations instead of thirty)."""

    @jax.jit
    def outs_and_grads(x):
        return {name: (fn(x), jax.grad(lambda x: jnp.sum(jnp.sin(fn(x))))(x))
                for name, fn in JITTABLE.items()}

    x64_input = np.random.default_rng(0).standard_normal((6, 4))
    results = outs_and_grads(x64_input.astype(np.float32))
    with jax.enable_x64(True):
        results64 = outs_and_grads(x64_input)
    for name, (out, grad) in results.items():
        assert out.dtype == jnp.float32 and grad.dtype == jnp.float32, (name, out.dtype)
        assert grad.shape == x64_input.shape, name
        out64, grad64 = results64[name]
        assert out64.dtype == jnp.float64, name
        np.testing.assert_allclose(out, out64, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad, grad64, rtol=1e-3, atol=1e-4, err_msg=name)
