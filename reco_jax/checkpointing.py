"""Orbax checkpoints: a resume manager (by recency) and an optional best-model manager.

Two managers because `best_fn` + `max_to_keep` deletes by metric, not by recency: with a
single manager a pre-empted run could resume from an old "best" step (design.md §2.13).
Orbax writes each step to a temporary directory and renames it when complete, so a
checkpoint is either whole or absent.

A resume checkpoint holds the train state, the config and the loop's own bookkeeping
(`loop`: what the trainer decides outside the state, e.g. the best-checkpoint reloads), so
that a resumed run decides as an uninterrupted one would.
"""
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

PyTree = Any
RESUME_DIR = "checkpoints"
BEST_DIR = "best"


def create_resume_manager(workdir: str, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """Manager for `workdir/checkpoints` with items `state`, `config` and `loop` (checkpoints
  written before `loop` existed lack it: `restore_loop` answers {})."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, RESUME_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only),
      item_names=("state", "config", "loop"))


def create_best_manager(workdir: str) -> ocp.CheckpointManager:
  """Manager for `workdir/best`: the evaluation variables with the best mIoU so far."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, BEST_DIR)),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["miou"],
                                           best_mode="max", create=True),
      item_names=("variables", "metrics"))


def save_state(manager: ocp.CheckpointManager, step: int, state: PyTree,
               config: ml_collections.ConfigDict, loop: dict | None = None) -> None:
  """Saves `state` and `config` at `step`, with `loop` (a JSON dict) when given."""
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
  if loop is not None:
    items["loop"] = ocp.args.JsonSave(loop)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def save_best(manager: ocp.CheckpointManager, step: int, variables: PyTree, metrics: dict) -> None:
  """Saves the evaluation `variables` as step `step` of the best manager (replacing a
  checkpoint of that step: the BatchNorm re-estimation improves on the last step's)."""
  if step in manager.all_steps():
    manager.wait_until_finished()
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                              metrics=ocp.args.JsonSave(metrics)),
               metrics={"miou": metrics["miou"]}, force=True)


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """`ShapeDtypeStruct`s of `tree` carrying `sharding`: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_state(manager: ocp.CheckpointManager, abstract_state: PyTree, step: int | None = None) -> PyTree:
  """Restores the full train state (latest step by default) onto the target's shardings."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored.state


def restore_best_variables(manager: ocp.CheckpointManager, abstract_variables: PyTree) -> PyTree:
  """The evaluation variables of the best checkpoint, onto the target's shardings (waits
  for a save in flight first)."""
  manager.wait_until_finished()
  restored = manager.restore(manager.best_step(), args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(abstract_variables)))
  return restored.variables


def restore_loop(manager: ocp.CheckpointManager, step: int) -> dict:
  """The loop bookkeeping saved with checkpoint `step` ({} if it has none)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
  except (FileNotFoundError, KeyError, ValueError):
    return {}
  return dict(restored.loop or {})


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The config dict saved with checkpoint `step` (None if it has none)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except (FileNotFoundError, KeyError, ValueError):
    return None
  return restored.config
