"""Pseudo-label diagnostics (issue 14): `reco_jax.diagnostics` against a slow NumPy
transcription of its definitions, and the methods' `pseudo_*` train metrics, which must leave
the training trajectory bit for bit unchanged (the unlabelled ground truth reaches no loss).

Step-level runs use the toy segmenter on one device (as tests/test_methods.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_segmenter
from reco_jax import diagnostics, methods, parallel, train
from test_methods import NUM_CLASSES, random_batches, smoke_config

THRESHOLDS = {"strong": 0.9, "weak": 0.6}


# ---------------------------------------------------------------------------------------------
# The pure function against a NumPy transcription.


def numpy_quality(confidence, pseudo, gt, thresholds, ignore=-1, num_bins=15):
  """Pixel loops over the definitions of the diagnostics docstring (float64 sums)."""
  conf, pseudo, gt = (np.asarray(x).reshape(-1) for x in (confidence, pseudo, gt))
  valid = [i for i in range(conf.size) if gt[i] != ignore]
  correct = {i for i in valid if pseudo[i] == gt[i]}

  def ratio(a, b):
    return a / b if b else np.nan

  out = {"pseudo_accuracy": ratio(len(correct), len(valid))}
  edges = np.linspace(0.0, 1.0, num_bins + 1, dtype=np.float32)
  ece = 0.0
  for m in range(num_bins):
    lo, hi = edges[m], edges[m + 1]
    members = [i for i in valid if (lo < conf[i] <= hi) or (m == 0 and conf[i] == 0)]
    if members:
      acc = np.mean([i in correct for i in members])
      mean_conf = np.mean([float(conf[i]) for i in members])
      ece += len(members) / len(valid) * abs(acc - mean_conf)
  out["pseudo_ece"] = ece if valid else np.nan
  for name, delta in thresholds.items():
    confident = [i for i in valid if conf[i] >= np.float32(delta)]
    hits = sum(i in correct for i in confident)
    out[f"pseudo_precision_{name}"] = ratio(hits, len(confident))
    out[f"pseudo_recall_{name}"] = ratio(hits, len(correct))
    out[f"pseudo_confident_fraction_{name}"] = ratio(len(confident), len(valid))
  return out


def random_inputs(seed, shape=(2, 6, 7), num_classes=4, ignore_fraction=0.3):
  rng = np.random.RandomState(seed)
  conf = rng.uniform(0.2, 1.0, shape).astype(np.float32)
  # Some confidences exactly on bin edges (uint8-quantised ones hit m/15 = 17m/255).
  conf.reshape(-1)[:6] = np.float32([0.0, 1 / 15, 2 / 15, 17 / 255, 1.0, 0.6])
  pseudo = rng.randint(0, num_classes, shape).astype(np.int32)
  gt = np.where(rng.rand(*shape) < 0.5, pseudo, rng.randint(0, num_classes, shape)).astype(np.int32)
  gt[rng.rand(*shape) < ignore_fraction] = -1
  return conf, pseudo, gt


def _assert_matches(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_matches_the_numpy_transcription(seed):
  conf, pseudo, gt = random_inputs(seed)
  got = jax.jit(lambda c, p, g: diagnostics.pseudo_label_quality(c, p, g, thresholds=THRESHOLDS))(
      conf, pseudo, gt)
  want = numpy_quality(conf, pseudo, gt, THRESHOLDS)
  _assert_matches(got, want)
  assert set(got) == set(diagnostics.metric_names(THRESHOLDS))
  assert 0 < want["pseudo_ece"] < 1 and 0 < want["pseudo_recall_strong"] < 1


def test_from_probs_and_masks_agree_with_thresholds():
  rng = np.random.RandomState(3)
  probs = jax.nn.softmax(3 * rng.randn(2, 5, 5, 4).astype(np.float32))
  gt = rng.randint(-1, 4, (2, 5, 5)).astype(np.int32)
  conf = np.asarray(jnp.max(probs, -1))
  from_probs = diagnostics.pseudo_label_quality_from_probs(probs, gt, thresholds={"weak": 0.6})
  as_mask = diagnostics.pseudo_label_quality(conf, np.argmax(probs, -1), gt,
                                             selections={"weak": conf >= np.float32(0.6)})
  _assert_matches(from_probs, {k: float(v) for k, v in as_mask.items()})
  _assert_matches(from_probs, numpy_quality(conf, np.argmax(probs, -1), gt, {"weak": 0.6}))


def test_all_ignore_batch_is_nan_everywhere_and_no_confident_pixel_is_nan_precision():
  conf, pseudo, gt = random_inputs(4)
  empty = diagnostics.pseudo_label_quality(conf, pseudo, np.full_like(gt, -1), thresholds=THRESHOLDS)
  assert all(np.isnan(float(v)) for v in empty.values())
  _assert_matches(empty, numpy_quality(conf, pseudo, np.full_like(gt, -1), THRESHOLDS))
  out = diagnostics.pseudo_label_quality(conf * 0.5, pseudo, gt, thresholds={"strong": 0.9})
  assert np.isnan(float(out["pseudo_precision_strong"]))
  assert float(out["pseudo_recall_strong"]) == 0.0 == float(out["pseudo_confident_fraction_strong"])
  undefined = diagnostics.undefined(THRESHOLDS)
  assert set(undefined) == set(empty) and all(np.isnan(float(v)) for v in undefined.values())


def test_mutations_are_caught(monkeypatch):
  """The transcription test is sensitive: swapped precision / recall, or bins closed on the
  left instead of the right, no longer match."""
  conf, pseudo, gt = random_inputs(0)
  want = numpy_quality(conf, pseudo, gt, THRESHOLDS)
  got = {k: float(v) for k, v in
         diagnostics.pseudo_label_quality(conf, pseudo, gt, thresholds=THRESHOLDS).items()}
  swapped = dict(got)
  swapped["pseudo_precision_strong"], swapped["pseudo_recall_strong"] = (
      got["pseudo_recall_strong"], got["pseudo_precision_strong"])
  with pytest.raises(AssertionError):
    _assert_matches(swapped, want)

  def left_closed(confidence, num_bins=diagnostics.ECE_BINS):  # [lo, hi) bins
    interior = jnp.asarray(np.linspace(0, 1, num_bins + 1, dtype=np.float32)[1:-1])
    return jnp.searchsorted(interior, confidence, side="right").astype(jnp.int32)

  # Two pixels in bin (1/15, 2/15], one correct at its upper edge and one wrong: they share
  # the bin (gaps cancel) only with right-closed bins.
  edge_conf, edge_pseudo, edge_gt = (np.float32([[[2 / 15, 0.1]]]), np.int32([[[1, 1]]]),
                                     np.int32([[[1, 2]]]))
  edge_want = numpy_quality(edge_conf, edge_pseudo, edge_gt, {})
  _assert_matches(diagnostics.pseudo_label_quality(edge_conf, edge_pseudo, edge_gt), edge_want)
  # Another number of bins.
  with pytest.raises(AssertionError):
    _assert_matches(diagnostics.pseudo_label_quality(conf, pseudo, gt, thresholds=THRESHOLDS,
                                                     num_bins=10), want)
  monkeypatch.setattr(diagnostics, "ece_bin_index", left_closed)
  with pytest.raises(AssertionError):
    _assert_matches(diagnostics.pseudo_label_quality(edge_conf, edge_pseudo, edge_gt), edge_want)


# ---------------------------------------------------------------------------------------------
# The methods: metrics only, the trajectory unchanged.


def _runner(config, mesh):
  """`run(batches)` -> (host state leaves, per-step metrics): steps `config`'s method from
  its initial state; one compiled step for every call."""
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))
  step = train.make_train_step(mesh, method, config.seed)

  def run(batches):
    state = train.create_state(config, method, mesh)
    metrics = []
    for batch in batches:
      state, m = step(state, parallel.to_global_batch(batch, mesh))
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return (jax.tree.map(np.asarray, (state.params, state.batch_stats, state.extra, state.opt_state)),
            metrics)
  return run


def _corrupted(batches, stream, seed=99):
  """The batches with `stream`'s labels replaced by random ones (images untouched)."""
  rng = np.random.RandomState(seed)
  out = []
  for batch in batches:
    batch = dict(batch)
    labels = batch[stream]["label"]
    batch[stream] = {**batch[stream],
                     "label": rng.randint(-1, NUM_CLASSES, labels.shape).astype(np.int32)}
    out.append(batch)
  return out


def _check_diagnostics_leave_training_alone(preset, stream, mesh, num_steps=2, **overrides):
  """Diagnostics off / on / on with corrupted unlabelled labels: bit-identical states and
  non-diagnostic metrics; `pseudo_*` only when on, and `pseudo_accuracy` follows the labels."""
  overrides = {"input.crop_size": (16, 16), "memory_bank.feature_source": "rep", **overrides}
  off_config = smoke_config(preset, **overrides, **{"diagnostics.pseudo_labels": False})
  on_config = smoke_config(preset, **overrides)
  assert on_config.diagnostics.pseudo_labels  # the default
  method = methods.get_method(on_config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))
  batches = random_batches(on_config, method, num_steps, seed=5)
  state_off, metrics_off = _runner(off_config, mesh)(batches)
  run_on = _runner(on_config, mesh)
  state_on, metrics_on = run_on(batches)
  state_bad, metrics_bad = run_on(_corrupted(batches, stream))
  jax.tree.map(np.testing.assert_array_equal, state_off, state_on)
  jax.tree.map(np.testing.assert_array_equal, state_off, state_bad)
  for off, on, bad in zip(metrics_off, metrics_on, metrics_bad):
    assert not any(k.startswith("pseudo_") and k != "pseudo_label_confident_fraction"
                   and k != "pseudo_label_loss" for k in off)
    added = set(on) - set(off)
    assert added and all(k.startswith("pseudo_") for k in added)
    assert {"pseudo_accuracy", "pseudo_ece"} <= added
    for k in off:
      assert on[k] == off[k] == bad[k], k
  # Random labels agree with the pseudo-labels at other pixels than the real ones.
  assert [m["pseudo_accuracy"] for m in metrics_on] != [m["pseudo_accuracy"] for m in metrics_bad]
  return metrics_on


def test_mean_teacher_diagnostics_leave_training_alone(single_device_mesh):
  metrics = _check_diagnostics_leave_training_alone("cutout", "unlabeled", single_device_mesh)
  for m in metrics:
    assert set(m) >= set(diagnostics.metric_names(("strong", "weak")))
    assert all(np.isfinite(m[k]) or "precision" in k for k in diagnostics.metric_names(()))
    assert 0 <= m["pseudo_accuracy"] <= 1 and 0 <= m["pseudo_ece"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("preset,stream", [
    ("classmix_reco", "unlabeled"), ("memory_bank", "unlabeled"), ("pc2seg", "unlabeled"),
    ("s4gan", "unlabeled"), ("cac", "unlabeled_pair")])
def test_every_method_diagnostics_leave_training_alone(preset, stream, single_device_mesh):
  metrics = _check_diagnostics_leave_training_alone(preset, stream, single_device_mesh)
  if preset == "s4gan":
    assert "pseudo_precision_selected" in metrics[0]


def test_pseudo_labels_are_compared_before_the_strong_augmentation(single_device_mesh):
  """With the GT equal to the teacher's own pseudo-labels of the raw batch, the accuracy is 1:
  the comparison happens at the raw pixels, not the augmented ones."""
  config = smoke_config("cutout", **{"input.crop_size": (16, 16), "memory_bank.feature_source": "rep"})
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))
  state = train.create_state(config, method, single_device_mesh)
  batch = random_batches(config, method, 1, seed=6)[0]
  _, labels, _ = method.teacher_predict(state.extra, jnp.asarray(batch["unlabeled"]["image"]))
  batch["unlabeled"]["label"] = np.asarray(labels)
  _, m = train.make_train_step(single_device_mesh, method, config.seed)(
      state, parallel.to_global_batch(batch, single_device_mesh))
  assert float(m["pseudo_accuracy"]) == 1.0
  assert float(m["pseudo_precision_strong"]) in (1.0,) or np.isnan(float(m["pseudo_precision_strong"]))
