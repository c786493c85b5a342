"""The host JPEG pipeline at ImageNet shapes: images/s delivered, and whether ResNet-50 is
input-bound (issue 6).

On the GPU host (16 cores), one command, after `benchmarks.throughput` (whose ResNet-50 rate
it reads back from the doc):

    python -m benchmarks.input_pipeline --write docs/benchmarks.md

Needs: jaxvision's dependencies only (pillow decodes, scikit-learn's bundled photos make the
JPEGs; no GPU: every process here runs jax on the CPU). Expected duration with 16 workers:
about 1 minute (an ESTIMATE: ~10 s to write the JPEGs, a few seconds of compiles per worker,
and 3 methods x 64 batches of 256 at a few thousand images/s).
CPU check (tiny, seconds): `python -m benchmarks.input_pipeline --small`.

What is timed, per method, with `--workers` worker processes (or threads), each building whole
batches of `--batch` images, as the batches come back to the main process in order:
- `decode`: PIL decode to RGB only (the ceiling of the two below).
- `pil`: decode, then torchvision's random-resized-crop rule (the box drawn by
  `jaxvision.pipelines.augment.sample_crop_boxes`, the flip by the same draw as
  `augment.random_flip`) applied with PIL's antialiased bilinear `resize(box=...)` to 224x224,
  flip, stack into a uint8 batch: the per-image path a PyTorch DataLoader takes.
- `jax`: decode and stack at the source size, then `augment.random_resized_crop` and
  `augment.random_flip` on the whole batch through `augment.host_batch_fn` (jax on the CPU, one
  thread a worker), rounded to uint8. The same key gives the same boxes and flips as `pil`: the
  two outputs agree to within resampling rounding (tested).

The images: real JPEGs written to a temporary directory, ImageNet-sized (500x375, the most common
ImageNet size; quality 90): random 4:3 crops of scikit-learn's two bundled photographs
(`sklearn.datasets.load_sample_images`, 640x427), resized (`--source sklearn`, the default), or
CIFAR-10 images from the shared archive upscaled (`--source cifar`; smooth, so they decode
faster than photos). `--images` distinct files are cycled through, so they sit in the page cache:
no disk reads are timed. All have one size so that the `jax` method can batch them; real
ImageNet JPEGs vary in size (and average ~110 KB, about 400x350).

Input-bound: the rate ResNet-50 trains at, `--gpu-rate`, or else the jaxvision ResNet-50
images/s of the newest GPU run of `benchmarks.throughput` in `--gpu-rate-from` (the doc), or
else issue 6's target (1.15 x 5,663 = 6,512 images/s), which is a target, not a measurement.
The pipeline keeps up if it delivers at least that; the training process needs its own core too.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import markdown, throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]
JPEG_SIZE = (500, 375)  # (width, height): the most common ImageNet image size
QUALITY = 90
ISSUE_TARGET = 1.15 * 5663  # issue 6: >= 1.15x torch.compile's 5,663 img/s (a target)
METHODS = ("decode", "pil", "jax")
# One XLA thread a worker: the workers are the parallelism (16 workers with 16 intra-op
# threads each would oversubscribe the cores).
WORKER_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ------------------------------------------------------------------------------ the JPEGs


def make_jpegs(directory: pathlib.Path, n: int, *, source: str, cifar: pathlib.Path | None,
               seed: int = 0) -> tuple[list[str], str]:
    """Writes `n` JPEGs of JPEG_SIZE into `directory`; returns (paths, description)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w_out, h_out = JPEG_SIZE
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images  # two uint8 [427, 640, 3] photographs
        what = ("random 4:3 crops of scikit-learn's two bundled photos (load_sample_images, "
                "640x427), resized")
    else:
        from jaxvision.pipelines import sources

        if cifar is None or not pathlib.Path(cifar).exists():
            raise FileNotFoundError(f"--source cifar: no CIFAR-10 archive at {cifar}")
        arr = sources.as_arrays(sources.load(str(cifar), "train", max_per_class=-(-n // 10)))
        photos = list(arr.images[:n])
        what = f"CIFAR-10 training images from {cifar}, 32x32 upscaled (bicubic)"
    paths, sizes = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        if source == "sklearn":
            ch = int(rng.integers(h * 2 // 3, h + 1))
            cw = min(w, ch * 4 // 3)
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            photo = photo[top:top + ch, left:left + cw]
            if rng.random() < 0.5:
                photo = photo[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(photo)).resize((w_out, h_out),
                                                                     Image.BICUBIC)
        path = directory / f"{i:05d}.jpg"
        image.save(path, quality=QUALITY)
        paths.append(str(path))
        sizes.append(path.stat().st_size)
    return paths, (f"{n} JPEGs {w_out}x{h_out}, quality {QUALITY}, mean "
                   f"{np.mean(sizes) / 1e3:.0f} KB: {what}")


# ------------------------------------------------------------------- the worker's pipeline


class Pipeline:
    """Builds batch b of a method: `make(b) -> uint8 [batch, size, size, 3]`.

    One per worker (process or thread pool); the jax functions are compiled in `__init__`, so
    no timed batch pays for compilation.
    """

    def __init__(self, paths: list[str], *, method: str, batch: int, size: int, seed: int):
        import jax

        from jaxvision.pipelines import augment

        self.paths, self.method, self.batch, self.size = paths, method, batch, size
        w, h = JPEG_SIZE

        def draws(b):
            # The same split as `jax_augment`, so both methods crop and flip alike.
            k_crop, k_flip = jax.random.split(augment.batch_key(seed, b))
            boxes = augment.sample_crop_boxes(k_crop, batch=batch, height=h, width=w)
            return boxes, jax.random.bernoulli(k_flip, 0.5, (batch,))

        def jax_augment(images, *, key):
            k_crop, k_flip = jax.random.split(key)
            x = augment.random_resized_crop(images["image"], key=k_crop, size=size)
            x = augment.random_flip(x, key=k_flip)
            return {"image": jax.numpy.clip(jax.numpy.round(x), 0, 255).astype("uint8")}

        self._draws = jax.jit(draws) if method == "pil" else None
        self._augment = (augment.host_batch_fn(jax_augment, seed=seed) if method == "jax"
                         else None)
        self.make(0)  # compiles (and reads a batch of files into the page cache)

    def _decode(self, path: str):
        from PIL import Image

        with Image.open(path) as image:
            return image.convert("RGB")

    def make(self, b: int) -> np.ndarray:
        from PIL import Image

        files = [self.paths[(b * self.batch + j) % len(self.paths)] for j in range(self.batch)]
        if self.method == "decode":
            # Nothing shipped back but a checksum: the decode work alone, without the cost of
            # sending [B, 375, 500, 3] arrays between processes.
            return np.asarray([np.asarray(self._decode(f))[0, 0, 0] for f in files], np.uint8)
        if self.method == "jax":
            images = np.stack([np.asarray(self._decode(f)) for f in files])
            return self._augment({"image": images}, b)["image"]
        boxes, flips = (np.asarray(a) for a in self._draws(b))
        out = np.empty((self.batch, self.size, self.size, 3), np.uint8)
        for j, f in enumerate(files):
            top, left, h, w = (int(v) for v in boxes[j])
            # PIL's bilinear filter is antialiased when it shrinks (its support widens with the
            # scale), as `augment.random_resized_crop`'s.
            crop = self._decode(f).resize((self.size, self.size), Image.BILINEAR,
                                          box=(left, top, left + w, top + h))
            a = np.asarray(crop)
            out[j] = a[:, ::-1] if flips[j] else a
        return out


_PIPELINE: Pipeline | None = None


def _init_worker(paths, method, batch, size, seed):
    global _PIPELINE
    _PIPELINE = Pipeline(paths, method=method, batch=batch, size=size, seed=seed)


def _make_batch(b: int) -> np.ndarray:
    return _PIPELINE.make(b)


def measure_method(paths: list[str], *, method: str, workers: int, backend: str, batch: int,
                   batches: int, size: int, seed: int = 0) -> dict:
    """Images/s of one method: `batches` batches after a warm-up of 2 x workers batches."""
    init = (paths, method, batch, size, seed)
    if backend == "process":
        # spawn, not fork: a forked child of a process that has started jax's threads can hang.
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=init)
        make = _make_batch
    else:
        pipeline = Pipeline(*init[:1], method=method, batch=batch, size=size, seed=seed)
        pool = cf.ThreadPoolExecutor(workers)
        make = pipeline.make
    start_pool = time.perf_counter()
    with pool:
        # Warm-up: every worker starts (and compiles, in its initializer) before the clock.
        for out in pool.map(make, range(2 * workers)):
            assert out.shape[0] == batch
        warmup_s = time.perf_counter() - start_pool
        start = time.perf_counter()
        last = None
        for last in pool.map(make, range(2 * workers, 2 * workers + batches)):
            pass
        elapsed = time.perf_counter() - start
    return {"method": method, "img_s": batches * batch / elapsed, "seconds": elapsed,
            "batches": batches, "warmup_s": warmup_s, "shape": list(np.shape(last)),
            "dtype": str(last.dtype)}


# ----------------------------------------------------------------------------------- report

DESCRIPTIONS = {
    "decode": "PIL decode to RGB only, nothing sent back (the ceiling)",
    "pil": "decode + crop box (augment.sample_crop_boxes) + PIL bilinear resize to {size} + "
           "flip",
    "jax": "decode + augment.random_resized_crop + random_flip via augment.host_batch_fn",
}


def gpu_rate(args) -> tuple[float, str]:
    """(images/s ResNet-50 trains at, where that number comes from)."""
    if args.gpu_rate:
        return args.gpu_rate, "--gpu-rate"
    found = throughput.read_results(args.gpu_rate_from) if args.gpu_rate_from else None
    if found and "jax_resnet50_img_s" in found:
        return (found["jax_resnet50_img_s"],
                f"jaxvision ResNet-50, measured by benchmarks.throughput on {found['device']}")
    return ISSUE_TARGET, ("issue 6's target for jaxvision's ResNet-50 (1.15 x 5,663 images/s): "
                          "a target, not a measurement; no GPU throughput run is recorded in "
                          f"{_shown(args.gpu_rate_from)}")


def _shown(path) -> str:
    """A path as the doc shows it: relative to the repository where it is inside."""
    path = pathlib.Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(results: list[dict], args, jpegs: str, seconds: float) -> str:
    rate, source = gpu_rate(args)
    head = ["method", "what", "workers", "batch", "images/s", "per worker", "ResNet-50 at "
            f"{rate:,.0f} img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if "error" in r:
            verdict, img, per = f"error: {r['error']}"[:160], "—", "—"
        else:
            img, per = f"{r['img_s']:,.0f}", f"{r['img_s'] / args.workers:,.0f}"
            verdict = (f"keeps up ({r['img_s'] / rate:.2f}x the rate)" if r["img_s"] >= rate
                       else f"input-bound: delivers {r['img_s'] / rate:.2f}x the rate")
        lines.append("| " + " | ".join([r["method"], DESCRIPTIONS[r["method"]].format(
            size=args.size), f"{args.workers} {args.backend}es" if args.backend == "process"
            else f"{args.workers} threads", str(args.batch), img, per, verdict]) + " |")
    device = markdown.cpu_name()
    import jax
    import PIL

    cmd = "python -m benchmarks.input_pipeline" + (" --small" if args.small else "")
    text = [
        f"### Host JPEG pipeline on {device}" + (" — CPU harness check (--small), not the GPU "
                                                 "host" if args.small else ""),
        "",
        f"`{cmd}` ({args.workers} {args.backend} workers, {args.batches} timed batches of "
        f"{args.batch} after {2 * args.workers} warm-up batches) on "
        f"{datetime.date.today().isoformat()}; pillow {PIL.__version__}, jax {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} at the end; {seconds:.0f} s in all.",
        "",
        f"Images: {jpegs}. Output: uint8 [{args.batch}, {args.size}, {args.size}, 3] batches "
        "in the main process (not yet on a device). The ResNet-50 rate: "
        f"{rate:,.0f} images/s ({source}).",
        "",
        "\n".join(lines),
    ]
    if (os.cpu_count() or 1) < 16:
        text += ["", f"This machine has {os.cpu_count()} cores, the GPU host 16: the verdict "
                 "above is for this machine only."]
    return "\n".join(text) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="CPU check: 2 workers, batch 16, 4 batches, 16 JPEGs")
    p.add_argument("--workers", type=int, default=None, help="default: all cores")
    p.add_argument("--backend", choices=("process", "thread"), default="process")
    p.add_argument("--batch", type=int, default=None, help="default 256")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 4 x workers)")
    p.add_argument("--images", type=int, default=None, help="distinct JPEGs (default 512)")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--methods", default=",".join(METHODS), help=",".join(METHODS))
    p.add_argument("--source", choices=("sklearn", "cifar"), default="sklearn")
    p.add_argument("--cifar", type=pathlib.Path,
                   default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz")
    p.add_argument("--gpu-rate", type=float, default=None,
                   help="images/s ResNet-50 trains at (default: read from --gpu-rate-from)")
    p.add_argument("--gpu-rate-from", type=pathlib.Path, default=throughput.DOC,
                   help="doc with a GPU run of benchmarks.throughput")
    p.add_argument("--write", type=pathlib.Path, default=None, nargs="?", const=throughput.DOC,
                   help="update this markdown file")
    args = p.parse_args(argv)
    small = dict(workers=2, batch=16, batches=4, images=16)
    full = dict(workers=os.cpu_count() or 1, batch=256, batches=None, images=512)
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batches is None:
        args.batches = max(8, 4 * args.workers)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    return args


def main(argv=None):
    # Set before jax is imported, here and (inherited) in every spawned worker: CPU only, one
    # XLA thread a worker.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + WORKER_XLA_FLAGS).strip()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="jaxvision-jpegs-"))
    try:
        paths, jpegs = make_jpegs(tmp, args.images, source=args.source, cifar=args.cifar)
        print(jpegs, file=sys.stderr, flush=True)
        results = []
        for method in args.methods:
            print(f"{method}: {args.workers} {args.backend} workers ...", file=sys.stderr,
                  flush=True)
            try:
                results.append(measure_method(paths, method=method, workers=args.workers,
                                              backend=args.backend, batch=args.batch,
                                              batches=args.batches, size=args.size))
            except Exception as e:  # noqa: BLE001 - reported in the table
                results.append({"method": method, "error": f"{type(e).__name__}: {e}"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(results, args, jpegs, time.perf_counter() - start)
    print(text)
    if args.write:
        setting = ("small" if args.small else "full") + f" {args.workers} {args.backend}"
        device = markdown.cpu_name()
        # Keyed "gpu-host" on a machine with a GPU attached? The pipeline is CPU work either
        # way; the key says how many cores it had.
        key = throughput.section_key("input_pipeline", _host_kind(), device, setting)
        throughput.write_section(args.write, key, text)
        print(f"wrote {args.write}")


def _host_kind() -> str:
    """"gpu-host" where an NVIDIA GPU is visible (the pipeline still runs on the CPU), else
    "cpu": the doc's list of unmeasured GPU figures counts only the former."""
    if shutil.which("nvidia-smi") or pathlib.Path("/dev/nvidia0").exists():
        return "gpu-host"
    return "cpu"


if __name__ == "__main__":
    main()
