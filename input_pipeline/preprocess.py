"""Per-example tf.data preprocessing: the official `build_data.py: transform` in stateless TF ops.

Every random op takes an explicit `seed: i64[2]` and uses `tf.random.stateless_*` draws, so a
pipeline is a pure function of its seeds and reproduces exactly (no hidden op-level state).
Each op works eagerly and inside `tf.data.Dataset.map`.

Conventions:
* images are `f32[H,W,3]` in [0, 1] between the ops (uint8 on disk, ImageNet-normalised at the end);
* labels are `u8[H,W,1]` with 255 = void until `finalize_label` maps them to `i32[H,W]` with -1.

The official code works on uint8 PIL images and re-quantises after every photometric op; here the
ops run in float32 and only clip to [0, 1]. The differences are within one grey level.
"""
from collections.abc import Sequence
import math

import tensorflow as tf

# Plain Python (reco_jax/constants.py imports nothing), so this TF code stays JAX-free.
# build_data.py: transform normalises every dataset with the ImageNet statistics.
from reco_jax.constants import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD, STORED_VOID, UINT8_MAX

# build_data.py: transform -> ColorJitter((0.75, 1.25), (0.75, 1.25), (0.75, 1.25), (-0.25, 0.25)).
JITTER_FACTOR_RANGE = (0.75, 1.25)
JITTER_HUE_RANGE = (-0.25, 0.25)
# build_data.py: transform -> GaussianBlur(radius=sigma), sigma ~ U(0.15, 1.15).
BLUR_SIGMA_RANGE = (0.15, 1.15)
# The blur kernel has a static size so that shapes stay static: 3 sigma of the largest sigma.
_BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA_RANGE[1])


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits `i64[2]` into `num` independent `i64[2]` seeds (one per random decision)."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num), num=num)


def _uniform(seed: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi, dtype=tf.float32)


# ------------------------------------------------------------------------------------------
# Geometry.
# ------------------------------------------------------------------------------------------


def random_scale(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                 scale_range: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
  """Rescales image and label by one factor s ~ U(scale_range).

  The new size is `(int(H*s), int(W*s))` as in the official code. The image uses bilinear
  interpolation with antialiasing (PIL BILINEAR is a triangle filter that widens when
  down-scaling); the label uses nearest with half-pixel centres (PIL NEAREST).

  Args:
    image: f32[H,W,3].
    label: u8[H,W,1].
    seed: i64[2].
    scale_range: (lo, hi).

  Returns:
    (f32[h,w,3], u8[h,w,1]).
  """
  lo, hi = float(scale_range[0]), float(scale_range[1])
  if lo == hi == 1.0:
    return image, label  # The unlabelled and eval streams: avoid a pointless resample.
  s = _uniform(seed, lo, hi) if hi > lo else tf.constant(lo, tf.float32)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  size = tf.maximum(tf.cast(hw * s, tf.int32), 1)  # int() truncation, as the official code
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  label = tf.image.resize(label, size, method="nearest")
  return image, label


def reflect_indices(n: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """`i32[size]` source indices of `np.pad(x, (0, size - n), mode='reflect')` for a length-n axis.

  NumPy's reflect repeats the reflection when the pad is longer than the axis, which is a
  triangle wave of period 2(n-1); tf.pad(mode='REFLECT') refuses pads >= n.
  """
  i = tf.range(size)
  period = tf.maximum(2 * (n - 1), 1)
  j = tf.math.floormod(i, period)
  return tf.where(j < n, j, period - j)


def pad_to_size(image: tf.Tensor, label: tf.Tensor,
                size: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Pads right/bottom up to at least `size`: image reflect (as the official), label void.

  Args:
    image: f32[H,W,3].
    label: u8[H,W,1].
    size: (h, w) minimum output size.

  Returns:
    (f32[max(H,h),max(W,w),3], u8[max(H,h),max(W,w),1]).
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out_h, out_w = tf.maximum(h, size[0]), tf.maximum(w, size[1])
  image = tf.gather(image, reflect_indices(h, out_h), axis=0)
  image = tf.gather(image, reflect_indices(w, out_w), axis=1)
  label = tf.pad(label, [[0, out_h - h], [0, out_w - w], [0, 0]], constant_values=STORED_VOID)
  return image, label


def random_crop(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                size: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Crops the same uniformly placed `size` window from image and label (each >= size).

  Args:
    image: f32[H,W,3].
    label: u8[H,W,1].
    seed: i64[2].
    size: (h, w).

  Returns:
    (f32[h,w,3], u8[h,w,1]) with static shapes.
  """
  crop_h, crop_w = int(size[0]), int(size[1])
  image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)  # tensor slicing
  seed_y, seed_x = split_seed(seed, 2)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top = tf.random.stateless_uniform([], seed_y, 0, h - crop_h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seed_x, 0, w - crop_w + 1, dtype=tf.int32)
  image = image[top:top + crop_h, left:left + crop_w]
  label = label[top:top + crop_h, left:left + crop_w]
  # Static shapes for batching (tf.ensure_shape also accepts eager/numpy inputs).
  return tf.ensure_shape(image, [crop_h, crop_w, 3]), tf.ensure_shape(label, [crop_h, crop_w, 1])


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                prob: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Flips image and label left-right together with probability `prob`."""
  flip = _uniform(seed, 0.0, 1.0) < prob
  image = tf.where(flip, tf.reverse(image, axis=[1]), image)
  label = tf.where(flip, tf.reverse(label, axis=[1]), label)
  return image, label


# ------------------------------------------------------------------------------------------
# Photometric (image only).
# ------------------------------------------------------------------------------------------


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """`f32[H,W,1]` ITU-R 601-2 luma, as PIL's convert('L')."""
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black (multiplicative, unlike tf.image's)."""
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the mean grey level of the whole image.

  tf.image.adjust_contrast uses per-channel means instead, which shifts colours.
  """
  mean = tf.reduce_mean(_grayscale(image))
  return tf.clip_by_value(mean + factor * (image - mean), 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the greyscale image (tf.image scales HSV instead)."""
  gray = _grayscale(image)
  return tf.clip_by_value(gray + factor * (image - gray), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """Rotates the hue by `delta` turns (torchvision's hue_factor has the same unit)."""
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """torchvision ColorJitter(0.25, 0.25, 0.25, 0.25), applied with probability `prob`.

  Brightness, contrast and saturation factors ~ U(0.75, 1.25), hue ~ U(-0.25, 0.25); the four
  ops run in a random order, as torchvision 0.8's `ColorJitter.get_params` composes them.

  Args:
    image: f32[H,W,3] in [0, 1].
    seed: i64[2].
    prob: probability of jittering at all.

  Returns:
    f32[H,W,3] in [0, 1].
  """
  seed_apply, seed_order, seed_b, seed_c, seed_s, seed_h = split_seed(seed, 6)
  lo, hi = JITTER_FACTOR_RANGE
  ops = (
      (adjust_brightness, _uniform(seed_b, lo, hi)),
      (adjust_contrast, _uniform(seed_c, lo, hi)),
      (adjust_saturation, _uniform(seed_s, lo, hi)),
      (adjust_hue, _uniform(seed_h, *JITTER_HUE_RANGE)),
  )
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], seed_order))

  def jitter():
    out = image
    for position in range(len(ops)):
      # Bind `out` now: each branch applies one op to the current image.
      branches = [lambda fn=fn, arg=arg, x=out: fn(x, arg) for fn, arg in ops]
      out = tf.switch_case(order[position], branches)
    return out

  return tf.cond(_uniform(seed_apply, 0.0, 1.0) < prob, jitter, lambda: image)


def gaussian_kernel(sigma: tf.Tensor) -> tf.Tensor:
  """`f32[2r+1]` normalised Gaussian taps for a static radius r = ceil(3 * max sigma)."""
  x = tf.range(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur with edge replication (PIL's box blurs clamp at the border).

  PIL's GaussianBlur approximates the Gaussian with three box blurs; this is the exact one.

  Args:
    image: f32[H,W,3].
    sigma: f32[] standard deviation in pixels, <= BLUR_SIGMA_RANGE[1].

  Returns:
    f32[H,W,3].
  """
  r = _BLUR_RADIUS
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # Edge replication by clamped gathers works for any image size (tf.pad modes need H, W > r).
  rows = tf.clip_by_value(tf.range(-r, h + r), 0, h - 1)
  cols = tf.clip_by_value(tf.range(-r, w + r), 0, w - 1)
  padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)[None]
  k = gaussian_kernel(sigma)
  k_rows = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  k_cols = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, k_rows, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, k_cols, [1, 1, 1, 1], "VALID")
  return out[0]


def random_blur(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """Gaussian blur with sigma ~ U(0.15, 1.15), applied with probability `prob`."""
  seed_apply, seed_sigma = split_seed(seed, 2)
  sigma = _uniform(seed_sigma, *BLUR_SIGMA_RANGE)
  return tf.cond(_uniform(seed_apply, 0.0, 1.0) < prob,
                 lambda: gaussian_blur(image, sigma), lambda: image)


# ------------------------------------------------------------------------------------------
# Output conversion and the composed transforms.
# ------------------------------------------------------------------------------------------


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """`u8[...]` -> `f32[...]` in [0, 1] (`ToTensor`)."""
  return tf.cast(image, tf.float32) / float(UINT8_MAX)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """`f32[...,3]` in [0, 1] -> ImageNet mean/std normalised."""
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def finalize_label(label: tf.Tensor) -> tf.Tensor:
  """`u8[H,W,1]` with 255 = void -> `i32[H,W]` with -1 = ignore."""
  label = tf.cast(label[..., 0], tf.int32)
  return tf.where(label == STORED_VOID, IGNORE_LABEL, label)


def train_transform(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *,
                    crop_size: Sequence[int], scale_range: Sequence[float],
                    flip_prob: float, color_jitter_prob: float,
                    blur_prob: float) -> dict[str, tf.Tensor]:
  """The official training transform: scale, pad, crop, jitter, blur, flip, normalise.

  The unlabelled stream calls this with `scale_range=(1, 1)` and all probabilities 0
  (crop/pad only, `build_data.py: BuildDataset(augmentation=False, scale_size=(1, 1))`).

  Args:
    image: u8[H,W,3].
    label: u8[H,W,1] with 255 = void.
    seed: i64[2] per-example seed.
    crop_size: (h, w).
    scale_range: (lo, hi) for the random rescale.
    flip_prob, color_jitter_prob, blur_prob: probabilities of each augmentation.

  Returns:
    {'image': f32[h,w,3] normalised, 'label': i32[h,w] with -1 = ignore}.
  """
  seed_scale, seed_crop, seed_jitter, seed_blur, seed_flip = split_seed(seed, 5)
  image = to_unit_range(image)
  image, label = random_scale(image, label, seed_scale, scale_range)
  image, label = pad_to_size(image, label, crop_size)
  image, label = random_crop(image, label, seed_crop, crop_size)
  if color_jitter_prob > 0:
    image = color_jitter(image, seed_jitter, color_jitter_prob)
  if blur_prob > 0:
    image = random_blur(image, seed_blur, blur_prob)
  if flip_prob > 0:
    image, label = random_flip(image, label, seed_flip, flip_prob)
  return {"image": normalize(image), "label": finalize_label(label)}


def eval_transform(image: tf.Tensor, label: tf.Tensor, image_id: tf.Tensor,
                   eval_size: Sequence[int]) -> dict[str, tf.Tensor]:
  """Pads one eval example right/bottom to `eval_size` (image reflect, label void).

  Args:
    image: u8[H,W,3] with H, W <= eval_size.
    label: u8[H,W,1].
    image_id: tf.string, named in the error if the image is larger than `eval_size`.
    eval_size: (He, We).

  Returns:
    {'image': f32[He,We,3], 'label': i32[He,We], 'mask': bool[] (True)}.
  """
  eval_h, eval_w = int(eval_size[0]), int(eval_size[1])
  shape = tf.shape(image)
  # One formatted string keeps the error on one line.
  message = tf.strings.join([
      "eval image ", image_id, " is ", tf.strings.as_string(shape[0]), "x",
      tf.strings.as_string(shape[1]), f" (HxW), larger than input.eval_size {eval_h}x{eval_w}"])
  check = tf.debugging.Assert(tf.logical_and(shape[0] <= eval_h, shape[1] <= eval_w), [message])
  with tf.control_dependencies([check]):
    image = to_unit_range(image)
  image, label = pad_to_size(image, label, (eval_h, eval_w))
  # A no-op after the check; it keeps static shapes consistent when they are known.
  image = tf.ensure_shape(image[:eval_h, :eval_w], [eval_h, eval_w, 3])
  label = tf.ensure_shape(label[:eval_h, :eval_w], [eval_h, eval_w, 1])
  return {"image": normalize(image), "label": finalize_label(label),
          "mask": tf.constant(True)}
