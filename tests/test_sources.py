"""Tests of jaxvision.pipelines.sources: every source gives the same, exact data, and every kind
of bad input fails with an error that names the file."""
import io
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvision.pipelines import sources

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.xz"

# Written in this order on purpose: labels must follow the sorted names, not creation order.
CLASSES = ("zebra", "ant", "cat")
SORTED_CLASSES = sorted(CLASSES)
PER_CLASS = 4
SIZE = 8  # images are SIZE x SIZE RGB


def pixels(cls: str, i: int, split: str = "train") -> np.ndarray:
    """A distinct, known uint8 (SIZE, SIZE, 3) image for every (split, class, index)."""
    seed = CLASSES.index(cls) * 100 + i + (50 if split == "test" else 0)
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def good_files(splits=("train", "test")) -> dict[str, bytes]:
    """relative path -> PNG bytes: SPLIT/CLASS/NNNN.png, PER_CLASS per class."""
    return {f"{split}/{cls}/{i:04d}.png": png_bytes(pixels(cls, i, split))
            for split in splits for cls in CLASSES for i in range(PER_CLASS)}


def expected_arrays(split="train", per_class=PER_CLASS):
    """The images (N, SIZE, SIZE, 3) and labels (N,) a correct reader returns, built directly."""
    images = [pixels(cls, i, split) for cls in SORTED_CLASSES for i in range(per_class)]
    labels = [k for k in range(len(SORTED_CLASSES)) for _ in range(per_class)]
    return np.stack(images), np.asarray(labels)


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes], *, prefix: str = "",
              reverse: bool = False) -> Path:
    """A tar archive (compression from the suffix) of `files`, names prefixed with `prefix`."""
    mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz"}[path.suffix]
    items = sorted(files.items(), reverse=reverse)
    with tarfile.open(path, mode) as tar:
        for rel, data in items:
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Tests never touch ~/.cache: the default cache dir is a fresh temporary one."""
    monkeypatch.setenv("JAXVISION_CACHE", str(tmp_path / "default_cache"))


@pytest.fixture
def decode_count(monkeypatch):
    """Counts calls of the image decoder."""
    calls = []
    original = sources._decode_image

    def counting(data, where):
        calls.append(where)
        return original(data, where)

    monkeypatch.setattr(sources, "_decode_image", counting)
    return calls


# ------------------------------------------------------------------------------------------------
# Image folders and archives: same data from every container


@pytest.mark.parametrize("container", ["dir", "a.tar", "a.tar.gz", "a.tgz", "a.tar.xz",
                                       "dot_prefix.tar", "top_folder.tar.gz", "reversed.tar"])
def test_image_folder_gives_exact_pixels_and_sorted_labels(tmp_path, container):
    files = good_files()
    if container == "dir":
        path = write_dir(tmp_path / "tree", files)
    else:
        prefix = {"dot_prefix.tar": "./", "top_folder.tar.gz": "./mydata/"}.get(container, "")
        path = write_tar(tmp_path / container, files, prefix=prefix,
                         reverse=container == "reversed.tar")
    for split in ("train", "test"):
        src = sources.image_folder(path, split, cache_dir=tmp_path / "cache")
        images, labels = expected_arrays(split)
        np.testing.assert_array_equal(src.images, images)
        np.testing.assert_array_equal(src.labels, labels)
        assert src.class_names == ["ant", "cat", "zebra"]
        assert src.num_classes == 3 and src.image_shape == (SIZE, SIZE, 3)
        assert src.images.dtype == np.uint8 and src.labels.dtype == np.int64
        assert src.skipped == [] and src.num_skipped == 0
        assert src.name == f"{path.name}:{split}"
        example = src[5]
        np.testing.assert_array_equal(example["image"], images[5])
        assert example["label"] == labels[5]
        sources.validate_example(example, where="x", image_shape=src.image_shape, num_classes=3)


def test_jpeg_images_decode_like_pillow(tmp_path):
    array = pixels("cat", 0)
    data = jpeg_bytes(array)
    path = write_dir(tmp_path / "tree", {"train/cat/0.jpg": data, "train/dog/1.JPEG": data})
    src = sources.image_folder(path, "train", cache_dir=tmp_path / "cache")
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(src.images, np.stack([reference, reference]))
    assert src.class_names == ["cat", "dog"]


def test_other_files_are_ignored(tmp_path):
    files = good_files(["train"])
    files["README.md"] = b"hello"
    files["train/ant/notes.txt"] = b"not an image"
    files["train/loose.png"] = png_bytes(pixels("cat", 0))  # not inside a class folder
    for path in (write_dir(tmp_path / "tree", files), write_tar(tmp_path / "a.tar", files)):
        src = sources.image_folder(path, "train", cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(src.images, expected_arrays()[0])


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_max_per_class_keeps_first_files_in_sorted_order(tmp_path, kind, decode_count):
    files = good_files(["train"])
    path = (write_dir(tmp_path / "tree", files) if kind == "dir"
            else write_tar(tmp_path / "a.tar", files, reverse=True))  # worst case order
    src = sources.image_folder(path, "train", max_per_class=2, cache_dir=tmp_path / "cache")
    images, labels = expected_arrays(per_class=2)
    np.testing.assert_array_equal(src.images, images)
    np.testing.assert_array_equal(src.labels, labels)
    assert len(decode_count) == 2 * len(CLASSES)  # the others are never decoded


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_max_per_class_must_be_positive_int(tmp_path, bad):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    with pytest.raises(ValueError, match="max_per_class"):
        sources.image_folder(path, "train", max_per_class=bad, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------
# Cache


@pytest.mark.parametrize("kind", ["dir", "a.tar.xz"])
def test_second_load_reads_cache_without_decoding(tmp_path, kind, decode_count):
    files = good_files()
    path = (write_dir(tmp_path / "tree", files) if kind == "dir"
            else write_tar(tmp_path / kind, files))
    cache = tmp_path / "cache"
    first = sources.image_folder(path, "train", cache_dir=cache)
    assert len(decode_count) == len(CLASSES) * PER_CLASS
    assert len(list(cache.glob("*.npz"))) == 1
    second = sources.image_folder(path, "train", cache_dir=cache)
    assert len(decode_count) == len(CLASSES) * PER_CLASS  # no decode the second time
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.class_names == first.class_names
    # Another split or max_per_class is another cache entry, not a stale hit.
    sources.image_folder(path, "test", cache_dir=cache)
    sources.image_folder(path, "train", max_per_class=1, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 3
    assert len(decode_count) == 2 * len(CLASSES) * PER_CLASS + len(CLASSES)


def test_cache_key_follows_archive_content(tmp_path, decode_count):
    path = write_tar(tmp_path / "a.tar", good_files(["train"]))
    cache = tmp_path / "cache"
    sources.image_folder(path, "train", cache_dir=cache)
    changed = good_files(["train"])
    changed["train/ant/0000.png"] = png_bytes(np.zeros((SIZE, SIZE, 3), np.uint8))
    write_tar(path, changed)  # same name, same member list, new bytes
    src = sources.image_folder(path, "train", cache_dir=cache)
    assert len(decode_count) == 2 * len(CLASSES) * PER_CLASS
    assert src.images[0].max() == 0


def test_default_cache_dir_is_jaxvision_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXVISION_CACHE", str(tmp_path / "env_cache"))
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    sources.image_folder(path, "train")
    assert len(list((tmp_path / "env_cache").glob("*.npz"))) == 1


def test_failed_cache_write_leaves_nothing_loadable(tmp_path, monkeypatch, caplog):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    cache = tmp_path / "cache"

    def crash(file, **arrays):  # a write that dies half way, like a full disk
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(sources.np, "savez", crash)
    src = sources.image_folder(path, "train", cache_dir=cache)
    np.testing.assert_array_equal(src.images, expected_arrays()[0])
    assert list(cache.iterdir()) == []  # no cache, no temporary file left behind
    assert "cannot write the image cache" in caplog.text


def test_unwritable_cache_dir_warns_and_continues(tmp_path, caplog):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache directory would go")
    src = sources.image_folder(path, "train", cache_dir=blocker / "cache")
    np.testing.assert_array_equal(src.images, expected_arrays()[0])
    assert "continuing without it" in caplog.text


def test_corrupt_cache_file_is_ignored(tmp_path, decode_count, caplog):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    cache = tmp_path / "cache"
    sources.image_folder(path, "train", cache_dir=cache)
    [cached] = cache.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    src = sources.image_folder(path, "train", cache_dir=cache)
    np.testing.assert_array_equal(src.images, expected_arrays()[0])
    assert len(decode_count) == 2 * len(CLASSES) * PER_CLASS
    assert "unreadable cache" in caplog.text


# ------------------------------------------------------------------------------------------------
# Bad files

_GOOD = pixels("cat", 0)
BAD_FILES = {
    # name -> (bytes, fragment of the expected message)
    "corrupt": (b"\x89PNG\r\n\x1a\n but then garbage" * 4, "cannot decode"),
    "truncated_jpeg": (jpeg_bytes(_GOOD)[:300], "cannot decode"),
    "truncated_png": (png_bytes(_GOOD)[:-30], "cannot decode"),
    "empty": (b"", "empty file (0 bytes)"),
    "grayscale": (png_bytes(_GOOD[..., 0]), "mode L, expected RGB"),
    "rgba": (png_bytes(np.dstack([_GOOD, _GOOD[..., :1]])), "mode RGBA, expected RGB"),
    "wrong_size": (png_bytes(np.zeros((SIZE, SIZE - 1, 3), np.uint8)),
                   f"size {SIZE}x{SIZE} expected, got {SIZE - 1}x{SIZE}"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("container", ["dir", "a.tar.gz"])
def test_bad_file_raises_naming_it(tmp_path, kind, container):
    data, message = BAD_FILES[kind]
    files = good_files(["train"])
    files["train/cat/0002.png"] = data
    if container == "dir":
        path = write_dir(tmp_path / "tree", files)
        where = str(path / "train/cat/0002.png")
    else:
        path = write_tar(tmp_path / container, files, prefix="./")
        where = f"{container}:train/cat/0002.png"
    with pytest.raises(sources.BadExampleError, match=re.escape(where) + ".*" + re.escape(message)):
        sources.image_folder(path, "train", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))  # a failed load caches nothing


def test_odd_size_sorting_first_is_the_one_reported(tmp_path):
    """The expected size is the common one, even if the odd image comes first in sorted order."""
    files = good_files(["train"])
    files["train/ant/0000.png"] = BAD_FILES["wrong_size"][0]
    path = write_dir(tmp_path / "tree", files)
    with pytest.raises(sources.BadExampleError, match=r"ant/0000\.png: size 8x8 expected, got 7x8"):
        sources.image_folder(path, "train", cache_dir=tmp_path / "cache")


def test_skip_mode_drops_exactly_the_bad_files(tmp_path, caplog):
    files = good_files(["train"])
    bad_names = [f"train/{cls}/bad_{kind}.png"
                 for kind, cls in zip(BAD_FILES, CLASSES * 3)]
    for name, (data, _) in zip(bad_names, BAD_FILES.values()):
        files[name] = data
    path = write_tar(tmp_path / "a.tar.xz", files)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        src = sources.image_folder(path, "train", on_bad="skip", cache_dir=cache)
    images, labels = expected_arrays()
    np.testing.assert_array_equal(src.images, images)  # every good image, in order
    np.testing.assert_array_equal(src.labels, labels)
    assert src.num_skipped == len(BAD_FILES)
    assert src.skipped == sorted(f"a.tar.xz:{n}" for n in bad_names)
    assert f"skipped {len(BAD_FILES)} bad image(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cached = sources.image_folder(path, "train", on_bad="skip", cache_dir=cache)
    assert cached.skipped == src.skipped  # the cache remembers what it skipped
    assert f"skipped {len(BAD_FILES)} bad image(s)" in caplog.text
    with pytest.raises(sources.BadExampleError):  # raise mode has its own cache entry
        sources.image_folder(path, "train", cache_dir=cache)


def test_on_bad_must_be_raise_or_skip(tmp_path):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    with pytest.raises(ValueError, match="on_bad"):
        sources.image_folder(path, "train", on_bad="ignore")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.tar.xz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        sources.image_folder(missing, "train")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        sources.load(str(missing), "train")


@pytest.mark.parametrize("container", ["dir", "a.tar"])
def test_unknown_split_lists_the_splits_found(tmp_path, container):
    files = good_files()
    path = (write_dir(tmp_path / "tree", files) if container == "dir"
            else write_tar(tmp_path / container, files))
    with pytest.raises(ValueError, match=r"no images for split 'val'.*\['test', 'train'\]"):
        sources.image_folder(path, "val")


def test_split_without_images(tmp_path):
    path = write_dir(tmp_path / "tree", good_files(["train"]))
    (path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"tree: no images for split 'val'.*\['train', 'val'\]"):
        sources.image_folder(path, "val")


def test_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"zip")
    with pytest.raises(ValueError, match="archive expected"):
        sources.image_folder(path, "train")


# ------------------------------------------------------------------------------------------------
# validate_example and ArraySource


def test_validate_example_accepts_good_examples():
    image = np.zeros((4, 5, 3), np.uint8)
    for label in (0, 9, np.int64(3), np.int32(3), np.asarray(2)):
        sources.validate_example({"image": image, "label": label}, where="w",
                                 image_shape=(4, 5, 3), num_classes=10)
    # None in the expected shape (tfds) matches any size.
    sources.validate_example({"image": image, "label": 1}, where="w", image_shape=(None, None, 3))


@pytest.mark.parametrize("example, message", [
    ({"image": np.zeros((4, 5, 3), np.float32), "label": 0}, "dtype uint8 expected, got float32"),
    ({"image": np.zeros((4, 5), np.uint8), "label": 0}, r"rank 3 \(H, W, C\) expected"),
    ({"image": np.zeros((5, 4, 3), np.uint8), "label": 0},
     r"shape \(4, 5, 3\) expected, got \(5, 4, 3\)"),
    ({"image": np.zeros((4, 5, 3), np.uint8), "label": 10}, r"label in \[0, 10\) expected, got 10"),
    ({"image": np.zeros((4, 5, 3), np.uint8), "label": -1}, r"label in \[0, 10\) expected, got -1"),
    ({"image": np.zeros((4, 5, 3), np.uint8), "label": 1.0}, "integer label expected"),
    ({"image": np.zeros((4, 5, 3), np.uint8), "label": True}, "integer label expected"),
    ({"image": [[0]], "label": 0}, "numpy array expected"),
    ({"label": 0}, "'image' and 'label' expected"),
])
def test_validate_example_rejects(example, message):
    with pytest.raises(sources.BadExampleError, match=r"^mnist\[7\]: .*" + message):
        sources.validate_example(example, where="mnist[7]", image_shape=(4, 5, 3), num_classes=10)


def test_array_source_round_trip():
    images = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    src = sources.ArraySource(images, [1, 0], class_names=["a", "b"], name="tiny")
    assert len(src) == 2 and src.num_classes == 2 and src.image_shape == (3, 4, 1)
    np.testing.assert_array_equal(src[0]["image"], images[0])
    assert src[0]["label"] == 1 and isinstance(src[0]["label"], np.int64)
    assert src.images is images  # no copy: the on-device loader transfers these arrays as they are
    assert sources.ArraySource(images, [1, 4]).num_classes == 5


def test_array_source_names_first_bad_label():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    with pytest.raises(sources.BadExampleError,
                       match=r"^tiny\[2\]: label in \[0, 3\) expected, got 7 \(2 labels"):
        sources.ArraySource(images, [0, 2, 7, -1], num_classes=3, name="tiny")


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((2, 2, 2, 3), np.float32), [0, 1], "images uint8"),
    (np.zeros((2, 2, 3), np.uint8), [0, 1], "images uint8"),
    (np.zeros((2, 2, 2, 3), np.uint8), [0.0, 1.0], "labels integer"),
    (np.zeros((2, 2, 2, 3), np.uint8), [0, 1, 1], "2 images but 3 labels"),
])
def test_array_source_rejects_bad_arrays(images, labels, message):
    with pytest.raises(ValueError, match=message):
        sources.ArraySource(images, np.asarray(labels))


class _ListSource:
    """A minimal non-array source: a list of examples with the source attributes."""

    def __init__(self, examples, image_shape=(None, None, 3)):
        self.examples, self.image_shape = examples, image_shape
        self.name, self.num_classes, self.class_names = "listed", 3, ["a", "b", "c"]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_as_arrays_reads_and_checks_every_example(caplog):
    good = [{"image": np.full((2, 3, 3), i, np.uint8), "label": i % 3} for i in range(5)]
    src = sources.as_arrays(_ListSource(good))
    np.testing.assert_array_equal(src.images, np.stack([e["image"] for e in good]))
    np.testing.assert_array_equal(src.labels, [0, 1, 2, 0, 1])
    assert src.class_names == ["a", "b", "c"] and src.name == "listed"
    assert sources.as_arrays(src) is src
    bad = good[:2] + [{"image": np.zeros((3, 3, 3), np.uint8), "label": 0},  # size of none other
                      {"image": good[3]["image"], "label": 3}] + good[4:]   # label out of range
    with pytest.raises(sources.BadExampleError, match=r"^listed\[2\]: image shape"):
        sources.as_arrays(_ListSource(bad))
    skipped = sources.as_arrays(_ListSource(bad), on_bad="skip")
    np.testing.assert_array_equal(skipped.images, np.stack([good[i]["image"] for i in (0, 1, 4)]))
    assert skipped.skipped == ["listed[2]", "listed[3]"]
    assert "skipped 2 bad image(s)" in caplog.text


# ------------------------------------------------------------------------------------------------
# Digits


def test_digits():
    from sklearn.datasets import load_digits

    train, test = sources.digits("train"), sources.digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    for src in (train, test):
        assert src.images.dtype == np.uint8 and src.images.shape[1:] == (8, 8, 1)
        assert src.image_shape == (8, 8, 1) and src.num_classes == 10
    both = np.concatenate([train.images, test.images])
    assert both.min() == 0 and both.max() == 255
    # Together the splits are exactly scikit-learn's digits, scaled by 255/16.
    reference = load_digits()
    scaled = np.rint(reference.images * 255 / 16).astype(np.uint8)[..., None]
    key = lambda images, labels: sorted(zip(labels.tolist(), map(bytes, images)))  # noqa: E731
    assert key(both, np.concatenate([train.labels, test.labels])) == key(scaled, reference.target)
    # Stratified: each digit is ~20% test.
    np.testing.assert_allclose(np.bincount(test.labels) / np.bincount(reference.target), 0.2,
                               atol=0.02)
    again = sources.digits("test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    assert test.name == "digits:test"
    other_seed = sources.digits("test", seed=1)
    assert not np.array_equal(other_seed.images, test.images)


def test_digits_unknown_split():
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        sources.digits("validation")


def test_digits_max_per_class():
    src = sources.load("digits", "train", max_per_class=3)
    np.testing.assert_array_equal(np.bincount(src.labels), [3] * 10)


# ------------------------------------------------------------------------------------------------
# tfds


def test_tfds_mock_cifar10():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        src = sources.load("tfds:cifar10", "train")
        assert isinstance(src, sources.TfdsSource)
        assert len(src) == 6 and src.name == "tfds:cifar10/train"
        assert src.num_classes == 10 and len(src.class_names) == 10
        assert src.image_shape == (32, 32, 3)
        for i in range(len(src)):
            example = src[i]
            assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
            sources.validate_example(example, where=f"{src.name}[{i}]",
                                     image_shape=src.image_shape, num_classes=src.num_classes)
        arrays = sources.as_arrays(src)
    assert arrays.images.shape == (6, 32, 32, 3) and arrays.num_classes == 10


def test_tfds_unknown_name():
    with pytest.raises(ValueError, match="unknown tfds data set 'no_such_data_set_xyz'"):
        sources.tfds_source("no_such_data_set_xyz", "train")


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as info:
        sources.tfds_source("cifar10", "train", data_dir=tmp_path)
    message = str(info.value)
    for fragment in ("'cifar10'", str(tmp_path), "TensorFlow", "tfds build cifar10",
                     "--file_format=array_record", "image folder"):
        assert fragment in message
    assert list(tmp_path.iterdir()) == []  # no attempt to download or prepare


def test_tfds_real_array_record_reader(tmp_path):
    """A tiny data set prepared as array_record here, then read back by name without TF."""
    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):  # PIL images: encoding numpy arrays would need TensorFlow
                yield i, {"image": Image.fromarray(np.full((4, 6, 3), 10 * i, np.uint8)),
                          "label": i % 3}

    TinyShapes(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    src = sources.tfds_source("tiny_shapes", "train", data_dir=tmp_path)
    assert len(src) == 5 and src.class_names == ["a", "b", "c"] and src.num_classes == 3
    assert src.image_shape == (None, None, 3)
    seen = sorted((int(src[i]["label"]), int(src[i]["image"][0, 0, 0])) for i in range(5))
    assert seen == sorted((i % 3, 10 * i) for i in range(5))  # tfds shuffles when it prepares
    for i in range(5):
        sources.validate_example(src[i], where=f"{src.name}[{i}]", image_shape=src.image_shape,
                                 num_classes=3)
    with pytest.raises(ValueError, match="Unknown split 'bogus'"):
        sources.tfds_source("tiny_shapes", "bogus", data_dir=tmp_path)


def test_tfds_needs_no_tensorflow():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "import tensorflow_datasets as tfds\n"
        "from jaxvision.pipelines import sources\n"
        "with tfds.testing.mock_data(num_examples=3):\n"
        "    src = sources.tfds_source('cifar10', 'test')\n"
        "    example = src[0]\n"
        "assert example['image'].dtype == np.uint8, example['image'].dtype\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------------
# load() and the real archive


def test_load_dispatches(tmp_path):
    assert sources.load("digits", "test").name == "digits:test"
    path = write_tar(tmp_path / "a.tgz", good_files(["train"]))
    src = sources.load(str(path), "train", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(src.images, expected_arrays()[0])
    with pytest.raises(ValueError, match="max_per_class"):
        sources.load("tfds:cifar10", "train", max_per_class=2)


@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason=f"{CIFAR_ARCHIVE} is absent")
def test_real_cifar10_archive(tmp_path):
    src = sources.image_folder(CIFAR_ARCHIVE, "test", max_per_class=2, cache_dir=tmp_path)
    assert len(src) == 20 and src.images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(src.labels, np.repeat(np.arange(10), 2))
    assert src.class_names[0] == "airplane" and src.class_names[-1] == "truck"
    assert src.name == "cifar10-jpeg.tar.xz:test"
    assert 60 < src.images.mean() < 190  # real photographs, not blank decodes
