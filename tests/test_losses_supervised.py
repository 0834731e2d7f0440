"""Supervised CE against the official compute_supervised_loss (golden supervised_ce.npz)."""
import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.losses import supervised


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def test_supervised_ce_matches_golden(golden):
  g = golden("supervised_ce.npz")
  logits = jnp.asarray(_nhwc(g["predict"]))
  labels = jnp.asarray(g["target"], jnp.int32)
  loss, grad = jax.value_and_grad(supervised.supervised_loss)(logits, labels)
  np.testing.assert_allclose(loss, g["loss"], rtol=1e-5)
  np.testing.assert_allclose(grad, _nhwc(g["grad_predict"]), rtol=1e-5, atol=1e-6)
  per_pixel = supervised.cross_entropy_per_pixel(logits, labels)
  np.testing.assert_allclose(per_pixel, g["loss_none"], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(per_pixel)[g["target"] < 0] == 0)


def test_low_resolution_logits_are_upsampled_align_corners(golden):
  g = golden("resampling.npz")
  low = _nhwc(g["bilinear_in_9"])  # 2x9x9x5
  high = _nhwc(g["bilinear_ac_true_9_to_33"])
  labels = np.random.RandomState(0).randint(-1, 5, size=(2, 33, 33)).astype(np.int32)
  np.testing.assert_allclose(supervised.supervised_loss(jnp.asarray(low), jnp.asarray(labels)),
                             supervised.supervised_loss(jnp.asarray(high), jnp.asarray(labels)),
                             rtol=1e-5)


def test_all_ignored_batch_gives_zero_loss_and_gradient():
  logits = jnp.ones((1, 4, 4, 3))
  labels = -jnp.ones((1, 4, 4), jnp.int32)
  loss, grad = jax.value_and_grad(supervised.supervised_loss)(logits, labels)
  assert float(loss) == 0.0 and not np.any(np.asarray(grad))
