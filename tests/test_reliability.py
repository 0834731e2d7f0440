"""Nothing lost, nothing silently wrong (issue 16): each case through main.py (or, where a
whole run is not needed to show it, through the library), asserting the one-line message,
the intact checkpoint, the refused second run or the repaired log.

The data-side cases (truncated images, changed raw data, label values) are in
test_data_integrity.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, restore_latest_state, toy_segmenter, with_overrides
from configs import synthetic
from reco_jax import checkpointing, errors, evaluate, models, train
from reco_jax import workdir as workdir_lib

SUPERVISED_SMOKE = "--config=configs/synthetic.py:method=supervised,variant=smoke"


def _main(workdir, *args, check=False, env=None, timeout=600):
  env = dict(os.environ, **(env or {}), XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-4000:])
  return proc


def _error_line(proc) -> str:
  """The one-line error main.py printed: the last stderr line, and no traceback."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  return last


def _steps(workdir):
  return checkpointing.create_resume_manager(str(workdir), 2, read_only=True).all_steps()


@pytest.fixture
def toy_model(monkeypatch):
  """`model.name="toy"`: the one-conv segmenter, registered like any model (fast compiles)."""
  monkeypatch.setitem(models.MODELS, "toy", models.ModelSpec(
      build=lambda c, backbone, num_classes, dtype: toy_segmenter(num_classes), default_output_stride=16))


def _toy_config(**overrides):
  config = synthetic.get_config("method=supervised,variant=smoke")
  config.model.name = "toy"
  return with_overrides(config, overrides)


# ---- 1. an exception in training keeps the checkpoint being written -----------------------


def test_nan_loss_names_a_checkpoint_that_exists(tmp_path):
  """The issue's case: lr 1e8 diverges; the named checkpoint is complete, not a -tmp folder."""
  workdir = tmp_path / "nan"
  proc = _main(workdir, "--config=configs/default.py:smoke", "--config.optim.lr=1e8",
               "--config.num_train_steps=10", "--config.checkpoint_every_steps=2")
  line = _error_line(proc)
  assert "non-finite loss" in line
  named = int(line.split("last good checkpoint is step ")[1].split()[0])
  assert named in _steps(workdir)
  assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
  config = synthetic.get_config("method=classmix_reco,variant=smoke")
  assert int(restore_latest_state(config, str(workdir)).step) == named


def test_an_exception_waits_for_the_checkpoint_in_flight(tmp_path, toy_model, monkeypatch):
  """An exception (a corrupt validation image, a kill) while orbax writes in the background:
  the checkpoint is finished before the run exits, never left as a -tmp folder."""
  config = _toy_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
  real_save = checkpointing.save_state

  def save_then_fail(manager, step, *args):
    real_save(manager, step, *args)  # asynchronous: returns while the files are being written
    raise RuntimeError("validation image x.png cannot be decoded")

  monkeypatch.setattr(checkpointing, "save_state", save_then_fail)
  # In a test the process lives on and orbax's writer thread may finish anyway; in a real run
  # the process exits with the exception. So check that the trainer itself waited.
  waited = []
  real_wait = ocp.CheckpointManager.wait_until_finished
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                      lambda self: (waited.append(self.directory), real_wait(self))[1])
  with pytest.raises(RuntimeError, match="cannot be decoded"):
    train.train_and_evaluate(config, str(tmp_path))
  assert any(str(d).endswith("checkpoints") for d in waited)
  assert _steps(tmp_path) == [2]
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path):
  workdir = tmp_path / "term"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", SUPERVISED_SMOKE,
                           "--config.num_train_steps=100000", "--config.checkpoint_every_steps=50000",
                           "--config.eval_every_steps=50000"],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 500
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # training is running
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: stopped by SIGTERM after step ")
  step = int(line.split("after step ")[1].split(";")[0])
  assert _steps(workdir) == [step] and step >= 3  # the current step, no scheduled one before it
  logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
  assert logged == list(range(1, step + 1))
  config = synthetic.get_config("method=supervised,variant=smoke")
  assert int(restore_latest_state(config, str(workdir)).step) == step


# ---- 2. the workdir's config is compared with the one given ------------------------------


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A finished 3-step supervised smoke run (main.py), shared by the config-check cases."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  _main(workdir, SUPERVISED_SMOKE, check=True)
  return workdir


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_config_that_changes_the_model_is_refused_in_one_line(trained_workdir, mode):
  proc = _main(trained_workdir, SUPERVISED_SMOKE, f"--mode={mode}", "--config.model.width=16",
               "--config.num_train_steps=6")
  line = _error_line(proc)
  assert "model.width: 8 -> 16" in line and "--allow_config_change" in line


def test_a_shape_compatible_model_change_is_refused_too(trained_workdir):
  # Same parameter shapes: before the check this silently evaluated the wrong model.
  proc = _main(trained_workdir, SUPERVISED_SMOKE, "--mode=eval", "--config.model.output_stride=8")
  assert "model.output_stride: None -> 8" in _error_line(proc)
  proc = _main(trained_workdir, "--config=configs/synthetic.py:method=classmix,variant=smoke", "--mode=eval")
  assert "method: 'supervised' -> 'mean_teacher'" in _error_line(proc)


def test_fewer_steps_than_the_checkpoint_is_said(trained_workdir):
  proc = _main(trained_workdir, SUPERVISED_SMOKE, "--config.num_train_steps=2")
  assert "num_train_steps=2 is smaller than the step of" in _error_line(proc)


def test_harmless_changes_are_allowed(trained_workdir):
  proc = _main(trained_workdir, SUPERVISED_SMOKE, "--mode=eval", "--config.log_every_steps=7",
               "--config.eval_absent_classes=nan")
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_differences_are_split_into_harmful_and_harmless():
  old = synthetic.get_config("method=supervised_reco,variant=smoke").to_dict()
  new = with_overrides(synthetic.get_config("method=supervised_reco,variant=smoke"),
                       {"num_train_steps": 9, "input.eval_size": (48, 48), "reco.weight": 2.0})
  harmful, harmless = workdir_lib.config_differences(old, new.to_dict())
  assert set(harmful) == {"reco.weight"} and set(harmless) == {"num_train_steps", "input.eval_size"}
  workdir_lib.check_config(new.to_dict(), old, checkpoint_step=3, allow_changes=True)  # logged only
  with pytest.raises(errors.ConfigError, match=r"reco.weight: 1.0 -> 2.0"):
    workdir_lib.check_config(new.to_dict(), old, checkpoint_step=3)


def test_sections_the_run_does_not_read_never_stop_a_resume():
  """A workdir trained before a method existed (its section absent from the stored config), or
  a changed default of another method, resumes; the same change to the run's own method or to
  one of its auxiliary terms stops it."""
  given = synthetic.get_config("method=pc2seg,variant=smoke").to_dict()
  stored = synthetic.get_config("method=pc2seg,variant=smoke").to_dict()
  del stored["memory_bank"]
  stored["cac"]["temperature"] = 0.5
  stored["reco"]["weight"] = 3.0
  harmful, harmless = workdir_lib.config_differences(stored, given)
  assert not harmful and {"memory_bank.dim", "cac.temperature", "reco.weight"} <= set(harmless)
  workdir_lib.check_config(given, stored, checkpoint_step=3)
  stored["pc2seg"]["temperature"] = 0.5
  with pytest.raises(errors.ConfigError, match=r"pc2seg.temperature: 0.5 -> 0.1"):
    workdir_lib.check_config(given, stored, checkpoint_step=3)
  # A different method is itself a harmful difference (and both methods' sections count).
  other = synthetic.get_config("method=cac,variant=smoke").to_dict()
  harmful, _ = workdir_lib.config_differences(stored, other)
  assert "method" in harmful and "pc2seg.temperature" in harmful


# ---- 3. one workdir, one run ------------------------------------------------------------------


def test_a_second_run_in_a_workdir_is_refused(tmp_path, toy_model):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.WorkdirError, match=rf"workdir {tmp_path} is in use by another run "
                                                  rf"\(pid {os.getpid()}"):
      train.train_and_evaluate(_toy_config(), str(tmp_path))


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
  dead = subprocess.run([sys.executable, "-c", (
      "import sys; sys.path.insert(0, '.'); from reco_jax import workdir as w; "
      f"w.WorkdirLock({str(tmp_path)!r}).__enter__(); import os; os._exit(9)")],
      cwd=REPO_ROOT, capture_output=True, text=True)
  assert dead.returncode == 9 and os.path.exists(tmp_path / ".lock.0")
  with workdir_lib.WorkdirLock(str(tmp_path)):
    pass


# ---- 5. values that were not checked ------------------------------------------------------


@pytest.mark.parametrize("field", ["log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                                   "input.streams.labeled.batch_size", "input.eval_batch_size"])
def test_zero_frequencies_and_batch_sizes_are_named(tmp_path, field):
  proc = _main(tmp_path, SUPERVISED_SMOKE, f"--config.{field}=0")
  assert f"{field}=0 must be a positive int" in _error_line(proc)


def test_eval_size_smaller_than_the_images_is_found_at_start_up(tmp_path, toy_model, monkeypatch):
  calls = []
  monkeypatch.setattr(train, "create_state", lambda *a: calls.append(a))
  config = _toy_config(**{"input.eval_size": (16, 24)})  # the smoke images are 32x32
  with pytest.raises(errors.ConfigError, match=r"input.eval_size=\(16, 24\) is smaller than the "
                                               r"largest synthetic val image \(32x32\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not calls  # before the model is built or compiled


# ---- 6. metrics.jsonl keeps one object per logged step ---------------------------------------


def test_a_resumed_run_does_not_log_replayed_steps_twice(tmp_path, toy_model):
  config = _toy_config(num_train_steps=6, checkpoint_every_steps=2, eval_every_steps=6)
  full = tmp_path / "full"
  train.train_and_evaluate(config, str(full))
  # What a run killed during step 6's checkpoint leaves: checkpoint 4, the log of steps 1-6
  # (and a torn line). The resumed run replays steps 5 and 6.
  cut = tmp_path / "cut"
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "6")
  with open(cut / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "spl')
  train.train_and_evaluate(config, str(cut))
  rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
  want = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in want]
  np.testing.assert_allclose([r["loss"] for r in rows if r["split"] == "train"],
                             [r["loss"] for r in want if r["split"] == "train"], rtol=1e-6)


# ---- 7. errors read as one line ---------------------------------------------------------------


def test_verbose_errors_show_the_traceback(tmp_path):
  proc = _main(tmp_path, SUPERVISED_SMOKE, "--config.log_every_steps=0", "--verbose_errors")
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config log_every_steps=0")


def test_a_field_added_since_the_checkpoint_at_its_default_does_not_stop_a_resume():
  """A workdir written before a trainer option existed resumes when the option is at its
  default (new options default to the earlier behaviour); set to anything else, it stops."""
  given = synthetic.get_config("method=supervised,variant=smoke").to_dict()
  stored = synthetic.get_config("method=supervised,variant=smoke").to_dict()
  del stored["reload_best_patience_steps"]
  harmful, harmless = workdir_lib.config_differences(stored, given)
  assert not harmful and "reload_best_patience_steps" in harmless
  given["reload_best_patience_steps"] = 500
  harmful, _ = workdir_lib.config_differences(stored, given)
  assert set(harmful) == {"reload_best_patience_steps"}
