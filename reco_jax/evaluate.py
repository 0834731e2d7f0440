"""Evaluation: one compiled step over fixed-size padded batches, mIoU from a confusion matrix.

As the official code (reco_spec §9): the model runs in eval mode on whole images padded to
a fixed size, logits are up-sampled bilinearly (align_corners=True) to the label size and
arg-maxed; padded pixels carry the ignore label and padded examples have mask False.
Other protocols (`config.eval.mode/window/stride/scales/flip`: sliding windows, multi-scale
and flip test-time augmentation) arg-max the averaged probabilities of
`inference.probabilities`; the default protocol keeps the arg-max of the logits, so its
results are bit-identical to the single-pass evaluation.
"""
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from reco_jax import metrics as seg_metrics
from reco_jax import inference, parallel
from reco_jax.inference import Protocol, predict, protocol_from_config  # noqa: F401 (API)

PyTree = Any


def eval_step(variables: PyTree, batch: dict, *, apply_fn: Callable, num_classes: int,
              boundary_widths: tuple[int, ...] = (), protocol: Protocol | None = None):
  """Counts and predictions `i32[B,H,W]` of one padded batch.

  The counts are {'confusion_matrix': `i32[C,C]`} plus, with `boundary_widths`,
  'boundary': {d: `i32[2,C]`} (boundary intersection and union per class,
  `metrics.boundary_iou_counts`); the split's metrics come from their sums. `protocol`
  (None: the official single pass) chooses how the predictions are made.
  """
  out_size = batch["label"].shape[1:3]
  if protocol is None or protocol.is_single_pass:
    # The arg-max of the logits, not of their softmax: bit-identical to the official path.
    scores = predict(apply_fn, variables, batch["image"], out_size)
  else:
    scores = inference.probabilities(apply_fn, variables, batch["image"], out_size, protocol)
  predictions = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  weights = batch["mask"][:, None, None]
  counts = {"confusion_matrix": seg_metrics.confusion_matrix(predictions, batch["label"], num_classes,
                                                             weights=weights)}
  if boundary_widths:
    boundary = seg_metrics.boundary_iou_counts(predictions, batch["label"], num_classes,
                                               boundary_widths, weights=weights)
    counts["boundary"] = dict(zip(boundary_widths, boundary))
  return counts, predictions


def make_eval_step(mesh: jax.sharding.Mesh, apply_fn: Callable, num_classes: int,
                   boundary_widths: tuple[int, ...] = (), protocol: Protocol | None = None):
  """The jitted `eval_step` (batch sharded over `data`, counts replicated); boundary IoU at
  `boundary_widths` (config `eval.boundary_widths`; () skips it), predictions under
  `protocol` (`protocol_from_config(config)`; None: the official single pass)."""
  boundary_widths = seg_metrics.check_boundary_widths(boundary_widths)
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, num_classes=num_classes,
                                   boundary_widths=boundary_widths, protocol=protocol),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)))


def _process_local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a data-sharded global array that live on this process, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas of the same rows on several local devices
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def run_evaluation(step_fn: Callable, variables: PyTree, batches: Iterator[dict], mesh: jax.sharding.Mesh,
                   num_classes: int, absent_classes: str = "exclude",
                   num_images: int = 0) -> tuple[dict, dict]:
  """Runs `step_fn` over every batch and reduces to metrics.

  Returns:
    (metrics, samples): metrics has 'miou', 'pixel_accuracy', 'iou' (f64[C]) and
    'confusion_matrix', and when the step counts boundaries (`make_eval_step`'s
    `boundary_widths`) 'boundary_miou' {d: float}, 'boundary_iou' {d: f64[C]} and
    'boundary_counts' {d: int[2,C]}; samples has up to `num_images` host-local 'image',
    'label', 'prediction' arrays for visualisation.
  """
  counts = None
  samples: dict = {}
  for local_batch in batches:
    batch = parallel.to_global_batch(local_batch, mesh)
    batch_counts, predictions = step_fn(variables, batch)
    # Sync each step: back-to-back collective programs can deadlock on CPU (design.md §2.5).
    # int64 on the host: a large split's pixel counts can pass 2**31.
    batch_counts = jax.tree.map(lambda x: np.asarray(x, np.int64), jax.device_get(batch_counts))
    counts = batch_counts if counts is None else jax.tree.map(np.add, counts, batch_counts)
    have = len(samples.get("image", ()))
    if have < num_images:
      take = num_images - have
      new = {"image": local_batch["image"][:take], "label": local_batch["label"][:take],
             "prediction": _process_local_rows(predictions)[:take]}
      new = {k: v[local_batch["mask"][:take]] for k, v in new.items()}
      samples = {k: np.concatenate([samples[k], v]) if k in samples else v for k, v in new.items()}
  if counts is None:
    raise ValueError("the evaluation split produced no batches")
  results = seg_metrics.segmentation_metrics(counts["confusion_matrix"], absent_classes)
  results["confusion_matrix"] = counts["confusion_matrix"]
  if counts.get("boundary"):
    results.update(seg_metrics.boundary_iou_metrics(counts["boundary"], absent_classes))
    results["boundary_counts"] = counts["boundary"]
  return results, samples


def flat_eval_scalars(results: dict, class_names: tuple[str, ...]) -> dict:
  """{'miou', 'pixel_accuracy', 'iou/<class>'} and, when evaluated, 'boundary_miou_<d>px'
  and 'boundary_iou_<d>px/<class>', as floats for logging."""
  scalars = {"miou": results["miou"], "pixel_accuracy": results["pixel_accuracy"]}
  for name, value in zip(class_names, results["iou"]):
    scalars[f"iou/{name}"] = float(value)
  for width, miou in results.get("boundary_miou", {}).items():
    scalars[f"boundary_miou_{width}px"] = float(miou)
    for name, value in zip(class_names, results["boundary_iou"][width]):
      scalars[f"boundary_iou_{width}px/{name}"] = float(value)
  return scalars


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A workdir's latest checkpoint on the devices present, ready to evaluate.

  `variables` are the method's evaluation weights (`method.eval_variables`: the same weights
  training evaluates); `method.apply_fn(variables, images, train=False)` runs the model.
  """
  config: ml_collections.ConfigDict
  info: Any  # input_pipeline.datasets.DatasetInfo
  method: Any  # reco_jax.methods.base.Method
  mesh: jax.sharding.Mesh
  variables: PyTree
  step: int


def restore_for_evaluation(config: ml_collections.ConfigDict, workdir: str, *,
                           allow_config_change: bool = False) -> RestoredRun:
  """Restores the latest state of `workdir` (evaluation, the tools in `reco_jax/tools`).

  The config must be the one the checkpoint was trained with, up to harmless fields such as
  the eval protocol (`workdir.check_config`; `allow_config_change` overrides).
  """
  # Imported here: the trainer imports this module for its evaluation hook.
  from reco_jax import checkpointing, train
  from reco_jax import workdir as workdir_lib

  mesh = parallel.create_mesh()
  info, method = train.build(config)
  abstract_state = checkpointing.abstract_like(
      jax.eval_shape(lambda: train.create_state(config, method, mesh)),
      parallel.replicated(mesh))
  manager = checkpointing.create_resume_manager(workdir, max_to_keep=1, read_only=True)
  latest = manager.latest_step()
  if latest is None:
    raise FileNotFoundError(f"no checkpoint found in {manager.directory}")
  workdir_lib.check_config(config.to_dict(), checkpointing.restore_config(manager, latest),
                           checkpoint_step=None, allow_changes=allow_config_change,
                           what=f"workdir {workdir}")
  state = checkpointing.restore_state(manager, abstract_state)
  return RestoredRun(config=config, info=info, method=method, mesh=mesh,
                     variables=method.eval_variables(state), step=int(jax.device_get(state.step)))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        allow_config_change: bool = False) -> dict:
  """Evaluates the latest checkpoint of `workdir` (`restore_for_evaluation`) on
  `config.input.eval_split`.

  Writes `workdir/eval_<split>.json` and returns the scalar metrics.
  """
  from input_pipeline import datasets  # the trainer imports this module
  from reco_jax import train

  boundary_widths = seg_metrics.check_boundary_widths(config.eval.boundary_widths)  # fail early
  protocol = protocol_from_config(config)
  parallel.check_batch_divisible(config.input.eval_batch_size, parallel.create_mesh(),
                                 "input.eval_batch_size")
  train.prepare_data(config)
  run = restore_for_evaluation(config, workdir, allow_config_change=allow_config_change)
  info, method, mesh = run.info, run.method, run.mesh
  logging.info("Evaluating step %d (%s) on %d devices, protocol %s", run.step,
               method.description, mesh.devices.size, protocol.to_json())

  batches_fn = datasets.create_eval_iterator(
      config.input, split=config.input.eval_split,
      local_batch_size=parallel.local_batch_size(config.input.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  step_fn = make_eval_step(mesh, method.apply_fn, info.num_classes,
                           boundary_widths=boundary_widths, protocol=protocol)
  results, _ = run_evaluation(step_fn, run.variables, batches_fn(), mesh, info.num_classes,
                              config.eval_absent_classes)
  scalars = flat_eval_scalars(results, info.class_names)
  scalars["step"] = run.step
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"eval_{config.input.eval_split}.json")
    boundary_counts = {f"{width}px": {"intersection": c[0].tolist(), "union": c[1].tolist()}
                       for width, c in results.get("boundary_counts", {}).items()}
    with open(path, "w") as f:
      json.dump({**scalars, "split": config.input.eval_split, "protocol": protocol.to_json(),
                 "confusion_matrix": results["confusion_matrix"].tolist(),
                 **({"boundary_counts": boundary_counts} if boundary_counts else {})}, f, indent=1)
    logging.info("Wrote %s", path)
  return scalars
