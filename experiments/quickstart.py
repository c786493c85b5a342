"""Quickstart: a small ConvNet on scikit-learn's bundled handwritten digits, on CPU, no download.

    python -m experiments.quickstart
    python -m experiments.quickstart --config.steps=1000 --config.workdir=/tmp/digits

Expected: test accuracy ~98% (>= 95%) on the 360 held-out digits, in ~15 s on 2 CPU cores
(compilation included). Writes to WORKDIR (default workdirs/quickstart): checkpoints/,
metrics.jsonl, summary.json and report.png (learning curves and a grid of test predictions).
Rerunning the same command resumes (or, once finished, just reports).

Smoke setting (run by the tests): `python -m experiments.quickstart --smoke`.
"""
from __future__ import annotations


import jax
import ml_collections
import numpy as np

from jaxvision import config as config_lib
from jaxvision import loop, losses, optim, plots, train
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines import augment, sources
from jaxvision.pipelines.loader import DeviceLoader
from jaxvision.sharding import make_mesh


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/quickstart"
    # Data: 1,437 train / 360 test digits, 8x8 grey (stratified split, fixed seed).
    c.batch_size = 64
    c.eval_batch_size = 128
    # Net: two conv-BN-ReLU-pool blocks, 8x8 -> 4x4 -> 2x2, then global pooling.
    c.widths = (32, 64)
    # Optimisation: Nesterov SGD, linear warmup then cosine decay, L2 weight decay.
    c.steps = 600
    c.lr = 0.05
    c.warmup_steps = 50
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.label_smoothing = 0.0
    # Augmentation: shift by up to one pixel (the digits are centred; more hurts).
    c.crop_padding = 1
    # Periodic actions.
    c.log_every = 50
    c.eval_every = 200
    c.ckpt_every = 200
    c.keep_checkpoints = 2
    c.fsdp = False
    c.tensorboard = False
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/quickstart_smoke"
    c.steps = 12
    c.warmup_steps = 2
    c.widths = (8, 16)
    c.log_every = 4
    c.eval_every = 6
    c.ckpt_every = 6
    return c


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)  # before any data is read or anything is compiled
    mesh = make_mesh()
    train_src, test_src = sources.digits("train"), sources.digits("test")
    train_loader = DeviceLoader(train_src, batch_size=config.batch_size, mesh=mesh,
                                seed=config.seed, shuffle=True, drop_remainder=True)
    test_loader = DeviceLoader(test_src, batch_size=config.eval_batch_size, mesh=mesh,
                               shuffle=False, drop_remainder=False)
    mean, std = augment.channel_stats(train_src.images)

    def preprocess(images, *, key, train):
        x = augment.normalize(images, mean=mean, std=std)
        if train:
            x = augment.random_crop(x, key=key, padding=config.crop_padding)
        return x

    model = ConvNet(widths=config.widths, num_classes=train_src.num_classes)
    schedule = optim.make_schedule(kind="cosine", lr=config.lr, steps=config.steps,
                                   warmup_steps=config.warmup_steps)
    tx = optim.make_optimizer(name="nesterov", learning_rate=schedule,
                              momentum=config.momentum, weight_decay=config.weight_decay)

    def loss_fn(*, logits, labels):
        return losses.softmax_cross_entropy(logits=logits, labels=labels,
                                            label_smoothing=config.label_smoothing)

    state, summary = loop.fit_classifier(
        model=model, tx=tx, schedule=schedule, preprocess=preprocess, loss_fn=loss_fn,
        train_loader=train_loader, eval_loader=test_loader, input_shape=train_src.image_shape,
        seed=config.seed, steps=config.steps, workdir=config.workdir, fsdp=config.fsdp,
        log_every=config.log_every, eval_every=config.eval_every, ckpt_every=config.ckpt_every,
        keep_checkpoints=config.keep_checkpoints, config=config, tensorboard=config.tensorboard)

    if jax.process_index() == 0:
        images, labels = test_src.images[:32], test_src.labels[:32]
        preds = np.asarray(train.predict(model, state, images, preprocess).argmax(-1))
        accuracy = summary["eval"]["accuracy"]
        report = plots.save_run_report(config.workdir, images, labels, preds,
                                       title=f"digits: test accuracy {accuracy:.2%}")
        print(f"test accuracy: {accuracy:.2%} ({summary['eval']['count']} images)\n"
              f"wrote {report}")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
