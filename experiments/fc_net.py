"""A five-layer fully connected net (4 hidden layers) with batch norm and dropout on CIFAR-10
pixels: the course's FullyConnectedNet (`course.fc_loss`, whose `jax.grad` runs the layers'
hand-written backwards) trained by the course's Solver.

    python -m experiments.fc_net
    python -m experiments.fc_net --config.normalization=layernorm

Expected (measured on 2 CPU cores shared with other jobs, load average ~6-8, jax 0.10.2): test
accuracy 60.81% (10,000 images; best validation 61.7% at epoch 24 of 25), 448 s wall time in all
(data, sanity checks and 25 epochs). The issue's target is >= 55%.

Net: {affine - batch norm - ReLU - dropout} x 4 (512 units each) - affine - softmax, He init.
Data and preprocessing as `experiments.two_layer_net` (the course's 49,000 / 1,000 split,
per-channel normalisation, random horizontal flips). Adam with the rate decayed per epoch.

The course's sanity checks, first, recorded in summary.json under "sanity": the same
architecture with small weights (W ~ 1e-3 N(0, 1)) gives a loss ~ log(10) on 500 training
images, higher with `sanity_reg`; trained without dropout on 50 training images it reaches 100%
training accuracy.

Writes to WORKDIR (default workdirs/fc_net): summary.json, metrics.jsonl, report.png (loss
curve, train/validation accuracy per epoch, the 50-image overfitting run).

Smoke setting (run by the tests): `python -m experiments.fc_net --smoke`: 10 images per class,
a tiny net, 2 epochs.
"""
from __future__ import annotations

import jax
import ml_collections

from experiments.two_layer_net import SHARED_ARCHIVE, run_course_net
from jaxvision import config as config_lib
from jaxvision.nets import course


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/fc_net"
    # Data.
    c.data = SHARED_ARCHIVE
    c.max_per_class = 0  # 0 = all; >0 keeps the first N images per class (smoke runs)
    c.num_val = 1000
    c.normalize = "channel"  # or "mean_image"
    c.flip = True  # random horizontal flips at training time
    # Net.
    c.hidden_dims = (512, 512, 512, 512)
    c.normalization = "batchnorm"  # "batchnorm", "layernorm" or "none"
    c.dropout = 0.1  # drop probability after each hidden ReLU
    c.init = "he"  # "he" or "normal" (weight_scale)
    c.weight_scale = 1e-3  # for init="normal", and the small-weight sanity check
    c.reg = 1e-4  # 0.5 * reg * sum(W^2)
    # Solver.
    c.optimizer = "adam"
    c.lr = 1e-3
    c.lr_decay = 0.9  # per epoch
    c.epochs = 25
    c.batch_size = 200
    c.num_train_eval = 1000
    c.eval_batch_size = 1000
    c.log_every = 50
    # Sanity checks.
    c.sanity_examples = 500
    c.sanity_reg = 1.0
    c.overfit_examples = 50
    c.overfit_epochs = 40
    c.overfit_lr = 1e-3
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/fc_net_smoke"
    c.max_per_class = 10
    c.num_val = 20
    c.hidden_dims = (16, 16, 16, 16)
    c.epochs = 2
    c.batch_size = 16
    c.num_train_eval = 40
    c.eval_batch_size = 40
    c.log_every = 2
    c.sanity_examples = 40
    c.overfit_epochs = 2
    return c


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    config_lib.check_choice(config, "normalize", ("channel", "mean_image"))
    config_lib.check_choice(config, "normalization", ("batchnorm", "layernorm", "none"))
    config_lib.check_choice(config, "init", course.INITS)
    config_lib.check_choice(config, "optimizer", course.OPTIMIZERS)
    if not config.hidden_dims or any(not isinstance(h, int) or h <= 0
                                     for h in config.hidden_dims):
        raise config_lib.ConfigError(f"config key 'hidden_dims' must be positive integers, got "
                                     f"{config.hidden_dims!r}")
    for key in ("weight_scale", "overfit_lr", "lr_decay"):
        if not config[key] > 0:
            raise config_lib.ConfigError(f"config key '{key}' must be > 0, got {config[key]!r}")
    normalization = None if config.normalization == "none" else config.normalization

    def init(key, *, small):
        return course.init_fc(key, input_dim=32 * 32 * 3, hidden_dims=tuple(config.hidden_dims),
                              num_classes=10, normalization=normalization,
                              weight_scale=config.weight_scale,
                              init="normal" if small else config.init)

    def grads_with(reg, dropout):
        grad_fn = jax.value_and_grad(course.fc_loss, has_aux=True)

        def loss_and_grads(params, state, x, y, key):
            (loss, state), grads = grad_fn(params, state, x, y, reg=reg, train=True,
                                           dropout_rate=dropout, key=key,
                                           normalization=normalization)
            return loss, grads, state
        return loss_and_grads

    def loss_value(params, state, x, y, reg):
        return course.fc_loss(params, state, x, y, reg=reg, train=True,
                              normalization=normalization)[0]

    def predict(params, state, x):
        return course.fc_forward(params, state, x, train=False, normalization=normalization)[0]

    return run_course_net(config, name="five-layer FC net", init=init,
                          loss_and_grads=grads_with(config.reg, config.dropout),
                          overfit_loss_and_grads=grads_with(0.0, 0.0), loss_value=loss_value,
                          predict=predict)


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
