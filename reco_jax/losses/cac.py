"""CAC's directional contrastive loss as the official code computes it (other_methods_spec §1.3-1.6).

Official: `dvlab-research/Context-Aware-Consistency`, `models/model.py: CAC.forward` (mode
'semi', inner `run1_0/run1/run2_0/run2`). Everything is NHWC and static-shaped:

* Overlap alignment. Each view is flipped back (if it was flipped) and the view-2 map is
  gathered onto the view-1 grid: view-1 position (r, c) pairs with view-2 position
  (r + (ul2-ul1)[0]/8, c + (ul2-ul1)[1]/8). `overlap[b,r,c]` marks the positions inside
  view 1's overlap box (at stride 8, the official hard-coded `//8`). Positions outside it
  take part in the computation with weight 0 (`jnp.where`, so no NaN can leak).
* Both directions in one pass over the bank: anchors `[z1; z2 aligned]` (2P rows), targets
  `stop_gradient([z2 aligned; z1])`.
* Denominator: a chunked online log-sum-exp over the bank (`lax.scan`, each chunk under
  `jax.checkpoint`), so the (positions x bank) matrix never exists; memory is
  (2P x chunk_size). The official numerics (`numerics="official"`): the shift `M` is the max
  over the positive and the first `max_shift_rows` (8000) bank rows *whatever their label*,
  and ε = 1e-8 is added in the shifted domain: `p = e^{pos-M} / (down + ε)`,
  `ℓ = -log(p + ε)`, with `down = e^{pos-M} + Σ_j m_ij e^{s_ij-M}`. The gradient flows
  through `M` (an ordinary max), as the official's. `numerics="exact"`: `ℓ = -log_softmax`
  of the positive, no ε.
* Masked mean per group of samples (the official per-GPU mean, then DDP's gradient average):
  `L_v = mean_g Σ_{i∈g} d_i ℓ_i / (Σ_{i∈g} d_i + 1e-12)`.
"""

import jax
import jax.numpy as jnp

# models/model.py: the first chunk of the bank (8000 rows) sets the max-shift; ε of p and log.
OFFICIAL_CHUNK_ROWS = 8000
EPS = 1e-8
MEAN_EPS = 1e-12
FEATURE_STRIDE = 8  # hard-coded `//8` of CAC.forward
NUMERICS = ("official", "exact")


def flip_back(x: jax.Array, flip: jax.Array) -> jax.Array:
  """x [B,h,w,...] with the samples whose `flip` (bool[B]) is set mirrored along width."""
  f = flip.reshape(flip.shape + (1,) * (x.ndim - 1))
  return jnp.where(f, x[:, :, ::-1], x)


def overlap_alignment(ul1: jax.Array, br1: jax.Array, ul2: jax.Array, h: int, w: int
                      ) -> tuple[jax.Array, jax.Array]:
  """View-1 overlap mask and the flat view-2 index of each view-1 position.

  Args:
    ul1, br1: i32[B,2] view 1's overlap box [y, x] in its (unflipped) crop pixels.
    ul2: i32[B,2] view 2's top-left corner of the same box.
    h, w: the feature grid (stride 8).
  Returns:
    (overlap bool[B,h,w], partner i32[B,h*w]): partner[b, r*w+c] is the flat (r', c') of
    view 2 (clipped into the grid; only meaningful where overlap).
  """
  s = FEATURE_STRIDE
  r0, c0 = ul1[:, 0] // s, ul1[:, 1] // s
  r1, c1 = br1[:, 0] // s, br1[:, 1] // s
  dr = ul2[:, 0] // s - r0
  dc = ul2[:, 1] // s - c0
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  overlap = ((rows >= r0[:, None, None]) & (rows < r1[:, None, None])
             & (cols >= c0[:, None, None]) & (cols < c1[:, None, None]))
  r2 = jnp.clip(rows + dr[:, None, None], 0, h - 1)
  c2 = jnp.clip(cols + dc[:, None, None], 0, w - 1)
  partner = (r2 * w + c2).reshape(ul1.shape[0], h * w)
  return overlap, partner


def _gather_flat(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B,h,w,...] gathered per sample at flat positions index i32[B,h*w] -> [B,h,w,...]."""
  b, h, w = x.shape[:3]
  flat = x.reshape((b, h * w) + x.shape[3:])
  idx = index.reshape((b, h * w) + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(flat, idx, axis=1).reshape(x.shape)


def _denominator_terms(anchors: jax.Array, anchor_labels: jax.Array, pos: jax.Array,
                       bank_feats: jax.Array, bank_labels: jax.Array, bank_valid: jax.Array,
                       *, temperature: float, chunk_size: int, max_shift_rows: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Online log-sum-exp over the bank, chunk by chunk.

  Args:
    anchors: f32[A,D] (gradient flows), anchor_labels: i32[A], pos: f32[A] = s⁺ (already /τ).
    bank_feats: f32[N,D] in the official order (oldest entry first), bank_labels: i32[N],
      bank_valid: bool[N] (unfilled ring-buffer rows are False).
  Returns:
    (m f32[A], total f32[A], shift f32[A]): `total = Σ_j m_ij e^{s_ij - m}` over the
    surviving negatives with `m = max(pos, max surviving s)`, and `shift` = the official M =
    max(pos, max_{valid j < max_shift_rows} s_ij) (every label).
  """
  n, d = bank_feats.shape
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  feats = jnp.pad(bank_feats, ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, d)
  labels = jnp.pad(bank_labels, (0, pad)).reshape(num_chunks, chunk_size)
  valid = jnp.pad(bank_valid, (0, pad)).reshape(num_chunks, chunk_size)
  row = jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size)
  first = valid & (row < max_shift_rows)
  inv_t = 1.0 / temperature

  @jax.checkpoint
  def body(carry, chunk):
    m, total, shift = carry
    f, lab, val, fst = chunk
    s = jnp.dot(anchors, f.T) * inv_t  # [A, chunk]
    keep = val[None, :] & (lab[None, :] != anchor_labels[:, None])
    m_new = jnp.maximum(m, jnp.max(jnp.where(keep, s, -jnp.inf), axis=1))
    total = total * jnp.exp(m - m_new) + jnp.sum(jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0),
                                                 axis=1)
    shift = jnp.maximum(shift, jnp.max(jnp.where(fst[None, :], s, -jnp.inf), axis=1))
    return (m_new, total, shift), None

  init = (pos, jnp.zeros_like(pos), pos)
  (m, total, shift), _ = jax.lax.scan(body, init, (feats, labels, valid, first))
  return m, total, shift


def contrastive_terms(anchors: jax.Array, targets: jax.Array, anchor_labels: jax.Array,
                      bank_feats: jax.Array, bank_labels: jax.Array, bank_valid: jax.Array, *,
                      temperature: float, numerics: str = "official", chunk_size: int = 1024,
                      max_shift_rows: int = OFFICIAL_CHUNK_ROWS) -> jax.Array:
  """Per-anchor ℓ_i = -log p_i against the bank (targets and bank get no gradient).

  Args:
    anchors, targets: f32[A,D] unit-norm features; anchor_labels: i32[A] pseudo-labels.
    bank_feats f32[N,D], bank_labels i32[N], bank_valid bool[N]: the negatives, oldest first.
    numerics: "official" (max-shift over the positive + the first `max_shift_rows` rows,
      ε after the shift) or "exact" (-log_softmax).
  Returns:
    f32[A].
  """
  if numerics not in NUMERICS:
    raise ValueError(f"config cac.numerics={numerics!r} is invalid; expected one of {', '.join(NUMERICS)}")
  bank_feats = jax.lax.stop_gradient(bank_feats)
  pos = jnp.sum(anchors * jax.lax.stop_gradient(targets), axis=-1) / temperature
  m, total, shift = _denominator_terms(anchors, anchor_labels, pos, bank_feats, bank_labels,
                                       bank_valid, temperature=temperature,
                                       chunk_size=chunk_size, max_shift_rows=max_shift_rows)
  if numerics == "exact":
    return jnp.log(jnp.exp(pos - m) + total) + m - pos
  numerator = jnp.exp(pos - shift)
  down = numerator + total * jnp.exp(m - shift)
  p = numerator / (down + EPS)
  return -jnp.log(p + EPS)


def grouped_masked_mean(values: jax.Array, mask: jax.Array, num_groups: int) -> jax.Array:
  """mean over `num_groups` contiguous sample groups of Σ mask·v / (Σ mask + 1e-12).

  values, mask: [B, ...] (B divisible by num_groups) -> f32[].
  """
  b = values.shape[0]
  if b % num_groups:
    raise ValueError(f"config cac.mean_groups={num_groups} does not divide the unlabelled batch {b}")
  v = jnp.where(mask, values, 0.0).reshape(num_groups, -1)
  m = mask.astype(jnp.float32).reshape(num_groups, -1)
  return jnp.mean(jnp.sum(v, axis=1) / (jnp.sum(m, axis=1) + MEAN_EPS))


def cac_loss(feat1: jax.Array, feat2: jax.Array, conf1: jax.Array, conf2: jax.Array,
             plabel1: jax.Array, plabel2: jax.Array, ul1: jax.Array, br1: jax.Array,
             ul2: jax.Array, flip: jax.Array, bank_feats: jax.Array, bank_labels: jax.Array,
             bank_valid: jax.Array, *, temperature: float = 0.1, pos_threshold: float = 0.75,
             numerics: str = "official", chunk_size: int = 1024,
             max_shift_rows: int = OFFICIAL_CHUNK_ROWS, num_groups: int = 1
             ) -> tuple[jax.Array, jax.Array, dict]:
  """Both directions of the directional contrastive loss (unweighted).

  Args:
    feat1, feat2: f32[B,h,w,D] unit-norm projected maps at stride 8, network-output
      orientation (as the student produced them, before any flip-back).
    conf1, conf2: f32[B,h,w] max softmax; plabel1, plabel2: i32[B,h,w] argmax (both treated
      as constants).
    ul1, br1, ul2: i32[B,2] overlap boxes [y, x] in unflipped crop pixels (br2 follows).
    flip: bool[B,2] [flip1, flip2].
    bank_feats f32[N,D], bank_labels i32[N], bank_valid bool[N]: the negative bank including
      the current step, oldest entry first (the official concatenation order).
    temperature, pos_threshold: τ and γ.
    numerics, chunk_size, max_shift_rows: see `contrastive_terms`.
    num_groups: groups of the per-device masked mean (the official GPU count).
  Returns:
    (loss1 f32[], loss2 f32[], extras {'mask1', 'mask2' bool[B,h,w], 'overlap' bool[B,h,w]})
    where extras are on the view-1 grid.
  """
  b, h, w, d = feat1.shape
  conf1, conf2, plabel1, plabel2 = jax.lax.stop_gradient((conf1, conf2, plabel1, plabel2))
  z1, c1, l1 = (flip_back(x, flip[:, 0]) for x in (feat1, conf1, plabel1))
  z2, c2, l2 = (flip_back(x, flip[:, 1]) for x in (feat2, conf2, plabel2))
  overlap, partner = overlap_alignment(ul1, br1, ul2, h, w)
  z2, c2, l2 = (_gather_flat(x, partner) for x in (z2, c2, l2))
  gamma = jnp.float32(pos_threshold)  # official: float32 comparisons
  mask1 = overlap & (c2 > gamma) & (c1 < c2)
  mask2 = overlap & (c1 > gamma) & (c2 < c1)
  anchors = jnp.concatenate([z1.reshape(-1, d), z2.reshape(-1, d)])
  targets = jnp.concatenate([z2.reshape(-1, d), z1.reshape(-1, d)])
  labels = jnp.concatenate([l1.reshape(-1), l2.reshape(-1)])
  ell = contrastive_terms(anchors, targets, labels, bank_feats, bank_labels, bank_valid,
                          temperature=temperature, numerics=numerics, chunk_size=chunk_size,
                          max_shift_rows=max_shift_rows)
  ell1, ell2 = ell[:b * h * w].reshape(b, h, w), ell[b * h * w:].reshape(b, h, w)
  loss1 = grouped_masked_mean(ell1, mask1, num_groups)
  loss2 = grouped_masked_mean(ell2, mask2, num_groups)
  return loss1, loss2, {"mask1": mask1, "mask2": mask2, "overlap": overlap}


def confidence_and_label(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits f32[...,C] -> (max softmax f32[...], argmax i32[...]), both without gradient."""
  logits = jax.lax.stop_gradient(logits)
  return (jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1),
          jnp.argmax(logits, axis=-1).astype(jnp.int32))


# ------------------------------------------------------------------------------------------
# The negative bank: a ring buffer of `step_save + 1` entries (models/model.py keeps a Python
# list, appends the current step's entry, then drops the oldest once it holds step_save + 2).
# ------------------------------------------------------------------------------------------


def init_bank(num_slots: int, rows: int, dim: int) -> dict:
  """An empty bank: {'feats' f32[S,R,D], 'labels' i32[S,R], 'filled' bool[S]}."""
  return {"feats": jnp.zeros((num_slots, rows, dim), jnp.float32),
          "labels": jnp.zeros((num_slots, rows), jnp.int32),
          "filled": jnp.zeros((num_slots,), bool)}


def bank_write(bank: dict, step: jax.Array, feats: jax.Array, labels: jax.Array) -> dict:
  """The bank with this step's entry (f32[R,D], i32[R], detached) in slot `step % S`.

  `step` counts the bank writes before this one (the official `step_count` history): the
  official list after write t holds entries max(0, t-S+1) .. t.
  """
  slot = step % bank["filled"].shape[0]
  return {"feats": bank["feats"].at[slot].set(jax.lax.stop_gradient(feats).astype(jnp.float32)),
          "labels": bank["labels"].at[slot].set(labels.astype(jnp.int32)),
          "filled": bank["filled"].at[slot].set(True)}


def bank_in_official_order(bank: dict, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(feats f32[S*R,D], labels i32[S*R], valid bool[S*R]) oldest entry first.

  After write `step` the oldest held entry is in slot (step+1) % S once the ring is full,
  else in slot 0 (the unfilled slots then follow the filled ones). Only the max-shift of the
  official numerics (its first 8000 rows) depends on this order.
  """
  s, r, d = bank["feats"].shape
  oldest = jnp.where(step >= s - 1, (step + 1) % s, 0)
  order = (oldest + jnp.arange(s)) % s
  feats = jnp.take(bank["feats"], order, axis=0).reshape(s * r, d)
  labels = jnp.take(bank["labels"], order, axis=0).reshape(s * r)
  valid = jnp.repeat(jnp.take(bank["filled"], order), r)
  return feats, labels, valid
