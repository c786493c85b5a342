"""Update rules compared: one small net on a CIFAR-10 subset under each from-scratch rule, and
L-BFGS on full-batch softmax regression (the course's "Optimization" figure).

    python -m experiments.update_rules
    python -m experiments.update_rules --config.epochs=10 --config.lr_adam=5e-4

A three-layer MLP (3072-100-100-10, ReLU, He init, no regularisation) trained on 10,000 CIFAR-10
training images (1,000 per class, pixels in [0, 1] minus the mean image), batch 128, 5 epochs,
with each rule of `jaxvision.optim` written from scratch (sgd, sgd_momentum, nesterov, adagrad,
rmsprop, adam; learning rates tuned by hand, see the config; every rate decays by `lr_decay` per
epoch through the "exponential" schedule). Validation: the next 100 training images of each
class; test: the 10,000 test images. Then softmax regression on the first 5,000 of those
training images, full batch, by `optim.lbfgs_minimize` and by plain gradient descent for the
same number of iterations.

Expected (measured on 2 shared CPU cores, seed 0: 59 s in all, ~5 s per rule; 62 s with
start-up; deterministic, rerun gives the same figures):
  rule          lr      train loss  train acc  val acc  test acc
  sgd           1e-1    1.436       51.7%      44.8%    44.3%
  sgd_momentum  5e-2    1.255       60.6%      45.5%    44.6%
  nesterov      2e-2    1.309       58.2%      45.6%    45.5%
  adagrad       1e-1    1.286       58.3%      44.8%    45.1%
  rmsprop       3e-4    1.392       53.6%      45.8%    44.2%
  adam          1e-3    1.260       59.5%      45.0%    45.0%
  (train loss: mean over the last epoch; train acc on 1,000 training images.) Best rule by
  validation: rmsprop, 44.25% test accuracy (summary "eval"). With tuned rates the rules end
  within ~1.5% of each other after 5 epochs; the adaptive and momentum rules get there sooner
  (epoch 1: ~38% validation against ~34% for sgd and adagrad).
  L-BFGS (100 iterations, 5,000 images, l2 1e-2): loss 2.303 -> 1.683 (levels off within ~25
  iterations; gradient norm 1.4e-5), test accuracy 38.0%; gradient descent at its best rate
  reaches 1.701 in the same 100 iterations.
Writes WORKDIR (default workdirs/update_rules): report.png (smoothed training loss against
iteration, train and validation accuracy against epoch for every rule, and the L-BFGS / gradient
descent losses), metrics.jsonl (one line per iteration) and summary.json.

Smoke setting (run by the tests): `python -m experiments.update_rules --smoke`: 10 images per
class, a tiny net, one epoch.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvision import config as config_lib
from jaxvision import init, losses, optim
from jaxvision.pipelines import sources

# The shared data lives beside the checkout: ../shared/data (see its README).
SHARED_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz")

RULES = ("sgd", "sgd_momentum", "nesterov", "adagrad", "rmsprop", "adam")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/update_rules"
    # Data: the first `train_per_class` training images of each class train, the next
    # `val_per_class` validate; the test split tests (max_per_class: 0 = all of it).
    c.data = SHARED_ARCHIVE
    c.max_per_class = 0
    c.train_per_class = 1000
    c.val_per_class = 100
    # Net: affine-ReLU per hidden width, then affine to the classes.
    c.hidden = (100, 100)
    c.batch_size = 128
    c.epochs = 5
    c.rules = RULES
    # Rates tuned by hand on this setting: each the best validation accuracy after 5 epochs of
    # a grid in steps of 2-3x (sgd 2e-2..2e-1, momentum/nesterov 2e-3..5e-2, adagrad 1e-2..3e-1,
    # rmsprop 1e-4..1e-3, adam 3e-4..3e-3); neighbours are within ~1% (the validation noise).
    c.lr_sgd = 1e-1
    c.lr_sgd_momentum = 5e-2
    c.lr_nesterov = 2e-2
    c.lr_adagrad = 1e-1
    c.lr_rmsprop = 3e-4
    c.lr_adam = 1e-3
    c.lr_decay = 0.9  # multiply every rate by this per epoch ("exponential" schedule)
    c.momentum = 0.9  # sgd_momentum and nesterov
    c.rmsprop_decay = 0.99
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.smooth = 20  # moving-average window of the plotted training loss, in iterations
    # L-BFGS on full-batch softmax regression.
    c.lbfgs_train = 5000  # the first N training images (all classes)
    c.lbfgs_steps = 100
    c.lbfgs_l2 = 1e-2  # loss + l2 * |W|^2 (strictly convex: one minimiser)
    # Full-batch gradient descent for the same iterations, at the rate with the lowest final
    # loss among 0.1, 0.2, 0.3, 0.4, 0.5 (0.4 and 0.5 oscillate; 1.0 diverges).
    c.gd_lr = 0.3
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/update_rules_smoke"
    c.max_per_class = 10
    c.train_per_class = 8
    c.val_per_class = 2
    c.hidden = (16,)
    c.batch_size = 16
    c.epochs = 1
    c.rules = ("sgd", "adam")  # the others compile the same way; tests/test_update_rules.py
    c.smooth = 2
    c.lbfgs_train = 40
    c.lbfgs_steps = 3
    return c


def load_data(config):
    """Flattened float32 images [N, 3072] (in [0, 1], minus the train mean image) and labels."""
    if config.data == SHARED_ARCHIVE and not Path(SHARED_ARCHIVE).exists():
        raise FileNotFoundError(
            f"the default data, the shared CIFAR-10 archive, is not at {SHARED_ARCHIVE}: point "
            "--config.data at an image folder or archive of SPLIT/CLASS/*.jpg")
    kwargs = dict(max_per_class=config.max_per_class or None)
    train = sources.as_arrays(sources.load(config.data, "train", **kwargs))
    test = sources.as_arrays(sources.load(config.data, "test", **kwargs))
    # Per class, in the order of the split: the first train_per_class train, the next
    # val_per_class validate.
    train_idx, val_idx = [], []
    for k in range(train.num_classes):
        idx = np.flatnonzero(train.labels == k)
        if len(idx) < config.train_per_class + config.val_per_class:
            raise config_lib.ConfigError(
                f"config keys 'train_per_class' + 'val_per_class' = "
                f"{config.train_per_class + config.val_per_class} but class {k} has only "
                f"{len(idx)} training images")
        train_idx.append(idx[:config.train_per_class])
        val_idx.append(idx[config.train_per_class:config.train_per_class + config.val_per_class])
    # Interleave the classes (the split is sorted by class), so any prefix is balanced.
    train_idx = np.stack(train_idx, axis=1).reshape(-1)
    val_idx = np.concatenate(val_idx)

    def flat(images):
        return images.reshape(len(images), -1).astype(np.float32) / 255.0  # [N, 3072]

    x_train = flat(train.images[train_idx])
    mean_image = x_train.mean(axis=0, keepdims=True)  # [1, 3072], the course's preprocessing
    return {
        "train": (x_train - mean_image, train.labels[train_idx]),
        "val": (flat(train.images[val_idx]) - mean_image, train.labels[val_idx]),
        "test": (flat(test.images) - mean_image, test.labels),
        "num_classes": train.num_classes,
    }


def init_mlp(key, sizes):
    """He-initialised weights [d_in, d_out] and zero biases for consecutive `sizes`."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": init.he(k, (a, b)), "b": jnp.zeros((b,))}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x):
    """x: [B, D] -> logits [B, K]: (affine-ReLU)* then affine."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def mean_loss(params, x, y):
    return jnp.mean(losses.softmax_cross_entropy(logits=mlp(params, x), labels=y))


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(mlp(params, x), axis=-1) == y)


def make_rule(name, config, schedule_for):
    """The from-scratch rule `name` with its configured (and decayed) rate."""
    lr = schedule_for(config[f"lr_{name}"])
    if name == "sgd":
        return optim.sgd(lr)
    if name == "sgd_momentum":
        return optim.sgd_momentum(lr, config.momentum)
    if name == "nesterov":
        return optim.nesterov(lr, config.momentum)
    if name == "adagrad":
        return optim.adagrad(lr)
    if name == "rmsprop":
        return optim.rmsprop(lr, decay=config.rmsprop_decay)
    return optim.adam(lr, b1=config.adam_b1, b2=config.adam_b2)


def train_rule(tx, params, data, config, key):
    """Trains with `tx`; returns per-iteration losses and per-epoch accuracies (epoch 0 first)."""
    x, y = data["train"]
    n = len(y)
    steps = n // config.batch_size

    @jax.jit
    def epoch(params, state, x, y, order):
        def step(carry, idx):  # idx: [B] rows of this batch
            params, state = carry
            loss, grads = jax.value_and_grad(mean_loss)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        batches = order[:steps * config.batch_size].reshape(steps, config.batch_size)
        (params, state), step_losses = jax.lax.scan(step, (params, state), batches)
        return params, state, step_losses

    # Train accuracy on a fixed subset as large as the validation set (cheap, as in the course).
    n_acc = min(n, len(data["val"][1]))

    def accuracies(params):
        return (float(accuracy(params, x[:n_acc], y[:n_acc])),
                float(accuracy(params, *data["val"])))

    state = tx.init(params)
    step_losses, train_acc, val_acc = [], [], []
    a, v = accuracies(params)
    train_acc.append(a)
    val_acc.append(v)
    for e in range(config.epochs):
        order = jax.random.permutation(jax.random.fold_in(key, e), n)
        params, state, ls = epoch(params, state, x, y, order)
        ls = np.asarray(ls)
        if not np.all(np.isfinite(ls)):
            bad = int(np.flatnonzero(~np.isfinite(ls))[0]) + e * steps
            raise FloatingPointError(f"non-finite training loss at iteration {bad}")
        step_losses.append(ls)
        a, v = accuracies(params)
        train_acc.append(a)
        val_acc.append(v)
    return params, np.concatenate(step_losses), train_acc, val_acc, steps


def softmax_regression(config, data):
    """L-BFGS and gradient descent on full-batch softmax regression; their loss histories."""
    x, y = data["train"]
    x, y = jnp.asarray(x[:config.lbfgs_train]), jnp.asarray(y[:config.lbfgs_train])
    params = {"w": jnp.zeros((x.shape[1], data["num_classes"])),
              "b": jnp.zeros((data["num_classes"],))}

    def loss(params, x, y):
        logits = x @ params["w"] + params["b"][None, :]  # [N, K]
        ce = jnp.mean(losses.softmax_cross_entropy(logits=logits, labels=y))
        return ce + config.lbfgs_l2 * jnp.sum(params["w"] ** 2)

    lb_params, lb_losses = optim.lbfgs_minimize(loss, params, steps=config.lbfgs_steps,
                                                args=(x, y))

    @jax.jit
    def gd(params, x, y):
        def step(p, _):
            value, g = jax.value_and_grad(loss)(p, x, y)
            return jax.tree.map(lambda a, b: a - config.gd_lr * b, p, g), value

        p, values = jax.lax.scan(step, params, None, length=config.lbfgs_steps)
        return jnp.concatenate([values, loss(p, x, y)[None]])

    gd_losses = gd(params, x, y)

    def acc(split):
        xs, ys = data[split]
        logits = xs @ lb_params["w"] + lb_params["b"][None, :]
        return float(jnp.mean(jnp.argmax(logits, axis=-1) == ys))

    grad_norm = float(optax.tree.norm(jax.grad(loss)(lb_params, x, y)))
    return {"lbfgs_losses": np.asarray(lb_losses), "gd_losses": np.asarray(gd_losses),
            "val_accuracy": acc("val"), "test_accuracy": acc("test"), "grad_norm": grad_norm}


def smoothed(values, window):
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(path, runs, lbfgs, config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_loss, ax_train, ax_val, ax_lb = axes.ravel()
    for name, r in runs.items():
        line, = ax_loss.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], alpha=0.15)
        s = smoothed(r["losses"], config.smooth)
        ax_loss.plot(np.arange(len(s)) + config.smooth // 2 + 1, s, color=line.get_color(),
                     label=f"{name} (lr {config[f'lr_{name}']:g})")
        epochs = np.arange(len(r["train_acc"]))
        ax_train.plot(epochs, r["train_acc"], "o-", label=name)
        ax_val.plot(epochs, r["val_acc"], "o-",
                    label=f"{name}: test {r['test_accuracy']:.1%}")
    ax_loss.set(xlabel="iteration", ylabel="training loss",
                title=f"training loss (moving average over {config.smooth} iterations)")
    ax_train.set(xlabel="epoch", ylabel="accuracy", title="train accuracy")
    ax_val.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    it = np.arange(len(lbfgs["lbfgs_losses"]))
    ax_lb.plot(it, lbfgs["lbfgs_losses"], label=f"L-BFGS: test {lbfgs['test_accuracy']:.1%}")
    ax_lb.plot(it, lbfgs["gd_losses"], label=f"gradient descent (lr {config.gd_lr:g})")
    ax_lb.set(xlabel="iteration", ylabel="loss", yscale="log",
              title=f"full-batch softmax regression on {config.lbfgs_train} images")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Update rules on a {'-'.join(map(str, config.hidden))} MLP, CIFAR-10 "
                 f"({10 * config.train_per_class} training images)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def check_config(config):
    bad = [r for r in config.rules if r not in RULES]
    if bad or not config.rules:
        raise config_lib.ConfigError(
            f"config key 'rules' must be a non-empty tuple of {RULES}, got {config.rules}")
    for key in ("train_per_class", "val_per_class", "lbfgs_train", "lbfgs_steps", "smooth"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise config_lib.ConfigError(
                f"config key '{key}' must be a positive integer, got {config[key]!r}")
    if not config.hidden or any(not isinstance(h, int) or h < 1 for h in config.hidden):
        raise config_lib.ConfigError(
            f"config key 'hidden' must be a tuple of positive integers, got {config.hidden}")
    for key in [f"lr_{r}" for r in RULES] + ["gd_lr", "lr_decay"]:
        if not (isinstance(config[key], float) and math.isfinite(config[key])
                and config[key] > 0):
            raise config_lib.ConfigError(
                f"config key '{key}' must be a positive number, got {config[key]!r}")
    for key in ("rmsprop_decay", "adam_b1", "adam_b2"):
        if not 0 <= config[key] < 1:
            raise config_lib.ConfigError(f"config key '{key}' must be in [0, 1), "
                                         f"got {config[key]!r}")
    if config.lbfgs_l2 < 0:
        raise config_lib.ConfigError(f"config key 'lbfgs_l2' must be >= 0, got {config.lbfgs_l2}")
    if config.batch_size > 10 * config.train_per_class:
        raise config_lib.ConfigError(
            f"config key 'batch_size' ({config.batch_size}) exceeds the training set "
            f"({10 * config.train_per_class} images)")


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    check_config(config)
    start = time.time()
    data = load_data(config)
    x_train = data["train"][0]
    sizes = (x_train.shape[1], *config.hidden, data["num_classes"])
    key = jax.random.key(config.seed)
    k_init, k_order = jax.random.split(key)
    params0 = init_mlp(k_init, sizes)  # every rule starts from the same weights
    steps_per_epoch = len(x_train) // config.batch_size

    def schedule_for(lr):
        # lr * lr_decay ** (iteration / steps_per_epoch): a smooth per-epoch decay.
        return optim.make_schedule(kind="exponential", lr=lr, steps=1,
                                   decay_steps=steps_per_epoch, decay_rate=config.lr_decay)

    runs = {}
    for name in config.rules:
        t0 = time.time()
        tx = make_rule(name, config, schedule_for)
        params, step_losses, train_acc, val_acc, _ = train_rule(
            tx, params0, data, config, k_order)  # same batches for every rule
        runs[name] = {
            "losses": step_losses, "train_acc": train_acc, "val_acc": val_acc,
            "test_accuracy": float(accuracy(params, *data["test"])),
            "seconds": time.time() - t0,
        }
        print(f"{name:<13} lr {config[f'lr_{name}']:<8g} final train loss "
              f"{step_losses[-steps_per_epoch:].mean():.3f}  train acc {train_acc[-1]:.1%}  "
              f"val acc {val_acc[-1]:.1%}  test acc {runs[name]['test_accuracy']:.1%}  "
              f"({runs[name]['seconds']:.0f} s)")
    lbfgs = softmax_regression(config, data)
    print(f"L-BFGS softmax regression: loss {lbfgs['lbfgs_losses'][0]:.3f} -> "
          f"{lbfgs['lbfgs_losses'][-1]:.3f} in {config.lbfgs_steps} iterations (gradient "
          f"descent: {lbfgs['gd_losses'][-1]:.3f}); grad norm {lbfgs['grad_norm']:.1e}; test "
          f"accuracy {lbfgs['test_accuracy']:.1%}")
    wall = time.time() - start

    # metrics.jsonl: one object per iteration, with every rule's loss (and its accuracies at
    # epoch ends: "step" = epoch * steps_per_epoch).
    with open(os.path.join(config.workdir, "metrics.jsonl"), "w") as f:
        for i in range(config.epochs * steps_per_epoch + 1):
            row = {"step": i}
            for name, r in runs.items():
                if i >= 1:
                    row[f"{name}/train/loss"] = float(r["losses"][i - 1])
                if i % steps_per_epoch == 0:
                    row[f"{name}/train/accuracy"] = r["train_acc"][i // steps_per_epoch]
                    row[f"{name}/val/accuracy"] = r["val_acc"][i // steps_per_epoch]
            f.write(json.dumps(row) + "\n")
    plot(os.path.join(config.workdir, "report.png"), runs, lbfgs, config)

    best = max(runs, key=lambda n: runs[n]["val_acc"][-1])  # chosen on validation, not test
    test_count = len(data["test"][1])
    summary = {
        "config": config.to_dict(),
        "eval": {"accuracy": runs[best]["test_accuracy"], "count": test_count, "rule": best},
        "rules": {n: {"lr": config[f"lr_{n}"],
                      "final_train_loss": float(r["losses"][-steps_per_epoch:].mean()),
                      "train_accuracy": r["train_acc"][-1], "val_accuracy": r["val_acc"][-1],
                      "test_accuracy": r["test_accuracy"], "seconds": r["seconds"]}
                  for n, r in runs.items()},
        "lbfgs": {"initial_loss": float(lbfgs["lbfgs_losses"][0]),
                  "final_loss": float(lbfgs["lbfgs_losses"][-1]),
                  "gd_final_loss": float(lbfgs["gd_losses"][-1]),
                  "grad_norm": lbfgs["grad_norm"], "val_accuracy": lbfgs["val_accuracy"],
                  "test_accuracy": lbfgs["test_accuracy"]},
        "wall_time_s": wall,
    }
    with open(os.path.join(config.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"best rule on validation: {best}; test accuracy: {runs[best]['test_accuracy']:.2%} "
          f"({test_count} images), {wall:.0f} s\nwrote {config.workdir}/report.png")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
