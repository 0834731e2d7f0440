"""Tests for reco_jax.losses.unsupervised against unsupervised_loss.npz and a NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import resampling
from reco_jax.losses import supervised, unsupervised


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _numpy_reference(logits, labels, conf, threshold):
  """Float64 transcription of compute_unsupervised_loss (NHWC)."""
  b = labels.shape[0]
  weight = (conf.reshape(b, -1) >= np.float32(threshold)).sum(1) / (labels.reshape(b, -1) >= 0).sum(1)
  x = logits.astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  picked = np.take_along_axis(x, np.maximum(labels, 0)[..., None], -1)[..., 0]
  ce = np.where(labels >= 0, lse - picked, 0.0)
  return np.mean((weight[:, None, None] * ce)[ce > 0])


@pytest.mark.parametrize("case", [0, 1])
def test_golden_loss_and_grad(golden, case):
  g = golden("unsupervised_loss.npz")
  logits = jnp.asarray(_nhwc(g[f"case{case}_predict"]))
  labels = jnp.asarray(g[f"case{case}_target"].astype(np.int32))
  conf = jnp.asarray(g[f"case{case}_logits"])
  threshold = g["strong_threshold"]
  loss_fn = jax.jit(lambda x: unsupervised.unsupervised_loss(x, labels, conf, threshold))
  loss, grad = jax.value_and_grad(loss_fn)(logits)
  np.testing.assert_allclose(float(loss), float(g[f"case{case}_loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), _nhwc(g[f"case{case}_grad_predict"]), rtol=0, atol=1e-7)


def test_golden_edge_cases_are_exercised(golden):
  """Case 0 has confidences exactly at δs (counted by >=); case 1 has a pixel with CE == 0."""
  g = golden("unsupervised_loss.npz")
  assert np.sum(g["case0_logits"] == g["strong_threshold"]) == 33
  # With `>` instead of `>=` the case-0 loss would differ measurably.
  logits, labels, conf = _nhwc(g["case0_predict"]), g["case0_target"], g["case0_logits"]
  strict = _numpy_reference(logits, labels, np.where(conf == g["strong_threshold"], 0, conf), 0.97)
  assert abs(strict - float(g["case0_loss"])) > 1e-4
  per_pixel = supervised.cross_entropy_per_pixel(
      jnp.asarray(_nhwc(g["case1_predict"])), jnp.asarray(g["case1_target"].astype(np.int32)))
  assert g["case1_target"][0, 0, 0] >= 0 and float(per_pixel[0, 0, 0]) == 0.0


def test_matches_numpy_reference_with_low_resolution_logits():
  rng = np.random.default_rng(0)
  low = rng.normal(size=(3, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(-1, 4, size=(3, 9, 11)).astype(np.int32)
  conf = unsupervised.quantize_confidence(jnp.asarray(rng.uniform(0.5, 1.0, size=(3, 9, 11)), jnp.float32))
  conf = jnp.where(labels >= 0, conf, 0.0)
  got = unsupervised.unsupervised_loss(jnp.asarray(low), jnp.asarray(labels), conf, 0.97)
  up = np.asarray(resampling.resize_bilinear_align_corners(jnp.asarray(low), (9, 11)))
  want = _numpy_reference(up, labels, np.asarray(conf), 0.97)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_image_without_valid_pixels_does_not_poison_the_batch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 7, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 7, 8)).astype(np.int32)
  labels[1] = -1
  conf = np.where(labels >= 0, 0.99, 0.0).astype(np.float32)
  conf[1, 0, 0] = 0.99  # confident but invalid: the official w_1 would be 1/0 = inf
  loss, grad = jax.value_and_grad(unsupervised.unsupervised_loss)(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(conf), 0.97)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = _numpy_reference(logits, labels, conf, 0.97)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[1] == 0)


@pytest.mark.parametrize("policy,expected", [("nan", np.nan), ("zero", 0.0)])
def test_empty_selection_policy(policy, expected):
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 3)), jnp.float32)
  labels = jnp.full((2, 4, 4), -1, jnp.int32)
  conf = jnp.zeros((2, 4, 4))

  def total(x):  # a supervised-like term plus the empty unsupervised term
    unsup = unsupervised.unsupervised_loss(x, labels, conf, 0.97, empty_policy=policy)
    return jnp.sum(x ** 2) + unsup, unsup

  (_, unsup), grad = jax.value_and_grad(total, has_aux=True)(logits)
  np.testing.assert_equal(float(unsup), expected)
  np.testing.assert_array_equal(np.asarray(grad), 2 * np.asarray(logits))  # finite, unsup adds 0


def test_selection_empty_because_every_ce_is_zero():
  logits = np.zeros((1, 2, 2, 3), np.float32)
  logits[..., 1] = 200.0  # CE underflows to exactly 0 for label 1
  labels = jnp.ones((1, 2, 2), jnp.int32)
  out = unsupervised.unsupervised_loss(jnp.asarray(logits), labels, jnp.ones((1, 2, 2)), 0.97)
  assert np.isnan(float(out))


def test_bad_arguments_raise():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="empty_policy"):
    unsupervised.unsupervised_loss(x, jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2)), 0.97,
                                   empty_policy="skip")
  with pytest.raises(ValueError, match="pseudo_labels"):
    unsupervised.unsupervised_loss(x, jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 3)), 0.97)


def test_quantize_confidence_matches_uint8_truncation():
  p = np.random.default_rng(3).uniform(0, 1, size=10000).astype(np.float32)
  p = np.concatenate([p, np.arange(256, dtype=np.float32) / np.float32(255), [0.97, 1.0]]).astype(np.float32)
  # torch: (p * 255) in float32, .byte() truncates, to_tensor divides by 255 in float32.
  want = (p * np.float32(255)).astype(np.uint8).astype(np.float32) / np.float32(255)
  got = np.asarray(unsupervised.quantize_confidence(jnp.asarray(p)))
  np.testing.assert_array_equal(got, want)
  # Idempotent (the second PIL round trip keeps the value), and the thresholds of §0.9.
  np.testing.assert_array_equal(np.asarray(unsupervised.quantize_confidence(jnp.asarray(got))), got)
  assert np.array_equal(got >= np.float32(0.97), p >= np.float32(248 / 255))
  assert np.array_equal(got >= np.float32(0.7), p >= np.float32(179 / 255))
