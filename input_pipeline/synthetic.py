"""An embedded, procedurally generated segmentation dataset (no files, no downloads).

Each image is a textured background with a few textured objects painted over it. Every example
is a pure function of (dataset seed, split, index), so any process can generate any subset of
it, and the `val` images are a fixed set disjoint from `train` (different seed streams).

The task is built to be learnable by a tiny DeepLab in a few hundred steps, but not trivially:
classes come in look-alike pairs that share a colour family and differ only by texture
(disk vs striped disk) or by shape (square vs triangle, ring vs checkered square), objects range
from a few pixels to most of the image, and one class is thin and rare ("pole"). The one-pixel
inner border of larger objects is void (255), as VOC marks object outlines.
"""
from collections.abc import Sequence

import numpy as np

from reco_jax.constants import STORED_VOID, UINT8_MAX

CLASS_NAMES = (
    "background",
    "disk",  # red, plain
    "striped_disk",  # red, stripes: differs from `disk` by texture only
    "square",  # blue, plain
    "triangle",  # blue, plain: differs from `square` by shape only
    "ring",  # green, dotted
    "checker_square",  # green, checkerboard: differs from `ring` by shape and texture
    "pole",  # yellow, thin band: small and rare
)
NUM_CLASSES = len(CLASS_NAMES)
# Display colours (RGB), one per class.
PALETTE = np.array([
    [0, 0, 0],
    [220, 40, 40],
    [255, 150, 150],
    [40, 60, 220],
    [140, 170, 255],
    [30, 170, 60],
    [150, 240, 150],
    [240, 220, 40],
], dtype=np.uint8)

# Base RGB colour of each object class; objects jitter around it.
_CLASS_COLOURS = np.array([
    [0, 0, 0],  # background: drawn separately
    [200, 50, 50],
    [200, 50, 50],
    [50, 70, 200],
    [50, 70, 200],
    [50, 170, 70],
    [50, 170, 70],
    [220, 200, 50],
], dtype=np.float32)
_SHAPES = (None, "disk", "disk", "square", "triangle", "ring", "square", "band")
_TEXTURES = (None, "plain", "stripes", "plain", "plain", "dots", "checker", "plain")
# Sampling weights of the object classes (index 1..7); the pole is rarer.
_CLASS_WEIGHTS = np.array([1, 1, 1, 1, 1, 1, 0.5])
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_MAX_OBJECTS = 5
_MIN_RADIUS = 2.0
_VOID_MIN_RADIUS = 5.0  # smaller objects keep their border: they would vanish otherwise


def image_id(split: str, index: int) -> str:
  """The id of example `index` of `split`, e.g. 'train_00042'."""
  return f"{split}_{index:05d}"


def index_from_id(split: str, example_id: str) -> int:
  """Inverse of `image_id`; raises ValueError naming the id if it is not one of `split`."""
  prefix = f"{split}_"
  if not example_id.startswith(prefix) or not example_id[len(prefix):].isdigit():
    raise ValueError(f"{example_id!r} is not a synthetic {split} id (expected e.g. "
                     f"{image_id(split, 0)!r})")
  return int(example_id[len(prefix):])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
  """`f32[h,w]` in about [-1, 1]: a coarse random grid bilinearly upsampled (low frequency)."""
  grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
  ys = np.linspace(0, cells, h, dtype=np.float32)
  xs = np.linspace(0, cells, w, dtype=np.float32)
  y0 = np.minimum(ys.astype(np.int32), cells - 1)
  x0 = np.minimum(xs.astype(np.int32), cells - 1)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """`f32[h,w,3]`: a muted colour with low-frequency shading and fine grain."""
  grey = rng.uniform(70, 170)
  tint = rng.uniform(-25, 25, size=3)  # low saturation: far from the object colour families
  shading = 30 * _smooth_noise(rng, h, w, cells=int(rng.integers(1, 4)))
  grain = rng.normal(0, 10, size=(h, w, 1))
  return (grey + tint)[None, None, :] + shading[..., None] + grain


def _shape_mask(shape: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                cy: float, cx: float, r: float, angle: float) -> np.ndarray:
  """`bool[h,w]`: pixels inside one object of size r centred at (cy, cx)."""
  dy, dx = yy - cy, xx - cx
  # Coordinates in the object's rotated frame.
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  if shape == "disk":
    return dy**2 + dx**2 <= r**2
  if shape == "ring":
    d2 = dy**2 + dx**2
    return (d2 <= r**2) & (d2 >= (0.55 * r)**2)
  if shape == "square":
    aspect = rng.uniform(0.6, 1.0)
    return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85 * aspect)
  if shape == "triangle":
    # Equilateral triangle: inside all three half-planes of its edges.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
      a = angle + 2 * np.pi * k / 3
      inside &= (dx * np.cos(a) + dy * np.sin(a)) <= 0.5 * r
    return inside
  if shape == "band":
    half_width = rng.uniform(0.8, 2.0)
    return (np.abs(u) <= half_width) & (np.abs(v) <= 2 * r)
  raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, rng: np.random.Generator, yy: np.ndarray,
             xx: np.ndarray) -> np.ndarray:
  """`f32[h,w]` brightness multiplier around 1 (the pattern that tells look-alikes apart)."""
  period = rng.uniform(4.0, 7.0)
  phase = rng.uniform(0, 2 * np.pi)
  a = rng.uniform(0, np.pi)
  u = xx * np.cos(a) + yy * np.sin(a)
  v = -xx * np.sin(a) + yy * np.cos(a)
  if texture == "plain":
    return np.ones_like(u)
  if texture == "stripes":
    return np.where(np.sin(2 * np.pi * u / period + phase) > 0, 1.15, 0.55)
  if texture == "checker":
    s = np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period)
    return np.where(s > 0, 1.15, 0.6)
  if texture == "dots":
    fu = np.mod(u / period + phase, 1.0) - 0.5
    fv = np.mod(v / period, 1.0) - 0.5
    return np.where(fu**2 + fv**2 < 0.09, 0.45, 1.1)
  raise ValueError(f"unknown texture {texture!r}")


def _inner_border(mask: np.ndarray) -> np.ndarray:
  """`bool[h,w]`: pixels of `mask` with a 4-neighbour outside it (or at the image edge)."""
  padded = np.pad(mask, 1, constant_values=False)
  eroded = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])
  return mask & ~eroded


def generate_example(seed: int, split: str, index: int,
                     image_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Generates example `index` of `split`.

  Args:
    seed: dataset seed (the same dataset for every training seed unless changed).
    split: 'train', 'val' or 'test'; each split is its own random stream.
    index: example index.
    image_size: (H, W).

  Returns:
    (u8[H,W,3] image, u8[H,W] label with class ids and 255 = void).
  """
  if split not in _SPLIT_STREAMS:
    raise ValueError(f"unknown synthetic split {split!r}; known: {sorted(_SPLIT_STREAMS)}")
  h, w = int(image_size[0]), int(image_size[1])
  rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  image = _background(rng, h, w)
  label = np.zeros((h, w), np.uint8)
  max_radius = 0.5 * min(h, w)
  num_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
  classes = 1 + rng.choice(NUM_CLASSES - 1, size=num_objects,
                           p=_CLASS_WEIGHTS / _CLASS_WEIGHTS.sum())
  # Paint big objects first so that small ones are rarely hidden.
  radii = np.sort(np.exp(rng.uniform(np.log(_MIN_RADIUS), np.log(max_radius),
                                     size=num_objects)))[::-1]
  for c, r in zip(classes, radii):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, 2 * np.pi)
    mask = _shape_mask(_SHAPES[c], rng, yy, xx, cy, cx, r, angle)
    if not mask.any():
      continue
    colour = _CLASS_COLOURS[c] + rng.uniform(-30, 30, size=3)
    shade = _texture(_TEXTURES[c], rng, yy, xx)[..., None] * rng.uniform(0.8, 1.2)
    pixels = colour * shade + rng.normal(0, 6, size=(h, w, 3))
    image = np.where(mask[..., None], pixels, image)
    label[mask] = c
    if r >= _VOID_MIN_RADIUS and _SHAPES[c] != "band":
      label[_inner_border(mask)] = STORED_VOID
  return np.clip(np.rint(image), 0, UINT8_MAX).astype(np.uint8), label


def generate_split(seed: int, split: str, indices: Sequence[int],
                   image_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Stacks `generate_example` over `indices`: (u8[N,H,W,3], u8[N,H,W])."""
  h, w = int(image_size[0]), int(image_size[1])
  images = np.zeros((len(indices), h, w, 3), np.uint8)
  labels = np.zeros((len(indices), h, w), np.uint8)
  for k, index in enumerate(indices):
    images[k], labels[k] = generate_example(seed, split, int(index), image_size)
  return images, labels
