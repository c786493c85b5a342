"""The course's explicit nets (jaxvision/nets/course.py): the two-layer net's hand-written
backward, the fully connected net and the three-layer ConvNet (whose gradients chain the layers'
hand-written backwards) against numeric gradients and autodiff of plain-jnp references, in
float64; the course's sanity checks (initial loss ~ log C, loss grows with reg, overfitting 50
examples); and the Solver (`course.train`)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import gradcheck, layers
from jaxvision.nets import course

TOL = 1e-6


def _max_rel(a_tree, b_tree):
    errs = jax.tree.map(lambda a, b: float(gradcheck.relative_error(a, b).max()), a_tree, b_tree)
    return max(jax.tree.leaves(errs))


def _numeric_errors(f, params, analytic, *, num_samples, seed):
    """{leaf: max relative error} of `analytic` against centred differences, with the relative
    error's denominator floored at 1e-3: a coordinate whose true gradient is 0 (a bias or beta
    followed by batch norm) then compares 0 with the ~1e-10 round-off of the difference
    quotient as an absolute 1e-7, not as a meaningless relative error of 1."""
    numeric = gradcheck.numeric_grad(f, params, num_samples=num_samples, seed=seed)
    return {path: float(gradcheck.relative_error(
        np.asarray(analytic[path.strip("[]'")]).reshape(-1)[idx], derivs, tiny=1e-3).max())
        for path, (idx, derivs) in numeric.items()}


def _data(seed, n, shape, classes):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)), rng.integers(0, classes, n)


# ---------------------------------------------------------------------------------------------
# Two-layer net


def _two_layer_reference(params, x, y, reg):
    """Plain jnp, differentiated by jax.grad."""
    h = jnp.maximum(x.reshape(x.shape[0], -1) @ params["W1"] + params["b1"][None, :], 0)
    scores = h @ params["W2"] + params["b2"][None, :]
    logp = jax.nn.log_softmax(scores, axis=1)
    data = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
    return data + 0.5 * reg * (jnp.sum(params["W1"] ** 2) + jnp.sum(params["W2"] ** 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_two_layer_explicit_backward_matches_autodiff_and_numeric(seed):
    rng = np.random.default_rng(seed)
    n, shape, hidden, classes = rng.integers(3, 7), (2, rng.integers(2, 4)), rng.integers(4, 8), 5
    reg = float(rng.uniform(0.05, 0.5))
    with jax.enable_x64(True):
        x, y = _data(seed, n, shape, classes)
        params = course.init_two_layer(jax.random.key(seed), input_dim=math.prod(shape),
                                       hidden_dim=int(hidden), num_classes=classes,
                                       weight_scale=0.5, dtype=jnp.float64)
        # Non-zero biases and a spread of scores, so no gradient is ~0 by symmetry.
        params["b1"] = jnp.asarray(rng.standard_normal(hidden))
        params["b2"] = jnp.asarray(rng.standard_normal(classes))
        loss, grads = jax.jit(lambda p: course.two_layer_loss(p, x, y, reg=reg))(params)
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(
            lambda p: _two_layer_reference(p, x, y, reg)))(params)
        assert abs(float(loss) - float(ref_loss)) < 1e-12
        assert _max_rel(grads, ref_grads) < 1e-9
        errors = gradcheck.check(lambda p: course.two_layer_loss(p, x, y, reg=reg)[0], params,
                                 analytic=grads, eps=1e-5)
        assert max(errors.values()) < TOL, errors
        scores = jax.jit(course.two_layer_loss)(params, x)  # y=None: the scores
        p = {k: np.asarray(v) for k, v in params.items()}
        hidden = np.maximum(x.reshape(n, -1) @ p["W1"] + p["b1"], 0)
        np.testing.assert_allclose(scores, hidden @ p["W2"] + p["b2"], rtol=1e-12)


def test_two_layer_rejects_bad_shapes():
    params = course.init_two_layer(jax.random.key(0), input_dim=6, hidden_dim=3, num_classes=2)
    with pytest.raises(ValueError, match="W1"):
        course.two_layer_loss(params, np.zeros((2, 7)), np.zeros(2, int))
    with pytest.raises(ValueError, match="y must be"):
        course.two_layer_loss(params, np.zeros((2, 6)), np.zeros(3, int))


# ---------------------------------------------------------------------------------------------
# Fully connected net


def _fc_reference(params, state, x, y, *, reg, train, rate, key, normalization, eps=1e-5):
    """Plain jnp (autodiff), independent of jaxvision.layers but for the dropout mask: returns
    (loss, new_state)."""
    num = len([k for k in params if k.startswith("W")])
    h = x.reshape(x.shape[0], -1)
    keys = jax.random.split(key, num - 1) if train and rate > 0 else None
    new = dict(state)
    for i in range(1, num):
        h = h @ params[f"W{i}"] + params[f"b{i}"][None, :]
        if normalization == "batchnorm":
            if train:
                mu, var = jnp.mean(h, 0), jnp.var(h, 0)
                new[f"running_mean{i}"] = 0.9 * state[f"running_mean{i}"] + 0.1 * mu
                new[f"running_var{i}"] = 0.9 * state[f"running_var{i}"] + 0.1 * var
            else:
                mu, var = state[f"running_mean{i}"], state[f"running_var{i}"]
            h = (h - mu[None, :]) / jnp.sqrt(var[None, :] + eps)
            h = params[f"gamma{i}"][None, :] * h + params[f"beta{i}"][None, :]
        elif normalization == "layernorm":
            mu, var = jnp.mean(h, 1, keepdims=True), jnp.var(h, 1, keepdims=True)
            h = params[f"gamma{i}"][None, :] * (h - mu) / jnp.sqrt(var + eps) \
                + params[f"beta{i}"][None, :]
        h = jnp.maximum(h, 0)
        if keys is not None:
            # The same mask as layers.dropout draws from this key (its values: 0 or
            # 1 / (1 - rate)), as a constant: the reference differentiates h * mask itself.
            mask = jax.lax.stop_gradient(layers.dropout(jnp.ones_like(h), key=keys[i - 1],
                                                        rate=rate, train=True))
            h = h * mask
    scores = h @ params[f"W{num}"] + params[f"b{num}"][None, :]
    logp = jax.nn.log_softmax(scores, axis=1)
    data = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
    l2 = sum(jnp.sum(params[f"W{i}"] ** 2) for i in range(1, num + 1))
    return data + 0.5 * reg * l2, new


@pytest.mark.parametrize("normalization,rate", [(None, 0.0), ("batchnorm", 0.0),
                                                ("layernorm", 0.0), ("batchnorm", 0.3)])
def test_fc_net_gradients_match_numeric_and_autodiff(normalization, rate):
    seed = {None: 0, "batchnorm": 1, "layernorm": 2}[normalization] + int(10 * rate)
    rng = np.random.default_rng(seed)
    dims = tuple(int(d) for d in rng.integers(4, 8, size=2))  # depth 3: two hidden layers
    with jax.enable_x64(True):
        x, y = _data(seed, 6, (3, 3), 4)
        params, state = course.init_fc(jax.random.key(seed), input_dim=9, hidden_dims=dims,
                                       num_classes=4, normalization=normalization, init="he",
                                       dtype=jnp.float64)
        # Random gamma/beta/biases: the identity gamma and zero betas hide some mistakes.
        params = {k: (v if k.startswith("W") else jnp.asarray(rng.uniform(0.5, 1.5, v.shape)))
                  for k, v in params.items()}
        state = {k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape)) for k, v in state.items()}
        kw = dict(reg=0.2, train=True, dropout_rate=rate, key=jax.random.key(seed + 100),
                  normalization=normalization)
        (loss, new_state), grads = jax.jit(jax.value_and_grad(
            lambda p: course.fc_loss(p, state, x, y, **kw), has_aux=True))(params)
        ref = {**{k: v for k, v in kw.items() if k != "dropout_rate"}, "rate": rate}
        (ref_loss, ref_state), ref_grads = jax.jit(jax.value_and_grad(
            lambda p: _fc_reference(p, state, x, y, **ref), has_aux=True))(params)
        assert abs(float(loss) - float(ref_loss)) < 1e-12
        for k in ref_state:
            np.testing.assert_allclose(new_state[k], ref_state[k], rtol=1e-12)
        errors = _numeric_errors(lambda p: course.fc_loss(p, state, x, y, **kw)[0], params,
                                 grads, num_samples=8, seed=seed)
        assert max(errors.values()) < TOL, errors
        for name in grads:
            if normalization == "batchnorm" and name in ("b1", "b2"):
                # A bias right before batch norm is subtracted out again with the batch mean:
                # its true gradient is 0 (so relative errors are meaningless).
                assert np.abs(np.asarray(grads[name])).max() < 1e-12
                continue
            rel = gradcheck.relative_error(grads[name], ref_grads[name], tiny=1e-3).max()
            assert rel < TOL, (name, rel)


def _custom_vjp_calls(f, *args) -> int:
    return str(jax.make_jaxpr(f)(*args)).count("custom_vjp_call")


def test_every_layer_runs_its_hand_written_backward():
    """The nets' losses are chains of custom_vjp layers (so jax.grad uses their backwards): all
    but conv_lax, which is JAX's autodiff reference by design."""
    x, y = np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int32)
    params, state = course.init_fc(jax.random.key(0), input_dim=48, hidden_dims=(3, 3),
                                   num_classes=2, normalization="batchnorm")
    calls = _custom_vjp_calls(lambda p: course.fc_loss(
        p, state, x, y, dropout_rate=0.5, key=jax.random.key(0), normalization="batchnorm"),
        params)
    assert calls == 3 + 2 + 2 + 2 + 1  # affine, batchnorm, relu, dropout, softmax loss
    cnn = course.init_three_layer_convnet(jax.random.key(0), input_shape=(4, 4, 3),
                                          num_filters=2, filter_size=3, hidden_dim=3)
    for conv, n_conv in (("lax", 0), ("im2col", 1)):
        calls = _custom_vjp_calls(
            lambda p: course.three_layer_convnet_loss(p, x, y, conv=conv), cnn)
        assert calls == n_conv + 2 + 1 + 2 + 1  # conv, relu, max pool, affine, softmax loss


def test_fc_net_test_mode_uses_running_averages_and_no_dropout():
    with jax.enable_x64(True):
        x, y = _data(3, 5, (8,), 3)
        params, state = course.init_fc(jax.random.key(3), input_dim=8, hidden_dims=(6, 6, 5),
                                       num_classes=3, normalization="batchnorm",
                                       weight_scale=0.3, dtype=jnp.float64)
        state = {k: np.asarray(v) + 0.25 for k, v in state.items()}

        @jax.jit
        def both(params, state):
            scores, new_state = course.fc_forward(params, state, x, train=False,
                                                  dropout_rate=0.5, key=None,
                                                  normalization="batchnorm")
            ref_loss, _ = _fc_reference(params, state, x, y, reg=0.0, train=False, rate=0.5,
                                        key=None, normalization="batchnorm")
            return course.softmax_data_loss(scores, jnp.asarray(y)), ref_loss, new_state

        loss, ref_loss, new_state = both(params, state)
        assert abs(float(loss) - float(ref_loss)) < 1e-12
        for k, v in state.items():
            np.testing.assert_array_equal(new_state[k], v)


def test_fc_net_rejects_bad_arguments():
    params, state = course.init_fc(jax.random.key(0), input_dim=4, hidden_dims=(3,),
                                   num_classes=2, normalization="layernorm")
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="needs a key"):
        course.fc_forward(params, state, x, train=True, dropout_rate=0.5,
                          normalization="layernorm")
    with pytest.raises(ValueError, match="normalization must be one of"):
        course.init_fc(jax.random.key(0), input_dim=4, hidden_dims=(3,), num_classes=2,
                       normalization="groupnorm")
    with pytest.raises(ValueError, match="init must be one of"):
        course.init_fc(jax.random.key(0), input_dim=4, hidden_dims=(3,), num_classes=2,
                       init="xavier")
    plain, _ = course.init_fc(jax.random.key(0), input_dim=4, hidden_dims=(3,), num_classes=2)
    with pytest.raises(ValueError, match="no 'gamma1'"):
        course.fc_forward(plain, {}, x, train=False, normalization="layernorm")
    with pytest.raises(ValueError, match="features per example"):
        course.fc_forward(plain, {}, np.zeros((2, 5), np.float32), train=False)


def test_he_init_has_the_he_scale():
    params, _ = course.init_fc(jax.random.key(0), input_dim=400, hidden_dims=(300,),
                               num_classes=10, init="he")
    np.testing.assert_allclose(np.std(params["W1"]), math.sqrt(2 / 400), rtol=0.02)
    np.testing.assert_allclose(np.std(params["W2"]), math.sqrt(2 / 300), rtol=0.1)


# ---------------------------------------------------------------------------------------------
# Three-layer ConvNet


def _convnet_reference(params, x, y, reg):
    """Plain jnp/lax (autodiff): conv (same padding) - ReLU - 2x2 max pool - affine - ReLU -
    affine - softmax."""
    pad = (params["W1"].shape[0] - 1) // 2
    h = jax.lax.conv_general_dilated(x, params["W1"], (1, 1), ((pad, pad), (pad, pad)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.maximum(h + params["b1"][None, None, None, :], 0)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4)).reshape(n, -1)
    h = jnp.maximum(h @ params["W2"] + params["b2"][None, :], 0)
    scores = h @ params["W3"] + params["b3"][None, :]
    logp = jax.nn.log_softmax(scores, axis=1)
    data = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
    return data + 0.5 * reg * sum(jnp.sum(params[k] ** 2) for k in ("W1", "W2", "W3"))


@pytest.mark.parametrize("conv", ["lax", "im2col"])
def test_three_layer_convnet_gradients_match_numeric_and_autodiff(conv):
    with jax.enable_x64(True):
        x, y = _data(5, 2, (6, 4, 2), 3)
        params = course.init_three_layer_convnet(
            jax.random.key(5), input_shape=(6, 4, 2), num_filters=3, filter_size=3,
            hidden_dim=5, num_classes=3, init="he", dtype=jnp.float64)
        params["b1"] = params["b1"] + 0.1
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: course.three_layer_convnet_loss(p, x, y, reg=0.1, conv=conv)))(params)
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(
            lambda p: _convnet_reference(p, x, y, 0.1)))(params)
        assert abs(float(loss) - float(ref_loss)) < 1e-12
        assert _max_rel(grads, ref_grads) < TOL
        errors = _numeric_errors(
            lambda p: course.three_layer_convnet_loss(p, x, y, reg=0.1, conv=conv), params,
            grads, num_samples=10, seed=0)
        assert max(errors.values()) < TOL, errors


def test_three_layer_convnet_rejects_bad_input():
    params = course.init_three_layer_convnet(jax.random.key(0), input_shape=(4, 4, 3),
                                             num_filters=2, filter_size=3, hidden_dim=3)
    with pytest.raises(ValueError, match="NHWC"):
        course.three_layer_convnet(params, np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="conv must be one of"):
        course.three_layer_convnet(params, np.zeros((1, 4, 4, 3), np.float32), conv="fft")
    with pytest.raises(ValueError, match="odd"):
        course.init_three_layer_convnet(jax.random.key(0), filter_size=4)


# ---------------------------------------------------------------------------------------------
# The course's sanity checks


def test_initial_loss_is_log_num_classes_and_grows_with_reg():
    x, y = _data(7, 50, (8, 8, 3), 10)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    key = jax.random.key(7)
    two = course.init_two_layer(key, input_dim=192, hidden_dim=20, num_classes=10,
                                weight_scale=1e-3)
    fc, fc_state = course.init_fc(key, input_dim=192, hidden_dims=(20, 20), num_classes=10,
                                  normalization="batchnorm", weight_scale=1e-3)
    cnn = course.init_three_layer_convnet(key, input_shape=(8, 8, 3), num_filters=4,
                                          filter_size=3, hidden_dim=10, weight_scale=1e-3)

    @jax.jit
    def losses(reg):
        return jnp.stack([
            course.two_layer_loss(two, x, y, reg=reg)[0],
            course.fc_loss(fc, fc_state, x, y, reg=reg, normalization="batchnorm")[0],
            course.three_layer_convnet_loss(cnn, x, y, reg=reg)])

    unreg = losses(0.0)
    for loss in unreg:
        # Small weights: near-uniform softmax, so each example costs -log(1/10).
        assert abs(loss - math.log(10)) < 0.02, unreg
    # Weights of ~1e-3 have sum W^2 ~ 1e-6 * count: a large reg shows it.
    for before, after in zip(unreg, losses(1e3)):  # the same program: reg is an argument
        assert after > before + 1e-3, (unreg, after)


def _overfit(loss_and_grads, predict, params, state, x, y, *, epochs, lr):
    return course.train(loss_and_grads, predict, params, state=state, x_train=x, y_train=y,
                        x_val=x, y_val=y, optimizer="adam", lr=lr, epochs=epochs,
                        batch_size=25, num_train_eval=50, progress=False, verbose=False)


def test_solver_overfits_50_examples_two_layer_and_fc():
    x, y = _data(11, 50, (4, 4, 3), 10)
    x, y = x.astype(np.float32), y.astype(np.int32)
    two = course.init_two_layer(jax.random.key(0), input_dim=48, hidden_dim=50, num_classes=10,
                                weight_scale=1e-2)

    def two_grads(params, state, xb, yb, key):
        loss, grads = course.two_layer_loss(params, xb, yb, reg=0.0)
        return loss, grads, state

    def two_predict(params, state, xb):
        return course.two_layer_loss(params, xb)

    _, _, hist = _overfit(two_grads, two_predict, two, {}, x, y, epochs=40, lr=1e-2)
    assert hist["train_acc"][-1] == 1.0 and hist["best_val_acc"] == 1.0
    assert len(hist["loss"]) == 40 * 2 and hist["loss"][-1] < 0.1 * hist["loss"][0]
    assert hist["loss"][0] == pytest.approx(math.log(10), abs=0.05)

    fc, fc_state = course.init_fc(jax.random.key(1), input_dim=48, hidden_dims=(40, 40, 40),
                                  num_classes=10, normalization="batchnorm", init="he")
    grad_fn = jax.value_and_grad(course.fc_loss, has_aux=True)

    def fc_grads(params, state, xb, yb, key):
        (loss, state), grads = grad_fn(params, state, xb, yb, reg=0.0, train=True,
                                       dropout_rate=0.0, key=key, normalization="batchnorm")
        return loss, grads, state

    def fc_predict(params, state, xb):
        return course.fc_forward(params, state, xb, train=False, normalization="batchnorm")[0]

    _, best_state, hist = _overfit(fc_grads, fc_predict, fc, fc_state, x, y, epochs=30, lr=3e-3)
    assert hist["best_val_acc"] == 1.0, hist["val_acc"]
    # The running averages were updated by training (and are what the test mode used).
    assert np.abs(np.asarray(best_state["running_mean1"])).max() > 0


def test_solver_keeps_the_best_params_and_decays_lr():
    x, y = _data(12, 40, (6,), 3)
    x, y = x.astype(np.float32), y.astype(np.int32)
    params = course.init_two_layer(jax.random.key(2), input_dim=6, hidden_dim=8, num_classes=3,
                                   weight_scale=1e-1)
    logged = []

    def grads(params, state, xb, yb, key):
        return (*course.two_layer_loss(params, xb, yb, reg=0.0), state)

    def predict(params, state, xb):
        return course.two_layer_loss(params, xb)

    # Validation labels shuffled: the val accuracy wanders, so the best epoch is not the last.
    y_val = np.random.default_rng(0).permutation(y)
    best, _, hist = course.train(grads, predict, params, x_train=x, y_train=y, x_val=x,
                                 y_val=y_val, optimizer="momentum", lr=0.1, lr_decay=0.5,
                                 epochs=6, batch_size=10, log_every=2,
                                 log=lambda s, v: logged.append((s, v)), progress=False,
                                 verbose=False)
    assert course.evaluate_accuracy(predict, best, {}, x, y_val) == hist["best_val_acc"]
    assert hist["best_val_acc"] == max(hist["val_acc"])
    assert hist["steps"] == [4, 8, 12, 16, 20, 24]
    lrs = [v["lr"] for _, v in logged if "lr" in v]
    np.testing.assert_allclose(lrs, [0.1 * 0.5 ** e for e in range(6)], rtol=1e-6)
    assert [s for s, v in logged if "train/loss" in v][:2] == [2, 4]
    with pytest.raises(ValueError, match="batch_size"):
        course.train(grads, predict, params, x_train=x, y_train=y, x_val=x, y_val=y,
                     batch_size=41, progress=False)
