"""The Contextrast method (issue 13): the wrapper, the loss it trains, the Table 2 switch, the
auxiliary term on the mean teacher, the configs.

The losses themselves are tested in test_contextrast_losses.py; the contract (8 devices == 1,
resume == uninterrupted) in test_methods.py (presets `contextrast`, `classmix_contextrast`).
Step-level tests use a four-level toy segmenter (strides 4, 8, 16, 32) that compiles fast.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import with_overrides
from configs import camvid, cityscapes, common, synthetic
from reco_jax import methods
from reco_jax.train_state import TrainState
from reco_jax.losses import contextrast as contextrast_lib
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import auxiliary, base
from reco_jax.methods import contextrast

NUM_CLASSES = 5
CROP = 64  # levels of 16, 8, 8, 8 pixels a side


class LevelsToy(nn.Module):
  """Backbone-like stages layer1..layer4 at strides 4, 8, 8, 8 (avg-pool + 1x1 conv + BN: the
  strides of DeepLabV3 at output stride 8) and logits / rep at stride 4, with the models'
  interface."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train):
    features = {}
    for i, width in enumerate((4, 6, 8, 10)):
      pool = (4, 2, 1, 1)[i]
      x = nn.avg_pool(x, (pool, pool), strides=(pool, pool))
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(width, (1, 1))(x)))
      features[f"layer{i + 1}"] = x
    logits = 4.0 * nn.Conv(self.num_classes, (1, 1), name="classifier")(features["layer1"])
    return {"logits": logits, "rep": nn.Conv(8, (1, 1))(features["layer1"]), "features": features}


def _config(preset="contextrast", **overrides):
  config = synthetic.get_config(f"method={preset},variant=smoke")
  return with_overrides(config, {"input.crop_size": (CROP, CROP), **overrides})


def _batch(seed=0, batch=4):
  rng = np.random.RandomState(seed)
  # Blocky labels (8x8 cells): classes form regions, so every level has several classes.
  cells = rng.randint(-1, NUM_CLASSES, (batch, CROP // 8, CROP // 8))
  labels = np.repeat(np.repeat(cells, 8, axis=1), 8, axis=2).astype(np.int32)
  return {"image": rng.randn(batch, CROP, CROP, 3).astype(np.float32), "label": labels}


def _method_and_variables(config):
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=LevelsToy(NUM_CLASSES))
  return method, _init(method.model)


def _init(model):
  # Jitted: eager op-by-op dispatch compiles (and caches) every primitive, slowly.
  # Key and images are arguments: constants let XLA constant-fold the whole init (slowly).
  return jax.jit(lambda key, x: model.init(key, x, train=False))(
      jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)))


def _apply_train(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])(
      variables, images)


def _state(variables):
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=None, extra={},
                          apply_fn=None, tx=None)


def _expected_loss(method, variables, labeled, key):
  """CE + the term, computed from the wrapper's projected levels by the loss module itself."""
  out, _ = method.model.apply(variables, labeled["image"], train=True, mutable=["batch_stats"])
  sup = supervised_lib.supervised_loss(out["logits"], labeled["label"])
  s = method.settings
  feats, labels = list(out["contextrast"]), labeled["label"]
  pred = contextrast.predicted_classes(out["logits"], labels.shape[1:3])
  if s.loss == "contextrast":
    term, parts = contextrast_lib.contextrast_loss(key, feats, labels, pred, NUM_CLASSES, s.contextrast)
  elif s.loss == "pissas":
    term, parts = contextrast_lib.pissas_loss(key, feats, labels, NUM_CLASSES, s.pissas)
  elif s.loss == "contrastiveseg":
    term, parts = contextrast_lib.contrastiveseg_loss(key, feats[-1], labels, pred, NUM_CLASSES,
                                                      s.contrastiveseg), None
  else:
    term, parts = jnp.zeros(()), None
  return sup, term, parts


def test_the_wrapper_projects_every_level_with_its_own_pissas_projector():
  method = methods.get_method(_config(), num_classes=NUM_CLASSES, model=LevelsToy(NUM_CLASSES))
  variables = jax.eval_shape(lambda: method.model.init(jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)),
                                                       train=False))
  assert sorted(k for k in variables["params"] if k.startswith("projector_")) == [
      f"projector_{i}" for i in range(4)]
  # Pissas's projector: 1x1 c->c, ReLU, BN (PyTorch momentum 0.0003), 1x1 c->proj_dim.
  p = variables["params"]["projector_1"]
  assert p["conv_0"]["kernel"].shape == (1, 1, 6, 6) and p["conv_1"]["kernel"].shape == (1, 1, 6, 16)
  assert contextrast.PROJECTOR_BN_MOMENTUM == pytest.approx(0.9997)
  out = jax.eval_shape(lambda v: method.model.apply(v, jnp.zeros((2, CROP, CROP, 3)),
                                                   train=True, mutable=["batch_stats"])[0], variables)
  assert [f.shape for f in out["contextrast"]] == [(2, 16, 16, 16)] + [(2, 8, 8, 16)] * 3
  # Evaluation reads the logits only: the heads do not run.
  assert "contextrast" not in jax.eval_shape(
      lambda v: method.model.apply(v, jnp.zeros((2, CROP, CROP, 3)), train=False), variables)


def test_the_loss_is_ce_plus_alpha_times_the_weighted_levels_of_the_loss_module():
  method, variables = _method_and_variables(_config())
  labeled = _batch()
  key = jax.random.key(3)
  loss, (metrics, aux) = jax.jit(method.loss)(variables["params"], _state(variables),
                                              {base.LABELED: labeled}, key)
  sup, term, per_level = jax.jit(_expected_loss, static_argnums=0)(method, variables, labeled, key)
  s = contextrast_lib.ContextrastSettings(num_negatives=64)  # the smoke variant's K
  assert method.settings.contextrast == s
  np.testing.assert_allclose(term, s.alpha * np.dot(s.level_weights, per_level), rtol=1e-6)
  np.testing.assert_allclose(metrics["sup_loss"], sup, rtol=1e-6)
  np.testing.assert_allclose([metrics[f"contextrast_level{i + 1}"] for i in range(4)], per_level,
                             rtol=1e-5)
  np.testing.assert_allclose(loss, sup + term, rtol=1e-6)
  assert float(term) > 0.01 * float(sup)  # a real term, not a vanishing one
  assert set(aux["batch_stats"]) == set(variables["batch_stats"])


# Default-suite budget: the Pissas row compiles the multi- and cross-scale terms (slow).
@pytest.mark.parametrize("loss", [pytest.param("pissas", marks=pytest.mark.slow), "contrastiveseg",
                                  "none"])
def test_the_switch_selects_the_table_2_baselines(loss):
  # ContrastiveSeg's slots need more than max_views pixels of a class in an image (100 by
  # default; the 8x8 last level has 64 pixels).
  method, variables = _method_and_variables(_config(**{"contextrast.loss": loss,
                                                       "contextrast.contrastiveseg.max_views": 4}))
  labeled = _batch(seed=1)
  key = jax.random.key(5)
  total, (metrics, _) = jax.jit(method.loss)(variables["params"], _state(variables),
                                             {base.LABELED: labeled}, key)
  sup, term, _ = jax.jit(_expected_loss, static_argnums=0)(method, variables, labeled, key)
  np.testing.assert_allclose(metrics["contrastive_loss"], term, rtol=1e-6)
  np.testing.assert_allclose(total, sup + term, rtol=1e-6)
  assert (float(term) > 0) == (loss != "none")
  if loss == "pissas":  # 4 multi-scale parts and the two cross-scale ones (first vs last two)
    assert {k for k in metrics if k.startswith("pissas_")} == (
        {f"pissas_multi_scale{i}" for i in range(1, 5)} | {"pissas_cross_scale1", "pissas_cross_scale2"})


@pytest.mark.slow  # a gradient program of its own (CI time); the contract trains the term
def test_the_contrastive_term_trains_the_projectors_and_the_backbone_not_the_classifier():
  method, variables = _method_and_variables(_config())
  labeled = _batch(seed=2)

  def term(params):
    out, _ = method.model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                labeled["image"], train=True, mutable=["batch_stats"])
    return contextrast.contrastive_term(jax.random.key(0), out["contextrast"], labeled["label"],
                                        out["logits"], NUM_CLASSES, method.settings)[0]

  grads = jax.jit(jax.grad(term))(variables["params"])
  norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  for i in range(4):
    assert norm(grads[f"projector_{i}"]) > 0, i
  segmenter = grads["segmenter"]
  for i in range(4):  # every stage gets gradient through its level (and the deeper ones)
    assert norm(segmenter[f"Conv_{i}"]) > 0, i
  # BANE reads stop_gradient(argmax(logits)): the classifier gets none from this term.
  assert norm(segmenter["classifier"]) == 0.0


@pytest.mark.slow  # two compiles of the four-level term; the contract runs it in a step
def test_the_aux_term_reads_the_labelled_batch_and_optionally_the_pseudo_labels():
  config = _config("classmix_contextrast")
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=LevelsToy(NUM_CLASSES))
  assert isinstance(method.model, contextrast.ContextrastModel)
  assert method.description.endswith("+ contextrast")
  variables = _init(method.model)
  assert method.init_extra(jax.random.key(1), variables)["aux"] == {"contextrast": {}}
  term = dict(method.aux_losses.terms)["contextrast"]
  labeled, unlabeled = _batch(seed=3), _batch(seed=4)
  out_l, out_u = (_apply_train(method.model, variables, b["image"]) for b in (labeled, unlabeled))
  # Only the confident pseudo-labels count: a random half of the unlabelled pixels.
  valid_u = jax.random.bernoulli(jax.random.key(5), 0.5, unlabeled["label"].shape)
  ctx = auxiliary.StepContext(model=method.model, params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              teacher={"params": None, "batch_stats": {"t": 1}}, step=jnp.zeros(()),
                              images_l=labeled["image"], labels_l=labeled["label"], out_l=out_l,
                              out_u=out_u, labels_u=unlabeled["label"], valid_u=valid_u)
  key = jax.random.key(9)
  run = lambda t: jax.jit(lambda: t.stateful_call(key, ctx, {})[:2])()
  loss, metrics = run(term)
  expected, _ = jax.jit(contextrast.contrastive_term, static_argnums=(4, 5))(
      key, out_l["contextrast"], labeled["label"], out_l["logits"], NUM_CLASSES, term.settings)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["contextrast_aux_contrastive_loss"], expected, rtol=1e-6)
  both = dataclasses.replace(term, settings=dataclasses.replace(term.settings, aux_pseudo_labels=True))
  loss_both, _ = run(both)
  cat = lambda a, b: jnp.concatenate([a, b])
  expected_both, _ = jax.jit(contextrast.contrastive_term, static_argnums=(4, 5))(
      key, tuple(map(cat, out_l["contextrast"], out_u["contextrast"])),
      cat(labeled["label"], jnp.where(valid_u, unlabeled["label"], -1)),
      cat(out_l["logits"], out_u["logits"]),
      NUM_CLASSES, term.settings)
  np.testing.assert_allclose(loss_both, expected_both, rtol=1e-6)
  assert abs(float(loss_both) - float(loss)) > 1e-4


def test_config_none_means_the_loss_modules_default_and_errors_name_the_key():
  config = common.base_config()
  s = contextrast.settings_from(config)
  assert s.contextrast == contextrast_lib.ContextrastSettings()
  assert s.pissas == contextrast_lib.PissasSettings()
  assert s.contrastiveseg == contextrast_lib.ContrastiveSegSettings()
  config.contextrast.w_high = 0.4
  config.contextrast.level_weights = (1.0, 0.5, 0.25, 0.125)
  config.contextrast.pissas.cross_scale = False
  s = contextrast.settings_from(config)
  assert (s.contextrast.w_high, s.contextrast.level_weights, s.pissas.cross_scale) == (
      0.4, (1.0, 0.5, 0.25, 0.125), False)
  cases = [
      ({"contextrast.loss": "ccl"}, r"^config contextrast.loss='ccl' is invalid; expected one of contextrast, "),
      ({"contextrast.absent_rule": "drop"}, r"^config contextrast.absent_rule='drop' is invalid"),
      ({"contextrast.contrastiveseg.sampling": "hard"}, r"^config contextrast.contrastiveseg.sampling='hard'"),
      ({"contextrast.bane_ratio": 1.5}, r"^config contextrast: .*bane_ratio must be in \[0, 1\]"),
      ({"contextrast.levels": ("layer1", "layer5")}, r"^config contextrast.levels=.* is invalid"),
      ({"contextrast.level_weights": (1.0, 0.5)}, r"^config contextrast.level_weights has 2 values for the 4"),
      ({"contextrast.loss": "pissas", "contextrast.pissas.level_weights": (1.0,)},
       r"^config contextrast.pissas.level_weights has 1 values"),
      ({"contextrast.proj_dim": 0}, r"^config contextrast.proj_dim=0 must be a positive int"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      contextrast.settings_from(with_overrides(common.base_config(), overrides))
  config = common.base_config()
  config.contextrast.typo = 1
  with pytest.raises(ValueError, match=r"^config contextrast.typo is not a setting"):
    contextrast.settings_from(config)
  with pytest.raises(ValueError, match=r"needs a teacher"):  # a stateful term: not on supervised
    methods.get_method(_config("supervised", aux_losses=("contextrast",)), num_classes=NUM_CLASSES,
                       model=LevelsToy(NUM_CLASSES))


def test_a_missing_level_is_one_line_naming_the_models_maps():
  config = _config(**{"contextrast.levels": ("layer1", "decoder")})
  config.contextrast.level_weights = (1.0, 0.1)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=LevelsToy(NUM_CLASSES))
  with pytest.raises(ValueError, match=r"contextrast.levels=.*: the model has no decoder \(it has "):
    jax.eval_shape(lambda: method.model.init(jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)),
                                             train=False))


def test_the_paper_recipes():
  c = camvid.get_config("method=contextrast")
  assert (c.method, c.model.name, c.model.backbone, c.model.output_stride) == (
      "contextrast", "deeplabv3", "resnet101", 8)
  assert (c.input.streams.labeled.batch_size, c.num_train_steps) == (16, 6000)
  assert c.eval.scales == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0) and c.eval.flip
  c = cityscapes.get_config("method=contextrast")
  assert (c.model.name, c.model.backbone, c.model.output_stride) == ("deeplabv3", "resnet101", 8)
  assert (c.input.crop_size, c.input.streams.labeled.batch_size, c.num_train_steps) == (
      (512, 1024), 8, 40_000)
  c = camvid.get_config("method=contextrast,variant=cpu")
  assert c.input.num_labeled == 0  # every image labelled: Contextrast is supervised
  assert (c.model.name, c.model.backbone, c.num_train_steps, c.eval.scales) == (
      "deeplabv3", "resnet_tiny", 2000, (1.0,))
  assert camvid.get_config("method=contextrast,variant=smoke").eval.scales == (1.0,)
  assert common.METHOD_PRESETS["classmix_contextrast"]["aux_losses"] == ("contextrast",)
