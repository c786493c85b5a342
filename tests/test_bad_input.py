"""Bad input under load: a slice of the shared CIFAR-10 archive with corrupt, truncated, empty,
grayscale, RGBA and wrong-size files mixed in. The default mode stops naming the first bad file;
skip mode trains through `loop.run`, reports exactly which files it skipped, and every good image
reaches the training step exactly once per epoch (counted by pixel hash).

Grayscale and RGBA files count as bad, like undecodable ones: the data set is declared RGB
(H, W, 3), and converting them silently would hide a broken collection step (see
`sources.image_folder`)."""
import collections
import hashlib
import io
import logging
import re
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxvision import loop, losses, optim, train
from jaxvision.nets.convnet import ConvNet
from jaxvision.pipelines import sources
from jaxvision.pipelines.loader import HostLoader
from jaxvision.sharding import make_mesh
from tiny_task import preprocess

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz"
pytestmark = pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason=f"{CIFAR_ARCHIVE} is absent")

PER_CLASS = 12  # good images per class, from the archive's test split (its first members)
BATCH = 32


def _cifar_slice(per_class: int) -> dict[str, bytes]:
    """"CLASS/NNNN.jpg" -> JPEG bytes: the first `per_class` test images of every class.

    The archive lists test/ before train/, so this reads only its first ~2 MB of members.
    """
    out: dict[str, bytes] = {}
    counts: collections.Counter = collections.Counter()
    with tarfile.open(CIFAR_ARCHIVE, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if parts[0] == "train":
                break
            if member.isfile() and parts[0] == "test" and len(parts) == 3:
                if counts[parts[1]] < per_class:
                    counts[parts[1]] += 1
                    out[f"{parts[1]}/{parts[2]}"] = tar.extractfile(member).read()
    assert len(counts) == 10 and set(counts.values()) == {per_class}
    return out


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _bad_files(good: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """"CLASS/NAME" -> (bytes, fragment of the expected message), made from real images and
    named to sort between good files of different classes."""
    real = Image.open(io.BytesIO(good["cat/0000.jpg"]))
    rng = np.random.default_rng(0)
    return {
        "airplane/0005_corrupt.jpg": (rng.bytes(1500), "cannot decode"),
        "bird/0002_truncated.jpg": (good["bird/0002.jpg"][:400], "cannot decode"),
        "cat/0007_empty.jpg": (b"", "empty file (0 bytes)"),
        "deer/0003_grayscale.jpg": (_encode(real.convert("L"), "JPEG"), "mode L, expected RGB"),
        "dog/0009_rgba.png": (_encode(real.convert("RGBA"), "PNG"), "mode RGBA, expected RGB"),
        # Sorts first: the first bad file in path order is one only the size check finds.
        "airplane/0001_wrong_size.jpg": (_encode(real.resize((40, 40)), "JPEG"),
                                         "size 32x32 expected, got 40x40"),
        "ship/0010_wrong_size.png": (_encode(real.resize((32, 24)), "PNG"),
                                     "size 32x32 expected, got 32x24"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The mixed data set as an image folder and as a tar archive, and what a reader must find."""
    root = tmp_path_factory.mktemp("bad_input")
    good = _cifar_slice(PER_CLASS)
    bad = _bad_files(good)
    folder = root / "folder"
    for rel, payload in [*good.items(), *((k, v[0]) for k, v in bad.items())]:
        (folder / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "train" / rel).write_bytes(payload)
    archive = root / "mixed.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder / "train", arcname="train")
    # The good images' pixels, decoded here with Pillow directly: the ground truth to count.
    hashes = collections.Counter(_hash(np.asarray(Image.open(io.BytesIO(b))))
                                 for b in good.values())
    return {"folder": folder, "archive": archive, "good": good, "bad": bad, "hashes": hashes}


def _hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def _where_folder(data, rel):
    return str(data["folder"] / "train" / rel)


def test_default_mode_stops_at_the_first_bad_file_in_path_order(data, tmp_path):
    """image_folder decodes the split, then names the first bad file in sorted path order, its
    reason, and how many bad files there are; as a folder and as an archive. The first is a
    wrong-size image, found only once every image is decoded, ahead of an undecodable one."""
    bad_sorted = sorted(data["bad"])
    first = bad_sorted[0]
    assert first == "airplane/0001_wrong_size.jpg" and "corrupt" in bad_sorted[1]
    for path, where in ((data["folder"], _where_folder(data, first)),
                        (data["archive"], f"mixed.tar:train/{first}")):
        with pytest.raises(sources.BadExampleError) as e:
            sources.image_folder(path, "train", cache_dir=tmp_path / "cache")
        message = str(e.value)
        print(message)
        assert message.startswith(f"{where}: {data['bad'][first][1]}")
        assert e.value.where == where
        assert f"the first of {len(bad_sorted)} bad files in path order" in message
    # Every kind of bad file, read alone, is refused with its path and its own reason.
    src = sources.image_files(data["folder"], "train", image_size=(32, 32))
    for rel, (_, reason) in data["bad"].items():
        where = _where_folder(data, rel)
        i = next(i for i in range(len(src)) if src.where(i) == where)
        with pytest.raises(sources.BadExampleError, match=re.escape(f"{where}: {reason}")):
            src[i]


def _pieces(num_classes):
    model = ConvNet(widths=(8, 16), num_classes=num_classes)
    schedule = optim.make_schedule(kind="constant", lr=0.05, steps=100)
    tx = optim.make_optimizer(name="momentum", learning_rate=schedule)

    step = train.make_classifier_step(model=model, tx=tx, schedule=schedule,
                                      preprocess=preprocess,
                                      loss_fn=losses.softmax_cross_entropy)
    return model, tx, step


class CountingLoader:
    """Wraps a loader: records the pixel hash of every real (mask 1) row it hands to the loop."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: dict[int, list[str]] = collections.defaultdict(list)  # epoch -> hashes

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def iterate(self, start=0, stop=None):
        for b, batch in self.inner.iterate(start, stop):
            images, mask = jax.device_get((batch["image"], batch["mask"]))
            epoch = b // self.inner.steps_per_epoch
            self.seen[epoch] += [_hash(img) for img in images[mask == 1]]
            yield b, batch


def _train(loader, workdir, steps):
    model, tx, step = _pieces(loader.source.num_classes)
    state = train.create_train_state(model=model, tx=tx, seed=0, input_shape=(32, 32, 3),
                                     mesh=loader.mesh)
    return loop.run(state=state, train_step=step, loader=loader, steps=steps,
                    workdir=str(workdir), log_every=2, progress=False)


def test_default_mode_under_load_stops_at_the_first_bad_file_met(data, tmp_path):
    """Files are decoded as batches need them: training stops at the first bad file in batch
    order, with its path, and the run does not finish (no summary)."""
    src = sources.image_files(data["folder"], "train")
    assert src.image_shape == (32, 32, 3)  # probed: the common size, not a bad file's
    loader = HostLoader(src, batch_size=BATCH, mesh=make_mesh(), seed=4, drop_remainder=False)
    bad = {_where_folder(data, rel) for rel in data["bad"]}
    order = np.concatenate([loader.plan.indices(b)[0][loader.plan.indices(b)[1] == 1]
                            for b in range(loader.steps_per_epoch)])
    first = next(src.where(int(i)) for i in order if src.where(int(i)) in bad)
    with pytest.raises(sources.BadExampleError) as e:
        _train(loader, tmp_path / "run", steps=loader.steps_per_epoch)
    print(e.value)
    assert str(e.value).startswith(f"{first}: ") and e.value.where == first
    assert not (tmp_path / "run" / "summary.json").exists()


def test_skip_mode_trains_through_and_loses_no_good_example(data, tmp_path, caplog):
    n_good, n_bad = len(data["good"]), len(data["bad"])
    # Decoded up front (image_folder): exactly the bad files left out, every good one kept.
    eager = sources.image_folder(data["archive"], "train", on_bad="skip",
                                 cache_dir=tmp_path / "cache")
    assert eager.skipped == sorted(f"mixed.tar:train/{rel}" for rel in data["bad"])
    assert len(eager) == n_good
    assert collections.Counter(_hash(img) for img in eager.images) == data["hashes"]

    # Decoded under load (image_files + HostLoader): the bad files are met inside training.
    src = sources.image_files(data["folder"], "train")
    assert len(src) == n_good + n_bad
    loader = CountingLoader(HostLoader(src, batch_size=BATCH, mesh=make_mesh(), seed=4,
                                       drop_remainder=False, on_bad="skip"))
    steps = loader.steps_per_epoch + 2  # into the second epoch: bad files met again
    with caplog.at_level(logging.WARNING):
        _, summary = _train(loader, tmp_path / "run", steps=steps)
    print(f"skip mode: {steps} steps, {loader.num_skipped} files skipped: {loader.skipped}; "
          f"good images seen in epoch 0: {len(loader.seen[0])} of {n_good}; "
          f"final loss {summary['train']['loss']:.4f}")
    assert summary["step"] == steps and np.isfinite(summary["train"]["loss"])
    assert loader.num_skipped == n_bad
    assert summary["skipped_examples"]["count"] == n_bad  # the run's record says so too
    assert sorted(summary["skipped_examples"]["first"]) == sorted(loader.skipped)
    assert sorted(loader.skipped) == sorted(_where_folder(data, rel) for rel in data["bad"])
    # Every good image exactly once in the epoch, none lost, no bad (zeroed) row counted.
    assert collections.Counter(loader.seen[0]) == data["hashes"]
    # Each bad file is decoded and logged once, not again when the next epoch meets it.
    assert caplog.text.count("skipping bad example") == n_bad
