"""kNN: the three distance forms agree, chunking changes nothing, the documented tie rules,
cross-validation against a plain numpy reference."""
import jax
import numpy as np
import pytest

from jaxvision import knn


def _data(seed, n_train, n_test, d, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_train, d)).astype(dtype) * 3 + 1,
            rng.normal(size=(n_test, d)).astype(dtype) * 3 + 1)


@pytest.mark.parametrize("metric", knn.METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_three_forms_equal_float64(metric, seed):
    rng = np.random.default_rng(seed)
    n_train, n_test, d = rng.integers(5, 40), rng.integers(1, 12), rng.integers(1, 20)
    train, test = _data(seed, n_train, n_test, d, np.float64)
    with jax.enable_x64(True):
        ref = knn.distances_two_loops(train, test, metric=metric)
        one = np.asarray(knn.distances_one_loop(train, test, metric=metric))
        vec = np.asarray(knn.distances(train, test, metric=metric, chunk=5, train_chunk=3))
    assert ref.shape == one.shape == vec.shape == (n_test, n_train)
    assert vec.dtype == np.float64
    # Independent formula: scipy-free brute force on the definition.
    diff = test[:, None, :] - train[None, :, :]
    direct = np.sqrt((diff ** 2).sum(-1)) if metric == "l2" else np.abs(diff).sum(-1)
    np.testing.assert_allclose(ref, direct, rtol=1e-12)
    np.testing.assert_allclose(one, ref, rtol=1e-12)
    np.testing.assert_allclose(vec, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("metric", knn.METRICS)
def test_float32_pixels_match_reference(metric):
    """uint8 pixels (0..255, CIFAR's scale) in float32: within float tolerance of the float64
    definition. L2's expansion loses absolute precision near 0 (cancellation of |x|^2 + |y|^2
    against 2 x.y): an exact duplicate comes out within ~sqrt(eps * |x|^2) of 0, never NaN."""
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (60, 3 * 8 * 8)).astype(np.uint8)
    test = np.concatenate([train[:3], rng.integers(0, 256, (9, 3 * 8 * 8)).astype(np.uint8)])
    ref = knn.distances_two_loops(train.astype(np.float64), test.astype(np.float64),
                                  metric=metric)
    vec = np.asarray(knn.distances(train, test, metric=metric, chunk=4))
    assert vec.dtype == np.float32 and np.isfinite(vec).all()
    centred = train - train.mean(0)
    bound = 0.0 if metric == "l1" else \
        4 * np.sqrt(np.finfo(np.float32).eps * (centred.astype(np.float64) ** 2).sum(1).max())
    assert bound < 2.0  # vs typical distances ~1,400 here
    np.testing.assert_allclose(vec, ref, rtol=1e-5, atol=bound)
    assert np.all(vec[np.arange(3), np.arange(3)] <= bound)


@pytest.mark.parametrize("metric", knn.METRICS)
def test_chunk_sizes_do_not_change_result(metric):
    train, test = _data(4, 23, 17, 6)
    full = np.asarray(knn.distances(train, test, metric=metric, chunk=1024))
    for chunk, train_chunk in [(1, 1), (5, 7), (16, None)]:  # 16: overlapping last block
        got = np.asarray(knn.distances(train, test, metric=metric, chunk=chunk,
                                       train_chunk=train_chunk))
        np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-5,
                                   err_msg=f"chunk={chunk} train_chunk={train_chunk}")


def test_bad_input_errors():
    train, test = _data(0, 5, 3, 4)
    with pytest.raises(ValueError, match="metric"):
        knn.distances(train, test, metric="cosine")
    with pytest.raises(ValueError, match="same feature dimension"):
        knn.distances(train, test[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        knn.distances_one_loop(train.reshape(5, 2, 2), test)
    with pytest.raises(ValueError, match="chunk"):
        knn.distances(train, test, chunk=0)
    with pytest.raises(ValueError, match="k must be"):
        knn.predict(np.zeros((3, 5)), np.zeros(5, int), k=6)
    with pytest.raises(ValueError, match="train_labels"):
        knn.predict(np.zeros((3, 5)), np.zeros(4, int), k=1)


def test_tie_rules():
    labels = np.array([3, 1, 1, 3, 0])
    # Equal distances: the lower training index is nearer. Rows 0/1: index 0 (label 3) vs
    # index 1 (label 1) at the same distance; -0.0 and +0.0 count as equal too.
    dists = np.array([[0.5, 0.5, 9.0, 9.0, 9.0],
                      [9.0, -0.0, 9.0, 0.0, 9.0],
                      # k=2: one vote each for labels 1 (nearest) and 3: smallest label wins.
                      [9.0, 0.1, 9.0, 0.2, 9.0],
                      # k=4: labels 3, 1, 1, 3 -> 2 votes each: 1 wins; k=5 adds label 0 -> 1.
                      [0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    np.testing.assert_array_equal(knn.predict(dists, labels, k=1), [3, 1, 1, 3])
    np.testing.assert_array_equal(knn.predict(dists, labels, k=2)[2:], [1, 1])
    np.testing.assert_array_equal(knn.predict(dists, labels, k=4)[3:], [1])
    # k=2 where the nearer neighbour has the LARGER label: still the smaller label wins.
    flipped = np.array([[0.1, 0.2, 9.0, 9.0, 9.0]], np.float32)
    np.testing.assert_array_equal(knn.predict(flipped, np.array([3, 1, 0, 0, 0]), k=2), [1])


def _reference_predict(dists, labels, k):
    """The course's loop: stable sort of each row, bincount of the k nearest labels, argmax."""
    out = []
    for row in dists:
        closest = labels[np.argsort(row, kind="stable")[:k]]
        out.append(np.argmax(np.bincount(closest)))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predict_matches_reference(seed):
    rng = np.random.default_rng(seed)
    # Distances from a small integer set: many exact ties in distance and in votes.
    dists = rng.integers(0, 4, (20, 15)).astype(np.float32)
    labels = rng.integers(0, 4, 15)
    for k in (1, 2, 3, 6, 15):
        np.testing.assert_array_equal(knn.predict(dists, labels, k=k),
                                      _reference_predict(dists, labels, k), err_msg=f"k={k}")


@pytest.mark.parametrize("metric", knn.METRICS)
def test_k1_on_training_data_is_perfect(metric):
    train, _ = _data(5, 50, 1, 8)
    labels = np.random.default_rng(5).integers(0, 5, 50)
    d = knn.distances(train, train, metric=metric, chunk=16)
    assert float(np.mean(np.asarray(knn.predict(d, labels, k=1)) == labels)) == 1.0


def _reference_cross_validate(x, y, ks, folds, seed):
    order = np.random.default_rng(seed).permutation(len(x))
    parts = np.array_split(order, folds)
    out = np.zeros((len(ks), folds))
    for f in range(folds):
        rest = np.concatenate([parts[g] for g in range(folds) if g != f])
        held = parts[f]
        d = np.sqrt(((x[held][:, None, :] - x[rest][None, :, :]) ** 2).sum(-1))
        for i, k in enumerate(ks):
            out[i, f] = np.mean(_reference_predict(d, y[rest], k) == y[held])
    return out


def test_cross_validate_matches_reference():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 5)).astype(np.float32)  # 4 folds of 10: one compilation
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0.5)  # learnable: accuracies differ by k
    ks = (1, 2, 5, 9)
    got = knn.cross_validate(x, y, ks=ks, folds=4, seed=3)
    assert got.shape == (len(ks), 4)
    np.testing.assert_allclose(got, _reference_cross_validate(x, y, ks, 4, 3))
    # seed=None keeps the order: the first fold is the first 10 examples.
    in_order = knn.cross_validate(x, y, ks=(1,), folds=4, seed=None)
    d = knn.distances(x[10:], x[:10])
    assert in_order[0, 0] == np.mean(np.asarray(knn.predict(d, y[10:], k=1)) == y[:10])
    with pytest.raises(ValueError, match="ks must be"):
        knn.cross_validate(x, y, ks=(31,), folds=4)
    with pytest.raises(ValueError, match="folds"):
        knn.cross_validate(x, y, ks=(1,), folds=1)
