"""S4GAN (reco_jax/methods/s4gan.py) against the official goldens of `golden/s4gan/` (README
there): the discriminator forward and VJP, the three generator losses, the discriminator loss
and their gradients, the self-training selection, and two whole official iterations through
`train.train_step` (both optimisers). Tolerances are the golden README's §6.

Goldens are NCHW with PyTorch weight layouts; labels are float with 255 = ignore.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import with_overrides
from configs import camvid, cityscapes, common, synthetic, voc
from reco_jax import methods, optim, train
from reco_jax.methods import s4gan
from reco_jax.train_state import TrainState

NAMES = [f"conv{i}" for i in range(1, 5)] + ["fc"]


# ---- golden helpers ----------------------------------------------------------------------


def nhwc(x):
  return jnp.asarray(np.transpose(np.asarray(x), (0, 2, 3, 1)))


def nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def labels_of(x):
  """Official float labels with 255 = ignore -> ours, i32 with -1."""
  x = np.asarray(x)
  return jnp.asarray(np.where(x == 255, -1, x).astype(np.int32))


def d_params_from(g, prefix):
  """`<prefix>conv1_weight` ... `<prefix>fc_bias` (PyTorch layouts) -> flax params."""
  params = {f"conv{i}": {"kernel": jnp.asarray(g[f"{prefix}conv{i}_weight"].transpose(2, 3, 1, 0)),
                         "bias": jnp.asarray(g[f"{prefix}conv{i}_bias"])} for i in range(1, 5)}
  params["fc"] = {"kernel": jnp.asarray(g[f"{prefix}fc_weight"].T), "bias": jnp.asarray(g[f"{prefix}fc_bias"])}
  return params


def torch_layout(params):
  """flax D params -> {'conv1_weight': OIHW, ..., 'fc_bias'}."""
  out = {}
  for name in NAMES:
    kernel = np.asarray(params[name]["kernel"])
    out[f"{name}_weight"] = kernel.T if name == "fc" else kernel.transpose(3, 2, 0, 1)
    out[f"{name}_bias"] = np.asarray(params[name]["bias"])
  return out


def assert_scalar(got, want, msg=""):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=msg)


def assert_array(got, want, msg=""):
  """README §6: |a - b| <= 2e-5 max|b| + 1e-8."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (msg, got.shape, want.shape)
  bound = 2e-5 * np.max(np.abs(want)) + 1e-8
  err = np.max(np.abs(got - want)) if got.size else 0.0
  assert err <= bound, f"{msg}: max abs error {err:.3g} > {bound:.3g}"


def assert_params(got, want, msg=""):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=2e-6, err_msg=msg)


def forward_with_acts(disc, params, x, masks=None, deterministic=True):
  """D's (prob, feat) and the post-LeakyReLU activations of conv1..4 (before dropout)."""
  (prob, feat), state = disc.apply({"params": params}, x, deterministic=deterministic, masks=masks,
                                   capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  acts = [nn.leaky_relu(inter[f"conv{i}"]["__call__"][0], 0.2) for i in range(1, 5)]
  return prob, feat, acts


# ---- the discriminator -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_discriminator_small_case_forward_and_vjp(golden, mode):
  """C=5, ndf=8, a 37x53 input (odd sizes: every conv floors), eval and recorded-mask train
  mode: outputs, activations and the VJP w.r.t. the input and every weight."""
  g = golden("s4gan/s4gan_disc_forward.npz")
  disc = s4gan.S4GANDiscriminator(ndf=8)
  params, x = d_params_from(g, "S_w_"), nhwc(g["S_x"])
  masks = None
  if mode == "train":
    masks = tuple(jnp.asarray(g[f"S_train_mask{i}"]) for i in (1, 2, 3))
    assert set(np.unique(np.concatenate([np.ravel(m) for m in masks]))) == {0.0, 2.0}
  prob, feat, acts = jax.jit(functools.partial(forward_with_acts, disc))(params, x, masks)
  assert_array(prob, g[f"S_{mode}_out"], "out")
  assert_array(feat, g[f"S_{mode}_feat"][:, :, 0, 0], "feat")
  for i, act in enumerate(acts, 1):
    assert_array(nchw(act), g[f"S_{mode}_act{i}"], f"act{i}")

  def scalar(p, x):
    prob, feat = disc.apply({"params": p}, x, deterministic=True, masks=masks)
    return jnp.sum(prob * g["S_vjp_gout"]) + jnp.sum(feat * g["S_vjp_gfeat"][:, :, 0, 0])

  grad_p, grad_x = jax.jit(jax.grad(scalar, argnums=(0, 1)))(params, x)
  assert_array(nchw(grad_x), g[f"S_{mode}_vjp_grad_x"], "grad x")
  for name, value in torch_layout(grad_p).items():
    assert_array(value, g[f"S_{mode}_vjp_grad_{name}"], name)


def _recipe_case(g, prefix):
  """The NumPy recipe of README §1b: weights and input of the native-size cases."""
  num_classes = int(g[f"{prefix}_num_classes"])
  names = [str(n) for n in g[f"{prefix}_param_names"]]
  shapes = {"conv1.weight": (64, num_classes + 3, 4, 4), "conv1.bias": (64,),
            "conv2.weight": (128, 64, 4, 4), "conv2.bias": (128,), "conv3.weight": (256, 128, 4, 4),
            "conv3.bias": (256,), "conv4.weight": (512, 256, 4, 4), "conv4.bias": (512,),
            "fc.weight": (1, 512), "fc.bias": (1,)}
  base_seed = int(g[f"{prefix}_param_base_seed"])
  torch_params = {}
  for k, name in enumerate(names):
    rs = np.random.RandomState(base_seed + k)
    shape = shapes[name]
    value = (0.1 * rs.standard_normal(shape) if name.endswith("bias")
             else rs.standard_normal(shape) / np.sqrt(np.prod(shape[1:])))
    torch_params[name.replace(".", "_")] = value.astype(np.float32)
  seed, n, h, w = (int(v) for v in g[f"{prefix}_input_seed_N_H_W"])
  rs = np.random.RandomState(seed)
  logits = (3.0 * rs.standard_normal((n, num_classes, h, w))).astype(np.float32)
  img = rs.uniform(-120, 150, (n, 3, h, w)).astype(np.float32)
  img = (img - img.min()) / (img.max() - img.min())
  x = jnp.concatenate([jax.nn.softmax(nhwc(logits), axis=-1), nhwc(img)], axis=-1)
  return d_params_from(torch_params, ""), x


@pytest.mark.parametrize("prefix,pool_size", [("V", (20, 20)), ("CS", (16, 32))])
def test_discriminator_native_sizes_with_the_official_pool(golden, prefix, pool_size):
  """VOC 321x321 (C=21) and Cityscapes 256x512 (C=19) at ndf=64 with the official fixed pool:
  floor shapes (321 -> 160, never 'SAME'), both borders of conv1, the conv4 map, the outputs;
  the global pool (our default) gives the same features at these design sizes."""
  g = golden("s4gan/s4gan_disc_forward.npz")
  params, x = _recipe_case(g, prefix)
  disc = s4gan.S4GANDiscriminator(ndf=64, pool="fixed", pool_size=pool_size)
  prob, feat, acts = jax.jit(functools.partial(forward_with_acts, disc))(params, x)
  assert [list(nchw(a).shape) for a in acts] == g[f"{prefix}_act_shapes"].tolist()
  act1 = nchw(acts[0])
  assert_array(act1[:, :4, :5, :5], g[f"{prefix}_act1_topleft"], "act1 top-left")
  assert_array(act1[:, :4, -5:, -5:], g[f"{prefix}_act1_bottomright"], "act1 bottom-right")
  assert_array(jnp.mean(acts[3], axis=-1), g[f"{prefix}_act4_mean_over_channels"], "act4")
  assert_array(prob, g[f"{prefix}_out"], "out")
  assert_array(feat, g[f"{prefix}_feat"][:, :, 0, 0], "feat")
  assert_array(s4gan.pool_features(acts[3], "global", pool_size), g[f"{prefix}_feat"][:, :, 0, 0],
               "global pool")


def test_fixed_pool_off_its_design_size():
  """Official AvgPool2d((20,20)) on a 513 crop's 32x32 map averages the top-left 20x20 block
  (generation_report: voc_pool_513x513); Cityscapes' (16,32) on a 512x512 crop's 32x32 map
  crashes the official fc: one line naming s4gan.pool here."""
  x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 32, 32, 4)), jnp.float32)
  np.testing.assert_allclose(s4gan.pool_features(x, "fixed", (20, 20)), x[:, :20, :20].mean((1, 2)),
                             rtol=1e-6)
  assert not np.allclose(s4gan.pool_features(x, "global", (20, 20)), x[:, :20, :20].mean((1, 2)))
  with pytest.raises(ValueError, match=r"config s4gan.pool='fixed' .* got 32x32; use s4gan.pool='global'"):
    s4gan.pool_features(x, "fixed", (16, 32))


def test_dropout_drops_whole_channels_with_fresh_masks_per_forward():
  """Dropout2d: keep factors 0 or 2 per (sample, channel), the same at every pixel (the
  module's own Dropout broadcasts over H, W); the method draws new masks for each forward."""
  masks = jax.jit(s4gan.dropout_masks, static_argnums=(1, 2, 3))(jax.random.key(3), 64, 8, 0.5)
  assert [m.shape for m in masks] == [(64, 8), (64, 16), (64, 32)]
  values = np.concatenate([np.ravel(m) for m in masks])
  assert set(np.unique(values)) == {0.0, 2.0} and 0.4 < np.mean(values == 2.0) < 0.6
  assert all(np.all(np.asarray(m) == 1.0) for m in s4gan.dropout_masks(jax.random.key(3), 4, 8, 0.0))
  keys = s4gan.S4GAN.forward_keys(jax.random.key(0))
  assert sorted(keys) == sorted(s4gan.FORWARDS)
  assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys.values()}) == 4
  # The method's forwards: dropout on, new masks for a new key.
  method = methods.get_method(synthetic.get_config("method=s4gan,variant=smoke"), num_classes=8,
                              model=StandIn())
  x = jnp.asarray(np.random.RandomState(1).uniform(size=(4, 16, 16, 11)), jnp.float32)

  @jax.jit
  def forwards(d_params, key1, key2):
    return (method.discriminate(d_params, x, key1, "g_fake")[1],
            method.discriminate(d_params, x, key2, "g_fake")[1],
            method.discriminator.apply({"params": d_params}, x, deterministic=True)[1])

  d_params = jax.jit(method.init_extra)(jax.random.key(0, impl="rbg"), {})["d_params"]
  feat1, feat2, feat_eval = forwards(d_params, keys["g_fake"], keys["g_real"])
  assert not np.allclose(feat1, feat2) and not np.allclose(feat1, feat_eval)
  mask = nn.Dropout(0.5, broadcast_dims=(1, 2)).apply({}, jnp.ones((4, 3, 5, 8)), deterministic=False,
                                                      rngs={"dropout": jax.random.key(3, impl="rbg")})
  assert set(np.unique(np.asarray(mask))) <= {0.0, 2.0}
  np.testing.assert_array_equal(mask, np.broadcast_to(mask[:, :1, :1, :], mask.shape))


# ---- the losses of one iteration (losses.npz) ----------------------------------------------


def _losses_case(g):
  """(inputs of generator_loss, D in eval mode, settings) of losses.npz."""
  disc = s4gan.S4GANDiscriminator(ndf=8)
  params = d_params_from(g, "D_w_")
  settings = s4gan.Settings(num_classes=5, threshold_st=float(g["threshold_st"]),
                            lambda_fm=float(g["lambda_fm"]), lambda_st=float(g["lambda_st"]),
                            real_batch="separate", real_range_from_labeled=True)

  def discriminate(x, forward):
    del forward
    return disc.apply({"params": params}, x, deterministic=True)

  images = nhwc(g["images"])
  inputs = dict(labels_l=labels_of(g["labels"]), images_l=images, images_u=nhwc(g["images_remain_raw"]),
                labels_real=labels_of(g["labels_gt"]), images_real=nhwc(g["images_gt_raw"]),
                discriminate=discriminate, step=jnp.asarray(1), s=settings)
  return disc, params, inputs


def test_generator_losses_and_their_gradients(golden):
  g = golden("s4gan/s4gan_losses.npz")
  _, _, inputs = _losses_case(g)
  pl, pu = nhwc(g["pred_small_l"]), nhwc(g["pred_small_u"])
  terms = ("sup_loss", "fm_loss", "st_loss", "loss_S")

  def losses(pl, pu):
    loss, metrics, _ = s4gan.generator_loss(pl, logits_u=pu, **inputs)
    return jnp.stack([loss if name == "loss_S" else metrics[name] for name in terms])

  @jax.jit
  def run(pl, pu):
    loss, metrics, (fake, real) = s4gan.generator_loss(pl, logits_u=pu, **inputs)
    outs = inputs["discriminate"](fake, "g_fake") + inputs["discriminate"](real, "g_real")
    return loss, metrics, fake, real, outs, jax.jacrev(losses, argnums=(0, 1))(pl, pu)

  loss, metrics, fake, real, outs, (jac_l, jac_u) = run(pl, pu)
  prob_fake, feat_fake, prob_real, feat_real = outs
  assert_array(nchw(fake), g["pred_cat"], "pred_cat")
  assert_array(nchw(real), g["D_gt_v_cat"], "D_gt_v_cat (Q3: scaled by the labelled range)")
  assert_array(prob_fake, g["D_out_z"], "D_out_z")
  assert_array(feat_fake, g["D_out_y_pred"][:, :, 0, 0], "D_out_y_pred")
  assert_array(prob_real, g["D_out_z_gt"], "D_out_z_gt")
  assert_array(feat_real, g["D_out_y_gt"][:, :, 0, 0], "D_out_y_gt")
  selected = s4gan.select_confident(prob_fake, float(g["threshold_st"]))
  np.testing.assert_array_equal(selected, g["selected"])
  assert int(np.sum(selected)) == int(g["count"])
  pred_u = s4gan.supervised_lib.upsample_logits(pu, (41, 75))
  np.testing.assert_array_equal(np.argmax(pred_u, -1)[np.asarray(selected)], g["labels_sel"])
  for ours, theirs in [("sup_loss", "loss_ce"), ("st_loss", "loss_st"), ("fm_loss", "loss_fm")]:
    assert_scalar(metrics[ours], g[theirs], theirs)
  assert_scalar(loss, g["loss_S"], "loss_S")
  assert_scalar(metrics["unsup_loss"], g["loss_S"] - g["loss_ce"], "unsup_loss")

  for i, theirs in enumerate(["loss_ce", "loss_fm", "loss_st", "loss_S"]):
    grad_l, grad_u = jac_l[i], jac_u[i]
    assert_array(nchw(grad_l), g[f"grad_{theirs}_wrt_pred_small_l"], f"d {theirs} / d pred_l")
    assert_array(nchw(grad_u), g[f"grad_{theirs}_wrt_pred_small_u"], f"d {theirs} / d pred_u")
  grad_feat = jax.grad(lambda f: s4gan.feature_matching_loss(feat_real, f))(feat_fake)
  assert_array(grad_feat, g["grad_fm_wrt_feat_pred"][:, :, 0, 0], "d fm / d feat_pred")


def test_discriminator_loss_and_its_gradients(golden):
  g = golden("s4gan/s4gan_losses.npz")
  disc, params, _ = _losses_case(g)
  fake, real = nhwc(g["pred_cat"]), nhwc(g["D_gt_v_cat"])

  def loss_d(p):
    prob_fake, _ = disc.apply({"params": p}, fake, deterministic=True)
    prob_real, _ = disc.apply({"params": p}, real, deterministic=True)
    return s4gan.discriminator_loss(prob_fake, prob_real)

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_d, has_aux=True))(params)
  assert_scalar(loss, g["loss_D"], "loss_D")
  assert_scalar(terms["d_loss_fake"], g["loss_D_fake"], "loss_D_fake")
  assert_scalar(terms["d_loss_real"], g["loss_D_real"], "loss_D_real")
  for name, value in torch_layout(grads).items():
    assert_array(value, g[f"grad_loss_D_wrt_{name}"], name)


@pytest.mark.parametrize("case", ["hi", "lo"])
def test_bce_clamps_the_log_at_minus_100_with_zero_gradient(golden, case):
  """A saturated sigmoid (fc weight 0, bias +40 / -120: output exactly 1.0 / 0.0): BCE 100
  against the wrong label (the logit form would give 40 / 120) and a zero gradient w.r.t. the
  fc bias in all four cases (the logit form: +-1; autodiff of a clamped log: NaN)."""
  g = golden("s4gan/s4gan_losses.npz")
  bias = float(g[f"sat_{case}_fc_bias"])

  def bce(b, target):
    prob = jax.nn.sigmoid(jnp.zeros((1, 1)) + b)
    return s4gan.bce_loss(prob, target)

  assert float(jax.nn.sigmoid(jnp.float32(bias))) == float(g[f"sat_{case}_D_out"])
  for target in (0, 1):
    value, grad = jax.jit(jax.value_and_grad(bce), static_argnums=1)(jnp.float32(bias), float(target))
    assert_scalar(value, g[f"sat_{case}_bce_vs_{target}"], f"bce vs {target}")
    assert float(grad) == float(g[f"sat_{case}_grad_fc_bias_bce_vs_{target}"]) == 0.0


# ---- the self-training selection (st_mask.npz) --------------------------------------------


_st_loss_and_grad = jax.jit(jax.value_and_grad(s4gan.self_training_loss))


@pytest.mark.parametrize("case", ["voc06", "city07", "none", "all"])
def test_self_training_selection_pseudo_labels_and_loss(golden, case):
  """float32 comparison (float32(0.6) is not selected at 0.6), first index on ties, mean CE
  over count*H*W pixels, 0 and a zero gradient when nothing passes."""
  g = golden("s4gan/s4gan_st_mask.npz")
  logits = nhwc(g["pred_all"])
  selected = s4gan.select_confident(jnp.asarray(g[f"{case}_D_out"]), float(g[f"{case}_threshold"]))
  np.testing.assert_array_equal(selected, g[f"{case}_selected"])
  assert int(np.sum(selected)) == int(g[f"{case}_count"])
  np.testing.assert_array_equal(np.argmax(logits, -1)[np.asarray(selected)], g[f"{case}_labels_sel"])
  loss, grad = _st_loss_and_grad(logits, selected)
  assert_scalar(loss, g[f"{case}_loss_st"], "loss_st")
  assert_array(nchw(grad), g[f"{case}_grad_pred_all"], "grad")


# ---- two official iterations end to end (train_iteration.npz) -----------------------------


class StandIn(nn.Module):
  """The golden's stand-in S: conv3x3(3->6, no bias) -> AvgPool(8, stride 8, floor) -> 1x1
  conv (bias). A dummy BatchNorm collection keeps `apply_train`'s interface."""

  @nn.compact
  def __call__(self, x, train):
    self.variable("batch_stats", "unused", lambda: jnp.zeros(()))
    h = nn.Conv(6, (3, 3), padding=1, use_bias=False, name="body")(x)
    h = nn.avg_pool(h, (8, 8), strides=(8, 8))
    return {"logits": nn.Conv(5, (1, 1), name="classifier")(h), "rep": h, "features": {}}


class Replay(s4gan.S4GAN):
  """S4GAN whose four D forwards use recorded dropout masks, read from the batch
  (`batch['masks'] = {forward: (m1, m2, m3)}`) so that one compiled step replays any
  iteration. The loss stores them for the D step of the same traced step."""

  def loss(self, params, state, batch, key):
    batch = dict(batch)
    self.masks = batch.pop("masks")
    return super().loss(params, state, batch, key)

  def discriminate(self, d_params, x, key, forward):
    del key
    return self.discriminator.apply({"params": d_params}, x, deterministic=False,
                                    masks=self.masks[forward])


def _iteration_config():
  config = common.base_config()
  config.method = "s4gan"
  config.input.crop_size = (33, 49)
  config.num_train_steps = 40_000
  config.s4gan.ndf = 4
  return config


def _official_s_optimizer():
  """train_s4GAN.py: SGD(momentum 0.9, wd 5e-4), the 1x1 head at 10x, poly 0.9 over 40k."""
  def sgd(scale):
    lr = lambda count: scale * optim.poly_lr(2.5e-4, 40_000, count, 0.9, min_lr=0.0)
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))
  return optax.multi_transform({"body": sgd(1.0), "head": sgd(10.0)},
                               lambda p: {k: jax.tree.map(lambda _: "body" if k == "body" else "head", v)
                                          for k, v in p.items()})


def _s_params(g, prefix):
  return {"body": {"kernel": jnp.asarray(g[f"{prefix}seg_body_weight"].transpose(2, 3, 1, 0))},
          "classifier": {"kernel": jnp.asarray(g[f"{prefix}seg_classifier_weight"].transpose(2, 3, 1, 0)),
                         "bias": jnp.asarray(g[f"{prefix}seg_classifier_bias"])}}


def _s_torch(params):
  return {"body_weight": np.asarray(params["body"]["kernel"]).transpose(3, 2, 0, 1),
          "classifier_weight": np.asarray(params["classifier"]["kernel"]).transpose(3, 2, 0, 1),
          "classifier_bias": np.asarray(params["classifier"]["bias"])}


FORWARD_NAMES = {"g_fake": "G_fake", "g_real": "G_real", "d_fake": "D_fake", "d_real": "D_real"}


def test_two_official_iterations_through_the_train_step(golden):
  """Iterations 0 and 1 of the official main() with the recorded batches and dropout masks:
  the stand-in's logits, the four D forwards, losses (no self-training at step 0 although an
  image passed), the gradients of both networks from the pre-update parameters, and both
  networks' parameters after the two optimiser steps (SGD momentum and Adam states carried
  from iteration 0 into iteration 1)."""
  g = golden("s4gan/s4gan_train_iteration.npz")
  config = _iteration_config()
  method = Replay(StandIn(), s4gan.settings_from(config, 5), s4gan.discriminator_from(config),
                  s4gan.discriminator_optimizer(config), (33, 49, 8))
  s_tx = _official_s_optimizer()
  params, d_params = _s_params(g, "init_"), d_params_from(g, "init_D_")
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats={"unused": jnp.zeros(())}, opt_state=s_tx.init(params),
                     extra={"d_params": d_params, "d_opt_state": method.d_tx.init(d_params)},
                     apply_fn=method.apply_fn, tx=s_tx)
  key = jax.random.key(0)

  @jax.jit
  def pieces(state, batch):
    """Everything the step computes, separately: logits, the gradients w.r.t. them, both
    networks' gradients, and the four D forwards on the step's D inputs."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits_l = method.apply_fn(variables, batch["labeled"]["image"], train=True)["logits"]
    logits_u = method.apply_fn(variables, batch["unlabeled"]["image"], train=True)["logits"]
    method.masks = batch["masks"]

    def loss_of_logits(pl, pu):
      def discriminate(x, forward):
        return method.discriminate(state.extra["d_params"], x, None, forward)
      return s4gan.generator_loss(pl, batch["labeled"]["label"], batch["labeled"]["image"], pu,
                                  batch["unlabeled"]["image"], batch["labeled_real"]["label"],
                                  batch["labeled_real"]["image"], discriminate, state.step,
                                  method.settings)[0]

    logit_grads = jax.grad(loss_of_logits, argnums=(0, 1))(logits_l, logits_u)
    (_, (metrics, aux)), s_grads = jax.value_and_grad(method.loss, has_aux=True)(
        state.params, state, batch, key)
    d_metrics, d_grads = method.discriminator_grads(state.extra["d_params"], aux["d_fake_input"],
                                                    aux["d_real_input"], key)
    inputs = {"g_fake": aux["d_fake_input"], "g_real": aux["d_real_input"],
              "d_fake": aux["d_fake_input"], "d_real": aux["d_real_input"]}
    outs = {f: method.discriminate(state.extra["d_params"], x, None, f) for f, x in inputs.items()}
    return (logits_l, logits_u), logit_grads, {**metrics, **d_metrics}, s_grads, d_grads, outs

  step = jax.jit(functools.partial(train.train_step, method=method, seed=0))
  images, labels = nhwc(g["images_all"]), labels_of(g["labels_all"])
  for t in (0, 1):
    it = lambda k: g[f"it{t}_{k}"]
    batch = {name: {"image": images[it(idx)], "label": labels[it(idx)]}
             for name, idx in [("labeled", "labelled_idx"), ("unlabeled", "unlabelled_idx"),
                               ("labeled_real", "gt_idx")]}
    batch["masks"] = {f: tuple(jnp.asarray(it(f"{n}_mask{i}")) for i in (1, 2, 3))
                      for f, n in FORWARD_NAMES.items()}
    logits, logit_grads, metrics, s_grads, d_grads, outs = pieces(state, batch)
    for ours, suffix in zip(logits + logit_grads, ["pred_small_l", "pred_small_u",
                                                   "grad_loss_S_wrt_pred_small_l",
                                                   "grad_loss_S_wrt_pred_small_u"]):
      assert_array(nchw(ours), it(suffix), f"it{t} {suffix}")
    for name, value in _s_torch(s_grads).items():
      assert_array(value, it(f"grad_seg_{name}"), f"it{t} grad seg {name}")
    for name, value in torch_layout(d_grads).items():
      assert_array(value, it(f"grad_D_{name}"), f"it{t} grad D {name}")
    for forward, name in FORWARD_NAMES.items():
      assert_array(outs[forward][0], it(f"{name}_D_out"), f"it{t} {name} D out")
      assert_array(outs[forward][1], it(f"{name}_D_feat")[:, :, 0, 0], f"it{t} {name} D feat")

    state, step_metrics = step(state, batch)
    assert int(state.step) == t + 1
    assert float(step_metrics["st_selected_fraction"]) == np.float32(int(it("count")) / 3)
    assert bool(it("st_applied")) == (t > 0)  # one image passed at t = 0 too, unused
    for ours, theirs in [("loss", "loss_S"), ("sup_loss", "loss_ce"), ("fm_loss", "loss_fm"),
                         ("st_loss", "loss_st"), ("d_loss", "loss_D"), ("d_loss_fake", "loss_D_fake"),
                         ("d_loss_real", "loss_D_real")]:
      assert_scalar(step_metrics[ours], it(theirs), f"it{t} {theirs}")
      assert_scalar(metrics[ours], it(theirs), f"it{t} {theirs} (pieces)")
    for name, value in _s_torch(state.params).items():
      assert_params(value, it(f"after_seg_{name}"), f"it{t} after seg {name}")
    for name, value in torch_layout(state.extra["d_params"]).items():
      assert_params(value, it(f"after_D_{name}"), f"it{t} after D {name}")


# ---- configs and the method's wiring ------------------------------------------------------


def test_dataset_configs_carry_the_official_values():
  v, c = voc.get_config("method=s4gan"), cityscapes.get_config("method=s4gan")
  assert (v.model.name, v.s4gan.threshold_st, v.s4gan.lr_d, tuple(v.s4gan.pool_size)) == (
      "deeplabv2", 0.6, 1e-4, (20, 20))
  assert (c.model.name, c.s4gan.threshold_st, c.s4gan.lr_d, tuple(c.s4gan.pool_size)) == (
      "deeplabv2", 0.7, 1e-5, (16, 32))
  for config in (v, c):
    assert config.method == "s4gan" and config.s4gan.pool == "global"
    assert (config.s4gan.lambda_fm, config.s4gan.lambda_st) == (0.1, 1.0)
    assert config.input.streams.labeled_real.batch_size == config.input.streams.labeled.batch_size
  # CamVid's cpu row: the other cpu rows' model, crops, steps and learning rate.
  cpu, ref = camvid.get_config("method=s4gan,variant=cpu"), camvid.get_config("method=classmix,variant=cpu")
  assert cpu.num_train_steps == ref.num_train_steps
  assert cpu.model.to_dict() == ref.model.to_dict() and cpu.optim.to_dict() == ref.optim.to_dict()
  assert tuple(cpu.input.crop_size) == tuple(ref.input.crop_size)
  for module in (voc, cityscapes, camvid):
    smoke = module.get_config("method=s4gan,variant=smoke")
    assert smoke.model.backbone == "resnet_tiny" and smoke.num_train_steps == 3


@pytest.mark.parametrize("key,value,message", [
    ("s4gan.pool", "avg", r"config s4gan.pool='avg' is invalid; expected one of global, fixed"),
    ("s4gan.real_batch", "gt", r"config s4gan.real_batch='gt' is invalid"),
    ("s4gan.dropout", 1.0, r"config s4gan.dropout=1.0 must be in \[0, 1\)"),
    ("aux_losses", ("reco",), r"config aux_losses=\('reco',\) is not supported by method s4gan"),
])
def test_bad_settings_fail_with_one_line_naming_the_key(key, value, message):
  config = with_overrides(synthetic.get_config("method=s4gan,variant=smoke"), {key: value})
  with pytest.raises(ValueError, match=message):
    methods.get_method(config, num_classes=8, model=StandIn())


def test_streams_follow_real_batch():
  config = synthetic.get_config("method=s4gan,variant=smoke")
  assert set(methods.get_method(config, num_classes=8, model=StandIn()).streams()) == {
      "labeled", "unlabeled", "labeled_real"}
  config.s4gan.real_batch = "labeled"
  assert set(methods.get_method(config, num_classes=8, model=StandIn()).streams()) == {
      "labeled", "unlabeled"}


def test_discriminator_learning_rate_follows_the_poly_shape_without_floor():
  config = _iteration_config()
  config.s4gan.lr_d = 1e-5
  tx = s4gan.discriminator_optimizer(config)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  lrs = []
  for _ in range(2):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    lrs.append(-float(updates["w"]))  # Adam's first steps move by lr (|m_hat / sqrt(v_hat)| = 1)
  np.testing.assert_allclose(lrs, [1e-5, 1e-5 * (1 - 1 / 40_000) ** 0.9], rtol=1e-5)
  # Near the end the student's min_lr floor (1e-6) would exceed lr_d's decay: D has none.
  sched = optim.create_lr_schedule(ml_collections.ConfigDict({**config.optim.to_dict(), "lr": 1e-5,
                                                              "min_lr": 0.0}), 40_000)
  assert float(sched(39_999)) < 1e-6
