"""A training epoch as one compiled program, over a data set that lives on the device.

For small data sets (CIFAR-10 is 150 MB as uint8) the fastest input pipeline is none at all: put
the whole set in device memory once, and let each step gather its batch by index and augment it
inside the same jitted program. Then a whole epoch is one `lax.scan` over its steps, compiled
once: Python dispatches one program per epoch instead of one per step, so the host is off the
critical path (the point of airbench's GPU-side loader, Jordan 2024, arXiv 2404.00498, here
taken further: XLA sees the loop too).

    data = put_on_device({"image": images_u8, "label": labels}, jax.devices()[0])
    epoch_fn = make_epoch_fn(step_fn, batch_fn=my_batch_fn, batch_size=1024)
    for epoch in range(epochs):
        carry, metrics = epoch_fn(carry, data, key, epoch, num_steps=steps_per_epoch)

The pieces, each a pure function of arrays (shapes: B batch, N data set, H x W x C images):
  * `epoch_plan`: the epoch's batches (a permutation, remainder dropped) and per-step keys;
  * `gather`: the batch `{k: data[k][indices]}`;
  * `flip_lr`, `alternating_flip`: mirror images; the alternating scheme (Jordan 2024)
    draws one random flip per image per run and inverts all of them on odd epochs, so each
    image is seen mirrored and unmirrored in turn (random flips repeat a view half the time);
  * `shift_images`, `random_translate`: translation by up to `max_shift` pixels with reflect
    padding (the paper's random crop of a 2-pixel reflect-padded image);
  * `tta_views`: the multi-view test-time augmentation (mirror, and mirror + 1-pixel shifts);
  * `scan_epoch` / `make_epoch_fn`: the epoch as a scan, jitted with the carry donated (its
    buffers are reused in place for the next epoch's state: no second copy of the train state);
    `make_epoch_fn(loop="python")` runs the same steps one jitted step at a time, for XLA:CPU
    (see there).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
# batch_fn(data, indices [B], *, key, epoch) -> batch (a pytree whose leaves have leading axis B)
BatchFn = Callable[..., PyTree]
# step_fn(carry, batch) -> (carry, metrics)
StepFn = Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def put_on_device(arrays: PyTree, device: jax.Device | None = None) -> PyTree:
    """Every leaf of `arrays` (numpy) committed to `device` (default: `jax.devices()[0]`).

    Committed arrays make every jitted function that takes them run on that device: the
    speedrun is single-device by design, even where several devices are visible.
    """
    device = jax.devices()[0] if device is None else device
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), device), arrays)


def epoch_plan(key: jax.Array, *, num_examples: int, batch_size: int,
               num_steps: int) -> tuple[jax.Array, jax.Array]:
    """The batches and step keys of one epoch.

    Returns `(indices int32 [num_steps, batch_size], keys [num_steps] (one PRNG key per step))`:
    the first `num_steps * batch_size` entries of a random permutation of `range(num_examples)`
    (each example at most once; the remainder of a full epoch, `num_examples % batch_size`, is
    dropped, and `num_steps` below `num_examples // batch_size` gives a partial epoch).
    """
    if not 0 < num_steps * batch_size <= num_examples:
        raise ValueError(f"epoch_plan: num_steps * batch_size = {num_steps} * {batch_size} must "
                         f"be in [1, num_examples={num_examples}]")
    k_perm, k_steps = jax.random.split(key)
    perm = jax.random.permutation(k_perm, num_examples)[:num_steps * batch_size]
    return (perm.reshape(num_steps, batch_size).astype(jnp.int32),
            jax.random.split(k_steps, num_steps))


def gather(data: PyTree, indices: jax.Array) -> PyTree:
    """`{k: data[k][indices]}`: data leaves `[N, ...]`, indices int `[B]` -> leaves `[B, ...]`."""
    return jax.tree.map(lambda a: a[indices], data)


def flip_lr(images: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors left-right the images where `flip` is True. `[B, H, W, C]`, bool `[B]` -> same."""
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def alternating_flip(images: jax.Array, *, base: jax.Array, epoch: jax.Array | int) -> jax.Array:
    """Alternating flip: image i is mirrored iff `base[i] XOR (epoch is odd)`.

    images `[B, H, W, C]`; base bool `[B]`: the per-image random choice, drawn once per run
    (gathered with the batch); epoch: int scalar (may be traced). Over any two consecutive
    epochs every image is shown once as is and once mirrored.
    """
    odd = (jnp.asarray(epoch) % 2) == 1
    return flip_lr(images, jnp.logical_xor(base, odd))


def shift_images(images: jax.Array, shifts: jax.Array, *, max_shift: int,
                 pad_mode: str = "reflect") -> jax.Array:
    """Translates each image: `out[b, i, j] = ext[b, i + dy_b, j + dx_b]`.

    images `[B, H, W, C]`; shifts int `[B, 2]` = (dy, dx), each in `[-max_shift, max_shift]`;
    `ext` is the image extended by `max_shift` pixels on each side (`jnp.pad` mode `pad_mode`:
    "reflect" mirrors without repeating the edge, as PyTorch's reflect). So (1, 1) shows the
    window one pixel down and right, i.e. moves the content up and left. Returns `[B, H, W, C]`.
    One gather (no per-image dynamic slices).
    """
    b, h, w, _ = images.shape
    p = max_shift
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
    rows = (shifts[:, 0:1] + p) + jnp.arange(h)[None, :]  # [B, H]
    cols = (shifts[:, 1:2] + p) + jnp.arange(w)[None, :]  # [B, W]
    return padded[jnp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_translate(images: jax.Array, *, key: jax.Array, max_shift: int,
                     pad_mode: str = "reflect") -> jax.Array:
    """`shift_images` by shifts drawn uniformly in `[-max_shift, max_shift]^2` per image.

    `[B, H, W, C] -> [B, H, W, C]`; the same distribution as airbench's random 32x32 crop of the
    image reflect-padded by `max_shift`. `max_shift=0` returns the images unchanged.
    """
    if max_shift == 0:
        return images
    shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
    return shift_images(images, shifts, max_shift=max_shift, pad_mode=pad_mode)


def tta_views(images: jax.Array, *, level: int) -> tuple[jax.Array, jax.Array]:
    """Test-time augmentation views and their weights (Jordan 2024).

    images `[B, H, W, C]` -> `(views [V, B, H, W, C], weights float32 [V], summing to 1)`:
      level 0: the images (V = 1);
      level 1: the images and their mirrors, weights 1/2 each (V = 2);
      level 2: level 1 with weight 1/2 in all, plus the images shifted by (-1, -1) and (1, 1)
        (`shift_images`, reflect padding) and their mirrors, weight 1/8 each (V = 6).
    Average the logits with these weights: `sum_v weights[v] * logits[v]`.
    """
    if level not in (0, 1, 2):
        raise ValueError(f"tta_views: level must be 0, 1 or 2, got {level}")
    if level == 0:
        return images[None], jnp.ones((1,), jnp.float32)
    mirror = images[:, :, ::-1, :]
    if level == 1:
        return jnp.stack([images, mirror]), jnp.full((2,), 0.5, jnp.float32)
    b = images.shape[0]
    shifted = [shift_images(images, jnp.full((b, 2), s, jnp.int32), max_shift=1)
               for s in (-1, 1)]
    views = [images, mirror] + [v for s in shifted for v in (s, s[:, :, ::-1, :])]
    weights = jnp.asarray([0.25, 0.25, 0.125, 0.125, 0.125, 0.125], jnp.float32)
    return jnp.stack(views), weights


def scan_epoch(step_fn: StepFn, carry: PyTree, data: PyTree, key: jax.Array,
               epoch: jax.Array | int, *, batch_fn: BatchFn, batch_size: int, num_steps: int,
               unroll: int = 1) -> tuple[PyTree, PyTree]:
    """One epoch: `num_steps` steps of `step_fn` in one `lax.scan` (not jitted here).

    data: the device-resident data set, leaves `[N, ...]`; key: the run's key, folded with
    `epoch` (so each epoch has its own permutation and augmentation, and a rerun with the same
    key is the same epoch); epoch: int scalar, may be traced (no recompilation per epoch).
    Step s gathers and augments its batch with `batch_fn(data, indices[s], key=keys[s],
    epoch=epoch)` (`epoch_plan`), then runs `step_fn(carry, batch)`.
    Returns `(carry, metrics)`, each metric stacked over the steps: `[num_steps, ...]`.
    """
    num_examples = jax.tree.leaves(data)[0].shape[0]
    indices, keys = epoch_plan(jax.random.fold_in(key, epoch), num_examples=num_examples,
                               batch_size=batch_size, num_steps=num_steps)

    def body(carry, xs):
        idx, k = xs
        return step_fn(carry, batch_fn(data, idx, key=k, epoch=epoch))

    return jax.lax.scan(body, carry, (indices, keys), unroll=unroll)


LOOPS = ("scan", "python")


def make_epoch_fn(step_fn: StepFn, *, batch_fn: BatchFn, batch_size: int, loop: str = "scan",
                  unroll: int = 1, donate: bool = True) -> Callable:
    """`epoch_fn(carry, data, key, epoch, *, num_steps) -> (carry, metrics)`.

    loop="scan": `scan_epoch` jitted, one program an epoch, `num_steps` static (a partial last
      epoch is a second compilation). For GPUs and TPUs.
    loop="python": the same steps (`epoch_plan`, `batch_fn`, `step_fn`) as one jitted step per
      batch, dispatched from Python; the same result. For CPUs: XLA:CPU runs convolutions inside
      a loop body (a scan's while loop) far slower than the same convolutions outside one
      (jax-ml/jax#12868, open; measured here with jax 0.10.2: a conv's gradient step 60x
      slower), so a scanned epoch of a convnet is a trap on CPU.
    The carry is donated unless `donate=False` (then the caller's carry stays valid, e.g. to
    compare in a test). Arrays go in as arguments (the data set especially: captured, it would
    be baked into the program as a constant).
    """
    if loop not in LOOPS:
        raise ValueError(f"make_epoch_fn: loop must be one of {LOOPS}, got {loop!r}")
    donate_argnums = (0,) if donate else ()
    if loop == "scan":
        fn = functools.partial(scan_epoch, step_fn, batch_fn=batch_fn, batch_size=batch_size,
                               unroll=unroll)
        return jax.jit(fn, static_argnames=("num_steps",), donate_argnums=donate_argnums)

    plan = jax.jit(epoch_plan, static_argnames=("num_examples", "batch_size", "num_steps"))

    @functools.partial(jax.jit, donate_argnums=donate_argnums)
    def one_step(carry, data, indices, key, epoch):
        return step_fn(carry, batch_fn(data, indices, key=key, epoch=epoch))

    def epoch_fn(carry, data, key, epoch, *, num_steps):
        num_examples = jax.tree.leaves(data)[0].shape[0]
        indices, keys = plan(jax.random.fold_in(key, epoch), num_examples=num_examples,
                             batch_size=batch_size, num_steps=num_steps)
        metrics = []
        for s in range(num_steps):
            carry, m = one_step(carry, data, indices[s], keys[s], epoch)
            metrics.append(m)
        return carry, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

    return epoch_fn
