"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

The image is cut into non-overlapping p x p patches, each linearly embedded (one conv with
kernel = stride = p), a learned class token is prepended, learned position embeddings are added,
and a pre-norm transformer encoder (`jaxvision.nets.transformer.Encoder`) mixes the tokens. The
head reads the class token after the final LayerNorm (or, with `pool="gap"`, the mean of the
tokens and no class token at all, the paper's appendix D.3 alternative).

`ViT(...)(x, train=...)` returns `(logits [B, K] float32, acts)`; no BatchNorm, so there is no
"batch_stats" collection. Randomness (dropout, stochastic depth) uses the "dropout" rng, only in
train. Mixed precision: `dtype` is the computation dtype, parameters stay float32, attention
softmax and the head run in float32.

Shapes below: B batch, (Hi, Wi) image size, p patch size, N = (Hi/p)(Wi/p) patches, D width.

Position embeddings are learned for one resolution: the parameter's shape is fixed by the image
size seen at init (`INPUT_SHAPES`), and another resolution fails with a shape error rather than
silently reusing positions (fine-tuning at a higher resolution needs the embedding interpolated,
paper section 3.2; not implemented here).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.nets.transformer import Encoder


class ViT(nn.Module):
    """Vision Transformer.

    Attributes:
      patch_size: p; the image height and width must be divisible by it.
      width: D, the token width.
      depth: number of encoder blocks.
      num_heads: attention heads (D divisible by it).
      mlp_dim: hidden width of each block's MLP.
      num_classes: K.
      pool: "token" (a learned class token; the head reads it) or "gap" (no class token; the
        head reads the mean of the encoded tokens).
      dropout: dropout after the position embedding and in every block (train only).
      attention_dropout: dropout on the attention weights (train only).
      drop_path_rate: stochastic depth of the last block, linear from 0 over the blocks.
      keep_attention: return each block's attention weights as `acts["attention_i"]`.
      dtype: computation dtype.
      attention_impl: "explicit" (default: the written-out attention), or "xla" / "cudnn" /
        "auto" (`jax.nn.dot_product_attention`; "auto" is cuDNN's fused flash attention on a
        GPU in bfloat16): the same function and parameters, meant for speed on GPUs
        (`jaxvision.nets.transformer`; timed by benchmarks/throughput.py); no attention dropout
        or `keep_attention` with them.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int = 1000
    pool: Literal["token", "gap"] = "token"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    keep_attention: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "explicit"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, Hi, Wi, C]` float images, Hi and Wi divisible by `patch_size`.

        Returns:
          `(logits [B, K] float32, acts)` with (T = N + 1 tokens with the class token, N with
          "gap"):
            "patch_embed" `[B, N, D]`: the embedded patches, row-major, before the class token
              and positions;
            "block_i" `[B, T, D]`: output of encoder block i = 1..depth;
            "attention_i" `[B, H, T, T]` float32: only with `keep_attention`;
            "encoded" `[B, T, D]`: all tokens after the final LayerNorm (for dense heads);
            "features" `[B, D]` float32: the class token (or the token mean) after the final
              LayerNorm, the head's input;
            "logits" `[B, K]`.
        """
        if self.pool not in ("token", "gap"):
            raise ValueError(f'pool must be "token" or "gap", got {self.pool!r}')
        b, hi, wi, _ = x.shape
        p = self.patch_size
        if hi % p or wi % p:
            # A VALID conv would silently drop the border pixels.
            raise ValueError(f"image size {hi}x{wi} is not divisible by patch_size={p}")
        acts = {}
        x = x.astype(self.dtype)
        # Patch embedding: one linear map per p x p x C patch, i.e. a conv with kernel = stride
        # = p. Default flax init (LeCun normal kernel, zero bias), as in the JAX ViT
        # (google-research/vision_transformer, vit_jax/models_vit.py, "embedding").
        # (B, Hi, Wi, C) -> (B, Hi/p, Wi/p, D)
        x = nn.Conv(
            self.width, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
            param_dtype=jnp.float32, name="patch_embed",
        )(x)
        # (B, Hi/p, Wi/p, D) -> (B, N, D), patches in row-major order.
        x = jnp.reshape(x, (b, -1, self.width))
        acts["patch_embed"] = x
        if self.pool == "token":
            # Learned class token, zero-initialised as in the JAX ViT ("cls").
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
            # (B, N, D) -> (B, 1 + N, D)
            cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        # Learned position embeddings, one per token (the class token's too), N(0, 0.02^2) as in
        # the JAX ViT ("posemb_init=normal(stddev=0.02), from BERT"). The paper found 2-D-aware
        # or relative embeddings no better (appendix D.4).
        pos = self.param(
            "pos_embed", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.width),
            jnp.float32,
        )
        x = x + pos.astype(self.dtype)  # (B, T, D) + (1, T, D)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)

        # (B, T, D) -> (B, T, D), after the final LayerNorm.
        x, encoder_acts = Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path_rate=self.drop_path_rate,
            keep_attention=self.keep_attention,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="encoder",
        )(x, train=train)
        acts.update(encoder_acts)
        acts["encoded"] = x

        # (B, T, D) -> (B, D), in float32.
        x = x.astype(jnp.float32)
        # "gap" pools after the final LayerNorm, as the JAX ViT does (timm's avg pooling instead
        # normalises after pooling, with its own fc_norm).
        features = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        acts["features"] = features
        # Zero-initialised head, as in the JAX ViT and big_vision (head_zeroinit): the initial
        # logits are 0 (uniform prediction, loss log K), and the encoder learns from the head's
        # gradient after the first step. The head runs in float32 (cross-entropy on bfloat16
        # logits loses precision; it is a negligible share of the FLOPs).
        logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
            param_dtype=jnp.float32, name="head",
        )(features)
        acts["logits"] = logits
        return logits, acts


# ---- Variants --------------------------------------------------------------------------------
# Widths, depths, heads and MLP sizes: ViT paper table 1 (B); Ti and S from DeiT (Touvron et al.
# 2021, table 1) / "How to train your ViT" (Steiner et al. 2022). ImageNet: 224x224, 1000 classes.
ViTTi16 = partial(ViT, patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768)
ViTTi32 = partial(ViT, patch_size=32, width=192, depth=12, num_heads=3, mlp_dim=768)
ViTS16 = partial(ViT, patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536)
ViTS32 = partial(ViT, patch_size=32, width=384, depth=12, num_heads=6, mlp_dim=1536)
ViTB16 = partial(ViT, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
ViTB32 = partial(ViT, patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072)
# CIFAR (32x32, 10 classes): ViT-S with 4x4 patches, 64 patches + class token. Plain ViTs need
# heavy augmentation and long schedules to do well on CIFAR from scratch.
ViTSCifar = partial(
    ViT, patch_size=4, width=384, depth=12, num_heads=6, mlp_dim=1536, num_classes=10
)
# Micro: for tests. 2 blocks of width 32, 2 heads, MLP 4x wide as in every ViT, 8x8 patches on
# 32x32 (16 patches + class token), 10 classes: 32,554 parameters.
ViTMicro = partial(
    ViT, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=128, num_classes=10
)

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "vit_ti_16": ViTTi16,
    "vit_ti_32": ViTTi32,
    "vit_s_16": ViTS16,
    "vit_s_32": ViTS32,
    "vit_b_16": ViTB16,
    "vit_b_32": ViTB32,
    "vit_s_cifar": ViTSCifar,
    "vit_micro": ViTMicro,
}

# Parameter counts. ImageNet variants: timm's VisionTransformer (`vit_tiny_patch16_224`,
# `vit_{small,base}_patch{16,32}_224`, num_classes=1000, `sum(p.numel() for p in
# model.parameters())`), exact; ViT-B/16 and B/32 are also torchvision's `vit_b_16` / `vit_b_32`.
# ViT-Ti/32 (not in timm's pretrained list): the same construction with 32x32 patches, as listed
# by DeepVision (github.com/DavidLandup0/deepvision, README, "ViTTiny32") and implied by the
# Ti/16 count: + (32^2 - 16^2) * 3 * 192 patch-kernel entries - (197 - 50) * 192 positions.
# What decides the counts: biases on the Q/K/V projections (timm qkv_bias=True; without them,
# 12 * 3 * D fewer), no pre-logits (representation) layer, a class token, a position embedding
# for the class token too, LayerNorms with scale and bias. LayerNorm epsilon (1e-6 in timm and
# here) and GELU's form change no count, only agreement with pretrained weights.
# CIFAR variants: no published reference; counted by the closed-form formula in
# tests/test_nets_vit.py, which reproduces the six ImageNet counts above.
PUBLISHED_PARAMS: dict[str, int] = {
    "vit_ti_16": 5_717_416,
    "vit_ti_32": 6_131_560,
    "vit_s_16": 22_050_664,
    "vit_s_32": 22_878_952,
    "vit_b_16": 86_567_656,
    "vit_b_32": 88_224_232,
    "vit_s_cifar": 21_342_346,
    "vit_micro": 32_554,
}

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "vit_ti_16": (224, 224, 3),
    "vit_ti_32": (224, 224, 3),
    "vit_s_16": (224, 224, 3),
    "vit_s_32": (224, 224, 3),
    "vit_b_16": (224, 224, 3),
    "vit_b_32": (224, 224, 3),
    "vit_s_cifar": (32, 32, 3),
    "vit_micro": (32, 32, 3),
}

NUM_CLASSES: dict[str, int] = {name: 1000 for name in VARIANTS} | {
    "vit_s_cifar": 10,
    "vit_micro": 10,
}
