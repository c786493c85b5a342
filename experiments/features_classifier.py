"""CIFAR-10 from hand-designed features (CS231n assignment 1, "features"): HOG + hue histogram,
then a linear SVM and a two-layer net, each with a small learning-rate / regularisation search.

    python -m experiments.features_classifier
    python -m experiments.features_classifier --config.net_epochs=5 --config.workdir=/tmp/feats

Expected (measured here, 2 CPU cores shared with other jobs, seed 0): linear SVM 50.15% and
two-layer net 61.64% test accuracy (targets: >= 42% and >= 55%), in ~140 s: ~25 s to extract
the features of 60,000 images (cached in WORKDIR/features.npz, so a rerun skips it), ~15 s for
the 9 SVMs, ~90 s for the 9 nets (15 epochs each). Best settings: SVM lr 1e-3, reg 1e-3 (val
50.5%; the whole SVM grid is within 48.8-50.5% on val); net lr 1.0, reg 1e-3 (val 62.1%).

Pipeline, as in the course's notebook:
- Data: the shared CIFAR-10 archive; 1,000 images of the train split (a seeded random choice:
  the archive lists the images class by class, so the course's "last 1,000" would be one class)
  are the validation set, the other 49,000 the training set; the 10,000 test images.
- Features (`jaxvision.pipelines.features`): HOG of the grey image (8x8 cells, 9 unsigned
  orientation bins: 4 * 4 * 9 = 144) and a 10-bin hue histogram, 154 features per image;
  standardised with the training set's mean and standard deviation per feature.
- (a) Linear SVM (`jaxvision.linear`): multiclass hinge loss, a bias column appended, minibatch
  SGD; a grid of learning rates x regularisation strengths, best on validation.
- (b) Two-layer net (`jaxvision.nets.course`): affine - ReLU - affine - softmax, 500 hidden
  units, its backward written out by hand; plain SGD with a per-epoch decay via the course's
  Solver (`course.train`), a grid of learning rates x regularisation strengths, the best on
  validation (at its best epoch). The net has its own biases, so it gets no bias column (the
  course drops it too).
Writes WORKDIR/summary.json (both searches, both test accuracies; "eval" is the net's),
metrics.jsonl (the chosen net's training curve) and report.png (both searches as heatmaps of
validation accuracy, the net's loss and accuracy curves, and test images the net got wrong,
grouped by the class it predicted, as the course shows for its SVM).

Smoke setting (run by the tests): `python -m experiments.features_classifier --smoke`: 10
images per class, one setting per search, a few steps.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvision import config as config_lib
from jaxvision import linear, loop
from jaxvision.nets import course
from jaxvision.pipelines import features, sources

# The shared data lives beside the checkout: ../shared/data (see its README).
SHARED_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz")
# Part of the feature cache's key: bump when the feature code changes what it computes.
FEATURES_VERSION = 1


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/features_classifier"
    # Data.
    c.data = SHARED_ARCHIVE
    c.max_per_class = 0  # 0 = all; >0 keeps the first N images per class (smoke runs)
    c.num_val = 1000  # taken at random from the train split; the rest is the training set
    # Features: HOG (cell x cell pixels, `hog_bins` orientations in [0, 180)) + hue histogram.
    c.hog_cell = 8
    c.hog_bins = 9
    c.hue_bins = 10
    c.feature_chunk = 1000  # images per jitted feature call
    # (a) Linear SVM: minibatch SGD from `linear.train_sgd`, one run per (lr, reg).
    c.svm_lrs = (1e-3, 3e-3, 1e-2)
    c.svm_regs = (1e-3, 1e-2, 1e-1)
    c.svm_steps = 1500
    c.svm_batch_size = 200
    # (b) Two-layer net: SGD, lr * lr_decay ** epoch, one run per (lr, reg).
    c.net_hidden = 500
    c.net_weight_scale = 1e-2
    c.net_lrs = (0.1, 0.3, 1.0)
    c.net_regs = (1e-4, 1e-3, 1e-2)
    c.net_epochs = 15
    c.net_batch_size = 200
    c.net_lr_decay = 0.95
    c.log_every = 50  # steps per logged train-loss point
    # Report: wrong test predictions shown per predicted class.
    c.misclassified_per_class = 6
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/features_classifier_smoke"
    c.max_per_class = 10  # 100 train (20 of them validation) and 100 test images
    c.num_val = 20
    c.feature_chunk = 64
    c.svm_lrs = (1e-2,)
    c.svm_regs = (1e-3,)
    c.svm_steps = 20
    c.svm_batch_size = 16
    c.net_hidden = 16
    c.net_lrs = (0.3,)
    c.net_regs = (1e-3,)
    c.net_epochs = 2
    c.net_batch_size = 16
    c.log_every = 2
    c.misclassified_per_class = 1
    return c


def _check(config: ml_collections.ConfigDict) -> None:
    """The keys `config_lib.validate` has no rule for."""
    def fail(key, msg):
        raise config_lib.ConfigError(f"config key '{key}' {msg}, got {config[key]!r}")

    for key in ("num_val", "hog_cell", "hog_bins", "hue_bins", "feature_chunk", "svm_steps",
                "svm_batch_size", "net_hidden", "net_epochs", "net_batch_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            fail(key, "must be a positive integer")
    for key in ("max_per_class", "misclassified_per_class"):
        if not isinstance(config[key], int) or config[key] < 0:
            fail(key, "must be an integer >= 0")
    for key in ("svm_lrs", "net_lrs"):
        if not config[key] or not all(isinstance(v, (int, float)) and v > 0 for v in config[key]):
            fail(key, "must be a non-empty tuple of positive numbers")
    for key in ("svm_regs", "net_regs"):
        if not config[key] or not all(isinstance(v, (int, float)) and v >= 0 for v in config[key]):
            fail(key, "must be a non-empty tuple of numbers >= 0")
    if not config.net_weight_scale > 0:
        fail("net_weight_scale", "must be > 0")
    if not 0 < config.net_lr_decay <= 1:
        fail("net_lr_decay", "must be in (0, 1]")


def load_data(config):
    """(train ArraySource, test ArraySource) from `config.data`."""
    if config.data == SHARED_ARCHIVE and not Path(SHARED_ARCHIVE).exists():
        raise FileNotFoundError(
            f"the default data, the shared CIFAR-10 archive, is not at {SHARED_ARCHIVE}: point "
            "--config.data at an image folder or an archive")
    kwargs = dict(max_per_class=config.max_per_class or None)
    return (sources.as_arrays(sources.load(config.data, "train", **kwargs)),
            sources.as_arrays(sources.load(config.data, "test", **kwargs)))


def image_features(config, train, test) -> tuple[np.ndarray, np.ndarray, dict]:
    """HOG + hue features of both splits, read from WORKDIR/features.npz when it was made from
    the same data and settings. Returns (train [N, F], test [M, F], info)."""
    key = json.dumps({"version": FEATURES_VERSION, "data": config.data,
                      "max_per_class": config.max_per_class, "hog_cell": config.hog_cell,
                      "hog_bins": config.hog_bins, "hue_bins": config.hue_bins,
                      "n_train": len(train), "n_test": len(test)}, sort_keys=True)
    path = os.path.join(config.workdir, "features.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return cached["train"], cached["test"], {"cached": True, "extract_s": 0.0}
    fns = [functools.partial(features.hog, cell=config.hog_cell, bins=config.hog_bins),
           functools.partial(features.hue_histogram, bins=config.hue_bins)]
    t0 = time.time()
    x_train = features.extract(train.images, fns, chunk=config.feature_chunk)
    x_test = features.extract(test.images, fns, chunk=config.feature_chunk)
    seconds = time.time() - t0
    np.savez(path, key=np.asarray(key), train=x_train, test=x_test)
    return x_train, x_test, {"cached": False, "extract_s": seconds}


def standardise(x_train, *others):
    """Subtracts the training mean and divides by the training std, per feature (a constant
    feature keeps std 1). [N, F] arrays in, the same out (train first)."""
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return [((x - mean) / std).astype(np.float32) for x in (x_train, *others)]


def svm_search(config, x_train, y_train, x_val, y_val, num_classes):
    """One `linear.train_sgd` run per (lr, reg); returns (best run, its weights, all runs)."""
    runs, best, best_w = [], None, None
    for lr in config.svm_lrs:
        for reg in config.svm_regs:
            w, history = linear.train_sgd(
                linear.svm_loss_vectorized, x_train, y_train, lr=lr, reg=reg,
                steps=config.svm_steps, batch_size=config.svm_batch_size, seed=config.seed,
                num_classes=num_classes)
            run = {"lr": lr, "reg": reg,
                   "final_loss": float(np.mean(np.asarray(history)[-50:])),
                   "train_accuracy": _accuracy(linear.predict(w, x_train), y_train),
                   "val_accuracy": _accuracy(linear.predict(w, x_val), y_val)}
            runs.append(run)
            print(f"svm lr {lr:g} reg {reg:g}: train {run['train_accuracy']:.2%} "
                  f"val {run['val_accuracy']:.2%}")
            if best is None or run["val_accuracy"] > best["val_accuracy"]:
                best, best_w = run, w
    return best, best_w, runs


def _accuracy(pred, y) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def _two_layer_loss_and_grads(params, state, x, y, key, *, reg):
    """`course.train`'s step interface around the hand-written backward."""
    del key  # no dropout
    loss, grads = course.two_layer_loss(params, x, y, reg=reg)
    return loss, grads, state


def _two_layer_scores(params, state, x):
    del state
    return course.two_layer_loss(params, x)


def net_search(config, x_train, y_train, x_val, y_val, num_classes):
    """One `course.train` run per (lr, reg); returns (best run, its params, its logged rows,
    all runs)."""
    runs, best = [], None
    for lr in config.net_lrs:
        for reg in config.net_regs:
            params = course.init_two_layer(
                jax.random.key(config.seed), input_dim=x_train.shape[1],
                hidden_dim=config.net_hidden, num_classes=num_classes,
                weight_scale=config.net_weight_scale)
            rows = []
            params, _, history = course.train(
                functools.partial(_two_layer_loss_and_grads, reg=reg), _two_layer_scores, params,
                x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, optimizer="sgd",
                lr=lr, lr_decay=config.net_lr_decay, epochs=config.net_epochs,
                batch_size=config.net_batch_size, seed=config.seed, log_every=config.log_every,
                log=lambda step, values, rows=rows: rows.append({"step": step, **values}),
                progress=False, verbose=False)
            run = {"lr": lr, "reg": reg, "val_accuracy": float(history["best_val_acc"]),
                   "best_epoch": int(history["best_epoch"]),
                   "final_train_accuracy": float(history["train_acc"][-1]),
                   "time_s": float(history["time_s"])}
            runs.append(run)
            print(f"net lr {lr:g} reg {reg:g}: val {run['val_accuracy']:.2%} (epoch "
                  f"{run['best_epoch']}), train {run['final_train_accuracy']:.2%}, "
                  f"{run['time_s']:.0f} s")
            if best is None or run["val_accuracy"] > best[0]["val_accuracy"]:
                best = (run, params, rows)
    return (*best, runs)


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)  # before any data is read or anything is compiled
    _check(config)
    t_start = time.time()
    train, test = load_data(config)
    if not config.num_val < len(train):
        raise config_lib.ConfigError(
            f"config key 'num_val' must be below the train split's size ({len(train)}), got "
            f"{config.num_val}")
    feats_train, feats_test, feature_info = image_features(config, train, test)
    # Validation: a seeded random subset of the train split (it is stored class by class).
    order = np.random.default_rng(config.seed).permutation(len(train))
    val_idx, train_idx = np.sort(order[:config.num_val]), np.sort(order[config.num_val:])
    x_train, x_val, x_test = standardise(feats_train[train_idx], feats_train[val_idx], feats_test)
    y_train, y_val, y_test = train.labels[train_idx], train.labels[val_idx], test.labels
    print(f"features: {x_train.shape[1]} per image ({'cached' if feature_info['cached'] else 'extracted in %.0f s' % feature_info['extract_s']}); "
          f"{len(y_train)} train / {len(y_val)} val / {len(y_test)} test")

    # (a) Linear SVM on the features plus a bias column (the bias trick).
    xb_train, xb_val, xb_test = (linear.add_bias_column(x) for x in (x_train, x_val, x_test))
    svm_best, svm_w, svm_runs = svm_search(config, xb_train, y_train, xb_val, y_val,
                                             num_classes=train.num_classes)
    svm_test = _accuracy(linear.predict(svm_w, xb_test), y_test)
    print(f"svm test accuracy: {svm_test:.2%} ({len(y_test)} images), lr {svm_best['lr']:g} "
          f"reg {svm_best['reg']:g}")

    # (b) Two-layer net on the same (standardised) features, without the bias column.
    net_best, net_params, net_rows, net_runs = net_search(
        config, x_train, y_train, x_val, y_val, num_classes=train.num_classes)
    writer = loop.MetricWriter(config.workdir)
    if os.path.exists(writer.path):
        os.remove(writer.path)  # a rerun replaces the curve
    for row in net_rows:
        writer.write(row["step"], {k: v for k, v in row.items() if k != "step"})
    writer.close()
    scores = jax.jit(_two_layer_scores)(net_params, None, x_test)  # one compiled program
    net_pred = np.asarray(jnp.argmax(scores, axis=1))
    net_test = _accuracy(net_pred, y_test)

    summary = {
        "eval": {"accuracy": net_test, "count": int(len(y_test))},
        "svm": {"test_accuracy": svm_test, **svm_best, "search": svm_runs},
        "net": {"test_accuracy": net_test, **net_best, "search": net_runs},
        "features": {"dim": int(x_train.shape[1]), **feature_info},
        "split": {"train": int(len(y_train)), "val": int(len(y_val)), "test": int(len(y_test))},
        "wall_time_s": time.time() - t_start,
        "config": config.to_dict(),
        **loop.run_info(),
    }
    with open(os.path.join(config.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    save_report(os.path.join(config.workdir, "report.png"), config=config, svm_runs=svm_runs,
                net_runs=net_runs, net_rows=net_rows, svm_test=svm_test, net_test=net_test,
                images=test.images, labels=y_test, preds=net_pred, class_names=test.class_names)
    print(f"test accuracy: {net_test:.2%} ({len(y_test)} images) [two-layer net; SVM "
          f"{svm_test:.2%}], {summary['wall_time_s']:.0f} s\n"
          f"wrote {os.path.join(config.workdir, 'report.png')}")
    return summary


# ---------------------------------------------------------------------------------------------
# Report


def _search_heatmap(ax, runs, lrs, regs, title):
    """Validation accuracy over the (lr, reg) grid, each cell labelled."""
    grid = np.full((len(lrs), len(regs)), np.nan)
    for run in runs:
        grid[list(lrs).index(run["lr"]), list(regs).index(run["reg"])] = run["val_accuracy"]
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(lrs)):
        for j in range(len(regs)):
            ax.text(j, i, f"{grid[i, j]:.1%}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < np.nanmax(grid) - 0.02 else "black")
    ax.set(xticks=range(len(regs)), xticklabels=[f"{r:g}" for r in regs], xlabel="reg",
           yticks=range(len(lrs)), yticklabels=[f"{r:g}" for r in lrs], ylabel="lr",
           title=title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def save_report(path, *, config, svm_runs, net_runs, net_rows, svm_test, net_test, images, labels,
                preds, class_names):
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless hosts and in tests
    import matplotlib.pyplot as plt

    num_classes = len(class_names)
    k = config.misclassified_per_class
    fig = plt.figure(figsize=(14, 9 + 1.1 * k))
    gs = fig.add_gridspec(3 if k else 2, 2, height_ratios=[1, 1, 0.4 * k][:3 if k else 2],
                          hspace=0.45, wspace=0.3)
    _search_heatmap(fig.add_subplot(gs[0, 0]), svm_runs, config.svm_lrs, config.svm_regs,
                    f"linear SVM: val accuracy (test {svm_test:.1%} at the best)")
    _search_heatmap(fig.add_subplot(gs[0, 1]), net_runs, config.net_lrs, config.net_regs,
                    f"two-layer net: best val accuracy (test {net_test:.1%} at the best)")
    ax_loss, ax_acc = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1])
    loss = [(r["step"], r["train/loss"]) for r in net_rows if "train/loss" in r]
    epochs = [(r["step"], r["train/accuracy"], r["val/accuracy"]) for r in net_rows
              if "val/accuracy" in r]
    if loss:
        ax_loss.plot(*zip(*loss))
    ax_loss.set(xlabel="step", ylabel="train loss", title="two-layer net (chosen): loss")
    if epochs:
        steps, tr, va = zip(*epochs)
        ax_acc.plot(steps, tr, "o-", label="train (random 1,000)")
        ax_acc.plot(steps, va, "o-", label="val")
        ax_acc.legend()
    ax_acc.set(xlabel="step", ylabel="accuracy", title="two-layer net (chosen): accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if k:
        # Columns: the predicted class; each shows up to k test images wrongly given that class.
        # A seeded random choice: the test split is stored class by class, so the first
        # mistakes would all be of one true class.
        sub = gs[2, :].subgridspec(k, num_classes, wspace=0.05, hspace=0.35)
        order = np.random.default_rng(config.seed).permutation(len(labels))
        for c in range(num_classes):
            wrong = order[(preds[order] == c) & (labels[order] != c)][:k]
            for r in range(k):
                ax = fig.add_subplot(sub[r, c])
                ax.axis("off")
                if r == 0:
                    ax.set_title(f"as {class_names[c]}", fontsize=8)
                if r < len(wrong):
                    ax.imshow(images[wrong[r]], interpolation="nearest")
                    ax.text(0.5, -0.02, class_names[labels[wrong[r]]], transform=ax.transAxes,
                            ha="center", va="top", fontsize=6, color="red")
    fig.suptitle(f"CIFAR-10 on HOG + hue features: SVM {svm_test:.2%}, two-layer net "
                 f"{net_test:.2%} (test); bottom: the net's mistakes, true class in red")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
