"""CIFAR-10 with a VGG-style ConvNet (conv-BN-ReLU x2 per block, 64-128-256 channels).

    python -m experiments.cifar10_convnet                       # the shared JPEG archive
    python -m experiments.cifar10_convnet --config.data=tfds:cifar10 --config.data_dir=~/tfds
    python -m experiments.cifar10_convnet --config.data=/data/my_cifar_folder --config.loader=host

Expected on one H100 (not yet measured here: see README, "Experiments"): >= 80% test accuracy
after 30 epochs in a few minutes. On CPU (2 cores) the full net trains at ~70 images/s (~12
minutes an epoch): use `--smoke` (seconds) or a smaller net to try it, e.g.
`--config.widths='(16, 32, 64)' --config.convs_per_block=1 --config.epochs=2
--config.warmup_epochs=1`: 61.3% in 93 s on 2 CPU cores (~1,400 images/s).

Data: `data` is "tfds:NAME" (prepared array_record data under `data_dir`), or a path to an image
folder or a .tar/.tar.gz/.tar.xz archive of `SPLIT/CLASS/*.jpg` (default: the shared CIFAR-10
archive beside this checkout, decoded once and cached). `loader="device"` keeps the whole data
set in accelerator memory and augments inside jit (the fast path); "host" streams from the
source. Augmentation: random crop with padding 4, horizontal flip, optional cutout.

Smoke setting (run by the tests): `python -m experiments.cifar10_convnet --smoke`: 10 images per
class, a tiny net, 16 steps, checkpoints every 4.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvision import config as config_lib
from jaxvision import loop, losses, optim, plots, train
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines import augment, sources
from jaxvision.pipelines.loader import DeviceLoader, HostLoader
from jaxvision.sharding import make_mesh

# The shared data lives beside the checkout: ../shared/data (see its README).
SHARED_ARCHIVE = str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/cifar10_convnet"
    # Data.
    c.data = SHARED_ARCHIVE
    c.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.train_split = "train"
    c.test_split = "test"
    c.max_per_class = 0  # 0 = all; >0 keeps the first N images per class (smoke runs)
    c.on_bad = "raise"  # or "skip": drop bad images, count them, warn
    c.loader = "device"  # "device": data set in accelerator memory; "host": streamed
    c.batch_size = 256
    c.eval_batch_size = 1000
    # Net.
    c.widths = (64, 128, 256)
    c.convs_per_block = 2
    c.compute_dtype = "float32"  # "bfloat16" on GPU/TPU for speed
    # Optimisation: Nesterov SGD with linear warmup and cosine decay (Goyal et al. 2017:
    # warmup lets a large batch start at a high rate). lr 0.2 at batch 256 = 0.1 per 128,
    # the usual CIFAR ResNet rate (He et al. 2016), scaled linearly with the batch.
    c.epochs = 30
    c.lr = 0.2
    c.warmup_epochs = 2
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.label_smoothing = 0.1
    # Augmentation.
    c.crop_padding = 4
    c.cutout = 0  # square side in pixels; 0 = off (DeVries & Taylor use 16 on CIFAR-10)
    # Periodic actions, in steps (196 steps per epoch at batch 256).
    c.log_every = 50
    c.eval_every = 1960  # every 10 epochs
    c.ckpt_every = 980
    c.keep_checkpoints = 3
    c.fsdp = False
    c.tensorboard = False
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/cifar10_convnet_smoke"
    c.max_per_class = 10  # 100 train and 100 test images: one streaming pass, 200 decodes
    c.batch_size = 16
    c.eval_batch_size = 32
    c.widths = (8, 16)
    c.convs_per_block = 1
    c.epochs = 3  # 6 steps per epoch: 18 steps
    c.warmup_epochs = 1
    c.log_every = 3
    c.eval_every = 9
    c.ckpt_every = 3
    return c


def load_data(config):
    """(train source, test source): ArraySources for the device loader, any source for host."""
    kwargs = dict(data_dir=config.data_dir or None, on_bad=config.on_bad,
                  max_per_class=config.max_per_class or None)
    if config.data == SHARED_ARCHIVE and not Path(SHARED_ARCHIVE).exists():
        raise FileNotFoundError(
            f"the default data, the shared CIFAR-10 archive, is not at {SHARED_ARCHIVE}: point "
            "--config.data at a tfds name (tfds:cifar10), an image folder or an archive")
    return (sources.load(config.data, config.train_split, **kwargs),
            sources.load(config.data, config.test_split, **kwargs))


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)  # before any data is read or anything is compiled
    config_lib.check_choice(config, "loader", ("device", "host"))
    config_lib.check_choice(config, "compute_dtype", ("float32", "bfloat16", "float16"))
    if not 0 <= config.warmup_epochs < config.epochs:
        raise config_lib.ConfigError(
            f"config key 'warmup_epochs' must be in [0, epochs={config.epochs}), "
            f"got {config.warmup_epochs}")
    mesh = make_mesh()
    train_src, test_src = load_data(config)
    if config.loader == "device":
        train_loader = DeviceLoader(sources.as_arrays(train_src), batch_size=config.batch_size,
                                    mesh=mesh, seed=config.seed)
        test_loader = DeviceLoader(sources.as_arrays(test_src), batch_size=config.eval_batch_size,
                                   mesh=mesh, shuffle=False, drop_remainder=False)
    else:
        train_loader = HostLoader(train_src, batch_size=config.batch_size, mesh=mesh,
                                  seed=config.seed, on_bad=config.on_bad)
        test_loader = HostLoader(test_src, batch_size=config.eval_batch_size, mesh=mesh,
                                 shuffle=False, drop_remainder=False, on_bad=config.on_bad)
    # Per-channel mean of the shared archive's train split (its README: 0.4913, 0.4821, 0.4465;
    # the same to 3 decimals as the original CIFAR-10) and the usual CIFAR-10 std.
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def preprocess(images, *, key, train):
        x = augment.normalize(images, mean=mean, std=std)
        if train:
            k_crop, k_flip, k_cut = jax.random.split(key, 3)
            x = augment.random_crop(x, key=k_crop, padding=config.crop_padding, pad_mode="reflect")
            x = augment.random_flip(x, key=k_flip)
            if config.cutout:
                x = augment.cutout(x, key=k_cut, size=config.cutout)
        return x

    model = ConvNet(widths=config.widths, convs_per_block=config.convs_per_block,
                    num_classes=train_src.num_classes, dtype=jnp.dtype(config.compute_dtype))
    steps = config.epochs * train_loader.steps_per_epoch
    schedule = optim.make_schedule(
        kind="cosine", lr=config.lr, steps=steps,
        warmup_steps=config.warmup_epochs * train_loader.steps_per_epoch)
    tx = optim.make_optimizer(name="nesterov", learning_rate=schedule,
                              momentum=config.momentum, weight_decay=config.weight_decay)

    def loss_fn(*, logits, labels):
        return losses.softmax_cross_entropy(logits=logits, labels=labels,
                                            label_smoothing=config.label_smoothing)

    state, summary = loop.fit_classifier(
        model=model, tx=tx, schedule=schedule, preprocess=preprocess, loss_fn=loss_fn,
        train_loader=train_loader, eval_loader=test_loader, input_shape=train_src.image_shape,
        seed=config.seed, steps=steps, workdir=config.workdir, fsdp=config.fsdp,
        log_every=config.log_every, eval_every=config.eval_every, ckpt_every=config.ckpt_every,
        keep_checkpoints=config.keep_checkpoints, config=config, tensorboard=config.tensorboard)

    if jax.process_index() == 0:
        sample = [test_src[i] for i in range(0, len(test_src), max(1, len(test_src) // 32))][:32]
        images = np.stack([e["image"] for e in sample])
        labels = np.asarray([e["label"] for e in sample])
        preds = np.asarray(train.predict(model, state, images, preprocess).argmax(-1))
        accuracy = summary["eval"]["accuracy"]
        report = plots.save_run_report(config.workdir, images, labels, preds,
                                       class_names=train_src.class_names,
                                       title=f"CIFAR-10: test accuracy {accuracy:.2%}")
        print(f"test accuracy: {accuracy:.2%} ({summary['eval']['count']} images), "
              f"{summary['wall_time_s']:.0f} s\nwrote {report}")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
