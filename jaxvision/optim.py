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

The second half of the file, "The course's update rules, from scratch", writes SGD, momentum,
Nesterov, AdaGrad, RMSProp and Adam out by hand as optax GradientTransformations (each equal to
optax's built-in step for step) and wraps optax's L-BFGS for full-batch problems.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any

SCHEDULES = ("constant", "step", "exponential", "cosine")
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
    decay_steps: int | None = None,
    decay_rate: float | None = None,
) -> optax.Schedule:
    """A learning-rate schedule `step -> lr`, with an optional linear warmup.

    Args:
      kind: "constant"; "step" (multiply by `decay_factor` at each of `boundaries`);
        "exponential" (`lr * decay_rate ** (t / decay_steps)`, t counted from the end of the
        warmup: smooth, not staircase; the course notes' "exponential decay" `a0 e^{-kt}` with
        `e^{-k} = decay_rate ** (1 / decay_steps)`); or "cosine" (half-cosine from `lr` down to
        `lr * end_lr_factor` over `steps - warmup_steps` steps, Loshchilov & Hutter 2017
        without restarts; constant afterwards).
      lr: the peak learning rate.
      steps: total number of training steps (used by "cosine").
      warmup_steps: if > 0, the rate rises linearly from 0 at step 0 to `lr` at `warmup_steps`
        (Goyal et al. 2017, "gradual warmup"), and the schedule above starts there.
      boundaries: for "step", absolute step numbers (counted from 0, warmup included); the
        rate is multiplied by `decay_factor` from each boundary on. Must be >= `warmup_steps`.
      decay_factor: multiplier applied at each boundary for "step".
      end_lr_factor: final rate of "cosine", as a fraction of `lr`.
      decay_steps, decay_rate: for "exponential" (required there): the rate is multiplied by
        `decay_rate` every `decay_steps` steps (e.g. 0.5 and 1000: halved every 1000 steps).

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
    elif kind == "exponential":
        if decay_steps is None or decay_rate is None:
            raise ValueError(
                "The exponential schedule needs decay_steps and decay_rate, got "
                f"decay_steps={decay_steps}, decay_rate={decay_rate}."
            )
        if decay_steps <= 0 or not decay_rate > 0:
            raise ValueError(
                f"The exponential schedule needs decay_steps > 0 and decay_rate > 0, got "
                f"decay_steps={decay_steps}, decay_rate={decay_rate}."
            )
        # staircase=False: decay_rate ** (t / decay_steps), continuous in t.
        main = optax.exponential_decay(lr, transition_steps=decay_steps, decay_rate=decay_rate)
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


# =============================================================================================
# The course's update rules, from scratch
# =============================================================================================
#
# Each rule below is an `optax.GradientTransformation` written out by hand: a NamedTuple state,
# a pure `init(params) -> state` and a pure `update(grads, state, params=None) -> (updates,
# state)`, with the arithmetic in `jax.tree.map` (no optax helper inside the math). The updates
# are the full step, `-learning_rate * direction`, to be added with `optax.apply_updates`.
#
# They follow optax's conventions rather than the course notes' where the two differ, so that
# each one equals optax's built-in step for step (tests/test_update_rules.py runs both for 100
# steps in float32 and float64). The docstrings give both forms and show where they agree:
#
#   rule           optax built-in                      course notes (CS231n, "Neural Networks 3")
#   sgd            optax.sgd(lr)                       x += -lr * dx
#   sgd_momentum   optax.sgd(lr, momentum=mu)          v = mu * v - lr * dx; x += v
#   nesterov       optax.sgd(lr, mu, nesterov=True)    v_prev = v; v = mu * v - lr * dx;
#                                                      x += -mu * v_prev + (1 + mu) * v
#   adagrad        optax.adagrad(lr)                   cache += dx**2;
#                                                      x += -lr * dx / (sqrt(cache) + eps)
#   rmsprop        optax.rmsprop(lr, decay)            cache = decay * cache + (1 - decay) * dx**2;
#                                                      x += -lr * dx / (sqrt(cache) + eps)
#   adam           optax.adam(lr)                      m, v moving averages; bias-corrected mt, vt;
#                                                      x += -lr * mt / (sqrt(vt) + eps)
#
# `learning_rate` is a float or a schedule `count -> lr`; every state carries `count`, the number
# of updates done so far, and the schedule is read at the count before the increment (step 0
# uses `schedule(0)`), as optax.scale_by_learning_rate does.


class SgdState(NamedTuple):
    count: jax.Array  # int32 [], updates done so far


class MomentumState(NamedTuple):
    count: jax.Array  # int32 []
    velocity: PyTree  # like params: v (optax's "trace"), a sum of past raw gradients


class AdagradState(NamedTuple):
    count: jax.Array  # int32 []
    sum_of_squares: PyTree  # like params: initial value + sum of g**2 so far


class RmspropState(NamedTuple):
    count: jax.Array  # int32 []
    mean_square: PyTree  # like params: exponential moving average of g**2


class AdamState(NamedTuple):
    count: jax.Array  # int32 [], also t - 1 of Adam's bias correction
    mu: PyTree  # like params: first moment m (moving average of g)
    nu: PyTree  # like params: second moment v (moving average of g**2)


def _learning_rate_at(learning_rate: float | optax.Schedule, count: jax.Array):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _descend(learning_rate: float | optax.Schedule, count: jax.Array, direction: PyTree) -> PyTree:
    """-lr * direction, leaf by leaf, the rate cast to each leaf's dtype (float32 stays float32)."""
    lr = _learning_rate_at(learning_rate, count)
    return jax.tree.map(lambda d: jnp.asarray(-lr, d.dtype) * d, direction)


def _count0() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def sgd(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Vanilla gradient descent: `x <- x - lr * g`.

    Source: the course notes, "Vanilla update" (`x += -learning_rate * dx`); equals `optax.sgd(lr)`.
    """

    def init(params):
        del params
        return SgdState(count=_count0())

    def update(grads, state, params=None):
        del params
        updates = _descend(learning_rate, state.count, grads)
        return updates, SgdState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def sgd_momentum(
    learning_rate: float | optax.Schedule, momentum: float = 0.9
) -> optax.GradientTransformation:
    """SGD with (heavy-ball) momentum, Polyak 1964; in deep learning Sutskever et al. 2013.

    Implemented (optax.sgd(lr, momentum=mu), optax.trace; PyTorch's SGD without dampening):

        v <- g + mu * v            (v_0 = 0)
        x <- x - lr * v

    The course notes' form keeps the step itself in the velocity:

        u <- mu * u - lr * g
        x <- x + u

    With a constant rate the two are the same sequence of iterates (u = -lr * v by induction).
    With a schedule they differ: here v holds raw gradients and the current rate scales the
    whole step, so a rate drop acts at once; in the course form old steps keep their old rate
    and fade over ~1 / (1 - mu) steps.
    """

    def init(params):
        return MomentumState(count=_count0(), velocity=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(lambda g, v: g + momentum * v, grads, state.velocity)
        updates = _descend(learning_rate, state.count, velocity)
        return updates, MomentumState(count=state.count + 1, velocity=velocity)

    return optax.GradientTransformation(init, update)


def nesterov(
    learning_rate: float | optax.Schedule, momentum: float = 0.9
) -> optax.GradientTransformation:
    """Nesterov momentum (Nesterov 1983), in the form of Sutskever et al. 2013, Sec. 2.1.

    Implemented (optax.sgd(lr, momentum=mu, nesterov=True), optax.trace(nesterov=True)):

        v <- g + mu * v
        x <- x - lr * (g + mu * v)

    The gradient is taken at the current x; the extra `mu * v` is the "look-ahead".

    The course notes' form (Bengio et al. 2013, "Advances in optimizing recurrent networks",
    Eq. 7, which rewrites Nesterov's update for the variable x = the look-ahead point):

        u_prev <- u
        u <- mu * u - lr * g
        x <- x - mu * u_prev + (1 + mu) * u

    With a constant rate they agree: u = -lr * v by induction (as for momentum), so the course
    step is -mu u_prev + (1 + mu) u = -lr * (v + mu * (v - v_prev)) = -lr * (v + mu * v - mu *
    v_prev), and v - mu * v_prev = g, so it is -lr * (g + mu * v). tests/test_update_rules.py
    checks this in float64. With a schedule they differ as for `sgd_momentum`.
    """

    def init(params):
        return MomentumState(count=_count0(), velocity=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(lambda g, v: g + momentum * v, grads, state.velocity)
        direction = jax.tree.map(lambda g, v: g + momentum * v, grads, velocity)
        updates = _descend(learning_rate, state.count, direction)
        return updates, MomentumState(count=state.count + 1, velocity=velocity)

    return optax.GradientTransformation(init, update)


def adagrad(
    learning_rate: float | optax.Schedule,
    eps: float = 1e-7,
    *,
    initial_accumulator_value: float = 0.1,
    eps_in_sqrt: bool = True,
) -> optax.GradientTransformation:
    """AdaGrad, Duchi et al. 2011: per-coordinate steps scaled by the root sum of squares.

    Implemented (the defaults are optax.adagrad's, which follow TensorFlow's Adagrad):

        s <- s + g**2                      (s_0 = initial_accumulator_value = 0.1)
        x <- x - lr * g / sqrt(s + eps)    (eps inside the root: eps_in_sqrt=True)

    where a coordinate with s = 0 gets a zero step (optax's guard: with eps = 0 it would be
    0 / 0). The course notes' form starts the cache at 0 and puts eps outside the root:

        x <- x - lr * g / (sqrt(s) + eps)

    which is `adagrad(lr, eps, initial_accumulator_value=0.0, eps_in_sqrt=False)`. The two
    differ most on the first steps, where s is small: the course form's first step is
    lr * sign(g) (for |g| >> eps), optax's lr * g / sqrt(0.1 + g**2).
    """
    if initial_accumulator_value < 0:
        raise ValueError(
            f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}.")

    def init(params):
        return AdagradState(
            count=_count0(),
            sum_of_squares=jax.tree.map(
                lambda p: jnp.full_like(p, initial_accumulator_value), params),
        )

    def update(grads, state, params=None):
        del params
        sums = jax.tree.map(lambda g, s: g * g + s, grads, state.sum_of_squares)
        if eps_in_sqrt:
            direction = jax.tree.map(
                lambda g, s: jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g, grads, sums)
        else:
            direction = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), grads, sums)
        updates = _descend(learning_rate, state.count, direction)
        return updates, AdagradState(count=state.count + 1, sum_of_squares=sums)

    return optax.GradientTransformation(init, update)


def rmsprop(
    learning_rate: float | optax.Schedule,
    decay: float = 0.99,
    eps: float = 1e-8,
    *,
    eps_in_sqrt: bool = True,
) -> optax.GradientTransformation:
    """RMSProp, Tieleman & Hinton 2012 (Coursera lecture 6e): AdaGrad with a leaky average.

        r <- decay * r + (1 - decay) * g**2           (r_0 = 0, no bias correction)
        x <- x - lr * g / sqrt(r + eps)               eps_in_sqrt=True  (optax's default)
        x <- x - lr * g / (sqrt(r) + eps)             eps_in_sqrt=False (the course notes)

    Equals `optax.rmsprop(lr, decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt)`. Note the default
    `decay`: 0.99 here, the course notes' "typical 0.9, 0.99, 0.999" middle value (and Keras'
    rho is 0.9, PyTorch's alpha 0.99); optax's own default is 0.9.
    """

    def init(params):
        return RmspropState(count=_count0(), mean_square=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        mean_square = jax.tree.map(
            lambda g, r: (1 - decay) * (g * g) + decay * r, grads, state.mean_square)
        if eps_in_sqrt:
            direction = jax.tree.map(lambda g, r: jax.lax.rsqrt(r + eps) * g, grads, mean_square)
        else:
            direction = jax.tree.map(
                lambda g, r: (1 / (jnp.sqrt(r) + eps)) * g, grads, mean_square)
        updates = _descend(learning_rate, state.count, direction)
        return updates, RmspropState(count=state.count + 1, mean_square=mean_square)

    return optax.GradientTransformation(init, update)


def adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam, Kingma & Ba 2015, Algorithm 1, with bias correction.

        m <- b1 * m + (1 - b1) * g          (m_0 = 0)
        v <- b2 * v + (1 - b2) * g**2       (v_0 = 0)
        t <- t + 1
        m_hat = m / (1 - b1**t),  v_hat = v / (1 - b2**t)
        x <- x - lr * m_hat / (sqrt(v_hat) + eps)

    The course notes' form is the same (eps outside the root, as in the paper); so is
    `optax.adam(lr, b1, b2, eps)`. Why the correction: m and v start at 0, so early on they are
    shrunk towards 0 by the factors (1 - b1**t) and (1 - b2**t) (Kingma & Ba, Sec. 3); without
    the correction the first step would be lr * (1 - b1) / sqrt(1 - b2) * g / |g| ~ 3 * lr for
    the defaults, instead of lr.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(count=_count0(), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, grads, state.nu)
        t = state.count + 1
        # 1 - b**t in the default float dtype, then cast to each leaf's dtype for the division
        # (optax does the same: in bfloat16, 0.999**t would round to 1 and divide by zero).
        correction1, correction2 = 1 - b1**t, 1 - b2**t
        direction = jax.tree.map(
            lambda m, v: (m / correction1.astype(m.dtype))
            / (jnp.sqrt(v / correction2.astype(v.dtype)) + eps),
            mu, nu)
        updates = _descend(learning_rate, state.count, direction)
        return updates, AdamState(count=t, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


# ---- L-BFGS (optax's) ------------------------------------------------------------------------


def lbfgs_minimize(
    fun: Callable[..., jax.Array],
    params: PyTree,
    *,
    steps: int,
    memory_size: int = 10,
    args: Sequence[Any] = (),
) -> tuple[PyTree, jax.Array]:
    """Minimise a deterministic (full-batch) `fun(params, *args)` with optax's L-BFGS.

    L-BFGS (Liu & Nocedal 1989) builds an approximation of the inverse Hessian from the last
    `memory_size` differences of params and gradients; the course notes recommend it for
    full-batch problems ("if you can afford a full batch update then try out L-BFGS"), not for
    mini-batches, where its curvature pairs are noise. This is optax's documented loop:
    `optax.lbfgs()` with its default zoom linesearch (strong Wolfe conditions), and
    `optax.value_and_grad_from_state` to reuse the value and gradient that the linesearch
    already computed at the accepted point. All `steps` run in one `jax.lax.scan` under jit.

    Args:
      fun: `(params, *args) -> scalar` loss.
      params: the starting point, any pytree of float arrays.
      steps: number of L-BFGS iterations (each may evaluate `fun` several times in the
        linesearch).
      memory_size: number of (dx, dg) pairs kept.
      args: extra arguments of `fun` (e.g. the data), passed into the jitted loop as arguments
        rather than captured, so they are not baked into the program as constants.

    Returns:
      (params after `steps` iterations, losses `[steps + 1]`: `fun` at the start and after
      each iteration).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    opt = optax.lbfgs(memory_size=memory_size)

    @jax.jit
    def run(params, args):
        def value_fn(p):
            return fun(p, *args)

        value_and_grad = optax.value_and_grad_from_state(value_fn)

        def step(carry, _):
            params, state = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn)
            return (optax.apply_updates(params, updates), state), value

        (params, _), values = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params, jnp.concatenate([values, value_fn(params)[None]])

    return run(params, tuple(args))
