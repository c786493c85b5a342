"""Helpers shared by the net tests."""
import jax
import jax.numpy as jnp
import numpy as np


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def fill_variables(shapes, seed: int = 0, gain: float = 1.0):
    """Concrete variables with the tree, shapes and dtypes of `shapes` (from `jax.eval_shape` of
    `init`), drawn with numpy: compiling flax's init RNG costs seconds per net on 2 CPU cores.

    Kernels: normals scaled by gain / sqrt(fan_in) (gain sqrt(2): He); biases and BN offsets
    small normals; BN scales ~1; running means 0 and running variances 1 (positive).
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            value = np.zeros(leaf.shape) if "mean" in name else np.ones(leaf.shape)
        elif len(leaf.shape) > 1:
            value = rng.standard_normal(leaf.shape) * gain / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * rng.standard_normal(leaf.shape) + ("scale" in name)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
