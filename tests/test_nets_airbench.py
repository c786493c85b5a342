"""The airbench-style net: shapes, the whitening kernel really whitens, and it stays frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision import optim
from jaxvision.nets import airbench
from nets_testing import count_params, fill_variables


@pytest.mark.parametrize("name", sorted(airbench.VARIANTS))
def test_shapes(name):
    model = airbench.VARIANTS[name](num_classes=10)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    (logits, acts) = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    widths = model.widths
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert acts["whiten"].shape == (2, 31, 31, 24)
    for i, size in enumerate((15, 7, 3)):
        assert acts[f"block_{i}"].shape == (2, size, size, widths[i])
    assert acts["features"].shape == (2, widths[-1])
    # whiten 2*2*3*24 + 24, convs 3x3 without bias, BN scale+offset, head without bias.
    ins = (24, *widths[:-1])
    convs = sum(9 * c_in * w + 9 * w * w + 4 * w for c_in, w in zip(ins, widths))
    assert count_params(variables["params"]) == 2 * 2 * 3 * 24 + 24 + convs + widths[-1] * 10


def test_whitening_kernel_decorrelates_patches():
    rng = np.random.default_rng(0)
    # Correlated "images": smooth noise with channel mixing, so the patch covariance is far
    # from the identity.
    base = rng.standard_normal((64, 17, 17, 3))
    images = (base[:, 1:, 1:] + base[:, :-1, :-1] + 0.5 * base[:, 1:, :-1]) @ np.array(
        [[1.0, 0.5, 0.2], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    kernel = airbench.whitening_kernel(images, eps=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    out = jax.lax.conv_general_dilated(
        jnp.asarray(images, jnp.float32), jnp.asarray(kernel), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    first = np.asarray(out[..., :12], np.float64).reshape(-1, 12)
    cov = np.cov(first, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(12), atol=1e-3)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])


def test_whitening_stays_frozen_through_updates():
    model = airbench.AirbenchTiny(num_classes=10)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    variables = fill_variables(shapes)
    params = variables["params"]
    tx = optim.frozen(optax.sgd(0.1), lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path) != "['whiten']['kernel']", p))
    opt_state = tx.init(params)

    def loss(p):
        (logits, _), _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                     train=True, mutable=["batch_stats"])
        return jnp.sum(logits ** 2)

    new = params
    for _ in range(2):
        updates, opt_state = tx.update(jax.grad(loss)(new), opt_state, new)
        new = optax.apply_updates(new, updates)
    np.testing.assert_array_equal(new["whiten"]["kernel"], params["whiten"]["kernel"])
    assert not np.array_equal(new["whiten"]["bias"], params["whiten"]["bias"])
    assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])
