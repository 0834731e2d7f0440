"""SUN RGB-D (37 classes, RGB only, ReCo's split) with the official benchmark protocol.

Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
train 9860 images (the 5285 official training images plus the 4575 test images not in
ReCo's `test_idx.txt`), eval on the other 475 (`test` split), all stored at 512x384 and padded
to 385x513 for eval, crops 321x321, scale range (0.5, 1.5), 40k iterations, DeepLabv3+ on
ResNet-101 with output stride 16.

Argument: `method=<preset>` (configs/common.py: METHOD_PRESETS; default `classmix_reco`, the
paper's method; official counterparts `train_sup.py [--apply_reco] --dataset sun` and
`train_semisup.py --apply_aug {cutout,cutmix,classmix} [--apply_reco] --dataset sun`; the
supervised ReCo run adds the --strong_threshold 0.97 that train_sup.py lacks) and
`variant=smoke` (3 steps, tiny model, small crops; eval size kept: it runs on the real data).
The README's fewest-label run, seed 0:

  python main.py --config=configs/sun.py:method=classmix_reco --config.input.num_labeled=50 \
      --config.input.data_dir=TFDS --config.seed=0 --workdir=W

Prepare once (layout in input_pipeline/builders/sun.py, including ReCo's test_idx.txt):
  python -m input_pipeline.prepare --dataset=sun --manual_dir=DIR --data_dir=TFDS
then pass `--config.input.data_dir=TFDS`.

Labelled subset: `--config.input.num_labeled=50` (README: 50, 150, 500 ...) selects with the
official SUN rule (`build_data.py: get_sun_idx`; it has no class threshold) and
`--config.seed`. The official order is `glob` order; ids here are sorted. The official code
has no SUN partial-label generator; `python -m input_pipeline.partial_labels --dataset=sun`
applies the VOC/Cityscapes one to the prepared labels.

Devices: every global batch must divide the device count. The semi-supervised 5 + 5 runs on 1
or 5 devices and the supervised 10 on 1, 2, 5 or 10; elsewhere change
`input.streams.labeled.batch_size` / `input.streams.unlabeled.batch_size` (e.g. 4 + 4 or
8 + 8), which departs from the protocol.
"""
import ml_collections

from configs import common

DEFAULT_METHOD = "classmix_reco"
PROTOCOL = common.Protocol(
    dataset="sun",
    eval_split="test",  # ReCo's 475 test images; SUN RGB-D has no val split
    crop_size=(321, 321),
    scale_range=(0.5, 1.5),
    eval_size=(385, 513),  # im_size: the 384x512 images padded by one row and column
    semi_batch=5,  # labelled = unlabelled
    supervised_batch=10,  # train_sup.py doubles the batch
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The SUN RGB-D protocol; `arg` = "method=<preset>,variant=<''|smoke>"."""
  return common.protocol_get_config(PROTOCOL, arg, DEFAULT_METHOD)
