"""The generic train step, state creation and the training loop.

`train_step` is a pure function of (state, batch) compiled with `jax.jit` over a 1-D
`data` mesh: the state is replicated, batches are sharded on their leading axis and the
state is donated. There are no axis names anywhere: XLA inserts the gradient all-reduce
and BatchNorm sees the global batch.

Nothing here knows which method trains: the method (reco_jax/methods) supplies the input
streams, its extra state, the loss, what happens after the update and the weights to
evaluate. The step is `value_and_grad(method.loss)` -> optimiser update ->
`method.after_update` (whose metrics, if any, join the step's).

Two loop options of Alonso et al.'s trainSSL.py, off by default and method-agnostic:
`reload_best_patience_steps` puts the best checkpoint's weights back into the state
(`method.load_eval_variables`) when the best mIoU has not improved for that many steps, and
`bn_reestimation_steps` re-estimates the evaluated model's BatchNorm statistics at the end
and keeps the result in the best checkpoint if it evaluates better.
"""
import functools
import json
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from input_pipeline import datasets
from reco_jax import checkpointing, console, evaluate, methods, models, optim, parallel, reporting
from reco_jax import workdir as workdir_lib
from reco_jax.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from reco_jax.methods import base as methods_base
from reco_jax.tools import import_weights
from reco_jax.train_state import TrainState

PyTree = Any


def train_step(state: TrainState, batch: dict, *, method: methods.Method,
               seed: int) -> tuple[TrainState, dict]:
  """One optimisation step of any method.

  Args:
    state: replicated train state.
    batch: {stream name: {'image': f32[B,H,W,3], 'label': i32[B,H,W]}} for the streams of
      `method.streams()`, sharded on `data`.
    method: the method (static: closed over by the compiled step).
    seed: the run's seed; the step's key is `fold_in(key(seed), state.step)`.
  Returns:
    (new state, metrics): replicated `f32[]` scalars, the method's (`loss` among them) and
    `grad_norm`.
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  (_, (metrics, aux)), grads = grad_fn(state.params, state, batch, key)
  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = jax.tree.map(jnp.add, state.params, updates)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=aux["batch_stats"],
                            opt_state=new_opt_state)
  new_state, update_metrics = method.after_update_and_metrics(new_state, aux, key)
  return new_state, {**metrics, **update_metrics}


def make_train_step(mesh: jax.sharding.Mesh, method: methods.Method, seed: int):
  """`train_step` compiled with the state replicated, the batch sharded and the state donated."""
  return jax.jit(functools.partial(train_step, method=method, seed=seed),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=(0,))


def bn_update_step(variables: PyTree, images: jax.Array, key: jax.Array, *,
                   apply_fn) -> PyTree:
  """One train-mode forward of `variables` ({'params', 'batch_stats'}) on `images`
  `f32[B,H,W,3]`, no gradient: the new BatchNorm running statistics (moved with each
  module's momentum, as a training forward moves them). `key` feeds a dropout the model may
  run in train mode."""
  _, updates = apply_fn(variables, images, train=True, mutable=["batch_stats"],
                        rngs={"dropout": key})
  return updates.get("batch_stats", {})


def make_bn_update_step(mesh: jax.sharding.Mesh, apply_fn):
  """`bn_update_step` compiled with the variables and key replicated, the images sharded."""
  return jax.jit(functools.partial(bn_update_step, apply_fn=apply_fn),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh),
                               parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))


def bn_stream(method: methods.Method) -> str:
  """The stream whose images re-estimate the BatchNorm statistics: the unlabelled one when
  the method reads it (official: the unlabelled loader), else the labelled one."""
  streams = method.streams()
  return methods_base.UNLABELED if methods_base.UNLABELED in streams else methods_base.LABELED


def should_reload_best(step: int, best_step: int | None, last_reload_step: int | None,
                       patience: int) -> bool:
  """Whether the evaluation of `step` reloads the best checkpoint: the best mIoU has not
  improved for at least `patience` steps since the best checkpoint's step `best_step`, nor
  since the last reload (official: the counter restarts after a reload). Off for
  `patience` 0 and before any best checkpoint exists."""
  if patience <= 0 or best_step is None:
    return False
  since = best_step if last_reload_step is None else max(best_step, last_reload_step)
  return step - since >= patience


def build(config: ml_collections.ConfigDict) -> tuple[datasets.DatasetInfo, methods.Method]:
  """The dataset info and the method of `config` (reads no data); `method.model` is the student."""
  info = datasets.get_dataset_info(config.input)
  model = models.create_model(config.model, info.num_classes)
  return info, methods.get_method(config, num_classes=info.num_classes, model=model)


def create_state(config: ml_collections.ConfigDict, method: methods.Method,
                 mesh: jax.sharding.Mesh, pretrained: PyTree | None = None) -> TrainState:
  """Creates the student (`method.model`), its optimiser state and the method's extra state,
  replicated.

  `pretrained`: {"params", "batch_stats"} trees of the backbone
  (`import_weights.load_for_config(config.model)`), placed into the student's `backbone`
  before the method's extra state is made from the student, so that the mean teacher starts
  as a copy of the pretrained student. None: the random init. The trainer passes it only
  for a fresh run (a resumed run restores its checkpoint over this state anyway).
  """
  model = method.model
  schedule = optim.create_lr_schedule(config.optim, config.num_train_steps)
  tx = optim.create_optimizer(config.optim, schedule)
  image_shape = (1, *config.input.crop_size, 3)

  def init(key, pretrained):
    variables = model.init(key, jnp.zeros(image_shape, jnp.float32), train=False)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if pretrained is not None:
      variables = import_weights.place_backbone(variables, pretrained, config.model.pretrained)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                      extra=method.init_extra(jax.random.fold_in(key, 1), variables),
                      apply_fn=model.apply, tx=tx)

  # An rbg key for the initialisers: XLA:CPU compiles the threefry version of a ResNet init
  # one to two orders of magnitude more slowly; the distributions are the same.
  key = jax.random.key(config.seed, impl="rbg")
  # The weights are an argument, not constants folded into the compiled init.
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(key, pretrained)


def stream_batch_sizes(config: ml_collections.ConfigDict, method: methods.Method,
                       mesh: jax.sharding.Mesh) -> dict[str, int]:
  """{stream: global batch size} of the streams the method reads, checked one by one.

  Raises:
    ValueError: one line naming the config field (missing, not positive, not divisible).
  """
  sizes = {}
  for name in method.streams():
    if name not in config.input.get("streams", {}):
      raise ValueError(f"method {config.method!r} reads input stream {name!r}: set "
                       f"config.input.streams.{name}.batch_size")
    size = config.input.streams[name].batch_size
    if not isinstance(size, int) or size <= 0:
      raise ValueError(f"config input.streams.{name}.batch_size={size!r} must be a positive int "
                       f"(method {config.method!r} reads stream {name!r})")
    parallel.check_batch_divisible(size, mesh, f"input.streams.{name}.batch_size")
    sizes[name] = size
  return sizes


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Process 0 prepares the dataset if needed; every process waits for it. Then checks that
  `input.eval_size` holds the evaluation images (before anything compiles, not at the first
  evaluation)."""
  datasets.prepare_for_run(
      config.input, process_index=jax.process_index(),
      barrier=lambda: multihost_utils.sync_global_devices("reco_jax: dataset prepared"))
  split = config.input.eval_split
  largest = datasets.max_image_size(config.input, split)
  eval_size = tuple(int(x) for x in config.input.eval_size)
  if largest is not None and (largest[0] > eval_size[0] or largest[1] > eval_size[1]):
    raise ConfigError(f"config input.eval_size={eval_size} is smaller than the largest "
                      f"{config.input.dataset} {split} image ({largest[0]}x{largest[1]}); set "
                      f"--config.input.eval_size='({max(largest[0], eval_size[0])}, "
                      f"{max(largest[1], eval_size[1])})'")


# Config fields that must be positive ints (checked before anything compiles: a zero fails
# later with a ZeroDivisionError or a TF message that names no field).
POSITIVE_FIELDS = ("num_train_steps", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps", "input.eval_batch_size")


def check_loop_fields(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ConfigError for a loop setting that is not a positive int."""
  for name in POSITIVE_FIELDS:
    value = functools.reduce(lambda node, key: node[key], name.split("."), config)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config {name}={value!r} must be a positive int")


def check_best_fields(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for the best-checkpoint options: non-negative ints (0 = off), and
  on only with keep_best_checkpoint=True (the reload reads the best checkpoint, the
  re-estimated statistics are kept in it)."""
  for name in ("reload_best_patience_steps", "bn_reestimation_steps"):
    value = config.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"config {name}={value!r} must be a non-negative int (0 = off)")
    if value and not config.keep_best_checkpoint:
      raise ConfigError(f"config {name}={value} needs keep_best_checkpoint=True (got "
                        f"{config.keep_best_checkpoint!r}): it works on the best checkpoint")


def _check_finite(metrics: dict, step: int, manager) -> None:
  loss = metrics["loss"]
  if not np.isfinite(loss):
    # Name only a checkpoint that exists: a save of an earlier step may still be in flight.
    manager.wait_until_finished()
    latest = manager.latest_step()
    where = (f"the last good checkpoint is step {latest} in {manager.directory}" if latest is not None
             else "no checkpoint had been written yet")
    raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step}; training stopped, {where}")


def _window_means(window: list[dict]) -> dict:
  """Each metric's mean over the logged steps. NaN steps are left out (a diagnostic ratio can
  be undefined on one step, reco_jax/diagnostics.py); all-NaN stays NaN (null in the log)."""
  means = {}
  for key in window[0]:
    values = np.asarray([m[key] for m in window], np.float64)
    finite = ~np.isnan(values)
    means[key] = float(values[finite].mean()) if finite.any() else float("nan")
  return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  Nothing is lost: the workdir is locked for this run (a second run in it stops with one
  line); a resumed run must have the workdir's config (`workdir.check_config`; harmless
  fields may differ, `allow_config_change` overrides); whatever ends the run (an exception,
  a non-finite loss, SIGTERM) first finishes the checkpoint being written, and SIGTERM saves
  the current step before stopping (`TrainingInterrupted`).

  Returns:
    The last evaluation's scalar metrics (with 'best_miou').
  """
  check_loop_fields(config)
  check_best_fields(config)
  os.makedirs(workdir, exist_ok=True)
  in_flight = []  # checkpoint managers whose background saves must finish before we leave
  with workdir_lib.WorkdirLock(workdir, jax.process_index()), _StopOnSigterm() as stop:
    try:
      return _train_and_evaluate(config, workdir, allow_config_change, in_flight, stop)
    finally:
      for manager in in_flight:
        manager.wait_until_finished()


class _StopOnSigterm:
  """Within the context, SIGTERM (schedulers, TPU maintenance) only sets `requested`; the
  loop then saves the current step and stops. Outside the main thread it does nothing."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "_StopOnSigterm":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving the current step, then stopping")
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _save_and_stop(manager, step: int, state: TrainState, config, loop: dict, saved: bool) -> None:
  if not saved:
    checkpointing.save_state(manager, step, state, config, loop)
  manager.wait_until_finished()
  raise TrainingInterrupted(f"stopped by SIGTERM after step {step}; checkpoint {step} is saved "
                            f"in {manager.directory}; the same command resumes from it")


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
                        in_flight: list, stop: _StopOnSigterm) -> dict:
  mesh = parallel.create_mesh()
  info, method = build(config)
  batch_sizes = stream_batch_sizes(config, method, mesh)
  parallel.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
  prepare_data(config)

  manager = checkpointing.create_resume_manager(workdir, config.max_checkpoints_to_keep)
  in_flight.append(manager)
  latest = manager.latest_step()
  # Pretrained weights seed a fresh run only: a resume never reads them (the file may have
  # moved; the checkpoint holds the weights).
  pretrained = import_weights.load_for_config(config.model) if latest is None else None
  state = create_state(config, method, mesh, pretrained)
  if latest is not None:
    # Before the restore: a changed model would otherwise fail in orbax with a shape error,
    # or (shape-compatible changes) silently continue another model.
    workdir_lib.check_config(config.to_dict(), checkpointing.restore_config(manager, latest),
                             checkpoint_step=latest, allow_changes=allow_config_change,
                             what=f"workdir {workdir}")
    abstract = checkpointing.abstract_like(state, parallel.replicated(mesh))
    state = checkpointing.restore_state(manager, abstract)
    logging.info("Resumed from step %d of %s", int(state.step), manager.directory)
  start_step = int(jax.device_get(state.step))
  # The loop's decisions outside the state (best-checkpoint reloads), saved with each
  # checkpoint so that a resumed run reloads when an uninterrupted one would.
  loop = {"reloads": 0, "last_reload_step": None}
  if latest is not None:
    loop.update(checkpointing.restore_loop(manager, latest))
  best_manager = checkpointing.create_best_manager(workdir) if config.keep_best_checkpoint else None
  if best_manager is not None:
    in_flight.append(best_manager)

  if jax.process_index() == 0:
    dropped = workdir_lib.truncate_metrics(workdir, start_step)
    if dropped:
      logging.info("Removed %d metrics.jsonl lines after step %d (they are replayed)", dropped, start_step)
  logger = reporting.MetricsLogger(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    if start_step == 0:
      logger.write_hparams({k: v for k, v in workdir_lib.flatten(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
    # The table goes to a file (and the log at --verbosity=0), one line to the console.
    table, num_params, table_path = reporting.write_parameter_overview(workdir, state.params)
    logging.info("%s", table)
    console.line(console.parameters_line(num_params, table_path))
  logging.info("Method %s: %s; streams %s", config.method, method.description, batch_sizes)

  streams = method.streams()
  train_iters = {
      name: datasets.create_train_iterator(
          config.input, stream_name=name, stream=streams[name], seed=config.seed,
          local_batch_size=parallel.local_batch_size(size), process_index=jax.process_index(),
          process_count=jax.process_count(), start_step=start_step, workdir=workdir)
      for name, size in batch_sizes.items()}
  eval_batches = datasets.create_eval_iterator(
      config.input, split=config.input.eval_split,
      local_batch_size=parallel.local_batch_size(config.input.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  p_train_step = make_train_step(mesh, method, config.seed)
  p_eval_step = evaluate.make_eval_step(mesh, method.apply_fn, info.num_classes,
                                        boundary_widths=config.eval.boundary_widths,
                                        protocol=evaluate.protocol_from_config(config))

  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=logger.writer,
                                           every_steps=config.log_every_steps)
  hooks = [report] if jax.process_index() == 0 else []
  window: list[dict] = []
  last_eval: dict = {}
  best_miou = _previous_best(best_manager)
  best_step = best_manager.best_step() if best_manager is not None else None
  patience = config.get("reload_best_patience_steps", 0)
  bn_steps = config.get("bn_reestimation_steps", 0)

  def run_eval(variables: PyTree) -> tuple[dict, dict]:
    results, samples = evaluate.run_evaluation(
        p_eval_step, variables, eval_batches(), mesh, info.num_classes,
        config.eval_absent_classes, config.num_eval_images_to_log)
    return evaluate.flat_eval_scalars(results, info.class_names), samples
  num_steps = config.num_train_steps
  lr_schedule = optim.create_lr_schedule(config.optim, num_steps)
  progress = console.TrainProgress(num_steps, start_step, config.log_every_steps)
  for step in range(start_step + 1, num_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = parallel.to_global_batch({k: next(it) for k, it in train_iters.items()}, mesh)
      state, metrics = p_train_step(state, batch)
    # Fetching the step's scalars syncs every step: it feeds the NaN guard and keeps
    # back-to-back collective programs from dead-locking on CPU (design.md §2.5).
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(metrics, step, manager)
    metrics["lr"] = float(lr_schedule(step - 1))  # the LR this step used
    window.append(metrics)
    for hook in hooks:
      hook(step)
    progress.step(step, metrics["loss"])
    if step % config.log_every_steps == 0 or step == num_steps:
      logger.write_scalars(step, "train", _window_means(window))
      window = []
    if step % config.eval_every_steps == 0 or step == num_steps:
      with report.timed("eval"):
        variables = method.eval_variables(state)
        last_eval, samples = run_eval(variables)
      if best_manager is not None and np.isfinite(last_eval["miou"]) and last_eval["miou"] > best_miou:
        checkpointing.save_best(best_manager, step, variables, {"miou": last_eval["miou"], "step": step})
        best_step = step
      if np.isfinite(last_eval["miou"]):
        best_miou = max(best_miou, last_eval["miou"])
      if step == num_steps and bn_steps:
        # Official: re-estimate, evaluate, keep only a better result (the training state
        # and its checkpoint keep the trained statistics).
        with report.timed("bn_reestimation"):
          bn_miou, bn_variables = _reestimate_batch_norm(
              variables, train_iters[bn_stream(method)], make_bn_update_step(mesh, method.apply_fn),
              run_eval, mesh, bn_steps, jax.random.fold_in(jax.random.key(config.seed), num_steps))
        last_eval["bn_reestimated_miou"] = bn_miou
        kept = bool(np.isfinite(bn_miou) and bn_miou > best_miou)
        if kept:
          checkpointing.save_best(best_manager, step, bn_variables,
                                  {"miou": bn_miou, "step": step, "bn_reestimated": True})
          best_miou, best_step = bn_miou, step
        logging.info("step %d: BatchNorm statistics re-estimated over %d batches: mIoU %.4f (%s)",
                     step, bn_steps, bn_miou, "kept as the best" if kept else "not better: discarded")
      last_eval["best_miou"] = best_miou
      # No reload after the last evaluation: nothing trains afterwards.
      if step < num_steps and should_reload_best(step, best_step, loop["last_reload_step"], patience):
        state = method.load_eval_variables(state, checkpointing.restore_best_variables(
            best_manager, checkpointing.abstract_like(variables, parallel.replicated(mesh))))
        loop = {"reloads": loop["reloads"] + 1, "last_reload_step": step}
        logging.info("step %d: no mIoU improvement since step %d: reloaded the best checkpoint "
                     "(mIoU %.4f; reload %d)", step, best_step, best_miou, loop["reloads"])
      if patience:
        last_eval["reloads"] = loop["reloads"]
      logger.write_scalars(step, "eval", last_eval)
      if samples:
        logger.write_images(step, _visualisation(samples, info.palette))
      logging.info("step %d: eval mIoU %.4f (best %.4f)", step, last_eval["miou"], best_miou)
      progress.evaluation(step, last_eval["miou"], best_miou, last_eval["pixel_accuracy"])
    saved = step % config.checkpoint_every_steps == 0 or step == num_steps
    if saved:
      with report.timed("checkpoint"):
        checkpointing.save_state(manager, step, state, config, loop)
    if stop.agreed() and step < num_steps:
      progress.close()
      _save_and_stop(manager, step, state, config, loop, saved)
  progress.close()
  manager.wait_until_finished()
  if best_manager is not None:
    best_manager.wait_until_finished()
  logger.flush()
  logger.close()
  return last_eval


def _reestimate_batch_norm(variables: PyTree, batches, bn_step, run_eval, mesh: jax.sharding.Mesh,
                           num_batches: int, key: jax.Array) -> tuple[float, PyTree]:
  """`num_batches` train-mode forwards of `variables` over `batches` (a training stream's
  iterator of host-local {'image', ...}), then one evaluation.

  Returns:
    (mIoU, variables): the parameters are the given arrays, only 'batch_stats' is new.
  """
  batch_stats = variables["batch_stats"]
  for i in range(num_batches):
    images = parallel.to_global_batch(next(batches)["image"], mesh)
    batch_stats = bn_step({"params": variables["params"], "batch_stats": batch_stats}, images,
                          jax.random.fold_in(key, i))
    # Sync each pass: back-to-back collective programs can dead-lock on CPU (design.md §2.5).
    jax.block_until_ready(batch_stats)
  reestimated = {"params": variables["params"], "batch_stats": batch_stats}
  scalars, _ = run_eval(reestimated)
  return float(scalars["miou"]), reestimated


def _previous_best(best_manager) -> float:
  """Best mIoU recorded by an earlier (interrupted) run of this workdir."""
  if best_manager is None or best_manager.best_step() is None:
    return -np.inf
  path = os.path.join(best_manager.directory, str(best_manager.best_step()), "metrics", "metrics")
  try:
    with open(path) as f:
      return float(json.load(f)["miou"])
  except (OSError, KeyError, ValueError):
    return -np.inf


def _visualisation(samples: dict, palette: np.ndarray) -> dict:
  """Image | ground truth | prediction, side by side, one row per sample."""
  rows = np.concatenate([reporting.denormalize(samples["image"]),
                         reporting.colorize(samples["label"], palette),
                         reporting.colorize(samples["prediction"], palette)], axis=2)
  return {"eval/predictions": rows}
