"""Mean teacher with CutOut / CutMix / ClassMix (official `train_semisup.py`, reco_spec §1, §5).

Per step (train_semisup.py steps 3-9): the EMA teacher pseudo-labels the unlabelled batch
(in train mode by default, as the official), the pseudo-labelled batch is strongly augmented
on device (rescale-crop -> mix -> photometric, augment.strong_augment), the student sees the
labelled and the augmented unlabelled batch in two forward passes (BatchNorm statistics per
sub-batch, as the official), and the loss is CE + the confidence-masked unsupervised CE (+
auxiliary terms on labelled + confidently pseudo-labelled pixels). After the optimiser step
the teacher becomes the EMA of the student (`after_update`).

"Partial labels, full dataset" (train_semisup_partial.py): switched on by
`input.partial_labels_dir`: the sparse labels override the teacher's pseudo-labels with
confidence 1, and the labelled images' auxiliary targets are the student's own confident
predictions with the sparse labels substituted (reco_spec §1.5).

`TrainState.extra` = {'params', 'batch_stats'} of the teacher.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from input_pipeline import datasets
from reco_jax import augment, diagnostics, ema
from reco_jax.losses import supervised as supervised_lib
from reco_jax.losses import unsupervised
from reco_jax.methods import auxiliary, base

UNLABELED = base.UNLABELED
# build_data.py: BuildDataset(augmentation=False, scale_size=(1.0, 1.0)): crop/pad only; the
# strong augmentation happens on device after pseudo-labelling.
UNLABELED_STREAM = datasets.Stream(subset="unlabeled", augment=False)
MIX_MODES = ("cutout", "cutmix", "classmix")
# train_semisup_partial.py hard-codes this confidence threshold for the labelled images'
# own predictions (it does not use --strong_threshold).
PARTIAL_LABEL_CONFIDENCE = 0.97


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static mean-teacher hyper-parameters (config.mean_teacher and the strong augmentation)."""
  num_classes: int
  mix: str
  ema_decay_max: float
  strong_threshold: float
  weak_threshold: float  # validity of pseudo-labelled pixels for the auxiliary terms
  teacher_train_mode: bool
  ema_batch_stats: bool
  partial_labels: bool
  eval_use_teacher: bool
  scale_range: tuple[float, float]
  crop_size: tuple[int, int]
  quantize: bool
  color_jitter_prob: float
  blur_prob: float
  flip_prob: float
  unsup_empty_policy: str
  # config.diagnostics: pseudo_* metrics against the unlabelled ground truth (no effect on training).
  diag: diagnostics.Settings = diagnostics.Settings()


def settings_from(config: ml_collections.ConfigDict, num_classes: int) -> Settings:
  """Static settings of `config`, with one-line errors for settings that cannot work."""
  c = config.mean_teacher
  base.check_choice(config, "mean_teacher.mix", MIX_MODES)
  if not c.teacher_train_mode and not c.ema_batch_stats:
    # An eval-mode teacher normalises with its running statistics, and nothing would ever
    # update them (only its train-mode forward or the EMA does): they would stay at init.
    raise ValueError("config mean_teacher.teacher_train_mode=False needs "
                     "mean_teacher.ema_batch_stats=True: otherwise the teacher's BatchNorm "
                     "statistics are never updated")
  partial_dir = config.input.get("partial_labels_dir")
  if c.partial_labels and not partial_dir:
    raise ValueError("config mean_teacher.partial_labels=True needs input.partial_labels_dir (the "
                     "sparse label maps written by `python -m input_pipeline.partial_labels`)")
  return Settings(
      num_classes=num_classes, mix=c.mix, ema_decay_max=float(c.ema_decay_max),
      strong_threshold=float(c.strong_threshold), weak_threshold=float(c.weak_threshold),
      teacher_train_mode=bool(c.teacher_train_mode), ema_batch_stats=bool(c.ema_batch_stats),
      # Sparse labels on disk imply the partial-label step (one switch).
      partial_labels=bool(c.partial_labels or partial_dir),
      eval_use_teacher=bool(c.eval_use_teacher),
      scale_range=tuple(float(x) for x in config.input.scale_range),
      crop_size=tuple(int(x) for x in config.input.crop_size), quantize=bool(c.quantize),
      color_jitter_prob=float(config.input.color_jitter_prob),
      blur_prob=float(config.input.blur_prob), flip_prob=float(config.input.flip_prob),
      unsup_empty_policy=c.unsup_empty_policy, diag=diagnostics.settings_from(config))


def partial_labeled_aux_targets(logits_l: jax.Array, sparse_labels: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
  """Auxiliary-term labels and validity of the labelled images in partial-label mode (§1.5).

  The student's own full-resolution prediction, with the sparse ground truth substituted
  where it exists; valid where labelled or where the student's confidence is >= 0.97.

  Args:
    logits_l: student logits `f[B,h,w,C]` of the labelled batch (no gradient flows).
    sparse_labels: `i32[B,H,W]`, -1 where unlabelled.
  Returns:
    `(labels i32[B,H,W], valid bool[B,H,W])`.
  """
  logits = supervised_lib.upsample_logits(jax.lax.stop_gradient(logits_l), sparse_labels.shape[1:3])
  probs = jax.nn.softmax(logits, axis=-1)
  labelled = sparse_labels >= 0
  labels = jnp.where(labelled, sparse_labels, jnp.argmax(probs, axis=-1).astype(jnp.int32))
  return labels, labelled | (jnp.max(probs, axis=-1) >= PARTIAL_LABEL_CONFIDENCE)


class MeanTeacher(base.Method):
  """Mean teacher + strong augmentation with a mix mode (+ auxiliary terms)."""

  def __init__(self, model, settings: Settings, aux_losses: auxiliary.AuxLosses):
    super().__init__(model)
    self.settings = settings
    self.aux_losses = aux_losses
    names = "".join(f" + {name}" for name, _ in aux_losses.terms)
    self.description = f"mean teacher + {settings.mix}{names}"

  def streams(self):
    return {base.LABELED: base.LABELED_STREAM, UNLABELED: UNLABELED_STREAM}

  def init_extra(self, key, variables):
    # Copies, not the student's buffers: aliased buffers plus state donation make XLA donate
    # one buffer twice.
    extra = {"params": jax.tree.map(jnp.copy, variables["params"]),
             "batch_stats": jax.tree.map(jnp.copy, variables.get("batch_stats", {}))}
    if self.aux_losses.stateful:
      extra["aux"] = self.aux_losses.init_state(key, variables)
    return extra

  def pseudo_label(self, teacher: dict, unlabeled: dict, key: jax.Array) -> tuple[dict, dict]:
    """Teacher pseudo-labels, then the official strong augmentation (steps 3-6).

    Args:
      teacher: {'params', 'batch_stats'} of the teacher.
      unlabeled: {'image': f32[B,H,W,3], 'label': i32[B,H,W]} (labels only read in
        partial-label mode).
    Returns:
      (augmented batch {'image', 'label' i32, 'confidence' f32}, new teacher batch_stats).
    """
    confidence, labels, teacher_batch_stats = self.teacher_predict(teacher, unlabeled["image"])
    return self.augment_pseudo_labelled(unlabeled, confidence, labels, key), teacher_batch_stats

  def teacher_predict(self, teacher: dict, images: jax.Array
                      ) -> tuple[jax.Array, jax.Array, dict]:
    """Step 3: the teacher's confidence f32[B,H,W] and pseudo-labels i32[B,H,W] of the
    un-augmented images f32[B,H,W,3] (no gradient), and its new batch_stats."""
    s = self.settings
    if s.teacher_train_mode:
      # Official: the teacher stays in train() mode, so BN uses batch statistics and its
      # running statistics are updated by its own forward pass.
      outputs, updates = self.apply_fn(teacher, images, train=True, mutable=["batch_stats"])
      teacher_batch_stats = updates["batch_stats"]
    else:
      outputs = self.apply_fn(teacher, images, train=False)
      teacher_batch_stats = teacher["batch_stats"]
    probs = jax.nn.softmax(supervised_lib.upsample_logits(outputs["logits"], images.shape[1:3]), axis=-1)
    probs = jax.lax.stop_gradient(probs)
    confidence, labels = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return confidence, labels, teacher_batch_stats

  def augment_pseudo_labelled(self, unlabeled: dict, confidence: jax.Array, labels: jax.Array,
                              key: jax.Array) -> dict:
    """Steps 4-6: the partial-label override, then the strong augmentation of image,
    pseudo-label and confidence -> {'image', 'label' i32, 'confidence' f32}."""
    s = self.settings
    images = unlabeled["image"]
    if s.partial_labels:
      # train_semisup_partial.py: the sparse labels override the teacher, with confidence 1.
      sparse = unlabeled["label"]
      labels = jnp.where(sparse >= 0, sparse, labels)
      confidence = jnp.where(sparse >= 0, 1.0, confidence)
    # The official uint8 round trips (confidence floor(255 p)/255, reco_spec §0.9) happen in
    # strong_augment's first stage when quantize is on, before any threshold is applied.
    images, labels, confidence = augment.strong_augment(
        key, images, labels, confidence, mode=s.mix, scale_range=s.scale_range,
        crop_size=s.crop_size, num_classes=s.num_classes, quantize=s.quantize,
        jitter_prob=s.color_jitter_prob, blur_prob=s.blur_prob, flip_prob=s.flip_prob)
    return {"image": images, "label": labels, "confidence": confidence}

  def loss(self, params, state, batch, key):
    """sup + unsup (+ auxiliary terms) of train_semisup.py steps 7-9.

    Metrics: `loss`, `sup_loss`, `unsup_loss`, `pseudo_label_confident_fraction` (augmented
    pixels with confidence >= delta_s), `ema_decay` (of the update after this step) and,
    with auxiliary terms, theirs and `aux_unlabeled_valid_fraction` (confidence >= delta_w);
    with `diagnostics.pseudo_labels`, the `pseudo_*` metrics (`pseudo_label_diagnostics`).
    """
    s = self.settings
    key_augment, key_aux = jax.random.split(key)
    # The teacher sees no gradient: it reads `state.extra`, never `params`.
    confidence_t, labels_t, teacher_batch_stats = self.teacher_predict(
        state.extra, batch[UNLABELED]["image"])
    unlabeled = self.augment_pseudo_labelled(batch[UNLABELED], confidence_t, labels_t, key_augment)
    labeled = batch[base.LABELED]
    out_l, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    out_u, batch_stats = self.apply_train(params, batch_stats, unlabeled["image"])
    sup = supervised_lib.supervised_loss(out_l["logits"], labeled["label"])
    unsup = unsupervised.unsupervised_loss(out_u["logits"], unlabeled["label"], unlabeled["confidence"],
                                           s.strong_threshold, empty_policy=s.unsup_empty_policy)
    metrics = {"sup_loss": sup, "unsup_loss": unsup}
    loss = sup + unsup
    # Cut-out and padded pixels have confidence 0 (and label -1), so they are never valid.
    valid_u = (unlabeled["confidence"] >= s.weak_threshold) & (unlabeled["label"] >= 0)
    if self.aux_losses:
      # reco_spec §1.5: labelled pixels are valid where labelled, pseudo-labelled ones where
      # the (augmented, quantised) teacher confidence is >= delta_w; both at full resolution.
      if s.partial_labels:
        labels_l, valid_l = partial_labeled_aux_targets(out_l["logits"], labeled["label"])
      else:
        labels_l, valid_l = labeled["label"], labeled["label"] >= 0
      aux_total, aux_metrics = self.aux_losses(
          key_aux, jnp.concatenate([out_l["rep"], out_u["rep"]]),
          jnp.concatenate([out_l["logits"], out_u["logits"]]),
          jnp.concatenate([labels_l, unlabeled["label"]]), jnp.concatenate([valid_l, valid_u]))
      loss = loss + aux_total
      metrics.update(aux_metrics)
      metrics["aux_unlabeled_valid_fraction"] = jnp.mean(valid_u.astype(jnp.float32))
    aux = {}
    if self.aux_losses.stateful:
      # Terms with state (the class-wise memory bank): they see the whole step and may move
      # the student's and the teacher's BatchNorm statistics (their heads, a teacher pass).
      ctx = auxiliary.StepContext(
          model=self.model, params=params, batch_stats=batch_stats,
          teacher={"params": state.extra["params"], "batch_stats": teacher_batch_stats},
          step=state.step, images_l=labeled["image"], labels_l=labeled["label"], out_l=out_l,
          out_u=out_u, labels_u=unlabeled["label"], valid_u=valid_u)
      stateful_total, stateful_metrics, aux["aux"], batch_stats, teacher_batch_stats = (
          self.aux_losses.apply_stateful(jax.random.fold_in(key, 1), ctx, state.extra["aux"]))
      loss = loss + stateful_total
      metrics.update(stateful_metrics)
      metrics["stateful_aux_loss"] = stateful_total
    metrics["loss"] = loss
    metrics["pseudo_label_confident_fraction"] = jax.lax.stop_gradient(jnp.mean(
        (unlabeled["confidence"] >= s.strong_threshold).astype(jnp.float32)))
    metrics["ema_decay"] = ema.ema_decay(state.step, s.ema_decay_max)
    if s.diag.pseudo_labels:
      metrics.update(self.pseudo_label_diagnostics(confidence_t, labels_t, batch[UNLABELED]["label"]))
    return loss, (metrics, {"batch_stats": batch_stats, "teacher_batch_stats": teacher_batch_stats,
                            **aux})

  def pseudo_label_diagnostics(self, confidence: jax.Array, labels: jax.Array, gt: jax.Array
                               ) -> dict:
    """`diagnostics.pseudo_label_quality` of the teacher's pseudo-labels of the un-augmented
    batch (before the strong augmentation, so at the pixels of the ground truth), at δs and
    δw. The confidence is the one the method thresholds: uint8-quantised with
    `mean_teacher.quantize` (the official round trip, done in strong_augment's first stage).
    In partial-label mode `gt` is the sparse labels, which override the pseudo-labels: the
    metrics measure the teacher's own prediction at the sparse-labelled pixels.

    Args:
      confidence: f32[B,H,W], labels: i32[B,H,W] the teacher's; gt: i32[B,H,W] (-1 void).
    Returns:
      {'pseudo_*': f32[]} (diagnostics module docstring).
    """
    s = self.settings
    if s.quantize:
      confidence = unsupervised.quantize_confidence(confidence)
    return diagnostics.pseudo_label_quality(
        confidence, labels, gt, thresholds={"strong": s.strong_threshold, "weak": s.weak_threshold})

  def after_update(self, state, aux, key):
    """EMA of the parameters; t = number of previous updates = state.step - 1. The teacher's
    BN statistics come from its own train-mode pass (official), or are the EMA of the
    student's (mean_teacher.ema_batch_stats)."""
    del key
    s = self.settings
    num_updates = state.step - 1
    teacher_params = ema.ema_update(state.extra["params"], state.params, num_updates, s.ema_decay_max)
    teacher_batch_stats = aux["teacher_batch_stats"]
    if s.ema_batch_stats:
      teacher_batch_stats = ema.ema_update(state.extra["batch_stats"], state.batch_stats,
                                           num_updates, s.ema_decay_max)
    extra = {"params": teacher_params, "batch_stats": teacher_batch_stats}
    if "aux" in aux:
      extra["aux"] = aux["aux"]
    return state.replace(extra=extra)

  def eval_variables(self, state):
    """The teacher (official), or the student with mean_teacher.eval_use_teacher=False."""
    if self.settings.eval_use_teacher:
      return {"params": state.extra["params"], "batch_stats": state.extra["batch_stats"]}
    return super().eval_variables(state)

  def load_eval_variables(self, state, variables):
    """With eval_use_teacher, the evaluated (and so the best) weights are the teacher's: the
    teacher *and* the student restart from them. Resetting the teacher alone would not last:
    the EMA pulls it back to the unchanged student within about 1/(1 - ema_decay_max) steps.
    (Alonso et al. reload the weights they evaluate, the student, and their teacher
    continues: what the default does with eval_use_teacher=False.) The student is a copy,
    as at the start (`init_extra`)."""
    if not self.settings.eval_use_teacher:
      return super().load_eval_variables(state, variables)
    teacher = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return state.replace(params=jax.tree.map(jnp.copy, variables["params"]),
                         batch_stats=jax.tree.map(jnp.copy, variables["batch_stats"]),
                         extra={**state.extra, **teacher})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> MeanTeacher:
  aux_losses = auxiliary.AuxLosses.from_config(config, num_classes, stateful_ok=True)
  # Stateful terms may add heads (the memory bank's): the student and the teacher carry them.
  return MeanTeacher(aux_losses.wrap_model(model), settings_from(config, num_classes), aux_losses)
