"""The eval protocol end to end: training-time evaluation, `--mode=eval`'s eval_<split>.json,
and `python -m reco_jax.tools.predict` on images of any size.

One tiny run (supervised, smoke, the toy segmenter of conftest registered as model "toy",
trained in-process: it compiles in seconds) is trained once for the module, with a
test-time-augmented protocol, and reused.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from conftest import toy_segmenter, with_overrides
from configs import synthetic
from reco_jax import constants, evaluate, inference, models, train
from reco_jax.tools import predict

PROTOCOL = {"eval.scales": (0.5, 1.0), "eval.flip": True}
# A small learning rate keeps the toy model near its confident random initialisation, whose
# predictions vary from pixel to pixel (three steps at the default rate predict background
# everywhere, which would make the label comparisons vacuous).
LR = {"optim.lr": 1e-5, "optim.min_lr": 0.0}


def _config(**overrides):
  return with_overrides(synthetic.get_config("method=supervised,variant=smoke"),
                        {"model.name": "toy", **LR, **PROTOCOL, **overrides})


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """(config, workdir, final eval scalars) of a 3-step toy run evaluated under PROTOCOL."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(models.MODELS, "toy", models.ModelSpec(
        build=lambda c, backbone, num_classes, dtype: toy_segmenter(num_classes),
        default_output_stride=16))
    config = _config()
    workdir = str(tmp_path_factory.mktemp("toy_run") / "run")
    final = train.train_and_evaluate(config, workdir)
    yield config, workdir, final


def _write_png(path, image):
  tf.io.write_file(str(path), tf.io.encode_png(image))


def _read_png(path):
  return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


def test_training_and_mode_eval_use_the_protocol(toy_run):
  config, workdir, final = toy_run
  again = evaluate.evaluate_checkpoint(config, workdir)
  for key in final.keys() - {"best_miou"}:
    np.testing.assert_allclose(again[key], final[key], rtol=1e-6, err_msg=key)
  with open(os.path.join(workdir, "eval_val.json")) as f:
    written = json.load(f)
  assert written["protocol"] == {"mode": "whole", "window": None, "stride": None,
                                 "scales": [0.5, 1.0], "flip": True}
  # The single pass is a harmless change of the run's config, and predicts differently
  # (else the comparison above could not tell whether training used the protocol).
  single = evaluate.evaluate_checkpoint(_config(**{"eval.scales": (1.0,), "eval.flip": False}),
                                        workdir)
  with open(os.path.join(workdir, "eval_val.json")) as f:
    assert json.load(f)["protocol"]["scales"] == [1.0]
  assert single["pixel_accuracy"] != final["pixel_accuracy"]


def test_predict_writes_labels_and_overlays_of_any_size(toy_run, tmp_path):
  config, workdir, _ = toy_run
  rng = np.random.default_rng(0)
  images_dir, out_dir = tmp_path / "images", tmp_path / "out"
  images_dir.mkdir()
  # Larger than input.eval_size (32x32) on both axes, and smaller than it.
  images = {"big": rng.integers(0, 256, (45, 70, 3), dtype=np.uint8),
            "small": rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)}
  for name, image in images.items():
    _write_png(images_dir / f"{name}.png", image)
  (images_dir / "notes.txt").write_text("not an image")
  args = ["--workdir", workdir, "--images", str(images_dir), "--out", str(out_dir),
          "--mode=slide", "--window=24,24", "--stride=16,16", "--scales=0.75,1", "--flip"]
  assert predict.main(args) == 0
  assert sorted(os.listdir(out_dir)) == ["big_label.png", "big_overlay.png", "small_label.png",
                                         "small_overlay.png"]

  # The reference: normalised and reflect-padded here with NumPy, then the protocol's
  # probabilities on one device, cropped and arg-maxed.
  protocol = inference.make_protocol("slide", (24, 24), (16, 16), (0.75, 1.0), True)
  run = evaluate.restore_for_evaluation(config, workdir)
  palette = np.asarray(run.info.palette)
  fn = jax.jit(lambda v, x: inference.probabilities(run.method.apply_fn, v, x, x.shape[1:3], protocol))
  for name, image in images.items():
    h, w = image.shape[:2]
    padded_size = {"big": (64, 96), "small": (32, 32)}[name]  # multiples of 32 / eval_size
    assert predict.padded_size((h, w), config.input.eval_size) == padded_size
    normalised = ((image / 255.0 - np.array(constants.IMAGENET_MEAN)) /
                  np.array(constants.IMAGENET_STD)).astype(np.float32)
    padded = np.pad(normalised, ((0, padded_size[0] - h), (0, padded_size[1] - w), (0, 0)),
                    mode="reflect")
    want = np.argmax(np.asarray(fn(run.variables, padded[None]))[0, :h, :w], -1)
    label = _read_png(out_dir / f"{name}_label.png")
    assert label.shape == (h, w, 1) and label.dtype == np.uint8
    np.testing.assert_array_equal(label[..., 0], want)
    assert len(np.unique(want)) > 2  # not vacuous
    blended = np.round(0.5 * image + 0.5 * palette[want]).astype(np.uint8)
    np.testing.assert_array_equal(_read_png(out_dir / f"{name}_overlay.png"), blended)


def test_predict_fails_in_one_line(toy_run, tmp_path, capsys):
  _, workdir, _ = toy_run
  empty = tmp_path / "empty"
  empty.mkdir()
  assert predict.main(["--workdir", workdir, "--images", str(empty), "--out", str(tmp_path / "o")]) == 1
  assert capsys.readouterr().err == f"error: --images={empty}: no .png/.jpg/.jpeg images\n"
  # A workdir with its config but no checkpoint.
  images = tmp_path / "images"
  images.mkdir()
  _write_png(images / "a.png", np.zeros((8, 8, 3), np.uint8))
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), bare)
  assert predict.main(["--workdir", str(bare), "--images", str(images), "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: no checkpoint found in ") and err.count("\n") == 1
  # A bad protocol override names its config key.
  assert predict.main(["--workdir", workdir, "--images", str(images), "--out", str(tmp_path / "o"),
                       "--mode=slide", "--window=8,8", "--stride=9,9"]) == 1
  assert capsys.readouterr().err.startswith("error: config eval.stride=(9, 9) must not exceed")
