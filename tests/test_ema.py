"""jaxvision.ema: the recurrence against a hand loop, the warmup formula, the limits of the decay,
debiasing, and the train-step wrapper."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import ema


def random_params(rng):
    return {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
            "scale": rng.normal(size=())}


@pytest.mark.parametrize("seed,warmup", [(0, False), (1, True)])
def test_ema_matches_a_hand_recurrence_for_50_steps(seed, warmup):
    rng = np.random.default_rng(seed)
    decay = float(rng.uniform(0.8, 0.99))
    trajectory = [random_params(rng) for _ in range(51)]
    with jax.enable_x64(True):
        update = jax.jit(lambda e, p, t: ema.ema_update(e, p, decay=decay,
                                                        step=t if warmup else None))
        average = ema.ema_init(trajectory[0])
        expected = jax.tree.map(np.copy, trajectory[0])
        for t in range(50):
            average = update(average, trajectory[t + 1], jnp.asarray(t))
            d = min(decay, (1 + t) / (10 + t)) if warmup else decay
            expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, trajectory[t + 1])
        chex.assert_trees_all_close(average, expected, rtol=1e-12, atol=1e-12)


def test_warmup_formula():
    steps = np.arange(0, 2000, 7)
    got = np.asarray(jax.jit(lambda s: ema.ema_decay(0.999, s))(steps))
    np.testing.assert_allclose(got, np.minimum(0.999, (1 + steps) / (10 + steps)), rtol=1e-6)
    assert float(ema.ema_decay(0.999, 0)) == pytest.approx(0.1)
    assert float(ema.ema_decay(0.5)) == 0.5


def test_decay_zero_gives_the_params_and_one_freezes():
    rng = np.random.default_rng(2)
    a, b = random_params(rng), random_params(rng)
    start = ema.ema_init(a)
    chex.assert_trees_all_equal(ema.ema_update(start, b, decay=0.0),
                                jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), b))
    chex.assert_trees_all_equal(ema.ema_update(start, b, decay=1.0), start)
    with pytest.raises(ValueError, match="decay must be in"):
        ema.ema_update(start, b, decay=1.5)
    with pytest.raises(ValueError, match="differ in tree structure"):
        ema.ema_update(start, {"other": b["scale"]}, decay=0.5)


def test_debiased_zero_start_recovers_constant_params():
    params = random_params(np.random.default_rng(3))
    with jax.enable_x64(True):
        average = ema.ema_init(params, zeros=True)
        for t in range(1, 6):
            average = ema.ema_update(average, params, decay=0.9)
            chex.assert_trees_all_close(ema.ema_debiased(average, decay=0.9, num_updates=t),
                                        params, rtol=1e-12)


def test_bfloat16_params_are_averaged_in_float32():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    average = ema.ema_init(params)
    assert average["w"].dtype == jnp.float32
    state = {"params": params, "ema": ema.ema_update(average, {"w": params["w"] * 2}, decay=0.9)}
    out = ema.with_ema_params(state)
    assert out["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["params"]["w"], np.float32), 1.1, rtol=1e-2)


def test_with_ema_wraps_a_train_step():
    def sgd_step(state, batch):
        # A stand-in for train.make_classifier_step: rebuilds the state without "ema".
        params = jax.tree.map(lambda p: p - 0.1 * batch, state["params"])
        return {"step": state["step"] + 1, "params": params}, {"loss": jnp.sum(batch)}

    with jax.enable_x64(True):
        state = ema.add_ema({"step": jnp.asarray(0), "params": {"w": jnp.arange(3.0)}})
        step = jax.jit(ema.with_ema(sgd_step, decay=0.95))
        expected = np.arange(3.0)
        params = np.arange(3.0)
        rng = np.random.default_rng(4)
        for t in range(20):
            batch = rng.normal(size=(3,))
            state, metrics = step(state, jnp.asarray(batch))
            params = params - 0.1 * batch
            d = min(0.95, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * params
        assert int(state["step"]) == 20
        np.testing.assert_allclose(state["params"]["w"], params, rtol=1e-12)
        np.testing.assert_allclose(state["ema"]["w"], expected, rtol=1e-12)
        np.testing.assert_allclose(ema.with_ema_params(state)["params"]["w"], expected,
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="has no 'ema'"):
        ema.with_ema(sgd_step, decay=0.9)({"step": 0, "params": {}}, 0.0)
