"""Which training images are labelled: ReCo's subset selection and the field's split files.

Four ways to choose the labelled images of a run, in order of precedence
(`labeled_ids_for_run`, the one place that decides):

1. **Explicit ids** (`config.input.labeled_ids`): image ids, or paths to split files
   (entries ending in `.txt`, read with `read_split_file`). This is how the field's standard
   splits are used, e.g. `labeled_ids=('splits/pascal/92/labeled.txt',)`.
2. **A previous selection in the workdir** (`labeled_ids.txt`, written by steps 1 and 3): a
   resumed run reads it back instead of selecting again. Its header records the request, and
   a mismatch with the current config is an error rather than a silent reuse.
3. **`config.input.num_labeled == 0`**: every training image is labelled (and, in
   semi-supervised runs, also unlabelled: the official `BuildDataLoader(dataset, 0)`).
4. **Selection of `num_labeled > 0` images**, seeded with `config.seed` and written to the
   workdir, by the dataset's rule in `SELECTION_RULES`: ReCo's class-balanced rule
   (`select_labeled_subset`: VOC, Cityscapes, and CamVid, which has no official rule; see
   below) or its SUN variant (`select_labeled_subset_sun`). Datasets without a rule (the
   synthetic one) draw uniformly at random (`select_random_subset`).

The selection reads only which classes each image contains, so it runs on a class-presence
table (`bool[N, C]`, rows in the dataset's official id order) that `input_pipeline.prepare`
computes once from the label maps and stores next to the prepared dataset
(`save_class_presence` / `load_class_presence`). The official code instead opens each
candidate's mask inside the loop; the result is the same.

CamVid has no official ReCo protocol. It uses the VOC rule with the VOC threshold (3 classes;
nearly every CamVid frame has more), because for the small label budgets of semi-supervised
benchmarks a uniform draw can miss its rare classes (pedestrian, bicyclist, sign) entirely.
`config.input.min_classes` overrides the threshold as for VOC.

Split-file format (`read_split_file`)
-------------------------------------
Plain text, one image per line; blank lines and lines starting with `#` are skipped. Only the
first whitespace-separated field of a line is used, and the image id is the file name of that
field without directory, extension and a Cityscapes suffix (`_leftImg8bit`,
`_gtFine_labelIds`, `_gtFine_labelTrainIds`, ...). So all of these lines give the same kind
of id:

    2007_000033                                                    (U2PL, bare ids)
    JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png   (UniMatch, CPS)
    leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png gtFine/train/jena/...
    jena_000078_000019                                             (bare Cityscapes id)

Ids are `2007_000033` for VOC, `jena_000078_000019` for Cityscapes and `img-005051` for
SUN RGB-D (the label file's stem), i.e. the `image_id` feature of the prepared datasets.
The classic VOC splits (92/183/366/732/1464 images of the 1464-image `train.txt`), the
blended splits (1/16, 1/8, 1/4, 1/2 of the 10582-image `train_aug`) and the Cityscapes
1/16-1/2 splits are all such files; every id must exist in the prepared training split.
"""
from collections.abc import Callable, Sequence
import os
import random

import numpy as np

# build_data.py: get_pascal_idx / get_cityscapes_idx, "unique_num >= 3" and ">= 12".
VOC_MIN_CLASSES = 3
CITYSCAPES_MIN_CLASSES = 12
# Not official (see the module docstring): the VOC rule and threshold.
CAMVID_MIN_CLASSES = VOC_MIN_CLASSES
# Per dataset: (number of classes, class threshold or None for the SUN variant). Datasets
# not listed here draw their labelled subset uniformly at random.
SELECTION_RULES = {
    "voc": (21, VOC_MIN_CLASSES),
    "cityscapes": (19, CITYSCAPES_MIN_CLASSES),
    "cityscapes_full": (19, CITYSCAPES_MIN_CLASSES),
    "sun": (37, None),
    "camvid": (11, CAMVID_MIN_CLASSES),
}

LABELED_IDS_FILE = "labeled_ids.txt"
CLASS_PRESENCE_FILE = "class_presence_{split}.npz"
# Suffixes that Cityscapes file names carry after the id (longest first).
_ID_SUFFIXES = ("_gtFine_labelTrainIds", "_gtFine_labelIds", "_gtFine_instanceIds",
                "_gtFine_color", "_gtFine_polygons", "_leftImg8bit")


class SelectionError(ValueError):
  """The requested labelled subset cannot be selected."""


def class_presence(label: np.ndarray, num_classes: int, void: int = 255) -> np.ndarray:
  """Which classes occur in one stored label map.

  Args:
    label: `u8[H,W]` (or any integer shape) class indices, `void` for unlabelled pixels.
    num_classes: C.
    void: the stored void value.

  Returns:
    `bool[C]`.

  Raises:
    ValueError: a value is neither a class index nor `void`.
  """
  values = np.unique(label)
  values = values[values != void]
  bad = values[(values < 0) | (values >= num_classes)]
  if bad.size:
    raise ValueError(f"label value {int(bad[0])} is outside [0, {num_classes}) and not void {void}")
  present = np.zeros(num_classes, bool)
  present[values] = True
  return present


def _check_selection_args(ids: Sequence[str], presence: np.ndarray, num_labeled: int) -> None:
  if presence.ndim != 2 or presence.shape[0] != len(ids):
    raise ValueError(f"class presence has shape {presence.shape}; "
                     f"expected ({len(ids)}, num_classes)")
  seen = set()
  for image_id in ids:
    if image_id in seen:
      raise ValueError(f"image id {image_id!r} occurs twice in the training id list")
    seen.add(image_id)
  if not 0 <= num_labeled <= len(ids):
    raise SelectionError(f"num_labeled={num_labeled} is not in [0, {len(ids)}] "
                         f"(the training set size)")


def _complement(ids: Sequence[str], labeled: Sequence[str]) -> list[str]:
  chosen = set(labeled)
  return [i for i in ids if i not in chosen]


def select_labeled_subset(ids: Sequence[str], presence: np.ndarray, num_labeled: int,
                          min_classes: int, seed: int) -> tuple[list[str], list[str]]:
  """ReCo's class-balanced labelled subset for VOC and Cityscapes.

  Exactly `build_data.py: get_pascal_idx / get_cityscapes_idx` after `random.seed(seed)`:
  shuffle a copy of `ids` with Python's `random`, then pop candidates from the end. A
  candidate is accepted if it has at least `min_classes` classes and contains one of the
  least-counted classes so far (any class for the first image); rejected candidates are
  retried once the list runs out.

  Unlike the official loop, which spins forever when no remaining image can be accepted,
  this raises `SelectionError`. That happens exactly when every remaining candidate has
  been rejected since the last acceptance: the least-counted classes only change on an
  acceptance, so each later pass would reject them all again.

  Args:
    ids: training ids in the official order (`train_aug.txt` order for VOC).
    presence: `bool[N, C]`, `presence[i, c]` = class c occurs in image `ids[i]`.
    num_labeled: N_l. 0 means every image is labelled (`BuildDataLoader(dataset, 0)`).
    min_classes: the official `unique_num` threshold (3 VOC, 12 Cityscapes).
    seed: the `random.seed` value (the README uses 0, 1, 2).

  Returns:
    `(labelled ids in selection order, unlabelled ids in the original order)`. With
    `num_labeled == 0` both are all ids.
  """
  presence = np.asarray(presence, bool)
  _check_selection_args(ids, presence, num_labeled)
  if num_labeled == 0:
    return list(ids), list(ids)
  row = {image_id: n for n, image_id in enumerate(ids)}
  num_classes = presence.shape[1]
  # `random.seed(s); random.shuffle(x)` draws from the module's Random instance; a private
  # Random(seed) gives the same permutation without touching global state.
  pool = list(ids)
  random.Random(seed).shuffle(pool)
  counter = np.zeros(num_classes, np.int64)
  fill = np.ones(num_classes, bool)  # the least-counted classes
  labeled, saved = [], []
  rejected_since_accept = set()
  while len(labeled) < num_labeled:
    if not pool:
      pool, saved = saved, []
    image_id = pool.pop()
    present = presence[row[image_id]]
    num_present = int(present.sum())
    first_ok = not labeled and num_present >= min_classes
    if first_ok or (bool((present & fill).any()) and num_present >= min_classes):
      labeled.append(image_id)
      counter += present
      rejected_since_accept.clear()
    else:
      saved.append(image_id)
      rejected_since_accept.add(image_id)
      if len(rejected_since_accept) == len(pool) + len(saved):
        least = np.flatnonzero(fill).tolist()
        raise SelectionError(
            f"labelled-subset selection is stuck at {len(labeled)} of {num_labeled} images: "
            f"none of the {len(saved) + len(pool)} remaining images has >= {min_classes} "
            f"classes including one of the least-seen classes {least}; lower the class "
            f"threshold (min_classes, the official unique_num) or num_labeled")
    fill = counter == counter.min()
  return labeled, _complement(ids, labeled)


def select_labeled_subset_sun(ids: Sequence[str], presence: np.ndarray, num_labeled: int,
                              seed: int) -> tuple[list[str], list[str]]:
  """ReCo's labelled subset for SUN RGB-D (`build_data.py: get_sun_idx`).

  After shuffling `ids` with Python's `random`, every class gets the list of images that
  contain it (in shuffled order). Each step pops an image from the list of the lowest-index
  least-counted class; a class whose list is exhausted is ignored from then on. Repeated
  images are skipped, and counts are updated only when an image is added.

  A quirk is kept: if class 0's list is empty at the first step, the official `idx` is still
  the loop variable left over from building the lists, i.e. the *last* shuffled image, and that
  image is added first. Where the official code crashes, this raises or recovers instead: if
  every least-counted class is exhausted at once (the official `label_fill[0]` raises
  IndexError), the least-counted classes are recomputed over the remaining classes; when every
  class is exhausted, `SelectionError` is raised. Wherever the official code finishes, the
  result is the same.

  Args:
    ids: training ids in the official order.
    presence: `bool[N, 37]`.
    num_labeled: N_l; 0 means every image is labelled.
    seed: the `random.seed` value.

  Returns:
    `(labelled ids in selection order, unlabelled ids in the original order)`.
  """
  presence = np.asarray(presence, bool)
  _check_selection_args(ids, presence, num_labeled)
  if num_labeled == 0:
    return list(ids), list(ids)
  row = {image_id: n for n, image_id in enumerate(ids)}
  num_classes = presence.shape[1]
  shuffled = list(ids)
  random.Random(seed).shuffle(shuffled)
  by_class = [[] for _ in range(num_classes)]
  for image_id in shuffled:
    for c in np.flatnonzero(presence[row[image_id]]):
      by_class[c].append(image_id)
  counter = np.zeros(num_classes, np.int64)
  ignored = np.zeros(num_classes, bool)  # classes whose image lists are exhausted
  fill = list(range(num_classes))
  labeled, labeled_set = [], set()
  image_id = shuffled[-1]  # the official `idx` after the list-building loop
  while len(labeled) < num_labeled:
    if not fill:
      if ignored.all():
        raise SelectionError(
            f"SUN labelled-subset selection is stuck at {len(labeled)} of {num_labeled} "
            f"images: every image that contains a class is already labelled; lower num_labeled")
      fill = np.flatnonzero((counter == counter[~ignored].min()) & ~ignored).tolist()
    if by_class[fill[0]]:
      image_id = by_class[fill[0]].pop()
    else:
      ignored[fill[0]] = True
    if image_id not in labeled_set:
      labeled.append(image_id)
      labeled_set.add(image_id)
      counter += presence[row[image_id]]
      if ignored.all():
        fill = []
      else:
        fill = np.flatnonzero(counter == counter[~ignored].min()).tolist()
    fill = [c for c in fill if not ignored[c]]
  return labeled, _complement(ids, labeled)


def select_random_subset(ids: Sequence[str], num_labeled: int,
                         seed: int) -> tuple[list[str], list[str]]:
  """A uniformly random labelled subset, for datasets without a rule in `SELECTION_RULES`.

  `num_labeled` ids drawn without replacement by `np.random.default_rng(seed)`.

  Returns:
    `(labelled ids, unlabelled ids)`, both in the order of `ids`. With `num_labeled == 0`
    both are all ids.
  """
  _check_selection_args(ids, np.zeros((len(ids), 0), bool), num_labeled)
  if num_labeled == 0:
    return list(ids), list(ids)
  chosen = np.random.default_rng(seed).choice(len(ids), num_labeled, replace=False)
  labeled = [ids[k] for k in sorted(chosen)]
  return labeled, _complement(ids, labeled)


def select_for_dataset(dataset: str, ids: Sequence[str], presence: np.ndarray | None,
                       num_labeled: int, seed: int,
                       min_classes: int | None = None) -> tuple[list[str], list[str]]:
  """The labelled subset by `dataset`'s rule in `SELECTION_RULES` (else uniformly at random).

  Args:
    dataset: the `config.input.dataset` name.
    ids: training ids in the official order.
    presence: `bool[N, C]` rows of `ids`; not read by the random rule (may be None there).
    num_labeled: N_l; 0 means every image is labelled.
    seed: the run's seed.
    min_classes: overrides the class threshold of the VOC/Cityscapes/CamVid rule (the README
      lowers it for larger label counts); an error for rules without a threshold.

  Returns:
    `(labelled ids, unlabelled ids)` as the rule's function returns them.
  """
  num_classes, default_min = SELECTION_RULES.get(dataset, (None, None))
  if min_classes is not None and default_min is None:
    rule = "the SUN rule" if dataset in SELECTION_RULES else "a uniform random draw"
    raise ValueError(f"input.min_classes={min_classes} does not apply to {dataset!r}: its "
                     f"labelled subset is {rule}, which has no class threshold")
  if dataset not in SELECTION_RULES:
    return select_random_subset(ids, num_labeled, seed)
  if presence is None:
    raise ValueError(f"selecting {num_labeled} labelled {dataset} images needs the "
                     f"class-presence table")
  presence = np.asarray(presence, bool)
  if presence.shape[-1] != num_classes:
    raise ValueError(f"class presence for {dataset!r} has {presence.shape[-1]} classes; "
                     f"expected {num_classes}")
  if default_min is None:
    return select_labeled_subset_sun(ids, presence, num_labeled, seed)
  threshold = default_min if min_classes is None else min_classes
  return select_labeled_subset(ids, presence, num_labeled, threshold, seed)


# ---- split files ---------------------------------------------------------------------------


def id_from_entry(entry: str) -> str:
  """The image id of one split-file field: basename, no extension, no Cityscapes suffix."""
  name = os.path.basename(entry.strip())
  stem, ext = os.path.splitext(name)
  if ext.lower() in (".png", ".jpg", ".jpeg", ".txt", ".json", ".mat"):
    name = stem
  for suffix in _ID_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def read_split_file(path: str, known_ids: Sequence[str] | None = None) -> list[str]:
  """Reads a split file (format in the module docstring) into image ids, in file order.

  Args:
    path: the text file.
    known_ids: if given, every id must be one of these (e.g. the training split's ids).

  Raises:
    FileNotFoundError: no such file.
    ValueError: empty file, a repeated id, or an id not in `known_ids` (with the line number).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"split file {path} does not exist")
  known = None if known_ids is None else set(known_ids)
  ids, seen = [], {}
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      image_id = id_from_entry(line.split()[0])
      if image_id in seen:
        raise ValueError(f"{path}:{line_no}: id {image_id!r} repeats line {seen[image_id]}")
      if known is not None and image_id not in known:
        raise ValueError(f"{path}:{line_no}: id {image_id!r} is not in the training split "
                         f"({len(known)} ids, e.g. {next(iter(known), '')!r})")
      seen[image_id] = line_no
      ids.append(image_id)
  if not ids:
    raise ValueError(f"split file {path} lists no image ids")
  return ids


def write_ids(path: str, ids: Sequence[str], header: dict[str, object] | None = None) -> None:
  """Writes ids one per line, after `# key=value` header lines (atomically)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for key, value in (header or {}).items():
      f.write(f"# {key}={value}\n")
    f.write("".join(f"{i}\n" for i in ids))
  os.replace(tmp, path)


def read_ids_with_header(path: str) -> tuple[list[str], dict[str, str]]:
  """Reads a file written by `write_ids`: `(ids, header)`."""
  header, ids = {}, []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("#"):
        key, _, value = line[1:].strip().partition("=")
        header[key.strip()] = value.strip()
      elif line:
        ids.append(line)
  return ids, header


# ---- class-presence tables -----------------------------------------------------------------


def class_presence_path(dataset_dir: str, split: str = "train") -> str:
  """Where `prepare` stores the table: inside the prepared TFDS dataset's directory."""
  return os.path.join(dataset_dir, CLASS_PRESENCE_FILE.format(split=split))


def save_class_presence(path: str, ids: Sequence[str], presence: np.ndarray) -> None:
  """Stores `ids` (official order) and `bool[N, C]` presence."""
  presence = np.asarray(presence, bool)
  if presence.shape[0] != len(ids):
    raise ValueError(f"{len(ids)} ids but class presence has {presence.shape[0]} rows")
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, ids=np.asarray(list(ids), dtype=str), presence=presence)
  os.replace(tmp, path)


def load_class_presence(path: str) -> tuple[list[str], np.ndarray]:
  """Reads `(ids, bool[N, C])` written by `save_class_presence`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"class-presence table {path} not found; prepare the dataset with "
        f"`python -m input_pipeline.prepare` (it writes this file)")
  with np.load(path, allow_pickle=False) as data:
    return [str(i) for i in data["ids"]], np.asarray(data["presence"], bool)


def class_presence_table(ids: Sequence[str], read_label: Callable[[str], np.ndarray],
                         num_classes: int) -> np.ndarray:
  """`bool[N, C]` for stored label maps read one by one with `read_label(id)`."""
  table = np.zeros((len(ids), num_classes), bool)
  for n, image_id in enumerate(ids):
    try:
      table[n] = class_presence(read_label(image_id), num_classes)
    except ValueError as e:
      raise ValueError(f"image {image_id!r}: {e}") from None
  return table


# ---- what a run uses -----------------------------------------------------------------------


def labeled_ids_for_run(*, dataset: str, train_ids: Sequence[str], num_labeled: int, seed: int,
                        labeled_ids: Sequence[str] = (), workdir: str | None = None,
                        presence: np.ndarray | Callable[[], np.ndarray] | None = None,
                        min_classes: int | None = None, write: bool = True) -> list[str]:
  """The labelled ids of a run (precedence in the module docstring).

  Args:
    dataset: the `config.input.dataset` name (selects the rule).
    train_ids: all training ids in the official order (the class-presence table's order).
    num_labeled: `config.input.num_labeled`.
    seed: `config.seed`.
    labeled_ids: `config.input.labeled_ids`; entries ending in `.txt` are split files.
    workdir: where `labeled_ids.txt` is written / read back; None writes and reads nothing.
    presence: `bool[N, C]` rows of `train_ids`, or a function returning it (called only when
      a rule that reads it actually selects, so a resumed run never computes the table).
    min_classes: overrides the class threshold of the rule (`select_for_dataset`).
    write: write `labeled_ids.txt` (False in all processes but one of a multi-process run;
      the others obtain the same ids deterministically).

  Returns:
    Labelled ids: in file/config order for explicit ids, in selection order for a selection,
    all of `train_ids` (in order) when nothing restricts them.

  Raises:
    ValueError: an unknown id, a `labeled_ids.txt` recorded for a different request, or a
      request the dataset's rule cannot satisfy (`SelectionError`).
  """
  path = None if workdir is None else os.path.join(workdir, LABELED_IDS_FILE)
  recorded = None
  if path is not None and os.path.exists(path):
    recorded = read_ids_with_header(path)
  if labeled_ids:
    out = _resolve_labeled_ids(dataset, train_ids, labeled_ids)
    header = {"dataset": dataset, "source": "config.input.labeled_ids"}
    if recorded is not None and (recorded[1] != header or recorded[0] != out):
      raise ValueError(f"{path} records a different labelled set than config.input.labeled_ids "
                       f"({len(recorded[0])} vs {len(out)} ids, recorded {recorded[1]}); use a "
                       f"new workdir or delete the file")
    if path is not None and write and recorded is None:
      write_ids(path, out, header)
    return out
  request = {"dataset": dataset, "num_labeled": num_labeled, "seed": seed,
             "min_classes": "default" if min_classes is None else min_classes}
  if recorded is not None:
    ids, header = recorded
    wanted = {k: str(v) for k, v in request.items()}
    if header != wanted:
      raise ValueError(f"{path} was written for {header}, but this run asks for {wanted}; "
                       f"use a new workdir or delete the file")
    known = set(train_ids)
    if unknown := [i for i in ids if i not in known]:
      raise ValueError(f"{path} lists id {unknown[0]!r}, which is not in the {dataset} "
                       f"training split")
    return ids
  if num_labeled == 0:
    return list(train_ids)
  if callable(presence):
    presence = presence() if dataset in SELECTION_RULES else None
  labeled, _ = select_for_dataset(dataset, train_ids, presence, num_labeled, seed, min_classes)
  if path is not None and write:
    write_ids(path, labeled, request)
  return labeled


def _resolve_labeled_ids(dataset: str, train_ids: Sequence[str],
                         labeled_ids: Sequence[str]) -> list[str]:
  """Ids and split files -> ids in order, duplicates dropped, every id checked."""
  out, seen = [], set()
  for entry in labeled_ids:
    new = read_split_file(entry, train_ids) if entry.endswith(".txt") else [entry]
    for image_id in new:
      if image_id not in seen:
        seen.add(image_id)
        out.append(image_id)
  known = set(train_ids)
  if missing := [i for i in out if i not in known]:
    raise ValueError(f"config.input.labeled_ids: id {missing[0]!r} is not in the {dataset} "
                     f"training split")
  return out
