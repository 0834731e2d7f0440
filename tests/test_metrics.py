"""Confusion matrix / mIoU against the official ConfMatrix (golden confmat.npz)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import metrics, parallel


def _accumulate(preds, targets, n, mesh=None):
  m = metrics.ConfusionMatrix.empty(n)
  for p, t in zip(preds, targets):
    p, t = jnp.asarray(p, jnp.int32), jnp.asarray(t, jnp.int32)
    if mesh is not None:  # batch of 2 sharded over 2 devices
      p, t = (jax.device_put(x, parallel.data_sharded(mesh)) for x in (p, t))
    update = jax.jit(lambda p, t: metrics.ConfusionMatrix.from_model_output(
        predictions=p, labels=t, num_classes=n))(p, t)
    m = m.merge(update)
  return np.asarray(m.compute())


def test_confusion_matrix_matches_golden_exactly(golden):
  g = golden("confmat.npz")
  n = int(g["num_classes"])
  mat = _accumulate(g["preds"], g["targets"], n)
  np.testing.assert_array_equal(mat, g["mat"])
  result = metrics.segmentation_metrics(mat, absent_classes="nan")
  np.testing.assert_allclose(result["miou"], g["miou"], rtol=1e-6)
  np.testing.assert_allclose(result["pixel_accuracy"], g["acc"], rtol=1e-6)
  # Every class occurs, so both policies agree.
  assert metrics.segmentation_metrics(mat)["miou"] == pytest.approx(result["miou"], rel=1e-12)


def test_confusion_matrix_sharded_equals_single_device(golden):
  g = golden("confmat.npz")
  n = int(g["num_classes"])
  mesh = parallel.create_mesh(jax.devices()[:2])
  np.testing.assert_array_equal(_accumulate(g["preds"], g["targets"], n, mesh), g["mat"])


def test_absent_class_policies(golden):
  g = golden("confmat.npz")
  n = int(g["num_classes"])
  mat = _accumulate(g["absent_pred"], g["absent_target"], n)
  np.testing.assert_array_equal(mat, g["absent_mat"])
  official = metrics.segmentation_metrics(mat, absent_classes="nan")
  assert np.isnan(official["miou"]) and np.isnan(g["absent_miou"])
  np.testing.assert_allclose(official["pixel_accuracy"], g["absent_acc"], rtol=1e-6)
  excluded = metrics.segmentation_metrics(mat, absent_classes="exclude")
  iou = official["iou"]
  assert np.isnan(iou[5])
  np.testing.assert_allclose(excluded["miou"], np.mean(iou[:5]), rtol=1e-12)


def test_masked_examples_do_not_count():
  labels = jnp.array([[[0, 1]], [[1, 1]]], jnp.int32)
  preds = jnp.array([[[0, 0]], [[1, 0]]], jnp.int32)
  mat = metrics.confusion_matrix(preds, labels, 2, weights=jnp.array([True, False])[:, None, None])
  np.testing.assert_array_equal(mat, [[1, 0], [1, 0]])
