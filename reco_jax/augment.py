"""On-device strong augmentation of the unlabelled batch with its pseudo-labels and confidence.

Everything here is pure `jnp`, jit-able, static-shaped and driven by explicit PRNG keys, so
that it runs inside the train step next to the teacher forward pass. Images are NHWC and
ImageNet-normalised, labels `i32` with -1 = ignore, confidence `f32` in [0, 1].

The official order (train_semisup.py, reco_spec §4 steps 4-6):
1. `random_rescale_crop`: `batch_transform(..., scale_size, apply_augmentation=False)`;
2. `generate_unsup_data`: CutOut / CutMix / ClassMix (module_list.py, reco_spec §3);
3. `photometric_augment`: `batch_transform(..., (1, 1), apply_augmentation=True)`, i.e.
   colour jitter, Gaussian blur and horizontal flip.
`strong_augment` chains the three.

The official steps 1 and 3 round-trip through 8-bit PIL images. `quantize=True` (default)
emulates that: images are truncated to the uint8 grid when they enter (`mul(255).byte()`),
outputs of the PIL operations are rounded to it, and confidences become `floor(255 p)/255`.
The exact PIL integer arithmetic inside each operation is not reproduced (see the
function docstrings); the RNG streams are JAX's, not Python's/torch's.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.constants import IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX
from reco_jax.losses.unsupervised import quantize_confidence, uint8_level_values

MIX_MODES = ("none", "cutout", "cutmix", "classmix")

_HIGHEST = jax.lax.Precision.HIGHEST
# ITU-R 601-2 luma, as PIL's convert('L').
_LUMA = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------------------------
# Pixel-domain helpers.


def _to_unit_range(images: jax.Array) -> jax.Array:
  """ImageNet-normalised `f32[...,3]` -> [0, 1] pixel values (`module_list.py: denormalise`)."""
  return images * jnp.asarray(IMAGENET_STD, images.dtype) + jnp.asarray(IMAGENET_MEAN, images.dtype)


def _normalize(pixels: jax.Array) -> jax.Array:
  return (pixels - jnp.asarray(IMAGENET_MEAN, pixels.dtype)) / jnp.asarray(IMAGENET_STD, pixels.dtype)


def _truncate_to_uint8(pixels: jax.Array) -> jax.Array:
  """`to_pil_image` of a float tensor: `mul(255).byte()` truncates (values may drop a level)."""
  return uint8_level_values(jnp.floor(pixels * UINT8_MAX))


def _round_to_uint8(pixels: jax.Array) -> jax.Array:
  """The uint8 result of a PIL operation (PIL rounds and clips its fixed-point sums)."""
  return uint8_level_values(jnp.floor(pixels * UINT8_MAX + 0.5))


# ------------------------------------------------------------------------------------------
# Masks.


@functools.lru_cache(maxsize=None)
def _cutout_heights(height: int, width: int, ratio: float) -> tuple[int, np.ndarray]:
  """Smallest box width and the box height for every width, as `generate_cutout_mask`.

  `np.random.randint(W/ratio + 1, W)` truncates its float lower bound and
  `h = np.round(H*W/ratio / w)` rounds half to even; both are evaluated here in doubles
  with NumPy itself, so the (w -> h) map is exactly the official one.
  """
  low = int(width / ratio + 1)
  if low > width - 1:
    raise ValueError(f"cutout box: width {width} too small for ratio {ratio} "
                     f"(box width would be drawn from [{low}, {width - 1}])")
  area = height * width / ratio
  heights = np.zeros((width,), np.int32)
  widths = np.arange(low, width)
  heights[low:] = np.round(area / widths).astype(np.int32)
  if heights.max() > height or heights[low:].min() < 1:
    raise ValueError(f"cutout box: height {height} incompatible with width {width}, ratio {ratio}")
  return low, heights


def cutout_box(key: jax.Array, height: int, width: int, ratio: float = 2.0) -> jax.Array:
  """Random box of `generate_cutout_mask`, `i32[4]` = `[y0, y1, x0, x1]` (the zero region).

  `w ~ U_int[floor(W/ratio + 1), W-1]`, `h = round_half_even(H*W/ratio / w)`,
  `x0 ~ U_int[0, W-w]`, `y0 ~ U_int[0, H-h]` (drawn in the official order, from split JAX keys).
  """
  low, heights = _cutout_heights(int(height), int(width), float(ratio))
  key_w, key_x, key_y = jax.random.split(key, 3)
  w = jax.random.randint(key_w, (), low, width, dtype=jnp.int32)
  h = jnp.asarray(heights)[w]
  x0 = jax.random.randint(key_x, (), 0, width - w + 1, dtype=jnp.int32)
  y0 = jax.random.randint(key_y, (), 0, height - h + 1, dtype=jnp.int32)
  return jnp.stack([y0, y0 + h, x0, x0 + w])


def box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
  """`f32[H,W]`: 0 inside `box = [y0, y1, x0, x1]` (half-open), 1 elsewhere."""
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  return jnp.where(inside, 0.0, 1.0).astype(jnp.float32)


def cutout_mask(key: jax.Array, height: int, width: int, ratio: float = 2.0) -> jax.Array:
  """`f32[H,W]` CutOut/CutMix mask of `generate_cutout_mask`: 0 in a random box, else 1."""
  return box_mask(cutout_box(key, height, width, ratio), height, width)


def classmix_mask(key: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """`f32[H,W]` ClassMix mask of `generate_class_mask` for one label map `i32[H,W]`.

  The official code takes `unique(labels)` (sorted, -1 included when present), keeps the
  first `n // 2` of a random permutation and returns `labels ∈ kept`. With static shapes:
  every possible value -1..C-1 gets a distinct random rank from one permutation; the kept
  set is the `n // 2` present values of lowest rank, which is a uniform random subset of
  that size. Values outside [-1, C-1] are a caller error and are never kept.
  """
  in_range = (labels >= -1) & (labels < num_classes)
  # -1..C-1 -> 0..C; anything else -> C+1, which the scatter drops.
  index = jnp.where(in_range, labels + 1, num_classes + 1).reshape(-1)
  present = jnp.zeros((num_classes + 1,), bool).at[index].set(True, mode="drop")
  count = jnp.sum(present)
  rank_key = jax.random.permutation(key, num_classes + 1)
  # Rank of each present value among the present values.
  lower = present[None, :] & (rank_key[None, :] < rank_key[:, None])
  rank = jnp.sum(lower, axis=1)
  kept = present & (rank < count // 2)
  return jnp.where(in_range, kept[jnp.clip(labels + 1, 0, num_classes)], False).astype(jnp.float32)


def classmix_mask_alonso(key: jax.Array, labels: jax.Array, num_classes: int,
                         drop_background: bool = False) -> jax.Array:
  """`f32[H,W]` ClassMix mask of Alonso et al.'s `augment_samples` (trainSSL.py).

  The present classes of `labels i32[H,W]` (ignore -1 removed when another class is present;
  with `drop_background` (VOC) class 0 removed when another class remains), then
  `(n - n mod 2)/2 + 1` of them chosen uniformly without replacement; the mask is 1 on
  their pixels. Unlike ReCo's `classmix_mask` (n // 2 classes), this rule keeps at least
  one class and, for n = 2, both.
  """
  in_range = (labels >= -1) & (labels < num_classes)
  index = jnp.where(in_range, labels + 1, num_classes + 1).reshape(-1)
  present = jnp.zeros((num_classes + 1,), bool).at[index].set(True, mode="drop")
  real = present.at[0].set(False)
  present = jnp.where(jnp.sum(real) > 0, real, present)
  if drop_background:
    others = present.at[1].set(False)
    present = jnp.where(jnp.sum(others) > 0, others, present)
  count = jnp.sum(present)
  rank_key = jax.random.permutation(key, num_classes + 1)
  lower = present[None, :] & (rank_key[None, :] < rank_key[:, None])
  rank = jnp.sum(lower, axis=1)
  kept = present & (rank < (count - count % 2) // 2 + 1)
  return jnp.where(in_range, kept[jnp.clip(labels + 1, 0, num_classes)], False).astype(jnp.float32)


# ------------------------------------------------------------------------------------------
# Mixing.


def mix(images: jax.Array, labels: jax.Array, confidence: jax.Array, masks: jax.Array,
        mode: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`generate_unsup_data` given the per-image masks.

  Args:
    images: `f32[B,H,W,3]` normalised.
    labels: `i32[B,H,W]` pseudo-labels, -1 = ignore.
    confidence: `f32[B,H,W]`.
    masks: `f32[B,H,W]` in {0, 1}: the mask of image i.
    mode: 'cutout' (`x·m`, label -1 where m == 0; 0 in normalised space is the mean colour),
      'cutmix'/'classmix' (`x[i]·m + x[(i+1) % B]·(1−m)` for image, label and confidence;
      labels are mixed in float and truncated, as `.long()`), or 'none'.
  Returns:
    `(images, labels, confidence)` with the input shapes and dtypes.
  """
  if mode not in MIX_MODES:
    raise ValueError(f"mix: mode must be one of {MIX_MODES}, got {mode!r}")
  if mode == "none":
    return images, labels, confidence
  m = masks.astype(jnp.float32)
  if mode == "cutout":
    return (images * m[..., None], jnp.where(1.0 - m != 0, -1, labels).astype(labels.dtype),
            confidence * m)

  def with_partner(x: jax.Array, mask: jax.Array) -> jax.Array:
    return x * mask + jnp.roll(x, -1, axis=0) * (1.0 - mask)

  new_labels = with_partner(labels.astype(jnp.float32), m).astype(labels.dtype)
  return with_partner(images, m[..., None]), new_labels, with_partner(confidence, m)


def generate_unsup_data(key: jax.Array, images: jax.Array, labels: jax.Array, confidence: jax.Array,
                        mode: str, *, num_classes: int | None = None,
                        ratio: float = 2.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one mask per image (from `key`) and applies `mix`; see `mix` for the shapes.

  `num_classes` is required for 'classmix' (the static number of label values).
  """
  if mode not in MIX_MODES:
    raise ValueError(f"generate_unsup_data: mode must be one of {MIX_MODES}, got {mode!r}")
  if mode == "none":
    return images, labels, confidence
  batch, height, width = labels.shape
  keys = jax.random.split(key, batch)
  if mode == "classmix":
    if num_classes is None:
      raise ValueError("generate_unsup_data: mode 'classmix' needs num_classes")
    masks = jax.vmap(classmix_mask, in_axes=(0, 0, None))(keys, labels, num_classes)
  else:
    masks = jax.vmap(lambda k: cutout_mask(k, height, width, ratio))(keys)
  return mix(images, labels, confidence, masks, mode)


# ------------------------------------------------------------------------------------------
# Random rescale, pad and crop.


def _reflect(index: jax.Array, size: jax.Array) -> jax.Array:
  """NumPy 'reflect' padding index (no edge repeat; repeats periodically for long pads)."""
  period = jnp.maximum(2 * (size - 1), 1)
  folded = jnp.mod(index, period)
  return jnp.where(size > 1, jnp.where(folded < size, folded, period - folded), 0)


def _pil_bilinear_weights(dst: jax.Array, out_size: jax.Array, in_size: int) -> jax.Array:
  """`f32[n, in_size]` PIL BILINEAR weights of resized pixels `dst` (`i32[n]`).

  PIL's resampling (`ImagingResample`) uses a triangle filter stretched by the scale factor
  when down-scaling (so it antialiases), centred at `(dst + 0.5)·in/out`, with weights
  normalised over the taps inside the image. Evaluating the filter on every source pixel
  gives the same taps; PIL's fixed-point accumulation and its uint8 rounding between the
  horizontal and vertical passes are not reproduced.
  """
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  support = jnp.maximum(scale, 1.0)
  center = (dst.astype(jnp.float32) + 0.5) * scale
  src = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(1.0 - jnp.abs(src[None, :] - center[:, None]) / support, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def _pil_nearest_index(dst: jax.Array, out_size: jax.Array, in_size: int) -> jax.Array:
  """Source pixel of PIL NEAREST resizing: `floor((dst + 0.5)·in/out)`, in exact integers."""
  src = ((2 * dst + 1) * in_size) // (2 * out_size)
  return jnp.clip(src, 0, in_size - 1)


def _rescale_crop_one(key: jax.Array, image: jax.Array, label: jax.Array, conf: jax.Array,
                      scale_range: tuple[float, float], crop_size: tuple[int, int],
                      quantize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  in_h, in_w = label.shape
  crop_h, crop_w = crop_size
  key_s, key_y, key_x = jax.random.split(key, 3)
  scale = jax.random.uniform(key_s, (), jnp.float32, scale_range[0], scale_range[1])
  # int(H * s), as `transform`; at least one pixel.
  out_h = jnp.maximum(jnp.floor(in_h * scale).astype(jnp.int32), 1)
  out_w = jnp.maximum(jnp.floor(in_w * scale).astype(jnp.int32), 1)
  # Right/bottom padding up to the crop size, then a uniform crop offset (RandomCrop).
  y0 = jax.random.randint(key_y, (), 0, jnp.maximum(out_h, crop_h) - crop_h + 1)
  x0 = jax.random.randint(key_x, (), 0, jnp.maximum(out_w, crop_w) - crop_w + 1)
  rows = y0 + jnp.arange(crop_h)
  cols = x0 + jnp.arange(crop_w)

  # Image: bilinear resize, reflect-padded (the padding reflects the resized image).
  pixels = _to_unit_range(image)
  if quantize:
    pixels = _truncate_to_uint8(pixels)
  weights_y = _pil_bilinear_weights(_reflect(rows, out_h), out_h, in_h)
  weights_x = _pil_bilinear_weights(_reflect(cols, out_w), out_w, in_w)
  pixels = jnp.einsum("rh,hwc->rwc", weights_y, pixels, precision=_HIGHEST)
  pixels = jnp.einsum("sw,rwc->rsc", weights_x, pixels, precision=_HIGHEST)
  if quantize:
    pixels = _round_to_uint8(pixels)
  new_image = _normalize(pixels)

  # Label and confidence: nearest, padded with ignore / 0.
  inside = (rows < out_h)[:, None] & (cols < out_w)[None, :]
  src_y = _pil_nearest_index(rows, out_h, in_h)
  src_x = _pil_nearest_index(cols, out_w, in_w)
  new_label = jnp.where(inside, label[src_y[:, None], src_x[None, :]], -1).astype(label.dtype)
  if quantize:
    conf = quantize_confidence(conf)
  new_conf = jnp.where(inside, conf[src_y[:, None], src_x[None, :]], 0.0).astype(jnp.float32)
  return new_image, new_label, new_conf


def random_rescale_crop(key: jax.Array, images: jax.Array, labels: jax.Array, confidence: jax.Array,
                        scale_range: Sequence[float], crop_size: Sequence[int], *,
                        quantize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`batch_transform(..., apply_augmentation=False)`: per-image random rescale, pad, crop.

  For each image: `s ~ U(scale_range)`; resize to `(int(H·s), int(W·s))` (image PIL
  bilinear, label and confidence PIL nearest); pad right/bottom up to `crop_size` (image
  NumPy-reflect, label -1, confidence 0); crop `crop_size` at a uniform random offset.
  Implemented as per-image separable sampling matrices (image) and index maps (label,
  confidence) evaluated only for the output crop, so all shapes are static.

  Args:
    key: PRNG key.
    images: `f32[B,H,W,3]` normalised.
    labels: `i32[B,H,W]`, -1 = ignore.
    confidence: `f32[B,H,W]`.
    scale_range: `(lo, hi)`, e.g. (0.5, 1.5) for VOC; (1, 1) gives a pure crop/pad.
    crop_size: `(h, w)` of the output.
    quantize: emulate the uint8 PIL round trip (image truncated on entry and rounded after
      resizing; confidence `floor(255 p)/255`).
  Returns:
    `(f32[B,h,w,3], i32[B,h,w], f32[B,h,w])`.
  """
  lo, hi = (float(v) for v in scale_range)
  if not 0.0 < lo <= hi:
    raise ValueError(f"random_rescale_crop: scale_range must satisfy 0 < lo <= hi, got {scale_range}")
  crop = (int(crop_size[0]), int(crop_size[1]))
  keys = jax.random.split(key, labels.shape[0])
  one = functools.partial(_rescale_crop_one, scale_range=(lo, hi), crop_size=crop, quantize=quantize)
  return jax.vmap(one)(keys, images, labels, confidence)


# ------------------------------------------------------------------------------------------
# Photometric augmentation and flip.


def _luma(pixels: jax.Array) -> jax.Array:
  return jnp.einsum("...c,c->...", pixels, jnp.asarray(_LUMA, pixels.dtype), precision=_HIGHEST)


def _blend(degenerate: jax.Array, pixels: jax.Array, factor: jax.Array) -> jax.Array:
  """`PIL.Image.blend(degenerate, image, factor)`, clipped to [0, 1] (ImageEnhance)."""
  return jnp.clip(degenerate + factor * (pixels - degenerate), 0.0, 1.0)


def adjust_brightness(pixels: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Brightness on `f32[H,W,3]` in [0, 1]: blend with black."""
  return _blend(jnp.zeros_like(pixels), pixels, factor)


def adjust_contrast(pixels: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast: blend with the mean grey level (PIL rounds it to a uint8 level)."""
  mean = jnp.floor(jnp.mean(_luma(pixels)) * UINT8_MAX + 0.5) / UINT8_MAX
  return _blend(jnp.full_like(pixels, mean), pixels, factor)


def adjust_saturation(pixels: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Color: blend with the per-pixel grey image."""
  return _blend(jnp.broadcast_to(_luma(pixels)[..., None], pixels.shape), pixels, factor)


def _rgb_to_hsv(pixels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
  maxc = jnp.max(pixels, axis=-1)
  minc = jnp.min(pixels, axis=-1)
  grey = maxc == minc
  chroma = maxc - minc
  sat = chroma / jnp.where(grey, 1.0, maxc)
  divisor = jnp.where(grey, 1.0, chroma)
  rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
  hue = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = jnp.mod(hue / 6.0, 1.0)
  return jnp.where(grey, 0.0, hue), sat, maxc


def _hsv_to_rgb(hue: jax.Array, sat: jax.Array, val: jax.Array) -> jax.Array:
  sector = jnp.floor(hue * 6.0)
  frac = hue * 6.0 - sector
  sector = jnp.mod(sector.astype(jnp.int32), 6)
  p = val * (1.0 - sat)
  q = val * (1.0 - sat * frac)
  t = val * (1.0 - sat * (1.0 - frac))
  choices = jnp.stack([
      jnp.stack([val, t, p], -1), jnp.stack([q, val, p], -1), jnp.stack([p, val, t], -1),
      jnp.stack([p, q, val], -1), jnp.stack([t, p, val], -1), jnp.stack([val, p, q], -1)], 0)
  return jnp.take_along_axis(choices, sector[None, ..., None], axis=0)[0]


def adjust_hue(pixels: jax.Array, factor: jax.Array) -> jax.Array:
  """Rotates the hue by `factor` turns (torchvision `adjust_hue`; PIL works on 256 hue levels)."""
  hue, sat, val = _rgb_to_hsv(pixels)
  return jnp.clip(_hsv_to_rgb(jnp.mod(hue + factor, 1.0), sat, val), 0.0, 1.0)


def gaussian_blur(pixels: jax.Array, sigma: jax.Array, max_radius: int) -> jax.Array:
  """Separable Gaussian blur of `f32[H,W,C]` with a traced `sigma` and static radius.

  PIL's `GaussianBlur(radius=σ)` approximates this Gaussian (σ = its standard deviation)
  with three box blurs and repeats the edge pixels; here the exact Gaussian is truncated at
  `max_radius` taps with edge padding.
  """
  taps = jnp.arange(-max_radius, max_radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(taps / sigma))
  kernel = kernel / jnp.sum(kernel)
  height, width = pixels.shape[:2]
  padded = jnp.pad(pixels, ((max_radius, max_radius), (0, 0), (0, 0)), mode="edge")
  pixels = sum(kernel[k] * padded[k:k + height] for k in range(2 * max_radius + 1))
  padded = jnp.pad(pixels, ((0, 0), (max_radius, max_radius), (0, 0)), mode="edge")
  return sum(kernel[k] * padded[:, k:k + width] for k in range(2 * max_radius + 1))


def _photometric_one(key: jax.Array, image: jax.Array, label: jax.Array, conf: jax.Array, *,
                     jitter_prob: float, brightness: tuple[float, float], contrast: tuple[float, float],
                     saturation: tuple[float, float], hue: tuple[float, float], blur_prob: float,
                     blur_sigma: tuple[float, float], blur_radius: int, flip_prob: float,
                     quantize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  keys = jax.random.split(key, 9)
  settle = _round_to_uint8 if quantize else (lambda x: x)
  pixels = _to_unit_range(image)
  if quantize:
    pixels = _truncate_to_uint8(pixels)

  # Stages with probability 0 are left out of the graph (smaller programs, faster compiles).
  if jitter_prob > 0:
    # ColorJitter.get_params (torchvision <= 0.9): four factors, applied in a random order.
    factors = jnp.stack([
        jax.random.uniform(keys[0], (), jnp.float32, *brightness),
        jax.random.uniform(keys[1], (), jnp.float32, *contrast),
        jax.random.uniform(keys[2], (), jnp.float32, *saturation),
        jax.random.uniform(keys[3], (), jnp.float32, *hue)])
    order = jax.random.permutation(keys[4], 4)
    ops = [lambda x, f: settle(adjust_brightness(x, f)), lambda x, f: settle(adjust_contrast(x, f)),
           lambda x, f: settle(adjust_saturation(x, f)), lambda x, f: settle(adjust_hue(x, f))]
    # A loop rather than four unrolled switches: under vmap every switch evaluates all its
    # branches, and the loop keeps one copy of them in the program.
    jittered = jax.lax.fori_loop(
        0, 4, lambda step, x: jax.lax.switch(order[step], ops, x, factors[order[step]]), pixels)
    pixels = jnp.where(jax.random.bernoulli(keys[5], jitter_prob), jittered, pixels)

  if blur_prob > 0:
    sigma = jax.random.uniform(keys[6], (), jnp.float32, *blur_sigma)
    blurred = settle(gaussian_blur(pixels, sigma, blur_radius))
    pixels = jnp.where(jax.random.bernoulli(keys[7], blur_prob), blurred, pixels)

  if flip_prob > 0:
    flip = jax.random.bernoulli(keys[8], flip_prob)
    pixels = jnp.where(flip, pixels[:, ::-1], pixels)
    label = jnp.where(flip, label[:, ::-1], label)
    conf = jnp.where(flip, conf[:, ::-1], conf)
  return _normalize(pixels), label, conf


def photometric_augment(key: jax.Array, images: jax.Array, labels: jax.Array, confidence: jax.Array,
                        *, jitter_prob: float = 0.8, brightness: Sequence[float] = (0.75, 1.25),
                        contrast: Sequence[float] = (0.75, 1.25),
                        saturation: Sequence[float] = (0.75, 1.25), hue: Sequence[float] = (-0.25, 0.25),
                        blur_prob: float = 0.5, blur_sigma: Sequence[float] = (0.15, 1.15),
                        flip_prob: float = 0.5,
                        quantize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`transform(..., augmentation=True)` at scale 1: colour jitter, blur, horizontal flip.

  Per image, independently: with probability `jitter_prob` a colour jitter whose four
  factors (brightness, contrast, saturation ~ U(range), hue ~ U(range) in turns) are
  applied in a random order, as torchvision 0.8's `ColorJitter.get_params`; with
  probability `blur_prob` a Gaussian blur with σ ~ U(blur_sigma); with probability
  `flip_prob` a horizontal flip of image, label and confidence together. The photometric
  ops act on [0, 1] pixels (de-normalised), the result is re-normalised.

  Args:
    key: PRNG key.
    images: `f32[B,H,W,3]` normalised.
    labels: `i32[B,H,W]`.
    confidence: `f32[B,H,W]`.
    quantize: truncate to the uint8 grid on entry (`mul(255).byte()` in `tensor_to_pil`)
      and round after each PIL operation.
  Returns:
    `(images, labels, confidence)`, same shapes.
  """
  for name, p in (("jitter_prob", jitter_prob), ("blur_prob", blur_prob), ("flip_prob", flip_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"photometric_augment: {name} must be in [0, 1], got {p!r}")
  sigma_lo, sigma_hi = (float(v) for v in blur_sigma)
  if not 0.0 < sigma_lo <= sigma_hi:
    raise ValueError(f"photometric_augment: blur_sigma must satisfy 0 < lo <= hi, got {blur_sigma}")
  one = functools.partial(
      _photometric_one, jitter_prob=float(jitter_prob), brightness=tuple(brightness),
      contrast=tuple(contrast), saturation=tuple(saturation), hue=tuple(hue),
      blur_prob=float(blur_prob), blur_sigma=(sigma_lo, sigma_hi),
      blur_radius=int(np.ceil(3.0 * sigma_hi)), flip_prob=float(flip_prob), quantize=quantize)
  keys = jax.random.split(key, labels.shape[0])
  return jax.vmap(one)(keys, images, labels, confidence)


# ------------------------------------------------------------------------------------------
# The whole chain.


def strong_augment(key: jax.Array, images: jax.Array, labels: jax.Array, confidence: jax.Array, *,
                   mode: str, scale_range: Sequence[float], crop_size: Sequence[int],
                   num_classes: int | None = None, quantize: bool = True,
                   **photometric_kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Official strong augmentation of the unlabelled batch: rescale-crop -> mix -> photometric.

  Args:
    key: PRNG key (split into one key per stage).
    images: `f32[B,H,W,3]` normalised unlabelled crops.
    labels: `i32[B,H,W]` teacher pseudo-labels.
    confidence: `f32[B,H,W]` teacher confidence (max softmax probability).
    mode: 'none' | 'cutout' | 'cutmix' | 'classmix'.
    scale_range: rescale range of the dataset (VOC/SUN (0.5, 1.5), Cityscapes (1, 1)).
    crop_size: `(h, w)` output size.
    num_classes: required for 'classmix'.
    quantize: emulate the uint8 PIL round trips (default, faithful).
    **photometric_kwargs: forwarded to `photometric_augment` (probabilities and ranges).
  Returns:
    `(f32[B,h,w,3], i32[B,h,w], f32[B,h,w])`.
  """
  key_crop, key_mix, key_photo = jax.random.split(key, 3)
  images, labels, confidence = random_rescale_crop(key_crop, images, labels, confidence, scale_range,
                                                   crop_size, quantize=quantize)
  images, labels, confidence = generate_unsup_data(key_mix, images, labels, confidence, mode,
                                                   num_classes=num_classes)
  return photometric_augment(key_photo, images, labels, confidence, quantize=quantize,
                             **photometric_kwargs)
