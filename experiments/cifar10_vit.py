"""ViT-S (4x4 patches, 64 tokens + a class token) trained from scratch on CIFAR-10.

    python -m experiments.cifar10_vit
    python -m experiments.cifar10_vit --config.compute_dtype=bfloat16   # GPU/TPU

Expected on one H100: >= 80% test accuracy on the shared JPEG archive. NOT YET MEASURED: no GPU
was lent to the session that wrote this file (a 21M parameter, 2.9 GFLOP/image (forward)
transformer for 200 epochs is out of reach of 2 CPU cores).

Recipe: plain ViTs lack convolutions' locality prior, so from scratch on 50k images they need
strong regularisation and a long schedule (Dosovitskiy et al. 2021 note ViTs underperform
ResNets on small data; DeiT, Touvron et al. 2021, closes the gap with augmentation): AdamW lr
1e-3 at batch 512, weight decay 0.05 (decoupled, DeiT), 10 warmup epochs then cosine over 200
epochs, flip + 4-pixel crop, mixup alpha 0.8 and label smoothing 0.1 (DeiT's values), stochastic
depth 0.1, gradient clipping at norm 1.

Smoke setting (run by the tests): `python -m experiments.cifar10_vit --smoke`.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from experiments.cifar10_convnet import SHARED_ARCHIVE
from experiments.cifar10_resnet20 import train_cifar
from jaxvision import config as config_lib
from jaxvision import optim
from jaxvision.nets.vit import ViTMicro, ViTSCifar


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/cifar10_vit"
    c.data = SHARED_ARCHIVE
    c.data_dir = ""
    c.train_split = "train"
    c.test_split = "test"
    c.max_per_class = 0
    c.on_bad = "raise"
    c.net = "vit_s"  # or "micro" (tests)
    c.compute_dtype = "float32"
    c.batch_size = 512
    c.eval_batch_size = 1000
    c.epochs = 200
    c.warmup_epochs = 10
    c.lr = 1e-3
    c.weight_decay = 0.05
    c.clip_norm = 1.0
    c.drop_path_rate = 0.1
    c.augment = "flip_crop"
    c.cutout = 0
    c.mixup = 0.8
    c.cutmix = 0.0
    c.label_smoothing = 0.1
    c.log_every = 100
    c.eval_every = 0
    c.ckpt_every = 2000
    c.keep_checkpoints = 3
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/cifar10_vit_smoke"
    c.max_per_class = 10
    c.net = "micro"
    c.batch_size = 16
    c.eval_batch_size = 32
    c.epochs = 2
    c.warmup_epochs = 1
    c.log_every = 3
    c.ckpt_every = 6
    return c


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    config_lib.check_choice(config, "net", ("vit_s", "micro"))
    if not 0 <= config.warmup_epochs < config.epochs:
        raise config_lib.ConfigError(f"config key 'warmup_epochs' must be in [0, epochs="
                                     f"{config.epochs}), got {config.warmup_epochs}")

    def make_model(num_classes):
        make_net = ViTSCifar if config.net == "vit_s" else ViTMicro
        return make_net(num_classes=num_classes, drop_path_rate=config.drop_path_rate,
                        dtype=jnp.dtype(config.compute_dtype))

    def make_optimizer(steps, steps_per_epoch):
        schedule = optim.make_schedule(kind="cosine", lr=config.lr, steps=steps,
                                       warmup_steps=config.warmup_epochs * steps_per_epoch)
        return optim.make_optimizer(name="adamw", learning_rate=schedule,
                                    weight_decay=config.weight_decay,
                                    grad_clip_norm=config.clip_norm), schedule

    return train_cifar(config, make_model=make_model, make_optimizer=make_optimizer,
                       name="ViT-S/4")


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
