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
after normalisation) rather than with black, as in DeVries & Taylor (2017). The colour ops
(`color_jitter`, `adjust_*`, `pca_lighting` with its default ImageNet values) expect float RGB in
[0, 1], so they go between `images / 255` and the normalisation; `random_resized_crop`, `mixup`
and `cutmix` work on any value range. `mixup`/`cutmix` also change the labels (to soft [B, K]):
pass them as the train step's `mix`.

The same ops run in the host pipeline through `host_batch_fn`, with the key `batch_key(seed, b)`
of global batch b; a jitted step that uses that key draws exactly the same (bitwise on CPU).
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


# --------------------------------------------------------------------------------------------
# Random resized crop (Szegedy et al. 2015, "Going Deeper with Convolutions", Sec. 6; the exact
# sampling rule is torchvision's `RandomResizedCrop`).
# --------------------------------------------------------------------------------------------

_CROP_TRIES = 10  # torchvision's number of tries before the centre-crop fallback


def sample_crop_boxes(key: jax.Array, *, batch: int, height: int, width: int,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """Crop boxes of `random_resized_crop`: int32 [batch, 4] = (top, left, crop_h, crop_w).

    torchvision's rule, per example: draw an area fraction uniformly in `scale` and an aspect
    ratio w/h log-uniformly in `ratio`, round the box's sides to integers; keep the first of 10
    tries whose box fits in the image, at a uniformly random integer position. If none fits, take
    the centre crop of the whole image clamped to the ratio range. The 10 tries are drawn at once
    (vectorised), and the first valid one is picked, which is the same distribution as the loop.
    """
    _check_pair("scale", scale)
    _check_pair("ratio", ratio)
    k_area, k_ratio, k_pos = jax.random.split(key, 3)
    area = float(height * width)
    fraction = jax.random.uniform(k_area, (batch, _CROP_TRIES), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(k_ratio, (batch, _CROP_TRIES), minval=float(np.log(ratio[0])),
                                   maxval=float(np.log(ratio[1])))
    aspect = jnp.exp(log_ratio)
    # jnp.round rounds half to even, like Python's round() in torchvision.
    w = jnp.round(jnp.sqrt(area * fraction * aspect)).astype(jnp.int32)  # [B, T]
    h = jnp.round(jnp.sqrt(area * fraction / aspect)).astype(jnp.int32)  # [B, T]
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, T]
    first = jnp.argmax(fits, axis=1)  # index of the first valid try (0 if none)
    found = jnp.any(fits, axis=1)  # [B]
    h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
    # The fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_h, fb_w = height, int(round(height * max(ratio)))
    else:
        fb_h, fb_w = height, width
    h = jnp.where(found, h, fb_h)
    w = jnp.where(found, w, fb_w)
    # torchvision's randint(0, H - h + 1): floor of a uniform draw over the H - h + 1 positions.
    u = jax.random.uniform(k_pos, (batch, 2))
    top = jnp.minimum(jnp.floor(u[:, 0] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum(jnp.floor(u[:, 1] * (width - w + 1)).astype(jnp.int32), width - w)
    top = jnp.where(found, top, (height - fb_h) // 2)
    left = jnp.where(found, left, (width - fb_w) // 2)
    return jnp.stack([top, left, h, w], axis=1)


def _check_pair(name: str, pair) -> None:
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ValueError(f"{name} must be a pair (low, high) with 0 < low <= high, got {pair!r}")


def _bilinear_taps(in_size: int, out_size: int, start: jax.Array,
                   length: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bilinear resize of the window [start, start + length) of one axis to out_size samples,
    as a few taps per output sample: (index int32 [out_size, taps], weight float32 [out_size,
    taps]); output o is `sum_t weight[o, t] * x[index[o, t]]`. start, length: int scalars.

    The filter is the triangle, widened by the downscaling factor when shrinking (the
    antialiasing of PIL's and `jax.image.resize`'s "linear"), renormalised inside the window, so
    it equals resizing the cropped image alone. Output o samples the crop at
    `(o + 0.5) * step - 0.5` (half-pixel centres), step = length / out_size input pixels per
    output pixel, and the filter reaches `support = max(step, 1)` pixels either side.

    Only the pixels strictly inside (sample - support, sample + support) can get a nonzero
    weight: at most ceil(2 support) consecutive ones, so `taps` = that count for the widest
    window (the whole axis), a static shape, and the work scales with the output, not the image.
    (A weight for every pixel of the axis, [out_size, in_size], the straightforward form and
    tests/test_augment_more.py's reference, made random_resized_crop ~6x slower per core than
    PIL's crop and resize at ImageNet shapes: docs/benchmarks.md, benchmarks/input_pipeline.py.)
    The first tap is the lowest such pixel, found with the very float32 formula that weighs it:
    floor(sample - support), moved up one where its weight rounds to 0; ceil(2 support) taps
    from there reach the highest. So float rounding never drops a pixel that the whole-image
    form weights (the test checks every window of small axes), and no tap is spare. Taps
    outside the window get weight 0; their indices are clamped, so every read is in bounds.
    """
    taps = int(np.ceil(2.0 * max(in_size / out_size, 1.0)))
    step = length.astype(jnp.float32) / out_size
    sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step - 0.5  # [out], crop coords

    def triangle(pos, centre):  # float32 weights before the window and the normalisation
        return jnp.maximum(0.0, 1.0 - jnp.abs(centre - pos.astype(jnp.float32))
                           / jnp.maximum(step, 1.0))

    below = jnp.floor(sample - jnp.maximum(step, 1.0)).astype(jnp.int32)  # [out]
    # floor(fl(sample - support)) is the lowest pixel inside, or the one just below it.
    first = below + (triangle(below, sample) == 0.0).astype(jnp.int32)
    pos = first[:, None] + jnp.arange(taps, dtype=jnp.int32)[None, :]  # [out, taps], crop coords
    weight = triangle(pos, sample[:, None])
    weight = jnp.where((pos >= 0) & (pos < length), weight, 0.0)
    weight = weight / jnp.sum(weight, axis=1, keepdims=True)
    index = jnp.clip(start + pos, 0, in_size - 1)
    return index, weight


_CROP_CHUNK = 8  # images per iteration of crop_resize's loop


def crop_resize(images: jax.Array, boxes: jax.Array, *, size) -> jax.Array:
    """Cuts one box out of each image and resizes it bilinearly (antialiased) to `size`.

    images: [B, H, W, C], uint8 or float, any value range; boxes: int [B, 4] = (top, left,
    crop_h, crop_w), each inside its image with sides >= 1 (as `sample_crop_boxes` draws them;
    traced values cannot be checked here). size: int or (height, width). Returns float32
    [B, size_h, size_w, C], not rounded, equal (to float32 round-off) to PIL's
    `Image.resize(size, BILINEAR, box=(left, top, left + crop_w, top + crop_h))` of each image
    in float ("F") mode, and to `jax.image.resize(crop, ..., "linear", antialias=True)`.

    Separable: columns, then rows, each output sample a weighted sum of a few input pixels
    (`_bilinear_taps`). Work: about H * out_w * taps * C + out_h * out_w * taps * C per image
    (taps = ceil(2 max(in / out, 1))), whatever the box. Static shapes, jit- and vmap-able.
    """
    if images.ndim != 4:
        raise ValueError(f"crop_resize: images must be [B, H, W, C], got shape {images.shape}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"crop_resize: boxes must be [B, 4] = (top, left, h, w) for "
                         f"{images.shape[0]} images, got shape {boxes.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    _, h, w, _ = images.shape

    def one(image, box):  # [H, W, C], [4] -> [out_h, out_w, C]
        iy, wy = _bilinear_taps(h, out_h, box[0], box[2])  # [out_h, taps_y]
        ix, wx = _bilinear_taps(w, out_w, box[1], box[3])  # [out_w, taps_x]
        # Columns first (PIL's order too), then rows; each pass a sum over the static taps of
        # a gather times its weight, which XLA fuses into one loop over the output (no
        # [.., taps, ..] intermediate, no dot: on an accelerator elementwise float32 needs no
        # precision flag, unlike a matmul's TF32). Rows first measured ~3x slower on XLA:CPU
        # (375x500 -> 224, batch 32, one thread: 87-91 ms against 25-30 ms): its fused loop ran
        # in a transposed, cache-unfriendly order.
        cols = sum(wx[None, :, t, None] * image[:, ix[:, t]].astype(jnp.float32)
                   for t in range(ix.shape[1]))  # [H, out_w, C]
        return sum(wy[:, t, None, None] * cols[iy[:, t]]
                   for t in range(iy.shape[1]))  # [out_h, out_w, C]

    # A loop over chunks of _CROP_CHUNK images (vmapped inside), not one vmap over the batch:
    # a loop's output is materialised. As one fused expression, XLA:CPU fused the ~20 gathers
    # per output value into consumers that read a value more than once, and recomputed them
    # per read: `random_flip` (a `where` over the image and its mirror) after it measured 14x
    # slower, `color_jitter` 1.5x (batch 16 at 375x500 -> 224, one thread). A batch of at most
    # _CROP_CHUNK images is one iteration, which XLA inlines, so tiny batches still fuse.
    return jax.lax.map(lambda args: one(*args), (images, boxes), batch_size=_CROP_CHUNK)


def random_resized_crop(images: jax.Array, *, key: jax.Array, size,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """A random box per image (`sample_crop_boxes`), resized bilinearly to `size` (`crop_resize`).

    images: [B, H, W, C], uint8 or float, any value range (the resize is a convex combination of
    pixels, so [0, 255], [0, 1] and normalised images all work). size: int or (height, width).
    Returns float32 [B, size_h, size_w, C], not rounded. The "Inception" augmentation of Szegedy
    et al. 2015 as torchvision implements it; the resize equals `jax.image.resize(crop, ...,
    "linear", antialias=True)` of each crop (PIL-like antialiased bilinear). With
    `scale=(1, 1), ratio=(1, 1)` on square images and `size` = the image size it is the identity.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    b, h, w, _ = images.shape
    boxes = sample_crop_boxes(key, batch=b, height=h, width=w, scale=scale, ratio=ratio)
    return crop_resize(images, boxes, size=size)


# --------------------------------------------------------------------------------------------
# Colour jitter, defined as PIL's ImageEnhance (Haeberli & Voorhies, "Image Processing by
# Interpolation and Extrapolation", 1994): blend the image with a "degenerate" image,
# `out = degenerate + factor * (image - degenerate)`, clipped. On float images in [0, 1], before
# `normalize`. They match PIL to within one grey level: PIL rounds its intermediate grey image to
# uint8 and truncates its result, these stay in float.
# --------------------------------------------------------------------------------------------

# ITU-R 601-2 luma, PIL's "L" conversion (PIL uses these in 16-bit fixed point).
_LUMA = (0.299, 0.587, 0.114)


def _check_float(images: jax.Array, name: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} expects RGB images [B, H, W, 3], got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name} expects float images in [0, 1] (before normalize), got dtype "
                         f"{images.dtype}; convert with images / 255 first")


def _blend(degenerate: jax.Array, images: jax.Array, factor: jax.Array) -> jax.Array:
    factor = jnp.asarray(factor, images.dtype).reshape(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
    return jnp.clip(degenerate + factor * (images - degenerate), 0.0, 1.0)


def grayscale(images: jax.Array) -> jax.Array:
    """float RGB [B, H, W, 3] -> [B, H, W, 1], luma 0.299 R + 0.587 G + 0.114 B (PIL's "L")."""
    p = images * jnp.asarray(_LUMA, images.dtype).reshape(1, 1, 1, 3)
    # Three slices added, not `jnp.sum(..., axis=-1)`: XLA:CPU hands a reduction over a
    # size-3 minor axis to a slow library routine (15 ms against 0.2 ms for 16 x 224 x 224
    # images, measured here), which made `color_jitter` cost more than decoding the JPEG.
    return p[..., 0:1] + p[..., 1:2] + p[..., 2:3]


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's `ImageEnhance.Brightness`: blend with black, `clip(factor * x, 0, 1)`.

    images: float [B, H, W, 3] in [0, 1]; factor: [B] or a scalar (0 = black, 1 = unchanged).
    """
    _check_float(images, "adjust_brightness")
    return _blend(jnp.zeros((), images.dtype), images, factor)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's `ImageEnhance.Contrast`: blend with a uniform grey at the MEAN LUMA of each image.

    images: float [B, H, W, 3] in [0, 1]; factor: [B] (0 = flat grey, 1 = unchanged).
    The grey level is the mean of the greyscale image (one number per image, the same for the
    three channels), rounded to the nearest of the 256 levels as PIL does
    (`int(mean + 0.5)`). Not the per-channel mean, and not the per-pixel grey: both have shipped
    as "contrast" and differ visibly from PIL (tests/test_augment_more.py checks they fail).
    """
    _check_float(images, "adjust_contrast")
    mean = jnp.mean(grayscale(images), axis=(1, 2, 3), keepdims=True)  # [B, 1, 1, 1]
    mean = jnp.floor(mean * 255.0 + 0.5) / 255.0
    return _blend(mean, images, factor)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's `ImageEnhance.Color`: blend with the image's own greyscale (per pixel).

    images: float [B, H, W, 3] in [0, 1]; factor: [B] (0 = greyscale, 1 = unchanged).
    """
    _check_float(images, "adjust_saturation")
    return _blend(grayscale(images), images, factor)


def color_jitter(images: jax.Array, *, key: jax.Array, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4) -> jax.Array:
    """torchvision's `ColorJitter` without hue: brightness, contrast and saturation factors drawn
    uniformly in [max(0, 1 - s), 1 + s] per image, the three applied in a random order per image
    (as torchvision does for each image). s = 0 leaves that property unchanged.

    images: float [B, H, W, 3] in [0, 1] (before `normalize`) -> same, clipped to [0, 1].
    """
    _check_float(images, "color_jitter")
    for name, s in (("brightness", brightness), ("contrast", contrast),
                    ("saturation", saturation)):
        if s < 0:
            raise ValueError(f"{name} must be >= 0, got {s}")
    b = images.shape[0]
    k_b, k_c, k_s, k_order = jax.random.split(key, 4)

    def draw(k, s):
        return jax.random.uniform(k, (b,), minval=max(0.0, 1.0 - s), maxval=1.0 + s)

    ops = (lambda x: adjust_brightness(x, draw(k_b, brightness)),
           lambda x: adjust_contrast(x, draw(k_c, contrast)),
           lambda x: adjust_saturation(x, draw(k_s, saturation)))
    # A random permutation of (0, 1, 2) per image: argsort of uniform noise.
    order = jnp.argsort(jax.random.uniform(k_order, (b, 3)), axis=1)  # [B, 3]
    x = images
    for slot in range(3):
        # All three ops run on the whole batch and each image keeps the one its order names:
        # elementwise work, cheap next to the network, and no per-image control flow.
        which = order[:, slot].reshape(-1, 1, 1, 1)
        x = jnp.where(which == 0, ops[0](x), jnp.where(which == 1, ops[1](x), ops[2](x)))
    return x


# --------------------------------------------------------------------------------------------
# PCA lighting noise (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional
# Neural Networks", Sec. 4.1).
# --------------------------------------------------------------------------------------------

# The ImageNet RGB eigenvalues and eigenvectors (columns) used with images in [0, 1] RGB by
# fb.resnet.torch's `Lighting` transform (datasets/imagenet.lua), and copied from there into the
# PyTorch and JAX ImageNet examples: the de-facto values of AlexNet's "fancy PCA" noise.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


def pca_lighting(images: jax.Array, *, key: jax.Array, std: float = 0.1,
                 eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC) -> jax.Array:
    """AlexNet's lighting noise: adds `eigvec @ (alpha * eigval)` to every pixel of an image, with
    `alpha ~ N(0, std^2)` [3] drawn per image (std 0.1 in the paper).

    images: float RGB [B, H, W, 3] in the units eigval/eigvec were computed in: the defaults are
    ImageNet's for [0, 1] RGB (before `normalize`); use `pca_components` for another data set.
    eigval: [3]; eigvec: [3, 3], eigenvectors as columns. Not clipped (AlexNet and fb.resnet.torch
    do not clip). Returns [B, H, W, 3].
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pca_lighting expects RGB images [B, H, W, 3], got {images.shape}")
    eigval = jnp.asarray(eigval, jnp.float32)
    eigvec = jnp.asarray(eigvec, jnp.float32)
    if eigval.shape != (3,) or eigvec.shape != (3, 3):
        raise ValueError(f"eigval must be [3] and eigvec [3, 3], got {eigval.shape} and "
                         f"{eigvec.shape}")
    alpha = std * jax.random.normal(key, (images.shape[0], 3))  # [B, 3]
    # offset[b, i] = sum_j eigvec[i, j] * alpha[b, j] * eigval[j]
    offset = jnp.einsum("ij,bj->bi", eigvec, alpha * eigval[None, :],
                        precision=jax.lax.Precision.HIGHEST)  # [B, 3]
    x = images.astype(jnp.float32)
    return x + offset[:, None, None, :]


def pca_components(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the RGB covariance of uint8 [N, H, W, 3] images in [0, 1] units.

    Returns (eigval [3] descending, eigvec [3, 3] with matching eigenvectors as columns), float32,
    ready for `pca_lighting`. Accumulated in float64 over chunks, like `channel_stats`.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pca_components expects RGB images [N, H, W, 3], got {images.shape}")
    total = np.zeros(3)
    outer = np.zeros((3, 3))
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(axis=0)
        outer += x.T @ x
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    return eigval[::-1].astype(np.float32), eigvec[:, ::-1].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Mixup and CutMix: mix each example with a partner from a permutation of the batch; the labels
# become soft [B, K] and need a cross-entropy that takes probabilities.
# --------------------------------------------------------------------------------------------

def _mix_setup(images, labels, key, alpha, num_classes, name):
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"{name} expects images [B, H, W, C] and int labels [B], got "
                         f"{images.shape} and {labels.shape}")
    # alpha may be a traced scalar (e.g. annealed); only a concrete number can be checked here.
    if isinstance(alpha, (int, float)) and not alpha > 0:
        raise ValueError(f"{name}: alpha must be > 0 (leave the op out for no mixing), got {alpha}")
    k_lam, k_perm = jax.random.split(key)
    b = images.shape[0]
    lam = jax.random.beta(k_lam, alpha, alpha, (b,))  # [B]
    perm = jax.random.permutation(k_perm, b)  # partner of example i is perm[i]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [B, K]
    return lam, perm, onehot


def mixup(images: jax.Array, labels: jax.Array, *, key: jax.Array, alpha: float,
          num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization".

    `x_i <- lam_i x_i + (1 - lam_i) x_perm(i)`, `y_i <- lam_i onehot(y_i) + (1 - lam_i)
    onehot(y_perm(i))`, lam_i ~ Beta(alpha, alpha) drawn per example (the paper's reference code
    draws one per batch; per example is the same pairwise rule with less variance, timm's "elem"
    mode), perm a random permutation of the batch.

    images: [B, H, W, C] (float, normalised or not; uint8 is cast to float32); labels: int [B].
    Returns (float32 images [B, H, W, C], soft labels float32 [B, num_classes], rows summing to 1).
    alpha: > 0 (a Python number is checked; a traced scalar is not). Rows with mask 0 (padding)
    should not be in training batches (drop_remainder=True).
    """
    lam, perm, onehot = _mix_setup(images, labels, key, alpha, num_classes, "mixup")
    x = images.astype(jnp.float32)
    lam_x = lam.reshape(-1, 1, 1, 1)
    mixed = lam_x * x + (1.0 - lam_x) * x[perm]
    soft = lam[:, None] * onehot + (1.0 - lam[:, None]) * onehot[perm]
    return mixed, soft


def cutmix(images: jax.Array, labels: jax.Array, *, key: jax.Array, alpha: float,
           num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features".

    Per example: lam ~ Beta(alpha, alpha); a box of sides (H sqrt(1 - lam), W sqrt(1 - lam))
    (truncated to integers, as the reference code does) centred at a uniformly random pixel and
    clipped at the borders is pasted from the partner perm(i). The label weight is then
    recomputed from the clipped box (as in the paper's code): 1 - box area / (H W), so it equals
    the fraction of the image's own pixels exactly.

    images: [B, H, W, C] (uint8 is cast to float32); labels: int [B].
    Returns (float32 images [B, H, W, C], soft labels float32 [B, num_classes], rows summing to 1).
    """
    lam, perm, onehot = _mix_setup(images, labels, key, alpha, num_classes, "cutmix")
    b, h, w, _ = images.shape
    k_y, k_x = jax.random.split(jax.random.fold_in(key, 1))
    cut = jnp.sqrt(1.0 - lam)  # [B]
    cut_h = jnp.floor(h * cut).astype(jnp.int32)
    cut_w = jnp.floor(w * cut).astype(jnp.int32)
    cy = jax.random.randint(k_y, (b,), 0, h)
    cx = jax.random.randint(k_x, (b,), 0, w)
    y0 = jnp.clip(cy - cut_h // 2, 0, h)
    y1 = jnp.clip(cy + cut_h // 2, 0, h)
    x0 = jnp.clip(cx - cut_w // 2, 0, w)
    x1 = jnp.clip(cx + cut_w // 2, 0, w)
    ys = jnp.arange(h)[None, :, None]
    xs = jnp.arange(w)[None, None, :]
    inside = ((ys >= y0.reshape(-1, 1, 1)) & (ys < y1.reshape(-1, 1, 1))
              & (xs >= x0.reshape(-1, 1, 1)) & (xs < x1.reshape(-1, 1, 1)))  # [B, H, W]
    x = images.astype(jnp.float32)
    mixed = jnp.where(inside[..., None], x[perm], x)
    own = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)  # [B]
    soft = own[:, None] * onehot + (1.0 - own[:, None]) * onehot[perm]
    return mixed, soft


# --------------------------------------------------------------------------------------------
# The same ops in the host pipeline.
# --------------------------------------------------------------------------------------------

def batch_key(seed: int, batch_index) -> jax.Array:
    """The augmentation key of global batch `batch_index`: `fold_in(PRNGKey(seed), b)`.

    Use this same key in the jitted step (e.g. `batch_key(seed, state["step"])` when batch b is
    consumed at step b) and the device path draws exactly what `host_batch_fn` draws.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), batch_index)


def host_batch_fn(fn, *, seed: int):
    """Runs a batch augmentation on the host CPU: returns `apply(batch, batch_index) -> batch`.

    fn: `fn(batch: dict of arrays, *, key) -> dict of arrays`, e.g.
        `lambda batch, *, key: {**batch, "image": color_jitter(batch["image"] / 255, key=key)}`.
    `apply` takes a dict of numpy arrays (a `HostLoader.local_batch`) and the global batch index
    b, runs `jax.jit(fn)` on the CPU backend with key `batch_key(seed, b)`, and returns numpy.
    Calling `fn` inside a jitted step with the same key gives bitwise the same result on CPU
    (the same XLA program), and the same draws on any backend (jax.random is backend-independent;
    float rounding may differ by an ulp on accelerators). The batch index is a traced argument,
    so `apply` compiles once per batch shape.

    With several processes each holds only its rows of batch b; per-example draws depend on the
    row, so host == device holds for the whole global batch only when process_count == 1.
    """
    cpu = jax.devices("cpu")[0]

    @jax.jit
    def run(batch, b):
        return fn(batch, key=batch_key(seed, b))

    def apply(batch: dict, batch_index: int) -> dict:
        on_cpu = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, cpu)
        index = jax.device_put(np.uint32(batch_index), cpu)
        return {k: np.asarray(v) for k, v in run(on_cpu, index).items()}

    return apply
