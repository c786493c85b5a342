"""Image features: HOG against a per-pixel loop, hue against colorsys and matplotlib, known
images (edges, constants, primaries), and extract's chunking."""
import colorsys
import functools
import math

import jax
import matplotlib.colors
import numpy as np
import pytest

from jaxvision.pipelines import features


def hog_reference(image, *, cell, bins):
    """The HOG of one float64 [H, W, 3] image, pixel by pixel (see `features.hog`)."""
    grey = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    h, w = grey.shape
    hist = np.zeros((h // cell, w // cell, bins))
    for i in range(h // cell * cell):
        for j in range(w // cell * cell):
            gx = grey[i, min(j + 1, w - 1)] - grey[i, max(j - 1, 0)]
            gy = grey[min(i + 1, h - 1), j] - grey[max(i - 1, 0), j]
            angle = math.degrees(math.atan2(gy, gx)) % 180.0
            k = min(int(math.floor(angle * bins / 180.0)), bins - 1)
            hist[i // cell, j // cell, k] += math.hypot(gx, gy)
    return (hist / cell**2).ravel()


@pytest.mark.parametrize("shape,cell,bins,seed", [
    ((2, 16, 24, 3), 8, 9, 0),
    ((3, 13, 19, 3), 4, 6, 1),   # sizes that are not whole cells: the remainder is ignored
    ((1, 9, 10, 3), 3, 12, 2),
])
def test_hog_matches_loop_reference(shape, cell, bins, seed):
    images = np.random.default_rng(seed).random(shape)
    with jax.enable_x64(True):
        got = np.asarray(features.hog(images, cell=cell, bins=bins))
    assert got.dtype == np.float64
    want = np.stack([hog_reference(im, cell=cell, bins=bins) for im in images])
    assert got.shape == want.shape == (shape[0], (shape[1] // cell) * (shape[2] // cell) * bins)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_hog_uint8_is_float_over_255_and_shape_for_cifar():
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = features.hog(images)
    assert got.shape == (4, 4 * 4 * 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, features.hog(images.astype(np.float32) / 255.0),
                               rtol=1e-5, atol=1e-7)


def cell_histograms(feats, h, w, cell=8, bins=9):
    return np.asarray(feats).reshape(-1, h // cell, w // cell, bins)


def test_hog_vertical_edge_is_0_degrees_horizontal_edge_is_90():
    image = np.zeros((1, 32, 32, 3))
    image[:, :, 12:] = 1.0  # a vertical edge between columns 11 and 12 (in cell column 1)
    hist = cell_histograms(features.hog(image), 32, 32)
    # Columns 11 and 12 each see a centred difference of 1 on all 8 rows of a cell: 16 / 64.
    expected = np.zeros((1, 4, 4, 9))
    expected[:, :, 1, 0] = 16 / 64
    np.testing.assert_allclose(hist, expected, atol=1e-7)
    # Transposed: a horizontal edge has its gradient along y, 90 degrees, bin 4 = [80, 100).
    # Dark below bright gives the same bin: orientation is unsigned.
    flipped = 1.0 - image.transpose(0, 2, 1, 3)
    hist = cell_histograms(features.hog(flipped), 32, 32)
    expected = np.zeros((1, 4, 4, 9))
    expected[:, 1, :, 4] = 16 / 64
    np.testing.assert_allclose(hist, expected, atol=1e-7)


def test_hog_diagonal_ramps_land_at_45_and_135_degrees():
    i, j = np.mgrid[:32, :32]
    down_right = np.repeat(((i + j) / 64.0)[None, ..., None], 3, axis=-1)  # y grows downwards
    up_right = np.repeat(((j - i + 32) / 64.0)[None, ..., None], 3, axis=-1)
    for image, bin_ in ((down_right, 2), (up_right, 6)):  # 45 in [40, 60); 135 in [120, 140)
        hist = cell_histograms(features.hog(image), 32, 32)[0, 1:3, 1:3]  # cells off the border
        assert np.all(hist[..., bin_] > 0)
        np.testing.assert_allclose(np.delete(hist, bin_, axis=-1), 0.0, atol=1e-7)
        # Interior pixels: gx = gy = +-2/64, magnitude 2 * sqrt(2) / 64, the mean over the cell.
        np.testing.assert_allclose(hist[..., bin_], 2 * math.sqrt(2) / 64, rtol=1e-5)


@pytest.mark.parametrize("image", [np.full((2, 16, 16, 3), 200, np.uint8),
                                   np.full((2, 16, 16, 3), 0.3, np.float32)])
def test_hog_of_constant_image_is_zero(image):
    np.testing.assert_array_equal(features.hog(image), np.zeros((2, 4 * 9)))


def test_hog_grey_input():
    rng = np.random.default_rng(4)
    grey = rng.random((2, 16, 16, 1))
    with jax.enable_x64(True):
        np.testing.assert_allclose(features.hog(grey),
                                   features.hog(np.repeat(grey, 3, axis=-1)), rtol=1e-12)


@pytest.mark.parametrize("fn", [features.hog, features.hue_histogram, features.rgb_to_hue])
def test_bad_images_are_refused(fn):
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, .*got shape \(16, 16, 3\)"):
        fn(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 16, 16, 4\)"):
        fn(np.zeros((2, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 in \\[0, 255\\] or float in \\[0, 1\\], got dtype int32"):
        fn(np.zeros((2, 16, 16, 3), np.int32))


def test_hog_bad_arguments():
    with pytest.raises(ValueError, match="smaller than one cell"):
        features.hog(np.zeros((1, 4, 16, 3)), cell=8)
    with pytest.raises(ValueError, match="cell must be a positive int"):
        features.hog(np.zeros((1, 16, 16, 3)), cell=0)
    with pytest.raises(ValueError, match="bins must be a positive int"):
        features.hog(np.zeros((1, 16, 16, 3)), bins=2.0)


def random_images(seed, shape=(3, 7, 9, 3)):
    """Random uint8 images with greys, primaries and ties between channels mixed in."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = images.reshape(-1, 3)
    specials = np.array([[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 255, 0],
                         [0, 0, 255], [200, 200, 10], [200, 10, 200], [10, 200, 200],
                         [255, 0, 1], [255, 1, 0]], np.uint8)
    flat[:len(specials)] = specials
    flat[len(specials):40, 1] = flat[len(specials):40, 0]  # r == g ties
    return images


def test_rgb_to_hue_matches_colorsys_and_matplotlib():
    images = random_images(5).astype(np.float64) / 255.0
    want = np.array([colorsys.rgb_to_hsv(*p)[0] for p in images.reshape(-1, 3)])
    with jax.enable_x64(True):
        got = np.asarray(features.rgb_to_hue(images)).ravel()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, matplotlib.colors.rgb_to_hsv(images)[..., 0].ravel(),
                               rtol=0, atol=1e-12)
    assert np.all((got >= 0) & (got < 1))
    # uint8 input: the same hues in float32.
    np.testing.assert_allclose(np.asarray(features.rgb_to_hue(random_images(5))).ravel(), want,
                               atol=1e-6)


def hue_histogram_reference(images, *, bins, value_range):
    rows = []
    for image in images:
        hues = [colorsys.rgb_to_hsv(*p)[0] for p in image.reshape(-1, 3)]
        density, edges = np.histogram(hues, bins=bins, range=value_range, density=True)
        rows.append(density * np.diff(edges))  # the course's normalisation
    return np.stack(rows)


@pytest.mark.parametrize("bins,value_range,seed", [(10, (0.0, 1.0), 6), (7, (0.2, 0.7), 7)])
def test_hue_histogram_matches_numpy_histogram_of_colorsys(bins, value_range, seed):
    # Continuous random colours: no hue sits exactly on a bin edge, where rounding could differ.
    images = np.random.default_rng(seed).random((4, 8, 6, 3))
    with jax.enable_x64(True):
        got = np.asarray(features.hue_histogram(images, bins=bins, value_range=value_range))
    want = hue_histogram_reference(images, bins=bins, value_range=value_range)
    assert got.shape == (4, bins)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_primaries_and_secondaries_fall_in_their_bins():
    colours = {  # hue: red 0, yellow 1/6, green 1/3, cyan 1/2, blue 2/3, magenta 5/6
        (255, 0, 0): 0, (255, 255, 0): 1, (0, 255, 0): 3, (0, 255, 255): 5, (0, 0, 255): 6,
        (255, 0, 255): 8, (128, 128, 128): 0}  # grey: hue 0 by convention
    images = np.stack([np.full((4, 4, 3), c, np.uint8) for c in colours])
    for x in (images, images.astype(np.float32) / 255.0):
        hist = np.asarray(features.hue_histogram(x, bins=10))
        np.testing.assert_array_equal(hist, np.eye(10)[list(colours.values())])


def test_hue_histogram_fractions():
    image = np.zeros((1, 4, 4, 3), np.uint8)
    image[0, :, :1, 0] = 255   # 4 red pixels
    image[0, :, 1:, 2] = 255   # 12 blue
    hist = np.asarray(features.hue_histogram(image, bins=3))  # red in [0, 1/3), blue in [2/3, 1]
    np.testing.assert_allclose(hist, [[0.25, 0.0, 0.75]])
    # Only pixels in value_range count: here the red ones.
    np.testing.assert_allclose(features.hue_histogram(image, bins=2, value_range=(0.0, 0.5)),
                               [[1.0, 0.0]])
    with pytest.raises(ValueError, match="value_range must be"):
        features.hue_histogram(image, value_range=(0.5, 0.5))


def test_extract_is_invariant_to_chunking():
    images = np.random.default_rng(8).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    hue5 = functools.partial(features.hue_histogram, bins=5)
    direct = np.concatenate([np.asarray(features.hog(images)), np.asarray(hue5(images))], axis=1)
    assert direct.shape == (7, 4 * 9 + 5)
    seen = []

    def recording_hog(x):
        seen.append(x.shape[0])
        return features.hog(x)

    for chunk in (1, 3, 100):
        seen.clear()
        got = features.extract(images, [recording_hog, hue5], chunk=chunk, progress=False)
        np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-7)
        assert set(seen) == {min(chunk, 7)}  # the tail chunk is padded: one shape, one compile


def test_extract_errors():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="feature_fns is empty"):
        features.extract(images, [])
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for 3 images"):
        features.extract(images, [lambda x: np.zeros(len(x))])
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        features.extract(images, [features.hog], chunk=0)
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\]"):
        features.extract(images[0], [features.hog])
