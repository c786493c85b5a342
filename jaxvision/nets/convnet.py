"""VGG-style ConvNet: blocks of (3x3 conv -> BatchNorm -> ReLU), each block ending in 2x2 max-pool.

`ConvNet(...)(x, train=...)` returns `(logits, acts)`. BatchNorm keeps running statistics in the
"batch_stats" collection: train with `apply(..., train=True, mutable=["batch_stats"])`, evaluate
with `train=False` (running averages, deterministic).

Mixed precision: `dtype` is the computation dtype (e.g. bfloat16 on GPU/TPU); parameters stay
float32 (`param_dtype`), and the pooled features and the classifier head run in float32 so the
logits are float32 whatever `dtype` is.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvNet(nn.Module):
    """Conv-BN-ReLU blocks with 2x2 max-pools, global average pool, optional hidden dense, head.

    Attributes:
      widths: output channels of each block; the spatial size halves after each block.
      convs_per_block: number of conv-BN-ReLU units per block.
      num_classes: `K`.
      dense_width: if set, a hidden Dense(dense_width) + ReLU + dropout before the head.
      dropout: drop probability after the hidden dense layer (only with `dense_width`; only
        when `train=True`, with the "dropout" rng).
      dtype: computation dtype of convs, BatchNorm and the hidden dense layer.
    """

    widths: Sequence[int] = (32, 64, 128)
    convs_per_block: int = 1
    num_classes: int = 10
    dense_width: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images (H, W divisible by 2**len(widths) to avoid
        flooring); train: batch statistics + running-average updates, and dropout.

        Returns:
          `(logits [B, K] float32, acts)` with `acts["block_i"]` `[B, H/2**(i+1), W/2**(i+1),
          widths[i]]` (after the pool), `acts["features"]` `[B, widths[-1]]` float32 (global
          average pool) and `acts["logits"]`.
        """
        acts = {}
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            for j in range(self.convs_per_block):
                # No conv bias: BatchNorm's offset right after it would make the bias redundant.
                x = nn.Conv(
                    width,
                    kernel_size=(3, 3),
                    padding="SAME",
                    use_bias=False,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"conv_{i}_{j}",
                )(x)
                # momentum=0.9: running stats follow the last ~10 batches (PyTorch's 0.1 in its
                # convention); flax's default 0.99 lags badly in short CIFAR runs.
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"bn_{i}_{j}",
                )(x)
                x = nn.relu(x)
            # (B, H, W, C) -> (B, H/2, W/2, C)
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            acts[f"block_{i}"] = x
        # Global average pool in float32: (B, h, w, C) -> (B, C).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        acts["features"] = features
        x = features
        if self.dense_width is not None:
            x = nn.Dense(
                self.dense_width, dtype=self.dtype, param_dtype=jnp.float32, name="dense"
            )(x)
            x = nn.relu(x)
            if self.dropout > 0:
                x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        # The head in float32: softmax cross-entropy on bfloat16 logits loses precision, and
        # this layer is a negligible share of the FLOPs.
        logits = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head"
        )(x.astype(jnp.float32))
        acts["logits"] = logits
        return logits, acts


# Variants. Tiny: for tests (1586 params on RGB input with 10 classes).
ConvNetTiny = partial(ConvNet, widths=(8, 16))
# Small: a quick CIFAR-10 baseline (3 convs).
ConvNetSmall = partial(ConvNet, widths=(32, 64, 128))
# Cifar: VGG-style, 6 convs + head, 1,148,874 params. Target: >= 80% CIFAR-10 test accuracy in
# 20-30 epochs with flip + crop augmentation (BN VGG nets of this size usually reach the high 80s);
# not yet measured in this repo: the experiment that trains it should state the measured number.
ConvNetCifar = partial(ConvNet, widths=(64, 128, 256), convs_per_block=2, dense_width=None)

# The table read by benchmarks/nets_table.py and the net tests.
VARIANTS = {"convnet_tiny": ConvNetTiny, "convnet_small": ConvNetSmall, "convnet_cifar": ConvNetCifar}
INPUT_SHAPES = {name: (32, 32, 3) for name in VARIANTS}
NUM_CLASSES = {name: 10 for name in VARIANTS}
