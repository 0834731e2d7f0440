"""ReCo regional contrastive loss with active query and key sampling.

JAX port of `module_list.py: compute_reco_loss` of lorenmt/reco (reco_spec §1). For every
class c present in the batch (labelled and unlabelled pixels pooled):

* queries: `num_queries` pixels drawn with replacement from the *hard* valid pixels of c,
  those whose predicted probability of their own class is `< strong_threshold` (strict);
* positive key: `mu_c`, the stop-gradient mean of the raw representations of all valid
  pixels of c;
* negative keys: per query, `num_negatives` i.i.d. draws of (class j ~ softmax over the
  other present classes of `cos(mu_c, mu_j) / temperature`, pixel ~ uniform over the valid
  pixels of j), stop-gradient;
* `loss = (1/n_present) * sum_c mean_q CE([cos(r_q, mu_c), cos(r_q, r_k)...] / temperature, 0)`,
  where the sum skips classes without a hard pixel but `n_present` counts them, and the
  loss is exactly 0 (zero gradient) when at most one class is present.

Only the queries carry gradient. Cosine similarity is the torch >= 1.12 one,
`x / max(|x|, 1e-8)` on both sides.

Layout conventions: representations are NHWC, `f[B,h,w,D]`; a *flat pixel index* is
`b*h*w + y*w + x` (row-major, as the official boolean-mask indexing and the goldens).

Public API: `reco_loss` (the sampled loss), `reco_loss_from_draws` (the formula for
explicit draws, used by `reco_loss` and by the deterministic goldens), `sample_reco_draws`
(the sampler) and `prepare_reco_inputs` (full-resolution labels -> representation
resolution).

Implementation (static shapes, no host sync, jit/vmap/sharding friendly):
* one sort puts the pixels in class blocks, query-pool pixels first inside each block and
  invalid pixels last, so a uniform draw from a class (or from its query pool) is
  `order[start_c + offset]` with a uniform integer offset;
* negative classes are drawn by inverse CDF from the per-class softmax (C compares per
  draw instead of a C-wide Gumbel tensor per draw), and only inside the loop over
  classes, for the classes that produce queries (`NegativeSampler`): threefry bits are a
  large part of the sampling cost on CPU;
* the similarities `cos(r_q, r_k)` are computed by gathering the K key rows of a few
  queries at a time (`lax.map` over query chunks), so no `Q x K x D` tensor is ever held
  (134 MB per class at Q=256, K=512, D=256), and no `Q x N` similarity matrix either
  (`Q x N x D` FLOPs are N/K times the `Q x K x D` needed);
* the loss and its gradient with respect to the normalised queries come out of the same
  pass over the gathered keys (a `custom_vjp`): the gather dominates the cost, and
  autodiff would either gather again or keep `Q x K x D` residuals;
* the loop over classes is a `lax.map` whose body is a `lax.cond`, so absent classes and
  classes without queries cost nothing (outside `vmap`, where the cond becomes a select).

Reverse-mode differentiation only (`custom_vjp`): `jax.jvp` through the loss is not
supported.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from reco_jax import resampling

QUERY_SAMPLING = ("active", "random")
KEY_SAMPLING = ("active", "random", "uniform_class")

# torch >= 1.12 `cosine_similarity` clamps each norm at this value.
_COSINE_EPS = 1e-8

# Bytes of gathered key rows (`chunk x K x D` f32) processed per step of the query loop.
# On CPU a chunk that stays in L2 is fastest (measured: 2 MB chunks are ~4x faster than one
# 134 MB block at the VOC size); accelerators prefer fewer, larger steps.
_CHUNK_BYTES = {"cpu": 2 << 20}
_DEFAULT_CHUNK_BYTES = 32 << 20


# ----------------------------------------------------------------------------------------
# Input preparation (train_semisup.py, lines ~112-128; reco_spec §1.5).
# ----------------------------------------------------------------------------------------
def prepare_reco_inputs(labels: jax.Array, valid: jax.Array,
                        logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Brings full-resolution labels and mask to the representation resolution.

  As the official training scripts: labels and validity are down-sampled with PyTorch
  `nearest` (top-left aligned, float32 index map) to the size of the low-resolution
  logits, and the class probabilities are the softmax of those logits (not up-sampled).
  Everything is stop-gradient (the official code builds it under `torch.no_grad()`).

  Args:
    labels: `i32[B,H,W]` full-resolution labels or pseudo-labels, -1 = ignore.
    valid: `bool[B,H,W]` full-resolution validity (e.g. `[labels_l >= 0; conf_u >= 0.7]`).
    logits: `f[B,h,w,C]` student logits at the representation resolution.

  Returns:
    `(labels_low i32[B,h,w], valid_low bool[B,h,w], probs_low f32[B,h,w,C])`. `valid_low`
    also excludes pixels whose label is negative; the official code never produces a
    valid pixel with label -1 (its one-hot would silently be class 0).
  """
  labels, valid, logits = jnp.asarray(labels), jnp.asarray(valid), jnp.asarray(logits)
  if labels.ndim != 3 or valid.shape != labels.shape:
    raise ValueError(f"prepare_reco_inputs: labels {labels.shape} and valid {valid.shape} "
                     "must both be [B,H,W]")
  if logits.ndim != 4 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f"prepare_reco_inputs: logits {logits.shape} must be [B,h,w,C] with "
                     f"B={labels.shape[0]}")
  size = logits.shape[1:3]
  labels_low = resampling.resize_nearest_torch(labels, size)
  valid_low = resampling.resize_nearest_torch(valid, size) & (labels_low >= 0)
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  return labels_low.astype(jnp.int32), valid_low, probs


# ----------------------------------------------------------------------------------------
# Class statistics shared by the sampler and the loss.
# ----------------------------------------------------------------------------------------
def _clamped_norm(squared: jax.Array) -> jax.Array:
  """`max(sqrt(s), 1e-8)` with a finite gradient at s = 0: a zero vector (a pixel whose
  representation is exactly 0, e.g. all-ReLU-zero features and a zero bias early in
  training) gets torch's gradient instead of sqrt'(0)·0 = NaN. The inner `where` keeps the
  square root away from 0 (the double-where idiom); the values, bit for bit, are those of
  `max(sqrt(s), eps)` (the regression fixtures check it)."""
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return jnp.maximum(norm, _COSINE_EPS)


def _normalize(x: jax.Array) -> jax.Array:
  """`x / max(|x|, 1e-8)` along the last axis (torch >= 1.12 cosine similarity)."""
  return x / _clamped_norm(jnp.sum(x * x, axis=-1, keepdims=True))


def _flatten_inputs(rep: jax.Array, labels: jax.Array, valid: jax.Array, num_classes: int,
                    where: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks the shapes; returns `rep f32[N,D]`, `labels i32[N]`, `valid bool[N]`."""
  rep, labels, valid = jnp.asarray(rep), jnp.asarray(labels), jnp.asarray(valid)
  if rep.ndim != 4:
    raise ValueError(f"{where}: rep must be [B,h,w,D], got shape {rep.shape}")
  if labels.shape != rep.shape[:3] or valid.shape != rep.shape[:3]:
    raise ValueError(f"{where}: labels {labels.shape} and valid {valid.shape} must equal "
                     f"rep's [B,h,w] = {rep.shape[:3]}")
  if not jnp.issubdtype(rep.dtype, jnp.floating):
    raise ValueError(f"{where}: rep must be floating point, got {rep.dtype}")
  rep_flat = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
  labels_flat = labels.reshape(-1).astype(jnp.int32)
  # A label outside [0, C) cannot belong to any class; treat it as invalid rather than
  # letting the one-hot below wrap or drop it silently.
  valid_flat = valid.reshape(-1).astype(bool) & (labels_flat >= 0) & (labels_flat < num_classes)
  return rep_flat, labels_flat, valid_flat


def class_prototypes(rep_flat: jax.Array, labels_flat: jax.Array, valid_flat: jax.Array,
                     num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Stop-gradient class means of the raw representations and valid-pixel counts.

  Args:
    rep_flat: `f32[N,D]`.
    labels_flat: `i32[N]`.
    valid_flat: `bool[N]`, already restricted to labels in `[0, C)`.
    num_classes: C.

  Returns:
    `(mu f32[C,D], count i32[C])`; `mu` is 0 for absent classes.
  """
  member = (labels_flat[:, None] == jnp.arange(num_classes)) & valid_flat[:, None]  # [N,C]
  count = jnp.sum(member, axis=0, dtype=jnp.int32)
  # A one-hot contraction: it shards over N (XLA adds the all-reduce) and is a plain
  # matmul on every backend. A segment sum (scatter) is no faster on CPU: XLA copies the
  # whole [N,D] operand for it. HIGHEST keeps it float32-exact on accelerators whose
  # default matmul precision is lower.
  total = jnp.einsum("nc,nd->cd", member.astype(jnp.float32), jax.lax.stop_gradient(rep_flat),
                     precision=jax.lax.Precision.HIGHEST)
  mu = total / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
  return mu, count


# ----------------------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------------------
class _ClassBlocks(NamedTuple):
  """Pixels sorted into class blocks.

  `order[start[c] : start[c] + count[c]]` are the flat indices of the valid pixels of
  class c, the `pool_count[c]` query-pool pixels first; invalid pixels come last.
  """
  order: jax.Array  # i32[N]
  start: jax.Array  # i32[C]
  count: jax.Array  # i32[C]
  pool_count: jax.Array  # i32[C]


def _class_blocks(labels_flat: jax.Array, valid_flat: jax.Array, pool_flat: jax.Array,
                  num_classes: int) -> _ClassBlocks:
  num_pixels = labels_flat.shape[0]
  num_keys = 2 * num_classes + 1
  sort_key = jnp.where(valid_flat, 2 * labels_flat + (~pool_flat).astype(jnp.int32),
                       2 * num_classes)
  if num_keys * num_pixels < 2**31:
    # One sort of `key * N + index` (unique, so the order is stable) is ~5x faster on CPU
    # than an argsort of (key, index) pairs (N = 131k: 14 ms vs 76 ms).
    packed = sort_key * num_pixels + jnp.arange(num_pixels, dtype=jnp.int32)
    order = jnp.sort(packed) % num_pixels
  else:
    order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
  member = (labels_flat[:, None] == jnp.arange(num_classes)) & valid_flat[:, None]
  count = jnp.sum(member, axis=0, dtype=jnp.int32)
  pool_count = jnp.sum(member & pool_flat[:, None], axis=0, dtype=jnp.int32)
  return _ClassBlocks(order, jnp.cumsum(count) - count, count, pool_count)


def _uniform_offsets(key: jax.Array, size: jax.Array) -> jax.Array:
  """Uniform integers in `[0, size)` (0 where size is 0), `i32` of `size.shape`.

  `bits mod size` with 32 random bits: the modulo bias is below size / 2^32 (< 1e-4 for
  any realistic class size), unlike `floor(u * size)` with a 23-bit float `u`.
  """
  bits = jax.random.bits(key, size.shape, jnp.uint32)
  return (bits % jnp.maximum(size, 1).astype(jnp.uint32)).astype(jnp.int32)


def _negative_class_probs(mu: jax.Array, count: jax.Array, temperature: float,
                          key_sampling: str) -> jax.Array:
  """`f32[C,C]`: row c is the distribution of the negative class for query class c."""
  num_classes = mu.shape[0]
  allowed = (count > 0)[None, :] & ~jnp.eye(num_classes, dtype=bool)
  if key_sampling == "active":
    mu_n = _normalize(mu)
    logits = jnp.einsum("cd,jd->cj", mu_n, mu_n,
                        precision=jax.lax.Precision.HIGHEST) / temperature
  elif key_sampling == "random":
    # Uniform over all valid pixels of the other classes: class j with prob ~ |V_j|.
    logits = jnp.broadcast_to(jnp.log(jnp.maximum(count, 1).astype(jnp.float32)),
                              (num_classes, num_classes))
  else:  # uniform_class
    logits = jnp.zeros((num_classes, num_classes), jnp.float32)
  # A row without any allowed class belongs to a class that produces no queries; give it
  # a harmless finite distribution instead of NaN.
  has_allowed = jnp.any(allowed, axis=1, keepdims=True)
  logits = jnp.where(allowed | ~has_allowed, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=1)


def _sample_classes(key: jax.Array, probs: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`i32[*shape]` i.i.d. draws from `probs f32[C]` by inverse CDF.

  C compares per draw, instead of the C-wide Gumbel tensor per draw that
  `jax.random.categorical` materialises.
  """
  num_classes = probs.shape[0]
  cdf = jnp.cumsum(probs)
  u = jax.random.uniform(key, shape, jnp.float32)
  drawn = jnp.sum(u[..., None] >= cdf, axis=-1, dtype=jnp.int32)
  # Rounding can leave cdf[-1] just below 1: fall back to the last class with mass.
  last = num_classes - 1 - jnp.argmax(probs[::-1] > 0).astype(jnp.int32)
  return jnp.minimum(drawn, last)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["keys", "class_probs", "order", "start", "count"],
    meta_fields=["num_queries", "num_negatives"])
@dataclasses.dataclass(frozen=True)
class NegativeSampler:
  """The negative keys of `reco_loss`, drawn per class on demand.

  `reco_loss_from_draws` calls `draw_class` inside its loop over classes, only for the
  classes that produce queries, so absent classes cost no random numbers (threefry bits
  are most of the sampling cost on CPU). `materialize()` returns the same draws as an
  explicit `i32[C,Q,K]` array.
  """
  keys: jax.Array  # key[C], one per query class.
  class_probs: jax.Array  # f32[C,C], row c = distribution of the negative class for c.
  order: jax.Array  # i32[N], flat pixel indices in class blocks (see _ClassBlocks).
  start: jax.Array  # i32[C]
  count: jax.Array  # i32[C]
  num_queries: int
  num_negatives: int

  @property
  def num_classes(self) -> int:
    return self.class_probs.shape[0]

  def draw_class(self, key: jax.Array, class_probs: jax.Array) -> jax.Array:
    """`i32[Q,K]`: K i.i.d. (class j ~ class_probs, pixel ~ uniform over V_j) per query."""
    key_class, key_pixel = jax.random.split(key)
    neg_class = _sample_classes(key_class, class_probs, (self.num_queries, self.num_negatives))
    offset = _uniform_offsets(key_pixel, self.count[neg_class])
    return self.order[self.start[neg_class] + offset]

  def materialize(self) -> jax.Array:
    """`i32[C,Q,K]`, the draws `reco_loss_from_draws` makes from this sampler."""
    return jax.vmap(self.draw_class)(self.keys, self.class_probs)


def sample_reco_draws(key: jax.Array, rep: jax.Array, labels: jax.Array, valid: jax.Array,
                      probs: jax.Array, *, strong_threshold: float = 0.97,
                      temperature: float = 0.5, num_queries: int = 256,
                      num_negatives: int = 512, query_sampling: str = "active",
                      key_sampling: str = "active", easy_queries: bool = False
                      ) -> tuple[jax.Array, NegativeSampler, jax.Array]:
  """Draws queries and negative keys as the official sampler does (in distribution).

  Arguments as `reco_loss`; `rep` is read only for the class prototypes of the
  active key sampling.

  Returns:
    `(query_pix i32[C,Q], negatives, query_class_mask bool[C])`, the draw arguments of
    `reco_loss_from_draws`; `negatives.materialize()` gives the `i32[C,Q,K]` negatives.
  """
  _check_options(query_sampling, key_sampling, easy_queries, num_queries, num_negatives,
                 rep, probs, "sample_reco_draws")
  num_classes = probs.shape[-1]
  rep_flat, labels_flat, valid_flat = _flatten_inputs(rep, labels, valid, num_classes,
                                                      "sample_reco_draws")
  probs_flat = jax.lax.stop_gradient(probs).reshape(-1, num_classes).astype(jnp.float32)
  own_prob = jnp.take_along_axis(
      probs_flat, jnp.clip(labels_flat, 0, num_classes - 1)[:, None], axis=1)[:, 0]
  if query_sampling == "random":
    pool = valid_flat
  elif easy_queries:
    pool = valid_flat & (own_prob >= strong_threshold)
  else:
    pool = valid_flat & (own_prob < strong_threshold)  # hard queries: strict, as official
  blocks = _class_blocks(labels_flat, valid_flat, pool, num_classes)

  key_query, key_negative = jax.random.split(key)
  query_offset = _uniform_offsets(
      key_query, jnp.broadcast_to(blocks.pool_count[:, None], (num_classes, num_queries)))
  query_pix = blocks.order[blocks.start[:, None] + query_offset]

  if key_sampling == "active":
    mu, _ = class_prototypes(rep_flat, labels_flat, valid_flat, num_classes)
  else:
    mu = jnp.zeros((num_classes, rep_flat.shape[1]), jnp.float32)  # unused
  negatives = NegativeSampler(
      keys=jax.random.split(key_negative, num_classes),
      class_probs=_negative_class_probs(mu, blocks.count, temperature, key_sampling),
      order=blocks.order, start=blocks.start, count=blocks.count,
      num_queries=num_queries, num_negatives=num_negatives)
  return query_pix, negatives, blocks.pool_count > 0


# ----------------------------------------------------------------------------------------
# The formula, given the draws.
# ----------------------------------------------------------------------------------------
def _query_chunk(num_queries: int, num_negatives: int, dim: int) -> int:
  """Largest divisor of Q whose gathered keys fit the per-backend chunk budget."""
  budget = _CHUNK_BYTES.get(jax.default_backend(), _DEFAULT_CHUNK_BYTES)
  target = max(1, budget // (num_negatives * dim * 4))
  return max(d for d in range(1, min(target, num_queries) + 1) if num_queries % d == 0)


def _one_class_loss_and_grad(anchor_n: jax.Array, neg_pix: jax.Array, mu_n: jax.Array,
                             rep_flat: jax.Array, inv_norm: jax.Array, temperature: float,
                             chunk: int, with_grad: bool) -> tuple[jax.Array, jax.Array]:
  """Mean CE over one class's queries and its gradient w.r.t. the normalised queries.

  Args:
    anchor_n: `f32[Q,D]` normalised queries.
    neg_pix: `i32[Q,K]` flat pixel indices of each query's negative keys.
    mu_n: `f32[D]` normalised positive key.
    rep_flat: `f32[N,D]` raw representations (the key bank).
    inv_norm: `f32[N]`, `1 / max(|rep_flat|, 1e-8)`. Scaling the gathered dot products
      instead of normalising the bank avoids an `N x D` temporary.
    temperature: tau.
    chunk: queries per step; divides Q.
    with_grad: compute the gradient (zeros otherwise).

  Returns:
    `(loss f32[], dloss/danchor_n f32[Q,D])`.
  """
  num_queries, dim = anchor_n.shape
  num_negatives = neg_pix.shape[1]

  def step(args):
    anchor, pix = args  # [q,D], [q,K]
    keys = rep_flat[pix]  # [q,K,D]: only `chunk` queries' keys exist at a time.
    scale = inv_norm[pix]  # [q,K]
    cos_neg = jnp.einsum("qd,qkd->qk", anchor, keys) * scale
    logits = jnp.concatenate([(anchor @ mu_n)[:, None], cos_neg], axis=1) / temperature
    lse = jax.nn.logsumexp(logits, axis=1)
    ce = lse - logits[:, 0]
    if not with_grad:
      return ce, jnp.zeros_like(anchor)
    # d ce / d anchor = (sum_k p_k key_k/|key_k| + (p_0 - 1) mu) / tau, p = softmax(logits):
    # computed while the keys are at hand, so they are gathered once for both passes.
    p = jnp.exp(logits - lse[:, None])
    grad = (jnp.einsum("qk,qkd->qd", p[:, 1:] * scale, keys)
            + (p[:, :1] - 1.0) * mu_n) / temperature
    return ce, grad

  num_chunks = num_queries // chunk
  ce, grad = jax.lax.map(step, (anchor_n.reshape(num_chunks, chunk, dim),
                                neg_pix.reshape(num_chunks, chunk, num_negatives)))
  return jnp.mean(ce), grad.reshape(num_queries, dim) / num_queries


def _per_class_losses_and_grads(anchors_n, mu_n, active, rep_flat, inv_norm, negatives,
                                temperature, chunk, with_grad=True):
  """`lax.map` over classes; inactive classes are skipped by `lax.cond` (0 loss, 0 grad)."""
  sampler = isinstance(negatives, NegativeSampler)
  per_class = (negatives.keys, negatives.class_probs) if sampler else negatives

  def one_class(args):
    anchor_n, mu, is_active, neg = args

    def compute(anchor_n, mu, neg):
      neg_pix = negatives.draw_class(*neg) if sampler else neg
      return _one_class_loss_and_grad(anchor_n, neg_pix, mu, rep_flat, inv_norm, temperature,
                                      chunk, with_grad)

    def skip(anchor_n, mu, neg):
      del mu, neg
      return jnp.zeros((), jnp.float32), jnp.zeros_like(anchor_n)

    return jax.lax.cond(is_active, compute, skip, anchor_n, mu, neg)

  return jax.lax.map(one_class, (anchors_n, mu_n, active, per_class))


# The loss of a class and its gradient come out of the same pass over the gathered keys;
# a custom VJP hands that gradient to autodiff instead of letting it re-gather the keys
# (or store `Q x K x D` residuals) in a backward pass.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _per_class_losses(anchors_n, mu_n, active, rep_flat, inv_norm, negatives, temperature,
                      chunk):
  """`f32[C]` per-class mean CE; differentiable w.r.t. `anchors_n f32[C,Q,D]` only."""
  return _per_class_losses_and_grads(anchors_n, mu_n, active, rep_flat, inv_norm, negatives,
                                     temperature, chunk, with_grad=False)[0]


def _per_class_losses_fwd(anchors_n, mu_n, active, rep_flat, inv_norm, negatives,
                          temperature, chunk):
  return _per_class_losses_and_grads(anchors_n, mu_n, active, rep_flat, inv_norm, negatives,
                                     temperature, chunk)


def _per_class_losses_bwd(temperature, chunk, grads, cotangent):
  del temperature, chunk
  # Keys, prototypes and draws are stop-gradient in the official code.
  return cotangent[:, None, None] * grads, None, None, None, None, None


_per_class_losses.defvjp(_per_class_losses_fwd, _per_class_losses_bwd)


def reco_loss_from_draws(rep: jax.Array, labels: jax.Array, valid: jax.Array,
                         query_pix: jax.Array, neg_pix: jax.Array | NegativeSampler,
                         query_class_mask: jax.Array | None = None, *,
                         temperature: float = 0.5) -> jax.Array:
  """The ReCo loss for explicit query and negative-key draws.

  Args:
    rep: `f[B,h,w,D]` representations (any float dtype; computed in float32). The only
      input that receives gradient, and only through the query rows.
    labels: `i32[B,h,w]` class of each pixel.
    valid: `bool[B,h,w]`; a pixel belongs to class c iff `valid & (labels == c)`. Labels
      outside `[0, C)` are treated as invalid.
    query_pix: `i32[C,Q]`; row c holds the flat pixel indices (`b*h*w + y*w + x`) of the
      Q queries of class c. The number of classes C is taken from here.
    neg_pix: `i32[C,Q,K]`, `neg_pix[c, q]` = the flat pixel indices of the K negative
      keys of query q of class c; or a `NegativeSampler` that draws them per class.
    query_class_mask: `bool[C]`, the classes that produce queries; the rows of the other
      classes are ignored, whatever they hold. None means every present class.
    temperature: tau.

  Returns:
    `f32[]`: `(1/n_present) * sum_{c in mask, present} mean_q CE(c, q)`, where
    `CE(c, q) = -log softmax([cos(r_q, mu_c), cos(r_q, r_k) for the K keys] / tau)[0]`
    and `mu_c` is the stop-gradient mean of the raw `rep` over the valid pixels of c; or
    exactly 0 with zero gradient when at most one class is present.
  """
  if isinstance(neg_pix, NegativeSampler):
    neg_shape = (neg_pix.num_classes, neg_pix.num_queries, neg_pix.num_negatives)
  else:
    neg_shape = neg_pix.shape
  if query_pix.ndim != 2 or len(neg_shape) != 3 or tuple(neg_shape[:2]) != query_pix.shape:
    raise ValueError(f"reco_loss_from_draws: query_pix {query_pix.shape} must be [C,Q] and "
                     f"neg_pix {tuple(neg_shape)} must be [C,Q,K] with the same C, Q")
  num_classes, num_queries = query_pix.shape
  if query_class_mask is not None and query_class_mask.shape != (num_classes,):
    raise ValueError(f"reco_loss_from_draws: query_class_mask {query_class_mask.shape} must "
                     f"be [C] = [{num_classes}]")
  rep_flat, labels_flat, valid_flat = _flatten_inputs(rep, labels, valid, num_classes,
                                                      "reco_loss_from_draws")
  num_pixels, dim = rep_flat.shape
  mu, count = class_prototypes(rep_flat, labels_flat, valid_flat, num_classes)
  num_present = jnp.sum(count > 0)
  active = (count > 0) & (num_present > 1)
  if query_class_mask is not None:
    active &= query_class_mask
  if not isinstance(neg_pix, NegativeSampler):
    # Rows of inactive classes may hold anything; keep every gather in bounds.
    neg_pix = jnp.clip(neg_pix.astype(jnp.int32), 0, num_pixels - 1)
  query_pix = jnp.clip(query_pix.astype(jnp.int32), 0, num_pixels - 1)

  anchors_n = _normalize(rep_flat[query_pix])  # [C,Q,D], the only gradient path.
  bank = jax.lax.stop_gradient(rep_flat)
  inv_norm = 1.0 / _clamped_norm(jnp.sum(bank * bank, axis=1))
  chunk = _query_chunk(num_queries, neg_shape[2], dim)
  losses = _per_class_losses(anchors_n, _normalize(mu), active, bank, inv_norm, neg_pix,
                             float(temperature), chunk)
  total = jnp.sum(jnp.where(active, losses, 0.0))
  return jnp.where(num_present > 1, total / jnp.maximum(num_present, 1), 0.0)


def _check_options(query_sampling: str, key_sampling: str, easy_queries: bool,
                   num_queries: int, num_negatives: int, rep: jax.Array, probs: jax.Array,
                   where: str) -> None:
  if query_sampling not in QUERY_SAMPLING:
    raise ValueError(f"{where}: query_sampling={query_sampling!r} not in {QUERY_SAMPLING}")
  if key_sampling not in KEY_SAMPLING:
    raise ValueError(f"{where}: key_sampling={key_sampling!r} not in {KEY_SAMPLING}")
  if easy_queries and query_sampling != "active":
    raise ValueError(f"{where}: easy_queries=True replaces the hard-query pool of "
                     f"query_sampling='active'; got query_sampling={query_sampling!r}")
  if num_queries < 1 or num_negatives < 1:
    raise ValueError(f"{where}: num_queries={num_queries} and num_negatives={num_negatives} "
                     "must be >= 1")
  if probs.ndim != 4 or rep.ndim != 4 or probs.shape[:3] != rep.shape[:3]:
    raise ValueError(f"{where}: probs {probs.shape} must be [B,h,w,C] with [B,h,w] equal to "
                     f"rep's {rep.shape[:3]} (rep must be [B,h,w,D])")


def reco_loss(key: jax.Array, rep: jax.Array, labels: jax.Array, valid: jax.Array,
              probs: jax.Array, *, strong_threshold: float = 0.97, temperature: float = 0.5,
              num_queries: int = 256, num_negatives: int = 512,
              query_sampling: str = "active", key_sampling: str = "active",
              easy_queries: bool = False) -> jax.Array:
  """The ReCo loss (`module_list.py: compute_reco_loss`), sampled with `key`.

  Defaults are the training scripts' values (not the function's own keyword defaults,
  which the scripts never use; reco_spec §0.6).

  Args:
    key: PRNG key; the draws depend only on it and the input shapes (not on sharding).
    rep: `f[B,h,w,D]` representation-head output; the only input with gradient.
    labels: `i32[B,h,w]` (pseudo-)labels at the representation resolution.
    valid: `bool[B,h,w]` valid pixels (the official `label * mask`).
    probs: `f32[B,h,w,C]` student softmax at the representation resolution (C is taken
      from here); only `probs[..., label]` is read, and it gets no gradient.
    strong_threshold: delta_s; hard queries have `probs[label] < delta_s` (strict).
    temperature: tau, used in the CE and in the negative-class softmax.
    num_queries: Q per class per batch (all images pooled).
    num_negatives: K per query.
    query_sampling: 'active' (official: uniform over the hard valid pixels of the class)
      or 'random' (uniform over all valid pixels of the class; paper Table 4 "Random
      Query").
    key_sampling: 'active' (official: class j ~ softmax(cos(mu_c, mu_j)/tau) over the other
      present classes, then a uniform valid pixel of j), 'random' (uniform over all valid
      pixels of the other present classes, i.e. class j with probability ~ |V_j|; paper
      Table 4 "Random Key"), or 'uniform_class' (class j uniform over the other present
      classes, then a uniform valid pixel of j).
    easy_queries: with query_sampling='active', draw the queries from the *easy* valid
      pixels (`probs[label] >= delta_s`, the complement of the hard ones) instead; a class
      without an easy pixel produces no queries but still counts in the normaliser, as a
      class without a hard pixel does officially (paper Table 4 "Easy Query").

  Returns:
    `f32[]`; exactly 0 with zero gradient when at most one class is present.
  """
  query_pix, negatives, query_class_mask = sample_reco_draws(
      key, rep, labels, valid, probs, strong_threshold=strong_threshold,
      temperature=temperature, num_queries=num_queries, num_negatives=num_negatives,
      query_sampling=query_sampling, key_sampling=key_sampling, easy_queries=easy_queries)
  return reco_loss_from_draws(rep, labels, valid, query_pix, negatives, query_class_mask,
                              temperature=temperature)
