"""benchmarks/throughput.py and benchmarks/input_pipeline.py at their tiniest settings, and the
fused attention option (`attention_impl`) that the ViT-B/16 benchmark times.

The harnesses run as the user runs them, in subprocesses on one CPU device, with torch made
unimportable (a `torch` package on PYTHONPATH that raises ImportError), so the PyTorch cells
must say "not installed" whether or not torch is installed here. The report is also checked
in-process on made-up worker results (ratios, MFU, a crashed worker, a missing timm), and the
doc's section bookkeeping (the list of GPU figures still unmeasured, the ResNet-50 rate that
input_pipeline reads back).
"""
import functools
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import input_pipeline, throughput
from jaxvision.nets.transformer import (
    Encoder,
    MultiHeadAttention,
    dot_product_attention,
    fused_attention,
)
from jaxvision.nets.vit import ViTMicro

ROOT = pathlib.Path(__file__).resolve().parents[1]
# XLA's cheap CPU pipeline: these runs check the harness, not speed (as tests/test_nets_vit.py).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _env(tmp_path, block_torch=True):
    """One CPU device, fast compiles, and (by default) an unimportable torch."""
    paths = [str(ROOT)]
    if block_torch:
        fake = tmp_path / "no_torch" / "torch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            'raise ImportError("torch blocked by tests/test_benchmarks.py")\n')
        paths.insert(0, str(fake.parent))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA,
               PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| " + first_cell)]


# ---------------------------------------------------------------------- throughput harness


def test_throughput_small_run_end_to_end_without_torch(tmp_path):
    doc = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--small", "--cases", "vit_b16",
         "--rows", "vit_b16", "--steps", "2", "--warmup", "1", "--write", str(doc)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "CPU harness check, not a speed claim" in out
    rows = _table_rows(out, "ViT, 2 blocks")
    assert len(rows) == 1, out  # the one row asked for (--rows), no fused row
    row = rows[0]
    # benchmark | jaxvision | img/s | peer | compile | ratio | eager | ratio | params
    assert "explicit attention" in row[1]
    assert float(row[2].replace(",", "")) > 0  # measured
    assert row[4] == row[6] == "not installed (torch)"  # never a number
    assert row[5] == row[7] == "—"
    assert row[8] == "114,250"  # the ViT's own count, no PyTorch count to compare with
    compile_rows = _table_rows(out, "jaxvision ViT")
    assert compile_rows and compile_rows[0][-1] == "1"  # the fresh process hit the cache
    torch_compile = _table_rows(out, "torch.compile")
    assert torch_compile and "not installed (torch)" in torch_compile[0][1]
    text = doc.read_text()
    assert "<!-- benchmarks: throughput | cpu |" in text and "small vit_b16" in text
    assert "**Still unmeasured**" in text and "ResNet-50 training images/s" in text
    results = json.loads(text.split("<!-- results: ")[1].split(" -->")[0])
    assert set(results) == {"jax_vit_b16_img_s"}  # nothing for PyTorch: it did not run
    # A CPU run is never read back as the GPU's ResNet-50 rate.
    assert throughput.read_results(doc) is None


def _fake_run(torch_block):
    jax_row = {"params": 100, "lower_s": 1.0, "compile_s": 2.0, "cache_hits": 0,
               "flops_per_step_compiled": 8e10, "batch": 8, "img_s": 2000.0}
    warm = dict(jax_row, compile_s=0.1, cache_hits=1)
    return {
        "settings": dict(throughput.FULL), "cases": list(throughput.CASES),
        "rows": ["resnet50", "vit_b16", "vit_b16_fused", "cifar"], "seconds": 60.0,
        "jax": {"env": {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
                        "versions": {"jax": "0.0"}},
                "resnet50": jax_row, "vit_b16": {"error": "RuntimeError: out of memory"},
                "vit_b16_fused": jax_row,
                "cifar": dict(jax_row, data="random", epochs=3, images_per_epoch=49_920)},
        "jax_cache": {"resnet50": warm, "vit_b16": warm, "vit_b16_fused": warm, "cifar": warm},
        "torch": torch_block,
        "torch_cache": {"crashed": "worker exited -9: Killed"},
    }


def test_report_ratios_mfu_and_missing_peers():
    torch_block = {"env": {"torch": "2.0", "torchvision": "0.1", "timm": None},
                   "resnet50:compile": {"params": 100, "img_s": 1000.0, "first_step_s": 30.0},
                   "resnet50:eager": {"params": 100, "img_s": 500.0},
                   "vit_b16:compile": {"missing": "not installed (timm)"},
                   "vit_b16:eager": {"missing": "not installed (timm)"}}
    run = _fake_run(torch_block)
    args = types.SimpleNamespace(small=False, peak_tflops=None, rows=None)
    text = throughput.report(run, args)
    resnet, vit, fused = _table_rows(text, "ResNet-50, 224x224")[0], *_table_rows(
        text, "ViT-B/16")
    assert resnet[2:] == ["2,000", "torchvision resnet50", "1,000", "2.00x", "500", "4.00x",
                          "100 (equal)"]
    assert vit[2].startswith("error: RuntimeError: out of memory") and vit[5] == "—"
    assert fused[4] == fused[6] == "not installed (timm)" and fused[5] == "—"
    cifar = _table_rows(text, "CIFAR-10 ResNet-18")[0]
    assert cifar[4:8] == ["—"] * 4
    # MFU on an H100 SXM (989.4 TFLOP/s): 2,000 img/s x 10 GFLOP = 2.0%, torch.compile and
    # eager at the same FLOPs per image 1.0% and 0.5%; at ResNet-50's 24.6 GFLOP convention
    # 2,000 x 24.6e9 / 989.4e12 = 5.0%.
    mfu = _table_rows(text, "ResNet50")[0]
    assert mfu[1:] == ["10.000 (compiled)", "2.0%", "1.0%", "0.5%", "5.0%"]
    compile_row = _table_rows(text, "torch.compile torchvision")[0]
    assert compile_row[1] == "30.0 s (cold inductor cache)"
    assert compile_row[3].startswith("crashed: worker exited -9")
    assert json.loads(text.split("<!-- results: ")[1].split(" -->")[0]) == {
        "jax_cifar_img_s": 2000.0, "jax_resnet50_img_s": 2000.0,
        "jax_vit_b16_fused_img_s": 2000.0, "torch_resnet50_compile_img_s": 1000.0,
        "torch_resnet50_eager_img_s": 500.0}


def test_doc_sections_and_gpu_rate_read_back(tmp_path):
    doc = tmp_path / "bench.md"
    run = _fake_run({"env": {"missing": "not installed (torch: blocked)"}})
    args = types.SimpleNamespace(small=False, peak_tflops=None, rows=None)
    key = throughput.section_key("throughput", "gpu", "NVIDIA H100 80GB HBM3 (gpu)", "full")
    throughput.write_section(doc, key, throughput.report(run, args))
    throughput.write_section(doc, throughput.section_key("suite_time", "cpu", "CPU", "full"),
                             "### suite\n")
    text = doc.read_text()
    # The throughput figures now count as measured; the input pipeline's does not yet.
    assert "ResNet-50 training images/s on one H100" in text.split("Measured:")[1]
    still = text.split("**Still unmeasured**")[1].split("Measured:")[0]
    assert "host JPEG pipeline" in still and "ResNet-50 training" not in still
    # A rerun replaces its own section only.
    throughput.write_section(doc, key, "### replaced\n")
    text = doc.read_text()
    assert text.count("<!-- benchmarks: " + key + " -->") == 1 and "### replaced" in text
    assert "### suite" in text
    throughput.write_section(doc, key, throughput.report(run, args))
    found = throughput.read_results(doc)
    assert found["jax_resnet50_img_s"] == 2000.0 and "H100" in found["device"]
    args = types.SimpleNamespace(gpu_rate=None, gpu_rate_from=doc)
    assert input_pipeline.gpu_rate(args)[0] == 2000.0
    args = types.SimpleNamespace(gpu_rate=None, gpu_rate_from=tmp_path / "absent.md")
    rate, source = input_pipeline.gpu_rate(args)
    assert rate == pytest.approx(1.15 * 5663) and "not a measurement" in source


# -------------------------------------------------------------------------- input pipeline


def test_input_pipeline_small_run(tmp_path):
    doc = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.input_pipeline", "--small", "--backend", "thread",
         "--workers", "2", "--images", "4", "--batch", "4", "--batches", "2", "--size", "32",
         "--methods", "decode,pil", "--gpu-rate", "1e9", "--write", str(doc)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "scikit-learn's two bundled photos" in out
    assert not _table_rows(out, "jax |")  # not asked for (the next test runs it)
    for method in ("decode", "pil"):
        row = _table_rows(out, method + " |")[0]
        assert row[2] == "2 threads" and row[3] == "4"
        assert float(row[4].replace(",", "")) > 0
        # No CPU delivers a billion images/s.
        assert row[6].startswith("input-bound: delivers 0.00x")
    assert "<!-- benchmarks: input_pipeline | " in doc.read_text()


def test_pil_and_jax_methods_draw_the_same_crops(tmp_path):
    paths, _ = input_pipeline.make_jpegs(tmp_path, 4, source="sklearn", cifar=None)
    pil = input_pipeline.Pipeline(paths, method="pil", batch=4, size=24, seed=3).make(1)
    jx = input_pipeline.Pipeline(paths, method="jax", batch=4, size=24, seed=3).make(1)
    assert pil.shape == jx.shape == (4, 24, 24, 3) and pil.dtype == jx.dtype == np.uint8
    diff = np.abs(pil.astype(np.int32) - jx.astype(np.int32))
    # The same boxes and flips, resampled by PIL (8-bit fixed point) and by jax (float32): a
    # different crop or a missed flip would differ by tens of grey levels on average.
    assert diff.mean() < 1.0, diff.mean()
    other = input_pipeline.Pipeline(paths, method="pil", batch=4, size=24, seed=3).make(2)
    assert np.abs(other.astype(np.int32) - pil.astype(np.int32)).mean() > 5


# ------------------------------------------------------- fused attention (attention_impl)


def _qkv(dtype=jnp.float32, n=5, m=7, h=2, dh=8):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (2, length, h, dh), dtype)
                 for k, length in zip(keys, (n, m, m)))


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 5, 7), (1, 2, 5, 7)])
def test_fused_attention_equals_explicit(mask_shape):
    q, k, v = _qkv()
    mask = None
    if mask_shape is not None:
        mask = np.random.default_rng(0).random(mask_shape) < 0.5
        mask[..., 0] = True
        mask = jnp.asarray(mask)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # one compile, not one per op
    def outputs(q, k, v, mask):
        # "auto" is "xla" on a CPU.
        return (dot_product_attention(q, k, v, mask=mask)[0],
                fused_attention(q, k, v, mask=mask, implementation="xla"),
                fused_attention(q, k, v, mask=mask, implementation="auto"))

    ref, xla, auto = outputs(q, k, v, mask)
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(auto, xla)
    # bfloat16 inputs: the same float32 logits and softmax, probabilities rounded to bfloat16
    # before the product with V, as the explicit form does.
    ref16, xla16, _ = outputs(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask)
    assert xla16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(xla16), np.float32(ref16), rtol=2e-2, atol=2e-2)


def test_fused_attention_rejects_what_explicit_rejects():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="boolean"):
        fused_attention(q, k, v, mask=jnp.zeros((2, 1, 5, 7)))
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        fused_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="dot_product_attention"):
        fused_attention(q, k, v, implementation="explicit")


def test_vit_with_fused_attention_same_params():
    x = jnp.zeros((1, 32, 32, 3))
    shapes = {impl: jax.tree.map(lambda a: a.shape, jax.eval_shape(
        lambda impl=impl: ViTMicro(attention_impl=impl).init(jax.random.key(0), x,
                                                             train=False)))
        for impl in ("explicit", "xla", "auto")}
    # The same parameters whichever attention runs, so checkpoints interchange.
    assert shapes["xla"] == shapes["explicit"] == shapes["auto"]
    # The option reaches the encoder (which refuses weights it cannot return).
    with pytest.raises(ValueError, match="keep_attention=True needs"):
        jax.eval_shape(lambda: ViTMicro(attention_impl="xla", keep_attention=True).init(
            jax.random.key(0), x, train=False))


def test_encoder_with_fused_attention_same_outputs_and_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mask = jnp.asarray(np.tril(np.ones((5, 5), bool))[None, None])  # causal: a real mask

    def loss(params, x, impl):
        y, _ = Encoder(depth=2, num_heads=2, mlp_dim=32, attention_impl=impl).apply(
            params, x, train=True, mask=mask)
        return jnp.sum(jnp.sin(y))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # one program: one compile
    def both(key, x):
        params = Encoder(depth=2, num_heads=2, mlp_dim=32).init(key, x, train=False)
        # Non-zero attention biases (initialised to zero), so their gradients are checked too.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                           for p, k in zip(leaves, keys)])
        return {impl: jax.value_and_grad(loss, argnums=(0, 1))(params, x, impl)
                for impl in ("explicit", "auto")}

    out = both(jax.random.key(2, impl="rbg"), x)
    (l_ref, g_ref), (l_new, g_new) = out["explicit"], out["auto"]
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_fused_attention_refuses_weights_and_attention_dropout():
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="keep_attention=True needs attention_impl='explicit'"):
        Encoder(depth=1, num_heads=2, mlp_dim=8, keep_attention=True,
                attention_impl="xla").init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="attention_dropout=0.1 needs"):
        MultiHeadAttention(num_heads=2, attention_dropout=0.1, attention_impl="auto").init(
            jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        MultiHeadAttention(num_heads=2, attention_impl="cuDNN").init(jax.random.key(0), x,
                                                                      train=False)
    out, weights = MultiHeadAttention(num_heads=2, attention_impl="xla").apply(
        MultiHeadAttention(num_heads=2).init(jax.random.key(0), x, train=False), x,
        train=False)
    assert out.shape == (1, 4, 8) and weights is None
