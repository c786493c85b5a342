"""Weight initialisation: the lecture's experiment on the activations of a 10-layer net.

    python -m experiments.weight_init
    python -m experiments.weight_init --config.width=1000 --config.workdir=/tmp/init

A 10-layer fully connected net (500 units a layer, no biases) gets 1,000 unit-Gaussian inputs;
for tanh and ReLU, and for small random (0.01 * N(0, 1)), Xavier (N(0, 1 / fan_in)) and He
(N(0, 2 / fan_in)) weights, it records each layer's activation mean, std and histogram (CS231n
lecture 6, "Weight Initialization"). No data set and no training: there is no test accuracy, so
the summary has no "eval"; it has the per-layer stds and the lecture's facts as booleans.

Expected (measured on 2 shared CPU cores, seed 0: 6 s for the six nets, 15 s with start-up): layer-10 std
  tanh: small random 2.9e-07 (collapsed), Xavier 0.23 (from 0.63 at layer 1), He 0.56;
  ReLU: small random 7.9e-09, Xavier 0.025 (x0.70 per layer), He 0.81 (stable, ~0.8-0.86).
Writes WORKDIR (default workdirs/weight_init): report.png (per-layer mean and std lines, and
each layer's histogram, for the six nets), metrics.jsonl (one line per layer) and summary.json.

Smoke setting (run by the tests): `python -m experiments.weight_init --smoke` (4 narrow layers).
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np

from jaxvision import config as config_lib
from jaxvision import init

NONLINEARITIES = ("tanh", "relu")
INITS = ("small_random", "xavier", "he")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdirs/weight_init"
    # The lecture's net and input: 10 layers of 500 units, 1,000 unit-Gaussian examples.
    c.num_layers = 10
    c.width = 500
    c.batch = 1000
    c.small_scale = 0.01  # "small random": W = small_scale * N(0, 1)
    c.bins = 40  # histogram bins per layer
    c.nonlinearities = NONLINEARITIES
    c.inits = INITS
    return c


def smoke_config() -> ml_collections.ConfigDict:
    c = get_config()
    c.workdir = "workdirs/weight_init_smoke"
    c.num_layers = 4
    c.width = 32
    c.batch = 64
    c.bins = 10
    return c


def initializer(name: str, config: ml_collections.ConfigDict) -> init.Initializer:
    if name == "small_random":
        return functools.partial(init.small_random, scale=config.small_scale)
    return {"xavier": init.xavier, "he": init.he}[name]


def plot(path: str, stats: dict, config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    layers = np.arange(1, config.num_layers + 1)
    fig = plt.figure(figsize=(2.0 * config.num_layers + 3, 3.0 + 1.7 * len(names)))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.6, 1.0 * len(names)], hspace=0.25)
    top = outer[0].subgridspec(1, 2, wspace=0.2)
    ax_mean, ax_std = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    for name in names:
        style = "-" if name.startswith("tanh") else "--"
        ax_mean.plot(layers, stats[name].mean, style, marker="o", label=name)
        ax_std.plot(layers, stats[name].std, style, marker="o", label=name)
    ax_mean.set(xlabel="layer", ylabel="mean", title="activation mean per layer")
    ax_std.set(xlabel="layer", ylabel="std (log)", yscale="log",
               title="activation std per layer")
    for ax in (ax_mean, ax_std):
        ax.grid(alpha=0.3)
        ax.set_xticks(layers)
    ax_std.legend(fontsize=8, ncol=2)
    grid = outer[1].subgridspec(len(names), config.num_layers, hspace=0.6, wspace=0.15)
    for row, name in enumerate(names):
        s = stats[name]
        for layer in range(config.num_layers):
            ax = fig.add_subplot(grid[row, layer])
            edges = s.edges[layer]
            ax.stairs(s.counts[layer], edges, fill=True)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
            ax.set_xlim(edges[0], edges[-1])
            ax.set_xticks([edges[0], edges[-1]], [f"{edges[0]:.2g}", f"{edges[-1]:.2g}"])
            if name.startswith("relu") and s.counts[layer, 1:].max() > 0:
                # Half of a ReLU's outputs are exactly 0: clip that bar to show the rest.
                ax.set_ylim(0, 1.2 * s.counts[layer, 1:].max())
            ax.set_title(f"layer {layer + 1}\nstd {s.std[layer]:.2g}", fontsize=7)
            if layer == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Activations of a %d-layer net (width %d) on unit-Gaussian input "
                 "(ReLU histograms: the bar at 0 is clipped)" % (config.num_layers, config.width),
                 y=0.93)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(config: ml_collections.ConfigDict) -> dict:
    config = config_lib.validate(config)
    for key, choices in (("nonlinearities", NONLINEARITIES), ("inits", INITS)):
        bad = [v for v in config[key] if v not in choices]
        if bad or not config[key]:
            raise config_lib.ConfigError(
                f"config key '{key}' must be a non-empty tuple of {choices}, got {config[key]}")
    for key in ("num_layers", "width", "batch", "bins"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise config_lib.ConfigError(
                f"config key '{key}' must be a positive integer, got {config[key]!r}")
    if not config.small_scale > 0:
        raise config_lib.ConfigError(
            f"config key 'small_scale' must be > 0, got {config.small_scale!r}")
    start = time.time()
    key = jax.random.key(config.seed)
    stats = {}
    for nonlinearity in config.nonlinearities:
        for name in config.inits:
            # The same input and weight keys for every net: only the scale and f differ.
            stats[f"{nonlinearity}/{name}"] = init.activation_statistics(
                key, num_layers=config.num_layers, width=config.width, batch=config.batch,
                nonlinearity=nonlinearity, init=initializer(name, config), bins=config.bins)
    wall = time.time() - start

    with open(os.path.join(config.workdir, "metrics.jsonl"), "w") as f:
        for layer in range(config.num_layers):  # "step" is the layer, 1-based
            row = {"step": layer + 1}
            for name, s in stats.items():
                row[f"{name}/mean"] = float(s.mean[layer])
                row[f"{name}/std"] = float(s.std[layer])
            f.write(json.dumps(row) + "\n")
    plot(os.path.join(config.workdir, "report.png"), stats, config)

    ratio = {n: float((s.std[-1] / s.std[0]) ** (1 / max(1, config.num_layers - 1)))
             for n, s in stats.items()}
    summary = {
        "config": config.to_dict(),
        "layers": {n: {"mean": s.mean.tolist(), "std": s.std.tolist()}
                   for n, s in stats.items()},
        # Geometric mean of std_{l+1} / std_l: ~1 keeps the scale, < 1 shrinks it.
        "std_ratio_per_layer": ratio,
        "wall_time_s": wall,
    }
    print(f"{'net':<20}" + "".join(f"{'L' + str(i + 1):>9}" for i in range(config.num_layers)))
    for n, s in stats.items():
        print(f"{n + ' std':<20}" + "".join(f"{v:9.2g}" for v in s.std))
    print(f"{len(stats)} nets in {wall:.1f} s; wrote {config.workdir}/report.png")
    with open(os.path.join(config.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    config_lib.cli(main, get_config, smoke_config)
