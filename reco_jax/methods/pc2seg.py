"""PC²Seg: pixel contrastive-consistent semi-supervised segmentation (Zhong et al., ICCV 2021).

No public code exists; the source is the article (`../shared/reference/papers/
pc2seg_article.txt`) and other_methods_spec §3. Losses and sampling: losses/pc2seg.py.

Per step:
1. `make_views`: from the one unlabelled stream (crop/pad only, as the mean teacher's), on
   device, a weak view = random rescale-crop + horizontal flip (`augment.random_rescale_crop`,
   `input.scale_range`, `input.flip_prob`) and a strong view = the weak view + colour jitter
   and Gaussian blur (`augment.photometric_augment`, `input.color_jitter_prob`,
   `input.blur_prob`) with no further geometry: pixel i is the same scene point in both.
2. The student sees the labelled batch, the weak and the strong view in three forward passes
   (BatchNorm statistics per sub-batch, as the mean teacher's). There is no teacher: the weak
   branch is the student itself (a Siamese pair), its probabilities under stop-gradient.
3. `losses.pc2seg.draw`: anchors, a candidate pool and negatives from `p_ij` of
   `pc2seg.negative_sampling`, at the feature resolution.
4. loss = CE(labelled) + λ1·L_ce + λ2·L_cy (losses/pc2seg.py: `unlabelled_loss`).

Network (`PC2SegModel`, wrapping the segmentation model it is given): the model plus the
article's "linear mapping layer" on its representation map: `proj` = Dense(pc2seg.proj_dim)
of `rep` (f32[B,h,w,rep_dim], stride 4 for DeepLabv3+). The trainer initialises, trains,
checkpoints (`params['segmenter']`, `params['projection']`) and evaluates the wrapper; its
`logits` are the model's.

`TrainState.extra` = {} (no teacher, no bank); evaluation uses the student.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from input_pipeline import datasets
from reco_jax import augment, diagnostics, resampling
from reco_jax.losses import pc2seg as pc2seg_lib
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base

UNLABELED = base.UNLABELED
# Crop/pad only on the host; both views are made on device from this one stream.
UNLABELED_STREAM = datasets.Stream(subset="unlabeled", augment=False)


class PC2SegModel(nn.Module):
  """The student: the given segmentation model plus a linear projection of its `rep`.

  `__call__(images f32[B,H,W,3], train)` -> the model's {'logits', 'rep', 'features'} plus
  'proj': f32[B,h,w,proj_dim] (not normalised: the loss takes cosines).
  """
  segmenter: nn.Module
  proj_dim: int = 128

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict:
    out = self.segmenter(images, train)
    proj = nn.Dense(self.proj_dim, name="projection")(out["rep"].astype(jnp.float32))
    return {**out, "proj": proj}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static PC²Seg hyper-parameters (config.pc2seg and the view augmentation)."""
  loss: pc2seg_lib.LossSettings
  negative_sampling: str
  anchors_per_image: int
  pool_size: int
  num_negatives: int
  replacement: bool
  scale_range: tuple[float, float]
  crop_size: tuple[int, int]
  flip_prob: float
  color_jitter_prob: float
  blur_prob: float
  # config.diagnostics: pseudo_* metrics against the unlabelled ground truth (no effect on training).
  diag: diagnostics.Settings = diagnostics.Settings()


def _positive(c: ml_collections.ConfigDict, name: str, kind=int):
  value = c[name]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ValueError(f"config pc2seg.{name}={value!r} must be a positive {kind.__name__}")
  return kind(value)


def settings_from(config: ml_collections.ConfigDict) -> Settings:
  """Static settings of `config`, with one-line errors naming the config key at fault."""
  c = config.pc2seg
  for name in ("contrastive_weight", "consistency_weight"):
    if float(c[name]) < 0:
      raise ValueError(f"config pc2seg.{name}={c[name]!r} must be >= 0")
  loss = pc2seg_lib.LossSettings(
      temperature=_positive(c, "temperature", float),
      contrastive_weight=float(c.contrastive_weight),
      consistency_weight=float(c.consistency_weight),
      anchor_view=base.check_choice(config, "pc2seg.anchor_view", pc2seg_lib.VIEWS),
      anchor_grad=bool(c.anchor_grad), positive_grad=bool(c.positive_grad),
      negative_grad=bool(c.negative_grad),
      reduction=base.check_choice(config, "pc2seg.reduction", pc2seg_lib.REDUCTIONS),
      consistency_pixels=base.check_choice(config, "pc2seg.consistency_pixels",
                                           pc2seg_lib.CONSISTENCY_PIXELS))
  replacement = bool(c.replacement)
  num_negatives = _positive(c, "num_negatives")
  pool_size = _positive(c, "pool_size")
  if not replacement and num_negatives > pool_size:
    raise ValueError(f"config pc2seg.num_negatives={num_negatives} exceeds "
                     f"pc2seg.pool_size={pool_size}: without replacement (pc2seg.replacement="
                     f"False) each anchor needs that many distinct candidates")
  return Settings(
      loss=loss,
      negative_sampling=base.check_choice(config, "pc2seg.negative_sampling", pc2seg_lib.RULES),
      anchors_per_image=_positive(c, "anchors_per_image"), pool_size=pool_size,
      num_negatives=num_negatives, replacement=replacement,
      scale_range=tuple(float(x) for x in config.input.scale_range),
      crop_size=tuple(int(x) for x in config.input.crop_size),
      flip_prob=float(config.input.flip_prob),
      color_jitter_prob=float(config.input.color_jitter_prob),
      blur_prob=float(config.input.blur_prob), diag=diagnostics.settings_from(config))


def make_views(key: jax.Array, images: jax.Array, s: Settings
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The weak and the strong view of each unlabelled image, with the same geometry.

  Args:
    images: f32[B,H,W,3] normalised crops of the unlabelled stream.
  Returns:
    (weak f32[B,h,w,3], strong f32[B,h,w,3], valid bool[B,h,w]) at `s.crop_size`; `valid`
    is False where the rescale-crop padded (both views share it).
  """
  zeros = jnp.zeros(images.shape[:3], jnp.int32)
  return make_views_and_labels(key, images, zeros, s)[:3]


def make_views_and_labels(key: jax.Array, images: jax.Array, labels: jax.Array, s: Settings
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`make_views`, plus `labels` i32[B,H,W] carried through the views' geometry (nearest,
  -1 where padded) -> (weak, strong, valid, labels i32[B,h,w]). The labels' values do not
  touch the views (only their shape is read), so the views are those of `make_views`."""
  key_geometry, key_flip, key_photo = jax.random.split(key, 3)
  # The geometry is applied once; `confidence` = 1 carries the padding mask through it.
  ones = jnp.ones(images.shape[:3], jnp.float32)
  weak, labels, inside = augment.random_rescale_crop(key_geometry, images, labels, ones,
                                                     s.scale_range, s.crop_size, quantize=False)
  weak, labels, inside = augment.photometric_augment(key_flip, weak, labels, inside,
                                                     jitter_prob=0.0, blur_prob=0.0,
                                                     flip_prob=s.flip_prob, quantize=False)
  # Photometric only (flip_prob 0): the strong view keeps the weak view's geometry.
  strong, _, _ = augment.photometric_augment(key_photo, weak, jnp.zeros(inside.shape, jnp.int32),
                                             inside, jitter_prob=s.color_jitter_prob,
                                             blur_prob=s.blur_prob, flip_prob=0.0, quantize=False)
  return weak, strong, inside > 0, labels


def pseudo_label_diagnostics(probs_w: jax.Array, gt_weak: jax.Array, s: Settings) -> dict:
  """`diagnostics.pseudo_label_quality` of PC²Seg's targets: the weak view's (stop-gradient)
  class probabilities at the logits' resolution, which the consistency term and the
  negative sampling read, against the ground truth carried through the weak view's geometry
  and nearest-resized to that grid (as `valid`): the same pixels. No threshold of its own:
  the reference δs, δw on the max probability.

  Args:
    probs_w: f32[B,h,w,C]; gt_weak: i32[B,H,W] at the view size (-1 void or padded).
  Returns:
    {'pseudo_*': f32[]}.
  """
  gt = resampling.resize_nearest_torch(gt_weak, probs_w.shape[1:3])
  return diagnostics.pseudo_label_quality_from_probs(probs_w, gt, thresholds=s.diag.reference)


class PC2Seg(base.Method):
  """CE on the labelled batch + λ1·pixel InfoNCE + λ2·(1 − cos) consistency on the unlabelled."""

  def __init__(self, model: PC2SegModel, settings: Settings):
    super().__init__(model)
    self.settings = settings
    self.description = (f"PC2Seg (weak/strong views, pixel InfoNCE with "
                        f"{settings.negative_sampling} negatives + consistency)")

  def streams(self):
    return {base.LABELED: base.LABELED_STREAM, UNLABELED: UNLABELED_STREAM}

  def unlabelled(self, params, batch_stats, images: jax.Array, key: jax.Array,
                 gt: jax.Array | None = None) -> tuple[jax.Array, dict, dict]:
    """Views, the two student passes, the draws and the unlabelled loss.

    Args:
      gt: i32[B,H,W] the unlabelled images' ground truth (-1 void), or None: only for the
        `pseudo_*` diagnostics, never in the loss.
    Returns:
      (λ1·L_ce + λ2·L_cy, parts {'contrastive', 'consistency', 'valid_anchor_fraction'} and,
       with `gt`, 'diagnostics' {'pseudo_*'}, new batch_stats).
    """
    s = self.settings
    key_views, key_draws = jax.random.split(key)
    labels = jnp.zeros(images.shape[:3], jnp.int32) if gt is None else gt
    weak, strong, valid, gt_weak = make_views_and_labels(key_views, images, labels, s)
    out_w, batch_stats = self.apply_train(params, batch_stats, weak)
    out_s, batch_stats = self.apply_train(params, batch_stats, strong)
    if out_w["proj"].shape[1:3] != out_w["logits"].shape[1:3]:
      raise ValueError(f"pc2seg: the model's rep {out_w['proj'].shape[1:3]} and logits "
                       f"{out_w['logits'].shape[1:3]} must have the same resolution")
    valid = resampling.resize_nearest_torch(valid, out_w["logits"].shape[1:3])
    probs_w = jax.nn.softmax(jax.lax.stop_gradient(out_w["logits"]), axis=-1)
    probs_s = jax.nn.softmax(out_s["logits"], axis=-1)
    draws = pc2seg_lib.draw(key_draws, valid, probs_w, rule=s.negative_sampling,
                            anchors_per_image=s.anchors_per_image, pool_size=s.pool_size,
                            num_negatives=s.num_negatives, replacement=s.replacement)
    loss, parts = pc2seg_lib.unlabelled_loss(draws, out_w["proj"], out_s["proj"], probs_w, probs_s,
                                             valid, s.loss)
    if gt is not None:
      parts = {**parts, "diagnostics": pseudo_label_diagnostics(probs_w, gt_weak, s)}
    return loss, parts, batch_stats

  def loss(self, params, state, batch, key):
    """CE + λ1·L_ce + λ2·L_cy. Metrics: `loss`, `sup_loss`, `unsup_loss` (= λ1·L_ce + λ2·L_cy),
    `pc2seg_contrastive` (L_ce), `pc2seg_consistency` (L_cy), `pc2seg_valid_anchor_fraction`
    (anchors with at least one negative of positive probability); with
    `diagnostics.pseudo_labels`, the `pseudo_*` metrics (`pseudo_label_diagnostics`)."""
    labeled = batch[base.LABELED]
    out_l, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    sup = supervised_lib.supervised_loss(out_l["logits"], labeled["label"])
    unlabeled = batch[UNLABELED]
    gt = unlabeled["label"] if self.settings.diag.pseudo_labels else None
    unsup, parts, batch_stats = self.unlabelled(params, batch_stats, unlabeled["image"], key, gt)
    loss = sup + unsup
    metrics = {"loss": loss, "sup_loss": sup, "unsup_loss": unsup,
               "pc2seg_contrastive": parts["contrastive"],
               "pc2seg_consistency": parts["consistency"],
               "pc2seg_valid_anchor_fraction": parts["valid_anchor_fraction"],
               **parts.get("diagnostics", {})}
    return loss, (metrics, {"batch_stats": batch_stats})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> PC2Seg:
  del num_classes
  settings = settings_from(config)
  return PC2Seg(PC2SegModel(segmenter=model, proj_dim=_positive(config.pc2seg, "proj_dim")),
                settings)
