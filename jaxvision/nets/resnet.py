"""Residual networks: ImageNet ResNets, CIFAR ResNets, pre-activation ResNets, wide ResNets.

Sources:
- He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR): the ImageNet nets
  (Table 1: ResNet-18/34 with basic blocks, 50/101/152 with bottlenecks) and the CIFAR nets of
  section 4.2 (ResNet-20/32/44/56/110: 6n+2 layers, 16/32/64 channels, option-A shortcuts).
- He et al. 2016b, "Identity Mappings in Deep Residual Networks" (ECCV): pre-activation blocks
  (BN -> ReLU -> conv, nothing after the addition) and a final BN -> ReLU before pooling.
- Zagoruyko & Komodakis 2016, "Wide Residual Networks" (BMVC): WRN-d-k, pre-activation basic
  blocks k times wider than the CIFAR ResNet, (d - 4) / 6 blocks per stage, dropout between the
  two convs as an option.
- Huang et al. 2016, "Deep Networks with Stochastic Depth" (ECCV): `drop_path_rate`.
- Goyal et al. 2017, "Accurate, Large Minibatch SGD": `zero_init_residual`.

The ImageNet nets follow torchvision (parameter counts equal, layer for layer): the bottleneck
puts its stride on the 3x3 conv ("ResNet v1.5", as torchvision and fb.resnet.torch; the paper's
v1 strides the first 1x1 conv), projection shortcuts are 1x1 conv + BN, and convs use
torchvision's explicit symmetric padding (3x3: 1, 7x7: 3, max-pool: 1) rather than "SAME", whose
padding on stride-2 layers is (0, 1) rather than (1, 1): converted torchvision weights then give
the same outputs.

`ResNet(...)(x, train=...)` returns `(logits, acts)`; `acts` holds "stem", "stage_1".. "stage_S"
(one per stage: 4 for the ImageNet layout, 3 for the CIFAR and wide ones), "features" (the pooled
vector, float32) and "logits". BatchNorm statistics live in "batch_stats"; dropout and stochastic
depth draw from the "dropout" rng, only when `train=True`.

Mixed precision: `dtype` is the computation dtype; parameters stay float32, and the pooled
features and the classifier head run in float32 so the logits are float32 whatever `dtype` is.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# He et al. 2015 ("Delving Deep into Rectifiers") normal init, fan-out mode, as torchvision's
# `kaiming_normal_(mode="fan_out", nonlinearity="relu")` for every conv of its ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
    features: int, kernel: int, strides: int, *, name: str, dtype: Any, zero_init: bool = False
) -> nn.Conv:
    """A bias-free square conv with torchvision's symmetric padding `kernel // 2`.

    No bias: every conv here is followed by BatchNorm (directly, or in the next block's
    pre-activation), whose offset makes a bias redundant (torchvision's ResNets have none).
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=nn.initializers.zeros if zero_init else _conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _bn(*, train: bool, name: str, dtype: Any, zero_init: bool = False) -> nn.BatchNorm:
    # momentum=0.9 and epsilon=1e-5: PyTorch's BatchNorm2d (its momentum 0.1 in the other
    # convention); flax's default 0.99 lags badly in short CIFAR runs.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
    """Option-A shortcut (He et al. 2016, section 3.3): identity, subsampled and zero-padded.

    `(B, H, W, C) -> (B, ceil(H / s), ceil(W / s), features)`, no parameters. Taking every s-th
    pixel matches the spatial size of a stride-s conv with padding 1 (`ceil(H / s)`). The zero
    channels go after the identity ones (fb.resnet.torch's option A concatenates zeros).
    """
    if features < x.shape[-1]:
        raise ValueError(
            f"an option-A shortcut can only widen: {x.shape[-1]} -> {features} channels"
        )
    x = x[:, ::strides, ::strides, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (Huang et al. 2016), one draw per example.

    Training: each example's branch is kept with probability `1 - rate` and then divided by
    `1 - rate` ("inverted" convention, as dropout): its expected value is the branch itself, so
    evaluation uses the branch unchanged. (Huang et al. instead keep the branch as is in training
    and multiply it by the survival probability at test time; the two nets compute the same
    function in expectation.) The draw is per example, not per mini-batch as in the paper, which
    gives each example its own sub-network in every step (timm's `DropPath` does the same).
    The mask comes from the "dropout" rng, only when `train=True`.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        # (B,) -> (B, 1, 1, 1): one decision per example, same rank as x.
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],))
        scale = jnp.where(mask, 1.0 / keep, 0.0).astype(x.dtype)
        return x * scale.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation (He et al. 2016, Fig. 5 left).

    `relu(bn_2(conv_2(relu(bn_1(conv_1(x))))) + shortcut(x))`,
    `(B, H, W, C) -> (B, H / strides, W / strides, features)`.

    Attributes:
      features: output channels.
      strides: stride of conv_1 (and of the shortcut).
      shortcut: "B" projects with 1x1 conv + BN where the shape changes (torchvision); "A" pads
        with zeros (no parameters, He et al.'s CIFAR nets). Identity where the shape is unchanged.
      drop_path_rate: probability of dropping the residual branch (stochastic depth).
      dropout_rate: dropout between the two convs (after the middle ReLU).
      zero_init_residual: zero-init bn_2's scale, so the block starts as the identity
        (Goyal et al. 2017).
      dtype: computation dtype.
    """

    expansion: ClassVar[int] = 1  # output channels / features
    convs: ClassVar[int] = 2  # weighted layers on the residual branch (for depth counting)
    preact: ClassVar[bool] = False

    features: int
    strides: int = 1
    shortcut: str = "B"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, bn = partial(_conv, dtype=self.dtype), partial(_bn, train=train, dtype=self.dtype)
        y = nn.relu(bn(name="bn_1")(conv(self.features, 3, self.strides, name="conv_1")(x)))
        y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
        y = conv(self.features, 3, 1, name="conv_2")(y)
        y = bn(name="bn_2", zero_init=self.zero_init_residual)(y)
        y = DropPath(self.drop_path_rate, name="drop_path")(y, train=train)
        return nn.relu(y + _post_act_shortcut(self, x, self.features, train))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), post-activation (He et al. 2016, Fig. 5 right).

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5").
    `(B, H, W, C) -> (B, H / strides, W / strides, 4 * features)`. Attributes as `BasicBlock`;
    `zero_init_residual` zeroes bn_3's scale; dropout sits before conv_3.
    """

    expansion: ClassVar[int] = 4
    convs: ClassVar[int] = 3
    preact: ClassVar[bool] = False

    features: int
    strides: int = 1
    shortcut: str = "B"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, bn = partial(_conv, dtype=self.dtype), partial(_bn, train=train, dtype=self.dtype)
        out = self.features * self.expansion
        y = nn.relu(bn(name="bn_1")(conv(self.features, 1, 1, name="conv_1")(x)))
        y = nn.relu(bn(name="bn_2")(conv(self.features, 3, self.strides, name="conv_2")(y)))
        y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
        y = bn(name="bn_3", zero_init=self.zero_init_residual)(conv(out, 1, 1, name="conv_3")(y))
        y = DropPath(self.drop_path_rate, name="drop_path")(y, train=train)
        return nn.relu(y + _post_act_shortcut(self, x, out, train))


def _post_act_shortcut(block: nn.Module, x: jax.Array, features: int, train: bool) -> jax.Array:
    """Identity, or option A (zero pad) / B (1x1 conv + BN) where the shape changes."""
    if x.shape[-1] == features and block.strides == 1:
        return x
    if block.shortcut == "A":
        return _pad_shortcut(x, features, block.strides)
    x = _conv(features, 1, block.strides, name="shortcut_conv", dtype=block.dtype)(x)
    return _bn(train=train, name="shortcut_bn", dtype=block.dtype)(x)


def _pre_act_shortcut(
    block: nn.Module, x: jax.Array, pre: jax.Array, features: int
) -> jax.Array:
    """Identity on the raw input `x`; where the shape changes, option A pads `x` (the identity
    path stays clean, He et al. 2016b's point) and option B projects the pre-activated `pre`
    with a 1x1 conv and no BN (the authors' Torch code and the WRN code do both)."""
    if x.shape[-1] == features and block.strides == 1:
        return x
    if block.shortcut == "A":
        return _pad_shortcut(x, features, block.strides)
    return _conv(features, 1, block.strides, name="shortcut_conv", dtype=block.dtype)(pre)


class PreActBasicBlock(nn.Module):
    """Two 3x3 convs, pre-activation (He et al. 2016b, Fig. 1(b)); the WRN block.

    `conv_2(dropout(relu(bn_2(conv_1(relu(bn_1(x))))))) + shortcut(x)`, nothing after the sum,
    `(B, H, W, C) -> (B, H / strides, W / strides, features)`. Attributes as `BasicBlock`, with
    dropout between the convs as WRN (Zagoruyko & Komodakis 2016, section 2.4).

    `zero_init_residual` zeroes conv_2's kernel, the branch's last layer (timm's ResNetV2 does
    the same): zeroing bn_2's scale would feed exactly 0 to the ReLU, whose gradient there is 0,
    so neither bn_2 nor conv_2 would ever receive a gradient and the branch would stay dead.
    """

    expansion: ClassVar[int] = 1
    convs: ClassVar[int] = 2
    preact: ClassVar[bool] = True

    features: int
    strides: int = 1
    shortcut: str = "B"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, bn = partial(_conv, dtype=self.dtype), partial(_bn, train=train, dtype=self.dtype)
        pre = nn.relu(bn(name="bn_1")(x))
        y = conv(self.features, 3, self.strides, name="conv_1")(pre)
        y = nn.relu(bn(name="bn_2")(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
        y = conv(self.features, 3, 1, name="conv_2", zero_init=self.zero_init_residual)(y)
        y = DropPath(self.drop_path_rate, name="drop_path")(y, train=train)
        return y + _pre_act_shortcut(self, x, pre, self.features)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016b; their ResNet-164 and ResNet-1001), stride on
    the 3x3 conv. `(B, H, W, C) -> (B, H / strides, W / strides, 4 * features)`. Attributes as
    `PreActBasicBlock`; `zero_init_residual` zeroes conv_3's kernel; dropout sits before conv_3.
    """

    expansion: ClassVar[int] = 4
    convs: ClassVar[int] = 3
    preact: ClassVar[bool] = True

    features: int
    strides: int = 1
    shortcut: str = "B"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, bn = partial(_conv, dtype=self.dtype), partial(_bn, train=train, dtype=self.dtype)
        out = self.features * self.expansion
        pre = nn.relu(bn(name="bn_1")(x))
        y = nn.relu(bn(name="bn_2")(conv(self.features, 1, 1, name="conv_1")(pre)))
        y = nn.relu(bn(name="bn_3")(conv(self.features, 3, self.strides, name="conv_2")(y)))
        y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
        y = conv(out, 1, 1, name="conv_3", zero_init=self.zero_init_residual)(y)
        y = DropPath(self.drop_path_rate, name="drop_path")(y, train=train)
        return y + _pre_act_shortcut(self, x, pre, out)


def drop_path_rates(stage_sizes: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Per-block drop probabilities, Huang et al. 2016's linear decay rule.

    Survival `p_l = 1 - (l / L) * (1 - p_L)` for blocks `l = 1..L` counted through the whole net
    (input side first), i.e. drop rate `drop_path_rate * l / L`: the last block is dropped with
    probability `drop_path_rate` (the paper's `1 - p_L`, 0.5 in its experiments), early blocks,
    whose features every later block uses, rarely. Returned nested by stage.
    """
    total = sum(stage_sizes)
    rates, l = [], 0
    for size in stage_sizes:
        rates.append([drop_path_rate * (l + j + 1) / total for j in range(size)])
        l += size
    return rates


class ResNet(nn.Module):
    """Stem -> stages of residual blocks -> global average pool -> linear head.

    Attributes:
      stage_sizes: blocks per stage. Stage 1 keeps the stem's resolution; every later stage
        halves it with stride 2 in its first block.
      block: `BasicBlock`, `Bottleneck`, `PreActBasicBlock` or `PreActBottleneck`. With a
        pre-activation block the stem is a bare conv (+ max-pool), every block starts with
        BN -> ReLU, and a final BN -> ReLU precedes the pool (He et al. 2016b; the WRN code;
        timm's ResNetV2).
      num_classes: `K`.
      widths: `features` of each stage's blocks (stage output channels: `widths[i] *
        block.expansion`).
      stem: "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max-pool, `(B, 224, 224, 3) -> (B, 56,
        56, stem_width)`; "cifar": 3x3 stride-1 conv, no pool, `(B, 32, 32, 3) -> (B, 32, 32,
        stem_width)`. Post-activation nets follow the conv with BN -> ReLU.
      stem_width: stem output channels.
      shortcut: "B" (1x1 projection where the shape changes) or "A" (zero-padded identity, no
        parameters), see `BasicBlock`.
      drop_path_rate: stochastic depth, the drop probability of the LAST block; earlier blocks
        get linearly less (`drop_path_rates`). 0 disables it.
      dropout_rate: dropout between the convs of every block (WRN's option; 0.3 in their paper).
      zero_init_residual: zero-init the last layer of every residual branch (Goyal et al. 2017).
        Default False, as torchvision's `zero_init_residual=False`.
      dtype: computation dtype (parameters and logits stay float32).
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module] = BasicBlock
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str = "B"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, H, W, C]` float images; train: batch statistics and running-average
        updates, dropout and stochastic depth (the "dropout" rng).

        Returns:
          `(logits [B, K] float32, acts)`. With the "imagenet" stem and 224x224 input:
          `acts["stem"]` `[B, 56, 56, stem_width]`, `acts["stage_i"]` `[B, 56 / 2**(i-1), ...,
          widths[i-1] * expansion]` (i = 1..len(stage_sizes)); with the "cifar" stem and 32x32
          input the stem keeps 32x32 and stage i is `32 / 2**(i-1)`. Stage outputs are the raw
          block outputs (for pre-activation nets: before the final BN -> ReLU).
          `acts["features"]` `[B, widths[-1] * expansion]` float32 and `acts["logits"]`.
        """
        self._check()
        conv, bn = partial(_conv, dtype=self.dtype), partial(_bn, train=train, dtype=self.dtype)
        preact = self.block.preact
        acts = {}
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            # (B, H, W, C) -> (B, H/2, W/2, stem_width)
            x = conv(self.stem_width, 7, 2, name="stem_conv")(x)
        else:
            # CIFAR: 32x32 inputs keep their resolution into stage 1 (He et al. 2016, sec. 4.2).
            x = conv(self.stem_width, 3, 1, name="stem_conv")(x)
        if not preact:
            x = nn.relu(bn(name="stem_bn")(x))
        if self.stem == "imagenet":
            # (B, H/2, W/2, c) -> (B, H/4, W/4, c); padding with -inf, as torch's MaxPool2d.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        acts["stem"] = x

        rates = drop_path_rates(self.stage_sizes, self.drop_path_rate)
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                x = self.block(
                    features=width,
                    # (B, H, W, C) -> (B, H/2, W/2, C') in the first block of stages 2, 3, ...
                    strides=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut,
                    drop_path_rate=rates[i][j],
                    dropout_rate=self.dropout_rate,
                    zero_init_residual=self.zero_init_residual,
                    dtype=self.dtype,
                    name=f"stage_{i + 1}_block_{j + 1}",
                )(x, train=train)
            acts[f"stage_{i + 1}"] = x

        if preact:
            # The last block's sum is not normalised: BN -> ReLU before pooling (He et al. 2016b).
            x = nn.relu(bn(name="final_bn")(x))
        # Global average pool in float32: (B, h, w, C) -> (B, C).
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        acts["features"] = features
        # The head in float32: softmax cross-entropy on bfloat16 logits loses precision, and this
        # layer is a negligible share of the FLOPs. flax's default init (LeCun normal, zero bias).
        logits = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head"
        )(features)
        acts["logits"] = logits
        return logits, acts

    def _check(self) -> None:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f'stem must be "imagenet" or "cifar", got {self.stem!r}')
        if self.shortcut not in ("A", "B"):
            raise ValueError(f'shortcut must be "A" or "B", got {self.shortcut!r}')
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"{len(self.stage_sizes)} stages but {len(self.widths)} widths: {self.widths}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


def cifar_resnet(
    depth: int, block: type[nn.Module] = BasicBlock, **kwargs: Any
) -> Callable[..., ResNet]:
    """He et al. 2016's CIFAR ResNet-`depth` (section 4.2): 3 stages of n blocks of 16/32/64
    `features` on 32/16/8 pixels, `depth = 3 * n * block.convs + 2` weighted layers (6n + 2 with
    basic blocks, 9n + 2 with bottlenecks as He et al. 2016b's ResNet-164), option-A shortcuts
    (`shortcut="B"` for projections), 10 classes. `kwargs` override any other field."""
    per_stage = 3 * block.convs
    if depth < per_stage + 2 or (depth - 2) % per_stage:
        raise ValueError(
            f"a CIFAR ResNet of {block.__name__}s has depth {per_stage}n + 2 (n >= 1), got {depth}"
        )
    n = (depth - 2) // per_stage
    fields = dict(
        stage_sizes=(n, n, n), block=block, widths=(16, 32, 64), stem="cifar", stem_width=16,
        shortcut="A", num_classes=10,
    )
    return partial(ResNet, **(fields | kwargs))


def wide_resnet(depth: int, width: int, **kwargs: Any) -> Callable[..., ResNet]:
    """Zagoruyko & Komodakis 2016's WRN-`depth`-`width`: pre-activation basic blocks,
    `(depth - 4) / 6` per stage, stages of 16k/32k/64k channels on 32/16/8 pixels, 16-channel
    3x3 stem, 1x1 projection shortcuts where the shape changes (their code), 10 classes.
    Dropout between the convs with `dropout_rate=0.3` (their best CIFAR results)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a WRN has depth 6n + 4 (n >= 1), got {depth}")
    n = (depth - 4) // 6
    fields = dict(
        stage_sizes=(n, n, n), block=PreActBasicBlock, widths=(16 * width, 32 * width, 64 * width),
        stem="cifar", stem_width=16, shortcut="B", num_classes=10,
    )
    return partial(ResNet, **(fields | kwargs))


# ---- Variants --------------------------------------------------------------------------------

# ImageNet (He et al. 2016, Table 1; torchvision layout and counts), 1000 classes, 224x224.
ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
ResNet101 = partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
ResNet152 = partial(ResNet, stage_sizes=(3, 8, 36, 3), block=Bottleneck)
# The common CIFAR ResNet-18 (kuangliu/pytorch-cifar): ResNet-18 with a 3x3 stride-1 stem and no
# max-pool, so the stages run at 32/16/8/4 pixels; 11,173,962 parameters with 10 classes.
ResNet18Cifar = partial(ResNet18, stem="cifar", num_classes=10)
# CIFAR (He et al. 2016, section 4.2 and Table 6), option-A shortcuts, 10 classes, 32x32.
ResNet20 = cifar_resnet(20)
ResNet32 = cifar_resnet(32)
ResNet44 = cifar_resnet(44)
ResNet56 = cifar_resnet(56)
ResNet110 = cifar_resnet(110)
# Pre-activation (He et al. 2016b). PreActResNet18: the CIFAR-stem ResNet-18 layout with
# pre-activation blocks (as kuangliu/pytorch-cifar's PreActResNet18, plus the paper's final
# BN -> ReLU, which that one omits). PreActResNet110: the CIFAR ResNet-110 (option A) with
# pre-activation; PreActResNet164: bottlenecks of 16/32/64 (x4) channels, projections.
PreActResNet18 = partial(ResNet18Cifar, block=PreActBasicBlock)
PreActResNet110 = cifar_resnet(110, block=PreActBasicBlock)
PreActResNet164 = cifar_resnet(164, block=PreActBottleneck, shortcut="B")
# Wide ResNets (Zagoruyko & Komodakis 2016, Table 1 layout), 10 classes, 32x32.
WRN_16_8 = wide_resnet(16, 8)
WRN_28_10 = wide_resnet(28, 10)
WRN_40_4 = wide_resnet(40, 4)
# Tiny, for tests: the CIFAR layout with 1 block per stage of 8/16/32 channels; 19,218 params.
ResNetTiny = partial(
    ResNet, stage_sizes=(1, 1, 1), widths=(8, 16, 32), stem="cifar", stem_width=8, shortcut="A",
    num_classes=10,
)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet18_cifar": ResNet18Cifar,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "preact_resnet18": PreActResNet18,
    "preact_resnet110": PreActResNet110,
    "preact_resnet164": PreActResNet164,
    "wrn_16_8": WRN_16_8,
    "wrn_28_10": WRN_28_10,
    "wrn_40_4": WRN_40_4,
    "resnet_tiny": ResNetTiny,
}

_CIFAR = ("resnet18_cifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
          "preact_resnet18", "preact_resnet110", "preact_resnet164", "wrn_16_8", "wrn_28_10",
          "wrn_40_4", "resnet_tiny")
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    name: (32, 32, 3) if name in _CIFAR else (224, 224, 3) for name in VARIANTS
}
NUM_CLASSES: dict[str, int] = {name: 10 if name in _CIFAR else 1000 for name in VARIANTS}

PUBLISHED_PARAMS: dict[str, int] = {
    # torchvision.models.resnet*, exact (its model card "num_params"), 1000 classes.
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    # kuangliu/pytorch-cifar ResNet18 (the "11.17M" CIFAR ResNet-18), exact, 10 classes.
    "resnet18_cifar": 11_173_962,
    # He et al. 2016, Table 6, rounded ("0.27M" .. "1.7M"): see PUBLISHED_PARAMS_TOLERANCE. The
    # exact option-A counts are 269,722 / 464,154 / 658,586 / 853,018 / 1,727,962; option B
    # adds 2,752 (two 1x1 projections 16->32 and 32->64 with their BN).
    "resnet20": 270_000,
    "resnet32": 460_000,
    "resnet44": 660_000,
    "resnet56": 850_000,
    "resnet110": 1_700_000,
    # No published count. kuangliu/pytorch-cifar's PreActResNet18 has 11,171,146 parameters;
    # this net adds He et al. 2016b's final BN (2 * 512): exact, derived.
    "preact_resnet18": 11_172_170,
    # He et al. 2016b, their CIFAR results tables, rounded "1.7M" for both.
    "preact_resnet110": 1_700_000,
    "preact_resnet164": 1_700_000,
    # Zagoruyko & Komodakis 2016, their CIFAR results tables, rounded: WRN-16-8 "11.0M", WRN-28-10 "36.5M",
    # WRN-40-4 "8.9M".
    "wrn_16_8": 11_000_000,
    "wrn_28_10": 36_500_000,
    "wrn_40_4": 8_900_000,
    # Counted by hand in tests/test_nets_resnet.py, exact.
    "resnet_tiny": 19_218,
}
# Half a unit of the last published digit where the source rounds (0 where it is exact).
PUBLISHED_PARAMS_TOLERANCE: dict[str, int] = {name: 0 for name in VARIANTS} | {
    "resnet20": 5_000,
    "resnet32": 5_000,
    "resnet44": 5_000,
    "resnet56": 5_000,
    "resnet110": 50_000,
    "preact_resnet110": 50_000,
    "preact_resnet164": 50_000,
    "wrn_16_8": 50_000,
    "wrn_28_10": 50_000,
    "wrn_40_4": 50_000,
}
