"""Preprocessing and augmentation: small batched functions of `images: [B, H, W, C]` that run
inside the jitted train step, on the device, with `jax.random` keys.

Each random op draws independent choices per example from one key. Compose them in plain Python
in the experiment (big_vision's op granularity, without the string language):

    def preprocess(images, *, key, train):          # uint8 [B, H, W, C] -> float32
        x = augment.normalize(images, mean=MEAN, std=STD)
        if train:
            k_crop, k_flip = jax.random.split(key)
            x = augment.random_crop(x, key=k_crop, padding=4)
            x = augment.random_flip(x, key=k_flip)
        return x

Normalise first, then pad and cut out: padding and cutout then fill with the data set's mean (0
after normalisation) rather than with black, as in DeVries & Taylor (2017).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalize(images: jax.Array, *, mean, std) -> jax.Array:
    """uint8 (or [0, 255] float) [B, H, W, C] -> float32 `(images / 255 - mean) / std`.

    mean, std: per-channel `[C]`, or a mean image `[H, W, C]` (CS231n's mean-image subtraction;
    then pass `std=1.0`), in [0, 1] units (see `channel_stats`, `mean_image`).
    """
    x = images.astype(jnp.float32) / 255.0
    return (x - _lead(mean, x.ndim)) / _lead(std, x.ndim)


def _lead(value, ndim: int) -> jax.Array:
    """`value` with leading unit axes up to `ndim`: explicit broadcasting ([C] -> [1, 1, 1, C])."""
    value = jnp.asarray(value, jnp.float32)
    return value.reshape((1,) * (ndim - value.ndim) + value.shape)


def random_flip(images: jax.Array, *, key: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2. [B, H, W, C] -> same."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_crop(images: jax.Array, *, key: jax.Array, padding: int,
                pad_mode: str = "constant") -> jax.Array:
    """Pads by `padding` on each side, then crops back to H x W at a random offset per image.

    [B, H, W, C] -> same shape. pad_mode: "constant" (zeros: the mean after `normalize`) or
    "reflect". The standard CIFAR augmentation (He et al. 2016, padding 4).
    """
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     mode=pad_mode)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def cutout(images: jax.Array, *, key: jax.Array, size: int) -> jax.Array:
    """Zeroes one `size` x `size` square per image at a uniformly random centre (the square is
    clipped at the borders), as in DeVries & Taylor, "Improved Regularization of Convolutional
    Neural Networks with Cutout" (2017). [B, H, W, C] -> same.
    """
    b, h, w, _ = images.shape
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (b, 1, 1), 0, h)
    cx = jax.random.randint(kx, (b, 1, 1), 0, w)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    lo = size // 2
    inside = (ys >= cy - lo) & (ys < cy - lo + size) & (xs >= cx - lo) & (xs < cx - lo + size)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 [N, H, W, C] images, in [0, 1] units: ([C], [C]).

    Accumulated in float64 over chunks, so 50,000 CIFAR images need no float copy of the set.
    """
    c = images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].astype(np.float64) / 255.0
        total += x.sum(axis=(0, 1, 2))
        total_sq += (x * x).sum(axis=(0, 1, 2))
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    return mean.astype(np.float32), np.sqrt(total_sq / n - mean**2).astype(np.float32)


def mean_image(images: np.ndarray) -> np.ndarray:
    """The mean image of uint8 [N, H, W, C] images in [0, 1] units: float32 [H, W, C]."""
    return (images.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)
