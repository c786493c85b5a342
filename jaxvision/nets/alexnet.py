"""AlexNet (Krizhevsky et al. 2012) and ZFNet (Zeiler & Fergus 2013), plus the pooling and
normalisation helpers the classic nets share.

Sources:
- Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep Convolutional Neural
  Networks" (NeurIPS): five convs, three dense layers, ReLU (section 3.1), local response
  normalisation after the first two convs (section 3.3), overlapping 3x3 stride-2 max-pooling
  (section 3.4), dropout 0.5 in the first two dense layers (section 4.2).
- torchvision's `alexnet`, which this file matches parameter for parameter (61,100,840 at 1000
  classes). torchvision's docs attribute it to Krizhevsky's later "One weird trick" paper
  (2014); it is a *single-GPU* net: 64-192-384-256-256 channels with no grouping instead of the
  2012 paper's 96-256-384-384-256 split in two groups over two GPUs, no LRN, and an adaptive
  average pool to 6x6 before the classifier so that inputs other than 224x224 still reach the
  9216-wide first dense layer.
- Zeiler & Fergus 2013, "Visualizing and Understanding Convolutional Networks" (ECCV 2014),
  Figure 3: the AlexNet layout with a 7x7 stride-2 first conv (AlexNet: 11x11 stride 4) and a
  stride-2 second conv, dense (ungrouped) convs 3-5 on one GPU, and "contrast normalisation
  across feature maps" after the pooling of layers 1 and 2.

`AlexNet(...)(x, train=...)` returns `(logits, acts)`: `acts["conv_1"]`..`acts["conv_5"]` are
the outputs of the paper's layers 1-5 (conv -> ReLU [-> LRN] [-> max-pool]), `acts["pool"]` the
adaptive-average-pooled map `[B, 6, 6, C5]`, `acts["fc_6"]`, `acts["fc_7"]` the hidden dense
layers after ReLU, `acts["features"]` = fc_7 in float32 (the "fc7 codes" used as generic image
features, e.g. in CS231n's transfer-learning notes) and `acts["logits"]`. There is no BatchNorm;
dropout draws from the "dropout" rng, only when `train=True`.

Mixed precision: `dtype` is the computation dtype; parameters stay float32, and the classifier
head runs in float32 so the logits are float32 whatever `dtype` is.

The pooling and normalisation helpers it shares with the other nets are in `layers.py`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.layers import adaptive_avg_pool, local_response_norm, max_pool_ceil

# ---- AlexNet / ZFNet -------------------------------------------------------------------------


class ConvSpec(NamedTuple):
    """One conv layer of an AlexNet-style stack: square kernel, symmetric padding."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    pool: bool = False  # a 3x3 stride-2 max-pool after this layer ("overlapping pooling", 3.4)


# torchvision's single-GPU AlexNet:
# 224 -> conv_1 55 -> pool 27 -> conv_2 27 -> pool 13 -> conv_3..5 13 -> pool 6.
ALEXNET_CONVS = (
    ConvSpec(64, 11, stride=4, padding=2, pool=True),
    ConvSpec(192, 5, padding=2, pool=True),
    ConvSpec(384, 3, padding=1),
    ConvSpec(256, 3, padding=1),
    ConvSpec(256, 3, padding=1, pool=True),
)

# ZFNet as drawn in Zeiler & Fergus 2013, Figure 3 (the configuration followed here). The paper
# states neither padding nor how pooled sizes round; padding 1 on conv_1 and ceil-mode pooling
# reproduce the figure's map sizes exactly: 224 -> conv_1 (7x7/2, pad 1) 110 -> pool 55 ->
# conv_2 (5x5/2, pad 0) 26 -> pool 13 -> conv_3..5 (3x3, pad 1) 13 -> pool 6. Convs 3-5 are
# dense (one GPU, unlike the 2012 AlexNet's two groups) with 384, 384, 256 channels; dropout 0.5
# on fc_6 and fc_7 (section 3); LRN with AlexNet's constants (the paper gives none).
ZFNET_CONVS = (
    ConvSpec(96, 7, stride=2, padding=1, pool=True),
    ConvSpec(256, 5, stride=2, padding=0, pool=True),
    ConvSpec(384, 3, padding=1),
    ConvSpec(384, 3, padding=1),
    ConvSpec(256, 3, padding=1, pool=True),
)

# Tiny: for tests. 96x96 input: conv_1 23 -> pool 11 -> conv_2 11 -> pool 5 -> 5 -> pool 2.
TINY_CONVS = (
    ConvSpec(16, 11, stride=4, padding=2, pool=True),
    ConvSpec(32, 5, padding=2, pool=True),
    ConvSpec(48, 3, padding=1),
    ConvSpec(32, 3, padding=1),
    ConvSpec(32, 3, padding=1, pool=True),
)

# He et al. 2015 normal init for the ReLU layers (fan-in). The 2012 paper's N(0, 0.01) with unit
# biases in some layers needs its exact learning-rate schedule to get going; He init does not.
_relu_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class AlexNet(nn.Module):
    """AlexNet-style net: ReLU convs with max-pools, adaptive average pool, 3 dense layers.

    Attributes:
      convs: the conv stack (`ConvSpec`s); the defaults are torchvision's AlexNet.
      hidden: width of the two hidden dense layers (fc_6, fc_7).
      pooled_size: the adaptive average pool's output side before flattening (6 in AlexNet,
        where a 224x224 input already gives 6x6 and the pool is the identity).
      dropout: drop probability before fc_6 and before fc_7 (torchvision's placement: dropout
        on each hidden layer's input; the paper: "the first two fully-connected layers").
      lrn: local response normalisation after the first two conv layers (the paper's section
        3.3; off in torchvision's AlexNet).
      lrn_after_pool: apply the LRN after the max-pool (ZFNet, Figure 3) rather than before it
        (AlexNet: "max-pooling layers ... follow both response-normalization layers").
      ceil_mode: round pooled sizes up (Caffe-style, used for ZFNet's map sizes) instead of down.
      num_classes: `K`.
      dtype: computation dtype of the convs and hidden dense layers.
    """

    convs: Sequence[ConvSpec] = ALEXNET_CONVS
    hidden: int = 4096
    pooled_size: int = 6
    dropout: float = 0.5
    lrn: bool = False
    lrn_after_pool: bool = False
    ceil_mode: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images (224x224x3 for the ImageNet variants).

        Returns `(logits [B, K] float32, acts)`: `acts["conv_i"]` `[B, h_i, w_i, C_i]` (after
        ReLU, LRN and pool where present), `acts["pool"]` `[B, s, s, C_5]` (s = pooled_size),
        `acts["fc_6"]`, `acts["fc_7"]` `[B, hidden]`, `acts["features"]` `[B, hidden]` float32
        (= fc_7) and `acts["logits"]`.
        """
        acts = {}
        x = x.astype(self.dtype)
        for i, spec in enumerate(self.convs, start=1):
            pad = ((spec.padding, spec.padding), (spec.padding, spec.padding))
            x = nn.Conv(
                spec.features,
                kernel_size=(spec.kernel, spec.kernel),
                strides=(spec.stride, spec.stride),
                padding=pad,
                kernel_init=_relu_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv_{i}",
            )(x)
            x = nn.relu(x)
            normalise = self.lrn and i <= 2
            if normalise and not self.lrn_after_pool:
                x = local_response_norm(x)
            if spec.pool:
                # (B, H, W, C) -> (B, ~H/2, ~W/2, C): overlapping 3x3 windows, stride 2.
                if self.ceil_mode:
                    x = max_pool_ceil(x, 3, 2)
                else:
                    x = nn.max_pool(x, (3, 3), strides=(2, 2))
            if normalise and self.lrn_after_pool:
                x = local_response_norm(x)
            acts[f"conv_{i}"] = x
        # (B, h, w, C) -> (B, s, s, C): the identity at the standard input size.
        x = adaptive_avg_pool(x, self.pooled_size)
        acts["pool"] = x
        # (B, s, s, C) -> (B, s*s*C), flattened in (h, w, c) order; torchvision flattens NCHW in
        # (c, h, w) order, so fc_6's rows must be permuted when porting its weights.
        x = x.reshape(x.shape[0], -1)
        for name in ("fc_6", "fc_7"):
            if self.dropout > 0:
                x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
            x = nn.Dense(
                self.hidden,
                kernel_init=_relu_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )(x)
            x = nn.relu(x)
            acts[name] = x
        features = x.astype(jnp.float32)
        acts["features"] = features
        # The head in float32: softmax cross-entropy on bfloat16 logits loses precision.
        logits = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head"
        )(features)
        acts["logits"] = logits
        return logits, acts


# ---- variants --------------------------------------------------------------------------------

# torchvision's AlexNet: no LRN, floor-mode pooling.
AlexNetTorchvision = partial(AlexNet)
# The same net with the paper's local response normalisation (before each of the first two
# pools, section 3.3). LRN has no parameters: the count is torchvision's.
AlexNetLRN = partial(AlexNet, lrn=True)
ZFNet = partial(AlexNet, convs=ZFNET_CONVS, lrn=True, lrn_after_pool=True, ceil_mode=True)
# Tiny: for tests (96x96 input, 10 classes).
AlexNetTiny = partial(AlexNet, convs=TINY_CONVS, hidden=64, pooled_size=2, num_classes=10)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": AlexNetTorchvision,
    "alexnet_lrn": AlexNetLRN,
    "zfnet": ZFNet,
    "alexnet_tiny": AlexNetTiny,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.alexnet (AlexNet_Weights.IMAGENET1K_V1 "num_params").
    "alexnet": 61_100_840,
    "alexnet_lrn": 61_100_840,
    # No canonical reference (the paper gives no count): computed for ZFNET_CONVS above,
    # weights + biases:
    #   conv_1  7*7*3*96     + 96    =     14,208
    #   conv_2  5*5*96*256   + 256   =    614,656
    #   conv_3  3*3*256*384  + 384   =    885,120
    #   conv_4  3*3*384*384  + 384   =  1,327,488
    #   conv_5  3*3*384*256  + 256   =    884,992
    #   fc_6    6*6*256*4096 + 4096  = 37,752,832
    #   fc_7    4096*4096    + 4096  = 16,781,312
    #   head    4096*1000    + 1000  =  4,097,000
    #   total                          62,357,608
    # (implementations that keep AlexNet's two-group convs 2, 4, 5 count fewer).
    "zfnet": 62_357_608,
    # No published figure: counted by hand in tests/test_nets_classic.py.
    "alexnet_tiny": 68_698,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "alexnet": (224, 224, 3),
    "alexnet_lrn": (224, 224, 3),
    "zfnet": (224, 224, 3),
    "alexnet_tiny": (96, 96, 3),
}

NUM_CLASSES: dict[str, int] = {
    "alexnet": 1000,
    "alexnet_lrn": 1000,
    "zfnet": 1000,
    "alexnet_tiny": 10,
}
