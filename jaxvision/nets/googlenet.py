"""GoogLeNet / Inception v1 (Szegedy et al. 2015, "Going Deeper with Convolutions"), in the form
of torchvision's `googlenet`, whose parameter counts the tests check exactly.

Where torchvision departs from the paper, this file follows torchvision (and says so):
- every conv is a "BasicConv2d" unit, conv (no bias) -> BatchNorm -> ReLU; the paper (2014)
  predates BatchNorm and had no normalisation besides LRN in the stem;
- the "5x5" branch of each Inception module uses a 3x3 conv (a known slip in torchvision, kept
  there so that its pretrained weights still load; see `Inception`);
- max-pools use ceil mode (PyTorch's `ceil_mode=True`) and the pool before inception 5a is 2x2;
- the auxiliary classifiers average-pool adaptively to 4x4 (the paper: 5x5 average pool,
  stride 3, which gives 4x4 from 14x14 with slightly different windows).

`GoogLeNet(...)(x, train=...)` returns `(logits, acts)`:
  acts["stem"]              [B, H/8, W/8, 192]  (ImageNet stem; H, W with the "cifar" stem)
  acts["inception_3a"], ... acts["inception_5b"]: each module's output (before any pool);
  acts["features"]          [B, 1024] float32, the global average pool before the head;
  acts["logits"]            [B, K] float32;
  acts["aux_1"], ["aux_2"]  [B, K] float32, the auxiliary classifiers' logits, ONLY when
                            `aux_logits=True` and `train=True`. Like torchvision (which returns
                            its `GoogLeNetOutputs` tuple only in training mode), evaluation
                            gives just the main logits: the auxiliary heads are a training
                            device ("encourage discrimination in the lower stages ... and
                            provide additional regularization", Szegedy et al. 2015, section 5)
                            and are discarded at inference. Their parameters exist whenever
                            `aux_logits=True` (init runs them even with train=False).

Training with the auxiliary heads: see `googlenet_loss`.

Mixed precision: `dtype` is the computation dtype; parameters stay float32 and the pooled
features, the main head and the auxiliary heads' last layers run in float32, so all logits are
float32.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.layers import adaptive_avg_pool, max_pool_ceil

# torchvision initialises every conv and linear weight from a normal with std 0.01 truncated at
# +-2 (absolute, i.e. +-200 std: no truncation in practice), biases at 0 and BN at (1, 0).
_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


class InceptionSpec(NamedTuple):
    """Output widths of one Inception module's branches (the paper's Table 1 columns)."""

    ch1x1: int
    ch3x3_reduce: int
    ch3x3: int
    ch5x5_reduce: int
    ch5x5: int
    pool_proj: int

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


# Szegedy et al. 2015, Table 1 (= torchvision's Inception(...) arguments), stages 3, 4 and 5.
IMAGENET_STAGES: tuple[tuple[InceptionSpec, ...], ...] = (
    (
        InceptionSpec(64, 96, 128, 16, 32, 32),  # 3a -> 256
        InceptionSpec(128, 128, 192, 32, 96, 64),  # 3b -> 480
    ),
    (
        InceptionSpec(192, 96, 208, 16, 48, 64),  # 4a -> 512
        InceptionSpec(160, 112, 224, 24, 64, 64),  # 4b -> 512
        InceptionSpec(128, 128, 256, 24, 64, 64),  # 4c -> 512
        InceptionSpec(112, 144, 288, 32, 64, 64),  # 4d -> 528
        InceptionSpec(256, 160, 320, 32, 128, 128),  # 4e -> 832
    ),
    (
        InceptionSpec(256, 160, 320, 32, 128, 128),  # 5a -> 832
        InceptionSpec(384, 192, 384, 48, 128, 128),  # 5b -> 1024
    ),
)

# Max-pool (window, stride) after stages 3 and 4. torchvision: MaxPool2d(3, 2, ceil_mode=True)
# then MaxPool2d(2, 2, ceil_mode=True) (the paper's Table 1 has 3x3/2 for both).
_STAGE_POOLS = ((3, 2), (2, 2))

# Szegedy et al. 2015, section 5: "During training, their loss gets added to the total loss of
# the network with a discount weight (the losses of the auxiliary classifiers were weighted by
# 0.3)."
auxiliary_loss_weight = 0.3


class ConvBN(nn.Module):
    """torchvision's BasicConv2d: conv (no bias: BN's offset follows) -> BatchNorm -> ReLU.

    (B, H, W, C) -> (B, H/stride, W/stride, features), "SAME" padding (= torchvision's
    padding k//2 for the odd kernels used here).
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        k = self.kernel_size
        x = nn.Conv(
            self.features, (k, k), strides=(self.stride, self.stride),
            padding=[(k // 2, k // 2)] * 2, use_bias=False, kernel_init=_KERNEL_INIT,
            dtype=self.dtype, param_dtype=jnp.float32, name="conv",
        )(x)
        # torchvision's BasicConv2d uses eps=1e-3 (inherited from TF's Inception); the house
        # convention is 1e-5. It changes no parameter count; a port of torchvision's weights
        # would want 1e-3 here.
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            param_dtype=jnp.float32, name="bn",
        )(x)
        return nn.relu(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels:
    (B, H, W, C) -> (B, H, W, ch1x1 + ch3x3 + ch5x5 + pool_proj).

    1x1 | 1x1 -> 3x3 | 1x1 -> "5x5" | 3x3 max-pool (stride 1) -> 1x1. The 1x1 "reduce" convs
    cut the channels before the expensive spatial convs (the paper's "dimension reduction").
    """

    spec: InceptionSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s = self.spec
        conv = partial(ConvBN, dtype=self.dtype)
        b1 = conv(s.ch1x1, name="branch_1x1")(x, train=train)
        b2 = conv(s.ch3x3_reduce, name="branch_3x3_reduce")(x, train=train)
        b2 = conv(s.ch3x3, kernel_size=3, name="branch_3x3")(b2, train=train)
        b3 = conv(s.ch5x5_reduce, name="branch_5x5_reduce")(x, train=train)
        # The paper's 5x5 conv is a 3x3 conv in torchvision (an old slip that it keeps for
        # weight compatibility, see torchvision issue #906); we follow torchvision, whose
        # parameter count we match. The name keeps the paper's "5x5" branch.
        b3 = conv(s.ch5x5, kernel_size=3, name="branch_5x5")(b3, train=train)
        # torchvision: MaxPool2d(3, stride=1, padding=1, ceil_mode=True) = SAME, -inf padding.
        b4 = nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
        b4 = conv(s.pool_proj, name="branch_pool_proj")(b4, train=train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: (B, H, W, C) -> logits (B, K) float32.

    Adaptive avg-pool to 4x4 -> 1x1 ConvBN(128) -> flatten (2048) -> FC 1024 + ReLU ->
    dropout 0.7 -> FC K (torchvision's InceptionAux; the paper, section 5). The flatten is in
    (h, w, c) order where torchvision's is (c, h, w): porting its fc_1 weights needs a permute.
    """

    num_classes: int
    width: int = 128
    hidden: int = 1024
    dropout: float = 0.7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = adaptive_avg_pool(x, (4, 4)).astype(self.dtype)  # (B, 4, 4, C)
        x = ConvBN(self.width, dtype=self.dtype, name="conv")(x, train=train)
        x = x.reshape(x.shape[0], -1)  # (B, 16 * width)
        x = nn.Dense(self.hidden, kernel_init=_KERNEL_INIT, dtype=self.dtype,
                     param_dtype=jnp.float32, name="fc_1")(x)
        x = nn.relu(x)
        x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, dtype=jnp.float32,
                        param_dtype=jnp.float32, name="fc_2")(x.astype(jnp.float32))


class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1); defaults are torchvision's `googlenet(aux_logits=True)`.

    Attributes:
      num_classes: `K`.
      aux_logits: build the two auxiliary classifiers (their logits go to `acts` in training).
      stem: "imagenet": 7x7/2 ConvBN(64) -> 3x3/2 max-pool -> 1x1 ConvBN(64) -> 3x3 ConvBN(192)
        -> 3x3/2 max-pool, (B, H, W, 3) -> (B, H/8, W/8, 192) (ceil mode, e.g. 224 -> 28).
        "cifar": the same convs with the first one 3x3 stride 1 and no pools, so 32x32 inputs
        reach inception 3a at 32x32 (the usual CIFAR adaptation, no early downsampling).
      stem_widths: the three stem convs' widths.
      stages: Inception specs of stages 3, 4 and 5 (three stages; a 3x3/2 then a 2x2/2 ceil-mode
        max-pool between them). Modules are named "inception_3a", "inception_3b", ...
      aux_after: the two modules whose outputs feed aux_1 and aux_2 (the paper: 4a and 4d).
      aux_width, aux_hidden, aux_dropout: the auxiliary heads' 1x1 conv width, hidden FC width,
        dropout rate (128, 1024, 0.7).
      dropout: drop rate before the final FC (torchvision: 0.2; the paper: 0.4).
      dtype: computation dtype.
    """

    num_classes: int = 1000
    aux_logits: bool = True
    stem: str = "imagenet"
    stem_widths: tuple[int, int, int] = (64, 64, 192)
    stages: Sequence[Sequence[InceptionSpec]] = IMAGENET_STAGES
    aux_after: tuple[str, str] = ("inception_4a", "inception_4d")
    aux_width: int = 128
    aux_hidden: int = 1024
    aux_dropout: float = 0.7
    dropout: float = 0.2
    dtype: Any = jnp.float32

    def _module_names(self) -> list[list[str]]:
        return [[f"inception_{3 + i}{'abcdefgh'[j]}" for j in range(len(stage))]
                for i, stage in enumerate(self.stages)]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, 3]` float images; train: batch statistics, dropout, aux heads.

        Returns `(logits [B, K] float32, acts)`, acts as in the module docstring.
        """
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.stages) != 3:
            raise ValueError(f"GoogLeNet has 3 Inception stages (3, 4, 5), got {len(self.stages)}")
        names = self._module_names()
        all_names = [n for stage in names for n in stage]
        if self.aux_logits and not set(self.aux_after) <= set(all_names):
            raise ValueError(f"aux_after {self.aux_after} must name modules among {all_names}")

        acts = {}
        conv = partial(ConvBN, dtype=self.dtype)
        w1, w2, w3 = self.stem_widths
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(w1, kernel_size=7, stride=2, name="stem_conv_1")(x, train=train)  # H/2
            x = max_pool_ceil(x, 3, 2)  # H/4
        else:
            x = conv(w1, kernel_size=3, name="stem_conv_1")(x, train=train)
        x = conv(w2, kernel_size=1, name="stem_conv_2")(x, train=train)
        x = conv(w3, kernel_size=3, name="stem_conv_3")(x, train=train)
        if self.stem == "imagenet":
            x = max_pool_ceil(x, 3, 2)  # H/8
        acts["stem"] = x

        # The aux heads run in training, and at init so that their parameters exist; in
        # evaluation they are skipped (not computed and thrown away).
        run_aux = self.aux_logits and (train or self.is_initializing())
        for i, (stage, stage_names) in enumerate(zip(self.stages, names)):
            if i > 0:
                x = max_pool_ceil(x, *_STAGE_POOLS[i - 1])  # (B, H, W, C) -> (B, H/2, W/2, C)
            for spec, name in zip(stage, stage_names):
                x = Inception(spec, dtype=self.dtype, name=name)(x, train=train)
                acts[name] = x
                if run_aux and name in self.aux_after:
                    aux_name = f"aux_{self.aux_after.index(name) + 1}"
                    aux = InceptionAux(
                        self.num_classes, width=self.aux_width, hidden=self.aux_hidden,
                        dropout=self.aux_dropout, dtype=self.dtype, name=aux_name,
                    )(x, train=train)
                    if train:
                        acts[aux_name] = aux

        # Global average pool in float32: (B, h, w, C) -> (B, C).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        acts["features"] = features
        x = nn.Dropout(rate=self.dropout, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, dtype=jnp.float32,
                          param_dtype=jnp.float32, name="head")(x)
        acts["logits"] = logits
        return logits, acts


def googlenet_loss(*, logits: jax.Array, acts: dict[str, jax.Array], labels: jax.Array,
                   loss_fn: Callable[..., jax.Array],
                   aux_weight: float = auxiliary_loss_weight) -> jax.Array:
    """Main loss plus `aux_weight` times each auxiliary classifier's loss, per example.

    `loss_fn(logits=logits, labels=labels) + aux_weight * sum_i loss_fn(logits=acts[f"aux_{i}"],
    labels=labels)` over the aux logits present in `acts` (none in evaluation, or with
    `aux_logits=False`: then this is `loss_fn` itself). Szegedy et al. 2015, section 5: weight 0.3.

    Args:
      logits: `[B, K]` main logits; acts: the net's acts dict; labels: `[B]` int;
      loss_fn: a per-example loss `loss_fn(*, logits, labels) -> [B]`, e.g.
        `jaxvision.losses.softmax_cross_entropy`; aux_weight: the discount weight.

    Returns:
      `[B]` float per-example losses.

    Use in an experiment: give the shared step `loss_takes_acts=True` (it then calls
    `loss_fn(logits=, labels=, acts=)`), e.g.

        loop.fit_classifier(..., loss_takes_acts=True,
                            loss_fn=functools.partial(googlenet_loss,
                                                      loss_fn=losses.softmax_cross_entropy))

    In evaluation the net returns no aux logits, so this is the main loss alone.
    """
    loss = loss_fn(logits=logits, labels=labels)
    for name in ("aux_1", "aux_2"):
        if name in acts:
            loss = loss + aux_weight * loss_fn(logits=acts[name], labels=labels)
    return loss


# ---- Variants ----------------------------------------------------------------------------------

# torchvision's googlenet (aux_logits=True when trained from scratch): 13,004,888 parameters.
GoogLeNetNoAux = partial(GoogLeNet, aux_logits=False)
# The full-width net for CIFAR: 3x3 stride-1 first conv, no stem pools (inception 3a at 32x32,
# aux heads pool 16x16 -> 4x4).
GoogLeNetCifar = partial(GoogLeNet, stem="cifar", num_classes=10)
# Tiny: for tests. One module in stages 3 and 5, two in stage 4 (one aux head after each),
# narrow branches and aux heads; 32x32 inputs with the CIFAR stem.
_TINY = InceptionSpec(8, 8, 8, 4, 4, 4)  # -> 24 channels
GoogLeNetTiny = partial(
    GoogLeNet,
    num_classes=10,
    stem="cifar",
    stem_widths=(8, 8, 16),
    stages=((_TINY,), (_TINY, _TINY), (InceptionSpec(16, 8, 16, 4, 8, 8),)),  # 5a -> 48
    aux_after=("inception_4a", "inception_4b"),
    aux_width=8,
    aux_hidden=16,
)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "googlenet": GoogLeNet,
    "googlenet_no_aux": GoogLeNetNoAux,
    "googlenet_cifar": GoogLeNetCifar,
    "googlenet_tiny": GoogLeNetTiny,
}

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.googlenet: 13,004,888 with the aux heads (GoogLeNet_Weights docs list
    # 6,624,904, the count of the released model, whose aux heads are dropped).
    "googlenet": 13_004_888,
    "googlenet_no_aux": 6_624_904,
    # No published figures: counted by hand in tests/test_nets_inception_densenet.py. CIFAR:
    # 13,004,888 - 7,680 (7x7 -> 3x3 first conv on 3 -> 64 channels) - 3 * 990 * 1,025 (the
    # main and both aux output layers for 10 classes instead of 1000).
    "googlenet_cifar": 9_952_958,
    "googlenet_tiny": 13_206,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "googlenet": (224, 224, 3),
    "googlenet_no_aux": (224, 224, 3),
    "googlenet_cifar": (32, 32, 3),
    "googlenet_tiny": (32, 32, 3),
}

NUM_CLASSES: dict[str, int] = {
    "googlenet": 1000,
    "googlenet_no_aux": 1000,
    "googlenet_cifar": 10,
    "googlenet_tiny": 10,
}
