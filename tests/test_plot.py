"""reco_jax/tools/plot.py on a real smoke run's metrics.jsonl and config.json."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from reco_jax.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(args, devices=1):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The workdir of a supervised smoke run of main.py on the synthetic dataset (3 steps)."""
  workdir = str(tmp_path_factory.mktemp("plot") / "supervised_smoke")
  proc = _run(["main.py", "--config=configs/synthetic.py:method=supervised,variant=smoke",
               f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.slow  # trains its own run; test_main.py plots the default suite's smoke run
def test_cli_writes_a_png_of_two_runs(smoke_run, tmp_path):
  other = str(tmp_path / "second")
  shutil.copytree(smoke_run, other)
  out = tmp_path / "figures" / "curves.png"
  proc = _run(["-m", "reco_jax.tools.plot", smoke_run, other, f"--out={out}"])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f"wrote {out}"
  data = out.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
  with Image.open(out) as image:
    assert image.size[0] > 800 and image.size[1] > 600
    # Not a blank canvas: curves, bars and text.
    assert len(np.unique(np.asarray(image.convert("L")))) > 10


@pytest.mark.slow
def test_runs_are_read_and_labelled_from_the_workdir(smoke_run):
  run = plot.load_run(smoke_run)
  with open(os.path.join(smoke_run, "config.json")) as f:
    num_labeled = json.load(f)["input"]["num_labeled"]
  assert run.label == f"supervised_smoke: supervised, seed 0, {num_labeled} labelled"
  assert [r["step"] for r in run.train] == [1, 2, 3]
  assert run.evals[-1]["step"] == 3
  assert plot.class_names([run])[:2] == ["background", "disk"]


@pytest.mark.slow
def test_a_torn_last_line_is_skipped_and_a_bad_line_named(smoke_run, tmp_path):
  workdir = tmp_path / "writing"
  shutil.copytree(smoke_run, workdir)
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines) + '\n{"step": 4, "spl')
  assert len(plot.read_records(str(workdir))) == len(lines)
  path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
  with pytest.raises(ValueError, match=rf"^{path}:2 is not a JSON object$"):
    plot.read_records(str(workdir))


def test_missing_workdir_and_metrics_fail_with_one_line(tmp_path):
  proc = _run(["-m", "reco_jax.tools.plot", str(tmp_path / "nope"), f"--out={tmp_path}/x.png"])
  assert proc.returncode == 1
  assert proc.stderr == f"error: workdir {tmp_path / 'nope'} does not exist\n"
  with pytest.raises(FileNotFoundError, match=r"has no metrics\.jsonl"):
    plot.plot_workdirs([str(tmp_path)], str(tmp_path / "x.png"))
  assert not (tmp_path / "x.png").exists()


def test_label_names_preset_seed_and_labelled_subset():
  config = {"method_preset": "classmix_reco", "seed": 2, "input": {"num_labeled": 20}}
  assert plot.run_label("runs/le/classmix_reco/", config) == \
      "classmix_reco: classmix_reco, seed 2, 20 labelled"
  assert plot.run_label("runs/x", {}) == "x"
