"""Evaluation beyond one forward pass: test-time augmentation (TTA) and model ensembles.

- TTA views are pure functions of a batch, `views_fn(x [B, H, W, C]) -> [V, B, h, w, C]`:
  `flip_views` (the image and its mirror) and `ten_crop_views` (Krizhevsky et al. 2012, section
  4.1: the four corner crops and the centre crop, and their horizontal reflections).
  `tta_logits` averages a net's outputs over the views; `make_tta_eval` is
  `train.make_classifier_eval` with TTA, so `train.evaluate` runs it unchanged.
- Ensembles average the outputs of several models (CS231n, "Neural Networks 3", model
  ensembles: a few points of accuracy for M times the test-time cost). `ensemble_logits` takes
  one apply function per member; `make_ensemble_eval` runs M members of one architecture as one
  program by `jax.vmap` over their stacked variables (`stack_states`); `load_snapshots` reads
  several saved steps of one run for a snapshot ensemble (Huang et al. 2017).

Averaging logits or probabilities (`average=`):
  "logits": the mean of the logits, `mean_v z_v`. What the issue asks for ("averaging the
    logits"); for a net linear in its input it is the net applied to the averaged view.
  "probs": the mean of the softmax probabilities, `mean_v softmax(z_v)` (Krizhevsky et al.
    average the softmax outputs of the 10 patches). Returned as its log, `log mean_v
    softmax(z_v)`: a valid logit vector (softmax of it is the mean probability, argmax the same),
    so the loss and accuracy functions apply unchanged.
Both give the same prediction when all members agree; they differ when a confident member
outvotes several hesitant ones ("logits" weighs confidence more).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision import checkpoint
from jaxvision import losses
from jaxvision import train

State = dict[str, Any]
# apply_fn(x float [N, H, W, C]) -> logits [N, K]
ApplyFn = Callable[[jax.Array], jax.Array]
# views_fn(x [B, H, W, C]) -> [V, B, h, w, C]
ViewsFn = Callable[[jax.Array], jax.Array]

AVERAGES = ("logits", "probs")


def _check_images(x: jax.Array, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a batch of images [B, H, W, C], got shape {x.shape}")


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def average_outputs(logits: jax.Array, *, average: str = "logits") -> jax.Array:
    """Combines `[V, B, K]` logits of V views or members into `[B, K]` (see the module doc).

    "probs" returns `log mean_v softmax(z_v)`, computed as a log-sum-exp of log-probabilities
    (no softmax that underflows to 0 is ever logged).
    """
    _check_average(average)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [V, B, K], got shape {logits.shape}")
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if average == "logits":
        return jnp.mean(logits, axis=0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [V, B, K]
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(logits.shape[0])


# --- Test-time augmentation -----------------------------------------------------------------


def flip_views(x: jax.Array) -> jax.Array:
    """`[B, H, W, C] -> [2, B, H, W, C]`: the images and their horizontal mirror images."""
    _check_images(x)
    return jnp.stack([x, x[:, :, ::-1, :]])


def crop_offsets(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the 10-crop's five crops: top-left, top-right, bottom-left, bottom-right,
    centre (centre rounded down, as torchvision's `center_crop` rounds `(H - crop) / 2`)."""
    if not 0 < crop <= min(height, width):
        raise ValueError(f"crop must be in [1, min(H, W)] = [1, {min(height, width)}], "
                         f"got crop={crop} for images {height}x{width}")
    bottom, right = height - crop, width - crop
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def ten_crop_views(x: jax.Array, *, crop: int) -> jax.Array:
    """`[B, H, W, C] -> [10, B, crop, crop, C]`: the 10-crop evaluation of Krizhevsky et al.
    2012 (section 4.1): views 0-4 are the corner crops and the centre crop in the order of
    `crop_offsets`, views 5-9 their horizontal reflections in the same order.

    The net must accept `crop x crop` inputs (a global average pool before the head does); train
    on random crops of that size so that test views look like training ones.
    """
    _check_images(x)
    crops = [x[:, t:t + crop, l:l + crop, :] for t, l in crop_offsets(x.shape[1], x.shape[2], crop)]
    crops = jnp.stack(crops)  # [5, B, crop, crop, C]
    return jnp.concatenate([crops, crops[:, :, :, ::-1, :]])


def tta_logits(apply_fn: ApplyFn, x: jax.Array, views_fn: ViewsFn, *,
               average: str = "logits") -> jax.Array:
    """Logits `[B, K]` of `apply_fn` averaged over the views `views_fn(x)`.

    The V views go through the net as one batch of V*B images, `[V, B, h, w, C] -> [V*B, h, w,
    C]`: one forward pass, one compilation, and (in eval mode) BatchNorm uses running statistics
    so the batch composition does not matter. Memory grows V-fold: split the batch if needed.
    """
    _check_images(x)
    views = views_fn(x)
    if views.ndim != 5 or views.shape[1] != x.shape[0]:
        raise ValueError(f"views_fn must return [V, B, h, w, C] with B={x.shape[0]}, "
                         f"got shape {views.shape}")
    num_views, batch = views.shape[:2]
    logits = apply_fn(views.reshape((num_views * batch,) + views.shape[2:]))
    return average_outputs(logits.reshape((num_views, batch) + logits.shape[1:]),
                           average=average)


def _sums(logits: jax.Array, batch: train.Batch, loss_fn: train.LossFn) -> dict:
    # The masked sums of `train.make_classifier_eval`, so `train.evaluate` adds them up.
    mask = batch["mask"]
    return {
        "loss_sum": jnp.sum(loss_fn(logits=logits, labels=batch["label"]) * mask),
        "correct": jnp.sum(losses.accuracy(logits=logits, labels=batch["label"]) * mask),
        "count": jnp.sum(mask),
    }


def make_tta_eval(*, model: nn.Module, preprocess: train.Preprocess, loss_fn: train.LossFn,
                  views_fn: ViewsFn, average: str = "logits") -> Callable[[State, train.Batch], dict]:
    """`eval_step(state, batch) -> {"loss_sum", "correct", "count"}` with TTA; not yet jitted.

    As `train.make_classifier_eval`, except that the views are taken of the preprocessed
    (eval-mode) images and the loss and accuracy use the averaged logits. For `ten_crop_views`
    bind the crop size first: `functools.partial(ten_crop_views, crop=28)`.
    Use: `train.evaluate(jax.jit(make_tta_eval(...)), state, batches)`.
    """
    _check_average(average)

    def eval_step(state: State, batch: train.Batch):
        images = preprocess(batch["image"], key=None, train=False)
        variables = train._variables(state["params"], state["batch_stats"])

        def apply_fn(x):
            return model.apply(variables, x, train=False)[0]

        return _sums(tta_logits(apply_fn, images, views_fn, average=average), batch, loss_fn)

    return eval_step


# --- Ensembles ------------------------------------------------------------------------------


def apply_fns_of(model: nn.Module, variables: Sequence[dict]) -> list[ApplyFn]:
    """One eval-mode apply function per member: `x -> model.apply(variables[m], x)[0]`.

    variables: one flax variables dict per member ({"params": ..., "batch_stats": ...}); for
    train states use `train._variables(s["params"], s["batch_stats"])` or `variables_of(s)`.
    """
    return [lambda x, v=v: model.apply(v, x, train=False)[0] for v in variables]


def variables_of(state: State) -> dict:
    """The flax variables of a train state (params, and batch_stats when the net has them)."""
    return train._variables(state["params"], state["batch_stats"])


def ensemble_logits(apply_fns: Sequence[ApplyFn], x: jax.Array, *,
                    average: str = "logits") -> jax.Array:
    """Logits `[B, K]` averaged over independently trained members, one apply function each
    (any architectures, as long as they share the K classes). For M members of one architecture
    `make_ensemble_eval` (vmap over stacked variables) is one program instead of M.
    """
    if not apply_fns:
        raise ValueError("ensemble_logits needs at least one member, got none")
    logits = [fn(x) for fn in apply_fns]
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise ValueError(f"members' logits differ in shape: {sorted(shapes)}")
    return average_outputs(jnp.stack(logits), average=average)


def stack_states(states: Sequence[State]) -> State:
    """M train states of one architecture -> one pytree `{"params", "batch_stats"}` whose
    leaves have a leading member axis `[M, ...]` (the input of `make_ensemble_eval`'s step).

    Only the parts evaluation needs are stacked (not the optimizer state: half the memory with
    Adam). Members must have the same tree structure and shapes (the same net); raises a
    ValueError naming the first member that differs.
    """
    if not states:
        raise ValueError("stack_states needs at least one state, got none")
    parts = [{"params": s["params"], "batch_stats": s["batch_stats"]} for s in states]
    reference = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), parts[0])
    for m, part in enumerate(parts[1:], start=1):
        try:
            same = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), part) == reference
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"state {m} differs from state 0 in tree structure, shapes or "
                             "dtypes: an ensemble stacked by vmap needs one architecture")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)


def make_ensemble_eval(*, model: nn.Module, preprocess: train.Preprocess,
                       loss_fn: train.LossFn,
                       average: str = "logits") -> Callable[[State, train.Batch], dict]:
    """`eval_step(stacked, batch) -> {"loss_sum", "correct", "count"}` of the ensemble of the
    members in `stacked = stack_states(states)`; not yet jitted.

    Why vmap: `jax.vmap` over the leading member axis of the stacked variables turns M forward
    passes into one program (a conv with M stacked kernels becomes a batched/grouped conv), so
    the ensemble compiles once whatever M is and dispatches once per batch, instead of M
    programs or an M-times unrolled graph. The cost: activations for M members live at once (M
    times one net's memory); for big members use `ensemble_logits` with a Python loop instead.
    Use: `train.evaluate(jax.jit(make_ensemble_eval(...)), stack_states(states), batches)`: the
    stacked tree takes the place of the state, and is passed in, not closed over (a captured
    array would be baked into the program as a constant).
    """
    _check_average(average)

    def eval_step(stacked: State, batch: train.Batch):
        images = preprocess(batch["image"], key=None, train=False)

        def member_logits(params, batch_stats):
            return model.apply(train._variables(params, batch_stats), images, train=False)[0]

        logits = jax.vmap(member_logits)(stacked["params"], stacked["batch_stats"])  # [M, B, K]
        return _sums(average_outputs(logits, average=average), batch, loss_fn)

    return eval_step


def load_snapshots(directory: str, *, steps: Sequence[int] | None = None,
                   like: State | None = None) -> list[tuple[int, State]]:
    """The saved train states of several steps of one run: `[(step, state), ...]` by step.

    Snapshot ensembles (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free"): train
    one net with a cyclic cosine learning rate that restarts M times, save at the end of each
    cycle (the local minima the run visits), and average those snapshots' outputs at test time.
    `jaxvision.checkpoint.Checkpointer` keeps only its last `keep` steps: give the run
    `keep >= M` (or save the snapshots in their own directory).

    steps: which saved steps (default all, oldest first); a missing one raises FileNotFoundError
      listing the saved steps.
    like: a created train state (`train.create_train_state`): each snapshot is restored with
      `Checkpointer.restore` into its structure and shardings (the structure is checked). Without
      it the states come back as host numpy arrays in the saved structure (as
      `checkpoint.load_latest`), enough for `stack_states` on one host.
    Read a finished run: opening the directory removes unfinished (`*-tmp`) saves, so do not
    point it at a run that is still writing.
    """
    ckpt = checkpoint.Checkpointer(directory, keep=None, async_save=False)
    try:
        saved = sorted(ckpt.all_steps())
        wanted = saved if steps is None else list(steps)
        missing = [s for s in wanted if s not in saved]
        if missing:
            raise FileNotFoundError(f"steps {missing} are not saved under {directory}; "
                                    f"saved steps: {saved}")
        if not wanted:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        out = []
        for step in wanted:
            if like is not None:
                state, _ = ckpt.restore(step, like)
            else:
                # No target: orbax restores the saved structure as host arrays.
                restored = ckpt._manager.restore(step, args=checkpoint.ocp.args.Composite(
                    state=checkpoint.ocp.args.StandardRestore(),
                    data=checkpoint.ocp.args.JsonRestore()))
                state = jax.device_get(restored["state"])
            out.append((step, state))
        return out
    finally:
        ckpt.close()
