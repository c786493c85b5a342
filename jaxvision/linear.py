"""Linear classifiers (CS231n assignment 1): multiclass SVM, softmax and binary logistic regression,
each loss with its gradient written by hand, twice: with explicit Python loops (`*_naive`, numpy,
for tiny inputs) and vectorised (`*_vectorized`, jnp, jit-able). SGD training, random search of
learning rate and regularisation, and the learned weights as class templates.

    x = add_bias_column(features)                            # [N, D + 1]: the bias trick
    loss, dw = svm_loss_vectorized(w, x, y, reg=1e-2)        # w: [D + 1, C]
    w, history = train_sgd(svm_loss_vectorized, x, y, lr=1e-2, reg=1e-2, steps=1500,
                           batch_size=200, seed=0)
    pred = predict(w, x_test)

Conventions (the course's, kept so its numbers carry over):
- every loss is the MEAN data loss over the N examples plus the penalty `reg * R(w)`;
- `penalty="l2"`: `R(w) = sum(w ** 2)`, gradient `2 w`, as in the assignment's
  `reg * np.sum(W * W)`. NOTE: `jaxvision.losses.l2_penalty` is `0.5 * sum(w ** 2)` (the lecture
  notes' convention, gradient `w`): the same `reg` means twice the decay here;
- `penalty="l1"`: `R(w) = sum(|w|)`, subgradient `sign(w)` (0 at w == 0);
- `penalty="elastic"`: `R(w) = l1_ratio * sum(|w|) + (1 - l1_ratio) * sum(w ** 2)`, so
  l1_ratio=0 is "l2" and l1_ratio=1 is "l1" exactly (Zou & Hastie 2005; scikit-learn scales its
  squared term by 0.5 instead);
- the bias trick: `add_bias_column` appends a column of ones, so the last row of `w` is the bias
  and one matrix holds everything. Like the course, the penalty covers ALL of `w`, bias row
  included (a penalised bias barely matters with mean-centred inputs; excluding it would need a
  mask everywhere for no measurable gain here).

Shapes: `x: [N, D]`, `w: [D, C]` (`[D]` for logistic regression), `y: [N]` int in `[0, C)`
(`y01: [N]` in {0, 1} for logistic regression). dtype follows the inputs (float64 in the
gradient checks).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PENALTIES = ("l2", "l1", "elastic")


# ---------------------------------------------------------------------------------------------
# Checks and the penalty (shared by loops and vectorised forms: `xp` is numpy or jax.numpy).


def _check(w, x, y, *, penalty: str, l1_ratio: float, binary: bool) -> None:
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if not 0.0 <= l1_ratio <= 1.0:  # a Python float (static): checked even under jit
        raise ValueError(f"l1_ratio must be in [0, 1], got {l1_ratio!r}")
    w_shape, x_shape, y_shape = np.shape(w), np.shape(x), np.shape(y)
    w_rank = 1 if binary else 2
    if len(x_shape) != 2 or len(w_shape) != w_rank or len(y_shape) != 1 or \
            x_shape[1] != w_shape[0] or x_shape[0] != y_shape[0]:
        w_doc = "[D]" if binary else "[D, C]"
        raise ValueError(f"expected w {w_doc}, x [N, D] and y [N], got w {w_shape}, x {x_shape} "
                         f"and y {y_shape}")


def _penalty(xp, w, reg, penalty: str, l1_ratio: float):
    """(reg * R(w), its (sub)gradient), R as in the module docstring."""
    if penalty == "l2":
        return reg * xp.sum(w * w), 2.0 * reg * w
    if penalty == "l1":
        # sign(0) = 0: the subgradient of |w| at 0 chosen as 0, so a weight at exactly 0 stays.
        return reg * xp.sum(xp.abs(w)), reg * xp.sign(w)
    a = l1_ratio
    return (reg * (a * xp.sum(xp.abs(w)) + (1.0 - a) * xp.sum(w * w)),
            reg * (a * xp.sign(w) + 2.0 * (1.0 - a) * w))


def _numpy_inputs(w, x, y):
    dtype = np.result_type(np.asarray(w).dtype, np.asarray(x).dtype, np.float32)
    return np.asarray(w, dtype), np.asarray(x, dtype), np.asarray(y).astype(np.int64)


def _jnp_inputs(w, x, y):
    dtype = jnp.result_type(jnp.asarray(w).dtype, jnp.asarray(x).dtype, jnp.float32)
    return jnp.asarray(w, dtype), jnp.asarray(x, dtype), jnp.asarray(y)


# ---------------------------------------------------------------------------------------------
# Multiclass SVM: L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + 1) (Weston & Watkins 1999).


def svm_loss_naive(w, x, y, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Multiclass SVM loss (margin 1) and its gradient, with loops over examples and classes.

    Each violated margin `s_j - s_{y_i} + 1 > 0` adds `x_i` to column j of the gradient and
    subtracts it from column y_i. Numpy on the host: a reference for tiny inputs.

    Returns:
      (loss scalar, dw [D, C]) as numpy, in the inputs' float dtype (at least float32).
    """
    _check(w, x, y, penalty=penalty, l1_ratio=l1_ratio, binary=False)
    w, x, y = _numpy_inputs(w, x, y)
    n, c = x.shape[0], w.shape[1]
    loss, dw = 0.0, np.zeros_like(w)
    for i in range(n):
        scores = x[i] @ w  # [C]
        for j in range(c):
            if j == y[i]:
                continue
            margin = scores[j] - scores[y[i]] + 1.0
            if margin > 0:
                loss += margin
                dw[:, j] += x[i]
                dw[:, y[i]] -= x[i]
    reg_loss, reg_grad = _penalty(np, w, reg, penalty, l1_ratio)
    return np.asarray(loss / n + reg_loss, w.dtype), (dw / n + reg_grad).astype(w.dtype)


def svm_loss_vectorized(w, x, y, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Multiclass SVM loss (margin 1) and its hand-written gradient, vectorised (jit-able).

    Returns:
      (loss scalar, dw [D, C]) as jax arrays.
    """
    _check(w, x, y, penalty=penalty, l1_ratio=l1_ratio, binary=False)
    w, x, y = _jnp_inputs(w, x, y)
    n, c = x.shape[0], w.shape[1]
    scores = x @ w  # [N, C]
    onehot = jax.nn.one_hot(y, c, dtype=scores.dtype)  # [N, C]
    correct = jnp.sum(scores * onehot, axis=1)  # [N]
    # The true class's own term would be max(0, 1) = 1 for every example: excluded by the mask.
    margins = jnp.maximum(0.0, scores - correct[:, None] + 1.0) * (1.0 - onehot)  # [N, C]
    # d loss / d scores: +1 for each violated wrong class, minus their count on the true class.
    violated = (margins > 0).astype(scores.dtype)  # [N, C]
    dscores = violated - onehot * jnp.sum(violated, axis=1)[:, None]
    reg_loss, reg_grad = _penalty(jnp, w, reg, penalty, l1_ratio)
    return jnp.sum(margins) / n + reg_loss, x.T @ dscores / n + reg_grad


# ---------------------------------------------------------------------------------------------
# Softmax: L_i = -log(exp(s_{y_i}) / sum_j exp(s_j)).


def softmax_loss_naive(w, x, y, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Softmax cross-entropy loss and gradient, with loops over examples and classes.

    Scores are shifted by their maximum before exponentiating (the course's "numeric stability"
    note: softmax is invariant to the shift, and exp never overflows). The gradient of L_i with
    respect to column j is `(p_j - [j == y_i]) x_i`. Numpy on the host: a reference.

    Returns:
      (loss scalar, dw [D, C]) as numpy.
    """
    _check(w, x, y, penalty=penalty, l1_ratio=l1_ratio, binary=False)
    w, x, y = _numpy_inputs(w, x, y)
    n, c = x.shape[0], w.shape[1]
    loss, dw = 0.0, np.zeros_like(w)
    for i in range(n):
        scores = x[i] @ w
        scores = scores - np.max(scores)
        total = 0.0
        for j in range(c):
            total += np.exp(scores[j])
        loss += np.log(total) - scores[y[i]]
        for j in range(c):
            p = np.exp(scores[j]) / total
            dw[:, j] += (p - (j == y[i])) * x[i]
    reg_loss, reg_grad = _penalty(np, w, reg, penalty, l1_ratio)
    return np.asarray(loss / n + reg_loss, w.dtype), (dw / n + reg_grad).astype(w.dtype)


def softmax_loss_vectorized(w, x, y, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Softmax cross-entropy loss and its hand-written gradient, vectorised (jit-able).

    Returns:
      (loss scalar, dw [D, C]) as jax arrays.
    """
    _check(w, x, y, penalty=penalty, l1_ratio=l1_ratio, binary=False)
    w, x, y = _jnp_inputs(w, x, y)
    n, c = x.shape[0], w.shape[1]
    scores = x @ w  # [N, C]
    shifted = scores - jnp.max(scores, axis=1, keepdims=True)  # no overflow in exp
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))  # [N, C]
    onehot = jax.nn.one_hot(y, c, dtype=scores.dtype)
    dscores = jnp.exp(log_probs) - onehot  # d L_i / d s: p - onehot(y_i)
    reg_loss, reg_grad = _penalty(jnp, w, reg, penalty, l1_ratio)
    return (-jnp.sum(log_probs * onehot) / n + reg_loss, x.T @ dscores / n + reg_grad)


# ---------------------------------------------------------------------------------------------
# Binary logistic regression: p = sigmoid(s), L_i = -y log p - (1 - y) log(1 - p).


def logistic_loss_naive(w, x, y01, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Binary logistic-regression loss and gradient, with a loop over examples.

    `L_i = log(1 + exp(s_i)) - y_i s_i` (the cross-entropy rewritten), evaluated as
    `max(s, 0) + log1p(exp(-|s|)) - y s` so neither exp overflows; `dL_i/ds_i = sigmoid(s_i) -
    y_i`. Numpy on the host: a reference.

    Args:
      w: `[D]`; x: `[N, D]`; y01: `[N]` labels in {0, 1}.

    Returns:
      (loss scalar, dw [D]) as numpy.
    """
    _check(w, x, y01, penalty=penalty, l1_ratio=l1_ratio, binary=True)
    w, x, y01 = _numpy_inputs(w, x, y01)
    n = x.shape[0]
    loss, dw = 0.0, np.zeros_like(w)
    for i in range(n):
        s = x[i] @ w
        loss += max(s, 0.0) + np.log1p(np.exp(-abs(s))) - y01[i] * s
        # sigmoid(s) without overflow for either sign of s.
        p = 1.0 / (1.0 + np.exp(-s)) if s >= 0 else np.exp(s) / (1.0 + np.exp(s))
        dw += (p - y01[i]) * x[i]
    reg_loss, reg_grad = _penalty(np, w, reg, penalty, l1_ratio)
    return np.asarray(loss / n + reg_loss, w.dtype), (dw / n + reg_grad).astype(w.dtype)


def logistic_loss_vectorized(w, x, y01, *, reg, penalty: str = "l2", l1_ratio: float = 0.5):
    """Binary logistic-regression loss and hand-written gradient, vectorised (jit-able).

    Returns:
      (loss scalar, dw [D]) as jax arrays.
    """
    _check(w, x, y01, penalty=penalty, l1_ratio=l1_ratio, binary=True)
    w, x, y01 = _jnp_inputs(w, x, y01)
    n = x.shape[0]
    s = x @ w  # [N]
    y01 = y01.astype(s.dtype)
    losses = jnp.maximum(s, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(s))) - y01 * s
    reg_loss, reg_grad = _penalty(jnp, w, reg, penalty, l1_ratio)
    return jnp.sum(losses) / n + reg_loss, x.T @ (jax.nn.sigmoid(s) - y01) / n + reg_grad


# ---------------------------------------------------------------------------------------------
# Bias trick, prediction, training.


def add_bias_column(x) -> jax.Array:
    """`[N, D] -> [N, D + 1]`: a column of ones appended LAST, so `w[-1]` is the bias (the
    course's `np.hstack([X, np.ones((N, 1))])`)."""
    if np.ndim(x) != 2:
        raise ValueError(f"x must be [N, D], got {np.shape(x)}")
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


@jax.jit
def predict(w, x) -> jax.Array:
    """Predicted labels `[N]` int32: `argmax(x @ w)` for `w: [D, C]` (ties: lowest class), or
    `x @ w > 0` (as 0/1) for a logistic-regression `w: [D]`."""
    scores = x @ w
    if w.ndim == 1:
        return (scores > 0).astype(jnp.int32)
    return jnp.argmax(scores, axis=1).astype(jnp.int32)


def accuracy(w, x, y) -> float:
    """Fraction of `predict(w, x)` equal to `y`."""
    return float(jnp.mean(predict(w, x) == jnp.asarray(y)))


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps", "batch_size"))
def _sgd(loss_fn, w, x, y, key, lr, reg, lr_decay, decay_every, *, steps, batch_size):
    n = x.shape[0]

    def step(w, inputs):
        t, k = inputs
        # With replacement, as the course's np.random.choice(num_train, batch_size): each step
        # is an unbiased estimate of the full gradient, and no epoch bookkeeping is needed.
        idx = jax.random.randint(k, (batch_size,), 0, n)
        loss, dw = loss_fn(w, x[idx], y[idx], reg=reg)
        rate = lr * lr_decay ** (t // decay_every).astype(w.dtype)
        return w - rate * dw, loss

    # One scan: the whole run is one compiled program and one dispatch (no per-step host sync).
    return jax.lax.scan(step, w, (jnp.arange(steps), jax.random.split(key, steps)))


def train_sgd(loss_fn: Callable, x, y, *, lr: float, reg: float, steps: int, batch_size: int,
              seed: int, w0=None, num_classes: int | None = None, init_scale: float = 1e-3,
              lr_decay: float = 1.0, decay_every: int = 0):
    """Minibatch SGD on a vectorised loss: `w <- w - lr * dw`.

    Args:
      loss_fn: `(w, x, y, *, reg) -> (loss, dw)`, e.g. `svm_loss_vectorized` or
        `functools.partial(softmax_loss_vectorized, penalty="l1")`. It is a static argument of
        the compiled loop: reuse one object across calls, or each call recompiles.
      x: `[N, D]` (with the bias column if wanted); y: `[N]` int.
      lr, reg: learning rate and regularisation strength (traced: changing them does not
        recompile, so a random search compiles once).
      steps, batch_size: number of updates; examples per minibatch, drawn uniformly with
        replacement using `seed`.
      w0: initial weights (required shape `[D]` for logistic regression); default
        `init_scale * normal(seed)` of shape `[D, num_classes]` (the course's 0.001 * randn).
      num_classes: default `max(y) + 1`.
      lr_decay, decay_every: multiply the rate by `lr_decay` every `decay_every` steps (0: never).

    Returns:
      (w, loss_history): final weights (jax array) and numpy `[steps]` minibatch losses.
    """
    if np.ndim(x) != 2 or np.ndim(y) != 1 or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x must be [N, D] and y [N], got {np.shape(x)} and {np.shape(y)}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(decay_every, int) or decay_every < 0:
        raise ValueError(f"decay_every must be an int >= 0, got {decay_every!r}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    init_key, key = jax.random.split(jax.random.key(seed))
    dtype = jnp.result_type(x.dtype, jnp.float32)
    if w0 is None:
        c = int(jnp.max(y)) + 1 if num_classes is None else num_classes
        w0 = init_scale * jax.random.normal(init_key, (x.shape[1], c), dtype)
    w0 = jnp.asarray(w0, dtype)
    w, history = _sgd(loss_fn, w0, x, y, key, jnp.asarray(lr, dtype), jnp.asarray(reg, dtype),
                      jnp.asarray(lr_decay, dtype), jnp.asarray(decay_every or steps + 1),
                      steps=steps, batch_size=batch_size)
    return w, np.asarray(history)


def random_search(loss_fn: Callable, x_train, y_train, x_val, y_val, *,
                  lr_range: tuple[float, float], reg_range: tuple[float, float], trials: int,
                  steps: int, batch_size: int, seed: int, **train_kwargs) -> dict:
    """Random search of (learning rate, regularisation), both log-uniform, on a validation split.

    Bergstra & Bengio 2012: for the same budget, random points cover each important axis better
    than a grid; log-uniform because both act multiplicatively (the course samples the exponent).
    Every trial trains with the same `seed`: the same initial weights and minibatches, so trials
    differ only in (lr, reg).

    Args:
      loss_fn: as for `train_sgd`.
      x_train, y_train / x_val, y_val: `[N, D]` / `[N]` training and validation data.
      lr_range, reg_range: (low, high), both > 0: sampled as `10 ** uniform(log10 low, log10 high)`.
      trials, steps, batch_size, seed: number of samples; each trial's `train_sgd` settings.
      train_kwargs: passed to `train_sgd` (e.g. `num_classes`, `init_scale`).

    Returns:
      {"trials": [{"lr", "reg", "train_accuracy", "val_accuracy", "final_loss"}, ...] in sample
       order, "best": the trial with the highest validation accuracy (the first among equals)
       plus its "index", "w": the best trial's weights}.
    """
    for name, (lo, hi) in (("lr_range", lr_range), ("reg_range", reg_range)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got "
                             f"{(lo, hi)!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    rng = np.random.default_rng(seed)
    lrs = 10.0 ** rng.uniform(math.log10(lr_range[0]), math.log10(lr_range[1]), trials)
    regs = 10.0 ** rng.uniform(math.log10(reg_range[0]), math.log10(reg_range[1]), trials)
    results, best, best_w = [], None, None
    for i, (lr, reg) in enumerate(zip(lrs, regs)):
        w, history = train_sgd(loss_fn, x_train, y_train, lr=float(lr), reg=float(reg),
                               steps=steps, batch_size=batch_size, seed=seed, **train_kwargs)
        trial = {"lr": float(lr), "reg": float(reg),
                 "train_accuracy": accuracy(w, x_train, y_train),
                 "val_accuracy": accuracy(w, x_val, y_val),
                 "final_loss": float(history[-1])}
        results.append(trial)
        if best is None or trial["val_accuracy"] > best["val_accuracy"]:
            best, best_w = {**trial, "index": i}, w
    return {"trials": results, "best": best, "w": best_w}


def templates(w, image_shape=(32, 32, 3), *, has_bias: bool = True,
              per_class: bool = False) -> np.ndarray:
    """The columns of `w` as images, min-max scaled to [0, 1] for plotting.

    Args:
      w: `[D (+1), C]` weights on flattened images (the bias row last, if `has_bias`).
      image_shape: `(H, W, channels)` with `H * W * channels = D`.
      per_class: scale each template by its own min and max (default: one min and max over all
        of them, as the course's visualisation does, so templates compare in contrast).

    Returns:
      numpy float32 `[C, H, W, channels]` in [0, 1].
    """
    w = np.asarray(w, np.float64)
    d = math.prod(image_shape) + int(has_bias)
    if w.ndim != 2 or w.shape[0] != d:
        raise ValueError(f"w must be [{d}, C] for image_shape {tuple(image_shape)}"
                         f"{' plus the bias row' if has_bias else ''}, got {w.shape}")
    if has_bias:
        w = w[:-1]
    t = w.T.reshape(w.shape[1], *image_shape)  # [C, H, W, ch]
    axes = tuple(range(1, t.ndim)) if per_class else None
    lo, hi = t.min(axis=axes, keepdims=True), t.max(axis=axes, keepdims=True)
    return ((t - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)
