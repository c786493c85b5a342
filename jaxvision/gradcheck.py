"""A numeric gradient checker for any function of pytrees (CS231n's `eval_numerical_gradient`,
generalised).

    errors = gradcheck.check(loss, params)              # analytic = jax.grad(loss)
    errors = gradcheck.check(loss, params, analytic=my_grads, num_samples=20)
    assert max(errors.values()) < 1e-6                   # in float64

Centred differences `(f(x + h e_i) - f(x - h e_i)) / 2h`, whose error is O(h^2) (a one-sided
difference is O(h)); the relative error per coordinate is `|a - n| / max(|a| + |n|, tiny)` as in
the course's notes (so an error of 1e-7 means seven matching digits whatever the scale). Big
leaves are checked on `num_samples` coordinates drawn without replacement, the course's
`grad_check_sparse`. Run checks in float64 (`with jax.enable_x64(True):` and float64 inputs): in
float32 centred differences cannot get below ~1e-3 relative error.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def relative_error(a, b, *, tiny: float = 1e-12) -> np.ndarray:
    """Elementwise `|a - b| / max(|a| + |b|, tiny)` (the course's measure), as a numpy array."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), tiny)


def _scalar(f: Callable, cotangent: PyTree | None) -> Callable:
    """f itself if it returns a scalar, else `x -> <f(x), cotangent>` (a vector-Jacobian probe)."""
    if cotangent is None:
        return f

    def g(tree):
        out = f(tree)
        return sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(out),
                                                  jax.tree.leaves(cotangent)))
    return g


def numeric_grad(f: Callable, tree: PyTree, *, cotangent: PyTree | None = None,
                 eps: float = 1e-6, num_samples: int | None = None, seed: int = 0
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Centred-difference derivatives of `f` at `tree`.

    Args:
      f: `tree -> scalar`, or `tree -> array(s)` together with `cotangent` (then the derivative is
        that of `<f(tree), cotangent>`, i.e. the vector-Jacobian product the backward computes).
      tree: the point; any pytree of float arrays (use float64).
      eps: the step h.
      num_samples: per leaf, how many flat coordinates to probe (None: all of them).
      seed: picks the sampled coordinates.

    Returns:
      {leaf path: (flat indices (k,), derivatives (k,))}.
    """
    g = jax.jit(_scalar(f, cotangent))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    values = [np.array(v) for _, v in leaves]
    rng = np.random.default_rng(seed)
    out = {}
    for i, (path, _) in enumerate(leaves):
        size = values[i].size
        if num_samples is None or num_samples >= size:
            idx = np.arange(size)
        else:
            idx = np.sort(rng.choice(size, num_samples, replace=False))
        derivs = np.empty(len(idx), np.float64)
        for j, flat in enumerate(idx):
            probe = list(values)
            plus, minus = values[i].copy(), values[i].copy()
            plus.flat[flat] += eps
            minus.flat[flat] -= eps
            probe[i] = plus
            f_plus = float(g(jax.tree.unflatten(treedef, probe)))
            probe[i] = minus
            f_minus = float(g(jax.tree.unflatten(treedef, probe)))
            derivs[j] = (f_plus - f_minus) / (2 * eps)
        out[_path_str(path)] = (idx, derivs)
    return out


def check(f: Callable, tree: PyTree, *, analytic: PyTree | None = None,
          cotangent: PyTree | None = None, eps: float = 1e-6, num_samples: int | None = None,
          seed: int = 0) -> dict[str, float]:
    """The largest relative error per leaf between an analytic gradient and centred differences.

    Args:
      f, tree, cotangent, eps, num_samples, seed: as for `numeric_grad`.
      analytic: the gradient to check, a pytree shaped like `tree` (default: `jax.grad` of `f`,
        or of `<f, cotangent>`; with `jax.custom_vjp` layers that is the hand-written backward).

    Returns:
      {leaf path: max relative error over the probed coordinates}.
    """
    if analytic is None:
        analytic = jax.grad(_scalar(f, cotangent))(tree)
    numeric = numeric_grad(f, tree, cotangent=cotangent, eps=eps, num_samples=num_samples,
                           seed=seed)
    flat_analytic = {_path_str(p): np.asarray(v)
                     for p, v in jax.tree_util.tree_flatten_with_path(analytic)[0]}
    if flat_analytic.keys() != numeric.keys():
        raise ValueError(f"analytic gradient has leaves {sorted(flat_analytic)}, the point has "
                         f"{sorted(numeric)}")
    errors = {}
    for path, (idx, derivs) in numeric.items():
        a = flat_analytic[path].reshape(-1)[idx]
        errors[path] = float(relative_error(a, derivs).max()) if len(idx) else 0.0
    return errors
