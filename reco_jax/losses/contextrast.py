"""Contextrast's losses (Sung et al., CVPR 2024; no public code) and the baselines of its Table 2.

Sources: the paper text `../shared/reference/papers/contextrast.txt` (equations lost in the
extraction; the prose around them survives) and other_methods_spec §4 (the Pissas et al.
ECCV'22 code Contextrast builds on, §4.1; the Contextrast additions, §4.2; a static-shape plan,
§4.3; the authors' follow-up, §4.4). Every constant names its source below; the readings of
passages the paper leaves ambiguous are listed in `ContextrastSettings` and in the README
section "Contextrast".

Contents (pure functions; the model levels, the method module and the configs live elsewhere):

* `distance_to_boundary` / `squared_distance_to_boundary`: scipy's Euclidean distance transform
  (`scipy.ndimage.distance_transform_edt`: for each True pixel, the distance to the nearest False
  pixel of its image), exact below a window and clipped to it, on device.
* BANE (boundary-aware negative) sampling, paper §3.3 (Eqs. 6-7): `bane_selection`,
  `sample_bane_negatives`.
* CCL (contextual contrastive learning), paper §3.2 (Eqs. 1-5): `class_anchors`, `fuse_anchors`,
  `pixel_anchor_loss`, and the total `contextrast_loss` (= `contextrast_draws` +
  `contextrast_loss_from_draws`).
* Table 2 baselines: the ContrastiveSeg-style pixel-pixel loss with semi-hard or random anchor
  sampling (`contrastiveseg_draws`, `contrastiveseg_loss_from_draws`) and the Pissas et al.
  multi-scale + cross-scale losses (`pissas_draws`, `pissas_loss_from_draws`).

Conventions: features are NHWC `f32[B,h,w,D]`; labels `i32[B,h,w]` with negative values (and
values >= C) ignored; a *flat pixel index* is `b*h*w + y*w + x`. Levels are ordered from the
first (highest resolution, HRNet stride 4) to the last (lowest resolution, stride 32), the
paper's i = 1..I; the last level's anchors are the "most global" ones fused into every level.

Static shapes and bounded memory: every variable-size set (error pixels, BANE negatives,
sampled views) is a fixed buffer plus a validity mask; the distance transform is separable and
windowed, O(B·H·W·window), never an (H·W)x(H·W) matrix; the pixel-anchor loss costs
O(N·D + C·K·D); the pixel-pixel losses hold one `chunk x F` block of an `F x F` similarity at a
time, with F the fixed feature budget (`max_features_total`, `max_samples`). No host callbacks.
"""
import dataclasses
import fractions
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from reco_jax import resampling

ERROR_MAPS = ("false_positive", "false_negative")
SELECTION_SCOPES = ("batch", "image")
FALLBACKS = ("random", "none")
NEGATIVE_SOURCES = ("pixels", "anchors", "both")
ABSENT_RULES = ("own", "formula")
ANCHOR_NORMALIZATIONS = ("after_fusion", "before_fusion", "none")
REDUCTIONS = ("class", "pixel")
CONTRASTIVESEG_SAMPLING = ("semi_hard", "random")

_NEG = -1e9  # finite "minus infinity" for masked logits: exp() underflows to 0, grads stay finite.
_NORM_EPS = 1e-12  # F.normalize's eps (Pissas, ContrastiveSeg: torch.nn.functional.normalize).
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------
def l2_normalize(x: jax.Array) -> jax.Array:
  """`x / max(|x|, 1e-12)` along the last axis (torch `F.normalize`), finite gradient at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / jnp.maximum(norm, _NORM_EPS)


def valid_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """`bool[...]`: the label is a class in `[0, C)` (negative = ignore, as everywhere here)."""
  return (labels >= 0) & (labels < num_classes)


def resize_labels(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest down-sampling `i32[B,H,W] -> i32[B,h,w]` (PyTorch `nearest`: source index
  `floor(i * H/h)`; for an integer stride s this is Pissas's `label[::s, ::s]`, spec §4.1).
  Used for the ground truth and for the predicted classes (paper §3.3: "the predicted class
  for the i-th layer downsampled from the predicted class in the final layer")."""
  return resampling.resize_nearest_torch(labels, size).astype(jnp.int32)


def _masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """`log Σ_{mask} exp(x)` along `axis`; `_NEG` (finite) where the mask is empty."""
  filled = jnp.where(mask, x, _NEG)
  peak = jax.lax.stop_gradient(jnp.max(filled, axis=axis, keepdims=True))
  total = jnp.sum(jnp.where(mask, jnp.exp(filled - peak), 0.0), axis=axis)
  any_ = jnp.any(mask, axis=axis)
  lse = jnp.squeeze(peak, axis) + jnp.log(jnp.where(any_, total, 1.0))
  return jnp.where(any_, lse, _NEG)


def _ratio_fraction(ratio: float) -> tuple[int, int]:
  """`ratio` as p/q with q <= 100 (the paper's ratios are percentages, Table 8), so that
  `ceil(ratio * n)` is computed exactly in integers."""
  frac = fractions.Fraction(ratio).limit_denominator(100)
  return frac.numerator, frac.denominator


def _group_ranks(group: jax.Array, primary: jax.Array, key: jax.Array,
                 num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Rank of every element inside its group, ordered by `primary` then a random tie-break.

  Args:
    group: `i32[N]` in `[0, num_groups]`; `num_groups` = "no group" (ranked last, ignored).
    primary: `i32[N]` sort key inside a group (ascending).
    key: PRNG key for the tie-break (uniform random order among equal `primary`).
    num_groups: G.

  Returns:
    `(rank i32[N], count i32[G+1])`: `rank[n]` = number of elements of n's group that come
    before n; `count[g]` = size of group g.
  """
  n = group.shape[0]
  tie = jax.random.bits(key, (n,), jnp.uint32)
  idx = jnp.arange(n, dtype=jnp.int32)
  _, _, _, order = jax.lax.sort((group, primary, tie, idx), num_keys=3)
  count = jnp.bincount(group, length=num_groups + 1).astype(jnp.int32)
  start = jnp.cumsum(count) - count
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - start[group[order]]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)
  return rank, count


# ----------------------------------------------------------------------------------------
# Distance transform (paper Eq. 7, ref. [23]; spec §4.3 option 1).
# ----------------------------------------------------------------------------------------
def squared_distance_to_boundary(mask: jax.Array, window: int) -> jax.Array:
  """Squared Euclidean distance transform, exact below `window` and clipped to `window²`.

  For every True pixel, `min(d², window²)` where d is the Euclidean distance to the nearest
  False pixel of the same image: `min(scipy.ndimage.distance_transform_edt(mask[b])², window²)`.
  False pixels get 0. Pixels outside the image are neither (as in scipy): an image without any
  False pixel is `window²` everywhere (scipy's output for that degenerate input is undefined).

  Separable and exact: pass 1 is the exact 1-D distance along each row to the nearest False
  pixel (running max/min of False column indices, O(H·W)); pass 2 is
  `D²(r, c) = min_{|k| < window} g²(r + k, c) + k²` (O(H·W·window)). If the true distance
  d < window the optimal row offset satisfies |k| <= d < window, so pass 2 finds it; otherwise
  every candidate is >= d² >= window² and the clip returns window². Integer arithmetic: exact.

  Args:
    mask: `bool[B,H,W]`.
    window: R >= 1, static.

  Returns:
    `i32[B,H,W]`, `min(d², R²)`.
  """
  mask = jnp.asarray(mask, bool)
  if mask.ndim != 3:
    raise ValueError(f"squared_distance_to_boundary: mask must be [B,H,W], got {mask.shape}")
  if int(window) < 1:
    raise ValueError(f"squared_distance_to_boundary: window must be >= 1, got {window}")
  window = int(window)
  _, height, width = mask.shape
  cap2 = window * window
  cols = jnp.arange(width, dtype=jnp.int32)
  big = width + window + 1
  # Pass 1, along rows: nearest False column to the left and to the right.
  left = jax.lax.cummax(jnp.where(~mask, cols, -big), axis=2)
  right = jax.lax.cummin(jnp.where(~mask, cols, width + big), axis=2, reverse=True)
  g = jnp.minimum(cols - left, right - cols)
  g2 = jnp.minimum(g, window) ** 2  # g >= R already gives >= R²: clipping loses nothing.
  # Pass 2, along columns: min over row offsets |k| < R of g²(r+k) + k².
  padded = jnp.pad(g2, ((0, 0), (window - 1, window - 1), (0, 0)), constant_values=cap2)

  def body(k, best):
    shifted = jax.lax.dynamic_slice_in_dim(padded, k, height, axis=1)
    offset = k - (window - 1)
    return jnp.minimum(best, shifted + offset * offset)

  best = jax.lax.fori_loop(0, 2 * window - 1, body,
                           jnp.full(mask.shape, cap2, jnp.int32))
  return jnp.where(mask, jnp.minimum(best, cap2), 0).astype(jnp.int32)


def distance_to_boundary(mask: jax.Array, window: int) -> jax.Array:
  """`f32[B,H,W]`: `min(scipy.ndimage.distance_transform_edt(mask[b]), window)` per image.

  Exact for distances below `window`; deeper pixels report the cap value `window` (see
  `squared_distance_to_boundary`, which this is the square root of). False pixels are 0.
  """
  return jnp.sqrt(squared_distance_to_boundary(mask, window).astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# BANE sampling (paper §3.3, Eqs. 6-7, Fig. 3, Table 8).
# ----------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["error", "group", "route", "distance2", "selected"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BaneSelection:
  """The boundary-aware selection at one level (all `[B,h,w]`, no gradient).

  error: bool, a valid pixel whose predicted class differs from its label.
  group: i32, the class of the error map the pixel belongs to (-1 if none): the predicted
    class ("false_positive" reading) or the label ("false_negative" reading).
  route: i32, the anchor the pixel is a negative for: always its predicted class (-1 if none).
  distance2: i32, `min(d², window²)`, d = distance to the boundary of its error map (0 off it).
  selected: bool, among the closest `ceil(ratio · n)` pixels of its error map (n = the map's
    pixel count over the batch or the image, `scope`).
  """
  error: jax.Array
  group: jax.Array
  route: jax.Array
  distance2: jax.Array
  selected: jax.Array


def bane_selection(key: jax.Array, labels: jax.Array, pred: jax.Array, num_classes: int, *,
                   ratio: float = 0.5, error_map: str = "false_positive",
                   scope: str = "batch", window: int = 32) -> BaneSelection:
  """Class-wise error maps, their distance transforms and the closest-to-boundary fraction.

  Paper §3.3: "1) decomposing prediction output to class-wise binary error maps, 2) distance
  transform based on the class-wise error maps, and 3) selecting negative samples"; "among the
  regions whose values in E are one, we select embedding vectors corresponding to the lower
  percentage of the smallest distances in D" (ratio 50 %: Table 8's best, 82.20).

  * error map of class n (Eq. 6, reading "false_positive", default):
    `E_n = valid ∧ pred = n ∧ label ≠ n` ("decomposing prediction output", "wrongly predicted
    pixel, i.e. a negative sample"; they are negatives of the anchor n they were mistaken
    for). Reading "false_negative": `E_n = valid ∧ label = n ∧ pred ≠ n`; the selected pixels
    are still routed as negatives to the anchor of their predicted class.
  * distance (Eq. 7): `D_n = EDT(E_n)` per image, the distance of an error pixel to the nearest
    pixel outside E_n (its region's boundary), exact below `window` (see
    `squared_distance_to_boundary`); ignored pixels count as outside.
  * selection: per error map (over the batch, or per image with `scope="image"`), the
    `ceil(ratio · n)` pixels of smallest distance; ties broken uniformly at random (`key`). The
    count is exact; the order is exact whenever the cut distance is below `window`.

  Args:
    key: PRNG key (tie-break).
    labels: `i32[B,h,w]` ground truth at this level (negative = ignore).
    pred: `i32[B,h,w]` predicted classes at this level.
    num_classes: C.
    ratio: fraction kept, in [0, 1] (Table 8; rounded to a multiple of 1/100 or finer).
    error_map: "false_positive" | "false_negative".
    scope: "batch" | "image".
    window: distance-transform window (pixels at this level).

  Returns:
    `BaneSelection`.
  """
  if error_map not in ERROR_MAPS:
    raise ValueError(f"bane_selection: error_map {error_map!r} not in {ERROR_MAPS}")
  if scope not in SELECTION_SCOPES:
    raise ValueError(f"bane_selection: scope {scope!r} not in {SELECTION_SCOPES}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"bane_selection: ratio must be in [0, 1], got {ratio}")
  labels, pred = jnp.asarray(labels, jnp.int32), jnp.asarray(pred, jnp.int32)
  if labels.ndim != 3 or pred.shape != labels.shape:
    raise ValueError(f"bane_selection: labels {labels.shape} and pred {pred.shape} must be "
                     "the same [B,h,w]")
  batch = labels.shape[0]
  valid = valid_labels(labels, num_classes) & valid_labels(pred, num_classes)
  error = valid & (pred != labels)
  group = jnp.where(error, pred if error_map == "false_positive" else labels, -1)
  route = jnp.where(error, pred, -1)

  classes = jnp.arange(num_classes, dtype=jnp.int32)
  maps = group[None] == classes[:, None, None, None]  # bool[C,B,h,w]
  d2_all = jax.vmap(lambda m: squared_distance_to_boundary(m, window))(maps)
  distance2 = jnp.sum(jnp.where(maps, d2_all, 0), axis=0)  # each error pixel is in one map

  num_groups = num_classes * (batch if scope == "image" else 1)
  image = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None, None], labels.shape)
  gid = group + (image * num_classes if scope == "image" else 0)
  gid = jnp.where(error, gid, num_groups).reshape(-1)
  rank, count = _group_ranks(gid, distance2.reshape(-1), key, num_groups)
  p, q = _ratio_fraction(ratio)
  keep = (count * p + q - 1) // q  # ceil(ratio · n), exact in integers
  selected = error.reshape(-1) & (rank < keep[gid])
  return BaneSelection(error=error, group=group, route=route, distance2=distance2,
                       selected=selected.reshape(labels.shape))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["index", "valid", "from_bane"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Negatives:
  """A fixed number K of negative pixels per anchor class (no gradient).

  index: `i32[C,K]` flat pixel indices (`b*h*w + y*w + x`); 0 where not valid.
  valid: `bool[C,K]`.
  from_bane: `bool[C]` the class's negatives are BANE pixels (False: fallback or none).
  """
  index: jax.Array
  valid: jax.Array
  from_bane: jax.Array


def sample_bane_negatives(key: jax.Array, labels: jax.Array, pred: jax.Array,
                          num_classes: int, num_negatives: int, *, use_bane: bool = True,
                          ratio: float = 0.5, error_map: str = "false_positive",
                          scope: str = "batch", window: int = 32,
                          fallback: str = "random") -> Negatives:
  """`num_negatives` negative pixels per anchor class: BANE pixels, else the fallback.

  For anchor n the candidates are the BANE-selected pixels routed to n (predicted n, labelled
  another valid class). A class without any such pixel (no errors, or `use_bane=False`, or
  ratio 0) gets the fallback: "random" = valid pixels labelled another class, uniformly (the
  negatives of CCL without BANE; Table 8's ratio 0 equals Table 6's CCL-only row, 81.88, so
  "no BANE pixels" must mean "CCL's own negatives", not "no negatives"), or "none" (the class
  has no negatives and drops out of the loss). The paper states no fallback; "random" is our
  reading. K of the candidates are drawn uniformly without replacement (top-k of uniform
  scores); fewer candidates than K leave invalid slots.

  Args:
    key: PRNG key.
    labels, pred: `i32[B,h,w]` at this level.
    num_classes: C.
    num_negatives: K (static). Not in the paper; see `ContextrastSettings.num_negatives`.
    use_bane: False = every class takes the fallback (CCL without BANE).
    ratio, error_map, scope, window: see `bane_selection`.
    fallback: "random" | "none".

  Returns:
    `Negatives`.
  """
  if fallback not in FALLBACKS:
    raise ValueError(f"sample_bane_negatives: fallback {fallback!r} not in {FALLBACKS}")
  labels, pred = jnp.asarray(labels, jnp.int32), jnp.asarray(pred, jnp.int32)
  key_sel, key_draw = jax.random.split(key)
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  flat_labels = labels.reshape(-1)
  valid = valid_labels(flat_labels, num_classes)
  if use_bane:
    sel = bane_selection(key_sel, labels, pred, num_classes, ratio=ratio, error_map=error_map,
                         scope=scope, window=window)
    bane = sel.selected.reshape(-1)[None, :] & (sel.route.reshape(-1)[None, :] == classes[:, None])
  else:
    bane = jnp.zeros((num_classes, flat_labels.shape[0]), bool)
  from_bane = jnp.any(bane, axis=1)  # [C]
  if fallback == "random":
    other = valid[None, :] & (flat_labels[None, :] != classes[:, None])
    tier = jnp.where(bane, 2.0, jnp.where(other & ~from_bane[:, None], 1.0, 0.0))
  else:
    tier = jnp.where(bane, 2.0, 0.0)
  score = tier + jax.random.uniform(key_draw, tier.shape, jnp.float32, 0.0, 0.5)
  k = min(int(num_negatives), flat_labels.shape[0])
  top, index = jax.lax.top_k(score, k)
  valid_k = top >= 1.0
  if k < num_negatives:  # more slots than pixels: pad with invalid slots
    pad = num_negatives - k
    index = jnp.pad(index, ((0, 0), (0, pad)))
    valid_k = jnp.pad(valid_k, ((0, 0), (0, pad)))
  return Negatives(index=jnp.where(valid_k, index, 0).astype(jnp.int32), valid=valid_k,
                   from_bane=from_bane)


# ----------------------------------------------------------------------------------------
# CCL: anchors, fusion, pixel-anchor loss (paper §3.2, Eqs. 1-5; spec §4.2-4.4).
# ----------------------------------------------------------------------------------------
def class_anchors(feats: jax.Array, labels: jax.Array,
                  num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Representative anchors of one level (paper Eq. 1): class means over the batch.

  `a^n = Σ_v v·[g(v) = n] / Σ_v [g(v) = n]` over the level's embeddings v with ground truth
  g(v) (ignored pixels excluded). Gradient flows into `feats` (the paper does not detach;
  `ContextrastSettings.stop_gradient_anchors` detaches).

  Args:
    feats: `f32[B,h,w,D]` (already L2-normalised if the settings say so).
    labels: `i32[B,h,w]` at this level.
    num_classes: C.

  Returns:
    `(anchors f32[C,D], present bool[C])`; absent classes have a zero anchor.
  """
  flat = feats.reshape(-1, feats.shape[-1]).astype(jnp.float32)
  lab = labels.reshape(-1)
  member = ((lab[:, None] == jnp.arange(num_classes)) & valid_labels(lab, num_classes)[:, None])
  count = jnp.sum(member, axis=0)
  total = jnp.einsum("nc,nd->cd", member.astype(jnp.float32), flat, precision=_HIGHEST)
  return total / jnp.maximum(count, 1)[:, None].astype(jnp.float32), count > 0


def fuse_anchors(anchors: jax.Array, present: jax.Array, last_anchors: jax.Array,
                 last_present: jax.Array, *, w_low: float, w_high: float,
                 absent_rule: str = "own", normalization: str = "after_fusion") -> jax.Array:
  """Updated representative anchors of one level: `Â_i = w_l·A_i + w_h·A_I` (paper §3.2).

  * `absent_rule` (class present at level i, absent at the last level I): "own" (default)
    `Â_i^n = A_i^n`, the follow-up's rule (spec §4.4: fusion "only when class n exists at both
    layer i and the last layer I") and spec §4.2's suggestion; "formula": the literal formula
    with the empty mean A_I^n = 0, i.e. `w_l·A_i^n`.
  * `normalization`: "after_fusion" (default) `Â = normalize(w_l·A_i + w_h·A_I)`, a unit anchor
    like the unit pixel embeddings it is compared with (Pissas's cosine logits, spec §4.1);
    "before_fusion" `Â = w_l·normalize(A_i) + w_h·normalize(A_I)`; "none" `Â = w_l·A_i + w_h·A_I`.
  For the last level itself pass `last_* = anchors, present` (Â_I = A_I when w_l + w_h = 1).

  Args:
    anchors, present: `f32[C,D]`, `bool[C]` of level i.
    last_anchors, last_present: the same for the last level I.

  Returns:
    `f32[C,D]`; rows of classes absent at level i are meaningless (masked by the loss).
  """
  if absent_rule not in ABSENT_RULES:
    raise ValueError(f"fuse_anchors: absent_rule {absent_rule!r} not in {ABSENT_RULES}")
  if normalization not in ANCHOR_NORMALIZATIONS:
    raise ValueError(f"fuse_anchors: normalization {normalization!r} not in "
                     f"{ANCHOR_NORMALIZATIONS}")
  low, high = anchors, last_anchors
  if normalization == "before_fusion":
    low, high = l2_normalize(low), l2_normalize(high)
  fused = w_low * low + w_high * high
  if absent_rule == "own":
    fused = jnp.where(last_present[:, None], fused, low)
  if normalization == "after_fusion":
    fused = l2_normalize(fused)
  return fused


def pixel_anchor_loss(feats: jax.Array, labels: jax.Array, anchors: jax.Array,
                      anchor_valid: jax.Array, neg_feats: jax.Array, neg_valid: jax.Array, *,
                      temperature: float, negatives: str = "pixels",
                      reduction: str = "class") -> jax.Array:
  """The pixel-anchor (PA) InfoNCE of one level (paper Eq. 4).

  For a pixel v of class n = g(v) (the positive of anchor â^n), with its own denominator:
    `l(v) = −log( e^{â^n·v/τ} / (e^{â^n·v/τ} + Σ_{u ∈ N(n)} e^{â^n·u/τ}) )`
  with N(n) (`negatives`): "pixels" (default) the class's negative pixel embeddings
  (BANE-selected or fallback, `neg_feats[n]`); "anchors" the other present classes' anchors
  (pixel-to-all-anchors softmax, `e^{â^m·v/τ}`, m ≠ n); "both" the union. The paper: "the
  anchor is set with a representative anchor in Eq. 4" and "[the] negative samples for each
  n-th representative anchor in Eq. 4" are pixel embeddings (BANE), hence "pixels".

  Reduction: "class" (default) mean over the classes with at least one term of the mean over
  their pixels (Pissas's "mean over queries of the mean over positives", spec §4.1, with the
  anchor as the query); "pixel" mean over all terms. Pixels whose class has no anchor or no
  negative make no term. No term at all: 0 (zero gradient).

  Args:
    feats: `f32[B,h,w,D]` pixel embeddings (the positives).
    labels: `i32[B,h,w]` at this level.
    anchors: `f32[C,D]` fused anchors Â.
    anchor_valid: `bool[C]` class present at this level.
    neg_feats: `f32[C,K,D]` negative embeddings per anchor.
    neg_valid: `bool[C,K]`.
    temperature: τ.
    negatives, reduction: see above.

  Returns:
    `f32[]`.
  """
  if negatives not in NEGATIVE_SOURCES:
    raise ValueError(f"pixel_anchor_loss: negatives {negatives!r} not in {NEGATIVE_SOURCES}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"pixel_anchor_loss: reduction {reduction!r} not in {REDUCTIONS}")
  num_classes = anchors.shape[0]
  flat = feats.reshape(-1, feats.shape[-1]).astype(jnp.float32)
  lab = labels.reshape(-1)
  valid = valid_labels(lab, num_classes)
  lab_c = jnp.clip(lab, 0, num_classes - 1)
  own = anchors[lab_c]  # [N,D]
  s_pos = jnp.sum(flat * own, axis=-1) / temperature  # [N]
  lse = jnp.full(s_pos.shape, _NEG)
  if negatives in ("pixels", "both"):
    s_neg = jnp.einsum("cd,ckd->ck", anchors, neg_feats, precision=_HIGHEST) / temperature
    lse = jnp.logaddexp(lse, _masked_logsumexp(s_neg, neg_valid, axis=1)[lab_c])
  if negatives in ("anchors", "both"):
    s_all = jnp.einsum("nd,cd->nc", flat, anchors, precision=_HIGHEST) / temperature
    other = anchor_valid[None, :] & (jnp.arange(num_classes)[None, :] != lab_c[:, None])
    lse = jnp.logaddexp(lse, _masked_logsumexp(s_all, other, axis=1))
  has_neg = lse > 0.5 * _NEG
  term = jnp.where(has_neg, jnp.logaddexp(s_pos, lse) - s_pos, 0.0)
  active = valid & anchor_valid[lab_c] & has_neg
  if reduction == "pixel":
    n = jnp.sum(active)
    return jnp.sum(jnp.where(active, term, 0.0)) / jnp.maximum(n, 1)
  member = active[:, None] & (lab_c[:, None] == jnp.arange(num_classes)[None, :])  # [N,C]
  count = jnp.sum(member, axis=0)
  per_class = jnp.sum(jnp.where(member, term[:, None], 0.0), axis=0) / jnp.maximum(count, 1)
  used = count > 0
  return jnp.sum(jnp.where(used, per_class, 0.0)) / jnp.maximum(jnp.sum(used), 1)


@dataclasses.dataclass(frozen=True)
class ContextrastSettings:
  """Contextrast's settings; defaults with their sources.

  temperature: τ = 0.1. Paper §4.1 "[symbol lost] is set to 0.1" (τ or α; the extraction lost
    the symbol); Pissas's configs use τ = 0.1 (spec §4.1), spec §4.2 [seed].
  alpha: α = 0.1, the weight of the PA loss against CE (paper Eq. 5). Paper §4.1 (one of τ/α,
    see above); Pissas's total uses 0.1 (spec §4.1); the follow-up states α = 0.1 (spec §4.4).
  level_weights: λ_i = (1.0, 0.7, 0.4, 0.1) for i = 1..I, first (highest resolution) level
    first. Paper §4.1 "[λ_i] is set to 1.0, 0.7, 0.4, and 0.1"; the order follows Pissas's
    `weights` (1.0 for stride 4, spec §4.1). The follow-up's 0.1/0.3/0.7/1.0 (spec §4.4) is a
    setting, not the default.
  w_low, w_high: anchor fusion `Â_i = w_l·A_i + w_h·A_I` (paper §3.2). Paper §4.4 / Table 7:
    "The sum of w_l and w_h is 1"; Table 7's best value is 0.7 (81.88 mIoU, = Table 6's CCL
    row), but the extraction lost which weight Table 7 varies. Our reading: the tabulated
    "anchor fusion weight" is w_h (the weight of the fused-in last-level anchor), so
    w_h = 0.7, w_l = 0.3. UNCONFIRMED; swap the two for the other reading.
  absent_rule: "own" (see `fuse_anchors`; spec §4.4 / §4.2).
  anchor_normalization: "after_fusion" (see `fuse_anchors`; our reading).
  normalize_features: L2-normalise the pixel embeddings before anything (Pissas's losses
    normalise, spec §4.1).
  stop_gradient_anchors: False; the paper's Eq. 1 has no detach (spec §4.2 lists it open).
  negatives: "pixels" (see `pixel_anchor_loss`).
  reduction: "class" (see `pixel_anchor_loss`).
  use_bane: True (BANE on; False = "CCL" of Table 6).
  bane_ratio: 0.5, paper Table 8 (82.20 at 50 %), §4.4 "mostly enhances performance with the
    ratio of 50%".
  error_map: "false_positive" (see `bane_selection`).
  selection_scope: "batch" (per class over the batch, like the anchors; not stated).
  distance_window: 32 pixels at each level's resolution (ours; the selection is exact whenever
    the cut distance is < 32; at stride 4 that is 128 input pixels).
  num_negatives: K = 1024 per anchor class (ours; the paper gives no count; Pissas's budget
    is 10 000 features per GPU over all classes, spec §4.1).
  fallback: "random" (see `sample_bane_negatives`).
  """
  temperature: float = 0.1
  alpha: float = 0.1
  level_weights: tuple[float, ...] = (1.0, 0.7, 0.4, 0.1)
  w_low: float = 0.3
  w_high: float = 0.7
  absent_rule: str = "own"
  anchor_normalization: str = "after_fusion"
  normalize_features: bool = True
  stop_gradient_anchors: bool = False
  negatives: str = "pixels"
  reduction: str = "class"
  use_bane: bool = True
  bane_ratio: float = 0.5
  error_map: str = "false_positive"
  selection_scope: str = "batch"
  distance_window: int = 32
  num_negatives: int = 1024
  fallback: str = "random"

  def __post_init__(self):
    for name, allowed in (("absent_rule", ABSENT_RULES),
                          ("anchor_normalization", ANCHOR_NORMALIZATIONS),
                          ("negatives", NEGATIVE_SOURCES), ("reduction", REDUCTIONS),
                          ("error_map", ERROR_MAPS), ("selection_scope", SELECTION_SCOPES),
                          ("fallback", FALLBACKS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ContextrastSettings.{name}={getattr(self, name)!r} not in {allowed}")
    if self.temperature <= 0:
      raise ValueError(f"ContextrastSettings.temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.bane_ratio <= 1.0:
      raise ValueError(f"ContextrastSettings.bane_ratio must be in [0, 1], got {self.bane_ratio}")
    if self.num_negatives < 1 or self.distance_window < 1:
      raise ValueError("ContextrastSettings: num_negatives and distance_window must be >= 1")


def _level_labels(labels: jax.Array, feats: Sequence[jax.Array]) -> list[jax.Array]:
  return [resize_labels(labels, f.shape[1:3]) for f in feats]


def contextrast_draws(key: jax.Array, feats: Sequence[jax.Array], labels: jax.Array,
                      pred: jax.Array, num_classes: int,
                      settings: ContextrastSettings = ContextrastSettings()) -> list[Negatives]:
  """The negatives of every level (only `feats`' shapes are read; no gradient).

  Args:
    key: PRNG key; level i uses `fold_in(key, i)`.
    feats: the levels' `f32[B,h_i,w_i,D]` (first = highest resolution).
    labels: `i32[B,H,W]` full-resolution ground truth (negative = ignore).
    pred: `i32[B,H',W']` predicted classes of the final output (any resolution); nearest-
      down-sampled to each level (paper §3.3, Eq. 6).
    num_classes: C.
    settings: `ContextrastSettings`.

  Returns:
    One `Negatives` per level.
  """
  pred = jax.lax.stop_gradient(jnp.asarray(pred, jnp.int32))
  draws = []
  for i, (f, lab) in enumerate(zip(feats, _level_labels(labels, feats))):
    draws.append(sample_bane_negatives(
        jax.random.fold_in(key, i), lab, resize_labels(pred, f.shape[1:3]), num_classes,
        settings.num_negatives, use_bane=settings.use_bane, ratio=settings.bane_ratio,
        error_map=settings.error_map, scope=settings.selection_scope,
        window=settings.distance_window, fallback=settings.fallback))
  return draws


def contextrast_loss_from_draws(feats: Sequence[jax.Array], labels: jax.Array,
                                draws: Sequence[Negatives], num_classes: int,
                                settings: ContextrastSettings = ContextrastSettings()
                                ) -> tuple[jax.Array, jax.Array]:
  """`α · Σ_i λ_i L_i` (paper Eqs. 3-5, the auxiliary part of Eq. 5) for given negatives.

  Returns:
    `(total f32[], per_level f32[I])` with per_level the unweighted L_i.
  """
  if len(feats) != len(settings.level_weights) or len(draws) != len(feats):
    raise ValueError(f"contextrast_loss: {len(feats)} levels, {len(draws)} draws and "
                     f"{len(settings.level_weights)} level_weights must agree")
  dims = {f.shape[-1] for f in feats}
  if len(dims) != 1:
    raise ValueError(f"contextrast_loss: the levels must share the embedding dim, got {dims}")
  level_feats = [f.astype(jnp.float32) for f in feats]
  if settings.normalize_features:
    level_feats = [l2_normalize(f) for f in level_feats]
  level_labels = _level_labels(labels, feats)
  stats = [class_anchors(f, lab, num_classes) for f, lab in zip(level_feats, level_labels)]
  if settings.stop_gradient_anchors:
    stats = [(jax.lax.stop_gradient(a), p) for a, p in stats]
  last_anchors, last_present = stats[-1]
  losses = []
  for f, lab, (a, present), neg in zip(level_feats, level_labels, stats, draws):
    fused = fuse_anchors(a, present, last_anchors, last_present, w_low=settings.w_low,
                         w_high=settings.w_high, absent_rule=settings.absent_rule,
                         normalization=settings.anchor_normalization)
    flat = f.reshape(-1, f.shape[-1])
    losses.append(pixel_anchor_loss(
        f, lab, fused, present, flat[neg.index], neg.valid, temperature=settings.temperature,
        negatives=settings.negatives, reduction=settings.reduction))
  per_level = jnp.stack(losses)
  total = settings.alpha * jnp.sum(jnp.asarray(settings.level_weights, jnp.float32) * per_level)
  return total, per_level


def contextrast_loss(key: jax.Array, feats: Sequence[jax.Array], labels: jax.Array,
                     pred: jax.Array, num_classes: int,
                     settings: ContextrastSettings = ContextrastSettings()
                     ) -> tuple[jax.Array, jax.Array]:
  """Contextrast's auxiliary loss `α · Σ_i λ_i L_PA^i` with BANE negatives (paper §3).

  Arguments as `contextrast_draws`. Returns `(total f32[], per_level f32[I])`.
  """
  draws = contextrast_draws(key, feats, labels, pred, num_classes, settings)
  return contextrast_loss_from_draws(feats, labels, draws, num_classes, settings)


# ----------------------------------------------------------------------------------------
# Pixel-pixel supervised contrast with each positive's own denominator (Table 2 baselines).
# ----------------------------------------------------------------------------------------
def own_denominator_contrast(queries: jax.Array, query_labels: jax.Array,
                             query_valid: jax.Array, keys: jax.Array, key_labels: jax.Array,
                             key_valid: jax.Array, *, temperature: float, exclude_self: bool,
                             chunk: int = 1024) -> jax.Array:
  """Supervised InfoNCE where each positive has its own denominator (spec §4.1).

  For query u and each positive p (same label, valid, p ≠ u when `exclude_self`), with
  `s = ⟨·,·⟩/τ`: `log_prob(u,p) = s_up − log(e^{s_up} + Σ_{n: label ≠} e^{s_un})`; row loss
  `−Σ_p log_prob(u,p) / max(#p, 1)` (rows without positives give 0: Pissas's cross-scale
  normalisation; its within-scale code divides by 0 there, giving NaN); result = mean over the
  valid queries (0 if none). Inputs are used as given (normalise before). The queries are
  processed `chunk` rows at a time (rematerialised in the backward pass), so only a
  `chunk x F_k` block of the similarity exists at a time.

  Args:
    queries: `f32[Fq,D]`; query_labels `i32[Fq]`; query_valid `bool[Fq]`.
    keys: `f32[Fk,D]`; key_labels `i32[Fk]`; key_valid `bool[Fk]`.
    temperature: τ.
    exclude_self: queries and keys are the same buffer; drop the diagonal from the positives.
    chunk: query rows per block.

  Returns:
    `f32[]`.
  """
  num_q = queries.shape[0]
  chunk = max(1, min(int(chunk), num_q))
  pad = (-num_q) % chunk
  q = jnp.pad(queries, ((0, pad), (0, 0)))
  ql = jnp.pad(query_labels, (0, pad), constant_values=-1)
  qv = jnp.pad(query_valid, (0, pad))
  rows = jnp.arange(num_q + pad, dtype=jnp.int32)
  cols = jnp.arange(keys.shape[0], dtype=jnp.int32)

  @jax.checkpoint
  def block(args):
    qb, qlb, qvb, rb = args
    s = jnp.einsum("qd,kd->qk", qb, keys, precision=_HIGHEST) / temperature
    same = qlb[:, None] == key_labels[None, :]
    pos = same & key_valid[None, :]
    if exclude_self:
      pos = pos & (rb[:, None] != cols[None, :])
    neg = ~same & key_valid[None, :]
    lse_neg = _masked_logsumexp(s, neg, axis=1)
    log_prob = s - jnp.logaddexp(s, lse_neg[:, None])
    npos = jnp.sum(pos, axis=1)
    row = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(npos, 1)
    return jnp.where(qvb, row, 0.0)

  n_blocks = (num_q + pad) // chunk
  per_row = jax.lax.map(block, (q.reshape(n_blocks, chunk, -1), ql.reshape(n_blocks, chunk),
                                qv.reshape(n_blocks, chunk), rows.reshape(n_blocks, chunk)))
  return jnp.sum(per_row) / jnp.maximum(jnp.sum(query_valid), 1)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["index", "labels", "valid"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Views:
  """Sampled pixels of one level in a fixed buffer of F (no gradient).

  index: `i32[F]` flat pixel indices, grouped by (image, class) slot; 0 where not valid.
  labels: `i32[F]` their class (-1 where not valid).
  valid: `bool[F]`.
  """
  index: jax.Array
  labels: jax.Array
  valid: jax.Array


def _compact(selected: jax.Array, order_key: jax.Array, flat_labels: jax.Array,
             size: int) -> Views:
  """The selected pixels, ordered by `order_key` (slot), in a buffer of `size`."""
  n = selected.shape[0]
  key = jnp.where(selected, order_key, jnp.iinfo(jnp.int32).max)
  _, order = jax.lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=1)
  if size > n:
    order = jnp.pad(order, (0, size - n))
  index = order[:size]
  valid = jnp.arange(size) < jnp.sum(selected)
  index = jnp.where(valid, index, 0)
  return Views(index=index, labels=jnp.where(valid, flat_labels[index], -1), valid=valid)


def _slots(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """`(slot i32[N] = b*C + label or B*C if ignored, count i32[B*C])`."""
  batch = labels.shape[0]
  image = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None, None], labels.shape)
  slot = jnp.where(valid_labels(labels, num_classes), image * num_classes + labels,
                   batch * num_classes).reshape(-1)
  count = jnp.bincount(slot, length=batch * num_classes + 1)[:-1].astype(jnp.int32)
  return slot, count


@dataclasses.dataclass(frozen=True)
class PissasSettings:
  """Pissas et al. ECCV'22 multi-scale + cross-scale contrast (spec §4.1, code at c511fbc).

  temperature: 0.1 (configs; spec §4.1). cross_scale_temperature: 0.1 (spec §4.1: 0.1 either
  way in the shipped configs). level_weights: (1.0, 0.7, 0.4, 0.1) for strides 4, 8, 16, 32
  (spec §4.1, `weights`). alpha: 0.1, the weight of the whole contrastive term against CE
  (spec §4.1 "Total"). cross_scale: True; w_high_low = w_high_mid = 1.0 (spec §4.1: first vs
  last level, first vs second-to-last level when there are more than 2). min_views: 5,
  max_views: 2500, max_features_total: 10000 (spec §4.1 `sample_anchors_fast`; per GPU in the
  original, 4 GPUs). detach_deepest: False (`detach_deepest` config default). chunk: query rows
  per similarity block (memory: chunk x max_features_total floats).
  """
  temperature: float = 0.1
  cross_scale_temperature: float = 0.1
  level_weights: tuple[float, ...] = (1.0, 0.7, 0.4, 0.1)
  alpha: float = 0.1
  cross_scale: bool = True
  w_high_low: float = 1.0
  w_high_mid: float = 1.0
  min_views: int = 5
  max_views: int = 2500
  max_features_total: int = 10000
  detach_deepest: bool = False
  chunk: int = 1024


def pissas_views(key: jax.Array, labels: jax.Array, num_classes: int, *, min_views: int = 5,
                 max_views: int = 2500, max_features_total: int = 10000) -> Views:
  """`sample_anchors_fast` of Pissas et al. (spec §4.1) with static shapes (spec §4.3).

  Slots are the (image, class) pairs with at least `min_views` valid pixels; T slots,
  `V = min(min slot count, max_views)`, then `V = max_features_total // T` if `V·T` exceeds it;
  every slot gets V pixels uniformly without replacement. `V·T <= max_features_total` = F, the
  buffer size.

  Args:
    key: PRNG key.
    labels: `i32[B,h,w]` at this level.
    num_classes: C.

  Returns:
    `Views` with F = `max_features_total`.
  """
  slot, count = _slots(labels, num_classes)
  is_slot = count >= min_views
  num_slots = jnp.sum(is_slot)
  views = jnp.minimum(jnp.min(jnp.where(is_slot, count, jnp.iinfo(jnp.int32).max)), max_views)
  views = jnp.where(views * num_slots > max_features_total,
                    max_features_total // jnp.maximum(num_slots, 1), views)
  n_slots_all = count.shape[0]
  gid = jnp.where(slot < n_slots_all, slot, n_slots_all)
  gid = jnp.where(jnp.append(is_slot, False)[gid], gid, n_slots_all)
  rank, _ = _group_ranks(gid, jnp.zeros_like(gid), key, n_slots_all)
  selected = (gid < n_slots_all) & (rank < views)
  return _compact(selected, gid, labels.reshape(-1), max_features_total)


def pissas_draws(key: jax.Array, feats: Sequence[jax.Array], labels: jax.Array,
                 num_classes: int, settings: PissasSettings = PissasSettings()) -> list[Views]:
  """The sampled views of every level (labels nearest-down-sampled per level, spec §4.1)."""
  return [pissas_views(jax.random.fold_in(key, i), lab, num_classes,
                       min_views=settings.min_views, max_views=settings.max_views,
                       max_features_total=settings.max_features_total)
          for i, lab in enumerate(_level_labels(labels, feats))]


def pissas_loss_from_draws(feats: Sequence[jax.Array], draws: Sequence[Views],
                           settings: PissasSettings = PissasSettings()
                           ) -> tuple[jax.Array, dict]:
  """`α · [Σ_s w_s·L_s + w_hl·L_cs(0, last) + w_hm·L_cs(0, second-to-last)]` (spec §4.1).

  L_s: `own_denominator_contrast` of level s's views with themselves (self excluded from the
  positives). L_cs(0, t): queries = level 0's views, keys = level t's views, positives = every
  same-class key (no self), `cross_scale_temperature`. Features are L2-normalised.

  Returns:
    `(total f32[], {"multi_scale": f32[S], "cross_scale": f32[n_cs]})`, unweighted parts.
  """
  if len(feats) != len(settings.level_weights) or len(draws) != len(feats):
    raise ValueError(f"pissas_loss: {len(feats)} levels, {len(draws)} draws and "
                     f"{len(settings.level_weights)} level_weights must agree")
  sampled = []
  for f, v in zip(feats, draws):
    flat = f.reshape(-1, f.shape[-1]).astype(jnp.float32)
    sampled.append((l2_normalize(flat[v.index]), v.labels, v.valid))
  ms = jnp.stack([own_denominator_contrast(x, lab, ok, x, lab, ok,
                                           temperature=settings.temperature,
                                           exclude_self=True, chunk=settings.chunk)
                  for x, lab, ok in sampled])
  total = jnp.sum(jnp.asarray(settings.level_weights, jnp.float32) * ms)
  cs = []
  if settings.cross_scale and len(sampled) > 1:
    pairs = [(len(sampled) - 1, settings.w_high_low)]
    if len(sampled) > 2:
      pairs.append((len(sampled) - 2, settings.w_high_mid))
    for t, w in pairs:
      kx, kl, kv = sampled[t]
      if settings.detach_deepest:
        kx = jax.lax.stop_gradient(kx)
      loss = own_denominator_contrast(*sampled[0], kx, kl, kv,
                                      temperature=settings.cross_scale_temperature,
                                      exclude_self=False, chunk=settings.chunk)
      cs.append(loss)
      total = total + w * loss
  return settings.alpha * total, {"multi_scale": ms, "cross_scale": jnp.stack(cs) if cs
                                  else jnp.zeros((0,), jnp.float32)}


def pissas_loss(key: jax.Array, feats: Sequence[jax.Array], labels: jax.Array,
                num_classes: int, settings: PissasSettings = PissasSettings()
                ) -> tuple[jax.Array, dict]:
  """Pissas et al.'s loss ("[31]" of Contextrast's Table 2): `pissas_draws` + `..._from_draws`."""
  return pissas_loss_from_draws(feats, pissas_draws(key, feats, labels, num_classes, settings),
                                settings)


@dataclasses.dataclass(frozen=True)
class ContrastiveSegSettings:
  """ContrastiveSeg-style pixel-pixel contrast (Wang et al. ICCV'21, "[41]" of Table 2).

  Values of ContrastiveSeg's `PixelContrastLoss` and its Cityscapes config (tfzhou/ContrastiveSeg
  as copied in public third-party code; not checked at an official commit): temperature 0.1,
  base_temperature 0.07 (the loss is scaled by τ/τ_base), max_samples 1024 (the feature
  budget F), max_views 100 (per-slot cap; a slot needs more than max_views pixels),
  loss_weight 0.1. sampling: "semi_hard" (ContrastiveSeg's `_hard_anchor_sampling`: half the
  views from mispredicted pixels of the slot, half from correct ones, with its fallbacks;
  Contextrast §4.2: "semi-hard negative sampling that just randomly selects the negative
  samples corresponding to the wrongly predicted regions") or "random" (uniform per slot).
  No memory bank (the pixel-pixel in-batch term only).
  """
  temperature: float = 0.1
  base_temperature: float = 0.07
  max_samples: int = 1024
  max_views: int = 100
  loss_weight: float = 0.1
  sampling: str = "semi_hard"
  chunk: int = 1024

  def __post_init__(self):
    if self.sampling not in CONTRASTIVESEG_SAMPLING:
      raise ValueError(f"ContrastiveSegSettings.sampling {self.sampling!r} not in "
                       f"{CONTRASTIVESEG_SAMPLING}")


def contrastiveseg_views(key: jax.Array, labels: jax.Array, pred: jax.Array, num_classes: int,
                         *, sampling: str = "semi_hard", max_samples: int = 1024,
                         max_views: int = 100) -> Views:
  """ContrastiveSeg's `_hard_anchor_sampling` with static shapes.

  Slots: (image, class) with more than `max_views` valid pixels; T slots;
  `n_view = min(max_samples // T, max_views)`. "semi_hard": with hard = label c ∧ pred ≠ c and
  easy = label c ∧ pred = c, `hard_keep = min(#hard, max(n_view // 2, n_view − #easy))`,
  `easy_keep = n_view − hard_keep` (ContrastiveSeg's three cases in one formula); each part
  uniformly without replacement. "random": n_view uniformly from the slot.

  Returns:
    `Views` with F = `max_samples`.
  """
  if sampling not in CONTRASTIVESEG_SAMPLING:
    raise ValueError(f"contrastiveseg_views: sampling {sampling!r} not in "
                     f"{CONTRASTIVESEG_SAMPLING}")
  slot, count = _slots(labels, num_classes)
  is_slot = count > max_views
  num_slots = jnp.sum(is_slot)
  n_view = jnp.minimum(max_samples // jnp.maximum(num_slots, 1), max_views)
  n_all = count.shape[0]
  in_slot = (slot < n_all) & jnp.append(is_slot, False)[jnp.minimum(slot, n_all)]
  if sampling == "random":
    gid = jnp.where(in_slot, slot, n_all)
    rank, _ = _group_ranks(gid, jnp.zeros_like(gid), key, n_all)
    selected = in_slot & (rank < n_view)
  else:
    hard = (pred.reshape(-1) != labels.reshape(-1)).astype(jnp.int32)  # 1 = hard
    gid = jnp.where(in_slot, 2 * slot + hard, 2 * n_all)
    rank, sizes = _group_ranks(gid, jnp.zeros_like(gid), key, 2 * n_all)
    num_easy, num_hard = sizes[0:2 * n_all:2], sizes[1:2 * n_all:2]
    hard_keep = jnp.minimum(num_hard, jnp.maximum(n_view // 2, n_view - num_easy))
    easy_keep = n_view - hard_keep
    keep = jnp.stack([easy_keep, hard_keep], axis=1).reshape(-1)
    selected = in_slot & (rank < keep[jnp.minimum(gid, 2 * n_all - 1)])
    gid = jnp.where(in_slot, slot, n_all)
  return _compact(selected, gid, labels.reshape(-1), max_samples)


def contrastiveseg_loss_from_draws(feats: jax.Array, views: Views,
                                   settings: ContrastiveSegSettings = ContrastiveSegSettings()
                                   ) -> jax.Array:
  """`loss_weight · (τ/τ_base) · own_denominator_contrast(views, views)` on L2-normalised
  features (ContrastiveSeg `_contrastive`: self excluded from the positives, each positive
  with its own denominator)."""
  flat = feats.reshape(-1, feats.shape[-1]).astype(jnp.float32)
  x = l2_normalize(flat[views.index])
  loss = own_denominator_contrast(x, views.labels, views.valid, x, views.labels, views.valid,
                                  temperature=settings.temperature, exclude_self=True,
                                  chunk=settings.chunk)
  return settings.loss_weight * (settings.temperature / settings.base_temperature) * loss


def contrastiveseg_loss(key: jax.Array, feats: jax.Array, labels: jax.Array, pred: jax.Array,
                        num_classes: int,
                        settings: ContrastiveSegSettings = ContrastiveSegSettings()
                        ) -> jax.Array:
  """ContrastiveSeg-style loss on one level: labels and predictions nearest-down-sampled to
  `feats`' resolution, `contrastiveseg_views`, then `contrastiveseg_loss_from_draws`."""
  size = feats.shape[1:3]
  views = contrastiveseg_views(key, resize_labels(labels, size),
                               resize_labels(jax.lax.stop_gradient(pred), size), num_classes,
                               sampling=settings.sampling, max_samples=settings.max_samples,
                               max_views=settings.max_views)
  return contrastiveseg_loss_from_draws(feats, views, settings)


__all__ = [
    "distance_to_boundary", "squared_distance_to_boundary", "BaneSelection", "bane_selection",
    "Negatives", "sample_bane_negatives", "class_anchors", "fuse_anchors", "pixel_anchor_loss",
    "ContextrastSettings", "contextrast_draws", "contextrast_loss_from_draws",
    "contextrast_loss", "own_denominator_contrast", "Views", "PissasSettings", "pissas_views",
    "pissas_draws", "pissas_loss_from_draws", "pissas_loss", "ContrastiveSegSettings",
    "contrastiveseg_views", "contrastiveseg_loss_from_draws", "contrastiveseg_loss",
    "resize_labels", "l2_normalize", "valid_labels",
]
