"""Convolution and pooling: naive == im2col == lax forward; every hand-written backward against
JAX autodiff and numeric gradients (float64); pooling against flax; the tie rule; the errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import conv, gradcheck

CONVS = {"naive": conv.conv_naive, "im2col": conv.conv_im2col, "lax": conv.conv_lax}

# (N, H, W, Cin, kh, kw, Cout, stride, padding): square and non-square kernels, Cin != Cout,
# stride 1, 2 and 3, padding 0, 1 and 2, a kernel as large as the padded input (1x1 output).
CONV_CASES = [
    (2, 4, 4, 3, 3, 3, 4, 1, 1),
    (2, 7, 5, 2, 3, 1, 3, 2, 1),
    (2, 6, 6, 2, 3, 3, 5, 3, 0),
    (3, 2, 3, 1, 4, 5, 2, 1, 1),
    (1, 2, 3, 2, 5, 3, 3, 1, 2),
]


def random_case(seed):
    """A random tiling conv shape: draw the output size, kernel, stride, padding; derive H, W."""
    rng = np.random.default_rng(seed)
    while True:
        kh, kw, stride, padding = rng.integers(1, 5), rng.integers(1, 5), rng.integers(1, 4), \
            rng.integers(0, 3)
        ho, wo = rng.integers(1, 4, size=2)
        h, w = (ho - 1) * stride + kh - 2 * padding, (wo - 1) * stride + kw - 2 * padding
        if h >= 1 and w >= 1:
            return (int(rng.integers(1, 3)), int(h), int(w), int(rng.integers(1, 4)), int(kh),
                    int(kw), int(rng.integers(1, 4)), int(stride), int(padding))


CONV_CASES += [random_case(seed) for seed in (0, 1)]


def conv_arrays(case, seed):
    n, h, w, cin, kh, kw, cout, _, _ = case
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, h, w, cin)), rng.normal(size=(kh, kw, cin, cout)),
            rng.normal(size=(cout,)))


def out_shape(case):
    n, h, w, _, kh, kw, cout, stride, padding = case
    return (n, (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1, cout)


def forward_backward(fn, stride, padding):
    """A jitted `(x, w, b, cot) -> (out, (dx, dw, db))`: one compilation per implementation."""
    def run(x, w, b, cot):
        out, vjp = jax.vjp(functools.partial(fn, stride=stride, padding=padding), x, w, b)
        return out, vjp(cot)
    return jax.jit(run)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_three_ways_agree_forward_and_backward(case):
    stride, padding = case[-2:]
    with jax.enable_x64(True):
        x, w, b = conv_arrays(case, seed=sum(case))
        cot = np.random.default_rng(1).normal(size=out_shape(case))
        outs, grads = {}, {}
        for name, fn in CONVS.items():
            outs[name], grads[name] = forward_backward(fn, stride, padding)(x, w, b, cot)
        assert outs["lax"].shape == out_shape(case) and outs["lax"].dtype == jnp.float64
        for name in ("naive", "im2col"):
            np.testing.assert_allclose(outs[name], outs["lax"], rtol=1e-10, atol=1e-10)
            # naive and im2col run their hand-written backwards; lax is JAX autodiff.
            for arg, got, want in zip("xwb", grads[name], grads["lax"]):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10,
                                           err_msg=f"{name} d{arg}")


@pytest.mark.parametrize("name", ["naive", "im2col"])
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2]], ids=str)
def test_conv_backward_numeric_gradient(name, case):
    stride, padding = case[-2:]
    with jax.enable_x64(True):
        x, w, b = conv_arrays(case, seed=3)
        cot = np.random.default_rng(4).normal(size=out_shape(case))
        f = lambda p: CONVS[name](*p, stride=stride, padding=padding)  # noqa: E731
        # The analytic gradient is the custom_vjp backward (through a jitted vjp: the naive loops
        # would run op by op otherwise).
        _, analytic = forward_backward(CONVS[name], stride, padding)(x, w, b, cot)
        errors = gradcheck.check(f, (x, w, b), analytic=analytic, cotangent=cot,
                                 num_samples=12, seed=5)
        assert max(errors.values()) < 1e-6, errors


# (H, W, size, stride): the reshape fast path (size == stride), overlapping windows (stride <
# size), gapped windows (stride > size), a window covering the whole input.
POOL_CASES = [(4, 6, 2, 2), (5, 5, 3, 1), (7, 5, 3, 2), (5, 8, 2, 3), (3, 3, 3, 3)]
POOLS = {"max": (conv.max_pool_naive, conv.max_pool, nn.max_pool),
         "avg": (conv.avg_pool_naive, conv.avg_pool, nn.avg_pool)}


def distinct(shape, seed):
    # A permutation of distinct values 1e-2 apart: no ties, and a 1e-6 numeric step cannot
    # change which entry is the maximum of a window. Centred and small, so that the probed
    # function stays O(1) and its rounding error does not swamp the centred differences.
    size = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(size).reshape(shape) - size / 2) / 100.0


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pooling_naive_fast_flax(kind, case):
    h, w, size, stride = case
    naive, fast, flax_pool = POOLS[kind]
    with jax.enable_x64(True):
        x = distinct((2, h, w, 3), seed=h * w)
        ho, wo = (h - size) // stride + 1, (w - size) // stride + 1
        cot = np.random.default_rng(0).normal(size=(2, ho, wo, 3))
        run = jax.jit(lambda f, x, cot: (lambda o, vjp: (o, vjp(cot)[0]))(*jax.vjp(f, x)),
                      static_argnums=0)
        out_n, dx_n = run(functools.partial(naive, size=size, stride=stride), x, cot)
        out_f, dx_f = run(functools.partial(fast, size=size, stride=stride), x, cot)
        # JAX autodiff of flax's pooling (lax.reduce_window) as the second reference.
        out_r, dx_r = run(functools.partial(flax_pool, window_shape=(size, size),
                                            strides=(stride, stride), padding="VALID"), x, cot)
        assert out_f.shape == (2, ho, wo, 3) and out_f.dtype == jnp.float64
        np.testing.assert_allclose(out_n, out_r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out_f, out_r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx_n, dx_f, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx_f, dx_r, rtol=1e-12, atol=1e-12)
        for fn, dx in ((naive, dx_n), (fast, dx_f)):
            errors = gradcheck.check(lambda v, fn=fn: fn(v, size=size, stride=stride), x,
                                     analytic=dx, cotangent=cot, num_samples=15, seed=1)
            assert max(errors.values()) < 1e-6, (fn.__name__, errors)


@pytest.mark.parametrize("fn", [conv.max_pool_naive, conv.max_pool], ids=lambda f: f.__name__)
def test_max_pool_ties_first_maximum_gets_the_gradient(fn):
    # One channel, 4x4, 2x2 windows. Top-left window: all equal. Top-right: maximum 5 at window
    # positions (0, 1) and (1, 0). Bottom-left: maximum 3 at (1, 0) and (1, 1). Bottom-right:
    # a single maximum at (1, 1).
    x = np.array([[1, 1, 0, 5],
                  [1, 1, 5, 2],
                  [0, 0, 0, 1],
                  [3, 3, 2, 7]], np.float32)[None, :, :, None]
    want = np.array([[1, 0, 0, 2],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0],
                     [3, 0, 0, 4]], np.float32)[None, :, :, None]
    cot = np.array([[1, 2], [3, 4]], np.float32)[None, :, :, None]
    out, vjp = jax.vjp(lambda v: fn(v, size=2, stride=2), x)
    np.testing.assert_array_equal(out[0, :, :, 0], [[1, 5], [3, 7]])
    np.testing.assert_array_equal(vjp(cot)[0], want)
    # Overlapping windows (stride 1) over a constant input: each window's top-left entry wins, so
    # entry (i, j) of the 2x2 output sends its gradient to x[i, j].
    (dx,) = jax.vjp(lambda v: fn(v, size=2, stride=1), np.zeros((1, 3, 3, 1), np.float32))[1](cot)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 2, 0], [3, 4, 0], [0, 0, 0]])


def test_dtype_kept_and_jit_float32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    b = np.zeros(4, np.float32)
    # The fast paths only: the naive references share the code paths checked in float64 above.
    for fn in (conv.conv_im2col, conv.conv_lax):
        f = jax.jit(lambda x, w, b, fn=fn: jnp.sum(fn(x, w, b, stride=1, padding=1) ** 2))
        dx, dw, db = jax.grad(f, argnums=(0, 1, 2))(x, w, b)
        assert dx.dtype == dw.dtype == db.dtype == jnp.float32, fn.__name__
    for fn in (conv.max_pool, conv.avg_pool):
        assert jax.jit(lambda v, fn=fn: fn(v))(x).dtype == jnp.float32


def test_im2col_second_derivative_matches_lax():
    # The custom_vjp backward is plain jnp, so a gradient of a gradient goes through it.
    with jax.enable_x64(True):
        x, w, b = conv_arrays((2, 5, 5, 2, 3, 3, 3, 2, 1), seed=7)

        def grad_norm(fn):
            loss = lambda x, w: jnp.sum(jnp.tanh(fn(x, w, b, stride=2, padding=1)))  # noqa: E731
            return jax.jit(jax.grad(lambda x, w: jnp.sum(jax.grad(loss, argnums=1)(x, w) ** 2)))

        np.testing.assert_allclose(grad_norm(conv.conv_im2col)(x, w),
                                   grad_norm(conv.conv_lax)(x, w), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_errors_name_the_shapes(name):
    fn = CONVS[name]
    x, w, b = np.zeros((2, 8, 8, 3)), np.zeros((3, 3, 3, 4)), np.zeros(4)
    with pytest.raises(ValueError, match=r"channel mismatch: x has Cin=3 .*\(2, 8, 8, 3\).*"
                                         r"expects 5 .*\(3, 3, 5, 4\)"):
        fn(x, np.zeros((3, 3, 5, 4)), b)
    with pytest.raises(ValueError, match=r"kernel 11x3 .* larger than the padded input 10x10"):
        fn(x, np.zeros((11, 3, 3, 4)), b, padding=1)
    with pytest.raises(ValueError, match=r"stride 2 does not tile .* along H: requires "
                                         r"\(H \+ 2\*padding - k\) % stride == 0, got "
                                         r"\(8 \+ 2\*1 - 3\) = 7"):
        fn(x, w, b, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"b must be \[Cout\] = \(4,\).*got shape \(3,\)"):
        fn(x, w, np.zeros(3))
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, Cin\], got shape \(8, 8, 3\)"):
        fn(x[0], w, b)
    with pytest.raises(ValueError, match=r"stride must be an int >= 1, got 0"):
        fn(x, w, b, stride=0)
    with pytest.raises(ValueError, match=r"padding must be an int >= 0, got -1"):
        fn(x, w, b, padding=-1)
    with pytest.raises(ValueError, match=r"stride must be an int .* under jax.jit close over it"):
        jax.jit(fn)(x, w, b, stride=1)  # a traced stride
    assert fn(x, w, b, stride=np.int64(1), padding=np.int32(1)).shape == (2, 8, 8, 4)


@pytest.mark.parametrize("fn", [conv.max_pool_naive, conv.max_pool, conv.avg_pool_naive,
                                conv.avg_pool], ids=lambda f: f.__name__)
def test_pool_errors_name_the_shapes(fn):
    x = np.zeros((2, 5, 6, 3))
    with pytest.raises(ValueError, match=r"stride 2 does not tile the input along H: requires "
                                         r"\(H - size\) % stride == 0, got \(5 - 2\) = 3"):
        fn(x, size=2, stride=2)
    with pytest.raises(ValueError, match=r"window 7x7 is larger than the input 5x6"):
        fn(x, size=7, stride=1)
    with pytest.raises(ValueError, match=r"x must be \[N, H, W, C\]"):
        fn(x[0], size=2, stride=1)
