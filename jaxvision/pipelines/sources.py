"""Data sources: random-access collections of labelled images, checked before they reach a model.

Every source follows the random-access protocol of grain and tfds:

    len(src)   -> number of examples N
    src[i]     -> {"image": uint8 (H, W, C), "label": integer scalar in [0, num_classes)}

and carries `name` (used in error messages), `num_classes`, `image_shape` (H, W, C; a tfds shape
may contain None) and `class_names` (or None).

Sources:
- `ArraySource`: numpy arrays in memory (`.images` uint8 (N, H, W, C), `.labels` int64 (N,)), the
  form the on-device loader puts on the accelerator in one transfer.
- `digits`: scikit-learn's bundled 8x8 handwritten digits, the data set that needs no download.
- `image_folder`: a `SPLIT/CLASS/*.{jpg,jpeg,png}` tree, as a directory or a tar archive
  (the shared `cifar10-jpeg.tar.xz` is one), decoded once with Pillow and cached as `.npz`.
- `image_files`: the same tree, each file decoded when it is read (`ImageFiles`), for the host
  loader: bad files are met during training, where `HostLoader(on_bad=...)` handles them.
- `tfds_source`: a tfds data set prepared as array_record, read without TensorFlow.
- `load`: one entry point for an experiment's `data` string ("digits", "tfds:NAME" or a path).
- `as_arrays`: any source read into an ArraySource, for the on-device loader.

Bad data fails loudly: `BadExampleError` names the file (or `name[index]`) and says what was
expected and what was found. `image_folder(..., on_bad="skip")` drops bad files instead, and
reports how many and which. Grayscale and RGBA images count as bad (the sources promise RGB):
see `image_folder`.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

__all__ = [
    "ArraySource", "BadExampleError", "DatasetNotPreparedError", "ImageFiles", "TfdsSource",
    "as_arrays", "default_cache_dir", "digits", "image_files", "image_folder", "load",
    "tfds_source", "validate_example",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
ON_BAD = ("raise", "skip")
# Part of every cache key: bump it whenever decoding or the cache layout changes, so that an
# old cache can never be read as if it were produced by the new code.
CACHE_FORMAT_VERSION = 1
# Below this many images decoding takes well under a second: a progress bar would be noise.
_PROGRESS_MIN_IMAGES = 1000
# How many skipped file names a warning lists before "...".
_SKIPPED_SHOWN = 5


class BadExampleError(ValueError):
    """An example that is not what the pipeline expects; the message names where it came from.

    `where`: that name alone (a file path, "archive:member" or "name[index]"), for reports.
    """

    def __init__(self, message: str, *, where: str | None = None):
        super().__init__(message)
        self.where = where


class DatasetNotPreparedError(FileNotFoundError):
    """A known tfds data set whose prepared (array_record) files are not in the data directory."""


# ------------------------------------------------------------------------------------------------
# Validation


def validate_example(example: Any, *, where: str, image_shape: Sequence[int | None] | None = None,
                     num_classes: int | None = None) -> None:
    """Raises BadExampleError naming `where` unless `example` is a well-formed example.

    example: {"image": uint8 np.ndarray (H, W, C), "label": integer scalar}.
    image_shape: expected (H, W, C); None entries (tfds's unknown sizes) match any size.
    num_classes: labels must lie in [0, num_classes).
    """
    if not isinstance(example, Mapping) or "image" not in example or "label" not in example:
        raise BadExampleError(f"{where}: a dict with 'image' and 'label' expected, got "
                              f"{type(example).__name__} {_keys(example)}", where=where)
    image = example["image"]
    if not isinstance(image, np.ndarray):
        raise BadExampleError(f"{where}: image as a numpy array expected, got "
                              f"{type(image).__name__}", where=where)
    if image.dtype != np.uint8:
        raise BadExampleError(f"{where}: image dtype uint8 expected, got {image.dtype}",
                              where=where)
    if image.ndim != 3:
        raise BadExampleError(f"{where}: image of rank 3 (H, W, C) expected, got shape "
                              f"{image.shape}", where=where)
    if image_shape is not None and not _shape_matches(image.shape, image_shape):
        raise BadExampleError(f"{where}: image shape {tuple(image_shape)} expected, got "
                              f"{image.shape}", where=where)
    _check_label(example["label"], where=where, num_classes=num_classes)


def _keys(x: Any) -> str:
    return str(sorted(x)) if isinstance(x, Mapping) else ""


def _shape_matches(shape: tuple[int, ...], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _check_label(label: Any, *, where: str, num_classes: int | None) -> None:
    if isinstance(label, np.ndarray) and label.ndim == 0:
        label = label[()]
    # bool is an int subclass in Python, but a True label is almost surely a bug upstream.
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise BadExampleError(f"{where}: integer label expected, got {label!r} "
                              f"({type(label).__name__})", where=where)
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadExampleError(f"{where}: label in [0, {num_classes}) expected, got {label}",
                              where=where)


# ------------------------------------------------------------------------------------------------
# Arrays in memory


class ArraySource:
    """Examples held as numpy arrays.

    images: uint8 (N, H, W, C).
    labels: integer (N,), each in [0, num_classes); stored as int64.
    num_classes: defaults to len(class_names), else max(labels) + 1.
    skipped: names of bad files left out when the arrays were built (`image_folder` skip mode).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, name: str = "arrays",
                 skipped: Sequence[str] = ()):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images uint8 (N, H, W, C) expected, got {images.dtype} "
                             f"{images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels integer (N,) expected, got {labels.dtype} "
                             f"{labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        num_classes = _num_classes(labels, num_classes, class_names, name=name)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise BadExampleError(f"{name}[{i}]: label in [0, {num_classes}) expected, got "
                                  f"{labels[i]} ({bad.size} labels out of range)")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.name = name
        self.num_classes = num_classes
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.image_shape = tuple(images.shape[1:])
        self.skipped = list(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """-> {"image": uint8 (H, W, C), "label": np.int64 scalar}."""
        return {"image": self.images[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return (f"ArraySource({self.name!r}, {len(self)} images {self.image_shape}, "
                f"{self.num_classes} classes)")


def as_arrays(source: Any, *, on_bad: str = "raise") -> ArraySource:
    """Any source as an ArraySource (for the on-device loader): reads every example into memory.

    An ArraySource comes back as it is. Otherwise each `source[i]` is checked with
    `validate_example` (the image shape: `source.image_shape`, or the first example's where that
    has unknown sizes); on_bad="skip" leaves bad examples out and lists them in `.skipped`.
    Returns images uint8 (N, H, W, C), labels int64 (N,).
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {list(ON_BAD)}, got {on_bad!r}")
    if isinstance(source, ArraySource):
        return source
    shape = source.image_shape
    images, labels, skipped = [], [], []
    progress = tqdm(range(len(source)), desc=f"reading {source.name}", unit="img",
                    disable=True if len(source) <= _PROGRESS_MIN_IMAGES else None)
    for i in progress:
        where = f"{source.name}[{i}]"
        try:
            example = source[i]
            validate_example(example, where=where, image_shape=shape,
                             num_classes=source.num_classes)
        except BadExampleError:
            if on_bad == "raise":
                raise
            skipped.append(where)
            continue
        if shape is None or None in shape:
            shape = example["image"].shape  # unknown sizes: all must match the first good one
        images.append(example["image"])
        labels.append(int(example["label"]))
    if skipped:
        _warn_skipped(source.name, skipped, len(images))
    if not images:
        raise ValueError(f"{source.name}: no good examples ({len(skipped)} bad)")
    return ArraySource(np.stack(images), np.asarray(labels, np.int64),
                       num_classes=source.num_classes, class_names=source.class_names,
                       name=source.name, skipped=skipped)


def _num_classes(labels: np.ndarray, num_classes: int | None, class_names: Sequence[str] | None,
                 *, name: str) -> int:
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"{name}: num_classes={num_classes} but {len(class_names)} "
                             f"class_names")
        return len(class_names)
    if num_classes is not None:
        return int(num_classes)
    return int(labels.max()) + 1 if labels.size else 0


def _first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (int64) of the first n examples of every class, in their original order."""
    seen: collections.Counter = collections.Counter()
    keep = []
    for i, y in enumerate(labels.tolist()):
        if seen[y] < n:
            seen[y] += 1
            keep.append(i)
    return np.asarray(keep, np.int64)


# ------------------------------------------------------------------------------------------------
# Handwritten digits (scikit-learn)

DIGITS_SPLITS = ("train", "test")


def digits(split: str, *, test_fraction: float = 0.2, seed: int = 0,
           max_per_class: int | None = None) -> ArraySource:
    """scikit-learn's 1,797 handwritten digits: images uint8 (N, 8, 8, 1) in 0..255, labels 0..9.

    The split is stratified (every digit in the same proportion in both halves) and a pure
    function of (test_fraction, seed); within a split, examples keep scikit-learn's order.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"digits: unknown split {split!r}; valid splits: {list(DIGITS_SPLITS)}")
    _check_max_per_class(max_per_class)
    # Imported here: scikit-learn takes about a second to import and only this source needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    # (N, 8, 8) floats 0..16 -> (N, 8, 8, 1) uint8 0..255, the range every other source has.
    images = np.rint(data.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=labels, random_state=seed)
    idx = np.sort(train_idx if split == "train" else test_idx)
    if max_per_class is not None:
        idx = idx[_first_per_class(labels[idx], max_per_class)]
    return ArraySource(images[idx], labels[idx], class_names=[str(d) for d in range(10)],
                       name=f"digits:{split}")


# ------------------------------------------------------------------------------------------------
# Image folders and archives


@dataclasses.dataclass(frozen=True)
class _File:
    """One image file of a split, before decoding."""

    relpath: str         # "CLASS/NAME.jpg", relative to the split: sort key and class
    where: str           # what errors call it: "cifar10-jpeg.tar.xz:train/cat/0001.jpg" or a path
    data: bytes | Path   # archive members are read into memory; directory files on demand

    @property
    def class_name(self) -> str:
        return self.relpath.split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """What decoding a split gives, and what the cache stores."""

    images: np.ndarray       # uint8 (N, H, W, 3)
    labels: np.ndarray       # int64 (N,)
    class_names: list[str]
    skipped: list[str]       # `where` of every bad file left out (skip mode)


def image_folder(path: str | os.PathLike, split: str, *, on_bad: str = "raise",
                 max_per_class: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ArraySource:
    """Decodes the images of `path/SPLIT/CLASS/*.{jpg,jpeg,png}` into an ArraySource.

    path: a directory, or a .tar / .tar.gz / .tgz / .tar.xz archive of that tree (members may
      start with "./" or sit inside one top-level folder); an archive is read in one pass.
    Returns images uint8 (N, H, W, 3), labels int64 (N,) = index of the class in the sorted class
      names (the split's class directories that hold images), in sorted path order.
    on_bad: "raise" decodes the split, then stops with a BadExampleError naming the first bad
      file in sorted path order (and how many others there are); "skip" leaves bad files out,
      logs a warning and lists them in `.skipped`. Bad: empty, undecodable or truncated files,
      modes other than RGB (grayscale "L", "RGBA", palette "P", ...: the split is declared RGB
      and a silent conversion would hide a broken collection step; convert such files on purpose
      with `Image.convert("RGB")` before training), and images whose size differs from the
      split's most common size.
    max_per_class: keep only the first N files of every class (in sorted order): smoke runs.
    cache_dir: where decoded arrays are cached (default $JAXVISION_CACHE or ~/.cache/jaxvision);
      the key covers the archive's bytes (a directory's paths, sizes and mtimes), the split, on_bad
      and max_per_class, so a changed input never reads a stale cache.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {list(ON_BAD)}, got {on_bad!r}")
    _check_max_per_class(max_per_class)
    path = _existing_folder_or_archive(path)
    if path.is_dir():
        files = _list_directory(path, split, max_per_class)
        content = _directory_fingerprint(files)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        files = None  # read from the archive only if the cache misses
        content = _sha256_file(path)
    else:
        raise ValueError(f"{path}: a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive expected")
    cache_file = _cache_file(path, content, split=split, on_bad=on_bad,
                             max_per_class=max_per_class, cache_dir=cache_dir)
    decoded = _read_cache(cache_file)
    if decoded is None:
        if files is None:
            files = _scan_archive(path, split, max_per_class)
        decoded = _decode_files(files, on_bad=on_bad, name=f"{path.name}:{split}")
        _write_cache(cache_file, decoded)
    if decoded.skipped:
        _warn_skipped(f"{path.name}:{split}", decoded.skipped, len(decoded.labels))
    return ArraySource(decoded.images, decoded.labels, class_names=decoded.class_names,
                       name=f"{path.name}:{split}", skipped=decoded.skipped)


def _existing_folder_or_archive(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive not found: {path}")
    return path


def _check_max_per_class(max_per_class: int | None) -> None:
    if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class < 1):
        raise ValueError(f"max_per_class must be a positive int or None, got {max_per_class!r}")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _no_images_error(path: Path, split: str, splits_found: set[str]) -> ValueError:
    return ValueError(f"{path}: no images for split {split!r} (expected {split}/CLASS/*.jpg|png); "
                      f"splits found: {sorted(splits_found)}")


# Directories -------------------------------------------------------------------------------------


def _list_directory(root: Path, split: str, max_per_class: int | None) -> list[_File]:
    """The image files of root/split/CLASS/, the first max_per_class of each class by name."""
    split_dir = root / split
    splits = {p.name for p in root.iterdir() if p.is_dir()}
    if not split_dir.is_dir():
        raise _no_images_error(root, split, splits)
    files = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        names = sorted(p.name for p in class_dir.iterdir()
                       if p.is_file() and _is_image_name(p.name))
        for name in names[:max_per_class]:
            files.append(_File(f"{class_dir.name}/{name}", str(class_dir / name), class_dir / name))
    if not files:
        raise _no_images_error(root, split, splits)
    return files


def _directory_fingerprint(files: list[_File]) -> str:
    """sha256 over (relative path, size, mtime) of the files: cheap, and changes when they do."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        st = f.data.stat()
        h.update(f"{f.relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# Archives ----------------------------------------------------------------------------------------


def _scan_archive(path: Path, split: str, max_per_class: int | None) -> list[_File]:
    """One sequential pass over a tar archive: the image files of `split`, with their bytes.

    Members may come in any order: with max_per_class, each class keeps the first N names in
    sorted order seen so far, and a member that sorts after all of them is never read.
    """
    names: dict[tuple[str, str], list[str]] = collections.defaultdict(list)  # (root, cls) -> names
    data: dict[tuple[str, str, str], bytes] = {}        # (root, class, name) -> bytes
    splits: dict[str, set[str]] = collections.defaultdict(set)  # root -> splits holding images
    # "r|*": a stream, so compressed archives decompress once, front to back, with no seeking.
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parsed = _parse_member(member)
            if parsed is None:
                continue
            root, member_split, cls, name = parsed
            splits[root].add(member_split)
            if member_split != split:
                continue
            if (root, cls, name) in data:  # appended again to the archive: the last copy wins
                data[root, cls, name] = tar.extractfile(member).read()
                continue
            kept = names[root, cls]
            if max_per_class is None:
                kept.append(name)
            elif len(kept) < max_per_class or name < kept[-1]:
                bisect.insort(kept, name)
                if len(kept) > max_per_class:
                    data.pop((root, cls, kept.pop()))
            else:
                continue
            data[root, cls, name] = tar.extractfile(member).read()
    root = _choose_root(path, splits)
    if split not in splits.get(root, set()):
        raise _no_images_error(path, split, splits.get(root, set()))
    prefix = f"{path.name}:{root}/" if root else f"{path.name}:"
    return [_File(f"{cls}/{name}", f"{prefix}{split}/{cls}/{name}", data[root, cls, name])
            for (r, cls), kept in names.items() if r == root for name in kept]


def _parse_member(member: tarfile.TarInfo) -> tuple[str, str, str, str] | None:
    """(root, split, class, name) of an image member "[./][ROOT/]SPLIT/CLASS/NAME", else None."""
    if not member.isfile() or not _is_image_name(member.name):
        return None
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if len(parts) == 3:
        return ("", *parts)
    if len(parts) == 4:
        return tuple(parts)
    return None


def _choose_root(path: Path, splits: dict[str, set[str]]) -> str:
    """The folder that holds SPLIT/CLASS/NAME: the archive's top level, else its only folder."""
    if "" in splits or not splits:
        return ""
    if len(splits) == 1:
        return next(iter(splits))
    raise ValueError(f"{path}: images under several top-level folders {sorted(splits)}; expected "
                     f"SPLIT/CLASS/NAME at the top level or inside a single folder")


# Decoding ----------------------------------------------------------------------------------------


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 (H, W, 3). BadExampleError naming `where` if they are not that."""
    if not data:
        raise BadExampleError(f"{where}: empty file (0 bytes), expected a JPEG or PNG image",
                              where=where)
    try:
        with Image.open(io.BytesIO(data)) as img:
            # open() reads only the header; load() decodes every byte, so a truncated or corrupt
            # file fails here and not later inside a training step.
            img.load()
            mode, array = img.mode, np.asarray(img)
    # Pillow reports broken data as OSError, SyntaxError, ValueError, EOFError or struct.error
    # depending on the codec and where the bytes break: any failure here means "not decodable".
    except Exception as e:  # noqa: BLE001
        raise BadExampleError(f"{where}: cannot decode ({type(e).__name__}: {e}), expected a "
                              f"complete JPEG or PNG image", where=where) from e
    if mode != "RGB":
        raise BadExampleError(f"{where}: mode {mode}, expected RGB", where=where)
    return array


def _decode_files(files: list[_File], *, on_bad: str, name: str) -> _Decoded:
    """Decodes files in sorted path order; every image must have the split's common size."""
    files = sorted(files, key=lambda f: f.relpath)
    class_names = sorted({f.class_name for f in files})
    label_of = {c: i for i, c in enumerate(class_names)}
    good: list[tuple[_File, np.ndarray]] = []
    progress = tqdm(files, desc=f"decoding {name}", unit="img",
                    disable=True if len(files) <= _PROGRESS_MIN_IMAGES else None)
    errors: list[BadExampleError] = []
    for f in progress:
        try:
            good.append((f, _decode_image(_read_bytes(f.data), f.where)))
        except BadExampleError as e:
            errors.append(e)
    good, wrong_size = _split_by_size(good)
    # Both kinds in path order: an image of the wrong size can sort before an undecodable one.
    errors = sorted(errors + wrong_size, key=lambda e: e.where)
    if errors and on_bad == "raise":
        raise _first_of(errors)
    skipped = [e.where for e in errors]
    if not good:
        raise ValueError(f"{name}: all {len(files)} images are bad: {skipped[:_SKIPPED_SHOWN]}")
    return _Decoded(images=np.stack([img for _, img in good]),
                    labels=np.asarray([label_of[f.class_name] for f, _ in good], np.int64),
                    class_names=class_names, skipped=skipped)


def _first_of(errors: list[BadExampleError]) -> BadExampleError:
    """The first bad file's error, its message extended with how many others there are."""
    first = errors[0]
    if len(errors) == 1:
        return first
    others = [e.where for e in errors[1:]]
    shown = ", ".join(others[:_SKIPPED_SHOWN]) + (", ..." if len(others) > _SKIPPED_SHOWN else "")
    return BadExampleError(f"{first} [the first of {len(errors)} bad files in path order; the "
                           f"others: {shown}; on_bad='skip' leaves them out]", where=first.where)


def _read_bytes(data: bytes | Path) -> bytes:
    return data if isinstance(data, bytes) else data.read_bytes()


class _WrongSize(BadExampleError):
    def __init__(self, where: str, expected: tuple[int, int], found: tuple[int, int]):
        (eh, ew), (h, w) = expected, found
        super().__init__(f"{where}: size {ew}x{eh} expected, got {w}x{h} (width x height)",
                         where=where)


def _split_by_size(decoded: list[tuple[_File, np.ndarray]]
                   ) -> tuple[list[tuple[_File, np.ndarray]], list[_WrongSize]]:
    """Keeps the images of the most common (H, W); the others become errors, in path order.

    Most common rather than first: one odd image that happens to sort first must not make every
    other image "wrong". Ties go to the size that appears first (Counter keeps that order).
    """
    if not decoded:
        return [], []
    sizes = collections.Counter(img.shape[:2] for _, img in decoded)
    expected = sizes.most_common(1)[0][0]
    good = [(f, img) for f, img in decoded if img.shape[:2] == expected]
    bad = [_WrongSize(f.where, expected, img.shape[:2]) for f, img in decoded
           if img.shape[:2] != expected]
    return good, bad


def _warn_skipped(name: str, skipped: list[str], kept: int) -> None:
    shown = ", ".join(skipped[:_SKIPPED_SHOWN]) + (", ..." if len(skipped) > _SKIPPED_SHOWN else "")
    logger.warning("%s: skipped %d bad image(s), kept %d: %s", name, len(skipped), kept, shown)


# Decoded when read -------------------------------------------------------------------------------


class ImageFiles:
    """The image files of one split, each decoded when it is read: `src[i]` decodes file i.

    For the host loader: nothing is decoded up front (no cache, no wait), and a bad file is met
    when a batch needs it, during training. `src[i]` raises a BadExampleError naming the file, by
    the same rules as `image_folder` (empty, undecodable, not RGB, or not `image_shape`), which
    `HostLoader(on_bad="skip")` turns into a masked row. Files keep `image_folder`'s order and
    labels (sorted paths; label = index of the class in the sorted class names). Archive members
    are held in memory as their encoded bytes (55 MB for the shared CIFAR-10 archive); the files
    of a directory are read from disk on each access.
    """

    def __init__(self, files: list[_File], *, name: str, image_size: tuple[int, int]):
        self._files = sorted(files, key=lambda f: f.relpath)
        self.class_names = sorted({f.class_name for f in self._files})
        label_of = {c: i for i, c in enumerate(self.class_names)}
        self._labels = [label_of[f.class_name] for f in self._files]
        self.name = name
        self.num_classes = len(self.class_names)
        self.image_shape = (*image_size, 3)

    def __len__(self) -> int:
        return len(self._files)

    def where(self, i: int) -> str:
        """The file of example i, as errors and skip reports name it."""
        return self._files[i].where

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """-> {"image": uint8 (H, W, 3), "label": np.int64 scalar}; BadExampleError naming the
        file if it is not an RGB image of `image_shape`."""
        f = self._files[i]
        image = _decode_image(_read_bytes(f.data), f.where)
        if image.shape[:2] != self.image_shape[:2]:
            raise _WrongSize(f.where, self.image_shape[:2], image.shape[:2])
        return {"image": image, "label": np.int64(self._labels[i])}

    def __repr__(self) -> str:
        return f"ImageFiles({self.name!r}, {len(self)} files, {self.image_shape})"


# Files decoded to find the common image size when `image_files` is not told it.
_SIZE_PROBES = 32


def image_files(path: str | os.PathLike, split: str, *, max_per_class: int | None = None,
                image_size: tuple[int, int] | None = None) -> ImageFiles:
    """The files of `path/SPLIT/CLASS/*.{jpg,jpeg,png}` (a directory or a tar archive, as for
    `image_folder`), decoded one at a time when read: see `ImageFiles`.

    image_size: (H, W) every image must have. None: the most common size among up to 32 files
      spread evenly over the split (bad files among them are passed over), so one odd file
      cannot set it, as in `image_folder`.
    """
    _check_max_per_class(max_per_class)
    path = _existing_folder_or_archive(path)
    if path.is_dir():
        files = _list_directory(path, split, max_per_class)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        files = _scan_archive(path, split, max_per_class)
    else:
        raise ValueError(f"{path}: a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive expected")
    name = f"{path.name}:{split}"
    if image_size is None:
        image_size = _probe_size(sorted(files, key=lambda f: f.relpath), name=name)
    return ImageFiles(files, name=name, image_size=tuple(image_size))


def _probe_size(files: list[_File], *, name: str) -> tuple[int, int]:
    """The most common (H, W) among up to `_SIZE_PROBES` evenly spread files that decode."""
    picks = np.unique(np.linspace(0, len(files) - 1, min(_SIZE_PROBES, len(files))).astype(int))
    sizes: collections.Counter = collections.Counter()
    for i in picks:
        try:
            sizes[_decode_image(_read_bytes(files[i].data), files[i].where).shape[:2]] += 1
        except BadExampleError:
            continue
    if not sizes:
        raise ValueError(f"{name}: none of the {len(picks)} files probed for the image size "
                         f"decodes as an RGB image; pass image_size=(H, W)")
    return sizes.most_common(1)[0][0]


# Cache -------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$JAXVISION_CACHE if set, else ~/.cache/jaxvision."""
    env = os.environ.get("JAXVISION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxvision"


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cache_file(path: Path, content: str, *, split: str, on_bad: str, max_per_class: int | None,
                cache_dir: str | os.PathLike | None) -> Path:
    key = json.dumps({"version": CACHE_FORMAT_VERSION, "content": content, "split": split,
                      "on_bad": on_bad, "max_per_class": max_per_class}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    # The readable part of the name is only for people looking at the directory.
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"{path.name}-{split}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{stem}-{digest}.npz"


def _read_cache(file: Path) -> _Decoded | None:
    """The cached arrays, or None if there are none (or they cannot be read)."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            return _Decoded(images=z["images"], labels=z["labels"],
                            class_names=[str(c) for c in z["class_names"]],
                            skipped=[str(s) for s in z["skipped"]])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable cache %s (%s): decoding again", file, e)
        return None


def _write_cache(file: Path, decoded: _Decoded) -> None:
    """Writes the arrays to a temporary file, then renames it: a reader sees all or nothing."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp",
                                         delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, images=decoded.images, labels=decoded.labels,
                     class_names=np.asarray(decoded.class_names, dtype=str),
                     skipped=np.asarray(decoded.skipped, dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # NamedTemporaryFile makes 0600; a shared cache should be readable
        os.replace(tmp, file)
    except OSError as e:
        logger.warning("cannot write the image cache %s (%s): continuing without it", file, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# tensorflow-datasets (array_record, no TensorFlow)


class TfdsSource:
    """A tfds random-access data source, as {"image": uint8 (H, W, C), "label": int} numpy."""

    def __init__(self, source: Any, *, name: str, num_classes: int,
                 class_names: list[str] | None, image_shape: tuple[int | None, ...]):
        self._source = source
        self.name = name
        self.num_classes = num_classes
        self.class_names = class_names
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        # One index at a time, never `__getitems__`: tfds's mock raises TypeError on it.
        example = self._source[int(i)]
        return {"image": np.asarray(example["image"]),
                "label": np.asarray(example["label"])[()]}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} images {self.image_shape})"


def tfds_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> TfdsSource:
    """The `split` of tfds data set `name` (prepared as array_record in data_dir), without TF.

    Same data as `tfds.data_source(name, split=split, data_dir=data_dir, download=False)`: the
    builder is made first so its info (classes, image shape) is at hand and an unprepared data
    set gets a clear error instead of an attempt to download and prepare it (which needs TF).
    """
    # Imported here: tfds takes ~1 s to import and most runs read image folders instead.
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # `from None`: tfds's own message lists every registered data set, hundreds of lines.
        raise ValueError(f"unknown tfds data set {name!r} (not registered in tensorflow_datasets "
                         f"and not found in data_dir={data_dir})") from None
    try:
        source = builder.as_data_source(split=split)
    # Asked before is_prepared(): tfds's mock_data serves data that is_prepared() says is absent.
    # Errors of a prepared data set (an unknown split, say) pass through unchanged.
    except Exception as e:  # noqa: BLE001
        if builder.is_prepared():
            raise
        message = _not_prepared_message(name, data_dir, builder.data_dir)
        raise DatasetNotPreparedError(message) from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"tfds:{name}: features 'image' and 'label' expected, got "
                         f"{sorted(features.keys())}")
    label = features["label"]
    return TfdsSource(source, name=f"tfds:{name}/{split}", num_classes=int(label.num_classes),
                      class_names=list(label.names), image_shape=tuple(features["image"].shape))


def _not_prepared_message(name: str, data_dir: Any, looked_in: Any) -> str:
    where = data_dir if data_dir is not None else "the default data_dir ($TFDS_DATA_DIR or " \
                                                  "~/tensorflow_datasets)"
    return (f"tfds data set {name!r} is not prepared in {where} (looked in {looked_in}). "
            f"Preparing a tfds data set needs TensorFlow, once: `pip install jaxvision[tf]; "
            f"tfds build {name} --file_format=array_record --data_dir=DIR`. Or copy prepared "
            f"array_record files into data_dir, or use an image folder or archive instead "
            f"(data='path/to/images.tar.xz').")


# ------------------------------------------------------------------------------------------------
# One entry point for experiments


def load(spec: str, split: str, *, data_dir: str | os.PathLike | None = None,
         on_bad: str = "raise", max_per_class: int | None = None,
         cache_dir: str | os.PathLike | None = None) -> ArraySource | TfdsSource:
    """The source an experiment's `data` string names.

    "digits" -> `digits(split)`; "tfds:NAME" -> `tfds_source(NAME, split, data_dir=...)`; anything
    else is the path of an image folder or archive -> `image_folder(path, split, ...)`.
    max_per_class applies to digits and image folders; tfds sources refuse it (selecting per class
    would mean reading every label), and their bad examples are handled by the loader (on_bad).
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {list(ON_BAD)}, got {on_bad!r}")
    if spec == "digits":
        return digits(split, max_per_class=max_per_class)
    if spec.startswith("tfds:"):
        if max_per_class is not None:
            raise ValueError(f"{spec}: max_per_class is not supported for tfds sources")
        return tfds_source(spec[len("tfds:"):], split, data_dir=data_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r}: no such file or directory (expected 'digits', "
                                f"'tfds:NAME', or the path of an image folder or archive)")
    return image_folder(path, split, on_bad=on_bad, max_per_class=max_per_class,
                        cache_dir=cache_dir)
