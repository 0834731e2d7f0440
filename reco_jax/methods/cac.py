"""CAC: directional context-aware consistency (Lai et al., CVPR 2021; other_methods_spec §1).

Official: `dvlab-research/Context-Aware-Consistency` (`models/model.py: CAC`, `trainer.py`).
Per step: the labelled batch through the student (CE on the classifier at stride 4), then,
from step `cac.unsup_start_step` on, the two overlapping crops of each unlabelled image
through two separate student passes (their own BatchNorm batch statistics, as the official's
two encoder calls). Each view's decoder map is 2x2 average-pooled to stride 8, where the
projector (L2-normalised) and the dropout-active classifier give the features, pseudo-labels
and confidences. This step's features and pseudo-labels of both views (detached) are written
into the negative bank *before* the loss, and the loss is `CE + weight * (L1 + L2)`
(losses/cac.py).

Network (`CACModel`, wrapping the segmentation model it is given): the model's stride-4
decoder map (`features["decoder"]`; the representation map for models without one) -> CAC's
decoder convs (two 3x3 conv+BN+ReLU to `cac.decoder_dim`; 0 = none) -> classifier
Dropout(0.1) + 1x1 conv; projector 1x1 256->256, ReLU, 1x1 ->128 on the pooled map. The
trainer initialises, trains, checkpoints and evaluates the wrapper (its `logits` are CAC's).

`TrainState.extra` = {'bank': {'feats' f32[S,R,D], 'labels' i32[S,R], 'filled' bool[S]}}
with S = step_save + 1 and R = 2 * global unlabelled batch * (H/8) * (W/8): the whole global
batch's stride-8 pixels of both views (the official `selected_num` is a permutation of them
in every shipped config). Slot (step - unsup_start_step) % S is written each active step.

Pair batches: the `unlabeled_pair` stream delivers {'image1', 'image2', 'ul1', 'br1', 'ul2',
'br2', 'flip', ...}. A plain {'image', 'label'} batch is read as the official fallback pair
(identical crops, no flips), so that any unlabelled batch can drive the step.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from input_pipeline import crop_pairs, datasets
from reco_jax import diagnostics, resampling
from reco_jax.losses import cac as cac_lib
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base

UNLABELED_PAIR = "unlabeled_pair"
POOL = 2  # `downsample: true`: 2x2 average pooling, stride 4 -> 8


class Projector(nn.Module):
  """`self.project`: 1x1 conv hidden, ReLU, 1x1 conv out (biases), then L2 normalisation."""
  hidden: int = 256
  out: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """f[B,h,w,C] -> f32[B,h,w,out], unit norm over channels (F.normalize, eps 1e-12)."""
    y = nn.relu(nn.Dense(self.hidden, name="conv0")(x.astype(jnp.float32)))
    y = nn.Dense(self.out, name="conv1")(y)
    return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)


class Classifier(nn.Module):
  """`self.classifier`: Dropout(rate) + 1x1 conv with bias; dropout only when `train`."""
  num_classes: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(jnp.float32))
    return nn.Dense(self.num_classes, name="conv")(x)


class CACDecoder(nn.Module):
  """CAC's DeepLabv3+ decoder tail: two 3x3 conv (no bias) + BN + ReLU to `features`."""
  features: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(2):
      x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


class CACModel(nn.Module):
  """The student: the given segmentation model plus CAC's decoder tail, classifier and projector.

  `__call__(images f32[B,H,W,3], train, pooled=False)`:
    pooled=False -> {'logits': f32[B,H/4,W/4,C] (CAC's classifier), 'rep', 'features'};
    pooled=True  -> {'logits': f32[B,H/8,W/8,C], 'proj': f32[B,H/8,W/8,proj_dim] unit norm}
    (the unlabelled branch). Dropout needs the 'dropout' rng when `train`.
  """
  segmenter: nn.Module
  num_classes: int
  proj_dim: int = 128
  proj_hidden: int = 256
  decoder_dim: int = 256
  dropout: float = 0.1

  @nn.compact
  def __call__(self, images: jax.Array, train: bool, pooled: bool = False) -> dict:
    out = self.segmenter(images, train)
    x = out["features"].get("decoder", out["rep"])
    if self.decoder_dim:
      x = CACDecoder(self.decoder_dim, name="decoder")(x, train)
    classifier = Classifier(self.num_classes, self.dropout, name="classifier")
    if pooled or self.is_initializing():
      xp = nn.avg_pool(x.astype(jnp.float32), (POOL, POOL), strides=(POOL, POOL))
      proj = Projector(self.proj_hidden, self.proj_dim, name="project")(xp)
      if pooled:
        return {"logits": classifier(xp, train), "proj": proj}
    return {"logits": classifier(x, train), "rep": out["rep"],
            "features": {**out["features"], "cac_decoder": x}}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static CAC hyper-parameters (config.cac)."""
  temperature: float
  pos_threshold: float
  weight: float
  step_save: int
  unsup_start_step: int
  numerics: str
  chunk_size: int
  max_shift_rows: int
  mean_groups: int
  crop_size: tuple[int, int]
  pair_batch: int
  proj_dim: int
  pair: crop_pairs.PairSettings
  warmup_skip: str = "auto"
  # config.diagnostics: pseudo_* metrics against the unlabelled ground truth (no effect on training).
  diag: diagnostics.Settings = diagnostics.Settings()


WARMUP_SKIPS = ("auto", "cond", "select")


def skips_by_cond(warmup_skip: str, backend: str) -> bool:
  """Whether the warm-up steps skip the unlabelled branch with `lax.cond` (else: compute, select).

  Both give the same numbers (the selected-away branch contributes exactly zero gradient and
  leaves the batch statistics and the bank untouched). `cond` does no unlabelled work before
  `unsup_start_step`, as the official code; but XLA:CPU runs the convolutions inside a
  conditional's branch about 10x slower than at the top level (the CamVid cpu recipe: 16 s
  instead of 1.6 s per step), so `auto` selects on CPU and skips by `cond` elsewhere.
  """
  return warmup_skip == "cond" or (warmup_skip == "auto" and backend != "cpu")


def settings_from(config: ml_collections.ConfigDict) -> Settings:
  """Static settings of `config`, with one-line errors for settings that cannot work."""
  c = config.cac
  crop = tuple(int(x) for x in config.input.crop_size)
  if crop[0] != crop[1] or crop[0] % cac_lib.FEATURE_STRIDE:
    raise ValueError(f"config input.crop_size={crop} must be square and a multiple of 8 for cac "
                     f"(the official overlap mapping divides by 8)")
  base.check_choice(config, "cac.numerics", cac_lib.NUMERICS)
  base.check_choice(config, "cac.pair_variant", crop_pairs.VARIANTS)
  if int(c.step_save) < 0:
    raise ValueError(f"config cac.step_save={c.step_save} must be >= 0")
  base.check_choice(config, "cac.warmup_skip", WARMUP_SKIPS)
  batch = int(config.input.streams[UNLABELED_PAIR].batch_size)
  if batch % int(c.mean_groups):
    raise ValueError(f"config cac.mean_groups={c.mean_groups} must divide "
                     f"input.streams.{UNLABELED_PAIR}.batch_size={batch}")
  pair = crop_pairs.PairSettings(
      crop=crop[0], base_size=int(c.base_size), scale_range=tuple(float(x) for x in c.scale_range),
      iou_bound=tuple(float(x) for x in c.iou_bound), stride=cac_lib.FEATURE_STRIDE,
      variant=c.pair_variant, jitter_prob=float(c.jitter_prob), blur_prob=float(c.blur_prob),
      grayscale_prob=float(c.grayscale_prob))
  return Settings(
      temperature=float(c.temperature), pos_threshold=float(c.pos_threshold),
      weight=float(c.weight), step_save=int(c.step_save),
      unsup_start_step=int(c.unsup_start_step), numerics=c.numerics,
      chunk_size=int(c.chunk_size), max_shift_rows=int(c.max_shift_rows),
      mean_groups=int(c.mean_groups), crop_size=crop, pair_batch=batch,
      proj_dim=int(c.proj_dim), pair=pair, warmup_skip=c.warmup_skip,
      diag=diagnostics.settings_from(config))


def as_pair_batch(batch: dict) -> dict:
  """The pair stream's batch; a plain {'image'} batch is the fallback pair (identical crops)."""
  if "image1" in batch:
    return batch
  image = batch["image"]
  b, h, w = image.shape[:3]
  zeros = jnp.zeros((b, 2), jnp.int32)
  return {"image1": image, "image2": image, "ul1": zeros, "ul2": zeros,
          "br1": jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1)),
          "br2": jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1)),
          "flip": jnp.zeros((b, 2), bool)}


# CAC's selections: γ (pos_threshold, the positive gate `conf > γ`) and the reference δw.
DIAGNOSTIC_SELECTIONS = ("strong", "weak")


def pseudo_label_diagnostics(conf: tuple[jax.Array, jax.Array], labels: tuple[jax.Array, jax.Array],
                             gts: tuple[jax.Array, jax.Array], s: "Settings") -> dict:
  """`diagnostics.pseudo_label_quality` of CAC's pseudo-labels: the argmax and max softmax of
  the dropout-active classifier at stride 8 of both views (they filter the bank's negatives
  and, with `conf > γ`, gate the directions), against each view's ground truth (the pair
  stream crops and flips it with its image, `pair_ground_truth`), nearest-resized to
  stride 8 in the network-output orientation: the same pixels. `*_strong` is `conf > γ`
  (pos_threshold), `*_weak` the reference δw.

  Args:
    conf, labels: (view 1, view 2) f32[B,h,w], i32[B,h,w]; gts: (view 1, view 2) i32[B,H,W].
  Returns:
    {'pseudo_*': f32[]} with `DIAGNOSTIC_SELECTIONS`.
  """
  hw = conf[0].shape[1:3]
  gt = jnp.concatenate([resampling.resize_nearest_torch(g, hw) for g in gts])
  conf, labels = jnp.concatenate(conf), jnp.concatenate(labels)
  return diagnostics.pseudo_label_quality(
      conf, labels, gt, thresholds={"weak": s.diag.reference["weak"]},
      selections={"strong": conf > jnp.float32(s.pos_threshold)})


def pair_ground_truth(batch: dict) -> tuple[jax.Array, jax.Array] | None:
  """The views' ground truth i32[B,H,W] of the unlabelled pair batch (the fallback plain
  batch: its 'label' for both identical crops), or None when it has none."""
  if "label1" in batch:
    return batch["label1"], batch["label2"]
  if "label" in batch:
    return batch["label"], batch["label"]
  return None


def bank_entry(feat1: jax.Array, feat2: jax.Array, label1: jax.Array, label2: jax.Array,
               num_groups: int) -> tuple[jax.Array, jax.Array]:
  """This step's bank rows in the official gather order: group (GPU) by group, each
  [view 1 pixels; view 2 pixels] in raster order (the official permutes them within each
  view, which only moves rows in and out of the max-shift's first 8000).

  feat f32[B,h,w,D], label i32[B,h,w] -> (f32[2*B*h*w, D], i32[2*B*h*w]).
  """
  d = feat1.shape[-1]
  feats = jnp.stack([feat1.reshape(num_groups, -1, d), feat2.reshape(num_groups, -1, d)], axis=1)
  labels = jnp.stack([label1.reshape(num_groups, -1), label2.reshape(num_groups, -1)], axis=1)
  return feats.reshape(-1, d), labels.reshape(-1)


class CAC(base.Method):
  """CE on the labelled batch + weight * (L1 + L2) of the directional contrastive loss."""

  def __init__(self, model: CACModel, settings: Settings):
    super().__init__(model)
    self.settings = settings
    self.description = (f"CAC (directional context-aware consistency, bank of "
                        f"{settings.step_save + 1} steps, {settings.numerics} numerics)")

  def streams(self):
    return {base.LABELED: base.LABELED_STREAM,
            UNLABELED_PAIR: datasets.Stream(subset="unlabeled", augment=False, kind="pair",
                                            pair=self.settings.pair)}

  def bank_shape(self) -> tuple[int, int, int]:
    s = self.settings
    h, w = (x // cac_lib.FEATURE_STRIDE for x in s.crop_size)
    return s.step_save + 1, 2 * s.pair_batch * h * w, s.proj_dim

  def init_extra(self, key, variables):
    del key, variables
    return {"bank": cac_lib.init_bank(*self.bank_shape())}

  def _apply(self, params, batch_stats, images, key, pooled):
    outputs, updates = self.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, pooled=pooled, mutable=["batch_stats"],
                                     rngs={"dropout": key})
    return outputs, updates["batch_stats"]

  def unsupervised(self, params, batch_stats, bank: dict, pair: dict, writes: jax.Array,
                   key: jax.Array, gts: tuple[jax.Array, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array, dict, dict, jax.Array, dict]:
    """Both views through the student, the bank write, the loss.

    Args:
      gts: the views' ground truth (`pair_ground_truth`) for the `pseudo_*` diagnostics, or
        None; it enters no loss.
    Returns:
      (loss1, loss2, batch_stats, new bank, selected fraction f32[], diagnostics {'pseudo_*'}
       ({} without `gts`)).
    """
    s = self.settings
    key1, key2 = jax.random.split(key)
    out1, batch_stats = self._apply(params, batch_stats, pair["image1"], key1, True)
    out2, batch_stats = self._apply(params, batch_stats, pair["image2"], key2, True)
    feat1, feat2 = out1["proj"], out2["proj"]
    expected = self.bank_shape()
    if feat1.shape[1] * feat1.shape[2] * feat1.shape[0] * 2 != expected[1]:
      raise ValueError(f"cac: the pooled map {feat1.shape[1:3]} is not input.crop_size/8 "
                       f"(a stride-4 decoder map is needed: config.model.name=deeplabv3plus)")
    conf1, label1 = cac_lib.confidence_and_label(out1["logits"])
    conf2, label2 = cac_lib.confidence_and_label(out2["logits"])
    entry, entry_labels = bank_entry(feat1, feat2, label1, label2, s.mean_groups)
    bank = cac_lib.bank_write(bank, writes, entry, entry_labels)
    feats, labels, valid = cac_lib.bank_in_official_order(bank, writes)
    loss1, loss2, extras = cac_lib.cac_loss(
        feat1, feat2, conf1, conf2, label1, label2, pair["ul1"], pair["br1"], pair["ul2"],
        pair["flip"], feats, labels, valid, temperature=s.temperature,
        pos_threshold=s.pos_threshold, numerics=s.numerics, chunk_size=s.chunk_size,
        max_shift_rows=s.max_shift_rows, num_groups=s.mean_groups)
    selected = jnp.sum(extras["mask1"]) + jnp.sum(extras["mask2"])
    fraction = selected / jnp.maximum(2 * jnp.sum(extras["overlap"]), 1)
    diag = ({} if gts is None else
            pseudo_label_diagnostics((conf1, conf2), (label1, label2), gts, s))
    return loss1, loss2, batch_stats, bank, fraction.astype(jnp.float32), diag

  def loss(self, params, state, batch, key):
    """CE + weight * (L1 + L2); metrics `loss`, `sup_loss`, `unsup_loss` (= weight *
    (L1 + L2)), `cac_loss1`, `cac_loss2`, `cac_selected_fraction` (overlap positions selected
    by the directional masks, both directions); with `diagnostics.pseudo_labels`, the
    `pseudo_*` metrics (`pseudo_label_diagnostics`; NaN during the warm-up)."""
    s = self.settings
    key_l, key_u = jax.random.split(key)
    labeled = batch[base.LABELED]
    out_l, batch_stats = self._apply(params, state.batch_stats, labeled["image"], key_l, False)
    sup = supervised_lib.supervised_loss(out_l["logits"], labeled["label"])
    pair = as_pair_batch(batch[UNLABELED_PAIR])
    bank = state.extra["bank"]
    writes = state.step - s.unsup_start_step
    gts = pair_ground_truth(batch[UNLABELED_PAIR]) if s.diag.pseudo_labels else None

    def active(batch_stats):
      return self.unsupervised(params, batch_stats, bank, pair, writes, key_u, gts)

    def warmup(batch_stats):
      # Official: no unlabelled forward at all before epoch_start_unsup; so no pseudo-labels
      # (their diagnostics undefined: NaN).
      zero = jnp.zeros((), jnp.float32)
      diag = {} if gts is None else diagnostics.undefined(DIAGNOSTIC_SELECTIONS)
      return zero, zero, batch_stats, bank, zero, diag

    is_active = state.step >= s.unsup_start_step
    if skips_by_cond(s.warmup_skip, jax.default_backend()):
      loss1, loss2, batch_stats, bank, fraction, diag = jax.lax.cond(
          is_active, active, warmup, batch_stats)
    else:
      loss1, loss2, batch_stats, bank, fraction, diag = jax.tree.map(
          lambda on, off: jnp.where(is_active, on, off), active(batch_stats), warmup(batch_stats))
    unsup = s.weight * (loss1 + loss2)
    loss = sup + unsup
    metrics = {"loss": loss, "sup_loss": sup, "unsup_loss": unsup, "cac_loss1": loss1,
               "cac_loss2": loss2, "cac_selected_fraction": fraction, **diag}
    return loss, (metrics, {"batch_stats": batch_stats, "bank": jax.lax.stop_gradient(bank)})

  def after_update(self, state, aux, key):
    del key
    return state.replace(extra={"bank": aux["bank"]})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> CAC:
  c = config.cac
  wrapper = CACModel(segmenter=model, num_classes=num_classes, proj_dim=int(c.proj_dim),
                     proj_hidden=int(c.proj_hidden), decoder_dim=int(c.decoder_dim),
                     dropout=float(c.dropout))
  return CAC(wrapper, settings_from(config))
