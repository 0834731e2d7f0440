"""main.py as a user runs it: train then eval on the smoke config, device-count invariance,
multi-process runs through jax.distributed on localhost."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, restore_latest_state
from configs import default
from reco_jax import checkpointing


def _run_main(workdir, *args, devices=1, extra_env=None, check=True, timeout=600):
  env = dict(os.environ)
  env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
              "TF_CPP_MIN_LOG_LEVEL": "2"})
  env.update(extra_env or {})
  cmd = [sys.executable, "main.py", f"--workdir={workdir}", *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
  return proc


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def default_smoke_run(tmp_path_factory):
  """The workdir of `main.py --config=configs/default.py:smoke` on 1 device (ReCo + ClassMix)."""
  workdir = str(tmp_path_factory.mktemp("default_smoke") / "run")
  _run_main(workdir, "--config=configs/default.py:smoke")
  return workdir


def test_train_then_eval_reproduces_the_final_miou(default_smoke_run):
  workdir = default_smoke_run
  records = _records(workdir)
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert len(train_losses) == 3 and all(np.isfinite(train_losses))
  # The default method logs all three losses.
  for r in (r for r in records if r["split"] == "train"):
    assert r["sup_loss"] > 0 and r["reco_loss"] > 0 and np.isfinite(r["unsup_loss"])
  assert evals and 0.0 <= evals[-1]["miou"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "config.json"))
  # Boundary IoU (off in smoke runs) asked for at evaluation: a harmless eval field.
  _run_main(workdir, "--config=configs/default.py:smoke", "--mode=eval",
            "--config.eval.boundary_widths=(5, 7, 10)", devices=2)
  with open(os.path.join(workdir, "eval_val.json")) as f:
    evaluated = json.load(f)
  np.testing.assert_allclose(evaluated["miou"], evals[-1]["miou"], rtol=1e-6)
  assert evaluated["step"] == 3
  for width in (5, 7, 10):
    assert 0.0 <= evaluated[f"boundary_miou_{width}px"] <= 1.0
  assert "boundary_miou_5px" not in evals[-1]


def test_four_devices_write_the_same_losses_as_one(default_smoke_run, tmp_path):
  workdir = str(tmp_path / "d4")
  _run_main(workdir, "--config=configs/default.py:smoke", devices=4)
  losses = {devices: [r["loss"] for r in _records(w) if r["split"] == "train"]
            for devices, w in ((1, default_smoke_run), (4, workdir))}
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-4)


def test_semi_supervised_run_resumes_identically(default_smoke_run, tmp_path):
  """Resume of the default (ReCo + ClassMix) run after a kill right after its step-2 checkpoint.

  The workdir is the finished run's, cut back to the files a kill at that moment leaves (the
  step-3 checkpoint, best weights and log lines removed); main.py must then reproduce step
  3 (the teacher, the EMA, both data streams and the per-step key restored) and the final
  evaluation and weights exactly.
  """
  resumed = str(tmp_path / "resumed")
  shutil.copytree(default_smoke_run, resumed)
  shutil.rmtree(os.path.join(resumed, checkpointing.RESUME_DIR, "3"))
  shutil.rmtree(os.path.join(resumed, checkpointing.BEST_DIR, "3"))
  full_records = _records(default_smoke_run)
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in full_records if r["step"] <= 2)
  _run_main(resumed, "--config=configs/default.py:smoke")

  resumed_records = _records(resumed)
  assert [(r["step"], r["split"]) for r in resumed_records] == [
      (r["step"], r["split"]) for r in full_records]
  for full, again in zip(full_records[2:], resumed_records[2:]):
    assert full.keys() == again.keys()
    for key in full.keys() - {"split"}:
      # null (an undefined pseudo-label ratio) reads as NaN; NaN == NaN here.
      np.testing.assert_allclose(np.asarray(again[key], float), np.asarray(full[key], float),
                                 rtol=1e-6, err_msg=key)
  assert {"sup_loss", "unsup_loss", "reco_loss", "ema_decay"} <= full_records[2].keys()
  config = default.get_config("smoke")
  finals = [jax.device_get(restore_latest_state(config, w)) for w in (default_smoke_run, resumed)]
  assert int(finals[0].step) == int(finals[1].step) == 3
  # Every array of the state (student, teacher, optimiser); the two states carry different
  # (equal) model instances as static metadata, so compare leaf by leaf.
  leaves = [jax.tree.leaves(f) for f in finals]
  assert len(leaves[0]) == len(leaves[1])
  for a, b in zip(*leaves):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_config_override_fails_with_its_name(tmp_path):
  proc = _run_main(str(tmp_path), "--config=configs/default.py:smoke", "--config.optim.lrr=0.1", check=False)
  assert proc.returncode != 0 and "lrr" in proc.stderr


def test_misspelt_method_in_the_config_argument_fails_with_its_name(tmp_path):
  proc = _run_main(str(tmp_path), "--config=configs/voc.py:method=clasmix_reco,variant=smoke", check=False)
  assert proc.returncode != 0 and "clasmix_reco" in proc.stderr and "classmix_reco" in proc.stderr


# The multi-process test is about process groups, data slices and orbax, not the method:
# the supervised smoke program compiles in about half the time of the default's.
SUPERVISED_SMOKE = "--config=configs/synthetic.py:method=supervised,variant=smoke"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_distributed_run(tmp_path):
  """2 processes x 4 CPU devices through jax.distributed on localhost.

  Each process reads its own slice of the training stream, so the training batches differ
  from a single-process run; evaluation does not depend on the split, so the 2-process
  run's final mIoU must equal a 1-process evaluation of the checkpoint it wrote (which
  also checks that orbax saved the multi-process state correctly).
  """
  port = _free_port()
  workdir = str(tmp_path / "mp")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}",
                             SUPERVISED_SMOKE, f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}",
                             "--verbosity=0"],  # the INFO log names each process's devices
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  assert "8 cpu devices in 2 processes" in outputs[0][0]  # the console's header (process 0)
  assert "8 global devices" in outputs[0][1] and "process 1 / 2" in outputs[1][1]
  records = _records(workdir)  # written by process 0 only
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
  final_miou = [r["miou"] for r in records if r["split"] == "eval"][-1]
  _run_main(workdir, SUPERVISED_SMOKE, "--mode=eval", devices=1)
  with open(os.path.join(workdir, "eval_val.json")) as f:
    np.testing.assert_allclose(json.load(f)["miou"], final_miou, rtol=1e-6)


def test_plot_tool_draws_the_smoke_run(default_smoke_run, tmp_path):
  """`python -m reco_jax.tools.plot` on a real run's metrics.jsonl writes a non-blank PNG
  (more cases, on a run of their own, in test_plot.py, marked slow)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = tmp_path / "curves.png"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "-m", "reco_jax.tools.plot", default_smoke_run,
                         f"--out={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(out) as image:
    assert image.size[0] > 800 and len(np.unique(np.asarray(image.convert("L")))) > 10
