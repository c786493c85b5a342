"""Timings of the course's operations: kNN distances three ways, convolution three ways.

    python -m benchmarks.course_ops --quick      # 3 min measured on 2 shared CPU cores
    python -m benchmarks.course_ops              # more repeats, bigger naive and loop budgets
    python -m benchmarks.course_ops --note "shared machine, load ~6"   # a line for the header

Prints markdown tables and writes them into docs/course_ops.md (`--out` to change), in a
section per device (and per --quick), so a CPU run and an H100 run sit side by side and a
rerun on one device replaces only its own section. The header gives the device, jax version,
date and the load average (timings on a shared machine are noisy).

(a) kNN L2 distances, `jaxvision.knn`: `distances_two_loops` (numpy loops on the host),
    `distances_one_loop` (one jitted call per test row) and `distances` (vectorised, chunked
    over test rows, jitted), at Ntest x Ntrain = 500 x 5,000 and 5,000 x 500, D = 3,072, and the
    vectorised form on the full CIFAR-10 problem, 10,000 x 50,000. A loop form runs in full
    only if its per-row time, measured on a few rows, says it finishes within the budget
    (`--loop-budget` seconds); otherwise the row says "skipped (too slow)" with that measured
    per-row time: nothing is extrapolated into the table.
(b) Convolution forward and forward+backward (`jax.value_and_grad` w.r.t. x and w of
    sum(out * cot), so the forward pass is really computed) for
    `conv_naive`, `conv_im2col` and `conv_lax`, float32: batch 50, 32x32x3 -> 32 filters 7x7
    pad 3 (the course's three-layer ConvNet), 16x16x32 -> 64 filters 3x3 pad 1, and 8x8x32 ->
    64 3x3 pad 1. The naive loops are unrolled into the program, so they run only up to
    `--naive-positions` output positions (compile time grows with them).

Timing: every function is jitted and compiled ahead of time (`.lower(...).compile()`, compile
time reported separately), called once to warm up (except the 10,000 x 50,000 problem under
--quick), then the median of at least `--repeats` calls (more, up to 100, until 1 s has been
timed), each ended by `block_until_ready`. Only jax and
numpy are imported, so it runs on a GPU host as is. The full run is much longer on a CPU than
--quick: a warm-up and 3 timed runs of the 10,000 x 50,000 problem (96 s for one run on the 2
shared cores here), the loop forms run in full within 60 s each, and the naive conv compiled at
256 output positions (its 64-position program took 24 s to compile here).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import markdown
from jaxvision import conv, knn

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "course_ops.md"
D = 3072  # a flattened 32x32x3 CIFAR-10 image
# (Ntest, Ntrain): the course's subset both ways round, and a small size at which the loop forms
# finish in seconds on a CPU, so that every form has a measured full run.
KNN_SIZES = ((100, 1000), (500, 5000), (5000, 500))
CIFAR = (10000, 50000)  # the full test set against the full training set
# (name, N, H, Cin, k, Cout, padding), stride 1 (square images and kernels).
CONV_CASES = (
    ("32x32x3 -> 32 @ 7x7 pad 3", 50, 32, 3, 7, 32, 3),
    ("16x16x32 -> 64 @ 3x3 pad 1", 50, 16, 32, 3, 64, 1),
    ("8x8x32 -> 64 @ 3x3 pad 1", 50, 8, 32, 3, 64, 1),
)


# ------------------------------------------------------------------------------------ timing


def _median_time(fn, *args, repeats: int, warmup: bool = True, min_total: float = 1.0,
                 max_repeats: int = 100) -> tuple[float, int]:
    """(median wall seconds of `fn(*args)`, number of calls timed), each call ended by
    block_until_ready: at least `repeats` calls, more (up to `max_repeats`) until `min_total`
    seconds have been timed, so that millisecond entries get enough samples on a noisy host."""
    if warmup:
        jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats or (sum(times) < min_total and len(times) < max_repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), len(times)


def _compile(fn, *args):
    """AOT-compiles jax.jit(fn) for args: (compiled executable, compile seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _current_rss() -> float | None:
    """This process's resident memory now, in bytes (Linux), else None."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_memory() -> str:
    """The device's peak bytes in use (GPU), else the process's peak resident set (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 1e9:.2f} GB device peak"
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return f"{peak / 1e9:.2f} GB process peak RSS"


# --------------------------------------------------------------------------------------- kNN


def _loop_row(name, fn, train, test, *, budget: float, probe: int, reference):
    """Times a loop form: on `probe` rows first; in full only if that fits the budget."""
    n_test = test.shape[0]
    fn(train, test[:1])  # compiles the per-row function (one loop) / warms the caches
    start = time.perf_counter()
    jax.block_until_ready(fn(train, test[:probe]))
    per_row = (time.perf_counter() - start) / probe
    if per_row * n_test > budget:
        return (name, f"skipped (too slow): {per_row * 1e3:,.1f} ms per test row, measured on "
                      f"{probe} rows", "—")
    start = time.perf_counter()
    out = jax.block_until_ready(fn(train, test))
    elapsed = time.perf_counter() - start
    err = float(np.max(np.abs(np.asarray(out) - reference)))
    return name, _ms(elapsed) + " (1 run)", f"{err:.1e}"


def knn_rows(args, rng):
    rows = []
    for n_test, n_train in KNN_SIZES:
        # Pixel-valued float32 data: timing does not depend on the values.
        train = rng.integers(0, 256, size=(n_train, D)).astype(np.float32)
        test = rng.integers(0, 256, size=(n_test, D)).astype(np.float32)
        train_j, test_j = jax.device_put(train), jax.device_put(test)
        vec, compile_s = _compile(functools.partial(knn.distances, metric="l2"), train_j, test_j)
        t, calls = _median_time(vec, train_j, test_j, repeats=args.repeats)
        reference = np.asarray(vec(train_j, test_j))
        size = f"{n_test:,} x {n_train:,}"
        rows.append((size, "vectorised (`distances`)",
                     f"{_ms(t)} (median of {calls}; compile {_ms(compile_s)})", "—"))
        two = functools.partial(knn.distances_two_loops, metric="l2")
        one = functools.partial(knn.distances_one_loop, metric="l2")
        for name, fn, tr, te, probe in (("one loop", one, train_j, test_j, 20),
                                        ("two loops", two, train, test, 2)):
            rows.append((size, *_loop_row(name, fn, tr, te, budget=args.loop_budget, probe=probe,
                                          reference=reference)))
        print(f"  kNN {size} done", flush=True)
    return rows


def cifar_row(args, rng):
    """The vectorised distances on the full CIFAR-10 problem, with its memory bound."""
    n_test, n_train = CIFAR
    # Made on the device (no host copy to count in the CPU's resident memory).
    k_train, k_test = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 31))))
    train = jax.block_until_ready(jax.random.normal(k_train, (n_train, D), jnp.float32))
    test = jax.block_until_ready(jax.random.normal(k_test, (n_test, D), jnp.float32))
    rss_before = _current_rss()
    chunk = 1024
    vec, compile_s = _compile(functools.partial(knn.distances, metric="l2", chunk=chunk),
                              train, test)
    repeats = 1 if args.quick else min(args.repeats, 3)
    t, calls = _median_time(vec, train, test, repeats=repeats, warmup=not args.quick,
                            min_total=0.0)
    # Bound on what the program holds (float32): the inputs, the result, the centred training
    # and test sets and two [chunk, Ntrain] blocks (the one computed and the one being
    # written), as in knn.py's docstring.
    gb = 4 / 1e9
    inputs, result = (n_train + n_test) * D * gb, n_test * n_train * gb
    working = (n_train + n_test) * D * gb + 2 * chunk * n_train * gb
    bound = (f"inputs {inputs:.2f} + result {result:.2f} + working set {working:.2f} "
             f"(centred train and test + 2 blocks of {chunk} x {n_train:,}) = "
             f"{inputs + result + working:.2f} GB")
    how = "1 run after AOT compile, no warm-up call" if args.quick else f"median of {calls}"
    measured = _peak_memory()
    if rss_before is not None and "RSS" in measured:
        measured += f" ({rss_before / 1e9:.2f} GB resident before the call, inputs included)"
    return (f"{n_test:,} x {n_train:,}", "vectorised (`distances`, chunk 1024)",
            f"{_ms(t)} ({how}; compile {_ms(compile_s)})", bound, measured)


# ------------------------------------------------------------------------------- convolution


def conv_rows(args, rng):
    rows = []
    impls = (("naive", conv.conv_naive), ("im2col", conv.conv_im2col), ("lax", conv.conv_lax))
    for name, n, h, cin, k, cout, pad in CONV_CASES:
        x = jax.device_put(rng.standard_normal((n, h, h, cin), np.float32))
        w = rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin)
        w = jax.device_put(w.astype(np.float32))
        b = jax.device_put(np.zeros(cout, np.float32))
        ho = h + 2 * pad - k + 1
        cot = jax.device_put(rng.standard_normal((n, ho, ho, cout), np.float32))
        grads = {}
        for impl_name, fn in impls:
            f = functools.partial(fn, stride=1, padding=pad)
            if impl_name == "naive" and ho * ho > args.naive_positions:
                rows.append((name, impl_name, f"skipped: {ho * ho} output positions unrolled "
                             f"(> --naive-positions {args.naive_positions})", "—", "—", "—"))
                continue
            fwd, _ = _compile(f, x, w, b)
            # value_and_grad, not grad: the gradient of the linear sum(out * cot) does not need
            # `out`, and XLA would drop the forward pass from a grad-only program.
            grad_fn = jax.value_and_grad(lambda x, w, b, cot, f=f: jnp.sum(f(x, w, b) * cot),
                                         argnums=(0, 1))
            both, compile_s = _compile(grad_fn, x, w, b, cot)
            t_fwd, _ = _median_time(fwd, x, w, b, repeats=args.repeats)
            t_both, _ = _median_time(both, x, w, b, cot, repeats=args.repeats)
            grads[impl_name] = both(x, w, b, cot)[1]
            rows.append([name, impl_name, _ms(t_fwd), _ms(t_both), _ms(compile_s), None])
        # How far each implementation's gradients are from lax's (autodiff), relative to
        # their scale: a check that the timed programs compute the same thing.
        for row in rows:
            if row[0] == name and isinstance(row, list) and row[1] == "lax":
                row[5] = "(reference)"
            elif row[0] == name and isinstance(row, list):
                g, ref = grads[row[1]], grads["lax"]
                row[5] = "{:.0e}".format(max(
                    float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) for a, r in zip(g, ref)))
        print(f"  conv {name} done", flush=True)
    return [tuple(r) for r in rows]


# ------------------------------------------------------------------------------------ output


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(args, knn_table, cifar, conv_table, load_before, seconds) -> str:
    load_after = os.getloadavg()
    mode = "--quick" if args.quick else "full"
    head = [
        f"### {markdown.device_name()} ({mode})",
        "",
        f"`python -m benchmarks.course_ops{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}, jax {jax.__version__}, numpy {np.__version__}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        f"({os.cpu_count()} cores); {seconds / 60:.1f} min in all.",
    ]
    if args.note:
        head.append(f"Note: {args.note}")
    parts = head + [
        "",
        "kNN, L2 distances, D = 3,072, float32. The loop forms' column `max abs diff` is their "
        f"largest difference from the vectorised result; a loop runs in full only if its "
        f"per-row time predicts under {args.loop_budget:g} s.",
        "",
        _table(["Ntest x Ntrain", "form", "time", "max abs diff"], knn_table),
        "",
        "The full CIFAR-10 problem, vectorised (memory: bound from the shapes, and measured):",
        "",
        _table(["Ntest x Ntrain", "form", "time", "memory bound", "measured peak"], [cifar]),
        "",
        "Convolution, batch 50, stride 1, float32: forward, and forward+backward = "
        "`jax.value_and_grad` w.r.t. x and w of sum(out * cotangent) (custom_vjp backwards for "
        "naive and im2col, "
        "autodiff for lax); compile time of the forward+backward program; gradient error "
        "relative to lax's.",
        "",
        _table(["layer", "conv", "forward", "forward+backward", "compile (fwd+bwd)",
                "grad rel. err vs lax"], conv_table),
    ]
    return "\n".join(parts) + "\n"


def write_section(path: pathlib.Path, key: str, text: str) -> None:
    """Puts `text` in this key's section of `path` (`benchmarks.markdown`)."""
    markdown.write_section(path, tag="course_ops", key=key, text=text,
                           title=markdown.doc_title("Course operations: timings", "course_ops",
                                                    what="timed"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="3 repeats, one timed run of the 10,000 x 50,000 problem, naive conv "
                        "only at 64 output positions, loop budget 10 s")
    p.add_argument("--repeats", type=int, default=None,
                   help="least number of timed calls per entry (median; more, up to 100, "
                        "until 1 s has been timed)")
    p.add_argument("--loop-budget", type=float, default=None,
                   help="seconds a loop form may take to run in full")
    p.add_argument("--naive-positions", type=int, default=None,
                   help="largest Ho * Wo at which the unrolled naive conv is compiled")
    p.add_argument("--note", default="", help="a line for the header (e.g. machine load)")
    p.add_argument("--out", type=pathlib.Path, default=DOC, help="markdown file to update")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.loop_budget is None:
        args.loop_budget = 10.0 if args.quick else 60.0
    if args.naive_positions is None:
        args.naive_positions = 64 if args.quick else 256
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load_before, start = os.getloadavg(), time.perf_counter()
    rng = np.random.default_rng(0)
    print(f"device: {markdown.device_name()}, jax {jax.__version__}", flush=True)
    knn_table = knn_rows(args, rng)
    conv_table = conv_rows(args, rng)
    # Last, so that the process's peak memory is this problem's.
    cifar = cifar_row(args, rng)
    text = report(args, knn_table, cifar, conv_table, load_before, time.perf_counter() - start)
    print(text)
    key = f"{markdown.device_name()} {'quick' if args.quick else 'full'}"
    write_section(args.out, key, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
