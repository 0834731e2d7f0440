"""Tests of the tf.data preprocessing, the synthetic dataset and the train/eval iterators."""
import numpy as np
import pytest
from scipy import ndimage
from scipy import stats
import tensorflow as tf

from configs import common
from input_pipeline import datasets
from input_pipeline import preprocess
from input_pipeline import splits
from input_pipeline import synthetic
from reco_jax import constants

MEAN = np.array(constants.IMAGENET_MEAN, np.float32)
STD = np.array(constants.IMAGENET_STD, np.float32)
LABELED = datasets.Stream(subset="labeled", augment=True)
UNLABELED = datasets.Stream(subset="unlabeled", augment=False)


def _seed(k: int) -> tf.Tensor:
  return tf.constant([k, 1234], tf.int64)


def _denormalize(image: np.ndarray) -> np.ndarray:
  """Normalised f32[...,3] -> [0, 255] floats."""
  return (image * STD + MEAN) * 255.0


def _run(fn, *args, in_dataset: bool):
  """Runs `fn(*args)` eagerly, or inside a tf.data map (big_vision: the two can differ)."""
  if not in_dataset:
    return tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def _run_seeds(fn, image, label, seeds, *, in_dataset: bool) -> list:
  """`[fn(image, label, _seed(k)) for k in seeds]`, eagerly or through one tf.data map."""
  if not in_dataset:
    return [_run(fn, image, label, _seed(k), in_dataset=False) for k in seeds]
  ds = tf.data.Dataset.from_tensor_slices(tf.stack([_seed(k) for k in seeds]))
  return list(ds.map(lambda s: fn(image, label, s)).as_numpy_iterator())


def _input_config(**synthetic_overrides):
  """A tiny synthetic input config: 16 train / 8 val images of 32x32."""
  cfg = common.base_config().input
  cfg.synthetic.num_train = 16
  cfg.synthetic.num_val = 8
  cfg.synthetic.image_size = (32, 32)
  cfg.crop_size = (24, 24)
  cfg.eval_size = (32, 32)
  cfg.synthetic.update(synthetic_overrides)
  return cfg


def _no_augmentation(cfg):
  cfg.scale_range = (1.0, 1.0)
  cfg.flip_prob = cfg.color_jitter_prob = cfg.blur_prob = 0.0
  cfg.crop_size = tuple(cfg.synthetic.image_size)
  return cfg


# ------------------------------------------------------------------------------------------
# Individual ops.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dataset", [False, True])
def test_reflect_indices_match_numpy_reflect(in_dataset):
  for n in range(1, 6):
    for size in (n, n + 1, 2 * n + 3, 5 * n + 2):
      got = _run(preprocess.reflect_indices, tf.constant(n), tf.constant(size),
                 in_dataset=in_dataset)
      np.testing.assert_array_equal(got, np.pad(np.arange(n), (0, size - n), mode="reflect"),
                                    err_msg=f"n={n} size={size}")


@pytest.mark.parametrize("in_dataset", [False, True])
def test_pad_to_size_reflects_image_and_voids_label(in_dataset):
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(5, 7, 3)).astype(np.float32)
  label = rng.integers(0, 10, size=(5, 7, 1)).astype(np.uint8)
  # 12 > 2*5: the pad is longer than the image, where tf.pad(mode='REFLECT') would fail.
  got_image, got_label = _run(lambda i, l: preprocess.pad_to_size(i, l, (12, 9)),
                              image, label, in_dataset=in_dataset)
  np.testing.assert_array_equal(got_image, np.pad(image, ((0, 7), (0, 2), (0, 0)), "reflect"))
  np.testing.assert_array_equal(got_label,
                                np.pad(label, ((0, 7), (0, 2), (0, 0)), constant_values=255))
  # Large enough already: unchanged.
  same_image, same_label = _run(lambda i, l: preprocess.pad_to_size(i, l, (3, 4)),
                                image, label, in_dataset=in_dataset)
  np.testing.assert_array_equal(same_image, image)
  np.testing.assert_array_equal(same_label, label)


def _coordinate_example(h=40, w=56):
  """Image whose channels are (x, y, 0) and labels equal to x and to y (pixel positions)."""
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
  return image, xx.astype(np.uint8)[..., None], yy.astype(np.uint8)[..., None]


@pytest.mark.parametrize("in_dataset", [False, True])
def test_train_transform_keeps_image_and_label_aligned(in_dataset):
  image, label_x, label_y = _coordinate_example()
  h, w = label_x.shape[:2]
  kwargs = dict(crop_size=(32, 48), scale_range=(0.5, 1.5), flip_prob=0.5,
                color_jitter_prob=0.0, blur_prob=0.0)
  fn = lambda i, l, s: preprocess.train_transform(i, l, s, **kwargs)
  flips = set()
  seeds = range(12)
  # The same seeds give the same geometry for both label maps.
  outs_x = _run_seeds(fn, image, label_x, seeds, in_dataset=in_dataset)
  outs_y = _run_seeds(fn, image, label_y, seeds, in_dataset=in_dataset)
  for out_x, out_y in zip(outs_x, outs_y):
    rgb = _denormalize(out_x["image"])
    lx, ly = out_x["label"], out_y["label"]
    np.testing.assert_array_equal(lx == -1, ly == -1)
    # Nearest (label) and antialiased bilinear (image) sample the same point up to half a
    # source pixel, except where the filter is cut by the image border.
    interior = (lx >= 3) & (lx <= w - 4) & (ly >= 3) & (ly <= h - 4)
    assert interior.sum() > 100
    np.testing.assert_allclose(rgb[..., 0][interior], lx[interior], atol=0.5 + 1e-3)
    np.testing.assert_allclose(rgb[..., 1][interior], ly[interior], atol=0.5 + 1e-3)
    valid = lx >= 0
    flips.add(bool(np.mean(np.diff(lx, axis=1)[valid[:, 1:] & valid[:, :-1]]) < 0))
  assert flips == {True, False}, "12 seeds should include flipped and unflipped crops"


@pytest.mark.parametrize("in_dataset", [False, True])
def test_crop_and_flip_without_scale_are_exact(in_dataset):
  image, label_x, label_y = _coordinate_example()
  kwargs = dict(crop_size=(32, 48), scale_range=(1.0, 1.0), flip_prob=0.5,
                color_jitter_prob=0.0, blur_prob=0.0)
  fn = lambda i, l, s: preprocess.train_transform(i, l, s, **kwargs)
  outs_x = _run_seeds(fn, image, label_x, range(6), in_dataset=in_dataset)
  outs_y = _run_seeds(fn, image, label_y, range(6), in_dataset=in_dataset)
  for out_x, out_y in zip(outs_x, outs_y):
    rgb = _denormalize(out_x["image"])
    np.testing.assert_allclose(rgb[..., 0], out_x["label"], atol=1e-3)
    np.testing.assert_allclose(rgb[..., 1], out_y["label"], atol=1e-3)


@pytest.mark.parametrize("in_dataset", [False, True])
def test_small_image_is_padded_before_crop(in_dataset):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
  label = rng.integers(0, 4, size=(5, 7, 1)).astype(np.uint8)
  kwargs = dict(crop_size=(12, 16), scale_range=(1.0, 1.0), flip_prob=0.0,
                color_jitter_prob=0.0, blur_prob=0.0)
  out = _run(lambda i, l, s: preprocess.train_transform(i, l, s, **kwargs),
             image, label, _seed(0), in_dataset=in_dataset)
  # The padded image is exactly the crop size, so the crop is the whole padded image.
  want = np.pad(image.astype(np.float32), ((0, 7), (0, 9), (0, 0)), "reflect")
  np.testing.assert_allclose(_denormalize(out["image"]), want, atol=1e-3)
  want_label = np.pad(label[..., 0].astype(np.int32), ((0, 7), (0, 9)), constant_values=-1)
  np.testing.assert_array_equal(out["label"], want_label)
  assert out["label"].dtype == np.int32


def test_random_scale_sizes_follow_the_range():
  image = tf.zeros([40, 60, 3])
  label = tf.zeros([40, 60, 1], tf.uint8)
  heights = set()
  for k in range(40):
    out_image, out_label = preprocess.random_scale(image, label, _seed(k), (0.5, 1.5))
    h, w = out_image.shape[:2]
    assert out_label.shape[:2] == (h, w)
    assert 20 <= h <= 60 and 30 <= w <= 90
    assert abs(h / 40 - w / 60) < 0.05  # one factor for both axes
    heights.add(h)
  assert min(heights) < 30 and max(heights) > 50


def test_random_crop_covers_every_offset():
  yy, xx = np.mgrid[0:6, 0:7]
  image = tf.constant(np.stack([xx, yy, yy], -1), tf.float32)
  label = tf.constant(yy[..., None], tf.uint8)
  offsets = set()
  for k in range(200):
    out_image, out_label = preprocess.random_crop(image, label, _seed(k), (4, 4))
    top, left = int(out_image[0, 0, 1]), int(out_image[0, 0, 0])
    np.testing.assert_array_equal(out_label[..., 0], yy[top:top + 4, left:left + 4])
    offsets.add((top, left))
  assert offsets == {(t, l) for t in range(3) for l in range(4)}


def test_flip_probability():
  image = tf.constant(np.arange(12, dtype=np.float32).reshape(1, 4, 3))
  label = tf.constant(np.arange(4, dtype=np.uint8).reshape(1, 4, 1))
  for prob, lo, hi in ((0.0, 0, 0), (1.0, 200, 200), (0.5, 70, 130)):
    flips = 0
    for k in range(200):
      out_image, out_label = preprocess.random_flip(image, label, _seed(k), prob)
      flipped = int(out_label[0, 0, 0]) == 3
      assert flipped == (float(out_image[0, 0, 0]) == 9.0)
      flips += flipped
    assert lo <= flips <= hi, (prob, flips)


def test_photometric_ops_match_pil_enhance_semantics():
  rng = np.random.default_rng(2)
  image = tf.constant(rng.uniform(0.2, 0.8, size=(8, 9, 3)), tf.float32)
  x = image.numpy()
  gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(preprocess.adjust_brightness(image, 0.5), x * 0.5, atol=1e-6)
  np.testing.assert_allclose(preprocess.adjust_contrast(image, 0.0),
                             np.full_like(x, gray.mean()), atol=1e-6)
  np.testing.assert_allclose(preprocess.adjust_saturation(image, 0.0),
                             np.repeat(gray[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(preprocess.adjust_hue(image, 0.0), x, atol=1e-5)
  # A third of a turn maps pure red to pure green.
  red = tf.constant([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(preprocess.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-5)
  for op in (preprocess.adjust_brightness, preprocess.adjust_contrast,
             preprocess.adjust_saturation):
    np.testing.assert_allclose(op(image, 1.0), x, atol=1e-6)


def test_color_jitter_probability_and_range():
  rng = np.random.default_rng(3)
  image = tf.constant(rng.uniform(size=(6, 6, 3)), tf.float32)
  np.testing.assert_array_equal(preprocess.color_jitter(image, _seed(0), 0.0), image)
  changed = 0
  for k in range(100):
    out = preprocess.color_jitter(image, _seed(k), 0.8).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed += not np.allclose(out, image.numpy())
  assert 65 <= changed <= 95


@pytest.mark.parametrize("sigma", [0.15, 0.6, 1.15])
def test_gaussian_blur_matches_scipy(sigma):
  rng = np.random.default_rng(4)
  image = rng.uniform(size=(11, 13, 3)).astype(np.float32)
  got = preprocess.gaussian_blur(tf.constant(image), tf.constant(sigma)).numpy()
  # scipy's radius is int(truncate * sigma + 0.5); choose truncate for the op's radius 4.
  want = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest",
                                 truncate=4.0 / sigma)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_works_on_tiny_images():
  out = preprocess.gaussian_blur(tf.ones([2, 3, 3]), tf.constant(1.0))
  np.testing.assert_allclose(out, np.ones([2, 3, 3]), atol=1e-6)


_OPS = {
    "random_scale": lambda i, l, s: preprocess.random_scale(i, l, s, (0.5, 1.5)),
    "pad_to_size": lambda i, l, s: preprocess.pad_to_size(i, l, (30, 25)),
    "random_crop": lambda i, l, s: preprocess.random_crop(i, l, s, (9, 11)),
    "random_flip": lambda i, l, s: preprocess.random_flip(i, l, s, 0.5),
    "color_jitter": lambda i, l, s: preprocess.color_jitter(i, s, 1.0),
    "random_blur": lambda i, l, s: preprocess.random_blur(i, s, 1.0),
    "normalize": lambda i, l, s: preprocess.normalize(i),
    "finalize_label": lambda i, l, s: preprocess.finalize_label(l),
    "train_transform": lambda i, l, s: preprocess.train_transform(
        tf.cast(i * 255, tf.uint8), l, s, crop_size=(16, 16), scale_range=(0.5, 1.5),
        flip_prob=0.5, color_jitter_prob=0.8, blur_prob=0.5),
    "eval_transform": lambda i, l, s: preprocess.eval_transform(
        tf.cast(i * 255, tf.uint8), l, tf.constant("x"), (24, 24)),
}


@pytest.mark.parametrize("name", sorted(_OPS))
def test_op_same_eagerly_and_in_tf_data(name):
  rng = np.random.default_rng(5)
  image = rng.uniform(size=(14, 17, 3)).astype(np.float32)
  label = rng.integers(0, 5, size=(14, 17, 1)).astype(np.uint8)
  label[0] = 255
  eager = _run_seeds(_OPS[name], image, label, range(3), in_dataset=False)
  graph = _run_seeds(_OPS[name], image, label, range(3), in_dataset=True)
  tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eager, graph)


def test_eval_rejects_images_larger_than_eval_size():
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"eval image img_7 is 9x8 \(HxW\), larger than input.eval_size 8x8"):
    preprocess.eval_transform(tf.zeros([9, 8, 3], tf.uint8), tf.zeros([9, 8, 1], tf.uint8),
                              tf.constant("img_7"), (8, 8))
  cfg = _input_config()
  cfg.eval_size = (32, 30)
  eval_batches = datasets.create_eval_iterator(cfg, split="val", local_batch_size=2,
                                               process_index=0, process_count=1)
  with pytest.raises(ValueError) as error:
    next(eval_batches())
  assert str(error.value) == ("eval image val_00000 is 32x32 (HxW), larger than "
                              "input.eval_size 32x30")


# ------------------------------------------------------------------------------------------
# The synthetic dataset.
# ------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_splits_differ():
  a_image, a_label = synthetic.generate_example(0, "train", 3, (48, 40))
  b_image, b_label = synthetic.generate_example(0, "train", 3, (48, 40))
  np.testing.assert_array_equal(a_image, b_image)
  np.testing.assert_array_equal(a_label, b_label)
  assert a_image.shape == (48, 40, 3) and a_image.dtype == np.uint8
  assert a_label.shape == (48, 40) and a_label.dtype == np.uint8
  val_image, _ = synthetic.generate_example(0, "val", 3, (48, 40))
  other_image, _ = synthetic.generate_example(0, "train", 4, (48, 40))
  reseeded_image, _ = synthetic.generate_example(1, "train", 3, (48, 40))
  for other in (val_image, other_image, reseeded_image):
    assert not np.array_equal(a_image, other)


def test_synthetic_content_covers_classes_sizes_and_void():
  images, labels = synthetic.generate_split(0, "train", range(64), (64, 64))
  values = set(np.unique(labels).tolist())
  assert values == set(range(synthetic.NUM_CLASSES)) | {synthetic.STORED_VOID}
  assert synthetic.PALETTE.shape == (synthetic.NUM_CLASSES, 3)
  # Per-image object sizes span tiny to most of the image.
  fractions = [(lab == c).mean() for lab in labels for c in np.unique(lab) if 0 < c < 255]
  assert min(fractions) < 0.01 and max(fractions) > 0.3
  # Look-alike classes share their colour family: mean colours of disk and striped disk are
  # both red-dominant.
  for c in (1, 2):
    mean = images[labels == c].mean(axis=0)
    assert mean[0] > mean[1] and mean[0] > mean[2]


def test_synthetic_ids_round_trip():
  assert synthetic.index_from_id("val", synthetic.image_id("val", 12)) == 12
  with pytest.raises(ValueError, match="'train_00001' is not a synthetic val id"):
    synthetic.index_from_id("val", "train_00001")


# ------------------------------------------------------------------------------------------
# Train and eval iterators.
# ------------------------------------------------------------------------------------------


def _first_batches(cfg, n=2, *, stream_name="labeled", stream=LABELED, **kwargs):
  it = datasets.create_train_iterator(cfg, stream_name=stream_name, stream=stream, **kwargs)
  return [next(it) for _ in range(n)]


def _image_lookup(split, indices, image_size) -> dict[bytes, int]:
  """u8 bytes of each unaugmented synthetic image -> its index (images must be unique)."""
  images = synthetic.generate_split(0, split, indices, image_size)[0]
  lookup = {image.tobytes(): k for k, image in zip(indices, images)}
  assert len(lookup) == len(images), "synthetic images are not unique at this size"
  return lookup


def _drawn_indices(batches, lookup) -> list[int]:
  """Source index of every image of unaugmented batches, in stream order."""
  return [lookup[np.round(_denormalize(image)).astype(np.uint8).tobytes()]
          for batch in batches for image in batch["image"]]


def _draws(num_examples, positions, *, sampling, seed=0, process_index=0,
           stream_name="labeled"):
  """`draw_index` at each position, as the pipeline of that stream computes it."""
  key = datasets.stream_seed(seed, process_index, stream_name, "order")
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(positions, np.int64))
  ds = ds.map(lambda p: datasets.draw_index(p, num_examples=num_examples, sampling=sampling,
                                            key=key)).batch(4096)
  return np.concatenate(list(ds.as_numpy_iterator()))


def test_train_iterator_shapes_and_dtypes():
  cfg = _input_config()
  batch = _first_batches(cfg, n=1, seed=0, local_batch_size=4, process_index=0,
                         process_count=1)[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4, 24, 24) and batch["label"].dtype == np.int32
  assert set(np.unique(batch["label"])) <= set(range(-1, synthetic.NUM_CLASSES))


def test_train_iterator_is_deterministic_per_seed_process_and_stream():
  cfg = _input_config()
  kwargs = dict(local_batch_size=4, process_count=2)
  a = _first_batches(cfg, seed=0, process_index=0, **kwargs)
  b = _first_batches(cfg, seed=0, process_index=0, **kwargs)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other_seed = _first_batches(cfg, seed=1, process_index=0, **kwargs)
  other_process = _first_batches(cfg, seed=0, process_index=1, **kwargs)
  # Same subset and augmentation, another name: an independent stream.
  other_name = _first_batches(cfg, seed=0, process_index=0, stream_name="labeled_2", **kwargs)
  for other in (other_seed, other_process, other_name):
    assert not np.array_equal(a[0]["image"], other[0]["image"])


def test_stream_seeds_are_stable_across_interpreters_and_distinct():
  # Pinned values: a seed derived with Python's hash() of the name would change with
  # PYTHONHASHSEED, and resumed runs would draw other examples.
  assert datasets.stream_seed(0, 0, "labeled", "order") == 6204185704898857664
  assert datasets.stream_seed(0, 0, "unlabeled", "order") == 7714914817457111942
  seeds = {datasets.stream_seed(s, p, name, purpose)
           for s in (0, 1) for p in (0, 1) for name in ("labeled", "unlabeled")
           for purpose in datasets.SEED_PURPOSES}
  assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("sampling", datasets.SAMPLINGS)
def test_train_iterator_resumes_at_start_step(sampling):
  cfg = _input_config()
  cfg.sampling = sampling
  kwargs = dict(seed=0, local_batch_size=4, process_index=0, process_count=1)
  # 16 images in batches of 4: batch 5 is in the second epoch of the permutation.
  fresh = _first_batches(cfg, n=7, **kwargs)
  resumed = _first_batches(cfg, n=2, start_step=5, **kwargs)
  for got, want in zip(resumed, fresh[5:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_draws_spread_over_the_whole_split():
  """The first 200 examples of a stream over 2000 images come from the whole split.

  (A shuffle buffer over the split read in id order draws them from its first few hundred.)
  """
  n, image_size = 2000, (8, 8)
  cfg = _no_augmentation(_input_config(num_train=n, image_size=image_size))
  batches = _first_batches(cfg, n=10, seed=0, local_batch_size=20, process_index=0,
                           process_count=1)
  drawn = np.array(_drawn_indices(batches, _image_lookup("train", range(n), image_size)))
  # The pipeline draws exactly `draw_index`'s examples (the uniformity tests below use it).
  np.testing.assert_array_equal(drawn, _draws(n, range(200), sampling="replacement"))
  assert drawn.max() - drawn.min() > 0.8 * n
  assert len(np.unique(drawn * 10 // n)) == 10  # every decile of the id range
  assert len(np.unique(drawn)) > 180  # i.i.d.: about 10 repeats expected in 200 of 2000


def test_replacement_draws_are_iid_uniform():
  n, count = 2000, 20000
  draws = _draws(n, range(count), sampling="replacement")
  assert draws.min() >= 0 and draws.max() < n
  # Uniform over 20 equal bins of the id range (chi-square test, p < 0.001 fails).
  observed = np.bincount(draws * 20 // n, minlength=20)
  chi2 = ((observed - count / 20) ** 2 / (count / 20)).sum()
  assert chi2 < stats.chi2.ppf(0.999, df=19), observed
  # With replacement: n draws from n images hit about n (1 - 1/e) distinct ones (sd ~14).
  assert abs(len(np.unique(draws[:n])) - n * (1 - np.exp(-1))) < 70
  # Independent positions: no serial correlation.
  assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < 0.03
  # Another stream or process draws another sequence.
  for other in (_draws(n, range(200), sampling="replacement", stream_name="unlabeled"),
                _draws(n, range(200), sampling="replacement", process_index=1)):
    assert (other != draws[:200]).mean() > 0.9


def test_permutation_covers_every_index_once_per_epoch():
  n = 50
  draws = _draws(n, range(3 * n), sampling="permutation").reshape(3, n)
  for epoch in draws:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
  assert not np.array_equal(draws[0], np.arange(n))
  np.testing.assert_array_equal(_draws(1, range(3), sampling="permutation"), [0, 0, 0])


def test_permutation_stream_yields_each_image_once_per_epoch():
  n, image_size = 12, (8, 8)
  cfg = _no_augmentation(_input_config(num_train=n, image_size=image_size))
  cfg.sampling = "permutation"
  # Batches of 5 do not divide the epoch: epochs end inside a batch.
  batches = _first_batches(cfg, n=12, seed=3, local_batch_size=5, process_index=0,
                           process_count=1)
  drawn = np.array(_drawn_indices(batches, _image_lookup("train", range(n), image_size)))
  np.testing.assert_array_equal(drawn, _draws(n, range(60), sampling="permutation", seed=3))
  for epoch in drawn.reshape(5, n):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))


@pytest.mark.parametrize("sampling", datasets.SAMPLINGS)
def test_each_process_draws_from_its_own_share(sampling):
  n, image_size = 20, (8, 8)
  cfg = _no_augmentation(_input_config(num_train=n, image_size=image_size))
  cfg.sampling = sampling
  lookup = _image_lookup("train", range(n), image_size)
  for process_index, share in ((0, set(range(10))), (1, set(range(10, 20)))):
    batches = _first_batches(cfg, n=6, seed=0, local_batch_size=10,
                             process_index=process_index, process_count=2)
    drawn = _drawn_indices(batches, lookup)
    assert set(drawn) <= share
    if sampling == "permutation":
      assert set(drawn) == share


def test_unknown_sampling_and_subset_give_one_line_errors():
  cfg = _input_config()
  cfg.sampling = "shuffle_buffer"
  kwargs = dict(seed=0, local_batch_size=4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"^unknown input.sampling 'shuffle_buffer'; known: "
                                       r"replacement, permutation$"):
    _first_batches(cfg, n=1, **kwargs)
  with pytest.raises(ValueError, match=r"^stream 'extra': unknown Stream.subset 'all'; known: "
                                       r"labeled, unlabeled$"):
    _first_batches(_input_config(), n=1, stream_name="extra",
                   stream=datasets.Stream(subset="all", augment=True), **kwargs)


def test_labeled_and_unlabeled_subsets():
  cfg = _no_augmentation(_input_config(num_train=4))
  cfg.labeled_ids = ("train_00003",)
  lookup = _image_lookup("train", range(4), (32, 32))
  kwargs = dict(seed=0, local_batch_size=4, process_index=0, process_count=1)
  labeled = _first_batches(cfg, n=1, **kwargs)
  assert _drawn_indices(labeled, lookup) == [3, 3, 3, 3]
  unlabeled = _first_batches(cfg, n=3, stream_name="unlabeled", stream=UNLABELED, **kwargs)
  assert set(_drawn_indices(unlabeled, lookup)) == {0, 1, 2}
  # The unlabelled stream keeps its labels (for monitoring).
  want_labels = synthetic.generate_split(0, "train", range(4), (32, 32))[1]
  for image_index, label in zip(_drawn_indices(unlabeled[:1], lookup), unlabeled[0]["label"]):
    want = want_labels[image_index].astype(np.int32)
    want[want == constants.STORED_VOID] = constants.IGNORE_LABEL
    np.testing.assert_array_equal(label, want)


def test_num_labeled_draws_a_seeded_subset_and_records_it(tmp_path):
  # The synthetic dataset has no official rule: a seeded uniform draw, written to the workdir.
  cfg = _no_augmentation(_input_config(num_train=10))
  cfg.num_labeled = 3
  cfg.sampling = "permutation"  # every image of a subset within one epoch
  ids = [synthetic.image_id("train", k) for k in range(10)]
  want, _ = splits.select_random_subset(ids, 3, seed=5)
  assert want != splits.select_random_subset(ids, 3, seed=6)[0]
  lookup = _image_lookup("train", range(10), (32, 32))

  def source_ids(batches):
    return {ids[k] for k in _drawn_indices(batches, lookup)}

  kwargs = dict(seed=5, local_batch_size=4, process_index=0, process_count=1)
  workdir = tmp_path / "run"
  labeled = _first_batches(cfg, n=3, workdir=str(workdir), **kwargs)
  assert source_ids(labeled) == set(want)
  recorded, header = splits.read_ids_with_header(str(workdir / splits.LABELED_IDS_FILE))
  assert recorded == want and header["num_labeled"] == "3" and header["seed"] == "5"
  unlabeled = _first_batches(cfg, n=2, stream_name="unlabeled", stream=UNLABELED,
                             workdir=str(workdir), **kwargs)
  assert source_ids(unlabeled) == set(ids) - set(want)
  # Only process 0 writes the file; the others compute the same subset.
  other = tmp_path / "other"
  other.mkdir()
  _first_batches(cfg, n=1, workdir=str(other), seed=5, local_batch_size=4, process_index=1,
                 process_count=2)
  assert not list(other.iterdir())
  cfg.num_labeled = 11
  with pytest.raises(ValueError, match=r"num_labeled=11 is not in \[0, 10\]"):
    _first_batches(cfg, n=1, **kwargs)


def test_ids_for_process_partitions_and_never_starves():
  ids = [f"im{k}" for k in range(7)]
  shares = [datasets.ids_for_process(ids, p, 3) for p in range(3)]
  assert sorted(sum(shares, [])) == sorted(ids)
  assert [len(s) for s in shares] == [3, 2, 2]
  assert [datasets.ids_for_process(ids[:2], p, 4) for p in range(4)] == [
      ["im0"], ["im1"], ["im0"], ["im1"]]


def test_eval_padding_mask_and_equal_batch_counts_across_processes():
  cfg = _input_config(num_val=13, image_size=(20, 28))
  originals, labels = synthetic.generate_split(0, "val", range(13), (20, 28))
  found = []
  counts = []
  for process_index in range(2):
    eval_batches = datasets.create_eval_iterator(
        cfg, split="val", local_batch_size=4, process_index=process_index, process_count=2)
    batches = list(eval_batches())
    assert len(batches) == 2  # 7 and 6 examples -> 2 batches each
    assert len(list(eval_batches())) == 2  # a fresh pass each call
    counts.append(sum(int(b["mask"].sum()) for b in batches))
    for batch in batches:
      assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, 32, 32)
      assert batch["mask"].dtype == bool
      for image, label, mask in zip(batch["image"], batch["label"], batch["mask"]):
        if not mask:
          assert (label == constants.IGNORE_LABEL).all() and (image == 0).all()
          continue
        rgb = _denormalize(image)
        k = next(k for k in range(13) if np.allclose(rgb[:20, :28], originals[k], atol=1e-3))
        found.append(k)
        want_image = np.pad(originals[k].astype(np.float32), ((0, 12), (0, 4), (0, 0)),
                            "reflect")
        np.testing.assert_allclose(rgb, want_image, atol=1e-3)
        want_label = np.pad(labels[k].astype(np.int32), ((0, 12), (0, 4)),
                            constant_values=constants.STORED_VOID)
        want_label[want_label == constants.STORED_VOID] = constants.IGNORE_LABEL
        np.testing.assert_array_equal(label, want_label)
  assert counts == [7, 6]
  assert sorted(found) == list(range(13))


def test_unknown_names_give_one_line_errors():
  cfg = _input_config()
  cfg.dataset = "imagenot"
  with pytest.raises(ValueError, match="unknown input.dataset 'imagenot'; known: synthetic"):
    datasets.get_dataset_info(cfg)
  cfg = _input_config()
  with pytest.raises(ValueError, match="synthetic has no split 'test'; available: train, val"):
    datasets.create_eval_iterator(cfg, split="test", local_batch_size=2, process_index=0,
                                  process_count=1)


def test_dataset_info():
  info = datasets.get_dataset_info(_input_config())
  assert info.name == "synthetic" and info.num_classes == 8
  assert info.class_names == synthetic.CLASS_NAMES
  assert info.palette.shape == (8, 3) and info.palette.dtype == np.uint8
