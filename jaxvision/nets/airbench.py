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
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

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
    """

    widths: Sequence[int] = (64, 256, 256)
    whiten_width: int = 24
    num_classes: int = 10
    logit_scale: float = 1 / 9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float (normalised) images; train: batch statistics.

        Returns `(logits [B, K] float32, acts)`: `acts["whiten"]`, `acts["block_i"]` (after the
        block), `acts["features"]` `[B, widths[-1]]` (global max-pool) and `acts["logits"]`.
        """
        conv = partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                     dtype=self.dtype, param_dtype=jnp.float32)
        acts = {}
        x = x.astype(self.dtype)
        # (B, 32, 32, C) -> (B, 31, 31, whiten_width)
        x = nn.gelu(conv(self.whiten_width, (2, 2), padding="VALID", name="whiten")(x))
        acts["whiten"] = x
        for i, width in enumerate(self.widths):
            # No conv biases: each conv is followed by BN, whose offset makes them redundant.
            x = conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv_{i}_0")(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, h, w, .) -> (B, h//2, w//2, .)
            x = nn.gelu(bn(name=f"bn_{i}_0")(x))
            x = conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv_{i}_1")(x)
            x = nn.gelu(bn(name=f"bn_{i}_1")(x))
            acts[f"block_{i}"] = x
        features = jnp.max(x.astype(jnp.float32), axis=(1, 2))  # (B, h, w, C) -> (B, C)
        acts["features"] = features
        logits = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32,
                          param_dtype=jnp.float32, name="head")(features) * self.logit_scale
        acts["logits"] = logits
        return logits, acts


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
