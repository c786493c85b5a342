"""Learning-rate schedules and optimizers, built explicitly from config values.

An experiment calls `make_schedule(...)` and `make_optimizer(...)` with the numbers from its
config; there is no registry and no hidden default beyond the keyword defaults shown here.

`make_optimizer` returns a single optax chain whose stages read in the order they are applied:

    clip  ->  coupled L2 decay  ->  base rule  ->  decoupled decay  ->  -learning_rate

Conventions (those of optax, so hand computations in tests match optax's own optimizers):
  * momentum keeps `v <- g + mu * v` and steps `-lr * v` (no dampening, as PyTorch's SGD);
  * nesterov steps `-lr * (g + mu * v)` with the updated `v` (Sutskever et al. 2013 form);
  * adamw's decoupled decay is multiplied by the learning rate: `p <- p - lr * (adam + wd * p)`,
    as in optax.adamw and torch.optim.AdamW (Loshchilov & Hutter 2019 scale it by the schedule).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax

PyTree = Any

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def make_schedule(
    *,
    kind: str,
    lr: float,
    steps: int,
    warmup_steps: int = 0,
    boundaries: Sequence[int] = (),
    decay_factor: float = 0.1,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """A learning-rate schedule `step -> lr`, with an optional linear warmup.

    Args:
      kind: "constant"; "step" (multiply by `decay_factor` at each of `boundaries`); or "cosine"
        (half-cosine from `lr` down to `lr * end_lr_factor` over `steps - warmup_steps` steps,
        Loshchilov & Hutter 2017 without restarts; constant afterwards).
      lr: the peak learning rate.
      steps: total number of training steps (used by "cosine").
      warmup_steps: if > 0, the rate rises linearly from 0 at step 0 to `lr` at `warmup_steps`
        (Goyal et al. 2017, "gradual warmup"), and the schedule above starts there.
      boundaries: for "step", absolute step numbers (counted from 0, warmup included); the
        rate is multiplied by `decay_factor` from each boundary on. Must be >= `warmup_steps`.
      decay_factor: multiplier applied at each boundary for "step".
      end_lr_factor: final rate of "cosine", as a fraction of `lr`.

    Returns:
      an `optax.Schedule`.

    Raises:
      ValueError: unknown `kind`, or inconsistent steps/boundaries.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule kind {kind!r}; expected one of {SCHEDULES}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")

    # The main schedule is written as a function of the steps since warmup ended, because
    # optax.join_schedules calls each later schedule with `step - boundary`.
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "step":
        early = [b for b in boundaries if b < warmup_steps]
        if early:
            raise ValueError(
                f"Step boundaries {early} fall inside the warmup (warmup_steps={warmup_steps})."
            )
        # piecewise_constant_schedule multiplies the running value by the scale from step b on;
        # a dict would merge repeated boundaries, so repeat the scale instead (b twice = two
        # decays at b).
        scales: dict[int, float] = {}
        for b in boundaries:
            scales[b - warmup_steps] = scales.get(b - warmup_steps, 1.0) * decay_factor
        main = optax.piecewise_constant_schedule(lr, scales)
    else:  # "cosine"
        if steps <= warmup_steps:
            raise ValueError(
                f"Cosine schedule needs steps > warmup_steps, got steps={steps}, "
                f"warmup_steps={warmup_steps}."
            )
        main = optax.cosine_decay_schedule(
            lr, decay_steps=steps - warmup_steps, alpha=end_lr_factor
        )

    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def default_decay_mask(params: PyTree) -> PyTree:
    """True for the leaves that weight decay should touch: those with `ndim > 1`.

    Weight matrices and conv kernels (ndim >= 2) are decayed; biases and BatchNorm scales and
    offsets (ndim <= 1) are not. Decaying those does not limit the capacity of the net (a BN
    scale is undone by the next layer's weights) and tends to hurt: Goyal et al. 2017, "Accurate,
    Large Minibatch SGD", and the no-weight-decay lists of timm / big_vision leave them out.

    Args:
      params: a pytree of arrays (or of `jax.ShapeDtypeStruct`).

    Returns:
      a pytree of Python bools with the structure of `params`.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_rule(
    name: str, *, momentum: float, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    # The direction of the step before scaling by -learning_rate.
    if name == "sgd":
        return optax.identity()
    if name in ("momentum", "nesterov"):
        return optax.trace(decay=momentum, nesterov=name == "nesterov")
    # "adam" and "adamw" share the moment estimates; they differ only in where decay enters.
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)


def make_optimizer(
    *,
    name: str,
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: PyTree | Callable[[PyTree], PyTree] | None = default_decay_mask,
    grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """One optax chain: clip, coupled decay, base rule, decoupled decay, learning rate.

    Args:
      name: "sgd", "momentum", "nesterov", "adam" or "adamw".
      learning_rate: a float or an `optax.Schedule` (e.g. from `make_schedule`).
      momentum: `mu` for "momentum" and "nesterov".
      b1, b2, eps: Adam's moment decay rates and denominator epsilon (Kingma & Ba 2015).
      weight_decay: for "sgd"/"momentum"/"nesterov"/"adam", the coefficient `lam` of the coupled
        L2 term: `lam * p` is added to the gradient before the base rule, i.e. the gradient of
        `lam * l2_penalty(params)`. For "adamw", the decoupled decay `lr * lam * p` added after
        Adam's normalisation (Loshchilov & Hutter 2019), so it is not divided by sqrt(v).
      decay_mask: which leaves are decayed: a pytree of bools, a callable `params -> bools`, or
        None for every leaf. Default: `default_decay_mask` (ndim > 1 only).
      grad_clip_norm: if set, gradients are rescaled so that their global L2 norm is at most
        this (Pascanu et al. 2013), before anything else sees them.

    Returns:
      an `optax.GradientTransformation`; its updates are to be added to the params
      (`optax.apply_updates`).

    Raises:
      ValueError: unknown `name`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer name {name!r}; expected one of {OPTIMIZERS}.")
    decay = weight_decay != 0.0
    coupled_decay = decay and name != "adamw"
    decoupled_decay = decay and name == "adamw"

    stages = []
    if grad_clip_norm is not None:
        # Clip the raw gradient of the loss, before decay or momentum change its norm.
        stages.append(optax.clip_by_global_norm(grad_clip_norm))
    if coupled_decay:
        # Classic weight decay = L2 regularisation: g <- g + lam * p, then momentum/Adam see it
        # (for Adam this is the "L2" variant that AdamW was introduced to replace).
        stages.append(optax.add_decayed_weights(weight_decay, decay_mask))
    stages.append(_base_rule(name, momentum=momentum, b1=b1, b2=b2, eps=eps))
    if decoupled_decay:
        # AdamW: the decay bypasses Adam's per-coordinate scaling (same stage order as
        # optax.adamw, so the result equals optax.adamw(..., weight_decay, mask)).
        stages.append(optax.add_decayed_weights(weight_decay, decay_mask))
    # Last: multiply by -learning_rate (a schedule keeps its own step count in the state).
    stages.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*stages)


def frozen(
    tx: optax.GradientTransformation,
    trainable_mask: PyTree | Callable[[PyTree], PyTree],
) -> optax.GradientTransformation:
    """Apply `tx` to the trainable leaves and a zero update to the others (transfer learning).

    The frozen leaves get `optax.set_to_zero()`, so they keep their values exactly, receive no
    weight decay, and `tx` allocates no state (e.g. Adam moments) for them.

    Args:
      tx: the optimizer for the trainable leaves, e.g. from `make_optimizer`.
      trainable_mask: a pytree of Python bools with the structure of the params (True =
        trainable), or a callable `params -> such a pytree`.

    Returns:
      an `optax.GradientTransformation` over the full parameter tree.
    """

    def labels(params: PyTree) -> PyTree:
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        return jax.tree.map(lambda t: "trainable" if t else "frozen", mask)

    # optax.partition is the current name of optax.multi_transform (kept there only "for
    # backwards compatibility", optax/__init__.py).
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, param_labels=labels)
