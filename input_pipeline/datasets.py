"""Datasets by name, and the host-local train/eval iterators the trainer consumes.

`input.dataset` names either the embedded synthetic dataset or a TFDS builder registered in
`input_pipeline.builders` (prepared once from `input.manual_dir` into `input.data_dir`).

Each process reads only its own share of a split and yields host-local numpy batches; the
trainer turns them into global arrays (`reco_jax.parallel.to_global_batch`). Training streams
are infinite, shuffled and augmented with stateless per-example seeds, so a stream is a pure
function of (seed, process index, stream kind). Eval streams are finite, padded to a fixed
image size and to the same number of batches in every process, with a `mask` for the padding.

The labelled subset of a training split follows `splits.labeled_ids_for_run` (explicit ids or
split files, then `<workdir>/labeled_ids.txt` of an earlier run, then the dataset's selection
rule on the class-presence table stored by `input_pipeline.prepare`). In "partial labels, full
dataset" mode (`input.partial_labels_dir`) every training image is in both streams and its
label is read from `<partial_labels_dir>/<image_id>.png`; eval always uses the full labels.

Multi-process runs: TFDS datasets must be prepared before processes other than 0 read them.
Call `prepare(input_config)` in process 0 and sync (e.g. `multihost_utils.sync_global_devices`)
before creating iterators; in process 0 the iterator functions prepare on demand. Only process
0 writes `labeled_ids.txt`; the others compute the same ids.
"""
import abc
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import math
import os
import re

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import builders
from input_pipeline import partial_labels
from input_pipeline import prepare as prepare_lib
from input_pipeline import preprocess
from input_pipeline import splits
from input_pipeline import synthetic
from input_pipeline.builders import base

SYNTHETIC = "synthetic"
# Stream kinds: part of the seeds of each training stream, so that the order and the
# augmentations of the labelled and the unlabelled streams of one process are independent.
_LABELED_ORDER, _LABELED_AUGMENT, _UNLABELED_ORDER, _UNLABELED_AUGMENT = range(4)

Batch = dict[str, np.ndarray]


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

  `read` yields the dataset's own (possibly still encoded) examples, cheap to cache;
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
  """The embedded procedural dataset; examples are generated on first read and then cached."""

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
            "input_pipeline.datasets.prepare(config.input) in process 0 before the others read")
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

  Reads `input_config.manual_dir` the first time; afterwards only checks.
  """
  name = _check_name(input_config.dataset)
  if name != SYNTHETIC:
    builder = prepare_lib.prepare_dataset(builders.get_builder_class(name),
                                          input_config.manual_dir, input_config.data_dir)
    if input_config.train_split in builder.info.splits:
      prepare_lib.class_presence_for(builder, input_config.train_split)


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


def stream_seed(seed: int, process_index: int, stream: int) -> int:
  """A 63-bit seed for one (training seed, process, stream kind) triple."""
  state = np.random.SeedSequence([seed, process_index, stream]).generate_state(2, np.uint32)
  return int((int(state[0]) << 31) ^ int(state[1]))


def _options(input_config: ml_collections.ConfigDict) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Half the cores by default (2 on this 2-core box): tf.data shares the host with XLA.
  default_threads = max(2, (os.cpu_count() or 2) // 2)
  threads = int(input_config.get("num_threads", 0)) or default_threads
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return options


def make_train_dataset(input_config: ml_collections.ConfigDict, *, seed: int,
                       local_batch_size: int, process_index: int, process_count: int,
                       labeled: bool = True, start_step: int = 0,
                       workdir: str | None = None) -> tf.data.Dataset:
  """The infinite tf.data stream behind `create_train_iterator` (same arguments)."""
  source = _get_source(input_config, process_index)
  split = input_config.train_split
  labeled_ids, unlabeled_ids = _training_subsets(source, input_config, seed=seed,
                                                 workdir=workdir, process_index=process_index)
  ids = labeled_ids if labeled else unlabeled_ids
  local_ids = None if ids is None else ids_for_process(ids, process_index, process_count)
  if local_ids is None and source.num_examples(split, process_index, process_count) == 0:
    raise ValueError(f"process {process_index} of {process_count} has no {split} examples")

  order_kind, augment_kind = ((_LABELED_ORDER, _LABELED_AUGMENT) if labeled
                               else (_UNLABELED_ORDER, _UNLABELED_AUGMENT))
  if labeled:
    transform_kwargs = dict(scale_range=tuple(input_config.scale_range),
                            flip_prob=float(input_config.flip_prob),
                            color_jitter_prob=float(input_config.color_jitter_prob),
                            blur_prob=float(input_config.blur_prob))
  else:
    # build_data.py: BuildDataset(augmentation=False, scale_size=(1.0, 1.0)): crop/pad only.
    transform_kwargs = dict(scale_range=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0,
                            blur_prob=0.0)

  partial_dir = input_config.get("partial_labels_dir")

  def transform(example, example_seed):
    image, label, image_id = source.decode(example)
    if partial_dir:
      label = _checked_partial_label(image, label, image_id, partial_dir)
    return preprocess.train_transform(image, label, example_seed,
                                      crop_size=tuple(input_config.crop_size), **transform_kwargs)

  ds = source.read(split, process_index=process_index, process_count=process_count,
                   image_ids=local_ids)
  if partial_dir:
    check_partial_labels(partial_dir, source.image_ids(split))
    ds = partial_labels.attach_partial_labels(ds, partial_dir, encoded=source.labels_encoded)
  ds = ds.cache().repeat().shuffle(int(input_config.shuffle_buffer),
                                   seed=stream_seed(seed, process_index, order_kind))
  # One i64[2] seed per example, zipped in so that it does not depend on map parallelism.
  seeds = tf.data.Dataset.random(seed=stream_seed(seed, process_index, augment_kind)).batch(2)
  ds = tf.data.Dataset.zip((ds, seeds))
  if start_step:
    # Resume exactly where an uninterrupted run would be; skipping before the map costs no
    # decoding or augmentation.
    ds = ds.skip(start_step * local_batch_size)
  ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(input_config)).prefetch(int(input_config.prefetch))


def create_train_iterator(input_config: ml_collections.ConfigDict, *, seed: int,
                          local_batch_size: int, process_index: int, process_count: int,
                          labeled: bool = True, start_step: int = 0,
                          workdir: str | None = None) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches.

  Args:
    input_config: `config.input`.
    seed: the run's seed; also seeds the labelled-subset selection (identically in every
      process).
    local_batch_size: examples per batch in this process.
    process_index, process_count: this process and the number of processes.
    labeled: True for the labelled subset with full augmentation; False for the unlabelled
      stream (crop/pad only, as the official), which still carries its labels (partial
      labels in partial-label mode, full labels otherwise, for monitoring).
    start_step: batches already consumed (when resuming): the iterator continues the stream of
      an uninterrupted run from batch `start_step`.
    workdir: the run's directory: a selected labelled subset is written to (process 0) and
      read back from `<workdir>/labeled_ids.txt`. None: neither.

  Returns:
    Iterator of {'image': f32[b,H,W,3] ImageNet-normalised, 'label': i32[b,H,W] (-1 = ignore)}
    with (H, W) = input_config.crop_size and b = local_batch_size.
  """
  ds = make_train_dataset(input_config, seed=seed, local_batch_size=local_batch_size,
                          process_index=process_index, process_count=process_count,
                          labeled=labeled, start_step=start_step, workdir=workdir)
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
                           label_dir: str) -> tf.Tensor:
  """`label` after checking that the partial label map has the image's size."""
  image_hw, label_hw = tf.shape(image)[:2], tf.shape(label)[:2]
  message = tf.strings.join([
      "partial label ", os.path.join(label_dir, ""), image_id, ".png is ",
      tf.strings.as_string(label_hw[0]), "x", tf.strings.as_string(label_hw[1]),
      " (HxW) but its image is ", tf.strings.as_string(image_hw[0]), "x",
      tf.strings.as_string(image_hw[1])])
  check = tf.debugging.Assert(tf.reduce_all(image_hw == label_hw), [message])
  with tf.control_dependencies([check]):
    return tf.identity(label)


def make_eval_dataset(input_config: ml_collections.ConfigDict, *, split: str,
                      local_batch_size: int, process_index: int,
                      process_count: int) -> tuple[tf.data.Dataset, int]:
  """The finite tf.data stream behind `create_eval_iterator`, and its number of batches."""
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
             "label": np.full(eval_size, preprocess.IGNORE_LABEL, np.int32),
             "mask": np.array(False)}
  num_padding = num_batches * local_batch_size - counts[process_index]
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.with_options(_options(input_config)).prefetch(int(input_config.prefetch)), num_batches


def create_eval_iterator(input_config: ml_collections.ConfigDict, *, split: str,
                         local_batch_size: int, process_index: int,
                         process_count: int) -> tuple[Callable[[], Iterator[Batch]], int]:
  """This process's share of an eval split, padded to fixed shapes and a fixed batch count.

  Args:
    input_config: `config.input`; images are padded right/bottom to `eval_size` (image reflect,
      label -1) and must not be larger.
    split: e.g. input_config.eval_split.
    local_batch_size: examples per batch in this process.
    process_index, process_count: this process and the number of processes.

  Returns:
    (eval_batches, num_batches): `eval_batches()` starts a fresh pass of exactly `num_batches`
    batches (the same count in every process) of {'image': f32[b,He,We,3], 'label':
    i32[b,He,We], 'mask': bool[b]}, where mask is False on padding examples.
  """
  ds, num_batches = make_eval_dataset(input_config, split=split,
                                      local_batch_size=local_batch_size,
                                      process_index=process_index, process_count=process_count)
  return lambda: _with_plain_assertions(ds.as_numpy_iterator()), num_batches


def _with_plain_assertions(iterator: Iterator[Batch]) -> Iterator[Batch]:
  """Re-raises a failed tf.debugging.Assert of the pipeline as a one-line ValueError.

  tf.data wraps the message between node names and graph context lines.
  """
  try:
    yield from iterator
  except tf.errors.InvalidArgumentError as e:
    match = re.search(r"assertion failed: \[(.*?)\]", e.message)
    if match is None:
      raise
    raise ValueError(match.group(1)) from e
