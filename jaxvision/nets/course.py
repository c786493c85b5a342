"""The course's explicit nets (CS231n assignments 1 and 2) as pure functions, and their Solver.

    params = course.init_two_layer(key, input_dim=3072, hidden_dim=100, num_classes=10)
    loss, grads = course.two_layer_loss(params, x, y, reg=1e-3)   # backward written out by hand

    params, state = course.init_fc(key, input_dim=3072, hidden_dims=(100, 100), num_classes=10,
                                   normalization="batchnorm", init="he")
    (loss, state), grads = jax.value_and_grad(course.fc_loss, has_aux=True)(
        params, state, x, y, reg=0.0, train=True, dropout_rate=0.5, key=key,
        normalization="batchnorm")   # jax.grad runs the layers' hand-derived backwards

Why pure functions rather than Flax modules: these are the course's "modular" nets, whose point
is that every gradient is derived by hand. Parameters are plain dicts of arrays named as in the
assignments (`W1`, `b1`, `gamma1`, ...), so a student can read and check each one. The two-layer
net writes its whole backward pass out in `two_layer_loss` (no `jax.grad`); the fully connected
net and the three-layer ConvNet are compositions of `jaxvision.layers` / `jaxvision.conv`, whose
layers are `jax.custom_vjp` functions with hand-derived backwards, so `jax.grad` of their loss
*runs the hand-written backwards* (the course's `affine_relu_backward`-style chaining, done by
JAX's chain rule). The softmax loss is wrapped the same way (`softmax_data_loss`), so its
gradient is the hand-written `dscores` of `layers.softmax_loss`. The Flax nets in
`jaxvision/nets/` (e.g. `mlp.MLP`, `convnet.ConvNet`) are the autodiff counterparts.

Regularisation: `0.5 * reg * sum(W ** 2)` over the weight matrices / filters (not the biases,
nor batch/layer norm's gamma and beta), the convention of assignment 2 (`fc_net.py`, `cnn.py`);
its gradient is `reg * W`. (Assignment 1's older two-layer net used `reg * sum(W ** 2)`.)

`train(...)` is the course's `Solver`: minibatch SGD/momentum/Adam (optax) on batches drawn
from a seeded permutation each epoch, a learning rate decayed by `lr_decay` after each epoch,
the train accuracy on a fixed subset and the validation accuracy after each epoch, and the
parameters with the best validation accuracy kept.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxvision import conv as conv_lib
from jaxvision import layers

PyTree = Any
Params = dict[str, jax.Array]

NORMALIZATIONS = (None, "batchnorm", "layernorm")
INITS = ("normal", "he")
CONVS = ("lax", "im2col")
OPTIMIZERS = ("sgd", "momentum", "adam")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _flatten(x: jax.Array, *, name: str = "x") -> jax.Array:
    """[N, d1, ..., dk] -> [N, D] (the course's affine layer reshapes each example to a row)."""
    if x.ndim < 2:
        raise ValueError(f"{name} must be [N, d1, ...] with at least 2 axes, got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def _check_labels(x: jax.Array, y: jax.Array) -> None:
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be [N] with N = x.shape[0] = {x.shape[0]}, got shape {y.shape}")


def _std(*, fan_in: int, init: str, weight_scale: float) -> float:
    # "normal": the course's N(0, weight_scale^2). "he": N(0, 2 / fan_in), He et al. 2015
    # ("Delving Deep into Rectifiers", Sec. 2.2): keeps the activations' variance constant
    # through ReLU layers, so deep nets train without tuning weight_scale.
    return math.sqrt(2.0 / fan_in) if init == "he" else float(weight_scale)


@functools.partial(jax.jit, static_argnames=("specs", "dtype"))
def _normals(key: jax.Array, *, specs: tuple, dtype) -> list[jax.Array]:
    """`[std * N(0, 1) of shape]` for each `(shape, std)` of `specs`, from one key.

    One draw of the total size, cut into the weights: a single small compiled program (on CPU,
    compiling the threefry generator once per weight shape took seconds).
    """
    sizes = [math.prod(shape) for shape, _ in specs]
    z = jax.random.normal(key, (sum(sizes),), dtype)
    out, start = [], 0
    for (shape, std), size in zip(specs, sizes):
        out.append(std * z[start:start + size].reshape(shape))
        start += size
    return out


def _zeros(n: int, dtype, value: float = 0.0) -> jax.Array:
    return jnp.asarray(np.full((n,), value, jnp.dtype(dtype)))  # numpy: no compilation


def _check_init(init: str, weight_scale: float) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "normal" and not weight_scale > 0:
        raise ValueError(f"weight_scale must be > 0 for init='normal', got {weight_scale}")


def weights_l2(params: Params, *, reg: float) -> jax.Array:
    """`0.5 * reg * sum(W ** 2)` over the leaves whose name starts with "W" (weights, filters)."""
    total = sum(jnp.sum(v * v) for k, v in sorted(params.items()) if k.startswith("W"))
    return 0.5 * reg * total


@jax.custom_vjp
def softmax_data_loss(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of `scores: [N, C]` for `labels: [N]` int, whose backward is
    the hand-derived `dscores` of `layers.softmax_loss` (not autodiff of its forward)."""
    return layers.softmax_loss(scores, labels)[0]


def _softmax_data_loss_fwd(scores, labels):
    loss, dscores = layers.softmax_loss(scores, labels)
    return loss, dscores


def _softmax_data_loss_bwd(dscores, g):
    return g * dscores, None  # labels are integers: no cotangent


softmax_data_loss.defvjp(_softmax_data_loss_fwd, _softmax_data_loss_bwd)


def accuracy_of(scores: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of rows of `scores: [N, C]` whose argmax is `y: [N]`."""
    return jnp.mean(jnp.argmax(scores, axis=-1) == y)


# ---------------------------------------------------------------------------------------------
# Two-layer net: affine - ReLU - affine - softmax, forward and backward written out


def init_two_layer(key: jax.Array, *, input_dim: int, hidden_dim: int, num_classes: int,
                   weight_scale: float = 1e-3, dtype=jnp.float32) -> Params:
    """The course's TwoLayerNet parameters: `W ~ N(0, weight_scale^2)`, `b = 0`.

    Returns {"W1": [D, H], "b1": [H], "W2": [H, C], "b2": [C]}.
    """
    if not weight_scale > 0:
        raise ValueError(f"weight_scale must be > 0, got {weight_scale}")
    w1, w2 = _normals(key, specs=(((input_dim, hidden_dim), float(weight_scale)),
                                  ((hidden_dim, num_classes), float(weight_scale))),
                      dtype=jnp.dtype(dtype))
    return {"W1": w1, "b1": _zeros(hidden_dim, dtype), "W2": w2, "b2": _zeros(num_classes, dtype)}


def two_layer_loss(params: Params, x: jax.Array, y: jax.Array | None = None, *,
                   reg: float = 0.0):
    """The two-layer net's scores, or its loss and gradients by an explicit backward pass.

    Args:
      params: from `init_two_layer`.
      x: [N, d1, ...] inputs (flattened to [N, D]).
      y: [N] int labels, or None.
      reg: L2 strength; the loss adds `0.5 * reg * (sum W1^2 + sum W2^2)`.

    Returns:
      scores [N, C] if `y` is None, else `(loss, grads)` with `grads` shaped like `params`.
    """
    w1, b1, w2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    x2 = _flatten(x)
    if x2.shape[1] != w1.shape[0]:
        raise ValueError(f"x has {x2.shape[1]} features per example (shape {x.shape}) but W1 is "
                         f"{w1.shape}")
    # Forward.
    pre = x2 @ w1 + b1[None, :]                        # [N, H]
    hidden = jnp.maximum(pre, 0)                       # [N, H]
    scores = hidden @ w2 + b2[None, :]                 # [N, C]
    if y is None:
        return scores
    _check_labels(x2, y)
    n = x2.shape[0]
    # Softmax loss, shifted by the row max so exp cannot overflow (the course's numeric note).
    shifted = scores - jnp.max(scores, axis=1, keepdims=True)
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))  # [N, C]
    data_loss = -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))
    loss = data_loss + 0.5 * reg * (jnp.sum(w1 * w1) + jnp.sum(w2 * w2))
    # Backward. dL/dscores = (softmax - onehot) / N (the mean over examples).
    onehot = jax.nn.one_hot(y, scores.shape[1], dtype=scores.dtype)
    dscores = (jnp.exp(log_probs) - onehot) / n        # [N, C]
    dw2 = hidden.T @ dscores + reg * w2                # [H, C]
    db2 = jnp.sum(dscores, axis=0)                     # [C]
    dhidden = dscores @ w2.T                           # [N, H]
    dpre = jnp.where(pre > 0, dhidden, 0)              # ReLU passes gradient where it was open
    dw1 = x2.T @ dpre + reg * w1                       # [D, H]
    db1 = jnp.sum(dpre, axis=0)                        # [H]
    return loss, {"W1": dw1, "b1": db1, "W2": dw2, "b2": db2}


# ---------------------------------------------------------------------------------------------
# Fully connected net: {affine - [norm] - ReLU - [dropout]} x (L - 1) - affine - softmax


def init_fc(key: jax.Array, *, input_dim: int, hidden_dims: Sequence[int], num_classes: int,
            normalization: str | None = None, weight_scale: float = 1e-2,
            init: str = "normal", dtype=jnp.float32) -> tuple[Params, dict[str, jax.Array]]:
    """Parameters and normalisation state of the course's FullyConnectedNet.

    Args:
      hidden_dims: widths of the L - 1 hidden layers.
      normalization: None, "batchnorm" or "layernorm" after each hidden affine layer.
      weight_scale, init: "normal" draws `W ~ N(0, weight_scale^2)` (the course); "he" draws
        `N(0, 2 / fan_in)`. Biases 0; gamma 1, beta 0.

    Returns:
      params {"W1": [D, H1], "b1": [H1], ("gamma1", "beta1": [H1]), ..., "WL": [H_{L-1}, C],
      "bL": [C]} and norm_state: for batchnorm {"running_mean1": zeros [H1], "running_var1":
      ones [H1], ...} (variance 1 rather than the course's 0, so an untrained net evaluates
      sensibly), else {}.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    _check_init(init, weight_scale)
    dims = [int(input_dim), *(int(h) for h in hidden_dims), int(num_classes)]
    weights = _normals(key, specs=tuple(
        ((dims[i - 1], dims[i]), _std(fan_in=dims[i - 1], init=init, weight_scale=weight_scale))
        for i in range(1, len(dims))), dtype=jnp.dtype(dtype))
    params, state = {}, {}
    for i in range(1, len(dims)):
        fan_out = dims[i]
        params[f"W{i}"] = weights[i - 1]
        params[f"b{i}"] = _zeros(fan_out, dtype)
        if normalization is not None and i < len(dims) - 1:
            params[f"gamma{i}"] = _zeros(fan_out, dtype, 1.0)
            params[f"beta{i}"] = _zeros(fan_out, dtype)
            if normalization == "batchnorm":
                state[f"running_mean{i}"] = _zeros(fan_out, dtype)
                state[f"running_var{i}"] = _zeros(fan_out, dtype, 1.0)
    return params, state


def _num_layers(params: Params) -> int:
    n = 0
    while f"W{n + 1}" in params:
        n += 1
    if n == 0:
        raise ValueError(f"params has no 'W1' (keys: {sorted(params)})")
    return n


def fc_forward(params: Params, norm_state: dict[str, jax.Array], x: jax.Array, *, train: bool,
               dropout_rate: float = 0.0, key: jax.Array | None = None,
               normalization: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scores of the fully connected net, from `jaxvision.layers`' custom-vjp layers.

    Args:
      params, norm_state: from `init_fc`.
      x: [N, d1, ...] (flattened to [N, D]).
      train: batch statistics (and updated running averages) and dropout on; else running
        averages and no dropout.
      dropout_rate: drop probability after each hidden ReLU (inverted dropout); 0 = none.
      key: PRNG key for dropout (needed when training with dropout_rate > 0); layer i uses
        `jax.random.split(key, L - 1)[i - 1]`.
      normalization: as given to `init_fc`.

    Returns:
      (scores [N, C], new_norm_state).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    use_dropout = train and dropout_rate > 0
    if use_dropout and key is None:
        raise ValueError("fc_forward needs a key when train=True and dropout_rate > 0")
    num_layers = _num_layers(params)
    if normalization is not None and "gamma1" not in params and num_layers > 1:
        raise ValueError(f"normalization={normalization!r} but params has no 'gamma1': were "
                         "they made by init_fc with the same normalization?")
    h = _flatten(x)
    if h.shape[1] != params["W1"].shape[0]:
        raise ValueError(f"x has {h.shape[1]} features per example (shape {x.shape}) but W1 is "
                         f"{params['W1'].shape}")
    keys = jax.random.split(key, max(num_layers - 1, 1)) if use_dropout else None
    new_state = dict(norm_state)
    for i in range(1, num_layers):
        h = layers.affine(h, params[f"W{i}"], params[f"b{i}"])
        if normalization == "batchnorm":
            h, (mean, var) = layers.batchnorm(
                h, params[f"gamma{i}"], params[f"beta{i}"],
                running_mean=norm_state[f"running_mean{i}"],
                running_var=norm_state[f"running_var{i}"], train=train)
            new_state[f"running_mean{i}"], new_state[f"running_var{i}"] = mean, var
        elif normalization == "layernorm":
            h = layers.layernorm(h, params[f"gamma{i}"], params[f"beta{i}"])
        h = layers.relu(h)
        if use_dropout:
            h = layers.dropout(h, key=keys[i - 1], rate=dropout_rate, train=True)
    scores = layers.affine(h, params[f"W{num_layers}"], params[f"b{num_layers}"])
    return scores, new_state


def fc_loss(params: Params, norm_state: dict[str, jax.Array], x: jax.Array, y: jax.Array, *,
            reg: float = 0.0, train: bool = True, dropout_rate: float = 0.0,
            key: jax.Array | None = None, normalization: str | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(softmax loss + `0.5 * reg * sum W^2`, new_norm_state): for `jax.value_and_grad(...,
    has_aux=True)`, whose gradient is then the chain of the layers' hand-written backwards."""
    scores, new_state = fc_forward(params, norm_state, x, train=train, dropout_rate=dropout_rate,
                                   key=key, normalization=normalization)
    _check_labels(scores, y)
    return softmax_data_loss(scores, y) + weights_l2(params, reg=reg), new_state


# ---------------------------------------------------------------------------------------------
# Three-layer ConvNet: conv - ReLU - 2x2 max pool - affine - ReLU - affine - softmax


def init_three_layer_convnet(key: jax.Array, *, input_shape: Sequence[int] = (32, 32, 3),
                             num_filters: int = 32, filter_size: int = 7, hidden_dim: int = 100,
                             num_classes: int = 10, weight_scale: float = 1e-3,
                             init: str = "normal", dtype=jnp.float32) -> Params:
    """The course's ThreeLayerConvNet parameters (assignment 2, `cnn.py`).

    The conv layer keeps the spatial size (stride 1, padding (filter_size - 1) // 2, odd
    filter_size) and the 2x2 pool halves it, so the affine layer sees
    `(H // 2) * (W // 2) * num_filters` features.

    Args:
      input_shape: (H, W, C) of one image (NHWC).
      weight_scale, init: as for `init_fc` (fan_in of the conv: filter_size^2 * C).

    Returns:
      {"W1": [k, k, C, F], "b1": [F], "W2": [(H//2)(W//2)F, hidden], "b2": [hidden],
       "W3": [hidden, classes], "b3": [classes]}.
    """
    _check_init(init, weight_scale)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
    if filter_size % 2 != 1:
        raise ValueError(f"filter_size must be odd (to keep the size), got {filter_size}")
    h, w, c = input_shape
    if h % 2 or w % 2:
        raise ValueError(f"input_shape's H and W must be even (2x2 pooling), got {input_shape}")
    flat = (h // 2) * (w // 2) * num_filters
    shapes = ((filter_size, filter_size, c, num_filters), (flat, hidden_dim),
              (hidden_dim, num_classes))
    fan_ins = (filter_size ** 2 * c, flat, hidden_dim)
    w1, w2, w3 = _normals(key, specs=tuple(
        (tuple(int(d) for d in shape), _std(fan_in=f, init=init, weight_scale=weight_scale))
        for shape, f in zip(shapes, fan_ins)), dtype=jnp.dtype(dtype))
    return {"W1": w1, "b1": _zeros(num_filters, dtype), "W2": w2, "b2": _zeros(hidden_dim, dtype),
            "W3": w3, "b3": _zeros(num_classes, dtype)}


def three_layer_convnet(params: Params, x: jax.Array, *, conv: str = "lax") -> jax.Array:
    """Scores [N, classes] of images `x: [N, H, W, C]`.

    conv: "lax" (`conv.conv_lax`, XLA's convolution: the fast default, autodiff backward) or
      "im2col" (`conv.conv_im2col`, the hand-written col2im backward). ReLU, max pool and the
      affine layers are the hand-derived custom-vjp layers in every case.
    """
    if conv not in CONVS:
        raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
    if x.ndim != 4 or x.shape[-1] != params["W1"].shape[2]:
        raise ValueError(f"x must be [N, H, W, {params['W1'].shape[2]}] (NHWC), got shape "
                         f"{x.shape}")
    conv_fn = conv_lib.conv_lax if conv == "lax" else conv_lib.conv_im2col
    pad = (params["W1"].shape[0] - 1) // 2
    h = conv_fn(x, params["W1"], params["b1"], stride=1, padding=pad)   # [N, H, W, F]
    h = conv_lib.max_pool(layers.relu(h), size=2, stride=2)              # [N, H/2, W/2, F]
    h = layers.relu(layers.affine(h, params["W2"], params["b2"]))        # [N, hidden]
    return layers.affine(h, params["W3"], params["b3"])                  # [N, classes]


def three_layer_convnet_loss(params: Params, x: jax.Array, y: jax.Array, *, reg: float = 0.0,
                             conv: str = "lax") -> jax.Array:
    """Softmax loss of `three_layer_convnet` plus `0.5 * reg * sum W^2` (for `jax.grad`)."""
    scores = three_layer_convnet(params, x, conv=conv)
    _check_labels(scores, y)
    return softmax_data_loss(scores, y) + weights_l2(params, reg=reg)


# ---------------------------------------------------------------------------------------------
# The Solver


def _optimizer(name: str, schedule, momentum: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(schedule)
    if name == "momentum":
        return optax.sgd(schedule, momentum=momentum)
    return optax.adam(schedule)


def _chunks(x, y, batch_size: int):
    """Host arrays x [N, ...], y [N] -> ([B, batch_size, ...], [B, batch_size], mask [B,
    batch_size]), zero-padded to whole chunks (one shape: one compilation; the mask drops the
    padding)."""
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[0]
    size = min(batch_size, n)
    num = -(-n // size)
    pad = num * size - n
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    mask = np.arange(num * size) < n
    return (jnp.asarray(x.reshape(num, size, *x.shape[1:])), jnp.asarray(y.reshape(num, size)),
            jnp.asarray(mask.reshape(num, size)))


def _make_counter(predict: Callable, preprocess: Callable | None) -> Callable:
    """A jitted `(params, state, xs, ys, masks) -> number correct`, mapping over the chunks."""
    def count(params, state, xs, ys, masks):
        def one(chunk):
            x, y, m = chunk
            if preprocess is not None:
                x = preprocess(x, key=None, train=False)
            scores = predict(params, state, x)
            return jnp.sum((jnp.argmax(scores, axis=-1) == y) & m)
        return jnp.sum(jax.lax.map(one, (xs, ys, masks)))  # chunk by chunk: bounded memory
    return jax.jit(count)


def evaluate_accuracy(predict: Callable, params, state, x, y, *, preprocess=None,
                      batch_size: int = 1000) -> float:
    """Accuracy of `predict(params, state, preprocess(x)) -> scores [N, C]` on `x`, `y`,
    computed in chunks of `batch_size` (`preprocess(x, key=None, train=False)` if given)."""
    xs, ys, masks = _chunks(x, y, batch_size)
    return int(_make_counter(predict, preprocess)(params, state, xs, ys, masks)) / len(y)


def train(loss_and_grads: Callable, predict: Callable, params: PyTree, *, state: PyTree = None,
          x_train, y_train, x_val, y_val, preprocess: Callable | None = None,
          optimizer: str = "adam", lr: float = 1e-3, lr_decay: float = 1.0,
          momentum: float = 0.9, epochs: int = 10, batch_size: int = 100, seed: int = 0,
          num_train_eval: int = 1000, eval_batch_size: int = 1000, log_every: int = 50,
          log: Callable[[int, dict], None] | None = None, progress: bool | None = None,
          verbose: bool = True) -> tuple[PyTree, PyTree, dict]:
    """The course's Solver: minibatch training with per-epoch accuracies; keeps the best params.

    Args:
      loss_and_grads: `(params, state, x, y, key) -> (loss, grads, new_state)` on a minibatch
        (e.g. `two_layer_loss`'s explicit gradients, or `jax.value_and_grad` of `fc_loss`);
        `state` is any non-trained pytree (batch norm's running averages), `key` a fresh PRNG key
        per step (dropout).
      predict: `(params, state, x) -> scores [N, C]` in test mode.
      params: the initial parameters.
      state: the initial non-trained state (None: {}).
      x_train, y_train, x_val, y_val: arrays [N, ...] and [N] int. The training set goes to the
        device once; batches are gathered inside the jitted step.
      preprocess: `(x, *, key, train) -> x`, applied to every batch inside jit (normalisation,
        random flips at train time with the given key; key is None at test time).
      optimizer: "sgd", "momentum" (`optax.sgd(momentum=...)`) or "adam" (`optax.adam`).
      lr, lr_decay: the learning rate is `lr * lr_decay ** epoch` (the Solver's decay after each
        epoch; a staircase `optax.exponential_decay`).
      epochs, batch_size: each epoch visits `N // batch_size` batches of a fresh permutation
        of the training set, drawn from `seed` (the remainder is left out that epoch).
      num_train_eval: size of the fixed random subset of the training set whose accuracy is
        reported each epoch (the Solver's `num_train_samples`).
      eval_batch_size: chunk size of the accuracy evaluations.
      log_every: steps per logged train-loss point.
      log: `(step, values) -> None`, called with {"train/loss": mean of the last `log_every`
        steps} and, after each epoch, {"epoch", "train/accuracy", "val/accuracy", "lr"} (e.g.
        `MetricWriter.write`).
      progress: tqdm bar (None: only on a terminal); verbose: a line per epoch.

    Returns:
      (best_params, best_state, history) where history has "loss" (every step), "steps"
      (cumulative step at each epoch end), "train_acc", "val_acc" (per epoch),
      "best_val_acc", "best_epoch", "time_s", "num_examples" (the training set's size).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    x_np, y_np = np.asarray(x_train), np.asarray(y_train)
    n = x_np.shape[0]
    if y_np.shape != (n,) or np.shape(y_val) != (np.shape(x_val)[0],):
        raise ValueError(f"labels must be [N]: x_train {x_np.shape}, y_train {y_np.shape}, "
                         f"x_val {np.shape(x_val)}, y_val {np.shape(y_val)}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got "
                         f"{batch_size}")
    state = {} if state is None else state
    steps_per_epoch = n // batch_size
    schedule = optax.exponential_decay(lr, transition_steps=steps_per_epoch,
                                       decay_rate=lr_decay, staircase=True)
    tx = _optimizer(optimizer, schedule, momentum)
    opt_state = tx.init(params)

    def step(params, opt_state, state, x_all, y_all, perm, epoch, b, key):
        # perm: [steps_per_epoch, batch_size] indices of this epoch; b: the batch number.
        idx = perm[b]
        k_pre, k_loss = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, epoch), b))
        xb, yb = x_all[idx], y_all[idx]
        if preprocess is not None:
            xb = preprocess(xb, key=k_pre, train=True)
        loss, grads, state = loss_and_grads(params, state, xb, yb, k_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    step = jax.jit(step)
    count = _make_counter(predict, preprocess)
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.permutation(n)[:min(num_train_eval, n)])
    eval_sets = {"train": _chunks(x_np[sub], y_np[sub], eval_batch_size),
                 "val": _chunks(x_val, y_val, eval_batch_size)}
    eval_sizes = {"train": len(sub), "val": len(y_val)}
    x_dev, y_dev = jnp.asarray(x_np), jnp.asarray(y_np)
    key = jax.random.key(seed)
    history = {"loss": [], "steps": [], "train_acc": [], "val_acc": []}
    best = (-1.0, params, state, 0)
    t0 = time.time()
    disable = True if progress is False else (False if progress else None)
    bar = tqdm(total=epochs * steps_per_epoch, disable=disable, unit="step", dynamic_ncols=True)
    global_step = 0
    for epoch in range(1, epochs + 1):
        perm = jnp.asarray(rng.permutation(n)[:steps_per_epoch * batch_size].reshape(
            steps_per_epoch, batch_size).astype(np.int32))
        losses = []
        for b in range(steps_per_epoch):
            params, opt_state, state, loss = step(params, opt_state, state, x_dev, y_dev,
                                                  perm, epoch, b, key)
            losses.append(loss)
            bar.update(1)
        losses = np.asarray(jax.device_get(losses), np.float64)  # one host sync per epoch
        if not np.all(np.isfinite(losses)):
            bad = int(np.flatnonzero(~np.isfinite(losses))[0])
            raise FloatingPointError(f"non-finite loss at step {global_step + bad + 1} "
                                     f"(epoch {epoch}): lower lr or check the inputs")
        if log is not None:
            for s in range(0, steps_per_epoch, log_every):
                chunk = losses[s:s + log_every]
                log(global_step + s + len(chunk), {"train/loss": float(chunk.mean())})
        global_step += steps_per_epoch
        history["loss"] += losses.tolist()
        acc = {name: int(count(params, state, *eval_sets[name])) / eval_sizes[name]
               for name in ("train", "val")}
        history["steps"].append(global_step)
        history["train_acc"].append(acc["train"])
        history["val_acc"].append(acc["val"])
        current_lr = lr * lr_decay ** (epoch - 1)  # = schedule(global_step - 1), on the host
        if log is not None:
            log(global_step, {"epoch": epoch, "train/accuracy": acc["train"],
                              "val/accuracy": acc["val"], "lr": current_lr})
        if acc["val"] > best[0]:
            best = (acc["val"], params, state, epoch)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{acc['val']:.3f}")
        if verbose:
            tqdm.write(f"epoch {epoch}/{epochs}: loss {losses.mean():.4f}, train acc "
                       f"{acc['train']:.4f}, val acc {acc['val']:.4f}, lr {current_lr:.2e}")
    bar.close()
    history.update(best_val_acc=best[0], best_epoch=best[3], time_s=time.time() - t0,
                   num_examples=n)
    return best[1], best[2], history


def plot_history(path: str, history: dict, *, title: str = "",
                 overfit: dict | None = None) -> None:
    """Saves the Solver's curves as a PNG: the loss per step, train and val accuracy per epoch,
    and (if given) the train accuracy of a small overfitting run (the course's sanity check)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = 3 if overfit is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(np.arange(1, len(history["loss"]) + 1), history["loss"], lw=0.5, alpha=0.6)
    # Log scale: the first steps' loss can be many times the rest (e.g. He init + Adam).
    ax_loss.set(xlabel="step", ylabel="training loss (minibatch)", title="loss", yscale="log")
    epochs = np.arange(1, len(history["val_acc"]) + 1)
    ax_acc.plot(epochs, history["train_acc"], "o-", label="train (fixed subset)")
    ax_acc.plot(epochs, history["val_acc"], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    if overfit is not None:
        ax = axes[2]
        ax.plot(np.arange(1, len(overfit["train_acc"]) + 1), overfit["train_acc"], "o-",
                ms=3, label="train accuracy")
        ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.05),
               title=f"sanity: overfitting {overfit.get('num_examples', 'few')} examples")
        ax2 = ax.twinx()
        steps = np.arange(1, len(overfit["loss"]) + 1) * len(overfit["train_acc"]) / max(
            len(overfit["loss"]), 1)
        ax2.plot(steps, overfit["loss"], color="C1", lw=0.8, label="loss")
        ax2.set(ylabel="loss")
        ax.legend(loc="center right")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
