"""Classification losses and metrics: keyword-only pure functions, one value per example.

Every loss and metric returns a per-example vector `[B]` rather than a scalar, so that the caller
decides how to reduce it. The usual reduction is `masked_mean(values, mask)`, where `mask` marks
the real examples of a batch padded to a fixed shape (a fixed shape means one compilation; the
padding must not count).

Shapes: `B` is the batch size, `K` the number of classes.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _at_least_float32(x: jax.Array) -> jax.Array:
    # Reductions over classes (log-sum-exp) lose too much precision in bfloat16, so a bfloat16
    # network's logits are upcast here; float64 stays float64 so gradient checks can run in it.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def softmax_cross_entropy(
    *, logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy between softmax(logits) and (optionally smoothed) integer labels.

    Label smoothing follows Szegedy et al. 2016, "Rethinking the Inception Architecture",
    Sec. 7: the target distribution is `(1 - eps) * onehot(y) + eps / K`, so with `eps > 0`
    the loss cannot reach 0 and the logits stop growing without bound.

    Args:
      logits: `[B, K]` float, unnormalised scores.
      labels: `[B]` int, the true class of each example, in `[0, K)`. A label outside that
        range gives an all-zero one-hot target (padding examples should be masked out anyway).
        Or `[B, K]` float target distributions (soft labels, e.g. from mixup or cutmix).
      label_smoothing: `eps` in `[0, 1]`.

    Returns:
      `[B]` float, `-sum_k target_k * log_softmax(logits)_k` for each example.
    """
    logits = _at_least_float32(logits)
    num_classes = logits.shape[-1]
    # log_softmax subtracts the max before exponentiating: no overflow for large logits, and
    # log(softmax) is never formed from a softmax that underflowed to 0.
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, K]
    if labels.ndim == logits.ndim:  # soft targets [B, K]
        if labels.shape != logits.shape:
            raise ValueError(f"soft labels must have the logits' shape {logits.shape}, "
                             f"got {labels.shape}")
        onehot = labels.astype(log_probs.dtype)
    else:
        onehot = jax.nn.one_hot(labels, num_classes, dtype=log_probs.dtype)  # [B, K]
    targets = (1.0 - label_smoothing) * onehot + label_smoothing / num_classes  # [B, K]
    return -jnp.sum(targets * log_probs, axis=-1)  # [B]


def multiclass_hinge(*, logits: jax.Array, labels: jax.Array, margin: float = 1.0) -> jax.Array:
    """The multiclass SVM loss of CS231n (Weston & Watkins 1999 form).

    `L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + margin)`: every wrong class whose score is not
    at least `margin` below the true class's score contributes the shortfall.

    Args:
      logits: `[B, K]` float scores `s`.
      labels: `[B]` int true classes `y`, in `[0, K)`.
      margin: the required gap `Delta` between the true score and every other score.

    Returns:
      `[B]` float per-example loss.
    """
    logits = _at_least_float32(logits)
    is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)  # [B, K]
    true_scores = jnp.sum(jnp.where(is_true, logits, 0.0), axis=-1)  # [B]
    margins = jax.nn.relu(logits - true_scores[:, None] + margin)  # [B, K]
    # The j == y term would be max(0, margin) = margin for every example: excluded, as in the
    # definition (it would add a constant with zero gradient).
    return jnp.sum(jnp.where(is_true, 0.0, margins), axis=-1)  # [B]


def l2_penalty(
    params: PyTree, *, mask: PyTree | Callable[[PyTree], PyTree] | None = None
) -> jax.Array:
    """`0.5 * sum(w ** 2)` over the leaves of `params` selected by `mask`.

    The factor 0.5 is the CS231n convention: the gradient of the penalty is then `w` itself, so
    `loss + lam * l2_penalty(params)` adds exactly `lam * w` to each selected gradient, the same
    as `optax.add_decayed_weights(lam)`.

    Args:
      params: a pytree of arrays.
      mask: `None` (every leaf), a pytree of Python bools with the structure of `params`, or a
        callable `params -> such a pytree` (e.g. `jaxvision.optim.default_decay_mask`). The bools
        must be static (not traced), as for optax masks.

    Returns:
      scalar float (at least float32, whatever the parameter dtype).
    """
    if mask is None:
        mask = jax.tree.map(lambda _: True, params)
    elif callable(mask):
        mask = mask(params)
    # tree.map (rather than zipping leaves) checks that the mask has the structure of params.
    per_leaf = jax.tree.map(
        lambda w, keep: jnp.sum(jnp.square(_at_least_float32(w))) if keep else None,
        params,
        mask,
    )
    # Leaves mapped to None vanish from tree.leaves; start from 0 so an all-False mask gives 0.
    return 0.5 * sum(jax.tree.leaves(per_leaf), jnp.zeros((), jnp.float32))


def accuracy(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether the top-scoring class is the label.

    Args:
      logits: `[B, K]` float.
      labels: `[B]` int, or `[B, K]` soft labels (then the label is their argmax: for mixup and
        cutmix, the class with the larger share).

    Returns:
      `[B]` float32, 1.0 where `argmax(logits) == label`, else 0.0 (ties go to the lowest index,
      as in `jnp.argmax`). Per example, so it can be reduced with `masked_mean`.
    """
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`sum(values * mask) / max(sum(mask), 1)`: the mean over the examples the mask keeps.

    The denominator is clamped to 1 so that an all-padding batch gives 0, not NaN. Masked-out
    entries are dropped with `where`, not only multiplied by 0, so a NaN or inf computed on a
    padding example (e.g. from an out-of-range label) does not poison the mean (`nan * 0` is
    nan).

    Args:
      values: `[B]` float, e.g. the output of `softmax_cross_entropy`.
      mask: `[B]` bool or float (float masks act as per-example weights).

    Returns:
      scalar float.
    """
    mask = mask.astype(jnp.promote_types(values.dtype, jnp.float32))
    total = jnp.sum(jnp.where(mask != 0, values * mask, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)
