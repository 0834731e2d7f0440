"""CAC's overlapping crop pairs, on the host (other_methods_spec §1.2; golden/wave2 README §1.1).

Official: `dataloaders/voc.py: PairVOCDataset.__getitem__` and `dataloaders/city.py:
PairCityDataset.__getitem__`. The geometry uses only Python's `random` module, in this order:
long side, crop-1 x then y, up to 50 tries of (x2, y2), flip 1, flip 2. `pair_geometry` makes
the same calls on a `random.Random`, so seeding it as the official seeds `random` reproduces
the official draws exactly. It is plain numpy/Python (it never runs inside jit).
"""
import dataclasses
import random

import numpy as np

MAX_TRIES = 50  # PairVOCDataset: `while tries < 50`
VARIANTS = ("voc", "city")  # how a zero overlap is rejected (`< 0` vs `> 0`)


@dataclasses.dataclass(frozen=True)
class PairGeometry:
  """One crop pair. Corners and boxes are [y, x] in pixels.

  resized_hw: image size after the long-side rescale (before padding); pad_hw: bottom/right
  padding to reach the crop; crop1_yx, crop2_yx: top-left corners in the padded image;
  ul1, br1, ul2, br2: the overlap box in each crop's own (unflipped) coordinates; flip:
  (flip1, flip2); n_tries: tries used (50 = fallback to identical crops); iou: unclipped IoU.
  """
  longside: int
  resized_hw: tuple[int, int]
  pad_hw: tuple[int, int]
  crop1_yx: tuple[int, int]
  crop2_yx: tuple[int, int]
  n_tries: int
  fallback: bool
  iou: float
  ul1: tuple[int, int]
  br1: tuple[int, int]
  ul2: tuple[int, int]
  br2: tuple[int, int]
  flip: tuple[bool, bool]


def resized_size(orig_hw: tuple[int, int], longside: int) -> tuple[int, int]:
  """(h, w) with the long side `longside` (a square image takes the width branch), rounding
  the short side half up as the official `int(x + 0.5)`."""
  h0, w0 = orig_hw
  if h0 > w0:
    return longside, int(longside * w0 / h0 + 0.5)
  return int(longside * h0 / w0 + 0.5), longside


def pair_geometry(rng: random.Random, orig_hw: tuple[int, int], *, base_size: int, crop: int,
                  stride: int = 8, iou_bound: tuple[float, float] = (0.1, 1.0),
                  scale_range: tuple[float, float] = (0.8, 2.0), variant: str = "voc"
                  ) -> PairGeometry:
  """Draws one crop pair exactly as the official pair datasets do.

  Args:
    rng: the Python RNG (the official uses the global `random` module; same call order).
    orig_hw: the image's (H0, W0).
    base_size, crop, stride: VOC 400/320/8, Cityscapes 2048/720/8.
    iou_bound: accepted [lo, hi] of the unclipped IoU.
    scale_range: long side drawn in [int(lo*base), int(hi*base)].
    variant: "voc" rejects a negative overlap, "city" a non-positive one.
  """
  if variant not in VARIANTS:
    raise ValueError(f"pair variant {variant!r} is invalid; expected one of {', '.join(VARIANTS)}")
  longside = rng.randint(int(scale_range[0] * base_size), int(scale_range[1] * base_size))
  h, w = resized_size(orig_hw, longside)
  pad_h, pad_w = max(0, crop - h), max(0, crop - w)
  x1 = rng.randint(0, w + pad_w - crop)
  y1 = rng.randint(0, h + pad_h - crop)
  tries, iou = 0, 1.0
  while tries < MAX_TRIES:
    x2 = rng.randint(0, w + pad_w - crop)
    y2 = rng.randint(0, h + pad_h - crop)
    # Snap the offset to the feature stride (floor toward -inf), then back into the image.
    x2 = (x2 - x1) // stride * stride + x1
    y2 = (y2 - y1) // stride * stride + y1
    if x2 < 0:
      x2 += stride
    if y2 < 0:
      y2 += stride
    ox, oy = crop - abs(x2 - x1), crop - abs(y2 - y1)
    overlaps = (ox > 0 and oy > 0) if variant == "city" else not (ox < 0 or oy < 0)
    if overlaps:
      inter = ox * oy
      iou = inter / (2 * crop * crop - inter)
      if iou_bound[0] <= iou <= iou_bound[1]:
        break
    tries += 1
  if tries == MAX_TRIES:
    x2, y2, iou = x1, y1, 1.0
  dy, dx = y2 - y1, x2 - x1
  h8, w8 = h // stride * stride, w // stride * stride
  ul1 = (max(0, dy), max(0, dx))
  br1 = (min(crop, crop + dy, h8), min(crop, crop + dx, w8))
  ul2 = (max(0, -dy), max(0, -dx))
  br2 = (min(crop, crop - dy, h8), min(crop, crop - dx, w8))
  flip = (rng.random() < 0.5, rng.random() < 0.5)
  return PairGeometry(longside=longside, resized_hw=(h, w), pad_hw=(pad_h, pad_w),
                      crop1_yx=(y1, x1), crop2_yx=(y2, x2), n_tries=tries,
                      fallback=tries == MAX_TRIES, iou=float(iou), ul1=ul1, br1=br1, ul2=ul2,
                      br2=br2, flip=flip)


def feature_slices(geometry: PairGeometry, stride: int = 8) -> dict[str, tuple[int, int]]:
  """[start, stop) rows/cols of each view's overlap at the feature stride (CAC.forward's `//8`)."""
  g = geometry
  return {"rows1": (g.ul1[0] // stride, g.br1[0] // stride),
          "cols1": (g.ul1[1] // stride, g.br1[1] // stride),
          "rows2": (g.ul2[0] // stride, g.br2[0] // stride),
          "cols2": (g.ul2[1] // stride, g.br2[1] // stride)}


def crop_pair(image: np.ndarray, label: np.ndarray, g: PairGeometry, crop: int,
              fill: np.ndarray, ignore: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Both crops of an already resized image u8/f32[h,w,3] and label [h,w] (padded bottom/right
  with `fill` and `ignore`); no flips applied. Returns (image1, label1, image2, label2)."""
  ph, pw = g.pad_hw
  if ph or pw:
    image = np.concatenate([image, np.broadcast_to(fill, (ph, image.shape[1], 3)).astype(image.dtype)], 0)
    image = np.concatenate([image, np.broadcast_to(fill, (image.shape[0], pw, 3)).astype(image.dtype)], 1)
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore)
  out = []
  for y, x in (g.crop1_yx, g.crop2_yx):
    out += [image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]]
  return tuple(out)


# ------------------------------------------------------------------------------------------
# The `unlabeled_pair` stream's transform (tf.data, per example).
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """Static settings of the pair transform (other_methods_spec §1.2, §1.7; the method that
  reads the pair stream builds them from its config).

  crop: square crop side (= input.crop_size); base_size, scale_range: the long side is drawn in
  [int(lo*base), int(hi*base)]; iou_bound, stride, variant: `pair_geometry`'s; jitter_prob,
  blur_prob, grayscale_prob: the per-view photometric augmentation.
  """
  crop: int
  base_size: int
  scale_range: tuple[float, float] = (0.8, 2.0)
  iou_bound: tuple[float, float] = (0.1, 1.0)
  stride: int = 8
  variant: str = "voc"
  jitter_prob: float = 0.8
  blur_prob: float = 0.5
  grayscale_prob: float = 0.2


def python_seed(seed: np.ndarray) -> int:
  """A Python-`random` seed from an i64[2] per-example seed (deterministic, collision-free)."""
  a, b = (int(x) & (2**64 - 1) for x in np.asarray(seed).reshape(2))
  return (a << 64) | b


def _geometry_arrays(orig_hw: np.ndarray, seed: np.ndarray, settings: PairSettings) -> np.ndarray:
  """i32[16]: h, w, pad_h, pad_w, crop1 y x, crop2 y x, ul1, br1, ul2, br2 (y x each)."""
  g = pair_geometry(random.Random(python_seed(seed)), (int(orig_hw[0]), int(orig_hw[1])),
                    base_size=settings.base_size, crop=settings.crop, stride=settings.stride,
                    iou_bound=settings.iou_bound, scale_range=settings.scale_range,
                    variant=settings.variant)
  values = (*g.resized_hw, *g.pad_hw, *g.crop1_yx, *g.crop2_yx, *g.ul1, *g.br1, *g.ul2, *g.br2)
  return np.asarray(values, np.int32), np.asarray(g.flip, bool)


def pair_transform(image, label, seed, settings: PairSettings) -> dict:
  """One overlapping crop pair of an example, with the official geometry (§1.2).

  Args:
    image: u8[H,W,3]; label: u8[H,W,1] (255 = void); seed: i64[2] per-example seed.
  Returns:
    {'image1', 'image2': f32[c,c,3] normalised, 'label1', 'label2': i32[c,c] (-1 = ignore,
     for monitoring), 'ul1', 'br1', 'ul2', 'br2': i32[2] overlap boxes [y, x] in unflipped
     crop pixels, 'flip': bool[2]}, each view flipped (image and label) by its own flag.
  """
  import tensorflow as tf  # the geometry part above stays importable without TF

  from input_pipeline import preprocess

  c = settings.crop
  seed_geo, seed_1, seed_2 = preprocess.split_seed(seed, 3)
  hw = tf.shape(image)[:2]
  geo, flip = tf.numpy_function(lambda hw_, s: _geometry_arrays(hw_, s, settings), [hw, seed_geo],
                                [tf.int32, tf.bool], stateful=False)
  geo = tf.ensure_shape(geo, [16])
  flip = tf.ensure_shape(flip, [2])
  h, w, pad_h, pad_w = geo[0], geo[1], geo[2], geo[3]
  # Official: bicubic image, nearest label (cv2); antialiasing off as cv2's resize.
  img = tf.image.resize(preprocess.to_unit_range(image), tf.stack([h, w]), method="bicubic")
  img = tf.clip_by_value(img, 0.0, 1.0)
  lab = tf.image.resize(label, tf.stack([h, w]), method="nearest")
  # Pad bottom/right: image with the mean colour, label with void.
  mean = tf.constant(preprocess.IMAGENET_MEAN, tf.float32)
  img = tf.pad(img - mean, [[0, pad_h], [0, pad_w], [0, 0]]) + mean
  lab = tf.pad(lab, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=preprocess.STORED_VOID)
  out = {}
  for v, (y, x), view_seed in ((1, (geo[4], geo[5]), seed_1), (2, (geo[6], geo[7]), seed_2)):
    crop_img = tf.ensure_shape(img[y:y + c, x:x + c], [c, c, 3])
    crop_lab = tf.ensure_shape(lab[y:y + c, x:x + c], [c, c, 1])
    seed_jitter, seed_blur, seed_gray = preprocess.split_seed(view_seed, 3)
    if settings.blur_prob > 0:
      crop_img = preprocess.random_blur(crop_img, seed_blur, settings.blur_prob)
    if settings.jitter_prob > 0:
      crop_img = preprocess.color_jitter(crop_img, seed_jitter, settings.jitter_prob)
    if settings.grayscale_prob > 0:
      gray = tf.random.stateless_uniform([], seed_gray) < settings.grayscale_prob
      crop_img = tf.where(gray, tf.tile(preprocess._grayscale(crop_img), [1, 1, 3]), crop_img)
    f = flip[v - 1]
    crop_img = tf.where(f, tf.reverse(crop_img, axis=[1]), crop_img)
    crop_lab = tf.where(f, tf.reverse(crop_lab, axis=[1]), crop_lab)
    out[f"image{v}"] = preprocess.normalize(crop_img)
    out[f"label{v}"] = preprocess.finalize_label(crop_lab)
  out.update(ul1=geo[8:10], br1=geo[10:12], ul2=geo[12:14], br2=geo[14:16], flip=flip)
  return out
