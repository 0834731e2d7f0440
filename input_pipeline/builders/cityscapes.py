"""Cityscapes fine annotations (19 train ids), at ReCo's 1024x512 or at full 2048x1024.

manual_dir holds the two official archives *extracted*:

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

(`leftImg8bit_trainvaltest/leftImg8bit/...` and `gtFine_trainvaltest/gtFine/...`, ReCo's
layout, are found too). Image ids are `<city>_<seq>_<frame>`, sorted; splits `train` (2975)
and `val` (500).

Labels: raw labelIds are mapped to the 19 train ids with the table below (cityscapesScripts'
`labels.py`, as ReCo's `cityscapes_class_map`); every other id is void (255).
`CityscapesHalf` (ReCo) resizes images to 1024x512 with bicubic interpolation (ReCo's PIL
default resample; PIL < 7 used nearest) and labels with nearest; `CityscapesFull` keeps
2048x1024.

Why not TFDS's built-in `cityscapes/semantic_segmentation`: it reads the zips but stores full
resolution raw labelIds with a fixed 1024x2048 shape, so every training step would decode a
2048x1024 PNG and downsample it, the id mapping would live in the input pipeline, and a test
needs full-size fake images inside zips. This builder stores exactly what is trained on, is
tested on a tiny fake folder, and shares the validation of `base.SegmentationBuilder`. If
manual_dir holds only the zips, the error says to extract them.

Order differs from ReCo: its preprocessing renames files to integers in `glob` order of the
city folders (file-system dependent), which cannot be reproduced; ids here are sorted.
"""
from collections.abc import Callable
import collections
import io
import pathlib

import numpy as np
from PIL import Image

from input_pipeline.builders import base

# cityscapesScripts labels.py: name, labelId, trainId (255 = void), display colour.
CityscapesLabel = collections.namedtuple("CityscapesLabel", ["name", "id", "train_id", "color"])
LABELS = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)
_TRAIN_LABELS = sorted((l for l in LABELS if l.train_id != 255), key=lambda l: l.train_id)
CLASS_NAMES = tuple(l.name for l in _TRAIN_LABELS)
PALETTE = np.array([l.color for l in _TRAIN_LABELS], np.uint8)
_UNKNOWN = -1
# labelId -> trainId lookup table; ids that are not in LABELS are flagged as unknown.
_ID_TO_TRAIN_ID = np.full(256, _UNKNOWN, np.int64)
for _l in LABELS:
  _ID_TO_TRAIN_ID[_l.id] = _l.train_id

HALF_SIZE = (512, 1024)  # (H, W), build_data.py / cityscapes_preprocess.py: resize((1024, 512))
FULL_SIZE = (1024, 2048)
_SPLITS = ("train", "val")
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


class UnknownLabelIdError(base.DataError):
  """A label map holds values that are not Cityscapes labelIds."""


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """`int[H,W]` labelIds -> `u8[H,W]` train ids, 255 = void.

  Raises:
    UnknownLabelIdError: a value is not a labelId of the table (0-33).
  """
  label_ids = np.asarray(label_ids)
  if label_ids.min(initial=0) < 0 or label_ids.max(initial=0) > 255:
    raise UnknownLabelIdError("values outside 0-255 are not Cityscapes labelIds")
  mapped = _ID_TO_TRAIN_ID[label_ids]
  if (mapped == _UNKNOWN).any():
    bad = np.unique(label_ids[mapped == _UNKNOWN]).tolist()
    raise UnknownLabelIdError(f"values {bad[:10]} are not Cityscapes labelIds (0-33)")
  return mapped.astype(np.uint8)


def resize_example(example: dict, size_hw: tuple[int, int]) -> dict:
  """Resizes a `base.SegmentationBuilder` example: image bicubic, label nearest (PIL).

  Args:
    example: {'image': encoded bytes or `u8[H,W,3]`, 'label': `u8[H,W,1]`, 'image_id'}.
    size_hw: target (H, W).

  Returns:
    The example, unchanged if it already has that size, else with `u8` arrays.
  """
  height, width = size_hw
  image = example["image"]
  image = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.fromarray(image)
  if image.size == (width, height):
    return example
  image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
  label = Image.fromarray(example["label"][..., 0]).resize((width, height),
                                                           Image.Resampling.NEAREST)
  return {**example, "image": np.asarray(image), "label": np.asarray(label)[..., None]}


def find_roots(manual_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(folder with `leftImg8bit/`'s splits, folder with `gtFine/`'s splits)."""
  found = []
  for folder, archive in (("leftImg8bit", "leftImg8bit_trainvaltest"),
                          ("gtFine", "gtFine_trainvaltest")):
    for candidate in (manual_dir / folder, manual_dir / archive / folder):
      if candidate.is_dir():
        found.append(candidate)
        break
    else:
      zips = [z for z in _ARCHIVES if (manual_dir / z).is_file()]
      hint = f"; extract {', '.join(zips)} there" if zips else ""
      raise FileNotFoundError(f"Cityscapes folder {manual_dir / folder} does not exist{hint}")
  return found[0], found[1]


def list_examples(manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
  """`{'train': [...], 'val': [...]}` sorted by id; images and labels must pair up."""
  image_root, label_root = find_roots(pathlib.Path(manual_dir))
  out = {}
  for split in _SPLITS:
    image_dir = base.require_dir(image_root / split, "Cityscapes image")
    label_dir = base.require_dir(label_root / split, "Cityscapes label")
    images = {p.name[:-len(_IMAGE_SUFFIX)]: p for p in image_dir.glob(f"*/*{_IMAGE_SUFFIX}")}
    labels = {p.name[:-len(_LABEL_SUFFIX)]: p for p in label_dir.glob(f"*/*{_LABEL_SUFFIX}")}
    if not images:
      raise FileNotFoundError(f"Cityscapes image folder {image_dir} has no <city>/*{_IMAGE_SUFFIX}")
    if missing := sorted(images.keys() - labels.keys()):
      raise base.DataError(f"image {images[missing[0]]} has no label "
                           f"{missing[0]}{_LABEL_SUFFIX} in {label_dir} ({len(missing)} unpaired)")
    if missing := sorted(labels.keys() - images.keys()):
      raise base.DataError(f"label {labels[missing[0]]} has no image in {image_dir} "
                           f"({len(missing)} unpaired)")
    out[split] = [base.ExampleFiles(images[k], labels[k], k) for k in sorted(images)]
  return out


def partial_label_sources(manual_dir: str, resolution: str = "half"
                          ) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """For `input_pipeline.partial_labels`: training train-id maps at the prepared size."""
  if resolution not in ("half", "full"):
    raise ValueError(f"Cityscapes resolution {resolution!r}; expected 'half' or 'full'")
  height, width = HALF_SIZE if resolution == "half" else FULL_SIZE
  examples = {ex.image_id: ex for ex in list_examples(pathlib.Path(manual_dir))["train"]}

  def read(image_id: str) -> np.ndarray:
    path = examples[image_id].label_path
    try:
      label = to_train_ids(base.read_label(path))
    except UnknownLabelIdError as e:
      raise base.DataError(f"label {path}: {e}") from None
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))

  return list(examples), read


class _Cityscapes(base.SegmentationBuilder, skip_registration=True):
  """Shared code; subclasses fix the stored size."""

  SIZE: tuple[int, int] = FULL_SIZE
  CLASS_NAMES = CLASS_NAMES
  PALETTE = PALETTE
  HOMEPAGE = "https://www.cityscapes-dataset.com/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (registration needed) "
      "and extract both into manual_dir, giving leftImg8bit/ and gtFine/.")

  def _list_examples(self, manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
    return list_examples(manual_dir)

  def _map_label(self, raw: np.ndarray) -> np.ndarray:
    return to_train_ids(raw)

  def _load_example(self, ex: base.ExampleFiles) -> dict:
    try:
      example = super()._load_example(ex)
    except UnknownLabelIdError as e:  # `_map_label` does not know the file; name it here
      raise base.DataError(f"label {ex.label_path}: {e}") from None
    return resize_example(example, self.SIZE)


class CityscapesHalf(_Cityscapes):
  """Cityscapes at 1024x512 (ReCo's stored size)."""

  name = "cityscapes_half"
  SIZE = HALF_SIZE
  DESCRIPTION = ("Cityscapes fine annotations, 19 classes + void (255), resized to 1024x512 "
                 "(image bicubic, label nearest) as in ReCo; train 2975, val 500.")


class CityscapesFull(_Cityscapes):
  """Cityscapes at the original 2048x1024."""

  name = "cityscapes_full"
  SIZE = FULL_SIZE
  DESCRIPTION = ("Cityscapes fine annotations, 19 classes + void (255), at 2048x1024; train "
                 "2975, val 500.")
