"""Synthetic dataset: supervised DeepLabv3+ on the labelled images only (the baseline).

Official counterpart: `train_sup.py`.
Recipe (label-scarce, CPU-sized): configs/synthetic_base.py: the same 64 labelled images,
model, crops and steps as the default ReCo + ClassMix run, without the unlabelled stream.

  python main.py --config=configs/synthetic_supervised.py --workdir=W

Variant `:smoke`: 3 steps, tiny model, 32x32 images.
"""
from configs import synthetic_base


def get_config(arg: str | None = None):
  return synthetic_base.dataset_config("supervised", arg)
