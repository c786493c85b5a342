"""Classic CNNs: LeNet-5, AlexNet / ZFNet, VGG, Network in Network, SqueezeNet.

Every variant: parameter count against the file's PUBLISHED_PARAMS and output/activation shapes,
both from `jax.eval_shape` (nothing compiled or allocated). Real forward/backward passes only for
the small nets (LeNet-5 and the tiny variants) on batch-2 inputs, in float32 and bfloat16. The
pooling/normalisation helpers are checked against slow numpy references written from their
definitions (torchvision's adaptive-pool bins, PyTorch/Caffe ceil-mode pooling, the AlexNet
paper's LRN formula).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision.nets import alexnet, lenet, nin, squeezenet, vgg
from jaxvision.nets.layers import (
    adaptive_avg_pool,
    ceil_mode_padding,
    local_response_norm,
    max_pool_ceil,
)
from nets_testing import count_params, fill_variables

FAMILIES = {"lenet": lenet, "alexnet": alexnet, "vgg": vgg, "nin": nin, "squeezenet": squeezenet}
ALL_VARIANTS = [
    pytest.param(family, name, id=name) for family, mod in FAMILIES.items() for name in mod.VARIANTS
]
B = 2  # batch size of every shape check and real run

# Real runs are tiny: compiling dominates their cost, and XLA's backend optimisations (which do
# not change results beyond float rounding) double the compile time on the 2-core CPU machine.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


_count = count_params


def _model(family: str, name: str, **kw):
    mod = FAMILIES[family]
    return mod.VARIANTS[name](num_classes=mod.NUM_CLASSES[name], **kw)


def _input_shape(family: str, name: str) -> tuple[int, int, int]:
    return FAMILIES[family].INPUT_SHAPES[name]


@functools.lru_cache(maxsize=None)
def _abstract(family: str, name: str):
    """(variables, (logits, acts)) as ShapeDtypeStructs: init at batch 1, eval apply at batch B."""
    model = _model(family, name)
    shape = _input_shape(family, name)
    key = jax.random.key(0)

    def init_and_apply():
        variables = model.init({"params": key, "dropout": key}, jnp.zeros((1, *shape)),
                               train=False)
        return variables, model.apply(variables, jnp.zeros((B, *shape)), train=False)

    return jax.eval_shape(init_and_apply)


def _images(shape, *, batch=B, seed=0):
    # numpy, not jax.random: compiling jax's sampler costs ~1 s on the 2-core CPU machine.
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)), jnp.float32)


def _fill(abstract, seed=0):
    """Concrete variables from numpy, He-scaled kernels (see `nets_testing.fill_variables`)."""
    return fill_variables(abstract, seed, gain=np.sqrt(2.0))


# ---- the tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_variant_tables_are_complete(family):
    mod = FAMILIES[family]
    names = set(mod.VARIANTS)
    assert set(mod.PUBLISHED_PARAMS) == names
    assert set(mod.INPUT_SHAPES) == names
    assert set(mod.NUM_CLASSES) == names
    assert all(name == name.lower() for name in names)
    assert any("tiny" in name for name in names) or family == "lenet"  # LeNet is tiny already


@pytest.mark.parametrize("family, name", ALL_VARIANTS)
def test_param_count_equals_reference(family, name):
    variables, _ = _abstract(family, name)
    assert _count(variables["params"]) == FAMILIES[family].PUBLISHED_PARAMS[name]
    # Parameters stay float32 whatever the computation dtype.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def _expected_acts(family: str, name: str) -> dict[str, tuple[int, ...]]:
    """Documented activation shapes (without the batch axis), written out independently of the
    nets' code (map sizes from the papers / torchvision)."""
    mod = FAMILIES[family]
    k = mod.NUM_CLASSES[name]
    if family == "lenet":
        return {"c1": (28, 28, 6), "s2": (14, 14, 6), "c3": (10, 10, 16), "s4": (5, 5, 16),
                "c5": (120,), "f6": (84,), "features": (84,), "logits": (k,)}
    if family == "alexnet":
        convs, hidden = {
            "alexnet": ([(27, 64), (13, 192), (13, 384), (13, 256), (6, 256)], 4096),
            "alexnet_lrn": ([(27, 64), (13, 192), (13, 384), (13, 256), (6, 256)], 4096),
            # Zeiler & Fergus 2013, Figure 3: 110 -> 55, 26 -> 13, 13, 13, 13 -> 6.
            "zfnet": ([(55, 96), (13, 256), (13, 384), (13, 384), (6, 256)], 4096),
            "alexnet_tiny": ([(11, 16), (5, 32), (5, 48), (5, 32), (2, 32)], 64),
        }[name]
        acts = {f"conv_{i}": (s, s, c) for i, (s, c) in enumerate(convs, start=1)}
        side, channels = convs[-1]
        return acts | {"pool": (side, side, channels), "fc_6": (hidden,), "fc_7": (hidden,),
                       "features": (hidden,), "logits": (k,)}
    if family == "vgg":
        model = _model(family, name)
        h = _input_shape(family, name)[0]
        acts = {f"stage_{i}": (h >> i, h >> i, widths[-1])
                for i, widths in enumerate(model.stages, start=1)}
        c, s = model.stages[-1][-1], model.pooled_size
        acts |= {"pool": (s, s, c), "features": (model.hidden[-1] if model.hidden else s * s * c,),
                 "logits": (k,)}
        acts |= {f"fc_{len(model.stages) + 1 + j}": (w,) for j, w in enumerate(model.hidden)}
        return acts
    if family == "nin":
        w = {"nin_cifar10": (96, 192, 192), "nin_tiny": (16, 16, 16)}[name]
        return {"block_1": (16, 16, w[0]), "block_2": (8, 8, w[1]), "block_3": (8, 8, w[2]),
                "features": (w[2],), "class_maps": (8, 8, k), "logits": (k,)}
    if family == "squeezenet":
        # torchvision's sizes at 224: 1.0 conv1 109 -> pool 54 -> 27 -> 13; 1.1: 111 -> 55 -> 27
        # -> 13 (ceil-mode pools). Tiny at 32: 15 -> 7 -> 3.
        stem, fires = {
            "squeezenet1_0": ((54, 96), [(54, 128), (54, 128), (54, 256), (27, 256), (27, 384),
                                          (27, 384), (27, 512), (13, 512)]),
            "squeezenet1_1": ((55, 64), [(55, 128), (55, 128), (27, 256), (27, 256), (13, 384),
                                          (13, 384), (13, 512), (13, 512)]),
            "squeezenet_tiny": ((7, 16), [(7, 16), (7, 16), (3, 32), (3, 32)]),
        }[name]
        acts = {f"fire_{i}": (s, s, c) for i, (s, c) in enumerate(fires, start=2)}
        side, c = fires[-1]
        return acts | {"stem": (stem[0], stem[0], stem[1]), "features": (c,),
                       "class_maps": (side, side, k), "logits": (k,)}
    raise AssertionError(family)


@pytest.mark.parametrize("family, name", ALL_VARIANTS)
def test_output_and_activation_shapes(family, name):
    _, (logits, acts) = _abstract(family, name)
    assert logits.shape == (B, FAMILIES[family].NUM_CLASSES[name])
    assert logits.dtype == jnp.float32
    assert acts["features"].dtype == jnp.float32 and acts["logits"].dtype == jnp.float32
    expected = _expected_acts(family, name)
    assert {a: v.shape[1:] for a, v in acts.items()} == expected
    assert all(v.shape[0] == B for v in acts.values())


# ---- parameter counts by hand ------------------------------------------------------------------


def _conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out


def _dense(d_in, d_out):
    return d_in * d_out + d_out


def test_lenet5_count_by_hand_full_c3_connectivity():
    params = _abstract("lenet", "lenet5")[0]["params"]
    by_layer = {layer: _count(p) for layer, p in params.items()}
    assert by_layer == {"c1": _conv(5, 1, 6), "c3": _conv(5, 6, 16), "c5": _conv(5, 16, 120),
                        "f6": _dense(120, 84), "head": _dense(84, 10)}
    assert by_layer == {"c1": 156, "c3": 2_416, "c5": 48_120, "f6": 10_164, "head": 850}
    # C3 fully connected: every one of the 16 maps sees all 6 S2 maps (the paper's Table I
    # scheme would have 6 maps x 3 inputs + 9 x 4 + 1 x 6 = 60 input maps: 60 * 25 + 16 = 1,516).
    assert params["c3"]["kernel"].shape == (5, 5, 6, 16)
    assert sum(by_layer.values()) == 61_706


def test_zfnet_count_by_hand():
    params = _abstract("alexnet", "zfnet")[0]["params"]
    expected = {"conv_1": _conv(7, 3, 96), "conv_2": _conv(5, 96, 256),
                "conv_3": _conv(3, 256, 384), "conv_4": _conv(3, 384, 384),
                "conv_5": _conv(3, 384, 256), "fc_6": _dense(6 * 6 * 256, 4096),
                "fc_7": _dense(4096, 4096), "head": _dense(4096, 1000)}
    assert {layer: _count(p) for layer, p in params.items()} == expected
    assert params["conv_1"]["kernel"].shape == (7, 7, 3, 96)
    assert sum(expected.values()) == 62_357_608


def test_alexnet_layers_match_torchvision():
    params = _abstract("alexnet", "alexnet")[0]["params"]
    shapes = {layer: p["kernel"].shape for layer, p in params.items()}
    assert shapes == {"conv_1": (11, 11, 3, 64), "conv_2": (5, 5, 64, 192),
                      "conv_3": (3, 3, 192, 384), "conv_4": (3, 3, 384, 256),
                      "conv_5": (3, 3, 256, 256), "fc_6": (9216, 4096), "fc_7": (4096, 4096),
                      "head": (4096, 1000)}


def test_tiny_counts_by_hand():
    tiny = {
        ("alexnet", "alexnet_tiny"): _conv(11, 3, 16) + _conv(5, 16, 32) + _conv(3, 32, 48)
        + _conv(3, 48, 32) + _conv(3, 32, 32) + _dense(2 * 2 * 32, 64) + _dense(64, 64)
        + _dense(64, 10),
        # conv + BN (scale, offset) per conv; fc_4 on the 2x2x16 pooled map.
        ("vgg", "vgg_tiny"): _conv(3, 3, 8) + 2 * 8 + _conv(3, 8, 16) + 2 * 16
        + 2 * (_conv(3, 16, 16) + 2 * 16) + _dense(2 * 2 * 16, 32) + _dense(32, 10),
        ("nin", "nin_tiny"): _conv(5, 3, 16) + 2 * _conv(1, 16, 16) + _conv(5, 16, 16)
        + 2 * _conv(1, 16, 16) + _conv(3, 16, 16) + _conv(1, 16, 16) + _conv(1, 16, 10),
        # Fire: squeeze 1x1, expand 1x1 + expand 3x3 (from the squeeze width).
        ("squeezenet", "squeezenet_tiny"): _conv(3, 3, 16)
        + 2 * (_conv(1, 16, 4) + _conv(1, 4, 8) + _conv(3, 4, 8))
        + (_conv(1, 16, 8) + _conv(1, 8, 16) + _conv(3, 8, 16))
        + (_conv(1, 32, 8) + _conv(1, 8, 16) + _conv(3, 8, 16)) + _conv(1, 32, 10),
    }
    for (family, name), count in tiny.items():
        assert FAMILIES[family].PUBLISHED_PARAMS[name] == count, name
        assert _count(_abstract(family, name)[0]["params"]) == count, name


def test_nin_count_by_hand():
    params = _abstract("nin", "nin_cifar10")[0]["params"]
    expected = {"block_1_conv": _conv(5, 3, 192), "block_1_mlp_1": _conv(1, 192, 160),
                "block_1_mlp_2": _conv(1, 160, 96), "block_2_conv": _conv(5, 96, 192),
                "block_2_mlp_1": _conv(1, 192, 192), "block_2_mlp_2": _conv(1, 192, 192),
                "block_3_conv": _conv(3, 192, 192), "block_3_mlp_1": _conv(1, 192, 192),
                "head": _conv(1, 192, 10)}
    assert {layer: _count(p) for layer, p in params.items()} == expected
    assert sum(expected.values()) == 966_986


@pytest.mark.parametrize("depth", ["11", "13", "16", "19"])
def test_vgg_bn_adds_scale_and_offset_per_conv_channel(depth):
    plain = _abstract("vgg", f"vgg{depth}")[0]
    bn, cifar = _abstract("vgg", f"vgg{depth}_bn")[0], _abstract("vgg", f"vgg{depth}_bn_cifar")[0]
    channels = sum(sum(widths) for widths in _model("vgg", f"vgg{depth}").stages)
    assert _count(bn["params"]) - _count(plain["params"]) == 2 * channels
    assert _count(bn["batch_stats"]) == 2 * channels and "batch_stats" not in plain
    # torchvision keeps the (redundant) conv bias before BN: that is its reference count.
    assert "bias" in bn["params"]["stage_1_conv_1"]
    # CIFAR form: the same conv stack + BN, and Linear(512, 10) instead of the three dense layers.
    dense = _dense(7 * 7 * 512, 4096) + _dense(4096, 4096) + _dense(4096, 1000)
    assert _count(cifar["params"]) == _count(bn["params"]) - dense + _dense(512, 10)
    assert set(cifar["params"]) == {p for p in bn["params"] if not p.startswith("fc_")}


def test_squeezenet_fire_structure():
    params = _abstract("squeezenet", "squeezenet1_1")[0]["params"]
    assert set(params) == {"conv_1", "head"} | {f"fire_{i}" for i in range(2, 10)}
    assert {k: v["kernel"].shape for k, v in params["fire_9"].items()} == {
        "squeeze": (1, 1, 512, 64), "expand_1x1": (1, 1, 64, 256), "expand_3x3": (3, 3, 64, 256)}
    assert params["conv_1"]["kernel"].shape == (3, 3, 3, 64)
    assert _abstract("squeezenet", "squeezenet1_0")[0]["params"]["conv_1"]["kernel"].shape == (
        7, 7, 3, 96)


# ---- helpers against numpy references ----------------------------------------------------------


def _adaptive_ref(x, h, w):
    """torchvision's AdaptiveAvgPool2d: bin i spans [floor(i*H/h), ceil((i+1)*H/h))."""
    _, hh, ww, _ = x.shape
    out = np.zeros((x.shape[0], h, w, x.shape[3]))
    for i in range(h):
        r0, r1 = math.floor(i * hh / h), math.ceil((i + 1) * hh / h)
        for j in range(w):
            c0, c1 = math.floor(j * ww / w), math.ceil((j + 1) * ww / w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("size, out", [((7, 7), 7), ((14, 14), 7), ((13, 13), 6), ((5, 5), 7),
                                       ((1, 1), 7), ((10, 6), (3, 4)), ((8, 8), 1)])
def test_adaptive_avg_pool_matches_torchvision_bins(size, out):
    x = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
    h, w = (out, out) if isinstance(out, int) else out
    got = _jit(adaptive_avg_pool, static_argnums=1)(jnp.asarray(x), out)
    np.testing.assert_allclose(got, _adaptive_ref(x, h, w), rtol=1e-5, atol=1e-6)


def _pool_ref(x, k, s, reduce):
    """Ceil-mode pooling with windows clipped to the input (Caffe: max, and mean over the
    in-image pixels; PyTorch max with ceil_mode=True)."""
    def out_size(n):
        o = math.ceil((n - k) / s) + 1
        return o - 1 if (o - 1) * s >= n else o

    ho, wo = out_size(x.shape[1]), out_size(x.shape[2])
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = reduce(x[:, i * s:i * s + k, j * s:j * s + k], axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [110, 26, 13, 16, 15, 3])
def test_ceil_mode_pools_match_reference(size):
    x = np.random.default_rng(size).standard_normal((2, size, size + 1, 4)).astype(np.float32)
    got, got_avg = _jit(lambda x: (max_pool_ceil(x, 3, 2), nin.avg_pool_3x3_s2(x)))(x)
    np.testing.assert_array_equal(got, _pool_ref(x, 3, 2, np.max))
    np.testing.assert_allclose(got_avg, _pool_ref(x, 3, 2, np.mean), rtol=1e-5, atol=1e-6)


def test_ceil_mode_padding_sizes():
    def out(n, k, s):
        return (n + ceil_mode_padding(n, k, s) - k) // s + 1

    # ZFNet (Figure 3): 110 -> 55, 26 -> 13, 13 -> 6; SqueezeNet: 109 -> 54, 111 -> 55.
    assert [out(n, 3, 2) for n in (110, 26, 13, 109, 111, 55, 27)] == [55, 13, 6, 54, 55, 27, 13]
    # PyTorch drops a last window that would start past the input: 5 -> 2 with k=1, s=3.
    assert out(5, 1, 3) == 2 and ceil_mode_padding(5, 1, 3) == 0


def _lrn_ref(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
    c = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for i in range(c):
        lo, hi = max(0, i - size // 2), min(c, i + size // 2 + 1)
        out[..., i] = x[..., i] / (k + alpha * np.sum(x[..., lo:hi] ** 2, axis=-1)) ** beta
    return out


def test_local_response_norm_matches_paper_formula():
    x = 30.0 * np.random.default_rng(0).standard_normal((2, 3, 3, 9)).astype(np.float32)
    got = local_response_norm(jnp.asarray(x))
    np.testing.assert_allclose(got, _lrn_ref(x), rtol=1e-5)
    got = local_response_norm(jnp.asarray(x), size=3, k=1.0, alpha=1e-2, beta=0.5)
    np.testing.assert_allclose(got, _lrn_ref(x, 3, 1.0, 1e-2, 0.5), rtol=1e-5)
    # bfloat16 in, bfloat16 out (computed in float32 inside).
    assert local_response_norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_lrn_only_in_the_lrn_variants():
    def has_lrn(name):
        model, shape = _model("alexnet", name), _input_shape("alexnet", name)
        variables = _abstract("alexnet", name)[0]
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
            variables, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
        return "reduce_window_sum" in str(jaxpr)

    assert not has_lrn("alexnet") and has_lrn("alexnet_lrn") and has_lrn("zfnet")


# ---- LeNet specifics ---------------------------------------------------------------------------


def test_lenet_mnist_padding_equals_lenet_on_padded_digits():
    variables = _fill(_abstract("lenet", "lenet5")[0])
    x28 = _images((28, 28, 1))

    @_jit
    def apply_all(variables, x28):
        padded = jnp.pad(x28, ((0, 0), (2, 2), (2, 2), (0, 0)))
        return (lenet.LeNet5MNIST().apply(variables, x28, train=False),
                lenet.LeNet5().apply(variables, padded, train=False),
                lenet.LeNet5ReLU().apply(variables, padded, train=False))

    (got, _), (ref, ref_acts), (relu, relu_acts) = apply_all(variables, x28)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Same variables, other nonlinearity/pooling: a different function.
    assert not np.allclose(relu, ref)
    assert (relu_acts["c1"] >= 0).all() and (np.abs(ref_acts["c1"]) <= 1).all()
    # s2 is the 2x2 average (tanh form) or max (ReLU form) of c1.
    c1 = np.asarray(ref_acts["c1"]).reshape(B, 14, 2, 14, 2, 6)
    np.testing.assert_allclose(ref_acts["s2"], c1.mean(axis=(2, 4)), rtol=1e-5, atol=1e-6)
    c1 = np.asarray(relu_acts["c1"]).reshape(B, 14, 2, 14, 2, 6)
    np.testing.assert_array_equal(relu_acts["s2"], c1.max(axis=(2, 4)))


def test_lenet_rejects_inputs_that_do_not_reach_c5_as_5x5():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="first_padding=2 for 28x28"):
        jax.eval_shape(lambda: lenet.LeNet5().init(jax.random.key(0), x, train=False))


# ---- real forward/backward on the small nets ---------------------------------------------------

# (family, variant, extra kwargs): LeNet-5 itself is small; the rest use their tiny variants.
# AlexNet-tiny runs with the paper's LRN so that it is differentiated for real too.
REAL = {
    "lenet5": ("lenet", "lenet5", {}),
    "alexnet_tiny": ("alexnet", "alexnet_tiny", {"lrn": True}),
    "vgg_tiny": ("vgg", "vgg_tiny", {}),
    "nin_tiny": ("nin", "nin_tiny", {}),
    "squeezenet_tiny": ("squeezenet", "squeezenet_tiny", {}),
}
HAS_DROPOUT = {"alexnet_tiny", "vgg_tiny", "nin_tiny", "squeezenet_tiny"}


@functools.lru_cache(maxsize=None)
def _real(name: str, dtype_name: str):
    """A jitted train-mode forward/backward (one compile per net and dtype), run on a batch of
    2 with dropout keys 1, 2 and 1 again.

    Returns (model, variables, x, step, runs) where `step(variables, x, key)` gives (loss,
    logits, grads, new batch_stats, acts) and `runs` holds its outputs for the three keys.
    """
    family, variant, kw = REAL[name]
    model = _model(family, variant, dtype=jnp.dtype(dtype_name), **kw)
    variables = _fill(_abstract(family, variant)[0])
    x = 3.0 + _images(_input_shape(family, variant), seed=1)  # off the running stats (0, 1)
    labels = jnp.arange(B) % model.num_classes

    @_jit
    def step(variables, x, key):
        def loss_fn(params):
            (logits, acts), updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": key})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, acts, updates)

        (loss, (logits, acts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"])
        return loss, logits, grads, updates.get("batch_stats", {}), acts

    runs = [step(variables, x, jax.random.key(seed)) for seed in (1, 2, 1)]
    return model, variables, x, step, runs


@pytest.mark.parametrize("name", REAL)
def test_real_forward_backward_float32(name):
    _, variables, x, step, runs = _real(name, "float32")
    loss, logits, grads, _, acts = runs[0]
    assert logits.dtype == jnp.float32 and np.isfinite(loss) and np.isfinite(logits).all()
    np.testing.assert_array_equal(acts["logits"], logits)
    # Every parameter tensor receives a finite, non-zero gradient: the whole net is connected.
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert g.dtype == jnp.float32 and np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    # Gradient check: a central difference of the loss along a direction d (half the gradient's
    # direction, half random) matches <grad, d>. Same dropout key, so the same function.
    # (numpy arithmetic: eager jax ops would each compile.)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(np.asarray, grads)
    g_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    d = jax.tree.map(lambda g: g / g_norm + rng.standard_normal(g.shape) / 300.0, grads)
    expected = sum(np.sum(g * v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
    h = 1e-3

    def loss_at(sign):
        params = jax.tree.map(lambda p, v: jnp.asarray(np.asarray(p) + sign * h * v, p.dtype),
                              variables["params"], d)
        return float(step({**variables, "params": params}, x, jax.random.key(1))[0])

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * h)
    np.testing.assert_allclose(numeric, expected, rtol=1e-2)


@pytest.mark.parametrize("name", REAL)
def test_dropout_rng_matters_in_train(name):
    *_, (a, b, a_again) = _real(name, "float32")
    # Same key, same result.
    np.testing.assert_array_equal(a[1], a_again[1])
    if name in HAS_DROPOUT:
        assert not np.allclose(a[1], b[1])
    else:  # LeNet: no dropout, nothing random.
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("name", REAL)
def test_real_forward_backward_bfloat16(name):
    model, variables, x, _, runs = _real(name, "bfloat16")
    loss, logits, grads, _, acts = runs[0]
    ref = _real(name, "float32")[4][0][1]  # float32 net, same variables and dropout key
    assert logits.dtype == jnp.float32 and acts["features"].dtype == jnp.float32
    assert np.isfinite(loss)
    # float32 params get float32 gradients, finite.
    assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # Close to the float32 net with the same parameters (bfloat16 keeps ~3 significant digits).
    scale = np.abs(ref).max()
    np.testing.assert_allclose(logits, ref, atol=0.05 * scale + 1e-3, rtol=0.05)
    # The convs run in bfloat16 (not float32 with a cast afterwards), except NIN's float32 head.
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))
    outs = [ln.split("=")[0] for ln in jaxpr.splitlines() if "conv_general_dilated[" in ln]
    n_f32 = 1 if name == "nin_tiny" else 0
    assert sum("bf16[" in o for o in outs) == len(outs) - n_f32 and len(outs) > n_f32


def test_batchnorm_and_dropout_train_vs_eval():
    model, variables, x, _, runs = _real("vgg_tiny", "float32")
    new_stats = runs[0][3]
    old = variables["batch_stats"]
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), old, new_stats)
    assert all(jax.tree.leaves(changed))
    # momentum 0.9 on the first BN: mean <- 0.9 * 0 + 0.1 * batch mean of the first conv.
    conv = jax.lax.conv_general_dilated(
        x, variables["params"]["stage_1_conv_1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv + variables["params"]["stage_1_conv_1"]["bias"].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(new_stats["stage_1_bn_1"]["mean"],
                               0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)

    @_jit
    def evaluate(variables, x, key):
        rngs = {"dropout": key}
        full = model.apply(variables, x, train=False, mutable=["batch_stats"], rngs=rngs)
        return full, model.apply(variables, x[:1], train=False, rngs=rngs)[0]

    ((e1, _), state), first = evaluate(variables, x, jax.random.key(1))
    (e2, _), _ = evaluate(variables, x, jax.random.key(2))[0]
    # Eval: running statistics untouched, dropout off (the key is ignored), and an example's
    # output does not depend on the rest of the batch.
    jax.tree.map(np.testing.assert_array_equal, old, state["batch_stats"])
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(first, e1[:1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(e1, runs[0][1])  # train mode (batch stats, dropout) differs


@pytest.mark.parametrize("name", ["nin_tiny", "squeezenet_tiny"])
def test_global_average_pool_classifiers(name):
    *_, (run, *_) = _real(name, "float32")
    logits, acts = run[1], run[4]
    # No dense layer: the logits are the spatial means of the rectified class maps.
    np.testing.assert_allclose(logits, acts["class_maps"].mean(axis=(1, 2)), rtol=1e-5,
                               atol=1e-6)
    assert (acts["class_maps"] >= 0).all()
