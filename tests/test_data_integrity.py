"""A prepared dataset follows its raw data, and bad raw values stop with one line naming the file.

Tiny fake CamVid (SegNet layout) folders; see `input_pipeline.builders.base` for the source
record (`source_fingerprint.json`) these tests exercise.
"""
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image
import pytest

from configs import common
from input_pipeline import datasets
from input_pipeline import partial_labels
from input_pipeline import prepare as prepare_lib
from input_pipeline.builders import base
from input_pipeline.builders import camvid
from input_pipeline.builders import sun
from test_builders import _fake_sun
from test_camvid_builder import SIZE, _expected_label, _prepare, _read_split, _write_segnet


def _one_line(error_type, match, fn, *args):
  with pytest.raises(error_type, match=match) as error:
    fn(*args)
  assert "\n" not in str(error.value)
  return str(error.value)


def _record(builder) -> dict:
  return json.loads(base.source_record_path(builder).read_text())


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _new_label(path: pathlib.Path, value: int) -> np.ndarray:
  label = np.full(SIZE, value, np.uint8)
  Image.fromarray(label).save(path)
  return label


# ---- decoding at preparation ---------------------------------------------------------------


def test_truncated_image_or_label_is_named_at_prepare(tmp_path):
  raw = tmp_path / "raw"
  _write_segnet(raw, {"train": 3})
  _truncate(raw / "train" / "train001.png")
  _one_line(base.DataError, r"image .*raw/train/train001.png cannot be decoded", _prepare, raw,
            tmp_path / "tfds")
  _write_segnet(tmp_path / "fresh", {"train": 3})
  os.replace(tmp_path / "fresh" / "train" / "train001.png", raw / "train" / "train001.png")
  _truncate(raw / "trainannot" / "train002.png")
  _one_line(base.DataError, r"label .*raw/trainannot/train002.png cannot be decoded", _prepare,
            raw, tmp_path / "tfds")
  assert not camvid.Camvid(data_dir=str(tmp_path / "tfds")).is_prepared()


# ---- the source record ---------------------------------------------------------------------


def test_record_lists_the_source_files(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2, "val": 1})
  builder = _prepare(tmp_path / "raw", tmp_path / "tfds")
  record = _record(builder)
  assert record["format"] == 1 and record["dataset"] == "camvid"
  assert record["manual_dir"] == str((tmp_path / "raw").resolve())
  assert record["splits"] == {"train": ["train000", "train001"], "val": ["val000"]}
  stat = os.stat(tmp_path / "raw" / "valannot" / "val000.png")
  assert record["files"]["valannot/val000.png"] == [stat.st_size, stat.st_mtime_ns]
  assert len(record["files"]) == 6
  # Unchanged source: nothing is prepared again (the records keep their modification time).
  records = sorted(pathlib.Path(builder.data_dir).glob("*.tfrecord*"))
  mtimes = [p.stat().st_mtime_ns for p in records]
  _prepare(tmp_path / "raw", tmp_path / "tfds")
  assert [p.stat().st_mtime_ns for p in records] == mtimes


def test_repaired_file_and_new_split_are_prepared_again(tmp_path):
  raw = tmp_path / "raw"
  _write_segnet(raw, {"train": 2})
  prepare_lib.prepare_dataset(camvid.Camvid, str(raw), str(tmp_path / "tfds"))
  # The user repairs a label and adds a validation split.
  repaired = _new_label(raw / "trainannot" / "train001.png", 3)
  _write_segnet(tmp_path / "more", {"val": 1})
  for folder in ("val", "valannot"):
    os.rename(tmp_path / "more" / folder, raw / folder)
  builder = prepare_lib.prepare_dataset(camvid.Camvid, str(raw), str(tmp_path / "tfds"))
  assert set(builder.info.splits.keys()) == {"train", "val"}
  np.testing.assert_array_equal(_read_split(builder, "train")["train001"]["label"][..., 0],
                                repaired)
  # A fresh reader sees the new data, and the class-presence table was rebuilt with it.
  again = camvid.Camvid(data_dir=str(tmp_path / "tfds"))
  assert again.info.splits["val"].num_examples == 1
  _, presence = prepare_lib.class_presence_for(again)
  assert presence[1].tolist() == [c == 3 for c in range(11)]
  assert _record(again)["splits"].keys() == {"train", "val"}


def test_a_different_manual_dir_is_noticed(tmp_path):
  _write_segnet(tmp_path / "a", {"train": 2}, seed=0)
  written = _write_segnet(tmp_path / "b", {"train": 2}, seed=1)
  cfg = common.base_config().input
  cfg.update(dataset="camvid", manual_dir=str(tmp_path / "a"), data_dir=str(tmp_path / "tfds"))
  datasets.prepare(cfg)
  cfg.manual_dir = str(tmp_path / "b")
  datasets.prepare(cfg)
  builder = camvid.Camvid(data_dir=str(tmp_path / "tfds"))
  stored = _read_split(builder, "train")
  for image_id, (image, label) in written["train"].items():
    np.testing.assert_array_equal(stored[image_id]["image"], image)
    np.testing.assert_array_equal(stored[image_id]["label"][..., 0], _expected_label(label))
  assert _record(builder)["manual_dir"] == str((tmp_path / "b").resolve())


def test_changed_source_without_manual_dir_stops_with_one_line(tmp_path):
  raw = tmp_path / "raw"
  _write_segnet(raw, {"train": 5})
  builder = _prepare(raw, tmp_path / "tfds")
  for k in range(4):
    _new_label(raw / "trainannot" / f"train00{k}.png", 1)
  (raw / "train" / "train004.png").unlink()
  (raw / "trainannot" / "train004.png").unlink()
  message = _one_line(
      base.DataError,
      r"camvid prepared in .*tfds/camvid/1.0.0 no longer matches its raw data in .*raw: "
      r"4 file\(s\) changed \(trainannot/train000.png, trainannot/train001.png, "
      r"trainannot/train002.png, \.\.\.\); 2 file\(s\) removed \(train/train004.png, "
      r"trainannot/train004.png\); the image list of split\(s\) train changed; set "
      r"input.manual_dir=.*raw to prepare it again",
      base.prepare, camvid.Camvid(data_dir=str(tmp_path / "tfds")), None)
  # A manual_dir that does not exist counts as unset: the recorded folder is checked.
  assert _one_line(base.DataError, "no longer matches", base.prepare,
                   camvid.Camvid(data_dir=str(tmp_path / "tfds")),
                   str(tmp_path / "nowhere")) == message
  # Nothing was deleted; with the raw data gone, the prepared copy is used as it is.
  os.rename(raw, tmp_path / "elsewhere")
  base.prepare(camvid.Camvid(data_dir=str(tmp_path / "tfds")), None)
  assert builder.info.splits["train"].num_examples == 5


def test_preparation_without_a_record_is_used_with_a_warning(tmp_path, caplog):
  raw = tmp_path / "raw"
  written = _write_segnet(raw, {"train": 2, "val": 1})
  builder = _prepare(raw, tmp_path / "tfds")
  base.source_record_path(builder).unlink()  # as prepared by an earlier version
  _new_label(raw / "trainannot" / "train000.png", 4)
  with caplog.at_level(logging.WARNING):
    again = _prepare(raw, tmp_path / "tfds")
  warnings = [r.getMessage() for r in caplog.records if "source_fingerprint.json" in
              r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "prepared by an older version" in warnings[0]
  np.testing.assert_array_equal(_read_split(again, "train")["train000"]["label"][..., 0],
                                _expected_label(written["train"]["train000"][1]))
  cfg = common.base_config().input
  cfg.update(dataset="camvid", manual_dir=None, data_dir=str(tmp_path / "tfds"), eval_size=SIZE)
  batches = datasets.create_eval_iterator(cfg, split="val", local_batch_size=1, process_index=0,
                                          process_count=1)
  assert len(list(batches())) == 1
  assert datasets.max_image_size(cfg, "val") is None


# ---- values --------------------------------------------------------------------------------


def test_camvid_raw_255_is_rejected(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2})
  label = np.zeros(SIZE, np.uint8)
  label[3, 4] = 255
  Image.fromarray(label).save(tmp_path / "raw" / "trainannot" / "train001.png")
  _one_line(base.DataError,
            r"label .*raw/trainannot/train001.png: raw values \[255\] are not CamVid labels "
            r"\(0-10 classes, 11 void\)", _prepare, tmp_path / "raw", tmp_path / "tfds")


def test_same_stem_png_and_jpg_are_rejected(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2})
  Image.fromarray(np.zeros(SIZE + (3,), np.uint8)).save(tmp_path / "raw" / "train" /
                                                        "train001.jpg")
  _one_line(base.DataError,
            r"image folder .*raw/train has both train001.jpg and train001.png: one id "
            r"'train001', two files", _prepare, tmp_path / "raw", tmp_path / "tfds")
  root = tmp_path / "sun"
  _fake_sun(root, np.random.default_rng(0), h=4, w=4)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "SUNRGBD-train_images" /
                                                      "img-000002.png")
  _one_line(base.DataError,
            r"SUN RGB-D training image folder .*SUNRGBD-train_images has both img-000002.jpg and "
            r"img-000002.png", sun.list_examples, root)


def _partial_label_config(tmp_path, partial_dir):
  cfg = common.base_config().input
  cfg.update(dataset="camvid", manual_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"),
             crop_size=(8, 8), eval_size=SIZE, num_labeled=0, partial_labels_dir=str(partial_dir))
  return cfg


def _raw_camvid_labels(tmp_path) -> dict[str, np.ndarray]:
  """Raw CamVid training labels (void still 11) of a fake folder in tmp_path/raw."""
  written = _write_segnet(tmp_path / "raw", {"train": 3})
  return {image_id: label for image_id, (_, label) in written["train"].items()}


def test_partial_label_values_are_checked_where_written(tmp_path):
  raw_labels = _raw_camvid_labels(tmp_path)
  _one_line(ValueError, r"partial label .*p25_seed0/train000.png has values \[11\] outside "
                        r"\[0, 11\) and not void \(255\)",
            lambda: partial_labels.write_partial_labels(list(raw_labels), raw_labels.__getitem__,
                                                        str(tmp_path / "partial"), [0],
                                                        num_classes=11))
  # Mapped labels (void 255) pass, and train.
  mapped = {i: _expected_label(label) for i, label in raw_labels.items()}
  partial_labels.write_partial_labels(list(mapped), mapped.__getitem__, str(tmp_path / "ok"), [0],
                                      num_classes=11)
  cfg = _partial_label_config(tmp_path, partial_labels.partial_dir(str(tmp_path / "ok"), 25, 0))
  batch = next(datasets.create_train_iterator(
      cfg, stream_name="labeled", stream=datasets.Stream(subset="labeled", augment=True), seed=0,
      local_batch_size=2, process_index=0, process_count=1))
  assert set(np.unique(batch["label"])) <= set(range(-1, 11))


def test_partial_label_values_are_checked_where_read(tmp_path):
  # Written without the check (e.g. by another tool) from raw labels: training stops naming
  # the file instead of a NaN loss at step 1.
  raw_labels = _raw_camvid_labels(tmp_path)
  partial_labels.write_partial_labels(list(raw_labels), raw_labels.__getitem__,
                                      str(tmp_path / "partial"), [0])
  cfg = _partial_label_config(tmp_path,
                              partial_labels.partial_dir(str(tmp_path / "partial"), 25, 0))
  iterator = datasets.create_train_iterator(
      cfg, stream_name="labeled", stream=datasets.Stream(subset="labeled", augment=True), seed=0,
      local_batch_size=2, process_index=0, process_count=1)
  _one_line(ValueError, r"partial label .*p25_seed0/train00\d.png has value 11 outside "
                        r"\[0, 11\) and not void \(255\)", next, iterator)


def test_max_image_size(tmp_path):
  raw = tmp_path / "raw"
  _write_segnet(raw, {"train": 2, "val": 2})
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (15, 9, 3), np.uint8)).save(raw / "val" / "val001.png")
  Image.fromarray(np.zeros((15, 9), np.uint8)).save(raw / "valannot" / "val001.png")
  cfg = common.base_config().input
  cfg.update(dataset="camvid", manual_dir=str(raw), data_dir=str(tmp_path / "tfds"))
  assert datasets.max_image_size(cfg, "val") is None  # not prepared yet
  datasets.prepare(cfg)
  assert datasets.max_image_size(cfg, "train") == SIZE == (12, 16)
  assert datasets.max_image_size(cfg, "val") == (15, 16)
  assert datasets.max_image_size(cfg, "test") is None
  synthetic = common.base_config().input
  synthetic.dataset = "synthetic"
  assert datasets.max_image_size(synthetic, "val") == tuple(synthetic.synthetic.image_size)
