"""reco_jax/tools/class_relations.py: the on-device class sums against a NumPy loop, planted
class structure recovered by the relation matrix and the dendrogram, and the tool end to end
on a workdir (an untrained checkpoint in the default suite, a trained smoke run marked slow)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from reco_jax.tools import class_relations as cr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _slow_class_sums(rep, labels, num_classes):
  """Pixel by pixel: the sum and count of each class (labels outside [0, C) are ignored)."""
  sums = np.zeros((num_classes, rep.shape[-1]), np.float64)
  counts = np.zeros(num_classes, np.int64)
  for b, i, j in np.ndindex(*labels.shape):
    c = labels[b, i, j]
    if 0 <= c < num_classes:
      sums[c] += rep[b, i, j]
      counts[c] += 1
  return sums, counts


def _random_labels(rng, shape, num_classes, absent=()):
  """Random labels with about 30 % ignore (-1) pixels and the `absent` classes never used."""
  labels = rng.integers(0, num_classes, shape)
  for c in absent:
    labels[labels == c] = (c + 1) % num_classes
  return np.where(rng.random(shape) < 0.3, -1, labels).astype(np.int32)


def test_class_mean_sums_match_a_numpy_loop():
  rng = np.random.default_rng(0)
  rep = rng.normal(size=(3, 5, 7, 4)).astype(np.float32)
  labels = _random_labels(rng, (3, 5, 7), 6, absent=(4,))
  sums, counts = jax.jit(cr.class_mean_sums, static_argnums=2)(rep, labels, 6)
  want_sums, want_counts = _slow_class_sums(rep, labels, 6)
  assert sums.shape == (6, 4) and sums.dtype == np.float32 and counts.dtype == np.int32
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5)
  assert counts[4] == 0 and counts.sum() == np.sum(labels >= 0)


def test_batch_class_sums_downsample_labels_and_drop_padded_examples():
  """Labels are brought to the rep's size with PyTorch `nearest` (top-left aligned:
  src = floor(dst * in / out)), and an example with mask False counts for no class."""
  rng = np.random.default_rng(1)
  num_classes, (height, width), (h, w) = 5, (11, 14), (4, 5)
  rep = rng.normal(size=(3, h, w, 6)).astype(np.float32)
  batch = {"image": np.zeros((3, height, width, 3), np.float32),
           "label": _random_labels(rng, (3, height, width), num_classes),
           "mask": np.array([True, False, True])}
  apply_fn = lambda variables, images, train: {"rep": rep, "logits": None}  # noqa: E731
  sums, counts = cr.batch_class_sums({}, batch, apply_fn=apply_fn, num_classes=num_classes)
  rows = np.floor(np.arange(h, dtype=np.float32) * np.float32(height / h)).astype(int)
  cols = np.floor(np.arange(w, dtype=np.float32) * np.float32(width / w)).astype(int)
  low = batch["label"][:, rows][:, :, cols]
  low[1] = -1  # the padded example
  want_sums, want_counts = _slow_class_sums(rep, low, num_classes)
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5)


def _planted_stats(rng, absent=None):
  """ClassStats of a toy representation with 6 classes in 3 near-duplicate pairs
  (0, 1), (2, 3), (4, 5).

  The three pair directions overlap (cosine ~0.5) and the pairs have very different norms
  (x10, x1, x0.3), so that an un-normalised dot product would relate the small classes to
  the large ones rather than to their partners. `absent`: a class given no pixel.
  """
  dim = 16
  shared = rng.normal(size=dim)
  directions = [shared + rng.normal(size=dim) for _ in range(3)]
  centres = []
  for direction, scale in zip(directions, (10.0, 1.0, 0.3)):
    for _ in range(2):  # the two classes of a pair: 0.1 of the norm apart
      centres.append(scale * (direction + 0.1 * np.linalg.norm(direction) / np.sqrt(dim)
                              * rng.normal(size=dim)))
  centres = np.array(centres, np.float32)
  labels = _random_labels(rng, (4, 16, 16), 6, absent=() if absent is None else (absent,))
  noise = rng.normal(size=(*labels.shape, dim)).astype(np.float32)
  rep = centres[np.maximum(labels, 0)] + 0.05 * np.abs(centres[np.maximum(labels, 0)]).mean(
      -1, keepdims=True) * noise
  sums, counts = jax.jit(cr.class_mean_sums, static_argnums=2)(rep, labels, 6)
  return cr.ClassStats(np.asarray(sums, np.float64), np.asarray(counts, np.int64), 4)


def test_planted_pairs_are_the_closest_relations_and_merge_first():
  means, present = cr.class_means(_planted_stats(np.random.default_rng(2)))
  assert present.tolist() == list(range(6))
  matrix = cr.relation_matrix(means)
  np.testing.assert_array_equal(matrix, matrix.T)
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-12)
  partner = np.arange(6) ^ 1  # 0<->1, 2<->3, 4<->5
  off_diagonal = np.where(np.eye(6, dtype=bool), -np.inf, matrix)
  np.testing.assert_array_equal(np.argmax(off_diagonal, axis=1), partner)
  # The three pair relations are the three highest off-diagonal values.
  upper = np.triu_indices(6, 1)
  top = np.argsort(matrix[upper])[::-1][:3]
  assert sorted(zip(upper[0][top], upper[1][top])) == [(0, 1), (2, 3), (4, 5)]
  for method in cr.LINKAGE_METHODS:
    linkage = cr.dendrogram_linkage(matrix, method)
    assert linkage.shape == (5, 4)
    assert sorted(sorted(int(c) for c in row[:2]) for row in linkage[:3]) == [
        [0, 1], [2, 3], [4, 5]], method
    assert np.all(np.diff(linkage[:, 2]) >= 0) and linkage[-1, 3] == 6


def test_outputs_leave_out_an_absent_class_and_name_it(tmp_path):
  stats = _planted_stats(np.random.default_rng(3), absent=3)
  record = cr.write_outputs(str(tmp_path), [f"class{c}" for c in range(6)], stats, "average",
                            "toy", step=7)
  with open(tmp_path / cr.RELATIONS_JSON) as f:
    assert json.load(f) == record
  assert record["excluded_classes"] == ["class3"] and record["pixel_counts"]["class3"] == 0
  assert record["class_names"] == ["class0", "class1", "class2", "class4", "class5"]
  assert np.array(record["matrix"]).shape == (5, 5) and np.array(record["linkage"]).shape == (4, 4)
  assert record["step"] == 7 and record["linkage_method"] == "average"
  for name in (cr.RELATIONS_PNG, cr.DENDROGRAM_PNG):
    assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
  with pytest.raises(ValueError, match="only 1 class"):
    cr.write_outputs(str(tmp_path), ["a", "b"], cr.ClassStats(np.ones((2, 3)), np.array([5, 0]), 1),
                     "average", "toy")


def _check_tool_outputs(out_dir, num_classes):
  """relations.json holds a symmetric matrix with ones on its diagonal; the PNGs are not
  blank."""
  with open(os.path.join(out_dir, cr.RELATIONS_JSON)) as f:
    record = json.load(f)
  matrix = np.array(record["matrix"])
  kept = len(record["class_names"])
  assert kept + len(record["excluded_classes"]) == num_classes and kept >= 2
  assert matrix.shape == (kept, kept)
  np.testing.assert_array_equal(matrix, matrix.T)
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
  assert np.array(record["linkage"]).shape == (kept - 1, 4)
  assert sum(record["pixel_counts"].values()) > 0
  for name in (cr.RELATIONS_PNG, cr.DENDROGRAM_PNG):
    path = os.path.join(out_dir, name)
    assert open(path, "rb").read(8) == PNG_SIGNATURE and os.path.getsize(path) > 10_000
    with Image.open(path) as image:
      assert len(np.unique(np.asarray(image.convert("L")))) > 10  # text and cells, not blank
  return record


@pytest.fixture(scope="module")
def untrained_workdir(tmp_path_factory):
  """A workdir holding the step-0 state of the synthetic smoke config and its config.json,
  as the trainer writes them (no training: the default suite stays fast)."""
  from configs import synthetic
  from reco_jax import checkpointing, parallel, train
  workdir = str(tmp_path_factory.mktemp("class_relations") / "untrained")
  config = synthetic.get_config("method=supervised,variant=smoke")
  _, method = train.build(config)
  # One device: the state is replicated anyway, and the tool restores it onto all 8.
  state = train.create_state(config, method, parallel.create_mesh(jax.devices()[:1]))
  manager = checkpointing.create_resume_manager(workdir, max_to_keep=1)
  checkpointing.save_state(manager, 0, state, config)
  manager.wait_until_finished()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  return workdir


def test_main_writes_the_figures_and_json(untrained_workdir, tmp_path, capsys):
  out = tmp_path / "relations"
  assert cr.main([f"--workdir={untrained_workdir}", f"--out={out}", "--max_images=8"]) == 0
  assert capsys.readouterr().out.startswith(f"wrote {out / cr.RELATIONS_PNG}")
  record = _check_tool_outputs(str(out), 8)
  assert record["num_images"] == 8 and record["step"] == 0 and record["split"] == "val"


def test_missing_workdir_fails_with_one_line(tmp_path, capsys):
  missing = tmp_path / "nope"
  assert cr.main([f"--workdir={missing}"]) == 1
  assert capsys.readouterr().err == (
      f"error: {missing / 'config.json'}: no such file (is {missing} a training workdir?)\n")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The workdir of a supervised smoke run of main.py on the synthetic dataset (3 steps)."""
  workdir = str(tmp_path_factory.mktemp("class_relations") / "supervised_smoke")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, "main.py",
                         "--config=configs/synthetic.py:method=supervised,variant=smoke",
                         f"--workdir={workdir}"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.mark.slow  # trains a run of its own (about a minute)
def test_main_on_a_trained_smoke_run(smoke_run):
  assert cr.main([f"--workdir={smoke_run}"]) == 0
  out = os.path.join(smoke_run, cr.DEFAULT_OUT)
  record = _check_tool_outputs(out, 8)
  assert record["step"] == 3 and record["workdir"] == smoke_run
