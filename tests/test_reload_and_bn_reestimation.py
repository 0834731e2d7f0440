"""The trainer's best-checkpoint reload (`reload_best_patience_steps`) and final BatchNorm
re-estimation (`bn_reestimation_steps`), Alonso et al.'s trainSSL.py options: when they act,
what they change, what they keep, and their config errors.

The runs train the one-conv toy segmenter on the synthetic smoke data; the validation mIoU is
scripted (`_scripted_miou`) so that "no improvement" happens at known steps.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_segmenter, with_overrides
from configs import synthetic
from reco_jax import checkpointing, errors, evaluate, models, parallel, train
from reco_jax.train_state import TrainState


@pytest.fixture
def toy_model(monkeypatch):
  """`model.name="toy"`: the one-conv segmenter (with BatchNorm), compiles fast."""
  monkeypatch.setitem(models.MODELS, "toy", models.ModelSpec(
      build=lambda c, backbone, num_classes, dtype: toy_segmenter(num_classes), default_output_stride=16))


def _config(method="supervised", **overrides):
  config = synthetic.get_config(f"method={method},variant=smoke")
  config.model.name = "toy"
  return with_overrides(config, overrides)


_REAL_EVALUATION = (evaluate.run_evaluation, evaluate.flat_eval_scalars)


def _scripted_miou(monkeypatch, values):
  """Evaluation i (in call order) reports mIoU `values[i]`; returns the list of the variables
  each evaluation received."""
  calls = []
  real_run, real_flat = _REAL_EVALUATION

  def run(step_fn, variables, *args, **kwargs):
    calls.append(jax.device_get(variables))
    return real_run(step_fn, variables, *args, **kwargs)

  def flat(results, class_names):
    return {**real_flat(results, class_names), "miou": float(values[len(calls) - 1])}

  monkeypatch.setattr(evaluate, "run_evaluation", run)
  monkeypatch.setattr(evaluate, "flat_eval_scalars", flat)
  return calls


def _eval_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "eval"]


def _state_at(config, workdir, step):
  mesh = parallel.create_mesh()
  _, method = train.build(config)
  target = checkpointing.abstract_like(
      jax.eval_shape(lambda: train.create_state(config, method, mesh)), parallel.replicated(mesh))
  manager = checkpointing.create_resume_manager(workdir, 10, read_only=True)
  return jax.device_get(checkpointing.restore_state(manager, target, step=step))


def _best(workdir, like):
  """(step, variables, metrics) of the best checkpoint; `like`: a tree of its structure."""
  manager = checkpointing.create_best_manager(workdir)
  abstract = checkpointing.abstract_like(like, parallel.replicated(parallel.create_mesh()))
  variables = jax.device_get(checkpointing.restore_best_variables(manager, abstract))
  metrics = manager.restore(manager.best_step(), args=checkpointing.ocp.args.Composite(
      metrics=checkpointing.ocp.args.JsonRestore())).metrics
  return manager.best_step(), variables, metrics


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


# Best at step 1; no improvement after it: with patience 2 the evaluations of steps 3 and 5
# reload (3 - 1 >= 2; 5 - 3 >= 2 counting from the reload), the others do not.
SCRIPT = [0.5, 0.4, 0.3, 0.45, 0.2, 0.1]
RELOAD_STEPS = (3, 5)
LOOP = dict(num_train_steps=6, eval_every_steps=1, checkpoint_every_steps=1, log_every_steps=6,
            max_checkpoints_to_keep=10, num_eval_images_to_log=0)


class _Killed(Exception):
  pass


def test_reload_happens_exactly_when_patience_is_exceeded_and_resumes_alike(tmp_path, toy_model,
                                                                            monkeypatch):
  config = _config(reload_best_patience_steps=2, **LOOP)
  full = str(tmp_path / "full")
  _scripted_miou(monkeypatch, SCRIPT)
  train.train_and_evaluate(config, full)
  assert [r["reloads"] for r in _eval_lines(full)] == [0, 0, 1, 1, 2, 2]
  states = {s: _state_at(config, full, s) for s in range(1, 7)}
  best_step, best, _ = _best(full, {"params": states[1].params, "batch_stats": states[1].batch_stats})
  assert best_step == 1
  for step in range(2, 7):
    reloaded = _equal(states[step].params, best["params"])
    assert reloaded == (step in RELOAD_STEPS), step
    assert _equal(states[step].batch_stats, best["batch_stats"]) == reloaded
    assert int(states[step].step) == step  # the step counter continues
  # The optimiser state continues too (not reset to, or restored with, step 1's).
  assert not _equal(states[3].opt_state, states[1].opt_state)

  # Killed after the step-3 checkpoint (just after a reload), then resumed: the reload count
  # and the patience restart travel with the checkpoint, so steps 4-6 decide as above.
  interrupted = str(tmp_path / "interrupted")
  real_save = checkpointing.save_state

  def save_then_die(manager, step, *args):
    real_save(manager, step, *args)
    if step == 3:
      manager.wait_until_finished()
      raise _Killed(step)

  monkeypatch.setattr(checkpointing, "save_state", save_then_die)
  _scripted_miou(monkeypatch, SCRIPT)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, interrupted)
  monkeypatch.setattr(checkpointing, "save_state", real_save)
  _scripted_miou(monkeypatch, SCRIPT[3:])
  train.train_and_evaluate(config, interrupted)
  assert [r["reloads"] for r in _eval_lines(interrupted)] == [0, 0, 1, 1, 2, 2]
  assert _equal(_state_at(config, interrupted, 6).params, states[6].params)


def test_no_reload_when_off(tmp_path, toy_model, monkeypatch):
  config = _config(**LOOP)
  _scripted_miou(monkeypatch, SCRIPT)
  train.train_and_evaluate(config, str(tmp_path))
  assert all("reloads" not in r for r in _eval_lines(str(tmp_path)))
  state1 = _state_at(config, str(tmp_path), 1)
  _, best, _ = _best(str(tmp_path), {"params": state1.params, "batch_stats": state1.batch_stats})
  assert not any(_equal(_state_at(config, str(tmp_path), s).params, best["params"]) for s in RELOAD_STEPS)


@pytest.mark.parametrize("bn_miou, kept", [(0.9, True), (0.1, False)])
def test_bn_reestimation_changes_only_batch_stats_and_is_kept_only_when_better(
    tmp_path, toy_model, monkeypatch, bn_miou, kept):
  config = _config(bn_reestimation_steps=3, num_train_steps=2, eval_every_steps=2,
                   checkpoint_every_steps=2, num_eval_images_to_log=0)
  calls = _scripted_miou(monkeypatch, [0.5, bn_miou])
  result = train.train_and_evaluate(config, str(tmp_path))
  assert len(calls) == 2  # the last evaluation, then the re-estimated model's
  trained, reestimated = calls
  assert _equal(reestimated["params"], trained["params"])
  assert not _equal(reestimated["batch_stats"], trained["batch_stats"])
  assert result["bn_reestimated_miou"] == bn_miou
  assert result["best_miou"] == (bn_miou if kept else 0.5)
  assert _eval_lines(str(tmp_path))[-1]["bn_reestimated_miou"] == bn_miou
  best_step, best, metrics = _best(str(tmp_path), trained)
  assert best_step == 2 and metrics["miou"] == (bn_miou if kept else 0.5)
  assert _equal(best, reestimated if kept else trained)
  # The training state (and its checkpoint) keeps the trained statistics.
  final = _state_at(config, str(tmp_path), 2)
  assert _equal({"params": final.params, "batch_stats": final.batch_stats}, trained)


def test_bn_update_step_moves_the_running_statistics_like_a_training_forward():
  model = toy_segmenter(3)
  images = np.random.RandomState(0).randn(8, 16, 16, 3).astype(np.float32) * 3 + 1
  # Jitted, with an rbg key: XLA:CPU compiles eager and threefry initialisers slowly.
  variables = jax.jit(lambda x: model.init(jax.random.key(1, impl="rbg"), x, train=False))(images)
  mesh = parallel.create_mesh()
  new = train.make_bn_update_step(mesh, model.apply)(variables, images, jax.random.key(2, impl="rbg"))
  _, expected = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new, expected["batch_stats"])
  assert not _equal(new, variables["batch_stats"])


def test_bn_stream_prefers_the_unlabelled_stream(toy_model):
  for preset, stream in (("supervised", "labeled"), ("classmix", "unlabeled"), ("cac", "labeled")):
    _, method = train.build(_config(preset))
    assert train.bn_stream(method) == stream, preset


def _fake_state(method_extra):
  leaf = lambda v: {"w": jnp.full((2,), v)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=leaf(1.0), batch_stats=leaf(2.0),
                    opt_state=(), extra=method_extra(leaf))


@pytest.mark.parametrize("eval_use_teacher", [True, False])
def test_load_eval_variables_puts_the_weights_where_eval_variables_reads_them(toy_model,
                                                                             eval_use_teacher):
  _, method = train.build(_config("classmix", **{"mean_teacher.eval_use_teacher": eval_use_teacher}))
  state = _fake_state(lambda leaf: {"params": leaf(3.0), "batch_stats": leaf(4.0)})
  best = {"params": {"w": jnp.full((2,), 7.0)}, "batch_stats": {"w": jnp.full((2,), 8.0)}}
  loaded = method.load_eval_variables(state, best)
  assert _equal(method.eval_variables(loaded), best)
  # The student restarts from the best weights either way; the teacher only when evaluated.
  assert _equal({"params": loaded.params, "batch_stats": loaded.batch_stats}, best)
  assert _equal(loaded.extra, best) == eval_use_teacher
  # No buffer placed twice (the state is donated to the step).
  buffers = [id(x) for x in jax.tree.leaves((loaded.params, loaded.batch_stats, loaded.extra))]
  assert len(set(buffers)) == len(buffers)
  _, supervised = train.build(_config())
  assert _equal(supervised.eval_variables(supervised.load_eval_variables(_fake_state(lambda _: {}), best)),
                best)


@pytest.mark.parametrize("overrides, message", [
    ({"reload_best_patience_steps": 5, "keep_best_checkpoint": False},
     r"^config reload_best_patience_steps=5 needs keep_best_checkpoint=True"),
    ({"bn_reestimation_steps": 10, "keep_best_checkpoint": False},
     r"^config bn_reestimation_steps=10 needs keep_best_checkpoint=True"),
    ({"reload_best_patience_steps": -1}, r"^config reload_best_patience_steps=-1 must be a non-negative int"),
    ({"bn_reestimation_steps": True}, r"^config bn_reestimation_steps=True must be a non-negative int"),
])
def test_config_errors(tmp_path, overrides, message):
  config = _config()
  for key, value in overrides.items():
    config[key] = value  # bypass ConfigDict's type check, as a JSON/CLI override may not
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
