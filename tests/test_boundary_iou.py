"""Boundary IoU (reco_jax/metrics.py) against a slow per-class scipy reference, through the
sharded eval step, and from `main.py --mode=eval`."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import CAMVID_DIR, REPO_ROOT, toy_segmenter
from reco_jax import evaluate, metrics, parallel

CAMVID_VOID = 11  # SegNet layout: label 11 is void (the ignore label)
CAMVID_CLASSES = 11


def reference_counts(predictions, labels, num_classes, widths, weights=None, *,
                     prediction_outside_valid=False, border_value=0):
  """`int[D,2,C]` boundary intersection and union, one binary mask at a time (slow).

  B_d(M) = M minus scipy's binary erosion of M by the 3x3 square, d iterations, with
  `border_value` beyond the image (0: the official zero padding). The masks: G_c = label == c
  and P_c = prediction == c on pixels with a valid label (`prediction_outside_valid`: on
  every pixel, a mutant); only valid pixels of examples with weight True count.
  """
  square = np.ones((3, 3), bool)

  def boundary(mask, d):
    return mask & ~ndimage.binary_erosion(mask, square, iterations=d, border_value=border_value)

  counts = np.zeros((len(widths), 2, num_classes), np.int64)
  weights = np.ones(len(labels), bool) if weights is None else weights
  for prediction, label, weight in zip(predictions, labels, weights):
    valid = (label >= 0) & (label < num_classes) & weight
    for i, d in enumerate(widths):
      for c in range(num_classes):
        gt_b = boundary((label == c) & valid, d)
        pred_b = boundary((prediction == c) & (True if prediction_outside_valid else valid), d)
        gt_b, pred_b = gt_b & valid, pred_b & valid
        counts[i, 0, c] += np.sum(gt_b & pred_b)
        counts[i, 1, c] += np.sum(gt_b | pred_b)
  return counts


def multiclass_eroded_counts(predictions, labels, num_classes, widths):
  """Mutant: the boundary taken from the grey-value erosion of the multi-class map (a pixel
  is boundary when the window's minimum label differs from its own), not per class."""
  counts = np.zeros((len(widths), 2, num_classes), np.int64)
  for prediction, label in zip(predictions, labels):
    valid = (label >= 0) & (label < num_classes)
    for i, d in enumerate(widths):
      size = 2 * d + 1
      gt_b = valid & (ndimage.grey_erosion(label, size=size, mode="constant", cval=-1) != label)
      pred_map = np.where(valid, prediction, -1)
      pred_b = valid & (ndimage.grey_erosion(pred_map, size=size, mode="constant", cval=-1) != pred_map)
      for c in range(num_classes):
        g, p = gt_b & (label == c), pred_b & (pred_map == c)
        counts[i, 0, c] += np.sum(g & p)
        counts[i, 1, c] += np.sum(g | p)
  return counts


def device_counts(predictions, labels, num_classes, widths, weights=None):
  fn = jax.jit(lambda p, l, w: metrics.boundary_iou_counts(p, l, num_classes, widths, w))
  w = None if weights is None else jnp.asarray(weights)[:, None, None]
  return np.asarray(fn(jnp.asarray(predictions, jnp.int32), jnp.asarray(labels, jnp.int32), w))


def blobby_maps(rng, shape, num_classes, block=5, ignore_fraction=0.05):
  """`i32[B,H,W]` labels of blocky regions with scattered and blocky -1 pixels, and noisy
  predictions (labels with 10% random pixels and one shifted example)."""
  b, h, w = shape
  coarse = rng.integers(0, num_classes, (b, h // block + 1, w // block + 1))
  labels = np.repeat(np.repeat(coarse, block, 1), block, 2)[:, :h, :w].astype(np.int32)
  labels[rng.random(shape) < ignore_fraction] = -1
  labels[:, h // 3:h // 3 + 4, :7] = -1  # a void region touching the image edge
  predictions = np.where(rng.random(shape) < 0.1, rng.integers(0, num_classes, shape),
                         np.maximum(labels, 0)).astype(np.int32)
  predictions[0] = np.roll(predictions[0], (2, -3), axis=(0, 1))
  return predictions, labels


def camvid_label_maps(count):
  """The first `count` CamVid val label maps `i32[count,360,480]` (void -> -1)."""
  files = sorted((CAMVID_DIR / "valannot").glob("*.png"))[:count]
  if len(files) < count:
    pytest.skip(f"CamVid val labels not found in {CAMVID_DIR} (set RECO_SHARED_DIR)")
  labels = np.stack([np.asarray(Image.open(f), np.int32) for f in files])
  return np.where(labels == CAMVID_VOID, -1, labels)


def camvid_predictions(labels, rng):
  """Plausible predictions: the labels shifted by a few pixels, with blocks of wrong class."""
  predictions = np.maximum(np.roll(labels, (3, -4), axis=(1, 2)), 0)
  wrong = np.repeat(np.repeat(rng.random((len(labels), 24, 32)) < 0.1, 15, 1), 15, 2)
  return np.where(wrong, (predictions + 1) % CAMVID_CLASSES, predictions).astype(np.int32)


@pytest.mark.parametrize("seed,shape,widths", [
    (0, (3, 37, 53), (1, 5, 7, 10)),
    (1, (2, 20, 31), (10, 3)),  # unsorted; wider than some regions
    (2, (4, 16, 16), (25,)),  # wider than the image: every mask pixel is boundary
])
def test_matches_scipy_reference_on_random_label_maps(seed, shape, widths):
  rng = np.random.default_rng(seed)
  predictions, labels = blobby_maps(rng, shape, num_classes=5)
  weights = np.ones(shape[0], bool)
  weights[-1] = False  # a padded example counts nowhere
  want = reference_counts(predictions, labels, 5, widths, weights)
  np.testing.assert_array_equal(device_counts(predictions, labels, 5, widths, weights), want)
  assert want[:, 1].sum() > 0


def test_matches_scipy_reference_on_camvid_label_maps():
  labels = camvid_label_maps(3)
  predictions = camvid_predictions(labels, np.random.default_rng(0))
  widths = (5, 7, 10)
  want = reference_counts(predictions, labels, CAMVID_CLASSES, widths)
  got = device_counts(predictions, labels, CAMVID_CLASSES, widths)
  np.testing.assert_array_equal(got, want)
  # Real boundaries: most classes present, intersections strictly inside the unions.
  assert (want[:, 1] > 0).sum(axis=1).min() >= 8
  assert np.all(want[:, 0] <= want[:, 1]) and want[:, 0].sum() < want[:, 1].sum()


def test_mutants_of_the_definition_differ():
  """The reference test can tell the per-class boundary from plausible wrong ones."""
  labels = camvid_label_maps(2)
  predictions = camvid_predictions(labels, np.random.default_rng(1))
  widths = (5,)
  got = device_counts(predictions, labels, CAMVID_CLASSES, widths)
  for mutant in (multiclass_eroded_counts(predictions, labels, CAMVID_CLASSES, widths),
                 reference_counts(predictions, labels, CAMVID_CLASSES, widths, border_value=1),
                 reference_counts(predictions, labels, CAMVID_CLASSES, widths,
                                  prediction_outside_valid=True)):
    assert not np.array_equal(got, mutant)


def test_eval_padding_equals_the_image_edge():
  """Eval pads right/bottom with ignore pixels: the counts equal the unpadded image's,
  whatever the padded logits predict there."""
  rng = np.random.default_rng(3)
  predictions, labels = blobby_maps(rng, (2, 23, 29), num_classes=4)
  padded_labels = np.pad(labels, ((0, 0), (0, 9), (0, 5)), constant_values=-1)
  padded_predictions = np.pad(predictions, ((0, 0), (0, 9), (0, 5)), mode="edge")
  np.testing.assert_array_equal(device_counts(padded_predictions, padded_labels, 4, (2, 5)),
                                device_counts(predictions, labels, 4, (2, 5)))


def test_metrics_exclude_classes_with_zero_union_and_name_scalars():
  counts = {5: np.array([[3, 0, 1], [4, 0, 2]]), 7: np.array([[4, 0, 2], [6, 0, 2]])}
  result = metrics.boundary_iou_metrics(counts)
  assert result["boundary_miou"][5] == pytest.approx((0.75 + 0.5) / 2)
  assert np.isnan(result["boundary_iou"][7][1])
  assert np.isnan(metrics.boundary_iou_metrics(counts, "nan")["boundary_miou"][5])
  scalars = evaluate.flat_eval_scalars(
      {"miou": 0.5, "pixel_accuracy": 0.9, "iou": np.array([0.1, np.nan, 0.9]), **result},
      ("a", "b", "c"))
  assert scalars["boundary_miou_5px"] == pytest.approx(0.625)
  assert scalars["boundary_iou_7px/a"] == pytest.approx(4 / 6)
  assert list(scalars)[:5] == ["miou", "pixel_accuracy", "iou/a", "iou/b", "iou/c"]
  assert len([k for k in scalars if k.startswith("boundary_iou_")]) == 6


@pytest.mark.parametrize("widths", [(0,), (5, 5), (2.5,), (True,)])
def test_bad_widths_fail_naming_the_config_key(widths):
  with pytest.raises(ValueError, match=r"^config eval\.boundary_widths=.* must be distinct "
                                       r"positive pixel widths"):
    metrics.check_boundary_widths(widths)


def test_sharded_eval_step_equals_single_device_and_reference(mesh, single_device_mesh):
  num_classes, widths = 4, (1, 3)
  model = toy_segmenter(num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)), train=False)
  rng = np.random.default_rng(4)
  _, labels = blobby_maps(rng, (8, 32, 48), num_classes, block=6)
  batch = {"image": rng.standard_normal((8, 32, 48, 3)).astype(np.float32), "label": labels,
           "mask": np.array([True] * 6 + [False] * 2)}
  runs = []
  for m in (mesh, single_device_mesh):
    step = evaluate.make_eval_step(m, model.apply, num_classes, boundary_widths=widths)
    counts, predictions = step(variables, parallel.to_global_batch(batch, m))
    runs.append((jax.tree.map(np.asarray, jax.device_get(counts)), np.asarray(predictions)))
  (sharded, predictions), (single, _) = runs
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  want = reference_counts(predictions, labels, num_classes, widths, batch["mask"])
  np.testing.assert_array_equal(np.stack([sharded["boundary"][w] for w in widths]), want)
  results, _ = evaluate.run_evaluation(
      evaluate.make_eval_step(mesh, model.apply, num_classes, boundary_widths=widths),
      variables, iter([batch, batch]), mesh, num_classes)
  np.testing.assert_array_equal(results["boundary_counts"][3], 2 * want[1])
  assert set(results["boundary_miou"]) == {1, 3}


@pytest.mark.slow  # two main.py runs; the default suite checks the default widths in test_main.py
def test_mode_eval_writes_boundary_iou(tmp_path):
  """A smoke run trained by main.py, evaluated with other widths (a harmless eval field)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  base = [sys.executable, "main.py", "--config=configs/synthetic.py:method=supervised,variant=smoke",
          f"--workdir={tmp_path}"]
  for extra in ([], ["--mode=eval", "--config.eval.boundary_widths=(2, 5)"]):
    proc = subprocess.run(base + extra, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / "eval_val.json") as f:
    evaluated = json.load(f)
  for width in (2, 5):
    assert 0.0 <= evaluated[f"boundary_miou_{width}px"] <= 1.0
    counts = evaluated["boundary_counts"][f"{width}px"]
    assert sum(counts["union"]) > 0 and len(counts["union"]) == 8
  assert "boundary_miou_7px" not in evaluated
  assert "boundary_iou_2px/background" in evaluated
