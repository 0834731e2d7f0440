"""Segment a folder of images with a trained run, under any evaluation protocol.

  python -m reco_jax.tools.predict --workdir=W --images=DIR --out=DIR \
      [--mode=slide] [--window=H,W] [--stride=H,W] [--scales=0.75,1,1.25] [--flip]

Restores W's evaluation weights (`evaluate.restore_for_evaluation` with the run's own config,
`workdir.load_config`), reads every .png/.jpg/.jpeg in DIR (any size; grey and RGBA images
are read as RGB), and writes for each `<name>.<ext>`:
* `<name>_label.png`: the predicted class of every pixel (uint8 class indices, the image's
  size), the arg-max of `inference.probabilities` under the protocol;
* `<name>_overlay.png`: the image blended half and half with the dataset's palette colours.

The protocol is the run's `config.eval` (mode, window, stride, scales, flip) with the flags
given on top. Images are normalised by the evaluation pipeline's own functions
(`input_pipeline.preprocess`) and padded right/bottom by reflection as the evaluator pads
them: to `input.eval_size` when they fit in it (so a split image gets the very predictions
of `--mode=eval`), else each side up to a multiple of `SIZE_MULTIPLE`; the predictions are
cropped back to the image. One program is compiled per padded size. The image runs
replicated on the run's mesh (one image at a time; a single process).
"""
import argparse
import math
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np
import tensorflow as tf

from input_pipeline import preprocess
from reco_jax import errors, evaluate, inference, parallel
from reco_jax import workdir as workdir_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Larger-than-eval_size images are padded to a multiple of this: the output stride of every
# model here divides it, so no feature map is floored.
SIZE_MULTIPLE = 32
OVERLAY_ALPHA = 0.5  # weight of the image in the overlay


def list_images(directory: str) -> list[str]:
  """The image files of `directory` (by extension, sorted), or a one-line error if none."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--images={directory}: no such directory")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"--images={directory}: no {'/'.join(IMAGE_EXTENSIONS)} images")
  return [os.path.join(directory, n) for n in names]


def read_image(path: str) -> np.ndarray:
  """`u8[H,W,3]` RGB of an image file."""
  data = tf.io.read_file(path)
  return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def padded_size(size: Sequence[int], eval_size: Sequence[int],
                multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
  """Per axis: `eval_size` if the image fits in it, else the next multiple of `multiple`."""
  return tuple(int(e) if s <= e else multiple * math.ceil(s / multiple)
               for s, e in zip(size, eval_size))


def model_input(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """`u8[H,W,3]` -> `f32[h,w,3]` normalised as the evaluation pipeline does and padded
  right/bottom to `size` (>= H, W) by reflection (`preprocess.pad_to_size`)."""
  unit = preprocess.to_unit_range(tf.constant(image))
  dummy_label = tf.zeros(image.shape[:2] + (1,), tf.uint8)
  padded, _ = preprocess.pad_to_size(unit, dummy_label, tuple(size))
  return preprocess.normalize(padded).numpy()


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """`u8[H,W,3]`: `alpha * image + (1 - alpha) * palette[label]`, rounded."""
  blend = alpha * image.astype(np.float32) + (1 - alpha) * palette[label].astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def make_probabilities_fn(apply_fn: Callable, mesh: jax.sharding.Mesh,
                          protocol: inference.Protocol) -> Callable:
  """jitted (variables, `f32[1,h,w,3]`) -> `f32[1,h,w,C]`, replicated on `mesh` (a batch of
  one cannot be split over the devices); one compile per input size."""
  def fn(variables, images):
    return inference.probabilities(apply_fn, variables, images, images.shape[1:3], protocol)
  replicated = parallel.replicated(mesh)
  return jax.jit(fn, in_shardings=(replicated, replicated), out_shardings=replicated)


def predict_image(probabilities_fn: Callable, variables, image: np.ndarray,
                  eval_size: Sequence[int]) -> np.ndarray:
  """`f32[H,W,C]` probabilities of one `u8[H,W,3]` image (padded, run, cropped back)."""
  h, w = image.shape[:2]
  inputs = model_input(image, padded_size((h, w), eval_size))[None]
  probs = probabilities_fn(variables, inputs)
  return np.asarray(jax.device_get(probs))[0, :h, :w]


def write_png(path: str, image: np.ndarray) -> None:
  """`u8[H,W]` or `u8[H,W,3]` to a PNG file."""
  if image.ndim == 2:
    image = image[..., None]
  tf.io.write_file(path, tf.io.encode_png(tf.constant(image, tf.uint8)))


def apply_overrides(config, *, mode=None, window=None, stride=None, scales=None, flip=None,
                    window_batch=None):
  """`config` with the given `eval.*` protocol fields replaced (None keeps the run's)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in (("mode", mode), ("window", window), ("stride", stride),
                       ("scales", scales), ("flip", flip), ("window_batch", window_batch)):
      if value is not None:
        config.eval[key] = value
  return config


def run_predict(workdir: str, images_dir: str, out_dir: str, **overrides) -> list[str]:
  """Predicts every image of `images_dir` into `out_dir`; returns the written paths."""
  paths = list_images(images_dir)  # before the (slow) restore: a wrong folder fails at once
  config = apply_overrides(workdir_lib.load_config(workdir), **overrides)
  protocol = inference.protocol_from_config(config)
  run = evaluate.restore_for_evaluation(config, workdir)
  probabilities_fn = make_probabilities_fn(run.method.apply_fn, run.mesh, protocol)
  palette = np.asarray(run.info.palette, np.uint8)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for path in paths:
    image = read_image(path)
    probs = predict_image(probabilities_fn, run.variables, image, config.input.eval_size)
    label = np.argmax(probs, axis=-1).astype(np.uint8)
    name = os.path.splitext(os.path.basename(path))[0]
    for suffix, array in (("label", label), ("overlay", overlay(image, label, palette))):
      out = os.path.join(out_dir, f"{name}_{suffix}.png")
      write_png(out, array)
      written.append(out)
  return written


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m reco_jax.tools.predict",
      description="Label PNGs and overlays of a folder of images, from a trained workdir.")
  parser.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints)")
  parser.add_argument("--images", required=True, help="a folder of .png/.jpg images, any size")
  parser.add_argument("--out", required=True, help="the folder to write <name>_label.png and "
                      "<name>_overlay.png to")
  parser.add_argument("--mode", choices=inference.MODES, default=None, help="eval.mode")
  parser.add_argument("--window", type=_ints, default=None, help="eval.window, H,W (slide)")
  parser.add_argument("--stride", type=_ints, default=None, help="eval.stride, H,W (slide)")
  parser.add_argument("--scales", type=_floats, default=None, help="eval.scales, e.g. 0.75,1,1.25")
  parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                      help="eval.flip: add the mirrored image")
  parser.add_argument("--window_batch", type=int, default=None,
                      help="eval.window_batch: slide windows per image per forward (memory)")
  args = parser.parse_args(argv)
  # tf only decodes and encodes images here: keep it off the accelerators JAX owns.
  tf.config.set_visible_devices([], "GPU")
  try:
    written = run_predict(args.workdir, args.images, args.out, mode=args.mode, window=args.window,
                          stride=args.stride, scales=args.scales, flip=args.flip,
                          window_batch=args.window_batch)
  except errors.ONE_LINE_ERRORS as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} files to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
