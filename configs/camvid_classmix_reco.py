"""CamVid: mean teacher with ClassMix plus ReCo (the paper's method).

Official counterpart (on VOC/Cityscapes/SUN): `train_semisup.py --apply_aug classmix --apply_reco`.
Dataset settings, data preparation and the labelled-subset option: configs/camvid_base.py.

  python main.py --config=configs/camvid_classmix_reco.py --config.input.num_labeled=46 --workdir=W

Variants: `:smoke` (3 steps, tiny model, small crops, whole-image evaluation) and `:cpu`
(a tiny ResNet on 128x160 crops for 2000 steps, sized for a 2-core CPU).
"""
from configs import camvid_base


def get_config(arg: str | None = None):
  return camvid_base.dataset_config("classmix_reco", arg)
