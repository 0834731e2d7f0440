"""The console (reco_jax/console.py): what `python main.py` shows a person.

One main.py smoke run (the cheapest program: supervised, smoke variant) checks the whole
console at the default verbosity, captured as a log file or CI would capture it; `--list`
runs without training; the rest are the pure formatting functions and the progress display
on in-memory streams.
"""
import io
import logging
import os
import re
import subprocess
import sys
import types

import pytest
from absl import logging as absl_logging

from conftest import REPO_ROOT
from configs import common
from reco_jax import console

SMOKE = "--config=configs/synthetic.py:method=supervised,variant=smoke"

# What the libraries print at INFO when nobody quiets them (absl's "I1129 11:47:51.36 ..."
# prefix, TensorFlow's C++ notices, orbax, JAX's backend probe, clu's progress notes).
CHATTER = [re.compile(p) for p in (
    r"^I\d{4} ", r"oneDNN custom operations", r"cpu_feature_guard", r"absl::InitializeLog",
    r"checkpoint_manager\.py", r"orbax", r"Unable to initialize backend", r"work unit notes",
    r"\| Name +\| Shape")]


def _run_main(*args, timeout=600):
  """main.py as a user starts it: default logging environment, output captured (not a tty)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest quiets TF for the other tests; not here
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("console") / "run")
  proc = _run_main(SMOKE, f"--workdir={workdir}")
  return workdir, proc


def test_default_run_prints_a_short_readable_console(smoke_run):
  workdir, proc = smoke_run
  output = proc.stdout + proc.stderr
  lines = output.splitlines()
  assert "\r" not in output  # not a terminal: plain lines, no redraws
  for pattern in CHATTER:
    assert not [l for l in lines if pattern.search(l)], pattern.pattern
  assert len(lines) <= 30, output
  assert lines[0].startswith("train supervised on synthetic: 3 steps")
  assert f"parameters: " in output and os.path.exists(os.path.join(workdir, "parameters.txt"))
  assert re.search(r"^step 1/3  loss \d+\.\d{3}  \(first step", output, re.M)
  assert re.search(r"^step 3/3  mIoU \d\.\d{3}  best \d\.\d{3}  pixel acc \d\.\d{2}$", output, re.M)


def test_default_run_ends_with_a_summary_that_names_where_everything_is(smoke_run):
  workdir, proc = smoke_run
  tail = proc.stdout.splitlines()[-5:]
  assert re.match(r"done in \S+: final mIoU \d\.\d{3}  best \d\.\d{3}  pixel acc \d\.\d{2}$", tail[0])
  body = "\n".join(tail[1:])
  assert os.path.join(workdir, "metrics.jsonl") in body
  assert f"tensorboard --logdir {workdir}" in body
  assert os.path.join(workdir, "best", "3") in body
  assert os.path.join(workdir, "checkpoints", "3") in body


def test_list_names_every_method_preset_dataset_and_config_file():
  from input_pipeline import builders
  from reco_jax import methods
  proc = _run_main("--list")  # no --workdir needed
  output = proc.stdout
  for name in (*methods.known_methods(), *common.METHOD_PRESETS, "synthetic", *builders.names()):
    assert re.search(rf"^  {name} ", output, re.M), name
  for filename in os.listdir(REPO_ROOT / "configs"):
    if filename.endswith(".py") and filename != "common.py":
      assert f"configs/{filename}" in output
  assert re.search(r"^  configs/camvid\.py +cpu, smoke ", output, re.M)
  assert not proc.stderr.strip(), proc.stderr  # nothing from TensorFlow's import


def test_workdir_is_still_required_for_training():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "main.py"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "--workdir is required" in proc.stderr


# ---- the pieces ------------------------------------------------------------------------------


def test_formatting():
  assert console.format_count(999) == "999"
  assert console.format_count(256_304) == "256K"
  assert console.format_count(1_234_567) == "1.23M"
  assert console.format_duration(4.24) == "4.2s"
  assert console.format_duration(65) == "1m05s"
  assert console.format_duration(3725) == "1h02m05s"
  assert console.eval_line(400, 800, 0.2701, 0.2702, 0.8412) == (
      "step 400/800  mIoU 0.270  best 0.270  pixel acc 0.84")
  assert console.progress_line(50, 800, 1.2345, None, 4.0) == (
      "step 50/800  loss 1.234  4.00 steps/s  ETA 3m08s")
  assert console.preset_description(common.METHOD_PRESETS["classmix_reco"]) == (
      "mean_teacher + classmix + reco")


def test_progress_interval_caps_the_number_of_plain_lines():
  assert console.progress_interval(800, 50) == 50
  assert console.progress_interval(40_000, 100) == 2000
  assert console.progress_interval(3, 1) == 1


def test_summary_lines_of_an_evaluation_name_its_json():
  lines = console.summary_lines(
      "eval", {"miou": 0.5, "pixel_accuracy": 0.9, "step": 800}, 12.0, workdir="w",
      metrics_path="w/metrics.jsonl", checkpoint_dir="w/checkpoints/800", best_dir=None,
      eval_json="w/eval_val.json")
  assert lines[0] == "evaluated step 800 in 12s: mIoU 0.500  pixel acc 0.90"
  assert any(l.split() == ["eval", "JSON", "w/eval_val.json"] for l in lines)
  assert not any("best" in l for l in lines)
  finished = console.summary_lines("train", {}, 3.0, workdir="w", metrics_path="m",
                                   checkpoint_dir=None, best_dir=None)
  assert "no training steps left" in finished[0]


def test_plain_progress_writes_lines_not_redraws():
  out = io.StringIO()
  progress = console.TrainProgress(200, 0, 10, enabled=True, stream=out, interactive=False)
  for step in range(1, 201):
    progress.step(step, 1.0 / step)
    if step == 100:
      progress.evaluation(step, 0.25, 0.25, 0.8)
  progress.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert lines[0].startswith("step 1/200  loss 1.000  (first step")
  assert "step 100/200  mIoU 0.250  best 0.250  pixel acc 0.80" in lines
  assert lines[-1].startswith("step 200/200  loss 0.005  mIoU 0.250  ")
  assert len(lines) == 1 + 200 // 10 + 1  # first step, every 10th, the evaluation


def test_terminal_progress_is_a_bar_with_loss_and_miou():
  out = io.StringIO()
  progress = console.TrainProgress(20, 0, 5, enabled=True, stream=out, interactive=True)
  for step in range(1, 21):
    progress.step(step, 0.5)
  progress.evaluation(20, 0.3, 0.3, 0.9)
  progress.close()
  text = out.getvalue()
  assert "\r" in text and "20/20" in text and "step/s" in text
  assert "loss 0.500, mIoU 0.300" in text


def test_only_process_zero_prints():
  out = io.StringIO()
  progress = console.TrainProgress(10, 0, 1, enabled=False, stream=out, interactive=False)
  for step in range(1, 11):
    progress.step(step, 1.0)
  progress.evaluation(10, 0.1, 0.1, 0.1)
  progress.close()
  assert out.getvalue() == ""


def test_resumed_and_finished_runs_say_so():
  out = io.StringIO()
  console.TrainProgress(10, 4, 1, enabled=True, stream=out, interactive=False).close()
  console.TrainProgress(10, 10, 1, enabled=True, stream=out, interactive=False).close()
  assert out.getvalue().splitlines() == ["resuming at step 4/10", "already trained to step 10/10"]


def test_native_stderr_filter_drops_only_the_known_notices(capfd):
  with console.native_stderr_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written "
                b"to STDERR\nI0000 port.cc:153] oneDNN custom operations are on.\nkeep me\n")
  _, err = capfd.readouterr()
  assert err == "keep me\n"


def test_verbosity_flag_decides_quiet_or_verbose(monkeypatch):
  flag = lambda present, value: types.SimpleNamespace(present=present, value=value)
  assert not console.verbose_requested(flag(False, 0))  # absl's default after parsing
  assert console.verbose_requested(flag(True, 0)) and console.verbose_requested(flag(True, 1))
  assert not console.verbose_requested(flag(True, -1))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
  console.configure_logging(True, ("TF_CPP_MIN_LOG_LEVEL",))
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
  levels = {name: logging.getLogger(name).level for name in console.QUIET_LOGGERS}
  verbosity = absl_logging.get_verbosity()
  try:
    console.configure_logging(False)
    assert all(logging.getLogger(n).level == logging.WARNING for n in console.QUIET_LOGGERS)
    assert absl_logging.get_verbosity() == absl_logging.WARNING
  finally:
    absl_logging.set_verbosity(verbosity)
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)


def test_orbax_warnings_are_filtered_but_not_its_errors():
  quiet = console.LibraryWarningsFilter(("orbax",))
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "msg", (), None)
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  assert not quiet.filter(record(logging.WARNING, orbax_file))
  assert quiet.filter(record(logging.ERROR, orbax_file))
  assert quiet.filter(record(logging.WARNING, os.path.join("reco_jax", "train.py")))
