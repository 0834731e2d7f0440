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
* image and label sizes must match, and mapped label values must lie in [0, C) or be void (255).

Every problem raises a one-line error naming the folder, file or values at fault.
"""
import abc
from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import inspect
import pathlib
from typing import ClassVar

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

STORED_VOID = 255  # matches reco_jax.labels.STORED_VOID


class DataError(ValueError):
  """A problem with the raw data in the manual directory."""


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
    DataError: an image has no label or a label has no image (the first such file is named).
  """

  def by_stem(folder, suffixes, what):
    require_dir(folder, what)
    files = {p.stem: p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix.lower() in suffixes}
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
  """Raw label values of a single-channel (L, P, I;16, I) image as a 2-D integer array."""
  with Image.open(path) as im:
    if im.mode not in ("L", "P", "I;16", "I"):
      raise DataError(f"label {path} has PIL mode {im.mode}; expected a single-channel class-index "
                      "image (mode L or P)")
    return np.asarray(im)


def _image_feature(path: pathlib.Path) -> tuple[object, tuple[int, int]]:
  """The value to store for an image, and its (H, W). Reads only the header when possible."""
  with Image.open(path) as im:
    width, height = im.size
    if im.mode == "RGB" and im.format in ("PNG", "JPEG"):
      # TFDS stores the file's bytes as they are: no decode/encode round trip at prepare time.
      return path.read_bytes(), (height, width)
    return np.asarray(im.convert("RGB")), (height, width)


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
    """Maps raw label values (`int[H,W]`) to train ids in [0, C) with 255 = void."""
    return raw

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
    return {split: self._generate_examples(examples) for split, examples in splits.items()}

  def _generate_examples(self, examples: Sequence[ExampleFiles]) -> Iterator[tuple[str, dict]]:
    for ex in examples:
      yield ex.image_id, self._load_example(ex)

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
    label = np.asarray(self._map_label(raw))
    bad = np.unique(label[(label >= self.num_classes) & (label != STORED_VOID) | (label < 0)])
    if bad.size:
      raise DataError(f"label {ex.label_path} has values {bad.tolist()[:10]} outside "
                      f"[0, {self.num_classes}) and not void ({STORED_VOID})")
    return {"image": image, "label": label.astype(np.uint8)[..., None], "image_id": ex.image_id}


def prepare(builder: SegmentationBuilder, manual_dir: str | pathlib.Path | None) -> None:
  """Prepares `builder` from `manual_dir` unless its data already exists (then a no-op).

  Raises:
    FileNotFoundError: the data is not prepared and `manual_dir` is unset, missing or empty.
  """
  if builder.is_prepared():
    return
  if manual_dir is None:
    raise FileNotFoundError(f"{builder.name} is not prepared in {builder.data_dir_root} and "
                            "input.manual_dir is not set")
  require_dir(pathlib.Path(manual_dir), f"{builder.name} manual_dir")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
