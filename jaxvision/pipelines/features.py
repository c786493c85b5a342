"""Hand-designed image features (CS231n's "image features" assignment): a histogram of oriented
gradients (texture and shape) and a hue histogram (colour), computed in jax for a whole batch.

    feats = features.extract(images, [features.hog, features.hue_histogram])  # [N, 144 + 10]

Input images are `[N, H, W, 3]`, uint8 in [0, 255] or float in [0, 1] (a float input's range is
not checked: values outside [0, 1] simply give other numbers). uint8 input is computed in float32;
float input keeps its dtype (float64 in the tests). Each feature function is jitted once per
input shape and works on the whole batch at once; `extract` runs a big array through them in
fixed-size chunks (one compilation, bounded memory) with a progress bar.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

__all__ = ["extract", "greyscale", "hog", "hue_histogram", "rgb_to_hue"]

# ITU-R BT.601 luma weights: the usual RGB -> grey conversion (the course's `rgb2gray` uses them).
_LUMA = (0.299, 0.587, 0.114)
# Below this many chunks a progress bar is noise.
_PROGRESS_MIN_CHUNKS = 3


def _as_float_images(images, *, name: str, channels: Sequence[int] = (3,)) -> jax.Array:
    """Checks `images: [N, H, W, C]` and returns it as float in [0, 1] (uint8 -> float32 / 255)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in channels:
        want = " or ".join(str(c) for c in channels)
        raise ValueError(f"{name}: images must be [N, H, W, {want}] (NHWC), got shape "
                         f"{tuple(images.shape)}")
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name}: images must be uint8 in [0, 255] or float in [0, 1], got "
                         f"dtype {images.dtype}")
    return images


def greyscale(images) -> jax.Array:
    """Luma of RGB images: [N, H, W, 3] (uint8 or float) -> float [N, H, W] in [0, 1].

    A one-channel input `[N, H, W, 1]` is taken as already grey.
    """
    x = _as_float_images(images, name="greyscale", channels=(1, 3))
    if x.shape[-1] == 1:
        return x[..., 0]
    weights = jnp.asarray(_LUMA, x.dtype).reshape(1, 1, 1, 3)
    return (x * weights).sum(axis=-1)  # (N, H, W, 3) -> (N, H, W)


# ---------------------------------------------------------------------------------------------
# Histogram of oriented gradients.


def hog(images, *, cell: int = 8, bins: int = 9) -> jax.Array:
    """Histogram of oriented gradients, the course's simplified form of Dalal & Triggs (2005).

    images: [N, H, W, 3] (or [N, H, W, 1], grey) uint8 or float in [0, 1].
    Returns float [N, (H // cell) * (W // cell) * bins], laid out as [N, cell row, cell column,
    bin] flattened: 144 features for a 32x32 image with the defaults.

    Steps, per image:
    1. Greyscale (`greyscale`: BT.601 luma), in [0, 1].
    2. Gradients by centred differences, Dalal & Triggs' [-1, 0, 1] mask (their best, better than
       Sobel or smoothing first): gx[i, j] = I[i, j+1] - I[i, j-1], gy[i, j] = I[i+1, j] -
       I[i-1, j], with the border pixels repeated (so a constant image has no gradient anywhere;
       at a border this is the one-sided difference). Rows run downwards (image coordinates).
    3. Magnitude sqrt(gx^2 + gy^2) and *unsigned* orientation atan2(gy, gx) folded into
       [0, 180) degrees (Dalal & Triggs: unsigned works better for people, whose clothes' colours
       make the sign arbitrary). This is the gradient's direction, so a vertical edge (intensity
       changing along x) has orientation 0 and a horizontal edge 90.
    4. Hard binning: bin k covers [k, k+1) * 180 / bins degrees (no interpolation between bins or
       cells, as in the course); a pixel adds its gradient magnitude to its bin.
    5. Per cell of `cell` x `cell` pixels, the MEAN over the cell's pixels of those magnitudes per
       bin (the course's `uniform_filter` average; the sum would be `cell**2` times larger).
       Rows and columns beyond the last whole cell are ignored.
    No block normalisation (Dalal & Triggs normalise overlapping 2x2-cell blocks for contrast
    invariance; the course leaves it out, and the features are standardised before training).
    """
    if not (isinstance(cell, int) and cell >= 1):
        raise ValueError(f"hog: cell must be a positive int, got {cell!r}")
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"hog: bins must be a positive int, got {bins!r}")
    x = _as_float_images(images, name="hog", channels=(1, 3))
    _, h, w, _ = x.shape
    if h < cell or w < cell:
        raise ValueError(f"hog: images of {h}x{w} pixels are smaller than one cell ({cell}x{cell})")
    return _hog(x, cell=cell, bins=bins)


@functools.partial(jax.jit, static_argnames=("cell", "bins"))
def _hog(x: jax.Array, *, cell: int, bins: int) -> jax.Array:
    grey = greyscale(x)  # (N, H, W)
    n, h, w = grey.shape
    padded = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")  # repeat the border pixels
    gx = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]  # (N, H, W)
    gy = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
    magnitude = jnp.sqrt(gx * gx + gy * gy)
    degrees = jnp.degrees(jnp.arctan2(gy, gx))  # (-180, 180]
    degrees = jnp.mod(degrees, 180.0)  # unsigned: [0, 180]; 180 only by rounding of -tiny
    # The clip catches that rounding (a tiny negative angle is in the first bin's neighbour, the
    # last bin, whichever way one looks at it).
    index = jnp.clip(jnp.floor(degrees * (bins / 180.0)).astype(jnp.int32), 0, bins - 1)
    # Each pixel's magnitude in its bin: (N, H, W, bins). One-hot times magnitude is a dense
    # scatter-add that XLA vectorises (9 bins: small).
    votes = jax.nn.one_hot(index, bins, dtype=x.dtype) * magnitude[..., None]
    hc, wc = h // cell, w // cell
    votes = votes[:, :hc * cell, :wc * cell, :]
    votes = votes.reshape(n, hc, cell, wc, cell, bins)  # (N, cell row, y, cell column, x, bin)
    return votes.mean(axis=(2, 4)).reshape(n, hc * wc * bins)


# ---------------------------------------------------------------------------------------------
# Colour: hue histogram.


def rgb_to_hue(images) -> jax.Array:
    """HSV hue of RGB images: [N, H, W, 3] (uint8 or float in [0, 1]) -> float [N, H, W] in [0, 1).

    The hexcone model (Smith 1978), as Python's `colorsys.rgb_to_hsv` and matplotlib compute it:
    with M = max(r, g, b), d = M - min(r, g, b),
        hue = ((g - b) / d mod 6) / 6   if M == r,
              ((b - r) / d + 2) / 6     elif M == g,
              ((r - g) / d + 4) / 6     else (M == b),
    and hue = 0 for greys (d == 0), as colorsys and matplotlib define it.
    """
    x = _as_float_images(images, name="rgb_to_hue")
    return _rgb_to_hue(x)


@jax.jit
def _rgb_to_hue(x: jax.Array) -> jax.Array:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    top = jnp.maximum(jnp.maximum(r, g), b)
    delta = top - jnp.minimum(jnp.minimum(r, g), b)
    grey = delta == 0
    safe = jnp.where(grey, jnp.ones_like(delta), delta)  # no 0/0 (NaN) even in the unused branch
    sixths = jnp.where(
        top == r, jnp.mod((g - b) / safe, 6.0),
        jnp.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = jnp.where(grey, jnp.zeros_like(sixths), sixths / 6.0)
    # mod 6 of a tiny negative number rounds to exactly 6, i.e. hue 1: that is red, hue 0.
    return jnp.where(hue >= 1.0, jnp.zeros_like(hue), hue)


def hue_histogram(images, *, bins: int = 10, value_range: tuple[float, float] = (0.0, 1.0)
                  ) -> jax.Array:
    """Histogram of each image's HSV hue (`rgb_to_hue`), normalised.

    images: [N, H, W, 3] uint8 or float in [0, 1]. Returns float [N, bins]: the fraction of the
    image's pixels whose hue falls in each of `bins` equal bins over `value_range` (hue is in
    [0, 1)), among the pixels whose hue is in that range (hues outside it are left out, as
    `np.histogram` does). This is the course's `np.histogram(..., density=True)` times the bin
    width; each row sums to 1 (0 when no pixel falls in the range). The last bin includes its
    right edge, like `np.histogram`. Greys (r = g = b, hue 0 by convention) count in the first
    bin, as in the course.
    """
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"hue_histogram: bins must be a positive int, got {bins!r}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"hue_histogram: value_range must be (low, high) with high > low, got "
                         f"{tuple(value_range)}")
    x = _as_float_images(images, name="hue_histogram")
    return _hue_histogram(x, bins=bins, lo=lo, hi=hi)


@functools.partial(jax.jit, static_argnames=("bins", "lo", "hi"))
def _hue_histogram(x: jax.Array, *, bins: int, lo: float, hi: float) -> jax.Array:
    n = x.shape[0]
    hue = _rgb_to_hue(x).reshape(n, -1)  # (N, H*W)
    inside = (hue >= lo) & (hue <= hi)
    index = jnp.clip(jnp.floor((hue - lo) * (bins / (hi - lo))).astype(jnp.int32), 0, bins - 1)
    counts = (jax.nn.one_hot(index, bins, dtype=x.dtype) * inside[..., None]).sum(axis=1)
    total = counts.sum(axis=1, keepdims=True)  # (N, 1)
    return counts / jnp.maximum(total, 1)


# ---------------------------------------------------------------------------------------------
# Many images, several features.


def extract(images, feature_fns: Sequence[Callable[[jax.Array], jax.Array]], *,
            chunk: int = 1000, progress: bool | None = None) -> np.ndarray:
    """Every feature function on every image, concatenated: [N, H, W, C] -> numpy [N, sum F].

    feature_fns: callables `images [n, H, W, C] -> [n, F_k]` (e.g. `hog`,
      `functools.partial(hue_histogram, bins=12)`); their outputs are concatenated in order.
    chunk: images per call. Every call sees exactly `chunk` images (the last chunk is padded
      with copies of its last image and the padding's features dropped), so each jitted function
      compiles once whatever N is, and memory stays bounded (hog's votes are chunk*H*W*bins
      floats). Smaller N: one call with all N.
    progress: a tqdm bar over chunks; None shows it for 3 chunks or more.
    Returns float32 numpy (float64 if the features are float64), rows in input order.
    """
    if not feature_fns:
        raise ValueError("extract: feature_fns is empty")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"extract: chunk must be a positive int, got {chunk!r}")
    shape = np.shape(images)
    if len(shape) != 4:
        raise ValueError(f"extract: images must be [N, H, W, C], got shape {tuple(shape)}")
    n = shape[0]
    if n == 0:
        raise ValueError("extract: no images (N = 0)")
    size = min(chunk, n)
    starts = range(0, n, size)
    show = len(starts) >= _PROGRESS_MIN_CHUNKS if progress is None else progress
    rows = []
    for start in tqdm(starts, desc="features", unit="chunk", disable=not show):
        batch = images[start:start + size]
        real = len(batch)
        if real < size:  # pad to the common shape: no second compilation for the tail
            pad = np.repeat(np.asarray(batch[-1:]), size - real, axis=0)
            batch = np.concatenate([np.asarray(batch), pad])
        parts = []
        for fn in feature_fns:
            out = np.asarray(fn(batch))
            if out.ndim != 2 or out.shape[0] != size:
                raise ValueError(f"extract: feature function {getattr(fn, '__name__', fn)!r} "
                                 f"returned shape {out.shape} for {size} images; expected "
                                 f"[{size}, F]")
            parts.append(out[:real])
        rows.append(np.concatenate(parts, axis=1))
    return np.concatenate(rows)
