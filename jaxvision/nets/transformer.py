"""Pre-norm transformer encoder (Vaswani et al. 2017; pre-LN as in ViT, Dosovitskiy et al. 2021).

Written out explicitly rather than with `nn.MultiHeadDotProductAttention`, so the course can read
every shape. Notation used in the shape comments:

  B  batch, N  query tokens, M  key/value tokens (M = N for self-attention),
  D  model width, H  heads, Dh = D / H  per-head width.

Pieces, smallest first:
  - `attention_weights(q, k, *, mask)`: softmax(Q K^T / sqrt(Dh)) in float32, `[B, H, N, M]`.
  - `dot_product_attention(q, k, v, *, mask) -> (out, weights)`: the above applied to V.
  - `fused_attention(q, k, v, *, mask, implementation) -> out`: the same function through
    `jax.nn.dot_product_attention` (XLA's or cuDNN's fused kernel), without the weights.
  - `MultiHeadAttention`: Q/K/V projections, per-head attention, output projection.
  - `MlpBlock`: Dense(D -> mlp_dim), GELU, dropout, Dense(mlp_dim -> D), dropout.
  - `EncoderBlock`: x + attn(LN(x)); x + mlp(LN(x)), with dropout and stochastic depth.
  - `Encoder`: a stack of blocks and a final LayerNorm; returns `(x, acts)`.

Masks are boolean, True where a query MAY attend to a key (flax's convention). PyTorch's
`attn_mask` also accepts additive float masks; a float mask here raises instead of silently
meaning something else.

Randomness (dropout, attention dropout, stochastic depth) uses the "dropout" rng, and only when
`train=True`.

`attention_impl` (every module below, default "explicit"): "explicit" is the written-out
attention above, which also returns the weights; "xla", "cudnn" and "auto" compute the same
function with `jax.nn.dot_product_attention`, which never materialises the float32 weights
for the caller: "cudnn" is cuDNN's fused flash attention (GPU, bfloat16/float16 only), "auto"
picks "cudnn" where it applies (a GPU backend, 16-bit inputs, head width a multiple of 8 up to
128) and "xla" elsewhere. The fused forms take no attention dropout and cannot return the
weights (`keep_attention`): both raise. For training speed on GPUs (issue 6: ViT-B/16
throughput depends on the attention kernel); the parameters are the same whichever is used.

Initialisation follows the original JAX ViT (google-research/vision_transformer,
vit_jax/models_vit.py): xavier-uniform kernels for attention and MLP, zero attention biases,
N(0, 1e-6) MLP biases, LayerNorm scale 1 / bias 0 with epsilon 1e-6.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Source: google-research/vision_transformer, vit_jax/models_vit.py (MlpBlock, Encoder1DBlock).
_KERNEL_INIT = nn.initializers.xavier_uniform()
_MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)
# 1e-6 as in the JAX ViT, timm's and torchvision's ViTs (PyTorch's LayerNorm default is 1e-5):
# it does not change the parameter count, but it matters for bit-level agreement with their
# pretrained weights.
_LN_EPSILON = 1e-6


def _check_mask(mask: jax.Array, logits_shape: tuple[int, ...]) -> jax.Array:
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got {mask.dtype}; an additive float "
            "mask (PyTorch's convention) is not accepted"
        )
    if mask.ndim != 4:
        raise ValueError(
            f"mask must have 4 dims [B|1, H|1, N, M] to broadcast against the attention "
            f"logits {logits_shape}, got shape {mask.shape}"
        )
    return jnp.broadcast_to(mask, logits_shape)


def attention_weights(
    q: jax.Array, k: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """softmax(Q K^T / sqrt(Dh)) over the keys, computed in float32.

    Args:
      q: `[B, N, H, Dh]` queries.
      k: `[B, M, H, Dh]` keys.
      mask: optional boolean `[B|1, H|1, N, M]`, True where query n may attend to key m. Each
        query must be allowed at least one key: a fully masked row gets uniform weights, not
        zeros.

    Returns:
      `[B, H, N, M]` float32 weights; masked entries are exactly 0 and each row sums to 1.
    """
    # (B, N, H, Dh), (B, M, H, Dh) -> (B, H, N, M). The products run in the inputs' dtype
    # (bfloat16 in mixed precision) but accumulate and return float32: softmax of bfloat16
    # logits loses the small differences between large logits.
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    # Scale by 1/sqrt(Dh) (Vaswani et al. 2017, section 3.2.1) so logits have unit variance
    # for unit-variance q, k, whatever the head width; done in float32, after the product.
    logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        mask = _check_mask(mask, logits.shape)
        # The lowest finite float32 rather than -inf: exp(min - max) is exactly 0 for a row
        # with any allowed key, and a fully masked row gives uniform weights instead of NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


ATTENTION_IMPLS = ("explicit", "xla", "cudnn", "auto")


def _check_impl(impl: str, *, attention_dropout: float = 0.0) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "explicit" and attention_dropout:
        raise ValueError(
            f"attention_dropout={attention_dropout} needs attention_impl='explicit': the fused "
            f"attention ({impl!r}) never forms the weights that dropout would drop"
        )


def _attend(weights: jax.Array, v: jax.Array) -> jax.Array:
    # (B, H, N, M), (B, M, H, Dh) -> (B, N, H, Dh), in v's dtype.
    return jnp.einsum("bhnm,bmhd->bnhd", weights.astype(v.dtype), v)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, softmax(Q K^T / sqrt(Dh)) V, per head.

    Args:
      q: `[B, N, H, Dh]` queries.
      k: `[B, M, H, Dh]` keys.
      v: `[B, M, H, Dv]` values.
      mask: optional boolean `[B|1, H|1, N, M]`, True where query n may attend to key m.

    Returns:
      `(out [B, N, H, Dv] in v's dtype, weights [B, H, N, M] float32)`.
    """
    weights = attention_weights(q, k, mask=mask)
    return _attend(weights, v), weights


def _cudnn_applies(q: jax.Array) -> bool:
    # cuDNN's fused attention: NVIDIA GPUs, 16-bit inputs, head width a multiple of 8 and at most
    # 128 (256 on Hopper; 128 is the limit on every GPU, see jax's check_is_flash_attention).
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """`dot_product_attention`'s output through `jax.nn.dot_product_attention`, no weights.

    Args:
      q: `[B, N, H, Dh]` queries.
      k: `[B, M, H, Dh]` keys.
      v: `[B, M, H, Dh]` values (the fused kernels want Dv = Dh).
      mask: optional boolean `[B|1, H|1, N, M]`, True where query n may attend to key m.
      implementation: "xla" (jax's reference: logits accumulated and softmax computed in
        float32, as `attention_weights`), "cudnn" (cuDNN flash attention, GPU only, 16-bit
        inputs), or "auto" ("cudnn" where it applies, else "xla").

    Returns:
      `[B, N, H, Dh]` in v's dtype: equal to `dot_product_attention(q, k, v, mask=mask)[0]` up
      to rounding (the same float32 softmax; with 16-bit inputs the probabilities are rounded
      to the input dtype before the product with V, as `_attend` does).
    """
    _check_impl(implementation)
    if implementation == "explicit":
        raise ValueError('fused_attention takes "xla", "cudnn" or "auto"; the explicit form is '
                         "dot_product_attention")
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_applies(q) else "xla"
    if mask is not None:
        # The same checks as the explicit form (boolean, 4 dims), broadcast to [B, H, N, M].
        mask = _check_mask(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to H heads, attend per head, concatenate, project back.

    Attributes:
      num_heads: `H`; the input width `D` must be divisible by it.
      attention_dropout: drop probability on the attention weights (train only). The returned
        weights are those before dropout.
      use_bias: biases on the Q/K/V projections. The published ViT counts (timm, torchvision)
        include them: without them ViT-B/16 has 27,648 parameters fewer.
      dtype: computation dtype of the projections and products (softmax is float32 always).
      attention_impl: "explicit" (default), "xla", "cudnn" or "auto" (see the module
        docstring); the fused forms return `None` for the weights.
    """

    num_heads: int
    attention_dropout: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "explicit"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        train: bool,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Args: x `[B, N, D]` queries' tokens; kv `[B, M, D]` tokens to attend to (default x:
        self-attention); mask boolean `[B|1, H|1, N, M]`.

        Returns `(out [B, N, D], weights [B, H, N, M] float32)`; weights are `None` with a
        fused `attention_impl`.
        """
        _check_impl(self.attention_impl, attention_dropout=self.attention_dropout)
        kv = x if kv is None else kv
        b, n, d = x.shape
        m = kv.shape[1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        dh = d // self.num_heads

        def project(inputs, length, name):
            # Dense then split into heads: (B, L, D) -> (B, L, D) -> (B, L, H, Dh). One [D, D]
            # kernel per projection, initialised as a whole (fan_in = fan_out = D), which is
            # what flax's MultiHeadDotProductAttention does with its [D, H, Dh] kernels.
            y = nn.Dense(
                d, use_bias=self.use_bias, kernel_init=_KERNEL_INIT, dtype=self.dtype,
                param_dtype=jnp.float32, name=name,
            )(inputs)
            return jnp.reshape(y, (b, length, self.num_heads, dh))

        q = project(x, n, "query")  # (B, N, H, Dh)
        k = project(kv, m, "key")  # (B, M, H, Dh)
        v = project(kv, m, "value")  # (B, M, H, Dh)
        if self.attention_impl == "explicit":
            weights = attention_weights(q, k, mask=mask)  # (B, H, N, M) float32
            dropped = nn.Dropout(self.attention_dropout, deterministic=not train)(weights)
            out = _attend(dropped, v)  # (B, N, H, Dh)
        else:
            weights = None
            out = fused_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        # Concatenate the heads and mix them: (B, N, H, Dh) -> (B, N, D) -> (B, N, D).
        out = jnp.reshape(out, (b, n, d))
        out = nn.Dense(
            d, kernel_init=_KERNEL_INIT, dtype=self.dtype, param_dtype=jnp.float32, name="out"
        )(out)
        return out, weights


class MlpBlock(nn.Module):
    """Position-wise feed-forward block: (B, N, D) -> (B, N, mlp_dim) -> (B, N, D).

    Dense, GELU, dropout, Dense, dropout, as in the JAX ViT's MlpBlock and timm's Mlp.
    """

    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = x.shape[-1]
        dense = dict(
            kernel_init=_KERNEL_INIT, bias_init=_MLP_BIAS_INIT, dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = nn.Dense(self.mlp_dim, name="dense_1", **dense)(x)  # (B, N, mlp_dim)
        # Exact (erf) GELU, as in timm, torchvision and BERT; the original JAX ViT used flax's
        # default tanh approximation, which differs by < 1e-3 (weights transfer either way).
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(d, name="dense_2", **dense)(x)  # (B, N, D)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).  (B, N, D) -> same.

    Attributes:
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP (4 D in ViT).
      dropout: dropout on the attention output and inside/after the MLP (train only).
      attention_dropout: dropout on the attention weights (train only).
      drop_path: stochastic depth (Huang et al. 2016; as used for ViTs by DeiT, Touvron et al.
        2021): in training, each residual branch is dropped for a whole example with this
        probability, and scaled by 1/(1 - drop_path) otherwise.
      dtype: computation dtype.
      attention_impl: see `MultiHeadAttention`.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = "explicit"

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns `(x [B, N, D], attention weights [B, H, N, N] float32, or None with a fused
        attention_impl)`."""
        # Stochastic depth as dropout with one draw per example: broadcasting the keep mask over
        # the token and width axes (1, 2) drops the whole branch of that example.
        def drop_path():
            return nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)

        y = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="norm_1")(x)
        y, weights = MultiHeadAttention(
            self.num_heads, attention_dropout=self.attention_dropout, dtype=self.dtype,
            attention_impl=self.attention_impl, name="attention",
        )(y, train=train, mask=mask)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        x = x + drop_path()(y)

        y = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="norm_2")(x)
        y = MlpBlock(self.mlp_dim, dropout=self.dropout, dtype=self.dtype, name="mlp")(
            y, train=train
        )
        x = x + drop_path()(y)
        return x, weights


class Encoder(nn.Module):
    """`depth` EncoderBlocks and a final LayerNorm (needed in pre-norm: the residual stream is
    never normalised otherwise).  (B, N, D) -> (B, N, D).

    No position embedding: the encoder is permutation-equivariant over tokens, and the caller
    (e.g. ViT) adds positions.

    Attributes:
      depth, num_heads, mlp_dim, dropout, attention_dropout: as in `EncoderBlock`.
      drop_path_rate: stochastic-depth rate of the last block; block i of L uses
        drop_path_rate * i / (L - 1), rising linearly from 0 (DeiT's and timm's schedule).
      keep_attention: also return every block's attention weights in `acts` (an extra
        `[B, H, N, N]` float32 per block: off by default to save memory). Needs
        `attention_impl="explicit"`.
      dtype: computation dtype.
      attention_impl: see `MultiHeadAttention`.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    keep_attention: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "explicit"

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Args: x `[B, N, D]`; mask boolean `[B|1, H|1, N, N]` (True = may attend).

        Returns:
          `(encoded [B, N, D] after the final LayerNorm, acts)` with `acts["block_i"]`
          `[B, N, D]` (output of block i = 1..depth, before the final norm) and, with
          `keep_attention`, `acts["attention_i"]` `[B, H, N, N]` float32 (rows sum to 1).
        """
        _check_impl(self.attention_impl, attention_dropout=self.attention_dropout)
        if self.keep_attention and self.attention_impl != "explicit":
            raise ValueError(
                f"keep_attention=True needs attention_impl='explicit': the fused attention "
                f"({self.attention_impl!r}) does not return the weights"
            )
        acts = {}
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(1, self.depth + 1):
            x, weights = EncoderBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                attention_dropout=self.attention_dropout,
                drop_path=float(rates[i - 1]),
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"block_{i}",
            )(x, train=train, mask=mask)
            acts[f"block_{i}"] = x
            if self.keep_attention:
                acts[f"attention_{i}"] = weights
        x = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="norm")(x)
        return x, acts
