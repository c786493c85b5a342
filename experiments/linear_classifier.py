"""A linear classifier on raw CIFAR-10 pixels (CS231n assignment 1): multiclass SVM or softmax with
hand-written gradients, SGD, random search of learning rate and regularisation on a validation
split, then the best setting trained longer and tested.

    python -m experiments.linear_classifier --config.loss=svm
    python -m experiments.linear_classifier --config.loss=softmax

Data (the course's split): the shared archive's 50,000 training images in a seeded random order,
49,000 for training and the last 1,000 for validation; the 10,000 test images. Pixels scaled to
[0, 1], the mean training image subtracted (`augment.mean_image`), flattened to 3,072 and a
column of ones appended (the bias trick: `w` is [3,073, 10], bias row last, penalised like the
rest as in the course).

Procedure: the course's sanity checks on a 500-image dev set (W = 1e-4 * randn gives softmax
loss ~ log(10) = 2.303 and SVM loss ~ 9; the loop and vectorised losses agree and match centred
differences in float64); random search, 20 trials of 1,500 SGD steps (batch 200), lr in
[1e-4, 1e-1] and reg in [1e-4, 10] log-uniform (same init and minibatches for every trial);
the best validation accuracy's (lr, reg) then trains 10,000 steps, the rate halved every 2,500;
after it, the regularised loss of the final W on the dev set is higher than its data loss alone
(the "loss goes up with regularisation" check).

Expected (measured on 2 CPU cores shared with other jobs, jax 0.10.2; deterministic, the same
figures on a rerun):
- `--config.loss=svm`: test accuracy 37.77% (best of the search: lr 4.3e-3, reg 0.27, val
  40.7%; after the final run train 38.2%, val 40.2%), 128 s wall time (search 83 s);
- `--config.loss=softmax`: test accuracy 40.67% (best: lr 5.5e-2, reg 8.3e-3, val 41.6%; after
  the final run train 41.6%, val 41.5%), 157 s wall time (search 104 s).
Sanity checks printed (both runs): softmax initial loss 2.3023 (log 10 = 2.3026), SVM 8.9974;
loop vs vectorised gradient relative error <= 5e-12, vs centred differences <= 4e-7.
(The course reports ~37-39% for both on the original PNG images.)

Writes to WORKDIR (default workdirs/linear_classifier): summary.json (test accuracy, every
search trial, the sanity checks), metrics.jsonl (the final run's minibatch loss every `log_every`
steps, then the accuracies), report.png (the search: train and validation accuracy over
(lr, reg), as the course plots it; the final run's loss curve; the learned weights as 10 class
templates).

Smoke setting (run by the tests): `python -m experiments.linear_classifier --smoke`: 10 images
per class, 2 trials of 8 steps, 8 final steps.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxvision import config as config_lib
from jaxvision import gradcheck, linear
from jaxvision.loop import MetricWriter, run_info
from jaxvision.pipelines import augment, sources

# The shared data lives beside the checkout: ../shared/data (see its README).
SHARED_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz")

LOSSES = {
    "svm": (linear.svm_loss_naive, linear.svm_loss_vectorized),
    "softmax": (linear.softmax_loss_naive, linear.softmax_loss_vectorized),
}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/linear_classifier"
    c.loss = "svm"  # "svm" | "softmax"
    # Data.
    c.data = SHARED_ARCHIVE
    c.max_per_class = 0  # 0 = all; >0 keeps the first N images per class (smoke runs)
    c.num_val = 1000  # the last num_val of the permuted training split (the course's 1,000)
    c.num_dev = 500  # random training images for the sanity checks (the course's dev set)
    # Loss.
    c.penalty = "l2"  # "l2" (reg * sum w^2, the course's) | "l1" | "elastic"
    c.l1_ratio = 0.5  # elastic only
    # Random search: log-uniform lr and reg, each trial `search_steps` SGD steps.
    c.trials = 20
    c.search_steps = 1500
    c.lr_range = (1e-4, 1e-1)
    c.reg_range = (1e-4, 10.0)
    c.batch_size = 200
    c.init_scale = 1e-3  # W0 = init_scale * randn (the course's LinearClassifier.train)
    # The best (lr, reg) trained longer; the rate multiplied by lr_decay every decay_every steps
    # (a step schedule: the late, smaller steps average out minibatch noise).
    c.steps = 10000
    c.lr_decay = 0.5
    c.decay_every = 2500
    c.log_every = 100
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/linear_classifier_smoke"
    c.max_per_class = 10
    c.num_val = 20
    c.num_dev = 20
    c.trials = 2
    c.search_steps = 8
    c.batch_size = 16
    c.steps = 8  # = search_steps: the search's compiled SGD loop is reused
    c.decay_every = 4
    c.log_every = 5
    return c


def load_data(config):
    """{"train", "val", "test", "dev"}: (x [N, 3073] float32 with the bias column, y [N]), the
    mean image [32, 32, 3], class names."""
    if config.data == SHARED_ARCHIVE and not Path(SHARED_ARCHIVE).exists():
        raise FileNotFoundError(
            f"the default data, the shared CIFAR-10 archive, is not at {SHARED_ARCHIVE}: point "
            "--config.data at an image folder or an archive")
    kwargs = dict(max_per_class=config.max_per_class or None)
    train = sources.as_arrays(sources.load(config.data, "train", **kwargs))
    test = sources.as_arrays(sources.load(config.data, "test", **kwargs))
    if config.num_val >= len(train):
        raise config_lib.ConfigError(f"config key 'num_val' ({config.num_val}) must be smaller "
                                     f"than the training split ({len(train)})")
    rng = np.random.default_rng(config.seed)
    # The archive lists images class by class: permute before splitting off validation.
    order = rng.permutation(len(train))
    train_idx, val_idx = order[:-config.num_val], order[-config.num_val:]
    dev_idx = rng.choice(train_idx, min(config.num_dev, len(train_idx)), replace=False)
    mean = augment.mean_image(train.images[train_idx])  # [32, 32, 3] in [0, 1] units

    def features(images):  # uint8 [N, 32, 32, 3] -> [N, 3073]
        x = (images.astype(np.float32) / 255.0 - mean).reshape(len(images), -1)
        return linear.add_bias_column(x)

    data = {name: (features(train.images[idx]), train.labels[idx])
            for name, idx in (("train", train_idx), ("val", val_idx), ("dev", dev_idx))}
    data["test"] = (features(test.images), test.labels)
    return data, mean, train.class_names


def sanity_checks(data, config, loss_naive, loss_vectorized) -> dict:
    """The course's checks before training: initial losses and a gradient check on dev data."""
    x_dev, y_dev = data["dev"]
    num_classes = 10
    rng = np.random.default_rng(config.seed)
    w = 1e-4 * rng.standard_normal((x_dev.shape[1], num_classes)).astype(np.float32)
    # Scores ~ 0: softmax gives every class ~1/C (loss log C); every wrong class violates the
    # SVM margin by ~1 (loss C - 1).
    out = {"initial_loss_softmax": float(linear.softmax_loss_vectorized(w, x_dev, y_dev,
                                                                        reg=0.0)[0]),
           "expected_softmax": math.log(num_classes),
           "initial_loss_svm": float(linear.svm_loss_vectorized(w, x_dev, y_dev, reg=0.0)[0]),
           "expected_svm": num_classes - 1.0}
    print(f"sanity: W ~ 1e-4 randn: softmax loss {out['initial_loss_softmax']:.4f} "
          f"(log(10) = {out['expected_softmax']:.4f}), SVM loss {out['initial_loss_svm']:.4f} "
          f"(expected ~{out['expected_svm']:.0f})")
    # Loop vs vectorised vs centred differences, in float64, on 50 dev images with a
    # regularisation big enough to matter (W ~ 1e-2 randn so margins are not all equal).
    n = min(50, len(y_dev))
    x64, y64 = np.asarray(x_dev[:n], np.float64), np.asarray(y_dev[:n])
    w64 = 1e-2 * rng.standard_normal((x64.shape[1], num_classes))
    kw = dict(reg=0.1, penalty=config.penalty, l1_ratio=config.l1_ratio)
    with jax.enable_x64(True):
        loss_loop, dw_loop = loss_naive(w64, x64, y64, **kw)
        vec = jax.jit(functools.partial(loss_vectorized, **kw))
        loss_vec, dw_vec = vec(w64, x64, y64)
        # h = 1e-5, the course's grad_check_sparse step: with 3,073 x 10 weights the loss is a
        # sum of many terms, and h = 1e-6 lets float64 round-off (~1e-16 |f| / h) reach ~1e-6
        # relative error on the smallest gradient entries.
        numeric = gradcheck.check(lambda v: vec(v, x64, y64)[0], w64, analytic=dw_vec,
                                  num_samples=20, seed=config.seed, eps=1e-5)
        out.update(loss_loop_minus_vectorized=float(loss_loop) - float(loss_vec),
                   grad_loop_vs_vectorized_rel_error=float(
                       gradcheck.relative_error(dw_loop, dw_vec).max()),
                   grad_numeric_rel_error=max(numeric.values()))
    print(f"sanity: {config.loss} loop - vectorised loss {out['loss_loop_minus_vectorized']:.1e}, "
          f"gradient rel. error loop vs vectorised "
          f"{out['grad_loop_vs_vectorized_rel_error']:.1e}, vs centred differences "
          f"{out['grad_numeric_rel_error']:.1e} (float64)")
    return out


def save_report(path: str, trials: list[dict], best: dict, history: np.ndarray,
                templates: np.ndarray, class_names, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 7.5))
    gs = fig.add_gridspec(2, 3, height_ratios=[1.3, 0.6], hspace=0.35, wspace=0.3)
    lrs = np.log10([t["lr"] for t in trials])
    regs = np.log10([t["reg"] for t in trials])
    for j, key in enumerate(("train_accuracy", "val_accuracy")):
        ax = fig.add_subplot(gs[0, j])
        acc = np.array([t[key] for t in trials])
        points = ax.scatter(lrs, regs, c=acc, s=60, cmap="viridis")
        ax.scatter(np.log10(best["lr"]), np.log10(best["reg"]), s=200, facecolors="none",
                   edgecolors="red", label="best validation")
        fig.colorbar(points, ax=ax)
        ax.set(xlabel="log10 learning rate", ylabel="log10 regularisation",
               title=f"random search: {key.replace('_', ' ')}")
        ax.legend(fontsize=8, loc="lower left")
    ax = fig.add_subplot(gs[0, 2])
    ax.plot(np.arange(1, len(history) + 1), history, lw=0.5, alpha=0.5, label="minibatch")
    window = max(1, len(history) // 100)
    if len(history) >= window:
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(history) + 1), smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title="final run: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sub = gs[1, :].subgridspec(1, len(templates), wspace=0.05)
    for i, t in enumerate(templates):
        ax = fig.add_subplot(sub[0, i])
        ax.imshow(t, interpolation="nearest")
        ax.set_title(class_names[i] if class_names else str(i), fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    config_lib.check_choice(config, "loss", tuple(LOSSES))
    config_lib.check_choice(config, "penalty", linear.PENALTIES)
    for key in ("lr_range", "reg_range"):
        lo, hi = config[key]
        if not 0 < lo <= hi:
            raise config_lib.ConfigError(f"config key '{key}' must be (low, high) with "
                                         f"0 < low <= high, got {tuple(config[key])}")
    for key in ("trials", "search_steps", "num_val", "num_dev", "decay_every"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise config_lib.ConfigError(f"config key '{key}' must be a positive integer, "
                                         f"got {config[key]!r}")
    if not 0 < config.lr_decay <= 1:
        raise config_lib.ConfigError(f"config key 'lr_decay' must be in (0, 1], got "
                                     f"{config.lr_decay}")
    if not 0 <= config.l1_ratio <= 1:
        raise config_lib.ConfigError(f"config key 'l1_ratio' must be in [0, 1], got "
                                     f"{config.l1_ratio}")
    t_start = time.time()
    data, _, class_names = load_data(config)
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    x_test, y_test = data["test"]
    times = {"data": time.time() - t_start}
    print(f"data: {len(y_train)} train / {len(y_val)} val / {len(y_test)} test, "
          f"{x_train.shape[1]} features with the bias ({times['data']:.1f} s)")
    loss_naive, loss_vectorized = LOSSES[config.loss]
    sanity = sanity_checks(data, config, loss_naive, loss_vectorized)

    # One loss function object for the search and the final run: it is a static argument of
    # the compiled SGD loop, so the search compiles once.
    loss_fn = functools.partial(loss_vectorized, penalty=config.penalty,
                                l1_ratio=config.l1_ratio)
    t0 = time.time()
    search = linear.random_search(
        loss_fn, x_train, y_train, x_val, y_val, lr_range=tuple(config.lr_range),
        reg_range=tuple(config.reg_range), trials=config.trials, steps=config.search_steps,
        batch_size=config.batch_size, seed=config.seed, init_scale=config.init_scale)
    times["search"] = time.time() - t0
    for t in sorted(search["trials"], key=lambda t: (t["lr"], t["reg"])):
        print(f"lr {t['lr']:.2e} reg {t['reg']:.2e}: train accuracy {t['train_accuracy']:.3f} "
              f"val accuracy {t['val_accuracy']:.3f}")
    best = search["best"]
    print(f"best: lr {best['lr']:.2e} reg {best['reg']:.2e}, val accuracy "
          f"{best['val_accuracy']:.2%} ({times['search']:.0f} s for {config.trials} trials)")

    t0 = time.time()
    w, history = linear.train_sgd(
        loss_fn, x_train, y_train, lr=best["lr"], reg=best["reg"], steps=config.steps,
        batch_size=config.batch_size, seed=config.seed, init_scale=config.init_scale,
        lr_decay=config.lr_decay, decay_every=config.decay_every)
    times["final_training"] = time.time() - t0
    if not np.isfinite(history).all():
        print(f"warning: non-finite loss in the final run (first at step "
              f"{int(np.argmin(np.isfinite(history))) + 1})")
    accuracies = {name: linear.accuracy(w, *data[name]) for name in ("train", "val", "test")}
    # The regularised loss of the trained W is above its data loss alone.
    x_dev, y_dev = data["dev"]
    sanity["final_dev_loss_no_reg"] = float(loss_fn(w, x_dev, y_dev, reg=0.0)[0])
    sanity["final_dev_loss_with_reg"] = float(loss_fn(w, x_dev, y_dev, reg=best["reg"])[0])
    sanity["loss_goes_up_with_reg"] = \
        sanity["final_dev_loss_with_reg"] > sanity["final_dev_loss_no_reg"]
    print(f"sanity: final W on dev: loss {sanity['final_dev_loss_no_reg']:.4f} without, "
          f"{sanity['final_dev_loss_with_reg']:.4f} with reg {best['reg']:.2e}")

    os.makedirs(config.workdir, exist_ok=True)
    writer = MetricWriter(config.workdir)
    for step in range(config.log_every, config.steps + 1, config.log_every):
        writer.write(step, {"train/loss": float(np.mean(history[step - config.log_every:step]))})
    writer.write(config.steps, {"train/accuracy": accuracies["train"],
                                "val/accuracy": accuracies["val"],
                                "eval/accuracy": accuracies["test"]})
    summary = {
        "eval": {"accuracy": accuracies["test"], "count": int(len(y_test))},
        "train_accuracy": accuracies["train"],
        "val_accuracy": accuracies["val"],
        "loss": config.loss,
        "best": best,
        "search": search["trials"],
        "final_loss": float(history[-1]),
        "sanity": sanity,
        "times_s": times,
        "wall_time_s": time.time() - t_start,
        "config": config.to_dict(),
        **run_info(),
    }
    with open(os.path.join(config.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    report = os.path.join(config.workdir, "report.png")
    save_report(report, search["trials"], best, history,
                linear.templates(w, (32, 32, 3)), class_names,
                title=f"linear {config.loss} on CIFAR-10 pixels: test accuracy "
                      f"{accuracies['test']:.2%} (lr {best['lr']:.1e}, reg {best['reg']:.1e})")
    print(f"train accuracy {accuracies['train']:.2%}, val accuracy {accuracies['val']:.2%}\n"
          f"test accuracy: {accuracies['test']:.2%} ({len(y_test)} images), "
          f"{summary['wall_time_s']:.0f} s\nwrote {report}")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
