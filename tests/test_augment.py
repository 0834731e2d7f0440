"""Tests for reco_jax.augment: goldens (mixing.npz, cutout_mask_numpy_seeds.npz), PIL, invariants."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from scipy import ndimage, stats

from reco_jax import augment

MEAN = np.asarray(augment.IMAGENET_MEAN, np.float32)
STD = np.asarray(augment.IMAGENET_STD, np.float32)
# Jitted entry points shared by the tests, so that equal configurations compile once.
CROP = jax.jit(augment.random_rescale_crop, static_argnames=("scale_range", "crop_size", "quantize"))
PHOTO = jax.jit(augment.photometric_augment,
                static_argnames=("jitter_prob", "blur_prob", "flip_prob", "quantize", "blur_sigma"))
GOLDEN_SIZES = {"33x33": (33, 33), "321x321": (321, 321), "512x512": (512, 512), "17x40": (17, 40)}


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _normalise(pixels):
  return ((pixels - MEAN) / STD).astype(np.float32)


def _pixels(images):
  return np.asarray(images) * STD + MEAN


def _legacy_box(seed, height, width):
  """module_list.generate_cutout_mask(ratio=2) with the NumPy legacy global RNG."""
  rs = np.random.RandomState(seed)
  w = rs.randint(width / 2 + 1, width)
  h = int(np.round(height * width / 2 / w))
  x0 = rs.randint(0, width - w + 1)
  y0 = rs.randint(0, height - h + 1)
  return np.asarray([y0, y0 + h, x0, x0 + w])


# ---- mixing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cutout", "cutmix", "classmix"])
def test_mix_matches_golden_given_masks(golden, mode):
  g = golden("mixing.npz")
  images = jnp.asarray(np.transpose(g["data"], (0, 2, 3, 1)))
  labels = jnp.asarray(g["target"].astype(np.int32))
  out = jax.jit(augment.mix, static_argnames="mode")(
      images, labels, jnp.asarray(g["logits"]), jnp.asarray(g[f"{mode}_masks"]), mode=mode)
  np.testing.assert_array_equal(np.asarray(out[0]), np.transpose(g[f"{mode}_new_data"], (0, 2, 3, 1)))
  np.testing.assert_array_equal(np.asarray(out[1]), g[f"{mode}_new_target"])
  assert out[1].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out[2]), g[f"{mode}_new_logits"])


def test_golden_classmix_masks_have_the_subset_property(golden):
  """Sanity of the property checker on the official masks (and ⌊n/2⌋ with -1 counted)."""
  g = golden("mixing.npz")
  for i in range(3):
    n, n_sel = g["classmix_n_unique_and_n_selected"][i]
    assert _classmix_kept(g["target"][i], g["classmix_masks"][i]).size == n_sel == n // 2


def _classmix_kept(labels, mask):
  """Labels selected by `mask`; fails unless the mask is constant on every label's pixels."""
  kept = []
  for value in np.unique(labels):
    on = np.unique(mask[labels == value])
    assert on.size == 1 and on[0] in (0.0, 1.0), f"mask not constant on label {value}"
    if on[0] == 1.0:
      kept.append(value)
  return np.asarray(kept)


def test_classmix_mask_is_a_uniform_half_subset():
  rng = np.random.default_rng(0)
  labels = rng.choice(np.asarray([-1, 0, 3, 4, 6]), size=(9, 10)).astype(np.int32)
  labels[0, :5] = [-1, 0, 3, 4, 6]
  masks = np.asarray(jax.jit(jax.vmap(augment.classmix_mask, in_axes=(0, None, None)),
                             static_argnums=2)(_keys(600), jnp.asarray(labels), 7))
  subsets = [tuple(_classmix_kept(labels, m)) for m in masks]
  assert all(len(s) == 2 for s in subsets)  # n = 5 unique labels (-1 included) -> 2
  counts = {s: subsets.count(s) for s in itertools.combinations([-1, 0, 3, 4, 6], 2)}
  assert set(subsets) == set(counts)  # all 10 subsets and nothing else
  assert stats.chisquare(list(counts.values())).pvalue > 1e-4


def test_classmix_mask_single_label_and_determinism():
  labels = jnp.full((5, 6), 2, jnp.int32)
  assert float(jnp.sum(augment.classmix_mask(jax.random.key(1), labels, 4))) == 0.0  # ⌊1/2⌋ = 0
  labels = jnp.asarray(np.arange(30).reshape(5, 6) % 4, jnp.int32)
  a = augment.classmix_mask(jax.random.key(3), labels, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(augment.classmix_mask(jax.random.key(3), labels, 4)))


# ---- cutout / cutmix boxes ---------------------------------------------------------------------


def test_golden_numpy_boxes_follow_the_formula_and_the_legacy_sampler(golden):
  g = golden("cutout_mask_numpy_seeds.npz")
  for name, (height, width) in GOLDEN_SIZES.items():
    rects = g[f"rect_{name}"]
    for seed, rect in zip(g["seeds"], rects):
      np.testing.assert_array_equal(_legacy_box(int(seed), height, width), rect, err_msg=f"{name} {seed}")
      w, h = rect[3] - rect[2], rect[1] - rect[0]
      assert int(width / 2 + 1) <= w <= width - 1 and h == np.round(height * width / 2 / w)
  for seed, rect in enumerate(g["rect_33x33"]):
    np.testing.assert_array_equal(np.asarray(augment.box_mask(jnp.asarray(rect), 33, 33)), g["masks_33x33"][seed])


@pytest.mark.parametrize("name", list(GOLDEN_SIZES))
def test_box_distribution_matches_the_numpy_sampler(name):
  height, width = GOLDEN_SIZES[name]
  n = 20000
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: augment.cutout_box(k, height, width)))(_keys(n)))
  y0, y1, x0, x1 = boxes.T
  w, h = x1 - x0, y1 - y0
  low = int(width / 2 + 1)
  support = np.arange(low, width)
  assert set(np.unique(w)) == set(support)
  np.testing.assert_array_equal(h, np.round(height * width / 2 / w).astype(int))
  assert np.all((x0 >= 0) & (x1 <= width) & (y0 >= 0) & (y1 <= height))
  # w is uniform on its support, and distributed as the official legacy sampler's w.
  hist = np.bincount(w - low, minlength=support.size)
  assert stats.chisquare(hist).pvalue > 1e-4
  legacy = np.random.RandomState(0).randint(width / 2 + 1, width, size=n)
  table = np.stack([hist, np.bincount(legacy - low, minlength=support.size)])
  assert stats.chi2_contingency(table).pvalue > 1e-4
  # Offsets are uniform given the box size: standardised offsets have mean 1/2, variance ~1/12.
  for start, free in ((x0, width - w), (y0, height - h)):
    has_room = free > 0
    u = (start[has_room] + 0.5) / (free[has_room] + 1)
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert start.min() == 0 and np.all(start <= free) and np.any(start[has_room] == free[has_room])


def test_cutout_mask_is_the_box_and_key_driven():
  keys = _keys(2)
  mask = np.asarray(augment.cutout_mask(keys[0], 17, 40))
  y0, y1, x0, x1 = np.asarray(augment.cutout_box(keys[0], 17, 40))
  assert mask.dtype == np.float32 and mask[y0:y1, x0:x1].sum() == 0 and mask.sum() == 17 * 40 - (y1 - y0) * (x1 - x0)
  np.testing.assert_array_equal(mask, np.asarray(augment.cutout_mask(keys[0], 17, 40)))
  assert not np.array_equal(mask, np.asarray(augment.cutout_mask(keys[1], 17, 40)))


def test_too_small_width_raises():
  with pytest.raises(ValueError, match="width 3"):
    augment.cutout_box(jax.random.key(0), 5, 3, ratio=1.0)


# ---- generate_unsup_data ------------------------------------------------------------------------


def _position_batch(batch, height, width):
  """Image channel 0, label and confidence all encode the flat pixel id."""
  ids = np.arange(batch * height * width).reshape(batch, height, width)
  images = np.stack([ids, ids % 7, ids % 5], -1).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(ids.astype(np.int32)), jnp.asarray(ids / 1e4, jnp.float32)


@pytest.mark.parametrize("mode", ["cutout", "cutmix", "classmix"])
def test_generate_unsup_data_keeps_image_label_confidence_aligned(mode):
  images, labels, conf = _position_batch(3, 6, 8)
  small = labels % 4 if mode == "classmix" else labels  # ClassMix needs labels < num_classes
  fn = jax.jit(augment.generate_unsup_data, static_argnames=("mode", "num_classes"))
  out_i, out_l, out_c = fn(jax.random.key(0), images, small, conf, mode=mode, num_classes=4)
  again = fn(jax.random.key(0), images, small, conf, mode=mode, num_classes=4)
  for a, b in zip((out_i, out_l, out_c), again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = np.asarray(out_i[..., 0]).astype(np.int64)
  np.testing.assert_allclose(np.asarray(out_c), ids / 1e4, rtol=1e-6)
  source_image = ids // 48
  b = np.arange(3)[:, None, None]
  if mode == "cutout":
    cut = np.asarray(out_l) == -1
    assert cut.sum() > 0 and np.all(ids[cut] == 0) and np.all(np.asarray(out_c)[cut] == 0)
    np.testing.assert_array_equal(ids[~cut], np.asarray(labels)[~cut])
  else:
    np.testing.assert_array_equal(np.asarray(out_l), np.asarray(small).reshape(-1)[ids])
    assert np.all((source_image == b) | (source_image == (b + 1) % 3))
    assert np.all(ids % 48 == np.arange(48).reshape(6, 8))  # pixels never move
  if mode == "cutmix":
    assert np.all(((source_image == b).sum((1, 2)) * 2) >= 48 - 6)  # the box covers about half


def test_generate_unsup_data_none_and_bad_mode():
  images, labels, conf = _position_batch(2, 4, 4)
  out = augment.generate_unsup_data(jax.random.key(0), images, labels, conf, "none")
  assert out[0] is images and out[1] is labels and out[2] is conf
  with pytest.raises(ValueError, match="mode"):
    augment.generate_unsup_data(jax.random.key(0), images, labels, conf, "mixup")
  with pytest.raises(ValueError, match="num_classes"):
    augment.generate_unsup_data(jax.random.key(0), images, labels, conf, "classmix")


# ---- random rescale / pad / crop --------------------------------------------------------------


def test_rescale_crop_at_scale_one_is_an_aligned_crop():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(2, 11, 13, 3)) / 255.0
  labels = np.arange(2 * 11 * 13).reshape(2, 11, 13).astype(np.int32)
  conf = rng.uniform(size=(2, 11, 13)).astype(np.float32)
  out = CROP(jax.random.key(1), jnp.asarray(_normalise(pixels)), jnp.asarray(labels), jnp.asarray(conf),
             scale_range=(1.0, 1.0), crop_size=(7, 9), quantize=False)
  out_l = np.asarray(out[1])
  for b in range(2):
    y0, x0 = divmod(int(out_l[b, 0, 0]) - b * 143, 13)
    np.testing.assert_array_equal(out_l[b], labels[b, y0:y0 + 7, x0:x0 + 9])
    np.testing.assert_allclose(_pixels(out[0][b]), pixels[b, y0:y0 + 7, x0:x0 + 9], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[2][b]), conf[b, y0:y0 + 7, x0:x0 + 9])


def test_rescale_crop_aligns_image_label_and_confidence_under_scaling():
  height, width = 24, 28
  yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  coords = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.float32)[None].repeat(4, 0)
  labels = (yy * width + xx).astype(np.int32)[None].repeat(4, 0)
  conf = (labels / 1000).astype(np.float32)
  out = CROP(jax.random.key(2), jnp.asarray(_normalise(coords)), jnp.asarray(labels), jnp.asarray(conf),
             scale_range=(0.6, 1.4), crop_size=(20, 20), quantize=False)
  image, out_l, out_c = (np.asarray(o) for o in out)
  valid = out_l >= 0
  assert valid.sum() > 0
  np.testing.assert_allclose(out_c[valid], out_l[valid] / 1000, rtol=1e-6)
  np.testing.assert_array_equal(out_c[~valid], 0)
  src_y, src_x = np.divmod(out_l, width)
  coord = image * STD + MEAN
  # Bilinear samples `(dst + 0.5)·in/out - 0.5`, nearest picks floor((dst + 0.5)·in/out).
  interior = valid & (src_y > 2) & (src_y < height - 3) & (src_x > 2) & (src_x < width - 3)
  assert interior.sum() > 100
  for axis, src in ((0, src_y), (1, src_x)):
    diff = coord[..., axis][interior] - src[interior]
    assert np.all(diff >= -0.5 - 1e-3) and np.all(diff <= 0.5 + 1e-3)
    assert np.all(np.abs(coord[..., axis][valid] - src[valid]) <= 1.0 + 1e-3)


def test_rescale_crop_pads_right_bottom():
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, size=(1, 20, 24, 3)) / 255.0
  labels = jnp.asarray(rng.integers(0, 5, size=(1, 20, 24)), jnp.int32)
  conf = jnp.full((1, 20, 24), 0.9)
  image, out_l, out_c = (np.asarray(o) for o in CROP(
      jax.random.key(0), jnp.asarray(_normalise(pixels)), labels, conf, scale_range=(0.5, 0.5), crop_size=(20, 24)))
  # Resized to 10x12, padded to 20x24, crop offset necessarily 0.
  assert np.all(out_l[0, :10, :12] >= 0) and np.all(out_l[0, 10:] == -1) and np.all(out_l[0, :, 12:] == -1)
  assert np.all(out_c[0, 10:] == 0) and np.all(out_c[0, :, 12:] == 0)
  np.testing.assert_allclose(out_c[0, :10, :12], np.floor(np.float32(0.9) * np.float32(255)) / 255, atol=1e-7)
  # NumPy reflect (no edge repeat, periodic for pads longer than the image).
  reflect_rows = [min(r % 18, 18 - r % 18) for r in range(20)]
  reflect_cols = [min(c % 22, 22 - c % 22) for c in range(24)]
  np.testing.assert_array_equal(image[0], image[0][reflect_rows][:, reflect_cols])


@pytest.mark.parametrize("scale", [0.6, 1.4])
def test_rescale_matches_pil(scale):
  rng = np.random.default_rng(4)
  height, width = 23, 31
  smooth = ndimage.gaussian_filter(rng.uniform(0, 255, size=(height, width, 3)), (1.5, 1.5, 0))
  uint8 = np.clip(np.round(smooth), 0, 255).astype(np.uint8)
  labels = rng.integers(0, 200, size=(height, width)).astype(np.uint8)
  size = (int(height * scale), int(width * scale))
  out = CROP(jax.random.key(0), jnp.asarray(_normalise(uint8[None] / np.float32(255))),
             jnp.asarray(labels[None], jnp.int32), jnp.ones((1, height, width)), scale_range=(scale, scale),
             crop_size=size, quantize=False)
  want_image = np.asarray(Image.fromarray(uint8).resize(size[::-1], Image.BILINEAR), np.float32)
  want_labels = np.asarray(Image.fromarray(labels).resize(size[::-1], Image.NEAREST))
  np.testing.assert_array_equal(np.asarray(out[1][0]), want_labels)
  got = _pixels(out[0][0]) * 255
  # PIL rounds to uint8 after its horizontal and its vertical pass (<= 1 level in total).
  assert np.max(np.abs(got - want_image)) <= 1.0 + 1e-3
  assert np.mean(np.abs(got - want_image)) < 0.4
  # A plain (non-antialiased) bilinear resize would be far off when down-scaling.
  if scale < 1:
    plain = jax.image.resize(jnp.asarray(uint8, jnp.float32), (*size, 3), "linear", antialias=False)
    assert np.max(np.abs(np.asarray(plain) - want_image)) > 3


def test_rescale_crop_bad_scale_raises():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match="scale_range"):
    augment.random_rescale_crop(jax.random.key(0), x, jnp.zeros((1, 4, 4), jnp.int32), jnp.zeros((1, 4, 4)),
                                (1.5, 0.5), (4, 4))


# ---- photometric ----------------------------------------------------------------------------


def _random_uint8(shape, seed):
  return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


@pytest.mark.parametrize("op,enhancer", [(augment.adjust_brightness, ImageEnhance.Brightness),
                                         (augment.adjust_contrast, ImageEnhance.Contrast),
                                         (augment.adjust_saturation, ImageEnhance.Color)])
@pytest.mark.parametrize("factor", [0.75, 1.2])
def test_enhance_ops_match_pil(op, enhancer, factor):
  uint8 = _random_uint8((9, 11, 3), 5)
  got = np.asarray(op(jnp.asarray(uint8 / np.float32(255)), jnp.float32(factor))) * 255
  want = np.asarray(enhancer(Image.fromarray(uint8)).enhance(factor), np.float32)
  # PIL rounds the grey image to uint8 before blending, we do not.
  assert np.max(np.abs(got - want)) <= 1.5 and np.mean(np.abs(got - want)) < 0.5


@pytest.mark.parametrize("factor", [-0.25, 0.1, 0.25])
def test_adjust_hue_matches_colorsys(factor):
  import colorsys
  pixels = np.random.default_rng(6).uniform(size=(5, 7, 3)).astype(np.float32)
  pixels[0, 0] = [0.5, 0.5, 0.5]  # grey: hue undefined, unchanged
  want = np.asarray([colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)
                     for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels.reshape(-1, 3))]).reshape(pixels.shape)
  got = np.asarray(augment.adjust_hue(jnp.asarray(pixels), jnp.float32(factor)))
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("sigma", [0.15, 0.7, 1.15])
def test_gaussian_blur_matches_scipy(sigma):
  pixels = np.random.default_rng(7).uniform(size=(12, 10, 3)).astype(np.float32)
  got = np.asarray(augment.gaussian_blur(jnp.asarray(pixels), jnp.float32(sigma), 4))
  want = ndimage.gaussian_filter(pixels.astype(np.float64), (sigma, sigma, 0), mode="nearest", truncate=4 / sigma)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_photometric_flip_keeps_alignment_and_identity_when_disabled():
  images, labels, conf = _position_batch(6, 4, 5)
  images = images / 1000.0
  kwargs = dict(jitter_prob=0.0, blur_prob=0.0, quantize=False)
  same = PHOTO(jax.random.key(0), images, labels, conf, flip_prob=0.0, **kwargs)
  np.testing.assert_allclose(np.asarray(same[0]), np.asarray(images), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(same[1]), np.asarray(labels))
  flipped = PHOTO(jax.random.key(0), images, labels, conf, flip_prob=1.0, **kwargs)
  np.testing.assert_array_equal(np.asarray(flipped[1]), np.asarray(labels)[:, :, ::-1])
  np.testing.assert_array_equal(np.asarray(flipped[2]), np.asarray(conf)[:, :, ::-1])
  np.testing.assert_allclose(np.asarray(flipped[0]), np.asarray(images)[:, :, ::-1], atol=1e-6)
  half = PHOTO(jax.random.key(1), images, labels, conf, flip_prob=0.5, **kwargs)
  ids = np.round(np.asarray(half[0][..., 0]) * 1000).astype(int)
  np.testing.assert_array_equal(ids, np.asarray(half[1]))
  np.testing.assert_allclose(np.asarray(half[2]), np.asarray(half[1]) / 1e4, rtol=1e-6)


def test_photometric_probabilities():
  n = 2000
  uint8 = np.broadcast_to(_random_uint8((1, 6, 6, 3), 8), (n, 6, 6, 3))
  images = jnp.asarray(_normalise(uint8 / np.float32(255)))
  labels = jnp.asarray(np.broadcast_to(np.arange(36).reshape(1, 6, 6), (n, 6, 6)), jnp.int32)
  conf = jnp.zeros((n, 6, 6))

  def frac(**kw):
    base = dict(jitter_prob=0.0, blur_prob=0.0, flip_prob=0.0, quantize=False)
    out = PHOTO(jax.random.key(9), images, labels, conf, **{**base, **kw})
    if "flip_prob" in kw:
      changed = np.any(np.asarray(out[1]) != np.asarray(labels), axis=(1, 2))
    else:
      changed = np.any(np.abs(_pixels(out[0]) - uint8 / 255) > 0.6 / 255, axis=(1, 2, 3))
    return changed.mean()

  tol = 5 * np.sqrt(0.25 / n)
  assert abs(frac(flip_prob=0.5) - 0.5) < tol
  assert abs(frac(blur_prob=0.5, blur_sigma=(1.0, 1.15)) - 0.5) < tol  # σ = 0.15 is invisible
  assert abs(frac(jitter_prob=0.8) - 0.8) < tol + 0.01  # a few jitters round back to the input


def test_quantize_switch_puts_pixels_on_the_uint8_grid():
  rng = np.random.default_rng(10)
  images = jnp.asarray(_normalise(rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)))
  labels = jnp.zeros((3, 8, 8), jnp.int32)
  conf = jnp.asarray(rng.uniform(size=(3, 8, 8)), jnp.float32)
  for fn in (lambda q: PHOTO(jax.random.key(0), images, labels, conf, quantize=q),
             lambda q: CROP(jax.random.key(0), images, labels, conf, scale_range=(0.7, 1.3), crop_size=(8, 8),
                            quantize=q)):
    levels = _pixels(fn(True)[0]) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=2e-3)
    levels = _pixels(fn(False)[0]) * 255
    assert np.mean(np.abs(levels - np.round(levels)) > 0.01) > 0.5
  # Truncation on entry: a value just under a level drops to the level below (mul(255).byte()).
  pixels = np.full((1, 2, 2, 3), 100.9 / 255, np.float32)
  out = PHOTO(jax.random.key(0), jnp.asarray(_normalise(pixels)), labels[:1, :2, :2], conf[:1, :2, :2],
              jitter_prob=0.0, blur_prob=0.0, flip_prob=0.0)
  np.testing.assert_allclose(_pixels(out[0]) * 255, 100.0, atol=1e-3)


# ---- the whole chain -------------------------------------------------------------------------


STRONG = jax.jit(augment.strong_augment, static_argnames=("mode", "scale_range", "crop_size", "num_classes"))
STRONG_KWARGS = dict(mode="classmix", scale_range=(0.5, 1.5), crop_size=(8, 10), num_classes=5)


def _teacher_outputs(seed):
  """Unlabelled crops with teacher-like pseudo-labels (argmax, never -1) and confidences."""
  rng = np.random.default_rng(seed)
  images = _normalise(rng.integers(0, 256, size=(8, 10, 12, 3)) / np.float32(255))
  labels = rng.integers(0, 5, size=(8, 10, 12)).astype(np.int32)
  conf = rng.uniform(0.5, 1, size=(8, 10, 12)).astype(np.float32)
  return images, labels, conf


def test_strong_augment_is_jittable_deterministic_and_consistent():
  images, labels, conf = (jnp.asarray(a) for a in _teacher_outputs(11))
  out = STRONG(jax.random.key(0), images, labels, conf, **STRONG_KWARGS)
  again = STRONG(jax.random.key(0), images, labels, conf, **STRONG_KWARGS)
  other = STRONG(jax.random.key(1), images, labels, conf, **STRONG_KWARGS)
  assert out[0].shape == (8, 8, 10, 3) and out[1].shape == (8, 8, 10) and out[2].shape == (8, 8, 10)
  assert out[1].dtype == jnp.int32 and out[2].dtype == jnp.float32
  for a, b in zip(out, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(out[1]), np.asarray(other[1]))
  out_l, out_c = np.asarray(out[1]), np.asarray(out[2])
  assert set(np.unique(out_l)) <= set(range(-1, 5)) and np.any(out_l == -1)  # scale < 1 pads
  np.testing.assert_allclose(out_c * 255, np.round(out_c * 255), atol=1e-4)  # floor(255 p)/255
  # Label and confidence travel together: ignore (padding) <=> confidence 0.
  np.testing.assert_array_equal(out_l == -1, out_c == 0)


def test_strong_augment_sharded_equals_single_device(mesh):
  from reco_jax import parallel
  arrays = _teacher_outputs(12)
  single = jax.block_until_ready(STRONG(jax.random.key(5), *(jnp.asarray(a) for a in arrays), **STRONG_KWARGS))
  sharding = parallel.data_sharded(mesh)
  sharded = jax.block_until_ready(
      STRONG(jax.random.key(5), *(jax.device_put(a, sharding) for a in arrays), **STRONG_KWARGS))
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_classmix_ignores_out_of_range_labels():
  labels = jnp.asarray([[0, 1, 7, -5]], jnp.int32)  # 7 and -5 are outside [-1, C-1] for C = 3
  masks = jax.vmap(augment.classmix_mask, in_axes=(0, None, None))(_keys(50), labels, 3)
  np.testing.assert_array_equal(np.asarray(masks[:, 0, 2:]), 0)
  np.testing.assert_array_equal(np.asarray(masks[:, 0, :2].sum(1)), 1)  # n = 2 present -> 1 kept


def test_strong_augment_order_is_rescale_crop_then_mix_then_photometric(monkeypatch):
  """train_semisup.py: batch_transform(rescale/crop) -> generate_unsup_data(mix) ->
  batch_transform(photometric); each stage reads what the previous one wrote."""
  calls = []

  def recording(name):
    real = getattr(augment, name)

    def stage(key, images, labels, confidence, *args, **kwargs):
      out = real(key, images, labels, confidence, *args, **kwargs)
      calls.append((name, images, out[0]))
      return out
    return stage

  for name in ("random_rescale_crop", "generate_unsup_data", "photometric_augment"):
    monkeypatch.setattr(augment, name, recording(name))
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(2, 12, 12, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 3, (2, 12, 12)), jnp.int32)
  conf = jnp.asarray(rng.uniform(0.5, 1, (2, 12, 12)), jnp.float32)
  out, _, _ = augment.strong_augment(jax.random.key(0), images, labels, conf, mode="classmix",
                                     scale_range=(0.5, 1.5), crop_size=(8, 8), num_classes=3)
  assert [c[0] for c in calls] == ["random_rescale_crop", "generate_unsup_data", "photometric_augment"]
  assert calls[0][1] is images  # the crop reads the raw batch (12x12 -> 8x8)
  assert calls[1][1] is calls[0][2] and calls[2][1] is calls[1][2]
  assert calls[2][2] is out
