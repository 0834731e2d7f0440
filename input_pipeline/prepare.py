"""Prepares a dataset once: TFDS records plus the class-presence table of its training split.

Usage:
  python -m input_pipeline.prepare --dataset=voc --manual_dir=/data/pascal [--data_dir=DIR]

`--dataset` is a name registered in `input_pipeline.builders` (voc, cityscapes,
cityscapes_full, sun, camvid, ...). The raw folder layout each builder expects is in its module
docstring; a wrong layout fails with a message naming the missing folder or file, and every
image and label is decoded in full, so a truncated or corrupt file fails here naming it.

Preparing an already prepared dataset checks it against its raw data (the source record
`source_fingerprint.json` in the version folder: file list, sizes, modification times, the
split listing, the folder; see `input_pipeline.builders.base`) and prepares it again when they
differ: a repaired file, a new `val/` split or a different `--manual_dir` is picked up. It
also (re)writes a missing class-presence table. The record also holds the largest image size
of each split (`input_pipeline.datasets.max_image_size`).

The class-presence table (`bool[N, C]`, which classes each training image contains, rows in
the split's order) is what ReCo's labelled-subset selection reads
(`input_pipeline.splits`); it is stored as `class_presence_train.npz` in the prepared
dataset's version folder, so runs select their labelled images without touching the raw data.
"""
from collections.abc import Sequence
import contextlib
import fcntl
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import builders
from input_pipeline import splits
from input_pipeline.builders import base

TRAIN_SPLIT = "train"


def presence_path(builder: tfds.core.DatasetBuilder, split: str = TRAIN_SPLIT) -> str:
  """Where the class-presence table of `split` lives (inside the prepared version folder)."""
  return splits.class_presence_path(os.fspath(builder.data_dir), split)


def compute_class_presence(builder: base.SegmentationBuilder,
                           split: str = TRAIN_SPLIT) -> tuple[list[str], np.ndarray]:
  """`(ids, bool[N, C])` of a prepared split, in the split's (= listing) order."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda ex: (ex["image_id"], ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
  ids, rows = [], []
  for image_id, label in ds.as_numpy_iterator():
    ids.append(image_id.decode())
    try:
      rows.append(splits.class_presence(label, builder.num_classes))
    except ValueError as e:
      raise ValueError(f"{builder.name} {split} image {ids[-1]!r}: {e}") from None
  return ids, np.stack(rows) if rows else np.zeros((0, builder.num_classes), bool)


def class_presence_for(builder: base.SegmentationBuilder, split: str = TRAIN_SPLIT, *,
                       write: bool = True) -> tuple[list[str], np.ndarray]:
  """The stored table of a prepared builder, computed (and stored if `write`) when missing.

  `write=False` is for processes other than 0 of a multi-process run: they compute the same
  table in memory rather than race process 0 for the file.
  """
  path = presence_path(builder, split)
  if not os.path.exists(path):
    ids, presence = compute_class_presence(builder, split)
    if not write:
      return ids, presence
    splits.save_class_presence(path, ids, presence)
  return splits.load_class_presence(path)


def prepare_dataset(builder_cls: type[base.SegmentationBuilder], manual_dir: str | None,
                    data_dir: str | None = None) -> base.SegmentationBuilder:
  """Builds the TFDS records (unless present and current) and the training class-presence table.

  Prepared records whose source record no longer matches `manual_dir` are rebuilt (see
  `base.prepare`), and with them the class-presence table.
  """
  builder = builder_cls(data_dir=data_dir)
  # Two runs started together on one machine (two seeds, say) would both build the records
  # and the second rename of TFDS's incomplete folder fails: the first prepares, the other
  # waits, then finds the dataset prepared.
  with prepare_lock(builder):
    base.prepare(builder, manual_dir)
    if TRAIN_SPLIT in builder.info.splits:
      class_presence_for(builder)
  return builder


def prepare_lock_path(builder: tfds.core.DatasetBuilder) -> str:
  """`<data_dir>/<dataset name>.prepare.lock`: one lock per dataset and data_dir."""
  return os.path.join(os.fspath(builder.data_dir_root), f"{builder.name}.prepare.lock")


@contextlib.contextmanager
def prepare_lock(builder: tfds.core.DatasetBuilder):
  """Holds an exclusive `flock` on `prepare_lock_path(builder)` (released by the kernel if the
  process dies). Processes of one machine serialise; on a shared network file system flock may
  not be honoured: there, a multi-host run prepares on process 0 only (datasets.prepare_for_run)."""
  path = prepare_lock_path(builder)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  tf.config.set_visible_devices([], "GPU")  # preparing needs no accelerator memory
  builder = prepare_dataset(builders.get_builder_class(f.dataset), f.manual_dir, f.data_dir)
  counts = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"{f.dataset}: prepared {builder.name} in {builder.data_dir} with splits {counts}")
  print(f"use: --config.input.dataset={f.dataset} --config.input.data_dir={builder.data_dir_root}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("dataset", None, f"Registered dataset name ({', '.join(builders.names())}).")
  flags.DEFINE_string("manual_dir", None, "Raw dataset folder in the layout the builder documents.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir for the prepared records "
                      "(default ~/tensorflow_datasets).")
  flags.mark_flags_as_required(["dataset"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
