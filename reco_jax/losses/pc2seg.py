"""PC²Seg's unlabelled losses and negative sampling (Zhong et al., ICCV 2021; no public code).

Source: the article text in `../shared/reference/papers/pc2seg_article.txt` and
other_methods_spec §3. For a pixel i of an unlabelled image, seen in a weak view (ŷ_i, z_i)
and a strong view (ŷ_i⁺, z_i⁺) with the same geometry:

  L_unlabel = Σ_i λ1 l_ce(z_i, z_i⁺, {z_in⁻}) + λ2 l_cy(ŷ_i, ŷ_i⁺)
  l_cy = 1 − cos(ŷ_i, ŷ_i⁺)                         (stop-gradient on the weak ŷ_i)
  l_ce = −log( e^{cos(z_i,z_i⁺)/τ} / (e^{cos(z_i,z_i⁺)/τ} + Σ_n e^{cos(z_i,z_in⁻)/τ}) )
  z_in⁻ ~ Discrete({z_j}; p_ij),  p_ij ∝ w_ij with the rule (`RULES`):
    uniform:                  w_ij = 1{j ≠ i}
    different_image:          w_ij = 1{I_i ≠ I_j}
    debiased:                 w_ij = 1{j ≠ i} (1 − ŷ_iᵀŷ_j)
    different_image_debiased: w_ij = 1{I_i ≠ I_j} (1 − ŷ_iᵀŷ_j)   (the article's choice)

Pixels are those of the feature map (the resolution of the model's `rep`/`logits`), flattened
over the batch: flat index = b·h·w + r·w + c.

Static shapes and bounded memory: each image contributes `A` anchors (uniform without
replacement over its valid pixels); one candidate pool of `P` pixels per step is drawn
uniformly without replacement over the batch's valid pixels; each anchor's `N` negatives are
drawn from `p_i·` restricted to the pool. Similarities are contracted before gathering
(`(K, D) @ (D, P)` then a gather of `(K, N)`), so the largest tensors are `(K, P)` with
K = B·A: never an (anchors x batch pixels x D) tensor. Everything runs on device.
"""
import dataclasses

import jax
import jax.numpy as jnp

RULES = ("uniform", "different_image", "debiased", "different_image_debiased")
REDUCTIONS = ("mean", "sum")
CONSISTENCY_PIXELS = ("anchors", "all")
VIEWS = ("weak", "strong")
_NORM_EPS = 1e-12
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Draws:
  """The step's random choices (all integer or boolean, no gradient).

  anchor: i32[K] flat pixel index of each anchor, K = B·A (A per image, image-major).
  anchor_valid: bool[K] the anchor is a valid pixel (False only when an image has fewer
    than A valid pixels).
  pool: i32[P] flat pixel index of each candidate of the pool.
  negatives: i32[K,N] index into `pool` of each negative.
  negative_valid: bool[K,N] the draw has positive probability (False when the anchor's
    row of weights is all zero, or without replacement when fewer than N candidates have
    positive weight).
  """
  anchor: jax.Array
  anchor_valid: jax.Array
  pool: jax.Array
  negatives: jax.Array
  negative_valid: jax.Array


jax.tree_util.register_dataclass(
    Draws, data_fields=["anchor", "anchor_valid", "pool", "negatives", "negative_valid"],
    meta_fields=[])


# ------------------------------------------------------------------------------------------
# Sampling.


def _gumbel_top_k(key: jax.Array, log_weights: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """k draws without replacement ∝ exp(log_weights) along the last axis (Gumbel-top-k).

  Returns (indices i32[..., k], drawn bool[..., k]); `drawn` is False where the score is
  -inf (fewer than k entries of positive weight).
  """
  scores = log_weights + jax.random.gumbel(key, log_weights.shape, jnp.float32)
  top, index = jax.lax.top_k(scores, k)
  return index.astype(jnp.int32), top > -jnp.inf


def sample_anchors(key: jax.Array, valid: jax.Array, anchors_per_image: int
                   ) -> tuple[jax.Array, jax.Array]:
  """`A = min(anchors_per_image, h·w)` anchors per image, uniform without replacement over
  its valid pixels.

  Args:
    valid: bool[B,h,w].
  Returns:
    (anchor i32[B·A] flat batch index, anchor_valid bool[B·A]).
  """
  b, h, w = valid.shape
  a = min(int(anchors_per_image), h * w)
  log_w = jnp.where(valid.reshape(b, h * w), 0.0, -jnp.inf)
  index, drawn = _gumbel_top_k(key, log_w, a)
  flat = index + (jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None]
  return flat.reshape(-1), drawn.reshape(-1)


def sample_pool(key: jax.Array, valid: jax.Array, pool_size: int) -> tuple[jax.Array, jax.Array]:
  """The candidate pool: `P = min(pool_size, B·h·w)` pixels, uniform without replacement
  over the batch's valid pixels.

  Args:
    valid: bool[B,h,w].
  Returns:
    (pool i32[P] flat batch index, pool_valid bool[P]).
  """
  flat_valid = valid.reshape(-1)
  p = min(int(pool_size), flat_valid.shape[0])
  return _gumbel_top_k(key, jnp.where(flat_valid, 0.0, -jnp.inf), p)


def negative_weights(rule: str, anchor: jax.Array, anchor_probs: jax.Array, pool: jax.Array,
                     pool_valid: jax.Array, pool_probs: jax.Array,
                     pixels_per_image: int) -> jax.Array:
  """Unnormalised `w_ij` of `rule` for every (anchor, pool candidate) pair.

  Args:
    rule: one of `RULES`.
    anchor: i32[K] flat index; anchor_probs: f32[K,C] the anchors' weak probabilities ŷ_i.
    pool: i32[P] flat index; pool_valid: bool[P]; pool_probs: f32[P,C] their ŷ_j.
    pixels_per_image: h·w (flat index // h·w is the image).
  Returns:
    f32[K,P] >= 0; 0 for the anchor itself (every rule), invalid candidates and, for the
    different-image rules, candidates of the anchor's image.
  """
  if rule not in RULES:
    raise ValueError(f"config pc2seg.negative_sampling={rule!r} is invalid; expected one of "
                     f"{', '.join(RULES)}")
  allowed = pool_valid[None, :] & (pool[None, :] != anchor[:, None])
  if rule.startswith("different_image"):
    allowed &= (pool[None, :] // pixels_per_image) != (anchor[:, None] // pixels_per_image)
  weights = allowed.astype(jnp.float32)
  if rule.endswith("debiased"):
    # P(ŷ_i ≠ ŷ_j) = 1 − ŷ_iᵀŷ_j for independent categorical predictions; contracted as a
    # (K, C) @ (C, P) matmul (clipped: rounding can leave it a few ulps below 0).
    same = jnp.einsum("kc,pc->kp", anchor_probs, pool_probs, precision=_HIGHEST)
    weights = weights * jnp.clip(1.0 - same, 0.0, 1.0)
  return weights


def sample_negatives(key: jax.Array, weights: jax.Array, num_negatives: int,
                     replacement: bool) -> tuple[jax.Array, jax.Array]:
  """`N` negatives per row, from the categorical ∝ `weights` f32[K,P].

  With replacement (i.i.d. draws, the article's `z_in⁻ ~ Discrete(...)`): inverse CDF over
  the row's cumulative sums, (K, P) memory. Without replacement: Gumbel-top-N.

  Returns:
    (negatives i32[K,N] indices into the pool, negative_valid bool[K,N]).
  """
  k, p = weights.shape
  if replacement:
    cdf = jnp.cumsum(weights, axis=1)
    total = cdf[:, -1]
    # u·total < total for u < 1 in float32, and a zero-weight j has cdf_j == cdf_{j-1}, so
    # the first cdf_j > u·total is never a zero-weight candidate.
    targets = jax.random.uniform(key, (k, num_negatives), jnp.float32) * total[:, None]
    index = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(cdf, targets)
    index = jnp.minimum(index, p - 1).astype(jnp.int32)
    return index, jnp.broadcast_to((total > 0)[:, None], index.shape)
  if num_negatives > p:
    raise ValueError(f"config pc2seg.num_negatives={num_negatives} exceeds the candidate pool "
                     f"of {p} pixels (pc2seg.pool_size / the batch's pixels) without replacement")
  return _gumbel_top_k(key, jnp.log(weights), num_negatives)


def draw(key: jax.Array, valid: jax.Array, probs_weak: jax.Array, *, rule: str,
         anchors_per_image: int, pool_size: int, num_negatives: int, replacement: bool) -> Draws:
  """All random choices of a step: anchors, pool, negatives (no gradient flows).

  Args:
    valid: bool[B,h,w] pixels of the views that exist (not padding).
    probs_weak: f32[B,h,w,C] weak-view probabilities ŷ (used by the debiased rules).
  """
  key_anchor, key_pool, key_neg = jax.random.split(key, 3)
  b, h, w = valid.shape
  probs = jax.lax.stop_gradient(probs_weak).reshape(b * h * w, -1).astype(jnp.float32)
  anchor, anchor_valid = sample_anchors(key_anchor, valid, anchors_per_image)
  pool, pool_valid = sample_pool(key_pool, valid, pool_size)
  weights = negative_weights(rule, anchor, probs[anchor], pool, pool_valid, probs[pool], h * w)
  negatives, negative_valid = sample_negatives(key_neg, weights, num_negatives, replacement)
  return Draws(anchor, anchor_valid, pool, negatives, negative_valid & anchor_valid[:, None])


# ------------------------------------------------------------------------------------------
# Losses.


def _unit(x: jax.Array) -> jax.Array:
  """x / ‖x‖₂ over the last axis (cos(u, v) = ûᵀv̂)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def consistency_per_pixel(probs_weak: jax.Array, probs_strong: jax.Array) -> jax.Array:
  """l_cy = 1 − cos(ŷ, ŷ⁺) over the class axis, gradient stopped on the weak ŷ.

  f32[...,C] x f32[...,C] -> f32[...].
  """
  weak = _unit(jax.lax.stop_gradient(probs_weak))
  return 1.0 - jnp.sum(weak * _unit(probs_strong), axis=-1)


def contrastive_per_anchor(anchors: jax.Array, positives: jax.Array, pool_feats: jax.Array,
                           negatives: jax.Array, negative_valid: jax.Array,
                           temperature: float) -> jax.Array:
  """The article's l_ce for each anchor.

  Args:
    anchors: f32[K,D] z_i; positives: f32[K,D] z_i⁺ (same pixel, other view).
    pool_feats: f32[P,D] the pool's features; negatives: i32[K,N] pool indices;
      negative_valid: bool[K,N] (invalid negatives are left out of the sum).
  Returns:
    f32[K]: −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ_n e^{s_n/τ})), s = cosine similarity.
  """
  a = _unit(anchors)
  positive = jnp.sum(a * _unit(positives), axis=-1) / temperature
  # Contract before gathering: (K, P) similarities, then the (K, N) drawn ones.
  sims = jnp.einsum("kd,pd->kp", a, _unit(pool_feats), precision=_HIGHEST) / temperature
  negative = jnp.where(negative_valid, jnp.take_along_axis(sims, negatives, axis=1), -jnp.inf)
  logits = jnp.concatenate([positive[:, None], negative], axis=1)
  return jax.nn.logsumexp(logits, axis=1) - positive


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Static settings of `unlabelled_loss` (config.pc2seg)."""
  temperature: float = 0.1
  contrastive_weight: float = 0.1  # λ1
  consistency_weight: float = 1.0  # λ2
  anchor_view: str = "weak"
  anchor_grad: bool = True
  positive_grad: bool = True
  negative_grad: bool = False
  reduction: str = "mean"
  consistency_pixels: str = "anchors"


def _reduce(values: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
  total = jnp.sum(jnp.where(mask, values, 0.0))
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def unlabelled_loss(draws: Draws, feats_weak: jax.Array, feats_strong: jax.Array,
                    probs_weak: jax.Array, probs_strong: jax.Array, valid: jax.Array,
                    s: LossSettings) -> tuple[jax.Array, dict]:
  """λ1·l_ce + λ2·l_cy reduced over the sampled anchors (`s.reduction`: 'mean' divides the
  article's Σ_i by the number of anchors that count).

  Args:
    draws: `draw(...)` of this step.
    feats_weak, feats_strong: f32[B,h,w,D] projected features z of the two views.
    probs_weak, probs_strong: f32[B,h,w,C] softmax probabilities of the two views.
    valid: bool[B,h,w] (used by `consistency_pixels='all'`).
    s: the settings. The anchor and its negatives come from `s.anchor_view`, the positive
      from the other view; `anchor_grad`, `positive_grad` and `negative_grad` say which of
      them carry gradient; the weak probabilities never do.
  Returns:
    (λ1·L_ce + λ2·L_cy, {'contrastive': L_ce, 'consistency': L_cy,
     'valid_anchor_fraction': anchors with >= 1 negative / all anchors}).
  """
  d = feats_weak.shape[-1]
  flat_w, flat_s = feats_weak.reshape(-1, d), feats_strong.reshape(-1, d)
  source, other = (flat_w, flat_s) if s.anchor_view == "weak" else (flat_s, flat_w)
  maybe_sg = lambda x, grad: x if grad else jax.lax.stop_gradient(x)
  anchors = maybe_sg(source[draws.anchor], s.anchor_grad)
  positives = maybe_sg(other[draws.anchor], s.positive_grad)
  pool_feats = maybe_sg(source[draws.pool], s.negative_grad)
  l_ce = contrastive_per_anchor(anchors, positives, pool_feats, draws.negatives,
                                draws.negative_valid, s.temperature)
  has_negative = jnp.any(draws.negative_valid, axis=1) & draws.anchor_valid
  contrastive = _reduce(l_ce, has_negative, s.reduction)

  c = probs_weak.shape[-1]
  if s.consistency_pixels == "anchors":
    l_cy = consistency_per_pixel(probs_weak.reshape(-1, c)[draws.anchor],
                                 probs_strong.reshape(-1, c)[draws.anchor])
    consistency = _reduce(l_cy, draws.anchor_valid, s.reduction)
  else:
    consistency = _reduce(consistency_per_pixel(probs_weak, probs_strong), valid, s.reduction)
  total = s.contrastive_weight * contrastive + s.consistency_weight * consistency
  fraction = jnp.sum(has_negative) / has_negative.shape[0]
  return total, {"contrastive": contrastive, "consistency": consistency,
                 "valid_anchor_fraction": fraction.astype(jnp.float32)}
