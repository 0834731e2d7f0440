"""Contextrast: contextual contrastive learning for semantic segmentation (Sung et al., CVPR 2024).

No public code exists; sources: the paper (`../shared/reference/papers/contextrast.txt`) and
other_methods_spec §4 (Pissas et al.'s code, which Contextrast builds on, §4.1). The pure losses
(CCL anchors and fusion, BANE, the Table 2 baselines) live in `losses/contextrast.py`.

Supervised: loss = CE + α·Σ_i λ_i·L_i (paper Eq. 5) on the labelled stream. Per step:
1. The student (`ContextrastModel`) sees the labelled batch once; the wrapper projects the
   backbone levels `contextrast.levels` (default `layer1`..`layer4`: strides 4, 8, 16, 32
   undilated; 4, 8, 8, 8 with DeepLabv3's output stride 8) with one Pissas projector each.
2. The prediction BANE reads is `stop_gradient(argmax)` of the logits up-sampled to the label
   size (the CE's view: "the predicted class in the final layer", paper §3.3); the loss
   module nearest-down-samples it and the labels to every level (`resampling.resize_nearest_torch`).
3. `contextrast.loss` selects the auxiliary term (paper Table 2 rows on one network):
   "contextrast" (CCL + BANE), "pissas" (multi-scale + cross-scale, "[31]"), "contrastiveseg"
   (pixel-pixel with semi-hard sampling, "[41]", on the last level: [41] uses "the features
   of the last layer", paper §2) or "none" (CE only, the "DeepLabV3 / None" row; the heads
   are computed and unused).

As an auxiliary term of the mean-teacher methods (`config.aux_losses=("contextrast",)`, preset
`classmix_contextrast`): `AuxTerm` wraps the model with the same projectors and adds the
selected term on the labelled batch (and, with `contextrast.aux_pseudo_labels`, on the
student's augmented unlabelled batch with the teacher's pseudo-labels).

`TrainState.extra` = {} (no teacher); evaluation uses the student (the heads do not run).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from reco_jax.losses import contextrast as contextrast_lib
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base
from reco_jax.models import resnet

LOSSES = ("contextrast", "pissas", "contrastiveseg", "none")
# The model maps a level may read: the backbone stages, DeepLabv3's ASPP / v3+'s decoder map,
# and `rep` (the representation head, for models without stages, e.g. the tests' toy model).
LEVEL_SOURCES = ("layer1", "layer2", "layer3", "layer4", "aspp", "decoder", "rep")
# Pissas models/Projector.py: BatchNorm2d(momentum=0.0003) in PyTorch's convention
# (new = (1 - m)·old + m·batch) = flax momentum 1 - 0.0003 (spec §4.1).
PROJECTOR_BN_MOMENTUM = 1.0 - 0.0003
# Field name -> allowed values of the loss module's named choices (config errors name the key).
_CHOICES = {
    "absent_rule": contextrast_lib.ABSENT_RULES,
    "anchor_normalization": contextrast_lib.ANCHOR_NORMALIZATIONS,
    "negatives": contextrast_lib.NEGATIVE_SOURCES, "reduction": contextrast_lib.REDUCTIONS,
    "error_map": contextrast_lib.ERROR_MAPS, "selection_scope": contextrast_lib.SELECTION_SCOPES,
    "fallback": contextrast_lib.FALLBACKS, "sampling": contextrast_lib.CONTRASTIVESEG_SAMPLING,
}


class Projector(nn.Module):
  """Pissas's per-level projector (models/Projector.py, spec §4.1): 1x1 conv c->c, ReLU,
  BatchNorm (momentum 0.0003 in PyTorch's convention), 1x1 conv c->`dim`.

  `__call__(x f32[B,h,w,c], train)` -> f32[B,h,w,dim] (not normalised: the losses normalise).
  """
  dim: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = resnet.Conv2d(x.shape[-1], 1, use_bias=True, name="conv_0")(x)
    x = nn.relu(x)
    x = resnet.BatchNorm(momentum=PROJECTOR_BN_MOMENTUM, name="bn")(x, train)
    return resnet.Conv2d(self.dim, 1, use_bias=True, name="conv_1")(x)


class ContextrastModel(nn.Module):
  """The student: the segmentation model plus one `Projector` per level.

  `__call__(images f32[B,H,W,3], train)` -> the model's {'logits', 'rep', 'features'} plus, in
  train mode (and at init), 'contextrast': a tuple of f32[B,h_i,w_i,proj_dim], one per entry
  of `levels` (first = highest resolution). Params: `segmenter`, `projector_<i>`.
  """
  segmenter: nn.Module
  levels: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
  proj_dim: int = 256

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict:
    out = self.segmenter(images, train)
    if not (train or self.is_initializing()):
      return out  # evaluation reads the logits only
    maps = {**out["features"], "rep": out["rep"]}
    missing = [name for name in self.levels if name not in maps]
    if missing:
      raise ValueError(f"config contextrast.levels={self.levels!r}: the model has no "
                       f"{', '.join(missing)} (it has {', '.join(sorted(maps))})")
    proj = tuple(Projector(self.proj_dim, name=f"projector_{i}")(
        maps[name].astype(jnp.float32), train) for i, name in enumerate(self.levels))
    return {**out, "contextrast": proj}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static Contextrast settings (config.contextrast)."""
  loss: str
  levels: tuple[str, ...]
  proj_dim: int
  aux_pseudo_labels: bool
  contextrast: contextrast_lib.ContextrastSettings
  pissas: contextrast_lib.PissasSettings
  contrastiveseg: contextrast_lib.ContrastiveSegSettings


# Keys of config.contextrast that are not fields of ContextrastSettings.
_OWN_KEYS = ("loss", "levels", "proj_dim", "aux_pseudo_labels", "pissas", "contrastiveseg")


def dataclass_from(cls: type, section: ml_collections.ConfigDict, prefix: str,
                   skip: tuple[str, ...] = ()) -> Any:
  """`cls(**given)` from the config section: a field set to None keeps the dataclass default
  (the loss module is the single source of the defaults), anything else is cast to the
  default's type. One-line errors name the config key (`prefix.field`)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(section.keys()) - set(fields) - set(skip))
  if unknown:
    raise ValueError(f"config {prefix}.{unknown[0]} is not a setting; known: {', '.join(fields)}")
  given = {}
  for name, field in fields.items():
    value = section.get(name)
    if value is None:
      continue
    if name in _CHOICES and value not in _CHOICES[name]:
      raise ValueError(f"config {prefix}.{name}={value!r} is invalid; expected one of "
                       f"{', '.join(_CHOICES[name])}")
    default = field.default
    try:
      given[name] = (tuple(float(v) for v in value) if isinstance(default, tuple)
                     else type(default)(value))
    except (TypeError, ValueError):
      raise ValueError(f"config {prefix}.{name}={value!r} is invalid; expected "
                       f"{type(default).__name__}") from None
  try:
    return cls(**given)
  except ValueError as e:
    raise ValueError(f"config {prefix}: {e}") from None


def settings_from(config: ml_collections.ConfigDict) -> Settings:
  """Static settings of `config.contextrast`, with one-line errors naming the key at fault."""
  c = config.contextrast
  loss = base.check_choice(config, "contextrast.loss", LOSSES)
  levels = tuple(c.levels)
  bad = [name for name in levels if name not in LEVEL_SOURCES]
  if not levels or bad:
    raise ValueError(f"config contextrast.levels={levels!r} is invalid; expected names from "
                     f"{', '.join(LEVEL_SOURCES)}")
  if isinstance(c.proj_dim, bool) or not isinstance(c.proj_dim, int) or c.proj_dim <= 0:
    raise ValueError(f"config contextrast.proj_dim={c.proj_dim!r} must be a positive int")
  s = Settings(
      loss=loss, levels=levels, proj_dim=int(c.proj_dim),
      aux_pseudo_labels=bool(c.aux_pseudo_labels),
      contextrast=dataclass_from(contextrast_lib.ContextrastSettings, c, "contextrast",
                                 skip=_OWN_KEYS),
      pissas=dataclass_from(contextrast_lib.PissasSettings, c.pissas, "contextrast.pissas"),
      contrastiveseg=dataclass_from(contextrast_lib.ContrastiveSegSettings, c.contrastiveseg,
                                    "contextrast.contrastiveseg"))
  weights = {"contextrast": ("contextrast.level_weights", s.contextrast.level_weights),
             "pissas": ("contextrast.pissas.level_weights", s.pissas.level_weights)}
  if loss in weights and len(weights[loss][1]) != len(levels):
    key, values = weights[loss]
    raise ValueError(f"config {key} has {len(values)} values for the {len(levels)} "
                     f"contextrast.levels={levels!r}")
  return s


def predicted_classes(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """BANE's prediction: `stop_gradient(argmax)` of the logits f[B,h,w,C] up-sampled (bilinear,
  align_corners, as the CE) to `size` -> i32[B,*size]."""
  up = supervised_lib.upsample_logits(jax.lax.stop_gradient(logits), size)
  return jnp.argmax(up, axis=-1).astype(jnp.int32)


def contrastive_term(key: jax.Array, feats: tuple[jax.Array, ...], labels: jax.Array,
                     logits: jax.Array, num_classes: int, s: Settings
                     ) -> tuple[jax.Array, dict]:
  """The selected auxiliary term, already weighted (α·Σλ_i·L_i, Pissas's 0.1·[...], or
  ContrastiveSeg's loss_weight·τ/τ_base·L).

  Args:
    feats: the projected levels f32[B,h_i,w_i,D] (first = highest resolution).
    labels: i32[B,H,W] (-1 ignore); logits: f[B,h,w,C] the student's (BANE and the
      semi-hard sampling read their argmax).
  Returns:
    (weighted term f32[], metrics {'contrastive_loss', and the unweighted parts}).
  """
  zero = jnp.zeros((), jnp.float32)
  if s.loss == "none":
    return zero, {"contrastive_loss": zero}
  metrics = {}
  if s.loss == "contextrast":
    pred = predicted_classes(logits, labels.shape[1:3])
    total, per_level = contextrast_lib.contextrast_loss(key, list(feats), labels, pred,
                                                        num_classes, s.contextrast)
    metrics = {f"contextrast_level{i + 1}": per_level[i] for i in range(len(feats))}
  elif s.loss == "pissas":
    total, parts = contextrast_lib.pissas_loss(key, list(feats), labels, num_classes, s.pissas)
    metrics = {f"pissas_multi_scale{i + 1}": parts["multi_scale"][i] for i in range(len(feats))}
    metrics.update({f"pissas_cross_scale{j + 1}": parts["cross_scale"][j]
                    for j in range(parts["cross_scale"].shape[0])})
  else:  # contrastiveseg, on the last level
    pred = predicted_classes(logits, labels.shape[1:3])
    total = contextrast_lib.contrastiveseg_loss(key, feats[-1], labels, pred, num_classes,
                                                s.contrastiveseg)
  return total, {"contrastive_loss": total, **metrics}


class Contextrast(base.Method):
  """CE + the selected contrastive term on the labelled batch (no teacher)."""

  def __init__(self, model: ContextrastModel, settings: Settings, num_classes: int):
    super().__init__(model)
    self.settings = settings
    self.num_classes = num_classes
    self.description = (f"Contextrast (supervised CE + {settings.loss} on "
                        f"{'/'.join(settings.levels)})")

  def loss(self, params, state, batch, key):
    """CE + term. Metrics: `loss`, `sup_loss`, `contrastive_loss` (the weighted term) and the
    term's unweighted parts (`contextrast_level<i>`, or `pissas_multi_scale<i>` and
    `pissas_cross_scale<j>`)."""
    labeled = batch[base.LABELED]
    out, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    sup = supervised_lib.supervised_loss(out["logits"], labeled["label"])
    term, metrics = contrastive_term(key, out["contextrast"], labeled["label"], out["logits"],
                                     self.num_classes, self.settings)
    loss = sup + term
    return loss, ({"loss": loss, "sup_loss": sup, **metrics}, {"batch_stats": batch_stats})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> Contextrast:
  if tuple(config.aux_losses):
    raise ValueError(f"config aux_losses={tuple(config.aux_losses)!r} is not supported by method "
                     f"contextrast (its contrastive term is built in: contextrast.loss)")
  s = settings_from(config)
  return Contextrast(ContextrastModel(segmenter=model, levels=s.levels, proj_dim=s.proj_dim),
                     s, num_classes)


@dataclasses.dataclass(frozen=True)
class AuxTerm:
  """Contextrast (or a Table 2 baseline, `contextrast.loss`) as an auxiliary term of the
  mean-teacher methods (`config.aux_losses=("contextrast",)`).

  The model gains the projectors (`ContextrastModel`: student and teacher); the term reads
  the student's projected levels of the labelled batch with its ground truth and, with
  `contextrast.aux_pseudo_labels`, of the augmented unlabelled batch with the teacher's
  confident pseudo-labels (`ctx.valid_u`: confidence >= delta_w, the rule of the stateless
  terms such as ReCo's), in one call (the anchors are class means over both). No state of its own (`init_state` -> {}).
  """
  settings: Settings
  num_classes: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "AuxTerm":
    return cls(settings=settings_from(config), num_classes=num_classes)

  def wrap_model(self, model) -> ContextrastModel:
    return ContextrastModel(segmenter=model, levels=self.settings.levels,
                            proj_dim=self.settings.proj_dim)

  def init_state(self, key: jax.Array, variables) -> dict:
    del key, variables
    return {}

  def stateful_call(self, key: jax.Array, ctx, state: dict):
    """-> (weighted term, metrics `contextrast_*`, state, student and teacher batch_stats:
    unchanged, the projectors ran in the student's passes)."""
    feats, labels, logits = ctx.out_l["contextrast"], ctx.labels_l, ctx.out_l["logits"]
    if self.settings.aux_pseudo_labels:
      feats = tuple(jnp.concatenate([a, b]) for a, b in zip(feats, ctx.out_u["contextrast"]))
      labels = jnp.concatenate([labels, jnp.where(ctx.valid_u, ctx.labels_u, -1)])
      logits = jnp.concatenate([logits, ctx.out_u["logits"]])
    total, metrics = contrastive_term(key, feats, labels, logits, self.num_classes,
                                      self.settings)
    metrics = {f"contextrast_aux_{k}": v for k, v in metrics.items()}
    return total, metrics, state, ctx.batch_stats, ctx.teacher["batch_stats"]
