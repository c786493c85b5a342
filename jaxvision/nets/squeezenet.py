"""SqueezeNet 1.0 and 1.1 (Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with 50x
fewer parameters and <0.5MB model size"), matching torchvision's `squeezenet1_0` (1,248,424
parameters) and `squeezenet1_1` (1,235,496) parameter for parameter.

A Fire module (section 3.2) squeezes the channels with 1x1 convs, then expands with 1x1 and 3x3
convs side by side whose outputs are concatenated; every conv is followed by ReLU. Fire modules
keep the paper's numbering, fire_2 .. fire_9 (conv_1 is the stem, the classifier conv is the
paper's conv10, named "head" here).

- 1.0 (the paper's Table 1): conv_1 7x7/2 96 -> max-pool -> fire_2..4 -> max-pool ->
  fire_5..8 -> max-pool -> fire_9.
- 1.1 (the authors' follow-up in the SqueezeNet repository, 2.4x fewer FLOPs at the same
  accuracy): conv_1 3x3/2 64 and the pools moved earlier (after fire_3 and fire_5).
- Classifier: dropout 0.5 (after fire_9, section 3.3), the 1x1 conv10 to K maps, ReLU, global
  average pool (no dense layer, as in Network in Network).
- Every max-pool is 3x3 stride 2 with `ceil_mode=True` (torchvision, from the original Caffe
  model, whose pooling rounds up): 224 -> conv_1 109 (1.0) / 111 (1.1) -> 54 / 55 -> 27 -> 13.

`SqueezeNet(...)(x, train=...)` returns `(logits, acts)`: "stem" (conv_1 after ReLU and pool),
"fire_2" .. "fire_9" (each Fire output, before any following pool), "features" `[B, 512]` (the
global average of fire_9, float32: the descriptor a linear probe would read; the classifier
itself is a 1x1 conv then a pool), "class_maps" `[B, h, w, K]` (conv10 after ReLU) and
"logits". No BatchNorm; dropout draws from the "dropout" rng, only when `train=True`.

Mixed precision: `dtype` is the computation dtype, including conv10 (10-25% of the FLOPs); the
global average runs in float32 so the logits are float32 whatever `dtype` is.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.layers import max_pool_ceil

# torchvision's SqueezeNet init: He et al. 2015 uniform (fan-in) for every conv but the
# classifier, N(0, 0.01) for the classifier conv, zero biases.
_relu_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_head_init = nn.initializers.normal(0.01)


class Fire(nn.Module):
    """Fire module: `(B, H, W, C) -> (B, H, W, expand_1x1 + expand_3x3)`.

    Attributes:
      squeeze: width of the squeeze 1x1 conv (s1x1 in the paper).
      expand_1x1, expand_3x3: widths of the two expand convs (e1x1, e3x3), concatenated in this
        order (torchvision's order).
      dtype: computation dtype.
    """

    squeeze: int
    expand_1x1: int
    expand_3x3: int
    dtype: Any = jnp.float32

    def _conv(self, features: int, kernel: int, name: str) -> nn.Conv:
        pad = kernel // 2
        return nn.Conv(
            features,
            kernel_size=(kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            kernel_init=_relu_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = nn.relu(self._conv(self.squeeze, 1, "squeeze")(x))
        e1 = nn.relu(self._conv(self.expand_1x1, 1, "expand_1x1")(s))
        e3 = nn.relu(self._conv(self.expand_3x3, 3, "expand_3x3")(s))
        return jnp.concatenate([e1, e3], axis=-1)


# (squeeze, expand_1x1, expand_3x3) of fire_2 .. fire_9: the paper's Table 1, shared by 1.0 and
# 1.1 (which differ in the stem and where the pools sit).
FIRES = (
    (16, 64, 64),
    (16, 64, 64),
    (32, 128, 128),
    (32, 128, 128),
    (48, 192, 192),
    (48, 192, 192),
    (64, 256, 256),
    (64, 256, 256),
)
# Tiny: for tests. fire_2 .. fire_5.
TINY_FIRES = ((4, 8, 8), (4, 8, 8), (8, 16, 16), (8, 16, 16))


class SqueezeNet(nn.Module):
    """Stem conv, max-pools, Fire modules, dropout, 1x1 classifier conv, global average pool.

    Attributes:
      stem_features, stem_kernel: conv_1 (stride 2, no padding).
      fires: `(squeeze, expand_1x1, expand_3x3)` per Fire module, numbered from fire_2.
      pool_after: numbers of the Fire modules followed by a 3x3/2 ceil-mode max-pool (conv_1 is
        always followed by one).
      dropout: drop probability before the classifier conv.
      num_classes: `K`.
      dtype: computation dtype.
    """

    stem_features: int = 96
    stem_kernel: int = 7
    fires: Sequence[tuple[int, int, int]] = FIRES
    pool_after: Sequence[int] = (4, 8)
    dropout: float = 0.5
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images (224x224x3 for ImageNet; 32x32 also works).

        Returns `(logits [B, K] float32, acts)` as in the module docstring.
        """
        acts = {}
        x = x.astype(self.dtype)
        k = self.stem_kernel
        # (B, H, W, C) -> (B, (H-k)/2+1, .., stem_features): stride 2, no padding (torchvision).
        x = nn.Conv(
            self.stem_features,
            kernel_size=(k, k),
            strides=(2, 2),
            padding="VALID",
            kernel_init=_relu_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv_1",
        )(x)
        x = max_pool_ceil(nn.relu(x), 3, 2)
        acts["stem"] = x
        for number, (squeeze, e1, e3) in enumerate(self.fires, start=2):
            x = Fire(squeeze, e1, e3, dtype=self.dtype, name=f"fire_{number}")(x)
            acts[f"fire_{number}"] = x
            if number in self.pool_after:
                # (B, H, W, C) -> (B, ceil((H-3)/2)+1, .., C)
                x = max_pool_ceil(x, 3, 2)
        acts["features"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.dropout > 0:
            x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        # conv10: (B, h, w, C) -> (B, h, w, K) class maps.
        maps = nn.Conv(
            self.num_classes,
            kernel_size=(1, 1),
            kernel_init=_head_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="head",
        )(x)
        maps = nn.relu(maps)
        acts["class_maps"] = maps
        # Global average pool in float32: (B, h, w, K) -> (B, K).
        logits = jnp.mean(maps.astype(jnp.float32), axis=(1, 2))
        acts["logits"] = logits
        return logits, acts


# ---- variants --------------------------------------------------------------------------------

SqueezeNet10 = partial(SqueezeNet, stem_features=96, stem_kernel=7, fires=FIRES, pool_after=(4, 8))
SqueezeNet11 = partial(SqueezeNet, stem_features=64, stem_kernel=3, fires=FIRES, pool_after=(3, 5))
# Tiny: for tests (32x32 input, 10 classes): 32 -> conv_1 15 -> pool 7 -> fire_2, 3 -> pool 3.
SqueezeNetTiny = partial(
    SqueezeNet, stem_features=16, stem_kernel=3, fires=TINY_FIRES, pool_after=(3,),
    num_classes=10,
)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "squeezenet1_0": SqueezeNet10,
    "squeezenet1_1": SqueezeNet11,
    "squeezenet_tiny": SqueezeNetTiny,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.squeezenet1_0 / squeezenet1_1 (SqueezeNet1_*_Weights.IMAGENET1K_V1
    # "num_params"); the paper's Table 2 gives 1.0's float32 size, 4.8MB (~1.2M x 4 bytes).
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
    # No published figure: counted by hand in tests/test_nets_classic.py.
    "squeezenet_tiny": 4_610,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "squeezenet1_0": (224, 224, 3),
    "squeezenet1_1": (224, 224, 3),
    "squeezenet_tiny": (32, 32, 3),
}

NUM_CLASSES: dict[str, int] = {
    "squeezenet1_0": 1000,
    "squeezenet1_1": 1000,
    "squeezenet_tiny": 10,
}
