"""The from-scratch update rules of jaxvision.optim against optax's built-ins, the course notes'
forms against slow numpy references, the exponential schedule, and L-BFGS."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision import optim

STEPS = 100


def _schedule():
    # Warmup, then exponential decay: the rate changes at every step, so a rule that read the
    # schedule at the wrong count would drift from optax's.
    return optim.make_schedule(kind="exponential", lr=1.0, steps=STEPS, warmup_steps=10,
                               decay_steps=30, decay_rate=0.5)


# name -> (ours(lr), optax's(lr), base rate). Rates are set so that each rule moves the params
# by a good fraction of their size over 100 steps without diverging on the logistic problem.
RULES = {
    "sgd": (optim.sgd, optax.sgd, 0.1),
    "sgd_momentum": (lambda lr: optim.sgd_momentum(lr, momentum=0.8),
                     lambda lr: optax.sgd(lr, momentum=0.8), 0.05),
    "nesterov": (lambda lr: optim.nesterov(lr, momentum=0.8),
                 lambda lr: optax.sgd(lr, momentum=0.8, nesterov=True), 0.05),
    "adagrad": (lambda lr: optim.adagrad(lr, eps=1e-7),
                lambda lr: optax.adagrad(lr, eps=1e-7), 0.1),
    "rmsprop": (lambda lr: optim.rmsprop(lr, decay=0.99, eps=1e-8),
                lambda lr: optax.rmsprop(lr, decay=0.99, eps=1e-8), 0.01),
    "rmsprop_eps_outside": (
        lambda lr: optim.rmsprop(lr, decay=0.9, eps=1e-6, eps_in_sqrt=False),
        lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-6, eps_in_sqrt=False), 0.01),
    "adam": (lambda lr: optim.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
             lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8), 0.01),
}


def _logistic_loss(params, x, y):
    """Logistic regression with 3 independent binary outputs on features [N, 6], y in {-1, +1}."""
    logits = x @ params["w"] + params["b"][None, :]  # [N, 3]
    return jnp.mean(jax.nn.softplus(-y * logits)) + 0.01 * jnp.sum(params["w"] ** 2)


def _trajectories(tx, params, grads_seq, x, y):
    """Iterates [STEPS, ...] of `tx` fed (a) the fixed gradient sequence, (b) the gradients of
    the logistic problem at the current params."""

    def open_loop(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    def closed_loop(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(_logistic_loss)(p, x, y), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    _, fixed = jax.lax.scan(open_loop, (params, tx.init(params)), grads_seq)
    _, problem = jax.lax.scan(closed_loop, (params, tx.init(params)), None, length=STEPS)
    return {"random gradients": fixed, "logistic problem": problem}


def _inputs(seed, dtype):
    """Params {"w": [6, 3], "b": [3]}, 100 gradients of that structure, data of the problem."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(6, 3)), "b": np.zeros(3)}
    # Gradients of varied size, every 7th one zero: AdaGrad's and RMSProp's denominators see
    # both large and vanishing gradients.
    live = (np.arange(STEPS) % 7 != 3)[:, None]
    grads_seq = {"w": 3.0 * rng.normal(size=(STEPS, 6, 3)) * live[:, :, None],
                 "b": 3.0 * rng.normal(size=(STEPS, 3)) * live}
    x = rng.normal(size=(32, 6))
    y = np.where(rng.random((32, 3)) < 0.5, 1.0, -1.0)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
    return cast(params), cast(grads_seq), cast(x), cast(y)


def _assert_close(got, want, *, rtol, what):
    for key in got:
        a, b = np.asarray(got[key]), np.asarray(want[key])
        # Relative to the size of the leaf at that step (coordinates crossing 0 have no
        # meaningful relative error of their own). A leaf still at 0 (no step yet under a
        # warmup from 0) must be exactly 0.
        scale = np.max(np.abs(b), axis=tuple(range(1, b.ndim)), keepdims=True)
        scale = np.maximum(scale, np.finfo(b.dtype).tiny)
        err = np.max(np.abs(a - b) / scale)
        assert err <= rtol, f"{what} [{key!r}]: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(RULES))
def test_rule_equals_optax_step_for_step(name):
    ours, theirs, lr = RULES[name]
    rates = {"constant lr": lr, "schedule": lambda step: lr * _schedule()(step)}

    @jax.jit  # one program per dtype: every trajectory of both implementations
    def run(params, grads_seq, x, y):
        return {(impl, kind): _trajectories(make(rate), params, grads_seq, x, y)
                for impl, make in (("ours", ours), ("optax", theirs))
                for kind, rate in rates.items()}

    for dtype, rtol in ((jnp.float32, 2e-6), (jnp.float64, 1e-12)):
        # float32: every one of the 100 iterates within float rounding of optax's; float64:
        # agreement to ~1e-13, so that any difference in the formulas would show.
        with jax.enable_x64(dtype == jnp.float64):
            params, grads_seq, x, y = _inputs(seed=len(name), dtype=dtype)
            out = run(params, grads_seq, x, y)
            for kind in rates:
                for problem, got in out[("ours", kind)].items():
                    assert got["w"].dtype == dtype
                    _assert_close(got, out[("optax", kind)][problem], rtol=rtol,
                                  what=f"{name}, {kind}, {problem}, {jnp.dtype(dtype).name}")
            # The logistic problem is really being solved (the rates are sensible).
            final = jax.tree.map(lambda p: p[-1], out[("ours", "constant lr")]["logistic problem"])
            assert _logistic_loss(final, x, y) < 0.9 * _logistic_loss(params, x, y)


def test_rules_states_are_named_tuples_with_a_count():
    params = {"w": jnp.ones((6, 3)), "b": jnp.ones(3), "conv": jnp.ones((3, 3, 2, 4))}
    for name, (ours, _, lr) in RULES.items():
        tx = ours(lr)
        state = jax.eval_shape(tx.init, params)
        assert isinstance(state, tuple) and state._fields[0] == "count", name
        assert state.count.shape == () and state.count.dtype == jnp.int32, name
        # Every moment has the structure, shapes and dtypes of the params.
        for field in state._fields[1:]:
            assert getattr(state, field) == jax.eval_shape(lambda p: p, params), (name, field)
        updates, new_state = jax.eval_shape(tx.update, params, state, params)
        assert updates == jax.eval_shape(lambda p: p, params), name
        assert jax.tree.structure(new_state) == jax.tree.structure(state), name


# ---- The course notes' forms, in float64 numpy ------------------------------------------------


def _numpy_problem(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(5, 4)), [3.0 * rng.normal(size=(5, 4)) for _ in range(40)]


def _run_ours(tx, x0, grads):
    """Iterates [T, 5, 4] of `tx` from x0 on the gradients, in float64."""
    def step(carry, g):
        x, state = carry
        u, state = tx.update(g, state, x)
        return (x + u, state), x + u

    with jax.enable_x64(True):
        x0 = jnp.asarray(x0)
        _, xs = jax.jit(lambda x0, gs: jax.lax.scan(step, (x0, tx.init(x0)), gs))(
            x0, jnp.asarray(np.stack(grads)))
        return np.asarray(xs)


def test_course_momentum_form_equals_ours_with_constant_rate():
    x0, grads = _numpy_problem(1)
    lr, mu = 0.05, 0.9
    x, v, out = x0.copy(), np.zeros_like(x0), []
    for dx in grads:  # CS231n notes: v = mu * v - learning_rate * dx; x += v
        v = mu * v - lr * dx
        x += v
        out.append(x.copy())
    np.testing.assert_allclose(_run_ours(optim.sgd_momentum(lr, mu), x0, grads), out, rtol=1e-12)


def test_course_nesterov_form_equals_ours_with_constant_rate():
    x0, grads = _numpy_problem(2)
    lr, mu = 0.05, 0.9
    x, v, out = x0.copy(), np.zeros_like(x0), []
    for dx in grads:  # v_prev = v; v = mu * v - lr * dx; x += -mu * v_prev + (1 + mu) * v
        v_prev = v
        v = mu * v - lr * dx
        x += -mu * v_prev + (1 + mu) * v
        out.append(x.copy())
    got = _run_ours(optim.nesterov(lr, mu), x0, grads)
    np.testing.assert_allclose(got, out, rtol=1e-11)
    # ... and it is not plain momentum.
    assert not np.allclose(got, _run_ours(optim.sgd_momentum(lr, mu), x0, grads))


def test_course_adagrad_form():
    x0, grads = _numpy_problem(3)
    lr, eps = 0.1, 1e-7
    x, cache, out = x0.copy(), np.zeros_like(x0), []
    for dx in grads:  # cache += dx**2; x += -lr * dx / (np.sqrt(cache) + eps)
        cache += dx**2
        x += -lr * dx / (np.sqrt(cache) + eps)
        out.append(x.copy())
    course = optim.adagrad(lr, eps, initial_accumulator_value=0.0, eps_in_sqrt=False)
    np.testing.assert_allclose(_run_ours(course, x0, grads), out, rtol=1e-12)
    # optax's defaults (accumulator from 0.1, eps inside the root) give a different sequence.
    assert not np.allclose(_run_ours(optim.adagrad(lr, eps), x0, grads), out, rtol=1e-4)


def test_course_rmsprop_form():
    x0, grads = _numpy_problem(4)
    lr, decay, eps = 0.01, 0.99, 1e-8
    x, cache, out = x0.copy(), np.zeros_like(x0), []
    for dx in grads:  # cache = decay * cache + (1 - decay) * dx**2; x += -lr dx / (sqrt + eps)
        cache = decay * cache + (1 - decay) * dx**2
        x += -lr * dx / (np.sqrt(cache) + eps)
        out.append(x.copy())
    got = _run_ours(optim.rmsprop(lr, decay, eps, eps_in_sqrt=False), x0, grads)
    np.testing.assert_allclose(got, out, rtol=1e-12)


def test_course_adam_form_with_bias_correction():
    x0, grads = _numpy_problem(5)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    x, m, v, out = x0.copy(), np.zeros_like(x0), np.zeros_like(x0), []
    for t, dx in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * dx
        v = b2 * v + (1 - b2) * dx**2
        mt, vt = m / (1 - b1**t), v / (1 - b2**t)
        x += -lr * mt / (np.sqrt(vt) + eps)
        out.append(x.copy())
    got = _run_ours(optim.adam(lr, b1, b2, eps), x0, grads)
    np.testing.assert_allclose(got, out, rtol=1e-12)
    # First step after bias correction: lr * sign(g) (|g| >> eps).
    np.testing.assert_allclose(got[0], x0 - lr * np.sign(grads[0]), atol=1e-8)


def test_schedule_is_read_at_the_count_before_the_step():
    # lr(0) = 1, lr(1) = 0.5, lr(2) = 0.25: three SGD steps on a constant gradient.
    tx = optim.sgd(lambda count: 0.5 ** count)
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.full((3,), 2.0)}
    state = tx.init(p)
    for _ in range(3):
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["w"], 1.0 - 2.0 * (1 + 0.5 + 0.25), rtol=1e-6)


def test_adagrad_rejects_negative_accumulator():
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        optim.adagrad(0.1, initial_accumulator_value=-1.0)


# ---- schedules against hand values ------------------------------------------------------------


def _hand_schedule(kind, step, *, lr, steps, warmup, boundaries, factor, end, decay_steps, rate):
    """The schedules of `make_schedule`, written out in plain Python."""
    if step < warmup:
        return lr * step / warmup
    t = step - warmup
    if kind == "constant":
        return lr
    if kind == "step":
        return lr * factor ** sum(step >= b for b in boundaries)
    if kind == "exponential":
        return lr * rate ** (t / decay_steps)
    if kind == "cosine":
        frac = min(t, steps - warmup) / (steps - warmup)
        return lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise AssertionError(f"no hand formula for schedule {kind!r}: add one")


@pytest.mark.parametrize("warmup", [0, 8])
@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_every_schedule_kind_matches_hand_values(kind, warmup):
    knobs = dict(lr=0.3, steps=60, boundaries=(20, 35, 35), decay_factor=0.2, end_lr_factor=0.05,
                 decay_steps=7, decay_rate=0.6)
    s = optim.make_schedule(kind=kind, warmup_steps=warmup, **knobs)
    got = np.asarray(jax.vmap(s)(jnp.arange(80)))
    want = [_hand_schedule(kind, i, lr=0.3, steps=60, warmup=warmup, boundaries=(20, 35, 35),
                           factor=0.2, end=0.05, decay_steps=7, rate=0.6) for i in range(80)]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_exponential_schedule_hand_values():
    s = optim.make_schedule(kind="exponential", lr=0.8, steps=100, warmup_steps=4,
                            decay_steps=10, decay_rate=0.5)
    np.testing.assert_allclose(float(s(2)), 0.4, rtol=1e-6)  # mid-warmup
    np.testing.assert_allclose(float(s(4)), 0.8, rtol=1e-6)  # warmup over: decay starts
    np.testing.assert_allclose(float(s(14)), 0.4, rtol=1e-6)  # one half-life
    np.testing.assert_allclose(float(s(24)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(s(9)), 0.8 * 0.5**0.5, rtol=1e-6)  # smooth, not stairs


def test_exponential_schedule_needs_its_knobs():
    with pytest.raises(ValueError, match="decay_steps and decay_rate"):
        optim.make_schedule(kind="exponential", lr=1.0, steps=10, decay_rate=0.5)
    with pytest.raises(ValueError, match="decay_steps > 0"):
        optim.make_schedule(kind="exponential", lr=1.0, steps=10, decay_steps=0, decay_rate=0.5)


# ---- L-BFGS ------------------------------------------------------------------------------------


def _softmax_regression_problem():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data[:600] / 16.0).astype(np.float32)  # [600, 64] in [0, 1]
    x = x - x.mean(0)
    y = digits.target[:600]
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
    return params, jnp.asarray(x), jnp.asarray(y)


def _softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"][None, :]  # [N, 10]
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    # A weak L2 term: strictly convex with a finite minimiser (the 600 digits are separable),
    # but badly conditioned, which is where curvature information pays.
    return nll + 1e-4 * jnp.sum(params["w"] ** 2)


def test_lbfgs_beats_gradient_descent_and_converges():
    params, x, y = _softmax_regression_problem()
    # 100 steps of gradient descent at rate 8 (the best of 1, 2, 4, 8 here).
    grad = jax.jit(jax.grad(_softmax_loss))
    p = params
    for _ in range(100):
        p = jax.tree.map(lambda a, g: a - 8.0 * g, p, grad(p, x, y))
    gd_loss = float(_softmax_loss(p, x, y))

    lb_params, losses = optim.lbfgs_minimize(_softmax_loss, params, steps=60, args=(x, y))
    losses = np.asarray(losses)
    assert losses.shape == (61,)
    np.testing.assert_allclose(losses[0], math.log(10), rtol=1e-6)  # zero weights: uniform
    np.testing.assert_allclose(losses[-1], _softmax_loss(lb_params, x, y), rtol=1e-6)
    # The linesearch never goes uphill (up to float32 rounding of the loss).
    assert np.all(np.diff(losses) <= 1e-6 * losses[1:]), np.diff(losses).max()
    assert losses[-1] < gd_loss - 5e-3, (losses[-1], gd_loss)  # ~0.082 against ~0.094
    gnorm = float(optax.tree.norm(grad(lb_params, x, y)))
    assert gnorm < 1e-5, gnorm


def test_lbfgs_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        optim.lbfgs_minimize(lambda p: jnp.sum(p**2), jnp.ones(3), steps=0)
