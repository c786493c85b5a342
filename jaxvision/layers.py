"""The layers of CS231n's assignment 2 as pure functions with hand-derived backward passes.

Each differentiable layer is a `jax.custom_vjp` whose backward is the formula derived by hand in
the course (the comment above each backward gives the derivation in a line or two), so
`jax.grad` through a net built from these functions runs the hand-written gradients, exactly as
the assignment's `layer_backward(dout, cache)` functions would. They exist to be read and
checked; the Flax nets in `jaxvision/nets` use JAX's autodiff instead, and the explicit course
nets in `jaxvision/nets/course.py` are built on this module.

Conventions:
  - Shapes: `N` examples, `D` features, `M` outputs, images NHWC (`[N, H, W, C]`). The output
    dtype follows the input (float32 in training, float64 in gradient checks).
  - Configuration arguments (`alpha`, `pieces`, `train`, `momentum`, `eps`, `groups`, `rate`) are
    keyword-only static Python values: they are not differentiated (`nondiff_argnums`) and may
    not be traced; wrap with `functools.partial` before `jax.jit`.
  - Batch norm keeps running averages with the course's convention
    `running = momentum * running + (1 - momentum) * batch_stat` (so `momentum=0.9` keeps 90 %
    of the old value; PyTorch's `momentum` is the complement), with the biased batch variance
    (`mean((x - mu)^2)`, as `np.var` in the assignment). The running averages are buffers, not
    parameters: the wrapper stops their gradients on the way in and out.
  - `eps` is added to the variance inside the square root: `xhat = (x - mu) / sqrt(var + eps)`,
    default 1e-5 as in the assignment (note `flax.linen.LayerNorm`'s default is 1e-6).
  - `softmax_loss` and `svm_loss` are the layer-level losses: they return `(loss, dscores)` with
    the mean over the N examples and its gradient written by hand (no custom_vjp needed).

How to check, in float64 (centred differences cannot get below ~1e-3 relative error in float32):
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((4, 5))
        dy = np.random.default_rng(1).standard_normal((4, 5))
        errors = gradcheck.check(lambda x: layers.tanh(x), x, cotangent=dy)
        assert max(errors.values()) < 1e-6
`gradcheck.check` takes `jax.grad` (that is, the hand-written backward) as the analytic
gradient. `python -m pytest tests/test_layers.py` checks every layer this way (with
Richardson-extrapolated differences, robust where a normalisation gradient nearly cancels), and
also against JAX's autodiff of a plain-jnp reference and against jax.nn / flax.linen forwards.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# ---- affine --------------------------------------------------------------------------------


@jax.custom_vjp
def _affine(x, w, b):
    n = x.shape[0]
    return x.reshape(n, -1) @ w + b[None, :]  # [N, D] @ [D, M] + [1, M] -> [N, M]


def _affine_fwd(x, w, b):
    return _affine(x, w, b), (x, w)


def _affine_bwd(res, dy):
    x, w = res
    # out = x w + b: d/dx = dy w^T (reshaped back to x's shape), d/dw = x^T dy, d/db = sum_n dy.
    n = x.shape[0]
    dx = (dy @ w.T).reshape(x.shape)
    dw = x.reshape(n, -1).T @ dy
    db = jnp.sum(dy, axis=0)
    return dx, dw, db


_affine.defvjp(_affine_fwd, _affine_bwd)


def affine(x, w, b):
    """Fully connected layer `out = x.reshape(N, D) @ w + b`.

    Args:
      x: `[N, d1, ..., dk]`, flattened to `[N, D]` with `D = d1 * ... * dk`.
      w: `[D, M]` weights.
      b: `[M]` biases.

    Returns:
      `[N, M]`.
    """
    x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    if x.ndim < 2:
        raise ValueError(f"affine: x must be [N, d1, ...] (at least 2-D), got shape {x.shape}")
    d = math.prod(x.shape[1:])
    if w.ndim != 2 or w.shape[0] != d:
        raise ValueError(f"affine: w must be [D, M] with D = prod(x.shape[1:]) = {d} "
                         f"(x: {x.shape}), got w: {w.shape}")
    if b.shape != (w.shape[1],):
        raise ValueError(f"affine: b must be [M] = ({w.shape[1]},) to match w: {w.shape}, "
                         f"got b: {b.shape}")
    return _affine(x, w, b)


# ---- activations ---------------------------------------------------------------------------


@jax.custom_vjp
def _relu(x):
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    return _relu(x), x


def _relu_bwd(x, dy):
    # d/dx max(0, x) = [x > 0] (the subgradient 0 is taken at the kink x = 0, as the course does).
    return (jnp.where(x > 0, dy, 0),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(x):
    """`max(0, x)`, elementwise. x: any shape."""
    return _relu(jnp.asarray(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _leaky_relu(alpha, x):
    return jnp.where(x > 0, x, alpha * x)


def _leaky_relu_fwd(alpha, x):
    return _leaky_relu(alpha, x), x


def _leaky_relu_bwd(alpha, x, dy):
    # The slope is 1 for x > 0 and alpha elsewhere.
    return (jnp.where(x > 0, dy, alpha * dy),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def leaky_relu(x, *, alpha=0.01):
    """`x` for x > 0 else `alpha * x` (Maas et al. 2013), elementwise. x: any shape."""
    return _leaky_relu(float(alpha), jnp.asarray(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _elu(alpha, x):
    # expm1 of min(x, 0): exact near 0 and no overflow in the branch that `where` discards.
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


def _elu_fwd(alpha, x):
    out = _elu(alpha, x)
    return out, (x, out)


def _elu_bwd(alpha, res, dy):
    x, out = res
    # For x <= 0, d/dx alpha (e^x - 1) = alpha e^x = out + alpha; for x > 0 the slope is 1.
    return (jnp.where(x > 0, dy, dy * (out + alpha)),)


_elu.defvjp(_elu_fwd, _elu_bwd)


def elu(x, *, alpha=1.0):
    """`x` for x > 0 else `alpha * (exp(x) - 1)` (Clevert et al. 2016), elementwise."""
    return _elu(float(alpha), jnp.asarray(x))


@jax.custom_vjp
def _sigmoid(x):
    # 1 / (1 + e^-x) written with e^-|x| <= 1 so that neither branch overflows.
    z = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1 / (1 + z), z / (1 + z))


def _sigmoid_fwd(x):
    s = _sigmoid(x)
    return s, s


def _sigmoid_bwd(s, dy):
    # d/dx 1 / (1 + e^-x) = e^-x / (1 + e^-x)^2 = s (1 - s).
    return (dy * s * (1 - s),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(x):
    """The logistic function `1 / (1 + exp(-x))`, elementwise. x: any shape."""
    return _sigmoid(jnp.asarray(x))


@jax.custom_vjp
def _tanh(x):
    return jnp.tanh(x)


def _tanh_fwd(x):
    t = jnp.tanh(x)
    return t, t


def _tanh_bwd(t, dy):
    # d/dx tanh x = 1 - tanh^2 x.
    return (dy * (1 - t * t),)


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(x):
    """`tanh(x)`, elementwise. x: any shape."""
    return _tanh(jnp.asarray(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _maxout(pieces, x):
    return x.reshape(*x.shape[:-1], -1, pieces).max(axis=-1)


def _maxout_fwd(pieces, x):
    return _maxout(pieces, x), x


def _maxout_bwd(pieces, x, dy):
    # The max passes its gradient to the winning piece of each group and zero to the others
    # (on a tie, to the first winner: one valid subgradient).
    groups = x.reshape(*x.shape[:-1], -1, pieces)  # [N, M, pieces]
    winner = jax.nn.one_hot(jnp.argmax(groups, axis=-1), pieces, dtype=dy.dtype)  # [N, M, pieces]
    return ((winner * dy[..., None]).reshape(x.shape),)


_maxout.defvjp(_maxout_fwd, _maxout_bwd)


def maxout(x, *, pieces):
    """Maxout unit (Goodfellow et al. 2013): the max over consecutive groups of `pieces` features.

    Args:
      x: `[N, M * pieces]` (any leading axes are kept: `[..., M * pieces]`).
      pieces: the number of linear pieces per output, an int >= 1.

    Returns:
      `[N, M]`, `x.reshape(N, M, pieces).max(-1)`.
    """
    x = jnp.asarray(x)
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
        raise ValueError(f"maxout: pieces must be an int >= 1, got {pieces!r}")
    if x.ndim < 1 or x.shape[-1] % pieces:
        raise ValueError(f"maxout: the last axis of x must be M * pieces, got x: {x.shape} "
                         f"with pieces={pieces}")
    return _maxout(pieces, x)


# ---- normalisation -------------------------------------------------------------------------


def _normalize_backward(dxhat, xhat, inv_std, *, axis):
    """dx for `xhat = (x - mean(x)) * inv_std` with the statistics taken over `axis`.

    With m the number of values per statistic, the chain rule through the mean and the variance
    collapses to  dx = (1/m) * inv_std * (m * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
    (the derivation: dvar = -1/2 inv_std^3 sum(dxhat (x - mu)), dmu = -inv_std sum(dxhat) since
    sum(x - mu) = 0, dx = dxhat inv_std + dvar 2 (x - mu) / m + dmu / m). `inv_std` and the sums
    keep their reduced axes as size 1 so they broadcast.
    """
    m = math.prod(xhat.shape[a] for a in axis)
    sum_dxhat = jnp.sum(dxhat, axis=axis, keepdims=True)
    sum_dxhat_xhat = jnp.sum(dxhat * xhat, axis=axis, keepdims=True)
    return (inv_std / m) * (m * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)


def batchnorm_backward(dout, x, gamma, *, eps=1e-5):
    """The simplified batch-norm backward (train mode), as the custom_vjp uses.

    dx = (1/N) * gamma * inv_std * (N * dout - sum(dout) - xhat * sum(dout * xhat)), sums over N.

    Args:
      dout: `[N, D]` upstream gradient; x: `[N, D]` the forward input; gamma: `[D]`.

    Returns:
      `(dx [N, D], dgamma [D], dbeta [D])`.
    """
    mean = jnp.mean(x, axis=0, keepdims=True)  # [1, D]
    var = jnp.mean(jnp.square(x - mean), axis=0, keepdims=True)  # [1, D], biased
    inv_std = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * inv_std
    dx = _normalize_backward(dout * gamma[None, :], xhat, inv_std, axis=(0,))
    return dx, jnp.sum(dout * xhat, axis=0), jnp.sum(dout, axis=0)


def batchnorm_backward_staged(dout, x, gamma, *, eps=1e-5):
    """Batch-norm backward (train mode) one node of the computational graph at a time.

    The course's first version: the forward is split into elementary steps
        mu = mean(x); xc = x - mu; sq = xc^2; var = mean(sq); std = sqrt(var + eps);
        inv = 1 / std; xhat = xc * inv; out = gamma * xhat + beta
    and each step is differentiated in reverse order. It must equal `batchnorm_backward`.

    Args:
      dout: `[N, D]`; x: `[N, D]`; gamma: `[D]`.

    Returns:
      `(dx [N, D], dgamma [D], dbeta [D])`.
    """
    n = x.shape[0]
    # Forward, keeping every intermediate.
    mu = jnp.sum(x, axis=0, keepdims=True) / n  # [1, D]
    xc = x - mu  # [N, D]
    sq = xc * xc  # [N, D]
    var = jnp.sum(sq, axis=0, keepdims=True) / n  # [1, D]
    std = jnp.sqrt(var + eps)  # [1, D]
    inv = 1 / std  # [1, D]
    xhat = xc * inv  # [N, D]
    # Backward, in reverse order.
    dbeta = jnp.sum(dout, axis=0)  # out = gammax + beta
    dgamma = jnp.sum(dout * xhat, axis=0)  # gammax = gamma * xhat
    dxhat = dout * gamma[None, :]
    dinv = jnp.sum(dxhat * xc, axis=0, keepdims=True)  # xhat = xc * inv (inv broadcast over N)
    dxc = dxhat * inv
    dstd = -dinv / (std * std)  # inv = 1 / std
    dvar = dstd * 0.5 / std  # std = sqrt(var + eps)
    dsq = jnp.ones_like(sq) * dvar / n  # var = sum(sq) / n
    dxc = dxc + 2 * xc * dsq  # sq = xc^2 (xc has two consumers: add)
    dmu = -jnp.sum(dxc, axis=0, keepdims=True)  # xc = x - mu
    dx = dxc + jnp.ones_like(x) * dmu / n  # mu = sum(x) / n (x has two consumers: add)
    return dx, dgamma, dbeta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batchnorm_train(eps, x, gamma, beta):
    """-> (out [N, D], batch mean [D], biased batch variance [D])."""
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean[None, :]), axis=0)
    xhat = (x - mean[None, :]) * jax.lax.rsqrt(var + eps)[None, :]
    return gamma[None, :] * xhat + beta[None, :], mean, var


def _batchnorm_train_fwd(eps, x, gamma, beta):
    outs = _batchnorm_train(eps, x, gamma, beta)
    _, mean, var = outs
    return outs, (x, gamma, mean, var)


def _batchnorm_train_bwd(eps, res, cotangents):
    x, gamma, mean, var = res
    dout, dmean, dvar = cotangents
    inv_std = jax.lax.rsqrt(var + eps)[None, :]  # [1, D]
    xhat = (x - mean[None, :]) * inv_std
    # The simplified formula (see _normalize_backward):
    # dx = (1/N) gamma inv_std (N dout - sum(dout) - xhat sum(dout xhat)).
    dx = _normalize_backward(dout * gamma[None, :], xhat, inv_std, axis=(0,))
    # The batch statistics are outputs too (they feed the running averages, whose gradient the
    # public wrapper stops, so these cotangents are zero there): d mean/dx = 1/N and
    # d var/dx = 2 (x - mean) / N.
    n = x.shape[0]
    dx = dx + dmean[None, :] / n + dvar[None, :] * 2 * (x - mean[None, :]) / n
    return dx, jnp.sum(dout * xhat, axis=0), jnp.sum(dout, axis=0)


_batchnorm_train.defvjp(_batchnorm_train_fwd, _batchnorm_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batchnorm_test(eps, x, gamma, beta, mean, var):
    xhat = (x - mean[None, :]) * jax.lax.rsqrt(var + eps)[None, :]
    return gamma[None, :] * xhat + beta[None, :]


def _batchnorm_test_fwd(eps, x, gamma, beta, mean, var):
    return _batchnorm_test(eps, x, gamma, beta, mean, var), (x, gamma, mean, var)


def _batchnorm_test_bwd(eps, res, dout):
    x, gamma, mean, var = res
    inv_std = jax.lax.rsqrt(var + eps)  # [D]
    xhat = (x - mean[None, :]) * inv_std[None, :]
    dxhat = dout * gamma[None, :]
    # With fixed statistics the layer is affine in x: dx = gamma inv_std dout. For completeness
    # the statistics' own gradients: d/dmean = -inv_std sum(dxhat), and since
    # d/dvar (var + eps)^-1/2 = -1/2 inv_std^3, d/dvar = -1/2 inv_std^2 sum(dxhat xhat).
    dx = dxhat * inv_std[None, :]
    dmean = -inv_std * jnp.sum(dxhat, axis=0)
    dvar = -0.5 * inv_std * inv_std * jnp.sum(dxhat * xhat, axis=0)
    return dx, jnp.sum(dout * xhat, axis=0), jnp.sum(dout, axis=0), dmean, dvar


_batchnorm_test.defvjp(_batchnorm_test_fwd, _batchnorm_test_bwd)


def _check_norm_config(name, *, eps, momentum=None, train=None):
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
        raise ValueError(f"{name}: momentum must be in [0, 1], got {momentum!r}")
    if train is not None and not isinstance(train, bool):
        raise ValueError(f"{name}: train must be a Python bool (static), got {train!r}")


def batchnorm(x, gamma, beta, *, running_mean, running_var, train, momentum=0.9, eps=1e-5):
    """Batch normalisation (Ioffe & Szegedy 2015) of `[N, D]` features.

    train=True: normalise each feature with the batch mean and biased variance, and update the
    running averages `running = momentum * running + (1 - momentum) * batch_stat`.
    train=False: normalise with the running averages, which are returned unchanged.

    Args:
      x: `[N, D]`.
      gamma, beta: `[D]` scale and shift.
      running_mean, running_var: `[D]` running averages (buffers: no gradient flows through
        them, in or out).
      train: Python bool.
      momentum: in [0, 1], the weight of the old running value.
      eps: added to the variance.

    Returns:
      `(out [N, D], (new_running_mean [D], new_running_var [D]))`.
    """
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    running_mean, running_var = jnp.asarray(running_mean), jnp.asarray(running_var)
    _check_norm_config("batchnorm", eps=eps, momentum=momentum, train=train)
    if x.ndim != 2:
        raise ValueError(f"batchnorm: x must be [N, D], got shape {x.shape}")
    d = x.shape[1]
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if v.shape != (d,):
            raise ValueError(f"batchnorm: {name} must be [D] = ({d},) for x: {x.shape}, "
                             f"got {name}: {v.shape}")
    running_mean = jax.lax.stop_gradient(running_mean)
    running_var = jax.lax.stop_gradient(running_var)
    if not train:
        out = _batchnorm_test(float(eps), x, gamma, beta, running_mean, running_var)
        return out, (running_mean, running_var)
    out, mean, var = _batchnorm_train(float(eps), x, gamma, beta)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    new_mean = momentum * running_mean + (1 - momentum) * mean
    new_var = momentum * running_var + (1 - momentum) * var
    return out, (new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype))


def spatial_batchnorm(x, gamma, beta, *, running_mean, running_var, train, momentum=0.9,
                      eps=1e-5):
    """Batch normalisation of images, one set of statistics per channel.

    Every pixel of every image is an example of its channel: `x` is reshaped to `[N*H*W, C]`
    and goes through `batchnorm` (and its hand-written backward); the reshape's own gradient is
    the inverse reshape.

    Args:
      x: `[N, H, W, C]`; gamma, beta, running_mean, running_var: `[C]`; train, momentum, eps: as
        for `batchnorm`.

    Returns:
      `(out [N, H, W, C], (new_running_mean [C], new_running_var [C]))`.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"spatial_batchnorm: x must be [N, H, W, C], got shape {x.shape}")
    c = x.shape[-1]
    out, stats = batchnorm(x.reshape(-1, c), gamma, beta, running_mean=running_mean,
                           running_var=running_var, train=train, momentum=momentum, eps=eps)
    return out.reshape(x.shape), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layernorm(eps, x, gamma, beta):
    mean = jnp.mean(x, axis=1, keepdims=True)  # [N, 1]
    var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)  # [N, 1]
    xhat = (x - mean) * jax.lax.rsqrt(var + eps)
    return gamma[None, :] * xhat + beta[None, :]


def _layernorm_fwd(eps, x, gamma, beta):
    return _layernorm(eps, x, gamma, beta), (x, gamma)


def _layernorm_bwd(eps, res, dout):
    x, gamma = res
    mean = jnp.mean(x, axis=1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=1, keepdims=True) + eps)
    xhat = (x - mean) * inv_std
    # Batch norm's formula with the roles of the axes swapped: statistics per row, over D, and
    # gamma applied before (dxhat = dout gamma):
    # dx = (1/D) inv_std (D dxhat - sum_D(dxhat) - xhat sum_D(dxhat xhat)).
    dx = _normalize_backward(dout * gamma[None, :], xhat, inv_std, axis=(1,))
    return dx, jnp.sum(dout * xhat, axis=0), jnp.sum(dout, axis=0)


_layernorm.defvjp(_layernorm_fwd, _layernorm_bwd)


def layernorm(x, gamma, beta, *, eps=1e-5):
    """Layer normalisation (Ba et al. 2016): each example normalised over its D features.

    The same in train and test (no running statistics).

    Args:
      x: `[N, D]`; gamma, beta: `[D]`; eps: added to the variance.

    Returns:
      `[N, D]`.
    """
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    _check_norm_config("layernorm", eps=eps)
    if x.ndim != 2:
        raise ValueError(f"layernorm: x must be [N, D], got shape {x.shape}")
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape != (x.shape[1],):
            raise ValueError(f"layernorm: {name} must be [D] = ({x.shape[1]},) for x: {x.shape}, "
                             f"got {name}: {v.shape}")
    return _layernorm(float(eps), x, gamma, beta)


def _group_view(x, groups):
    n, h, w, c = x.shape
    return x.reshape(n, h * w, groups, c // groups)  # [N, HW, G, C/G]; stats over axes (1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _groupnorm(groups, eps, x, gamma, beta):
    xg = _group_view(x, groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)  # [N, 1, G, 1]
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    xhat = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return gamma[None, None, None, :] * xhat + beta[None, None, None, :]


def _groupnorm_fwd(groups, eps, x, gamma, beta):
    return _groupnorm(groups, eps, x, gamma, beta), (x, gamma)


def _groupnorm_bwd(groups, eps, res, dout):
    x, gamma = res
    xg = _group_view(x, groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True) + eps)
    xhat = (xg - mean) * inv_std  # [N, HW, G, C/G]
    # Layer norm's formula applied to each (example, group) block of m = H W C/G values;
    # gamma is per channel so it is applied before the reduction (dxhat = dout gamma).
    dxhat = _group_view(dout * gamma[None, None, None, :], groups)
    dx = _normalize_backward(dxhat, xhat, inv_std, axis=(1, 3)).reshape(x.shape)
    xhat = xhat.reshape(x.shape)
    return dx, jnp.sum(dout * xhat, axis=(0, 1, 2)), jnp.sum(dout, axis=(0, 1, 2))


_groupnorm.defvjp(_groupnorm_fwd, _groupnorm_bwd)


def groupnorm(x, gamma, beta, *, groups, eps=1e-5):
    """Group normalisation (Wu & He 2018): per image, channels split into `groups` groups, each
    group normalised over its H * W * C/groups values.

    groups=1 is layer norm over (H, W, C); groups=C is instance norm.

    Args:
      x: `[N, H, W, C]` with `C % groups == 0`; gamma, beta: `[C]` per-channel scale and shift;
      groups: int >= 1; eps: added to the variance.

    Returns:
      `[N, H, W, C]`.
    """
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    _check_norm_config("groupnorm", eps=eps)
    if x.ndim != 4:
        raise ValueError(f"groupnorm: x must be [N, H, W, C], got shape {x.shape}")
    c = x.shape[-1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"groupnorm: groups must be a positive int dividing C = {c} "
                         f"(x: {x.shape}), got groups={groups!r}")
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape != (c,):
            raise ValueError(f"groupnorm: {name} must be [C] = ({c},) for x: {x.shape}, "
                             f"got {name}: {v.shape}")
    return _groupnorm(groups, float(eps), x, gamma, beta)


# ---- dropout -------------------------------------------------------------------------------


@jax.custom_vjp
def _scale_by_mask(x, mask):
    return x * mask


def _scale_by_mask_fwd(x, mask):
    return x * mask, (x, mask)


def _scale_by_mask_bwd(res, dy):
    x, mask = res
    # out = x * mask elementwise: the gradient goes through the same kept units with the same
    # 1/(1-rate) scale. (d/dmask = dy * x for completeness; the mask comes from the key, so the
    # public wrapper never differentiates it.)
    return dy * mask, dy * x


_scale_by_mask.defvjp(_scale_by_mask_fwd, _scale_by_mask_bwd)


def dropout(x, *, key, rate, train):
    """Inverted dropout (Srivastava et al. 2014; CS231n notes): each unit is kept with
    probability `1 - rate` and scaled by `1 / (1 - rate)` at train time, so the expected output
    equals the input and test time needs no rescaling (identity).

    Args:
      x: any shape.
      key: a `jax.random` key; a unit is kept where `uniform(key, x.shape, float32) < 1 - rate`,
        so the same key gives the same mask (for any input dtype). May be None when not
        training or when rate == 0.
      rate: the drop probability, a Python float in [0, 1).
      train: Python bool.

    Returns:
      an array like `x`.
    """
    x = jnp.asarray(x)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"dropout: rate must be a number in [0, 1), got {rate!r}")
    if not isinstance(train, bool):
        raise ValueError(f"dropout: train must be a Python bool (static), got {train!r}")
    if not train or rate == 0:
        return x
    if key is None:
        raise ValueError("dropout: a key is needed when train=True and rate > 0")
    # The uniform draw is float32 whatever the input dtype or x64 mode, so a key gives the same
    # mask in float32 training and in a float64 gradient check.
    keep = jax.random.uniform(key, x.shape, jnp.float32) < 1 - rate
    mask = jnp.where(keep, 1 / (1 - rate), 0).astype(x.dtype)
    return _scale_by_mask(x, mask)


# ---- layer-level losses --------------------------------------------------------------------


def _check_scores_labels(name, scores, labels):
    if scores.ndim != 2:
        raise ValueError(f"{name}: scores must be [N, C], got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"{name}: labels must be [N] = ({scores.shape[0]},) for scores: "
                         f"{scores.shape}, got labels: {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")


def softmax_loss(scores, labels):
    """Mean softmax cross-entropy and its gradient, written by hand.

    L = (1/N) sum_i -log softmax(s_i)[y_i];  dL/ds_i = (softmax(s_i) - onehot(y_i)) / N.

    Args:
      scores: `[N, C]`; labels: `[N]` int in [0, C).

    Returns:
      `(loss scalar, dscores [N, C])`.
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    _check_scores_labels("softmax_loss", scores, labels)
    n, c = scores.shape
    # Shift by the row max before exponentiating (no overflow; softmax is shift-invariant).
    shifted = scores - jnp.max(scores, axis=1, keepdims=True)
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))
    onehot = jax.nn.one_hot(labels, c, dtype=scores.dtype)
    loss = -jnp.sum(onehot * log_probs) / n
    dscores = (jnp.exp(log_probs) - onehot) / n
    return loss, dscores


def svm_loss(scores, labels):
    """Mean multiclass SVM (hinge, margin 1) loss and its gradient, written by hand.

    L = (1/N) sum_i sum_{j != y_i} max(0, s_ij - s_iy_i + 1). Each positive margin adds +1/N to
    ds_ij and -1/N to ds_iy_i.

    Args:
      scores: `[N, C]`; labels: `[N]` int in [0, C).

    Returns:
      `(loss scalar, dscores [N, C])`.
    """
    scores, labels = jnp.asarray(scores), jnp.asarray(labels)
    _check_scores_labels("svm_loss", scores, labels)
    n, c = scores.shape
    onehot = jax.nn.one_hot(labels, c, dtype=jnp.bool_)
    true = jnp.sum(jnp.where(onehot, scores, 0), axis=1, keepdims=True)  # [N, 1]
    margins = jnp.where(onehot, 0, jnp.maximum(0, scores - true + 1))  # [N, C]
    loss = jnp.sum(margins) / n
    active = (margins > 0).astype(scores.dtype)
    count = jnp.sum(active, axis=1, keepdims=True)  # [N, 1]
    dscores = (active - jnp.where(onehot, count, 0)) / n
    return loss, dscores
