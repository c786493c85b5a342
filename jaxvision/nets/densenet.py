"""DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks"), in the form of
torchvision's `densenet121/169/201` (DenseNet-BC: bottleneck layers and compression 0.5), whose
parameter counts the tests check exactly, plus the CIFAR DenseNet-BC of the paper's Table 2.

Within a dense block, layer l sees the channel-concatenation of the block input and the k
("growth rate") new channels of every earlier layer: `x_l = H_l([x_0, x_1, ..., x_{l-1}])`.
Each H_l is BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) (the "B" of BC, paper section 3);
between blocks a transition BN-ReLU-Conv1x1 keeps `floor(compression * C)` channels ("C") and
average-pools 2x2.

Memory of the concatenations: in a block of L layers, layer l reads a concatenation of
c0 + l*k channels, so storing every layer's concatenated (and BN-ReLU'd) input for the backward
pass costs O(L^2 k) activations per block, against O(L k) for the new features themselves; this
quadratic term is what made the first PyTorch/Torch implementations memory-hungry (Pleiss et al.
2017, "Memory-Efficient Implementation of DenseNets"). Under jit, XLA can fuse a concatenation
into its consumer (the BatchNorm) rather than write a separate copy, and it plans the buffers,
but what the backward pass keeps is still per layer. `memory_efficient=True` wraps each dense layer in
`nn.remat` with the concatenation *inside* the checkpointed function: the residuals kept are then
only the per-layer pieces (O(L k)), and the concatenation, BN-ReLU and 1x1 conv are recomputed in
the backward pass (Pleiss et al.'s recipe; torchvision's `memory_efficient` flag). Same
parameters, same results, more compute.

`DenseNet(...)(x, train=...)` returns `(logits, acts)`:
  acts["stem"]     [B, H/4, W/4, num_init_features] (ImageNet stem; H, W with the CIFAR stem);
  acts["block_i"]  output of dense block i (i = 1..len(block_config)), before the transition:
                   [B, h, w, c_in + n_i * k], e.g. DenseNet-121 at 224: 56x56x256, 28x28x512,
                   14x14x1024, 7x7x1024;
  acts["features"] [B, C] float32: the final BN-ReLU'd map, globally average-pooled;
  acts["logits"]   [B, K] float32.

Mixed precision: `dtype` is the computation dtype; parameters stay float32; the pooled features
and the head run in float32.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision: nn.init.kaiming_normal_ on every conv (fan_in, gain sqrt(2), untruncated normal).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel_size: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
    # No conv biases anywhere (torchvision): every conv but the stem's follows a BatchNorm-ReLU
    # and feeds another BatchNorm, and the stem's is followed by one.
    k = kernel_size
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=[(k // 2, k // 2)] * 2,
                   use_bias=False, kernel_init=_CONV_INIT, dtype=dtype, param_dtype=jnp.float32,
                   name=name)


class DenseLayer(nn.Module):
    """Bottleneck layer H_l on the concatenation of `pieces`:
    [(B, H, W, c_i)] -> concat (B, H, W, sum c_i) -> (B, H, W, growth_rate).

    BN-ReLU-Conv1x1(bn_size * k)-BN-ReLU-Conv3x3(k) (pre-activation order, paper section 3),
    then dropout (`drop_rate`; the paper uses 0.2 on CIFAR without augmentation, torchvision 0).

    `train` is a field, not a call argument, so that `nn.remat` (which traces its arguments)
    can wrap the module unchanged.
    """

    growth_rate: int
    bn_size: int
    drop_rate: float
    train: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pieces: Sequence[jax.Array]) -> jax.Array:
        x = jnp.concatenate(pieces, axis=-1)
        x = nn.relu(_batch_norm(self.train, self.dtype, "norm_1")(x))
        x = _conv(self.bn_size * self.growth_rate, 1, self.dtype, "conv_1")(x)
        x = nn.relu(_batch_norm(self.train, self.dtype, "norm_2")(x))
        x = _conv(self.growth_rate, 3, self.dtype, "conv_2")(x)
        if self.drop_rate > 0:
            x = nn.Dropout(rate=self.drop_rate, deterministic=not self.train)(x)
        return x


class DenseNet(nn.Module):
    """DenseNet-BC; defaults are torchvision's `densenet121`.

    Attributes:
      num_classes: `K`.
      growth_rate: `k`, channels each dense layer adds.
      block_config: layers per dense block.
      num_init_features: stem conv width (torchvision: 64 = 2k; the CIFAR nets: 2k).
      bn_size: bottleneck width factor (the 1x1 conv outputs bn_size * k channels).
      compression: `theta`, fraction of channels a transition keeps (floor(theta * C)).
      drop_rate: dropout after each dense layer (only in training, with the "dropout" rng).
      stem: "imagenet": 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool (padding 1), H -> H/4.
        "cifar": one 3x3 stride-1 conv (the paper's CIFAR nets: "a convolution with 16 (or twice
        the growth rate for DenseNet-BC) output channels"), no BN or pool: the first dense layer
        starts with its own BN-ReLU.
      memory_efficient: recompute each dense layer in the backward pass (`nn.remat`) to keep
        activation memory linear in depth; see the module docstring.
      dtype: computation dtype.
    """

    num_classes: int = 1000
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    stem: str = "imagenet"
    memory_efficient: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images; train: batch statistics and dropout.

        Returns `(logits [B, K] float32, acts)`, acts as in the module docstring.
        """
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        acts = {}
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.num_init_features, 7, self.dtype, "stem_conv", stride=2)(x)  # H/2
            x = nn.relu(_batch_norm(train, self.dtype, "stem_norm")(x))
            # torchvision: MaxPool2d(3, stride=2, padding=1): (B, H/2, W/2, C) -> (B, H/4, W/4, C)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(self.num_init_features, 3, self.dtype, "stem_conv")(x)
        acts["stem"] = x

        layer_cls = nn.remat(DenseLayer) if self.memory_efficient else DenseLayer
        for i, num_layers in enumerate(self.block_config, start=1):
            # The pieces are kept apart and each layer concatenates what it reads (inside the
            # remat boundary when memory_efficient): (B, H, W, C) -> (B, H, W, C + L k).
            pieces = [x]
            for j in range(1, num_layers + 1):
                pieces.append(layer_cls(
                    self.growth_rate, self.bn_size, self.drop_rate, train=train,
                    dtype=self.dtype, name=f"block_{i}_layer_{j}",
                )(pieces))
            x = jnp.concatenate(pieces, axis=-1)
            acts[f"block_{i}"] = x
            if i < len(self.block_config):
                # Transition: (B, H, W, C) -> (B, H/2, W/2, floor(compression * C)).
                out = int(math.floor(self.compression * x.shape[-1]))
                x = nn.relu(_batch_norm(train, self.dtype, f"transition_{i}_norm")(x))
                x = _conv(out, 1, self.dtype, f"transition_{i}_conv")(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))

        # torchvision's features end with a BatchNorm ("norm5"); the ReLU follows in forward().
        x = nn.relu(_batch_norm(train, self.dtype, "final_norm")(x))
        # Global average pool in float32: (B, h, w, C) -> (B, C).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        acts["features"] = features
        # torchvision initialises the classifier's bias at 0 (flax's default too).
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                          name="head")(features)
        acts["logits"] = logits
        return logits, acts


# ---- Variants ----------------------------------------------------------------------------------

DenseNet121 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
DenseNet169 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
DenseNet201 = partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
# CIFAR DenseNet-BC (L=100, k=12), Huang et al. 2017 Table 2: three blocks of (100 - 4) / 6 = 16
# bottleneck layers (each 2 convs; + the first conv, 2 transitions and the classifier = 100
# layers), first conv 2k = 24 channels, 32x32 input.
DenseNetBC100 = partial(DenseNet, num_classes=10, growth_rate=12, block_config=(16, 16, 16),
                        num_init_features=24, stem="cifar")
# Tiny: for tests. Two blocks of two layers, k=4, 32x32 input.
DenseNetTiny = partial(DenseNet, num_classes=10, growth_rate=4, block_config=(2, 2),
                       num_init_features=8, bn_size=2, stem="cifar")

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
    "densenet_bc_100_k12": DenseNetBC100,
    "densenet_tiny": DenseNetTiny,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.densenet121/169/201 (DenseNet*_Weights.IMAGENET1K_V1 "num_params").
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    # Huang et al. 2017, Table 2 gives "0.8M" (rounded) for DenseNet-BC (L=100, k=12); this
    # implementation has 769,162 (the paper's Torch code also had a bias on the first conv,
    # +24); the test asserts the count rounds to 0.8M and equals this exact figure.
    "densenet_bc_100_k12": 769_162,
    # No published figure: counted by hand in tests/test_nets_inception_densenet.py.
    "densenet_tiny": 2_194,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "densenet121": (224, 224, 3),
    "densenet169": (224, 224, 3),
    "densenet201": (224, 224, 3),
    "densenet_bc_100_k12": (32, 32, 3),
    "densenet_tiny": (32, 32, 3),
}

NUM_CLASSES: dict[str, int] = {
    "densenet121": 1000,
    "densenet169": 1000,
    "densenet201": 1000,
    "densenet_bc_100_k12": 10,
    "densenet_tiny": 10,
}
