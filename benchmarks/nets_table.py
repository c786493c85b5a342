"""Parameters and FLOPs per image of every net variant, as a table (and docs/nets.md).

    python -m benchmarks.nets_table              # print the table
    python -m benchmarks.nets_table --write      # also rewrite docs/nets.md

Nothing is compiled or allocated: parameter counts come from `jax.eval_shape(init)`, FLOPs from
XLA's cost analysis of the lowered (not compiled) eval-mode forward pass at batch 1. XLA counts a
multiply-add as 2 FLOPs; papers often quote multiply-adds ("ResNet-50: 4.1 GFLOPs" is 4.1 G
multiply-adds, 8.2 GFLOPs here). About a minute on 2 CPU cores for every variant.
"""
from __future__ import annotations

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

NETS = pathlib.Path(__file__).resolve().parents[1] / "jaxvision" / "nets"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "nets.md"


def variant_rows():
    """(family, name, input shape, classes, params, published params, GFLOPs) per variant."""
    for path in sorted(NETS.glob("*.py")):
        module = importlib.import_module(f"jaxvision.nets.{path.stem}")
        variants = getattr(module, "VARIANTS", None)
        if not variants:
            continue
        published = getattr(module, "PUBLISHED_PARAMS", {})
        shapes = getattr(module, "INPUT_SHAPES", {})
        classes = getattr(module, "NUM_CLASSES", {})
        for name, make in variants.items():
            shape = tuple(shapes.get(name, (224, 224, 3)))
            model = make(num_classes=classes.get(name, 1000))
            x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
            variables = jax.eval_shape(
                lambda x, m=model: m.init({"params": jax.random.PRNGKey(0),
                                           "dropout": jax.random.PRNGKey(0)}, x, train=False), x)
            params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
            lowered = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False)).lower(variables, x)
            cost = lowered.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            yield (path.stem, name, shape, classes.get(name, 1000), params,
                   published.get(name), cost.get("flops", float("nan")) / 1e9)


def table(rows) -> str:
    lines = ["| family | variant | input | classes | params | published | GFLOPs / image |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for family, name, shape, classes, params, published, gflops in rows:
        pub = f"{published:,}" if published else "—"
        lines.append(f"| {family} | {name} | {'x'.join(map(str, shape))} | {classes} | "
                     f"{params:,} | {pub} | {gflops:.3f} |")
    return "\n".join(lines)


def main(argv):
    text = table(list(variant_rows()))
    print(text)
    if "--write" in argv:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(
            "# Nets: parameters and FLOPs\n\n"
            "Made by `python -m benchmarks.nets_table --write` (jax "
            f"{jax.__version__}). FLOPs: XLA's count for one image's eval-mode forward pass, a "
            "multiply-add counted as 2. `published` is the reference count each net's file "
            "cites (its test checks it).\n\n" + text + "\n")
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
