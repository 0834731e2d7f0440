"""Synthetic dataset: supervised DeepLabv3+ on all 512 training images (the previous default).

Official counterpart: `train_sup.py`. These are the neutral values of `default.base_config()`:
every image labelled, 64x64 crops, batch 8, ResNet-tiny of width 64 with 256-channel heads,
the official optimiser (lr 2.5e-3), 600 steps; mIoU about 0.50 (0.52 in an earlier run), in
about 13 minutes on a 2-core CPU.

It is not the recipe of the other synthetic configs (configs/synthetic_base.py: 64 labels,
a smaller model, lr 0.03, 800 steps); for that recipe's supervised baseline run
`configs/synthetic_supervised_reco.py --config.method=supervised`.

  python main.py --config=configs/synthetic_supervised.py --workdir=W

Variant `:smoke`: 3 steps, tiny model, 32x32 images.
"""
from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  if arg:
    default.apply_variant(config, arg)
  return config
