"""Evaluation protocols (reco_jax/inference.py): sliding windows, multi-scale and flip TTA.

The device version is checked against a slow NumPy transcription (windows placed by a while
loop as UniMatch / mmseg write it, an independent align_corners=True resize, per-window
softmax, counts), against invariants (an image-sized window is whole-image inference, a
flip-equivariant model gains nothing from flip TTA) and against today's single-pass path.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_flags
from absl import flags

from conftest import REPO_ROOT, toy_segmenter
from configs import synthetic
from reco_jax import evaluate, inference, parallel

NUM_CLASSES = 5


# ---- NumPy transcription -------------------------------------------------------------------

def np_resize_align_corners(x: np.ndarray, size) -> np.ndarray:
  """`x[B,H,W,C]` -> `[B,h,w,C]`, bilinear with align_corners=True, pixel by pixel formula."""
  def axis_weights(n_in, n_out):
    src = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo)
  x = x.astype(np.float64)
  lo, hi, f = axis_weights(x.shape[1], size[0])
  x = x[:, lo] * (1 - f)[None, :, None, None] + x[:, hi] * f[None, :, None, None]
  lo, hi, f = axis_weights(x.shape[2], size[1])
  return x[:, :, lo] * (1 - f)[None, None, :, None] + x[:, :, hi] * f[None, None, :, None]


def np_softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_view_probs(logits_fn, views: np.ndarray, size, flip: bool) -> np.ndarray:
  """Softmax of the logits of `views[B,h,w,3]` resized to `size`, flip-averaged."""
  probs = np_softmax(np_resize_align_corners(logits_fn(views), size))
  if flip:
    mirrored = np_softmax(np_resize_align_corners(logits_fn(views[:, :, ::-1]), size))
    probs = 0.5 * (probs + mirrored[:, :, ::-1])
  return probs


def np_slide(logits_fn, image: np.ndarray, window, stride, flip: bool) -> np.ndarray:
  """mmseg `slide_inference` with softmax, as loops: windows every stride, the last one moved
  back to the border, probabilities summed and divided by the count."""
  b, h, w, _ = image.shape
  wh, ww = min(window[0], h), min(window[1], w)
  total, count = None, np.zeros((h, w))
  y = 0
  while True:
    y0 = min(y, h - wh)
    x = 0
    while True:
      x0 = min(x, w - ww)
      p = np_view_probs(logits_fn, image[:, y0:y0 + wh, x0:x0 + ww], (wh, ww), flip)
      if total is None:
        total = np.zeros((b, h, w, p.shape[-1]))
      total[:, y0:y0 + wh, x0:x0 + ww] += p
      count[y0:y0 + wh, x0:x0 + ww] += 1
      if x0 + ww >= w:
        break
      x += stride[1]
    if y0 + wh >= h:
      break
    y += stride[0]
  return total / count[None, :, :, None]


def np_probabilities(logits_fn, image: np.ndarray, out_size, mode, window, stride, scales, flip):
  total = 0
  for s in scales:
    size = (int(image.shape[1] * s), int(image.shape[2] * s))
    scaled = np_resize_align_corners(image, size).astype(np.float32)
    if mode == "whole":
      total = total + np_view_probs(logits_fn, scaled, out_size, flip)
    else:
      total = total + np_resize_align_corners(np_slide(logits_fn, scaled, window, stride, flip), out_size)
  return total / len(scales)


# ---- models ---------------------------------------------------------------------------------

class FlipEquivariant(nn.Module):
  """1x1 convs and a 2x2 mean pool (even widths): mirroring the input mirrors the logits."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(nn.Conv(8, (1, 1))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return {"logits": 3.0 * nn.Conv(self.num_classes, (1, 1))(x)}


@pytest.fixture(scope="module")
def toy():
  """A random toy segmenter (stride 4, 3x3 conv, BN): not flip-equivariant."""
  model = toy_segmenter(NUM_CLASSES)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  return model, variables


def _images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _device_probabilities(mesh, model, variables, images, out_size, protocol):
  """`inference.probabilities` jitted with the batch sharded over `data`."""
  fn = jax.jit(functools.partial(inference.probabilities, model.apply, out_size=out_size,
                                 protocol=protocol),
               in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)))
  return np.asarray(fn(variables, parallel.to_global_batch(images, mesh)))


# ---- validation and layout ------------------------------------------------------------------

@pytest.mark.parametrize("fields, key", [
    ({"mode": "tiles"}, "eval.mode"),
    ({"scales": ()}, "eval.scales"),
    ({"scales": (1.0, -0.5)}, "eval.scales"),
    ({"scales": (True,)}, "eval.scales"),
    ({"flip": "yes"}, "eval.flip"),
    ({"mode": "slide", "window": (32, 0)}, "eval.window"),
    ({"mode": "slide", "window": (32, 32, 3)}, "eval.window"),
    ({"mode": "slide", "stride": (8, 2.5)}, "eval.stride"),
    ({"mode": "slide", "window": (16, 16), "stride": (17, 8)}, "eval.stride"),
    ({"mode": "slide", "window_batch": -1}, "eval.window_batch"),
    ({"mode": "slide", "window_batch": 2.0}, "eval.window_batch"),
    ({"mode": "slide", "window_batch": True}, "eval.window_batch"),
])
def test_bad_fields_fail_naming_the_config_key(fields, key):
  with pytest.raises(ValueError, match=rf"^config {key}=\S.* must ") as info:
    inference.make_protocol(**fields, crop_size=(32, 32))
  assert "\n" not in str(info.value)


def test_config_defaults_window_and_stride():
  config = synthetic.get_config("variant=smoke")
  default = inference.protocol_from_config(config)
  assert default.is_single_pass and default == inference.Protocol()
  config.eval.mode = "slide"
  protocol = inference.protocol_from_config(config)
  # Window = the training crop, stride = int(window * 2 / 3) (UniMatch).
  assert protocol.window == tuple(config.input.crop_size) == (32, 32)
  assert protocol.stride == (21, 21)
  config.eval.window, config.eval.stride = (24, 30), (10, 12)
  assert inference.protocol_from_config(config).stride == (10, 12)
  config.eval.stride = ()
  assert inference.protocol_from_config(config).stride == (16, 20)
  assert inference.protocol_from_config(config).to_json() == {
      "mode": "slide", "window": [24, 30], "stride": [16, 20], "scales": [1.0], "flip": False}


def test_window_starts_cover_the_image_with_the_last_window_on_the_border():
  assert inference.window_starts(10, 4, 3) == (0, 3, 6)
  assert inference.window_starts(11, 4, 3) == (0, 3, 6, 7)
  assert inference.window_starts(8, 8, 5) == (0,)
  window, corners, counts = inference.slide_layout((11, 7), (4, 9), (3, 2))
  assert window == (4, 7) and len(corners) == 4  # clipped to the image width
  # Row windows start at 0, 3, 6, 7 (4 rows each); one window across the columns.
  np.testing.assert_array_equal(counts, np.array([1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 1])[:, None] * np.ones(7))


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_command_line_overrides_parse():
  """`--config.eval.*` as main.py parses them (config_flags on configs/default.py)."""
  argv = ["main.py", f"--config={REPO_ROOT / 'configs/default.py'}:smoke",
          "--config.eval.scales=(0.75,1.0,1.25)", "--config.eval.flip=True",
          "--config.eval.mode=slide", "--config.eval.window=(24,30)"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  protocol = inference.protocol_from_config(values.config)
  assert protocol == inference.Protocol("slide", (24, 30), (16, 20), (0.75, 1.0, 1.25), True)


# ---- device version against invariants and the transcription --------------------------------

def test_default_protocol_is_todays_single_pass(mesh, toy):
  """scales (1.0,) without flip: the softmax of `predict`, and the eval step's counts and
  predictions equal the official path's; an equivalent non-default protocol (the same scale
  twice, averaged) goes through `inference.probabilities` and predicts the same."""
  model, variables = toy
  images = _images((8, 32, 48, 3))
  labels = np.random.default_rng(1).integers(-1, NUM_CLASSES, (8, 32, 48)).astype(np.int32)
  protocol = inference.protocol_from_config(synthetic.get_config("variant=smoke"))
  probs = _device_probabilities(mesh, model, variables, images, (32, 48), protocol)
  logits = jax.jit(lambda v, x: inference.predict(model.apply, v, x, (32, 48)))(variables, images)
  np.testing.assert_allclose(probs, jax.nn.softmax(logits, axis=-1), rtol=1e-6, atol=1e-7)
  batch = parallel.to_global_batch({"image": images, "label": labels,
                                    "mask": np.array([True] * 7 + [False])}, mesh)
  outputs = [evaluate.make_eval_step(mesh, model.apply, NUM_CLASSES, protocol=p)(variables, batch)
             for p in (None, protocol, inference.Protocol(scales=(1.0, 1.0)))]
  (counts, predictions), (same_counts, same_predictions), (tta_counts, tta_predictions) = outputs
  np.testing.assert_array_equal(same_predictions, predictions)
  np.testing.assert_array_equal(same_counts["confusion_matrix"], counts["confusion_matrix"])
  np.testing.assert_array_equal(tta_predictions, predictions)
  np.testing.assert_array_equal(tta_counts["confusion_matrix"], counts["confusion_matrix"])
  np.testing.assert_array_equal(predictions, np.argmax(np.asarray(logits), -1))


def test_slide_with_an_image_sized_window_is_whole_image_inference(mesh, toy):
  model, variables = toy
  images = _images((8, 32, 48, 3), seed=2)
  whole = _device_probabilities(mesh, model, variables, images, (32, 48), inference.Protocol())
  for window in ((32, 48), (64, 64)):  # a larger window is clipped to the image
    slide = inference.make_protocol("slide", window, (8, 8))
    np.testing.assert_allclose(
        _device_probabilities(mesh, model, variables, images, (32, 48), slide), whole,
        rtol=1e-6, atol=1e-7)


def test_flip_tta_of_a_flip_equivariant_model_equals_its_single_pass(mesh):
  model = FlipEquivariant(NUM_CLASSES)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 16, 24, 3)), train=False)
  images = _images((8, 16, 24, 3), seed=3)
  for mode, window, stride in (("whole", None, None), ("slide", (8, 12), (4, 6))):
    plain = inference.make_protocol(mode, window, stride)
    flipped = inference.make_protocol(mode, window, stride, flip=True)
    np.testing.assert_allclose(
        _device_probabilities(mesh, model, variables, images, (16, 24), flipped),
        _device_probabilities(mesh, model, variables, images, (16, 24), plain),
        rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, window, stride, scales, flip, window_batch", [
    # Overlapping windows; strides that do not divide 44 - 24 or 58 - 32: the last window
    # of each axis is moved back to the border (starts 0, 16, 20 and 0, 20, 26).
    ("slide", (24, 32), (16, 20), (1.0,), False, 0),
    # The same 9 windows forwarded 2 per image at a time: 5 groups, the last one padded.
    ("slide", (24, 32), (16, 20), (1.0,), False, 2),
    # Multi-scale (0.6: 26x34, two windows on one axis) with flip, slide and whole.
    ("slide", (24, 32), (16, 20), (0.6, 1.0), True, 0),
    pytest.param("slide", (24, 32), (16, 20), (0.6, 1.0), True, 4, marks=pytest.mark.slow),
    ("whole", None, None, (0.75, 1.0, 1.3), True, 0),
])
def test_device_protocol_equals_numpy_transcription(mesh, toy, mode, window, stride, scales, flip,
                                                    window_batch):
  model, variables = toy
  images = _images((8, 44, 58, 3), seed=4)
  out_size = (44, 58)
  protocol = inference.make_protocol(mode, window, stride, scales, flip, window_batch)
  assert protocol.window_batch == window_batch
  got = _device_probabilities(mesh, model, variables, images, out_size, protocol)
  logits_fn = jax.jit(lambda x: model.apply(variables, x, train=False)["logits"])
  want = np_probabilities(lambda x: np.asarray(logits_fn(np.ascontiguousarray(x))), images,
                          out_size, mode, window, stride, scales, flip)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  # Not vacuous: the windows (or the scales) disagree, so a wrong weighting would show.
  single = _device_probabilities(mesh, model, variables, images, out_size, inference.Protocol())
  assert np.abs(got - single).max() > 1e-2
