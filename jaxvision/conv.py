"""Convolution and pooling three ways, with hand-derived backwards (CS231n assignment 2).

    out = conv.conv_im2col(x, w, b, stride=1, padding=1)    # custom_vjp: col2im backward
    out = conv.conv_lax(x, w, b, stride=1, padding=1)       # lax.conv_general_dilated, autodiff
    out = conv.conv_naive(x, w, b, stride=1, padding=1)     # loop reference, loop backward
    p = conv.max_pool(out, size=2, stride=2)                # custom_vjp: gradient to the argmax

Shapes (images are NHWC, filters HWIO):
  x: [N, H, W, Cin], w: [kh, kw, Cin, Cout], b: [Cout] -> out: [N, Ho, Wo, Cout] with

      Ho = (H + 2 * padding - kh) // stride + 1,   Wo = (W + 2 * padding - kw) // stride + 1

  pooling: x: [N, H, W, C] -> [N, Ho, Wo, C] with Ho = (H - size) // stride + 1 (no padding:
  VALID windows), likewise Wo.

Tiling rule: like the course's layers (`conv_forward_naive` asserts it), every function here
requires the windows to tile the (padded) input exactly, `(H + 2 * padding - kh) % stride == 0`
and the same for W (for pooling `(H - size) % stride == 0`); otherwise it raises a ValueError
saying what is required. `lax.conv_general_dilated` and `flax.linen.max_pool` would silently
drop the last rows and columns instead; here a shape that loses input is an error, so the
output-size formula above is exact and no input pixel ever gets a zero gradient by accident.

Non-differentiable arguments (`stride`, `padding`, `size`) are keyword-only Python ints and
static under `jax.jit` (close over them, e.g. `jax.jit(functools.partial(conv_im2col,
stride=2, padding=1))`). Every function keeps its input's dtype, so gradient checks run in
float64 under `jax.enable_x64(True)`. The hand-written backwards are `jax.custom_vjp` rules:
reverse mode only (`jax.jvp`/`jax.jacfwd` through them raise, as for any custom_vjp), and the
backwards are plain jnp code, so second derivatives go through them.

The naive functions are references: Python loops over output positions (vectorised over the
batch and the channels), unrolled into the traced program, so they are only for small shapes.
Their backwards are loops too, written by hand; tests check naive == im2col == lax and every
backward against JAX autodiff of `conv_lax` and against numeric gradients.

Tie rule for max pooling: when several entries of a window share the maximum, the FIRST one in
row-major order within the window (smallest row, then smallest column) receives the whole
gradient; this is what `np.argmax` over the flattened window gives in the course's naive loop.
The naive and fast max pools both follow it (a test shows it on a window of equal values).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# ------------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int) -> int:
    """`value` as a Python int (numpy ints accepted), or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} (a static Python "
                         f"int: under jax.jit close over it or mark it static)")
    return int(value)


def _conv_shapes(x, w, b, stride, padding) -> tuple[int, int]:
    """Validates a convolution's arguments; returns the output size (Ho, Wo)."""
    _check_int("stride", stride, 1)
    _check_int("padding", padding, 0)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, H, W, Cin], got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"w must be [kh, kw, Cin, Cout], got shape {tuple(w.shape)}")
    _, h, wd, cin = x.shape
    kh, kw, w_cin, cout = w.shape
    if w_cin != cin:
        raise ValueError(f"channel mismatch: x has Cin={cin} channels (shape {tuple(x.shape)}) "
                         f"but w expects {w_cin} (shape {tuple(w.shape)}, [kh, kw, Cin, Cout])")
    if tuple(b.shape) != (cout,):
        raise ValueError(f"b must be [Cout] = ({cout},) to match w {tuple(w.shape)}, "
                         f"got shape {tuple(b.shape)}")
    hp, wp = h + 2 * padding, wd + 2 * padding
    if kh > hp or kw > wp:
        raise ValueError(f"kernel {kh}x{kw} (w {tuple(w.shape)}) is larger than the padded input "
                         f"{hp}x{wp} (x {tuple(x.shape)} with padding={padding})")
    for axis, size, k in (("H", h, kh), ("W", wd, kw)):
        if (size + 2 * padding - k) % stride:
            raise ValueError(
                f"stride {stride} does not tile the padded input along {axis}: requires "
                f"({axis} + 2*padding - k) % stride == 0, got ({size} + 2*{padding} - {k}) = "
                f"{size + 2 * padding - k} (x {tuple(x.shape)}, w {tuple(w.shape)}); change the "
                f"padding or crop the input")
    return (hp - kh) // stride + 1, (wp - kw) // stride + 1


def _pool_shapes(x, size, stride) -> tuple[int, int]:
    """Validates a pooling's arguments; returns the output size (Ho, Wo)."""
    _check_int("size", size, 1)
    _check_int("stride", stride, 1)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, H, W, C], got shape {tuple(x.shape)}")
    _, h, wd, _ = x.shape
    if size > h or size > wd:
        raise ValueError(f"pooling window {size}x{size} is larger than the input {h}x{wd} "
                         f"(x {tuple(x.shape)})")
    for axis, n in (("H", h), ("W", wd)):
        if (n - size) % stride:
            raise ValueError(
                f"stride {stride} does not tile the input along {axis}: requires "
                f"({axis} - size) % stride == 0, got ({n} - {size}) = {n - size} "
                f"(x {tuple(x.shape)}, size={size})")
    return (h - size) // stride + 1, (wd - size) // stride + 1


def _pad(x, padding):
    # Zero padding of H and W only: [N, H, W, C] -> [N, H + 2p, W + 2p, C].
    if padding == 0:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _unpad(x, padding):
    # The gradient w.r.t. the padding zeros is dropped: they are constants, not inputs.
    if padding == 0:
        return x
    return x[:, padding:-padding, padding:-padding, :]


def _window(x, i, j, kh, kw, stride):
    # The receptive field of output position (i, j): [N, kh, kw, C].
    return x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]


def _add_window(acc, value, i, j, stride):
    """`acc[:, i*s:i*s + kh, j*s:j*s + kw, :] += value` for a [N, kh, kw, C] value.

    A slice, an add and a dynamic_update_slice (updated in place by XLA) instead of
    `acc.at[...].add`, which lowers to a general scatter: 2.5x slower to run at 256 positions
    on CPU, and these references unroll one per output position.
    """
    start = (0, i * stride, j * stride, 0)
    old = lax.dynamic_slice(acc, start, value.shape)
    return lax.dynamic_update_slice(acc, old + value, start)


def _place_strided(block, hp, wp, a, d, stride):
    """Zeros [N, hp, wp, C] with block [N, Ho, Wo, C] at rows a, a+s, ... and columns d, d+s, ...

    The adjoint of the strided slice `x[:, a::s, d::s, :]` (cut to Ho x Wo): a pad with interior
    padding s - 1, which XLA fuses into the following add (`.at[a::s, d::s].add` would lower to
    a scatter: about as fast to run on CPU here, but 6 to 9x slower to compile).
    """
    _, ho, wo, _ = block.shape
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    return lax.pad(block, jnp.zeros((), block.dtype),
                   ((0, 0, 0), (a, hp - a - span_h, stride - 1), (d, wp - d - span_w, stride - 1),
                    (0, 0, 0)))


# ------------------------------------------------------------------------ convolution: naive


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_naive(x, w, b, stride, padding):
    kh, kw, _, _ = w.shape
    ho, wo = _conv_shapes(x, w, b, stride, padding)
    xp = _pad(x, padding)
    rows = []
    for i in range(ho):
        cols = []
        for j in range(wo):
            # One output position for every image and filter at once:
            # [N, kh, kw, Cin] . [kh, kw, Cin, Cout] -> [N, Cout].
            win = _window(xp, i, j, kh, kw, stride)
            cols.append(jnp.tensordot(win, w, axes=3) + b[None, :])
        rows.append(jnp.stack(cols, axis=1))  # [N, Wo, Cout]
    return jnp.stack(rows, axis=1)  # [N, Ho, Wo, Cout]


def _conv_naive_fwd(x, w, b, stride, padding):
    return _conv_naive(x, w, b, stride, padding), (x, w)


def _conv_naive_bwd(stride, padding, res, dout):
    # out[n, i, j, f] = sum_{a, c, d} xp[n, i*s + a, j*s + c, d] * w[a, c, d, f] + b[f], so each
    # output position sends dout[n, i, j, f] * w back to its window of xp, and
    # window * dout[n, i, j, f] to w; b receives the plain sum of dout.
    x, w = res
    kh, kw, _, _ = w.shape
    xp = _pad(x, padding)
    dxp = jnp.zeros_like(xp)
    dw = jnp.zeros_like(w)
    _, ho, wo, _ = dout.shape
    for i in range(ho):
        for j in range(wo):
            g = dout[:, i, j, :]  # [N, Cout]
            win = _window(xp, i, j, kh, kw, stride)  # [N, kh, kw, Cin]
            dxp = _add_window(dxp, jnp.einsum("nf,acdf->nacd", g, w), i, j, stride)
            dw = dw + jnp.einsum("nacd,nf->acdf", win, g)
    db = jnp.sum(dout, axis=(0, 1, 2))
    return _unpad(dxp, padding), dw, db


_conv_naive.defvjp(_conv_naive_fwd, _conv_naive_bwd)


def conv_naive(x, w, b, *, stride: int = 1, padding: int = 0):
    """Convolution (cross-correlation, as in every deep learning library) by loops: the reference.

    A Python loop over the Ho * Wo output positions, each a contraction of one window of the
    zero-padded input with all filters (vectorised over the batch and the channels); the
    hand-written backward (custom_vjp) loops the same way. Unrolled when traced: small shapes
    only.

    Args:
      x: [N, H, W, Cin] images.
      w: [kh, kw, Cin, Cout] filters.
      b: [Cout] biases.
      stride: step between windows, both axes; must tile (see the module docstring).
      padding: zeros added on each side of H and W.

    Returns:
      [N, Ho, Wo, Cout], Ho = (H + 2 * padding - kh) // stride + 1 (likewise Wo).
    """
    x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    stride, padding = _check_int("stride", stride, 1), _check_int("padding", padding, 0)
    _conv_shapes(x, w, b, stride, padding)
    return _conv_naive(x, w, b, stride, padding)


# ----------------------------------------------------------------------- convolution: im2col


def _im2col(xp, kh, kw, stride, ho, wo):
    """The columns: [N, Hp, Wp, C] -> [N, Ho, Wo, kh * kw, C] (reshape to [N*Ho*Wo, kh*kw*C]).

    Column block (a, c) holds xp[n, i*s + a, j*s + c, :] for every output position (i, j): a
    strided slice of the padded input. The course's im2col.py gathers with index arrays (and
    col2im scatters with np.add.at); here the same gather is written as kh * kw strided slices
    (and col2im as kh * kw strided adds), which XLA compiles to slices and pads instead of a
    general gather/scatter: the index-array version took 1.8x as long forward+backward on CPU
    (batch 50, 32x32x3, 7x7 filters; measured while writing this).
    """
    blocks = [xp[:, a:a + stride * (ho - 1) + 1:stride, c:c + stride * (wo - 1) + 1:stride, :]
              for a in range(kh) for c in range(kw)]  # kh*kw x [N, Ho, Wo, C]
    return jnp.stack(blocks, axis=3)


def _col2im(dcols, hp, wp, kh, kw, stride):
    """The adjoint of `_im2col`: [N, Ho, Wo, kh * kw, C] -> [N, Hp, Wp, C], overlaps summed."""
    # Block k = (a, d) of the columns came from the strided slice xp[:, a::s, d::s, :]; each
    # input pixel receives the sum over every window (block) it appeared in.
    return sum(_place_strided(dcols[:, :, :, k, :], hp, wp, *divmod(k, kw), stride)
               for k in range(kh * kw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_im2col(x, w, b, stride, padding):
    return _conv_im2col_fwd(x, w, b, stride, padding)[0]


def _conv_im2col_fwd(x, w, b, stride, padding):
    n = x.shape[0]
    kh, kw, cin, cout = w.shape
    ho, wo = _conv_shapes(x, w, b, stride, padding)
    cols = _im2col(_pad(x, padding), kh, kw, stride, ho, wo).reshape(n * ho * wo, kh * kw * cin)
    # HWIO flattens (a, c, d) in the same order as a column: one matmul does every position.
    out = cols @ w.reshape(kh * kw * cin, cout) + b[None, :]  # [N*Ho*Wo, Cout]
    # The columns are the residual the backward needs for dW (the course caches x_cols too).
    return out.reshape(n, ho, wo, cout), (x, w, cols)


def _conv_im2col_bwd(stride, padding, res, dout):
    x, w, cols = res
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    _, ho, wo, _ = dout.shape
    g = dout.reshape(n * ho * wo, cout)
    # out = cols @ W + b, so dW = cols^T g, dcols = g W^T and db = sum over rows of g.
    dw = (cols.T @ g).reshape(kh, kw, cin, cout)
    db = jnp.sum(g, axis=0)
    dcols = (g @ w.reshape(kh * kw * cin, cout).T).reshape(n, ho, wo, kh * kw, cin)
    dxp = _col2im(dcols, h + 2 * padding, wd + 2 * padding, kh, kw, stride)
    return _unpad(dxp, padding), dw, db


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def conv_im2col(x, w, b, *, stride: int = 1, padding: int = 0):
    """Convolution as one matmul (im2col), with the col2im backward written by hand (custom_vjp).

    Forward: the columns [N*Ho*Wo, kh*kw*Cin] (one row per output position, its receptive field
    flattened) times the filters [kh*kw*Cin, Cout], plus b (CS231n's fast layers; Chellapilla
    et al. 2006). Backward: dW = columns^T dout, db = sum of dout, and dx by col2im, the
    scatter-add of dout W^T back onto the windows (overlapping windows add up).

    Args and returns: as `conv_naive`.
    """
    x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    stride, padding = _check_int("stride", stride, 1), _check_int("padding", padding, 0)
    _conv_shapes(x, w, b, stride, padding)
    return _conv_im2col(x, w, b, stride, padding)


# -------------------------------------------------------------------------- convolution: lax


def conv_lax(x, w, b, *, stride: int = 1, padding: int = 0):
    """Convolution by `lax.conv_general_dilated` (NHWC, HWIO), differentiated by JAX: the fast
    reference the hand-written backwards are checked against.

    Args and returns: as `conv_naive` (same validation, including the tiling rule).
    """
    x, w, b = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    stride, padding = _check_int("stride", stride, 1), _check_int("padding", padding, 0)
    _conv_shapes(x, w, b, stride, padding)
    out = lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + b[None, None, None, :]


# ----------------------------------------------------------------------------- pooling: naive


def _first_argmax_onehot(win):
    """[N, k, k, C] window -> [N, k, k, C] one-hot of its FIRST maximum (row-major), per n, c."""
    n, kh, kw, c = win.shape
    flat = win.reshape(n, kh * kw, c)
    idx = jnp.argmax(flat, axis=1)  # argmax returns the first maximum: the tie rule
    return jax.nn.one_hot(idx, kh * kw, axis=1, dtype=win.dtype).reshape(n, kh, kw, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_naive(x, size, stride):
    ho, wo = _pool_shapes(x, size, stride)
    return jnp.stack([jnp.stack([jnp.max(_window(x, i, j, size, size, stride), axis=(1, 2))
                                 for j in range(wo)], axis=1)
                      for i in range(ho)], axis=1)


def _max_pool_naive_fwd(x, size, stride):
    return _max_pool_naive(x, size, stride), x


def _max_pool_naive_bwd(size, stride, x, dout):
    # Only the winning entry of each window affected the output: it gets the window's gradient.
    dx = jnp.zeros_like(x)
    _, ho, wo, _ = dout.shape
    for i in range(ho):
        for j in range(wo):
            mask = _first_argmax_onehot(_window(x, i, j, size, size, stride))
            dx = _add_window(dx, mask * dout[:, i:i + 1, j:j + 1, :], i, j, stride)
    return (dx,)


_max_pool_naive.defvjp(_max_pool_naive_fwd, _max_pool_naive_bwd)


def max_pool_naive(x, *, size: int = 2, stride: int = 2):
    """Max pooling by loops over output positions (the reference), loop backward (custom_vjp).

    Args:
      x: [N, H, W, C].
      size: the window is size x size; VALID windows (no padding).
      stride: step between windows; must tile, (H - size) % stride == 0 (likewise W).

    Returns:
      [N, Ho, Wo, C], Ho = (H - size) // stride + 1. Backward: the first maximum of each window
      (row-major) gets the gradient, see the module docstring.
    """
    x = jnp.asarray(x)
    size, stride = _check_int("size", size, 1), _check_int("stride", stride, 1)
    _pool_shapes(x, size, stride)
    return _max_pool_naive(x, size, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool_naive(x, size, stride):
    ho, wo = _pool_shapes(x, size, stride)
    return jnp.stack([jnp.stack([jnp.mean(_window(x, i, j, size, size, stride), axis=(1, 2))
                                 for j in range(wo)], axis=1)
                      for i in range(ho)], axis=1)


def _avg_pool_naive_fwd(x, size, stride):
    return _avg_pool_naive(x, size, stride), x[:, :, :, :0]


def _avg_pool_naive_bwd(size, stride, res, dout):
    # Every entry of a window weighs 1 / size^2 in its mean: it gets that share of the gradient.
    n, h, wd, _ = res.shape
    dx = jnp.zeros((n, h, wd, dout.shape[3]), dout.dtype)
    _, ho, wo, _ = dout.shape
    for i in range(ho):
        for j in range(wo):
            share = jnp.broadcast_to(dout[:, i:i + 1, j:j + 1, :] / (size * size),
                                     (n, size, size, dout.shape[3]))
            dx = _add_window(dx, share, i, j, stride)
    return (dx,)


_avg_pool_naive.defvjp(_avg_pool_naive_fwd, _avg_pool_naive_bwd)


def avg_pool_naive(x, *, size: int = 2, stride: int = 2):
    """Average pooling by loops (the reference), loop backward (custom_vjp). Args as
    `max_pool_naive`; the backward spreads each output's gradient evenly over its window."""
    x = jnp.asarray(x)
    size, stride = _check_int("size", size, 1), _check_int("stride", stride, 1)
    _pool_shapes(x, size, stride)
    return _avg_pool_naive(x, size, stride)


# ------------------------------------------------------------------------------ pooling: fast


def _is_tiling(size, stride):
    # The course's fast path (fast_layers.max_pool_forward_reshape): when the windows are exactly
    # the disjoint size x size tiles (size == stride; H, W divisible, which the tiling rule then
    # guarantees), a reshape exposes them without a gather.
    return size == stride


def _pool_windows(x, size, stride, ho, wo):
    """[N, H, W, C] -> [N, Ho, Wo, C, size * size], the windows' entries in row-major order."""
    n, _, _, c = x.shape
    if _is_tiling(size, stride):
        t = x.reshape(n, ho, size, wo, size, c)
        return t.transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, size * size)
    # General (overlapping or gapped) windows: the strided window gather, one strided slice per
    # window offset (a, d), stacked in row-major order so that argmax keeps the tie rule.
    hi, wi = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    return jnp.stack([x[:, a:a + hi:stride, d:d + wi:stride, :]
                      for a in range(size) for d in range(size)], axis=-1)


def _unpool_windows(dwin, h, wd, size, stride):
    """The adjoint of `_pool_windows`: [N, Ho, Wo, C, size * size] -> [N, H, W, C]."""
    n, ho, wo, c, _ = dwin.shape
    if _is_tiling(size, stride):
        t = dwin.reshape(n, ho, wo, c, size, size).transpose(0, 1, 4, 2, 5, 3)
        return t.reshape(n, h, wd, c)
    return sum(_place_strided(dwin[..., k], h, wd, *divmod(k, size), stride)
               for k in range(size * size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, size, stride):
    return _max_pool_fwd(x, size, stride)[0]


def _max_pool_fwd(x, size, stride):
    ho, wo = _pool_shapes(x, size, stride)
    win = _pool_windows(x, size, stride, ho, wo)  # [N, Ho, Wo, C, size^2]
    # argmax picks the first maximum in row-major window order: the documented tie rule.
    idx = jnp.argmax(win, axis=-1)  # [N, Ho, Wo, C]
    # x[..., :0] is an empty array that carries x's static shape into the backward.
    return jnp.max(win, axis=-1), (idx, x[:, :, :, :0])


def _max_pool_bwd(size, stride, res, dout):
    idx, empty = res
    _, h, wd, _ = empty.shape
    dwin = jax.nn.one_hot(idx, size * size, dtype=dout.dtype) * dout[..., None]
    return (_unpool_windows(dwin, h, wd, size, stride),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, *, size: int = 2, stride: int = 2):
    """Max pooling, vectorised, with a hand-written backward (custom_vjp). Args as
    `max_pool_naive` (same tiling rule, same tie rule: equal to it forward and backward).

    size == stride: the course's reshape trick (no copy); otherwise a strided window gather.
    """
    x = jnp.asarray(x)
    size, stride = _check_int("size", size, 1), _check_int("stride", stride, 1)
    _pool_shapes(x, size, stride)
    return _max_pool(x, size, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(x, size, stride):
    ho, wo = _pool_shapes(x, size, stride)
    return jnp.mean(_pool_windows(x, size, stride, ho, wo), axis=-1)


def _avg_pool_fwd(x, size, stride):
    return _avg_pool(x, size, stride), x[:, :, :, :0]


def _avg_pool_bwd(size, stride, res, dout):
    _, h, wd, _ = res.shape
    dwin = jnp.broadcast_to(dout[..., None] / (size * size), (*dout.shape, size * size))
    return (_unpool_windows(dwin, h, wd, size, stride),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool(x, *, size: int = 2, stride: int = 2):
    """Average pooling, vectorised, with a hand-written backward (custom_vjp). Args as
    `max_pool_naive`; size == stride uses the reshape trick, otherwise a strided window gather."""
    x = jnp.asarray(x)
    size, stride = _check_int("size", size, 1), _check_int("stride", stride, 1)
    _pool_shapes(x, size, stride)
    return _avg_pool(x, size, stride)
