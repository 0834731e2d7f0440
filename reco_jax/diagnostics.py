"""Train-time diagnostics: the quality of the pseudo-labels on the unlabelled batch.

For datasets whose unlabelled images do have labels (synthetic, CamVid, a `num_labeled` subset
of VOC / Cityscapes: the unlabelled stream yields `{'image', 'label'}` with the real labels),
the semi-supervised methods compare their pseudo-labels with that ground truth at the same
pixels and log `pseudo_*` train metrics (`config.diagnostics.pseudo_labels`, default on).

The ground truth only enters these metrics: they are computed from stop-gradient values and
returned as metrics, never added to a loss, so the training trajectory is the same with the
switch on or off (tests/test_pseudo_diagnostics.py checks it bit for bit).

Definitions, over the *valid* pixels V = {gt != ignore_label} of the batch, with the
pseudo-label ŷ, the confidence c (the max softmax probability the method thresholds) and
correct = {ŷ == gt}; for a selection S (e.g. the confident pixels {c >= δs}):

  pseudo_accuracy             = |V ∩ correct| / |V|
  pseudo_precision_<S>        = |V ∩ S ∩ correct| / |V ∩ S|   (confident pixels that are right)
  pseudo_recall_<S>           = |V ∩ S ∩ correct| / |V ∩ correct|  (right pixels that are confident)
  pseudo_confident_fraction_<S> = |V ∩ S| / |V|
  pseudo_ece                  = Σ_m |B_m|/|V| · |acc(B_m) − conf(B_m)|   (Guo et al. 2017)

where B_m = {i ∈ V : c_i ∈ ((m−1)/M, m/M]}, m = 1..M (M = 15 equal-width bins over [0, 1];
c = 0 falls in the first bin), acc(B_m) the fraction of B_m that is correct and conf(B_m) the
mean confidence over B_m. A ratio whose denominator is empty is NaN: every metric when the
batch has no valid pixel (an unlabelled stream without labels: everything ignore), precision
when nothing is selected, recall when nothing is correct. NaN is what "undefined" means here
and does not break logging: the trainer's NaN guard reads only `loss`, metrics.jsonl writes
NaN as null and TensorBoard plots it as a gap; note that the trainer averages a logging window
with `np.mean`, so one undefined step makes that window's value NaN.
"""
from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

ECE_BINS = 15
IGNORE_LABEL = -1  # the label value the pipeline uses for void / padded pixels
PREFIX = "pseudo_"
# Reference δs, δw for methods whose pseudo-labels have no confidence threshold of their own
# (ReCo's mean-teacher values), so that their metrics read on the same scale.
REFERENCE_THRESHOLDS = (0.97, 0.7)


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.diagnostics, read by the methods (static)."""
  pseudo_labels: bool = False
  reference_thresholds: tuple[float, float] = REFERENCE_THRESHOLDS  # (δs, δw)

  @property
  def reference(self) -> dict[str, float]:
    """{'strong': δs, 'weak': δw} of `reference_thresholds`."""
    return {"strong": self.reference_thresholds[0], "weak": self.reference_thresholds[1]}


def settings_from(config) -> Settings:
  """`config.diagnostics` as Settings; a config without that section (a hand-built one) has
  the diagnostics off."""
  c = config.get("diagnostics")
  if c is None:
    return Settings()
  strong, weak = (float(x) for x in c.get("reference_thresholds", REFERENCE_THRESHOLDS))
  if not 0.0 <= weak <= strong <= 1.0:
    raise ValueError(f"config diagnostics.reference_thresholds={tuple(c.reference_thresholds)!r} "
                     f"must be (strong, weak) with 0 <= weak <= strong <= 1")
  return Settings(pseudo_labels=bool(c.get("pseudo_labels", False)),
                  reference_thresholds=(strong, weak))


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den as f32[], NaN where den == 0 (an undefined ratio, not a made-up 0)."""
  num, den = num.astype(jnp.float32), den.astype(jnp.float32)
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.float32(jnp.nan))


def ece_bin_index(confidence: jax.Array, num_bins: int = ECE_BINS) -> jax.Array:
  """Bin m-1 of c ∈ ((m−1)/M, m/M] (c = 0 in bin 0): f32[...] -> i32[...].

  searchsorted against the float32 edges, so that a confidence exactly on an edge (e.g. a
  uint8-quantised one, k/255 = m/15) falls in the bin it closes, as `lower < c <= upper`.
  """
  interior = jnp.asarray(np.linspace(0.0, 1.0, num_bins + 1, dtype=np.float32)[1:-1])
  # side='left': the number of interior edges strictly below c.
  return jnp.searchsorted(interior, confidence.astype(jnp.float32), side="left").astype(jnp.int32)


def expected_calibration_error(confidence: jax.Array, correct: jax.Array, valid: jax.Array,
                               num_bins: int = ECE_BINS) -> jax.Array:
  """ECE (Guo et al. 2017) over the valid pixels, static shapes (bincount with weights).

  Args:
    confidence: f32[...] in [0, 1]; correct, valid: bool[...] of the same shape.
  Returns:
    f32[]: Σ_m |Σ_{i∈B_m} (correct_i − c_i)| / |V|; NaN when no pixel is valid.
  """
  bins = ece_bin_index(confidence, num_bins).reshape(-1)
  w = valid.reshape(-1).astype(jnp.float32)
  # Per bin, Σ correct − Σ confidence = |B_m| (acc − conf): one weighted bincount.
  gap = jnp.bincount(bins, weights=w * (correct.reshape(-1).astype(jnp.float32)
                                        - confidence.reshape(-1).astype(jnp.float32)),
                     length=num_bins)
  return _ratio(jnp.sum(jnp.abs(gap)), jnp.sum(w))


def pseudo_label_quality(confidence: jax.Array, pseudo_labels: jax.Array, gt: jax.Array, *,
                         thresholds: Mapping[str, float] | None = None,
                         selections: Mapping[str, jax.Array] | None = None,
                         ignore_label: int = IGNORE_LABEL,
                         num_bins: int = ECE_BINS) -> dict[str, jax.Array]:
  """Pseudo-label accuracy, precision / recall of confident pixels and ECE (module docstring).

  Args:
    confidence: f32[B,H,W] the confidence of each pseudo-label (max softmax probability).
    pseudo_labels: i32[B,H,W] the pseudo-labels (argmax).
    gt: i32[B,H,W] the ground truth at the same pixels, `ignore_label` where void.
    thresholds: {name: δ}: selection `confidence >= δ` (the methods' `>=`), e.g.
      {'strong': δs, 'weak': δw}.
    selections: {name: bool[B,H,W]} further selections given as masks (a method whose
      confident set is not a threshold on `confidence`, e.g. S4GAN's D-selected images).
    ignore_label: the void label of `gt`.
    num_bins: ECE bins.
  Returns:
    {'pseudo_accuracy', 'pseudo_ece', and per selection name n 'pseudo_precision_n',
     'pseudo_recall_n', 'pseudo_confident_fraction_n'}: f32[] each, without gradient.
  """
  confidence, pseudo_labels, gt = jax.lax.stop_gradient((confidence, pseudo_labels, gt))
  confidence = confidence.astype(jnp.float32)
  valid = gt != ignore_label
  correct = valid & (pseudo_labels == gt)
  num_valid, num_correct = jnp.sum(valid), jnp.sum(correct)
  out = {f"{PREFIX}accuracy": _ratio(num_correct, num_valid),
         f"{PREFIX}ece": expected_calibration_error(confidence, correct, valid, num_bins)}
  masks = {name: confidence >= jnp.float32(delta) for name, delta in (thresholds or {}).items()}
  masks.update(selections or {})
  for name, selected in masks.items():
    selected = valid & jnp.broadcast_to(selected, valid.shape)
    hits = jnp.sum(selected & correct)
    out[f"{PREFIX}precision_{name}"] = _ratio(hits, jnp.sum(selected))
    out[f"{PREFIX}recall_{name}"] = _ratio(hits, num_correct)
    out[f"{PREFIX}confident_fraction_{name}"] = _ratio(jnp.sum(selected), num_valid)
  return out


def pseudo_label_quality_from_probs(probs: jax.Array, gt: jax.Array, **kwargs
                                    ) -> dict[str, jax.Array]:
  """`pseudo_label_quality` of softmax probabilities f32[B,H,W,C] (confidence = max,
  pseudo-label = argmax) against gt i32[B,H,W]; keyword arguments as there."""
  confidence = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return pseudo_label_quality(confidence, labels, gt, **kwargs)


def metric_names(selection_names) -> list[str]:
  """The keys `pseudo_label_quality` returns for selections (thresholds, then masks) named so."""
  names = [f"{PREFIX}accuracy", f"{PREFIX}ece"]
  for name in selection_names:
    names += [f"{PREFIX}{m}_{name}" for m in ("precision", "recall", "confident_fraction")]
  return names


def undefined(selection_names) -> dict[str, jax.Array]:
  """`metric_names(selection_names)`, all NaN f32[]: a step without pseudo-labels (CAC's
  warm-up, which runs no unlabelled forward)."""
  return {k: jnp.full((), jnp.nan, jnp.float32) for k in metric_names(selection_names)}
