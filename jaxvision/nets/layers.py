"""Layers shared by several net families: torchvision-compatible pooling and local response
normalisation. NHWC throughout.

- `adaptive_avg_pool`: torchvision's `AdaptiveAvgPool2d` (AlexNet, VGG, GoogLeNet's aux heads);
- `ceil_mode_padding` / `max_pool_ceil`: PyTorch's `ceil_mode=True` and Caffe's pooling
  arithmetic (SqueezeNet, NIN, GoogLeNet);
- `local_response_norm`: Krizhevsky et al. 2012, section 3.3 (AlexNet, ZFNet);
- `DropConnect`: Wan et al. 2013; `fractional_max_pool`: Graham 2014 (regularisation, issue 5).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _adaptive_mean(x: jax.Array, out: int, axis: int) -> jax.Array:
    """Adaptive average pooling along one axis: `x.shape[axis]` -> `out`."""
    size = x.shape[axis]
    if size == out:
        return x
    if size % out == 0:
        # Equal, disjoint bins: one reshape and a mean.
        shape = x.shape[:axis] + (out, size // out) + x.shape[axis + 1 :]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    # General case (torchvision's rule): bin i covers [floor(i * size / out),
    # ceil((i + 1) * size / out)); bins overlap when size % out != 0, and when size < out each
    # input row is repeated into several bins.
    bins = [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]
    return jnp.stack(
        [jnp.mean(lax.slice_in_dim(x, lo, hi, axis=axis), axis=axis) for lo, hi in bins],
        axis=axis,
    )


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """torchvision's `AdaptiveAvgPool2d` in NHWC: `(B, H, W, C) -> (B, h, w, C)`.

    Output cell (i, j) is the mean over rows [floor(iH/h), ceil((i+1)H/h)) and columns
    [floor(jW/w), ceil((j+1)W/w)). The bins are a product of row and column intervals, so the
    2-D mean is a row mean of column means: pooled separably, no (h*w)-way gather. When
    `H == h` it is the identity (AlexNet at 224x224: the features are already 6x6; VGG: 7x7).
    """
    h, w = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _adaptive_mean(_adaptive_mean(x, h, axis=1), w, axis=2)


def ceil_mode_padding(size: int, window: int, stride: int) -> int:
    """Extra trailing padding that turns a VALID pool into PyTorch's `ceil_mode=True` (and Caffe's
    pooling, which always rounds up): output size `ceil((size - window) / stride) + 1`, dropping
    the last window if it would start past the input (PyTorch's rule, so no window is all pad).
    """
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:
        out -= 1
    return max((out - 1) * stride + window - size, 0)


def max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
    """`MaxPool2d(window, stride, ceil_mode=True)`: `(B, H, W, C) -> (B, ceil((H-k)/s)+1, .., C)`.

    The trailing pad holds -inf (reduce_window pads with the max's identity), so it never wins.
    """
    pads = [(0, ceil_mode_padding(x.shape[a], window, stride)) for a in (1, 2)]
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def local_response_norm(
    x: jax.Array, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
    """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

    `b[..., i] = a[..., i] / (k + alpha * sum_{j=i-size//2}^{i+size//2} a[..., j]^2) ** beta`,
    the sum clipped to the existing channels; the defaults are the paper's (k=2, n=5, alpha=1e-4,
    beta=0.75). This is the paper's formula: Caffe and PyTorch's `LocalResponseNorm` divide
    alpha by n, so their alpha=1e-4 is this function's alpha=2e-5. Computed in float32 (the
    squares overflow or lose precision in bfloat16) and cast back. `(B, H, W, C) -> same`.
    """
    a = x.astype(jnp.float32)
    # Sum of squares over a window of `size` channels centred on each channel; zero padding.
    window_sum = lax.reduce_window(
        jnp.square(a),
        0.0,
        lax.add,
        window_dimensions=(1, 1, 1, size),
        window_strides=(1, 1, 1, 1),
        padding=((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)),
    )
    return (a / (k + alpha * window_sum) ** beta).astype(x.dtype)


# --- Regularisation layers (issue 5) ----------------------------------------------------------
# Dropout is flax's `nn.Dropout`; stochastic depth is `jaxvision.nets.resnet.DropPath`.


class DropConnect(nn.Module):
    """A Dense layer with DropConnect (Wan et al. 2013, "Regularization of Neural Networks using
    DropConnect"): in training each weight is zeroed with probability `rate`, instead of each
    activation as in dropout. `(..., D) -> (..., features)`.

    Training (`train=True`, "dropout" rng): `y = x @ (M * W) / (1 - rate) + b`, M ~
    Bernoulli(1 - rate) elementwise over W `[D, features]`. The 1 / (1 - rate) rescaling
    ("inverted" convention, as `nn.Dropout`) makes E[y] the plain Dense output, so evaluation is
    the deterministic Dense layer `x @ W + b`. (Wan et al. instead keep W unscaled and, at test
    time, moment-match a Gaussian over the pre-activations and sample it; the mean-field rule
    used here is the cheaper, common simplification.) The bias is not masked.

    Attributes:
      features: output width.
      rate: probability of dropping a weight, in [0, 1).
      per_example: one mask per example (the paper's per-example formulation; memory
        B x D x features) instead of one mask shared by the whole batch (default; one matmul).
      use_bias, dtype, param_dtype, kernel_init, bias_init: as `nn.Dense`; the parameters are
        named "kernel" and "bias" like `nn.Dense`'s, so the two are interchangeable.
    """

    features: int
    rate: float = 0.5
    per_example: bool = False
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"DropConnect rate must be in [0, 1), got {self.rate}")
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if train and self.rate > 0.0:
            keep = 1.0 - self.rate
            rng = self.make_rng("dropout")
            if self.per_example:
                if x.ndim != 2:
                    raise ValueError(f"per_example DropConnect needs x [B, D], got {x.shape}")
                # [B, D, F] masks: each example sees its own thinned layer.
                mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + kernel.shape)
                masked = jnp.where(mask, kernel / keep, jnp.zeros((), self.dtype))
                y = jnp.einsum("bd,bdf->bf", x, masked)
            else:
                mask = jax.random.bernoulli(rng, keep, kernel.shape)
                y = x @ jnp.where(mask, kernel / keep, jnp.zeros((), self.dtype))
        else:
            y = x @ kernel
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            # (F,) -> (1, ..., 1, F): same rank as y (no implicit rank promotion).
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (self.features,))
        return y


def fractional_pool_regions(size: int, out: int, key: jax.Array, *,
                            overlapping: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pooling intervals along one axis for `fractional_max_pool`: `(starts, ends)` int32 `[out]`,
    region i = rows `starts[i] .. ends[i]` inclusive.

    Graham 2014 ("Fractional Max-Pooling", section 2): boundaries `0 = a_0 < a_1 < ... < a_out =
    size` with increments `a_i - a_{i-1}` in {1, 2}. That fixes how many are 2 (`size - out`)
    and 1 (`2 out - size`); their order is a random permutation drawn from `key` (the paper's
    "random" sequences). Disjoint: region i = `[a_i, a_{i+1} - 1]` (size 1 or 2; the regions
    tile the axis). Overlapping: `[a_i, a_{i+1}]` (size 2 or 3; clipped to the last row).

    When `size > 2 out` (ratio 2 on an odd size: 7 -> 3) no such sequence reaches the end: all
    increments are 2 and the last `size - 2 out` rows are left out (disjoint) or only the first
    of them is reached (overlapping), as 2x2 max-pooling with stride 2 floors an odd size.
    """
    if not 0 < out <= size:
        raise ValueError(f"fractional pooling needs 0 < out <= size, got size={size}, out={out}")
    covered = min(size, 2 * out)  # rows reached by out increments of at most 2
    steps = jnp.concatenate([jnp.ones((2 * out - covered,), jnp.int32),
                             jnp.full((covered - out,), 2, jnp.int32)])
    steps = jax.random.permutation(key, steps)
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(steps)])  # [out + 1]
    starts = bounds[:-1]
    ends = jnp.minimum(bounds[1:], size - 1) if overlapping else bounds[1:] - 1
    return starts, ends


def _pool_axis(x: jax.Array, starts: jax.Array, ends: jax.Array, axis: int) -> jax.Array:
    # Regions have at most 3 elements (start, start + 1, end): a max of three gathers, with
    # start + 1 clipped to the end so 1- and 2-element regions repeat an element (harmless
    # for a max).
    middle = jnp.minimum(starts + 1, ends)
    take = lambda idx: jnp.take(x, idx, axis=axis)  # noqa: E731
    return jnp.maximum(jnp.maximum(take(starts), take(middle)), take(ends))


def fractional_max_pool(x: jax.Array, *, ratio: float, key: jax.Array,
                        overlapping: bool = False) -> jax.Array:
    """Fractional max-pooling (Graham 2014): `(B, H, W, C) -> (B, floor(H / ratio),
    floor(W / ratio), C)` with `ratio` in (1, 2], e.g. sqrt(2) to shrink gently through many
    layers.

    Region (i, j) is the product of row interval i and column interval j of
    `fractional_pool_regions` (rows and columns drawn independently from `key`); the max over a
    product region is the max over its rows of the max over its columns, so the two axes are
    pooled one after the other. One draw of regions per call, shared by the batch and channels;
    the same key gives the same regions (a pure function of `key`).

    Training: a fresh key per step (e.g. from the "dropout" rng) makes the regions a random
    regulariser. Test time: either fix the key (one deterministic net), or, as Graham does,
    average the net's predictions over several draws of the regions (a cheap ensemble: every
    draw is a slightly different net with the same weights).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
    if not 1.0 < ratio <= 2.0:
        raise ValueError(f"ratio must be in (1, 2], got {ratio}")
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = int(height // ratio), int(width // ratio)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"ratio {ratio} leaves no output for input {height}x{width}")
    key_h, key_w = jax.random.split(key)
    rows = fractional_pool_regions(height, out_h, key_h, overlapping=overlapping)
    cols = fractional_pool_regions(width, out_w, key_w, overlapping=overlapping)
    return _pool_axis(_pool_axis(x, *rows, axis=1), *cols, axis=2)
