"""Partial-label maps: official outputs, the dilation shortcut, files and the command."""
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from input_pipeline import partial_labels as pl
from input_pipeline.builders import cityscapes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _generate(ids, labels, seed, void_values=(pl.VOID,)):
  out = {}
  pl.generate_partial_labels(ids, labels.__getitem__, seed,
                             lambda i, p, a: out.__setitem__((i, p), a), void_values)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_outputs_in_glob_order(golden, seed):
  g = golden("partial_labels_pascal.npz")
  names = [str(n) for n in g["names"]]
  gt = dict(zip(names, g["gt"]))
  out = _generate([str(n) for n in g["glob_order"]], gt, seed)
  for percent in pl.PARTIAL_LEVELS:
    got = np.stack([out[(n, percent)] for n in names])
    np.testing.assert_array_equal(got, g[f"seed{seed}_p{percent}"], err_msg=f"p{percent}")


def test_processing_order_changes_the_draws(golden):
  # The golden's glob order is not sorted; sorted order must give different maps, which is
  # why the command takes --order_file.
  g = golden("partial_labels_pascal.npz")
  names = [str(n) for n in g["names"]]
  assert [str(n) for n in g["glob_order"]] != names
  out = _generate(names, dict(zip(names, g["gt"])), 0)
  got = np.stack([out[(n, 25)] for n in names])
  assert not np.array_equal(got, g["seed0_p25"])


def _dilation_reference(class_mask, seed_yx, target):
  """The official loop with scipy: dilate a one-pixel mask by 5x5 until it covers `target`."""
  grown = np.zeros(class_mask.shape, bool)
  grown[seed_yx] = True
  while (grown & class_mask).sum() < target:
    grown = ndimage.binary_dilation(grown, structure=np.ones((5, 5), bool))
  return grown & class_mask


def test_grow_region_equals_repeated_5x5_dilation():
  rng = np.random.default_rng(0)
  checked_multi_step = 0
  for _ in range(60):
    h, w = rng.integers(5, 40, size=2)
    # Blobby classes with holes, so that growth crosses other classes.
    class_mask = ndimage.uniform_filter(rng.random((h, w)), 3) > rng.uniform(0.3, 0.6)
    if not class_mask.any():
      continue
    ys, xs = np.nonzero(class_mask)
    k = rng.integers(len(ys))
    target = int(rng.choice([0, 1, 2, len(ys) // 4, len(ys) // 2, len(ys)]))
    got = pl.grow_region(class_mask, (ys[k], xs[k]), target)
    expected = _dilation_reference(class_mask, (ys[k], xs[k]), target)
    np.testing.assert_array_equal(got, expected)
    checked_multi_step += target > 25
  assert checked_multi_step >= 10


def test_properties_of_generated_maps():
  rng = np.random.default_rng(1)
  labels = {f"im{i}": rng.choice([0, 3, 7, 255], size=(30, 40), p=[0.4, 0.3, 0.2, 0.1])
            .astype(np.uint8) for i in range(3)}
  out = _generate(list(labels), labels, seed=5)
  for image_id, gt in labels.items():
    for percent in (1, 5, 25):
      partial = out[(image_id, percent)]
      for c in (0, 3, 7):
        region = partial == c
        assert region.sum() >= int(percent / 100 * (gt == c).sum())
        assert np.all(gt[region] == c)  # never outside the class
    p0 = out[(image_id, 0)]
    assert sorted(np.unique(p0).tolist()) == [0, 3, 7, 255]
    assert all((p0 == c).sum() == 1 and gt[p0 == c][0] == c for c in (0, 3, 7))


def test_cityscapes_train_id_space_equals_official_label_id_space():
  # The official script samples labelIds with its void list and writes 0 as void; sampling
  # the mapped train ids must give the same maps once the official output is mapped.
  rng = np.random.default_rng(2)
  void_ids = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
  label_ids = {f"c{i}": rng.choice([0, 4, 7, 8, 21, 26, 33], size=(24, 32)).astype(np.uint8)
               for i in range(3)}
  official = _generate(list(label_ids), label_ids, 1, void_values=void_ids)
  train_ids = {k: cityscapes.to_train_ids(v) for k, v in label_ids.items()}
  ours = _generate(list(train_ids), train_ids, 1)
  for key, partial in official.items():
    # Our generator writes 255 where the official one writes labelId 0; both map to void.
    mapped = np.where(partial == pl.VOID, pl.VOID, cityscapes.to_train_ids(np.minimum(partial, 33)))
    np.testing.assert_array_equal(ours[key], mapped, err_msg=str(key))


def test_written_files_and_attach_to_a_tf_dataset(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  labels = {f"im{i}": rng.choice([1, 2, 255], size=(9, 11)).astype(np.uint8) for i in range(2)}
  pl.write_partial_labels(list(labels), labels.__getitem__, str(tmp_path), seeds=[0, 1])
  expected = _generate(list(labels), labels, 1)
  for (image_id, percent), partial in expected.items():
    with Image.open(tmp_path / f"p{percent}_seed1" / f"{image_id}.png") as im:
      assert im.mode == "L"
      np.testing.assert_array_equal(np.asarray(im), partial)
  ds = tf.data.Dataset.from_tensor_slices({"image_id": list(labels), "label": [b"full"] * 2})
  folder = pl.partial_dir(str(tmp_path), 5, 1)
  encoded = list(pl.attach_partial_labels(ds, folder).as_numpy_iterator())
  decoded = list(pl.attach_partial_labels(ds, folder, encoded=False).as_numpy_iterator())
  for enc, dec in zip(encoded, decoded):
    image_id = enc["image_id"].decode()
    np.testing.assert_array_equal(tf.io.decode_png(enc["label"], channels=1).numpy()[..., 0],
                                  expected[(image_id, 5)])
    np.testing.assert_array_equal(dec["label"][..., 0], expected[(image_id, 5)])
  with pytest.raises(FileNotFoundError, match=r"p5_seed7 does not exist"):
    pl.attach_partial_labels(ds, pl.partial_dir(str(tmp_path), 5, 7))


def test_order_file_must_list_every_file(tmp_path):
  path = tmp_path / "order.txt"
  path.write_text("dataset/x/SegmentationClassAug/b.png\na\n")
  assert pl.read_order_file(str(path), ["a", "b"]) == ["b", "a"]
  with pytest.raises(ValueError, match=r"does not list 1 label files, e.g. 'c'"):
    pl.read_order_file(str(path), ["a", "b", "c"])


def test_command_on_a_voc_folder(tmp_path):
  rng = np.random.default_rng(4)
  label_dir = tmp_path / "pascal" / "SegmentationClassAug"
  (tmp_path / "pascal" / "JPEGImages").mkdir(parents=True)
  label_dir.mkdir()
  labels = {}
  for image_id in ("2007_000032", "2007_000033", "2008_000001"):  # train and val files alike
    labels[image_id] = rng.choice([0, 5, 255], size=(10, 12)).astype(np.uint8)
    Image.fromarray(labels[image_id]).save(label_dir / f"{image_id}.png")
  order = ["2008_000001", "2007_000032", "2007_000033"]
  (tmp_path / "order.txt").write_text("\n".join(f"{label_dir}/{i}.png" for i in order))
  cmd = [sys.executable, "-m", "input_pipeline.partial_labels", "--dataset=voc",
         f"--manual_dir={tmp_path / 'pascal'}", f"--out_dir={tmp_path / 'out'}", "--seeds=2",
         f"--order_file={tmp_path / 'order.txt'}"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}
  done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  expected = _generate(order, labels, 2)
  assert sorted(os.listdir(tmp_path / "out")) == ["p0_seed2", "p1_seed2", "p25_seed2", "p5_seed2"]
  for (image_id, percent), partial in expected.items():
    got = np.asarray(Image.open(tmp_path / "out" / f"p{percent}_seed2" / f"{image_id}.png"))
    np.testing.assert_array_equal(got, partial)
