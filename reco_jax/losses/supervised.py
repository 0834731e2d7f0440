"""Supervised cross-entropy with the ignore label (module_list.py: compute_supervised_loss)."""
import jax
import jax.numpy as jnp

from reco_jax import resampling


def cross_entropy_per_pixel(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-pixel CE, `f32[B,H,W]`, exactly 0 where `labels < 0` (PyTorch `ignore_index=-1`).

  Args:
    logits: `f[B,H,W,C]` at the label resolution.
    labels: `i32[B,H,W]`, -1 = ignore.
  """
  logits = logits.astype(jnp.float32)
  valid = labels >= 0
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  safe_labels = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Low-resolution logits `f[B,h,w,C]` -> `f32[B,*size,C]`, bilinear with align_corners=True."""
  return resampling.resize_bilinear_align_corners(logits.astype(jnp.float32), tuple(size))


def supervised_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean CE over non-ignored pixels; logits are up-sampled to the label size first.

  As the official code, low-resolution logits `f[B,h,w,C]` are resized with bilinear
  `align_corners=True` to the label size `(H, W)` before the CE. A batch without any
  labelled pixel gives 0 (PyTorch gives NaN, an empty mean); that case only arises with
  all-void crops, where a NaN would stop training for no reason.

  Args:
    logits: `f[B,h,w,C]`.
    labels: `i32[B,H,W]`, -1 = ignore.
  Returns:
    `f32[]`.
  """
  logits = upsample_logits(logits, labels.shape[1:3])
  per_pixel = cross_entropy_per_pixel(logits, labels)
  count = jnp.sum(labels >= 0)
  return jnp.sum(per_pixel) / jnp.maximum(count, 1).astype(jnp.float32)
