"""Datasets by name, and the host-local train/eval iterators the trainer consumes.

`input.dataset` names either the embedded synthetic dataset or a TFDS builder registered in
`input_pipeline.builders` (prepared once from `input.manual_dir` into `input.data_dir`, see
`prepare_for_run`).

Each process reads only its own share of a split and yields host-local numpy batches; the
trainer turns them into global arrays (`reco_jax.parallel.to_global_batch`).

Training streams. A method names the streams it reads, each a `Stream(subset, augment)`
(e.g. "labeled": the labelled subset with the official augmentation). A stream is infinite:
its example at position k (= step * local_batch_size + slot) is example `draw_index(k)` of
this process's share of the subset, transformed with the per-position seed (key, k).
`input.sampling` chooses the draws: "replacement" (default) i.i.d. uniform over the whole
share, as the official `RandomSampler(replacement=True)`; "permutation" a fresh permutation
of the share per epoch. Draws and augmentation are stateless functions of (seed, process
index, stream name, position), so a stream reproduces exactly, the streams of a process are
independent, and a resumed run (`start_step`) starts at position start_step *
local_batch_size without reading, decoding or augmenting the consumed examples. The share is
read once into memory still encoded (TFDS image/label bytes, as a tf.data cache would hold
them), so a draw is a lookup; decoding and augmentation happen per draw.

Eval streams are finite, padded to a fixed image size and to the same number of batches in
every process, with a `mask` for the padding.

The labelled subset of a training split follows `splits.labeled_ids_for_run` (explicit ids or
split files, then `<workdir>/labeled_ids.txt` of an earlier run, then the dataset's selection
rule on the class-presence table stored by `input_pipeline.prepare`). In "partial labels, full
dataset" mode (`input.partial_labels_dir`) every training image is in both subsets and its
label is read from `<partial_labels_dir>/<image_id>.png`; eval always uses the full labels.

Multi-process runs: every process calls `prepare_for_run(config.input, process_index=...,
barrier=...)` before it creates an iterator. Process 0 prepares a TFDS dataset and the
class-presence table of its training split if they are missing (reading `input.manual_dir`),
then every process waits on the barrier, so no process reads a dataset that is still being
written. `input.data_dir` must therefore be one directory that every process sees (or be
prepared beforehand on every host). Without that call, process 0 still prepares on demand
and the other processes fail naming `prepare_for_run`. Only process 0 writes
`labeled_ids.txt`; the others compute the same ids.
"""
import abc
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import math
import os
import re
import zlib

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import builders
from input_pipeline import crop_pairs
from input_pipeline import partial_labels
from input_pipeline import prepare as prepare_lib
from input_pipeline import preprocess
from input_pipeline import splits
from input_pipeline import synthetic
from input_pipeline.builders import base
from reco_jax import constants

SYNTHETIC = "synthetic"
SUBSETS = ("labeled", "unlabeled")
STREAM_KINDS = ("single", "pair")
SAMPLINGS = ("replacement", "permutation")
# What a stream seed is for (`stream_seed`): part of the seed, so that the draws and the
# augmentation of one stream are independent of each other.
SEED_PURPOSES = ("order", "augment")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Stream:
  """What one training stream reads.

  subset: "labeled" or "unlabeled" (the training images not in the labelled subset, or every
    image when all are labelled).
  augment: True for the official labelled augmentation (scale, crop, jitter, blur, flip from
    `config.input`); False for crop/pad only (the official unlabelled loader).
  kind: "single" (default): one crop per example, {'image', 'label'}. "pair": CAC's two
    overlapping crops per example (`crop_pairs.pair_transform` with the settings `pair`):
    {'image1', 'image2', 'label1', 'label2', 'ul1', 'br1', 'ul2', 'br2', 'flip'}; `augment`
    is then unused (each view has its own photometric augmentation and flip).
  pair: a `crop_pairs.PairSettings` when kind == "pair".
  """
  subset: str
  augment: bool
  kind: str = "single"
  pair: crop_pairs.PairSettings | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
  """What the model and the metrics need to know about a dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray  # u8[C,3] display colours


# ------------------------------------------------------------------------------------------
# Sources: where the raw examples of a split come from.
# ------------------------------------------------------------------------------------------


class _Source(abc.ABC):
  """Raw examples of one dataset, read per process.

  `read` yields the dataset's own (possibly still encoded) examples, cheap to keep in memory;
  `decode` turns one into (u8[H,W,3] image, u8[H,W,1] label with 255 = void, tf.string id).
  """

  info: DatasetInfo
  # Whether `read` yields encoded PNG labels (then a partial label replaces them as PNG bytes).
  labels_encoded: bool

  @abc.abstractmethod
  def splits(self) -> tuple[str, ...]:
    """Names of the available splits."""

  @abc.abstractmethod
  def image_ids(self, split: str) -> list[str]:
    """All ids of `split`, in the split's fixed order."""

  @abc.abstractmethod
  def num_examples(self, split: str, process_index: int, process_count: int) -> int:
    """Size of the share of `split` that `read(split, process_index, process_count)` yields."""

  @abc.abstractmethod
  def read(self, split: str, *, process_index: int, process_count: int,
           image_ids: Sequence[str] | None = None) -> tf.data.Dataset:
    """This process's share of `split`, or exactly `image_ids` if given (already per process)."""

  @abc.abstractmethod
  def decode(self, example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(u8[H,W,3] image, u8[H,W,1] label, tf.string image id) of one `read` example."""

  def class_presence(self, split: str) -> np.ndarray:
    """`bool[N, C]`: the classes of each image of `split`, rows in `image_ids(split)` order."""
    raise ValueError(f"{self.info.name} has no class-presence table (split {split!r})")

  def check_split(self, split: str) -> None:
    if split not in self.splits():
      raise ValueError(f"{self.info.name} has no split {split!r}; available: "
                       f"{', '.join(self.splits())}")


class _SyntheticSource(_Source):
  """The embedded procedural dataset; examples are generated when they are read."""

  labels_encoded = False

  def __init__(self, input_config: ml_collections.ConfigDict):
    cfg = input_config.synthetic
    self.info = get_dataset_info(input_config)
    self._seed = int(cfg.get("seed", 0))
    self._image_size = tuple(int(x) for x in cfg.image_size)
    self._sizes = {"train": int(cfg.num_train), "val": int(cfg.num_val)}

  def splits(self):
    return tuple(self._sizes)

  def image_ids(self, split):
    self.check_split(split)
    return [synthetic.image_id(split, i) for i in range(self._sizes[split])]

  def num_examples(self, split, process_index, process_count):
    self.check_split(split)
    return len(np.array_split(np.arange(self._sizes[split]), process_count)[process_index])

  def read(self, split, *, process_index, process_count, image_ids=None):
    self.check_split(split)
    if image_ids is None:
      indices = np.array_split(np.arange(self._sizes[split]), process_count)[process_index]
    else:
      indices = np.array([synthetic.index_from_id(split, i) for i in image_ids], np.int64)
    h, w = self._image_size

    def generate(index):
      image, label = synthetic.generate_example(self._seed, split, int(index), (h, w))
      return image, label[..., None], synthetic.image_id(split, int(index)).encode()

    def to_example(index):
      image, label, image_id = tf.numpy_function(generate, [index],
                                                 [tf.uint8, tf.uint8, tf.string], stateful=False)
      image.set_shape([h, w, 3])
      label.set_shape([h, w, 1])
      image_id.set_shape([])
      return {"image": image, "label": label, "image_id": image_id}

    return tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64)).map(to_example)

  def decode(self, example):
    return example["image"], example["label"], example["image_id"]


class _TfdsSource(_Source):
  """A dataset prepared by one of `input_pipeline.builders` (read without decoding).

  The ids of a split come from its class-presence table (written by `prepare`, in the split's
  order; computed once from the labels if missing), so listing them reads no image records.
  """

  labels_encoded = True

  def __init__(self, builder_cls: type[base.SegmentationBuilder],
               input_config: ml_collections.ConfigDict, process_index: int):
    builder = builder_cls(data_dir=input_config.data_dir)
    if not builder.is_prepared():
      if process_index != 0:
        raise FileNotFoundError(
            f"{builder.name} is not prepared in {builder.data_dir_root}; call "
            "input_pipeline.datasets.prepare_for_run(config.input, ...) in every process "
            "before creating iterators")
      base.prepare(builder, input_config.manual_dir)
    self._builder = builder
    self._process_index = process_index
    self.info = get_dataset_info(input_config)
    self._tables = {}

  def splits(self):
    return tuple(self._builder.info.splits.keys())

  def _as_dataset(self, split: str) -> tf.data.Dataset:
    # Encoded bytes: caching them costs little memory, and decoding happens in the map.
    skip = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    return self._builder.as_dataset(split=split, shuffle_files=False, decoders=skip,
                                    read_config=tfds.ReadConfig(try_autocache=False))

  def _table(self, split: str) -> tuple[list[str], np.ndarray]:
    self.check_split(split)
    if split not in self._tables:
      self._tables[split] = prepare_lib.class_presence_for(self._builder, split,
                                                           write=self._process_index == 0)
    return self._tables[split]

  def image_ids(self, split):
    return self._table(split)[0]

  def class_presence(self, split):
    return self._table(split)[1]

  def num_examples(self, split, process_index, process_count):
    self.check_split(split)
    subsplit = tfds.even_splits(split, process_count)[process_index]
    return self._builder.info.splits[subsplit].num_examples

  def read(self, split, *, process_index, process_count, image_ids=None):
    self.check_split(split)
    if image_ids is None:
      return self._as_dataset(tfds.even_splits(split, process_count)[process_index])
    # Keep examples by position in the split (O(1) per example, unlike comparing id strings).
    position = {image_id: k for k, image_id in enumerate(self.image_ids(split))}
    keep = np.zeros(len(position), bool)
    keep[[position[i] for i in image_ids]] = True
    keep = tf.constant(keep)
    ds = self._as_dataset(split).enumerate().filter(lambda k, ex: keep[k])
    return ds.map(lambda k, ex: ex)

  def decode(self, example):
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    # Labels were written by TFDS from PIL-decoded class indices as plain grey PNGs (no
    # palette), so decode_png returns the stored values.
    label = tf.io.decode_png(example["label"], channels=1)
    return image, label, example["image_id"]


def _get_source(input_config: ml_collections.ConfigDict, process_index: int = 0) -> _Source:
  name = input_config.dataset
  if name == SYNTHETIC:
    return _SyntheticSource(input_config)
  return _TfdsSource(builders.get_builder_class(_check_name(name)), input_config, process_index)


def _check_name(name: str) -> str:
  if name != SYNTHETIC and name not in builders.names():
    raise ValueError(f"unknown input.dataset {name!r}; known: "
                     f"{', '.join((SYNTHETIC,) + builders.names())}")
  return name


# ------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------


def get_dataset_info(input_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Class names and palette of `input_config.dataset` (reads no data)."""
  name = _check_name(input_config.dataset)
  if name == SYNTHETIC:
    names, palette = synthetic.CLASS_NAMES, synthetic.PALETTE
  else:
    cls = builders.get_builder_class(name)
    names, palette = tuple(cls.CLASS_NAMES), cls.PALETTE
  return DatasetInfo(name=name, num_classes=len(names), class_names=names,
                     palette=np.asarray(palette, np.uint8))


def prepare(input_config: ml_collections.ConfigDict) -> None:
  """Prepares a TFDS dataset and its class-presence tables if needed (no-op for synthetic).

  Reads `input_config.manual_dir` the first time; afterwards checks the prepared data against
  it and prepares it again if the raw data or the folder changed (`base.prepare`).
  """
  name = _check_name(input_config.dataset)
  if name != SYNTHETIC:
    builder = prepare_lib.prepare_dataset(builders.get_builder_class(name),
                                          input_config.manual_dir, input_config.data_dir)
    if input_config.train_split in builder.info.splits:
      prepare_lib.class_presence_for(builder, input_config.train_split)


def max_image_size(input_config: ml_collections.ConfigDict,
                   split: str) -> tuple[int, int] | None:
  """(max height, max width) of the images of `split`: the smallest `eval_size` that holds them.

  Synthetic data: its configured image size. A TFDS dataset: the size recorded when it was
  prepared (`input_pipeline.builders.base.SOURCE_RECORD`); None if it is not prepared yet, was
  prepared before sizes were recorded, or has no such split. Reads no image.
  """
  name = _check_name(input_config.dataset)
  if name == SYNTHETIC:
    height, width = (int(x) for x in input_config.synthetic.image_size)
    return height, width
  builder = builders.get_builder_class(name)(data_dir=input_config.data_dir)
  if not builder.is_prepared():
    return None
  record = base.load_source_record(builder)
  size = None if record is None else record.get("max_image_size", {}).get(split)
  return None if size is None else (int(size[0]), int(size[1]))


def prepare_for_run(input_config: ml_collections.ConfigDict, *, process_index: int,
                    barrier: Callable[[], None]) -> None:
  """Makes the dataset readable by every process of a run; call it in every process.

  Process 0 prepares a TFDS dataset and its training class-presence table if needed
  (`prepare`; nothing to do for synthetic data); then every process calls `barrier()`, so
  that none reads before process 0 has finished writing.

  Args:
    input_config: `config.input`.
    process_index: this process (`jax.process_index()`).
    barrier: blocks until every process has called it, e.g.
      `lambda: multihost_utils.sync_global_devices("dataset prepared")`.
  """
  if process_index == 0:
    prepare(input_config)
  barrier()


def _training_subsets(source: _Source, input_config: ml_collections.ConfigDict, *, seed: int,
                      workdir: str | None, process_index: int
                      ) -> tuple[list[str] | None, list[str] | None]:
  """The (labelled, unlabelled) ids of the training split; None means every image.

  The labelled ids are `splits.labeled_ids_for_run`'s, the one place that chooses them (see
  the module docstring); the unlabelled ones are the rest, in the split's order. When every
  image is labelled (the official `num_labels = 0`, and always in partial-label mode) both
  are None: every image is in both streams.

  Raises:
    ValueError: bad ids, a conflicting `labeled_ids.txt`, an impossible selection, or a
      labelled subset requested in partial-label mode.
  """
  split = input_config.train_split
  source.check_split(split)
  labeled_ids, num_labeled = tuple(input_config.labeled_ids), int(input_config.num_labeled)
  partial_dir = input_config.get("partial_labels_dir")
  if partial_dir and (num_labeled or labeled_ids):
    # train_semisup_partial.py: BuildDataLoader(dataset, 0), sparse labels on every image.
    raise ValueError(
        f"input.partial_labels_dir={partial_dir} (partial labels, full dataset) labels every "
        f"training image sparsely, so input.num_labeled must be 0 and input.labeled_ids empty "
        f"(got num_labeled={num_labeled}, {len(labeled_ids)} labeled_ids)")
  train_ids = source.image_ids(split)
  labeled = splits.labeled_ids_for_run(
      dataset=source.info.name, train_ids=train_ids, num_labeled=num_labeled, seed=seed,
      labeled_ids=labeled_ids, workdir=workdir, presence=lambda: source.class_presence(split),
      min_classes=input_config.get("min_classes"), write=process_index == 0)
  if len(labeled) == len(train_ids):
    return None, None
  chosen = set(labeled)
  return labeled, [i for i in train_ids if i not in chosen]


def ids_for_process(ids: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """Round-robin share of `ids` for one process; never empty.

  With fewer ids than processes, process p gets id p mod n, so every process still has data.
  """
  n = len(ids)
  return [ids[j % n] for j in range(process_index, max(n, process_count), process_count)]


def stream_seed(seed: int, process_index: int, stream_name: str, purpose: str) -> int:
  """A 63-bit seed for one (training seed, process, stream name, purpose) tuple.

  `purpose` is one of SEED_PURPOSES: "order" keys `draw_index`, "augment" the per-example
  augmentation seeds. The name enters through crc32, not Python's `hash()`, which differs
  between interpreter runs (PYTHONHASHSEED) and would break resuming and reproducibility.
  """
  if purpose not in SEED_PURPOSES:
    raise ValueError(f"unknown seed purpose {purpose!r}; known: {', '.join(SEED_PURPOSES)}")
  entropy = [seed % 2**64, process_index, zlib.crc32(stream_name.encode("utf-8")),
             SEED_PURPOSES.index(purpose)]
  state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
  return int((int(state[0]) << 31) ^ int(state[1]))


def draw_index(position: tf.Tensor, *, num_examples: int, sampling: str, key: int) -> tf.Tensor:
  """The example a stream draws at `position`: a stateless function of (key, position).

  Args:
    position: i64[] position in the stream (step * local_batch_size + slot).
    num_examples: size of the process's share of the stream's subset.
    sampling: `input.sampling`. "replacement": i.i.d. uniform over [0, num_examples), as the
      official RandomSampler(replacement=True). "permutation": epoch e = position //
      num_examples walks a permutation of [0, num_examples) drawn afresh for each epoch.
    key: the stream's order seed (`stream_seed(..., "order")`).

  Returns:
    i64[] in [0, num_examples).
  """
  _check_sampling(sampling)
  position = tf.convert_to_tensor(position, tf.int64)
  key = tf.constant(key, tf.int64)
  if sampling == "replacement":
    return tf.random.stateless_uniform([], seed=tf.stack([key, position]), minval=0,
                                       maxval=num_examples, dtype=tf.int64)
  # index_shuffle is a seeded bijection of [0, max_index]: the permutation of an epoch is
  # never materialised, so any position (e.g. a resume point) costs O(1).
  epoch, offset = position // num_examples, position % num_examples
  return tf.random.experimental.index_shuffle(
      offset, seed=tf.stack([key, epoch]), max_index=tf.constant(num_examples - 1, tf.int64))


def _check_sampling(sampling: str) -> None:
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown input.sampling {sampling!r}; known: {', '.join(SAMPLINGS)}")


def _options(input_config: ml_collections.ConfigDict) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Half the cores by default (2 on this 2-core box): tf.data shares the host with XLA.
  default_threads = max(2, (os.cpu_count() or 2) // 2)
  threads = int(input_config.get("num_threads", 0)) or default_threads
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return options


# Positions whose examples one Python call fetches (`_Examples.fetch`): amortises the call.
_FETCH_BLOCK = 64


@dataclasses.dataclass(frozen=True, eq=False)
class _Examples:
  """A finite set of raw examples held in memory, fetched by index inside tf.data."""
  size: int
  # i64[n] indices in [0, size) -> the raw examples, stacked: {key: [n, ...]}.
  fetch: Callable[[tf.Tensor], dict[str, tf.Tensor]]


def _load_examples(ds: tf.data.Dataset) -> _Examples:
  """Reads a finite dataset of dicts with static shapes once into memory, indexable.

  The examples stay as `ds` yields them (encoded bytes for TFDS sources), i.e. the memory of
  a `ds.cache()`. They are kept as Python objects and fetched through a numpy_function, not
  packed into one tensor: packing would hold a second copy of the split while it is built.
  """
  spec = ds.element_spec
  keys = sorted(spec)
  columns = {k: [] for k in keys}
  for example in ds.as_numpy_iterator():
    for k in keys:
      columns[k].append(example[k])

  def stack(key, indices):
    values = [columns[key][i] for i in indices]
    # Bytes stay Python objects (a tf.string tensor is built from them without padding).
    return np.array(values, dtype=object) if spec[key].dtype == tf.string else np.stack(values)

  def fetch(indices):
    values = tf.numpy_function(lambda idx: tuple(stack(k, idx) for k in keys), [indices],
                               [spec[k].dtype for k in keys], stateful=False)
    for value, k in zip(values, keys):
      value.set_shape([None, *spec[k].shape])
    return dict(zip(keys, values))

  return _Examples(size=len(columns[keys[0]]), fetch=fetch)


def _check_stream(stream_name: str, stream: Stream) -> None:
  if stream.subset not in SUBSETS:
    raise ValueError(f"stream {stream_name!r}: unknown Stream.subset {stream.subset!r}; "
                     f"known: {', '.join(SUBSETS)}")
  if stream.kind not in STREAM_KINDS or (stream.kind == "pair") != (stream.pair is not None):
    raise ValueError(f"stream {stream_name!r}: Stream.kind={stream.kind!r} needs kind in "
                     f"{', '.join(STREAM_KINDS)} and PairSettings exactly when kind='pair'")


def _transform_kwargs(input_config: ml_collections.ConfigDict, augment: bool) -> dict:
  if augment:
    return dict(scale_range=tuple(input_config.scale_range),
                flip_prob=float(input_config.flip_prob),
                color_jitter_prob=float(input_config.color_jitter_prob),
                blur_prob=float(input_config.blur_prob))
  # build_data.py: BuildDataset(augmentation=False, scale_size=(1.0, 1.0)): crop/pad only.
  return dict(scale_range=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0, blur_prob=0.0)


def make_train_dataset(input_config: ml_collections.ConfigDict, *, stream_name: str,
                       stream: Stream, seed: int, local_batch_size: int, process_index: int,
                       process_count: int, start_step: int = 0,
                       workdir: str | None = None) -> tf.data.Dataset:
  """The infinite tf.data stream behind `create_train_iterator` (same arguments)."""
  _check_stream(stream_name, stream)
  sampling = input_config.get("sampling", "replacement")
  _check_sampling(sampling)  # before reading any data
  source = _get_source(input_config, process_index)
  split = input_config.train_split
  labeled_ids, unlabeled_ids = _training_subsets(source, input_config, seed=seed,
                                                 workdir=workdir, process_index=process_index)
  ids = labeled_ids if stream.subset == "labeled" else unlabeled_ids
  local_ids = None if ids is None else ids_for_process(ids, process_index, process_count)
  if local_ids is None and source.num_examples(split, process_index, process_count) == 0:
    raise ValueError(f"process {process_index} of {process_count} has no {split} examples")

  partial_dir = input_config.get("partial_labels_dir")
  ds = source.read(split, process_index=process_index, process_count=process_count,
                   image_ids=local_ids)
  if partial_dir:
    check_partial_labels(partial_dir, source.image_ids(split))
    ds = partial_labels.attach_partial_labels(ds, partial_dir, encoded=source.labels_encoded)
  examples = _load_examples(ds.with_options(_options(input_config)))

  order_key = stream_seed(seed, process_index, stream_name, "order")
  augment_key = stream_seed(seed, process_index, stream_name, "augment")
  transform_kwargs = _transform_kwargs(input_config, stream.augment)

  def transform(position, example):
    image, label, image_id = source.decode(example)
    if partial_dir:
      label = _checked_partial_label(image, label, image_id, partial_dir,
                                     source.info.num_classes)
    example_seed = tf.stack([tf.constant(augment_key, tf.int64), position])
    if stream.kind == "pair":
      return crop_pairs.pair_transform(image, label, example_seed, stream.pair)
    return preprocess.train_transform(image, label, example_seed,
                                      crop_size=tuple(input_config.crop_size), **transform_kwargs)

  # Positions of the stream, from where an uninterrupted run would be at `start_step`:
  # resuming skips nothing and reads, decodes and augments nothing twice.
  ds = tf.data.Dataset.counter(start=start_step * local_batch_size, dtype=tf.int64)
  ds = ds.map(lambda position: (position, draw_index(position, num_examples=examples.size,
                                                     sampling=sampling, key=order_key)))
  # One Python call fetches the examples of a block of positions (a lookup, no decoding).
  ds = ds.batch(_FETCH_BLOCK).map(lambda positions, indices: (positions,
                                                              examples.fetch(indices)))
  ds = ds.unbatch().map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(input_config)).prefetch(int(input_config.prefetch))


def create_train_iterator(input_config: ml_collections.ConfigDict, *, stream_name: str,
                          stream: Stream, seed: int, local_batch_size: int, process_index: int,
                          process_count: int, start_step: int = 0,
                          workdir: str | None = None) -> Iterator[Batch]:
  """Infinite iterator of this process's batches of one training stream.

  Args:
    input_config: `config.input` (`sampling` chooses the draws, see `draw_index`).
    stream_name: the stream's name (e.g. "labeled"); with `seed` and `process_index` it
      seeds the stream's draws and augmentation, so streams of one process are independent.
    stream: what the stream reads (subset) and how it transforms it (augment). An unaugmented
      stream (crop/pad only, as the official unlabelled loader) still carries its labels
      (partial labels in partial-label mode, full labels otherwise, for monitoring).
    seed: the run's seed; also seeds the labelled-subset selection (identically in every
      process).
    local_batch_size: examples per batch in this process.
    process_index, process_count: this process and the number of processes; each process
      draws from its own share of the subset.
    start_step: batches already consumed (when resuming): the iterator continues the stream of
      an uninterrupted run from batch `start_step`.
    workdir: the run's directory: a selected labelled subset is written to (process 0) and
      read back from `<workdir>/labeled_ids.txt`. None: neither.

  Returns:
    Iterator of {'image': f32[b,H,W,3] ImageNet-normalised, 'label': i32[b,H,W] (-1 = ignore)}
    with (H, W) = input_config.crop_size and b = local_batch_size.

  Raises:
    ValueError: an unknown `input.sampling` or `Stream.subset`, or a bad labelled subset.
  """
  ds = make_train_dataset(input_config, stream_name=stream_name, stream=stream, seed=seed,
                          local_batch_size=local_batch_size, process_index=process_index,
                          process_count=process_count, start_step=start_step, workdir=workdir)
  return _with_plain_assertions(ds.as_numpy_iterator())


def check_partial_labels(label_dir: str, image_ids: Sequence[str]) -> None:
  """Raises a one-line FileNotFoundError if `<label_dir>/<id>.png` is missing for an id."""
  if not os.path.isdir(label_dir):
    raise FileNotFoundError(f"input.partial_labels_dir {label_dir} does not exist; write it "
                            f"with `python -m input_pipeline.partial_labels`")
  present = set(os.listdir(label_dir))
  missing = [i for i in image_ids if f"{i}.png" not in present]
  if missing:
    raise FileNotFoundError(
        f"partial label {os.path.join(label_dir, missing[0] + '.png')} does not exist "
        f"({len(missing)} of {len(image_ids)} training images have none in {label_dir})")


def _checked_partial_label(image: tf.Tensor, label: tf.Tensor, image_id: tf.Tensor,
                           label_dir: str, num_classes: int) -> tf.Tensor:
  """`label` after checking that the partial label map has the image's size and its values
  lie in [0, num_classes) or are void (255); a failure names the file."""
  image_hw, label_hw = tf.shape(image)[:2], tf.shape(label)[:2]
  path = [os.path.join(label_dir, ""), image_id, ".png"]
  size_message = tf.strings.join([
      "partial label ", *path, " is ",
      tf.strings.as_string(label_hw[0]), "x", tf.strings.as_string(label_hw[1]),
      " (HxW) but its image is ", tf.strings.as_string(image_hw[0]), "x",
      tf.strings.as_string(image_hw[1])])
  size_check = tf.debugging.Assert(tf.reduce_all(image_hw == label_hw), [size_message])
  values = tf.cast(label, tf.int32)
  bad = (values >= num_classes) & (values != constants.STORED_VOID)
  value_message = tf.strings.join([
      "partial label ", *path, " has value ",
      tf.strings.as_string(tf.reduce_max(tf.where(bad, values, -1))),
      f" outside [0, {num_classes}) and not void ({constants.STORED_VOID})"])
  value_check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [value_message])
  with tf.control_dependencies([size_check, value_check]):
    return tf.identity(label)


def make_eval_dataset(input_config: ml_collections.ConfigDict, *, split: str,
                      local_batch_size: int, process_index: int,
                      process_count: int) -> tf.data.Dataset:
  """The finite tf.data stream behind `create_eval_iterator` (same arguments)."""
  source = _get_source(input_config, process_index)
  source.check_split(split)
  counts = [source.num_examples(split, p, process_count) for p in range(process_count)]
  if sum(counts) == 0:
    raise ValueError(f"{source.info.name} split {split!r} is empty")
  # The same number of batches everywhere: one compiled eval step, no process waits on another.
  num_batches = max(math.ceil(c / local_batch_size) for c in counts)
  eval_size = tuple(int(x) for x in input_config.eval_size)

  def transform(example):
    image, label, image_id = source.decode(example)
    return preprocess.eval_transform(image, label, image_id, eval_size)

  ds = source.read(split, process_index=process_index, process_count=process_count)
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  padding = {"image": np.zeros(eval_size + (3,), np.float32),
             "label": np.full(eval_size, constants.IGNORE_LABEL, np.int32),
             "mask": np.array(False)}
  num_padding = num_batches * local_batch_size - counts[process_index]
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(input_config)).prefetch(int(input_config.prefetch))


def create_eval_iterator(input_config: ml_collections.ConfigDict, *, split: str,
                         local_batch_size: int, process_index: int,
                         process_count: int) -> Callable[[], Iterator[Batch]]:
  """This process's share of an eval split, padded to fixed shapes and a fixed batch count.

  Args:
    input_config: `config.input`; images are padded right/bottom to `eval_size` (image reflect,
      label -1) and must not be larger.
    split: e.g. input_config.eval_split.
    local_batch_size: examples per batch in this process.
    process_index, process_count: this process and the number of processes.

  Returns:
    `eval_batches`: each call starts a fresh pass over the split, of ceil(n_max /
    local_batch_size) batches in every process (n_max: the largest share of any process,
    so that every process runs the same number of eval steps) of {'image': f32[b,He,We,3],
    'label': i32[b,He,We], 'mask': bool[b]}, where mask is False on padding examples.
  """
  ds = make_eval_dataset(input_config, split=split, local_batch_size=local_batch_size,
                         process_index=process_index, process_count=process_count)
  return lambda: _with_plain_assertions(ds.as_numpy_iterator())


def _with_plain_assertions(iterator: Iterator[Batch]) -> Iterator[Batch]:
  """Re-raises a failed tf.debugging.Assert of the pipeline as a one-line ValueError.

  tf.data wraps the message between node names and graph context lines.
  """
  try:
    yield from iterator
  except GeneratorExit:
    # Closing (e.g. at interpreter exit, when module globals may already be gone): the
    # clause below must not be evaluated.
    raise
  except tf.errors.InvalidArgumentError as e:
    match = re.search(r"assertion failed: \[(.*?)\]", e.message)
    if match is None:
      raise
    raise ValueError(match.group(1)) from e
