"""jaxvision.nets: shapes, named activations, BatchNorm and dropout behaviour, dtypes, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.nets.convnet import ConvNet, ConvNetTiny
from jaxvision.nets.mlp import MLP, MLPTiny
from nets_testing import count_params, fill_variables

B, H, W, C, K = 4, 8, 8, 3, 10


def _images(seed=0, *, batch=B):
    # numpy, not jax.random: compiling jax's normal sampler costs ~1 s on this CPU machine.
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, H, W, C)), jnp.float32)


def _shapes(model, x):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


_count = count_params


def _variables(model, x, seed=0):
    """Variables with the exact tree, shapes and dtypes of `model.init`, filled from numpy."""
    return fill_variables(_shapes(model, x), seed)


# Dropout and dtype are not part of the variables, so ConvNetTiny(dense_width=8, dropout=...,
# dtype=...) and MLP(..., dropout=...) all share these.
CONV_KW = dict(dense_width=8)
MLP_KW = dict(hidden_sizes=(16, 12), num_classes=K)


@pytest.fixture(scope="module")
def conv_vars():
    return _variables(ConvNetTiny(**CONV_KW), _images())


@pytest.fixture(scope="module")
def mlp_vars():
    return _variables(MLP(**MLP_KW), _images())


# ---- MLP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_mlp_shapes_and_acts(train, mlp_vars):
    model = MLP(**MLP_KW)
    logits, acts = model.apply(mlp_vars, _images(), train=train)
    assert logits.shape == (B, K)
    assert set(acts) == {"hidden_0", "hidden_1", "logits"}
    assert acts["hidden_0"].shape == (B, 16) and acts["hidden_1"].shape == (B, 12)
    assert (acts["hidden_0"] >= 0).all()  # post-ReLU
    np.testing.assert_array_equal(acts["logits"], logits)


def test_mlp_param_count():
    variables = _shapes(MLPTiny(), _images())
    d = H * W * C
    assert _count(variables["params"]) == (d * 16 + 16) + (16 * K + K)


def test_mlp_dropout_differs_across_rngs_in_train_and_is_off_in_eval(mlp_vars):
    model = MLP(**MLP_KW, dropout=0.5)
    x, variables = _images(), mlp_vars
    apply = jax.jit(model.apply, static_argnames="train")
    a, _ = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    a2, _ = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)
    e1, _ = apply(variables, x, train=False)
    e2, _ = apply(variables, x, train=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(e1, e2)
    # Without dropout the eval output is the network without the Dropout layer at all.
    no_drop = MLP(**MLP_KW, dropout=0.0)
    np.testing.assert_allclose(no_drop.apply(variables, x, train=False)[0], e1, rtol=1e-6)


def test_mlp_train_with_dropout_needs_the_dropout_rng(mlp_vars):
    model = MLP(**MLP_KW, dropout=0.5)
    with pytest.raises(Exception, match="dropout"):
        model.apply(mlp_vars, _images(), train=True)


# ---- ConvNet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_convnet_shapes_and_acts(train, conv_vars):
    model = ConvNetTiny(**CONV_KW)
    x = _images()
    (logits, acts), _ = model.apply(conv_vars, x, train=train, mutable=["batch_stats"])
    assert logits.shape == (B, K) and logits.dtype == jnp.float32
    assert set(acts) == {"block_0", "block_1", "features", "logits"}
    assert acts["block_0"].shape == (B, H // 2, W // 2, 8)
    assert acts["block_1"].shape == (B, H // 4, W // 4, 16)
    assert acts["features"].shape == (B, 16)
    # features is the global average pool of the last block.
    np.testing.assert_allclose(acts["features"], acts["block_1"].mean(axis=(1, 2)), rtol=1e-5)


def test_convnet_tiny_param_count_by_hand():
    variables = _shapes(ConvNetTiny(), _images())
    conv0 = 3 * 3 * C * 8  # no conv bias: BatchNorm follows
    bn0 = 2 * 8  # scale + bias
    conv1 = 3 * 3 * 8 * 16
    bn1 = 2 * 16
    head = 16 * K + K
    assert _count(variables["params"]) == conv0 + bn0 + conv1 + bn1 + head == 1586
    # Running mean and variance live apart, in "batch_stats".
    assert _count(variables["batch_stats"]) == 2 * 8 + 2 * 16


def test_convnet_structure_with_convs_per_block_and_dense():
    model = ConvNet(widths=(4, 6), convs_per_block=2, dense_width=5, num_classes=3)
    params = _shapes(model, _images())["params"]
    assert set(params) == {
        "conv_0_0", "bn_0_0", "conv_0_1", "bn_0_1",
        "conv_1_0", "bn_1_0", "conv_1_1", "bn_1_1",
        "dense", "head",
    }
    assert params["conv_0_1"]["kernel"].shape == (3, 3, 4, 4)
    assert params["conv_1_0"]["kernel"].shape == (3, 3, 4, 6)
    assert params["dense"]["kernel"].shape == (6, 5) and params["head"]["kernel"].shape == (5, 3)


def test_batchnorm_stats_update_only_in_train_and_eval_is_deterministic(conv_vars):
    model = ConvNetTiny(**CONV_KW)
    x = 3.0 + 2.0 * _images(1)  # far from the initial running stats (mean 0, var 1)
    variables = conv_vars
    old = variables["batch_stats"]

    _, new_train = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old, new_train["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # momentum 0.9: mean <- 0.9 * mean + 0.1 * batch mean; first layer sees the raw conv output.
    params = variables["params"]
    conv0 = jax.lax.conv_general_dilated(
        x, params["conv_0_0"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        new_train["batch_stats"]["bn_0_0"]["mean"], 0.1 * conv0.mean(axis=(0, 1, 2)),
        rtol=1e-4, atol=1e-5,
    )

    _, new_eval = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, old, new_eval["batch_stats"])

    e1, _ = model.apply(variables, x, train=False)
    e2, _ = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(e1, e2)
    # Eval uses running stats, so an example's output does not depend on the rest of the batch.
    e_first, _ = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(e_first, e1[:1], rtol=1e-5, atol=1e-6)


def test_convnet_dropout_differs_across_rngs_in_train_and_is_off_in_eval(conv_vars):
    model = ConvNetTiny(**CONV_KW, dropout=0.5)
    x, variables = _images(), conv_vars

    def train_logits(seed):
        (logits, _), _ = model.apply(
            variables, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )
        return logits

    assert not np.allclose(train_logits(1), train_logits(2))
    np.testing.assert_array_equal(train_logits(1), train_logits(1))
    e1, _ = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})
    e2, _ = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(e1, e2)


def test_bfloat16_compute_keeps_float32_params_and_logits(conv_vars):
    model = ConvNetTiny(**CONV_KW, dtype=jnp.bfloat16)
    x, variables = _images(), conv_vars
    shapes = _shapes(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    (logits, acts), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert acts["block_0"].dtype == jnp.bfloat16
    assert acts["features"].dtype == jnp.float32
    # The convs themselves run in bfloat16 (not float32 with a cast afterwards); the head in f32.
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))
    conv_outs = [ln.split("=")[0] for ln in jaxpr.splitlines() if "conv_general_dilated[" in ln]
    assert len(conv_outs) == 2 and all("bf16[" in out for out in conv_outs)
    # Close to the float32 net with the same parameters (bfloat16 has ~3 significant digits).
    ref, _ = ConvNetTiny(**CONV_KW).apply(variables, x, train=False)
    got, _ = model.apply(variables, x, train=False)
    np.testing.assert_allclose(got, ref, atol=0.1, rtol=0.1)


def test_jitted_train_and_eval_apply(conv_vars):
    model = ConvNetTiny(**CONV_KW)
    x, variables = _images(), conv_vars

    @jax.jit
    def train_apply(variables, x):
        (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    @jax.jit
    def eval_apply(variables, x):
        return model.apply(variables, x, train=False)[0]

    logits, stats = train_apply(variables, x)
    (ref, _), ref_updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats, ref_updates["batch_stats"])
    assert eval_apply(variables, x).shape == (B, K)
