"""Pascal VOC 2012 with the SBD augmented training set (10582 `train_aug` / 1449 `val`).

manual_dir (the ReCo `dataset/pascal` layout; a `VOCdevkit/VOC2012` folder with the same
content also works, and so does its parent):

    JPEGImages/<id>.jpg             RGB images (17125 in VOC 2012)
    SegmentationClassAug/<id>.png   class-index PNGs (grey or palette), 255 = void, for all
                                    train_aug and val ids (12031 files)
    train_aug.txt                   10582 training ids
    val.txt                         1449 validation ids

`train_aug.txt` / `val.txt` may also live in `ImageSets/Segmentation/`, and may hold
`JPEGImages/<id>.jpg SegmentationClassAug/<id>.png` pairs instead of bare ids (any split-file
format of `input_pipeline.splits`). A label missing from `SegmentationClassAug/` is taken from
the original `SegmentationClass/` if present there.

Splits: `train` = train_aug in the order of `train_aug.txt` (the order ReCo's labelled-subset
selection shuffles), `val` = val.txt. The field's classic splits (92 ... 1464 of the 1464
`train.txt` images) and blended splits (1/16 ... 1/2 of train_aug) are subsets of `train`;
use them through `config.input.labeled_ids` (see `input_pipeline.splits`).

Labels are read with PIL, which returns palette indices for the original palette PNGs (TF's
`decode_png` would return grey levels of the palette colours).
"""
from collections.abc import Callable
import os
import pathlib

import numpy as np

from input_pipeline import splits as split_files
from input_pipeline.builders import base

_IMAGES = "JPEGImages"
_LABELS = "SegmentationClassAug"
_LABELS_FALLBACK = "SegmentationClass"
_ID_LISTS = {"train": "train_aug.txt", "val": "val.txt"}


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """The VOC colour map (`u8[num_colors, 3]`): bits of the index spread over R, G, B."""
  index = np.arange(num_colors)
  palette = np.zeros((num_colors, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      palette[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
  return palette.astype(np.uint8)


def find_root(manual_dir: pathlib.Path) -> pathlib.Path:
  """The folder holding `JPEGImages/`: manual_dir, or its `VOC2012` / `VOCdevkit/VOC2012`."""
  for candidate in (manual_dir, manual_dir / "VOC2012", manual_dir / "VOCdevkit" / "VOC2012"):
    if (candidate / _IMAGES).is_dir():
      return candidate
  raise FileNotFoundError(f"VOC image folder {manual_dir / _IMAGES} does not exist (also looked in "
                          f"VOC2012/ and VOCdevkit/VOC2012/)")


def _id_list(root: pathlib.Path, file_name: str) -> list[str]:
  for candidate in (root / file_name, root / "ImageSets" / "Segmentation" / file_name):
    if candidate.is_file():
      return split_files.read_split_file(str(candidate))
  raise FileNotFoundError(f"VOC id list {root / file_name} does not exist (nor in "
                          f"ImageSets/Segmentation/); {file_name} comes with the SBD augmented set")


def list_examples(manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
  """`{'train': [...], 'val': [...]}` in id-list order; every file is checked to exist."""
  root = find_root(pathlib.Path(manual_dir))
  label_dir = root / _LABELS
  if not label_dir.is_dir():
    raise FileNotFoundError(f"VOC label folder {label_dir} does not exist; it holds the SBD "
                            f"augmented labels (SegmentationClassAug.zip)")
  # One directory listing instead of 2 x 12031 stat calls.
  images = set(os.listdir(root / _IMAGES))
  labels = set(os.listdir(label_dir))
  fallback_dir = root / _LABELS_FALLBACK
  fallback = set(os.listdir(fallback_dir)) if fallback_dir.is_dir() else set()
  out = {}
  for split, file_name in _ID_LISTS.items():
    examples = []
    for image_id in _id_list(root, file_name):
      if f"{image_id}.jpg" not in images:
        raise base.DataError(f"image {root / _IMAGES / image_id}.jpg (listed in {file_name}) "
                             f"does not exist")
      if f"{image_id}.png" in labels:
        label = label_dir / f"{image_id}.png"
      elif f"{image_id}.png" in fallback:
        label = fallback_dir / f"{image_id}.png"
      else:
        raise base.DataError(f"label {label_dir / image_id}.png (listed in {file_name}) "
                             f"does not exist")
      examples.append(base.ExampleFiles(root / _IMAGES / f"{image_id}.jpg", label, image_id))
    out[split] = examples
  return out


def partial_label_sources(
    manual_dir: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """For `input_pipeline.partial_labels`: every PNG of `SegmentationClassAug/`, sorted.

  The official script samples every label file of the folder (train_aug and val) in one RNG
  stream, so the file set, not only the training ids, fixes the draws.
  """
  label_dir = find_root(pathlib.Path(manual_dir)) / _LABELS
  base.require_dir(label_dir, "VOC label")
  ids = sorted(p.stem for p in label_dir.glob("*.png"))
  return ids, lambda image_id: base.read_label(label_dir / f"{image_id}.png")


class VocAug(base.SegmentationBuilder):
  """Pascal VOC 2012 semantic segmentation, SBD-augmented training set (ReCo's `pascal`)."""

  name = "voc_aug"
  CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
                 "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
                 "pottedplant", "sheep", "sofa", "train", "tvmonitor")
  PALETTE = voc_palette(21)
  DESCRIPTION = ("Pascal VOC 2012 segmentation with the SBD augmented labels: train = train_aug "
                 "(10582), val (1449); 21 classes, 255 = void.")
  HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put VOC 2012 JPEGImages/, the SBD augmented labels SegmentationClassAug/ and the id "
      "lists train_aug.txt and val.txt in manual_dir (ReCo's dataset/pascal layout).")

  def _list_examples(self, manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
    return list_examples(manual_dir)
