"""The train state, the classification train step and evaluation: small pure functions that the
one training loop (`jaxvision.loop`) runs.

The state is a plain dict pytree:

    {"step": int32 [], "params": ..., "batch_stats": ... ({} for nets without BatchNorm),
     "opt_state": ..., "rng": uint32 [2]}

Randomness of step s (augmentation, dropout) comes from `fold_in(state["rng"], s)`: it depends on
the step alone, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxvision import losses
from jaxvision import sharding as shd

State = dict[str, Any]
Batch = dict[str, jax.Array]
# preprocess(images uint8 [B, H, W, C], *, key, train) -> float [B, H, W, C]
Preprocess = Callable[..., jax.Array]
# loss_fn(*, logits [B, K], labels [B]) -> per-example losses [B]
LossFn = Callable[..., jax.Array]


def create_train_state(*, model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       input_shape: tuple[int, ...], mesh: Mesh, fsdp: bool = False) -> State:
    """Initialises the state directly in its shardings ("born sharded").

    input_shape: one example's shape, (H, W, C). The state's shapes come from `jax.eval_shape`
    (no FLOPs), the shardings from `sharding.state_shardings`, and `jit(init, out_shardings=...)`
    then creates each leaf where it lives, so no device ever holds a full copy it should not.
    """
    def init(rng, images):
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng}, images, train=False)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params),
            "rng": state_rng,
        }

    # Both arguments are passed in, not closed over: a captured array becomes a compile-time
    # constant (see STYLE.md, "Arrays go into jitted functions as arguments").
    rng = jax.random.PRNGKey(seed)
    images = jnp.zeros((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(init, rng, images)
    shardings = shd.state_shardings(abstract, mesh, fsdp=fsdp)
    return jax.jit(init, out_shardings=shardings)(rng, images)


def _variables(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_classifier_step(*, model: nn.Module, tx: optax.GradientTransformation,
                         schedule: optax.Schedule, preprocess: Preprocess, loss_fn: LossFn,
                         l2: float = 0.0, l2_mask=None, mix: Callable | None = None,
                         loss_takes_acts: bool = False) -> Callable[[State, Batch], tuple]:
    """The classification update `step(state, batch) -> (state, metrics)`, not yet jitted.

    batch: {"image": uint8 [B, H, W, C], "label": int [B], "mask": float [B]}; the loss is the
    masked mean of `loss_fn` (+ `l2` * `losses.l2_penalty(params, mask=l2_mask)`).
    mix: optional `mix(images, labels, *, key) -> (images, soft labels [B, K])` applied after
      `preprocess` (mixup, cutmix: `augment.mixup`); `loss_fn` then gets the soft labels.
    loss_takes_acts: call `loss_fn(logits=, labels=, acts=)` with the net's activations (e.g.
      `googlenet.googlenet_loss`, which adds the auxiliary classifiers' losses).
    metrics (scalars): loss (data term), accuracy, grad_norm, param_norm, update_norm, lr.
    """
    def step(state: State, batch: Batch):
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
        images = preprocess(batch["image"], key=aug_key, train=True)
        labels = batch["label"]
        if mix is not None:
            # A key of its own, derived so that runs without `mix` draw exactly as before.
            images, labels = mix(images, labels, key=jax.random.fold_in(aug_key, 1))

        def objective(params):
            (logits, acts), new_vars = model.apply(
                _variables(params, state["batch_stats"]), images, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_key})
            extra = {"acts": acts} if loss_takes_acts else {}
            data_loss = losses.masked_mean(
                loss_fn(logits=logits, labels=labels, **extra), batch["mask"])
            total = data_loss
            if l2:
                total = total + l2 * losses.l2_penalty(params, mask=l2_mask)
            return total, (data_loss, logits, new_vars.get("batch_stats", {}))

        grads, (data_loss, logits, batch_stats) = jax.grad(objective, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                     "opt_state": opt_state, "rng": state["rng"]}
        metrics = {
            "loss": data_loss,
            "accuracy": losses.masked_mean(
                losses.accuracy(logits=logits, labels=labels), batch["mask"]),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        return new_state, metrics

    return step


def make_classifier_eval(*, model: nn.Module, preprocess: Preprocess,
                         loss_fn: LossFn, loss_takes_acts: bool = False
                         ) -> Callable[[State, Batch], dict]:
    """`eval_step(state, batch) -> {"loss_sum", "correct", "count"}`: masked sums, not means,
    so batches add up and padded rows count for nothing. loss_takes_acts: as for the step."""
    def eval_step(state: State, batch: Batch):
        images = preprocess(batch["image"], key=None, train=False)
        logits, acts = model.apply(_variables(state["params"], state["batch_stats"]), images,
                                   train=False)
        mask = batch["mask"]
        extra = {"acts": acts} if loss_takes_acts else {}
        return {
            "loss_sum": jnp.sum(loss_fn(logits=logits, labels=batch["label"], **extra) * mask),
            "correct": jnp.sum(losses.accuracy(logits=logits, labels=batch["label"]) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def evaluate(eval_step: Callable, state: State, batches) -> dict[str, float]:
    """Runs a jitted `eval_step` over `batches`; returns {"loss", "accuracy", "count"}.

    Sums stay on the device until the end: one host sync per evaluation, not per batch.
    """
    totals = None
    for batch in batches:
        out = eval_step(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        raise ValueError("evaluation got no batches")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count,
            "accuracy": float(totals["correct"]) / count, "count": int(count)}


def predict(model: nn.Module, state: State, images: jax.Array,
            preprocess: Preprocess) -> jax.Array:
    """Logits float32 [B, K] of uint8 images [B, H, W, C] in eval mode (notebooks, plots)."""
    x = preprocess(images, key=None, train=False)
    logits, _ = model.apply(_variables(state["params"], state["batch_stats"]), x, train=False)
    return logits
