"""The numeric gradient checker: it accepts right gradients, catches wrong ones, samples the
coordinates it promises, and probes vector-valued functions through a cotangent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import gradcheck


def _point(seed):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3),
            "nested": [rng.standard_normal((2, 2))]}


def _f(tree):
    x = jnp.linspace(-1.0, 1.0, 8, dtype=tree["w"].dtype).reshape(2, 4)
    h = jnp.tanh(x @ tree["w"] + tree["b"][None, :])  # [2, 3]
    return jnp.sum(h ** 2) + jnp.sum(jnp.sin(tree["nested"][0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_numeric_gradient_equals_the_closed_form(seed):
    with jax.enable_x64(True):
        tree = _point(seed)
        numeric = gradcheck.numeric_grad(_f, tree)
        # d/dz sum(sin z) = cos z, known in closed form.
        idx, values = numeric["['nested'][0]"]
        np.testing.assert_array_equal(idx, np.arange(4))
        np.testing.assert_allclose(values, np.cos(tree["nested"][0]).reshape(-1), rtol=1e-8)
        errors = gradcheck.check(_f, tree)  # against jax.grad
    assert set(errors) == {"['w']", "['b']", "['nested'][0]"}
    assert max(errors.values()) < 1e-6


def test_a_wrong_gradient_is_caught_in_the_leaf_where_it_is_wrong():
    with jax.enable_x64(True):
        tree = _point(2)
        grads = jax.grad(_f)(tree)
        wrong = dict(grads, b=grads["b"] * 1.01)  # 1% off in one leaf only
        errors = gradcheck.check(_f, tree, analytic=wrong)
    assert errors["['b']"] > 1e-3
    assert errors["['w']"] < 1e-6 and errors["['nested'][0]"] < 1e-6


def test_sampled_coordinates_are_distinct_seeded_and_bounded():
    with jax.enable_x64(True):
        tree = {"big": np.random.default_rng(3).standard_normal((30, 20))}
        f = lambda t: jnp.sum(t["big"] ** 3)  # noqa: E731
        a = gradcheck.numeric_grad(f, tree, num_samples=7, seed=5)["['big']"]
        b = gradcheck.numeric_grad(f, tree, num_samples=7, seed=5)["['big']"]
        c = gradcheck.numeric_grad(f, tree, num_samples=7, seed=6)["['big']"]
    assert len(a[0]) == 7 and len(set(a[0].tolist())) == 7 and a[0].max() < 600
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    # Round-off of f (a sum of 600 cubes) over 2h bounds the absolute error near 1e-8.
    np.testing.assert_allclose(a[1], 3 * tree["big"].reshape(-1)[a[0]] ** 2, rtol=1e-6, atol=1e-7)


def test_vector_valued_function_through_a_cotangent_is_its_vjp():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = rng.standard_normal((3, 5))
        cot = rng.standard_normal((3, 5))
        numeric = gradcheck.numeric_grad(jnp.tanh, x, cotangent=cot)["<root>"][1]
        _, vjp = jax.vjp(jnp.tanh, x)
        np.testing.assert_allclose(numeric, vjp(cot)[0].reshape(-1), rtol=1e-7, atol=1e-9)
        assert gradcheck.check(jnp.tanh, x, cotangent=cot)["<root>"] < 1e-6


def test_relative_error_is_the_course_measure():
    np.testing.assert_allclose(gradcheck.relative_error([1.0, 0.0, -2.0], [1.1, 0.0, -2.0]),
                               [0.1 / 2.1, 0.0, 0.0])


def test_mismatched_analytic_tree_is_named():
    with jax.enable_x64(True):
        tree = _point(0)
        with pytest.raises(ValueError, match="analytic gradient has leaves"):
            gradcheck.check(_f, tree, analytic={"w": tree["w"]})
