"""Exponential moving average (EMA) of the parameters: pure functions, no optax.

Evaluating with a running average of the weights instead of the last iterate smooths out the
noise of the final SGD steps (Polyak & Juditsky 1992 averaging; CS231n "Neural Networks 3",
model ensembles, notes that such a smoothed copy of the weights usually validates a little
better than the weights themselves). The recurrence, for the parameters `p_t` after step t:

    ema_{t+1} = d_t * ema_t + (1 - d_t) * p_{t+1}

Decay warmup (`step` given): `d_t = min(decay, (1 + t) / (10 + t))`, TensorFlow's
`tf.train.ExponentialMovingAverage(decay, num_updates=t)`: early on the average forgets fast
(d_0 = 0.1), so it is not anchored to the random initialisation for ~1/(1 - decay) steps.

Debiasing (the alternative, Kingma & Ba 2015 "Adam", section 3): start from zeros
(`ema_init(params, zeros=True)`) with a constant decay and divide by `1 - decay ** t`
(`ema_debiased`). With the default start (a copy of the parameters) there is no bias toward zero
and nothing to correct; warmup then plays the same role as debiasing, and the two should not be
combined (`ema_debiased` assumes a constant decay).

In the train loop, with the state dict of `jaxvision.train`:

    state = add_ema(state)                           # state["ema"]: a copy of the params
    step = with_ema(train.make_classifier_step(...), decay=0.999)   # then jit as usual
    ...
    train.evaluate(eval_step, with_ema_params(state), batches)      # evaluate the average

`state["ema"]` is saved and restored by `jaxvision.checkpoint` with the rest of the state (create
the `like` state with `add_ema` too). BatchNorm's `batch_stats` are already running averages and
are used as they are; strictly they belong to the live weights (timm's ModelEmaV2 also averages
them), which matters little at decay <= 0.999 since both move slowly at the end of training.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
State = dict[str, Any]


def ema_init(params: PyTree, *, zeros: bool = False) -> PyTree:
    """The initial average: a copy of `params` (default), or zeros for the debiased variant.

    Inexact leaves are kept in their dtype but at least float32: a bfloat16 average cannot
    absorb updates of relative size (1 - decay) = 1e-3 (bfloat16 has 8 mantissa bits).
    """
    def init(p):
        dtype = jnp.promote_types(jnp.result_type(p), jnp.float32)
        return jnp.zeros(jnp.shape(p), dtype) if zeros else jnp.asarray(p, dtype)

    return jax.tree.map(init, params)


def ema_decay(decay: float, step: jax.Array | int | None = None) -> jax.Array:
    """The decay used at update `step` (0-based): `decay`, or with warmup
    `min(decay, (1 + step) / (10 + step))` (TensorFlow's `num_updates` trick)."""
    # The default float dtype: float32, or float64 under `jax.enable_x64` (exact checks).
    dtype = jnp.result_type(float)
    decay = jnp.asarray(decay, dtype)
    if step is None:
        return decay
    step = jnp.asarray(step, dtype)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: PyTree, params: PyTree, *, decay: float,
               step: jax.Array | int | None = None) -> PyTree:
    """One EMA step: `ema <- d * ema + (1 - d) * params`, `d = ema_decay(decay, step)`.

    decay: in [0, 1]; 0 returns `params` (cast to the average's dtype), 1 freezes the average.
    step: the update count (the train state's "step" before the update) for the warmup; None for
      a constant decay. Jittable (`step` may be traced).
    Raises ValueError when the trees differ in structure.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if jax.tree.structure(ema) != jax.tree.structure(params):
        raise ValueError("ema and params differ in tree structure: "
                         f"{jax.tree.structure(ema)} vs {jax.tree.structure(params)}")
    d = ema_decay(decay, step)

    def update(e, p):
        e_dtype = jnp.result_type(e)
        d_e = d.astype(e_dtype)
        # d e + (1 - d) p rather than TF's e - (1 - d)(e - p): exact at both ends (d = 0 gives
        # p bit for bit, d = 1 gives e), where the difference form rounds e + (p - e).
        return (d_e * e + (1.0 - d_e) * jnp.asarray(p, e_dtype)).astype(e_dtype)

    return jax.tree.map(update, ema, params)


def ema_debiased(ema: PyTree, *, decay: float, num_updates: jax.Array | int) -> PyTree:
    """Bias correction of a zero-initialised average after `num_updates` constant-decay updates:
    `ema / (1 - decay ** num_updates)` (Adam's correction). Exact only for `ema_init(...,
    zeros=True)` and `ema_update(..., step=None)`; num_updates must be >= 1."""
    dtype = jnp.result_type(float)
    correction = 1.0 - jnp.asarray(decay, dtype) ** jnp.asarray(num_updates, dtype)
    return jax.tree.map(lambda e: e / correction.astype(jnp.result_type(e)), ema)


def add_ema(state: State, *, zeros: bool = False) -> State:
    """`state` with `state["ema"] = ema_init(state["params"])`. Call it under the same jit as
    (or after) `train.create_train_state`: jnp copies keep each leaf's sharding."""
    return {**state, "ema": ema_init(state["params"], zeros=zeros)}


def with_ema(step_fn: Callable, *, decay: float, warmup: bool = True) -> Callable:
    """Wraps a train step `step_fn(state, batch) -> (state, metrics)` (e.g.
    `train.make_classifier_step`) so it also updates `state["ema"]` with the new params.

    The inner step sees the state without "ema" (it rebuilds its own dict); the average is
    updated after it with the warmup step count `state["step"]` (the update's 0-based index).
    """
    def step(state: State, batch):
        if "ema" not in state:
            raise ValueError("the state has no 'ema': create it with ema.add_ema(state)")
        inner = {k: v for k, v in state.items() if k != "ema"}
        new_state, metrics = step_fn(inner, batch)
        new_state = dict(new_state)
        new_state["ema"] = ema_update(state["ema"], new_state["params"], decay=decay,
                                      step=state["step"] if warmup else None)
        return new_state, metrics

    return step


def with_ema_params(state: State) -> State:
    """The state with its params replaced by the average (cast back to the params' dtypes), for
    `train.evaluate`, `train.predict` or saving an averaged model."""
    if "ema" not in state:
        raise ValueError("the state has no 'ema': create it with ema.add_ema(state)")
    params = jax.tree.map(lambda e, p: jnp.asarray(e, jnp.result_type(p)),
                          state["ema"], state["params"])
    return {**state, "params": params}
