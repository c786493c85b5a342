"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE, section II.B and Figure 2).

The layers keep the paper's names: C1 (6 5x5 convs) -> S2 (2x2 subsampling) -> C3 (16 5x5
convs) -> S4 (2x2 subsampling) -> C5 (120 5x5 convs, 1x1 output on a 32x32 input) -> F6 (84
units) -> output (10 classes). Sizes on a 32x32x1 input: 28x28x6 -> 14x14x6 -> 10x10x16 ->
5x5x16 -> 1x1x120 -> 84 -> 10.

This is the "classic form" as usually reimplemented, which differs from the 1998 net in three
places (each stated where it happens below):
- C3 is fully connected to S2's six maps (the paper's Table I connects each C3 map to 3, 4 or
  6 of them: 1,516 parameters instead of 2,416);
- S2 and S4 are plain average (or max) pooling without the paper's trainable coefficient and
  bias per map (12 + 32 parameters) and its squashing nonlinearity after the pooling;
- the output is a linear layer (850 parameters), not the paper's Euclidean RBF units with fixed
  hand-designed centres; and tanh is the plain tanh, not the paper's 1.7159 * tanh(2a/3).
Counted this way (weights + biases): C1 156 + C3 2,416 + C5 48,120 + F6 10,164 + output 850 =
61,706, the figure usually quoted for LeNet-5.

MNIST is 28x28: `first_padding=2` pads C1's input to 32x32, the paper's input size (chosen
larger than the digits, at most 20x20 centred in a 28x28 field, so that stroke end-points and
corners can reach the centre of the top feature detectors' receptive fields). Any other size
fails with a clear error, since C5 must see a 5x5 map.

`LeNet(...)(x, train=...)` returns `(logits, acts)` with acts "c1", "s2", "c3", "s4", "c5"
(`[B, 120]`), "f6" (`[B, 84]`), "features" (= f6 in float32) and "logits". There is no
BatchNorm and no dropout; `train` is accepted for the common interface and changes nothing.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class LeNet(nn.Module):
    """LeNet-5 with a choice of nonlinearity and pooling.

    Attributes:
      activation: the nonlinearity after C1, C3, C5 and F6 (`nn.tanh` as in 1998, or `nn.relu`).
      pooling: S2/S4 subsampling, `pool(x, window_shape, strides)`: `nn.avg_pool` (the paper's
        averaging subsampling) or `nn.max_pool` (the usual modern choice).
      first_padding: zero padding of C1 on each side: 0 for 32x32 inputs, 2 for 28x28 MNIST.
      num_classes: `K` (10 digits).
      dtype: computation dtype of the convs and F6.
    """

    activation: Callable[[jax.Array], jax.Array] = nn.tanh
    pooling: Callable[..., jax.Array] = nn.avg_pool
    first_padding: int = 0
    num_classes: int = 10
    dtype: Any = jnp.float32

    def _conv(self, features: int, name: str, padding: int = 0) -> nn.Conv:
        # Default LeCun-normal init (variance 1/fan-in: LeCun et al. 1998b, "Efficient
        # BackProp", section 4.6), the scale for tanh units.
        return nn.Conv(
            features,
            kernel_size=(5, 5),
            padding=((padding, padding), (padding, padding)),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, 32, 32, C]` (or `[B, 28, 28, C]` with first_padding=2) float images.

        Returns `(logits [B, K] float32, acts)`: "c1" `[B, 28, 28, 6]`, "s2" `[B, 14, 14, 6]`,
        "c3" `[B, 10, 10, 16]`, "s4" `[B, 5, 5, 16]`, "c5" `[B, 120]`, "f6" `[B, 84]`,
        "features" `[B, 84]` float32, "logits".
        """
        del train  # no BatchNorm, no dropout
        size = x.shape[1] + 2 * self.first_padding
        if x.shape[1] != x.shape[2] or size != 32:
            raise ValueError(
                f"LeNet needs a 32x32 input after C1's padding (C5 must see a 5x5 map); got "
                f"{x.shape[1]}x{x.shape[2]} with first_padding={self.first_padding} (use "
                "first_padding=2 for 28x28 MNIST)."
            )
        acts = {}
        x = x.astype(self.dtype)
        # (B, 32, 32, C) -> (B, 28, 28, 6)
        x = self.activation(self._conv(6, "c1", self.first_padding)(x))
        acts["c1"] = x
        # (B, 28, 28, 6) -> (B, 14, 14, 6). The paper's S2 also had a trainable weight and bias
        # per map and a sigmoid-like squashing; the classic form pools only.
        x = self.pooling(x, (2, 2), strides=(2, 2))
        acts["s2"] = x
        # (B, 14, 14, 6) -> (B, 10, 10, 16). Full connectivity to all six S2 maps: 5*5*6*16 + 16
        # = 2,416 parameters (the paper's Table I sparse scheme: 1,516).
        x = self.activation(self._conv(16, "c3")(x))
        acts["c3"] = x
        # (B, 10, 10, 16) -> (B, 5, 5, 16)
        x = self.pooling(x, (2, 2), strides=(2, 2))
        acts["s4"] = x
        # (B, 5, 5, 16) -> (B, 1, 1, 120) -> (B, 120): a conv in the paper (so that larger inputs
        # give a map of outputs), a dense layer on 32x32 inputs.
        x = self.activation(self._conv(120, "c5")(x))
        x = x.reshape(x.shape[0], -1)
        acts["c5"] = x
        # (B, 120) -> (B, 84). 84 = a 7x12 bitmap, the size of the paper's RBF output codes.
        x = self.activation(
            nn.Dense(84, dtype=self.dtype, param_dtype=jnp.float32, name="f6")(x)
        )
        acts["f6"] = x
        features = x.astype(jnp.float32)
        acts["features"] = features
        # A linear output layer in float32 (the paper: Euclidean RBF units with fixed centres).
        logits = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head"
        )(features)
        acts["logits"] = logits
        return logits, acts


# ---- variants --------------------------------------------------------------------------------

# The classic form: tanh and average pooling, 32x32 input.
LeNet5 = partial(LeNet, activation=nn.tanh, pooling=nn.avg_pool)
# The same on 28x28 MNIST digits, padded to 32x32 by C1: same parameters, same maps.
LeNet5MNIST = partial(LeNet, activation=nn.tanh, pooling=nn.avg_pool, first_padding=2)
# The usual modern variant: ReLU and max-pooling (no parameter changes).
LeNet5ReLU = partial(LeNet, activation=nn.relu, pooling=nn.max_pool)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "lenet5_mnist": LeNet5MNIST,
    "lenet5_relu": LeNet5ReLU,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # The classic 61,706 for 32x32x1 input and 10 classes with a fully connected C3 (the figure
    # usually quoted for LeNet-5; derivation in the module docstring). The 1998 paper's own net
    # has C1 156 + S2 12 + C3 1,516 + S4 32 + C5 48,120 + F6 10,164 = 60,000 trainable
    # parameters (its RBF centres are fixed), the paper's "60,000 trainable free parameters".
    "lenet5": 61_706,
    "lenet5_mnist": 61_706,
    "lenet5_relu": 61_706,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "lenet5": (32, 32, 1),
    "lenet5_mnist": (28, 28, 1),
    "lenet5_relu": (32, 32, 1),
}

NUM_CLASSES: dict[str, int] = {name: 10 for name in VARIANTS}
