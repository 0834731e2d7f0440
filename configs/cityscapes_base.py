"""Cityscapes (fine, 19 classes, ReCo's 1024x512) with the official benchmark protocol.

Not a config file itself: `configs/cityscapes_<method>.py` call `dataset_config(method, arg)`.
Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
train 2975 / val 500 images stored at 1024x512, eval on val at 512x1024 (whole images), crops
512x512, no rescaling (scale range (1, 1)), 40k iterations, DeepLabv3+ on ResNet-101 with
output stride 16.

Prepare once (layout in input_pipeline/builders/cityscapes.py; the extracted
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):
  python -m input_pipeline.prepare --dataset=cityscapes --manual_dir=DIR --data_dir=TFDS
then pass `--config.input.data_dir=TFDS`.

Labelled subset: `--config.input.num_labeled=20` (README: 20, 50, 150 ...) selects with the
official class-balanced rule (threshold 12, `--config.input.min_classes` to lower it) and
`--config.seed`. The official candidate order is `glob` order (file-system dependent); ids here
are sorted, so selections match the official code only up to that order. Partial labels:
`python -m input_pipeline.partial_labels --dataset=cityscapes ...`, then
`--config.input.partial_labels_dir=OUT/p1_seed0` (it switches on the
partial-label step).

Devices: every global batch must divide the device count. The semi-supervised 2 + 2 runs on 1
or 2 devices and the supervised 4 on 1, 2 or 4; elsewhere change `input.batch_size` /
`input.unlabeled_batch_size`, which departs from the protocol.
"""
import ml_collections

from configs import reco_protocol

EVAL_SPLIT = "val"
CROP_SIZE = (512, 512)
SCALE_RANGE = (1.0, 1.0)
EVAL_SIZE = (512, 1024)
SEMI_BATCH = 2  # labelled = unlabelled
SUPERVISED_BATCH = 4  # train_sup.py doubles the batch


def dataset_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The Cityscapes config of `method` (a `reco_jax.methods.METHODS` key), with variant `arg`."""
  return reco_protocol.protocol_config(
      method, arg, dataset="cityscapes", eval_split=EVAL_SPLIT, crop_size=CROP_SIZE,
      scale_range=SCALE_RANGE, eval_size=EVAL_SIZE, semi_batch=SEMI_BATCH,
      supervised_batch=SUPERVISED_BATCH)
