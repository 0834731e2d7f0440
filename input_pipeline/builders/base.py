"""A reusable TFDS builder for semantic segmentation read from a local ("manual") directory.

A dataset is a few lines on top of `SegmentationBuilder`: class names and palette, a method that
lists `(image_path, label_path, image_id)` per split found in `manual_dir`, and optionally a
raw-label mapping. This base class validates everything and writes the TFDS records:

* the manual directory must exist and not be empty; `pair_by_stem` checks an image folder
  against its label folder (missing/empty folder, an image without a label or the reverse);
* images keep their encoded bytes when they are RGB PNG/JPEG (no re-encoding), otherwise PIL
  converts them to RGB;
* labels are decoded with PIL, never `tf.io.decode_png`: TF applies a palette PNG's colours
  instead of returning the class indices (design.md §2 item 19);
* two files of one folder with the same stem (`x.png` and `x.jpg`) are an error, not one id;
* every image and label is decoded in full when it is prepared (an image stored as its own
  bytes with TF's decoder, the one training uses), so a truncated or corrupt file fails
  preparation naming the file instead of failing a later training step;
* image and label sizes must match, and mapped label values must lie in [0, C) or be void (255).

Every problem raises a one-line error naming the folder, file or values at fault.

A prepared dataset remembers what it was made from: `prepare` writes `SOURCE_RECORD` (JSON)
into the version folder next to TFDS's files:

    {"format": 1, "dataset": <builder name>, "version": "1.0.0",
     "manual_dir": <absolute, resolved manual_dir>,
     "splits": {<split>: [<image id>, ...]},               # the listing, in split order
     "files": {<path relative to manual_dir>: [<size in bytes>, <mtime in ns>], ...},
     "max_image_size": {<split>: [<max height>, <max width>]}}   # of the stored images

`files` holds every image and label file the listing names (a stat each, no hashing of
contents). On the next `prepare` the record is compared with the source: if files were added,
removed or changed, the split listing changed (e.g. a new `val/`), or `manual_dir` now names a
different folder, the dataset is prepared again from `manual_dir`; without a usable
`manual_dir` but with the recorded folder still there and changed, `prepare` stops with one
line naming the changed files. A dataset prepared before records existed (no record) is used
as it is, with a one-line warning.
"""
import abc
from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import inspect
import json
import os
import pathlib
import re
import shutil
import struct
from typing import ClassVar
import zlib

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from reco_jax.constants import STORED_VOID


SOURCE_RECORD = "source_fingerprint.json"  # in the prepared version folder
_RECORD_FORMAT = 1
# Errors PIL raises for a truncated or corrupt file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error)
_NAMES_SHOWN = 3  # file names a message lists before "..."


class DataError(ValueError):
  """A problem with the raw data in the manual directory."""


class LabelValueError(DataError):
  """Raised by `SegmentationBuilder._map_label` for raw values it does not accept.

  The base class prefixes the label file's path to the message.
  """


def _one_line(error: BaseException | str) -> str:
  """The first line of an error's message, without TF's op decorations."""
  text = error if isinstance(error, str) else (getattr(error, "message", None) or str(error))
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*", "", str(text))
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


@dataclasses.dataclass(frozen=True)
class ExampleFiles:
  """One raw example: where its image and label live, and its id (unique within a split)."""
  image_path: pathlib.Path
  label_path: pathlib.Path
  image_id: str


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  """Returns `path` if it is a non-empty directory, else raises naming it."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{what} folder {path} does not exist")
  if not any(path.iterdir()):
    raise FileNotFoundError(f"{what} folder {path} is empty")
  return path


def pair_by_stem(image_dir: pathlib.Path, label_dir: pathlib.Path, *,
                 image_suffixes: Sequence[str] = (".png", ".jpg", ".jpeg"),
                 label_suffixes: Sequence[str] = (".png",)) -> list[ExampleFiles]:
  """Pairs the images of one folder with the labels of another by file stem (the id).

  Args:
    image_dir: folder of images.
    label_dir: folder of label maps with the same stems.
    image_suffixes, label_suffixes: file name endings taken into account (case-insensitive).

  Returns:
    The pairs, sorted by id.

  Raises:
    FileNotFoundError: a folder is missing or empty, or has no file with the expected suffix.
    DataError: an image has no label or a label has no image (the first such file is named),
      or two files of one folder share a stem (`x.png` and `x.jpg`).
  """

  def by_stem(folder, suffixes, what):
    require_dir(folder, what)
    files = {}
    for p in sorted(folder.iterdir()):
      if p.is_file() and p.suffix.lower() in suffixes:
        if p.stem in files:
          raise DataError(f"{what} folder {folder} has both {files[p.stem].name} and {p.name}: "
                          f"one id {p.stem!r}, two files; remove one")
        files[p.stem] = p
    if not files:
      raise FileNotFoundError(f"{what} folder {folder} has no {'/'.join(suffixes)} files")
    return files

  images = by_stem(pathlib.Path(image_dir), image_suffixes, "image")
  labels = by_stem(pathlib.Path(label_dir), label_suffixes, "label")
  if missing := sorted(images.keys() - labels.keys()):
    raise DataError(f"image {images[missing[0]]} has no label in {label_dir} "
                    f"({len(missing)} image(s) without a label)")
  if missing := sorted(labels.keys() - images.keys()):
    raise DataError(f"label {labels[missing[0]]} has no image in {image_dir} "
                    f"({len(missing)} label(s) without an image)")
  return [ExampleFiles(images[k], labels[k], k) for k in sorted(images)]


def read_label(path: pathlib.Path) -> np.ndarray:
  """Raw label values of a single-channel (L, P, I;16, I) image as a 2-D integer array.

  The file is decoded in full; a truncated or corrupt one raises a one-line DataError naming it.
  """
  try:
    with Image.open(path) as im:
      if im.mode not in ("L", "P", "I;16", "I"):
        raise DataError(f"label {path} has PIL mode {im.mode}; expected a single-channel "
                        "class-index image (mode L or P)")
      im.load()
      return np.asarray(im)
  except _DECODE_ERRORS as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"label {path} cannot be decoded: {_one_line(e)}") from None


def _image_feature(path: pathlib.Path) -> tuple[object, tuple[int, int]]:
  """The value to store for an image, and its (H, W), after decoding the whole image.

  An RGB PNG/JPEG is stored as its own bytes (no re-encoding) and checked with TF's decoder,
  the one training reads it with; any other image is converted to RGB by PIL.
  """
  try:
    with Image.open(path) as im:
      if im.mode != "RGB" or im.format not in ("PNG", "JPEG"):
        array = np.asarray(im.convert("RGB"))
        return array, array.shape[:2]
    data = path.read_bytes()
  except _DECODE_ERRORS as e:
    raise DataError(f"image {path} cannot be decoded: {_one_line(e)}") from None
  try:
    shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
  except tf.errors.OpError as e:
    raise DataError(f"image {path} cannot be decoded: {_one_line(e)}") from None
  return data, (int(shape[0]), int(shape[1]))


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Base builder: features {'image': u8[H,W,3], 'label': u8[H,W,1] (255 void), 'image_id'}.

  Subclasses set `name`, `CLASS_NAMES`, `PALETTE`, `MANUAL_DOWNLOAD_INSTRUCTIONS` and implement
  `_list_examples`; they override `_map_label` when raw values are not already train ids.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
  PALETTE: ClassVar[np.ndarray] = np.zeros((0, 3), np.uint8)  # u8[C,3] display colours
  DESCRIPTION: ClassVar[str] = ""
  HOMEPAGE: ClassVar[str | None] = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves a packaged builder's file through `importlib_resources`, which
    # etils 1.15 no longer installs (ModuleNotFoundError). The plain file path is all it needs.
    return epath.Path(inspect.getfile(cls))

  @property
  def num_classes(self) -> int:
    return len(self.CLASS_NAMES)

  @abc.abstractmethod
  def _list_examples(self, manual_dir: pathlib.Path) -> Mapping[str, Sequence[ExampleFiles]]:
    """Lists the examples of every split present in `manual_dir` (split name -> examples)."""

  def _map_label(self, raw: np.ndarray) -> np.ndarray:
    """Maps raw label values (`int[H,W]`) to train ids in [0, C) with 255 = void.

    Raises `LabelValueError` for raw values the dataset does not define.
    """
    return raw

  def _checked_splits(self, manual_dir: pathlib.Path) -> Mapping[str, Sequence[ExampleFiles]]:
    """`_list_examples` with every split non-empty and its ids unique."""
    splits = self._list_examples(manual_dir)
    if not splits:
      raise FileNotFoundError(f"no {self.name} split found in {manual_dir}")
    for split, examples in splits.items():
      if not examples:
        raise FileNotFoundError(f"{self.name} split {split!r} in {manual_dir} has no examples")
      ids = [ex.image_id for ex in examples]
      if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{self.name} split {split!r} lists image id {dup!r} twice")
    return splits

  def source_fingerprint(self, manual_dir: str | pathlib.Path) -> dict:
    """What the data prepared from `manual_dir` would be made of (cheap: a listing and stats).

    Returns:
      {"manual_dir": resolved path, "splits": {split: [ids]}, "files": {relative path:
      [size, mtime_ns]}} over every image and label file the listing names.
    """
    manual_dir = pathlib.Path(manual_dir)
    splits = self._checked_splits(manual_dir)
    files = {}
    for examples in splits.values():
      for ex in examples:
        for path in (ex.image_path, ex.label_path):
          rel = pathlib.PurePath(os.path.relpath(path, manual_dir)).as_posix()
          if rel not in files:
            try:
              st = os.stat(path)
            except FileNotFoundError:
              raise DataError(f"{path} (example {ex.image_id!r}) does not exist") from None
            files[rel] = [st.st_size, st.st_mtime_ns]
    return {"manual_dir": str(manual_dir.resolve()),
            "splits": {split: [ex.image_id for ex in examples]
                       for split, examples in splits.items()},
            "files": files}

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) instead of dataset_info_from_configs: the latter reads metadata
    # files from the builder's package directory, which an ordinary module does not have.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Image(shape=(None, None, 1)),
            "image_id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        # Keep the listing order (sorted ids) so that reading order is predictable.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = require_dir(pathlib.Path(dl_manager.manual_dir), f"{self.name} manual_dir")
    splits = self._checked_splits(manual_dir)
    # (max H, max W) of the stored images per split, filled while the examples are generated.
    self.max_image_sizes = {}
    return {split: self._generate_examples(examples, split) for split, examples in splits.items()}

  def _generate_examples(self, examples: Sequence[ExampleFiles],
                         split: str | None = None) -> Iterator[tuple[str, dict]]:
    for ex in examples:
      example = self._load_example(ex)
      if split is not None:
        height, width = example["label"].shape[:2]  # the stored size (after any resize)
        old_h, old_w = self.max_image_sizes.get(split, (0, 0))
        self.max_image_sizes[split] = (max(old_h, int(height)), max(old_w, int(width)))
      yield ex.image_id, example

  def _load_example(self, ex: ExampleFiles) -> dict:
    """Reads and validates one example; every failure names the file."""
    for path in (ex.image_path, ex.label_path):
      if not path.is_file():
        raise DataError(f"{path} (example {ex.image_id!r}) does not exist")
    image, (height, width) = _image_feature(ex.image_path)
    raw = read_label(ex.label_path)
    if raw.shape != (height, width):
      raise DataError(f"label {ex.label_path} is {raw.shape[0]}x{raw.shape[1]} (HxW) but image "
                      f"{ex.image_path} is {height}x{width}")
    try:
      label = np.asarray(self._map_label(raw))
    except LabelValueError as e:  # `_map_label` does not know the file; name it here
      raise DataError(f"label {ex.label_path}: {e}") from None
    bad = np.unique(label[(label >= self.num_classes) & (label != STORED_VOID) | (label < 0)])
    if bad.size:
      raise DataError(f"label {ex.label_path} has values {bad.tolist()[:10]} outside "
                      f"[0, {self.num_classes}) and not void ({STORED_VOID})")
    return {"image": image, "label": label.astype(np.uint8)[..., None], "image_id": ex.image_id}


def source_record_path(builder: tfds.core.DatasetBuilder) -> pathlib.Path:
  """Where `prepare` records the source of a prepared dataset (in its version folder)."""
  return pathlib.Path(os.fspath(builder.data_dir)) / SOURCE_RECORD


def load_source_record(builder: tfds.core.DatasetBuilder) -> dict | None:
  """The prepared dataset's source record (see the module docstring), or None if it has none."""
  path = source_record_path(builder)
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise DataError(f"source record {path} cannot be read ({_one_line(e)}); delete "
                    f"{builder.data_dir} to prepare {builder.name} again") from None
  if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
    raise DataError(f"source record {path} has an unknown format; delete {builder.data_dir} to "
                    f"prepare {builder.name} again")
  return record


def describe_changes(recorded: Mapping, current: Mapping) -> str | None:
  """One line saying how `current` (a `source_fingerprint`) differs from `recorded`; None if not."""

  def names(paths):
    shown = ", ".join(paths[:_NAMES_SHOWN])
    return shown + (", ..." if len(paths) > _NAMES_SHOWN else "")

  parts = []
  if recorded["manual_dir"] != current["manual_dir"]:
    parts.append(f"it was prepared from {recorded['manual_dir']}, not {current['manual_dir']}")
  old_files, new_files = recorded["files"], current["files"]
  changed = sorted(p for p in old_files.keys() & new_files.keys()
                   if list(old_files[p]) != list(new_files[p]))
  for what, paths in (("changed", changed),
                      ("added", sorted(new_files.keys() - old_files.keys())),
                      ("removed", sorted(old_files.keys() - new_files.keys()))):
    if paths:
      parts.append(f"{len(paths)} file(s) {what} ({names(paths)})")
  old_splits, new_splits = recorded["splits"], current["splits"]
  if added := sorted(new_splits.keys() - old_splits.keys()):
    parts.append(f"split(s) {', '.join(added)} added")
  if removed := sorted(old_splits.keys() - new_splits.keys()):
    parts.append(f"split(s) {', '.join(removed)} removed")
  if reordered := sorted(s for s in old_splits.keys() & new_splits.keys()
                         if list(old_splits[s]) != list(new_splits[s])):
    parts.append(f"the image list of split(s) {', '.join(reordered)} changed")
  return "; ".join(parts) or None


def _write_json(path: pathlib.Path, value: dict) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(value))
  os.replace(tmp, path)


def _build(builder: SegmentationBuilder, manual_dir: pathlib.Path) -> None:
  """Writes the TFDS records from `manual_dir` and then the source record."""
  # Fingerprinted before reading: a file changed while preparing shows up on the next check.
  fingerprint = builder.source_fingerprint(manual_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  sizes = getattr(builder, "max_image_sizes", {})
  _write_json(source_record_path(builder), {
      "format": _RECORD_FORMAT, "dataset": builder.name, "version": str(builder.version),
      **fingerprint,
      "max_image_size": {split: list(size) for split, size in sorted(sizes.items())}})


def prepare(builder: SegmentationBuilder, manual_dir: str | pathlib.Path | None) -> None:
  """Prepares `builder` from `manual_dir`, or checks that its prepared data is still current.

  Prepared data whose source record matches `manual_dir` (same folder, same files, sizes and
  modification times, same split listing) is used as it is. If it does not match, the version
  folder is deleted and prepared again from `manual_dir`. Without a usable `manual_dir` (unset
  or missing), the folder recorded at preparation is checked if it still exists: changed, it
  stops with one line naming the changes; gone, the prepared data is used. Data prepared
  before source records existed is used with a one-line warning.

  Raises:
    FileNotFoundError: the data is not prepared and `manual_dir` is unset, missing or empty.
    DataError: a problem with the raw data (naming the file), or prepared data whose recorded
      source changed while no `manual_dir` is given to prepare it again.
  """
  manual = pathlib.Path(manual_dir) if manual_dir else None
  if not builder.is_prepared():
    if manual is None:
      raise FileNotFoundError(f"{builder.name} is not prepared in {builder.data_dir_root} and "
                              "input.manual_dir is not set")
    require_dir(manual, f"{builder.name} manual_dir")
    _build(builder, manual)
    return
  record = load_source_record(builder)
  if record is None:
    logging.warning("%s in %s has no %s (prepared by an older version): its raw data is not "
                    "checked for changes; delete the folder to prepare it again",
                    builder.name, builder.data_dir, SOURCE_RECORD)
    return
  if manual is not None and manual.is_dir():
    changes = describe_changes(record, builder.source_fingerprint(manual))
    if changes is None:
      return
    logging.warning("%s in %s does not match %s (%s): preparing it again", builder.name,
                    builder.data_dir, manual, changes)
    shutil.rmtree(os.fspath(builder.data_dir))
    _build(builder, manual)
    return
  recorded = pathlib.Path(record["manual_dir"])
  if manual is not None:
    logging.warning("input.manual_dir %s does not exist; using %s as prepared from %s",
                    manual, builder.data_dir, recorded)
  if not recorded.is_dir():
    return  # the raw data is gone: the prepared copy is all there is
  try:
    changes = describe_changes(record, builder.source_fingerprint(recorded))
  except (FileNotFoundError, DataError) as e:
    changes = f"it cannot be listed any more: {_one_line(e)}"
  if changes is not None:
    raise DataError(f"{builder.name} prepared in {builder.data_dir} no longer matches its raw "
                    f"data in {recorded}: {changes}; set input.manual_dir={recorded} to prepare "
                    f"it again")
