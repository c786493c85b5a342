"""The CIFAR-10 speedrun's pieces: the scanned epoch, the augmentations, TTA, the optimizer
groups, lookahead, the timing protocol (experiments/cifar10_speedrun.py, jaxvision/epoch.py)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar10_speedrun as sr
from jaxvision import epoch as ep
from jaxvision import evaluation
from jaxvision.nets import airbench
from jaxvision.pipelines import augment


def _images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# --- epoch plan, scan ---------------------------------------------------------------------------


def test_epoch_plan_is_a_permutation_without_the_remainder():
    idx, keys = ep.epoch_plan(jax.random.key(0), num_examples=50, batch_size=8, num_steps=6)
    idx = np.asarray(idx)
    assert idx.shape == (6, 8) and idx.dtype == np.int32 and keys.shape == (6,)
    assert len(set(idx.ravel())) == 48 and idx.min() >= 0 and idx.max() < 50
    partial, _ = ep.epoch_plan(jax.random.key(0), num_examples=50, batch_size=8, num_steps=2)
    np.testing.assert_array_equal(partial, idx[:2])  # a partial epoch: its first batches
    with pytest.raises(ValueError, match=r"num_steps \* batch_size = 7 \* 8"):
        ep.epoch_plan(jax.random.key(0), num_examples=50, batch_size=8, num_steps=7)


def test_epoch_steps():
    assert sr.epoch_steps(9.9, 48) == [48] * 9 + [44]  # ceil(475.2) = 476 steps
    assert sr.epoch_steps(2.0, 3) == [3, 3]
    assert sr.epoch_steps(0.5, 3) == [2]
    with pytest.raises(ValueError, match="train_epochs"):
        sr.epoch_steps(0.0, 3)


@pytest.fixture(scope="module")
def tiny():
    """A real speedrun step (a 4-8-8 airbench net) on 32 random 16x16 images: (step, batch_fn,
    data, carry). Compiling it costs seconds on CPU: built once for the module."""
    model = airbench.AirbenchNet(widths=(4, 8, 8), num_classes=10, dirac=True, bn_scale=False,
                                 bn_momentum=0.4, kernel_init=airbench.pytorch_default_init())
    plan = [2, 1]  # a full epoch of 2 steps of 16, then a partial one
    schedule = sr.lr_schedule(3, warmup_fraction=0.23, start=0.2, end=0.07)
    tx = sr.make_optimizer(lr=11.5, weight_decay=0.0153, momentum=0.85, batch_size=16,
                           bias_scaler=64.0, whiten_bias_steps=2, schedule=schedule)
    step = sr.make_train_step(model=model, tx=tx, total_steps=sum(plan), label_smoothing=0.2,
                              lookahead_every=2, lookahead_decay=0.95)
    batch_fn = sr.make_batch_fn(translate=2, cutout=4)
    init = jax.jit(sr.make_init(model=model, tx=tx, whitening_images=16, whitening_eps=5e-4))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(_images(32, 16, 16)),
            "label": jnp.asarray(rng.integers(0, 10, 32), jnp.int32)}
    carry, flip = init(jax.random.key(0), data["image"])
    return step, batch_fn, dict(data, flip=flip), carry


def test_scanned_epoch_equals_the_steps_run_one_by_one(tiny):
    step, batch_fn, data, carry = tiny
    key = jax.random.key(3)
    epoch_fn = ep.make_epoch_fn(step, batch_fn=batch_fn, batch_size=16, donate=False)
    scanned, metrics = epoch_fn(carry, data, key, 1, num_steps=2)
    assert metrics["loss"].shape == (2,)

    @jax.jit
    def one_step(carry, data, idx, k, epoch):
        return step(carry, batch_fn(data, idx, key=k, epoch=epoch))

    def by_hand(epoch):
        indices, keys = ep.epoch_plan(jax.random.fold_in(key, epoch), num_examples=32,
                                      batch_size=16, num_steps=2)
        c, losses = carry, []
        for s in range(2):
            c, m = one_step(c, data, indices[s], keys[s], epoch)
            losses.append(m["loss"])
        return c, np.stack(losses)

    looped, losses = by_hand(1)
    assert int(scanned["step"]) == int(looped["step"]) == 2
    # The same computation; XLA fuses the scan's body differently from the standalone step, so
    # a few BN statistics differ in the last bit (seen: 6e-8). A wrong batch, key or epoch moves
    # everything by far more, as epoch 0's result (other batches and flips) shows.
    close = functools.partial(chex.assert_trees_all_close, rtol=1e-5, atol=1e-6)
    close(scanned, looped)
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-6)
    with pytest.raises(AssertionError):
        close(by_hand(0)[0]["params"], looped["params"])
    assert not np.array_equal(np.asarray(scanned["params"]["head"]["kernel"]),
                              np.asarray(carry["params"]["head"]["kernel"]))


def _digest_step(carry, batch):
    """A cheap step whose carry depends on every image, label and their order (exact ints)."""
    x = batch["image"].astype(jnp.int32)  # [B, H, W, C]
    weights = jnp.arange(1, x.shape[0] + 1, dtype=jnp.int32)  # order matters
    digest = jnp.sum(weights * (jnp.sum(x, axis=(1, 2, 3)) + 7 * batch["label"]))
    return (carry * 31 + digest) % 1_000_003, {"digest": digest}


def test_both_loops_run_the_same_steps_and_compile_once_per_length():
    data = {"image": jnp.asarray(_images(10, 4, 4)), "label": jnp.arange(10, dtype=jnp.int32),
            "flip": jnp.arange(10) % 3 == 0}
    batch_fn = sr.make_batch_fn(translate=1, cutout=2)
    results = {}
    for loop in ep.LOOPS:
        traces = []

        def counted(carry, batch):
            traces.append(1)
            return _digest_step(carry, batch)

        fn = ep.make_epoch_fn(counted, batch_fn=batch_fn, batch_size=4, loop=loop)
        carry, digests = jnp.zeros((), jnp.int32), []
        for e, n in enumerate([2, 2, 1]):
            previous = carry
            carry, m = fn(carry, data, jax.random.key(5), e, num_steps=n)
            digests.append(np.asarray(m["digest"]))
            assert previous.is_deleted()  # donated: its buffer was reused
        results[loop] = (int(carry), np.concatenate(digests))
        # scan: epochs 0 and 1 share a program, the partial epoch is another; python: 1 step.
        assert len(traces) == (2 if loop == "scan" else 1), loop
    assert results["scan"][0] == results["python"][0]
    np.testing.assert_array_equal(results["scan"][1], results["python"][1])
    assert len(set(results["scan"][1].tolist())) == 5  # the batches differ
    with pytest.raises(ValueError, match="loop must be one of"):
        ep.make_epoch_fn(counted, batch_fn=batch_fn, batch_size=4, loop="while")


# --- augmentation -------------------------------------------------------------------------------


def test_alternating_flip_shows_each_image_mirrored_and_unmirrored_in_turn():
    n = 12
    images = _images(n)
    data = {"image": jnp.asarray(images), "label": jnp.arange(n, dtype=jnp.int32),
            "flip": jax.random.bernoulli(jax.random.key(1), 0.5, (n,))}
    base = np.asarray(data["flip"])
    assert 0 < base.sum() < n  # some images start mirrored, some not

    def record(carry, batch):  # a "step" that keeps what it was shown
        return carry, batch

    batch_fn = sr.make_batch_fn(translate=0, cutout=0)
    epoch_fn = ep.make_epoch_fn(record, batch_fn=batch_fn, batch_size=4)
    plain = np.asarray(augment.normalize(images, mean=sr.MEAN, std=sr.STD))
    mirror = plain[:, :, ::-1, :]
    mirrored_in = []
    for e in range(4):
        _, shown = epoch_fn(jnp.zeros(()), data, jax.random.key(7), e, num_steps=3)
        ids = np.asarray(shown["label"]).ravel()
        assert sorted(ids) == list(range(n))  # every image once per epoch
        views = np.asarray(shown["image"]).reshape((n,) + plain.shape[1:])
        was_mirrored = np.zeros(n, bool)
        for view, i in zip(views, ids):  # normalised in and out of jit: equal to ~1 ulp
            is_plain = np.allclose(view, plain[i], rtol=1e-6, atol=1e-6)
            is_mirror = np.allclose(view, mirror[i], rtol=1e-6, atol=1e-6)
            assert is_plain != is_mirror, f"image {i} in epoch {e} is neither view"
            was_mirrored[i] = is_mirror
        mirrored_in.append(was_mirrored)
    np.testing.assert_array_equal(mirrored_in[0], base)
    for e in range(1, 4):
        np.testing.assert_array_equal(mirrored_in[e], ~mirrored_in[e - 1])


def _shift_reference(images, shifts, p):
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    return np.stack([padded[b, p + dy:p + dy + h, p + dx:p + dx + w]
                     for b, (dy, dx) in enumerate(shifts)])


def test_translation_equals_a_numpy_reference():
    images = _images(30, 9, 7)
    shifts = np.random.default_rng(1).integers(-3, 4, (30, 2))
    out = ep.shift_images(jnp.asarray(images), jnp.asarray(shifts), max_shift=3)
    np.testing.assert_array_equal(out, _shift_reference(images, shifts, 3))
    # Content moves up-left for a positive shift: pixel (0, 0) shows the original (1, 1).
    one = ep.shift_images(jnp.asarray(images[:1]), jnp.asarray([[1, 1]]), max_shift=1)
    assert np.array_equal(one[0, 0, 0], images[0, 1, 1])


def test_random_translation_draws_every_shift_and_matches_the_reference():
    images = np.tile(np.arange(25, dtype=np.uint8).reshape(1, 5, 5, 1), (2000, 1, 1, 3))
    out = np.asarray(ep.random_translate(jnp.asarray(images), key=jax.random.key(0),
                                         max_shift=2))
    # With distinct pixels each output determines its shift: recover it, check all 25 occur.
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    refs = np.stack([_shift_reference(images[:1], [s], 2)[0] for s in shifts])  # [25, 5, 5, 3]
    match = (out[:, None] == refs[None]).all(axis=(2, 3, 4))  # [2000, 25]
    assert (match.sum(axis=1) == 1).all()  # every output is exactly one reference shift
    counts = match.sum(axis=0)
    assert counts.min() > 40  # 80 expected for each of the 25 shifts
    np.testing.assert_array_equal(
        ep.random_translate(jnp.asarray(images), key=jax.random.key(0), max_shift=0), images)


def test_tta_views():
    x = jnp.asarray(_images(3).astype(np.float32))
    views, weights = ep.tta_views(x, level=1)
    np.testing.assert_array_equal(views, evaluation.flip_views(x))
    np.testing.assert_array_equal(weights, [0.5, 0.5])
    views, weights = ep.tta_views(x, level=2)
    assert views.shape == (6, 3, 8, 8, 3)
    np.testing.assert_allclose(np.sum(weights), 1.0)
    xs = np.asarray(x)
    up_left = _shift_reference(xs, [(-1, -1)] * 3, 1)
    down_right = _shift_reference(xs, [(1, 1)] * 3, 1)
    expected = [xs, xs[:, :, ::-1], up_left, up_left[:, :, ::-1], down_right,
                down_right[:, :, ::-1]]
    for v, e in zip(views, expected):
        np.testing.assert_array_equal(v, e)
    np.testing.assert_array_equal(weights, [0.25, 0.25, 0.125, 0.125, 0.125, 0.125])
    assert ep.tta_views(x, level=0)[0].shape == (1, 3, 8, 8, 3)
    with pytest.raises(ValueError, match="level must be 0, 1 or 2, got 3"):
        ep.tta_views(x, level=3)


def test_chunked_test_set_masks_the_padding():
    images, labels = _images(5), np.arange(5)
    chunks = sr.chunk_test_set(images, labels, 2)
    assert chunks["image"].shape == (3, 2, 8, 8, 3)
    np.testing.assert_array_equal(chunks["mask"].ravel(), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(chunks["image"].reshape(6, 8, 8, 3)[:5], images)


# --- net pieces -----------------------------------------------------------------------------------


def test_dirac_init_makes_the_conv_an_identity_on_its_first_channels():
    init = airbench.dirac_init(airbench.pytorch_default_init())
    kernel = jax.jit(init, static_argnums=1)(jax.random.key(0), (3, 3, 4, 6))
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 4)).astype(np.float32)
    # The conv in numpy: out[b, i, j, o] = sum over taps of x_padded * kernel.
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = np.asarray(kernel)
    y = sum(np.einsum("bijc,co->bijo", xp[:, a:a + 5, b:b + 5], k[a, b])
            for a in range(3) for b in range(3))
    np.testing.assert_allclose(y[..., :4], x, rtol=0, atol=0)
    assert np.abs(np.asarray(kernel[..., 4:])).max() > 0  # the other outputs stay random
    # Fewer outputs than inputs: the outputs are the first inputs.
    np.testing.assert_array_equal(
        jax.jit(init, static_argnums=1)(jax.random.key(0), (3, 3, 4, 2))[1, 1], np.eye(4, 2))
    with pytest.raises(ValueError, match="odd kernel sizes"):
        init(jax.random.key(0), (2, 2, 3, 3))


def test_reshape_max_pool_equals_flax_max_pool():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 6, 3)), jnp.float32)
    pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(airbench.max_pool_2x2(x), pool(x))  # [2, 3, 3, 3]
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)  # no ties in random normals
    np.testing.assert_array_equal(grad(airbench.max_pool_2x2), grad(pool))


def test_device_whitening_kernel_matches_the_numpy_one():
    images = np.random.default_rng(0).standard_normal((20, 9, 9, 3)).cumsum(axis=1)
    ref = airbench.whitening_kernel(images)
    got = np.asarray(airbench.whitening_kernel_jax(jnp.asarray(images, jnp.float32)))
    # The filters agree up to sign: compare sum_i f_i f_i^T = (cov + eps)^-1 (sign-free).
    gram = lambda k: k.reshape(12, 24)[:, :12] @ k.reshape(12, 24)[:, :12].T
    np.testing.assert_allclose(gram(got), gram(ref), rtol=2e-3, atol=1e-3)


def test_deep_residual_variant_shapes():
    model = airbench.AirbenchNet(widths=(4, 8, 8), depth=3, residual=True, bn_scale=False)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                  train=False))
    assert set(variables["params"]["bn_1_2"]) == {"bias"}  # no BN scale
    assert variables["params"]["conv_2_2"]["kernel"].shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="depth must be >= 2"):
        airbench.AirbenchNet(depth=2, residual=True).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


# --- optimizer, lookahead ---------------------------------------------------------------------


def test_optimizer_groups():
    assert sr.param_group("['whiten']['kernel']") == "frozen"
    assert sr.param_group("['whiten']['bias']") == "whiten_bias"
    assert sr.param_group("['bn_1_0']['bias']") == "norm_bias"
    assert sr.param_group("['conv_1_0']['kernel']") == "filters"
    assert sr.param_group("['head']['kernel']") == "other"
    params = {"whiten": {"kernel": jnp.ones((2,)), "bias": jnp.zeros((2,))},
              "bn_0_0": {"bias": jnp.zeros((2,))}, "conv_0_0": {"kernel": jnp.zeros((2, 2))},
              "head": {"kernel": jnp.zeros((2, 2))}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = sr.make_optimizer(lr=11.5, weight_decay=0.0153, momentum=0.85, batch_size=1024,
                           bias_scaler=64.0, whiten_bias_steps=1, schedule=lambda t: 1.0 + 0 * t)
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    u2, _ = tx.update(grads, state, params)
    # Nesterov's first step from zero momentum and zero params: -lr_step * (1 + momentum) * g.
    lr_step = 11.5 / (1024 * (1 + 1 / 0.15))
    np.testing.assert_allclose(u1["conv_0_0"]["kernel"], -lr_step * 1.85, rtol=1e-6)  # filters
    np.testing.assert_allclose(u1["head"]["kernel"], -lr_step * 1.85, rtol=1e-6)
    np.testing.assert_allclose(u1["bn_0_0"]["bias"], -64 * lr_step * 1.85, rtol=1e-6)
    np.testing.assert_allclose(u1["whiten"]["bias"], -lr_step * 1.85, rtol=1e-6)
    np.testing.assert_array_equal(u2["whiten"]["bias"], 0.0)  # stopped after 1 step
    np.testing.assert_array_equal(u1["whiten"]["kernel"], 0.0)  # frozen


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_newton_schulz_orthogonalises(shape):
    g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g[:, 0] *= 30  # an ill-conditioned matrix: singular values spread over ~2 decades
    out = np.asarray(jax.jit(sr.newton_schulz)(jnp.asarray(g)))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    core = u.T @ out @ vt.T  # diagonal iff out has g's singular vectors
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0, atol=2e-3)
    assert 0.6 < np.diag(core).min() and np.diag(core).max() < 1.3  # the quintic's band


def test_muon_step():
    kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 6)), jnp.float32)
    grad = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 4, 6)), jnp.float32)
    tx = sr.muon(lambda t: 0.1 * (t + 1), momentum=0.6)
    state = tx.init({"k": kernel})
    u, state = jax.jit(tx.update)({"k": grad}, state, {"k": kernel})
    # Step 1: velocity = g, Nesterov direction g + 0.6 g; rate 0.1 at count 0.
    ortho = sr.newton_schulz((1.6 * grad).reshape(-1, 6).T).T.reshape(kernel.shape)
    expected = kernel * np.sqrt(6) / np.linalg.norm(kernel) - 0.1 * ortho
    np.testing.assert_allclose(kernel + u["k"], expected, rtol=1e-4, atol=1e-5)
    assert int(state["count"]) == 1
    zero = sr.muon(0.0, momentum=0.6)
    u0, _ = zero.update({"k": grad}, zero.init({"k": kernel}), {"k": kernel})
    np.testing.assert_allclose(np.linalg.norm(kernel + u0["k"]), np.sqrt(6), rtol=1e-5)


def test_lr_schedule():
    s = sr.lr_schedule(100, warmup_fraction=0.23, start=0.2, end=0.07)
    np.testing.assert_allclose([s(0), s(23), s(100), s(61.5)], [0.2, 1.0, 0.07, 0.535],
                               rtol=1e-6)


def test_lookahead():
    fast, slow = {"w": jnp.asarray(2.0)}, {"w": jnp.asarray(1.0)}
    f, s = sr.lookahead(fast, slow, step=3, total_steps=10, every=5, decay=0.9)
    assert float(f["w"]) == 2.0 and float(s["w"]) == 1.0  # not due: unchanged
    f, s = sr.lookahead(fast, slow, step=5, total_steps=10, every=5, decay=0.9)
    alpha = 0.9 ** 5 * 0.5 ** 3
    np.testing.assert_allclose([f["w"], s["w"]], [alpha + (1 - alpha) * 2] * 2, rtol=1e-6)
    f, s = sr.lookahead(fast, slow, step=5, total_steps=10, every=0, decay=0.9)
    assert float(f["w"]) == float(s["w"]) == 2.0


# --- timing protocol ---------------------------------------------------------------------------


def test_timing_excludes_the_warmup_and_uses_a_seed_per_run():
    ticks = iter(range(0, 1000, 1))
    calls = []

    def clock():
        return float(next(ticks)) ** 2  # intervals grow: each run's time is distinct

    def run(seed):
        calls.append(seed)
        return {"accuracy": jnp.asarray(0.5 + seed / 100)}

    out = sr.time_runs(run, runs=3, seed=10, clock=clock)
    assert calls == [10, 11, 12, 13]
    assert out["warmup"]["seed"] == 10 and out["warmup"]["time_s"] == 1.0  # 1^2 - 0^2
    assert [r["seed"] for r in out["runs"]] == [11, 12, 13]
    assert [r["time_s"] for r in out["runs"]] == [5.0, 9.0, 13.0]  # 3^2-2^2, 5^2-4^2, 7^2-6^2
    assert float(out["runs"][2]["result"]["accuracy"]) == pytest.approx(0.63)
    no_warmup = sr.time_runs(run, runs=1, seed=0, warmup=False, clock=clock)
    assert no_warmup["warmup"] is None and len(no_warmup["runs"]) == 1


def test_summarize_runs():
    s = sr.summarize_runs([0.90, 0.92, 0.94], [1.0, 3.0, 1.2])
    assert s["accuracy_mean"] == pytest.approx(0.92)
    assert s["accuracy_std"] == pytest.approx(0.02)  # ddof=1
    assert s["time_median_s"] == 1.2 and s["time_min_s"] == 1.0 and s["time_max_s"] == 3.0
    assert s["time_mean_s"] == pytest.approx(5.2 / 3)
    assert sr.summarize_runs([0.9], [1.0])["accuracy_std"] == 0.0
    with pytest.raises(ValueError, match="as many accuracies as times"):
        sr.summarize_runs([0.9], [1.0, 2.0])


def test_variant_resolution_and_bad_keys(tmp_path):
    c = sr.get_config()
    c.variant = "long"
    c.lr = 5.0
    r = sr.resolve(c)
    assert r.widths == (128, 512, 512) and r.depth == 3 and r.lr == 5.0 and r.cutout == 12
    c = sr.smoke_config()
    c.workdir = str(tmp_path)
    c.variant = "medium"
    with pytest.raises(sr.config_lib.ConfigError, match="'variant' must be one of"):
        sr.main(c)
    c = sr.smoke_config()
    c.workdir = str(tmp_path)
    c.translate = -1
    with pytest.raises(sr.config_lib.ConfigError, match="'translate' must be an integer >= 0"):
        sr.main(c)
