"""PC²Seg (reco_jax/losses/pc2seg.py, reco_jax/methods/pc2seg.py) against the article.

* The losses equal a plain NumPy transcription of the article's formulas (loops over pixels,
  float64) on tiny inputs with fixed draws, values and gradients (finite differences of the
  transcription, one copy of the features per role so that the stop-gradients are emulated).
* The negative sampler: for each of the four rules the drawn negatives' frequencies pass a
  chi-square test against the rule's p_ij, and fail it against every other rule's (and against
  the rule with the anchor allowed); zero-probability candidates are never drawn.
* The two views are pixel-aligned; no gradient reaches the weak probabilities.
The method contract (8 devices == 1 device, resume == uninterrupted) is in test_methods.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import common
from reco_jax.losses import pc2seg as pc2seg_lib
from reco_jax.methods import pc2seg as pc2seg_method

# ------------------------------------------------------------------------------------------
# NumPy transcription of the article (loops over pixels).


def np_cos(u, v):
  return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_unlabelled_loss(d, anchor_src, positive_src, pool_src, logits_w, logits_s, valid, s):
  """Σ_i λ1 l_ce + λ2 l_cy (or their means) with every pixel looped over.

  anchor_src / positive_src / pool_src: [M,D] the features each role reads (copies, so that
  a finite difference per role emulates the stop-gradients); logits: [M,C]; valid: [M].
  """
  pw, ps = np_softmax(logits_w), np_softmax(logits_s)
  ce, cy = [], []
  for k, i in enumerate(d["anchor"]):
    if not d["anchor_valid"][k]:
      continue
    if s.consistency_pixels == "anchors":
      cy.append(1.0 - np_cos(pw[i], ps[i]))
    negatives = [d["pool"][n] for n, ok in zip(d["negatives"][k], d["negative_valid"][k]) if ok]
    if not negatives:
      continue
    positive = np.exp(np_cos(anchor_src[i], positive_src[i]) / s.temperature)
    down = positive + sum(np.exp(np_cos(anchor_src[i], pool_src[j]) / s.temperature)
                          for j in negatives)
    ce.append(-np.log(positive / down))
  if s.consistency_pixels == "all":
    cy = [1.0 - np_cos(pw[i], ps[i]) for i in range(len(valid)) if valid[i]]
  reduce = (lambda x: sum(x)) if s.reduction == "sum" else (lambda x: sum(x) / max(len(x), 1))
  return s.contrastive_weight * reduce(ce) + s.consistency_weight * reduce(cy)


def np_grad(f, x, eps=1e-6):
  """Central finite differences of the float64 scalar function f at x."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    g[idx] = (f(up) - f(down)) / (2 * eps)
  return g


B, H, W, D, C = 2, 2, 3, 4, 3
M = B * H * W
# Fixed draws: anchor 11 is invalid; anchor 4 has no valid negative (l_ce left out, l_cy kept).
FIXED = dict(
    anchor=np.array([0, 4, 7, 11], np.int32), anchor_valid=np.array([True, True, True, False]),
    pool=np.array([3, 8, 1, 10, 5, 6], np.int32),
    negatives=np.array([[1, 3, 3], [0, 2, 5], [4, 0, 2], [1, 1, 1]], np.int32),
    negative_valid=np.array([[True, True, True], [False, False, False], [True, True, False],
                             [False, False, False]]))
CASES = {  # anchor_view, anchor_grad, positive_grad, negative_grad, reduction, consistency_pixels
    "default": pc2seg_lib.LossSettings(),
    "strong_anchor_sum_all": pc2seg_lib.LossSettings(
        temperature=0.5, contrastive_weight=0.7, consistency_weight=2.0, anchor_view="strong",
        positive_grad=False, negative_grad=True, reduction="sum", consistency_pixels="all"),
    "no_anchor_grad": pc2seg_lib.LossSettings(anchor_grad=False, negative_grad=True,
                                              reduction="sum"),
}


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  feats_w, feats_s = (rng.randn(B, H, W, D).astype(np.float32) for _ in range(2))
  logits_w, logits_s = (rng.randn(B, H, W, C).astype(np.float32) for _ in range(2))
  valid = np.ones((B, H, W), bool)
  valid[1, 0, 2] = False
  return feats_w, feats_s, logits_w, logits_s, valid


@pytest.mark.parametrize("case", sorted(CASES))
def test_unlabelled_loss_and_gradients_match_the_numpy_transcription(case):
  s = CASES[case]
  feats_w, feats_s, logits_w, logits_s, valid = _inputs()
  draws = pc2seg_lib.Draws(**{k: jnp.asarray(v) for k, v in FIXED.items()})

  def total(fw, fs, lw, ls):
    # No stop-gradient here: the loss itself must stop the weak probabilities.
    return pc2seg_lib.unlabelled_loss(draws, fw, fs, jax.nn.softmax(lw), jax.nn.softmax(ls),
                                      jnp.asarray(valid), s)[0]

  with jax.default_matmul_precision("highest"):
    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3)))(
        feats_w, feats_s, logits_w, logits_s)

  f64 = lambda x: np.asarray(x, np.float64).reshape(M, -1)
  fw, fs, lw, ls, vf = f64(feats_w), f64(feats_s), f64(logits_w), f64(logits_s), valid.reshape(-1)
  weak_anchor = s.anchor_view == "weak"
  roles = {"anchor": fw if weak_anchor else fs, "positive": fs if weak_anchor else fw,
           "pool": fw if weak_anchor else fs}

  def loss_with(**override):
    r = {**roles, "lw": lw, "ls": ls, **override}
    return np_unlabelled_loss(FIXED, r["anchor"], r["positive"], r["pool"], r["lw"], r["ls"], vf, s)

  np.testing.assert_allclose(float(value), loss_with(), rtol=2e-6)
  # The gradient w.r.t. a view = the finite differences of the roles it plays with gradient.
  role_grads = {name: np_grad(lambda x, n=name: loss_with(**{n: x}), roles[name])
                for name in roles}
  on = {"anchor": s.anchor_grad, "positive": s.positive_grad, "pool": s.negative_grad}
  view_of = {"anchor": "weak" if weak_anchor else "strong", "pool": "weak" if weak_anchor else "strong",
             "positive": "strong" if weak_anchor else "weak"}
  for view, got in (("weak", grads[0]), ("strong", grads[1])):
    want = sum((role_grads[n] for n in roles if view_of[n] == view and on[n]), np.zeros((M, D)))
    np.testing.assert_allclose(np.asarray(got).reshape(M, D), want, rtol=1e-4, atol=2e-6,
                               err_msg=f"gradient w.r.t. the {view} features")
  np.testing.assert_allclose(np.asarray(grads[3]).reshape(M, C),
                             np_grad(lambda x: loss_with(ls=x), ls), rtol=1e-4, atol=2e-6)
  # Stop-gradient on the weak probabilities (article: l_cy backpropagates the strong view only).
  np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)


def test_no_gradient_reaches_the_weak_branch_where_stopped():
  """With the anchors and negatives detached and the anchor in the weak view, the weak view
  gets no gradient at all; the strong view does."""
  feats_w, feats_s, logits_w, logits_s, valid = _inputs(1)
  draws = pc2seg_lib.Draws(**{k: jnp.asarray(v) for k, v in FIXED.items()})
  s = pc2seg_lib.LossSettings(anchor_grad=False, negative_grad=False)
  grads = jax.jit(jax.grad(lambda fw, fs, pw, ps: pc2seg_lib.unlabelled_loss(
      draws, fw, fs, pw, ps, jnp.asarray(valid), s)[0], argnums=(0, 1, 2, 3)))(
          feats_w, feats_s, jax.nn.softmax(logits_w), jax.nn.softmax(logits_s))
  np.testing.assert_array_equal(np.asarray(grads[0]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)
  assert np.abs(np.asarray(grads[1])).sum() > 0 and np.abs(np.asarray(grads[3])).sum() > 0


# ------------------------------------------------------------------------------------------
# Negative sampling: the four rules of the article.

SB, SH, SW, SC = 3, 2, 3, 3  # 3 images of 6 feature pixels, 3 classes
SM = SB * SH * SW
NUM_DRAWS = 20000


def _sampling_inputs():
  rng = np.random.RandomState(3)
  valid = np.ones((SB, SH, SW), bool)
  valid[0, 1, 1] = valid[2, 0, 0] = False
  # Half confident (near one-hot), half soft predictions: debiasing matters.
  logits = rng.randn(SB, SH, SW, SC) * np.where(rng.rand(SB, SH, SW, 1) < 0.5, 6.0, 1.0)
  return valid, np_softmax(logits).astype(np.float32)


def np_rule_probs(rule, i, valid, probs, allow_self=False):
  """p_i· of the article's rule over every pixel of the batch (loops)."""
  vf, pf = valid.reshape(-1), probs.reshape(SM, SC).astype(np.float64)
  w = np.zeros(SM)
  for j in range(SM):
    if not vf[j] or (j == i and not allow_self):
      continue
    if rule.startswith("different_image") and j // (SH * SW) == i // (SH * SW):
      continue
    w[j] = (1.0 - pf[i] @ pf[j]) if rule.endswith("debiased") else 1.0
  return w / w.sum()


def chi_square_p(counts, probs):
  """p-value of counts ~ Multinomial(probs); 0 if a zero-probability cell was drawn."""
  if np.any(counts[probs == 0] > 0):
    return 0.0
  support = probs > 0
  expected = counts.sum() * probs[support]
  statistic = np.sum((counts[support] - expected) ** 2 / expected)
  return float(stats.chi2.sf(statistic, support.sum() - 1))


def _drawn_pixels(rule, pool_size=64, replacement=True, num_negatives=NUM_DRAWS, seed=0):
  valid, probs = _sampling_inputs()
  fn = jax.jit(pc2seg_lib.draw, static_argnames=("rule", "anchors_per_image", "pool_size",
                                                 "num_negatives", "replacement"))
  d = fn(jax.random.key(seed), jnp.asarray(valid), jnp.asarray(probs), rule=rule,
         anchors_per_image=SH * SW, pool_size=pool_size, num_negatives=num_negatives,
         replacement=replacement)
  d = jax.tree.map(np.asarray, d)
  return d, d.pool[d.negatives], valid, probs


@pytest.mark.parametrize("rule", pc2seg_lib.RULES)
def test_negative_frequencies_match_the_rule_and_not_the_others(rule):
  """Pool = the whole batch (pool_size >= pixels): the draws follow the article's p_ij exactly."""
  d, pixels, valid, probs = _drawn_pixels(rule)
  assert d.anchor_valid.sum() == valid.sum() and set(d.anchor[d.anchor_valid]) == set(
      np.flatnonzero(valid.reshape(-1)))
  p_values, wrong = [], []
  for k in np.flatnonzero(d.anchor_valid):
    i = d.anchor[k]
    assert d.negative_valid[k].all()
    counts = np.bincount(pixels[k], minlength=SM)
    assert counts[i] == 0, "the anchor was drawn as its own negative"
    want = np_rule_probs(rule, i, valid, probs)
    assert np.all(counts[want == 0] == 0)
    p_values.append(chi_square_p(counts, want))
    # Every other rule, and this rule with the anchor allowed, must be rejected.
    others = [np_rule_probs(r, i, valid, probs) for r in pc2seg_lib.RULES if r != rule]
    others.append(np_rule_probs(rule, i, valid, probs, allow_self=True))
    wrong += [chi_square_p(counts, p) for p in others if np.abs(p - want).max() > 0.01]
  # Fisher's combination over the anchors (deterministic seed).
  combined = stats.combine_pvalues(np.maximum(p_values, 1e-300)).pvalue
  assert combined > 1e-3 and min(p_values) > 1e-4, (combined, min(p_values))
  assert len(wrong) >= len(p_values) and max(wrong) < 1e-6, max(wrong)


def test_negatives_from_a_bounded_pool_follow_the_rule_restricted_to_it():
  rule = "different_image_debiased"
  d, pixels, valid, probs = _drawn_pixels(rule, pool_size=8, seed=1)
  assert d.pool.shape == (8,) and len(set(d.pool)) == 8
  assert valid.reshape(-1)[d.pool].all()
  for k in np.flatnonzero(d.anchor_valid):
    restricted = np_rule_probs(rule, d.anchor[k], valid, probs) * np.isin(np.arange(SM), d.pool)
    if restricted.sum() == 0:
      assert not d.negative_valid[k].any()
      continue
    counts = np.bincount(pixels[k], minlength=SM)
    assert chi_square_p(counts, restricted / restricted.sum()) > 1e-4


def test_pool_and_anchors_are_uniform_over_valid_pixels():
  valid, _ = _sampling_inputs()
  keys = jax.random.split(jax.random.key(5), 4000)
  pools = np.asarray(jax.jit(jax.vmap(lambda k: pc2seg_lib.sample_pool(k, jnp.asarray(valid), 8)[0]))(keys))
  freq = np.bincount(pools.reshape(-1), minlength=SM) / len(keys)
  vf = valid.reshape(-1)
  assert np.all(freq[~vf] == 0)
  np.testing.assert_allclose(freq[vf], 8 / vf.sum(), atol=0.03)
  anchors, ok = jax.jit(jax.vmap(lambda k: pc2seg_lib.sample_anchors(k, jnp.asarray(valid), 2)))(keys)
  anchors, ok = np.asarray(anchors).reshape(len(keys), SB, 2), np.asarray(ok)
  assert ok.all() and np.all(anchors[..., 0] != anchors[..., 1])
  assert np.all(anchors // (SH * SW) == np.arange(SB)[None, :, None])
  freq = np.bincount(anchors.reshape(-1), minlength=SM) / len(keys)
  per_image = valid.reshape(SB, -1).sum(1)
  np.testing.assert_allclose(freq[vf], (2 / np.repeat(per_image, SH * SW))[vf], atol=0.03)
  assert np.all(freq[~vf] == 0)


def test_without_replacement_draws_distinct_negatives_first_one_from_the_rule():
  rule = "different_image_debiased"
  valid, probs = _sampling_inputs()
  keys = jax.random.split(jax.random.key(2), 3000)
  draws = jax.jit(jax.vmap(lambda k: pc2seg_lib.draw(k, jnp.asarray(valid), jnp.asarray(probs), rule=rule,
                                             anchors_per_image=SH * SW, pool_size=64,
                                             num_negatives=5, replacement=False)))(keys)
  d = jax.tree.map(np.asarray, draws)
  pixels = np.take_along_axis(d.pool[:, None, :], d.negatives, axis=2)  # [keys, K, N]
  assert d.negative_valid[d.anchor_valid].all()
  assert np.all(np.sort(pixels, -1)[..., 1:] != np.sort(pixels, -1)[..., :-1])
  for i in np.flatnonzero(valid.reshape(-1)):
    is_i = d.anchor_valid & (d.anchor == i)  # [keys, K]: every valid pixel is an anchor once
    assert np.all(is_i.sum(1) == 1)
    want = np_rule_probs(rule, i, valid, probs)
    assert np.all(want[pixels[is_i].reshape(-1)] > 0)
    # The top-ranked of a Gumbel-top-N is a draw from p.
    assert chi_square_p(np.bincount(pixels[is_i][:, 0], minlength=SM), want) > 1e-4


# ------------------------------------------------------------------------------------------
# Views.


def _settings(**input_overrides):
  """The method's settings with 6x8 crops and `config.input` fields overridden."""
  config = common.base_config()
  common.apply_method(config, "pc2seg")
  config.input.crop_size = (6, 8)
  for key, value in input_overrides.items():
    config.input[key] = value
  return pc2seg_method.settings_from(config)


def test_views_are_pixel_aligned_position_encoded():
  """Photometric off: the strong view is the weak view exactly, and the weak view is a
  crop/flip of the input (channel 0 encodes the pixel's flat id)."""
  s = _settings(scale_range=(1.0, 1.0), flip_prob=0.5, color_jitter_prob=0.0, blur_prob=0.0)
  ids = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
  images = np.stack([ids, ids % 7, ids % 5], -1) / 1e3
  weak, strong, valid = jax.jit(pc2seg_method.make_views, static_argnums=2)(
      jax.random.key(0), jnp.asarray(images), s)
  np.testing.assert_array_equal(np.asarray(strong), np.asarray(weak))
  assert np.asarray(valid).all()
  decoded = np.rint(np.asarray(weak)[..., 0] * 1e3).astype(int)
  flipped = [np.array_equal(decoded[b], ids[b][:, ::-1]) for b in range(4)]
  plain = [np.array_equal(decoded[b], ids[b]) for b in range(4)]
  assert all(f or p for f, p in zip(flipped, plain)) and any(flipped) and any(plain)


def test_views_stay_aligned_under_the_photometric_augmentation():
  """Grey binary texture, jitter always on (brightness/contrast act monotonically on grey):
  in each image the strong view's bright pixels are exactly the weak view's."""
  s = _settings(scale_range=(0.6, 1.4), flip_prob=0.5, color_jitter_prob=1.0, blur_prob=0.0)
  rng = np.random.RandomState(0)
  grey = (rng.rand(8, 6, 8, 1) < 0.5).astype(np.float32)
  images = (np.repeat(grey * 0.6 + 0.2, 3, -1) - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  weak, strong, valid = jax.jit(pc2seg_method.make_views, static_argnums=2)(
      jax.random.key(1), jnp.asarray(images, jnp.float32), s)
  weak, strong, valid = map(np.asarray, (weak, strong, valid))
  assert not np.allclose(weak, strong)
  for b in range(8):
    w, st = weak[b, ..., 0], strong[b, ..., 0]
    inside = valid[b]
    bright = w > np.median(w[inside])
    if bright[inside].all() or not bright[inside].any():
      continue
    assert st[inside & bright].min() >= st[inside & ~bright].max() - 1e-5
  assert (~valid).any()  # some scale < 1 padded, and the views share that mask


# ------------------------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize("key,value,message", [
    ("negative_sampling", "same_image", r"config pc2seg.negative_sampling='same_image' is invalid"),
    ("anchor_view", "both", r"config pc2seg.anchor_view='both' is invalid"),
    ("num_negatives", 0, r"config pc2seg.num_negatives=0 must be a positive int"),
    ("temperature", -1.0, r"config pc2seg.temperature=-1.0 must be a positive float"),
    ("replacement", False, r"config pc2seg.num_negatives=512 exceeds pc2seg.pool_size=256"),
])
def test_bad_settings_are_one_line_naming_the_key(key, value, message):
  config = common.base_config()
  common.apply_method(config, "pc2seg")
  config.pc2seg.pool_size = 256
  config.pc2seg[key] = value
  with pytest.raises(ValueError, match=message) as e:
    pc2seg_method.settings_from(config)
  assert "\n" not in str(e.value)
