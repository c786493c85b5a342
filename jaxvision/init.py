"""Weight initialisation: small random numbers, Xavier/Glorot and He, and the lecture's experiment.

Every initialiser has the signature of `jax.nn.initializers`: `init(key, shape, dtype) -> array`,
so it can be passed as a flax `kernel_init` too. Shapes are those of jaxvision's (and flax's)
kernels:

  * dense `[fan_in, fan_out]`: `x @ W` with `x: [N, fan_in]`;
  * convolution HWIO `[KH, KW, C_in, C_out]`: one output sums over KH * KW * C_in inputs, so
    `fan_in = KH * KW * C_in` and `fan_out = KH * KW * C_out` (as jax.nn.initializers, with
    `in_axis=-2, out_axis=-1`).

Why the scale matters (CS231n lecture 6, "Weight Initialization"): with `h = f(x @ W)` and
independent unit-variance inputs, `Var(x @ W) = fan_in * Var(W) * E[x^2]`. If
`fan_in * Var(W)` is far below 1 (e.g. 0.01 * randn with fan_in = 500: 500 * 1e-4 = 0.05),
activations shrink geometrically with depth and so do the gradients; far above 1, tanh saturates.
Xavier picks `Var(W) = 1 / fan_in` to keep the variance of a linear (or tanh, near 0) layer;
He picks `2 / fan_in` because ReLU zeroes half of its inputs, halving `E[h^2]`.
`activation_statistics` runs the lecture's experiment that shows it.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

FANS = ("in", "avg")
DISTRIBUTIONS = ("normal", "uniform")
NONLINEARITIES = ("tanh", "relu")


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense `[in, out]` or HWIO conv `[..., in, out]` kernel shape.

    Raises:
      ValueError: a shape with fewer than 2 dimensions (a bias or a scale has no fan-in).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"shape must be a kernel [fan_in, fan_out] or [KH, KW, C_in, C_out], got {shape}")
    receptive_field = math.prod(shape[:-2])  # 1 for a dense layer
    return receptive_field * shape[-2], receptive_field * shape[-1]


def _draw(key, shape, dtype, *, variance: float, distribution: str) -> jax.Array:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "normal":
        return math.sqrt(variance) * jax.random.normal(key, shape, dtype)
    # U[-a, a] has variance a^2 / 3, so a = sqrt(3 * variance).
    return math.sqrt(3.0 * variance) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def xavier(
    key: jax.Array,
    shape: Sequence[int],
    dtype: jnp.dtype = jnp.float32,
    *,
    fan: str = "in",
    distribution: str = "normal",
) -> jax.Array:
    """Xavier initialisation, Glorot & Bengio 2010, "Understanding the difficulty of training
    deep feedforward neural networks".

    Variants (all zero-mean):
      fan="in", distribution="normal" (default): `W ~ N(0, 1 / fan_in)`, the course's form
        (`W = np.random.randn(fan_in, fan_out) / np.sqrt(fan_in)`, lecture 6). It keeps the
        variance of the forward signal: `fan_in * Var(W) = 1`. Equals
        `jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")` (LeCun normal without
        truncation).
      fan="avg": `Var(W) = 2 / (fan_in + fan_out)`, the paper's Eq. 12 compromise between
        keeping the forward variance (1 / fan_in) and the backward one (1 / fan_out).
        With distribution="uniform" this is the paper's "normalized initialization" Eq. 16,
        `W ~ U[-sqrt(6 / (fan_in + fan_out)), +sqrt(...)]` = `jax.nn.initializers.glorot_uniform`.
      distribution="uniform": the same variance from `U[-a, a]`, `a = sqrt(3 Var(W))`.

    Args:
      key: a PRNG key.
      shape: `[fan_in, fan_out]` or HWIO `[KH, KW, C_in, C_out]` (see `fans`).
      dtype: of the result.
      fan: "in" or "avg".
      distribution: "normal" or "uniform".

    Returns:
      `shape` array of `dtype`.
    """
    fan_in, fan_out = fans(shape)
    if fan not in FANS:
        raise ValueError(f"fan must be one of {FANS}, got {fan!r}")
    variance = 1.0 / fan_in if fan == "in" else 2.0 / (fan_in + fan_out)
    return _draw(key, shape, dtype, variance=variance, distribution=distribution)


def he(
    key: jax.Array,
    shape: Sequence[int],
    dtype: jnp.dtype = jnp.float32,
    *,
    distribution: str = "normal",
) -> jax.Array:
    """He initialisation, He et al. 2015, "Delving Deep into Rectifiers", Eq. 10.

    `W ~ N(0, 2 / fan_in)` (the course's `np.random.randn(fan_in, fan_out) / np.sqrt(fan_in / 2)`):
    a ReLU passes half of a symmetric input, so `E[relu(z)^2] = Var(z) / 2`, and the factor 2
    keeps `E[h^2]` constant from layer to layer. distribution="uniform" draws the same variance
    from `U[-a, a]`, `a = sqrt(6 / fan_in)`. The normal form equals
    `jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")` (He normal without
    truncation).

    Args:
      key, shape, dtype: as `xavier`.
      distribution: "normal" or "uniform".
    """
    fan_in, _ = fans(shape)
    return _draw(key, shape, dtype, variance=2.0 / fan_in, distribution=distribution)


def small_random(
    key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32, *, scale: float = 0.01
) -> jax.Array:
    """`scale * N(0, 1)`, the course's first attempt (`W = 0.01 * np.random.randn(D, H)`).

    Fine for a small net; in a deep one the activations (and so the gradients on the weights)
    shrink by ~`scale * sqrt(fan_in)` per layer (see the module docstring).
    """
    return scale * jax.random.normal(key, tuple(shape), dtype)


@functools.partial(jax.jit, static_argnames="nonlinearity")
def _forward(x: jax.Array, ws: jax.Array, *, nonlinearity: str) -> jax.Array:
    """x: [B, D]; ws: [L, D, D] -> hidden activations [L, B, D] of h_l = f(h_{l-1} @ W_l)."""
    f = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu

    def layer(h, w):
        h = f(h @ w)  # [B, D]
        return h, h

    return jax.lax.scan(layer, x, ws)[1]


class ActivationStats(NamedTuple):
    """Per-layer statistics of the hidden activations `h_1 .. h_L` (not the input).

    mean, std: float64 `[L]`, over all `batch * width` values of each layer.
    counts: int `[L, bins]` histogram counts of each layer's values.
    edges: float64 `[L, bins + 1]`, each layer's bin edges: [-1, 1] for tanh; [0, max] for ReLU
      (the lecture's plots give each layer its own range for ReLU).
    """

    mean: np.ndarray
    std: np.ndarray
    counts: np.ndarray
    edges: np.ndarray


def activation_statistics(
    key: jax.Array,
    *,
    num_layers: int = 10,
    width: int = 500,
    nonlinearity: str = "tanh",
    init: Initializer = xavier,
    batch: int = 1000,
    bins: int = 50,
) -> ActivationStats:
    """The lecture's experiment: activations of a deep MLP on unit-Gaussian input.

    `h_0 = x ~ N(0, 1)` of shape `[batch, width]`; `h_l = f(h_{l-1} @ W_l)` with
    `W_l = init(key_l, (width, width), float32)`, no biases, for l = 1 .. num_layers
    (CS231n lecture 6: 10 layers of 500 units, 1000 examples).

    Args:
      key: a PRNG key (input and every layer's weights are drawn from it).
      num_layers, width, batch: the net and the input.
      nonlinearity: "tanh" or "relu".
      init: an initialiser `(key, shape, dtype) -> array`, e.g. `xavier`, `he`,
        `functools.partial(small_random, scale=0.01)`.
      bins: histogram bins per layer.

    Returns:
      an `ActivationStats`.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    for name, value in (("num_layers", num_layers), ("width", width), ("batch", batch),
                        ("bins", bins)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    k_x, *k_layers = jax.random.split(key, num_layers + 1)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    # The weights are drawn outside jit, layer by layer: jax caches the compiled random-number
    # kernel by shape, so every initialiser and every call reuses it (compiling a program of
    # random draws per call and per initialiser cost ~1 s each on CPU).
    ws = jnp.stack([init(k, (width, width), jnp.float32) for k in k_layers])  # [L, width, width]
    hs = np.asarray(_forward(x, ws, nonlinearity=nonlinearity), dtype=np.float64)
    counts, edges = [], []
    for h in hs:
        lo, hi = (-1.0, 1.0) if nonlinearity == "tanh" else (0.0, float(h.max()) or 1.0)
        c, e = np.histogram(h, bins=bins, range=(lo, hi))
        counts.append(c)
        edges.append(e)
    return ActivationStats(mean=hs.mean(axis=(1, 2)), std=hs.std(axis=(1, 2)),
                           counts=np.stack(counts), edges=np.stack(edges))
