"""The augmentation ablation on ResNet-20: no augmentation / flip + crop / + cutout / + mixup /
+ label smoothing, each a full `experiments.cifar10_resnet20` run, printed as one table.

    python -m experiments.cifar10_ablation
    python -m experiments.cifar10_ablation --config.epochs=40      # a shorter, cheaper table

Expected on one H100: five ResNet-20 runs of 160 epochs; NOT YET MEASURED (no GPU was lent to
the session that wrote this file; on 2 CPU cores one run would take about a day). For reference,
He et al. (2016) report 91.25% for ResNet-20 with flip + crop on the original images; the other
rows are what this experiment is for.

Each setting runs in `WORKDIR/<setting>` (so a rerun resumes or just reports); the table goes to
stdout, `WORKDIR/summary.json` and `WORKDIR/report.png` (a bar chart).

Smoke setting (run by the tests): `python -m experiments.cifar10_ablation --smoke`.
"""
from __future__ import annotations

import json
import os

import jax
import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import cifar10_resnet20  # noqa: E402
from jaxvision import config as config_lib  # noqa: E402

# The settings, cumulative as in the table: each adds one thing to the previous.
SETTINGS = (
    ("none", dict(augment="none", cutout=0, mixup=0.0, label_smoothing=0.0)),
    ("flip_crop", dict(augment="flip_crop", cutout=0, mixup=0.0, label_smoothing=0.0)),
    ("+cutout", dict(augment="flip_crop", cutout=16, mixup=0.0, label_smoothing=0.0)),
    ("+mixup", dict(augment="flip_crop", cutout=16, mixup=1.0, label_smoothing=0.0)),
    ("+label_smoothing", dict(augment="flip_crop", cutout=16, mixup=1.0, label_smoothing=0.1)),
)


def get_config() -> ml_collections.ConfigDict:
    c = cifar10_resnet20.get_config()
    c.workdir = "workdirs/cifar10_ablation"
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = cifar10_resnet20.smoke_config()
    c.workdir = "workdirs/cifar10_ablation_smoke"
    c.epochs = 1
    return c


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    rows = []
    for name, overrides in SETTINGS:
        run = ml_collections.ConfigDict(config.to_dict())
        run.update(overrides)
        run.workdir = os.path.join(config.workdir, name.lstrip("+"))
        summary = cifar10_resnet20.main(run)
        rows.append({"setting": name, "accuracy": summary["eval"]["accuracy"],
                     "count": summary["eval"]["count"], "wall_time_s": summary["wall_time_s"]})
    summary = {"config": config.to_dict(), "rows": rows,
               "eval": {"accuracy": max(r["accuracy"] for r in rows), "count": rows[0]["count"]}}
    if jax.process_index() == 0:
        lines = ["| setting | test accuracy | time |", "| --- | --- | --- |"]
        lines += [f"| {r['setting']} | {r['accuracy']:.2%} | {r['wall_time_s']:.0f} s |"
                  for r in rows]
        table = "\n".join(lines)
        print(table)
        summary["table"] = table
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([r["setting"] for r in rows], [100 * r["accuracy"] for r in rows])
        for i, r in enumerate(rows):
            ax.text(i, 100 * r["accuracy"], f"{r['accuracy']:.2%}", ha="center", va="bottom")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"ResNet-20 augmentation ablation, {config.epochs} epochs")
        fig.tight_layout()
        fig.savefig(os.path.join(config.workdir, "report.png"), dpi=100)
        plt.close(fig)
        print(f"test accuracy: {summary['eval']['accuracy']:.2%} (best setting)")
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
