"""Evaluation protocols: whole-image or sliding-window inference, multi-scale and flip TTA.

`probabilities(apply_fn, variables, images, out_size, protocol)` is the one entry point; the
evaluator (`reco_jax/evaluate.py`), training-time evaluation and `reco_jax/tools/predict.py`
all go through it (the evaluator keeps today's arg-max-of-logits path for the default
protocol, so its results stay bit-identical). Everything is traced once under `jax.jit`:
window positions, counts and scaled sizes are static functions of the static shapes, so
there are no host round trips per window and the batch axis stays sharded over `data`.

Protocol (`config.eval.*`):
* `mode="whole"`: one forward per image, logits up-sampled bilinearly (align_corners=True) to
  the label size, softmax (the official ReCo evaluation, `predict`).
* `mode="slide"`: windows of `window` (default `input.crop_size`) every `stride` (default
  `int(window * 2 / 3)`, UniMatch / U2PL); the last window of a row or column is aligned
  to the image border (mmseg / semseg `scale_process`), so every pixel is covered and no
  window leaves the image. A window larger than the image is clipped to it (one window
  on that axis, i.e. whole-image inference there). Each window's logits are up-sampled to
  the window size, softmaxed, summed into the image's probability map and divided by the
  per-pixel window count. By default all windows of a batch go through one batched forward
  (`B * windows` images; eval mode, so BatchNorm does not couple them); `window_batch = k`
  runs them k per image at a time (`lax.map` over groups of windows: the same result, the
  activation memory of `B * k` windows, for large images on small accelerators).
* `scales`: each scale s resizes the image to `int(H * s) x int(W * s)` (floored as
  `F.interpolate(scale_factor=s)`) bilinearly with align_corners=True, the project's one
  resize (`resampling`, as the official code's interpolations), which is the identity at
  s = 1; the scale's probabilities come back to the label size (whole: the logits are
  resized, then softmaxed; slide: the merged probability map is resized).
* `flip`: each view (image or window) is also run mirrored left-right; its probabilities
  are mirrored back and averaged with the unmirrored ones.
Probabilities of all scales are averaged with equal weights.
"""
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax import resampling

PyTree = Any
MODES = ("whole", "slide")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A validated evaluation protocol (`make_protocol`); hashable, so jit can close over it.

  `window`/`stride` are (H, W) pixel pairs in slide mode and None in whole mode.
  """
  mode: str = "whole"
  window: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False
  window_batch: int = 0  # slide: windows per image per forward; 0 = all at once

  @property
  def is_single_pass(self) -> bool:
    """The official protocol: one whole-image forward, no test-time augmentation."""
    return self.mode == "whole" and self.scales == (1.0,) and not self.flip

  def to_json(self) -> dict:
    """{'mode', 'window', 'stride', 'scales', 'flip'} with lists for pairs (eval_<split>.json);
    `window_batch` only trades memory for time, so it is not part of the protocol's identity."""
    return {"mode": self.mode, "window": None if self.window is None else list(self.window),
            "stride": None if self.stride is None else list(self.stride),
            "scales": list(self.scales), "flip": self.flip}


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _pair(value, key: str) -> tuple[int, int] | None:
  """`value` as an (H, W) pair of positive ints (an int means a square), None when empty."""
  if value is None or (isinstance(value, (tuple, list)) and not value):
    return None
  pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
  if pair is None or len(pair) != 2 or not all(_is_int(v) and v >= 1 for v in pair):
    raise ValueError(f"config {key}={value!r} must be a (height, width) pair of positive pixel "
                     "counts, or () for the default")
  return int(pair[0]), int(pair[1])


def make_protocol(mode: str = "whole", window=None, stride=None, scales: Sequence[float] = (1.0,),
                  flip: bool = False, window_batch: int = 0, *,
                  crop_size: Sequence[int] | None = None) -> Protocol:
  """A `Protocol` from the `config.eval` fields, or a one-line ValueError naming the key.

  Args:
    mode: 'whole' or 'slide'.
    window: slide window (H, W) or an int; None/() = `crop_size`. Ignored in whole mode.
    stride: slide stride (H, W) or an int, <= window; None/() = int(window * 2 / 3).
    scales: non-empty positive test-time scales.
    flip: add the horizontally mirrored views.
    window_batch: slide: windows per image per forward (memory); 0 = all at once.
    crop_size: `config.input.crop_size`, the default window.
  """
  if mode not in MODES:
    raise ValueError(f"config eval.mode={mode!r} must be one of {', '.join(map(repr, MODES))}")
  if isinstance(scales, (int, float)) and not isinstance(scales, bool):
    scales = (scales,)
  if (not isinstance(scales, (tuple, list)) or not scales
      or not all(isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool)
                 and math.isfinite(s) and s > 0 for s in scales)):
    raise ValueError(f"config eval.scales={scales!r} must be a non-empty tuple of positive "
                     "scale factors, e.g. (1.0,) or (0.75, 1.0, 1.25)")
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"config eval.flip={flip!r} must be True or False")
  if not _is_int(window_batch) or window_batch < 0:
    raise ValueError(f"config eval.window_batch={window_batch!r} must be a non-negative int "
                     "(windows per image per forward; 0 = all at once)")
  window, stride = _pair(window, "eval.window"), _pair(stride, "eval.stride")
  if mode == "whole":
    window = stride = None
  else:
    if window is None:
      window = _pair(tuple(crop_size) if crop_size is not None else None, "input.crop_size")
      if window is None:
        raise ValueError("config eval.window=() needs input.crop_size (the default window)")
    if stride is None:
      stride = tuple(max(1, int(w * 2 / 3)) for w in window)  # UniMatch: int(grid * 2 / 3)
    if any(s > w for s, w in zip(stride, window)):
      raise ValueError(f"config eval.stride={stride} must not exceed eval.window={window} "
                       "(the windows would leave pixels uncovered)")
  return Protocol(mode=mode, window=window, stride=stride,
                  scales=tuple(float(s) for s in scales), flip=bool(flip),
                  window_batch=int(window_batch) if mode == "slide" else 0)


def protocol_from_config(config) -> Protocol:
  """The protocol of `config.eval` (window default `config.input.crop_size`); older configs
  without the fields get the official single pass."""
  fields = config.eval
  return make_protocol(fields.get("mode", "whole"), fields.get("window", None),
                       fields.get("stride", None), fields.get("scales", (1.0,)),
                       fields.get("flip", False), fields.get("window_batch", 0),
                       crop_size=config.input.get("crop_size", None))


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
  """(H, W) scaled by `scale`, floored as `F.interpolate(scale_factor=scale)`, at least 1."""
  return tuple(max(1, int(s * scale)) for s in size)


def window_starts(size: int, window: int, stride: int) -> tuple[int, ...]:
  """Start offsets of the windows along one axis of length `size` (window <= size): every
  `stride`, the last one aligned to the border (mmseg `slide_inference`)."""
  num = math.ceil((size - window) / stride) + 1
  return tuple(min(i * stride, size - window) for i in range(num))


def slide_layout(size: Sequence[int], window: Sequence[int],
                 stride: Sequence[int]) -> tuple[tuple[int, int], list[tuple[int, int]], np.ndarray]:
  """(window clipped to the image, window top-left corners, `f32[H,W]` windows per pixel)."""
  window = tuple(min(w, s) for w, s in zip(window, size))
  corners = [(y, x) for y in window_starts(size[0], window[0], stride[0])
             for x in window_starts(size[1], window[1], stride[1])]
  counts = np.zeros(tuple(size), np.float32)
  for y, x in corners:  # a handful of windows, at trace time
    counts[y:y + window[0], x:x + window[1]] += 1
  return window, corners, counts


def predict(apply_fn: Callable, variables: PyTree, images: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """`f32[B,H,W,3]` -> logits `f32[B,*out_size,C]` in eval mode (running BN statistics)."""
  logits = apply_fn(variables, images, train=False)["logits"]
  return resampling.resize_bilinear_align_corners(logits.astype(jnp.float32), out_size)


def view_probabilities(apply_fn: Callable, variables: PyTree, views: jax.Array,
                       out_size: tuple[int, int], flip: bool) -> jax.Array:
  """Softmax of `views` `f32[B,V,h,w,3]` up-sampled to `out_size` -> `f32[B,V,*out_size,C]`,
  averaged with the mirrored views' (mirrored back) when `flip`. One batched forward of
  B*V(*2) images; B-major, so a batch sharded over `data` stays so."""
  b, v = views.shape[:2]
  if flip:
    views = jnp.concatenate([views, views[:, :, :, ::-1]], axis=1)
  logits = predict(apply_fn, variables, views.reshape((-1,) + views.shape[2:]), out_size)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = probs.reshape((b, -1) + probs.shape[1:])
  if flip:
    probs = 0.5 * (probs[:, :v] + probs[:, v:, :, ::-1])
  return probs


def slide_probabilities(apply_fn: Callable, variables: PyTree, images: jax.Array,
                        window: tuple[int, int], stride: tuple[int, int], flip: bool,
                        window_batch: int = 0) -> jax.Array:
  """Sliding-window softmax `f32[B,H,W,C]` of `images` `f32[B,H,W,3]`: the windows'
  probabilities summed per pixel and divided by the number of windows covering it.
  `window_batch > 0` forwards that many windows per image at a time (see the module doc)."""
  size = images.shape[1:3]
  window, corners, counts = slide_layout(size, window, stride)
  crops = jnp.stack([images[:, y:y + window[0], x:x + window[1]] for y, x in corners], axis=1)
  probs = _grouped_view_probabilities(apply_fn, variables, crops, window, flip, window_batch)
  total = jnp.zeros(images.shape[:3] + probs.shape[-1:], jnp.float32)
  for i, (y, x) in enumerate(corners):
    total = total.at[:, y:y + window[0], x:x + window[1]].add(probs[:, i])
  return total / jnp.asarray(counts)[None, :, :, None]


def _grouped_view_probabilities(apply_fn: Callable, variables: PyTree, views: jax.Array,
                                out_size: tuple[int, int], flip: bool, group: int) -> jax.Array:
  """`view_probabilities` of `views` `f32[B,V,h,w,3]`, `group` views per image per forward
  (all V when `group` is 0 or >= V). The view axis is padded to a multiple of `group` with
  copies of the last view, whose outputs are dropped."""
  b, v = views.shape[:2]
  if group <= 0 or group >= v:
    return view_probabilities(apply_fn, variables, views, out_size, flip)
  groups = -(-v // group)
  pad = groups * group - v
  if pad:
    views = jnp.concatenate([views, jnp.repeat(views[:, -1:], pad, axis=1)], axis=1)
  # G-major for lax.map: each iteration forwards f32[B,group,h,w,3] (batch axis kept first,
  # so a batch sharded over `data` stays so).
  grouped = jnp.swapaxes(views.reshape((b, groups, group) + views.shape[2:]), 0, 1)
  probs = jax.lax.map(lambda g: view_probabilities(apply_fn, variables, g, out_size, flip), grouped)
  probs = jnp.swapaxes(probs, 0, 1).reshape((b, groups * group) + probs.shape[3:])
  return probs[:, :v]


def probabilities(apply_fn: Callable, variables: PyTree, images: jax.Array,
                  out_size: tuple[int, int], protocol: Protocol) -> jax.Array:
  """Class probabilities `f32[B,*out_size,C]` of `images` `f32[B,H,W,3]` under `protocol`.

  Whole mode at scale 1 without flip is `softmax(predict(...))`, today's evaluation.
  """
  out_size = tuple(out_size)
  total = None
  for scale in protocol.scales:  # one traced branch per scale (static sizes)
    size = scaled_size(images.shape[1:3], scale)
    scaled = resampling.resize_bilinear_align_corners(images, size)  # identity at scale 1
    if protocol.mode == "whole":
      probs = view_probabilities(apply_fn, variables, scaled[:, None], out_size, protocol.flip)[:, 0]
    else:
      probs = slide_probabilities(apply_fn, variables, scaled, protocol.window, protocol.stride,
                                  protocol.flip, protocol.window_batch)
      probs = resampling.resize_bilinear_align_corners(probs, out_size)
    total = probs if total is None else total + probs
  return total / len(protocol.scales)
