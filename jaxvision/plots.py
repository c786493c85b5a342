"""Figures people would rather look at than read: learning curves and prediction grids (PNG)."""
from __future__ import annotations

import os

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on headless hosts and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(ax_loss, ax_acc, metrics: list[dict]) -> None:
    """Train loss (left) and train/eval accuracy (right) against step, from `metrics.jsonl` rows."""
    def series(key):
        rows = [(m["step"], m[key]) for m in metrics if key in m]
        return zip(*rows) if rows else ((), ())

    ax_loss.plot(*series("train/loss"), label="train")
    ax_loss.plot(*series("eval/loss"), "o-", label="eval")
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax_acc.plot(*series("train/accuracy"), label="train")
    ax_acc.plot(*series("eval/accuracy"), "o-", label="eval")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()


def prediction_grid(fig, gridspec, images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                    class_names: Sequence[str] | None = None, cols: int = 8) -> None:
    """Test images with predicted/true labels; wrong predictions titled in red.

    images: uint8 [N, H, W, C] (C = 1 or 3); labels, preds: int [N].
    """
    n = len(images)
    rows = -(-n // cols)
    sub = gridspec.subgridspec(rows, cols, wspace=0.05, hspace=0.5)
    name = (lambda i: class_names[i]) if class_names else str
    for i in range(n):
        ax = fig.add_subplot(sub[i // cols, i % cols])
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                  cmap="gray_r" if img.shape[-1] == 1 else None, interpolation="nearest")
        ok = preds[i] == labels[i]
        ax.set_title(name(int(preds[i])) if ok else f"{name(int(preds[i]))}\n(true {name(int(labels[i]))})",
                     fontsize=7, color="black" if ok else "red")
        ax.axis("off")


def save_report(path: str, metrics: list[dict], images: np.ndarray, labels: np.ndarray,
                preds: np.ndarray, class_names: Sequence[str] | None = None,
                title: str = "") -> None:
    """One PNG: learning curves on top, a grid of test predictions below."""
    fig = plt.figure(figsize=(11, 10))
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 1.3], hspace=0.3)
    learning_curves(fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), metrics)
    prediction_grid(fig, gs[1, :], images, labels, preds, class_names)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def save_run_report(workdir: str, images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                    class_names: Sequence[str] | None = None, title: str = "") -> str:
    """`save_report` from a run's `WORKDIR/metrics.jsonl`; writes and returns WORKDIR/report.png."""
    from jaxvision.loop import read_metrics  # here: plotting alone needs no jax

    path = os.path.join(workdir, "report.png")
    save_report(path, read_metrics(workdir), images, labels, preds, class_names, title)
    return path
