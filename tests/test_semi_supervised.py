"""The mean-teacher train step (issue 4) and the semi-supervised training runs.

Step-level tests use a toy segmenter (one conv + BatchNorm + two 1x1 heads at stride 4)
instead of DeepLabv3+: it has the same interface (`{logits, rep, features}`, `batch_stats`), so the
whole step (teacher pass, strong augmentation, two student passes, losses, EMA, donation)
is exercised, and compiles in seconds. The real model runs in the resume test and in the
CamVid run through main.py.
"""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CAMVID_DIR, REPO_ROOT, restore_latest_state, toy_segmenter, with_overrides
from configs import synthetic
from reco_jax import checkpointing, diagnostics, methods, parallel, resampling, train
from reco_jax.losses import reco as reco_lib
from reco_jax.losses import supervised, unsupervised
from reco_jax.methods import mean_teacher

NUM_CLASSES = 5
CROP = (16, 16)


def _config(method="classmix_reco", **overrides):
  config = synthetic.get_config(f"method={method},variant=smoke")
  config.input.crop_size = CROP
  return with_overrides(config, overrides)


def _method(config):
  return methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))


def _batches(config, num_steps, seed=0):
  """Random labelled + unlabelled batches (the unlabelled labels are only read in partial mode)."""
  rng = np.random.RandomState(seed)
  h, w = config.input.crop_size
  out = []
  for _ in range(num_steps):
    batch = {}
    for name in _method(config).streams():
      b = config.input.streams[name].batch_size
      batch[name] = {"image": rng.randn(b, h, w, 3).astype(np.float32),
                     "label": rng.randint(-1, NUM_CLASSES, (b, h, w)).astype(np.int32)}
    out.append(batch)
  return out


def _host(state):
  """Host copies of the variables (taken before the state is donated to the next step);
  the teacher as `teacher_params` / `teacher_batch_stats`."""
  out = {"params": state.params, "batch_stats": state.batch_stats}
  if state.extra:
    out.update(teacher_params=state.extra["params"], teacher_batch_stats=state.extra["batch_stats"])
  return jax.tree.map(np.asarray, out)


def _buffer_pointers(tree):
  return {shard.data.unsafe_buffer_pointer()
          for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards}


def _shared_teacher_student_buffers(state):
  return _buffer_pointers((state.params, state.batch_stats)) & _buffer_pointers(state.extra)


def _run(config, mesh, batches):
  """Runs the step; returns host snapshots (state 0..n), metrics per step and buffer checks."""
  model = toy_segmenter(NUM_CLASSES)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
  state = train.create_state(config, method, mesh)
  step = train.make_train_step(mesh, method, config.seed)
  snapshots, metrics, shared = [_host(state)], [], []
  if state.extra:
    shared.append(_shared_teacher_student_buffers(state))
  for batch in batches:
    state, m = step(state, parallel.to_global_batch(batch, mesh))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})  # syncs every step
    snapshots.append(_host(state))
    if state.extra:
      shared.append(_shared_teacher_student_buffers(state))
  return {"snapshots": snapshots, "metrics": metrics, "shared": shared, "batches": batches}


def _continuous_config():
  """ReCo + ClassMix without the uint8 emulation of the official PIL round trips.

  Its floor() turns the ulp-level differences between two compiled programs (8 devices vs
  1: different fusion) into whole uint8 levels for the odd pixel, which then moves the
  losses by ~1e-4; test_augment covers the emulation itself.
  """
  return _config(**{"mean_teacher.quantize": False})


@pytest.fixture(scope="module")
def semi_run(mesh):
  """ReCo + ClassMix, two steps on 8 devices."""
  config = _continuous_config()
  return _run(config, mesh, _batches(config, 2))


def _assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------
# The step.


def test_semi_step_on_8_devices_equals_1_device(semi_run, single_device_mesh):
  config = _continuous_config()
  single = _run(config, single_device_mesh, semi_run["batches"])
  for m8, m1 in zip(semi_run["metrics"], single["metrics"]):
    assert m8.keys() == m1.keys()
    for key in m8:
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  losses = [m["loss"] for m in semi_run["metrics"]]
  assert losses[0] != losses[1]
  for s8, s1 in zip(semi_run["snapshots"][1:], single["snapshots"][1:]):
    assert s8.keys() == s1.keys() == {"params", "batch_stats", "teacher_params", "teacher_batch_stats"}
    _assert_trees_close(s8, s1, rtol=1e-4, atol=1e-6)


def test_semi_metrics_log_every_loss(semi_run):
  first, second = semi_run["metrics"]
  assert set(first) == {"loss", "sup_loss", "unsup_loss", "reco_loss", "reco_query_classes",
                        "aux_unlabeled_valid_fraction", "pseudo_label_confident_fraction",
                        "ema_decay", "grad_norm",
                        *diagnostics.metric_names(("strong", "weak"))}
  for m in (first, second):
    assert all(np.isfinite(v) for k, v in m.items() if not k.endswith(("precision_strong", "precision_weak")))
    np.testing.assert_allclose(m["loss"], m["sup_loss"] + m["unsup_loss"] + m["reco_loss"], rtol=1e-6)
    assert m["reco_loss"] > 0 and m["unsup_loss"] > 0
    assert 1 <= m["reco_query_classes"] <= NUM_CLASSES
    assert 0 < m["pseudo_label_confident_fraction"] < 1
    assert 0 < m["aux_unlabeled_valid_fraction"] < 1
  assert (first["ema_decay"], second["ema_decay"]) == (0.0, 0.5)


def test_teacher_never_aliases_the_student(semi_run):
  # After create_state and after each donated step: teacher and student share no buffer
  # (a shared buffer would be donated twice: XLA error, then a segfault).
  assert len(semi_run["shared"]) == 3
  assert all(not shared for shared in semi_run["shared"])


def test_teacher_is_the_ema_of_the_student_iterates(semi_run):
  s0, s1, s2 = semi_run["snapshots"]
  # Created as a copy; after the first update (decay 0) it equals the student exactly.
  _assert_trees_equal(s0["teacher_params"], s0["params"])
  _assert_trees_equal(s1["teacher_params"], s1["params"])
  # Decay 1/2 at the second update: the mean of the two student iterates, bit for bit.
  half = np.float32(0.5)
  _assert_trees_equal(s2["teacher_params"],
                      jax.tree.map(lambda a, b: half * a + half * b, s1["params"], s2["params"]))
  assert not np.array_equal(s1["params"]["Conv_0"]["kernel"], s2["params"]["Conv_0"]["kernel"])


def test_teacher_batch_stats_come_from_its_own_train_mode_pass(semi_run):
  # reco_spec §0.8: the train-mode teacher updates its running statistics from its own
  # forward pass on the raw unlabelled crops; they are not averaged from the student.
  model = toy_segmenter(NUM_CLASSES)
  for t in (0, 1):
    before, after = semi_run["snapshots"][t], semi_run["snapshots"][t + 1]
    images = semi_run["batches"][t]["unlabeled"]["image"]
    _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        {"params": before["teacher_params"], "batch_stats": before["teacher_batch_stats"]}, images)
    _assert_trees_close(after["teacher_batch_stats"], jax.device_get(updates["batch_stats"]),
                        rtol=1e-5, atol=1e-6)
  s1 = semi_run["snapshots"][1]
  assert not np.allclose(s1["teacher_batch_stats"]["BatchNorm_0"]["mean"],
                         s1["batch_stats"]["BatchNorm_0"]["mean"])


# The eval-mode teacher is the more different path; the train-mode one compiles the same
# step as the official setting plus one EMA, so it runs in the slow set only.
@pytest.mark.parametrize("teacher_train_mode", [pytest.param(True, marks=pytest.mark.slow), False])
def test_ema_batch_stats_alternative(single_device_mesh, teacher_train_mode):
  config = _config(**{"mean_teacher.ema_batch_stats": True,
                      "mean_teacher.teacher_train_mode": teacher_train_mode})
  run = _run(config, single_device_mesh, _batches(config, 2))
  _, s1, s2 = run["snapshots"]
  _assert_trees_equal(s1["teacher_batch_stats"], s1["batch_stats"])
  half = np.float32(0.5)
  _assert_trees_equal(s2["teacher_batch_stats"], jax.tree.map(lambda a, b: half * a + half * b,
                                                          s1["batch_stats"], s2["batch_stats"]))
  # (The pseudo-label diagnostics' ratios may be undefined: no confident pixel.)
  assert all(np.isfinite(v) for m in run["metrics"] for k, v in m.items()
             if k not in diagnostics.metric_names(("strong", "weak")))


def test_eval_mode_teacher_needs_ema_batch_stats():
  config = _config(**{"mean_teacher.teacher_train_mode": False})
  with pytest.raises(ValueError, match=r"mean_teacher.teacher_train_mode=False needs "
                                       r"mean_teacher.ema_batch_stats"):
    _method(config)


# ---------------------------------------------------------------------------------------------
# What the step computes, against assemblies written from reco_spec §1.5, §2, §4.


def _toy_state(config, mesh):
  method = _method(config)
  return method, train.create_state(config, method, mesh)


def test_semi_losses_follow_the_official_assembly(single_device_mesh):
  config = _config()
  method, state = _toy_state(config, single_device_mesh)
  rng = np.random.RandomState(3)
  b, (h, w) = 8, CROP
  labeled = {"image": jnp.asarray(rng.randn(b, h, w, 3), jnp.float32),
             "label": jnp.asarray(rng.randint(-1, NUM_CLASSES, (b, h, w)), jnp.int32)}
  # An augmented unlabelled batch: pseudo-labels with some cut-out (-1, confidence 0) pixels.
  conf = unsupervised.quantize_confidence(jnp.asarray(rng.uniform(0.3, 1.0, (b, h, w)), jnp.float32))
  cut = rng.rand(b, h, w) < 0.2
  pseudo_labels = np.where(cut, -1, rng.randint(0, NUM_CLASSES, (b, h, w)))
  unlabeled = {"image": jnp.asarray(rng.randn(b, h, w, 3), jnp.float32),
               "label": jnp.asarray(pseudo_labels, jnp.int32),
               "confidence": jnp.where(jnp.asarray(cut), 0.0, conf)}
  key = jax.random.key(7)

  @jax.jit
  def ours():
    # The loss after pseudo-labelling: the augmented batch above stands in for the teacher's
    # (the teacher still runs: its labels feed the pseudo-label diagnostics only).
    method.augment_pseudo_labelled = lambda batch, confidence, labels, key: unlabeled
    loss, (metrics, aux) = method.loss(state.params, state, {"labeled": labeled, "unlabeled": unlabeled},
                                       key)
    return loss, metrics, aux["batch_stats"]

  @jax.jit
  def reference():
    student = functools.partial(state.apply_fn, train=True, mutable=["batch_stats"])
    # Two separate student passes: BN statistics per sub-batch, updated l then u.
    out_l, upd = student({"params": state.params, "batch_stats": state.batch_stats}, labeled["image"])
    out_u, upd = student({"params": state.params, **upd}, unlabeled["image"])
    (logits_l, rep_l), (logits_u, rep_u) = (out_l["logits"], out_l["rep"]), (out_u["logits"], out_u["rep"])
    sup = supervised.supervised_loss(logits_l, labeled["label"])
    unsup = unsupervised.unsupervised_loss(logits_u, unlabeled["label"], unlabeled["confidence"],
                                           0.97, empty_policy="zero")
    # mask_l = (y_l >= 0), mask_u = conf_u >= delta_w = 0.7; nearest down-sampling to rep size.
    size = rep_l.shape[1:3]
    labels = jnp.concatenate([labeled["label"], unlabeled["label"]])
    mask = jnp.concatenate([labeled["label"] >= 0, unlabeled["confidence"] >= 0.7])
    labels_low = resampling.resize_nearest_torch(labels, size)
    mask_low = resampling.resize_nearest_torch(mask, size)
    probs = jax.nn.softmax(jnp.concatenate([logits_l, logits_u]), axis=-1)
    # The method draws ReCo's samples with the second half of the step key.
    reco = reco_lib.reco_loss(jax.random.split(key)[1], jnp.concatenate([rep_l, rep_u]), labels_low,
                              mask_low & (labels_low >= 0), probs, strong_threshold=0.97,
                              temperature=0.5, num_queries=32, num_negatives=64)
    losses = {"sup_loss": sup, "unsup_loss": unsup, "reco_loss": reco}
    return sup + unsup + reco, losses, upd["batch_stats"]

  loss, metrics, batch_stats = ours()
  ref_loss, ref_metrics, ref_batch_stats = reference()
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    assert float(value) > 0, name
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _assert_trees_close(jax.device_get(batch_stats), jax.device_get(ref_batch_stats), rtol=1e-6, atol=1e-7)


def test_partial_labels_override_the_teacher(single_device_mesh):
  # Identity augmentation, so the override and the quantisation are visible directly.
  config = _config(**{"mean_teacher.partial_labels": True, "input.partial_labels_dir": "/unused",
                      "input.scale_range": (1.0, 1.0), "input.color_jitter_prob": 0.0,
                      "input.blur_prob": 0.0, "input.flip_prob": 0.0})
  method, state = _toy_state(config, single_device_mesh)
  method.settings = dataclasses.replace(method.settings, mix="none")
  rng = np.random.RandomState(4)
  sparse = np.where(rng.rand(8, *CROP) < 0.1, rng.randint(0, NUM_CLASSES, (8, *CROP)), -1).astype(np.int32)
  images = rng.randn(8, *CROP, 3).astype(np.float32)
  out, _ = jax.jit(lambda: method.pseudo_label(state.extra, {"image": images, "label": sparse},
                                               jax.random.key(0)))()
  outputs, _ = state.apply_fn(state.extra, images, train=True, mutable=["batch_stats"])
  probs = np.asarray(jax.nn.softmax(supervised.upsample_logits(outputs["logits"], CROP), axis=-1))
  teacher_label, teacher_conf = probs.argmax(-1), probs.max(-1)
  labelled = sparse >= 0
  np.testing.assert_array_equal(np.asarray(out["label"]), np.where(labelled, sparse, teacher_label))
  conf = np.asarray(out["confidence"])
  np.testing.assert_array_equal(conf[labelled], 1.0)
  # Elsewhere the teacher's confidence, quantised down to the uint8 grid (floor(255 p) / 255).
  levels = conf[~labelled] * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  below = teacher_conf[~labelled] - conf[~labelled]
  assert (below > -1e-6).all() and (below < 1 / 255 + 1e-6).all()


def test_partial_labeled_aux_targets():
  rng = np.random.RandomState(5)
  logits = rng.randn(2, 4, 4, 3).astype(np.float32) * 4
  sparse = np.where(rng.rand(2, 13, 13) < 0.2, rng.randint(0, 3, (2, 13, 13)), -1).astype(np.int32)
  labels, valid = mean_teacher.partial_labeled_aux_targets(jnp.asarray(logits), jnp.asarray(sparse))
  probs = np.asarray(jax.nn.softmax(supervised.upsample_logits(jnp.asarray(logits), (13, 13)), axis=-1))
  labelled = sparse >= 0
  np.testing.assert_array_equal(labels, np.where(labelled, sparse, probs.argmax(-1)))
  np.testing.assert_array_equal(valid, labelled | (probs.max(-1) >= 0.97))
  assert 0 < np.mean(np.asarray(valid) & ~labelled) < 1  # the 0.97 rule selects something


def test_mean_teacher_method_without_unlabelled_batch_is_rejected(tmp_path):
  config = _config(**{"input.streams.unlabeled.batch_size": 0})
  with pytest.raises(ValueError, match=r"input.streams.unlabeled.batch_size=0 must be a positive int "
                                       r"\(method 'mean_teacher' reads stream 'unlabeled'\)"):
    train.train_and_evaluate(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Whole runs with the real (smoke-sized) DeepLabv3+.


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# The default suite resumes the same run through main.py (test_main.py, sharing its programs
# with the other main.py tests); this in-process version on 8 devices resumes two steps.
@pytest.mark.slow
def test_semi_supervised_run_resumes_exactly(tmp_path):
  """A 4-step ReCo + ClassMix run, and a run resumed from its step-2 checkpoint.

  The resumed workdir is the uninterrupted run's, cut back to its state after the step-2
  checkpoint (later checkpoint and log lines removed): the files a run killed right after
  that checkpoint leaves. One training run fewer than killing a third run.
  """
  config = synthetic.get_config("method=classmix_reco,variant=smoke")
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 4, 2, 4
  full = str(tmp_path / "full")
  results = train.train_and_evaluate(config, full)
  records = _records(full)
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [1, 2, 3, 4]
  for r in train_records:
    assert r["reco_loss"] > 0 and r["sup_loss"] > 0 and np.isfinite(r["unsup_loss"])
    assert r["reco_query_classes"] >= 1 and 0 <= r["pseudo_label_confident_fraction"] <= 1
  assert 0 <= results["miou"] <= 1

  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, checkpointing.RESUME_DIR, "4"))
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= 2)
  resumed_results = train.train_and_evaluate(config, resumed)

  resumed_train = {r["step"]: r for r in _records(resumed) if r["split"] == "train"}
  assert sorted(resumed_train) == [1, 2, 3, 4]
  for r in train_records[2:]:
    for key in ("loss", "sup_loss", "unsup_loss", "reco_loss"):
      np.testing.assert_allclose(resumed_train[r["step"]][key], r[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(resumed_results["miou"], results["miou"], rtol=1e-6)
  finals = [restore_latest_state(config, w) for w in (full, resumed)]
  assert int(finals[0].step) == int(finals[1].step) == 4
  _assert_trees_close(_host(finals[0]), _host(finals[1]), rtol=1e-6, atol=1e-7)


def test_main_trains_camvid_supervised_reco_smoke(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "main.py", "--config=configs/camvid.py:method=supervised_reco,variant=smoke",
         f"--workdir={workdir}", f"--config.input.manual_dir={CAMVID_DIR}",
         f"--config.input.data_dir={tmp_path / 'tfds'}"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  records = _records(workdir)
  train_records = [r for r in records if r["split"] == "train"]
  assert len(train_records) == 3
  for r in train_records:
    assert r["reco_loss"] > 0 and np.isfinite(r["reco_loss"]) and r["reco_query_classes"] >= 2
  evals = [r for r in records if r["split"] == "eval"]
  assert evals and 0 <= evals[-1]["miou"] <= 1
