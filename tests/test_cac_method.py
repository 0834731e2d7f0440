"""CAC as a method: network pieces (golden case G), the bank in the step, the optimiser's
backbone group, and the method contract (8 devices == 1, checkpoint + resume)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_methods
from conftest import toy_segmenter
from reco_jax import methods, optim, parallel, train
from reco_jax.methods import cac as cac_method

NUM_CLASSES = test_methods.NUM_CLASSES


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def test_projector_and_classifier_reproduce_the_official_modules(golden):
  """Case G: avg-pool of the decoder map, project (1x1, ReLU, 1x1, normalise) and the
  classifier in eval mode, from the official weights."""
  g = golden("wave2/cac_loss_G_full_forward.npz")
  dense = lambda w, b: {"kernel": jnp.asarray(w[:, :, 0, 0].T), "bias": jnp.asarray(b)}
  proj_params = {"conv0": dense(g["param_project_0_weight"], g["param_project_0_bias"]),
                 "conv1": dense(g["param_project_2_weight"], g["param_project_2_bias"])}
  cls_params = {"conv": dense(g["param_classifier_1_weight"], g["param_classifier_1_bias"])}
  for v in ("1", "2"):
    enc = nhwc(g["enc_ul" + v])
    pooled = jax.lax.reduce_window(enc, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    np.testing.assert_allclose(np.transpose(pooled, (0, 3, 1, 2)), g[f"enc_ul{v}_pooled"], atol=1e-6)
    feat = cac_method.Projector(256, 128).apply({"params": proj_params}, pooled)
    np.testing.assert_allclose(np.transpose(feat, (0, 3, 1, 2)), g["feat" + v], rtol=0, atol=1e-5)
    logits = cac_method.Classifier(21, 0.1).apply({"params": cls_params}, pooled, train=False)
    np.testing.assert_allclose(np.transpose(logits, (0, 3, 1, 2)), g[f"logits{v}_eval"], rtol=0, atol=1e-5)


def _cac(**overrides):
  config = test_methods._contract_config("cac")
  for k, v in overrides.items():
    node = config
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))
  return config, method


def test_bank_is_written_before_the_loss_and_unfilled_slots_are_masked(single_device_mesh):
  """step_save 2 (3 slots), unsupervised from step 1: step 0 leaves the bank empty (warm-up:
  no unlabelled pass), steps 1..4 write slots 0, 1, 2, 0; the filled mask follows."""
  config, method = _cac(**{"cac.step_save": 2, "cac.unsup_start_step": 1})
  state = train.create_state(config, method, single_device_mesh)
  slots, rows, dim = method.bank_shape()
  assert state.extra["bank"]["feats"].shape == (3, rows, dim) and rows == 2 * 8 * 2 * 2
  step = train.make_train_step(single_device_mesh, method, config.seed)
  batches = test_methods.random_batches(config, method, 5, seed=1)
  filled, last = [], None
  for batch in batches:
    before = jax.device_get(state.extra["bank"])
    state, metrics = step(state, parallel.to_global_batch(batch, single_device_mesh))
    after = jax.device_get(state.extra["bank"])
    filled.append(after["filled"].tolist())
    changed = [not np.array_equal(before["feats"][s], after["feats"][s]) for s in range(3)]
    last = (changed, metrics)
    if len(filled) == 1:
      assert float(metrics["unsup_loss"]) == 0.0 and not any(changed)
  assert filled == [[False] * 3, [True, False, False], [True, True, False], [True, True, True],
                    [True, True, True]]
  assert last[0] == [True, False, False]  # step 4 overwrote the oldest slot (0)
  # The written rows are unit-norm projected features, the labels are classes.
  feats = np.asarray(state.extra["bank"]["feats"])
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, atol=1e-5)
  assert np.asarray(state.extra["bank"]["labels"]).max() < NUM_CLASSES


def test_warmup_skip_by_cond_and_by_select_train_identically(single_device_mesh):
  """`cac.warmup_skip`: skipping the warm-up's unlabelled branch with lax.cond (no work) and
  computing it then selecting it away train identically: bit for bit during the warm-up (the
  select path must leave BN statistics, bank and gradients untouched), and to float32 rounding
  after `unsup_start_step` (the two programs fuse the active branch differently)."""
  assert cac_method.skips_by_cond("auto", "gpu") and not cac_method.skips_by_cond("auto", "cpu")
  runs = []
  for mode in ("cond", "select"):
    config, method = _cac(**{"cac.unsup_start_step": 2, "cac.warmup_skip": mode})
    assert cac_method.skips_by_cond(method.settings.warmup_skip, "cpu") == (mode == "cond")
    state = train.create_state(config, method, single_device_mesh)
    step = train.make_train_step(single_device_mesh, method, config.seed)
    history = []
    for batch in test_methods.random_batches(config, method, 3, seed=1):
      state, metrics = step(state, parallel.to_global_batch(batch, single_device_mesh))
      history.append(jax.device_get(metrics))
      if len(history) == 2:  # the end of the warm-up
        runs.append(jax.device_get(state))
    runs.append((jax.device_get(state), history))
  warm_cond, (state_cond, hist_cond), warm_select, (state_select, hist_select) = runs
  assert float(hist_cond[1]["unsup_loss"]) == 0.0 and float(hist_cond[2]["unsup_loss"]) > 0.0
  # Equal bit for bit (NaN == NaN: the pseudo-label diagnostics are undefined in the warm-up).
  for h_cond, h_select in zip(hist_cond[:2], hist_select[:2]):
    assert h_cond.keys() == h_select.keys()
    for name in h_cond:
      np.testing.assert_array_equal(h_cond[name], h_select[name], err_msg=name)
  for a, b in zip(jax.tree.leaves(warm_cond), jax.tree.leaves(warm_select)):
    np.testing.assert_array_equal(a, b)
  for name, value in hist_cond[2].items():
    np.testing.assert_allclose(hist_select[2][name], value, rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(state_cond), jax.tree.leaves(state_select)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bank_in_official_order_puts_filled_slots_oldest_first():
  from reco_jax.losses import cac as cac_lib
  bank = cac_lib.init_bank(3, 2, 1)
  for t in range(5):
    bank = cac_lib.bank_write(bank, jnp.int32(t), jnp.full((2, 1), float(t)), jnp.full((2,), t))
    feats, labels, valid = cac_lib.bank_in_official_order(bank, jnp.int32(t))
    held = list(range(max(0, t - 2), t + 1))
    assert np.asarray(labels)[np.asarray(valid)].tolist() == [s for s in held for _ in range(2)]
    assert np.asarray(valid).tolist() == [True] * 2 * len(held) + [False] * (6 - 2 * len(held))


def test_backbone_lr_mult_scales_only_the_backbone_updates():
  import ml_collections
  c = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
                                     backbone_lr_mult=0.1))
  params = {"segmenter": {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}},
            "project": {"w": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.create_optimizer(c, lambda s: 0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["segmenter"]["backbone"]["w"], -0.01, rtol=1e-6)
  np.testing.assert_allclose(updates["segmenter"]["head"]["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["project"]["w"], -0.1, rtol=1e-6)
  c.backbone_lr_mult = 1.0
  assert isinstance(optim.create_optimizer(c, lambda s: 0.1), optax.GradientTransformation)


def test_bad_cac_settings_are_named():
  with pytest.raises(ValueError, match=r"config input.crop_size=\(20, 20\) must be square and a multiple of 8"):
    _cac(**{"input.crop_size": (20, 20)})
  with pytest.raises(ValueError, match=r"config cac.pair_variant='voc2' is invalid"):
    _cac(**{"cac.pair_variant": "voc2"})
  with pytest.raises(ValueError, match=r"config cac.mean_groups=3 must divide"):
    _cac(**{"cac.mean_groups": 3})
  with pytest.raises(ValueError, match=r"config cac.warmup_skip='skip' is invalid"):
    _cac(**{"cac.warmup_skip": "skip"})
