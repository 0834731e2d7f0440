"""Class-wise memory bank (Alonso et al., ICCV 2021; official `Shathe/SemiSeg-Contrastive`).

One training step (`trainSSL.py: main`, other_methods_spec §2.2), in order:
1. The EMA teacher (train-mode BatchNorm, as the official) pseudo-labels the *un-augmented*
   unlabelled batch: logits up-sampled to the crop (bilinear, align_corners), `p_max`, `ŷ`.
2. Weak augmentation of the labelled batch (`augment_batch`: ClassMix between labelled images
   with the GT, scale-crop, flip, colour jitter; one draw per batch, as the official).
3. Two independent strong views of the unlabelled batch with `ŷ` and `p_max` (ClassMix only
   after `classmix_start_step`, scale-crop, flip, jitter, blur).
4. The student on the two views (one pass) and on the weak labelled batch (one pass).
5. CE(labelled) + CE(views, ŷ)·sigmoid_ramp_up(t)·p_max^6 averaged over *all* pixels + 0.01 ·
   entropy over valid pixels.
6. From `memory_start_step`: the teacher on the weak labelled batch; pixels (at the feature
   resolution, nearest) where its prediction equals the GT with p_max > 0.95 are projected by
   the teacher's projection head (BatchNorm over them) and E per class enter the memory,
   chosen by the teacher's selector (`losses.memory_bank.memory_update`).
7. From `contrastive_start_step`: student features of the labelled pixels (GT) and of both
   views (ŷ, no confidence threshold) -> projection head -> prediction head -> the
   weighted-cosine loss against the memory, weight 0.1 each.
8. After the SGD step: the teacher becomes the EMA of the student with Alonso's decay.

Network (`MemoryBankModel`): the segmentation model plus projection, prediction and the 2·C
selector heads of losses/memory_bank.py, on the model's `features[feature_source]`
(DeepLabv2: `layer4`, 2048-d at stride 8; DeepLabv3+: `decoder`, 256-d at stride 4).

`TrainState.extra` = {'teacher': {'params', 'batch_stats'}, 'memory': {'features' f32[C,K,D],
'count' i32[C]}}. Evaluation uses the student (official `evaluate(model, ...)`).

Deviations (config switches; README "Class-wise memory bank"): gated phases compute every
branch and select the result (`where`), which changes nothing but the cost; classes with at
most E candidates enter the memory in row order (as official) but through the same top-k.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from input_pipeline import datasets
from reco_jax import augment, diagnostics, resampling
from reco_jax.losses import memory_bank as bank_lib
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base

UNLABELED = base.UNLABELED
# Crop/pad only on the host (the official loaders only crop): every augmentation is on device.
LABELED_STREAM = datasets.Stream(subset="labeled", augment=False)
UNLABELED_STREAM = datasets.Stream(subset="unlabeled", augment=False)
# 'rep': the model's representation head (ReCo's), e.g. for models without the official maps.
FEATURE_SOURCES = ("auto", "decoder", "layer4", "rep")
MEMORY_WEIGHTINGS = ("official", "paper")


class MemoryBankModel(nn.Module):
  """The student (and the teacher's architecture): the segmentation model plus the heads.

  `__call__(images f32[B,H,W,3], train)` -> the model's outputs plus 'contrast':
  f32[B,h,w,d] (the features the heads read). The heads are applied through the methods
  `project`, `predict`, `select_own`, `select_memory` (`model.apply(..., method=...)`).
  """
  segmenter: nn.Module
  num_classes: int
  feature_source: str = "decoder"
  dim: int = 256

  def setup(self):
    self.projection_head = bank_lib.PixelMLP(hidden=self.dim, out=self.dim)
    self.prediction_head = bank_lib.PixelMLP(hidden=self.dim, out=self.dim)
    self.selectors = bank_lib.ClassSelectors(self.num_classes, hidden=self.dim)
    self.memory_selectors = bank_lib.ClassSelectors(self.num_classes, hidden=self.dim)

  def __call__(self, images: jax.Array, train: bool) -> dict:
    out = self.segmenter(images, train)
    maps = {**out["features"], "rep": out["rep"]}
    if self.feature_source not in maps:
      raise ValueError(f"config memory_bank.feature_source={self.feature_source!r}: the model "
                       f"has {', '.join(sorted(maps))}")
    contrast = maps[self.feature_source].astype(jnp.float32)
    if self.is_initializing():
      # Create every head's variables (init only runs __call__).
      rows = jnp.zeros((2, contrast.shape[-1]), jnp.float32)
      pred = self.predict(self.project(rows, None, False), None, False)
      masks = jnp.ones((self.num_classes, 2), bool)
      self.select_own(pred, jnp.zeros((2,), jnp.int32), masks[0], False)
      self.select_memory(jnp.broadcast_to(pred, (self.num_classes, 2, self.dim)), masks, False)
    return {**out, "contrast": contrast}

  def project(self, rows: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    return self.projection_head(rows, mask, train)

  def predict(self, rows: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    return self.prediction_head(rows, mask, train)

  def select_own(self, rows: jax.Array, classes: jax.Array, mask: jax.Array, train: bool
                 ) -> jax.Array:
    return self.selectors.own_class(rows, classes, mask, train)

  def select_memory(self, rows: jax.Array, masks: jax.Array, train: bool) -> jax.Array:
    return self.memory_selectors(rows, masks, train)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """One of the two official augmentation recipes (`augment_samples[_weak]`)."""
  classmix_prob: float
  scale_prob: float
  scale_range: tuple[float, float]
  flip_prob: float
  jitter_prob: float
  jitter_strength: float
  blur_prob: float
  blur_sigma: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class TermSettings:
  """The memory and its contrastive terms (config.memory_bank), shared with the auxiliary term."""
  elements_per_class: int
  memory_per_class: int
  confidence: float
  ranking: str
  memory_weighting: str
  memory_start_step: int
  contrastive_start_step: int
  labeled_contrastive_weight: float
  unlabeled_contrastive_weight: float


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static hyper-parameters of the method (config.memory_bank)."""
  num_classes: int
  crop_size: tuple[int, int]
  terms: TermSettings
  classmix_start_step: int
  ramp_up_steps: int
  entropy_weight: float
  pseudo_label_power: float
  drop_background: bool
  num_train_steps: int
  weak: AugmentSettings
  strong: AugmentSettings
  # config.diagnostics: pseudo_* metrics against the unlabelled ground truth (no effect on training).
  diag: diagnostics.Settings = diagnostics.Settings()


def _augment_settings(c: ml_collections.ConfigDict) -> AugmentSettings:
  return AugmentSettings(
      classmix_prob=float(c.classmix_prob), scale_prob=float(c.scale_prob),
      scale_range=tuple(float(x) for x in c.scale_range), flip_prob=float(c.flip_prob),
      jitter_prob=float(c.jitter_prob), jitter_strength=float(c.jitter_strength),
      blur_prob=float(c.blur_prob), blur_sigma=tuple(float(x) for x in c.blur_sigma))


def elements_per_class(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """E, new memory entries per class per step: `memory_bank.elements_per_class`, or (0)
  labelled batch × `per_class_samples_per_image` of the official rule."""
  c = config.memory_bank
  if int(c.elements_per_class) > 0:
    return int(c.elements_per_class)
  num_labeled = int(config.input.num_labeled)
  if num_labeled <= 0:
    raise ValueError("config memory_bank.elements_per_class=0 derives E from "
                     "input.num_labeled, which is 0 (every image labelled): set "
                     "memory_bank.elements_per_class")
  rule = base.check_choice(config, "memory_bank.samples_rule", bank_lib.SAMPLE_RULES)
  per_image = bank_lib.per_class_samples_per_image(rule, num_classes, num_labeled,
                                                   int(c.memory_per_class))
  return per_image * int(config.input.streams.labeled.batch_size)


def term_settings_from(config: ml_collections.ConfigDict, num_classes: int) -> TermSettings:
  c = config.memory_bank
  for name in ("labeled_contrastive_weight", "unlabeled_contrastive_weight"):
    if float(c[name]) < 0:
      raise ValueError(f"config memory_bank.{name}={c[name]!r} must be >= 0")
  if int(c.memory_per_class) < 2:
    raise ValueError(f"config memory_bank.memory_per_class={c.memory_per_class!r} must be >= 2")
  return TermSettings(
      elements_per_class=elements_per_class(config, num_classes),
      memory_per_class=int(c.memory_per_class), confidence=float(c.confidence),
      ranking=base.check_choice(config, "memory_bank.ranking", bank_lib.RANKINGS),
      memory_weighting=base.check_choice(config, "memory_bank.memory_weighting", MEMORY_WEIGHTINGS),
      memory_start_step=int(c.memory_start_step),
      contrastive_start_step=int(c.contrastive_start_step),
      labeled_contrastive_weight=float(c.labeled_contrastive_weight),
      unlabeled_contrastive_weight=float(c.unlabeled_contrastive_weight))


def settings_from(config: ml_collections.ConfigDict, num_classes: int) -> Settings:
  c = config.memory_bank
  if float(c.entropy_weight) < 0:
    raise ValueError(f"config memory_bank.entropy_weight={c.entropy_weight!r} must be >= 0")
  return Settings(
      num_classes=num_classes, crop_size=tuple(int(x) for x in config.input.crop_size),
      terms=term_settings_from(config, num_classes),
      classmix_start_step=int(c.classmix_start_step), ramp_up_steps=int(c.ramp_up_steps),
      entropy_weight=float(c.entropy_weight), pseudo_label_power=float(c.pseudo_label_power),
      drop_background=bool(c.drop_background), num_train_steps=int(config.num_train_steps),
      weak=_augment_settings(c.weak), strong=_augment_settings(c.strong),
      diag=diagnostics.settings_from(config))


def feature_source(config: ml_collections.ConfigDict) -> str:
  """'auto': DeepLabv2 -> layer4 (2048-d, stride 8), DeepLabv3+ -> decoder (256-d, stride 4),
  as the official configs."""
  source = base.check_choice(config, "memory_bank.feature_source", FEATURE_SOURCES)
  if source == "auto":
    return "layer4" if config.model.name == "deeplabv2" else "decoder"
  return source


# ------------------------------------------------------------------------------------------
# Augmentation (utils/transformsgpu.py via trainSSL.py: augmentationTransform).


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, probs: jax.Array,
                  a: AugmentSettings, *, num_classes: int, crop_size: tuple[int, int],
                  allow_mix: jax.Array | bool = True, drop_background: bool = False
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`augmentationTransform` with the parameters `augment_samples[_weak]` draws.

  Order as official: ClassMix (masks from `labels`, image i+1 pasted under image i's kept
  classes) -> random scale-crop (scale ~ U(scale_range); zoom-out pads with ignore / p 0) ->
  flip -> colour jitter (torchvision-style factors 1±s, hue ±s, per image) -> Gaussian blur.
  Each stage is switched on for the whole batch with its probability (one Python `random`
  draw per batch in the official); the scale is drawn per image here (official: one per
  batch).

  Args:
    images: f32[B,H,W,3] normalised; labels: i32[B,H,W] (-1 ignore); probs: f32[B,H,W].
    allow_mix: bool[] gate on ClassMix (off before `classmix_start_step`).
  Returns:
    (images, labels, probs) at `crop_size`.
  """
  keys = jax.random.split(key, 9)
  if a.classmix_prob > 0:
    masks = jax.vmap(augment.classmix_mask_alonso, in_axes=(0, 0, None, None))(
        jax.random.split(keys[0], labels.shape[0]), labels, num_classes, drop_background)
    mixed = augment.mix(images, labels, probs, masks, "classmix")
    do_mix = jnp.logical_and(allow_mix, jax.random.bernoulli(keys[1], a.classmix_prob))
    images, labels, probs = _select(do_mix, mixed, (images, labels, probs))
  if a.scale_prob > 0:
    scaled = augment.random_rescale_crop(keys[2], images, labels, probs, a.scale_range,
                                         crop_size, quantize=False)
    do_scale = jax.random.bernoulli(keys[3], a.scale_prob)
    images, labels, probs = _select(do_scale, scaled, (images, labels, probs))
  if a.flip_prob > 0:
    flip = jax.random.bernoulli(keys[4], a.flip_prob)
    images, labels, probs = jax.tree.map(lambda x: jnp.where(flip, x[:, :, ::-1], x),
                                         (images, labels, probs))
  s = a.jitter_strength
  if a.jitter_prob > 0:
    jittered, _, _ = augment.photometric_augment(
        keys[5], images, labels, probs, jitter_prob=1.0, brightness=(1 - s, 1 + s),
        contrast=(1 - s, 1 + s), saturation=(1 - s, 1 + s), hue=(-s, s), blur_prob=0.0,
        flip_prob=0.0, quantize=False)
    images = jnp.where(jax.random.bernoulli(keys[6], a.jitter_prob), jittered, images)
  if a.blur_prob > 0:
    blurred, _, _ = augment.photometric_augment(
        keys[7], images, labels, probs, jitter_prob=0.0, blur_prob=1.0, blur_sigma=a.blur_sigma,
        flip_prob=0.0, quantize=False)
    images = jnp.where(jax.random.bernoulli(keys[8], a.blur_prob), blurred, images)
  return images, labels, probs


# ------------------------------------------------------------------------------------------
# The memory and contrastive blocks, on flattened feature maps.


def downsample_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch legacy nearest (`F.interpolate(mode='nearest')`) of [B,H,W] maps to `size`."""
  return resampling.resize_nearest_torch(x, tuple(size))


def memory_candidates(logits: jax.Array, labels: jax.Array, feature_hw: tuple[int, int],
                      confidence: float) -> tuple[jax.Array, jax.Array]:
  """The teacher's correct and confident labelled pixels at the feature resolution.

  Args:
    logits: f32[B,h',w',C] teacher logits (up-sampled bilinear, align_corners, to the label
      size as the official `interp`).
    labels: i32[B,H,W] GT (-1 ignore).
    feature_hw: (h, w) of the contrastive features.
  Returns:
    (labels_down i32[B,h,w], candidates bool[B,h,w]): nearest-downsampled GT, and
    `argmax == GT & p_max > confidence` (argmax and p_max nearest-downsampled too).
  """
  probs = jax.nn.softmax(supervised_lib.upsample_logits(logits, labels.shape[1:3]), axis=-1)
  prediction = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  p_max = jnp.max(probs, axis=-1)
  labels_down = downsample_to(labels, feature_hw)
  correct = downsample_to(prediction, feature_hw) == labels_down
  confident = downsample_to(p_max, feature_hw) > jnp.float32(confidence)
  return labels_down, correct & confident & (labels_down >= 0)


def teacher_memory_update(model: MemoryBankModel, teacher: dict, memory: dict,
                          contrast: jax.Array, labels_down: jax.Array, candidates: jax.Array,
                          *, elements_per_class: int, ranking: str) -> tuple[dict, dict]:
  """Official memory block: teacher projection (BN over the candidates), selector scores
  (class c's BN over its candidates, only when it has more than E), `memory_update`.

  Args:
    teacher: {'params', 'batch_stats'}; contrast: f32[B,h,w,d] teacher features;
    labels_down i32[B,h,w]; candidates bool[B,h,w].
  Returns:
    (new memory, the teacher's new batch_stats).
  """
  rows = contrast.reshape(-1, contrast.shape[-1])
  labels = labels_down.reshape(-1)
  cand = candidates.reshape(-1)
  proj, updates = model.apply(teacher, rows, cand, True, method=MemoryBankModel.project,
                              mutable=["batch_stats"])
  teacher = {**teacher, "batch_stats": updates["batch_stats"]}
  proj = jax.lax.stop_gradient(proj)
  num_classes = memory["features"].shape[0]
  ranked = bank_lib.candidate_counts(labels, cand, num_classes) > elements_per_class
  # Selector c runs (BatchNorm over its candidates) only for a class that is ranked.
  scored = cand & ranked[jnp.clip(labels, 0, num_classes - 1)]
  logits, updates = model.apply(teacher, proj, labels, scored, True,
                                method=MemoryBankModel.select_own, mutable=["batch_stats"])
  new_memory = bank_lib.memory_update(memory, proj, labels, cand, jax.nn.sigmoid(logits),
                                      elements_per_class, ranking)
  return jax.lax.stop_gradient(new_memory), updates["batch_stats"]


def contrastive_term(model: MemoryBankModel, params, batch_stats, contrast: jax.Array,
                     labels_down: jax.Array, valid: jax.Array, memory: dict,
                     memory_weighting: str) -> tuple[jax.Array, dict]:
  """Projection -> prediction head on the valid pixels (BN over them), selector weights on
  the detached predictions, `contrastive_loss` against the memory (official block of
  trainSSL.py for the labelled and for the unlabelled features).

  Returns:
    (loss f32[], new batch_stats).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  rows = contrast.reshape(-1, contrast.shape[-1])
  labels = labels_down.reshape(-1)
  valid = valid.reshape(-1)

  def apply(method, *args):
    out, updates = model.apply(variables, *args, True, method=method, mutable=["batch_stats"])
    variables["batch_stats"] = updates["batch_stats"]
    return out

  pred = apply(MemoryBankModel.predict, apply(MemoryBankModel.project, rows, valid), valid)
  num_classes = memory["features"].shape[0]
  # Selector c runs (and moves its BatchNorm statistics) only for a contributing class.
  contributing = bank_lib.contributing_classes(labels, valid, memory)
  selected = valid & contributing[jnp.clip(labels, 0, num_classes - 1)]
  scores = apply(MemoryBankModel.select_own, jax.lax.stop_gradient(pred), labels, selected)
  weights = jax.nn.sigmoid(scores)
  memory_weights = None
  if memory_weighting == "paper":
    # Eq. 8: the memory side weighted by its own selector on the normalised entries,
    # rescaled to mean 1 per class (the official code's rescaling makes these all 1).
    slots = bank_lib.memory_slots(memory) & contributing[:, None]
    q_hat = bank_lib.l2_normalize(jax.lax.stop_gradient(memory["features"]))
    mem_scores = apply(MemoryBankModel.select_memory, q_hat, slots)
    memory_weights = bank_lib.mean_one_weights(jax.nn.sigmoid(mem_scores), slots)
  loss, _ = bank_lib.contrastive_loss(pred, labels, valid, weights, memory, memory_weights)
  return loss, variables["batch_stats"]


def memory_bank_terms(model: MemoryBankModel, params, batch_stats, teacher: dict, memory: dict,
                      step: jax.Array, images_l: jax.Array, labels_l: jax.Array, out_l: dict,
                      out_u: dict, labels_u: jax.Array, s: "TermSettings"
                      ) -> tuple[jax.Array, dict, dict, dict, dict]:
  """trainSSL.py steps 8-9: the memory update and the two contrastive terms, each in its phase.

  Shared by the method and by the auxiliary term on the mean-teacher methods.

  Args:
    model: the student's MemoryBankModel (the teacher has the same architecture).
    params, batch_stats: the student's (batch_stats after its forward passes).
    teacher: {'params', 'batch_stats'} of the EMA teacher.
    memory: {'features' f32[C,K,D], 'count' i32[C]}.
    step: i32[] the iteration (0-based).
    images_l, labels_l: the (augmented) labelled batch f32[B,H,W,3], i32[B,H,W] (-1 ignore).
    out_l, out_u: the student's outputs (with 'contrast') on the labelled batch and on the
      unlabelled views; labels_u: i32[B',H,W] the views' pseudo-labels (-1 ignore).
  Returns:
    (weighted contrastive loss f32[] (0 before `contrastive_start_step`), metrics
     {'contrastive_labeled', 'contrastive_unlabeled', 'memory_filled_fraction',
     'memory_candidates'}, new student batch_stats, new teacher batch_stats, new memory).
  """
  feature_hw = out_l["contrast"].shape[1:3]
  out_t, updates = model.apply(teacher, images_l, train=True, mutable=["batch_stats"])
  labels_down_l, candidates = memory_candidates(jax.lax.stop_gradient(out_t["logits"]), labels_l,
                                                feature_hw, s.confidence)
  new_memory, teacher_stats = teacher_memory_update(
      model, {"params": teacher["params"], "batch_stats": updates["batch_stats"]}, memory,
      jax.lax.stop_gradient(out_t["contrast"]), labels_down_l, candidates,
      elements_per_class=s.elements_per_class, ranking=s.ranking)
  memory_on = step > s.memory_start_step
  memory = _select(memory_on, new_memory, memory)
  teacher_stats = _select(memory_on, teacher_stats, teacher["batch_stats"])

  contr_l, stats = contrastive_term(model, params, batch_stats, out_l["contrast"], labels_down_l,
                                    labels_down_l >= 0, memory, s.memory_weighting)
  labels_down_u = downsample_to(labels_u, out_u["contrast"].shape[1:3])
  contr_u, stats = contrastive_term(model, params, stats, out_u["contrast"], labels_down_u,
                                    labels_down_u >= 0, memory, s.memory_weighting)
  contrast_on = step > s.contrastive_start_step
  total = jnp.where(contrast_on, s.labeled_contrastive_weight * contr_l
                    + s.unlabeled_contrastive_weight * contr_u, 0.0)
  capacity = memory["features"].shape[1]
  metrics = {"contrastive_labeled": contr_l, "contrastive_unlabeled": contr_u,
             "memory_filled_fraction": jnp.mean(memory["count"] / capacity),
             "memory_candidates": jnp.sum(candidates).astype(jnp.float32)}
  return total, metrics, _select(contrast_on, stats, batch_stats), teacher_stats, memory


def _select(gate: jax.Array, new, old):
  return jax.tree.map(lambda n, o: jnp.where(gate, n, o), new, old)


class MemoryBank(base.Method):
  """Mean teacher + ClassMix + class-wise memory-bank contrast (Alonso et al.)."""

  def __init__(self, model: MemoryBankModel, settings: Settings):
    super().__init__(model)
    self.settings = settings
    t = settings.terms
    self.description = (f"class-wise memory bank (Alonso et al.; E={t.elements_per_class}, "
                        f"{t.ranking} selection, {t.memory_weighting} memory weights)")

  def streams(self):
    return {base.LABELED: LABELED_STREAM, UNLABELED: UNLABELED_STREAM}

  def init_extra(self, key, variables):
    del key
    dim = variables["params"]["projection_head"]["linear_1"]["kernel"].shape[-1]
    capacity = self.settings.terms.memory_per_class
    return {"teacher": {"params": jax.tree.map(jnp.copy, variables["params"]),
                        "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"])},
            "memory": bank_lib.init_memory(self.settings.num_classes, capacity, dim)}

  def loss(self, params, state, batch, key):
    """The official step 1-7 (module docstring). Metrics: `loss` = `sup_loss` + `unsup_loss`
    (everything else: pseudo-label CE + 0.01 entropy + 0.1 (labelled + unlabelled contrast)
    once active), `pseudo_label_loss`, `entropy_loss`, `contrastive_labeled`, `contrastive_unlabeled`,
    `memory_filled_fraction`, `memory_candidates` (per step), `ema_decay`; with
    `diagnostics.pseudo_labels`, the `pseudo_*` metrics of the teacher's pseudo-labels."""
    s = self.settings
    step = state.step
    k_weak, k_view1, k_view2 = jax.random.split(key, 3)
    teacher = state.extra["teacher"]
    memory = state.extra["memory"]

    # 1. Teacher pseudo-labels (train-mode BN; its running statistics move, as official).
    unlabeled = batch[UNLABELED]["image"]
    out_t, updates = self.apply_fn(teacher, unlabeled, train=True, mutable=["batch_stats"])
    teacher = {**teacher, "batch_stats": updates["batch_stats"]}
    probs_t = jax.nn.softmax(supervised_lib.upsample_logits(
        jax.lax.stop_gradient(out_t["logits"]), unlabeled.shape[1:3]), axis=-1)
    p_max = jnp.max(probs_t, axis=-1)
    pseudo = jnp.argmax(probs_t, axis=-1).astype(jnp.int32)

    # 2-3. Weak labelled batch; two strong views (ClassMix after classmix_start_step).
    labeled = batch[base.LABELED]
    ones = jnp.ones(labeled["label"].shape, jnp.float32)
    images_l, labels_l, _ = augment_batch(k_weak, labeled["image"], labeled["label"], ones, s.weak,
                                          num_classes=s.num_classes, crop_size=s.crop_size,
                                          drop_background=s.drop_background)
    allow_mix = step > s.classmix_start_step
    views = [augment_batch(k, unlabeled, pseudo, p_max, s.strong, num_classes=s.num_classes,
                           crop_size=s.crop_size, allow_mix=allow_mix,
                           drop_background=s.drop_background) for k in (k_view1, k_view2)]
    images_u, labels_u, p_max_u = (jnp.concatenate(parts) for parts in zip(*views))

    # 4. Student passes (views, then labelled, as official).
    out_u, batch_stats = self.apply_train(params, state.batch_stats, images_u)
    out_l, batch_stats = self.apply_train(params, batch_stats, images_l)

    # 5. CE, weighted pseudo-label CE over all pixels, entropy over valid pixels.
    sup = supervised_lib.supervised_loss(out_l["logits"], labels_l)
    logits_u = supervised_lib.upsample_logits(out_u["logits"], labels_u.shape[1:3])
    pixel_weight = (bank_lib.sigmoid_ramp_up(step, s.ramp_up_steps)
                    * jnp.power(jax.lax.stop_gradient(p_max_u), s.pseudo_label_power))
    pseudo_ce = jnp.mean(supervised_lib.cross_entropy_per_pixel(logits_u, labels_u) * pixel_weight)
    entropy = bank_lib.entropy_loss(jax.nn.softmax(logits_u, axis=-1), labels_u >= 0)
    unsup_total = pseudo_ce + s.entropy_weight * entropy

    # 6-7. Memory update from the teacher's view of the weak labelled batch, then the
    # contrastive terms against the updated memory.
    contrast, parts, batch_stats, teacher_stats, memory = memory_bank_terms(
        self.model, params, batch_stats, teacher, memory, step, images_l, labels_l, out_l,
        out_u, labels_u, s.terms)
    teacher = {**teacher, "batch_stats": teacher_stats}
    unsup_total = unsup_total + contrast
    loss = sup + unsup_total

    metrics = {
        "loss": loss, "sup_loss": sup, "unsup_loss": unsup_total, "pseudo_label_loss": pseudo_ce,
        "entropy_loss": entropy,
        **parts, "ema_decay": bank_lib.alonso_ema_decay(step, s.num_train_steps)}
    if s.diag.pseudo_labels:
      # The teacher's pseudo-labels of the un-augmented batch (step 1), at the GT's pixels.
      # The method weights pixels by p_max^6 and has no threshold: the reference δs, δw.
      metrics.update(diagnostics.pseudo_label_quality(
          p_max, pseudo, batch[UNLABELED]["label"], thresholds=s.diag.reference))
    aux = {"batch_stats": batch_stats, "teacher_batch_stats": teacher["batch_stats"],
           "memory": memory}
    return loss, (metrics, aux)

  def after_update(self, state, aux, key):
    """EMA of every parameter (heads included) with the decay of iteration t = step - 1; the
    teacher's BatchNorm statistics come from its own train-mode passes (official)."""
    del key
    decay = bank_lib.alonso_ema_decay(state.step - 1, self.settings.num_train_steps)
    teacher_params = jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p,
                                  state.extra["teacher"]["params"], state.params)
    return state.replace(extra={
        "teacher": {"params": teacher_params, "batch_stats": aux["teacher_batch_stats"]},
        "memory": aux["memory"]})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> MemoryBank:
  if tuple(config.aux_losses):
    raise ValueError(f"config aux_losses={tuple(config.aux_losses)!r} is not supported by method "
                     f"memory_bank (its contrastive terms are built in)")
  return MemoryBank(MemoryBankModel(segmenter=model, num_classes=num_classes,
                                    feature_source=feature_source(config), dim=_dim(config)),
                    settings_from(config, num_classes))


@dataclasses.dataclass(frozen=True)
class AuxTerm:
  """The memory-bank terms as an auxiliary term of the mean-teacher methods
  (`config.aux_losses=("reco", "memory_bank")` with `method=classmix_reco`, say).

  The model gains the heads (`MemoryBankModel`), the memory lives in
  `TrainState.extra['aux']['memory_bank']`, and each step runs `memory_bank_terms`: the
  teacher's view of the labelled batch fills the memory, the student's labelled features
  (GT) and unlabelled features (the method's augmented pseudo-labels, no confidence threshold,
  as the official) are pulled toward it, with `memory_bank.*` weights and phases.
  """
  settings: TermSettings
  num_classes: int
  feature_source: str
  dim: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "AuxTerm":
    return cls(settings=term_settings_from(config, num_classes), num_classes=num_classes,
               feature_source=feature_source(config), dim=_dim(config))

  def wrap_model(self, model) -> MemoryBankModel:
    return MemoryBankModel(segmenter=model, num_classes=self.num_classes,
                           feature_source=self.feature_source, dim=self.dim)

  def init_state(self, key: jax.Array, variables) -> dict:
    del key, variables
    return bank_lib.init_memory(self.num_classes, self.settings.memory_per_class, self.dim)

  def stateful_call(self, key: jax.Array, ctx, memory: dict):
    """-> (weighted loss, metrics, new memory, student batch_stats, teacher batch_stats)."""
    del key
    total, metrics, batch_stats, teacher_stats, memory = memory_bank_terms(
        ctx.model, ctx.params, ctx.batch_stats, ctx.teacher, memory, ctx.step, ctx.images_l,
        ctx.labels_l, ctx.out_l, ctx.out_u, ctx.labels_u, self.settings)
    return total, {f"memory_bank_{k}": v for k, v in metrics.items()}, memory, batch_stats, teacher_stats


def _dim(config: ml_collections.ConfigDict) -> int:
  dim = int(config.memory_bank.dim)
  if dim <= 0:
    raise ValueError(f"config memory_bank.dim={config.memory_bank.dim!r} must be positive")
  return dim
