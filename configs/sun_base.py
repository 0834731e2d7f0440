"""SUN RGB-D (37 classes, RGB only, ReCo's split) with the official benchmark protocol.

Not a config file itself: `configs/sun_<method>.py` call `dataset_config(method, arg)`.
Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
train 9860 images (the 5285 official training images plus the 4575 test images not in
ReCo's `test_idx.txt`), eval on the other 475 (`test` split), all stored at 512x384 and padded
to 385x513 for eval, crops 321x321, scale range (0.5, 1.5), 40k iterations, DeepLabv3+ on
ResNet-101 with output stride 16.

Prepare once (layout in input_pipeline/builders/sun.py, including ReCo's test_idx.txt):
  python -m input_pipeline.prepare --dataset=sun --manual_dir=DIR --data_dir=TFDS
then pass `--config.input.data_dir=TFDS`.

Labelled subset: `--config.input.num_labeled=50` (README: 50, 150, 500 ...) selects with the
official SUN rule (`build_data.py: get_sun_idx`; it has no class threshold) and
`--config.seed`. The official order is `glob` order; ids here are sorted. The official code
has no SUN partial-label generator; `python -m input_pipeline.partial_labels --dataset=sun`
applies the VOC/Cityscapes one to the prepared labels.

Devices: every global batch must divide the device count. The semi-supervised 5 + 5 runs on 1
or 5 devices and the supervised 10 on 1, 2, 5 or 10; elsewhere change `input.batch_size` /
`input.unlabeled_batch_size` (e.g. 4 + 4 or 8 + 8), which departs from the protocol.
"""
import ml_collections

from configs import reco_protocol

EVAL_SPLIT = "test"  # ReCo's 475 test images; SUN RGB-D has no val split
CROP_SIZE = (321, 321)
SCALE_RANGE = (0.5, 1.5)
EVAL_SIZE = (385, 513)  # im_size: the 384x512 images padded by one row and column
SEMI_BATCH = 5  # labelled = unlabelled
SUPERVISED_BATCH = 10  # train_sup.py doubles the batch


def dataset_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The SUN RGB-D config of `method` (a `reco_jax.methods.METHODS` key), with variant `arg`."""
  return reco_protocol.protocol_config(
      method, arg, dataset="sun", eval_split=EVAL_SPLIT, crop_size=CROP_SIZE,
      scale_range=SCALE_RANGE, eval_size=EVAL_SIZE, semi_batch=SEMI_BATCH,
      supervised_batch=SUPERVISED_BATCH)
