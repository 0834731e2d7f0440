"""A run's first start on an unprepared TFDS dataset, with several processes.

`datasets.prepare_for_run` lets process 0 prepare the dataset while the others wait on a
barrier; before it, every process but 0 found the dataset unprepared and failed. Tested
with fake CamVid folders and threads standing in for processes, and end to end with two
`main.py` processes through jax.distributed on the real CamVid images.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image
import pytest

from conftest import CAMVID_DIR, REPO_ROOT
from configs import common
from input_pipeline import datasets
from input_pipeline import prepare as prepare_lib
from input_pipeline.builders import camvid

SIZE = (12, 16)  # (H, W) of the fake images
LABELED = datasets.Stream(subset="labeled", augment=True)


def _write_fake_camvid(root: pathlib.Path, counts: dict[str, int]) -> None:
  """SegNet layout: `<split>/` RGB PNGs and `<split>annot/` class-index PNGs (0..11)."""
  rng = np.random.default_rng(0)
  for split, n in counts.items():
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for k in range(n):
      image = rng.integers(0, 256, size=SIZE + (3,), dtype=np.uint8)
      label = rng.integers(0, 12, size=SIZE, dtype=np.uint8)
      Image.fromarray(image).save(root / split / f"{split}{k:03d}.png")
      Image.fromarray(label).save(root / f"{split}annot" / f"{split}{k:03d}.png")


def _camvid_input(tmp_path: pathlib.Path):
  """`config.input` of a fake CamVid in `tmp_path/raw`, not yet prepared into `tmp_path/tfds`."""
  _write_fake_camvid(tmp_path / "raw", {"train": 6, "val": 3})
  cfg = common.base_config().input
  cfg.dataset = "camvid"
  cfg.manual_dir = str(tmp_path / "raw")
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.crop_size = (8, 8)
  cfg.eval_size = SIZE
  return cfg


def _is_prepared(cfg) -> bool:
  """Whether the records and the training class-presence table exist."""
  builder = camvid.Camvid(data_dir=cfg.data_dir)
  return builder.is_prepared() and os.path.exists(prepare_lib.presence_path(builder))


def test_process_0_prepares_before_the_barrier(tmp_path):
  cfg = _camvid_input(tmp_path)
  prepared_at_barrier = []
  datasets.prepare_for_run(cfg, process_index=0,
                           barrier=lambda: prepared_at_barrier.append(_is_prepared(cfg)))
  assert prepared_at_barrier == [True]
  # Already prepared: only the barrier.
  datasets.prepare_for_run(cfg, process_index=0,
                           barrier=lambda: prepared_at_barrier.append(_is_prepared(cfg)))
  assert prepared_at_barrier == [True, True]


def test_other_processes_only_wait_on_the_barrier(tmp_path):
  cfg = _camvid_input(tmp_path)
  calls = []
  datasets.prepare_for_run(cfg, process_index=1, barrier=lambda: calls.append("barrier"))
  assert calls == ["barrier"]
  assert not (tmp_path / "tfds").exists()  # process 1 wrote nothing
  # Reading without process 0's preparation fails with a message naming the fix.
  with pytest.raises(FileNotFoundError, match=r"camvid is not prepared .*call "
                                              r"input_pipeline.datasets.prepare_for_run"):
    datasets.create_eval_iterator(cfg, split="val", local_batch_size=1, process_index=1,
                                  process_count=2)


def test_synthetic_prepare_for_run_only_waits(tmp_path):
  cfg = common.base_config().input
  cfg.data_dir = str(tmp_path / "tfds")
  for process_index in (0, 1):
    calls = []
    datasets.prepare_for_run(cfg, process_index=process_index,
                             barrier=lambda: calls.append("barrier"))
    assert calls == ["barrier"]
  assert not (tmp_path / "tfds").exists()


def _process(cfg, process_index: int, barrier, results: dict, delay_s: float = 0.0) -> None:
  """What a process of a run does with its data: prepare_for_run, then read both streams."""
  try:
    time.sleep(delay_s)
    datasets.prepare_for_run(cfg, process_index=process_index, barrier=barrier)
    eval_batches = datasets.create_eval_iterator(cfg, split="val", local_batch_size=2,
                                                 process_index=process_index, process_count=2)
    train = datasets.create_train_iterator(
        cfg, stream_name="labeled", stream=LABELED, seed=0, local_batch_size=2,
        process_index=process_index, process_count=2)
    results[process_index] = (sum(int(b["mask"].sum()) for b in eval_batches()),
                              next(train)["image"].shape)
  except Exception as e:  # pylint: disable=broad-except
    results[process_index] = e


def test_a_late_process_0_prepares_while_the_others_wait(tmp_path):
  """Two threads as the two processes of a first run; process 0 starts late."""
  cfg = _camvid_input(tmp_path)
  barrier = threading.Barrier(2, timeout=300)
  results = {}
  threads = [threading.Thread(target=_process, args=(cfg, 1, barrier.wait, results)),
             threading.Thread(target=_process, args=(cfg, 0, barrier.wait, results, 1.0))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for process_index in (0, 1):
    if isinstance(results[process_index], Exception):
      raise results[process_index]
  # 3 val images shared as 2 + 1; training crops of 8x8.
  assert results == {0: (2, (2, 8, 8, 3)), 1: (1, (2, 8, 8, 3))}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # about 3 minutes on 2 cores: preparing CamVid, evaluating 101 images
def test_first_two_process_run_on_an_unprepared_dataset(tmp_path):
  """2 processes x 4 CPU devices of main.py, first start on unprepared real CamVid.

  Process 0 prepares the TFDS records (and the class-presence table) from
  `../shared/datasets/camvid` while process 1 waits; both then train and evaluate.
  """
  if not CAMVID_DIR.is_dir():
    pytest.skip(f"CamVid not found at {CAMVID_DIR}; set RECO_SHARED_DIR")
  port = _free_port()
  workdir = tmp_path / "run"
  data_dir = tmp_path / "tfds"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  args = ["--config=configs/camvid.py:method=supervised,variant=smoke",
          f"--config.input.data_dir={data_dir}", f"--config.input.manual_dir={CAMVID_DIR}",
          "--config.num_train_steps=2", "--config.input.eval_split=val",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *args,
                             f"--process_id={i}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
  builder = camvid.Camvid(data_dir=str(data_dir))
  assert builder.is_prepared()
  assert os.path.exists(prepare_lib.presence_path(builder))
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  evals = [r for r in records if r["split"] == "eval"]
  assert evals and 0.0 <= evals[-1]["miou"] <= 1.0
