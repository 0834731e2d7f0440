"""Contextrast's pure losses (reco_jax.losses.contextrast) against independent references.

* the windowed device distance transform equals `scipy.ndimage.distance_transform_edt`
  (clipped at the window) on random masks and on the class masks of a real CamVid label map;
* BANE: the error maps, their distances and the closest-`ratio` selection are exact against a
  NumPy sort; the per-class negatives come from the right candidate sets (fallback included);
* CCL: anchors, fusion and the per-level pixel-anchor InfoNCE against a slow NumPy loop
  transcription of the paper's formulas, value and gradient (float64 central differences);
* Pissas multi-scale + cross-scale and ContrastiveSeg losses against NumPy loop transcriptions
  of spec §4.1 (each positive with its own denominator), their samplers against the caps;
* sensitivity: the references tell apart the mutations a bug would produce (ignore pixels kept,
  w_l/w_h swapped, a shared denominator).
"""
import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from conftest import CAMVID_DIR
from reco_jax.losses import contextrast as cx


def _edt2(mask: np.ndarray, window: int) -> np.ndarray:
  """scipy's squared EDT per image, clipped at window²."""
  out = np.stack([scipy.ndimage.distance_transform_edt(m) ** 2 for m in mask])
  return np.minimum(np.rint(out), window * window).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Distance transform.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("density,window", [(0.7, 3), (0.9, 5), (0.97, 40)])
def test_distance_transform_matches_scipy_on_random_masks(density, window):
  rng = np.random.default_rng(int(density * 100) + window)
  mask = rng.random((3, 29, 37)) < density
  mask[:, 0, 0] = False  # every image has a background pixel (scipy is undefined otherwise)
  got2 = np.asarray(cx.squared_distance_to_boundary(mask, window))
  np.testing.assert_array_equal(got2, _edt2(mask, window))
  got = np.asarray(cx.distance_to_boundary(mask, window))
  ref = np.minimum(np.stack([scipy.ndimage.distance_transform_edt(m) for m in mask]), window)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert np.all(got[~mask] == 0)


def test_distance_transform_matches_scipy_on_camvid_class_masks():
  from PIL import Image
  files = sorted((CAMVID_DIR / "valannot").glob("*.png"))
  if not files:
    pytest.skip(f"CamVid val labels not found in {CAMVID_DIR} (set RECO_SHARED_DIR)")
  label = np.asarray(Image.open(files[0]), np.int64)  # [360,480], 11 = void
  classes = [c for c in np.unique(label) if c != 11]
  masks = np.stack([label == c for c in classes])
  window = 24
  got = np.asarray(jax.jit(cx.squared_distance_to_boundary, static_argnums=1)(masks, window))
  np.testing.assert_array_equal(got, _edt2(masks, window))
  assert (got == window * window).any() and ((got > 0) & (got < window * window)).any()


# ---------------------------------------------------------------------------------------
# BANE selection and negatives.
# ---------------------------------------------------------------------------------------
def _random_maps(seed, shape=(2, 12, 16), num_classes=4):
  rng = np.random.default_rng(seed)
  # Blocky labels (regions with boundaries), ~8 % ignore, predictions shifted + noisy.
  small = rng.integers(0, num_classes, (shape[0], shape[1] // 4, shape[2] // 4))
  labels = np.repeat(np.repeat(small, 4, 1), 4, 2)
  pred = np.roll(labels, (1, 2), axis=(1, 2))
  noise = rng.random(shape) < 0.15
  pred = np.where(noise, rng.integers(0, num_classes, shape), pred)
  labels = np.where(rng.random(shape) < 0.08, -1, labels)
  return labels.astype(np.int32), pred.astype(np.int32)


@pytest.mark.parametrize("error_map,scope,ratio", [
    ("false_positive", "batch", 0.5), ("false_negative", "batch", 0.3),
    ("false_positive", "image", 0.7)])
def test_bane_selection_is_exact_against_numpy(error_map, scope, ratio):
  num_classes, window = 4, 6
  labels, pred = _random_maps(1)
  sel = jax.jit(cx.bane_selection, static_argnums=3, static_argnames=(
      "ratio", "error_map", "scope", "window"))(
          jax.random.PRNGKey(3), labels, pred, num_classes, ratio=ratio, error_map=error_map,
          scope=scope, window=window)
  valid = labels >= 0
  error = valid & (pred != labels)
  group = np.where(error, pred if error_map == "false_positive" else labels, -1)
  np.testing.assert_array_equal(np.asarray(sel.error), error)
  np.testing.assert_array_equal(np.asarray(sel.group), group)
  np.testing.assert_array_equal(np.asarray(sel.route), np.where(error, pred, -1))
  d2 = np.zeros(labels.shape, np.int64)
  for c in range(num_classes):
    d2 = np.where(group == c, _edt2(group == c, window), d2)
  np.testing.assert_array_equal(np.asarray(sel.distance2), d2)
  selected = np.asarray(sel.selected)
  assert not (selected & ~error).any()
  images = range(labels.shape[0]) if scope == "image" else [None]
  checked = 0
  for c in range(num_classes):
    for b in images:
      members = (group == c) if b is None else (group == c) & (np.arange(2)[:, None, None] == b)
      n = int(members.sum())
      k = math.ceil(fractions.Fraction(ratio).limit_denominator(100) * n)
      dist = np.sort(d2[members])
      picked = d2[members & selected]
      assert picked.size == k, (c, b, n)
      if 0 < k < n:
        checked += 1
        assert picked.max() <= d2[members & ~selected].min()
        np.testing.assert_array_equal(np.sort(picked), dist[:k])
  assert checked >= 3


def test_bane_negatives_come_from_the_right_sets():
  num_classes, k = 5, 6
  labels, pred = _random_maps(2, num_classes=4)  # class 4 never appears: no errors, fallback
  key = jax.random.PRNGKey(7)
  neg = cx.sample_bane_negatives(key, labels, pred, num_classes, k, window=6)
  sel = cx.bane_selection(jax.random.split(key)[0], labels, pred, num_classes, window=6)
  flat_sel, flat_route = np.asarray(sel.selected).ravel(), np.asarray(sel.route).ravel()
  flat_lab = labels.ravel()
  index, valid, from_bane = map(np.asarray, (neg.index, neg.valid, neg.from_bane))
  for c in range(num_classes):
    bane = np.flatnonzero(flat_sel & (flat_route == c))
    other = np.flatnonzero((flat_lab >= 0) & (flat_lab != c))
    pool = bane if bane.size else other
    assert from_bane[c] == (bane.size > 0)
    got = index[c][valid[c]]
    assert got.size == min(k, pool.size) and len(set(got)) == got.size
    assert set(got) <= set(pool)
  assert not from_bane[4] and valid[4].all()
  none = cx.sample_bane_negatives(key, labels, pred, num_classes, k, window=6, fallback="none")
  assert not np.asarray(none.valid)[4].any()
  off = cx.sample_bane_negatives(key, labels, pred, num_classes, k, use_bane=False)
  assert not np.asarray(off.from_bane).any() and np.asarray(off.valid).all()


# ---------------------------------------------------------------------------------------
# CCL against a NumPy transcription, with gradients.
# ---------------------------------------------------------------------------------------
def _np_normalize(v):
  return v / max(np.sqrt(np.sum(v * v)), 1e-12)


def np_contextrast(feats, labels, draws, num_classes, s, *, frozen_anchors=None,
                   keep_ignored=False, swap_weights=False, return_anchors=False):
  """Loop transcription of paper Eqs. 1-5 (float64). Level i has stride H/h_i (integer)."""
  w_l, w_h = (s.w_high, s.w_low) if swap_weights else (s.w_low, s.w_high)
  levels = []
  for f in feats:
    stride = labels.shape[1] // f.shape[1]
    lab = labels[:, ::stride, ::stride]
    if keep_ignored:
      lab = np.where(lab < 0, 0, lab)
    nf = np.zeros_like(f)
    for idx in np.ndindex(*f.shape[:3]):
      nf[idx] = _np_normalize(f[idx]) if s.normalize_features else f[idx]
    levels.append((nf, lab))
  anchors = []
  for nf, lab in levels:  # Eq. 1
    sums, counts = np.zeros((num_classes, nf.shape[-1])), np.zeros(num_classes)
    for idx in np.ndindex(*lab.shape):
      if 0 <= lab[idx] < num_classes:
        sums[lab[idx]] += nf[idx]
        counts[lab[idx]] += 1
    anchors.append((sums / np.maximum(counts, 1)[:, None], counts > 0))
  if frozen_anchors is not None:
    anchors = frozen_anchors
  if return_anchors:
    return anchors
  last, last_present = anchors[-1]
  total, per_level = 0.0, []
  for i, ((nf, lab), (a, present), neg) in enumerate(zip(levels, anchors, draws)):
    flat = nf.reshape(-1, nf.shape[-1])
    fused = np.zeros_like(a)
    for n in range(num_classes):  # Â_i = w_l A_i + w_h A_I
      lo, hi = a[n], last[n]
      if s.anchor_normalization == "before_fusion":
        lo, hi = _np_normalize(lo), _np_normalize(hi)
      if last_present[n] or s.absent_rule == "formula":
        fused[n] = w_l * lo + w_h * hi
      else:
        fused[n] = lo
      if s.anchor_normalization == "after_fusion":
        fused[n] = _np_normalize(fused[n])
    terms = {n: [] for n in range(num_classes)}
    index, valid = np.asarray(neg.index), np.asarray(neg.valid)
    for p, v in enumerate(flat):
      n = lab.reshape(-1)[p]
      if not (0 <= n < num_classes and present[n]):
        continue
      logits = []
      if s.negatives in ("pixels", "both"):
        logits += [fused[n] @ flat[u] / s.temperature for u, ok in zip(index[n], valid[n]) if ok]
      if s.negatives in ("anchors", "both"):
        logits += [fused[m] @ v / s.temperature for m in range(num_classes)
                   if m != n and present[m]]
      if not logits:
        continue
      pos = fused[n] @ v / s.temperature  # Eq. 4, own denominator
      terms[n].append(-pos + np.log(np.exp(pos) + np.sum(np.exp(logits))))
    if s.reduction == "pixel":
      all_terms = [t for ts in terms.values() for t in ts]
      level = np.mean(all_terms) if all_terms else 0.0
    else:
      means = [np.mean(ts) for ts in terms.values() if ts]
      level = np.mean(means) if means else 0.0
    per_level.append(level)
    total += s.level_weights[i] * level
  return s.alpha * total, np.array(per_level)


def _ccl_inputs(seed=0, num_classes=4, dim=3):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.repeat(rng.integers(0, num_classes, (2, 4, 4)), 2, 1), 2, 2)
  labels[0, :2, :2] = 3  # class 3: present at the stride-2 level only (absent at stride 4)
  labels[:, ::4, ::4] = np.where(labels[:, ::4, ::4] == 3, 1, labels[:, ::4, ::4])
  labels[1, 4, :] = -1  # ignored pixels (row 4 is sampled at strides 2 and 4)
  pred = np.where(rng.random(labels.shape) < 0.4, rng.integers(0, num_classes, labels.shape),
                  labels.clip(0))
  feats = [rng.normal(size=(2, 4, 4, dim)), rng.normal(size=(2, 2, 2, dim))]
  return [f.astype(np.float64) for f in feats], labels.astype(np.int32), pred.astype(np.int32)


_CCL_CASES = {
    "default": dict(),
    "formula_unnormalised": dict(absent_rule="formula", anchor_normalization="none",
                                 normalize_features=False, temperature=0.5),
    "both_pixel_before": dict(negatives="both", reduction="pixel",
                              anchor_normalization="before_fusion", w_low=0.6, w_high=0.4),
    "anchors_frozen": dict(negatives="anchors", stop_gradient_anchors=True, use_bane=False),
}


def _check_grad(fn, feats, grads, seed=0, coords=6, directions=2, eps=1e-6):
  """`grads` (from JAX) against float64 central differences of `fn`: a few single coordinates
  (the largest-gradient one included) and a few random directions."""
  rng = np.random.default_rng(seed)
  grads = [np.asarray(g, np.float64) for g in grads]
  scale = max(np.abs(g).max() for g in grads)
  probes = []
  for li, g in enumerate(grads):
    probes.append((li, np.unravel_index(np.argmax(np.abs(g)), g.shape)))
    probes += [(li, tuple(rng.integers(0, n) for n in g.shape)) for _ in range(coords // 2)]
  for li, idx in probes:
    plus, minus = [x.copy() for x in feats], [x.copy() for x in feats]
    plus[li][idx] += eps
    minus[li][idx] -= eps
    fd = (fn(plus) - fn(minus)) / (2 * eps)
    np.testing.assert_allclose(grads[li][idx], fd, rtol=2e-3, atol=2e-5 * scale)
  for _ in range(directions):
    d = [rng.normal(size=f.shape) for f in feats]
    fd = (fn([f + eps * x for f, x in zip(feats, d)])
          - fn([f - eps * x for f, x in zip(feats, d)])) / (2 * eps)
    got = sum(float(np.sum(g * x)) for g, x in zip(grads, d))
    np.testing.assert_allclose(got, fd, rtol=2e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("case", [
    c if c == "default" else pytest.param(c, marks=pytest.mark.slow) for c in sorted(_CCL_CASES)])
def test_ccl_matches_numpy_transcription_with_gradients(case):
  num_classes = 4
  settings = cx.ContextrastSettings(level_weights=(1.0, 0.4), num_negatives=5,
                                    distance_window=4, **_CCL_CASES[case])
  feats, labels, pred = _ccl_inputs()
  draws = cx.contextrast_draws(jax.random.PRNGKey(0), feats, labels, pred, num_classes, settings)
  assert any(np.asarray(d.from_bane).any() for d in draws) == settings.use_bane

  def loss_fn(fs):
    return cx.contextrast_loss_from_draws(fs, labels, draws, num_classes, settings)

  (total, per_level), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      [jnp.asarray(f, jnp.float32) for f in feats])
  frozen = (np_contextrast(feats, labels, draws, num_classes, settings, return_anchors=True)
            if settings.stop_gradient_anchors else None)
  ref_total, ref_levels = np_contextrast(feats, labels, draws, num_classes, settings,
                                         frozen_anchors=frozen)
  np.testing.assert_allclose(np.asarray(per_level), ref_levels, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(total), ref_total, rtol=2e-5, atol=1e-7)
  _check_grad(lambda fs: np_contextrast(fs, labels, draws, num_classes, settings,
                                        frozen_anchors=frozen)[0], feats, grads)
  # The references tell the likely bugs apart.
  mutated = [np_contextrast(feats, labels, draws, num_classes, settings, frozen_anchors=frozen,
                            keep_ignored=True)[0]]
  if settings.negatives != "anchors" or settings.anchor_normalization != "after_fusion":
    mutated.append(np_contextrast(feats, labels, draws, num_classes, settings,
                                  frozen_anchors=frozen, swap_weights=True)[0])
  for m in mutated:
    assert abs(m - ref_total) > 1e-4 * abs(ref_total)


def test_fusion_rules_and_anchors():
  feats, labels, _ = _ccl_inputs()
  f = [jnp.asarray(x, jnp.float32) for x in feats]
  a0, p0 = cx.class_anchors(f[0], labels[:, ::2, ::2], 4)
  a1, p1 = cx.class_anchors(f[1], labels[:, ::4, ::4], 4)
  settings = cx.ContextrastSettings(normalize_features=False)
  ref = np_contextrast(feats, labels, [None, None], 4, settings, return_anchors=True)
  np.testing.assert_allclose(np.asarray(a0), ref[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(p1), ref[1][1])
  assert bool(p0[3]) and not bool(p1[3])
  own = cx.fuse_anchors(a0, p0, a1, p1, w_low=0.3, w_high=0.7, normalization="none")
  formula = cx.fuse_anchors(a0, p0, a1, p1, w_low=0.3, w_high=0.7, absent_rule="formula",
                            normalization="none")
  np.testing.assert_allclose(np.asarray(own[3]), np.asarray(a0[3]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(formula[3]), 0.3 * np.asarray(a0[3]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(own[0]), 0.3 * np.asarray(a0[0]) + 0.7 * np.asarray(a1[0]),
                             rtol=1e-5, atol=1e-6)


def test_contextrast_loss_end_to_end_is_finite_and_keyed():
  feats, labels, pred = _ccl_inputs()
  settings = cx.ContextrastSettings(level_weights=(1.0, 0.4), num_negatives=5, distance_window=4)
  fn = jax.jit(lambda k, fs: cx.contextrast_loss(k, fs, labels, pred, 4, settings)[0])
  fs = [jnp.asarray(f, jnp.float32) for f in feats]
  a, b = fn(jax.random.PRNGKey(0), fs), fn(jax.random.PRNGKey(0), fs)
  assert np.isfinite(float(a)) and float(a) == float(b) and float(a) > 0
  empty = np.full_like(labels, -1)
  zero, grads = jax.value_and_grad(
      lambda fs: cx.contextrast_loss(jax.random.PRNGKey(0), fs, empty, pred, 4, settings)[0])(fs)
  assert float(zero) == 0.0 and all(not np.asarray(g).any() for g in grads)


# ---------------------------------------------------------------------------------------
# Baselines: Pissas et al. and ContrastiveSeg.
# ---------------------------------------------------------------------------------------
def np_own_denominator(q, ql, qv, k, kl, kv, tau, exclude_self, shared=False):
  """Loop transcription of spec §4.1's InfoNCE (float64)."""
  rows = []
  for u in range(len(q)):
    if not qv[u]:
      continue
    qn = _np_normalize(q[u])
    sims = [qn @ _np_normalize(k[j]) / tau for j in range(len(k))]
    pos = [j for j in range(len(k)) if kv[j] and kl[j] == ql[u] and not (exclude_self and j == u)]
    neg = [j for j in range(len(k)) if kv[j] and kl[j] != ql[u]]
    neg_sum = sum(np.exp(sims[j]) for j in neg)
    pos_sum = sum(np.exp(sims[j]) for j in pos)
    lp = [sims[p] - np.log((pos_sum if shared else np.exp(sims[p])) + neg_sum) for p in pos]
    rows.append(-np.mean(lp) if lp else 0.0)
  return np.mean(rows) if rows else 0.0


def _pissas_inputs(seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.repeat(rng.integers(0, 3, (2, 4, 4)), 4, 1), 4, 2).astype(np.int32)
  labels[0, :3, :] = -1
  feats = [rng.normal(size=(2, 16 // s, 16 // s, 4)) for s in (1, 2, 4, 8)]
  return feats, labels


def np_pissas(feats, draws, s, shared=False):
  sampled = []
  for f, v in zip(feats, draws):
    flat = f.reshape(-1, f.shape[-1])
    sampled.append((flat[np.asarray(v.index)], np.asarray(v.labels), np.asarray(v.valid)))
  total = sum(w * np_own_denominator(*x, *x, s.temperature, True, shared)
              for w, x in zip(s.level_weights, sampled))
  total += s.w_high_low * np_own_denominator(*sampled[0], *sampled[-1],
                                             s.cross_scale_temperature, False, shared)
  total += s.w_high_mid * np_own_denominator(*sampled[0], *sampled[-2],
                                             s.cross_scale_temperature, False, shared)
  return s.alpha * total


def test_pissas_sampler_follows_the_caps():
  feats, labels = _pissas_inputs()
  for max_total, min_views, max_views in ((40, 5, 2500), (400, 5, 7), (400, 20, 2500)):
    views = cx.pissas_views(jax.random.PRNGKey(1), labels, 3, min_views=min_views,
                            max_views=max_views, max_features_total=max_total)
    counts = {(b, c): int(((labels[b] == c)).sum()) for b in range(2) for c in range(3)}
    slots = {sc: n for sc, n in counts.items() if n >= min_views}
    v = min(min(slots.values()), max_views)
    if v * len(slots) > max_total:
      v = max_total // len(slots)
    index, lab, valid = map(np.asarray, (views.index, views.labels, views.valid))
    assert valid.sum() == v * len(slots) and index.shape == (max_total,)
    got = index[valid]
    assert len(set(got)) == got.size
    flat = labels.ravel()
    np.testing.assert_array_equal(lab[valid], flat[got])
    for (b, c) in slots:
      assert np.sum((got // 256 == b) & (flat[got] == c)) == v


def test_pissas_losses_match_numpy_transcription_with_gradients():
  feats, labels = _pissas_inputs()
  s = cx.PissasSettings(min_views=1, max_features_total=32, chunk=16)
  draws = cx.pissas_draws(jax.random.PRNGKey(2), feats, labels, 3, s)
  fn = jax.jit(jax.value_and_grad(lambda fs: cx.pissas_loss_from_draws(fs, draws, s)[0]))
  value, grads = fn([jnp.asarray(f, jnp.float32) for f in feats])
  ref = np_pissas(feats, draws, s)
  np.testing.assert_allclose(float(value), ref, rtol=2e-5)
  rng = np.random.default_rng(5)
  for _ in range(2):  # directional derivatives, float64 central differences
    direction = [rng.normal(size=f.shape) for f in feats]
    eps = 1e-6
    fd = (np_pissas([f + eps * d for f, d in zip(feats, direction)], draws, s)
          - np_pissas([f - eps * d for f, d in zip(feats, direction)], draws, s)) / (2 * eps)
    got = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, direction))
    np.testing.assert_allclose(got, fd, rtol=1e-3)
  # A shared denominator (SupCon's) is a different loss; so is dropping the cross-scale terms.
  assert abs(np_pissas(feats, draws, s, shared=True) - ref) > 1e-3 * abs(ref)
  no_cs = float(cx.pissas_loss_from_draws(feats, draws, cx.PissasSettings(
      min_views=1, max_features_total=32, chunk=16, cross_scale=False))[0])
  assert abs(no_cs - ref) > 1e-3 * abs(ref)


def test_contrastiveseg_sampler_and_loss():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.repeat(rng.integers(0, 3, (2, 3, 3)), 4, 1), 4, 2).astype(np.int32)
  labels[1, :4, :] = -1
  pred = np.where(rng.random(labels.shape) < 0.3, (labels + 1) % 3, labels).astype(np.int32)
  feats = rng.normal(size=(2, 12, 12, 4))
  s = cx.ContrastiveSegSettings(max_samples=60, max_views=8, chunk=32)
  views = cx.contrastiveseg_views(jax.random.PRNGKey(4), labels, pred, 3, max_samples=60,
                                  max_views=8)
  index, lab, valid = map(np.asarray, (views.index, views.labels, views.valid))
  flat_l, flat_p = labels.ravel(), pred.ravel()
  slots = [(b, c) for b in range(2) for c in range(3) if (labels[b] == c).sum() > 8]
  n_view = min(60 // len(slots), 8)
  got = index[valid]
  assert got.size == n_view * len(slots) and len(set(got)) == got.size
  for b, c in slots:  # ContrastiveSeg's three cases
    members = (got // 144 == b) & (flat_l[got] == c)
    num_hard = int(((labels[b] == c) & (pred[b] != c)).sum())
    num_easy = int(((labels[b] == c) & (pred[b] == c)).sum())
    if num_hard >= n_view / 2 and num_easy >= n_view / 2:
      hard_keep = n_view // 2
    elif num_hard >= n_view / 2:
      hard_keep = n_view - num_easy
    else:
      hard_keep = num_hard
    assert members.sum() == n_view
    assert np.sum(members & (flat_p[got] != c)) == hard_keep
  value = cx.contrastiveseg_loss_from_draws(jnp.asarray(feats, jnp.float32), views, s)
  flat = feats.reshape(-1, 4)
  ref = 0.1 * (0.1 / 0.07) * np_own_denominator(flat[index], lab, valid, flat[index], lab, valid,
                                                0.1, True)
  np.testing.assert_allclose(float(value), ref, rtol=2e-5)
  rand = cx.contrastiveseg_views(jax.random.PRNGKey(4), labels, pred, 3, sampling="random",
                                 max_samples=60, max_views=8)
  assert int(np.asarray(rand.valid).sum()) == n_view * len(slots)
