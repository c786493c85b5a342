"""An ensemble of three ResNet-20s against one, and a snapshot ensemble of one run.

    python -m experiments.cifar10_ensemble
    python -m experiments.cifar10_ensemble --config.members=5 --config.epochs=80

Trains (or resumes, or just reads) `members` runs of `experiments.cifar10_resnet20` that differ
only in their seed, in `WORKDIR/seed_<i>`, then evaluates on the test set:
  * each member alone;
  * the ensemble: the members' logits averaged (`evaluation.make_ensemble_eval`, the members
    stacked on a leading axis and `jax.vmap`ped: one program for all of them);
  * a snapshot ensemble: the last `keep_checkpoints` checkpoints of the first member's run
    (Huang et al. 2017 "Snapshot Ensembles" use a cyclic schedule to make snapshots diverse; with
    this step schedule the last snapshots sit close together, so expect a small gain at most).

Expected on one H100: the three-member ensemble beats the mean member by about 1-2 points
(ensembles of independently trained nets usually do on CIFAR-10; this file measures how much).
NOT YET MEASURED: no GPU was lent to the session that wrote this file (three 160-epoch
ResNet-20 runs would take days on 2 CPU cores).

Writes WORKDIR/summary.json (every accuracy), WORKDIR/report.png (a bar chart).
Smoke setting (run by the tests): `python -m experiments.cifar10_ensemble --smoke`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import cifar10_resnet20  # noqa: E402
from jaxvision import config as config_lib  # noqa: E402
from jaxvision import evaluation, losses, train  # noqa: E402
from jaxvision.checkpoint import load_latest  # noqa: E402
from jaxvision.nets.resnet import ResNet20, ResNetTiny  # noqa: E402
from jaxvision.pipelines import sources  # noqa: E402
from jaxvision.pipelines.loader import DeviceLoader  # noqa: E402
from jaxvision.sharding import make_mesh  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    c = cifar10_resnet20.get_config()
    c.workdir = "workdirs/cifar10_ensemble"
    c.members = 3
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = cifar10_resnet20.smoke_config()
    c.workdir = "workdirs/cifar10_ensemble_smoke"
    c.mixup = 0.0
    c.members = 2
    c.epochs = 1
    c.ckpt_every = 2
    return c


def evaluate_stacked(model, preprocess, states, loader) -> dict:
    eval_step = jax.jit(evaluation.make_ensemble_eval(
        model=model, preprocess=preprocess, loss_fn=losses.softmax_cross_entropy))
    stacked = jax.tree.map(jnp.asarray, evaluation.stack_states(states))
    return train.evaluate(eval_step, stacked, loader.epoch())


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    if config.members < 2:
        raise config_lib.ConfigError(f"config key 'members' must be >= 2, got {config.members}")
    states, singles = [], []
    for i in range(config.members):
        run = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                         if k != "members"})
        run.seed = config.seed + i
        run.workdir = os.path.join(config.workdir, f"seed_{run.seed}")
        summary = cifar10_resnet20.main(run)
        singles.append(summary["eval"]["accuracy"])
        states.append(load_latest(os.path.join(run.workdir, "checkpoints"))[1])

    mesh = make_mesh()
    test_src = cifar10_resnet20.load_data(config)[1]
    test_arr = sources.as_arrays(test_src)
    loader = DeviceLoader(test_arr, batch_size=config.eval_batch_size, mesh=mesh, shuffle=False,
                          drop_remainder=False)
    make_net = ResNet20 if config.net == "resnet20" else ResNetTiny
    model = make_net(num_classes=test_arr.num_classes, dtype=jnp.dtype(config.compute_dtype))
    preprocess = cifar10_resnet20.make_preprocess(config)
    ensemble = evaluate_stacked(model, preprocess, states, loader)
    first = os.path.join(config.workdir, f"seed_{config.seed}", "checkpoints")
    snapshots = [s for _, s in evaluation.load_snapshots(first)]
    snapshot = evaluate_stacked(model, preprocess, snapshots, loader)

    summary = {
        "config": config.to_dict(),
        "members": singles,
        "mean_member": float(np.mean(singles)),
        "ensemble": ensemble,
        "snapshot_ensemble": dict(snapshot, snapshots=len(snapshots)),
        "eval": ensemble,
        "gain_over_mean_member": ensemble["accuracy"] - float(np.mean(singles)),
    }
    if jax.process_index() == 0:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        names = [f"seed {config.seed + i}" for i in range(len(singles))] + [
            f"snapshots ({len(snapshots)})", f"ensemble ({len(singles)})"]
        values = singles + [snapshot["accuracy"], ensemble["accuracy"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(names, [100 * v for v in values])
        for i, v in enumerate(values):
            ax.text(i, 100 * v, f"{v:.2%}", ha="center", va="bottom")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("ResNet-20: single nets, a snapshot ensemble and a seed ensemble")
        fig.tight_layout()
        fig.savefig(os.path.join(config.workdir, "report.png"), dpi=100)
        plt.close(fig)
        print(f"members: {', '.join(f'{a:.2%}' for a in singles)} (mean "
              f"{summary['mean_member']:.2%}); snapshot ensemble of {len(snapshots)}: "
              f"{snapshot['accuracy']:.2%}\n"
              f"test accuracy: {ensemble['accuracy']:.2%} ({ensemble['count']} images), "
              f"ensemble of {len(singles)}: {summary['gain_over_mean_member']:+.2%} over the "
              "mean member")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
