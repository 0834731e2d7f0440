"""Supervised DeepLabv3+ on CamVid (SegNet 11-class layout, 367 train / 101 val images).

The raw directory is read once through the TFDS builder (`input.manual_dir`, default
`../shared/datasets/camvid` beside the repo) into `input.data_dir`. Evaluate on the held-out
test split, when you have it, with `--config.input.eval_split=test`.

Variants: `:smoke` (3 steps, tiny model, small crops) and `:cpu` (a tiny ResNet at
quarter-ish resolution, sized for a 2-core CPU).
"""
import os

from configs import default

CAMVID_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "camvid")


def get_config(arg: str | None = None):
  config = default.get_config()
  config.method = "supervised"
  config.input.dataset = "camvid"
  config.input.manual_dir = os.path.normpath(CAMVID_DIR)
  config.input.crop_size = (360, 480)
  config.input.eval_size = (360, 480)  # whole images, no padding needed
  config.input.scale_range = (0.5, 1.5)
  config.input.batch_size = 8
  config.input.eval_batch_size = 8
  config.model.backbone = "resnet101"
  config.model.width = 64
  config.model.head_dim = 256
  config.model.rep_dim = 256
  config.num_train_steps = 40_000
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  if arg == "cpu":
    config.input.crop_size = (128, 160)
    config.input.eval_size = (360, 480)
    config.model.backbone = "resnet_tiny"
    config.model.width = 16
    config.model.head_dim = 64
    config.model.rep_dim = 64
    config.num_train_steps = 2000
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
  elif arg:
    default.apply_variant(config, arg)
    if arg == "smoke":
      config.input.eval_size = (360, 480)  # CamVid images are 360x480 and are padded to eval_size
      config.input.eval_batch_size = 8
  return config
