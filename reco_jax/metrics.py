"""Segmentation metrics from an accumulated confusion matrix (module_list.py: ConfMatrix).

Rows are ground truth and columns are predictions; only pixels with `0 <= label < C`
count. The matrix accumulates over the whole evaluation set, not per image.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     weights: jax.Array | None = None) -> jax.Array:
  """`i32[C,C]` counts of (label, prediction) pairs.

  Args:
    predictions: `i32[...]` predicted classes.
    labels: `i32[...]` same shape; pixels outside `[0, C)` are ignored.
    num_classes: C.
    weights: optional `bool[...]` broadcastable to labels; False pixels are ignored
      (padded evaluation examples).
  """
  valid = (labels >= 0) & (labels < num_classes)
  if weights is not None:
    valid = valid & jnp.broadcast_to(weights, labels.shape)
  index = jnp.where(valid, num_classes * labels + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_metrics(confmat: np.ndarray, absent_classes: str = "exclude") -> dict:
  """mIoU, per-class IoU and pixel accuracy from a confusion matrix (host side, float64).

  Args:
    confmat: `int[C,C]`, rows = ground truth.
    absent_classes: a class absent from both ground truth and predictions has IoU 0/0.
      'nan' keeps the official behaviour (the mIoU becomes NaN); 'exclude' (default)
      leaves such classes out of the mean. The two agree whenever every class occurs,
      which is the case on the full validation sets.
  Returns:
    {'miou': float, 'pixel_accuracy': float, 'iou': f64[C]} (absent classes have NaN IoU).
  """
  confmat = np.asarray(confmat, np.float64)
  true_positive = np.diag(confmat)
  union = confmat.sum(0) + confmat.sum(1) - true_positive
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = true_positive / union
  if absent_classes == "nan":
    miou = float(np.mean(iou))
  elif absent_classes == "exclude":
    miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
  else:
    raise ValueError(f"absent_classes must be 'nan' or 'exclude', got {absent_classes!r}")
  total = confmat.sum()
  accuracy = float(true_positive.sum() / total) if total else float("nan")
  return {"miou": miou, "pixel_accuracy": accuracy, "iou": iou}


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """clu metric accumulating a `i32[C,C]` confusion matrix on device."""
  matrix: jax.Array

  @classmethod
  def empty(cls, num_classes: int = 1) -> "ConfusionMatrix":
    return cls(matrix=jnp.zeros((num_classes, num_classes), jnp.int32))

  @classmethod
  def from_model_output(cls, *, predictions: jax.Array, labels: jax.Array, num_classes: int,
                        mask: jax.Array | None = None, **_) -> "ConfusionMatrix":
    return cls(matrix=confusion_matrix(predictions, labels, num_classes, mask))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(matrix=self.matrix + other.matrix)

  def compute(self) -> jax.Array:
    return self.matrix
