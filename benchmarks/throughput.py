"""Training throughput of jaxvision against PyTorch on the same device, in one run (issue 6).

On one H100, one command (one device call), from the repository root:

    pip install -e . && python -m benchmarks.throughput --write docs/benchmarks.md

Needs: jax with CUDA (the GPU host's jax 0.11.2), flax, optax (jaxvision's dependencies); for
the PyTorch columns torch, torchvision and timm. They are optional benchmark peers, never
jaxvision dependencies: where one is missing its cells say "not installed", never a number.
The shared CIFAR-10 archive is looked for beside the checkout and inside it (`--cifar`).
Expected duration on one H100: about 7 minutes, an ESTIMATE (not measured): ~3 min of jax
compiles (cold, then warm), ~2-3 min of torch.compile, under a minute of timed steps, ~15 s to
decode the CIFAR-10 archive once. If the device time left is short, split it over two calls,
`--cases resnet50` then `--cases vit_b16,cifar` (each writes its own section of the doc).
`--torch-cache-check` adds torch.compile's warm-cache compile time (~1 min more). Add
`--raw FILE` to keep every worker's raw results: `--render FILE --write` then rewrites the
section (after a fix to the report, say) without measuring again.

CPU harness check (tiny shapes, ~1.5 min on 2 cores without torch; not a speed claim):

    python -m benchmarks.throughput --small --write docs/benchmarks.md

What is measured, each framework in fresh subprocesses (they never share a process, or GPU
memory; the parent process imports neither):
(a) ResNet-50, 224x224, batch 256, SGD with momentum 0.9 and weight decay 1e-4, bfloat16
    compute: `jaxvision.nets.resnet.ResNet50(dtype=bfloat16)` trained by the library's own step
    (`train.make_classifier_step`, jitted with the state donated, as `loop.run` does) against
    torchvision's `resnet50` under `torch.compile` (channels_last, bf16 autocast) and eager.
(b) ViT-B/16, 224x224, batch 256, AdamW (weight decay 0.05), bfloat16: `ViTB16` with its
    default explicit attention and with `attention_impl="auto"` (cuDNN's fused attention on a
    GPU; XLA's fused form elsewhere) against timm's `vit_base_patch16_224` (which uses
    PyTorch's `scaled_dot_product_attention`) under `torch.compile` and eager.
(c) The CIFAR-10 on-device path: a ResNet-18 (CIFAR stem) epoch at batch 512, bfloat16, the
    data set resident on the device (`DeviceLoader`: each batch a gather inside `jit`), flip +
    crop inside the step (the preprocessing of `experiments/cifar10_resnet20.py`), Nesterov SGD;
    one step dispatched per batch from Python, nothing logged or saved. The shared JPEG archive
    if it is found, else random uint8 images (the rate does not depend on the pixels).
The parameter counts of both sides are compared in the table ("(equal)"): the peers are the
same nets (25,557,032 and 86,567,656 parameters).

Protocol: synthetic data already on the device (uint8 images for jaxvision, normalised inside
the step; float tensors for PyTorch), the same shapes on both sides; every side warmed up
(`--warmup` steps, after compilation), then `--steps` steps (50) each ended by
`block_until_ready` / `torch.cuda.synchronize()`; images/s = batch / median step time.
The CIFAR epoch: one warm-up epoch, then the median of `--cifar-epochs` epochs, each ended by
`block_until_ready`. PyTorch's optimizers run eagerly with their defaults (foreach), and
`cudnn.benchmark` is on (XLA autotunes its convolutions too); `--torch-compile-mode
max-autotune` tries a stronger peer.

FLOPs and MFU: XLA's cost analysis of the compiled train step (forward, backward and optimizer;
a multiply-add counts 2), divided by the batch (the lowered program's count where the compiled
one misses library calls; the fused-attention row uses the explicit row's count, the same
function); MFU = images/s x FLOPs per image / the device's dense bf16 peak (`PEAK_BF16_TFLOPS`,
or `--peak-tflops`). The PyTorch MFU uses the same FLOPs per image (the same net). ResNet-50's
common convention is also given: 3 x 8.2 GFLOP (4.1 G multiply-adds forward) = 24.6 GFLOP per
training image.

Compile times: jaxvision's trace + lower and XLA compile of the train step, cold (a fresh
process and an empty persistent compilation cache; the rows compile one after another in that
process) and warm (another fresh process reading the cache the first one wrote; its cache hits
are counted, so a miss cannot pass for a hit). PyTorch: the first step under `torch.compile`
(which compiles) with an empty inductor cache, and with `--torch-cache-check` the same in a
fresh process with the cache the first run left.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULT_MARK = "@@throughput-result@@ "

# ResNet-50: 4.1 G multiply-adds per 224x224 forward pass (He et al. 2016, Table 1: "3.8 x 10^9
# FLOPs", counted as multiply-adds; torchvision's v1.5 has 4.1 G) = 8.2 GFLOP, and training
# costs ~3 forward passes (the backward pass computes two products per forward one).
RESNET50_TRAIN_GFLOP = 24.6

# Dense (no 2:4 sparsity) bfloat16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets, matched
# against jax's `device_kind` in this order (H100 SXM's kind is "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
)

# Cases: the nets, shapes and optimizers of issue 6, and the tiny stand-ins of `--small` (the
# same layouts with fewer blocks and a 32x32 input, the same on both sides, so the harness and
# the parameter-count check run in seconds on a CPU).
CASES = ("resnet50", "vit_b16", "cifar")
FULL = dict(image=224, batch=256, warmup=10, steps=50, cifar_batch=512, cifar_epochs=3)
SMALL = dict(image=32, batch=8, warmup=2, steps=5, cifar_batch=8, cifar_epochs=2)
SMALL_CIFAR_IMAGES = 64  # --small: random images, 8 steps an epoch
LR = {"resnet50": 0.01, "vit_b16": 1e-4, "cifar": 0.05}  # small: synthetic labels, no blow-up
WEIGHT_DECAY = {"resnet50": 1e-4, "vit_b16": 0.05, "cifar": 5e-4}

TITLES = {
    "resnet50": "ResNet-50, {image}x{image}, batch {batch}, SGD momentum + wd, bf16",
    "vit_b16": "ViT-B/16, {image}x{image}, batch {batch}, AdamW, bf16",
    "cifar": "CIFAR-10 ResNet-18 epoch, data on device, batch {cifar_batch}, bf16",
}
SMALL_TITLES = {
    "resnet50": "ResNet-50 layout, 1 block a stage (--small), {image}x{image}, batch {batch}, "
                "SGD momentum + wd, bf16",
    "vit_b16": "ViT, 2 blocks of width 64, patch 8 (--small), {image}x{image}, batch {batch}, "
               "AdamW, bf16",
    "cifar": "CIFAR ResNet-tiny epoch (--small), data on device, {n} random images, batch "
             "{cifar_batch}, bf16",
}
# The jaxvision rows: (case, id, label).
JAX_ROWS = (
    ("resnet50", "resnet50", "ResNet50"),
    ("vit_b16", "vit_b16", "ViTB16, explicit attention"),
    ("vit_b16", "vit_b16_fused", 'ViTB16, attention_impl="auto"'),
    ("cifar", "cifar", "ResNet18Cifar + DeviceLoader"),
)
SMALL_LABELS = {
    "resnet50": "ResNet(stage_sizes=(1, 1, 1, 1), block=Bottleneck)",
    "vit_b16": "ViT(patch_size=8, width=64, depth=2, num_heads=2), explicit attention",
    "vit_b16_fused": 'ViT(patch_size=8, width=64, depth=2, num_heads=2), attention_impl="auto"',
    "cifar": "ResNetTiny + DeviceLoader",
}
TORCH_PEERS = {"resnet50": "torchvision resnet50", "vit_b16": "timm vit_base_patch16_224"}
SMALL_TORCH_PEERS = {
    "resnet50": "torchvision ResNet(Bottleneck, [1, 1, 1, 1])",
    "vit_b16": "timm VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, "
               "num_heads=2)",
}


# ------------------------------------------------------------------------------ jax side


def _jax_model(row_id: str, small: bool):
    """(flax module, optimizer name) of a jaxvision row, bfloat16 compute."""
    import jax.numpy as jnp

    from jaxvision.nets import resnet, vit

    bf16 = jnp.bfloat16
    if row_id == "resnet50":
        if small:
            return resnet.ResNet(stage_sizes=(1, 1, 1, 1), block=resnet.Bottleneck,
                                 dtype=bf16), "momentum"
        return resnet.ResNet50(dtype=bf16), "momentum"
    if row_id in ("vit_b16", "vit_b16_fused"):
        impl = "auto" if row_id == "vit_b16_fused" else "explicit"
        if small:
            return vit.ViT(patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=256,
                           num_classes=10, dtype=bf16, attention_impl=impl), "adamw"
        return vit.ViTB16(dtype=bf16, attention_impl=impl), "adamw"
    if row_id == "cifar":
        return (resnet.ResNetTiny if small else resnet.ResNet18Cifar)(dtype=bf16), "nesterov"
    raise ValueError(f"unknown jaxvision row {row_id!r}")


def _jax_env() -> dict:
    import jax

    from jaxvision.loop import package_versions

    dev = jax.devices()[0]
    versions = package_versions(("jax", "jaxlib", "flax", "optax", "numpy"))
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "versions": versions}


def _flops(cost) -> float | None:
    """FLOPs from a `cost_analysis()` result (a dict, or a list of one dict in older jax)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


def _cifar_source(spec: dict):
    """(ArraySource of the CIFAR-10 training set or random images, description)."""
    from jaxvision.pipelines import sources

    path = spec.get("cifar")
    if path and pathlib.Path(path).exists() and not spec["small"]:
        src = sources.as_arrays(sources.load(path, "train"))
        return src, f"CIFAR-10 training set from {path} ({len(src.labels):,} images)"
    n = SMALL_CIFAR_IMAGES if spec["small"] else 50_000
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,))
    why = "--small" if spec["small"] else f"no archive at {path}"
    return (sources.ArraySource(images, labels, num_classes=10),
            f"{n:,} random 32x32 images ({why})")


def _time_jax_row(row_id: str, spec: dict, events: collections.Counter) -> dict:
    import jax
    import optax

    from jaxvision import losses, optim, train
    from jaxvision.pipelines import augment
    from jaxvision.sharding import batch_sharding, make_mesh

    small, s = spec["small"], spec["settings"]
    case = "cifar" if row_id == "cifar" else ("resnet50" if row_id == "resnet50" else "vit_b16")
    model, opt_name = _jax_model(row_id, small)
    lr = LR[case]
    tx = optim.make_optimizer(name=opt_name, learning_rate=lr, momentum=0.9,
                              weight_decay=WEIGHT_DECAY[case])
    # One device: this is a single-GPU benchmark (and a 1-device mesh on an emulated CPU host).
    mesh = make_mesh(jax.devices()[:1])

    if case == "cifar":
        from types import SimpleNamespace

        from experiments.cifar10_resnet20 import make_preprocess

        preprocess = make_preprocess(SimpleNamespace(augment="flip_crop", cutout=0))
        image, batch_size, classes = 32, s["cifar_batch"], 10
    else:
        def preprocess(images, *, key, train):  # uint8 -> float32, the net casts to bf16
            del key, train
            return augment.normalize(images, mean=0.5, std=0.25)

        image, batch_size, classes = s["image"], s["batch"], 1000 if case == "resnet50" else (
            10 if small else 1000)
    step = train.make_classifier_step(model=model, tx=tx, schedule=optax.constant_schedule(lr),
                                      preprocess=preprocess,
                                      loss_fn=losses.softmax_cross_entropy)
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=(image, image, 3),
                                     mesh=mesh)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    jitted = jax.jit(step, donate_argnums=0)

    if case == "cifar":
        from jaxvision.pipelines.loader import DeviceLoader

        src, data = _cifar_source(spec)
        loader = DeviceLoader(src, batch_size=batch_size, mesh=mesh, seed=0)
        batch = next(loader.iterate(0, 1))[1]
    else:
        rng = np.random.default_rng(0)
        local = {"image": rng.integers(0, 256, (batch_size, image, image, 3), dtype=np.uint8),
                 "label": rng.integers(0, classes, (batch_size,)).astype(np.int32),
                 "mask": np.ones((batch_size,), np.float32)}
        batch = jax.device_put(local, batch_sharding(mesh))

    before = dict(events)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {
        "params": params, "lower_s": t1 - t0, "compile_s": t2 - t1,
        "cache_hits": events["/jax/compilation_cache/cache_hits"]
        - before.get("/jax/compilation_cache/cache_hits", 0),
        "cache_misses": events["/jax/compilation_cache/cache_misses"]
        - before.get("/jax/compilation_cache/cache_misses", 0),
        "flops_per_step_compiled": _flops(compiled.cost_analysis()),
        "flops_per_step_lowered": _flops(lowered.cost_analysis()),
        "batch": batch_size,
    }
    if spec["compile_only"]:
        return out

    if case == "cifar":
        out["data"] = data
        spe = loader.steps_per_epoch
        epoch_times, b = [], 0
        for _ in range(1 + s["cifar_epochs"]):  # the first epoch is the warm-up
            start = time.perf_counter()
            for b, batch in loader.iterate(b, b + spe):
                state, metrics = compiled(state, batch)
            b += 1
            jax.block_until_ready(state)
            epoch_times.append(time.perf_counter() - start)
        median = float(np.median(epoch_times[1:]))
        out.update(images_per_epoch=spe * batch_size, epoch_s=median,
                   warmup_epoch_s=epoch_times[0], img_s=spe * batch_size / median,
                   epochs=len(epoch_times) - 1)
    else:
        for _ in range(s["warmup"]):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(s["steps"]):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        out.update(step_s=median, img_s=batch_size / median, steps=len(times),
                   step_s_min=float(np.min(times)), step_s_max=float(np.max(times)))
    out["final_loss"] = float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    del state
    return out


def jax_worker(spec: dict, emit=lambda results: None) -> dict:
    """Times (or, with `compile_only`, just compiles) the jaxvision rows in this process.

    `emit(results so far)` after each row: a worker that dies later (killed for memory, an XLA
    abort) still reports the rows it finished.
    """
    import jax

    # The persistent cache in a directory of the run's own (empty for the cold run); every
    # program is cached, however fast it compiled (the default keeps only those over 1 s).
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    for name, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                        ("jax_persistent_cache_min_entry_size_bytes", 0)):
        try:
            jax.config.update(name, value)
        except AttributeError:  # an option another jax version lacks: its default stands
            _log(f"this jax has no option {name}")
    # jax reports each persistent-cache hit and miss as a monitoring event; counted per row.
    events: collections.Counter = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
    results = {"env": _jax_env()}
    for row_id in spec["rows"]:
        _log(f"jax{' (compile only)' if spec['compile_only'] else ''}: {row_id}")
        try:
            results[row_id] = _time_jax_row(row_id, spec, events)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other rows go on
            results[row_id] = {"error": f"{type(e).__name__}: {e}"[:400]}
            _log(f"  failed: {results[row_id]['error']}")
        emit(results)
    return results


# ---------------------------------------------------------------------------- torch side


def _torch_model(case: str, small: bool):
    if case == "resnet50":
        import torchvision

        if small:
            from torchvision.models.resnet import Bottleneck, ResNet

            return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=1000)
        return torchvision.models.resnet50(weights=None)
    import timm

    if small:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                 mlp_ratio=4.0, num_classes=10)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)


def _time_torch(case: str, mode: str, spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    s, small = spec["settings"], spec["small"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = _torch_model(case, small).to(device)
    params = sum(p.numel() for p in model.parameters())
    image, batch = s["image"], s["batch"]
    classes = 10 if (case == "vit_b16" and small) else 1000
    x = torch.randn(batch, 3, image, image, device=device)
    if case == "resnet50":
        # channels_last: the NHWC layout that cuDNN's tensor-core convolutions want.
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=LR[case], momentum=0.9,
                              weight_decay=WEIGHT_DECAY[case])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR[case], weight_decay=WEIGHT_DECAY[case])
    y = torch.randint(0, classes, (batch,), device=device)
    torch.backends.cudnn.benchmark = True  # autotuned convolutions, as XLA autotunes its own
    net = torch.compile(model, mode=spec["torch_compile_mode"]) if mode == "compile" else model
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step()
    sync()
    out = {"params": params, "first_step_s": time.perf_counter() - start}
    if spec["compile_only"]:
        return out
    for _ in range(s["warmup"]):
        step()
    sync()
    times = []
    for _ in range(s["steps"]):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    out.update(step_s=median, img_s=batch / median, steps=len(times),
               final_loss=float(loss.detach().float()))
    if cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    return out


def torch_worker(spec: dict, emit=lambda results: None) -> dict:
    """Times the PyTorch peers in this process; missing packages are reported, not guessed.
    `emit` as in `jax_worker`."""
    results: dict = {}
    try:
        import torch
    except ImportError as e:
        return {"env": {"missing": f"not installed (torch: {e})"}}
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for pkg in ("torchvision", "timm"):
        try:
            env[pkg] = importlib.import_module(pkg).__version__
        except ImportError as e:
            env[pkg] = None
            env[f"{pkg}_error"] = str(e)[:200]
    results["env"] = env
    for case in spec["cases"]:
        need = "torchvision" if case == "resnet50" else "timm"
        for mode in spec["modes"]:
            key = f"{case}:{mode}"
            if env[need] is None:
                results[key] = {"missing": f"not installed ({need})"}
                continue
            _log(f"torch{' (compile only)' if spec['compile_only'] else ''}: {key}")
            try:
                results[key] = _time_torch(case, mode, spec)
            except Exception as e:  # noqa: BLE001 - reported in the table
                results[key] = {"error": f"{type(e).__name__}: {e}"[:400]}
                _log(f"  failed: {results[key]['error']}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            emit(results)
    return results


# --------------------------------------------------------------------------- orchestration


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_worker(kind: str, spec: dict, env: dict | None = None) -> dict:
    """Runs `--worker kind` in a fresh interpreter; returns its result (or an error per row).

    The worker's stderr (progress) is echoed as it comes; its result is the last stdout line
    that starts with RESULT_MARK.
    """
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", kind, "--spec",
           json.dumps(spec)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    tail: collections.deque = collections.deque(maxlen=15)

    def echo():
        for line in proc.stderr:
            tail.append(line.rstrip())
            if not line.startswith(("WARNING", "W0", "I0")) and "warn" not in line.lower():
                print(f"  [{kind}] {line.rstrip()}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    stdout = proc.stdout.read()
    proc.wait()
    thread.join()
    result = {}
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            break
    if proc.returncode != 0:
        # The rows it finished stand; the others are reported as crashed.
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        result["crashed"] = f"worker exited {proc.returncode}: {last[-300:]}"
    return result


def measure(args) -> dict:
    """Runs every worker; returns {"jax": ..., "jax_cache": ..., "torch": ..., ...}."""
    settings = dict(SMALL if args.small else FULL)
    for name in ("batch", "steps", "warmup"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    rows = [row_id for case, row_id, _ in JAX_ROWS if case in args.cases
            and (args.rows is None or row_id in args.rows)]
    torch_cases = [c for c in args.cases if c in TORCH_PEERS]
    base = dict(small=args.small, settings=settings, cifar=str(args.cifar) if args.cifar else None,
                torch_compile_mode=args.torch_compile_mode)
    cache = tempfile.mkdtemp(prefix="jaxvision-bench-cache-")
    inductor = tempfile.mkdtemp(prefix="jaxvision-bench-inductor-")
    try:
        return _measure(args, base, rows, torch_cases, cache, inductor)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(inductor, ignore_errors=True)


def _measure(args, base, rows, torch_cases, cache, inductor) -> dict:
    run = {"settings": base["settings"], "cases": list(args.cases), "rows": rows,
           "started": time.time()}
    run["jax"] = _run_worker("jax", dict(base, rows=rows, cache_dir=cache, compile_only=False))
    # A fresh process on the cache the timing run wrote: the warm-cache compile times.
    run["jax_cache"] = _run_worker("jax", dict(base, rows=rows, cache_dir=cache,
                                               compile_only=True))
    if torch_cases and not args.no_torch:
        # Inductor's on-disk caches in a directory of this run's, empty at first, so the first
        # torch.compile is cold and the second process's is warm.
        tenv = {"TORCHINDUCTOR_CACHE_DIR": inductor}
        run["torch"] = _run_worker("torch", dict(base, cases=torch_cases,
                                                 modes=["compile", "eager"],
                                                 compile_only=False), tenv)
        if args.torch_cache_check:
            run["torch_cache"] = _run_worker("torch", dict(base, cases=torch_cases,
                                                           modes=["compile"],
                                                           compile_only=True), tenv)
    run["seconds"] = time.time() - run["started"]
    return run


# ----------------------------------------------------------------------------------- report


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _secs(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _cell(result: dict | None, key: str = "img_s") -> str:
    """A measured number, or why there is none (never a made-up one)."""
    if result is None:
        return "not run"
    if "missing" in result:  # "not installed (torch: No module named 'torch')" -> shorter
        return re.sub(r"\((\w+):.*\)$", r"(\1)", result["missing"])
    for reason in ("error", "crashed"):
        if reason in result:
            return f"{reason}: {result[reason]}".replace("|", "/").replace("\n", " ")[:160]
    return _num(result[key])


def _torch_result(run: dict, case: str, mode: str, cache: bool = False) -> dict | None:
    block = run.get("torch_cache" if cache else "torch")
    if block is None and cache and "torch" in run:
        return {"missing": "not run (--torch-cache-check)"}
    if block is None:
        return {"missing": "not run (--no-torch)"} if case in TORCH_PEERS else None
    if "missing" in block.get("env", {}):
        return {"missing": block["env"]["missing"]}
    return _row(block, f"{case}:{mode}")


def _jax_result(run: dict, row_id: str, cache: bool = False) -> dict | None:
    return _row(run.get("jax_cache" if cache else "jax", {}), row_id)


def _row(block: dict, key: str) -> dict | None:
    """A worker's result for one row; a row it never reached is reported as its crash."""
    if key in block:
        return block[key]
    return {"crashed": block["crashed"]} if "crashed" in block else None


def _ratio(jax_res: dict | None, torch_res: dict | None) -> str:
    if not jax_res or not torch_res or "img_s" not in jax_res or "img_s" not in torch_res:
        return "—"
    return f"{jax_res['img_s'] / torch_res['img_s']:.2f}x"


def _params(jax_res, torch_res) -> str:
    j = jax_res.get("params") if jax_res and "params" in jax_res else None
    t = torch_res.get("params") if torch_res and "params" in torch_res else None
    if j is None:
        return "—"
    if t is None:
        return _num(j)
    return _num(j) + (" (equal)" if j == t else f" vs {_num(t)}")


def _flops_per_image(res: dict) -> tuple[float | None, str]:
    """(FLOPs per image for MFU, how they were counted).

    The compiled program's count, as a rule. Where it is missing, or under half the count of
    the lowered (pre-optimisation) program, the latter: a GPU's compiled program can hide work
    in library calls (cuDNN, cuBLAS) that the cost analysis does not count.
    """
    compiled = (res.get("flops_per_step_compiled") or 0) / res.get("batch", 1)
    lowered = (res.get("flops_per_step_lowered") or 0) / res.get("batch", 1)
    if compiled and (not lowered or compiled >= 0.5 * lowered):
        return compiled, "compiled" + (f"; lowered {lowered / 1e9:,.3f}" if lowered else "")
    if lowered:
        return lowered, "lowered" + (f"; compiled {compiled / 1e9:,.3f}" if compiled else "")
    return None, "—"


def _mfu(img_s: float | None, flops: float | None, peak: float | None) -> str:
    if img_s is None or flops is None:
        return "—"
    if peak is None:
        return "n/a (no peak)"
    return f"{100 * img_s * flops / (peak * 1e12):.1f}%"


def title(case: str, run: dict, small: bool) -> str:
    s = run["settings"]
    return (SMALL_TITLES if small else TITLES)[case].format(n=SMALL_CIFAR_IMAGES, **s)


def _rows(run: dict):
    """The jaxvision rows of this run: (case, row id, label)."""
    return [r for r in JAX_ROWS if r[0] in run["cases"] and r[1] in run["rows"]]


def _label(row_id: str, label: str, small: bool) -> str:
    return SMALL_LABELS[row_id] if small else label


def throughput_table(run: dict, small: bool) -> str:
    head = ["benchmark", "jaxvision", "jaxvision img/s", "PyTorch peer",
            "torch.compile img/s", "ratio", "eager img/s", "ratio vs eager", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for case, row_id, label in _rows(run):
        jres = _jax_result(run, row_id)
        if case in TORCH_PEERS:
            tc, te = _torch_result(run, case, "compile"), _torch_result(run, case, "eager")
            peer = (SMALL_TORCH_PEERS if small else TORCH_PEERS)[case]
            tcell, ecell = _cell(tc), _cell(te)
        else:
            tc = te = None
            peer, tcell, ecell = "— (no peer in this script)", "—", "—"
        cells = [title(case, run, small), _label(row_id, label, small), _cell(jres), peer,
                 tcell, _ratio(jres, tc), ecell, _ratio(jres, te), _params(jres, tc)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mfu_table(run: dict, peak: float | None, small: bool) -> str:
    head = ["row", "GFLOP / image (XLA, train step)", "jaxvision MFU", "torch.compile MFU",
            "eager MFU", "jaxvision MFU at 24.6 GFLOP/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for case, row_id, label in _rows(run):
        jres = _jax_result(run, row_id)
        if not jres or "img_s" not in jres:
            continue
        flops, source = _flops_per_image(jres)
        explicit = _jax_result(run, "vit_b16")
        if row_id == "vit_b16_fused" and explicit and "img_s" in explicit:
            # cuDNN's fused attention is one library call that the cost analysis does not
            # count; the function is the explicit row's, so are its FLOPs.
            flops, source = _flops_per_image(explicit)
            source = "the explicit row's count"
        tc, te = _torch_result(run, case, "compile"), _torch_result(run, case, "eager")
        t_img = tc.get("img_s") if tc else None
        e_img = te.get("img_s") if te else None
        conv = (_mfu(jres["img_s"], RESNET50_TRAIN_GFLOP * 1e9, peak)
                if case == "resnet50" else "—")
        gflop = f"{flops / 1e9:,.3f} ({source})" if flops else "—"
        lines.append("| " + " | ".join([_label(row_id, label, small), gflop,
                                         _mfu(jres["img_s"], flops, peak),
                                         _mfu(t_img, flops, peak), _mfu(e_img, flops, peak),
                                         conv]) + " |")
    return "\n".join(lines)


def compile_table(run: dict, small: bool) -> str:
    head = ["row", "cold: trace + lower", "cold: XLA compile", "warm cache (fresh process): "
            "trace + lower", "warm cache: compile", "cache hits (warm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for case, row_id, label in _rows(run):
        cold, warm = _jax_result(run, row_id), _jax_result(run, row_id, cache=True)
        row = [f"jaxvision {_label(row_id, label, small)}"]
        for res in (cold, warm):
            if res and "compile_s" in res:
                row += [_secs(res["lower_s"]), _secs(res["compile_s"])]
            else:
                row += [_cell(res, "compile_s")] * 2
        row.append(str(warm.get("cache_hits", "—")) if warm and "compile_s" in warm else "—")
        lines.append("| " + " | ".join(row) + " |")
    for case in (c for c in run["cases"] if c in TORCH_PEERS):
        cold = _torch_result(run, case, "compile")
        warm = _torch_result(run, case, "compile", cache=True)
        cells = []
        for res in (cold, warm):
            cells.append(_secs(res["first_step_s"]) if res and "first_step_s" in res
                         else _cell(res, "first_step_s"))
        peer = (SMALL_TORCH_PEERS if small else TORCH_PEERS)[case]
        lines.append(f"| torch.compile {peer}: first step (compiles) | "
                     f"{cells[0]} (cold inductor cache) | — | {cells[1]} (warm inductor cache) "
                     "| — | — |")
    return "\n".join(lines)


def results_json(run: dict) -> dict:
    """The figures another script reads back (input_pipeline: the ResNet-50 rate)."""
    out = {}
    for case, row_id, _ in JAX_ROWS:
        res = _jax_result(run, row_id)
        if res and "img_s" in res:
            out[f"jax_{row_id}_img_s"] = round(res["img_s"], 1)
    for case in TORCH_PEERS:
        for mode in ("compile", "eager"):
            res = _torch_result(run, case, mode)
            if res and "img_s" in res:
                out[f"torch_{case}_{mode}_img_s"] = round(res["img_s"], 1)
    return out


def device_line(run: dict) -> tuple[str, str, str]:
    """(platform, device description, versions line) from the workers' reports."""
    env = run.get("jax", {}).get("env", {})
    plat = env.get("platform", "unknown")
    if plat == "cpu":
        device = markdown.cpu_name()
    else:
        device = f"{env.get('device_kind', 'unknown device')} ({plat})"
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    tenv = run.get("torch", {}).get("env", {})
    if "missing" in tenv:
        versions += f"; PyTorch side: {tenv['missing']}"
    elif tenv:
        versions += "; " + ", ".join(f"{k} {tenv[k]}" for k in ("torch", "torchvision", "timm")
                                     if tenv.get(k)) + (f", CUDA {tenv['cuda']}"
                                                        if tenv.get("cuda") else "")
    elif "torch" not in run:
        versions += "; PyTorch side not run (--no-torch)"
    return plat, device, versions


def report(run: dict, args) -> str:
    plat, device, versions = device_line(run)
    small = args.small
    peak = peak_tflops(run.get("jax", {}).get("env", {}).get("device_kind", ""),
                       args.peak_tflops)
    s = run["settings"]
    cmd = "python -m benchmarks.throughput" + (" --small" if small else "") + (
        f" --cases {','.join(run['cases'])}" if tuple(run["cases"]) != CASES else "") + (
        f" --rows {','.join(args.rows)}" if args.rows else "")
    measured = run.get("args", {})
    lines = [f"### {device}{' — CPU harness check, not a speed claim' if plat == 'cpu' else ''}",
             "",
             f"`{cmd}` on {measured.get('date', datetime.date.today().isoformat())}; "
             f"{versions}; {run['seconds'] / 60:.1f} min in all; load average "
             f"{measured.get('load', os.getloadavg()[0]):.1f} at the end "
             f"({measured.get('cores', os.cpu_count())} cores)."
             + (f" Note: {args.note}" if getattr(args, "note", "") else ""),
             ""]
    if plat == "cpu":
        lines += ["On a CPU these figures only show that the harness runs end to end (tiny "
                  "shapes, few steps, a shared machine): they say nothing about GPU speed.", ""]
    cifar = _jax_result(run, "cifar") or {}
    lines += [
        f"Training throughput, images/s: median of {s['steps']} synchronised steps after "
        f"{s['warmup']} warm-up steps" + (f"; CIFAR: median of {cifar.get('epochs', '?')} "
                                          f"epochs of {cifar.get('images_per_epoch', '?'):,} "
                                          f"images after one warm-up epoch, data: "
                                          f"{cifar['data']}" if "data" in cifar else "")
        + ". ratio = jaxvision / "
        "PyTorch. params: jaxvision's count, \"(equal)\" when the PyTorch peer's is the same.",
        "",
        throughput_table(run, small),
        "",
        "FLOPs and MFU: XLA's cost analysis of the jaxvision train step (forward, backward, "
        "optimizer; multiply-add = 2 FLOPs) per image; the PyTorch MFU uses the same count. Peak: "
        + (f"{peak:g} TFLOP/s dense bf16" if peak else "none known for this device (MFU n/a)")
        + ". ResNet-50 convention: 3 x 8.2 GFLOP = 24.6 GFLOP per training image.",
        "",
        mfu_table(run, peak, small),
        "",
        "Compile times of the train step (jaxvision: cold = fresh process and empty persistent "
        "cache; warm = another fresh process reading that cache):",
        "",
        compile_table(run, small),
        "",
        f"<!-- results: {json.dumps(results_json(run), sort_keys=True)} -->",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the doc file

DOC_TITLE = """# Benchmarks

Written by the scripts in `benchmarks/` (`throughput`, `input_pipeline`, `suite_time`; each
docstring says what is timed and how). One section per script, device and setting; a rerun
replaces only its own section. Sections marked "CPU harness check" come from tiny shapes on a
shared 2-core CPU: they show that the harness works, not how fast anything is on a GPU.

On one H100, from the repository root after `pip install -e .`, one device call each:

    python -m benchmarks.throughput --write docs/benchmarks.md       # ~7 min (estimate)
    python -m benchmarks.input_pipeline --write docs/benchmarks.md   # ~1 min (estimate)

(`input_pipeline` is CPU work on the GPU host's cores; run it second, it reads the ResNet-50
rate back from this file.) On a CPU: `python -m benchmarks.suite_time --write
docs/benchmarks.md` (the test suite and the quickstart, ~8.5 min on 2 cores).
"""

# The GPU figures issue 6 asks for: (script whose GPU section measures it, description).
GPU_FIGURES = (
    ("throughput", "ResNet-50 training images/s on one H100 (224x224, batch 256, bf16): "
                   "jaxvision vs torch.compile vs eager, and the ratio (target >= 1.15x)"),
    ("throughput", "ViT-B/16 training images/s on one H100 (batch 256, AdamW): jaxvision "
                   "(explicit and fused attention) vs timm + torch.compile vs eager (target "
                   ">= 1.1x)"),
    ("throughput", "MFU of each (XLA's FLOP count; ResNet-50 also at 24.6 GFLOP/img)"),
    ("throughput", "compile times on the GPU, cold and with the persistent cache warm"),
    ("throughput", "CIFAR-10 ResNet-18 epoch with the data on the device, images/s"),
    ("input_pipeline", "host JPEG pipeline (decode, random-resized-crop, flip, batch) on the "
                       "GPU host's 16 cores, images/s, and whether ResNet-50 is input-bound"),
)


def _marker(key: str) -> tuple[str, str]:
    return f"<!-- benchmarks: {key} -->", f"<!-- /benchmarks: {key} -->"


def section_key(script: str, plat: str, device: str, setting: str) -> str:
    return f"{script} | {plat} | {device} | {setting}"


def write_section(path: pathlib.Path, key: str, text: str) -> None:
    """Puts `text` between this key's markers in `path` (replacing that section only), then
    rewrites the list of GPU figures still unmeasured."""
    path = pathlib.Path(path)
    old = path.read_text() if path.exists() else DOC_TITLE
    new = _put(old, key, text)
    new = _put(new, "unmeasured", unmeasured_text(new), first=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def _put(doc: str, key: str, text: str, first: bool = False) -> str:
    begin, end = _marker(key)
    # first: right after the title, before every section
    return markdown.put_section(doc, begin, end, f"{begin}\n{text.rstrip()}\n{end}\n",
                                before="<!-- benchmarks:" if first else None)


def section_keys(doc: str) -> list[list[str]]:
    """The [script, platform, device, setting] of every measured section in a doc."""
    keys = re.findall(r"<!-- benchmarks: (.+?) -->", doc)
    return [k.split(" | ") for k in keys if k.count(" | ") == 3]


def unmeasured_text(doc: str) -> str:
    measured = {(k[0]) for k in section_keys(doc) if k[1] not in ("cpu", "unknown")
                and "small" not in k[3]}
    lines = ["## GPU figures", ""]
    todo = [f"- {what}" for script, what in GPU_FIGURES if script not in measured]
    done = [f"- {what}: see the `{script}` GPU section" for script, what in GPU_FIGURES
            if script in measured]
    if todo:
        lines += ["**Still unmeasured** (no GPU run of the script has been recorded here; no "
                  "figure below is a GPU measurement):", ""] + todo + [""]
    if done:
        lines += ["Measured:", ""] + done + [""]
    lines += ["Also unmeasured and not in these scripts: `experiments.cifar10_speedrun` "
              "(accuracy and time per run on one H100).", ""]
    return "\n".join(lines)


def read_results(path: pathlib.Path, *, gpu_only: bool = True) -> dict | None:
    """The `results` JSON of the newest full (not --small) throughput section, GPU only."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    doc = path.read_text()
    found = None
    for key in re.findall(r"<!-- benchmarks: (throughput \| .+?) -->", doc):
        script, plat, device, setting = key.split(" | ")
        if (gpu_only and plat == "cpu") or "small" in setting:
            continue
        begin, end = _marker(key)
        body = doc[doc.index(begin):doc.index(end)]
        m = re.search(r"<!-- results: (\{.*?\}) -->", body)
        if m:
            found = dict(json.loads(m.group(1)), device=device)
    return found


# ------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny shapes for a CPU harness check: 32x32 images, batch 8, 5 steps, "
                        "1-block-per-stage ResNet-50 layout, 2-block ViT, 64 CIFAR images")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--rows", default=None,
                   help="comma-separated jaxvision rows to run (default: every row of the "
                        f"cases): {','.join(r[1] for r in JAX_ROWS)}")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    p.add_argument("--cifar", type=pathlib.Path,
                   default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz",
                   help="CIFAR-10 archive for the on-device epoch (random images if absent)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--torch-cache-check", action="store_true",
                   help="also time torch.compile's first step in a fresh process with the "
                        "inductor cache warm (about a minute more on a GPU)")
    p.add_argument("--torch-compile-mode", default="default",
                   help='torch.compile mode ("default", "max-autotune", ...)')
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU when the device is not in PEAK_BF16_TFLOPS")
    p.add_argument("--write", type=pathlib.Path, default=None, nargs="?", const=DOC,
                   help=f"update this markdown file (default {DOC.relative_to(ROOT)})")
    p.add_argument("--note", default="", help="a line for the report's header")
    p.add_argument("--raw", type=pathlib.Path, default=None,
                   help="also save every worker's raw results (JSON) here")
    p.add_argument("--render", type=pathlib.Path, default=None,
                   help="measure nothing: render (and --write) the raw results saved by --raw")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"--cases: unknown {bad}; choose from {','.join(CASES)}")
    if args.rows is not None:
        args.rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        bad = [r for r in args.rows if r not in {row[1] for row in JAX_ROWS}]
        if bad:
            p.error(f"--rows: unknown {bad}; choose from {','.join(r[1] for r in JAX_ROWS)}")
    if not args.cifar.exists():
        alt = ROOT / "shared" / "data" / "cifar10-jpeg.tar.xz"  # a checkout with shared/ inside
        args.cifar = alt if alt.exists() else args.cifar
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        spec = json.loads(args.spec)
        def emit(results):
            print(RESULT_MARK + json.dumps(results), flush=True)

        emit((jax_worker if args.worker == "jax" else torch_worker)(spec, emit))
        return
    if args.render:
        run = json.loads(args.render.read_text())
        # The report's settings are the measured run's (the command line only picks outputs).
        args.small, args.cases = run["args"]["small"], tuple(run["cases"])
        args.rows = run["args"]["rows"] and tuple(run["args"]["rows"])
    else:
        run = measure(args)
        run["args"] = {"small": args.small, "rows": args.rows, "date":
                       datetime.date.today().isoformat(), "load": os.getloadavg()[0],
                       "cores": os.cpu_count()}
        if args.raw:
            args.raw.write_text(json.dumps(run, indent=1))
    text = report(run, args)
    print(text)
    if args.write:
        plat, device, _ = device_line(run)
        setting = ("small" if args.small else "full") + (
            "" if tuple(args.cases) == CASES else " " + ",".join(args.cases)) + (
            " rows " + ",".join(args.rows) if args.rows else "")
        write_section(args.write, section_key("throughput", plat, device, setting), text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
