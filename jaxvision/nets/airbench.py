"""A fast CIFAR-10 net after Keller Jordan's airbench ("94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv 2404.00498): the ideas, in Flax, not its code.

    x [B, 32, 32, 3]
    -> 2x2 conv "whiten" (VALID, 2 * 12 channels), GELU            [B, 31, 31, 24]
    -> per block: 3x3 conv -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU
       31 -> 15 -> 7 -> 3 spatially
    -> global max-pool, linear head (no bias), logits * `logit_scale`

The first layer is not learned: `whitening_kernel(images)` sets it to the eigenvectors of the
covariance of 2x2 patches, scaled by 1/sqrt(eigenvalue), plus their negatives (so a GELU after it
keeps both signs): the net starts on decorrelated, unit-variance inputs (the paper's Sec. 3.2),
and the experiment freezes it (`optim.frozen`). Pooling right after the first conv of a block
(conv-pool-BN-act) does the block's expensive work at the lower resolution only once, the scaled
logits (1/9 in the paper) act like a temperature that makes the early updates better conditioned.

`AirbenchNet(...)(x, train=...)` returns `(logits, acts)` like every net here; BN momentum 0.9.

Knobs for the speedrun (experiments/cifar10_speedrun.py), all off by default so the net above is
unchanged: `dirac=True` starts every 3x3 conv as the identity on its first `min(in, out)` output
channels (`dirac_init`, the paper's identity initialisation: the net starts close to a shallow
one, and the extra depth is grown into); `depth` convs per block, and `residual=True` adds a
shortcut around all of a block's convs but the first (airbench96's deeper blocks);
`bn_scale=False` drops the BN scale (the paper freezes it at 1: with a scale-invariant conv
before it, the scale is redundant); `bn_momentum`/`bn_epsilon` (flax's convention: `running =
momentum * running + (1 - momentum) * batch`, so PyTorch's momentum 0.6 is flax's 0.4);
`kernel_init` for the convs and the head (the speedrun uses PyTorch's default, uniform with
variance 1 / (3 fan_in), for which the paper's learning rates were tuned); `reshape_pool`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class AirbenchNet(nn.Module):
    """Attributes:
      widths: output channels of the three conv blocks (the paper's 94% net: 64, 256, 256).
      whiten_width: channels of the 2x2 whitening conv: 2 * (2*2*C) = 24 for RGB.
      num_classes: K.
      logit_scale: multiplies the logits (the paper: 1/9).
      dtype: computation dtype; parameters and logits stay float32.
      depth: 3x3 convs per block (>= 2; airbench94: 2, airbench96: 3).
      residual: a shortcut around all of a block's convs but the first (needs depth >= 3).
      dirac: identity init of the 3x3 convs (`dirac_init` around `kernel_init`).
      bn_scale: learn a BN scale (False: fixed at 1, as the paper).
      bn_momentum, bn_epsilon: BatchNorm's, in flax's convention (module doc).
      kernel_init: init of the 3x3 conv kernels and of the head (the whitening kernel is
        overwritten by `whitening_kernel`).
      reshape_pool: the 2x2 max-pools as a reshape and a max (`max_pool_2x2`) instead of
        `nn.max_pool`: the same forward values, a gradient without select-and-scatter (a knob
        to time on the GPU; off by default).
    """

    widths: Sequence[int] = (64, 256, 256)
    whiten_width: int = 24
    num_classes: int = 10
    logit_scale: float = 1 / 9
    dtype: Any = jnp.float32
    depth: int = 2
    residual: bool = False
    dirac: bool = False
    bn_scale: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    kernel_init: Callable = nn.initializers.lecun_normal()
    reshape_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float (normalised) images; train: batch statistics.

        Returns `(logits [B, K] float32, acts)`: `acts["whiten"]`, `acts["block_i"]` (after the
        block), `acts["features"]` `[B, widths[-1]]` (global max-pool) and `acts["logits"]`.
        """
        if self.depth < 2 or (self.residual and self.depth < 3):
            raise ValueError(f"AirbenchNet: depth must be >= 2 (>= 3 with residual=True), got "
                             f"depth={self.depth}, residual={self.residual}")
        conv = partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
        kernel_init = dirac_init(self.kernel_init) if self.dirac else self.kernel_init
        # No conv biases: each conv is followed by BN, whose offset makes them redundant.
        conv3 = partial(conv, kernel_size=(3, 3), padding="SAME", use_bias=False,
                        kernel_init=kernel_init)
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, use_scale=self.bn_scale,
                     dtype=self.dtype, param_dtype=jnp.float32)
        acts = {}
        x = x.astype(self.dtype)
        # (B, 32, 32, C) -> (B, 31, 31, whiten_width)
        x = nn.gelu(conv(self.whiten_width, (2, 2), padding="VALID", name="whiten")(x))
        acts["whiten"] = x
        for i, width in enumerate(self.widths):
            x = conv3(width, name=f"conv_{i}_0")(x)
            # (B, h, w, .) -> (B, h//2, w//2, .)
            x = max_pool_2x2(x) if self.reshape_pool else nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.gelu(bn(name=f"bn_{i}_0")(x))
            shortcut = x
            for j in range(1, self.depth):
                x = conv3(width, name=f"conv_{i}_{j}")(x)
                x = nn.gelu(bn(name=f"bn_{i}_{j}")(x))
            if self.residual:
                x = x + shortcut
            acts[f"block_{i}"] = x
        features = jnp.max(x.astype(jnp.float32), axis=(1, 2))  # (B, h, w, C) -> (B, C)
        acts["features"] = features
        logits = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32,
                          param_dtype=jnp.float32, kernel_init=self.kernel_init,
                          name="head")(features) * self.logit_scale
        acts["logits"] = logits
        return logits, acts


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID: `[B, H, W, C] -> [B, H//2, W//2, C]` (an odd last row or
    column is dropped), as a reshape and a max over the window axes. Forward values equal
    `nn.max_pool(x, (2, 2), strides=(2, 2))`; the gradient is the max's (an elementwise mask,
    shared among exact ties) rather than reduce-window's select-and-scatter."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.max(x, axis=(2, 4))


def dirac_init(base_init: Callable = nn.initializers.lecun_normal()) -> Callable:
    """A conv kernel init `(key, [kh, kw, in, out], dtype) -> kernel`: `base_init`'s kernel with
    its first `min(in, out)` output channels replaced by the identity (1 at the centre tap from
    the same input channel, 0 elsewhere), as PyTorch's `dirac_` on those channels.

    So the conv starts by passing its first `min(in, out)` input channels through unchanged (the
    rest of the outputs are random features): a deep stack of such convs starts as a shallow net
    (the paper's "identity initialization"). kh and kw must be odd (a centre tap).
    """
    def init(key, shape, dtype=jnp.float32):
        kh, kw, c_in, c_out = shape
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"dirac_init needs odd kernel sizes, got a kernel of shape {shape}")
        kernel = base_init(key, shape, dtype)
        n = min(c_in, c_out)
        identity = jnp.zeros((kh, kw, c_in, n), dtype).at[kh // 2, kw // 2].set(
            jnp.eye(c_in, n, dtype=dtype))
        return kernel.at[..., :n].set(identity)
    return init


def pytorch_default_init() -> Callable:
    """PyTorch's default conv/linear weight init, uniform in +-1/sqrt(fan_in) (variance
    1 / (3 fan_in)): the scale airbench's learning rates were tuned for (flax's default,
    lecun_normal, has variance 1 / fan_in; after BN only the scale relative to the update size
    matters, i.e. the effective learning rate)."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def whitening_kernel(images: np.ndarray, *, eps: float = 5e-4) -> np.ndarray:
    """The 2x2 patch-whitening conv kernel of `AirbenchNet`, from (normalised) images.

    images: float `[N, H, W, C]` (a few thousand training images are plenty).
    Returns: float32 `[2, 2, C, 2 * 4C]`: the covariance eigenvectors `v_i / sqrt(lambda_i + eps)`
      and their negatives, so that each output channel of the conv has unit variance and they are
      uncorrelated on these images (`eps` keeps near-zero eigenvalues from blowing up).
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    # All 2x2 patches, flattened in the kernel's (kh, kw, C) order: (N*(H-1)*(W-1), 4C).
    patches = np.stack([images[:, i:h - 1 + i, j:w - 1 + j, :] for i in (0, 1) for j in (0, 1)],
                       axis=3).reshape(-1, 4 * c)
    patches = patches - patches.mean(axis=0)
    cov = patches.T @ patches / len(patches)  # (4C, 4C)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    filters = eigenvectors / np.sqrt(eigenvalues + eps)  # columns: whitened directions
    kernel = np.concatenate([filters, -filters], axis=1).reshape(2, 2, c, 8 * c)
    return kernel.astype(np.float32)


def whitening_kernel_jax(images: jax.Array, *, eps: float = 5e-4) -> jax.Array:
    """`whitening_kernel` in jax, so it runs inside jit on the device (the speedrun times it).

    images: float `[N, H, W, C]`. Returns float32 `[2, 2, C, 8C]`, equal to `whitening_kernel`
    up to the sign of each eigenvector (and float32 rounding): both have the same filters up to
    sign, and with the negatives concatenated the same set of output channels, possibly with a
    filter and its negative swapped.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    images = images.astype(jnp.float32)
    n, h, w, c = images.shape
    # (N*(H-1)*(W-1), 4C), in the kernel's (kh, kw, C) order as in `whitening_kernel`.
    patches = jnp.stack([images[:, i:h - 1 + i, j:w - 1 + j, :] for i in (0, 1) for j in (0, 1)],
                        axis=3).reshape(-1, 4 * c)
    patches = patches - jnp.mean(patches, axis=0, keepdims=True)
    # HIGHEST: no TF32/bf16 passes on GPU for the covariance (its small eigenvalues matter).
    cov = jnp.matmul(patches.T, patches, precision=jax.lax.Precision.HIGHEST) / patches.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(cov)  # ascending
    filters = eigenvectors / jnp.sqrt(eigenvalues + eps)[None, :]
    return jnp.concatenate([filters, -filters], axis=1).reshape(2, 2, c, 8 * c)


# Variants. Tiny: tests. Small: the CPU-sized net of experiments/cifar10_10_epochs.py.
AirbenchTiny = partial(AirbenchNet, widths=(8, 16, 16))
AirbenchSmall = partial(AirbenchNet, widths=(32, 64, 128))
Airbench94 = partial(AirbenchNet, widths=(64, 256, 256))

VARIANTS = {"airbench_tiny": AirbenchTiny, "airbench_small": AirbenchSmall,
            "airbench94": Airbench94}
# No published counts to compare with (airbench states none).
PUBLISHED_PARAMS: dict[str, int] = {}
INPUT_SHAPES = {name: (32, 32, 3) for name in VARIANTS}
NUM_CLASSES = {name: 10 for name in VARIANTS}
