"""VOC, Cityscapes and SUN RGB-D builders on tiny fake folders in the official layouts."""
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from input_pipeline import prepare
from input_pipeline import splits
from input_pipeline.builders import base
from input_pipeline.builders import cityscapes
from input_pipeline.builders import sun
from input_pipeline.builders import voc

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _save_rgb(path, rng, h, w, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
  Image.fromarray(image).save(path, format=fmt)
  return image


def _save_label(path, label, palette=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  im = Image.fromarray(np.asarray(label, np.uint8), mode="P" if palette is not None else "L")
  if palette is not None:
    im.putpalette(palette)
  im.save(path)


def _read_split(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
          for ex in tfds.as_numpy(ds)]


# ---- VOC ---------------------------------------------------------------------------------------


def _fake_voc(root, rng, train_ids=("2008_000003", "2007_000032", "2009_000001", "2007_000039"),
              val_ids=("2007_000033", "2007_000042")):
  """ReCo's dataset/pascal layout: labels as palette PNGs whose colours are not the indices."""
  palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8).flatten().tolist()
  labels = {}
  for image_id in (*train_ids, *val_ids):
    h, w = rng.integers(7, 12, size=2)
    _save_rgb(root / "JPEGImages" / f"{image_id}.jpg", rng, h, w)
    label = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
    label[0, :] = 255
    _save_label(root / "SegmentationClassAug" / f"{image_id}.png", label, palette)
    labels[image_id] = label
  # train_aug.txt in DeepLab's "image label" pair format, val.txt with bare ids.
  (root / "train_aug.txt").write_text(
      "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in train_ids))
  (root / "val.txt").write_text("\n".join(val_ids) + "\n")
  return list(train_ids), list(val_ids), labels


def test_voc_palette_matches_the_official_colours():
  palette = voc.voc_palette(21)
  assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
  assert palette[8].tolist() == [64, 0, 0] and palette[20].tolist() == [0, 64, 128]
  assert palette[15].tolist() == [192, 128, 128]


def test_voc_builder_decodes_palette_labels_in_list_order(tmp_path):
  rng = np.random.default_rng(0)
  train_ids, val_ids, labels = _fake_voc(tmp_path / "pascal", rng)
  builder = prepare.prepare_dataset(voc.VocAug, str(tmp_path / "pascal"), str(tmp_path / "tfds"))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "val": 2}
  for split, ids in (("train", train_ids), ("val", val_ids)):
    examples = _read_split(builder, split)
    assert [ex["image_id"] for ex in examples] == ids  # train_aug.txt order, not sorted
    for ex in examples:
      assert np.array_equal(ex["label"][..., 0], labels[ex["image_id"]])
      assert ex["image"].shape == ex["label"].shape[:2] + (3,)
  # The class-presence table is written next to the records, in train_aug order.
  ids, presence = splits.load_class_presence(prepare.presence_path(builder))
  assert ids == train_ids
  assert np.array_equal(presence, [splits.class_presence(labels[i], 21) for i in train_ids])
  # Reading the prepared dataset by directory still works with the extra file present.
  assert tfds.builder_from_directory(builder.data_dir).info.splits["val"].num_examples == 2


def test_voc_layout_variants_and_fallback_labels(tmp_path):
  rng = np.random.default_rng(1)
  root = tmp_path / "VOCdevkit" / "VOC2012"
  train_ids, _, _ = _fake_voc(root, rng)
  # Lists in ImageSets/Segmentation/, and a val label only in the original SegmentationClass/.
  (root / "ImageSets" / "Segmentation").mkdir(parents=True)
  for name in ("train_aug.txt", "val.txt"):
    (root / name).rename(root / "ImageSets" / "Segmentation" / name)
  (root / "SegmentationClass").mkdir()
  os.rename(root / "SegmentationClassAug" / "2007_000042.png",
            root / "SegmentationClass" / "2007_000042.png")
  listed = voc.list_examples(tmp_path)
  assert [ex.image_id for ex in listed["train"]] == train_ids
  assert listed["val"][1].label_path == root / "SegmentationClass" / "2007_000042.png"


@pytest.mark.parametrize("breakage, message", [
    (lambda r: os.rename(r / "JPEGImages", r / "images"),
     r"VOC image folder .*JPEGImages does not exist"),
    (lambda r: (r / "train_aug.txt").unlink(), r"VOC id list .*train_aug.txt does not exist"),
    (lambda r: os.rename(r / "SegmentationClassAug", r / "x"),
     r"label folder .*SegmentationClassAug does not exist"),
    (lambda r: (r / "JPEGImages" / "2007_000039.jpg").unlink(),
     r"image .*2007_000039.jpg \(listed in train_aug.txt\) does not exist"),
    (lambda r: (r / "SegmentationClassAug" / "2007_000033.png").unlink(),
     r"label .*2007_000033.png \(listed in val.txt\) does not exist"),
])
def test_voc_bad_layouts_name_the_missing_piece(tmp_path, breakage, message):
  root = tmp_path / "pascal"
  _fake_voc(root, np.random.default_rng(2))
  breakage(root)
  with pytest.raises((FileNotFoundError, base.DataError), match=message):
    voc.list_examples(root)


def test_voc_out_of_range_label_names_the_file(tmp_path):
  root = tmp_path / "pascal"
  _fake_voc(root, np.random.default_rng(3))
  _save_label(root / "SegmentationClassAug" / "2007_000033.png", np.full((9, 9), 30))
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "JPEGImages" / "2007_000033.jpg")
  with pytest.raises(base.DataError, match=r"2007_000033.png has values \[30\] outside \[0, 21\)"):
    prepare.prepare_dataset(voc.VocAug, str(root), str(tmp_path / "tfds"))


# ---- Cityscapes ----------------------------------------------------------------------------

# cityscapesScripts labels.py, written out independently of the builder's table.
_CS_VOID_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
_CS_TRAIN_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def _expected_train_ids(label_ids):
  out = np.full(label_ids.shape, 255, np.uint8)
  for train_id, label_id in enumerate(_CS_TRAIN_IDS):
    out[label_ids == label_id] = train_id
  return out


def _fake_cityscapes(root, rng, h=32, w=64,
                     layout=(("train", "aachen", 2), ("train", "bochum", 1),
                             ("val", "frankfurt", 2))):
  labels, images = {}, {}
  for split, city, count in layout:
    for n in range(count):
      image_id = f"{city}_{n:06d}_000019"
      image_path = root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png"
      images[image_id] = _save_rgb(image_path, rng, h, w)
      label = rng.choice(np.arange(34), size=(h, w)).astype(np.uint8)
      _save_label(root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png", label)
      labels[image_id] = label
  return images, labels


def test_cityscapes_train_id_table():
  label_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
  assert np.array_equal(cityscapes.to_train_ids(label_ids), _expected_train_ids(label_ids))
  assert len(cityscapes.CLASS_NAMES) == 19 and cityscapes.PALETTE.shape == (19, 3)
  assert cityscapes.CLASS_NAMES[0] == "road" and cityscapes.CLASS_NAMES[18] == "bicycle"
  with pytest.raises(cityscapes.UnknownLabelIdError, match=r"values \[40\] are not Cityscapes"):
    cityscapes.to_train_ids(np.array([[7, 40]]))


def test_cityscapes_half_builder_maps_ids_and_resizes(tmp_path):
  rng = np.random.default_rng(4)
  images, labels = _fake_cityscapes(tmp_path / "cs", rng)
  builder = prepare.prepare_dataset(cityscapes.CityscapesHalf, str(tmp_path / "cs"),
                                    str(tmp_path / "tfds"))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 2}
  train = _read_split(builder, "train")
  train_ids = sorted(i for i in labels if not i.startswith("frankfurt"))
  assert [ex["image_id"] for ex in train] == train_ids
  for ex in train + _read_split(builder, "val"):
    assert ex["image"].shape == (512, 1024, 3) and ex["label"].shape == (512, 1024, 1)
    # 32x64 -> 512x1024 is x16: PIL nearest repeats every pixel in a 16x16 block.
    expected = np.kron(_expected_train_ids(labels[ex["image_id"]]), np.ones((16, 16), np.uint8))
    assert np.array_equal(ex["label"][..., 0], expected)
    resized = Image.fromarray(images[ex["image_id"]]).resize((1024, 512), Image.Resampling.BICUBIC)
    assert np.array_equal(ex["image"], np.asarray(resized))
  ids, presence = splits.load_class_presence(prepare.presence_path(builder))
  assert ids == [ex["image_id"] for ex in train]
  assert presence.shape == (3, 19) and presence.all()  # random labels hold every class
  # The recorded largest image size is the stored (resized) one.
  record = base.load_source_record(builder)
  assert record["max_image_size"] == {"train": [512, 1024], "val": [512, 1024]}


def test_cityscapes_resize_keeps_an_example_of_the_target_size():
  label = np.zeros((4, 8, 1), np.uint8)
  example = {"image": np.zeros((4, 8, 3), np.uint8), "label": label, "image_id": "x"}
  assert cityscapes.resize_example(example, (4, 8)) is example


def test_cityscapes_unknown_label_id_names_the_file(tmp_path):
  root = tmp_path / "cs"
  _, labels = _fake_cityscapes(root, np.random.default_rng(5), h=4, w=8)
  bad = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_000019_gtFine_labelIds.png"
  _save_label(bad, np.full((4, 8), 50))
  with pytest.raises(base.DataError,
                     match=r"frankfurt_000001_000019_gtFine_labelIds.png: values \[50\]"):
    prepare.prepare_dataset(cityscapes.CityscapesHalf, str(root), str(tmp_path / "tfds"))


def test_cityscapes_bad_layouts(tmp_path):
  root = tmp_path / "cs"
  _fake_cityscapes(root, np.random.default_rng(6), h=4, w=8)
  # ReCo's extracted-archive layout is found.
  (root / "leftImg8bit_trainvaltest").mkdir()
  os.rename(root / "leftImg8bit", root / "leftImg8bit_trainvaltest" / "leftImg8bit")
  assert len(cityscapes.list_examples(root)["train"]) == 3
  (root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png").unlink()
  with pytest.raises(base.DataError, match=r"aachen_000001_000019_leftImg8bit.png has no label"):
    cityscapes.list_examples(root)
  os.rename(root / "gtFine", root / "elsewhere")
  (root / "gtFine_trainvaltest.zip").write_bytes(b"")
  with pytest.raises(FileNotFoundError,
                     match=r"folder .*gtFine does not exist; extract gtFine_trainvaltest.zip"):
    cityscapes.list_examples(root)


# ---- SUN RGB-D -------------------------------------------------------------------------------


def _fake_sun(root, rng, h=12, w=16, num_train=3, num_test=4, kept=(2, 4)):
  """The release layout: training images 1..num_train have labels 5050 + k."""
  images, labels = {}, {}
  for folder, count, offset in (("SUNRGBD-train_images", num_train, sun.NUM_OFFICIAL_TEST),
                                ("SUNRGBD-test_images", num_test, 0)):
    for k in range(1, count + 1):
      number = k + offset
      images[number] = _save_rgb(root / folder / f"img-{k:06d}.jpg", rng, h, w, fmt="PNG")
      label = rng.integers(0, 38, size=(h, w)).astype(np.uint8)
      _save_label(root / "sunrgbd_train_test_labels" / f"img-{number:06d}.png", label)
      labels[number] = label
  (root / "test_idx.txt").write_text("".join(f"{k}\n" for k in kept))
  return images, labels


def test_sun_split_mapping_and_size(tmp_path):
  rng = np.random.default_rng(7)
  _, labels = _fake_sun(tmp_path / "sun", rng)
  builder = prepare.prepare_dataset(sun.SunRgbd, str(tmp_path / "sun"), str(tmp_path / "tfds"))
  train, test = _read_split(builder, "train"), _read_split(builder, "test")
  # Test images not in test_idx.txt (1, 3) join training; training images are renumbered.
  assert [ex["image_id"] for ex in train] == ["img-000001", "img-000003", "img-005051",
                                              "img-005052", "img-005053"]
  assert [ex["image_id"] for ex in test] == ["img-000002", "img-000004"]
  for ex in train + test:
    assert ex["image"].shape == (384, 512, 3)
    raw = labels[int(ex["image_id"][4:])]
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)
    assert np.array_equal(ex["label"][..., 0], np.kron(expected, np.ones((32, 32), np.uint8)))
  ids, presence = splits.load_class_presence(prepare.presence_path(builder))
  assert ids == [ex["image_id"] for ex in train] and presence.shape == (5, 37)
  assert base.load_source_record(builder)["max_image_size"] == {"train": [384, 512],
                                                                "test": [384, 512]}


def test_sun_preprocessed_layout_gives_the_same_split(tmp_path):
  root = tmp_path / "sun"
  _fake_sun(root, np.random.default_rng(8))
  release = {k: [ex.image_id for ex in v] for k, v in sun.list_examples(root).items()}
  # What ReCo's sun_preprocess.py does to the folder.
  train_dir, test_dir = root / "SUNRGBD-train_images", root / "SUNRGBD-test_images"
  for k in (3, 2, 1):
    os.rename(train_dir / f"img-{k:06d}.jpg", train_dir / f"img-{k + 5050:06d}.jpg")
  for k in (1, 3):
    os.rename(test_dir / f"img-{k:06d}.jpg", train_dir / f"img-{k:06d}.jpg")
  processed = sun.list_examples(root)
  assert {k: [ex.image_id for ex in v] for k, v in processed.items()} == release
  assert all(ex.image_path.stem == ex.image_id for ex in processed["train"])


def test_sun_bad_layouts(tmp_path):
  root = tmp_path / "sun"
  _fake_sun(root, np.random.default_rng(9))
  (root / "test_idx.txt").write_text("2\n9\n")
  with pytest.raises(base.DataError,
                     match=r"img-000009.jpg \(listed in test_idx.txt\) does not exist"):
    sun.list_examples(root)
  # Only the kept test images but an unprocessed training folder: numbers clash.
  (root / "test_idx.txt").write_text("1\n2\n3\n4\n")
  with pytest.raises(base.DataError, match=r"img-000001.jpg has a test_idx.txt number"):
    sun.list_examples(root)
  (root / "test_idx.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"test list .*test_idx.txt does not exist"):
    sun.list_examples(root)
  (root / "test_idx.txt").write_text("2\n")
  (root / "sunrgbd_train_test_labels" / "img-005052.png").unlink()
  with pytest.raises(base.DataError, match=r"img-000002.jpg has no label .*img-005052.png"):
    sun.list_examples(root)
  os.rename(root / "SUNRGBD-test_images", root / "test")
  with pytest.raises(FileNotFoundError,
                     match=r"test image folder .*SUNRGBD-test_images does not exist"):
    sun.list_examples(root)


# ---- the command ---------------------------------------------------------------------------


def test_prepare_command_and_missing_manual_dir(tmp_path):
  # Run as a user would; camvid is registered independently of this module's datasets.
  rng = np.random.default_rng(10)
  manual = tmp_path / "camvid"
  for split, count in (("train", 2), ("val", 1)):
    for n in range(count):
      _save_rgb(manual / split / f"{split}{n}.png", rng, 6, 8)
      _save_label(manual / f"{split}annot" / f"{split}{n}.png", rng.integers(0, 12, size=(6, 8)))
  cmd = [sys.executable, "-m", "input_pipeline.prepare", "--dataset=camvid",
         f"--manual_dir={manual}", f"--data_dir={tmp_path / 'tfds'}"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}
  done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "splits {'train': 2, 'val': 1}" in done.stdout
  assert list((tmp_path / "tfds").glob("camvid/*/class_presence_train.npz"))
  with pytest.raises(FileNotFoundError,
                     match=r"voc_aug manual_dir folder .*nowhere does not exist"):
    prepare.prepare_dataset(voc.VocAug, str(tmp_path / "nowhere"), str(tmp_path / "tfds"))


def test_preparation_holds_a_per_dataset_lock(tmp_path, monkeypatch):
  """Two runs started together (two seeds on a fresh machine) once raced to rename TFDS's
  incomplete folder: `prepare_dataset` prepares under an exclusive lock of the dataset and
  data_dir, which a second process cannot take until the first is done."""
  import fcntl
  held = []
  real_prepare = prepare.base.prepare

  def probing_prepare(builder, manual_dir):
    fd = os.open(prepare.prepare_lock_path(builder), os.O_RDWR)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      held.append(False)
    except BlockingIOError:
      held.append(True)
    finally:
      os.close(fd)
    return real_prepare(builder, manual_dir)

  monkeypatch.setattr(prepare.base, "prepare", probing_prepare)
  _fake_voc(tmp_path / "pascal", np.random.default_rng(3))
  builder = prepare.prepare_dataset(voc.VocAug, str(tmp_path / "pascal"), str(tmp_path / "tfds"))
  assert held == [True]
  assert os.path.dirname(prepare.prepare_lock_path(builder)) == str(tmp_path / "tfds")
  # Released afterwards.
  fd = os.open(prepare.prepare_lock_path(builder), os.O_RDWR)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.close(fd)
