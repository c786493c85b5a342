"""GoogLeNet (Inception v1) and DenseNet: parameter counts and shapes of every variant from
`jax.eval_shape` (no compile, no allocation), the auxiliary heads and their loss, the pooling
helpers, and real forward/backward runs of the tiny variants in float32 and bfloat16."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import losses
from jaxvision.nets import densenet, googlenet
from nets_testing import count_params, fill_variables

FAMILIES = {"googlenet": googlenet, "densenet": densenet}
ALL_VARIANTS = [(family, name) for family, mod in FAMILIES.items() for name in mod.VARIANTS]
BATCH = 2


_count = count_params


def _model(family, name, **kw):
    mod = FAMILIES[family]
    return mod.VARIANTS[name](num_classes=mod.NUM_CLASSES[name], **kw)


@functools.lru_cache(maxsize=None)
def _abstract(family, name):
    """(variables, (logits, acts) of an eval apply on a batch of 2) as ShapeDtypeStructs.

    Tracing is the whole cost here (DenseNet-201 has ~500 submodules), so it is done once per
    variant and shared by the count and shape tests. For DenseNet, `init_with_output` (init
    runs the forward pass with train=False) gives the eval outputs in the same trace; GoogLeNet
    takes another path in init (it runs the aux heads there to create their parameters), so its
    eval apply is traced on its own.
    """
    model = _model(family, name)
    shape = FAMILIES[family].INPUT_SHAPES[name]
    key = jax.random.key(0)

    def init_and_apply():
        x = jnp.zeros((BATCH, *shape))
        out, variables = model.init_with_output({"params": key, "dropout": key}, x,
                                                train=False)
        if family == "googlenet":
            out = model.apply(variables, x, train=False)
        return variables, out

    return jax.eval_shape(init_and_apply)


# ---- Parameter counts ----------------------------------------------------------------------


@pytest.mark.parametrize("family,name", ALL_VARIANTS)
def test_param_count_equals_published(family, name):
    variables, _ = _abstract(family, name)
    assert _count(variables["params"]) == FAMILIES[family].PUBLISHED_PARAMS[name]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_densenet_bc_100_rounds_to_the_papers_0_8m():
    # Huang et al. 2017, Table 2, DenseNet-BC (L=100, k=12): "0.8M", a figure rounded to 0.1M.
    variables, _ = _abstract("densenet", "densenet_bc_100_k12")
    assert 750_000 <= _count(variables["params"]) < 850_000


def _conv_bn(cin, cout, k=1):
    return k * k * cin * cout + 2 * cout  # no conv bias; BN scale and offset


def _googlenet_count(*, stem_k, stem_widths, stages, aux_in, aux_width=128, aux_hidden=1024,
                     classes):
    """GoogLeNet's parameters by hand: stem, Inception modules, head, aux heads (aux_in: the
    channels feeding each aux head; empty for none)."""
    w1, w2, w3 = stem_widths
    n = _conv_bn(3, w1, stem_k) + _conv_bn(w1, w2) + _conv_bn(w2, w3, 3)
    c = w3
    for stage in stages:
        for a, b_red, b, c_red, cc, p in stage:
            n += (_conv_bn(c, a) + _conv_bn(c, b_red) + _conv_bn(b_red, b, 3)
                  + _conv_bn(c, c_red) + _conv_bn(c_red, cc, 3) + _conv_bn(c, p))
            c = a + b + cc + p
    n += c * classes + classes
    for cin in aux_in:
        n += (_conv_bn(cin, aux_width) + 16 * aux_width * aux_hidden + aux_hidden
              + aux_hidden * classes + classes)
    return n


def _densenet_count(*, k, blocks, c0, bn_size=4, stem, classes):
    n = 7 * 7 * 3 * c0 + 2 * c0 if stem == "imagenet" else 3 * 3 * 3 * c0
    c = c0
    for i, layers in enumerate(blocks):
        for _ in range(layers):
            n += 2 * c + c * bn_size * k + 2 * bn_size * k + 9 * bn_size * k * k
            c += k
        if i < len(blocks) - 1:
            n += 2 * c + c * (c // 2)
            c //= 2
    return n + 2 * c + c * classes + classes


def test_hand_counts_agree_with_the_published_table():
    """Counting by hand reproduces torchvision's figures, and gives the tiny and CIFAR ones."""
    g, d = googlenet, densenet
    full = dict(stem_widths=(64, 64, 192), stages=g.IMAGENET_STAGES)
    assert _googlenet_count(stem_k=7, aux_in=(512, 528), classes=1000, **full) == \
        g.PUBLISHED_PARAMS["googlenet"]
    assert _googlenet_count(stem_k=7, aux_in=(), classes=1000, **full) == \
        g.PUBLISHED_PARAMS["googlenet_no_aux"]
    assert _googlenet_count(stem_k=3, aux_in=(512, 528), classes=10, **full) == \
        g.PUBLISHED_PARAMS["googlenet_cifar"]
    tiny = g.GoogLeNetTiny()
    assert _googlenet_count(stem_k=3, stem_widths=tiny.stem_widths, stages=tiny.stages,
                            aux_in=(24, 24), aux_width=8, aux_hidden=16, classes=10) == \
        g.PUBLISHED_PARAMS["googlenet_tiny"]

    for name, blocks in [("densenet121", (6, 12, 24, 16)), ("densenet169", (6, 12, 32, 32)),
                         ("densenet201", (6, 12, 48, 32))]:
        assert _densenet_count(k=32, blocks=blocks, c0=64, stem="imagenet", classes=1000) == \
            d.PUBLISHED_PARAMS[name]
    assert _densenet_count(k=12, blocks=(16, 16, 16), c0=24, stem="cifar", classes=10) == \
        d.PUBLISHED_PARAMS["densenet_bc_100_k12"]
    assert _densenet_count(k=4, blocks=(2, 2), c0=8, bn_size=2, stem="cifar", classes=10) == \
        d.PUBLISHED_PARAMS["densenet_tiny"]


# ---- Output shapes ---------------------------------------------------------------------------


def _expected_act_keys(family, name):
    model = _model(family, name)
    if family == "googlenet":
        modules = [n for stage in model._module_names() for n in stage]
    else:
        modules = [f"block_{i}" for i in range(1, len(model.block_config) + 1)]
    return {"stem", *modules, "features", "logits"}


@pytest.mark.parametrize("family,name", ALL_VARIANTS)
def test_eval_output_shapes_and_acts(family, name):
    _, (logits, acts) = _abstract(family, name)
    classes = FAMILIES[family].NUM_CLASSES[name]
    assert logits.shape == (BATCH, classes) and logits.dtype == jnp.float32
    # In evaluation GoogLeNet returns no aux logits, even with aux_logits=True.
    assert set(acts) == _expected_act_keys(family, name)
    assert acts["logits"].shape == (BATCH, classes) and acts["features"].dtype == jnp.float32
    assert acts["features"].shape[0] == BATCH and len(acts["features"].shape) == 2


def _spatial(acts):
    return {k: v.shape[1:] for k, v in acts.items() if len(v.shape) == 4}


def test_googlenet_224_shapes_follow_torchvision():
    # torchvision's shapes (ceil-mode pools: 224 -> 112 -> 56 -> 28 -> 14 -> 7).
    _, (_, acts) = _abstract("googlenet", "googlenet")
    shapes = _spatial(acts)
    assert shapes["stem"] == (28, 28, 192)
    assert shapes["inception_3a"] == (28, 28, 256) and shapes["inception_3b"] == (28, 28, 480)
    assert [shapes[f"inception_4{c}"] for c in "abcde"] == [
        (14, 14, 512), (14, 14, 512), (14, 14, 512), (14, 14, 528), (14, 14, 832)]
    assert shapes["inception_5a"] == (7, 7, 832) and shapes["inception_5b"] == (7, 7, 1024)
    assert acts["features"].shape == (BATCH, 1024)
    # The CIFAR stem does not downsample: inception 3a at 32x32.
    _, (_, cifar) = _abstract("googlenet", "googlenet_cifar")
    assert _spatial(cifar)["inception_3a"] == (32, 32, 256)
    assert _spatial(cifar)["inception_5b"] == (8, 8, 1024)


def test_densenet_shapes():
    _, (_, acts) = _abstract("densenet", "densenet121")
    assert _spatial(acts) == {"stem": (56, 56, 64), "block_1": (56, 56, 256),
                              "block_2": (28, 28, 512), "block_3": (14, 14, 1024),
                              "block_4": (7, 7, 1024)}
    for name, width in [("densenet169", 1664), ("densenet201", 1920),
                        ("densenet_bc_100_k12", 342)]:
        assert _abstract("densenet", name)[1][1]["features"].shape == (BATCH, width)
    _, (_, cifar) = _abstract("densenet", "densenet_bc_100_k12")
    # 24 + 16 * 12 = 216 -> transition 108 (+192 = 300) -> 150 (+192 = 342).
    assert _spatial(cifar) == {"stem": (32, 32, 24), "block_1": (32, 32, 216),
                               "block_2": (16, 16, 300), "block_3": (8, 8, 342)}


# ---- GoogLeNet's auxiliary heads -------------------------------------------------------------


def _train_acts(model):
    """(params, acts of a train-mode apply) as ShapeDtypeStructs, for a 32x32 input."""
    key = jax.random.key(0)

    def run():
        x = jnp.zeros((BATCH, 32, 32, 3))
        variables = model.init({"params": key, "dropout": key}, x[:1], train=False)
        (_, acts), _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": key})
        return variables["params"], acts

    return jax.eval_shape(run)


def test_aux_logits_only_when_asked_and_in_training():
    # The full net's aux heads: created by init (train=False), after 4a (512 ch) and 4d (528).
    params = _abstract("googlenet", "googlenet")[0]["params"]
    assert params["aux_1"]["conv"]["conv"]["kernel"].shape == (1, 1, 512, 128)
    assert params["aux_2"]["conv"]["conv"]["kernel"].shape == (1, 1, 528, 128)
    assert params["aux_1"]["fc_1"]["kernel"].shape == (4 * 4 * 128, 1024)
    assert params["aux_2"]["fc_2"]["kernel"].shape == (1024, 1000)
    assert not {"aux_1", "aux_2"} & set(_abstract("googlenet", "googlenet_no_aux")[0]["params"])
    # In training the aux logits come back in acts (in eval they do not:
    # test_eval_output_shapes_and_acts); without aux heads, neither.
    params, acts = _train_acts(googlenet.GoogLeNetTiny())
    assert {"aux_1", "aux_2"} <= set(params) and {"aux_1", "aux_2"} <= set(acts)
    for name in ("aux_1", "aux_2"):
        assert acts[name].shape == (BATCH, 10) and acts[name].dtype == jnp.float32
    params, acts = _train_acts(googlenet.GoogLeNetTiny(aux_logits=False))
    assert not {"aux_1", "aux_2"} & (set(params) | set(acts))


def test_googlenet_loss_adds_weighted_aux_losses():
    rng = np.random.default_rng(0)
    logits, aux_1, aux_2 = (jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
                            for _ in range(3))
    labels = jnp.asarray([0, 3, 4])

    def xent(z):  # by hand, in float64
        z = np.asarray(z, np.float64)
        log_p = z - z.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        return -log_p[np.arange(3), np.asarray(labels)]

    acts = {"aux_1": aux_1, "aux_2": aux_2, "features": jnp.zeros((3, 7))}
    got = googlenet.googlenet_loss(logits=logits, acts=acts, labels=labels,
                                   loss_fn=losses.softmax_cross_entropy)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, xent(logits) + 0.3 * (xent(aux_1) + xent(aux_2)),
                               rtol=1e-5)
    assert googlenet.auxiliary_loss_weight == 0.3
    heavier = googlenet.googlenet_loss(logits=logits, acts=acts, labels=labels,
                                       loss_fn=losses.softmax_cross_entropy, aux_weight=1.0)
    np.testing.assert_allclose(heavier, xent(logits) + xent(aux_1) + xent(aux_2), rtol=1e-5)
    # Without aux logits (evaluation, or aux_logits=False) it is the main loss alone.
    main_only = googlenet.googlenet_loss(logits=logits, acts={"logits": logits}, labels=labels,
                                         loss_fn=losses.softmax_cross_entropy)
    np.testing.assert_allclose(main_only, xent(logits), rtol=1e-5)


def test_bad_configurations_raise():
    x = jnp.zeros((1, 32, 32, 3))

    def init(model):
        return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    with pytest.raises(ValueError, match="stem must be"):
        init(googlenet.GoogLeNetTiny(stem="cifar10"))
    with pytest.raises(ValueError, match="stem must be"):
        init(densenet.DenseNetTiny(stem="big"))
    with pytest.raises(ValueError, match="aux_after"):
        init(googlenet.GoogLeNetTiny(aux_after=("inception_4a", "inception_4e")))
    # Without aux heads the names do not matter.
    init(googlenet.GoogLeNetTiny(aux_logits=False, aux_after=("nope", "nope")))


# ---- Real forward/backward of the tiny variants ----------------------------------------------

# DenseNetTiny with dropout, so that the train-mode rng has something to do (dropout is not a
# variable: the variables are those of DenseNetTiny()).
TINY = {"googlenet": googlenet.GoogLeNetTiny,
        "densenet": functools.partial(densenet.DenseNetTiny, drop_rate=0.2)}
TINY_SHAPE = (32, 32, 3)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _images(seed=0):
    # numpy, not jax.random: compiling jax's normal sampler costs ~1 s on the CPU machine.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((BATCH, *TINY_SHAPE)), jnp.float32)


LABELS = jnp.asarray([1, 7])



def _fast_compile_options() -> dict:
    """XLA:CPU options that cut the compile time of these tests' programs ~5x.

    Compiling, not running, is the cost here (the tiny GoogLeNet's backward pass has ~30
    conv-BN-ReLU units, 6 max-pools and 2 aux heads), and these tests check numbers, not speed:
    XLA's legacy elemental emitters and no LLVM optimisation compile the same program in a
    fifth of the time (measured on the 2-core CPU machine: 11 s -> 2 s). XLA renames its debug
    options between releases, so only the options this jaxlib accepts are kept (an unknown
    one is an error at compile time).
    """
    wanted = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
    known = {}
    for name, value in wanted.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
        except Exception:  # jaxlib raises JaxRuntimeError("No such compile option ...")
            continue
        known[name] = value
    return known


_jit = functools.partial(jax.jit, compiler_options=_fast_compile_options())


@functools.lru_cache(maxsize=None)
def _tiny_variables(family):
    """Variables with `init`'s exact tree, shapes and dtypes, filled from numpy (compiling
    flax's init RNG costs seconds per net here); BN running variances positive."""
    model = TINY[family]()
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           jnp.zeros((1, *TINY_SHAPE)), train=False))
    return fill_variables(shapes)


@functools.lru_cache(maxsize=None)
def _train_step(family, dtype_name, **kw):
    """A jitted training objective with its gradient: GoogLeNet trains with its aux losses."""
    model = TINY[family](dtype=DTYPES[dtype_name], **dict(kw))

    @_jit
    def step(variables, x, labels, key):
        def objective(params):
            (logits, acts), new = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                mutable=["batch_stats"], rngs={"dropout": key})
            per_example = googlenet.googlenet_loss(logits=logits, acts=acts, labels=labels,
                                                   loss_fn=losses.softmax_cross_entropy)
            return per_example.mean(), (logits, acts, new["batch_stats"])

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
        return loss, grads, aux

    return step


@functools.lru_cache(maxsize=None)
def _eval_apply(family):
    model = TINY[family]()
    return _jit(lambda v, x, key: model.apply(v, x, train=False, rngs={"dropout": key}))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["googlenet", "densenet"])
def test_tiny_train_step_forward_backward(family, dtype_name):
    variables = _tiny_variables(family)
    loss, grads, (logits, acts, stats) = _train_step(family, dtype_name)(
        variables, _images(), LABELS, jax.random.key(1))
    assert np.isfinite(loss) and logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
    assert acts["features"].dtype == jnp.float32
    assert acts["stem"].dtype == DTYPES[dtype_name]  # computation in the asked dtype
    # Every parameter, the aux heads' included (their losses are in the objective), gets a
    # finite, nonzero float32 gradient.
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert g.dtype == jnp.float32 and np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    if family == "googlenet":
        assert acts["aux_1"].shape == acts["aux_2"].shape == (BATCH, 10)
        assert acts["aux_1"].dtype == acts["aux_2"].dtype == jnp.float32
    # train=True updates every BatchNorm's running statistics.
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], stats)
    assert all(jax.tree.leaves(changed))
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])


@pytest.mark.parametrize("family", ["googlenet", "densenet"])
def test_tiny_bfloat16_close_to_float32_with_float32_params(family):
    model = TINY[family](dtype=jnp.bfloat16)
    x = _images()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables, key = _tiny_variables(family), jax.random.key(1)
    # Same variables, same dropout masks (they do not depend on the dtype).
    f32 = _train_step(family, "float32")(variables, x, LABELS, key)
    bf16 = _train_step(family, "bfloat16")(variables, x, LABELS, key)
    np.testing.assert_allclose(bf16[0], f32[0], rtol=0.05)
    np.testing.assert_allclose(bf16[2][0], f32[2][0], atol=0.15, rtol=0.1)
    # The convolutions themselves run in bfloat16, not float32 with a cast afterwards.
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))
    conv_outs = [ln.split("=")[0] for ln in jaxpr.splitlines() if "conv_general_dilated[" in ln]
    assert conv_outs and all("bf16[" in out for out in conv_outs)


@pytest.mark.parametrize("family", ["googlenet", "densenet"])
def test_tiny_eval_is_deterministic_and_dropout_rng_matters_only_in_train(family):
    variables, x = _tiny_variables(family), _images()
    step = _train_step(family, "float32")
    loss_1 = step(variables, x, LABELS, jax.random.key(1))[0]
    loss_2 = step(variables, x, LABELS, jax.random.key(2))[0]
    assert loss_1 != loss_2
    assert step(variables, x, LABELS, jax.random.key(1))[0] == loss_1

    evaluate = _eval_apply(family)
    e1, acts = evaluate(variables, x, jax.random.key(1))
    e2, _ = evaluate(variables, x, jax.random.key(2))
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(acts["logits"], e1)
    assert "aux_1" not in acts and "aux_2" not in acts  # GoogLeNet: aux heads train-only
    # Eval uses the running statistics (and does not write them: apply without `mutable`
    # would raise), so an example's output does not depend on the rest of the batch.
    e_first, _ = evaluate(variables, x[:1], jax.random.key(1))
    np.testing.assert_allclose(e_first, e1[:1], rtol=1e-5, atol=1e-5)


def test_densenet_memory_efficient_is_the_same_function():
    variables, x, key = _tiny_variables("densenet"), _images(), jax.random.key(1)
    plain = _train_step("densenet", "float32")(variables, x, LABELS, key)
    remat = _train_step("densenet", "float32", memory_efficient=True)(variables, x, LABELS, key)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 remat[1], plain[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 remat[2][2], plain[2][2])
