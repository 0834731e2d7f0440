"""ReCo loss (reco_jax.losses.reco) against the official PyTorch goldens (golden README §1-§3).

* fixed draws: `reco_loss_from_draws` reproduces the official loss and gradient exactly;
* statistics: `reco_loss` over 500 keys matches the official mean, spread and mean
  gradient over 2000 seeds (acceptance of golden README §1);
* degenerate inputs give exactly 0 with zero gradient;
* input preparation reproduces the official nearest down-sampling bit for bit;
* 8 devices == 1 device; the lazy sampler == its materialised draws;
* the sampler's draws and the ablation switches have the distributional properties
  they are documented to have.

Goldens are NCHW with one-hot labels; `_inputs` converts them to the NHWC API.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import parallel
from reco_jax.losses import reco

_STATS_RUNS = 500
_FIXED_DRAWS = [("A_basic", 0), ("B_absent_easy_single", 0), ("C_two_classes", 0),
                ("D_small_qk_temp", 0), ("D_small_qk_temp", 1), ("F_pipeline", 0)]


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _inputs(g: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Golden NCHW one-hot inputs -> (rep f32[B,h,w,D], labels, valid, probs f32[B,h,w,C]).

  The official valid set of class c is `label[:, c] * mask > 0`.
  """
  labels = g["label"].argmax(1).astype(np.int32)
  valid = (g["label"].sum(1) > 0) & (g["mask"][:, 0] > 0)
  return _nhwc(g["rep"]), labels, valid, _nhwc(g["prob"])


def _hyper(g: dict) -> dict:
  return dict(strong_threshold=float(g["strong_threshold"]), temperature=float(g["temp"]),
              num_queries=int(g["num_queries"]), num_negatives=int(g["num_negatives"]))


def _loss_and_grad(key, rep, labels, valid, probs, **kwargs):
  return jax.value_and_grad(
      lambda r: reco.reco_loss(key, r, labels, valid, probs, **kwargs))(rep)


# ---------------------------------------------------------------------------------------
# Exact goldens.
# ---------------------------------------------------------------------------------------
def _official_draws(g: dict, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The official per-query-class draws scattered into the `[C, ...]` layout.

  The rows of classes without queries hold garbage (-7, out of range) that the mask must
  make irrelevant.
  """
  num_classes = g["label"].shape[1]
  query_classes = g[f"seed{seed}_query_classes"]
  query_pix, neg_pix = g[f"seed{seed}_query_pix"], g[f"seed{seed}_neg_pix"]
  all_query = np.full((num_classes,) + query_pix.shape[1:], -7, np.int32)
  all_neg = np.full((num_classes,) + neg_pix.shape[1:], -7, np.int32)
  all_query[query_classes], all_neg[query_classes] = query_pix, neg_pix
  return all_query, all_neg, np.isin(np.arange(num_classes), query_classes)


@pytest.mark.parametrize("case,seed", _FIXED_DRAWS)
def test_loss_from_official_draws_matches_official_loss_and_grad(golden, case, seed):
  g = golden(f"reco_fixed_draws_{case}.npz")
  rep, labels, valid, _ = _inputs(g)
  all_query, all_neg, mask = _official_draws(g, seed)
  loss_fn = functools.partial(reco.reco_loss_from_draws, temperature=float(g["temp"]))
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(rep, labels, valid, all_query, all_neg,
                                                     mask)
  np.testing.assert_allclose(float(loss), float(g[f"seed{seed}_loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), _nhwc(g[f"seed{seed}_grad"]), rtol=0,
                             atol=1e-6)


def test_degenerate_inputs_give_exactly_zero_with_zero_grad(golden):
  expected = golden("reco_degenerate.npz")
  one = golden("reco_stats_E_one_class.npz")
  basic = golden("reco_stats_A_basic.npz")
  rep, labels, valid, probs = _inputs(basic)
  hyper = dict(_hyper(basic))
  del hyper["strong_threshold"]
  # The threshold is traced, so "no valid pixel" and "all easy" (delta_s = 0) share a
  # compilation.
  loss_and_grad = jax.jit(lambda key, r, l, v, p, delta: _loss_and_grad(
      key, r, l, v, p, strong_threshold=delta, **hyper))
  results = {
      "one_class": jax.jit(functools.partial(_loss_and_grad, **_hyper(one)))(
          jax.random.key(3), *_inputs(one)),
      "no_valid": loss_and_grad(jax.random.key(3), rep, labels, np.zeros_like(valid), probs,
                                0.97),
      "all_easy": loss_and_grad(jax.random.key(3), rep, labels, valid, probs, 0.0),
  }
  for name, (loss, grad) in results.items():
    assert not expected[f"{name}_requires_grad"]
    assert float(loss) == float(expected[f"{name}_loss"]) == 0.0, name
    assert not np.any(np.asarray(grad)), name
  # The same traced threshold at its default gives a real loss.
  assert float(loss_and_grad(jax.random.key(3), rep, labels, valid, probs, 0.97)[0]) > 1.0


def test_loss_ignores_labels_outside_the_class_range(golden):
  """A valid pixel with label -1 or >= C belongs to no class (it cannot be indexed)."""
  g = golden("reco_fixed_draws_C_two_classes.npz")
  rep, labels, valid, _ = _inputs(g)
  corrupt_labels, corrupt_valid = labels.copy(), valid.copy()
  outside = ~valid
  corrupt_labels[outside] = np.where(np.arange(outside.sum()) % 2, -1, 99)
  corrupt_valid[outside] = True
  args = _official_draws(g, 0)
  loss_fn = functools.partial(reco.reco_loss_from_draws, temperature=0.5)
  reference = loss_fn(rep, labels, valid, *args)
  assert float(loss_fn(rep, corrupt_labels, corrupt_valid, *args)) == float(reference)


# ---------------------------------------------------------------------------------------
# Statistical goldens.
# ---------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("num_runs", "hyper"))
def _run_many(rep, labels, valid, probs, grad_centre, *, num_runs, hyper):
  """Losses of `num_runs` keys, and the sum and sum of squares of `grad - grad_centre`.

  A sequential `lax.map`-style scan rather than `vmap`: under `vmap` the per-class
  `lax.cond` becomes a select and absent classes would cost as much as present ones.
  Centring on the golden mean keeps the float32 variance free of cancellation.
  """
  keys = jax.random.split(jax.random.key(2022), num_runs)

  def body(carry, key):
    loss, grad = _loss_and_grad(key, rep, labels, valid, probs, **dict(hyper))
    centred = grad - grad_centre
    return (carry[0] + centred, carry[1] + centred * centred), loss

  zeros = jnp.zeros_like(rep)
  (total, total_sq), losses = jax.lax.scan(body, (zeros, zeros), keys)
  return losses, total, total_sq


@pytest.mark.parametrize("case", ["A_basic", "B_absent_easy_single", "C_two_classes",
                                  "D_small_qk_temp", "F_pipeline"])
def test_loss_distribution_matches_official(golden, case):
  g = golden(f"reco_stats_{case}.npz")
  rep, labels, valid, probs = _inputs(g)
  grad_mean = _nhwc(g["grad_mean"]).astype(np.float64)
  grad_std = _nhwc(g["grad_std"]).astype(np.float64)
  n = _STATS_RUNS
  losses, total, total_sq = _run_many(rep, labels, valid, probs, grad_mean.astype(np.float32),
                                      num_runs=n, hyper=tuple(_hyper(g).items()))
  losses = np.asarray(losses, np.float64)
  total, total_sq = np.asarray(total, np.float64), np.asarray(total_sq, np.float64)

  mean, std = losses.mean(), losses.std(ddof=1)
  z = (mean - float(g["loss_mean"])) / np.hypot(float(g["loss_sem"]), std / np.sqrt(n))
  assert abs(z) <= 4.0, f"{case}: mean {mean:.6f} vs official {float(g['loss_mean']):.6f}"
  ratio = std / float(g["loss_std"])
  assert 0.85 <= ratio <= 1.15, f"{case}: std ratio {ratio:.3f}"
  # T = sum (mean' - official mean)^2 / sum(official var / 2000 + var' / n)  (README §1).
  var = (total_sq - total**2 / n) / (n - 1)
  t_stat = np.sum((total / n)**2) / np.sum(grad_std**2 / int(g["n_runs"]) + var / n)
  assert t_stat < 1.5, f"{case}: gradient statistic T = {t_stat:.3f}"


def test_one_class_case_is_exactly_zero_for_every_key(golden):
  g = golden("reco_stats_E_one_class.npz")
  assert not np.any(g["losses"]) and int(g["n_runs_with_grad"]) == 0
  rep, labels, valid, probs = _inputs(g)
  losses, total, total_sq = _run_many(rep, labels, valid, probs, np.zeros_like(rep),
                                      num_runs=20, hyper=tuple(_hyper(g).items()))
  assert not np.any(np.asarray(losses))
  assert not np.any(np.asarray(total)) and not np.any(np.asarray(total_sq))


# ---------------------------------------------------------------------------------------
# Input preparation.
# ---------------------------------------------------------------------------------------
def test_prepare_reco_inputs_matches_official_voc_downsampling(golden):
  g = golden("reco_input_preparation.npz")
  labels = np.concatenate([g["lab_l"], g["lab_u"]]).astype(np.int32)
  valid = np.concatenate([g["lab_l"] >= 0, g["conf_u"] >= g["weak_threshold"]])
  num_classes = int(g["num_segments"])
  logits = np.zeros((4, 81, 81, num_classes), np.float32)
  labels_low, valid_low, probs_low = jax.jit(reco.prepare_reco_inputs)(labels, valid, logits)
  np.testing.assert_array_equal(np.asarray(valid_low), g["mask_all"][:, 0] > 0)
  # The official one-hot puts ignored (-1) pixels in class 0; they are masked anyway.
  onehot = np.eye(num_classes, dtype=np.uint8)[np.maximum(np.asarray(labels_low), 0)]
  np.testing.assert_array_equal(onehot, _nhwc(g["label_all"]))
  np.testing.assert_allclose(np.asarray(probs_low), 1.0 / num_classes, rtol=1e-6)


def test_prepare_reco_inputs_rebuilds_the_pipeline_case_inputs(golden):
  src = golden("reco_pipeline_case_F_sources.npz")
  g = golden("reco_stats_F_pipeline.npz")
  labels = np.concatenate([src["lab_l"], src["lab_u"]]).astype(np.int32)
  valid = np.concatenate([src["lab_l"] >= 0, src["conf_u"] >= src["weak_threshold"]])
  labels_low, valid_low, probs_low = reco.prepare_reco_inputs(labels, valid,
                                                              _nhwc(src["pred"]))
  rep, expected_labels, expected_valid, expected_probs = _inputs(g)
  np.testing.assert_array_equal(np.asarray(valid_low), expected_valid)
  np.testing.assert_array_equal(np.asarray(labels_low)[expected_valid],
                                expected_labels[expected_valid])
  np.testing.assert_allclose(np.asarray(probs_low), expected_probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(_nhwc(src["rep"]), rep)


def test_prepare_reco_inputs_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="valid"):
    reco.prepare_reco_inputs(np.zeros((2, 8, 8), np.int32), np.zeros((2, 8, 9), bool),
                             np.zeros((2, 4, 4, 3), np.float32))


# ---------------------------------------------------------------------------------------
# Sharding, determinism, the two samplers.
# ---------------------------------------------------------------------------------------
def _small_inputs(batch=8, size=9, dim=8, num_classes=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, (batch, size, size)).astype(np.int32)
  valid = rng.random((batch, size, size)) > 0.2
  logits = 3.0 * np.eye(num_classes)[labels] + rng.standard_normal(labels.shape + (num_classes,))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  rep = rng.standard_normal((batch, size, size, dim)) + np.eye(num_classes, dim)[labels]
  return rep.astype(np.float32), labels, valid, probs.astype(np.float32)


def test_sharded_batch_gives_the_single_device_loss_and_grad(mesh, single_device_mesh):
  inputs = _small_inputs()
  key = jax.random.key(7)
  step = jax.jit(functools.partial(_loss_and_grad, num_queries=32, num_negatives=64))
  results = []
  for m in (single_device_mesh, mesh):
    placed = [jax.device_put(x, parallel.data_sharded(m)) for x in inputs]
    loss, grad = jax.block_until_ready(step(key, *placed))
    results.append((float(loss), np.asarray(grad)))
  assert results[0][0] > 0
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  np.testing.assert_allclose(results[1][1], results[0][1], rtol=0, atol=1e-7)


def test_lazy_negative_sampler_equals_its_materialised_draws():
  rep, labels, valid, probs = _small_inputs(batch=2)
  hyper = dict(num_queries=16, num_negatives=24)
  loss_and_grad = jax.jit(functools.partial(_loss_and_grad, **hyper))
  key = jax.random.key(11)
  loss, grad = loss_and_grad(key, rep, labels, valid, probs)
  query, negatives, mask, _ = _sample_materialized(
      key, rep, labels, valid, probs, hyper=tuple(dict(hyper, temperature=0.5).items()))
  explicit = functools.partial(reco.reco_loss_from_draws, temperature=0.5)
  loss2, grad2 = jax.jit(jax.value_and_grad(explicit))(rep, labels, valid, query, negatives,
                                                        mask)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), rtol=0, atol=1e-7)
  # Same key, same result; another key, another result.
  assert float(loss_and_grad(key, rep, labels, valid, probs)[0]) == float(loss)
  assert float(loss_and_grad(jax.random.key(12), rep, labels, valid, probs)[0]) != float(loss)


def test_bfloat16_representations_are_computed_in_float32():
  rep, labels, valid, probs = _small_inputs(batch=2)
  key = jax.random.key(5)
  hyper = dict(num_queries=16, num_negatives=24)
  loss_and_grad = jax.jit(functools.partial(_loss_and_grad, **hyper))
  rep16 = jnp.asarray(rep, jnp.bfloat16)
  loss16, grad16 = loss_and_grad(key, rep16, labels, valid, probs)
  loss32, _ = loss_and_grad(key, rep16.astype(jnp.float32), labels, valid, probs)
  assert loss16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# The sampler and the ablation switches.
# ---------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("hyper",))
def _sample_materialized(key, rep, labels, valid, probs, *, hyper):
  query, negatives, mask = reco.sample_reco_draws(key, rep, labels, valid, probs, **dict(hyper))
  return query, negatives.materialize(), mask, negatives.class_probs


def _draws(g, key=0, **overrides):
  """numpy (query_pix [C,Q], neg_pix [C,Q,K], query_class_mask [C], class_probs [C,C])."""
  hyper = tuple(dict(_hyper(g), **overrides).items())
  out = _sample_materialized(jax.random.key(key), *_inputs(g), hyper=hyper)
  return tuple(np.asarray(x) for x in out)


def _class_and_confidence(g):
  _, labels, valid, probs = _inputs(g)
  own = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
  return labels.reshape(-1), valid.reshape(-1), own.reshape(-1)


def test_active_draws_follow_the_official_distribution(golden):
  """Case B: classes 1, 4 absent; 3 has no hard pixel; 5 has a single (hard) pixel."""
  g = golden("reco_stats_B_absent_easy_single.npz")
  labels, valid, own = _class_and_confidence(g)
  query, neg, mask, class_probs = _draws(g)
  delta = float(g["strong_threshold"])
  np.testing.assert_array_equal(mask, [True, False, True, False, False, True])
  present = [0, 2, 3, 5]
  for c in np.flatnonzero(mask):
    # Queries: hard valid pixels of c only, each of them reachable.
    q = query[c]
    assert np.all(valid[q] & (labels[q] == c) & (own[q] < delta))
    num_hard = np.sum(valid & (labels == c) & (own < delta))
    expected_unique = num_hard * (1 - (1 - 1 / num_hard)**q.size)
    assert len(np.unique(q)) > 0.8 * expected_unique
    # Negatives: valid pixels of the other present classes, class frequencies ~ softmax
    # of cos(mu_c, mu_j)/tau (checked against the prototypes computed here in numpy).
    n = neg[c].reshape(-1)
    assert np.all(valid[n] & (labels[n] != c))
    rep = _inputs(g)[0].reshape(-1, 16).astype(np.float64)
    mu = np.stack([rep[valid & (labels == j)].mean(0) for j in present])
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    others = [j for j in present if j != c]
    logits = np.array([mu[present.index(c)] @ mu[present.index(j)] for j in others]) / 0.5
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    np.testing.assert_allclose(class_probs[c, others], expected, rtol=1e-5)
    freq = np.array([np.mean(labels[n] == j) for j in others])
    np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n.size))
  # Class 5 has one valid pixel: every query of class 5 is that pixel.
  assert len(np.unique(query[5])) == 1
  # Within a class the negative pixel is uniform: class 0's pixels drawn as negatives of
  # class 2 hit each of its pixels about equally often.
  hits = np.bincount(neg[2].reshape(-1)[labels[neg[2].reshape(-1)] == 0], minlength=labels.size)
  counts = hits[valid & (labels == 0)]
  assert counts.sum() > 10000
  expected_count = counts.sum() / counts.size
  chi2 = np.sum((counts - expected_count)**2 / expected_count)
  assert abs(chi2 - (counts.size - 1)) < 5 * np.sqrt(2 * (counts.size - 1)), chi2


def test_query_sampling_switches_pick_the_documented_pools(golden):
  g = golden("reco_stats_B_absent_easy_single.npz")
  labels, valid, own = _class_and_confidence(g)
  delta = float(g["strong_threshold"])
  query, _, mask, _ = _draws(g, query_sampling="random")
  # Random queries: every present class (also class 3 without hard pixels), uniform over
  # all its valid pixels, so the easy fraction among the queries is the class's.
  np.testing.assert_array_equal(mask, [True, False, True, True, False, True])
  for c in (0, 2):
    q = query[c]
    assert np.all(valid[q] & (labels[q] == c))
    easy_fraction = np.mean(own[valid & (labels == c)] >= delta)
    assert abs(np.mean(own[q] >= delta) - easy_fraction) < 5 * np.sqrt(0.25 / q.size)
  # Easy queries: only pixels with p >= delta_s; class 5 (a single hard pixel) has none.
  query, _, mask, _ = _draws(g, easy_queries=True)
  np.testing.assert_array_equal(mask, [True, False, True, True, False, False])
  for c in np.flatnonzero(mask):
    assert np.all(valid[query[c]] & (labels[query[c]] == c) & (own[query[c]] >= delta))


def test_key_sampling_switches_pick_the_documented_class_distributions(golden):
  g = golden("reco_stats_B_absent_easy_single.npz")
  labels, valid, _ = _class_and_confidence(g)
  present = np.array([0, 2, 3, 5])
  sizes = np.array([np.sum(valid & (labels == j)) for j in present])
  for sampling in ("random", "uniform_class"):
    _, neg, mask, class_probs = _draws(g, key_sampling=sampling)
    for c in np.flatnonzero(mask):
      others = present != c
      weights = sizes[others] if sampling == "random" else np.ones(others.sum())
      np.testing.assert_allclose(class_probs[c, present[others]], weights / weights.sum(),
                                 rtol=1e-5)
      assert np.all(class_probs[c, np.setdiff1d(np.arange(6), present[others])] == 0)
      n = neg[c].reshape(-1)
      assert np.all(valid[n] & (labels[n] != c))


def test_ablations_move_the_loss_in_the_expected_direction(golden):
  """Hard queries and confusing negatives make the task harder (paper §3.2, Table 4).

  On case A: easy queries < random queries < active queries, and random (pixel-uniform)
  negatives < active negatives, each by many standard errors.
  """
  g = golden("reco_stats_A_basic.npz")
  rep, labels, valid, probs = _inputs(g)
  settings = {"active": {}, "random_query": {"query_sampling": "random"},
              "easy_query": {"easy_queries": True}, "random_key": {"key_sampling": "random"},
              "uniform_class_key": {"key_sampling": "uniform_class"}}
  stats = {}
  for name, switch in settings.items():
    hyper = tuple(dict(_hyper(g), **switch).items())
    losses, _, _ = _run_many(rep, labels, valid, probs, np.zeros_like(rep), num_runs=20,
                             hyper=hyper)
    losses = np.asarray(losses, np.float64)
    stats[name] = (losses.mean(), losses.std(ddof=1) / np.sqrt(losses.size))

  def below(a, b):
    gap = stats[b][0] - stats[a][0]
    return gap > 6 * np.hypot(stats[a][1], stats[b][1])

  assert below("easy_query", "random_query"), stats
  assert below("random_query", "active"), stats
  assert below("random_key", "active"), stats
  assert below("uniform_class_key", "active"), stats


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_sampling="hard"), "query_sampling"),
    (dict(key_sampling="cosine"), "key_sampling"),
    (dict(query_sampling="random", easy_queries=True), "easy_queries"),
    (dict(num_negatives=0), "num_negatives"),
])
def test_bad_options_raise_one_line_errors(kwargs, match):
  rep, labels, valid, probs = _small_inputs(batch=1)
  with pytest.raises(ValueError, match=match):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, probs, **kwargs)


def test_bad_shapes_raise_one_line_errors():
  rep, labels, valid, probs = _small_inputs(batch=2)
  with pytest.raises(ValueError, match="probs"):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, probs[:1])
  with pytest.raises(ValueError, match="labels"):
    reco.reco_loss(jax.random.key(0), rep, labels[:, :4], valid, probs)
  with pytest.raises(ValueError, match="neg_pix"):
    reco.reco_loss_from_draws(rep, labels, valid, np.zeros((5, 4), np.int32),
                              np.zeros((5, 3, 2), np.int32))


def test_a_zero_representation_gets_a_finite_gradient():
  """A query pixel whose representation is exactly 0 (all-zero ReLU features and a zero bias,
  common early in training) gets torch's finite `F.normalize` gradient (1/eps scale), not
  sqrt'(0)·0 = NaN, which once made a toy mean-teacher + ReCo step's gradient NaN."""
  rng = np.random.default_rng(0)
  rep = jnp.asarray(rng.normal(size=(1, 2, 4, 3)), jnp.float32).at[0, 0, 0].set(0.0)
  labels = jnp.asarray([[[0, 0, 0, 0], [1, 1, 1, 1]]], jnp.int32)
  valid = jnp.ones((1, 2, 4), bool)
  query_pix = jnp.asarray([[0, 1], [4, 5]], jnp.int32)  # pixel 0 (the zero vector) is a query
  neg_pix = jnp.asarray([[[4, 5], [6, 7]], [[0, 1], [2, 3]]], jnp.int32)
  grad = jax.grad(lambda r: reco.reco_loss_from_draws(r, labels, valid, query_pix, neg_pix))(rep)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.any(np.asarray(grad)[0, 0, 0] != 0)
