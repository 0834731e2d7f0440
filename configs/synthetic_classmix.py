"""Synthetic dataset: mean teacher with ClassMix on the pseudo-labelled images.

Official counterpart: `train_semisup.py --apply_aug classmix`.
Recipe (label-scarce, CPU-sized): configs/synthetic_base.py.

  python main.py --config=configs/synthetic_classmix.py --workdir=W

Variant `:smoke`: 3 steps, tiny model, 32x32 images.
"""
from configs import synthetic_base


def get_config(arg: str | None = None):
  return synthetic_base.dataset_config("classmix", arg)
