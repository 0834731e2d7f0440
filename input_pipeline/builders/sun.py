"""SUN RGB-D, 37 classes, with ReCo's 9860 / 475 train / test split, stored at 512x384.

manual_dir holds the 37-class release (`sunrgbd-meta-data`) and ReCo's test list:

    SUNRGBD-train_images/img-<k>.jpg        k = 000001 ... 005285
    SUNRGBD-test_images/img-<k>.jpg         k = 000001 ... 005050
    sunrgbd_train_test_labels/img-<k>.png   k = 000001 ... 010335 (test first, then train)
    test_idx.txt                            the 475 kept test numbers, one a line
                                            (`dataset/sun/test_idx.txt` of the ReCo repository)

Training image k has label 5050 + k; test image k has label k. As in ReCo's
`sun_preprocess.py`, only the 475 test images of `test_idx.txt` stay in `test`, and the other
4575 test images join `train` (9860 in all). A folder already processed by
`sun_preprocess.py` (training images renamed to their label numbers, the other test images
moved into `SUNRGBD-train_images/`) is recognised because its test folder holds exactly the
`test_idx.txt` images, and gives the same dataset.

Image ids are the label file stems, `img-<label number>`, sorted. Labels are `raw - 1` with
raw 0 as void (255), as ReCo's `sun_class_map`. Images are resized to 512x384 with bicubic
interpolation (ReCo's PIL default) and labels with nearest; ReCo re-saves the resized images
as JPEG, this stores them losslessly.

The official labelled-subset selection iterates the training folder in `glob` order (file
system dependent); ids here are sorted, so selections match the official code only up to that
order.
"""
from collections.abc import Callable
import pathlib
import re

import numpy as np
from PIL import Image

from input_pipeline.builders import base
from input_pipeline.builders import cityscapes

SIZE = (384, 512)  # (H, W); sun_preprocess.py: resize((512, 384))
NUM_OFFICIAL_TEST = 5050  # training image k has label number k + 5050
_TRAIN_DIR = "SUNRGBD-train_images"
_TEST_DIR = "SUNRGBD-test_images"
_LABEL_DIR = "sunrgbd_train_test_labels"
_TEST_LIST = "test_idx.txt"
_NAME = re.compile(r"img-(\d+)\.(jpg|png)$")

CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
               "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain",
               "dresser", "pillow", "mirror", "floor_mat", "clothes", "ceiling", "books", "fridge",
               "tv", "paper", "towel", "shower_curtain", "box", "whiteboard", "person",
               "night_stand", "toilet", "sink", "lamp", "bathtub", "bag")
# build_data.py: create_sun_label_colormap.
PALETTE = np.array([
    [148, 65, 137], [255, 116, 69], [86, 156, 137], [202, 179, 158], [155, 99, 235],
    [161, 107, 108], [133, 160, 103], [76, 152, 126], [84, 62, 35], [44, 80, 130],
    [31, 184, 157], [101, 144, 77], [23, 197, 62], [141, 168, 145], [142, 151, 136],
    [115, 201, 77], [100, 216, 255], [57, 156, 36], [88, 108, 129], [105, 129, 112],
    [42, 137, 126], [155, 108, 249], [166, 148, 143], [81, 91, 87], [100, 124, 51],
    [73, 131, 121], [157, 210, 220], [134, 181, 60], [221, 223, 147], [123, 108, 131],
    [161, 66, 179], [163, 221, 160], [31, 146, 98], [99, 121, 30], [49, 89, 240],
    [116, 108, 9], [161, 176, 169],
], np.uint8)


def to_train_ids(raw: np.ndarray) -> np.ndarray:
  """`int[H,W]` raw labels (0 void, 1..37) -> `int[H,W]` 0..36 with 255 = void."""
  raw = np.asarray(raw).astype(np.int64)
  return np.where(raw == 0, base.STORED_VOID, raw - 1)


def _numbered(folder: pathlib.Path, what: str) -> dict[int, pathlib.Path]:
  base.require_dir(folder, what)
  files = {}
  for path in sorted(folder.iterdir()):
    if m := _NAME.match(path.name):
      number = int(m.group(1))
      if number in files:  # img-1.png and img-1.jpg, or img-1.jpg and img-000001.jpg
        raise base.DataError(f"{what} folder {folder} has both {files[number].name} and "
                             f"{path.name}: one image number {number}, two files; remove one")
      files[number] = path
  if not files:
    raise FileNotFoundError(f"{what} folder {folder} has no img-<number>.jpg/png files")
  return files


def _test_numbers(path: pathlib.Path) -> list[int]:
  if not path.is_file():
    raise FileNotFoundError(f"SUN RGB-D test list {path} does not exist; copy dataset/sun/"
                            f"{_TEST_LIST} of the ReCo repository there")
  numbers = []
  for line_no, line in enumerate(path.read_text().splitlines(), start=1):
    if line.strip():
      try:
        numbers.append(int(line))
      except ValueError:
        raise base.DataError(f"{path}:{line_no}: {line.strip()!r} is not an image number") from None
  return numbers


def list_examples(manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
  """`{'train': [...], 'test': [...]}` sorted by label number (see the module docstring)."""
  manual_dir = pathlib.Path(manual_dir)
  train_files = _numbered(manual_dir / _TRAIN_DIR, "SUN RGB-D training image")
  test_files = _numbered(manual_dir / _TEST_DIR, "SUN RGB-D test image")
  labels = _numbered(manual_dir / _LABEL_DIR, "SUN RGB-D label")
  kept = _test_numbers(manual_dir / _TEST_LIST)
  if missing := [k for k in kept if k not in test_files]:
    raise base.DataError(f"test image {manual_dir / _TEST_DIR}/img-{missing[0]:06d}.jpg (listed in "
                         f"{_TEST_LIST}) does not exist ({len(missing)} missing)")
  if set(test_files) == set(kept):  # already processed by sun_preprocess.py
    if clash := sorted(set(train_files) & set(kept)):
      # Release-layout training images are numbered from 1 and so share numbers with test_idx.
      raise base.DataError(
          f"{train_files[clash[0]]} has a {_TEST_LIST} number, but {manual_dir / _TEST_DIR} holds "
          f"only the {_TEST_LIST} images: give the 5050 official test images, or a folder fully "
          f"processed by ReCo's sun_preprocess.py")
    train = dict(train_files)
  else:  # the release layout: renumber training images, move the other test images
    kept_set = set(kept)
    train = {k + NUM_OFFICIAL_TEST: p for k, p in train_files.items()}
    train.update({k: p for k, p in test_files.items() if k not in kept_set})
  test = {k: test_files[k] for k in kept}

  def examples(numbered: dict[int, pathlib.Path]) -> list[base.ExampleFiles]:
    out = []
    for number in sorted(numbered):
      if number not in labels:
        raise base.DataError(f"image {numbered[number]} has no label "
                             f"{manual_dir / _LABEL_DIR}/img-{number:06d}.png")
      out.append(base.ExampleFiles(numbered[number], labels[number], f"img-{number:06d}"))
    return out

  return {"train": examples(train), "test": examples(test)}


def partial_label_sources(
    manual_dir: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """For `input_pipeline.partial_labels`: training labels, mapped, at 512x384."""
  examples = {ex.image_id: ex for ex in list_examples(pathlib.Path(manual_dir))["train"]}

  def read(image_id: str) -> np.ndarray:
    label = to_train_ids(base.read_label(examples[image_id].label_path)).astype(np.uint8)
    return np.asarray(Image.fromarray(label).resize(SIZE[::-1], Image.Resampling.NEAREST))

  return list(examples), read


class SunRgbd(base.SegmentationBuilder):
  """SUN RGB-D 37-class segmentation in ReCo's split and size (ReCo's `sun`)."""

  name = "sun_rgbd"
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  DESCRIPTION = ("SUN RGB-D (RGB only), 37 classes + void (255), ReCo split: train 9860, test "
                 "475; resized to 512x384.")
  HOMEPAGE = "https://rgbd.cs.princeton.edu/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put SUNRGBD-train_images/, SUNRGBD-test_images/ and sunrgbd_train_test_labels/ (the "
      "37-class sunrgbd-meta-data release) and ReCo's dataset/sun/test_idx.txt in manual_dir.")

  def _list_examples(self, manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
    return list_examples(manual_dir)

  def _map_label(self, raw: np.ndarray) -> np.ndarray:
    return to_train_ids(raw)

  def _load_example(self, ex: base.ExampleFiles) -> dict:
    return cityscapes.resize_example(super()._load_example(ex), SIZE)
