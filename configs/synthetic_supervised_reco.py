"""Synthetic dataset: supervised DeepLabv3+ plus the ReCo loss on the labelled pixels.

Official counterpart: `train_sup.py --apply_reco`.
Recipe (label-scarce, CPU-sized): configs/synthetic_base.py.

  python main.py --config=configs/synthetic_supervised_reco.py --workdir=W

Variant `:smoke`: 3 steps, tiny model, 32x32 images.
"""
from configs import synthetic_base


def get_config(arg: str | None = None):
  return synthetic_base.dataset_config("supervised_reco", arg)
