"""jaxvision.nets.resnet: parameter counts of every variant against their sources, shapes,
option-A/B shortcuts, stochastic depth, zero-init, and a real forward/backward of the tiny net.

Every variant is only traced (`jax.eval_shape`): the big ImageNet nets cost no compile. Real
computation runs on the tiny net and on single blocks, with one jitted function per test.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.losses import softmax_cross_entropy
from jaxvision.nets import resnet as R
from nets_testing import count_params, fill_variables

KEY = jax.random.key(0)
B = 2


_count = count_params


def _trace(model, shape, batch=B):
    """`(variables, (logits, acts))` as ShapeDtypeStructs, traced only (no compile, no
    allocation). `init_with_output` runs the same `__call__(x, train=False)` as `apply` does in
    eval, in one trace instead of two (tracing the deep nets is most of this file's time)."""

    def init(x):
        outputs, variables = model.init_with_output(
            {"params": KEY, "dropout": KEY}, x, train=False
        )
        return variables, outputs

    return jax.eval_shape(init, jax.ShapeDtypeStruct((batch, *shape), jnp.float32))


@functools.cache
def _variant(name):
    return _trace(R.VARIANTS[name](), R.INPUT_SHAPES[name])


def _images(shape, seed=0, batch=B):
    # numpy, not jax.random: compiling jax's normal sampler costs ~1 s on the CPU machine.
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)), jnp.float32)


def _fill(shapes, seed=0):
    """Concrete variables from numpy (see `nets_testing.fill_variables`)."""
    return fill_variables(shapes, seed)


# ---- Every variant: parameter counts and shapes (tracing only) -------------------------------

# What this code computes for the variants whose source rounds, pinned so that a change shows.
EXACT = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "preact_resnet110": 1_727_962,
    "preact_resnet164": 1_703_258,
    "wrn_16_8": 10_961_370,
    "wrn_28_10": 36_479_194,
    "wrn_40_4": 8_949_210,
}


def test_tables_cover_every_variant():
    for table in (R.PUBLISHED_PARAMS, R.PUBLISHED_PARAMS_TOLERANCE, R.INPUT_SHAPES, R.NUM_CLASSES):
        assert set(table) == set(R.VARIANTS)


@pytest.mark.parametrize("name", list(R.VARIANTS))
def test_param_count_matches_the_published_one(name):
    variables, _ = _variant(name)
    count = _count(variables["params"])
    published, tol = R.PUBLISHED_PARAMS[name], R.PUBLISHED_PARAMS_TOLERANCE[name]
    assert abs(count - published) <= tol, (name, count, published)
    if tol:  # a rounded source: pin the exact count too
        assert count == EXACT[name]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


@pytest.mark.parametrize("name", list(R.VARIANTS))
def test_output_shapes_and_acts(name):
    _, (logits, acts) = _variant(name)
    model = R.VARIANTS[name]()
    h, w, _ = R.INPUT_SHAPES[name]
    assert model.num_classes == R.NUM_CLASSES[name]
    assert logits.shape == (B, R.NUM_CLASSES[name]) and logits.dtype == jnp.float32
    stages = len(model.stage_sizes)
    stage_names = {f"stage_{i}" for i in range(1, stages + 1)}
    assert set(acts) == {"stem", "features", "logits"} | stage_names
    # ImageNet stem: /4 (conv stride 2 + pool stride 2); CIFAR stem keeps the resolution.
    down = 4 if model.stem == "imagenet" else 1
    assert acts["stem"].shape == (B, h // down, w // down, model.stem_width)
    out = model.block.expansion
    for i in range(stages):
        s = down * 2**i
        assert acts[f"stage_{i + 1}"].shape == (B, h // s, w // s, model.widths[i] * out)
    assert acts["features"].shape == (B, model.widths[-1] * out)
    assert acts["features"].dtype == jnp.float32 and acts["logits"].shape == logits.shape


def test_imagenet_stage_resolutions_are_torchvisions():
    _, (_, acts) = _variant("resnet50")
    assert [acts[f"stage_{i}"].shape[1:] for i in range(1, 5)] == [
        (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)
    ]


def test_cifar_resnet_counts_by_hand_option_a():
    """He et al. 2016 section 4.2, option A: only convs, BNs and the head carry parameters."""

    def by_hand(n):
        conv = lambda cin, cout: 9 * cin * cout  # noqa: E731
        bn = lambda c: 2 * c  # noqa: E731
        block = lambda cin, c: conv(cin, c) + conv(c, c) + 2 * bn(c)  # noqa: E731
        stem = conv(3, 16) + bn(16)
        stage_1 = n * block(16, 16)
        # The first block of stages 2 and 3 widens (c/2 -> c); the n - 1 others keep c.
        stage_2 = block(16, 32) + (n - 1) * block(32, 32)
        stage_3 = block(32, 64) + (n - 1) * block(64, 64)
        return stem + stage_1 + stage_2 + stage_3 + 64 * 10 + 10

    for depth in (20, 32, 44, 56, 110):
        count = _count(_variant(f"resnet{depth}")[0]["params"])
        assert count == by_hand((depth - 2) // 6) == EXACT[f"resnet{depth}"]


def test_option_a_shortcut_has_no_parameters_and_option_b_projects():
    params_a = _variant("resnet20")[0]["params"]
    assert not any("shortcut" in jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path(params_a))
    params_b = _trace(R.cifar_resnet(20, shortcut="B")(), (32, 32, 3))[0]["params"]
    # Projections only where the shape changes: the first block of stages 2 and 3.
    with_shortcut = sorted(k for k, v in params_b.items() if "shortcut_conv" in v)
    assert with_shortcut == ["stage_2_block_1", "stage_3_block_1"]
    assert params_b["stage_2_block_1"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)
    # 1x1 convs 16->32 and 32->64 with their BN: the 272,474 often quoted for ResNet-20 is option B.
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert _count(params_b) == _count(params_a) + extra == 272_474


def test_parameter_paths_are_named_and_torchvision_shaped():
    params = _variant("resnet50")[0]["params"]
    block = params["stage_2_block_1"]
    assert set(block) == {"conv_1", "bn_1", "conv_2", "bn_2", "conv_3", "bn_3",
                          "shortcut_conv", "shortcut_bn"}
    assert block["conv_2"]["kernel"].shape == (3, 3, 128, 128)
    assert block["conv_3"]["kernel"].shape == (1, 1, 128, 512)
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    assert params["head"]["kernel"].shape == (2048, 1000)
    assert "stage_4_block_3" in params and "stage_4_block_4" not in params
    # Pre-activation: no stem BN, a final BN, projections without BN (WRN's code).
    wrn = _variant("wrn_16_8")[0]["params"]
    assert "stem_bn" not in wrn and wrn["final_bn"]["scale"].shape == (512,)
    assert set(wrn["stage_1_block_1"]) == {"bn_1", "conv_1", "bn_2", "conv_2", "shortcut_conv"}
    assert set(wrn["stage_1_block_2"]) == {"bn_1", "conv_1", "bn_2", "conv_2"}


def _convs(fn, *args):
    """`(window_strides, padding, kernel shape)` of every conv in `fn`'s jaxpr (tracing only)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append((tuple(eqn.params["window_strides"]), tuple(eqn.params["padding"]),
                              tuple(eqn.invars[1].aval.shape)))
            for value in eqn.params.values():  # nested programs (pjit, custom_jvp, ...)
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bottleneck_strides_its_3x3_conv_with_torch_padding():
    """ResNet v1.5 (torchvision): stride 2 on the 3x3 conv, symmetric padding 1 (not SAME's
    (0, 1)), and the 1x1 projection strided too."""
    block = R.Bottleneck(features=8, strides=2)
    x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
    variables = jax.eval_shape(lambda x: block.init(KEY, x, train=False), x)
    convs = _convs(lambda v, x: block.apply(v, x, train=False), variables, x)
    assert sorted(convs) == sorted([
        ((1, 1), ((0, 0), (0, 0)), (1, 1, 16, 8)),
        ((2, 2), ((1, 1), (1, 1)), (3, 3, 8, 8)),
        ((1, 1), ((0, 0), (0, 0)), (1, 1, 8, 32)),
        ((2, 2), ((0, 0), (0, 0)), (1, 1, 16, 32)),
    ])


def test_drop_path_rates_increase_linearly_to_the_last_block():
    """Huang et al. 2016, eq. 4: drop rate `rate * l / L`, l = 1..L through the whole net."""
    rates = R.drop_path_rates((3, 3, 3), 0.5)
    np.testing.assert_allclose(sum(rates, []), [0.5 * l / 9 for l in range(1, 10)])
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, R.BasicBlock) and context.method_name == "__call__":
            seen[context.module.name] = context.module.drop_path_rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _trace(R.cifar_resnet(20, drop_path_rate=0.5)(), (32, 32, 3), batch=1)
    assert seen == {f"stage_{i}_block_{j}": 0.5 * (3 * (i - 1) + j) / 9
                    for i in (1, 2, 3) for j in (1, 2, 3)}


def test_bad_configurations_fail_with_a_message():
    shape = (32, 32, 3)
    with pytest.raises(ValueError, match="stem"):
        _trace(R.ResNetTiny(stem="cifar10"), shape)
    with pytest.raises(ValueError, match="shortcut"):
        _trace(R.ResNetTiny(shortcut="C"), shape)
    with pytest.raises(ValueError, match="drop_path_rate"):
        _trace(R.ResNetTiny(drop_path_rate=1.0), shape)
    with pytest.raises(ValueError, match="2 widths"):
        _trace(R.ResNetTiny(widths=(8, 16)), shape)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        R.cifar_resnet(21)
    with pytest.raises(ValueError, match="9n \\+ 2"):
        R.cifar_resnet(32, block=R.PreActBottleneck)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        R.wide_resnet(27, 10)


# ---- Real computation: the tiny net ----------------------------------------------------------

TINY_SHAPE = (32, 32, 3)


def test_tiny_param_count_by_hand():
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731
    stem = conv(3, 8) + 2 * 8
    stage_1 = 2 * conv(8, 8) + 2 * 2 * 8
    stage_2 = conv(8, 16) + conv(16, 16) + 2 * 2 * 16
    stage_3 = conv(16, 32) + conv(32, 32) + 2 * 2 * 32
    head = 32 * 10 + 10
    count = _count(_variant("resnet_tiny")[0]["params"])
    assert count == stem + stage_1 + stage_2 + stage_3 + head == 19_218


@pytest.fixture(scope="module")
def tiny_vars():
    # Filled from numpy: a real init of even the tiny net compiles for 5-25 s on the 2-core
    # machine (flax's RNG); initial values are tested on single blocks below.
    return _fill(_variant("resnet_tiny")[0])


@functools.partial(jax.jit, static_argnums=0)
def _eval(model, variables, x):
    """Eval logits and the batch_stats after an eval apply (which must not change them)."""
    (logits, _), updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def test_tiny_forward_backward_in_float32_and_bfloat16_updates_batch_stats(tiny_vars):
    x, labels = _images(TINY_SHAPE, seed=1), jnp.array([3, 7])

    def step(model, variables, x):
        def loss_fn(params):
            (logits, acts), updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x,
                train=True, mutable=["batch_stats"],
            )
            loss = softmax_cross_entropy(logits=logits, labels=labels).mean()
            return loss, (logits, acts, updates["batch_stats"])

        return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

    step = jax.jit(step, static_argnums=0)
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        (loss, (logits, acts, stats)), grads = results[dtype] = step(
            R.ResNetTiny(dtype=dtype), tiny_vars, x
        )
        assert logits.shape == (B, 10) and logits.dtype == jnp.float32
        assert acts["stage_1"].dtype == dtype and acts["features"].dtype == jnp.float32
        assert np.isfinite(loss) and 0.1 < float(loss) < 20.0
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert g.dtype == jnp.float32 and np.isfinite(g).all(), path
            assert np.abs(g).max() > 0, path  # every parameter receives gradient
        changed = jax.tree.map(lambda a, b: not np.allclose(a, b), tiny_vars["batch_stats"], stats)
        assert all(jax.tree.leaves(changed))
    # bfloat16 (~3 significant digits) stays close to float32 with the same parameters.
    (_, (ref, *_)), ref_grads = results[jnp.float32]
    (_, (got, *_)), got_grads = results[jnp.bfloat16]
    np.testing.assert_allclose(got, ref, atol=0.15, rtol=0.1)
    np.testing.assert_allclose(got_grads["head"]["bias"], ref_grads["head"]["bias"], atol=0.05)
    # The convs really run in bfloat16 (not float32 with a cast afterwards).
    model = R.ResNetTiny(dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(tiny_vars, x))
    outs = [ln.split("=")[0] for ln in jaxpr.splitlines() if "conv_general_dilated[" in ln]
    assert len(outs) == 7 and all("bf16[" in out for out in outs)


def test_tiny_eval_is_deterministic_per_example_and_leaves_batch_stats(tiny_vars):
    x = _images(TINY_SHAPE, seed=2, batch=3)
    model = R.ResNetTiny()
    e1, stats = _eval(model, tiny_vars, x)
    np.testing.assert_array_equal(_eval(model, tiny_vars, x)[0], e1)
    jax.tree.map(np.testing.assert_array_equal, stats, tiny_vars["batch_stats"])
    # Running statistics: an example's output does not depend on the rest of the batch.
    other = x.at[1:].set(_images(TINY_SHAPE, seed=7, batch=2))
    np.testing.assert_allclose(_eval(model, tiny_vars, other)[0][0], e1[0], rtol=1e-5, atol=1e-6)
    # Stochastic depth and dropout are off in eval, with no rescaling of the branches.
    noisy = R.ResNetTiny(drop_path_rate=0.5, dropout_rate=0.5)
    np.testing.assert_array_equal(_eval(noisy, tiny_vars, x)[0], e1)


def test_tiny_stochastic_depth_rngs_matter_only_in_train(tiny_vars):
    model = R.ResNetTiny(drop_path_rate=0.5)
    x = _images(TINY_SHAPE, seed=3, batch=4)
    train = jax.jit(lambda v, x, key: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0][0])
    a, b = train(tiny_vars, x, jax.random.key(1)), train(tiny_vars, x, jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, train(tiny_vars, x, jax.random.key(1)))
    with pytest.raises(Exception, match="dropout"):
        model.apply(tiny_vars, x, train=True, mutable=["batch_stats"])


# ---- Real computation: single blocks ---------------------------------------------------------


def test_stochastic_depth_zeroes_whole_branches_per_example():
    """A pre-activation block with identity shortcut returns `x + branch * mask / keep`: each
    example gets exactly `x` (dropped) or `x + 2 * branch` (kept, keep = 0.5)."""
    x = _images((4, 4, 4), seed=4, batch=8)
    shapes = jax.eval_shape(lambda x: R.PreActBasicBlock(4).init(KEY, x, train=False), x)
    variables = _fill(shapes)

    @functools.partial(jax.jit, static_argnums=0)
    def apply(rate, x, key):
        block = R.PreActBasicBlock(4, drop_path_rate=rate)
        out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": key})
        return out, block.apply(variables, x, train=False, rngs={"dropout": key})

    full, full_eval = apply(0.0, x, jax.random.key(0))
    branch = full - x  # batch statistics do not depend on the drop mask
    assert (np.abs(branch).reshape(8, -1).max(axis=1) > 1e-2).all()
    masks = []
    for seed in range(3):
        out, out_eval = apply(0.5, x, jax.random.key(seed))
        dropped = np.array([np.array_equal(out[i], x[i]) for i in range(8)])
        kept = ~dropped
        np.testing.assert_allclose(out[kept], (x + 2 * branch)[kept], rtol=1e-5, atol=1e-5)
        masks.append(tuple(dropped))
        # Eval: the whole branch, whatever the rng, equal to the net without stochastic depth.
        np.testing.assert_array_equal(out_eval, full_eval)
    assert any(any(m) for m in masks) and any(not all(m) for m in masks)
    assert len(set(masks)) > 1  # the dropped examples depend on the rng


# Flax's init with the default threefry key compiles for seconds even for one block on the 2-core
# machine; the "rbg" key implementation (XLA's RngBitGenerator) compiles in about a second.
RBG_KEY = jax.random.key(0, impl="rbg")


def test_initial_state_zero_init_residual_and_option_a_shortcut():
    """A real init. Post-activation block, option A, zero-init bn_2: the branch is 0 at init,
    so the output is relu of the subsampled, zero-padded input."""
    x = _images((6, 6, 4), seed=5)
    assert R.ResNetTiny().zero_init_residual is False  # torchvision's default
    block = R.BasicBlock(8, strides=2, shortcut="A", zero_init_residual=True)

    @jax.jit
    def init_and_apply(key, x):
        variables = block.init(key, x, train=False)
        return variables, block.apply(variables, x, train=False)

    variables, out = init_and_apply(RBG_KEY, x)
    params = variables["params"]
    assert set(params) == {"conv_1", "bn_1", "conv_2", "bn_2"}  # no shortcut parameters
    np.testing.assert_array_equal(params["bn_2"]["scale"], np.zeros(8))
    np.testing.assert_array_equal(params["bn_1"]["scale"], np.ones(8))
    np.testing.assert_array_equal(variables["batch_stats"]["bn_1"]["var"], np.ones(8))
    # He et al. 2015 normal init, fan-out (torchvision): std sqrt(2 / (3 * 3 * 8)).
    kernel = np.asarray(params["conv_2"]["kernel"])
    assert abs(kernel.std() / np.sqrt(2 / 72) - 1) < 0.1 and abs(kernel.mean()) < 0.05
    expected = np.zeros((B, 3, 3, 8), np.float32)
    expected[..., :4] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
    np.testing.assert_array_equal(out, expected)


def test_preact_zero_init_residual_zeroes_the_last_conv_and_the_branch_still_learns():
    x = _images((4, 4, 4), seed=6)
    block = R.PreActBasicBlock(4, zero_init_residual=True)

    @jax.jit
    def init_apply_grad(key, x):
        variables = block.init(key, x, train=False)
        apply = lambda p: block.apply({**variables, "params": p}, x, train=False)  # noqa: E731
        grads = jax.grad(lambda p: jnp.sum(apply(p) * x))(variables["params"])
        return variables, apply(variables["params"]), grads

    variables, out, grads = init_apply_grad(RBG_KEY, x)
    np.testing.assert_array_equal(variables["params"]["conv_2"]["kernel"], np.zeros((3, 3, 4, 4)))
    np.testing.assert_array_equal(variables["params"]["bn_2"]["scale"], np.ones(4))
    np.testing.assert_array_equal(out, x)  # the block starts as the identity
    assert np.abs(grads["conv_2"]["kernel"]).max() > 0  # and its branch is not dead
