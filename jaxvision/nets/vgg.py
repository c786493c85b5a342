"""VGG (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015): configurations A, B, D, E of Table 1 (VGG-11, 13, 16, 19), with and
without BatchNorm, and the CIFAR form.

The ImageNet nets match torchvision's `vgg11`..`vgg19` and `vgg*_bn` parameter for parameter:
- five stages of 3x3 convs (stride 1, padding 1, ReLU), each stage ending in a 2x2 stride-2
  max-pool: 224 -> 112 -> 56 -> 28 -> 14 -> 7;
- an adaptive average pool to 7x7 (torchvision's addition: the identity at 224x224, and it lets
  other input sizes reach the 25,088-wide first dense layer);
- the classifier fc_6 (4096) -> ReLU -> dropout 0.5 -> fc_7 (4096) -> ReLU -> dropout 0.5 ->
  head (section 3.1: "dropout regularisation for the first two fully-connected layers").
- The BN variants (not in the paper; Ioffe & Szegedy 2015 came later) put BatchNorm between each
  conv and its ReLU and, like torchvision, *keep* the conv bias although BatchNorm's offset makes
  it redundant: that is what the reference parameter counts (and ported weights) have.

The CIFAR form (`vgg16_bn_cifar` etc., the common CIFAR practice, e.g. the widely used
pytorch-cifar VGG): the same conv stack with BatchNorm on 32x32 input, whose five pools leave
a 1x1x512 map, then a single linear classifier 512 -> 10; no hidden dense layers, no dropout.
Here the map is reduced by a global average pool (`pooled_size=1`), the identity on 32x32 input.

`VGG(...)(x, train=...)` returns `(logits, acts)`: `acts["stage_1"]`..`acts["stage_S"]`
(after each stage's pool), `acts["pool"]` (after the adaptive pool), `acts["fc_6"]`,
`acts["fc_7"]` (hidden dense layers after ReLU, when present), `acts["features"]` (the head's
input in float32: fc_7 for the ImageNet form, the pooled 512-vector for the CIFAR form) and
`acts["logits"]`. BatchNorm statistics live in "batch_stats"; dropout draws from the "dropout"
rng, only when `train=True`.

Mixed precision: `dtype` is the computation dtype; parameters stay float32, and the classifier
head runs in float32 so the logits are float32 whatever `dtype` is.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.layers import adaptive_avg_pool

# Table 1 of the paper: the conv widths of each of the five stages.
CONFIG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # VGG-11
CONFIG_B = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))  # VGG-13
CONFIG_D = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # VGG-16
CONFIG_E = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)  # VGG-19
# Tiny: for tests. Three stages on 32x32: 16 -> 8 -> 4, pooled to 2x2.
CONFIG_TINY = ((8,), (16,), (16, 16))

# torchvision's VGG init: He et al. 2015 normal init in fan-out mode for the convs
# (`kaiming_normal_(mode="fan_out", nonlinearity="relu")`), N(0, 0.01) for the dense layers,
# zero biases. The paper itself trained A from N(0, 0.01) and initialised the deeper nets from
# it, then noted (section 3.1) that Glorot init works without pre-training.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(0.01)


class VGG(nn.Module):
    """Stages of 3x3 conv [-> BN] -> ReLU, each ending in a 2x2 max-pool; adaptive average pool;
    dense classifier.

    Attributes:
      stages: conv widths per stage (`CONFIG_A` .. `CONFIG_E`).
      batch_norm: BatchNorm between each conv and its ReLU (torchvision's `vgg*_bn`).
      hidden: widths of the hidden dense layers ((4096, 4096) for ImageNet, () for CIFAR).
      pooled_size: side of the adaptive average pool before flattening (7 for ImageNet, 1 =
        global average pool for the CIFAR form).
      dropout: drop probability after each hidden dense layer's ReLU (torchvision's placement).
      num_classes: `K`.
      dtype: computation dtype of convs, BatchNorm and hidden dense layers.
    """

    stages: Sequence[Sequence[int]] = CONFIG_D
    batch_norm: bool = False
    hidden: Sequence[int] = (4096, 4096)
    pooled_size: int = 7
    dropout: float = 0.5
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images (H, W divisible by 2**len(stages) to avoid
        flooring: 224 for ImageNet, 32 for CIFAR).

        Returns `(logits [B, K] float32, acts)`: "stage_i" `[B, H/2**i, W/2**i, stages[i-1][-1]]`,
        "pool" `[B, s, s, C]` (s = pooled_size), "fc_6", "fc_7", ... `[B, hidden[j]]`,
        "features" `[B, hidden[-1] or C]` float32, "logits".
        """
        acts = {}
        x = x.astype(self.dtype)
        for i, widths in enumerate(self.stages, start=1):
            for j, width in enumerate(widths, start=1):
                x = nn.Conv(
                    width,
                    kernel_size=(3, 3),
                    padding=((1, 1), (1, 1)),
                    kernel_init=_conv_init,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"stage_{i}_conv_{j}",
                )(x)
                if self.batch_norm:
                    # momentum=0.9, epsilon=1e-5: PyTorch's BatchNorm2d (momentum 0.1 in its
                    # convention), as in torchvision's vgg*_bn.
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=0.9,
                        epsilon=1e-5,
                        dtype=self.dtype,
                        param_dtype=jnp.float32,
                        name=f"stage_{i}_bn_{j}",
                    )(x)
                x = nn.relu(x)
            # (B, H, W, C) -> (B, H/2, W/2, C)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            acts[f"stage_{i}"] = x
        # (B, h, w, C) -> (B, s, s, C): the identity at the standard input size.
        x = adaptive_avg_pool(x, self.pooled_size)
        acts["pool"] = x
        # (B, s, s, C) -> (B, s*s*C) in (h, w, c) order; torchvision flattens NCHW in (c, h, w)
        # order, so fc_6's rows must be permuted when porting its weights.
        x = x.reshape(x.shape[0], -1)
        # Dense layers numbered after the conv stages, as in the paper's Caffe models (fc6, fc7).
        for k, width in enumerate(self.hidden):
            name = f"fc_{len(self.stages) + 1 + k}"
            x = nn.Dense(
                width,
                kernel_init=_dense_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
            x = nn.relu(x)
            acts[name] = x
            if self.dropout > 0:
                x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        features = x.astype(jnp.float32)
        acts["features"] = features
        # The head in float32: softmax cross-entropy on bfloat16 logits loses precision.
        logits = nn.Dense(
            self.num_classes,
            kernel_init=_dense_init,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="head",
        )(features)
        acts["logits"] = logits
        return logits, acts


# ---- variants --------------------------------------------------------------------------------

VGG11 = partial(VGG, stages=CONFIG_A)
VGG13 = partial(VGG, stages=CONFIG_B)
VGG16 = partial(VGG, stages=CONFIG_D)
VGG19 = partial(VGG, stages=CONFIG_E)
VGG11BN = partial(VGG, stages=CONFIG_A, batch_norm=True)
VGG13BN = partial(VGG, stages=CONFIG_B, batch_norm=True)
VGG16BN = partial(VGG, stages=CONFIG_D, batch_norm=True)
VGG19BN = partial(VGG, stages=CONFIG_E, batch_norm=True)
# CIFAR form: same conv stacks with BatchNorm, 32x32 input, global pool, one linear layer.
_cifar = dict(batch_norm=True, hidden=(), pooled_size=1, num_classes=10)
VGG11BNCifar = partial(VGG, stages=CONFIG_A, **_cifar)
VGG13BNCifar = partial(VGG, stages=CONFIG_B, **_cifar)
VGG16BNCifar = partial(VGG, stages=CONFIG_D, **_cifar)
VGG19BNCifar = partial(VGG, stages=CONFIG_E, **_cifar)
# Tiny: for tests. BatchNorm, one hidden dense layer with dropout, a non-trivial adaptive pool
# (4x4 -> 2x2), 32x32 input, 10 classes.
VGGTiny = partial(
    VGG, stages=CONFIG_TINY, batch_norm=True, hidden=(32,), pooled_size=2, num_classes=10
)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": VGG11,
    "vgg13": VGG13,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "vgg11_bn": VGG11BN,
    "vgg13_bn": VGG13BN,
    "vgg16_bn": VGG16BN,
    "vgg19_bn": VGG19BN,
    "vgg11_bn_cifar": VGG11BNCifar,
    "vgg13_bn_cifar": VGG13BNCifar,
    "vgg16_bn_cifar": VGG16BNCifar,
    "vgg19_bn_cifar": VGG19BNCifar,
    "vgg_tiny": VGGTiny,
}

_CIFAR = ("vgg11_bn_cifar", "vgg13_bn_cifar", "vgg16_bn_cifar", "vgg19_bn_cifar", "vgg_tiny")

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.vgg* (VGG*_Weights.IMAGENET1K_V1 "num_params").
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    # torchvision's vgg*_bn: the plain count plus a BN scale and offset per conv channel
    # (e.g. VGG-16: 2 * (2*64 + 2*128 + 3*256 + 6*512) = 8,448 more).
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    # CIFAR form: no paper gives these; computed as the torchvision conv stack (VGG-16: the plain
    # count 138,357,544 minus its three dense layers 123,642,856 = 14,714,688) + BN (VGG-16:
    # 8,448) + Linear(512, 10) (5,130). VGG-16: 14,728,266, the "14.7M" usually quoted for the
    # CIFAR VGG-16 with BatchNorm.
    "vgg11_bn_cifar": 9_231_114,
    "vgg13_bn_cifar": 9_416_010,
    "vgg16_bn_cifar": 14_728_266,
    "vgg19_bn_cifar": 20_040_522,
    # No published figure: counted by hand in tests/test_nets_classic.py.
    "vgg_tiny": 8_554,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    name: (32, 32, 3) if name in _CIFAR else (224, 224, 3) for name in VARIANTS
}

NUM_CLASSES: dict[str, int] = {name: 10 if name in _CIFAR else 1000 for name in VARIANTS}
