"""The train step and the training loop.

`train_step` is a pure function of (state, batch) compiled with `jax.jit` over a 1-D
`data` mesh: the state is replicated, batches are sharded on their leading axis and the
state is donated. There are no axis names anywhere: XLA inserts the gradient all-reduce
and BatchNorm sees the global batch.
"""
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions

from input_pipeline import datasets
from reco_jax import checkpointing, evaluate, methods, models, optim, parallel, reporting
from reco_jax import augment, ema
from reco_jax.losses import reco as reco_lib
from reco_jax.losses import supervised, unsupervised
from reco_jax.train_state import TrainState, create_train_state

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RecoConfig:
  """Static ReCo hyper-parameters (config.reco)."""
  weight: float
  temperature: float
  num_queries: int
  num_negatives: int
  strong_threshold: float
  weak_threshold: float  # validity of unlabelled pixels: confidence >= delta_w
  query_sampling: str
  key_sampling: str
  easy_queries: bool


@dataclasses.dataclass(frozen=True)
class SemiConfig:
  """Static mean-teacher hyper-parameters (config.semi)."""
  mix_mode: str
  ema_decay_max: float
  strong_threshold: float
  teacher_train_mode: bool
  ema_batch_stats: bool
  partial_labels: bool
  scale_range: tuple[float, float]
  crop_size: tuple[int, int]
  quantize: bool
  color_jitter_prob: float
  blur_prob: float
  flip_prob: float
  unsup_empty_policy: str


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static hyper-parameters of the train step (bound before jit; never a ConfigDict)."""
  num_classes: int
  seed: int
  method: methods.Method
  reco: RecoConfig | None = None
  semi: SemiConfig | None = None


def step_config_from(config: ml_collections.ConfigDict, num_classes: int) -> StepConfig:
  """The static step hyper-parameters of `config`.

  Raises:
    ValueError: unknown method, or a mean-teacher setting that cannot work (one line naming
      the config keys).
  """
  method = methods.get_method(config.method)
  reco = semi = None
  if method.uses_reco:
    r = config.reco
    reco = RecoConfig(weight=float(r.weight), temperature=float(r.temperature),
                      num_queries=int(r.num_queries), num_negatives=int(r.num_negatives),
                      strong_threshold=float(r.strong_threshold),
                      weak_threshold=float(config.semi.weak_threshold),
                      query_sampling=r.query_sampling, key_sampling=r.key_sampling,
                      easy_queries=bool(r.easy_queries))
  if method.uses_teacher:
    c = config.semi
    if not c.teacher_train_mode and not c.ema_batch_stats:
      # An eval-mode teacher normalises with its running statistics, and nothing would ever
      # update them (only its train-mode forward or the EMA does): they would stay at init.
      raise ValueError(f"config semi.teacher_train_mode=False needs semi.ema_batch_stats=True "
                       f"(method={config.method!r}): otherwise the teacher's BatchNorm "
                       f"statistics are never updated")
    semi = SemiConfig(mix_mode=method.mix_mode, ema_decay_max=float(c.ema_decay_max),
                      strong_threshold=float(c.strong_threshold),
                      teacher_train_mode=bool(c.teacher_train_mode),
                      ema_batch_stats=bool(c.ema_batch_stats),
                      # Sparse labels on disk imply the partial-label step (one switch).
                      partial_labels=bool(c.partial_labels or config.input.get("partial_labels_dir")),
                      scale_range=tuple(float(x) for x in config.input.scale_range),
                      crop_size=tuple(int(x) for x in config.input.crop_size), quantize=bool(c.quantize),
                      color_jitter_prob=float(config.input.color_jitter_prob),
                      blur_prob=float(config.input.blur_prob), flip_prob=float(config.input.flip_prob),
                      unsup_empty_policy=c.unsup_empty_policy)
  return StepConfig(num_classes=num_classes, seed=config.seed, method=method, reco=reco, semi=semi)


def _apply_train(state: TrainState, params: PyTree, batch_stats: PyTree, images: jax.Array):
  """Student forward in train mode -> ((logits, rep), new batch_stats)."""
  (logits, rep), updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                          train=True, mutable=["batch_stats"])
  return (logits, rep), updates["batch_stats"]


def reco_term(key: jax.Array, rep: jax.Array, logits: jax.Array, labels: jax.Array,
              valid: jax.Array, reco: RecoConfig) -> tuple[jax.Array, jax.Array]:
  """ReCo loss on full-resolution labels/validity, prepared at the representation size.

  Args:
    rep: `f[B,h,w,D]`; logits: `f[B,h,w,C]` (the student's, for the hard-query test);
    labels: `i32[B,H,W]`; valid: `bool[B,H,W]`.
  Returns:
    (loss f32[], number of classes that produced queries i32[]).
  """
  labels_low, valid_low, probs_low = reco_lib.prepare_reco_inputs(labels, valid, logits)
  query_pix, negatives, query_classes = reco_lib.sample_reco_draws(
      key, rep, labels_low, valid_low, probs_low, strong_threshold=reco.strong_threshold,
      temperature=reco.temperature, num_queries=reco.num_queries, num_negatives=reco.num_negatives,
      query_sampling=reco.query_sampling, key_sampling=reco.key_sampling, easy_queries=reco.easy_queries)
  loss = reco_lib.reco_loss_from_draws(rep, labels_low, valid_low, query_pix, negatives, query_classes,
                                       temperature=reco.temperature)
  present = jnp.zeros((logits.shape[-1],), bool).at[jnp.where(valid_low, labels_low, 0)].max(valid_low)
  num_query_classes = jnp.where(jnp.sum(present) > 1, jnp.sum(query_classes & present), 0)
  return loss, num_query_classes


def supervised_losses(params: PyTree, state: TrainState, batch: dict, key: jax.Array,
                      cfg: StepConfig) -> tuple[jax.Array, tuple[dict, PyTree]]:
  """Loss of the supervised methods: CE (+ lambda * ReCo when the method has it)."""
  (logits, rep), batch_stats = _apply_train(state, params, state.batch_stats, batch["image"])
  sup = supervised.supervised_loss(logits, batch["label"])
  metrics = {"sup_loss": sup}
  loss = sup
  if cfg.reco is not None:
    reco, num_query_classes = reco_term(key, rep, logits, batch["label"], batch["label"] >= 0, cfg.reco)
    loss = loss + cfg.reco.weight * reco
    metrics.update(reco_loss=reco, reco_query_classes=num_query_classes.astype(jnp.float32))
  metrics["loss"] = loss
  return loss, (metrics, batch_stats)


# train_semisup_partial.py hard-codes this confidence threshold for the labelled images'
# own predictions (it does not use --strong_threshold).
PARTIAL_LABEL_CONFIDENCE = 0.97


def partial_labeled_reco_targets(logits_l: jax.Array, sparse_labels: jax.Array
                                 ) -> tuple[jax.Array, jax.Array]:
  """ReCo labels and validity of the labelled images in partial-label mode (reco_spec §1.5).

  The student's own full-resolution prediction, with the sparse ground truth substituted
  where it exists; valid where labelled or where the student's confidence is >= 0.97.

  Args:
    logits_l: student logits `f[B,h,w,C]` of the labelled batch (no gradient flows).
    sparse_labels: `i32[B,H,W]`, -1 where unlabelled.
  Returns:
    `(labels i32[B,H,W], valid bool[B,H,W])`.
  """
  logits = supervised.upsample_logits(jax.lax.stop_gradient(logits_l), sparse_labels.shape[1:3])
  probs = jax.nn.softmax(logits, axis=-1)
  labelled = sparse_labels >= 0
  labels = jnp.where(labelled, sparse_labels, jnp.argmax(probs, axis=-1).astype(jnp.int32))
  return labels, labelled | (jnp.max(probs, axis=-1) >= PARTIAL_LABEL_CONFIDENCE)


def semi_supervised_losses(params: PyTree, state: TrainState, labeled: dict, unlabeled: dict,
                           key: jax.Array, cfg: StepConfig) -> tuple[jax.Array, tuple[dict, PyTree]]:
  """sup + unsup (+ ReCo) of the mean-teacher methods (train_semisup.py steps 7-9).

  The labelled and the augmented unlabelled batch go through the student in two separate
  forward calls, so BatchNorm statistics are per sub-batch as in the official code.
  """
  semi = cfg.semi
  (logits_l, rep_l), batch_stats = _apply_train(state, params, state.batch_stats, labeled["image"])
  (logits_u, rep_u), batch_stats = _apply_train(state, params, batch_stats, unlabeled["image"])
  sup = supervised.supervised_loss(logits_l, labeled["label"])
  unsup = unsupervised.unsupervised_loss(logits_u, unlabeled["label"], unlabeled["confidence"],
                                         semi.strong_threshold, empty_policy=semi.unsup_empty_policy)
  metrics = {"sup_loss": sup, "unsup_loss": unsup}
  loss = sup + unsup
  if cfg.reco is not None:
    # reco_spec §1.5: labelled pixels are valid where labelled, pseudo-labelled ones where the
    # (augmented, quantised) teacher confidence is >= delta_w; both at full resolution here,
    # brought to the representation resolution inside `reco_term`.
    if semi.partial_labels:
      labels_l, valid_l = partial_labeled_reco_targets(logits_l, labeled["label"])
    else:
      labels_l, valid_l = labeled["label"], labeled["label"] >= 0
    # Cut-out and padded pixels have confidence 0 (and label -1), so they are never valid.
    valid_u = (unlabeled["confidence"] >= cfg.reco.weak_threshold) & (unlabeled["label"] >= 0)
    reco, num_query_classes = reco_term(
        key, jnp.concatenate([rep_l, rep_u]), jnp.concatenate([logits_l, logits_u]),
        jnp.concatenate([labels_l, unlabeled["label"]]), jnp.concatenate([valid_l, valid_u]),
        cfg.reco)
    loss = loss + cfg.reco.weight * reco
    metrics.update(reco_loss=reco, reco_query_classes=num_query_classes.astype(jnp.float32),
                   reco_unlabeled_valid_fraction=jnp.mean(valid_u.astype(jnp.float32)))
  metrics["loss"] = loss
  return loss, (metrics, batch_stats)


def pseudo_label(state: TrainState, unlabeled: dict, key: jax.Array, cfg: StepConfig):
  """Teacher pseudo-labels, then the official strong augmentation (steps 3-6).

  Returns:
    (augmented unlabelled batch {'image', 'label', 'confidence'}, new teacher batch_stats).
  """
  semi = cfg.semi
  variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  images = unlabeled["image"]
  if semi.teacher_train_mode:
    # Official: the teacher stays in train() mode, so BN uses batch statistics and its
    # running statistics are updated by its own forward pass.
    (logits, _), updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
    teacher_batch_stats = updates["batch_stats"]
  else:
    logits, _ = state.apply_fn(variables, images, train=False)
    teacher_batch_stats = state.ema_batch_stats
  probs = jax.nn.softmax(supervised.upsample_logits(logits, images.shape[1:3]), axis=-1)
  probs = jax.lax.stop_gradient(probs)
  confidence, labels = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)
  if semi.partial_labels:
    # train_semisup_partial.py: the sparse labels override the teacher, with confidence 1.
    sparse = unlabeled["label"]
    labels = jnp.where(sparse >= 0, sparse, labels)
    confidence = jnp.where(sparse >= 0, 1.0, confidence)
  # The official uint8 round trips (confidence floor(255 p)/255, reco_spec §0.9) happen in
  # strong_augment's first stage when semi.quantize is on, before any threshold is applied.
  images, labels, confidence = augment.strong_augment(
      key, images, labels, confidence, mode=semi.mix_mode, scale_range=semi.scale_range,
      crop_size=semi.crop_size, num_classes=cfg.num_classes, quantize=semi.quantize,
      jitter_prob=semi.color_jitter_prob, blur_prob=semi.blur_prob, flip_prob=semi.flip_prob)
  return {"image": images, "label": labels, "confidence": confidence}, teacher_batch_stats


def train_step(state: TrainState, batch: dict, *, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One optimisation step.

  Args:
    state: replicated train state.
    batch: {'labeled': {'image': f32[B,H,W,3], 'label': i32[B,H,W]}} and, for the
      mean-teacher methods, 'unlabeled' {'image': f32[Bu,H,W,3], 'label': i32[Bu,H,W]}
      (labels of the unlabelled stream are only read in partial-label mode); sharded on `data`.
    cfg: static hyper-parameters.
  Returns:
    (new state, metrics): metrics are replicated `f32[]` scalars: `loss`, `sup_loss`,
    `grad_norm`; with ReCo `reco_loss` and `reco_query_classes` (classes that produced
    queries); with a teacher `unsup_loss`, `pseudo_label_confident_fraction` (augmented
    pixels with confidence >= delta_s), `ema_decay` and, with ReCo,
    `reco_unlabeled_valid_fraction` (confidence >= delta_w).
  """
  key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  key_augment, key_reco = jax.random.split(key)
  if cfg.semi is None:
    grad_fn = jax.value_and_grad(supervised_losses, has_aux=True)
    (_, (metrics, new_batch_stats)), grads = grad_fn(state.params, state, batch["labeled"], key_reco, cfg)
  else:
    unlabeled, teacher_batch_stats = pseudo_label(state, batch["unlabeled"], key_augment, cfg)
    grad_fn = jax.value_and_grad(semi_supervised_losses, has_aux=True)
    (_, (metrics, new_batch_stats)), grads = grad_fn(state.params, state, batch["labeled"], unlabeled,
                                                     key_reco, cfg)
    metrics["pseudo_label_confident_fraction"] = jnp.mean(
        (unlabeled["confidence"] >= cfg.semi.strong_threshold).astype(jnp.float32))
  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = jax.tree.map(jnp.add, state.params, updates)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_batch_stats,
                            opt_state=new_opt_state)
  if cfg.semi is not None:
    # EMA of the parameters; t = number of previous updates = state.step. The teacher's BN
    # statistics come from its own train-mode pass (official), or are the EMA of the
    # student's (semi.ema_batch_stats).
    ema_params = ema.ema_update(state.ema_params, new_params, state.step, cfg.semi.ema_decay_max)
    if cfg.semi.ema_batch_stats:
      teacher_batch_stats = ema.ema_update(state.ema_batch_stats, new_batch_stats, state.step,
                                           cfg.semi.ema_decay_max)
    new_state = new_state.replace(ema_params=ema_params, ema_batch_stats=teacher_batch_stats)
    metrics["ema_decay"] = ema.ema_decay(state.step, cfg.semi.ema_decay_max)
  return new_state, metrics


def make_train_step(mesh: jax.sharding.Mesh, cfg: StepConfig):
  """`train_step` compiled with the state replicated, the batch sharded and the state donated."""
  return jax.jit(functools.partial(train_step, cfg=cfg),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=(0,))


def create_state(config: ml_collections.ConfigDict, model: nn.Module,
                 mesh: jax.sharding.Mesh) -> TrainState:
  """Creates the train state (with the teacher for mean-teacher methods) on its replicated
  sharding; `model` is any flax module returning `(logits, rep)` (models.create_model)."""
  schedule = optim.create_lr_schedule(config.optim, config.num_train_steps)
  tx = optim.create_optimizer(config.optim, schedule)
  method = methods.get_method(config.method)
  image_shape = (1, *config.input.crop_size, 3)
  init = functools.partial(create_train_state, model=model, tx=tx, image_shape=image_shape,
                           with_teacher=method.uses_teacher)
  # An rbg key for the initialisers: XLA:CPU compiles the threefry version of a ResNet init
  # one to two orders of magnitude more slowly; the distributions are the same.
  key = jax.random.key(config.seed, impl="rbg")
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(key)


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(metrics: dict, step: int, manager) -> None:
  loss = metrics["loss"]
  if not np.isfinite(loss):
    latest = manager.latest_step()
    where = (f"the last good checkpoint is step {latest} in {manager.directory}" if latest is not None
             else "no checkpoint had been written yet")
    raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step}; training stopped, {where}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates.

  Returns:
    The last evaluation's scalar metrics (with 'best_miou').
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh()
  method = methods.get_method(config.method)
  parallel.check_batch_divisible(config.input.batch_size, mesh, "input.batch_size")
  parallel.check_batch_divisible(config.input.eval_batch_size, mesh, "input.eval_batch_size")
  if method.uses_teacher:
    if config.input.unlabeled_batch_size <= 0:
      raise ValueError(f"config input.unlabeled_batch_size={config.input.unlabeled_batch_size} "
                       f"must be positive for the mean-teacher method {config.method!r}")
    parallel.check_batch_divisible(config.input.unlabeled_batch_size, mesh,
                                   "input.unlabeled_batch_size")
    if config.semi.partial_labels and not config.input.get("partial_labels_dir"):
      raise ValueError("config semi.partial_labels=True needs input.partial_labels_dir (the "
                       "sparse label maps written by `python -m input_pipeline.partial_labels`)")
  info = datasets.get_dataset_info(config.input)
  model = models.create_model(config.model, info.num_classes)
  cfg = step_config_from(config, info.num_classes)

  state = create_state(config, model, mesh)
  manager = checkpointing.create_resume_manager(workdir, config.max_checkpoints_to_keep)
  if manager.latest_step() is not None:
    abstract = checkpointing.abstract_like(state, parallel.replicated(mesh))
    state = checkpointing.restore_state(manager, abstract)
    logging.info("Resumed from step %d of %s", int(state.step), manager.directory)
  start_step = int(jax.device_get(state.step))
  best_manager = checkpointing.create_best_manager(workdir) if config.keep_best_checkpoint else None

  logger = reporting.MetricsLogger(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    if start_step == 0:
      logger.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
      logging.info("%s", parameter_overview.get_parameter_overview(state.params))

  batch_sizes = {"labeled": config.input.batch_size}
  if method.uses_teacher:
    batch_sizes["unlabeled"] = config.input.unlabeled_batch_size
  train_iters = {
      stream: datasets.create_train_iterator(
          config.input, seed=config.seed, local_batch_size=parallel.local_batch_size(size),
          process_index=jax.process_index(), process_count=jax.process_count(),
          labeled=stream == "labeled", start_step=start_step, workdir=workdir)
      for stream, size in batch_sizes.items()}
  eval_batches, _ = datasets.create_eval_iterator(
      config.input, split=config.input.eval_split,
      local_batch_size=parallel.local_batch_size(config.input.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  p_train_step = make_train_step(mesh, cfg)
  p_eval_step = evaluate.make_eval_step(mesh, model.apply, info.num_classes)

  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=logger.writer,
                                           every_steps=config.log_every_steps)
  hooks = [report] if jax.process_index() == 0 else []
  window: list[dict] = []
  last_eval: dict = {}
  best_miou = _previous_best(best_manager)
  num_steps = config.num_train_steps
  lr_schedule = optim.create_lr_schedule(config.optim, num_steps)
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
    if step % config.log_every_steps == 0 or step == num_steps:
      logger.write_scalars(step, "train", {k: np.mean([m[k] for m in window]) for k in window[0]})
      window = []
    if step % config.eval_every_steps == 0 or step == num_steps:
      with report.timed("eval"):
        variables = state.eval_variables(use_teacher=config.eval_use_teacher)
        results, samples = evaluate.run_evaluation(
            p_eval_step, variables, eval_batches(), mesh, info.num_classes,
            config.eval_absent_classes, config.num_eval_images_to_log)
      last_eval = evaluate.flat_eval_scalars(results, info.class_names)
      if best_manager is not None and np.isfinite(last_eval["miou"]) and last_eval["miou"] > best_miou:
        checkpointing.save_best(best_manager, step, variables, {"miou": last_eval["miou"], "step": step})
      if np.isfinite(last_eval["miou"]):
        best_miou = max(best_miou, last_eval["miou"])
      last_eval["best_miou"] = best_miou
      logger.write_scalars(step, "eval", last_eval)
      if samples:
        logger.write_images(step, _visualisation(samples, info.palette))
      logging.info("step %d: eval mIoU %.4f (best %.4f)", step, last_eval["miou"], best_miou)
    if step % config.checkpoint_every_steps == 0 or step == num_steps:
      with report.timed("checkpoint"):
        checkpointing.save_state(manager, step, state, config)
  manager.wait_until_finished()
  if best_manager is not None:
    best_manager.wait_until_finished()
  logger.flush()
  logger.close()
  return last_eval


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


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
