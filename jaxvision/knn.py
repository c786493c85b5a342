"""k-nearest-neighbour classification (CS231n assignment 1): distances, majority vote, and k chosen
by k-fold cross-validation.

    d = knn.distances(train_x, test_x, metric="l2")         # [Ntest, Ntrain], jitted, chunked
    pred = knn.predict(d, train_y, k=5)                     # [Ntest] int
    acc = knn.cross_validate(train_x, train_y, ks=(1, 3, 5, 10), folds=5)   # [len(ks), folds]

Distances come three ways, equal to float tolerance (tests/test_knn.py), as in the course:
- `distances_two_loops`: a Python loop over test rows and one over training rows, in numpy. The
  literal definition; the reference the others are tested against. Minutes at CIFAR scale.
- `distances_one_loop`: a Python loop over test rows; each row's distances to the whole training
  set are one jitted call (direct differences, no expansion), so it runs on the accelerator.
- `distances`: fully vectorised and jitted. L2 uses `|x - y|^2 = |x|^2 - 2 x.y + |y|^2`, so the
  bulk of the work is one matrix product; L1 has no such trick and is a broadcast difference.

Memory of `distances` (the result itself, Ntest x Ntrain, is not counted: it is what is asked
for; 10,000 x 50,000 in float32 is 2.0 GB):
- L2: test rows go `chunk` at a time, each giving a `[chunk, Ntrain]` block of the result; the
  working set is about 2 blocks plus the centred training set, i.e. with chunk=1024 and 50,000
  training images of D=3,072: 2 x 205 MB + 614 MB.
- L1: test rows `chunk` at a time and, inside, training rows `train_chunk` at a time: the
  broadcast difference `[chunk, train_chunk, D]` is the largest temporary. By default
  `train_chunk` keeps it near 2^24 elements (64 MB in float32) whatever `chunk` and D are.
The blocks are written into the preallocated result with `dynamic_update_slice` inside one
`fori_loop`, so the whole computation is one compiled program and no concatenation copies the
result. The last block is shifted back to end at the last row (it overlaps the one before and
recomputes a few rows) rather than padded, so every block has the same static shape.

Ties (documented here once, tested in tests/test_knn.py):
- among equal distances, the training example with the lower index is the nearer one (a stable
  order: `lax.top_k` puts the lower index first among equal values);
- among classes with equally many votes, the smallest class index wins, as the course's
  `np.argmax(np.bincount(closest_y))` does. (So with k=2 and two different labels, the smaller
  label wins, not the nearer neighbour.)
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("l1", "l2")
# Default size of L1's broadcast temporary [chunk, train_chunk, D], in elements (64 MB float32).
_L1_BLOCK_ELEMENTS = 1 << 24


def _check_pair(train, test, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if np.ndim(train) != 2 or np.ndim(test) != 2:
        raise ValueError(f"train and test must be 2-D [N, D] (flatten images first), got train "
                         f"{np.shape(train)} and test {np.shape(test)}")
    if np.shape(train)[1] != np.shape(test)[1]:
        raise ValueError(f"train and test must have the same feature dimension D, got train "
                         f"{np.shape(train)} and test {np.shape(test)}")
    if np.shape(train)[0] == 0:
        raise ValueError(f"train must hold at least one example, got {np.shape(train)}")


def _compute_dtype(*arrays) -> np.dtype:
    # At least float32: uint8 pixels would overflow when squared, and bfloat16 sums of 3,072
    # squares keep ~3 significant digits. float64 stays float64 (the tests' exact checks).
    return np.result_type(*[np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype
                            for a in arrays], np.float32)


def distances_two_loops(train, test, *, metric: str = "l2") -> np.ndarray:
    """Distances by two explicit loops (numpy, on the host): the reference.

    Args:
      train: `[Ntrain, D]` float (or integer pixels).
      test: `[Ntest, D]`.
      metric: "l1" (sum of absolute differences) or "l2" (Euclidean, not squared).

    Returns:
      numpy `[Ntest, Ntrain]`, `out[i, j]` = distance between `test[i]` and `train[j]`, in at
      least float32 (float64 inputs give float64).
    """
    _check_pair(train, test, metric)
    dtype = _compute_dtype(train, test)
    train, test = np.asarray(train, dtype), np.asarray(test, dtype)
    out = np.empty((len(test), len(train)), dtype)
    for i in range(len(test)):
        for j in range(len(train)):
            diff = test[i] - train[j]
            if metric == "l2":
                out[i, j] = np.sqrt(np.sum(diff * diff))
            else:
                out[i, j] = np.sum(np.abs(diff))
    return out


@functools.partial(jax.jit, static_argnames="metric")
def _row_distances(train, row, *, metric):
    diff = train - row[None, :]  # [Ntrain, D]
    if metric == "l2":
        return jnp.sqrt(jnp.sum(diff * diff, axis=1))
    return jnp.sum(jnp.abs(diff), axis=1)


def distances_one_loop(train, test, *, metric: str = "l2") -> jax.Array:
    """Distances with one Python loop over test rows; each row is one jitted, vectorised call.

    Direct differences (no `|x|^2 - 2x.y + |y|^2` expansion), so it is also an independent check
    of `distances`' L2 expansion. Arguments and result as for `distances_two_loops` (the result
    is a jax array).
    """
    _check_pair(train, test, metric)
    dtype = _compute_dtype(train, test)
    train, test = jnp.asarray(train, dtype), jnp.asarray(test, dtype)
    return jnp.stack([_row_distances(train, test[i], metric=metric) for i in range(len(test))]) \
        if len(test) else jnp.zeros((0, len(train)), dtype)


def _chunked_rows(fn, rows: jax.Array, chunk: int, width: int) -> jax.Array:
    """`fn` applied to `rows` `chunk` at a time, the `[chunk, width]` blocks written into one
    `[len(rows), width]` result (the last block shifted back to end at the last row)."""
    n = rows.shape[0]
    chunk = min(chunk, n)

    def body(i, out):
        start = jnp.minimum(i * chunk, n - chunk)
        block = fn(jax.lax.dynamic_slice_in_dim(rows, start, chunk, axis=0))  # [chunk, width]
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0)

    out = jnp.zeros((n, width), rows.dtype)
    return jax.lax.fori_loop(0, math.ceil(n / chunk), body, out)


@functools.partial(jax.jit, static_argnames=("metric", "chunk", "train_chunk"))
def _distances(train, test, *, metric, chunk, train_chunk):
    n_train = train.shape[0]
    if metric == "l2":
        # Distances do not change when both sets move by the same vector: centring on the
        # training mean shrinks |x|^2 and |y|^2 (raw pixels: ~5x) and with them the cancellation
        # error of the expansion, which is about eps * |x| |y| on a difference that can be ~0.
        mean = jnp.mean(train, axis=0)
        train = train - mean[None, :]
        test = test - mean[None, :]
        train_sq = jnp.sum(train * train, axis=1)  # [Ntrain]

        def block(rows):  # [c, D] -> [c, Ntrain]
            # HIGHEST: on GPUs a float32 matmul may otherwise run in TF32 (10-bit mantissa),
            # whose ~1e-3 relative error on x.y swamps small distances after the subtraction.
            cross = jnp.matmul(rows, train.T, precision=jax.lax.Precision.HIGHEST)
            sq = jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * cross + train_sq[None, :]
            # Rounding can make a true 0 (or tiny) squared distance slightly negative: clamp
            # before the square root, else sqrt gives NaN.
            return jnp.sqrt(jnp.maximum(sq, 0.0))
    else:
        def block(rows):  # [c, D] -> [c, Ntrain], training rows train_chunk at a time
            def columns(train_rows):  # [t, D] -> [t, c], so _chunked_rows can go over train
                diff = train_rows[:, None, :] - rows[None, :, :]  # [t, c, D]
                return jnp.sum(jnp.abs(diff), axis=2)
            return _chunked_rows(columns, train, train_chunk, rows.shape[0]).T

    return _chunked_rows(block, test, chunk, n_train)


def distances(train, test, *, metric: str = "l2", chunk: int = 1024,
              train_chunk: int | None = None) -> jax.Array:
    """All test-to-train distances, vectorised and jitted, in bounded memory.

    Args:
      train: `[Ntrain, D]` float (or integer pixels).
      test: `[Ntest, D]`.
      metric: "l1" or "l2" (Euclidean, not squared).
      chunk: test rows per block (memory: see the module docstring).
      train_chunk: L1 only: training rows per block (default: as many as keep the
        `[chunk, train_chunk, D]` temporary near 2^24 elements).

    Returns:
      `[Ntest, Ntrain]` jax array in at least float32 (float64 inputs under x64 give float64).
      L2 is computed as `sqrt(max(|x|^2 - 2 x.y + |y|^2, 0))` on mean-centred data; its absolute
      error is about `sqrt(eps) * |x|` for near-duplicates (clamped at 0, never NaN), and
      relative ~eps otherwise.
    """
    _check_pair(train, test, metric)
    for name, value in (("chunk", chunk), ("train_chunk", train_chunk)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dtype = _compute_dtype(train, test)
    train, test = jnp.asarray(train, dtype), jnp.asarray(test, dtype)
    if test.shape[0] == 0:
        return jnp.zeros((0, train.shape[0]), train.dtype)
    chunk = min(chunk, test.shape[0])
    if train_chunk is None:
        train_chunk = max(1, _L1_BLOCK_ELEMENTS // (chunk * max(1, train.shape[1])))
    train_chunk = min(train_chunk, train.shape[0])
    if metric == "l2":
        train_chunk = 0  # unused: keep it out of the jit cache key
    return _distances(train, test, metric=metric, chunk=chunk, train_chunk=train_chunk)


@functools.partial(jax.jit, static_argnames="k")
def _nearest_labels(dists, train_labels, *, k):
    # -0.0 and +0.0 are equal distances, but top_k orders floats totally (-0 < +0): make every
    # zero +0 so equal distances tie and the lower training index wins, as documented.
    dists = jnp.where(dists == 0, 0.0, dists)
    _, idx = jax.lax.top_k(-dists, k)  # [Ntest, k], nearest first; ties: lower index first
    return train_labels[idx]


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _vote(labels, *, ks, num_classes):
    """labels: [Ntest, kmax] of the nearest first -> [Ntest, len(ks)] majority vote of the first
    k, for every k in ks at once (running vote counts along the neighbour axis)."""
    counts = jnp.cumsum(jax.nn.one_hot(labels, num_classes, dtype=jnp.int32), axis=1)
    counts = counts[:, np.asarray(ks) - 1, :]  # [Ntest, len(ks), C]: votes among the first k
    return jnp.argmax(counts, axis=2)  # ties: the first maximum, i.e. the smallest class


def _check_predict(dists, train_labels, k: int) -> None:
    if np.ndim(dists) != 2 or np.ndim(train_labels) != 1 or \
            np.shape(dists)[1] != np.shape(train_labels)[0]:
        raise ValueError(f"dists must be [Ntest, Ntrain] and train_labels [Ntrain], got dists "
                         f"{np.shape(dists)} and train_labels {np.shape(train_labels)}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= np.shape(dists)[1]:
        raise ValueError(f"k must be an int in [1, Ntrain={np.shape(dists)[1]}], got {k!r}")


def predict(dists, train_labels, *, k: int = 1, num_classes: int | None = None) -> jax.Array:
    """Majority vote among the k nearest training examples.

    Args:
      dists: `[Ntest, Ntrain]` distances (e.g. from `distances`).
      train_labels: `[Ntrain]` int labels in `[0, num_classes)`.
      k: number of neighbours, in `[1, Ntrain]`.
      num_classes: default `max(train_labels) + 1`.

    Returns:
      `[Ntest]` int32 predicted labels. Ties: equal distances, the lower training index is
      nearer; equal vote counts, the smallest class wins (see the module docstring).
    """
    _check_predict(dists, train_labels, k)
    train_labels = jnp.asarray(train_labels, jnp.int32)
    if num_classes is None:
        num_classes = int(jnp.max(train_labels)) + 1
    nearest = _nearest_labels(jnp.asarray(dists), train_labels, k=int(k))
    return _vote(nearest, ks=(int(k),), num_classes=int(num_classes))[:, 0]


def cross_validate(train_x, train_y, *, ks: Sequence[int], folds: int = 5, metric: str = "l2",
                   seed: int | None = 0, chunk: int = 1024) -> np.ndarray:
    """k-fold cross-validation accuracy of kNN for every k in `ks`.

    The examples are permuted with `seed` (None: kept in order, the course's
    `np.array_split(X_train, num_folds)`; a class-sorted array then gives folds that miss whole
    classes) and split into `folds` near-equal parts with `np.array_split`. Each fold is held out
    once: its distance matrix to the other folds is computed ONCE, and its neighbours sorted
    once for the largest k; every k then votes on a prefix of that list.

    Args:
      train_x: `[N, D]` features.
      train_y: `[N]` int labels.
      ks: the k values to try (each at most the size of the smallest training part).
      folds: number of folds, >= 2.
      metric, chunk: as for `distances`.

    Returns:
      numpy float64 `[len(ks), folds]`: accuracy of each k on each held-out fold.
    """
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    if train_x.ndim != 2 or train_y.ndim != 1 or len(train_x) != len(train_y):
        raise ValueError(f"train_x must be [N, D] and train_y [N], got {train_x.shape} and "
                         f"{train_y.shape}")
    if not isinstance(folds, int) or not 2 <= folds <= len(train_x):
        raise ValueError(f"folds must be an int in [2, N={len(train_x)}], got {folds!r}")
    ks = [int(k) for k in ks]
    smallest_train = len(train_x) - math.ceil(len(train_x) / folds)
    if not ks or min(ks) < 1 or max(ks) > smallest_train:
        raise ValueError(f"ks must be non-empty, each in [1, {smallest_train}] (the smallest "
                         f"training part of {folds} folds of {len(train_x)}), got {ks}")
    order = np.arange(len(train_x)) if seed is None else \
        np.random.default_rng(seed).permutation(len(train_x))
    parts = np.array_split(order, folds)
    num_classes = int(train_y.max()) + 1
    out = np.zeros((len(ks), folds))
    for f in range(folds):
        held = parts[f]
        rest = np.concatenate([parts[g] for g in range(folds) if g != f])
        d = distances(train_x[rest], train_x[held], metric=metric, chunk=chunk)
        nearest = _nearest_labels(d, jnp.asarray(train_y[rest], jnp.int32), k=max(ks))
        pred = np.asarray(_vote(nearest, ks=tuple(ks), num_classes=num_classes))  # [n, len(ks)]
        out[:, f] = np.mean(pred == train_y[held][:, None], axis=0)
    return out
