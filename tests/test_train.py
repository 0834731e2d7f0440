"""Train step and loop: device-count invariance, checkpoints, resume, NaN guard, bad config."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import restore_latest_state, with_overrides
from configs import common
from reco_jax import checkpointing, methods, models, parallel, train
from reco_jax.losses import supervised


def _smoke_config(**overrides):
  """The supervised smoke config (the neutral base, not the ReCo + ClassMix default)."""
  config = common.base_config()
  common.apply_variant(config, "smoke")
  return with_overrides(config, overrides)


def _random_batch(config, num_classes, seed=0):
  rng = np.random.RandomState(seed)
  b, (h, w) = config.input.streams.labeled.batch_size, config.input.crop_size
  labels = rng.randint(-1, num_classes, size=(b, h, w)).astype(np.int32)
  return {"image": rng.randn(b, h, w, 3).astype(np.float32), "label": labels}


def _run_steps(config, mesh, batches, num_classes=5):
  model = models.create_model(config.model, num_classes)
  method = methods.get_method(config, num_classes=num_classes, model=model)
  state = train.create_state(config, method, mesh)
  step = train.make_train_step(mesh, method, config.seed)
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.to_global_batch({"labeled": batch}, mesh))
    losses.append(float(metrics["loss"]))  # syncs every step (CPU collectives)
  return state, losses


def _assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_train_step_on_8_devices_equals_1_device(mesh, single_device_mesh):
  config = _smoke_config()
  batches = [_random_batch(config, 5, seed) for seed in range(2)]
  state8, losses8 = _run_steps(config, mesh, batches)
  state1, losses1 = _run_steps(config, single_device_mesh, batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses8[0] != losses8[1]
  _assert_trees_close(state8.params, state1.params, rtol=1e-4, atol=1e-6)
  _assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-6)
  assert int(state8.step) == 2


def test_checkpoint_round_trip_onto_another_device_count(tmp_path, mesh):
  config = _smoke_config()
  state, _ = _run_steps(config, mesh, [_random_batch(config, 5)])
  manager = checkpointing.create_resume_manager(str(tmp_path), max_to_keep=2)
  checkpointing.save_state(manager, 1, state, config)
  manager.wait_until_finished()
  for devices in (jax.devices()[:2], jax.devices()[:1]):
    small_mesh = parallel.create_mesh(devices)
    target = checkpointing.abstract_like(state, parallel.replicated(small_mesh))
    restored = checkpointing.restore_state(manager, target)
    _assert_trees_close(restored.params, state.params, rtol=0, atol=0)
    _assert_trees_close(restored.opt_state, state.opt_state, rtol=0, atol=0)
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.devices.size == len(devices)
  saved_config = json.loads((tmp_path / "checkpoints" / "1" / "config" / "metadata").read_text())
  assert saved_config["model"]["width"] == config.model.width


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


class _Killed(Exception):
  pass


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
  config = _smoke_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
  full = str(tmp_path / "full")
  train.train_and_evaluate(config, full)

  # Kill the second run right after its step-2 checkpoint is written, then start it again.
  interrupted = str(tmp_path / "interrupted")
  real_save = checkpointing.save_state

  def save_then_die(manager, step, *args):
    real_save(manager, step, *args)
    manager.wait_until_finished()
    raise _Killed(step)

  monkeypatch.setattr(checkpointing, "save_state", save_then_die)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, interrupted)
  monkeypatch.setattr(checkpointing, "save_state", real_save)
  # And a kill -9 during the next checkpoint write: what orbax leaves is a temporary folder
  # (renamed only when complete), which the resume must ignore.
  partial = os.path.join(interrupted, checkpointing.RESUME_DIR, "4.orbax-checkpoint-tmp-1795950000")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "half_written"), "wb") as f:
    f.write(b"\0" * 100)
  train.train_and_evaluate(config, interrupted)  # resumes at step 2

  full_losses, resumed_losses = _train_losses(full), _train_losses(interrupted)
  assert sorted(resumed_losses) == [1, 2, 3, 4]
  for step in (3, 4):
    np.testing.assert_allclose(resumed_losses[step], full_losses[step], rtol=1e-6)
  finals = [restore_latest_state(config, w) for w in (full, interrupted)]
  assert int(finals[0].step) == int(finals[1].step) == 4
  _assert_trees_close(finals[0].params, finals[1].params, rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  train.train_and_evaluate(_smoke_config(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2),
                           workdir)
  real_loss = supervised.supervised_loss
  monkeypatch.setattr(supervised, "supervised_loss", lambda *a: real_loss(*a) * jnp.nan)
  with pytest.raises(train.NonFiniteLossError, match=r"step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(_smoke_config(num_train_steps=4, checkpoint_every_steps=1), workdir)
  manager = checkpointing.create_resume_manager(workdir, 2, read_only=True)
  assert manager.all_steps() == [2]


def test_global_batch_not_divisible_by_device_count_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"input.streams.labeled.batch_size=6 is not divisible by the "
                                       r"device count 8"):
    train.train_and_evaluate(_smoke_config(**{"input.streams.labeled.batch_size": 6}), str(tmp_path))
