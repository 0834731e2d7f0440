"""Synthetic dataset: mean teacher with ClassMix plus ReCo (the paper's method).

Official counterpart: `train_semisup.py --apply_aug classmix --apply_reco`.
Recipe (label-scarce, CPU-sized): configs/synthetic_base.py.

This is `configs/default.py`'s `get_config()`, what `python main.py --workdir=W` trains.

  python main.py --config=configs/synthetic_classmix_reco.py --workdir=W

Variant `:smoke`: 3 steps, tiny model, 32x32 images.
"""
from configs import synthetic_base


def get_config(arg: str | None = None):
  return synthetic_base.dataset_config("classmix_reco", arg)
