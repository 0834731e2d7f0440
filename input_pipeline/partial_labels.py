"""ReCo's "partial labels, full dataset" label maps (1 pixel, 1 %, 5 %, 25 % per class).

Library and command. Reproduces `dataset/pascal_preprocess.py` and
`dataset/cityscapes_preprocess.py` of the official code: for each seed, one
`np.random.RandomState(seed)` stream is consumed in this order:

1. For every label file (in the given order), for p in (25 %, 5 %, 1 %), for every valid class
   l of the image (ascending): pick a seed pixel of class l uniformly
   (`choice(n_l, 1, replace=False)` over its row-major pixel list), then grow a square around
   it by repeated 5x5 dilations until it covers at least `int(p * n_l)` pixels of class l.
   Class l is written on (square & class l); everything else is void.
2. A second pass over all files writes p0: one random pixel per valid class.

Growth. The official code calls `cv2.dilate(mask, ones(5, 5))` in a loop. k dilations of one
pixel by a 5x5 square give the (4k+1)x(4k+1) square around it, clipped to the image (the
Minkowski sum of squares is a square; dilation's border never adds pixels). So the grown
region is the class pixels within Chebyshev distance 2k of the seed, and the number of steps
is the smallest k whose square holds `int(p * n_l)` class pixels. `grow_region` computes that
k directly from the class pixels' distances with NumPy: it is exact, needs no image-processing
dependency (cv2 is not one of ours), and costs O(n_l) instead of k full-image dilations per
class (k reaches ~60 for a 25 % region on a 500x375 VOC image). The tests check it against
repeated `scipy.ndimage.binary_dilation` with a 5x5 structuring element and against the
official outputs (`golden/partial_labels_pascal.npz`).

The maps are written in the *stored* label space (class indices, 255 = void), one 8-bit
grayscale PNG per image: `<out_dir>/p<P>_seed<s>/<image_id>.png` with P in {0, 1, 5, 25}.
For Cityscapes this is the trainId space at the prepared resolution. That gives the same
maps as the official labelId-space script: the 19 valid labelIds map to trainIds 0..18 in
increasing order, so the classes, their pixels and the RNG draws are the same, and the
official void labelId 0 maps to 255.

Order. The official scripts iterate `glob.glob` order (file-system dependent), and the VOC
script iterates every PNG of `SegmentationClassAug` (train_aug *and* val). The command
processes files sorted by name unless `--order_file` lists them (one file name or id per
line, e.g. the `glob.glob` order recorded on the machine that ran the official script); with
the official order the outputs are identical.

Usage:
  python -m input_pipeline.partial_labels --dataset=voc --manual_dir=/data/VOC2012 \
      --out_dir=/data/voc_partial [--seeds=0,1,2] [--order_file=glob_order.txt]

Datasets: `voc` (every PNG of `SegmentationClassAug/`), `cityscapes` (train labelIds under
`gtFine/train/<city>/`, mapped to trainIds and resized like the prepared dataset, see
`--cityscapes_resolution`), `sun` (the prepared training images; the official code has no SUN
generator). A training run uses them through `attach_partial_labels`, which replaces the
`label` of each training example by `<dir>/<image_id>.png`: train with
`--config.input.partial_labels_dir=<out_dir>/p1_seed0` (which switches on the partial-label
step of the mean-teacher methods) and
`input.num_labeled=0` (every image is labelled sparsely and is also unlabelled, as the
official `train_semisup_partial.py`); evaluation keeps the full labels.
"""
from collections.abc import Callable, Iterable, Sequence
import os

import numpy as np
from PIL import Image

from input_pipeline import splits

# pascal_preprocess.py: `perc = [0.25, 0.05, 0.01]`, the RNG consumption order.
REGION_FRACTIONS = (0.25, 0.05, 0.01)
PARTIAL_LEVELS = (0, 1, 5, 25)  # percent; 0 = one pixel per class
VOID = 255
DILATION_SIZE = 5  # cv2.dilate(kernel=np.ones([5, 5]))


def grow_region(class_mask: np.ndarray, seed_yx: tuple[int, int], target: int) -> np.ndarray:
  """Pixels of a class reached by growing a square around a seed pixel.

  Equal to starting from the seed pixel and applying a 5x5 dilation until
  `|dilated & class_mask| >= target` (see the module docstring), then `dilated & class_mask`.

  Args:
    class_mask: `bool[H,W]`, the class's pixels; must contain the seed.
    seed_yx: the seed pixel (row, column).
    target: the number of class pixels to reach (`int(p * n_l)`).

  Returns:
    `bool[H,W]`.
  """
  ys, xs = np.nonzero(class_mask)
  y0, x0 = seed_yx
  radius = DILATION_SIZE // 2
  # Steps k after which a pixel at Chebyshev distance d is inside: ceil(d / radius).
  steps = -(-np.maximum(np.abs(ys - y0), np.abs(xs - x0)) // radius)
  # The seed alone (k = 0) holds one pixel; otherwise the target-th closest pixel sets k.
  k = 0 if target <= 1 else int(np.partition(steps, target - 1)[target - 1])
  region = np.zeros(class_mask.shape, bool)
  keep = steps <= k
  region[ys[keep], xs[keep]] = True
  return region


def _valid_classes(label: np.ndarray, void_values: Sequence[int]) -> list[int]:
  return [int(c) for c in np.unique(label) if int(c) not in void_values]


def check_label_values(label: np.ndarray, num_classes: int, what: str,
                       void_values: Sequence[int] = (VOID,)) -> None:
  """Raises a one-line ValueError naming `what` if a non-void value of `label` is not in [0, C).

  Such a value (e.g. CamVid's raw void 11 taken for a class) would reach the loss as an
  out-of-range class and give a NaN loss at the first step.
  """
  bad = [c for c in _valid_classes(label, void_values) if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"{what} has values {bad[:10]} outside [0, {num_classes}) and not void "
                     f"({', '.join(str(v) for v in void_values)})")


def _random_pixel(class_mask: np.ndarray, rng: np.random.RandomState) -> tuple[int, int]:
  coords = np.transpose(np.nonzero(class_mask))  # row-major, as in the official code
  # `choice(n, 1, replace=False)` is a full permutation under the hood; only this exact call
  # consumes the RandomState stream like the official script.
  pick = rng.choice(coords.shape[0], 1, replace=False)
  return int(coords[pick[0], 0]), int(coords[pick[0], 1])


def region_labels(label: np.ndarray, rng: np.random.RandomState,
                  fractions: Sequence[float] = REGION_FRACTIONS,
                  void_values: Sequence[int] = (VOID,)) -> dict[int, np.ndarray]:
  """First pass for one image: `{percent: u8[H,W]}` region maps, void = 255.

  Args:
    label: `u8[H,W]` full label map.
    rng: the seed's RandomState (advanced in place).
    fractions: in RNG consumption order (official: 0.25, 0.05, 0.01).
    void_values: values that are not classes.
  """
  classes = _valid_classes(label, void_values)
  out = {}
  for p in fractions:
    partial = np.full(label.shape, VOID, np.uint8)
    for c in classes:
      class_mask = label == c
      seed_yx = _random_pixel(class_mask, rng)
      target = int(p * int(class_mask.sum()))  # the official float product, truncated
      partial[grow_region(class_mask, seed_yx, target)] = c
    out[int(round(p * 100))] = partial
  return out


def single_pixel_labels(label: np.ndarray, rng: np.random.RandomState,
                        void_values: Sequence[int] = (VOID,)) -> np.ndarray:
  """Second pass for one image: `u8[H,W]` with one random pixel per valid class."""
  partial = np.full(label.shape, VOID, np.uint8)
  for c in _valid_classes(label, void_values):
    y, x = _random_pixel(label == c, rng)
    partial[y, x] = c
  return partial


def generate_partial_labels(ids: Sequence[str], read_label: Callable[[str], np.ndarray], seed: int,
                            write: Callable[[str, int, np.ndarray], None],
                            void_values: Sequence[int] = (VOID,)) -> None:
  """All levels for one seed, consuming one RNG stream in the official order.

  Args:
    ids: images in processing order (this order fixes the RNG draws).
    read_label: id -> `u8[H,W]` full label map; called twice per image (two passes, as the
      official script, so that memory stays bounded).
    seed: `np.random.seed` value of the official script.
    write: called as `write(id, percent, u8[H,W])` for percent in (25, 5, 1, 0).
    void_values: values that are not classes.
  """
  rng = np.random.RandomState(seed)
  for image_id in ids:
    maps = region_labels(read_label(image_id), rng, void_values=void_values)
    for percent, partial in maps.items():
      write(image_id, percent, partial)
  for image_id in ids:
    write(image_id, 0, single_pixel_labels(read_label(image_id), rng, void_values))


def partial_dir(out_dir: str, percent: int, seed: int) -> str:
  """The folder of one level and seed: `<out_dir>/p<percent>_seed<seed>`."""
  return os.path.join(out_dir, f"p{percent}_seed{seed}")


def read_order_file(path: str, ids: Iterable[str]) -> list[str]:
  """Processing order from a text file of file names, paths or ids (one per line).

  Every listed entry must be one of `ids` (matched on the file stem), and every id must be
  listed, since a partial order would change the RNG draws of the rest.
  """
  known = list(ids)
  order = splits.read_split_file(path, known)
  missing = sorted(set(known) - set(order))
  if missing:
    raise ValueError(f"order file {path} does not list {len(missing)} label files, "
                     f"e.g. {missing[0]!r}")
  return order


def _write_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def write_partial_labels(ids: Sequence[str], read_label: Callable[[str], np.ndarray], out_dir: str,
                         seeds: Sequence[int], num_classes: int | None = None) -> None:
  """Runs `generate_partial_labels` for each seed and writes PNGs under `out_dir`.

  With `num_classes`, every written map is checked to hold only [0, num_classes) and void
  (255): a value outside fails naming the file instead of giving a NaN loss in training.
  """

  def write(image_id, percent, partial, seed):
    path = os.path.join(partial_dir(out_dir, percent, seed), f"{image_id}.png")
    if num_classes is not None:
      check_label_values(partial, num_classes, f"partial label {path}")
    _write_png(path, partial)

  for seed in seeds:
    for percent in PARTIAL_LEVELS:
      os.makedirs(partial_dir(out_dir, percent, seed), exist_ok=True)
    generate_partial_labels(ids, read_label, seed, lambda i, p, a, s=seed: write(i, p, a, s))


def attach_partial_labels(ds, label_dir: str, encoded: bool = True):
  """Replaces each example's `label` by the partial map `<label_dir>/<image_id>.png`.

  Args:
    ds: a `tf.data.Dataset` of dicts with a string `image_id` and a `label`.
    label_dir: one `partial_dir(...)` folder.
    encoded: True gives the PNG bytes (for examples read with `tfds.decode.SkipDecoding`, to
      be decoded later with `tf.io.decode_png(channels=1)`); False gives `u8[H,W,1]`.

  Returns:
    The dataset with replaced labels. A missing file fails when its example is read, with
    TF's NotFoundError naming the path. Values are not checked here: the training pipeline
    checks them against the dataset's classes (`datasets._checked_partial_label`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(label_dir):
    raise FileNotFoundError(f"partial-label folder {label_dir} does not exist; write it with "
                            f"`python -m input_pipeline.partial_labels`")
  prefix = os.path.join(label_dir, "")

  def replace(example):
    png = tf.io.read_file(tf.strings.join([prefix, example["image_id"], ".png"]))
    # The files are 8-bit grey (not palette) PNGs, so decode_png returns the class indices.
    return {**example, "label": png if encoded else tf.io.decode_png(png, channels=1)}

  return ds.map(replace, num_parallel_calls=tf.data.AUTOTUNE)


# ---- command -------------------------------------------------------------------------------


def _num_classes(dataset: str) -> int:
  from input_pipeline import builders  # pylint: disable=g-import-not-at-top
  return len(builders.get_builder_class(dataset).CLASS_NAMES)


def _dataset_sources(dataset: str, manual_dir: str,
                     cityscapes_resolution: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
  """(ids in sorted order, id -> stored `u8[H,W]` label) for the training labels of a dataset."""
  if dataset == "voc":
    from input_pipeline.builders import voc  # pylint: disable=g-import-not-at-top
    return voc.partial_label_sources(manual_dir)
  if dataset == "cityscapes":
    from input_pipeline.builders import cityscapes  # pylint: disable=g-import-not-at-top
    return cityscapes.partial_label_sources(manual_dir, cityscapes_resolution)
  if dataset == "sun":
    from input_pipeline.builders import sun  # pylint: disable=g-import-not-at-top
    return sun.partial_label_sources(manual_dir)
  raise ValueError(f"--dataset={dataset!r}: partial labels are defined for voc, cityscapes, sun")


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  ids, read_label = _dataset_sources(f.dataset, f.manual_dir, f.cityscapes_resolution)
  if f.order_file:
    ids = read_order_file(f.order_file, ids)
  seeds = [int(s) for s in f.seeds.split(",") if s.strip()]
  write_partial_labels(ids, read_label, f.out_dir, seeds, num_classes=_num_classes(f.dataset))
  print(f"wrote partial labels of {len(ids)} images for seeds {seeds} to {f.out_dir}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("dataset", None, ["voc", "cityscapes", "sun"],
                    "Dataset whose labels to sample.")
  flags.DEFINE_string("manual_dir", None, "Raw dataset directory (the builder's manual_dir).")
  flags.DEFINE_string("out_dir", None, "Output root; gets p<P>_seed<s>/<image_id>.png.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (the official scripts use 0,1,2).")
  flags.DEFINE_string("order_file", None,
                      "Optional processing order (file names or ids, one a line).")
  flags.DEFINE_enum("cityscapes_resolution", "half", ["half", "full"],
                    "Cityscapes label size: half = 1024x512 as ReCo, full = 2048x1024.")
  flags.mark_flags_as_required(["dataset", "manual_dir", "out_dir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
