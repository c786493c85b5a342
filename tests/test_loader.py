"""Loaders: order is a function of (seed, epoch); resume position; every eval example once;
host and device loaders agree; several processes split each batch; bad examples."""
import jax
import numpy as np
import pytest

from jaxvision.pipelines import loader as loader_lib
from jaxvision.pipelines import sources
from jaxvision.pipelines.loader import BatchPlan, DeviceLoader, HostLoader, epoch_permutation
from jaxvision.sharding import make_mesh

N = 50  # not a multiple of the batch size: the last batch is partial


def numbered_source(n=N):
    """Example i has label i and every pixel equal to i, so a batch says which examples it holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3))
    return sources.ArraySource(np.array(images), np.arange(n), num_classes=n, name="numbered")


def ids(batch):
    """Example ids of the real (mask 1) rows of a batch."""
    image, mask = np.asarray(batch["image"]), np.asarray(batch["mask"])
    return image[mask == 1, 0, 0, 0].astype(int).tolist()


def test_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(100, seed=3, epoch=2, shuffle=True)
    np.testing.assert_array_equal(a, epoch_permutation(100, seed=3, epoch=2, shuffle=True))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(100, seed=3, epoch=3, shuffle=True))
    assert not np.array_equal(a, epoch_permutation(100, seed=4, epoch=2, shuffle=True))
    np.testing.assert_array_equal(epoch_permutation(5, seed=0, epoch=9, shuffle=False),
                                  np.arange(5))


def test_plan_covers_each_example_once_per_epoch_with_padding():
    plan = BatchPlan(N, 16, seed=1, shuffle=True, drop_remainder=False)
    assert plan.steps_per_epoch == 4
    seen = []
    for b in range(4):
        idx, mask = plan.indices(b)
        assert idx.shape == mask.shape == (16,)
        seen += idx[mask == 1].tolist()
    assert sorted(seen) == list(range(N))
    _, last_mask = plan.indices(3)
    assert last_mask.sum() == N - 48
    assert BatchPlan(N, 16, drop_remainder=True).steps_per_epoch == 3


def test_eval_counts_every_example_exactly_once():
    mesh = make_mesh()
    for make in (DeviceLoader, HostLoader):
        loader = make(numbered_source(), batch_size=16, mesh=mesh, shuffle=False,
                      drop_remainder=False)
        seen = [i for batch in loader.epoch() for i in ids(batch)]
        assert seen == list(range(N)), make.__name__


def test_device_and_host_loaders_give_the_same_batches():
    mesh = make_mesh()
    kwargs = dict(batch_size=16, mesh=mesh, seed=7, shuffle=True, drop_remainder=True)
    dev = DeviceLoader(numbered_source(), **kwargs)
    host = HostLoader(numbered_source(), **kwargs)
    for (b1, x), (b2, y) in zip(dev.iterate(0, 8), host.iterate(0, 8)):
        assert b1 == b2
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
            assert x[k].sharding.is_equivalent_to(y[k].sharding, x[k].ndim)
        assert x["image"].sharding.spec[0] == "data"  # batch axis split over the devices


def test_resume_sees_exactly_the_next_batch():
    mesh = make_mesh()
    loader = HostLoader(numbered_source(), batch_size=8, mesh=mesh, seed=2)
    straight = [ids(batch) for _, batch in loader.iterate(0, 15)]
    saved = loader.state_dict(9)  # as stored in a checkpoint after 9 steps
    fresh = HostLoader(numbered_source(), batch_size=8, mesh=mesh, seed=2)
    resumed = [ids(batch) for _, batch in fresh.iterate(fresh.position_from(saved), 15)]
    assert resumed == straight[9:]


def test_resume_with_other_data_settings_is_refused():
    mesh = make_mesh()
    saved = HostLoader(numbered_source(), batch_size=8, mesh=mesh, seed=2).state_dict(3)
    with pytest.raises(ValueError, match="batch_size=8.*this run has batch_size=16"):
        HostLoader(numbered_source(), batch_size=16, mesh=mesh, seed=2).position_from(saved)


def test_each_process_reads_only_its_rows():
    """Two processes' local rows, side by side, are the one-process batch."""
    mesh = make_mesh()
    one = HostLoader(numbered_source(), batch_size=16, mesh=mesh, seed=5)
    parts = [HostLoader(numbered_source(), batch_size=16, mesh=mesh, seed=5,
                        process_index=p, process_count=2) for p in range(2)]
    for b in range(5):
        whole = one.local_batch(b)
        halves = [p.local_batch(b) for p in parts]
        assert halves[0]["image"].shape[0] == 8
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))


class FlakySource:
    """Example 3 has a grayscale image, example 5 a label out of range."""

    name, num_classes, image_shape, class_names = "flaky", 4, (4, 4, 3), None

    def __len__(self):
        return 8

    def __getitem__(self, i):
        image = np.full((4, 4, 3), i, np.uint8)
        if i == 3:
            image = image[..., :1]
        return {"image": image, "label": 99 if i == 5 else i % 4}


def test_bad_example_raises_naming_it():
    loader = HostLoader(FlakySource(), batch_size=8, mesh=make_mesh(), shuffle=False)
    with pytest.raises(sources.BadExampleError, match=r"flaky\[3\]"):
        next(loader.iterate(0, 1))


def test_skip_mode_masks_bad_examples_and_counts_them():
    loader = HostLoader(FlakySource(), batch_size=8, mesh=make_mesh(), shuffle=False,
                        on_bad="skip")
    _, batch = next(loader.iterate(0, 1))
    assert ids(batch) == [0, 1, 2, 4, 6, 7]  # every good example kept, the two bad masked out
    assert loader.num_skipped == 2 and loader.skipped == ["flaky[3]", "flaky[5]"]


def test_prefetch_thread_errors_reach_the_consumer():
    def produce(b):
        if b == 2:
            raise OSError("disk gone at batch 2")
        return {"b": b}

    got = []
    with pytest.raises(OSError, match="batch 2"):
        for b, _ in loader_lib._prefetched(produce, 0, 10, depth=2):
            got.append(b)
    assert got == [0, 1]


def test_device_loader_places_data_once():
    mesh = make_mesh()
    loader = DeviceLoader(numbered_source(), batch_size=8, mesh=mesh)
    assert loader.images.sharding.is_fully_replicated
    assert len(loader.images.sharding.device_set) == jax.device_count()


def test_host_augmentation_equals_the_same_ops_on_the_device():
    """HostLoader(batch_fn=augment.host_batch_fn(fn, seed)) delivers what a jitted step gets by
    running fn on the device's batch with augment.batch_key(seed, step): bitwise, on CPU."""
    from jaxvision.pipelines import augment

    def fn(batch, *, key):
        k_jit, k_crop, k_flip = jax.random.split(key, 3)
        x = batch["image"].astype(np.float32) / 255.0
        x = augment.color_jitter(x, key=k_jit)
        x = augment.random_crop(x, key=k_crop, padding=1)
        x = augment.random_flip(x, key=k_flip)
        return {**batch, "image": x}

    mesh = make_mesh()
    rng = np.random.default_rng(0)
    src = sources.ArraySource(rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8),
                              np.arange(N) % 5, num_classes=5, name="random")
    kwargs = dict(batch_size=16, mesh=mesh, seed=3)
    host = HostLoader(src, batch_fn=augment.host_batch_fn(fn, seed=11), prefetch=0, **kwargs)
    on_device = jax.jit(lambda batch, b: fn(batch, key=augment.batch_key(11, b)))
    for (b, got), (_, raw) in zip(host.iterate(0, 3), DeviceLoader(src, **kwargs).iterate(0, 3)):
        want = on_device(raw, b)
        assert got["image"].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
        np.testing.assert_array_equal(np.asarray(got["label"]), np.asarray(want["label"]))
