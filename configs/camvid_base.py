"""CamVid (SegNet 11-class layout: 367 train / 101 val / 233 test images of 360x480).

Not a config file itself: `configs/camvid_<method>.py` call `dataset_config(method, arg)`.
CamVid is not one of ReCo's benchmarks. The settings follow the official VOC protocol where
it transfers (`reco_protocol.protocol_config`: DeepLabv3+ on ResNet-101, output stride 16,
scale range (0.5, 1.5), 40k iterations, official optimiser, ReCo and mean-teacher settings,
labelled = unlabelled batch) and train on whole 360x480 images. The supervised batch stays 8 (it is not doubled as in
train_sup.py), so that it fits 8 devices.

The raw directory is read once through the TFDS builder (`input.manual_dir`, default
`../shared/datasets/camvid` beside the repo) into `input.data_dir`. Evaluate on the held-out
test split, when you have it, with `--config.input.eval_split=test`.

Labelled subset: `--config.input.num_labeled=N` (e.g. 20 or 46, about 1/8; chosen with the VOC
class-balanced rule, input_pipeline/splits.py); 0 (default) labels
every image, and the mean-teacher methods then also use every image as unlabelled, as the
official scripts do with 0 labels.

Variants: `:smoke` (3 steps, tiny model, small crops, whole-image evaluation) and `:cpu` (a
tiny ResNet from scratch on 128x160 crops for 2000 steps at learning rate 0.01, sized for a
2-core CPU: benchmarks/camvid_label_efficiency.py).
"""
import os

import ml_collections

from configs import reco_protocol

CAMVID_DIR = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "camvid"))
IMAGE_SIZE = (360, 480)
SCALE_RANGE = (0.5, 1.5)
BATCH = 8  # labelled, and unlabelled for the mean-teacher methods


def dataset_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The CamVid config of `method` (a `reco_jax.methods.METHODS` key), with variant `arg`."""
  config = reco_protocol.protocol_config(
      method, None if arg == "cpu" else arg, dataset="camvid", eval_split="val",
      crop_size=IMAGE_SIZE, scale_range=SCALE_RANGE, eval_size=IMAGE_SIZE, semi_batch=BATCH,
      supervised_batch=BATCH)
  config.input.manual_dir = CAMVID_DIR
  if arg == "cpu":
    config.input.crop_size = (128, 160)
    config.model.backbone = "resnet_tiny"
    config.model.width = 16
    config.model.head_dim = 64
    config.model.rep_dim = 64
    # From scratch instead of an ImageNet backbone: 4x the official rate learns much faster
    # in 2000 steps (as on the synthetic recipe); not tuned further.
    config.optim.lr = 0.01
    config.num_train_steps = 2000
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.log_every_steps = 100
  elif arg:
    config.input.eval_batch_size = BATCH  # whole 360x480 images, as the full config
  else:
    config.log_every_steps = 100
    config.eval_every_steps = 2000
  return config
