"""Layers shared by several net families: torchvision-compatible pooling and local response
normalisation. NHWC throughout.

- `adaptive_avg_pool`: torchvision's `AdaptiveAvgPool2d` (AlexNet, VGG, GoogLeNet's aux heads);
- `ceil_mode_padding` / `max_pool_ceil`: PyTorch's `ceil_mode=True` and Caffe's pooling
  arithmetic (SqueezeNet, NIN, GoogLeNet);
- `local_response_norm`: Krizhevsky et al. 2012, section 3.3 (AlexNet, ZFNet).
"""
from __future__ import annotations

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
