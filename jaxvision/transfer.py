"""Transfer learning: freeze parameters by path, a learning rate per group, fine-tune the last k
stages, and linear classifiers on features saved to disk (CS231n, "Transfer Learning").

    tx = transfer.freeze(optim.make_optimizer(...), trainable=("^stage_3_", "^head/"))
    tx = transfer.multi_lr({"body": optim.make_optimizer(name="momentum", learning_rate=1e-3),
                            "head": optim.make_optimizer(name="momentum", learning_rate=1e-1)},
                           rules=[("^head/", "head")], default="body")
    mask = transfer.last_stages_trainable(params, k=1)   # last stage + head
    transfer.extract_features(model, state, images, preprocess, labels=labels, batch_size=500,
                              path="features.npz")
    w, accuracy = transfer.train_linear_on_features(*transfer.load_features("features.npz"))

Paths are the '/'-joined keys of a leaf in the params tree, e.g. "stage_3_block_1/conv_1/kernel"
or "head/bias" for `jaxvision.nets.resnet`; rules are Python regexes matched with `re.search`
(anywhere in the path: anchor with "^" and "$" to be strict).

Frozen leaves get `optax.set_to_zero()` through `optax.partition` (the current name of
`optax.multi_transform`): their update is exactly 0, so they stay bitwise equal, receive no
weight decay (the decay lives inside the trainable group's chain), and the inner optimizer holds
no state (momentum, Adam moments) for them.

BatchNorm and frozen layers. Freezing a conv's weights does not freeze the BatchNorm after it: in
training mode BN normalises with the statistics of the current batch and keeps updating its
running averages. Our choice (`inference_mode`, used by `experiments/transfer_learning.py` when
fine-tuning a pre-trained net): run the WHOLE net in inference mode while fine-tuning, so every
BN uses the running statistics of pre-training and never updates them; the BN scales and offsets
of trainable stages are still learnt. Why: (1) a frozen stage then computes exactly the function
that was pre-trained (and that the features of the linear classifier came from); (2) with 10
labelled images a class, batch statistics are noisy and a batch of 50 re-estimating 64 channel
means would drift the running averages away from what the frozen weights expect; (3) it is the
usual practice (Keras' transfer-learning guide keeps BN layers in inference mode when the base
is unfrozen; detectron2's FrozenBatchNorm for fine-tuned backbones). The cost: the trainable
stage cannot adapt its normalisation to the new classes' statistics; training from scratch uses
ordinary training-mode BN. jaxvision's ResNet has one `train` flag for the whole net, so
per-stage modes (frozen stages in inference, the last in training) would need a change there.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

PyTree = Any
Rules = Sequence[tuple[str, str]]

# ---- Paths and labels ------------------------------------------------------------------------


def key_path(path: tuple) -> str:
    """'/'-joined names of a `jax.tree_util` key path: dict keys, attribute names, indices."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_paths(params: PyTree) -> list[str]:
    """The '/'-joined path of every leaf, in `jax.tree.leaves` order."""
    return [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def path_labels(params: PyTree, rules: Rules, *, default: str | None = None) -> PyTree:
    """Labels every leaf of `params` by the FIRST rule whose regex matches its path.

    Args:
      params: a pytree of arrays (or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).
      rules: ordered `(regex, label)` pairs; the regex is applied with `re.search` to the leaf's
        '/'-joined path (e.g. "stage_3_block_1/bn_1/scale").
      default: the label of leaves that no rule matches; None makes such a leaf an error.

    Returns:
      a pytree of str with the structure of `params` (what `optax.partition` expects).

    Raises:
      ValueError: a rule matches no leaf at all (a typo would otherwise silently freeze or
        unfreeze nothing), listing the patterns that matched nothing and a few paths; or
        `default` is None and a leaf is matched by no rule.
    """
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"rules must be (regex, label) pairs, got {rule!r}")
        compiled.append((re.compile(rule[0]), rule[1]))
    used = [False] * len(compiled)
    unmatched: list[str] = []

    def label(path, _):
        name = key_path(path)
        for i, (regex, lab) in enumerate(compiled):
            if regex.search(name):
                used[i] = True
                return lab
        if default is None:
            unmatched.append(name)
        return default

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        paths = leaf_paths(params)
        raise ValueError(
            f"path rules {unused} match no parameter (typo?); the {len(paths)} paths look like "
            f"{paths[:4]} ... {paths[-2:]}")
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} parameters match none of the rules {[r for r, _ in rules]} and "
            f"there is no default label, e.g. {unmatched[:4]}")
    return labels


def trainable_mask(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """True for the leaves whose path matches one of the regexes `patterns` (each must match
    something), False elsewhere."""
    if isinstance(patterns, str):
        raise ValueError(f"patterns must be a sequence of regexes, got the string {patterns!r}")
    labels = path_labels(params, [(p, "trainable") for p in patterns], default="frozen")
    return jax.tree.map(lambda lab: lab == "trainable", labels)


# ---- Optimizers over groups ------------------------------------------------------------------


def freeze(tx: optax.GradientTransformation,
           trainable: Sequence[str] | PyTree | Callable[[PyTree], PyTree]
           ) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, an exact zero update (`optax.set_to_zero`) on the others.

    Args:
      tx: the optimizer of the trainable leaves (e.g. `optim.make_optimizer(...)`, weight decay
        included: frozen leaves are not decayed).
      trainable: regexes of trainable paths (a list/tuple of str; each must match a leaf), or a
        pytree of bools with the params' structure (True = trainable), or a callable
        `params -> such a pytree` (e.g. `functools.partial(last_stages_trainable, k=1)`).

    Returns:
      an `optax.GradientTransformation` over the whole params tree; the labels are computed
      from the tree given to `init` (and at trace time of `update`), so no params are needed here.
    """
    def labels(params):
        if callable(trainable):
            mask = trainable(params)
        elif isinstance(trainable, (list, tuple)) and all(isinstance(p, str) for p in trainable):
            mask = trainable_mask(params, trainable)
        else:
            mask = trainable
        return jax.tree.map(lambda t: "trainable" if t else "frozen", mask)

    # optax.partition is the current name of optax.multi_transform.
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()},
                           param_labels=labels)


def multi_lr(groups: Mapping[str, optax.GradientTransformation | None], rules: Rules, *,
             default: str | None = None) -> optax.GradientTransformation:
    """One optimizer per group of parameters, e.g. a small learning rate for a pre-trained body
    and a large one for a new head ("discriminative fine-tuning", Howard & Ruder 2018).

    Args:
      groups: label -> optimizer; None freezes the group (`optax.set_to_zero`).
      rules: ordered `(regex, label)` pairs, as `path_labels` (the first match wins).
      default: the label of leaves no rule matches.

    Raises:
      ValueError (at `init`): a label with no optimizer in `groups`, or a rule that matches
      nothing (`path_labels`).
    """
    txs = {lab: optax.set_to_zero() if t is None else t for lab, t in groups.items()}
    wanted = {lab for _, lab in rules} | ({default} if default is not None else set())
    missing = sorted(wanted - set(txs))
    if missing:
        raise ValueError(f"labels {missing} of the rules have no optimizer in groups "
                         f"(groups: {sorted(txs)})")

    def labels(params):
        return path_labels(params, rules, default=default)

    return optax.partition(txs, param_labels=labels)


# ---- Fine-tuning the last stages -------------------------------------------------------------

_STAGE = re.compile(r"^(stage_(\d+))_")


def resnet_stages(params: PyTree) -> list[str]:
    """The stage prefixes of a `jaxvision.nets.resnet.ResNet` params tree, in order: its
    top-level modules are stem_conv, stem_bn, stage_{i}_block_{j}, (final_bn,) head."""
    found = {}
    for name in params:
        m = _STAGE.match(name)
        if m:
            found[int(m.group(2))] = m.group(1) + "_"
    if not found:
        raise ValueError(f"no 'stage_<i>_...' modules at the top of the params tree: "
                         f"{sorted(params)}")
    return [found[i] for i in sorted(found)]


def last_stages_trainable(params: PyTree, k: int, *, stage_prefixes: Sequence[str] | None = None,
                          head: Sequence[str] = ("head", "final_bn")) -> PyTree:
    """Trainable mask (bools) for fine-tuning the last `k` stages of a ResNet; the head is always
    trainable, everything before the last `k` stages (stem included) is frozen.

    Args:
      params: the params tree (a dict of top-level modules; arrays or ShapeDtypeStructs).
      k: number of stages to fine-tune, 0 (head only: a linear probe) to the number of stages.
      stage_prefixes: the stages' top-level name prefixes in order; default: derived from the
        tree (`resnet_stages`: "stage_1_", "stage_2_", ...).
      head: top-level modules that are always trainable when present: the classifier, and a
        pre-activation net's final BN, which normalises the last stage's output for the head.
    """
    stages = list(stage_prefixes) if stage_prefixes is not None else resnet_stages(params)
    if not 0 <= k <= len(stages):
        raise ValueError(f"k must be in [0, {len(stages)}] (the number of stages {stages}), "
                         f"got {k}")
    train_prefixes = stages[len(stages) - k:] if k else []

    def trainable(path, _):
        top = key_path(path[:1])
        return top in head or any(top.startswith(p) for p in train_prefixes)

    mask = jax.tree_util.tree_map_with_path(trainable, params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"no trainable parameter: none of {list(head)} is in {sorted(params)}")
    return mask


class inference_mode:  # noqa: N801 (reads as a function that wraps a model)
    """`model` with `train=False` forced in `apply`: BatchNorm uses and keeps its running
    statistics, dropout is off, while gradients still flow to every parameter (see the module
    docstring, "BatchNorm and frozen layers").

    Pass it as the `model` of `train.make_classifier_step` to fine-tune with frozen BN statistics.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def apply(self, variables, *args, train: bool = False, **kwargs):
        del train
        return self.model.apply(variables, *args, train=False, **kwargs)


# ---- Features on disk and a linear classifier on them ----------------------------------------


def extract_features(model: nn.Module, state: dict, images: np.ndarray, preprocess: Callable,
                     *, labels: np.ndarray, batch_size: int, path: str | os.PathLike,
                     key: str = "features", progress: bool | None = None) -> np.ndarray:
    """Runs the net in inference mode over `images` and saves `acts[key]` with the labels.

    Args:
      model: a net returning `(logits, acts)` (every jaxvision net), `acts[key]` `[B, D]`.
      state: a train state (`params`, `batch_stats`).
      images: uint8 `[N, H, W, C]`; labels: int `[N]`.
      preprocess: `(images, *, key, train) -> float images`, called with `train=False`.
      batch_size: images per call; the last batch is zero-padded to the same shape, so the
        jitted function compiles once.
      path: the `.npz` to write (`features` float32 `[N, D]`, `labels` int64 `[N]`).

    Returns:
      the features, float32 `[N, D]`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or len(labels) != len(images) or labels.ndim != 1:
        raise ValueError(f"images [N, H, W, C] and labels [N] expected, got {images.shape} and "
                         f"{labels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_stats = state.get("batch_stats") or {}
    variables = {"params": state["params"], **({"batch_stats": batch_stats} if batch_stats else {})}

    @jax.jit
    def features_of(variables, x):
        _, acts = model.apply(variables, preprocess(x, key=None, train=False), train=False)
        return acts[key].astype(jnp.float32)

    n = len(images)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="features", unit="batch",
                      disable=None if progress is None else not progress):
        x = images[start:start + batch_size]
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        out.append(np.asarray(features_of(variables, x))[:batch_size - pad])
    feats = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    if feats.ndim != 2:
        raise ValueError(f"acts[{key!r}] must be [B, D], got shape {feats.shape[1:]} per batch")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, features=feats, labels=labels.astype(np.int64))
    return feats


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, D], labels int64 [N]) from an `extract_features` file."""
    with np.load(path) as f:
        return f["features"], f["labels"]


def train_linear_on_features(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                             l2: float = 1e-4, lr: float = 1e-2, steps: int = 500,
                             batch_size: int | None = None, seed: int = 0
                             ) -> tuple[dict, Callable[[np.ndarray, np.ndarray], float]]:
    """Softmax regression on fixed features (the "CNN as a feature extractor" regime).

    Features are standardised with the training set's mean and std (the scale of pooled ReLU
    features varies by orders of magnitude between channels; standardising makes one learning
    rate fit all), then `W [D, K], b [K]` minimise the mean cross-entropy + `l2 * ||W||^2`
    with Adam for `steps` steps, full batch (batch_size None) or minibatches drawn with
    replacement from `seed`. All steps run in one jitted `lax.scan`.

    Returns:
      (weights {"w", "b", "mean", "std"}, accuracy(features [M, D], labels [M]) -> float).
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"features [N, D] and labels [N] expected, got {x.shape} and {y.shape}")
    if len(x) == 0 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}) and N > 0, got N={len(x)}")
    mean = x.mean(0)
    std = x.std(0) + 1e-6
    xs = jnp.asarray((x - mean) / std)
    ys = jnp.asarray(y, jnp.int32)
    n, d = x.shape
    opt = optax.adam(lr)

    def loss(w, xb, yb):
        logits = xb @ w["w"] + w["b"][None, :]  # [B, K]
        return (optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
                + l2 * jnp.sum(w["w"] ** 2))

    @jax.jit
    def fit(xs, ys, key):
        w = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}

        def step(carry, k):
            w, s = carry
            if batch_size is None:
                xb, yb = xs, ys
            else:
                idx = jax.random.randint(k, (batch_size,), 0, n)
                xb, yb = xs[idx], ys[idx]
            g = jax.grad(loss)(w, xb, yb)
            u, s = opt.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        keys = jax.random.split(key, steps)
        (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), keys)
        return w

    w = jax.device_get(fit(xs, ys, jax.random.PRNGKey(seed)))
    weights = {"w": np.asarray(w["w"]), "b": np.asarray(w["b"]), "mean": mean, "std": std}

    def accuracy(features: np.ndarray, labels: np.ndarray) -> float:
        logits = ((np.asarray(features, np.float32) - mean) / std) @ weights["w"] + weights["b"]
        return float(np.mean(logits.argmax(-1) == np.asarray(labels)))

    return weights, accuracy
