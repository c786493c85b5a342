"""Network in Network (Lin, Chen & Yan 2014, "Network In Network", ICLR), the CIFAR-10 form.

Each "mlpconv" block is a kxk conv followed by two 1x1 convs (a small MLP slid over the image,
section 3.1), all with ReLU. The classifier is the paper's global average pooling (section
3.2): the last 1x1 conv outputs one map per class and the logits are the maps' spatial means;
there is no dense layer.

The channel sizes, kernels, pools and dropout follow the authors' released CIFAR-10 model (the
Caffe model-zoo "NIN CIFAR10" model, 89.6% validation accuracy), which the paper
describes only as "three stacked mlpconv layers":

    block 1: conv 5x5 192 (pad 2) -> 1x1 160 -> 1x1 96   -> max-pool 3x3/2 -> dropout 0.5
    block 2: conv 5x5 192 (pad 2) -> 1x1 192 -> 1x1 192  -> avg-pool 3x3/2 -> dropout 0.5
    block 3: conv 3x3 192 (pad 1) -> 1x1 192 -> 1x1 10   -> global average pool (8x8)

Caffe's pooling rounds the output size up (32 -> 16 -> 8 here, where flooring would give 15 ->
7) and its average pooling divides by the number of input pixels in the (clipped) window; both
reproduced below. As in the released model, ReLU also follows the last 1x1 conv, so the logits
are non-negative averages of rectified class maps (`final_relu`).

Parameters (weights + biases), the paper gives no exact figure:
    block 1: 5*5*3*192+192 = 14,592;   192*160+160 = 30,880;  160*96+96 = 15,456
    block 2: 5*5*96*192+192 = 460,992; 192*192+192 = 37,056;  37,056
    block 3: 3*3*192*192+192 = 331,968; 37,056;               head 192*10+10 = 1,930
    total 966,986 (~0.97M).

`NIN(...)(x, train=...)` returns `(logits, acts)`: "block_1" `[B, 16, 16, 96]`, "block_2"
`[B, 8, 8, 192]` (after the pools, before dropout), "block_3" `[B, 8, 8, 192]` (the last hidden
1x1 conv's output), "features" `[B, 192]` (its global average, float32: the 192-d descriptor a
linear probe would read; the classifier itself is a 1x1 conv then a pool), "class_maps"
`[B, 8, 8, K]` (the per-class confidence maps the paper visualises) and "logits". No BatchNorm;
dropout draws from the "dropout" rng, only when `train=True`.

Mixed precision: `dtype` is the computation dtype; parameters stay float32, and the head's 1x1
conv and the global average run in float32 so the logits are float32 (the head is under 0.1%
of the FLOPs).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.layers import ceil_mode_padding, max_pool_ceil


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Caffe's MAX pooling, kernel 3, stride 2 (ceil mode): `(B, 32, 32, C) -> (B, 16, 16, C)`."""
    return max_pool_ceil(x, 3, 2)


def avg_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Caffe's AVE pooling, kernel 3, stride 2 (ceil mode); a window that overhangs the input is
    averaged over its in-image pixels only: `(B, 16, 16, C) -> (B, 8, 8, C)`."""
    pads = [(0, ceil_mode_padding(x.shape[a], 3, 2)) for a in (1, 2)]
    return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=pads, count_include_pad=False)


# The released CIFAR-10 model: (kernel, conv width, 1x1 widths) per block; the last block's final
# 1x1 conv is the classifier (`num_classes` maps) and is not listed.
NIN_CIFAR_BLOCKS = ((5, 192, (160, 96)), (5, 192, (192, 192)), (3, 192, (192,)))
# Tiny: for tests.
NIN_TINY_BLOCKS = ((5, 16, (16, 16)), (5, 16, (16, 16)), (3, 16, (16,)))

# He et al. 2015 normal init (fan-in) for the ReLU convs. (The released model used Gaussians
# with hand-picked standard deviations per layer, 0.05 for most.)
_relu_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class NIN(nn.Module):
    """Three mlpconv blocks with pooling and dropout between them, global-average-pool classifier.

    Attributes:
      blocks: per block `(kernel, conv width, 1x1 widths)`; the classifier's 1x1 conv (to
        `num_classes` maps) ends the last block.
      pools: the pool after each block but the last (the released model: max then average, 3x3
        stride 2, ceil mode); the last block ends in the global average pool.
      dropout: drop probability after each of these pools.
      final_relu: ReLU on the class maps before averaging (as in the released model).
      num_classes: `K`.
      dtype: computation dtype of the convs before the classifier.
    """

    blocks: Sequence[tuple[int, int, Sequence[int]]] = NIN_CIFAR_BLOCKS
    pools: Sequence[Callable[[jax.Array], jax.Array]] = (max_pool_3x3_s2, avg_pool_3x3_s2)
    dropout: float = 0.5
    final_relu: bool = True
    num_classes: int = 10
    dtype: Any = jnp.float32

    def _conv(self, features: int, kernel: int, name: str, dtype: Any) -> nn.Conv:
        pad = kernel // 2  # "same" size for odd kernels: pad 2 for 5x5, 1 for 3x3, 0 for 1x1
        return nn.Conv(
            features,
            kernel_size=(kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            kernel_init=_relu_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, 32, 32, C]` float images (other sizes work: the classifier is a pool).

        Returns `(logits [B, K] float32, acts)`; shapes for 32x32 input in the module docstring.
        """
        if len(self.pools) != len(self.blocks) - 1:
            raise ValueError(
                f"NIN needs one pool between each pair of blocks: {len(self.blocks)} blocks, "
                f"{len(self.pools)} pools."
            )
        acts = {}
        x = x.astype(self.dtype)
        for b, (kernel, width, mlp_widths) in enumerate(self.blocks, start=1):
            # mlpconv: (B, H, W, C) -> (B, H, W, width) -> 1x1 -> ... -> (B, H, W, mlp_widths[-1])
            x = nn.relu(self._conv(width, kernel, f"block_{b}_conv", self.dtype)(x))
            for m, mlp_width in enumerate(mlp_widths, start=1):
                x = nn.relu(self._conv(mlp_width, 1, f"block_{b}_mlp_{m}", self.dtype)(x))
            if b < len(self.blocks):
                # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)
                x = self.pools[b - 1](x)
                acts[f"block_{b}"] = x
                if self.dropout > 0:
                    x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
            else:
                acts[f"block_{b}"] = x
        acts["features"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        # The classifier: one map per class, (B, h, w, C) -> (B, h, w, K), in float32.
        maps = self._conv(self.num_classes, 1, "head", jnp.float32)(x.astype(jnp.float32))
        if self.final_relu:
            maps = nn.relu(maps)
        acts["class_maps"] = maps
        # Global average pooling (section 3.2): (B, h, w, K) -> (B, K).
        logits = jnp.mean(maps, axis=(1, 2))
        acts["logits"] = logits
        return logits, acts


# ---- variants --------------------------------------------------------------------------------

NINCifar = partial(NIN, blocks=NIN_CIFAR_BLOCKS)
NINTiny = partial(NIN, blocks=NIN_TINY_BLOCKS)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "nin_cifar10": NINCifar,
    "nin_tiny": NINTiny,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # Computed (derivation in the module docstring) for the authors' released CIFAR-10 model;
    # the paper gives no exact figure.
    "nin_cifar10": 966_986,
    # No published figure: counted by hand in tests/test_nets_classic.py.
    "nin_tiny": 11_482,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {name: (32, 32, 3) for name in VARIANTS}

NUM_CLASSES: dict[str, int] = {name: 10 for name in VARIANTS}
