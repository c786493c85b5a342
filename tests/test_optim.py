"""jaxvision.optim: schedule values, update rules against hand computations, masks, freezing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision import optim


def _lr(schedule, step):
    return float(schedule(step))


# ---- schedules -------------------------------------------------------------------------------


def test_constant_schedule_with_warmup():
    s = optim.make_schedule(kind="constant", lr=0.4, steps=100, warmup_steps=10)
    assert _lr(s, 0) == 0.0
    np.testing.assert_allclose(_lr(s, 5), 0.2, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 10), 0.4, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 99), 0.4, rtol=1e-6)


def test_constant_schedule_without_warmup_starts_at_lr():
    s = optim.make_schedule(kind="constant", lr=0.4, steps=100)
    np.testing.assert_allclose([_lr(s, 0), _lr(s, 1000)], [0.4, 0.4], rtol=1e-6)


def test_step_schedule_boundaries_are_absolute_steps():
    s = optim.make_schedule(
        kind="step", lr=1.0, steps=100, warmup_steps=5, boundaries=(30, 60), decay_factor=0.1
    )
    np.testing.assert_allclose(_lr(s, 0), 0.0)
    np.testing.assert_allclose(_lr(s, 5), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 29), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 30), 0.1, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 59), 0.1, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 60), 0.01, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 99), 0.01, rtol=1e-6)


def test_step_schedule_rejects_boundary_inside_warmup():
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule(kind="step", lr=1.0, steps=100, warmup_steps=10, boundaries=(5,))


def test_cosine_schedule_midpoint_and_end():
    lr, steps, warmup, end = 0.8, 110, 10, 0.1
    s = optim.make_schedule(kind="cosine", lr=lr, steps=steps, warmup_steps=warmup,
                            end_lr_factor=end)
    np.testing.assert_allclose(_lr(s, 5), lr / 2, rtol=1e-6)  # mid-warmup
    np.testing.assert_allclose(_lr(s, warmup), lr, rtol=1e-6)
    # Halfway through the decay the cosine factor is 1/2: lr * (end + (1 - end) / 2).
    np.testing.assert_allclose(_lr(s, warmup + 50), lr * (end + (1 - end) / 2), rtol=1e-5)
    # A quarter of the way: (1 + cos(pi/4)) / 2.
    q = (1 + math.cos(math.pi / 4)) / 2
    np.testing.assert_allclose(_lr(s, warmup + 25), lr * (end + (1 - end) * q), rtol=1e-5)
    np.testing.assert_allclose(_lr(s, steps), lr * end, rtol=1e-5)
    np.testing.assert_allclose(_lr(s, steps + 50), lr * end, rtol=1e-5)


def test_cosine_schedule_needs_steps_after_warmup():
    with pytest.raises(ValueError, match="steps"):
        optim.make_schedule(kind="cosine", lr=1.0, steps=10, warmup_steps=10)


def test_unknown_schedule_kind_is_named():
    with pytest.raises(ValueError, match="'linear'.*constant"):
        optim.make_schedule(kind="linear", lr=1.0, steps=10)


# ---- optimizers: hand computations -----------------------------------------------------------

P0 = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([0.5, -1.0])}
G1 = {"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "b": jnp.array([1.0, 2.0])}
G2 = {"w": jnp.array([[-0.5, 0.0], [0.25, 1.0]]), "b": jnp.array([-1.0, 0.5])}


def _run(tx, grads_seq, params=P0):
    """Apply tx for each gradient in turn (gradients fixed, not recomputed); return params."""
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _map(f, *trees):
    return jax.tree.map(f, *trees)


def test_sgd_step_is_p_minus_lr_g():
    lr = 0.1
    got = _run(optim.make_optimizer(name="sgd", learning_rate=lr), [G1])
    _assert_tree_close(got, _map(lambda p, g: p - lr * g, P0, G1), rtol=1e-6)


def test_momentum_two_steps():
    lr, mu = 0.1, 0.9
    got = _run(optim.make_optimizer(name="momentum", learning_rate=lr, momentum=mu), [G1, G2])
    # optax.trace: v1 = g1, v2 = g2 + mu v1; p <- p - lr v.
    v1 = G1
    p1 = _map(lambda p, v: p - lr * v, P0, v1)
    v2 = _map(lambda g, v: g + mu * v, G2, v1)
    p2 = _map(lambda p, v: p - lr * v, p1, v2)
    _assert_tree_close(got, p2, rtol=1e-6)


def test_nesterov_two_steps():
    lr, mu = 0.1, 0.9
    got = _run(optim.make_optimizer(name="nesterov", learning_rate=lr, momentum=mu), [G1, G2])
    # Nesterov as optax.trace(nesterov=True): v_t = g_t + mu v_{t-1}; step -lr (g_t + mu v_t).
    v1 = G1
    p1 = _map(lambda p, g, v: p - lr * (g + mu * v), P0, G1, v1)
    v2 = _map(lambda g, v: g + mu * v, G2, v1)
    p2 = _map(lambda p, g, v: p - lr * (g + mu * v), p1, G2, v2)
    _assert_tree_close(got, p2, rtol=1e-6)
    plain = _run(optim.make_optimizer(name="momentum", learning_rate=lr, momentum=mu), [G1, G2])
    assert not np.allclose(got["w"], plain["w"])


def test_adam_one_step_matches_kingma_ba():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    got = _run(optim.make_optimizer(name="adam", learning_rate=lr, b1=b1, b2=b2, eps=eps), [G1])
    # After bias correction at t=1: m_hat = g, v_hat = g^2, step = -lr g / (|g| + eps).
    _assert_tree_close(got, _map(lambda p, g: p - lr * g / (jnp.abs(g) + eps), P0, G1), rtol=1e-5)


def test_sgd_weight_decay_only_on_matrices_under_default_mask():
    lr, wd = 0.1, 0.5
    tx = optim.make_optimizer(name="sgd", learning_rate=lr, weight_decay=wd)
    got = _run(tx, [G1])
    # Coupled decay: g <- g + wd p for "w" (ndim 2); the bias "b" (ndim 1) is not decayed.
    np.testing.assert_allclose(got["w"], P0["w"] - lr * (G1["w"] + wd * P0["w"]), rtol=1e-6)
    np.testing.assert_allclose(got["b"], P0["b"] - lr * G1["b"], rtol=1e-6)


def test_default_decay_mask():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 3, 8))},
        "bn": {"scale": jnp.zeros(8), "bias": jnp.zeros(8)},
        "dense": {"kernel": jnp.zeros((8, 10)), "bias": jnp.zeros(10)},
    }
    assert optim.default_decay_mask(params) == {
        "conv": {"kernel": True},
        "bn": {"scale": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
    }


def test_coupled_decay_goes_through_momentum():
    # With momentum the decay term enters the velocity: two steps with zero gradient still
    # accumulate decay in v, which a decoupled rule would not.
    lr, mu, wd = 0.1, 0.9, 0.5
    tx = optim.make_optimizer(name="momentum", learning_rate=lr, momentum=mu, weight_decay=wd,
                              decay_mask=None)
    zero = _map(jnp.zeros_like, P0)
    got = _run(tx, [zero, zero])
    v1 = _map(lambda p: wd * p, P0)
    p1 = _map(lambda p, v: p - lr * v, P0, v1)
    v2 = _map(lambda p, v: wd * p + mu * v, p1, v1)
    _assert_tree_close(got, _map(lambda p, v: p - lr * v, p1, v2), rtol=1e-6)


def test_adamw_is_decoupled_and_differs_from_adam_with_l2():
    lr, wd = 0.01, 0.1
    adamw = optim.make_optimizer(name="adamw", learning_rate=lr, weight_decay=wd)
    adam_l2 = optim.make_optimizer(name="adam", learning_rate=lr, weight_decay=wd)
    got_w = _run(adamw, [G1])
    got_l2 = _run(adam_l2, [G1])
    # AdamW, step 1: p - lr * (g / (|g| + eps) + wd p) on decayed leaves; bias undecayed.
    np.testing.assert_allclose(
        got_w["w"], P0["w"] - lr * (G1["w"] / (jnp.abs(G1["w"]) + 1e-8) + wd * P0["w"]), rtol=1e-5
    )
    # Adam + L2, step 1: the decayed gradient is normalised, h = g + wd p; p - lr h / |h|.
    h = G1["w"] + wd * P0["w"]
    np.testing.assert_allclose(got_l2["w"], P0["w"] - lr * h / (jnp.abs(h) + 1e-8), rtol=1e-5)
    assert not np.allclose(got_w["w"], got_l2["w"])
    np.testing.assert_allclose(got_w["b"], got_l2["b"], rtol=1e-6)  # neither decays the bias
    # Same stage order as optax's own AdamW.
    ref = optax.adamw(lr, weight_decay=wd, mask=optim.default_decay_mask)
    _assert_tree_close(_run(adamw, [G1, G2]), _run(ref, [G1, G2]), rtol=1e-6)


def test_grad_clip_caps_the_global_norm():
    big = _map(lambda g: 100.0 * g, G1)
    norm = float(optax.tree.norm(big))
    clip = 1.0
    tx = optim.make_optimizer(name="sgd", learning_rate=1.0, grad_clip_norm=clip)
    state = tx.init(P0)
    updates, _ = tx.update(big, state, P0)
    np.testing.assert_allclose(optax.tree.norm(updates), clip, rtol=1e-5)
    # The direction is kept: updates = -big * clip / norm.
    _assert_tree_close(updates, _map(lambda g: -g * clip / norm, big), rtol=1e-5)
    # A gradient already inside the ball is untouched.
    small, _ = tx.update(_map(lambda g: 1e-3 * g, G1), state, P0)
    _assert_tree_close(small, _map(lambda g: -1e-3 * g, G1), rtol=1e-6)


def test_schedule_drives_the_step_size():
    sched = optim.make_schedule(kind="step", lr=1.0, steps=10, boundaries=(1,), decay_factor=0.5)
    got = _run(optim.make_optimizer(name="sgd", learning_rate=sched), [G1, G1])
    _assert_tree_close(got, _map(lambda p, g: p - 1.0 * g - 0.5 * g, P0, G1), rtol=1e-6)


def test_frozen_leaves_are_unchanged():
    tx = optim.frozen(
        optim.make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.1),
        {"w": False, "b": True},
    )
    got = _run(tx, [G1, G2])
    np.testing.assert_array_equal(got["w"], P0["w"])
    assert not np.allclose(got["b"], P0["b"])
    # The trainable leaf moves exactly as under the plain optimizer.
    plain = _run(optim.make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.1), [G1, G2])
    np.testing.assert_allclose(got["b"], plain["b"], rtol=1e-6)


def test_frozen_accepts_callable_mask_and_jits():
    tx = optim.frozen(
        optim.make_optimizer(name="momentum", learning_rate=0.1, weight_decay=0.1),
        lambda params: jax.tree.map(lambda p: p.ndim == 1, params),
    )
    state = tx.init(P0)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(P0, state, G1)
    np.testing.assert_array_equal(params["w"], P0["w"])
    np.testing.assert_allclose(params["b"], P0["b"] - 0.1 * G1["b"], rtol=1e-6)


def test_optimizers_jit_with_a_schedule():
    sched = optim.make_schedule(kind="cosine", lr=0.1, steps=10, warmup_steps=2)
    for name in optim.OPTIMIZERS:
        tx = optim.make_optimizer(name=name, learning_rate=sched, weight_decay=1e-4,
                                  grad_clip_norm=1.0)
        state = tx.init(P0)
        updates, state = jax.jit(tx.update)(G1, state, P0)
        # Step 0 of a warmup from 0 is a zero step.
        _assert_tree_close(updates, _map(jnp.zeros_like, P0), atol=0)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'rmsprop'.*adamw"):
        optim.make_optimizer(name="rmsprop", learning_rate=0.1)
