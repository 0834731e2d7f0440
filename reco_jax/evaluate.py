"""Evaluation: one compiled step over fixed-size padded batches, mIoU from a confusion matrix.

As the official code (reco_spec §9): the model runs in eval mode on whole images padded to
a fixed size, logits are up-sampled bilinearly (align_corners=True) to the label size and
arg-maxed; padded pixels carry the ignore label and padded examples have mask False.
"""
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
from reco_jax import parallel, resampling

PyTree = Any


def predict(apply_fn: Callable, variables: PyTree, images: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """`f32[B,H,W,3]` -> logits `f32[B,*out_size,C]` in eval mode (running BN statistics)."""
  logits = apply_fn(variables, images, train=False)["logits"]
  return resampling.resize_bilinear_align_corners(logits.astype(jnp.float32), out_size)


def eval_step(variables: PyTree, batch: dict, *, apply_fn: Callable, num_classes: int):
  """Confusion matrix `i32[C,C]` and predictions `i32[B,H,W]` of one padded batch."""
  logits = predict(apply_fn, variables, batch["image"], batch["label"].shape[1:3])
  predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  confmat = seg_metrics.confusion_matrix(predictions, batch["label"], num_classes,
                                         weights=batch["mask"][:, None, None])
  return confmat, predictions


def make_eval_step(mesh: jax.sharding.Mesh, apply_fn: Callable, num_classes: int):
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, num_classes=num_classes),
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
    'confusion_matrix'; samples has up to `num_images` host-local 'image', 'label',
    'prediction' arrays for visualisation.
  """
  confmat = None
  samples: dict = {}
  for local_batch in batches:
    batch = parallel.to_global_batch(local_batch, mesh)
    batch_confmat, predictions = step_fn(variables, batch)
    # Sync each step: back-to-back collective programs can deadlock on CPU (design.md §2.5).
    batch_confmat = np.asarray(jax.device_get(batch_confmat))
    confmat = batch_confmat if confmat is None else confmat + batch_confmat
    have = len(samples.get("image", ()))
    if have < num_images:
      take = num_images - have
      new = {"image": local_batch["image"][:take], "label": local_batch["label"][:take],
             "prediction": _process_local_rows(predictions)[:take]}
      new = {k: v[local_batch["mask"][:take]] for k, v in new.items()}
      samples = {k: np.concatenate([samples[k], v]) if k in samples else v for k, v in new.items()}
  if confmat is None:
    raise ValueError("the evaluation split produced no batches")
  results = seg_metrics.segmentation_metrics(confmat, absent_classes)
  results["confusion_matrix"] = confmat
  return results, samples


def flat_eval_scalars(results: dict, class_names: tuple[str, ...]) -> dict:
  """{'miou', 'pixel_accuracy', 'iou/<class>'} as floats for logging."""
  scalars = {"miou": results["miou"], "pixel_accuracy": results["pixel_accuracy"]}
  for name, value in zip(class_names, results["iou"]):
    scalars[f"iou/{name}"] = float(value)
  return scalars


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        allow_config_change: bool = False) -> dict:
  """Restores the latest state of `workdir` onto the devices present and evaluates the
  method's evaluation weights (`method.eval_variables`: the same weights training evaluates).

  The config must be the one the checkpoint was trained with, up to harmless fields such as
  the eval protocol (`workdir.check_config`; `allow_config_change` overrides).

  Writes `workdir/eval_<split>.json` and returns the scalar metrics.
  """
  # Imported here: the trainer imports this module for its evaluation hook.
  from input_pipeline import datasets
  from reco_jax import checkpointing, train
  from reco_jax import workdir as workdir_lib

  mesh = parallel.create_mesh()
  info, method = train.build(config)
  parallel.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
  train.prepare_data(config)
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
  step = int(jax.device_get(state.step))
  variables = method.eval_variables(state)
  logging.info("Evaluating step %d (%s) on %d devices", step, method.description, mesh.devices.size)

  batches_fn = datasets.create_eval_iterator(
      config.input, split=config.input.eval_split,
      local_batch_size=parallel.local_batch_size(config.input.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  step_fn = make_eval_step(mesh, method.apply_fn, info.num_classes)
  results, _ = run_evaluation(step_fn, variables, batches_fn(), mesh, info.num_classes,
                              config.eval_absent_classes)
  scalars = flat_eval_scalars(results, info.class_names)
  scalars["step"] = step
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"eval_{config.input.eval_split}.json")
    with open(path, "w") as f:
      json.dump({**scalars, "split": config.input.eval_split,
                 "confusion_matrix": results["confusion_matrix"].tolist()}, f, indent=1)
    logging.info("Wrote %s", path)
  return scalars
