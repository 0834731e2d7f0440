"""Cityscapes: supervised DeepLabv3+ on the labelled images, batch doubled.

Official: `train_sup.py --dataset cityscapes`.
Protocol constants, data preparation and the device counts that fit the batches:
configs/cityscapes_base.py.
The README's fewest-label run, seed 0:

  python main.py --config=configs/cityscapes_supervised.py --config.input.num_labeled=20 \
      --config.input.data_dir=TFDS --config.seed=0 --workdir=W

Variant `:smoke`: 3 steps, tiny model, small crops (eval size kept: it runs on the real data).
"""
from configs import cityscapes_base


def get_config(arg: str | None = None):
  return cityscapes_base.dataset_config("supervised", arg)
