"""Batched on-device preprocessing and augmentation against direct numpy definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.pipelines import augment


def images(b=16, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (b, h, w, c)).astype(np.uint8)


def test_normalize_per_channel_and_mean_image():
    x = images()
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 2.0])
    np.testing.assert_allclose(augment.normalize(x, mean=mean, std=std),
                               (x / 255.0 - mean) / std, rtol=1e-6)
    m = augment.mean_image(x)
    assert m.shape == (6, 5, 3)
    out = np.asarray(augment.normalize(x, mean=m, std=1.0))
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)


def test_channel_stats_match_numpy():
    x = images(b=50)
    mean, std = augment.channel_stats(x, chunk=7)  # chunks that do not divide 50
    np.testing.assert_allclose(mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, (x / 255.0).std(axis=(0, 1, 2)), rtol=1e-5)


def test_flip_mirrors_about_half_and_is_keyed():
    x = images(b=400)
    out = np.asarray(augment.random_flip(jnp.asarray(x), key=jax.random.PRNGKey(0)))
    same = (out == x).all(axis=(1, 2, 3))
    mirrored = (out == x[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    assert 150 < mirrored.sum() < 250
    again = augment.random_flip(jnp.asarray(x), key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_crop_is_a_window_of_the_padded_image(pad_mode):
    x = images(b=32)
    p = 2
    out = np.asarray(augment.random_crop(jnp.asarray(x), key=jax.random.PRNGKey(1), padding=p,
                                         pad_mode=pad_mode))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if (padded[i, dy:dy + 6, dx:dx + 5] == out[i]).all()]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets vary across the batch
    np.testing.assert_array_equal(
        augment.random_crop(jnp.asarray(x), key=jax.random.PRNGKey(1), padding=0), x)


def test_cutout_zeroes_one_clipped_square():
    x = images(b=64, h=10, w=10)
    out = np.asarray(augment.cutout(jnp.asarray(x), key=jax.random.PRNGKey(2), size=4))
    zeroed = (out == 0).all(axis=-1) & (x != 0).all(axis=-1)
    for i in range(len(x)):
        ys, xs = np.nonzero(zeroed[i])
        assert len(ys) > 0 and len(ys) <= 16
        # One axis-aligned box, fully zero inside, untouched outside.
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        assert zeroed[i][box].all() and zeroed[i].sum() == zeroed[i][box].size
        assert ys.max() - ys.min() < 4 and xs.max() - xs.min() < 4
    assert (zeroed.sum(axis=(1, 2)) < 16).any()  # some squares are clipped at a border


def test_ops_run_inside_jit():
    x = jnp.asarray(images())

    @jax.jit
    def pipeline(x, key):
        k1, k2, k3 = jax.random.split(key, 3)
        y = augment.normalize(x, mean=0.5, std=0.2)
        y = augment.random_crop(y, key=k1, padding=1)
        return augment.cutout(augment.random_flip(y, key=k2), key=k3, size=2)

    assert pipeline(x, jax.random.PRNGKey(0)).dtype == jnp.float32
