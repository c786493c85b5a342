"""jaxvision.nets.vit and .transformer: parameter counts against timm, shapes of every variant
(abstractly), attention against a naive loop, permutation equivariance, masks, stochastic depth,
a real forward/backward of the micro ViT in float32 and bfloat16, dropout only in train.

Only `vit_micro` and a 2-block encoder are ever run; the ImageNet variants are traced with
`jax.eval_shape` (no compile, no allocation).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxvision.nets.transformer import (
    Encoder,
    EncoderBlock,
    MultiHeadAttention,
    attention_weights,
    dot_product_attention,
)
from jaxvision.nets.vit import (
    INPUT_SHAPES,
    NUM_CLASSES,
    PUBLISHED_PARAMS,
    VARIANTS,
    ViTMicro,
)
from nets_testing import count_params

KEY = jax.random.key(0)
B = 2


def _key(seed):
    """A key for real runs. "rbg" (XLA's RngBitGenerator) instead of the default threefry:
    XLA:CPU compiles threefry's hash slowly at every random site (dropout, init), 2-3x the
    compile time of the micro ViT here; dropout and init draw from it the same way."""
    return jax.random.key(seed, impl="rbg")


# The real runs are compiled with XLA's cheap CPU pipeline: half the compile time of the micro
# ViT's train step (the bulk of this file's time), and these tests check values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


_count = count_params


def _init_shapes(model, shape):
    x = jnp.zeros((1, *shape), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": KEY, "dropout": KEY}, x, train=False))


@functools.cache
def _variant_shapes(name):
    return _init_shapes(VARIANTS[name](), INPUT_SHAPES[name])


def _fill(shapes, seed=0):
    """Concrete variables with the tree, shapes and dtypes of `shapes`, drawn with numpy.

    Compiling flax's init (its RNG) costs seconds on the 2-core CPU machine, and the real init
    zeroes the head, which would zero every gradient below it. Kernels get fan-in-scaled
    normals, LayerNorm scales 1 + noise, everything else small normals.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * rng.standard_normal(leaf.shape) + ("scale" in name)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _normal(shape, seed=0):
    # numpy, not jax.random: compiling jax's normal sampler costs ~1 s on this CPU machine.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _vit_params_closed_form(model, shape, num_classes):
    """ViT parameter count by hand, independent of flax: the check on the CIFAR counts."""
    h, w, c = shape
    p, d, mlp = model.patch_size, model.width, model.mlp_dim
    tokens = (h // p) * (w // p) + (model.pool == "token")
    embed = p * p * c * d + d  # conv kernel + bias
    cls_and_pos = d * (model.pool == "token") + tokens * d
    block = (
        2 * 2 * d  # two LayerNorms, scale + bias
        + 4 * (d * d + d)  # query, key, value, out projections with biases
        + (d * mlp + mlp) + (mlp * d + d)  # MLP
    )
    head = 2 * d + d * num_classes + num_classes  # final LayerNorm + head
    return embed + cls_and_pos + model.depth * block + head


# ---- parameter counts and shapes of every variant (abstract) ---------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_count_matches_published(name):
    shapes = _variant_shapes(name)
    assert set(shapes) == {"params"}  # no BatchNorm: no batch_stats
    assert _count(shapes["params"]) == PUBLISHED_PARAMS[name]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_closed_form_count_reproduces_the_table(name):
    # Validated on the six timm counts, this formula is what backs the CIFAR entries.
    model = VARIANTS[name]()
    assert model.num_classes == NUM_CLASSES[name]
    count = _vit_params_closed_form(model, INPUT_SHAPES[name], NUM_CLASSES[name])
    assert count == PUBLISHED_PARAMS[name]


def test_qkv_biases_are_what_the_published_counts_assume():
    # Without Q/K/V biases ViT-B/16 would be 12 blocks x 3 x 768 smaller than timm's count.
    params = _variant_shapes("vit_b_16")["params"]
    attention = params["encoder"]["block_1"]["attention"]
    assert {k: v["bias"].shape for k, v in attention.items()} == {
        "query": (768,), "key": (768,), "value": (768,), "out": (768,)
    }


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shapes_and_acts(name):
    model = VARIANTS[name]()
    hi, wi, c = INPUT_SHAPES[name]
    k, p, d = NUM_CLASSES[name], model.patch_size, model.width
    n = (hi // p) * (wi // p)
    x = jax.ShapeDtypeStruct((B, hi, wi, c), jnp.float32)
    logits, acts = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), _variant_shapes(name), x
    )
    assert logits.shape == (B, k) and logits.dtype == jnp.float32
    blocks = {f"block_{i}" for i in range(1, model.depth + 1)}
    assert set(acts) == {"patch_embed", "encoded", "features", "logits"} | blocks
    assert acts["patch_embed"].shape == (B, n, d)
    for key in blocks | {"encoded"}:
        assert acts[key].shape == (B, n + 1, d)
    assert acts["features"].shape == (B, d) and acts["features"].dtype == jnp.float32


def test_parameter_paths_are_named():
    params = _variant_shapes("vit_micro")["params"]
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "encoder", "head"}
    assert set(params["encoder"]) == {"block_1", "block_2", "norm"}
    assert set(params["encoder"]["block_1"]) == {"norm_1", "attention", "norm_2", "mlp"}
    assert set(params["encoder"]["block_1"]["mlp"]) == {"dense_1", "dense_2"}
    assert params["patch_embed"]["kernel"].shape == (8, 8, 3, 32)
    assert params["cls_token"].shape == (1, 1, 32)
    assert params["pos_embed"].shape == (1, 1 + 16, 32)


def test_keep_attention_and_gap_pooling():
    x = jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32)

    def run(model):
        variables = _init_shapes(model, (32, 32, 3))
        return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)

    _, (_, acts) = run(ViTMicro(keep_attention=True))
    for i in (1, 2):
        assert acts[f"attention_{i}"].shape == (B, 2, 17, 17)
        assert acts[f"attention_{i}"].dtype == jnp.float32
    # GAP: no class token, so one token (and one position embedding) fewer.
    variables, (_, acts) = run(ViTMicro(pool="gap"))
    assert "cls_token" not in variables["params"]
    assert _count(variables["params"]) == PUBLISHED_PARAMS["vit_micro"] - 2 * 32
    assert acts["encoded"].shape == (B, 16, 32) and acts["features"].shape == (B, 32)
    assert not any(k.startswith("attention") for k in acts)


def test_bad_inputs_raise_with_a_reason():
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        _init_shapes(ViTMicro(), (30, 32, 3))
    with pytest.raises(ValueError, match='pool must be "token" or "gap"'):
        _init_shapes(ViTMicro(pool="cls"), (32, 32, 3))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        _init_shapes(ViTMicro(num_heads=3), (32, 32, 3))


# ---- dot-product attention against a naive loop ----------------------------------------------


def _naive_attention(q, k, v, mask):
    """One query, one head at a time, in float64: out[b, n, h] = sum_m w[m] v[b, m, h]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_, n_, h_, dh = q.shape
    m_ = k.shape[1]
    out = np.zeros((b_, n_, h_, v.shape[-1]))
    weights = np.zeros((b_, h_, n_, m_))
    for b in range(b_):
        for h in range(h_):
            for n in range(n_):
                scores = np.array([q[b, n, h] @ k[b, m, h] / math.sqrt(dh) for m in range(m_)])
                allowed = (
                    np.ones(m_, bool) if mask is None
                    else np.asarray(mask)[min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1), n]
                )
                e = np.where(allowed, np.exp(scores - scores[allowed].max()), 0.0)
                weights[b, h, n] = e / e.sum()
                out[b, n, h] = sum(weights[b, h, n, m] * v[b, m, h] for m in range(m_))
    return out, weights


def _qkv(n=5, m=6, h=3, dh=4, dv=2, seed=0):
    # Different query and key lengths (cross-attention) and a value width != Dh catch
    # transposed axes.
    q = _normal((B, n, h, dh), seed)
    return q, _normal((B, m, h, dh), seed + 1), _normal((B, m, h, dv), seed + 2)


def _random_mask(shape, seed=0):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    mask[..., 0] = True  # every query may attend to at least one key
    return jnp.asarray(mask)


@pytest.mark.parametrize(
    "mask_shape", [None, (B, 1, 5, 6), (B, 3, 5, 6), (1, 1, 5, 6)],
    ids=["no_mask", "per_example", "per_head", "shared"],
)
def test_dot_product_attention_matches_naive_loop(mask_shape):
    q, k, v = _qkv()
    mask = None if mask_shape is None else _random_mask(mask_shape)
    out, weights = dot_product_attention(q, k, v, mask=mask)
    ref_out, ref_weights = _naive_attention(q, k, v, mask)
    assert out.shape == (B, 5, 3, 2) and weights.shape == (B, 3, 5, 6)
    assert weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    if mask is not None:
        full = np.broadcast_to(np.asarray(mask), weights.shape)
        assert (np.asarray(weights)[~full] == 0.0).all()  # exactly zero, not just small
        assert (np.asarray(weights)[full] > 0.0).all()


def test_dot_product_attention_gradients():
    q, k, v = _qkv(n=3, m=4, h=2, dh=3, dv=2)
    mask = _random_mask((B, 1, 3, 4))
    # jit: check_grads evaluates the function many times; eager, each op would dispatch alone.
    attend = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask)[0])
    check_grads(attend, (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


def test_attention_in_bfloat16_keeps_float32_weights():
    q, k, v = _qkv()
    out, weights = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    ref_out, ref_weights = dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, ref_weights, atol=2e-2)
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=5e-2)


def test_attention_rejects_float_and_wrong_rank_masks():
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match="mask must be boolean"):
        attention_weights(q, k, mask=jnp.zeros((B, 1, 5, 6)))
    with pytest.raises(ValueError, match="mask must have 4 dims"):
        attention_weights(q, k, mask=jnp.ones((5, 6), bool))


def test_cross_attention_shapes():
    layer = MultiHeadAttention(num_heads=2)
    x = jax.ShapeDtypeStruct((B, 5, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, 7, 8), jnp.float32)
    variables = jax.eval_shape(lambda x, kv: layer.init(KEY, x, kv, train=False), x, kv)
    out, weights = jax.eval_shape(
        lambda v, x, kv: layer.apply(v, x, kv, train=False), variables, x, kv
    )
    assert out.shape == (B, 5, 8) and weights.shape == (B, 2, 5, 7)


# ---- the encoder: equivariance, masks, stochastic depth --------------------------------------
# Every real run goes through these two jitted functions, with the module as a static argument
# (flax modules are hashable dataclasses): equal modules and shapes reuse one compiled program,
# and equivalent programs (a dropout model in eval and the same model without dropout) hit the
# persistent compilation cache. Eager applies would compile op by op, several times slower.


@functools.partial(jax.jit, static_argnames=("model", "train"), compiler_options=FAST_COMPILE)
def _apply(model, variables, x, key, *, train, mask=None):
    kwargs = {} if mask is None else {"mask": mask}
    # The "dropout" rng is always passed, to show that eval ignores it.
    return model.apply(variables, x, train=train, rngs={"dropout": key}, **kwargs)


@functools.partial(jax.jit, static_argnames="model", compiler_options=FAST_COMPILE)
def _loss_and_grads(model, params, x, labels, key):
    def loss_fn(params):
        logits, acts = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, acts)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


ENCODER = Encoder(depth=2, num_heads=2, mlp_dim=32, keep_attention=True)
N_TOKENS, WIDTH = 7, 16


@pytest.fixture(scope="module")
def encoder_vars():
    x = jax.ShapeDtypeStruct((B, N_TOKENS, WIDTH), jnp.float32)
    return _fill(jax.eval_shape(lambda x: ENCODER.init(KEY, x, train=False), x))


def test_encoder_is_permutation_equivariant_without_position_embeddings(encoder_vars):
    x = _normal((B, N_TOKENS, WIDTH), 3)
    perm = np.random.default_rng(0).permutation(N_TOKENS)
    out, acts = _apply(ENCODER, encoder_vars, x, _key(0), train=False)
    out_p, acts_p = _apply(ENCODER, encoder_vars, x[:, perm], _key(0), train=False)
    # Permuting the input tokens permutes the outputs the same way...
    np.testing.assert_allclose(out_p, out[:, perm], rtol=1e-5, atol=1e-5)
    # ...and the attention matrix along both token axes.
    np.testing.assert_allclose(
        acts_p["attention_2"], acts["attention_2"][:, :, perm][:, :, :, perm], rtol=1e-5, atol=1e-6
    )
    # Not trivially: tokens come out different from one another.
    assert not np.allclose(out[:, 0], out[:, 1])


def test_masked_keys_have_no_influence(encoder_vars):
    # Padding mask: no query may attend to the last two tokens. (B, 1, 1, N) broadcasts over
    # heads and queries.
    keep = np.arange(N_TOKENS) < N_TOKENS - 2
    mask = jnp.asarray(np.broadcast_to(keep, (B, 1, 1, N_TOKENS)))
    x = _normal((B, N_TOKENS, WIDTH), 4)
    x_changed = x.at[:, -2:].set(_normal((B, 2, WIDTH), 5))
    out, acts = _apply(ENCODER, encoder_vars, x, _key(0), train=False, mask=mask)
    out_changed, _ = _apply(ENCODER, encoder_vars, x_changed, _key(0), train=False, mask=mask)
    np.testing.assert_allclose(out_changed[:, keep], out[:, keep], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_changed[:, ~keep], out[:, ~keep])
    for i in (1, 2):
        assert (np.asarray(acts[f"attention_{i}"])[..., ~keep] == 0.0).all()


def test_stochastic_depth_drops_whole_examples_in_train_only():
    x = _normal((16, N_TOKENS, WIDTH), 6)
    block = EncoderBlock(num_heads=2, mlp_dim=32, drop_path=0.5)
    variables = _fill(jax.eval_shape(lambda x: block.init(KEY, x, train=False), x))
    out, _ = _apply(block, variables, x, _key(1), train=True)
    out, x_np = np.asarray(out), np.asarray(x)
    # Both branches dropped (probability 1/4 per example): the example passes unchanged;
    # otherwise every entry changes. One draw per example, not per token or entry.
    unchanged = np.all(out == x_np, axis=(1, 2))
    changed = np.all(out != x_np, axis=(1, 2))
    assert unchanged.any() and changed.any() and (unchanged | changed).all()
    other, _ = _apply(block, variables, x, _key(2), train=True)
    assert not np.array_equal(out, other)
    # In eval nothing is dropped and the residual branches are not rescaled.
    e1, _ = _apply(block, variables, x, _key(1), train=False)
    e2, _ = _apply(block.clone(drop_path=0.0), variables, x, _key(2), train=False)
    np.testing.assert_array_equal(e1, e2)


def test_drop_path_rises_linearly_over_blocks():
    encoder = Encoder(depth=5, num_heads=2, mlp_dim=8, drop_path_rate=0.2)
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, EncoderBlock) and context.method_name == "__call__":
            rates.append(context.module.drop_path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: encoder.init(KEY, jnp.zeros((1, 3, 8)), train=False))
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


# ---- the micro ViT, for real -----------------------------------------------------------------

DROPOUT_KW = dict(dropout=0.1, attention_dropout=0.1, drop_path_rate=0.1)


@pytest.fixture(scope="module")
def micro_vars():
    return _fill(_variant_shapes("vit_micro"))


def _images(seed=0):
    return _normal((B, 32, 32, 3), seed)


def test_init_follows_the_vit_paper_code():
    # One block is enough to see every initialiser (and halves the compile of the RNG).
    model = ViTMicro(depth=1)
    init = jax.jit(
        lambda x, key: model.init_with_output({"params": key, "dropout": key}, x, train=False),
        compiler_options=FAST_COMPILE,
    )
    (logits, _), variables = init(_images(), _key(0))
    params = variables["params"]
    # Zero head (JAX ViT, big_vision head_zeroinit): the first logits are exactly 0.
    assert not np.any(params["head"]["kernel"]) and not np.any(params["head"]["bias"])
    np.testing.assert_array_equal(logits, 0.0)
    assert not np.any(params["cls_token"])  # zeros, as the JAX ViT's "cls"
    assert 0.015 < float(np.std(params["pos_embed"])) < 0.025  # N(0, 0.02^2)
    mlp = params["encoder"]["block_1"]["mlp"]
    assert 0 < float(np.abs(mlp["dense_1"]["bias"]).max()) < 1e-5  # N(0, 1e-6^2)
    assert not np.any(params["encoder"]["block_1"]["attention"]["query"]["bias"])
    # Xavier-uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
    kernel = np.abs(np.asarray(mlp["dense_1"]["kernel"]))
    bound = math.sqrt(6 / (32 + 128))
    assert 0.95 * bound < kernel.max() <= bound
    # Patch embedding: LeCun normal (flax's default), std 1/sqrt(fan_in), truncated at 2 std.
    patch = np.asarray(params["patch_embed"]["kernel"])
    assert 0.8 < float(np.std(patch)) * math.sqrt(8 * 8 * 3) < 1.2


def test_features_and_logits_are_the_class_token_and_head(micro_vars):
    logits, acts = _apply(ViTMicro(), micro_vars, _images(), _key(0), train=False)
    np.testing.assert_array_equal(acts["features"], acts["encoded"][:, 0])
    head = micro_vars["params"]["head"]
    np.testing.assert_allclose(
        logits, acts["features"] @ head["kernel"] + head["bias"][None], rtol=1e-5, atol=1e-5
    )
    # The patch embedding is the conv applied to each 8x8 patch, in row-major order.
    patch = _images()[:, 8:16, 16:24, :]  # patch (row 1, col 2) -> token 1 * 4 + 2
    conv = micro_vars["params"]["patch_embed"]
    expected = jnp.einsum("bhwc,hwcd->bd", patch, conv["kernel"]) + conv["bias"][None]
    np.testing.assert_allclose(acts["patch_embed"][:, 6], expected, rtol=1e-4, atol=1e-5)


def test_forward_backward_in_float32_and_bfloat16(micro_vars):
    x, labels = _images(), jnp.arange(B) % 10
    logits_by_dtype = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = ViTMicro(dtype=dtype, **DROPOUT_KW)
        (loss, (logits, acts)), grads = _loss_and_grads(
            model, micro_vars["params"], x, labels, _key(0)
        )
        assert np.isfinite(loss) and logits.dtype == jnp.float32
        assert acts["block_1"].dtype == dtype and acts["features"].dtype == jnp.float32
        # Float32 gradients for float32 parameters, and every one of them reached: the class
        # token, the position embedding and each projection are wired into the loss.
        assert jax.tree.structure(grads) == jax.tree.structure(micro_vars["params"])
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            name = jax.tree_util.keystr(path)
            assert g.dtype == jnp.float32, name
            assert np.all(np.isfinite(g)) and np.any(g != 0), name
        logits_by_dtype[dtype] = logits
    # Same parameters and the same dropout masks (they depend on the key and shapes only):
    # bfloat16 (~3 significant digits) stays close to float32.
    np.testing.assert_allclose(
        logits_by_dtype[jnp.bfloat16], logits_by_dtype[jnp.float32], atol=0.1, rtol=0.1
    )


def test_bfloat16_runs_matmuls_in_bfloat16_and_softmax_in_float32(micro_vars):
    model = ViTMicro(dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(micro_vars, _images())
    lines = str(jaxpr).splitlines()
    outs = [ln.split("=")[0] for ln in lines if "dot_general[" in ln]
    # Per block: q, k, v, out, the 2 MLP denses and weights @ V in bfloat16; Q K^T accumulates
    # in float32 (for the softmax), as does the head.
    assert sum("bf16[" in o for o in outs) == 7 * 2
    assert sum("f32[" in o for o in outs) == 2 + 1
    assert len(outs) == 7 * 2 + 2 + 1
    conv = [ln.split("=")[0] for ln in lines if "conv_general_dilated[" in ln]
    assert len(conv) == 1 and "bf16[" in conv[0]


def test_dropout_only_in_train(micro_vars):
    model = ViTMicro(**DROPOUT_KW)
    params, x, labels = micro_vars["params"], _images(), jnp.arange(B) % 10

    def train_logits(seed):  # the program compiled by the forward/backward test
        (_, (logits, _)), _ = _loss_and_grads(model, params, x, labels, _key(seed))
        return logits

    a = train_logits(1)
    assert not np.allclose(a, train_logits(2))
    np.testing.assert_array_equal(a, train_logits(1))
    # Eval: the rng is ignored, and it is the same network as without any dropout.
    e1, _ = _apply(model, micro_vars, x, _key(1), train=False)
    e2, _ = _apply(model, micro_vars, x, _key(2), train=False)
    np.testing.assert_array_equal(e1, e2)
    plain, _ = _apply(ViTMicro(), micro_vars, x, _key(1), train=False)
    np.testing.assert_array_equal(e1, plain)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply(micro_vars, x, train=True))
