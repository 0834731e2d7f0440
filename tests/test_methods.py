"""Methods as plug-ins (issue 9): the refactor regression, the method contract, and a method
that lives entirely in this test module.

The regression fixture (`fixtures/refactor_regression.json`) holds the outputs of the
pre-plug-in trainer (commit ef02a4b, `train.train_step` with a `StepConfig`): per-step
metrics and SHA-256 digests of the trained student, BatchNorm and teacher arrays after two
steps on fixed random batches, for `supervised_reco`, `classmix_reco`, `cutmix` and the
partial-label mode. The plug-in trainer must reproduce them bit for bit.
"""
import hashlib
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import restore_latest_state, toy_segmenter, with_overrides
from configs import synthetic
from reco_jax import checkpointing, diagnostics, evaluate, methods, models, parallel, train
from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import base

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "refactor_regression.json"
NUM_CLASSES = 8  # the synthetic dataset's
STREAM_SEEDS = {"supervised_reco": 100, "classmix_reco": 101, "cutmix": 102, "partial_classmix_reco": 103}
REGRESSION_CASES = {
    "supervised_reco": ("supervised_reco", {}),
    # Low thresholds so that an untrained teacher's pseudo-labels count (unsup and ReCo terms).
    "classmix_reco": ("classmix_reco", {"mean_teacher.strong_threshold": 0.15,
                                        "mean_teacher.weak_threshold": 0.15}),
    "cutmix": ("cutmix", {"mean_teacher.strong_threshold": 0.15}),
    "partial_classmix_reco": ("classmix_reco", {"mean_teacher.partial_labels": True,
                                                "input.partial_labels_dir": "/unused"}),
}
# The pre-plug-in name of a metric, where the plug-in trainer renamed it.
_OLD_METRIC_NAMES = {"aux_unlabeled_valid_fraction": "reco_unlabeled_valid_fraction"}


def smoke_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  return with_overrides(synthetic.get_config(f"method={preset},variant=smoke"), overrides)


def random_batches(config, method, num_steps: int, seed: int, num_classes: int = NUM_CLASSES) -> list[dict]:
  """Random batches of the method's streams (as the fixture recorder drew them)."""
  rng = np.random.RandomState(seed)
  h, w = config.input.crop_size
  out = []
  for _ in range(num_steps):
    batch = {}
    for name in method.streams():  # labeled first, as the recorder
      b = config.input.streams[name].batch_size
      batch[name] = {"image": rng.randn(b, h, w, 3).astype(np.float32),
                     "label": rng.randint(-1, num_classes, (b, h, w)).astype(np.int32)}
    out.append(batch)
  return out


def _digests(prefix: str, tree) -> dict:
  return {prefix + "/" + "/".join(str(getattr(k, "key", k)) for k in path):
          hashlib.sha256(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest()
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


_DIAGNOSTICS = frozenset(diagnostics.metric_names(("strong", "weak", "selected")))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "cutmix" else c
                                  for c in sorted(REGRESSION_CASES)])
def test_plugin_trainer_reproduces_the_pre_refactor_step_bit_for_bit(case, single_device_mesh):
  expected = json.loads(FIXTURE.read_text())
  preset, overrides = REGRESSION_CASES[case]
  config = smoke_config(preset, **overrides)
  model = models.create_model(config.model, NUM_CLASSES)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
  state = train.create_state(config, method, single_device_mesh)
  step = train.make_train_step(single_device_mesh, method, config.seed)
  for s, batch in enumerate(random_batches(config, method, 2, STREAM_SEEDS[case])):
    state, metrics = step(state, parallel.to_global_batch(batch, single_device_mesh))
    for name, value in jax.device_get(metrics).items():
      if name in _DIAGNOSTICS:  # added since the fixture; they never touch the trajectory
        continue
      key = f"{case}/metrics{s}/{_OLD_METRIC_NAMES.get(name, name)}"
      assert key in expected, f"new metric {name}"
      assert float(value) == expected[key]["value"], (key, float(value), expected[key]["value"])
  got = {**_digests(f"{case}/params", state.params), **_digests(f"{case}/batch_stats", state.batch_stats)}
  if state.extra:
    got.update(_digests(f"{case}/teacher_params", state.extra["params"]))
    got.update(_digests(f"{case}/teacher_batch_stats", state.extra["batch_stats"]))
  want = {k: v["sha256"] for k, v in expected.items() if k.startswith(case + "/") and "sha256" in v}
  assert set(got) == set(want)
  differing = sorted(k for k in want if got[k] != want[k])
  assert not differing, f"{len(differing)} of {len(want)} arrays differ, e.g. {differing[:3]}"


# ------------------------------------------------------------------------------------------
# The contract every registered method keeps.
# ------------------------------------------------------------------------------------------

CONTRACT_PRESETS = [
    "supervised", "supervised_reco", "classmix", "classmix_reco", "cac",
    # Slow (CI time): PC²Seg and S4GAN compile three passes / a second model; their own test
    # files cover the blocks, and `-m slow` runs the contract.
    pytest.param("pc2seg", marks=pytest.mark.slow), pytest.param("s4gan", marks=pytest.mark.slow),
    # Slow: three networks and three augmentation chains per step take minutes to compile on
    # CI's two cores; the default suite runs its blocks against the goldens and its phase
    # gates (test_memory_bank_method.py).
    pytest.param("memory_bank", marks=pytest.mark.slow),
    pytest.param("classmix_reco_memory_bank", marks=pytest.mark.slow),
    pytest.param("cutout", marks=pytest.mark.slow), pytest.param("cutmix", marks=pytest.mark.slow),
    pytest.param("cutout_reco", marks=pytest.mark.slow),
    pytest.param("cutmix_reco", marks=pytest.mark.slow),
    # Slow (CI time): Contextrast compiles BANE and the loss of four levels; its own test file
    # checks the loss, the gradients and the switch in the default suite.
    pytest.param("contextrast", marks=pytest.mark.slow),
    pytest.param("classmix_contextrast", marks=pytest.mark.slow),
]


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), _host(a), _host(b))


def _contract_config(preset):
  # No uint8 emulation: its floor() turns ulp-level differences between two compiled programs
  # (8 devices vs 1) into whole levels (test_semi_supervised explains).
  # The toy segmenter has no decoder map: the memory bank reads its `rep`.
  # Nor backbone stages: Contextrast projects `rep` four times (four projectors, four levels).
  return smoke_config(preset, **{"input.crop_size": (16, 16), "mean_teacher.quantize": False,
                                 "memory_bank.feature_source": "rep",
                                 "contextrast.levels": ("rep",) * 4})


def test_every_method_module_is_covered_by_a_preset():
  from configs import common
  assert set(methods.known_methods()) == {p["method"] for p in common.METHOD_PRESETS.values()}


# The metrics each method module logs besides `loss`, `sup_loss` and `grad_norm`.
_METHOD_METRICS = {
    "supervised": set(),
    "mean_teacher": {"unsup_loss", "pseudo_label_confident_fraction", "ema_decay"},
    "cac": {"unsup_loss", "cac_loss1", "cac_loss2", "cac_selected_fraction"},
    "pc2seg": {"unsup_loss", "pc2seg_contrastive", "pc2seg_consistency",
               "pc2seg_valid_anchor_fraction"},
    "memory_bank": {"unsup_loss", "pseudo_label_loss", "entropy_loss", "contrastive_labeled",
                    "contrastive_unlabeled", "memory_filled_fraction", "memory_candidates",
                    "ema_decay"},
    "contextrast": {"contrastive_loss"} | {f"contextrast_level{i}" for i in range(1, 5)},
    "s4gan": {"unsup_loss", "fm_loss", "st_loss", "st_selected_fraction", "d_loss", "d_loss_fake",
              "d_loss_real"},
}


def _check_logged_losses(config, metrics: list[dict]) -> None:
  """Every loss of the method is logged, and `loss` is their sum."""
  reco = "reco" in config.aux_losses
  expected = {"loss", "sup_loss", "grad_norm"} | _METHOD_METRICS[config.method]
  expected |= {"reco_loss", "reco_query_classes"} if reco else set()
  expected |= {"aux_unlabeled_valid_fraction"} if reco and "unsup_loss" in expected else set()
  if "memory_bank" in config.aux_losses:
    expected |= {"stateful_aux_loss"} | {f"memory_bank_{k}" for k in (
        "contrastive_labeled", "contrastive_unlabeled", "memory_filled_fraction", "memory_candidates")}
  if "contextrast" in config.aux_losses:
    expected |= {"stateful_aux_loss", "contextrast_aux_contrastive_loss"} | {
        f"contextrast_aux_contextrast_level{i}" for i in range(1, 5)}
  pseudo = set(metrics[0]) & set(diagnostics.metric_names(("strong", "weak", "selected")))
  # Every semi-supervised method logs the pseudo-label diagnostics (reco_jax/diagnostics.py);
  # their ratios can be undefined (NaN) on a step, so only their presence is checked here.
  diagnosed = "diagnostics" in config and config.diagnostics.pseudo_labels
  # (Only the semi-supervised methods, those with an unsupervised loss, have pseudo-labels.)
  assert bool(pseudo) == ("unsup_loss" in expected and diagnosed)
  assert {f"{diagnostics.PREFIX}accuracy", f"{diagnostics.PREFIX}ece"} <= pseudo or not pseudo
  for m in metrics:
    assert set(m) - pseudo == expected
    assert all(np.isfinite(v) for k, v in m.items() if k not in pseudo)
    np.testing.assert_allclose(m["loss"], m["sup_loss"] + m.get("unsup_loss", 0.0) + m.get("reco_loss", 0.0)
                               + m.get("stateful_aux_loss", 0.0) + m.get("contrastive_loss", 0.0),
                               rtol=1e-6)
    if reco:
      assert m["reco_loss"] > 0
    if config.method == "cac":  # both directions summed, weight 0.1; the smoke γ=0 selects pixels
      np.testing.assert_allclose(m["unsup_loss"], 0.1 * (m["cac_loss1"] + m["cac_loss2"]), rtol=1e-5)
      assert m["unsup_loss"] > 0 and m["cac_selected_fraction"] > 0


@pytest.mark.parametrize("preset", CONTRACT_PRESETS)
def test_method_contract(preset, mesh, single_device_mesh, tmp_path):
  """Builds, two steps on 8 and 1 devices (equal), checkpoint, resume onto 1 device == the
  uninterrupted third step, and evaluation of the method's weights."""
  config = _contract_config(preset)
  model = toy_segmenter(NUM_CLASSES)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
  assert set(method.streams()) <= set(config.input.streams)
  batches = random_batches(config, method, 3, seed=7)
  steps = {m: train.make_train_step(m, method, config.seed) for m in (mesh, single_device_mesh)}

  def run(m, state, batches):
    metrics = []
    for batch in batches:
      state, out = steps[m](state, parallel.to_global_batch(batch, m))
      metrics.append({k: float(v) for k, v in jax.device_get(out).items()})
    return state, metrics

  state8, metrics8 = run(mesh, train.create_state(config, method, mesh), batches[:2])
  state1, metrics1 = run(single_device_mesh, train.create_state(config, method, single_device_mesh),
                         batches[:2])
  for m8, m1 in zip(metrics8, metrics1):
    assert set(m8) == set(m1) and "loss" in m8
    np.testing.assert_allclose([m8[k] for k in sorted(m8)], [m1[k] for k in sorted(m1)],
                               rtol=1e-4, atol=1e-5)
  _assert_trees_close(state8.params, state1.params)
  _assert_trees_close(state8.extra, state1.extra)
  _check_logged_losses(config, metrics8)

  manager = checkpointing.create_resume_manager(str(tmp_path), max_to_keep=2)
  checkpointing.save_state(manager, 2, state8, config)
  manager.wait_until_finished()
  restored = checkpointing.restore_state(manager, checkpointing.abstract_like(
      state8, parallel.replicated(single_device_mesh)))
  _assert_trees_close(restored.extra, state8.extra, rtol=0, atol=0)
  assert int(restored.step) == 2
  resumed, resumed_metrics = run(single_device_mesh, restored, batches[2:])
  uninterrupted, uninterrupted_metrics = run(mesh, state8, batches[2:])
  np.testing.assert_allclose(resumed_metrics[0]["loss"], uninterrupted_metrics[0]["loss"], rtol=1e-5)
  _assert_trees_close(resumed.params, uninterrupted.params)
  _assert_trees_close(resumed.extra, uninterrupted.extra)

  variables = method.eval_variables(uninterrupted)
  assert set(variables) == {"params", "batch_stats"}
  rng = np.random.RandomState(0)
  eval_batch = {"image": rng.randn(8, 16, 16, 3).astype(np.float32),
                "label": rng.randint(-1, NUM_CLASSES, (8, 16, 16)).astype(np.int32),
                "mask": np.ones(8, bool)}
  # `method.apply_fn`: the student, which a method with its own heads wraps around `model`.
  results, _ = evaluate.run_evaluation(evaluate.make_eval_step(mesh, method.apply_fn, NUM_CLASSES),
                                       variables, iter([eval_batch]), mesh, NUM_CLASSES)
  assert 0.0 <= results["miou"] <= 1.0


def test_unknown_method_is_one_line_naming_the_known_ones():
  config = smoke_config("supervised")
  config.method = "clasmix"
  known = ", ".join(methods.known_methods())
  assert known.startswith("cac, contextrast, mean_teacher, ") and known.endswith(", supervised")
  with pytest.raises(ValueError, match=rf"unknown config method='clasmix'; known methods: {known} "):
    methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))


def test_unknown_aux_loss_is_named():
  config = smoke_config("supervised", aux_losses=("rec0",))
  with pytest.raises(ValueError, match=r"unknown config aux_losses entry 'rec0'; known: contextrast, memory_bank, reco"):
    methods.get_method(config, num_classes=NUM_CLASSES, model=toy_segmenter(NUM_CLASSES))


def test_missing_stream_batch_size_is_named(single_device_mesh):
  config = smoke_config("classmix")
  config.input.streams.unlabeled.batch_size = 0
  model = toy_segmenter(NUM_CLASSES)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
  with pytest.raises(ValueError, match=r"input.streams.unlabeled.batch_size=0 must be a positive int"):
    train.stream_batch_sizes(config, method, single_device_mesh)
  config.input.streams.unlabeled.batch_size = 3
  with pytest.raises(ValueError, match=r"input.streams.unlabeled.batch_size=3 is not divisible"):
    train.stream_batch_sizes(config, method, parallel.create_mesh(jax.devices()[:2]))


# ------------------------------------------------------------------------------------------
# The mean teacher: the teacher pseudo-labels, the student learns.
# ------------------------------------------------------------------------------------------


def _scaled_classifier(params, scale):
  params = jax.tree.map(jnp.copy, params)
  params["classifier"] = jax.tree.map(lambda x: x * scale, params["classifier"])
  return params


@pytest.mark.parametrize("confident", ["teacher", "student"])
def test_the_teacher_not_the_student_pseudo_labels(confident, single_device_mesh):
  """With a very confident teacher and a diffident student every augmented pixel passes
  delta_s; swapped, none does: the pseudo-labels follow the teacher's parameters."""
  config = _contract_config("classmix")
  model = toy_segmenter(NUM_CLASSES, logit_scale=1.0)
  method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
  state = train.create_state(config, method, single_device_mesh)
  sharp, flat = _scaled_classifier(state.params, 1e3), _scaled_classifier(state.params, 1e-3)
  teacher, student = (sharp, flat) if confident == "teacher" else (flat, sharp)
  state = state.replace(params=student, extra={**state.extra, "params": teacher})
  batch = random_batches(config, method, 1, seed=3)[0]
  _, (metrics, _) = jax.jit(method.loss)(state.params, state, batch, jax.random.key(0))
  fraction = float(metrics["pseudo_label_confident_fraction"])
  # Mixing and padding leave a few pixels with confidence 0 in either case.
  if confident == "teacher":
    assert fraction > 0.9
  else:
    assert fraction < 0.1


def test_mean_teacher_eval_variables_follow_eval_use_teacher(single_device_mesh):
  for use_teacher in (True, False):
    config = _contract_config("classmix")
    config.mean_teacher.eval_use_teacher = use_teacher
    model = toy_segmenter(NUM_CLASSES)
    method = methods.get_method(config, num_classes=NUM_CLASSES, model=model)
    state = train.create_state(config, method, single_device_mesh)
    state = state.replace(extra={**state.extra, "params": _scaled_classifier(state.extra["params"], 2.0)})
    chosen = method.eval_variables(state)["params"]
    expected = state.extra["params"] if use_teacher else state.params
    assert chosen is expected


# ------------------------------------------------------------------------------------------
# A new method is one module: this one lives here and trains through the library unchanged.
# ------------------------------------------------------------------------------------------


class CountingMethod(base.Method):
  """CE plus a small L2 penalty on the logits; `extra` keeps a step counter and a ring buffer
  of the last 4 batch-mean losses, which `after_update` writes."""
  description = "test-local: CE + logit L2, with a loss ring buffer"
  RING = 4

  def init_extra(self, key, variables):
    del key, variables
    return {"count": jnp.zeros((), jnp.int32), "losses": jnp.zeros((self.RING,), jnp.float32)}

  def loss(self, params, state, batch, key):
    del key
    labeled = batch[base.LABELED]
    outputs, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    ce = supervised_lib.supervised_loss(outputs["logits"], labeled["label"])
    l2 = 1e-3 * jnp.mean(jnp.square(outputs["logits"]))
    loss = ce + l2
    return loss, ({"loss": loss, "logit_l2": l2}, {"batch_stats": batch_stats, "loss": loss})

  def after_update(self, state, aux, key):
    del key
    count = state.extra["count"]
    losses = state.extra["losses"].at[count % self.RING].set(aux["loss"])
    return state.replace(extra={"count": count + 1, "losses": losses})


def create(config, *, num_classes, model):
  del config, num_classes
  return CountingMethod(model)


@pytest.fixture
def toy_model_registered(monkeypatch):
  """`model.name="toy"` builds the toy segmenter: a registry entry, no library edit. It
  compiles in a fraction of the smoke DeepLabv3+'s time."""
  monkeypatch.setitem(models.MODELS, "toy", models.ModelSpec(
      build=lambda c, backbone, num_classes, dtype: toy_segmenter(num_classes), default_output_stride=16))


def test_eval_mode_evaluates_what_training_evaluated(tmp_path, toy_model_registered):
  """With `mean_teacher.eval_use_teacher=False` training evaluates the student, and so must
  `--mode=eval` (`evaluate_checkpoint`; it used the teacher whenever the method had one)."""
  config = smoke_config("classmix", **{"model.name": "toy", "mean_teacher.eval_use_teacher": False})
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  again = evaluate.evaluate_checkpoint(config, workdir)
  # Pixel accuracy and every class IoU: teacher and student differ after three steps.
  for key in final.keys() - {"best_miou"}:
    np.testing.assert_allclose(again[key], final[key], rtol=1e-6, err_msg=key)
  state = restore_latest_state(config, workdir)
  teacher_leaf, student_leaf = (jax.tree.leaves(t)[0] for t in (state.extra["params"], state.params))
  assert not np.allclose(teacher_leaf, student_leaf)


def test_a_method_defined_in_a_test_module_trains_through_the_library(tmp_path, toy_model_registered):
  config = smoke_config("supervised", method=__name__, **{"model.name": "toy"})
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  assert 0.0 <= results["miou"] <= 1.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(train_losses) == config.num_train_steps and all("logit_l2" in r for r in records
                                                                if r["split"] == "train")
  state = restore_latest_state(config, workdir)
  assert int(state.extra["count"]) == config.num_train_steps
  # log_every_steps=1: the logged loss of step s is the value the ring buffer holds.
  np.testing.assert_allclose(np.asarray(state.extra["losses"])[:config.num_train_steps], train_losses,
                             rtol=1e-6)
