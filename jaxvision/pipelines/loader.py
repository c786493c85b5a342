"""Loaders: batches of `{"image": uint8 [B, H, W, C], "label": int32 [B], "mask": float32 [B]}` as
global arrays on a device mesh, in an order that is a pure function of (seed, epoch).

Two loaders share one batch plan (`BatchPlan`), so they give the same batches:
- `HostLoader` reads any random-access source (tfds, image folder, arrays) example by example on
  the host, checks each example, and prefetches batches in a background thread. Several processes
  each read only their own rows of every global batch.
- `DeviceLoader` is the fast path for data sets that fit in accelerator memory (digits, CIFAR):
  the whole data set is put on the devices once and each batch is a gather inside `jit`.
Both yield uint8 images; normalisation and augmentation happen inside the jitted train step
(`jaxvision.pipelines.augment`), on the device, with `jax.random` keys derived from the step.

The data position is the index of the next global batch. It is saved in checkpoints
(`state_dict`) and a resumed run calls `iterate(start=position)`, so it sees exactly the batch it
would have seen without the interruption.

Partial batches: with `drop_remainder=False` (always used for evaluation) the last batch of an
epoch is padded to the full size with `mask == 0` rows, so shapes never change (no recompile) and
every example counts exactly once in masked sums.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxvision import sharding as shd
from jaxvision.pipelines import sources as sources_lib

Batch = dict[str, jax.Array]


def epoch_permutation(num_examples: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: int64 [num_examples], a function of (seed, epoch) only."""
    if not shuffle:
        return np.arange(num_examples)
    # A fresh generator per (seed, epoch): no hidden RNG state to save, any epoch is computable
    # directly on resume, and every process computes the same order without communicating.
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples make global batch number `b` (b counts across epochs)."""

    num_examples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_remainder: bool = True

    def __post_init__(self):
        if self.num_examples <= 0:
            raise ValueError("the data source is empty: nothing to load")
        if self.drop_remainder and self.batch_size > self.num_examples:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the data set ({self.num_examples} "
                "examples) and drop_remainder=True would leave no batch")

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full if (self.drop_remainder or rest == 0) else full + 1

    def indices(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Example indices int64 [B] and mask float32 [B] of global batch `b`.

        Padding rows repeat the batch's first example (a valid index) with mask 0.
        """
        epoch, i = divmod(b, self.steps_per_epoch)
        perm = self._permutation(epoch)
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
        mask = np.ones(self.batch_size, np.float32)
        if len(idx) < self.batch_size:
            mask[len(idx):] = 0
            idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[0])])
        return idx, mask

    def _permutation(self, epoch: int) -> np.ndarray:
        # One epoch's permutation is reused for all its batches.
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_permutation(
                self.num_examples, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        return cache[epoch]

    def state_dict(self, next_batch: int) -> dict[str, Any]:
        """The data position as saved in checkpoints (JSON-serialisable)."""
        return {"next_batch": int(next_batch), "num_examples": self.num_examples,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}

    def position_from(self, saved: dict[str, Any]) -> int:
        """Checks a saved data position against this plan; returns the next batch index."""
        mine = self.state_dict(0)
        for key in ("num_examples", "batch_size", "seed", "shuffle"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint's data position was saved with {key}={saved.get(key)!r}, but this "
                    f"run has {key}={mine[key]!r}: resuming would not see the same batches. Use a "
                    "new workdir, or the settings of the saved run.")
        return int(saved["next_batch"])


class _Loader(abc.ABC):
    """What both loaders share: the plan, the mesh, `iterate` and the data position."""

    plan: BatchPlan
    mesh: Mesh

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def state_dict(self, next_batch: int) -> dict[str, Any]:
        return self.plan.state_dict(next_batch)

    def position_from(self, saved: dict[str, Any]) -> int:
        return self.plan.position_from(saved)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch (evaluation: `drop_remainder=False`, `shuffle=False`)."""
        start = epoch * self.steps_per_epoch
        for _, batch in self.iterate(start, start + self.steps_per_epoch):
            yield batch

    @abc.abstractmethod
    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Batch]]:
        """Yields `(b, batch)` for global batch numbers b = start, start + 1, ... < stop."""


class DeviceLoader(_Loader):
    """The whole data set resident on the devices; batches gathered inside `jit`.

    source: anything with `.images` uint8 [N, H, W, C] and `.labels` int [N] (an `ArraySource`).
    The data set is replicated on every device (CIFAR-10's 150 MB is small next to accelerator
    memory), so each device gathers its own rows with no communication.
    """

    def __init__(self, source, *, batch_size: int, mesh: Mesh, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True):
        self.plan = BatchPlan(len(source.labels), batch_size, seed, shuffle, drop_remainder)
        self.mesh = mesh
        rep = shd.replicated(mesh)
        self.images = shd.from_host(np.asarray(source.images, np.uint8), rep)
        self.labels = shd.from_host(np.asarray(source.labels, np.int32), rep)
        out = shd.batch_sharding(mesh)
        self._gather = jax.jit(
            lambda images, labels, idx, mask: {
                "image": images[idx], "label": labels[idx], "mask": mask},
            out_shardings={"image": out, "label": out, "mask": out})
        self._rep = rep

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Batch]]:
        b = start
        while stop is None or b < stop:
            idx, mask = self.plan.indices(b)
            yield b, self._gather(self.images, self.labels,
                                  shd.from_host(idx.astype(np.int32), self._rep),
                                  shd.from_host(mask, self._rep))
            b += 1


class HostLoader(_Loader):
    """Reads a random-access source on the host; each process reads only its rows of a batch.

    source: `len(source)`, `source[i] -> {"image": uint8 HWC, "label": int}`, and `name`,
      `image_shape`, `num_classes` used to check every example (`sources.validate_example`).
    on_bad: "raise" stops at the first bad example met (in batch order) with an error that
      names it; "skip" gives it mask 0, so it never reaches the loss, and reports it: `skipped`
      lists the distinct bad examples met so far (the file, where the source has
      `where(i)`, e.g. `sources.ImageFiles`; else `name[i]`), in the order first met, and
      `num_skipped` counts them. A bad example is decoded and logged once: later epochs mask it
      without reading it again. With several processes each reports the bad examples of its
      own rows.
    map_fn: optional per-example host preprocessing, dict -> dict (e.g. resizing).
    batch_fn: optional per-batch host augmentation `(local batch dict, batch index) -> dict`,
      e.g. `augment.host_batch_fn(fn, seed=...)`: the same ops the step can run on the device,
      drawing from `augment.batch_key(seed, batch index)` (applied after the bad-example masking,
      so the batch's shapes stay static).
    prefetch: batches prepared ahead by a background thread (0: none).
    """

    def __init__(self, source, *, batch_size: int, mesh: Mesh, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, on_bad: str = "raise",
                 map_fn: Callable[[dict], dict] | None = None,
                 batch_fn: Callable[[dict, int], dict] | None = None, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None):
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        self.plan = BatchPlan(len(source), batch_size, seed, shuffle, drop_remainder)
        self.mesh = mesh
        self.source = source
        self.on_bad = on_bad
        self.map_fn = map_fn
        self.batch_fn = batch_fn
        self.prefetch = prefetch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the process count "
                             f"{self.process_count}")
        # index -> where, in the order met. Written by the prefetch thread, read by the caller.
        self._bad: dict[int, str] = {}
        self._bad_lock = threading.Lock()

    @property
    def skipped(self) -> list[str]:
        """The distinct bad examples met so far (skip mode), in the order first met."""
        with self._bad_lock:
            return list(self._bad.values())

    @property
    def num_skipped(self) -> int:
        with self._bad_lock:
            return len(self._bad)

    def local_batch(self, b: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `b`, as numpy: [B / process_count, ...]."""
        idx, mask = self.plan.indices(b)
        n = self.batch_size // self.process_count
        rows = slice(self.process_index * n, (self.process_index + 1) * n)
        idx, mask = idx[rows], mask[rows].copy()
        images, labels = [], []
        for j, i in enumerate(idx):
            example = self._read(int(i))
            if example is None:  # skipped: a zero image that the mask removes from every sum
                mask[j] = 0
                example = {"image": np.zeros(self.source.image_shape, np.uint8), "label": 0}
            images.append(example["image"])
            labels.append(example["label"])
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32), "mask": mask}

    def _read(self, i: int) -> dict | None:
        if i in self._bad:  # met before: masked again without decoding (or logging) it again
            return None
        # A file source names the file (`ImageFiles.where`); others, the index.
        where = (self.source.where(i) if hasattr(self.source, "where")
                 else f"{self.source.name}[{i}]")
        try:
            example = self.source[i]
            if self.map_fn is not None:
                example = self.map_fn(example)
            sources_lib.validate_example(
                example, where=where, image_shape=_static_shape(self.source.image_shape),
                num_classes=self.source.num_classes)
            return example
        except sources_lib.BadExampleError as e:
            if self.on_bad == "raise":
                raise
            with self._bad_lock:
                self._bad[i] = where
                count = len(self._bad)
            logging.warning("skipping bad example (%d so far): %s", count, e)
            return None

    def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Batch]]:
        def produce(b):
            local = self.local_batch(b)
            if self.batch_fn is not None:
                local = self.batch_fn(local, b)
            return shd.global_batch(local, self.mesh)

        if self.prefetch == 0:
            b = start
            while stop is None or b < stop:
                yield b, produce(b)
                b += 1
            return
        yield from _prefetched(produce, start, stop, self.prefetch)


def _static_shape(shape):
    return None if shape is None or any(d is None for d in shape) else tuple(shape)


_DONE = object()


def _prefetched(produce, start, stop, depth) -> Iterator[tuple[int, Batch]]:
    """Runs `produce(b)` for b = start, start+1, ... in a thread, `depth` batches ahead.

    The order is fixed by b, so prefetching never changes which batch comes when. An exception in
    the thread is re-raised in the consumer at the batch where it happened.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def work():
        b = start
        try:
            while (stop is None or b < stop) and not stopped.is_set():
                item = (b, produce(b))
                while not stopped.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                b += 1
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="jaxvision-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()

