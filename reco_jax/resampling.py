"""Resizing with the exact semantics of the official PyTorch code.

Two behaviours matter (reco_spec §0.1, §1.5, §6.1):
* `F.interpolate(mode='bilinear', align_corners=True)` for logits -> label size and for
  ASPP -> low-level size. `jax.image.resize` has no align_corners=True, so it is written
  here once, as two small interpolation matrices contracted with the input.
* `F.interpolate(mode='nearest')` for labels and masks -> representation size:
  `src = min(floor(f32(dst) * f32(in/out)), in - 1)` evaluated in float32 (top-left
  aligned, unlike `jax.image.resize(..., 'nearest')`, which uses pixel centres).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index PyTorch `nearest` picks for each output index, i32[out_size]."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * np.float32(scale))
  return np.minimum(src.astype(np.int64), in_size - 1).astype(np.int32)


def resize_nearest_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch-`nearest` resize of the two spatial axes of `x[B,H,W,...]` to `size=(h, w)`."""
  rows = torch_nearest_indices(x.shape[1], size[0])
  cols = torch_nearest_indices(x.shape[2], size[1])
  return x[:, rows][:, :, cols]


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """f32[out_size, in_size] linear-interpolation weights with align_corners=True."""
  if out_size == 1:
    src = np.zeros((1,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  weights[np.arange(out_size), lo] += 1.0 - frac
  weights[np.arange(out_size), hi] += frac
  return weights.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of `x[B,H,W,C]` to `[B,h,w,C]` with `align_corners=True`.

  Computed as two dense contractions with static interpolation matrices, which is exact
  (up to float32 rounding) and maps onto matmul units on every backend.
  """
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == tuple(size):
    return x
  wh = jnp.asarray(_align_corners_matrix(in_h, size[0]), dtype=x.dtype)
  ww = jnp.asarray(_align_corners_matrix(in_w, size[1]), dtype=x.dtype)
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,bhwc->bowc", wh, x, precision=precision)
  return jnp.einsum("pw,bowc->bopc", ww, y, precision=precision)
