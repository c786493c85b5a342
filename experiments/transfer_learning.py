"""Transfer learning on CIFAR-10: pre-train on classes 0-4, transfer to classes 5-9 (CS231n's
"transfer learning" table on real data).

    python -m experiments.transfer_learning
    python -m experiments.transfer_learning --config.depth=20 --config.pretrain_epochs=30 \
        --config.finetune_steps=1000        # a bigger setting, for a GPU (not yet run)

A CIFAR ResNet-8 (He et al. 2016's CIFAR layout with one basic block per stage, 16/32/64
channels, option-A shortcuts; 74,965 parameters with 5 classes, chosen so that 2 CPU cores
pre-train it in minutes) is pre-trained on the 25,000 training images of classes 0-4
(airplane, automobile, bird, cat, deer). Then for classes 5-9 (dog, frog, horse, ship, truck)
with 10, 100 and 1,000 labelled training images a class (nested subsets drawn with `seed`), four
regimes are scored on the 5,000 test images of classes 5-9:
  (a) linear: the frozen net's pooled features (`acts["features"]`, 64-d) are extracted once to
      `WORKDIR/features_{train,test}.npz`, and a softmax regression is trained on them;
  (b) last stage: stage 3 and a new head are fine-tuned, stem and stages 1-2 frozen
      (`transfer.multi_lr` with a `None` group = `optax.set_to_zero`);
  (c) everything: every parameter fine-tuned, the pre-trained body at `finetune_lr`, the new
      head at `head_lr` (10x: the new layer starts from scratch, the rest should move little);
  (d) scratch: the same net from a random init, same steps, `scratch_lr`.
(b) and (c) keep BatchNorm in inference mode (`finetune_bn="frozen"`, the running statistics of
pre-training; see `jaxvision.transfer`); (d) trains BN normally. All runs: Nesterov SGD, cosine
decay, weight decay 5e-4, random crop (pad 4) + flips, `finetune_steps` steps of up to 64 images.

Expected (measured 2026-11-23 on 2 CPU cores shared with five other jobs, jax 0.10.2, default
config, seed 0): pre-training 975 steps (5 epochs of 25,000 images) reaches 77.26% on the 5,000
test images of classes 0-4 in 384 s; then, test accuracy on the 5,000 test images of classes 5-9
(chance 20%), 645 s of wall time in all:

    regime          10 / class   100 / class  1000 / class
    linear              58.66%        69.60%        74.72%
    last_stage          66.36%        73.86%        74.66%
    all                 54.38%        75.62%        75.60%
    scratch             43.16%        71.92%        71.32%

What it shows (the course's table): with 10 images a class, fine-tuning only the last stage wins
(66%), the linear classifier on frozen features is second (59%), while fine-tuning everything
(54%) overfits the 50 images and training from scratch is far behind (43%): with little data,
keep most of the pre-trained net fixed. With 100 and 1,000 a class fine-tuning everything wins
(75.6%), and every pre-trained regime beats training from scratch (by 3 to 4 points at 1,000 a
class). Caveats: the pre-trained net is small and only 77% accurate on its own classes, so all
figures are low; and every run has the same 200 steps (12,800 images), so 1,000 a class is seen
for only 2.5 epochs: scratch and fine-tuning are under-trained there (scratch does no better than
with 100 a class), which narrows the gap to the linear probe. The GPU setting above (or a larger
`finetune_steps`) lifts that limit.
Printed summary line: `test accuracy: 75.60% (5000 images; all, 1000 a class)` (the best regime
at the largest size). `WORKDIR/report.png`: accuracy against labelled images per class, and the
table; `summary.json` holds the table, the winners and the pre-training result.

Smoke setting (run by the tests): `python -m experiments.transfer_learning --smoke` (10 images a
class, 2 and 5 shots, a 4/8/8-channel net, 3 fine-tuning steps): ~30-40 s on the loaded 2 cores,
nearly all of it compiling the ~8 programs (pre-train step, eval, features, init, 3 fine-tune
steps, linear fits).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvision import config as config_lib
from jaxvision import loop, losses, optim, train, transfer
from jaxvision.nets import resnet
from jaxvision.pipelines import augment, sources
from jaxvision.pipelines.loader import DeviceLoader
from jaxvision.sharding import make_mesh

SHARED_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
REGIMES = ("linear", "last_stage", "all", "scratch")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/transfer_learning"
    c.data = SHARED_ARCHIVE
    c.data_dir = ""
    c.max_per_class = 0  # 0 = all; > 0 loads only the first N images a class (smoke)
    c.source_classes = (0, 1, 2, 3, 4)  # pre-training
    c.target_classes = (5, 6, 7, 8, 9)  # transfer
    c.shots = (10, 100, 1000)  # labelled training images a target class
    # Net: a CIFAR ResNet of depth 6n + 2 (8: one block a stage) and its stage widths.
    c.depth = 8
    c.widths = (16, 32, 64)
    # Pre-training on the source classes.
    c.pretrain_epochs = 5
    c.batch_size = 128
    c.lr = 0.1  # per 128 images (He et al. 2016's CIFAR rate)
    c.warmup_epochs = 1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.crop_padding = 4
    # Transfer: every fine-tuning/scratch run takes finetune_steps steps of
    # min(finetune_batch_size, all the labelled images).
    c.finetune_steps = 200
    c.finetune_batch_size = 64
    c.finetune_lr = 0.01  # pre-trained body: small steps (CS231n: "use a smaller learning rate")
    c.head_lr = 0.1  # the new head starts from scratch
    c.scratch_lr = 0.1
    c.finetune_bn = "frozen"  # "frozen": inference-mode BN in (b) and (c); "train": batch stats
    # Linear classifier on the saved features (softmax regression, full batch, Adam).
    c.linear_steps = 1000
    c.linear_lr = 0.01
    c.linear_l2 = 1e-3
    c.eval_batch_size = 1000
    c.log_every = 50
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/transfer_learning_smoke"
    c.max_per_class = 10
    c.shots = (2, 5)
    c.widths = (4, 8, 8)
    c.pretrain_epochs = 2
    c.warmup_epochs = 0
    c.batch_size = 16
    c.finetune_steps = 3
    c.finetune_batch_size = 8
    c.linear_steps = 20
    c.eval_batch_size = 32
    c.log_every = 2
    return c


def make_preprocess(config):
    def preprocess(images, *, key, train):
        x = augment.normalize(images, mean=MEAN, std=STD)
        if train:
            k_crop, k_flip = jax.random.split(key)
            x = augment.random_crop(x, key=k_crop, padding=config.crop_padding)
            x = augment.random_flip(x, key=k_flip)
        return x
    return preprocess


def select(arr: sources.ArraySource, classes, *, per_class: int = 0,
           seed: int = 0) -> sources.ArraySource:
    """The images of `classes`, relabelled 0..len(classes)-1; `per_class` > 0 keeps a random
    (seeded) `per_class` of each class, the same prefix of one permutation for every size, so
    the subsets are nested (10 images of a class are among its 100)."""
    keep = []
    for c in classes:
        idx = np.flatnonzero(arr.labels == c)
        if per_class:
            if per_class > len(idx):
                raise config_lib.ConfigError(
                    f"config key 'shots': {per_class} images of class {c} asked, "
                    f"{len(idx)} available")
            idx = np.random.default_rng([seed, c]).permutation(idx)[:per_class]
        keep.append(idx)
    keep = np.concatenate(keep)
    relabel = np.zeros(arr.num_classes, np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    names = [arr.class_names[c] for c in classes] if arr.class_names else None
    return sources.ArraySource(arr.images[keep], relabel[arr.labels[keep]],
                               num_classes=len(classes), class_names=names)


def _state(params, batch_stats, tx, seed):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
            "opt_state": tx.init(params), "rng": jax.random.PRNGKey(seed)}


def _sgd(config, lr, steps):
    schedule = optim.make_schedule(kind="cosine", lr=lr, steps=steps)
    return optim.make_optimizer(name="nesterov", learning_rate=schedule,
                                momentum=config.momentum, weight_decay=config.weight_decay)


def _fit(step, state, *, loader, steps, eval_step, test_loader) -> float:
    """A short fixed-length run of a jitted `step` (no checkpoints: seconds to minutes)
    -> test accuracy."""
    for _, batch in loader.iterate(0, steps):
        state, metrics = step(state, batch)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise loop.NonFiniteError(f"non-finite loss {loss} at the last step")
    return train.evaluate(eval_step, state, test_loader.epoch())["accuracy"]


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    config_lib.check_choice(config, "finetune_bn", ("frozen", "train"))
    if config.data == SHARED_ARCHIVE and not Path(SHARED_ARCHIVE).exists():
        raise FileNotFoundError(f"the shared CIFAR-10 archive is not at {SHARED_ARCHIVE}: point "
                                "--config.data at a tfds name, an image folder or an archive")
    if set(config.source_classes) & set(config.target_classes):
        raise config_lib.ConfigError("config keys 'source_classes' and 'target_classes' overlap")
    t0 = time.time()
    kwargs = dict(data_dir=config.data_dir or None, max_per_class=config.max_per_class or None)
    train_all = sources.as_arrays(sources.load(config.data, "train", **kwargs))
    test_all = sources.as_arrays(sources.load(config.data, "test", **kwargs))
    source_train = select(train_all, config.source_classes)
    source_test = select(test_all, config.source_classes)
    target_test = select(test_all, config.target_classes)
    k = len(config.target_classes)
    mesh = make_mesh()
    preprocess = make_preprocess(config)
    model = resnet.cifar_resnet(config.depth, widths=tuple(config.widths),
                                stem_width=config.widths[0],
                                num_classes=len(config.source_classes))()
    if len(config.source_classes) != k:
        raise config_lib.ConfigError("source_classes and target_classes must have the same size "
                                     "(one net definition for both; the head is re-initialised)")

    # ---- Pre-training (the shared loop: metrics.jsonl, checkpoints, resumable) ----
    loader = DeviceLoader(source_train, batch_size=config.batch_size, mesh=mesh, seed=config.seed)
    pre_steps = config.pretrain_epochs * loader.steps_per_epoch
    schedule = optim.make_schedule(kind="cosine", lr=config.lr, steps=pre_steps,
                                   warmup_steps=config.warmup_epochs * loader.steps_per_epoch)
    tx = optim.make_optimizer(name="nesterov", learning_rate=schedule, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    eval_step = jax.jit(train.make_classifier_eval(model=model, preprocess=preprocess,
                                                   loss_fn=losses.softmax_cross_entropy))
    source_test_loader = DeviceLoader(source_test, batch_size=config.eval_batch_size, mesh=mesh,
                                      shuffle=False, drop_remainder=False)
    pretrained, pre_summary = loop.fit_classifier(
        model=model, tx=tx, schedule=schedule, preprocess=preprocess,
        loss_fn=losses.softmax_cross_entropy, train_loader=loader,
        eval_loader=source_test_loader, input_shape=source_train.image_shape, seed=config.seed,
        steps=pre_steps, workdir=config.workdir, log_every=config.log_every,
        keep_checkpoints=1, config=config)
    print(f"pre-trained on classes {tuple(config.source_classes)}: "
          f"{pre_summary['eval']['accuracy']:.2%} test accuracy, "
          f"{pre_summary['wall_time_s']:.0f} s")

    # ---- Features of the frozen net, to disk ----
    target_train = select(train_all, config.target_classes, per_class=max(config.shots),
                          seed=config.seed)
    paths = {s: os.path.join(config.workdir, f"features_{s}.npz") for s in ("train", "test")}
    for split, arr in (("train", target_train), ("test", target_test)):
        transfer.extract_features(model, pretrained, arr.images, preprocess, labels=arr.labels,
                                  batch_size=config.eval_batch_size, path=paths[split])
    feats_train, labels_train = transfer.load_features(paths["train"])
    feats_test, labels_test = transfer.load_features(paths["test"])

    # A fresh init: the new head for (b) and (c), the whole net for (d).
    fresh = train.create_train_state(model=model, tx=optax.identity(), seed=config.seed + 1,
                                     input_shape=source_train.image_shape, mesh=mesh)
    base_params = dict(pretrained["params"]) | {"head": fresh["params"]["head"]}
    last = transfer.resnet_stages(base_params)[-1]
    test_loader = DeviceLoader(target_test, batch_size=config.eval_batch_size, mesh=mesh,
                               shuffle=False, drop_remainder=False)
    ft_model = (transfer.inference_mode(model) if config.finetune_bn == "frozen" else model)
    steps = config.finetune_steps
    head = _sgd(config, config.head_lr, steps)
    body = _sgd(config, config.finetune_lr, steps)
    txs = {
        # (b) the last stage and the new head; the rest frozen (None = optax.set_to_zero).
        "last_stage": transfer.multi_lr({"head": head, "body": body, "frozen": None},
                                        [("^head/", "head"), (f"^{last}", "body")],
                                        default="frozen"),
        # (c) everything, the pre-trained body at the smaller rate.
        "all": transfer.multi_lr({"head": head, "body": body}, [("^head/", "head")],
                                 default="body"),
        # (d) from scratch: same net, same steps, training-mode BN.
        "scratch": _sgd(config, config.scratch_lr, steps),
    }
    # One jitted step a regime, reused for every number of shots (a new batch shape retraces).
    # The schedule argument only feeds the "lr" metric: the txs hold their own schedules.
    steps_fn = {r: jax.jit(train.make_classifier_step(
        model=model if r == "scratch" else ft_model, tx=tx,
        schedule=optax.constant_schedule(0.0), preprocess=preprocess,
        loss_fn=losses.softmax_cross_entropy)) for r, tx in txs.items()}
    starts = {"last_stage": (base_params, pretrained["batch_stats"]),
              "all": (base_params, pretrained["batch_stats"]),
              "scratch": (fresh["params"], fresh["batch_stats"])}
    table: dict[str, dict[int, float]] = {r: {} for r in REGIMES}
    for n in config.shots:
        # target_train holds a random max(shots) of each class: its first n of each class are
        # a random n, nested across n, and the same images for all four regimes.
        idx = np.concatenate([np.flatnonzero(labels_train == c)[:n] for c in range(k)])
        subset = sources.ArraySource(target_train.images[idx], target_train.labels[idx],
                                     num_classes=k)
        _, accuracy = transfer.train_linear_on_features(
            feats_train[idx], labels_train[idx], num_classes=k, l2=config.linear_l2,
            lr=config.linear_lr, steps=config.linear_steps, seed=config.seed)
        table["linear"][n] = accuracy(feats_test, labels_test)

        # The batch axis is split over the devices: a multiple of their number.
        ndev = mesh.devices.size
        batch = max(min(config.finetune_batch_size, len(subset)) // ndev * ndev, ndev)
        loader = DeviceLoader(subset, batch_size=batch, mesh=mesh, seed=config.seed)
        for r, tx in txs.items():
            params, batch_stats = starts[r]
            table[r][n] = _fit(steps_fn[r], _state(params, batch_stats, tx, config.seed),
                               loader=loader, steps=steps, eval_step=eval_step,
                               test_loader=test_loader)
        print(f"{n:>5} a class: " + ", ".join(f"{r} {table[r][n]:.2%}" for r in REGIMES))

    text = format_table(table, config.shots)
    winners = {n: max(REGIMES, key=lambda r: table[r][n]) for n in config.shots}
    verdict = "; ".join(f"{n} a class: {winners[n]}" for n in config.shots)
    print(text)
    print(f"best regime: {verdict}")
    largest = max(config.shots)
    summary = {
        # The headline: the best regime with the most labels.
        "eval": {"accuracy": table[winners[largest]][largest], "count": len(target_test.labels),
                 "regime": winners[largest], "shots": largest},
        "table": {r: {str(n): a for n, a in table[r].items()} for r in REGIMES},
        "winners": {str(n): w for n, w in winners.items()},
        "verdict": f"best regime: {verdict}",
        "table_text": text,
        "pretrain": {"eval": pre_summary["eval"], "steps": pre_steps,
                     "wall_time_s": pre_summary["wall_time_s"]},
        "wall_time_s": time.time() - t0,
        "config": config.to_dict(),
        **loop.run_info(),
    }
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        save_report(os.path.join(config.workdir, "report.png"), table, config.shots, text,
                    title=f"pre-trained on classes {tuple(config.source_classes)} "
                          f"({pre_summary['eval']['accuracy']:.1%}), transfer to "
                          f"{tuple(config.target_classes)}")
        print(f"test accuracy: {summary['eval']['accuracy']:.2%} "
              f"({summary['eval']['count']} images; {winners[largest]}, {largest} a class), "
              f"{summary['wall_time_s']:.0f} s")
    return summary


def format_table(table: dict, shots) -> str:
    """The regimes x shots accuracy table as aligned text."""
    lines = [f"{'regime':<12}" + "".join(f"{f'{n} / class':>14}" for n in shots)]
    for r in REGIMES:
        lines.append(f"{r:<12}" + "".join(f"{table[r][n]:>14.2%}" for n in shots))
    return "\n".join(lines)


def save_report(path: str, table: dict, shots, text: str, *, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_text) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in REGIMES:
        ax.plot(list(shots), [100 * table[r][n] for n in shots], "o-", label=r)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per target class")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_text.axis("off")
    ax_text.text(0.0, 0.5, text, family="monospace", fontsize=10, va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
