"""Tests of the CamVid TFDS builder (and its base class) on tiny SegNet-layout folders."""
import pathlib
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from input_pipeline import datasets
from input_pipeline.builders import base
from input_pipeline.builders import camvid
from conftest import CAMVID_DIR

SIZE = (12, 16)  # (H, W) of the fake images


def _write_segnet(root: pathlib.Path, counts: dict[str, int], seed: int = 0) -> dict:
  """Writes `<split>/` RGB PNGs and `<split>annot/` class-index PNGs (values 0..11).

  Returns:
    {split: {image_id: (u8[H,W,3] image, u8[H,W] raw label)}}.
  """
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in counts.items():
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    written[split] = {}
    for k in range(n):
      image_id = f"{split}{k:03d}"
      image = rng.integers(0, 256, size=SIZE + (3,), dtype=np.uint8)
      label = rng.integers(0, 12, size=SIZE, dtype=np.uint8)
      Image.fromarray(image).save(root / split / f"{image_id}.png")
      Image.fromarray(label).save(root / f"{split}annot" / f"{image_id}.png")
      written[split][image_id] = (image, label)
  return written


def _prepare(manual_dir, data_dir) -> camvid.Camvid:
  builder = camvid.Camvid(data_dir=str(data_dir))
  base.prepare(builder, manual_dir)
  return builder


def _read_split(builder, split) -> dict:
  return {ex["image_id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def _expected_label(raw: np.ndarray) -> np.ndarray:
  return np.where(raw == 11, 255, raw).astype(np.uint8)


def _device_label(raw: np.ndarray) -> np.ndarray:
  """What the pipeline should yield for a raw CamVid label: i32 with -1 for void."""
  return np.where(raw == 11, -1, raw.astype(np.int32))


def test_prepares_every_split_present_including_test(tmp_path):
  written = _write_segnet(tmp_path / "raw", {"train": 3, "val": 2, "test": 2})
  builder = _prepare(tmp_path / "raw", tmp_path / "tfds")
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 3, "val": 2, "test": 2}
  for split, examples in written.items():
    stored = _read_split(builder, split)
    assert sorted(stored) == sorted(examples)
    for image_id, (image, raw) in examples.items():
      np.testing.assert_array_equal(stored[image_id]["image"], image)
      np.testing.assert_array_equal(stored[image_id]["label"][..., 0], _expected_label(raw))
  # Label 11 (Unlabelled) became void, and the data had some.
  assert any((raw == 11).any() for _, raw in written["train"].values())


def test_prepares_only_the_splits_present_and_reuses_prepared_data(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2, "val": 1})
  builder = _prepare(tmp_path / "raw", tmp_path / "tfds")
  assert set(builder.info.splits.keys()) == {"train", "val"}
  # Later runs only read: no manual_dir needed any more.
  again = camvid.Camvid(data_dir=str(tmp_path / "tfds"))
  base.prepare(again, None)
  assert again.info.splits["train"].num_examples == 2


def test_palette_labels_keep_class_indices(tmp_path):
  """PIL reads palette indices; tf.io.decode_png would apply the palette (design.md §2.19)."""
  _write_segnet(tmp_path / "raw", {"train": 1})
  path = tmp_path / "raw" / "trainannot" / "train000.png"
  raw = np.asarray(Image.open(path))
  palette_image = Image.fromarray(raw, mode="P")
  palette_image.putpalette(camvid.Camvid.PALETTE.flatten().tolist() + [0, 0, 0] * 245)
  palette_image.save(path)
  assert not np.array_equal(tf.io.decode_png(path.read_bytes(), channels=1).numpy()[..., 0], raw)
  builder = _prepare(tmp_path / "raw", tmp_path / "tfds")
  stored = _read_split(builder, "train")["train000"]
  np.testing.assert_array_equal(stored["label"][..., 0], _expected_label(raw))


def _one_line_error(tmp_path, error_type, match):
  with pytest.raises(error_type, match=match) as error:
    _prepare(tmp_path / "raw", tmp_path / "tfds")
  assert "\n" not in str(error.value)


def test_missing_or_empty_manual_dir(tmp_path):
  _one_line_error(tmp_path, FileNotFoundError,
                  f"camvid manual_dir folder {tmp_path / 'raw'} does not exist")
  (tmp_path / "raw").mkdir()
  _one_line_error(tmp_path, FileNotFoundError,
                  f"camvid manual_dir folder {tmp_path / 'raw'} is empty")
  (tmp_path / "raw" / "notes.txt").write_text("no splits here")
  _one_line_error(tmp_path, FileNotFoundError,
                  r"no CamVid split folder \(train/, val/, test/\) in .*raw")
  with pytest.raises(FileNotFoundError, match="camvid is not prepared in .* input.manual_dir is "
                                              "not set"):
    base.prepare(camvid.Camvid(data_dir=str(tmp_path / "tfds")), None)


def test_missing_or_empty_label_folder(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2, "val": 1})
  for path in (tmp_path / "raw" / "valannot").iterdir():
    path.unlink()
  _one_line_error(tmp_path, FileNotFoundError, "label folder .*raw/valannot is empty")
  (tmp_path / "raw" / "valannot").rmdir()
  _one_line_error(tmp_path, FileNotFoundError, "label folder .*raw/valannot does not exist")


def test_image_without_label_and_label_without_image(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 3})
  (tmp_path / "raw" / "trainannot" / "train001.png").unlink()
  _one_line_error(tmp_path, base.DataError,
                  r"image .*raw/train/train001.png has no label in .*raw/trainannot "
                  r"\(1 image\(s\) without a label\)")
  (tmp_path / "raw" / "train" / "train001.png").unlink()
  (tmp_path / "raw" / "train" / "train002.png").unlink()
  _one_line_error(tmp_path, base.DataError,
                  "label .*raw/trainannot/train002.png has no image in .*raw/train")


def test_size_mismatch_names_file_and_sizes(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2})
  Image.fromarray(np.zeros((10, 16), np.uint8)).save(
      tmp_path / "raw" / "trainannot" / "train001.png")
  _one_line_error(tmp_path, base.DataError,
                  r"label .*raw/trainannot/train001.png is 10x16 \(HxW\) but image "
                  r".*raw/train/train001.png is 12x16")


def test_out_of_range_labels_name_file_and_values(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2})
  bad = np.zeros(SIZE, np.uint8)
  bad[0, :3] = [12, 200, 255]  # CamVid's void is 11: raw 255 is no label either
  Image.fromarray(bad).save(tmp_path / "raw" / "trainannot" / "train000.png")
  _one_line_error(tmp_path, base.DataError,
                  r"label .*raw/trainannot/train000.png: raw values \[12, 200, 255\] are not "
                  r"CamVid labels \(0-10 classes, 11 void\)")
  # Fixing the data makes the next prepare succeed (no half-written dataset left behind).
  Image.fromarray(np.zeros(SIZE, np.uint8)).save(tmp_path / "raw" / "trainannot" / "train000.png")
  assert _prepare(tmp_path / "raw", tmp_path / "tfds").info.splits["train"].num_examples == 2


def test_rgb_label_is_rejected(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 1})
  Image.fromarray(np.zeros(SIZE + (3,), np.uint8)).save(
      tmp_path / "raw" / "trainannot" / "train000.png")
  _one_line_error(tmp_path, base.DataError,
                  "label .*raw/trainannot/train000.png has PIL mode RGB; expected a "
                  "single-channel")


def _camvid_config(tmp_path, **overrides):
  cfg = common.base_config().input
  cfg.dataset = "camvid"
  cfg.manual_dir = str(tmp_path / "raw")
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.crop_size = (8, 8)
  cfg.eval_size = SIZE
  cfg.update(overrides)
  return cfg


def test_train_and_eval_iterators_on_camvid(tmp_path):
  written = _write_segnet(tmp_path / "raw", {"train": 5, "val": 2, "test": 3})
  cfg = _camvid_config(tmp_path, eval_split="test", num_labeled=2)
  info = datasets.get_dataset_info(cfg)
  assert info.num_classes == 11 and info.class_names[2] == "pole"
  assert info.palette.shape == (11, 3)
  kwargs = dict(seed=0, local_batch_size=4, process_index=0, process_count=1)
  for name, subset, augment in (("labeled", "labeled", True), ("unlabeled", "unlabeled", False)):
    batch = next(datasets.create_train_iterator(
        cfg, stream_name=name, stream=datasets.Stream(subset=subset, augment=augment), **kwargs))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].shape == (4, 8, 8)
    assert set(np.unique(batch["label"])) <= set(range(-1, 11))
  # The eval split is the user's choice (here `test`), shared out over two processes.
  seen = []
  for process_index in range(2):
    eval_batches = datasets.create_eval_iterator(
        cfg, split=cfg.eval_split, local_batch_size=2, process_index=process_index,
        process_count=2)
    batches = list(eval_batches())
    assert len(batches) == 1
    for label, mask in zip(batches[0]["label"], batches[0]["mask"]):
      if mask:
        seen.append(label)
  assert len(seen) == 3
  want = [_device_label(raw) for _, raw in written["test"].values()]
  assert sorted(x.tobytes() for x in seen) == sorted(x.tobytes() for x in want)


def test_labeled_ids_select_camvid_images(tmp_path):
  written = _write_segnet(tmp_path / "raw", {"train": 4, "val": 1})
  cfg = _camvid_config(tmp_path, labeled_ids=("train002",), crop_size=SIZE, scale_range=(1, 1),
                       flip_prob=0.0, color_jitter_prob=0.0, blur_prob=0.0)
  batch = next(datasets.create_train_iterator(
      cfg, stream_name="labeled", stream=datasets.Stream(subset="labeled", augment=True), seed=0,
      local_batch_size=3, process_index=0, process_count=1))
  want = _device_label(written["train"]["train002"][1])
  for label in batch["label"]:
    np.testing.assert_array_equal(label, want)


def test_missing_eval_split_and_unprepared_reader(tmp_path):
  _write_segnet(tmp_path / "raw", {"train": 2, "val": 1})
  cfg = _camvid_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="call input_pipeline.datasets.prepare"):
    datasets.create_eval_iterator(cfg, split="val", local_batch_size=1, process_index=1,
                                  process_count=2)
  datasets.prepare(cfg)
  with pytest.raises(ValueError, match="camvid has no split 'test'; available: train, val"):
    datasets.create_eval_iterator(cfg, split="test", local_batch_size=1, process_index=0,
                                  process_count=1)


def test_real_camvid_prepares_and_reads(tmp_path):
  start = time.perf_counter()
  builder = _prepare(CAMVID_DIR, tmp_path / "tfds")
  elapsed = time.perf_counter() - start
  print(f"real CamVid prepared in {elapsed:.1f} s")
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 367, "val": 101}
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="val"))))
  assert ex["image"].shape == (360, 480, 3)
  raw = np.asarray(Image.open(CAMVID_DIR / "valannot" / f"{ex['image_id'].decode()}.png"))
  np.testing.assert_array_equal(ex["label"][..., 0], _expected_label(raw))
  assert set(np.unique(ex["label"])) <= set(range(11)) | {255}
