"""Fully connected classifier: the two-layer net of CS231n assignment 1 and its deeper kin.

`MLP(...)(x, train=...)` returns `(logits, acts)`; `acts` names every hidden activation so that
visualisation code can read features without hooks (big_vision's `(logits, out)` convention).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """`[Dense -> activation -> Dropout] * len(hidden_sizes) -> Dense(num_classes)`.

    Attributes:
      hidden_sizes: width of each hidden layer, input side first.
      num_classes: `K`, the number of logits.
      dropout: drop probability after each hidden activation (inverted dropout, Srivastava et
        al. 2014); applied only when `train=True`, with the "dropout" rng.
      activation: elementwise nonlinearity.
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    dropout: float = 0.0
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, ...]` float (flattened to `[B, D]`); train: enables dropout.

        Returns:
          `(logits [B, K], acts)` with `acts["hidden_i"]` `[B, hidden_sizes[i]]` (after the
          activation, before dropout: the features the layer computes) and `acts["logits"]`.
        """
        acts = {}
        x = x.reshape(x.shape[0], -1)  # (B, H, W, C) -> (B, HWC)
        for i, width in enumerate(self.hidden_sizes):
            x = self.activation(nn.Dense(width, name=f"dense_{i}")(x))
            acts[f"hidden_{i}"] = x
            if self.dropout > 0:
                x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, name="head")(x)
        acts["logits"] = logits
        return logits, acts


# Variants. Tiny: for tests. Small: the CS231n two-layer-net scale, for MNIST/CIFAR baselines.
MLPTiny = partial(MLP, hidden_sizes=(16,), num_classes=10)
MLPSmall = partial(MLP, hidden_sizes=(512, 256), num_classes=10)

# The table read by benchmarks/nets_table.py and the net tests.
VARIANTS = {"mlp_tiny": MLPTiny, "mlp_small": MLPSmall}
INPUT_SHAPES = {name: (32, 32, 3) for name in VARIANTS}
NUM_CLASSES = {name: 10 for name in VARIANTS}
