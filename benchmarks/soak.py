"""Soak run of the host pipeline: does memory or step time creep up over epochs?

    python -m benchmarks.soak                       # 5 epochs of the shared CIFAR-10 train split
    python -m benchmarks.soak --epochs 20 --max-per-class 500   # 20 short epochs, 20 saves
    python -m benchmarks.soak --note "shared machine, load ~4"   # a line for the header

Trains a small ConvNet (8-16-32 channels, BatchNorm, Nesterov momentum) through `loop.run` from
the host pipeline as a long job would: `sources.image_files` keeps the archive's JPEG bytes in
memory and decodes every image again each time a batch needs it, `HostLoader` reads and checks
the examples in its prefetch thread and augments each batch on the host CPU
(`augment.host_batch_fn`: normalise, random crop with padding 4, random flip), and the loop logs
and saves a checkpoint at the end of every epoch.

Measured per epoch: the process's resident memory (VmRSS from /proc/self/status), sampled every
10 steps: the median and the highest sample of the epoch (a single sample swings by tens of MB
with what is in flight: a checkpoint being written, prefetched batches), the median and 90th
percentile of the wall time between consecutive batches handed to the loop (in the steady state
that is the step time of the slowest stage, data or compute; the first step, which compiles, is
left out), images per second over the epoch, the mean training loss, and the machine's load
average at the epoch's end. The last lines say whether RSS and step time stayed flat after the
first epoch (which compiles and warms up allocators and caches): the change of the epoch's median
RSS and of its highest sample from epoch 2 to the last, and the last epoch's median step time
against epoch 2's.

Prints a markdown table and writes it into docs/soak.md (`--out`), one section per device; a
rerun on the same device replaces its own section. The header gives the device, versions, date
and the load average (timings on a shared machine are noisy).
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import markdown
from jaxvision import loop, losses, optim, train
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines import augment, sources
from jaxvision.pipelines.loader import HostLoader
from jaxvision.sharding import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "soak.md"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
# Per-channel mean of the shared archive's train split (its README) and the usual CIFAR-10 std.
MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2470, 0.2435, 0.2616)
RSS_EVERY = 10  # steps between memory samples


def rss_mb() -> float:
    """Resident memory of this process in MB (VmRSS; ru_maxrss, the peak, where /proc is absent)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class TimedLoader:
    """Wraps a loader: the time each batch is handed to the loop, and RSS samples per epoch."""

    def __init__(self, inner):
        self.inner = inner
        self.handed: dict[int, float] = {}  # batch index -> perf_counter when handed out
        self.cpu: dict[int, float] = {}  # batch index -> process CPU seconds at that moment
        self.rss: dict[int, list[float]] = {}  # epoch -> RSS samples (MB), the last at its end
        self.load: dict[int, float] = {}  # epoch -> 1-minute load average at its end

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iterate(self, start=0, stop=None):
        spe = self.inner.steps_per_epoch
        for b, batch in self.inner.iterate(start, stop):
            self.handed[b] = time.perf_counter()
            self.cpu[b] = _cpu_seconds()
            epoch = b // spe
            if b % RSS_EVERY == 0 or b % spe == spe - 1:
                self.rss.setdefault(epoch, []).append(rss_mb())
            if b % spe == spe - 1:
                self.load[epoch] = os.getloadavg()[0]
            yield b, batch


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    t = os.times()
    return t.user + t.system


def host_augment(batch, *, key):
    """uint8 [B, 32, 32, 3] -> normalised, randomly cropped (pad 4, reflect) and flipped."""
    k_crop, k_flip = jax.random.split(key)
    x = augment.normalize(batch["image"], mean=MEAN, std=STD)
    x = augment.random_crop(x, key=k_crop, padding=4, pad_mode="reflect")
    return {**batch, "image": augment.random_flip(x, key=k_flip)}


def run(args) -> dict:
    t0 = time.perf_counter()
    rss_start = rss_mb()
    src = sources.image_files(args.data, "train", max_per_class=args.max_per_class)
    rss_data = rss_mb()
    print(f"{src!r}: listed in {time.perf_counter() - t0:.1f} s; RSS {rss_start:.0f} MB at "
          f"start, {rss_data:.0f} MB with the encoded files in memory", flush=True)
    mesh = make_mesh()
    loader = TimedLoader(HostLoader(
        src, batch_size=args.batch_size, mesh=mesh, seed=0, prefetch=args.prefetch,
        batch_fn=augment.host_batch_fn(host_augment, seed=1)))
    spe = loader.steps_per_epoch
    steps = args.epochs * spe
    # Small on purpose: the soak is about the pipeline over time; a 2-core CPU runs 5 epochs of
    # it in about 5 minutes.
    model = ConvNet(widths=(8, 16, 32), num_classes=src.num_classes)
    schedule = optim.make_schedule(kind="cosine", lr=0.1, steps=steps, warmup_steps=spe // 2)
    tx = optim.make_optimizer(name="nesterov", learning_rate=schedule, momentum=0.9,
                              weight_decay=5e-4)

    def loss_fn(*, logits, labels):
        return losses.softmax_cross_entropy(logits=logits, labels=labels)

    # The host already normalised and augmented the batch (batch_fn): nothing left to do here.
    step = train.make_classifier_step(model=model, tx=tx, schedule=schedule,
                                      preprocess=lambda x, *, key, train: x, loss_fn=loss_fn)
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=src.image_shape,
                                     mesh=mesh)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxvision-soak-")
    print(f"training {steps} steps ({args.epochs} epochs of {spe}, batch {args.batch_size}) "
          f"in {workdir}", flush=True)
    t_train = time.perf_counter()
    # log_every=1: the loop fetches each step's metrics, so it waits for every step and the
    # interval between two batches is that step's real time (data wait + compute). With a
    # longer interval the loop dispatches steps ahead asynchronously and the gaps between
    # batches would time the dispatch, not the work.
    _, summary = loop.run(state=state, train_step=step, loader=loader, steps=steps,
                          workdir=workdir, log_every=1, ckpt_every=spe, keep_checkpoints=2,
                          progress=False)
    train_s = time.perf_counter() - t_train
    cpu_end = _cpu_seconds()
    losses_by_epoch: dict[int, list[float]] = {}
    for m in loop.read_metrics(workdir):
        losses_by_epoch.setdefault((m["step"] - 1) // spe, []).append(m["train/loss"])
    rows = []
    for e in range(args.epochs):
        # Intervals between consecutive batches of epoch e; batch 0's follows the compile.
        gaps = [loader.handed[b + 1] - loader.handed[b]
                for b in range(e * spe, (e + 1) * spe) if b + 1 in loader.handed and b > 0]
        first = e * spe if e else 1
        n_steps = (e + 1) * spe - first
        if (e + 1) * spe in loader.handed:
            end, cpu_end_e = loader.handed[(e + 1) * spe], loader.cpu[(e + 1) * spe]
        else:  # the last epoch: the loop ends after its last step
            end, cpu_end_e = t_train + train_s, cpu_end
        rows.append({
            "epoch": e + 1,
            "median_ms": 1e3 * float(np.median(gaps)),
            "p90_ms": 1e3 * float(np.percentile(gaps, 90)),
            "images_per_s": n_steps * args.batch_size / (end - loader.handed[first]),
            "cpu_ms": 1e3 * (cpu_end_e - loader.cpu[first]) / n_steps,
            "rss_median_mb": float(np.median(loader.rss[e])),
            "rss_max_mb": max(loader.rss[e]),
            "loss": float(np.mean(losses_by_epoch[e])) if e in losses_by_epoch else None,
            "load": loader.load.get(e),
        })
        print(_row_text(rows[-1]), flush=True)
    return {"rows": rows, "summary": summary, "train_s": train_s, "rss_start": rss_start,
            "rss_data": rss_data, "steps_per_epoch": spe, "num_images": len(src),
            "first_step_s": summary.get("first_step_s")}


def _row_text(r) -> str:
    loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
    return (f"epoch {r['epoch']}: median step {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
            f"CPU {r['cpu_ms']:.0f} ms/step, "
            f"{r['images_per_s']:.0f} img/s, RSS median {r['rss_median_mb']:.0f} MB "
            f"(max {r['rss_max_mb']:.0f}), loss {loss}, load {r['load']:.1f}")


def _trend(pct: float, limit: float) -> str:
    """"flat" within +-limit %; a fall is not creep, so it is named apart from a rise."""
    if abs(pct) < limit:
        return "flat"
    return "lower (no creep)" if pct < 0 else "NOT flat: it grew"


def verdict(rows) -> list[str]:
    """Whether RSS and step time stayed flat from epoch 2 to the last (figures first). Flat: the
    epoch's median and highest RSS moved by less than 5%, the median step time (or, on a machine
    whose load changed, the CPU time per step) by less than 15%."""
    first, last = rows[1], rows[-1]

    def change(key):
        return last[key] - first[key], 100 * (last[key] / first[key] - 1)

    (med, med_pct), (top, top_pct) = change("rss_median_mb"), change("rss_max_mb")
    rss = max(med_pct, top_pct) if max(med_pct, top_pct) >= 5 else min(med_pct, top_pct)
    _, wall_pct = change("median_ms")
    _, cpu_pct = change("cpu_ms")
    return [
        f"RSS from epoch 2 to epoch {last['epoch']}: median {first['rss_median_mb']:.0f} -> "
        f"{last['rss_median_mb']:.0f} MB ({med:+.0f} MB, {med_pct:+.1f}%), highest sample "
        f"{first['rss_max_mb']:.0f} -> {last['rss_max_mb']:.0f} MB ({top:+.0f} MB, "
        f"{top_pct:+.1f}%): {_trend(rss, 5)}.",
        f"Median step time (wall): {first['median_ms']:.1f} ms in epoch 2, "
        f"{last['median_ms']:.1f} ms in epoch {last['epoch']} ({wall_pct:+.1f}%): "
        f"{_trend(wall_pct, 15)}. CPU time per step (all threads of "
        f"this process; far less sensitive than wall time to other processes' load): "
        f"{first['cpu_ms']:.0f} -> {last['cpu_ms']:.0f} ms ({cpu_pct:+.1f}%): "
        f"{_trend(cpu_pct, 15)}.",
    ]


# ------------------------------------------------------------------------------------ output


def _versions() -> str:
    versions = loop.package_versions(
        ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "pillow"))
    out = [f"{pkg} {v}" for pkg, v in versions.items() if v is not None]
    return ", ".join(out) + f", Python {platform.python_version()}"


def _options(argv) -> str:
    """The command-line options, without --note and its text (that has its own line)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return "".join(f" {a}" for a in out)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(args, result, load_before, load_after, seconds) -> str:
    rows = result["rows"]
    command = "python -m benchmarks.soak" + _options(sys.argv[1:])
    subset = f" (--max-per-class {args.max_per_class})" if args.max_per_class else ""
    head = [
        f"### {markdown.device_name()}{subset}",
        "",
        f"`{command}` on {datetime.date.today().isoformat()}; {_versions()}.",
        f"Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        f"({os.cpu_count()} cores); {seconds / 60:.1f} min in all, {result['train_s']:.0f} s "
        f"in `loop.run`.",
    ]
    if args.note:
        head.append(f"Note: {args.note}")
    table = _table(
        ["epoch", "median step", "p90 step", "CPU per step", "images/s", "RSS median",
         "RSS highest",
         "train loss", "load at end"],
        [(r["epoch"], f"{r['median_ms']:.1f} ms", f"{r['p90_ms']:.1f} ms",
          f"{r['cpu_ms']:.0f} ms",
          f"{r['images_per_s']:.0f}", f"{r['rss_median_mb']:.0f} MB",
          f"{r['rss_max_mb']:.0f} MB",
          f"{r['loss']:.3f}" if r["loss"] is not None else "-", f"{r['load']:.1f}")
         for r in rows])
    first_step = result["first_step_s"]
    parts = head + [
        "",
        f"{result['num_images']:,} training images, batch {args.batch_size}, "
        f"{result['steps_per_epoch']} steps per epoch, {jax.device_count()} device(s), "
        f"prefetch {args.prefetch}. RSS {result['rss_start']:.0f} MB after imports, "
        f"{result['rss_data']:.0f} MB with the encoded files in memory."
        + (f" First step (compiles) {first_step:.1f} s." if first_step else ""),
        "",
        table,
        "",
        *verdict(rows),
    ]
    return "\n".join(parts) + "\n"


def write_section(path: pathlib.Path, key: str, text: str) -> None:
    """Puts `text` in this key's section of `path` (`benchmarks.markdown`)."""
    markdown.write_section(path, tag="soak", key=key, text=text,
                           title=markdown.doc_title("Soak run of the host pipeline", "soak"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prefetch", type=int, default=2, help="batches prepared ahead")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="only the first N images of each class (a quick look)")
    p.add_argument("--data", type=pathlib.Path, default=ARCHIVE,
                   help="image folder or archive with a train split")
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--note", default="", help="a line for the header (e.g. machine load)")
    p.add_argument("--out", type=pathlib.Path, default=DOC, help="markdown file to update")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be at least 3: epoch 1 warms up, flatness needs two more")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load_before, start = os.getloadavg(), time.perf_counter()
    print(f"device: {markdown.device_name()}; {_versions()}", flush=True)
    result = run(args)
    text = report(args, result, load_before, os.getloadavg(), time.perf_counter() - start)
    print(text)
    write_section(args.out, markdown.device_name() + (" quick" if args.max_per_class else ""), text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
