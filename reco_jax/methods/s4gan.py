"""S4GAN: the adversarial baseline of ReCo's Table 1 (Mittal et al., TPAMI 2019; s4gan_spec.md).

Official: `sud0301/semisup-semseg` (`train_s4GAN.py`, `model/discriminator.py`), the s4GAN
branch only (no MLMT classifier). Per step (spec §1), with the discriminator D's parameters
as they were before the step:

  generator (student) step, `loss`:
    CE on the labelled batch (logits up-sampled, align_corners=True);
    the unlabelled batch through the student (its own BatchNorm batch statistics);
    fake = [softmax(up-sampled logits), min-max of the unlabelled images]  (f32[B,H,W,C+3]);
    real = [one-hot GT (zeros at ignore), min-max of D's real images]     (constant);
    D(fake) -> confidence and pooled features, D(real) -> pooled features (dropout on);
    feature matching = mean_k |mean_b f_real - mean_b f_fake|;
    self-training CE on whole images with D(fake) > threshold_st, pseudo-labels the argmax
    of the same logits, never at step 0;
    loss = CE + lambda_fm * FM + lambda_st * ST.
  discriminator step, `after_update_and_metrics` (from the same pre-update D and the
    generator step's detached fake input):
    loss_D = (BCE(D(fake), 0) + BCE(D(real), 1)) / 2 with PyTorch's log clamp at -100;
    Adam(b1 0.9, b2 0.99) with the student's poly schedule shape at base s4gan.lr_d.

Both gradients come from the pre-update parameters of both networks, so the two updates are
simultaneous as officially (their order does not matter). D is always in train mode: each of
the four forwards draws its own channel-dropout masks (Dropout2d). D runs in float32.

`TrainState.extra` = {'d_params': D's parameters, 'd_opt_state': its Adam state}.
Streams: `labeled` (CE), `unlabeled` (the same augmentation as the labelled stream: the three
official loaders share one dataset transform) and, with `s4gan.real_batch='separate'` (the
official), `labeled_real`: a third, independent draw of labelled images for D's real input.
The student is evaluated (S4GAN has no teacher).
"""
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from input_pipeline import datasets
from reco_jax import diagnostics, optim
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base

PyTree = Any
UNLABELED = base.UNLABELED
LABELED_REAL = "labeled_real"
# The official three loaders read one dataset with one transform: the unlabelled and the
# real images are augmented as the labelled ones.
UNLABELED_STREAM = datasets.Stream(subset="unlabeled", augment=True)
POOLS = ("global", "fixed")
REAL_BATCHES = ("separate", "labeled")
# The four discriminator forwards of one step, each with its own dropout masks (Q1).
FORWARDS = ("g_fake", "g_real", "d_fake", "d_real")
BCE_LOG_MIN = -100.0  # torch BCELoss clamps each log term here
BCE_GRAD_EPS = 1e-12  # torch BCELoss backward: (p - y) / max(p (1 - p), eps)


# ------------------------------------------------------------------------------------------
# The discriminator (model/discriminator.py: s4GAN_discriminator).
# ------------------------------------------------------------------------------------------


def torch_uniform_init(fan_in: int) -> Callable:
  """PyTorch's default conv/linear init, U(+-1/sqrt(fan_in)) (kaiming_uniform(a=sqrt 5) for
  weights, the bias rule for biases)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def pool_features(x: jax.Array, pool: str, pool_size: tuple[int, int]) -> jax.Array:
  """Pooled conv4 map f32[B,h,w,F] -> f32[B,F] (the feature-matching features).

  'global': the mean over the map. 'fixed': the official `AvgPool2d(pool_size)` (stride =
  kernel), which averages the top-left `pool_size` block and is a global mean only when the
  map is exactly `pool_size` (quirk Q4); a map that gives more than one cell crashes the
  official `fc`, and fails here with one line.
  """
  if pool == "global":
    return jnp.mean(x, axis=(1, 2))
  kh, kw = pool_size
  h, w = x.shape[1:3]
  if h // kh != 1 or w // kw != 1:
    raise ValueError(f"config s4gan.pool='fixed' with s4gan.pool_size={tuple(pool_size)} needs a "
                     f"discriminator map of {kh}..{2 * kh - 1} x {kw}..{2 * kw - 1} (16x the crop "
                     f"scale), got {h}x{w}; use s4gan.pool='global'")
  return jnp.mean(x[:, :kh, :kw], axis=(1, 2))


class S4GANDiscriminator(nn.Module):
  """Four k4/s2/p1 convs (ndf, 2ndf, 4ndf, 8ndf; LeakyReLU 0.2; channel dropout after the
  first three), a pool and `fc` 8ndf -> 1 with a sigmoid.

  `__call__(x f32[B,H,W,C+3], deterministic, masks=None)` -> (prob f32[B,1], features
  f32[B,8ndf]). Each conv maps n -> floor(n/2) (explicit padding 1, never 'SAME': 321 ->
  160). Dropout needs the 'dropout' rng unless `deterministic`; `masks` (three f32[B,C_l]
  keep factors, 0 or 1/(1-rate)) replaces the random draw (to replay recorded masks).
  """
  ndf: int = 64
  dropout: float = 0.5
  pool: str = "global"
  pool_size: tuple[int, int] = (20, 20)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               masks: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    for i, mult in enumerate((1, 2, 4, 8)):
      fan_in = x.shape[-1] * 16
      x = nn.Conv(self.ndf * mult, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=torch_uniform_init(fan_in), bias_init=torch_uniform_init(fan_in),
                  name=f"conv{i + 1}")(x)
      x = nn.leaky_relu(x, 0.2)
      if i < 3:
        if masks is not None:
          x = x * masks[i][:, None, None, :]
        else:
          # Dropout2d on NCHW = whole channels per sample: broadcast over H and W.
          x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    feat = pool_features(x, self.pool, self.pool_size)
    logit = nn.Dense(1, kernel_init=torch_uniform_init(feat.shape[-1]),
                     bias_init=torch_uniform_init(feat.shape[-1]), name="fc")(feat)
    return jax.nn.sigmoid(logit), feat


def dropout_masks(key: jax.Array, batch: int, ndf: int, rate: float) -> tuple[jax.Array, ...]:
  """Dropout2d keep factors of conv1..3, 0 or 1/(1-rate) per (sample, channel):
  (f32[B,ndf], f32[B,2ndf], f32[B,4ndf]). One draw for the three layers: each random call
  site compiles its own bit generator, which dominates XLA:CPU compile time here."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (batch, 7 * ndf))
  scaled = keep.astype(jnp.float32) / (1.0 - rate)
  return scaled[:, :ndf], scaled[:, ndf:3 * ndf], scaled[:, 3 * ndf:]


# ------------------------------------------------------------------------------------------
# Inputs and losses (pure functions; NHWC, labels i32 with -1 = ignore).
# ------------------------------------------------------------------------------------------


def minmax_normalise(images: jax.Array, range_of: jax.Array | None = None) -> jax.Array:
  """`(x - min x) / (max r - min r)` over the whole batch tensor (all images and channels,
  quirk Q2), r = `range_of` (default x; the official real input uses the labelled batch's
  range, Q3). A constant `range_of` divides by 1 instead of 0.

  f32[B,H,W,3] -> f32[B,H,W,3].
  """
  ref = images if range_of is None else range_of
  spread = jnp.max(ref) - jnp.min(ref)
  return (images - jnp.min(images)) / jnp.where(spread > 0, spread, 1.0)


def fake_input(logits: jax.Array, images: jax.Array) -> jax.Array:
  """D's fake input: [softmax(logits), min-max images], class maps first.

  logits f32[B,H,W,C] (already at the image size), images f32[B,H,W,3] -> f32[B,H,W,C+3].
  """
  return jnp.concatenate([jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                          minmax_normalise(images)], axis=-1)


def real_input(labels: jax.Array, images: jax.Array, range_of: jax.Array,
               num_classes: int) -> jax.Array:
  """D's real input: [one-hot labels (all zero at ignore pixels, Q10), (x - min x) / range of
  `range_of`]. labels i32[B,H,W], images f32[B,H,W,3] -> f32[B,H,W,C+3] (constant)."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # -1 -> zeros
  return jax.lax.stop_gradient(
      jnp.concatenate([one_hot, minmax_normalise(images, range_of)], axis=-1))


def feature_matching_loss(feat_real: jax.Array, feat_fake: jax.Array) -> jax.Array:
  """`mean_k |mean_b real[b,k] - mean_b fake[b,k]|` (an L1 distance / F). The real features
  carry no gradient. f32[Br,F], f32[Bf,F] -> f32[]."""
  diff = jnp.mean(jax.lax.stop_gradient(feat_real), axis=0) - jnp.mean(feat_fake, axis=0)
  return jnp.mean(jnp.abs(diff))


def select_confident(prob: jax.Array, threshold: float) -> jax.Array:
  """Images D finds realistic: `prob > threshold`, compared in float32 as officially (Q6:
  float32(0.6) is not > 0.6). f32[B,1] -> bool[B]."""
  return jax.lax.stop_gradient(prob[:, 0].astype(jnp.float32) > jnp.float32(threshold))


def self_training_loss(logits: jax.Array, selected: jax.Array) -> jax.Array:
  """Mean CE of the selected images' pixels against their own argmax (first index on ties,
  no gradient through the label; Q8, Q9); 0 when none is selected.

  The static-shape form of the official copy-into-a-smaller-batch: a per-image mask.
  logits f32[B,H,W,C] (at the image size), selected bool[B] -> f32[].
  """
  logits = logits.astype(jnp.float32)
  labels = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
  per_image = jnp.sum(nll, axis=(1, 2))
  pixels = jnp.sum(selected) * logits.shape[1] * logits.shape[2]
  return jnp.sum(jnp.where(selected, per_image, 0.0)) / jnp.maximum(pixels, 1).astype(jnp.float32)


@jax.custom_vjp
def _bce_terms(prob: jax.Array, target: jax.Array) -> jax.Array:
  return -(target * jnp.maximum(jnp.log(prob), BCE_LOG_MIN)
           + (1.0 - target) * jnp.maximum(jnp.log1p(-prob), BCE_LOG_MIN))


def _bce_fwd(prob, target):
  return _bce_terms(prob, target), (prob, target)


def _bce_bwd(res, g):
  prob, target = res
  # torch's BCELoss backward: finite where the clamp saturates (autodiff of the clamped log
  # would give 0 * inf = NaN at p = 0 or 1), and 0 once the sigmoid's derivative is 0.
  grad = g * (prob - target) / jnp.maximum(prob * (1.0 - prob), BCE_GRAD_EPS)
  return grad, jnp.zeros_like(target)


_bce_terms.defvjp(_bce_fwd, _bce_bwd)


def bce_loss(prob: jax.Array, target: float) -> jax.Array:
  """`nn.BCELoss()` (mean) of probabilities against a constant label, with torch's log clamp
  at -100 and its backward (Q12): a saturated sigmoid gives 100 and zero gradient, never the
  logit form's large loss and +-1 gradient. f32[B,1] -> f32[]."""
  prob = prob.astype(jnp.float32)
  return jnp.mean(_bce_terms(prob, jnp.full_like(prob, target)))


def discriminator_loss(prob_fake: jax.Array, prob_real: jax.Array) -> tuple[jax.Array, dict]:
  """`(BCE(D(fake), 0) + BCE(D(real), 1)) / 2` -> (loss f32[], {'d_loss_fake', 'd_loss_real'})."""
  fake, real = bce_loss(prob_fake, 0.0), bce_loss(prob_real, 1.0)
  return (fake + real) / 2, {"d_loss_fake": fake, "d_loss_real": real}


# ------------------------------------------------------------------------------------------
# The method.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static S4GAN hyper-parameters (config.s4gan)."""
  num_classes: int
  threshold_st: float
  lambda_fm: float
  lambda_st: float
  real_batch: str
  real_range_from_labeled: bool
  # config.diagnostics: pseudo_* metrics against the unlabelled ground truth (no effect on training).
  diag: diagnostics.Settings = diagnostics.Settings()


def settings_from(config: ml_collections.ConfigDict, num_classes: int) -> Settings:
  """Static settings of `config`, with one-line errors for settings that cannot work."""
  c = config.s4gan
  base.check_choice(config, "s4gan.pool", POOLS)
  base.check_choice(config, "s4gan.real_batch", REAL_BATCHES)
  if len(tuple(c.pool_size)) != 2:
    raise ValueError(f"config s4gan.pool_size={c.pool_size!r} must be (height, width)")
  if not 0.0 <= float(c.dropout) < 1.0:
    raise ValueError(f"config s4gan.dropout={c.dropout!r} must be in [0, 1)")
  if float(c.lr_d) < 0:
    raise ValueError(f"config s4gan.lr_d={c.lr_d!r} must be >= 0")
  if tuple(config.aux_losses):
    raise ValueError(f"config aux_losses={tuple(config.aux_losses)!r} is not supported by method "
                     f"s4gan; set it to ()")
  return Settings(num_classes=num_classes, threshold_st=float(c.threshold_st),
                  lambda_fm=float(c.lambda_fm), lambda_st=float(c.lambda_st),
                  real_batch=c.real_batch,
                  real_range_from_labeled=bool(c.real_range_from_labeled),
                  diag=diagnostics.settings_from(config))


def discriminator_from(config: ml_collections.ConfigDict) -> S4GANDiscriminator:
  c = config.s4gan
  return S4GANDiscriminator(ndf=int(c.ndf), dropout=float(c.dropout), pool=c.pool,
                            pool_size=tuple(int(x) for x in c.pool_size))


def discriminator_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(b1, b2 of config.s4gan, eps 1e-8, no weight decay) whose learning rate follows the
  student's poly schedule shape (`optim.schedule_unit`, `poly_power`) with base `s4gan.lr_d`
  and no floor (the official `lr_D * (1 - i/num_steps)**0.9`)."""
  d_optim = ml_collections.ConfigDict(config.optim.to_dict())
  d_optim.lr = float(config.s4gan.lr_d)
  d_optim.min_lr = 0.0
  schedule = optim.create_lr_schedule(d_optim, config.num_train_steps)
  return optax.adam(schedule, b1=float(config.s4gan.beta1), b2=float(config.s4gan.beta2), eps=1e-8)


def generator_loss(logits_l: jax.Array, labels_l: jax.Array, images_l: jax.Array,
                   logits_u: jax.Array, images_u: jax.Array, labels_real: jax.Array,
                   images_real: jax.Array, discriminate: Callable, step: jax.Array,
                   s: Settings, gt_u: jax.Array | None = None
                   ) -> tuple[jax.Array, dict, tuple[jax.Array, jax.Array]]:
  """The student's objective of one step (spec §1 steps 3-12).

  Args:
    logits_l, logits_u: the student's logits f[B,h,w,C] of the labelled / unlabelled batch.
    labels_l: i32[B,H,W] (-1 ignore); images_l: f32[B,H,W,3], the labelled batch (only its
      value range is read, for D's real input when `s.real_range_from_labeled`).
    images_u: f32[B,H,W,3]; labels_real, images_real: D's real batch.
    discriminate: `(x f32[B,H,W,C+3], forward name) -> (prob f32[B,1], feat f32[B,F])`, D
      with its pre-update parameters (constants here) and that forward's dropout.
    step: i32[], the step being taken (no self-training at step 0, Q7).
    gt_u: i32[B,H,W] the unlabelled batch's ground truth (-1 void), only for the `pseudo_*`
      diagnostics (with `s.diag.pseudo_labels`); it enters no loss.
  Returns:
    (loss, metrics {'sup_loss', 'unsup_loss', 'fm_loss', 'st_loss', 'st_selected_fraction'},
     (fake input, real input) for the discriminator step, without gradient).
  """
  size = images_u.shape[1:3]
  sup = supervised_lib.supervised_loss(logits_l, labels_l)
  pred_u = supervised_lib.upsample_logits(logits_u, size)
  fake = fake_input(pred_u, images_u)
  real = real_input(labels_real, images_real,
                    images_l if s.real_range_from_labeled else images_real, s.num_classes)
  prob_fake, feat_fake = discriminate(fake, "g_fake")
  _, feat_real = discriminate(real, "g_real")
  fm = feature_matching_loss(feat_real, feat_fake)
  selected = select_confident(prob_fake, s.threshold_st)
  count = jnp.sum(selected)
  st = jnp.where((count > 0) & (step > 0), self_training_loss(pred_u, selected), 0.0)
  unsup = s.lambda_fm * fm + s.lambda_st * st
  metrics = {"sup_loss": sup, "unsup_loss": unsup, "fm_loss": fm, "st_loss": st,
             "st_selected_fraction": count.astype(jnp.float32) / selected.shape[0]}
  if gt_u is not None and s.diag.pseudo_labels:
    metrics.update(pseudo_label_diagnostics(pred_u, gt_u, selected, s))
  return sup + unsup, metrics, (jax.lax.stop_gradient(fake), real)


def pseudo_label_diagnostics(logits_u: jax.Array, gt_u: jax.Array, selected: jax.Array,
                             s: Settings) -> dict:
  """`diagnostics.pseudo_label_quality` of the self-training pseudo-labels: the argmax of the
  student's up-sampled logits of the (host-augmented, with its label) unlabelled batch, so at
  the pixels of `gt_u`. S4GAN selects whole images (D > threshold_st), not pixels:
  `*_selected` is that selection (all pixels of the selected images, also at step 0 where
  no self-training is applied); `*_strong` / `*_weak` the reference δs, δw on the student's
  max softmax probability.

  Args:
    logits_u: f32[B,H,W,C] up-sampled student logits; gt_u: i32[B,H,W]; selected: bool[B].
  Returns:
    {'pseudo_*': f32[]}.
  """
  logits_u = jax.lax.stop_gradient(logits_u).astype(jnp.float32)
  # The labels as self_training_loss takes them: argmax of the logits (first index on ties).
  labels = jnp.argmax(logits_u, axis=-1).astype(jnp.int32)
  return diagnostics.pseudo_label_quality(
      jnp.max(jax.nn.softmax(logits_u, axis=-1), axis=-1), labels, gt_u,
      thresholds=s.diag.reference, selections={"selected": selected[:, None, None]})


class S4GAN(base.Method):
  """CE + lambda_fm * feature matching + lambda_st * D-gated self-training; D trained by BCE."""

  def __init__(self, model, settings: Settings, discriminator: S4GANDiscriminator,
               d_tx: optax.GradientTransformation, d_input_shape: tuple[int, int, int]):
    super().__init__(model)
    self.settings = settings
    self.discriminator = discriminator
    self.d_tx = d_tx
    self.d_input_shape = d_input_shape  # (H, W, C + 3)
    self.description = (f"S4GAN (feature matching x{settings.lambda_fm}, self-training x"
                        f"{settings.lambda_st} above D > {settings.threshold_st}, "
                        f"{discriminator.pool} pool)")

  def streams(self):
    streams = {base.LABELED: base.LABELED_STREAM, UNLABELED: UNLABELED_STREAM}
    if self.settings.real_batch == "separate":
      streams[LABELED_REAL] = base.LABELED_STREAM
    return streams

  def init_extra(self, key, variables):
    del variables
    x = jnp.zeros((1, *self.d_input_shape), jnp.float32)
    d_params = self.discriminator.init(key, x, deterministic=True)["params"]
    return {"d_params": d_params, "d_opt_state": self.d_tx.init(d_params)}

  @staticmethod
  def forward_keys(key: jax.Array) -> dict[str, jax.Array]:
    """One dropout key per discriminator forward of the step (`FORWARDS`)."""
    return dict(zip(FORWARDS, jax.random.split(jax.random.fold_in(key, 0x5A4), len(FORWARDS))))

  def discriminate(self, d_params: PyTree, x: jax.Array, key: jax.Array,
                   forward: str) -> tuple[jax.Array, jax.Array]:
    """D in train mode (dropout always on, Q1) -> (prob f32[B,1], feat f32[B,8ndf]).
    `forward` (one of `FORWARDS`) names the call, for tests that replay recorded masks."""
    del forward
    d = self.discriminator
    masks = dropout_masks(key, x.shape[0], d.ndf, d.dropout)
    return d.apply({"params": d_params}, x, deterministic=False, masks=masks)

  def loss(self, params, state, batch, key):
    """The generator step; metrics `loss`, `sup_loss`, `unsup_loss` (= lambda_fm * fm_loss +
    lambda_st * st_loss), `fm_loss`, `st_loss` (0 when not applied), `st_selected_fraction`
    (images with D > threshold_st); with `diagnostics.pseudo_labels`, the `pseudo_*` metrics
    (`pseudo_label_diagnostics`)."""
    s = self.settings
    labeled, unlabeled = batch[base.LABELED], batch[UNLABELED]
    real = batch[LABELED_REAL] if s.real_batch == "separate" else labeled
    # Two student calls, as officially: each batch has its own BatchNorm statistics.
    out_l, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    out_u, batch_stats = self.apply_train(params, batch_stats, unlabeled["image"])
    keys = self.forward_keys(key)
    d_params = state.extra["d_params"]  # not differentiated: D gets no gradient from this loss

    def discriminate(x, forward):
      return self.discriminate(d_params, x, keys[forward], forward)

    loss, metrics, (fake, real_in) = generator_loss(
        out_l["logits"], labeled["label"], labeled["image"], out_u["logits"], unlabeled["image"],
        real["label"], real["image"], discriminate, state.step, s, gt_u=unlabeled["label"])
    metrics["loss"] = loss
    return loss, (metrics, {"batch_stats": batch_stats, "d_fake_input": fake, "d_real_input": real_in})

  def discriminator_grads(self, d_params: PyTree, fake: jax.Array, real: jax.Array,
                          key: jax.Array) -> tuple[dict, PyTree]:
    """loss_D of fresh forwards (new dropout masks) and its gradient w.r.t. `d_params`.

    Returns:
      ({'d_loss', 'd_loss_fake', 'd_loss_real'}, gradients like `d_params`).
    """
    keys = self.forward_keys(key)

    def d_loss(dp):
      prob_fake, _ = self.discriminate(dp, fake, keys["d_fake"], "d_fake")
      prob_real, _ = self.discriminate(dp, real, keys["d_real"], "d_real")
      loss, terms = discriminator_loss(prob_fake, prob_real)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(d_loss, has_aux=True)(d_params)
    return {"d_loss": loss, **terms}, grads

  def after_update_and_metrics(self, state, aux, key):
    """D's Adam step. `state.extra` still holds the pre-update D (the student's update does
    not touch it) and `aux` the pre-update student's fake input: simultaneous updates."""
    d_params = state.extra["d_params"]
    metrics, grads = self.discriminator_grads(d_params, aux["d_fake_input"], aux["d_real_input"], key)
    updates, d_opt_state = self.d_tx.update(grads, state.extra["d_opt_state"], d_params)
    extra = {"d_params": optax.apply_updates(d_params, updates), "d_opt_state": d_opt_state}
    return state.replace(extra=extra), metrics

  def after_update(self, state, aux, key):
    return self.after_update_and_metrics(state, aux, key)[0]


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> S4GAN:
  crop = tuple(int(x) for x in config.input.crop_size)
  return S4GAN(model, settings_from(config, num_classes), discriminator_from(config),
               discriminator_optimizer(config), (*crop, num_classes + 3))
