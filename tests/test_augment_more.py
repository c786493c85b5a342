"""Colour jitter against PIL's ImageEnhance on real photographs, random resized crop, PCA
lighting statistics, mixup/cutmix labels, and host pipeline == device for the same seed."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from jaxvision.pipelines import augment, sources

ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz"
FACTORS = (0.3, 0.7, 1.0, 1.5, 2.0)


def sample_photos(size=48) -> np.ndarray:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg; no download), resized small."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR))
                     for p in photos])


def real_images() -> list[tuple[str, np.ndarray]]:
    sets = [("sklearn photos", sample_photos())]
    if ARCHIVE.exists():
        cifar = sources.as_arrays(sources.load(str(ARCHIVE), "test", max_per_class=1)).images
        sets.append(("cifar10 test", np.asarray(cifar, np.uint8)))
    return sets


@pytest.fixture(scope="module")
def image_sets():
    return real_images()


def pil_enhance(images: np.ndarray, enhancer, factor: float) -> np.ndarray:
    return np.stack([np.asarray(enhancer(Image.fromarray(im)).enhance(factor)) for im in images])


def quantise(x) -> np.ndarray:
    # PIL truncates its blended value to an integer; the 1e-3 absorbs float32 noise below an
    # exact integer.
    return np.floor(np.asarray(x, np.float64) * 255.0 + 1e-3).astype(np.int64)


OURS = {"brightness": (augment.adjust_brightness, ImageEnhance.Brightness),
        "contrast": (augment.adjust_contrast, ImageEnhance.Contrast),
        "saturation": (augment.adjust_saturation, ImageEnhance.Color)}


@pytest.mark.parametrize("op", sorted(OURS))
def test_colour_ops_match_pil_on_real_images(op, image_sets):
    ours, enhancer = OURS[op]
    jitted = jax.jit(ours)
    for name, images in image_sets:
        x = jnp.asarray(images, jnp.float32) / 255.0
        for factor in FACTORS:
            got = quantise(jitted(x, jnp.full((len(images),), factor)))
            want = pil_enhance(images, enhancer, factor).astype(np.int64)
            diff = np.abs(got - want).max()
            # Brightness blends with black: nothing is rounded in between, so it is exact.
            # Contrast (the rounded mean) and saturation (per-pixel grey) differ from PIL only by
            # PIL's rounding of its intermediate grey image to uint8: at most one level.
            tolerance = 0 if op == "brightness" else 1
            assert diff <= tolerance, f"{op} {factor} on {name}: {diff} grey levels from PIL"


def wrong_contrast_per_channel(x, factor):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, 3]: a per-channel mean
    return jnp.clip(mean + factor.reshape(-1, 1, 1, 1) * (x - mean), 0, 1)


def wrong_contrast_per_pixel(x, factor):
    grey = augment.grayscale(x)  # per-pixel grey instead of its mean
    return jnp.clip(grey + factor.reshape(-1, 1, 1, 1) * (x - grey), 0, 1)


@pytest.mark.parametrize("wrong", [wrong_contrast_per_channel, wrong_contrast_per_pixel])
def test_wrong_contrast_definitions_fail_the_pil_check(wrong, image_sets):
    for name, images in image_sets:
        x = jnp.asarray(images, jnp.float32) / 255.0
        want = pil_enhance(images, ImageEnhance.Contrast, 0.3).astype(np.int64)
        bad = quantise(wrong(x, jnp.full((len(images),), 0.3)))
        assert np.abs(bad - want).max() > 3, name
        good = quantise(augment.adjust_contrast(x, jnp.full((len(images),), 0.3)))
        assert np.abs(good - want).max() <= 1, name


def test_colour_ops_reject_uint8_and_factor_zero_degenerates():
    x = np.random.default_rng(0).random((3, 5, 4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="float images in"):
        augment.adjust_contrast(jnp.asarray(x * 255, jnp.uint8), jnp.ones(3))
    zero = jnp.zeros(3)
    np.testing.assert_array_equal(augment.adjust_brightness(x, zero), 0)
    flat = np.asarray(augment.adjust_contrast(x, zero))
    assert np.ptp(flat, axis=(1, 2, 3)).max() == 0  # one grey level per image
    grey = np.asarray(augment.adjust_saturation(x, zero))
    np.testing.assert_allclose(grey, np.repeat(grey[..., :1], 3, axis=-1), atol=1e-7)


def test_color_jitter_factors_in_range_and_identity_when_zero():
    x = jnp.asarray(np.random.default_rng(1).random((8, 6, 5, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)
    np.testing.assert_allclose(
        augment.color_jitter(x, key=key, brightness=0, contrast=0, saturation=0), x, atol=1e-6)
    # brightness alone: out / in is the drawn factor, in [0.6, 1.4], varying across images
    out = np.asarray(augment.color_jitter(x * 0.5, key=key, contrast=0, saturation=0))
    ratio = out / (np.asarray(x) * 0.5)
    per_image = ratio.reshape(8, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1),
                               rtol=1e-5)
    assert (per_image[:, 0] >= 0.6 - 1e-6).all() and (per_image[:, 0] <= 1.4 + 1e-6).all()
    assert np.ptp(per_image[:, 0]) > 0.1
    full = np.asarray(augment.color_jitter(x, key=key))
    assert full.min() >= 0 and full.max() <= 1


# ------------------------------------------------------------------ random resized crop

resized_crop = jax.jit(augment.random_resized_crop, static_argnames=("size", "scale", "ratio"))
crop_boxes = jax.jit(augment.sample_crop_boxes,
                     static_argnames=("batch", "height", "width", "scale", "ratio"))


def test_random_resized_crop_shape_and_identity():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((6, 11, 11, 3)), jnp.float32)
    out = resized_crop(x, key=jax.random.PRNGKey(0), size=(7, 5))
    assert out.shape == (6, 7, 5, 3) and out.dtype == jnp.float32
    same = resized_crop(x, key=jax.random.PRNGKey(0), size=11, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_array_equal(same, x)
    with pytest.raises(ValueError, match="scale"):
        augment.random_resized_crop(x, key=jax.random.PRNGKey(0), size=4, scale=(0.5, 0.1))


def test_random_resized_crop_is_pil_resize_of_the_box():
    # torchvision on PIL images: img.crop(box).resize(size, BILINEAR). PIL's float ("F") mode
    # resizes without rounding, with the same antialiased triangle filter.
    rng = np.random.default_rng(1)
    x = rng.random((16, 20, 14, 3)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    boxes = np.asarray(crop_boxes(key, batch=16, height=20, width=14))
    out = np.asarray(resized_crop(jnp.asarray(x), key=key, size=9))
    for i, (top, left, h, w) in enumerate(boxes):
        for c in range(3):
            crop = Image.fromarray(x[i, top:top + h, left:left + w, c], "F")
            ref = np.asarray(crop.resize((9, 9), Image.BILINEAR))
            np.testing.assert_allclose(out[i, :, :, c], ref, atol=2e-6)


def whole_image_weights(in_size: int, out_size: int, start, length) -> jax.Array:
    """The straightforward form (crop_resize's before it visited only its taps): a weight for
    every input pixel of the axis, [out_size, in_size], zero outside the window, the antialiased
    triangle renormalised inside it. The same float32 formula, so only the order of the sums
    differs from crop_resize's."""
    length_f = jnp.asarray(length, jnp.float32)
    step = length_f / out_size
    sample = (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * step - 0.5
    pos = (jnp.arange(in_size)[None, :] - start).astype(jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample - pos) / jnp.maximum(step, 1.0))
    weights = jnp.where((pos >= 0) & (pos < length_f), weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames="size")
def whole_image_crop_resize(images, boxes, size):
    """Each box resized by two whole-image weight matrices (the old crop_resize)."""
    _, h, w, _ = images.shape
    hp = jax.lax.Precision.HIGHEST  # plain float32 products

    def one(image, box):
        wy = whole_image_weights(h, size[0], box[0], box[2])
        wx = whole_image_weights(w, size[1], box[1], box[3])
        x = jnp.einsum("oh,hwc->owc", wy, image.astype(jnp.float32), precision=hp)
        return jnp.einsum("pw,owc->opc", wx, x, precision=hp)

    return jax.vmap(one)(images, boxes)


def every_window(size: int) -> list[tuple[int, int]]:
    """Every (start, length) window of an axis: all touch an edge or not, lengths 1 to size."""
    return [(start, length) for length in range(1, size + 1)
            for start in range(size - length + 1)]


# (image height, width, output size): shrinking by up to 2.2x (taps at their widest, as at
# ImageNet's 375x500 -> 224), enlarging, and a non-square output.
RESIZE_CASES = [(20, 14, (9, 9)), (6, 5, (13, 11)), (17, 44, (8, 20))]


@pytest.mark.parametrize("h, w, size", RESIZE_CASES)
def test_crop_resize_equals_whole_image_resize_for_every_window(h, w, size):
    # Every vertical window of the image once, each paired with a horizontal window; the
    # horizontal windows cycle through all of theirs (the resize is separable, so every window
    # of each axis is checked), in a shuffled order. Includes the 1-pixel boxes, the whole image
    # and every box touching an edge: the taps are clamped there.
    rng = np.random.default_rng(2)
    rows, cols = every_window(h), every_window(w)
    n = max(len(rows), len(cols))
    rows = [rows[i] for i in rng.permutation(n) % len(rows)]
    cols = [cols[i] for i in rng.permutation(n) % len(cols)]
    boxes = np.array([(top, left, bh, bw) for (top, bh), (left, bw) in zip(rows, cols)],
                     np.int32)
    images = rng.random((n, h, w, 3)).astype(np.float32)
    got = jax.jit(augment.crop_resize, static_argnames="size")(images, boxes, size=size)
    assert got.shape == (n, *size, 3) and got.dtype == jnp.float32
    # Only the summation order differs: a few float32 ulps on values in [0, 1] (a lost tap or a
    # shifted window would cost ~1e-2).
    np.testing.assert_allclose(got, whole_image_crop_resize(images, boxes, size), atol=1e-6)

    # The taps cover exactly the pixels that the whole-image form weights, for every window of
    # both axes: none lost at the filter's edges (float rounding) or at the image's.
    for in_size, out_size in ((h, size[0]), (w, size[1])):
        def dense_taps(start, length, in_size=in_size, out_size=out_size):
            index, weight = augment._bilinear_taps(in_size, out_size, start, length)
            rows = jnp.arange(out_size)[:, None]  # [out, 1] against index [out, taps]
            return jnp.zeros((out_size, in_size)).at[rows, index].add(weight)

        start, length = np.array(every_window(in_size)).T
        taps = np.asarray(jax.jit(jax.vmap(dense_taps))(start, length))
        whole = np.asarray(jax.jit(jax.vmap(
            functools.partial(whole_image_weights, in_size, out_size)))(start, length))
        np.testing.assert_array_equal(taps != 0, whole != 0)
        np.testing.assert_allclose(taps, whole, rtol=3e-7, atol=0)


def test_crop_resize_of_uint8_at_imagenet_ratio_and_under_vmap():
    # uint8 [0, 255] in (converted after the gather), 375x500 -> 224's shrink factors at a 5x
    # smaller scale (75x100 -> 45), random boxes and boxes against each edge.
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 10, 75, 100, 3), dtype=np.uint8)  # two batches of 10
    boxes = np.array(crop_boxes(jax.random.PRNGKey(4), batch=20, height=75, width=100))
    boxes[:4] = [(0, 0, 30, 40), (45, 60, 30, 40), (0, 60, 75, 40), (45, 0, 30, 100)]
    boxes = boxes.reshape(2, 10, 4)
    # vmap over the two batches, each with its own boxes (10 images: a loop iteration of 8 and
    # a remainder of 2 inside crop_resize).
    both = jax.jit(jax.vmap(lambda x, b: augment.crop_resize(x, b, size=45)))(images, boxes)
    for i in range(2):
        want = whole_image_crop_resize(images[i], boxes[i], (45, 45))
        np.testing.assert_allclose(both[i], want, rtol=0, atol=255 * 1e-6)
    with pytest.raises(ValueError, match=r"crop_resize: boxes must be \[B, 4\]"):
        augment.crop_resize(images[0], boxes[0, :5], size=45)


@pytest.mark.parametrize("shape", [(32, 32), (50, 20)])
def test_crop_boxes_stay_inside_and_follow_scale_and_ratio(shape):
    h, w = shape
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = np.asarray(crop_boxes(jax.random.PRNGKey(2), batch=2000, height=h, width=w,
                                  scale=scale, ratio=ratio))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # Sides are rounded, so the area and ratio bounds hold up to one pixel of rounding.
    area = bh * bw / (h * w)
    assert area.min() >= scale[0] * 0.5 and area.max() <= 1.0
    assert len(set(map(tuple, boxes))) > 500  # varied
    # Positions spread over the allowed range (not always the centre).
    small = bh < h // 2
    assert np.ptp(top[small]) >= h // 2 - 1


def test_crop_fallback_is_the_centre_crop():
    # A ratio no box of a 40 x 10 image can reach (w/h in [3, 4]) forces the fallback every time.
    boxes = np.asarray(crop_boxes(jax.random.PRNGKey(0), batch=8, height=40, width=10,
                                  scale=(0.9, 1.0), ratio=(3, 4)))
    # torchvision: w = W = 10, h = round(10 / 3) = 3, centred.
    np.testing.assert_array_equal(boxes, np.tile([(40 - 3) // 2, 0, 3, 10], (8, 1)))


# ------------------------------------------------------------------ PCA lighting

def test_pca_lighting_covariance_matches_eigen_decomposition():
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array(augment.IMAGENET_EIGVEC)
    std, n = 0.1, 20000
    x = jnp.zeros((n, 1, 1, 3), jnp.float32)
    offsets = np.asarray(augment.pca_lighting(x, key=jax.random.PRNGKey(0), std=std))
    offsets = offsets.reshape(n, 3).astype(np.float64)
    want = eigvec @ np.diag((std * eigval) ** 2) @ eigvec.T
    got = np.cov(offsets.T)
    # 20,000 samples: relative standard error ~ sqrt(2 / n) = 1% on the main directions.
    np.testing.assert_allclose(got, want, atol=0.05 * want.max())
    np.testing.assert_allclose(offsets.mean(axis=0), 0, atol=5 * std * eigval[0] / np.sqrt(n))
    # The same offset on every pixel of an image.
    y = np.asarray(augment.pca_lighting(jnp.zeros((4, 3, 5, 3)), key=jax.random.PRNGKey(1)))
    np.testing.assert_allclose(y, np.broadcast_to(y[:, :1, :1], y.shape))
    img = jnp.asarray(np.random.default_rng(0).random((4, 3, 5, 3)), jnp.float32)
    np.testing.assert_array_equal(augment.pca_lighting(img, key=jax.random.PRNGKey(1), std=0.0),
                                  img)


def test_pca_components_recover_a_known_covariance():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    sd = np.array([40.0, 15.0, 5.0])
    pixels = 128 + (rng.normal(size=(200 * 64, 3)) * sd) @ q.T
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8).reshape(200, 8, 8, 3)
    eigval, eigvec = augment.pca_components(images, chunk=33)
    x = images.reshape(-1, 3) / 255.0
    ref_val, ref_vec = np.linalg.eigh(np.cov(x.T, bias=True))
    np.testing.assert_allclose(eigval, ref_val[::-1], rtol=1e-4)
    np.testing.assert_allclose(np.abs(eigvec.T @ ref_vec[:, ::-1]), np.eye(3), atol=1e-3)
    assert eigval[0] > eigval[1] > eigval[2]


# ------------------------------------------------------------------ mixup / cutmix

B = 16  # one batch shape for every mixing test: each op compiles once per alpha
# alpha traced: both alphas share one compiled program per op
mix_jit = {op.__name__: jax.jit(op, static_argnames="num_classes")
           for op in (augment.mixup, augment.cutmix)}


def mix_batch():
    """Example i: channel 0 is the constant i (so a pixel tells its source), channels 1-2 random;
    label i (so a soft label names both members of a pair)."""
    rng = np.random.default_rng(0)
    x = rng.random((B, 12, 10, 3)).astype(np.float32)
    x[..., 0] = np.arange(B, dtype=np.float32).reshape(B, 1, 1)
    return x, np.arange(B, dtype=np.int32)


@pytest.fixture(scope="module")
def mixed():
    x, labels = mix_batch()
    out = {}
    for name, op in mix_jit.items():
        for alpha in (1.0, 1e-3):
            images, soft = op(jnp.asarray(x), jnp.asarray(labels), key=jax.random.PRNGKey(3),
                              alpha=jnp.float32(alpha), num_classes=B)
            out[name, alpha] = np.asarray(images), np.asarray(soft)
    return x, out


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mix_labels_are_distributions(name, mixed):
    x, out = mixed
    images, soft = out[name, 1.0]
    assert images.shape == x.shape and images.dtype == np.float32 and soft.shape == (B, B)
    np.testing.assert_allclose(soft.sum(axis=1), 1, atol=1e-6)
    assert soft.min() >= 0 and soft.max() <= 1 + 1e-6
    assert (soft > 0).sum(axis=1).max() <= 2  # a pair at most
    assert ((soft > 0.01) & (soft < 0.99)).any()  # and some real mixing
    with pytest.raises(ValueError, match="alpha"):
        getattr(augment, name)(jnp.asarray(x), jnp.zeros(B, jnp.int32), key=jax.random.PRNGKey(0),
                               alpha=0.0, num_classes=B)
    with pytest.raises(ValueError, match="labels"):
        getattr(augment, name)(jnp.asarray(x), jnp.zeros(B + 1, jnp.int32),
                               key=jax.random.PRNGKey(0), alpha=1.0, num_classes=B)


def test_mixup_is_a_convex_pair_with_matching_label_weight(mixed):
    x, out = mixed
    images, soft = out["mixup", 1.0]
    for i in range(B):
        lam = soft[i, i]
        others = [j for j in np.flatnonzero(soft[i] > 0) if j != i]
        j = others[0] if others else i
        np.testing.assert_allclose(images[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)


def test_cutmix_pixel_fraction_equals_label_weight(mixed):
    x, out = mixed
    images, soft = out["cutmix", 1.0]
    pasted = 0
    for i in range(B):
        source = images[i, ..., 0]
        own = (source == i).mean()
        others = [j for j in np.flatnonzero(soft[i] > 0) if j != i]
        if others:  # a partner may be itself (perm[i] == i): then nothing visible changes
            # both are 1 - (pasted pixels) / (H W): the same count, up to float32 rounding
            assert soft[i, i] == pytest.approx(own, abs=1e-6)
            assert set(np.unique(source).astype(int)) <= {i, others[0]}
        # the pasted region is one rectangle, with the partner's other channels too
        ys, xs = np.nonzero(source != i)
        if len(ys):
            pasted += 1
            assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            np.testing.assert_array_equal(images[i, ys, xs], x[others[0], ys, xs])
    assert pasted > B // 2


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_soft_labels_give_the_mixed_cross_entropy(name, mixed):
    # The train step's loss takes the soft labels: CE(soft) = w CE(y_i) + (1 - w) CE(y_j).
    from jaxvision import losses
    _, out = mixed
    _, soft = out[name, 1.0]
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(B, B)), jnp.float32)
    got = np.asarray(losses.softmax_cross_entropy(logits=logits, labels=jnp.asarray(soft)))
    per_class = -np.asarray(jax.nn.log_softmax(logits))  # [B, K]: CE of each hard label
    np.testing.assert_allclose(got, (soft * per_class).sum(axis=1), rtol=1e-5)


def test_tiny_alpha_gives_unmixed_examples(mixed):
    x, out = mixed
    images, soft = out["mixup", 1e-3]
    # lambda ~ Beta(1e-3, 1e-3) sits at 0 or 1: every output is (almost) one whole original
    # image, with that image's hard label.
    for i in range(B):
        k = int(np.argmax(soft[i]))
        assert soft[i, k] > 0.99
        np.testing.assert_allclose(images[i], x[k], atol=0.02 * B)
        np.testing.assert_allclose(images[i, ..., 1:], x[k, ..., 1:], atol=0.02)
    # CutMix: lambda near 1 leaves an empty box, so the example is exactly unchanged; lambda near
    # 0 gives a full-size box clipped at the borders (the reference code's rule), a partial paste.
    images, soft = out["cutmix", 1e-3]
    unchanged = [i for i in range(B) if soft[i, i] == 1]
    assert len(unchanged) >= B // 4
    for i in unchanged:
        np.testing.assert_array_equal(images[i], x[i])


# ------------------------------------------------------------------ host == device

def image_pipeline(batch, *, key):
    """Every random image op in a chain (one compiled program for the host, one for the step)."""
    k = jax.random.split(key, 6)
    x = augment.random_flip(batch["image"], key=k[0])
    x = augment.random_crop(x, key=k[1], padding=2)
    x = augment.cutout(x, key=k[2], size=3)
    x = augment.color_jitter(x, key=k[3])
    x = augment.pca_lighting(x, key=k[4])
    x = augment.random_resized_crop(x, key=k[5], size=6)
    return {**batch, "image": x}


def label_op(op, **kwargs):
    def fn(batch, *, key):
        images, soft = op(batch["image"], batch["label"], key=key, **kwargs)
        return {**batch, "image": images, "label": soft}
    return fn


HOST_FNS = {
    "image ops": image_pipeline,
    "mixup": label_op(augment.mixup, alpha=1.0, num_classes=B),
    "cutmix": label_op(augment.cutmix, alpha=1.0, num_classes=B),
}


@pytest.mark.parametrize("name", sorted(HOST_FNS))
def test_host_pipeline_equals_jitted_device_step(name):
    fn, seed = HOST_FNS[name], 7
    x, labels = mix_batch()
    batch = {"image": x / B, "label": labels, "mask": np.ones(B, np.float32)}
    host = augment.host_batch_fn(fn, seed=seed)

    if name in mix_jit:  # reuse the program compiled by the `mixed` fixture (gamma compiles slowly)
        def device_step(batch, step):
            images, soft = mix_jit[name](
                batch["image"], batch["label"], key=augment.batch_key(seed, step),
                alpha=jnp.float32(1.0), num_classes=B)
            return {**batch, "image": images, "label": soft}
    else:
        @jax.jit
        def device_step(batch, step):  # what a train step does with its step number
            return fn(batch, key=jax.random.fold_in(jax.random.PRNGKey(seed), step))

    outs = []
    for b in (0, 3):
        got = host(batch, b)
        want = device_step({k: jnp.asarray(v) for k, v in batch.items()}, jnp.int32(b))
        assert set(got) == set(want)
        for k in got:
            assert isinstance(got[k], np.ndarray)
            np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=f"{name} {k}")
        outs.append(got["image"])
    assert not np.array_equal(outs[0], outs[1])  # different batches draw differently
