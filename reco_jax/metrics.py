"""Segmentation metrics from counts accumulated over the evaluation set.

mIoU comes from a confusion matrix (module_list.py: ConfMatrix): rows are ground truth and
columns are predictions; only pixels with `0 <= label < C` count. Boundary IoU (Cheng et al.,
CVPR 2021) comes from per-class intersection and union counts of the masks' boundary regions.
Both accumulate over the whole evaluation set, not per image.
"""
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax import lax


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
  miou, iou = mean_iou(true_positive, union, absent_classes)
  total = confmat.sum()
  accuracy = float(true_positive.sum() / total) if total else float("nan")
  return {"miou": miou, "pixel_accuracy": accuracy, "iou": iou}


def mean_iou(intersection: np.ndarray, union: np.ndarray,
             absent_classes: str = "exclude") -> tuple[float, np.ndarray]:
  """(mean IoU, per-class IoU `f64[C]`) from per-class counts `int[C]` (host side).

  A class with zero union has IoU NaN; `absent_classes` ('nan' or 'exclude') says whether the
  mean becomes NaN or leaves it out (`segmentation_metrics`).
  """
  intersection, union = np.asarray(intersection, np.float64), np.asarray(union, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = intersection / union
  if absent_classes == "nan":
    miou = float(np.mean(iou))
  elif absent_classes == "exclude":
    miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
  else:
    raise ValueError(f"absent_classes must be 'nan' or 'exclude', got {absent_classes!r}")
  return miou, iou


def check_boundary_widths(widths: Sequence[int], key: str = "eval.boundary_widths") -> tuple[int, ...]:
  """`widths` as a tuple of distinct positive ints, or a one-line error naming config `key`."""
  widths = tuple(widths)
  if any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in widths) \
      or len(set(widths)) != len(widths):
    raise ValueError(f"config {key}={widths!r} must be distinct positive pixel widths, "
                     "e.g. (5, 7, 10), or () for none")
  return tuple(int(w) for w in widths)


def _min_filter(x: jax.Array, radius: int, axis: int) -> jax.Array:
  """Minimum over a window of 2*radius+1 along `axis`, with -1 beyond the edges."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  window = [1] * x.ndim
  window[axis] = 2 * radius + 1
  return lax.reduce_window(jnp.pad(x, pad, constant_values=-1), jnp.iinfo(x.dtype).max, lax.min,
                           window, (1,) * x.ndim, "VALID")


def own_class_boundaries(label_map: jax.Array, num_classes: int,
                         widths: Sequence[int]) -> jax.Array:
  """`bool[D,B,H,W]`: for each of the D widths d, whether pixel p is in B_d(M_c) for c = label_map[p].

  B_d(M) = M minus its erosion by a (2d+1)x(2d+1) square (d iterations of the 3x3 one), with
  everything beyond the image and every pixel with `label_map < 0` outside M. A pixel can
  only be in the boundary of its own class's mask, and it is there exactly when its window
  holds another value; so two min-filters of `label_map` and `C-1-label_map` (-1 outside)
  give every class's boundary at once, without a class axis (C times cheaper than eroding
  one-hot masks). Square windows are separable and erosions compose, so the widths grow
  incrementally from the smallest.

  Args:
    label_map: `i32[B,H,W]` classes in [0, C), -1 where no class.
    num_classes: C.
    widths: the widths d >= 1, in any order; the output follows it.
  """
  present = label_map >= 0
  # Interior iff min(window) == label and min(window of C-1-label) == C-1-label; a -1 in the
  # window (no class, or beyond the edge) breaks both.
  maps = jnp.stack([label_map, jnp.where(present, num_classes - 1 - label_map, -1)])
  eroded, done, boundaries = maps, 0, {}
  for d in sorted(widths):
    eroded = _min_filter(_min_filter(eroded, d - done, axis=2), d - done, axis=3)
    done = d
    boundaries[d] = present & ~jnp.all(eroded == maps, axis=0)
  return jnp.stack([boundaries[d] for d in widths])


def boundary_iou_counts(predictions: jax.Array, labels: jax.Array, num_classes: int,
                        widths: Sequence[int], weights: jax.Array | None = None) -> jax.Array:
  """`i32[D,2,C]` boundary intersection ([:, 0]) and union ([:, 1]) pixel counts per class.

  For class c and width d: |B_d(G_c) & B_d(P_c)| and |B_d(G_c) | B_d(P_c)|, G_c the ground
  truth's and P_c the prediction's binary mask of c (`own_class_boundaries`). Pixels whose
  label is outside [0, C) (ignore) or whose example has weight False belong to neither mask:
  they count in neither intersection nor union, and like the image edges (the official code
  pads the mask with zeros) they make the neighbouring mask pixels boundary in both maps.

  Args:
    predictions: `i32[B,H,W]` predicted classes.
    labels: `i32[B,H,W]` ground truth.
    num_classes: C.
    widths: the D boundary widths d in pixels (>= 1).
    weights: optional `bool[...]` broadcastable to labels (padded examples False).
  """
  valid = (labels >= 0) & (labels < num_classes)
  if weights is not None:
    valid = valid & jnp.broadcast_to(weights, labels.shape)
  gt = jnp.where(valid, labels, -1)
  pred = jnp.where(valid, predictions, -1)
  gt_boundary = own_class_boundaries(gt, num_classes, widths)
  pred_boundary = own_class_boundaries(pred, num_classes, widths)

  def per_class(classes, mask):
    return jnp.bincount(jnp.where(mask, classes, 0).reshape(-1),
                        weights=mask.reshape(-1).astype(jnp.int32), length=num_classes)

  counts = []
  for gt_b, pred_b in zip(gt_boundary, pred_boundary):
    intersection = per_class(gt, gt_b & pred_b & (gt == pred))
    union = per_class(gt, gt_b) + per_class(pred, pred_b) - intersection
    counts.append(jnp.stack([intersection, union]))
  return jnp.stack(counts).astype(jnp.int32)


def boundary_iou_metrics(counts: dict, absent_classes: str = "exclude") -> dict:
  """{'boundary_miou': {d: float}, 'boundary_iou': {d: f64[C]}} from accumulated counts
  {d: `int[2,C]`} (`boundary_iou_counts` summed over the split), host side."""
  miou, iou = {}, {}
  for width, (intersection, union) in sorted(counts.items()):
    miou[width], iou[width] = mean_iou(intersection, union, absent_classes)
  return {"boundary_miou": miou, "boundary_iou": iou}


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
