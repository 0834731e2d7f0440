"""CamVid: supervised DeepLabv3+ on the labelled images.

Official counterpart (on VOC/Cityscapes/SUN): `train_sup.py`.
Dataset settings, data preparation and the labelled-subset option: configs/camvid_base.py.

  python main.py --config=configs/camvid_supervised.py --workdir=W

Variants: `:smoke` (3 steps, tiny model, small crops, whole-image evaluation) and `:cpu`
(a tiny ResNet on 128x160 crops for 2000 steps, sized for a 2-core CPU).
"""
from configs import camvid_base


def get_config(arg: str | None = None):
  return camvid_base.dataset_config("supervised", arg)
