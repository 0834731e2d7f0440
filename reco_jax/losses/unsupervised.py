"""Pseudo-label loss of the student on the unlabelled batch (module_list.py: compute_unsupervised_loss).

Official semantics (reco_spec §2, §0.7, §0.9):
* per-image weight `w_b = #{conf >= δs} / #{target >= 0}`, both counted at full resolution
  and treated as a constant (no gradient);
* per-pixel CE with ignore label -1 (0 at ignored pixels);
* the loss is the mean of `w_b * CE` over **all pixels of the batch whose CE is strictly
  positive** (not a per-image mean, not a mean over valid pixels).

NaN cases of the official code and what happens here:
* An image with no valid pixel has `w_b = x/0` (NaN or inf). It never reaches the official
  result, because all its CEs are 0 and are dropped by the `CE > 0` selection. Here the
  weight is set to 0 for such images, which gives the same value and keeps NaN out of
  the backward pass.
* No pixel with CE > 0 in the whole batch (every pixel ignored, or every CE underflowed to
  exactly 0): the official mean over an empty selection is NaN. Its gradient is empty, so
  the official training continues with finite gradients and only the logged loss is NaN.
  `empty_policy='nan'` (the default) reproduces that exactly: the value is NaN and the
  gradient is exactly 0, so `sup + unsup + reco` still has the gradient of `sup + reco`.
  `empty_policy='zero'` returns 0 with the same zero gradient, for callers that check
  losses for NaN or average them into metrics.
"""
import jax
import jax.numpy as jnp
import numpy as np

from reco_jax import resampling
from reco_jax.constants import UINT8_MAX
from reco_jax.losses import supervised

_EMPTY_POLICIES = ("nan", "zero")
# k / 255 in float32, correctly rounded, for every uint8 level k.
_UINT8_LEVELS = np.arange(UINT8_MAX + 1, dtype=np.float32) / np.float32(UINT8_MAX)


def uint8_level_values(level: jax.Array) -> jax.Array:
  """Integer-valued levels (any dtype), clipped to [0, 255] -> `f32` `level / 255`, as PyTorch.

  A table lookup, not `level / 255`: XLA rewrites division by a constant into a
  multiplication by its reciprocal, which is an ulp off the PyTorch value for half the levels.
  Shared with `reco_jax.augment` (its uint8 round trips).
  """
  return jnp.asarray(_UINT8_LEVELS)[jnp.clip(level, 0, UINT8_MAX).astype(jnp.int32)]


def quantize_confidence(prob: jax.Array) -> jax.Array:
  """`floor(255 p) / 255` in float32, the value the official PIL uint8 round trips leave.

  `batch_transform` stores the teacher confidence as an 8-bit image (`mul(255).byte()`,
  i.e. truncation) and reads it back divided by 255 (reco_spec §0.9, §7). As a result
  `conf >= 0.97` holds iff `p >= 248/255`.
  """
  return uint8_level_values(jnp.floor(prob.astype(jnp.float32) * UINT8_MAX))


def unsupervised_loss(logits: jax.Array, pseudo_labels: jax.Array, confidence: jax.Array,
                      strong_threshold: float | jax.Array, *, empty_policy: str = "nan") -> jax.Array:
  """Confidence-weighted pseudo-label CE, `f32[]`, as `compute_unsupervised_loss`.

  Args:
    logits: student logits `f[B,H,W,C]` at the label resolution. Lower-resolution logits
      `f[B,h,w,C]` are first up-sampled with bilinear `align_corners=True`, as the
      training script does before calling the official loss.
    pseudo_labels: `i32[B,H,W]`, -1 = ignore (pixels cut out or padded).
    confidence: `f32[B,H,W]` teacher confidence after augmentation (0 where ignored).
    strong_threshold: δs (0.97 in the training script); compared in float32 with `>=`.
    empty_policy: 'nan' (official value) or 'zero' when no pixel has CE > 0; see the
      module docstring. The gradient is 0 in both cases.
  Returns:
    `f32[]` loss.
  """
  if empty_policy not in _EMPTY_POLICIES:
    raise ValueError(f"unsupervised_loss: empty_policy must be one of {_EMPTY_POLICIES}, "
                     f"got {empty_policy!r}")
  if pseudo_labels.shape != confidence.shape or logits.ndim != 4:
    raise ValueError(f"unsupervised_loss: expected logits [B,H,W,C] and pseudo_labels/confidence "
                     f"[B,H,W]; got {logits.shape}, {pseudo_labels.shape}, {confidence.shape}")
  logits = resampling.resize_bilinear_align_corners(logits.astype(jnp.float32),
                                                    pseudo_labels.shape[1:3])
  batch = pseudo_labels.shape[0]
  threshold = jnp.asarray(strong_threshold, jnp.float32)
  confident = jnp.sum((confidence.astype(jnp.float32) >= threshold).reshape(batch, -1), axis=1)
  valid = jnp.sum((pseudo_labels >= 0).reshape(batch, -1), axis=1)
  weight = jnp.where(valid > 0,
                     confident.astype(jnp.float32) / jnp.maximum(valid, 1).astype(jnp.float32), 0.0)
  weight = jax.lax.stop_gradient(weight)

  per_pixel = supervised.cross_entropy_per_pixel(logits, pseudo_labels)
  selected = per_pixel > 0
  weighted = jnp.where(selected, weight[:, None, None] * per_pixel, 0.0)
  count = jnp.sum(selected)
  mean = jnp.sum(weighted) / jnp.maximum(count, 1).astype(jnp.float32)
  empty_value = jnp.nan if empty_policy == "nan" else 0.0
  return jnp.where(count > 0, mean, empty_value)
