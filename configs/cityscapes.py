"""Cityscapes (fine, 19 classes, ReCo's 1024x512) with the official benchmark protocol.

Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
train 2975 / val 500 images stored at 1024x512, eval on val at 512x1024 (whole images), crops
512x512, no rescaling (scale range (1, 1)), 40k iterations, DeepLabv3+ on ResNet-101 with
output stride 16.

Argument: `method=<preset>` (configs/common.py: METHOD_PRESETS; default `classmix_reco`, the
paper's method; official counterparts `train_sup.py [--apply_reco] --dataset cityscapes` and
`train_semisup.py --apply_aug {cutout,cutmix,classmix} [--apply_reco] --dataset cityscapes`;
the supervised ReCo run adds the --strong_threshold 0.97 that train_sup.py lacks) and
`variant=smoke` (3 steps, tiny model, small crops; eval size kept: it runs on the real data).
The README's fewest-label run, seed 0:

  python main.py --config=configs/cityscapes.py:method=classmix_reco \
      --config.input.num_labeled=20 --config.input.data_dir=TFDS --config.seed=0 --workdir=W

Prepare once (layout in input_pipeline/builders/cityscapes.py; the extracted
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):
  python -m input_pipeline.prepare --dataset=cityscapes --manual_dir=DIR --data_dir=TFDS
then pass `--config.input.data_dir=TFDS`.

Labelled subset: `--config.input.num_labeled=20` (README: 20, 50, 150 ...) selects with the
official class-balanced rule (threshold 12, `--config.input.min_classes` to lower it) and
`--config.seed`. The official candidate order is `glob` order (file-system dependent); ids here
are sorted, so selections match the official code only up to that order. Partial labels:
`python -m input_pipeline.partial_labels --dataset=cityscapes ...`, then
`--config.input.partial_labels_dir=OUT/p1_seed0` (it switches on the
partial-label step).

Devices: every global batch must divide the device count. The semi-supervised 2 + 2 runs on 1
or 2 devices and the supervised 4 on 1, 2 or 4; elsewhere change
`input.streams.labeled.batch_size` / `input.streams.unlabeled.batch_size`, which departs from
the protocol.
"""
import ml_collections

from configs import common

DEFAULT_METHOD = "classmix_reco"
PROTOCOL = common.Protocol(
    dataset="cityscapes",
    eval_split="val",
    crop_size=(512, 512),
    scale_range=(1.0, 1.0),
    eval_size=(512, 1024),
    semi_batch=2,  # labelled = unlabelled
    supervised_batch=4,  # train_sup.py doubles the batch
    method_settings={
        # ReCo's S4GAN row (Table 5) is DeepLabv2; the README's Cityscapes command of
        # train_s4GAN.py (--threshold-st 0.7, --learning-rate-D 1e-5). The official (16, 32) pool
        # fits 256x512 crops only: ReCo's 512x512 crops need s4gan.pool='global' (the default).
        "s4gan": {"model.name": "deeplabv2", "s4gan.threshold_st": 0.7, "s4gan.lr_d": 1e-5,
                  "s4gan.pool_size": (16, 32)},
        # Memory bank: configSSL_city_*_COCO/imagenet (other_methods_spec §2.5): DeepLabv2-R101,
        # 5 labelled + 2 unlabelled (x2 views) 512x512 crops of the half-resolution images
        # (ReCo's Cityscapes images), 150k iterations, lr 2e-4, wd 5e-4; *_v3: README.
        "memory_bank": {"model.name": "deeplabv2", "input.streams.labeled.batch_size": 5,
                        "input.streams.unlabeled.batch_size": 2, "num_train_steps": 150_000,
                        "optim.lr": 2e-4, "optim.weight_decay": 5e-4, "optim.nesterov": False,
                        "memory_bank.samples_rule": "cityscapes", "eval_every_steps": 1000},
        # PC²Seg (our choice): 2 images of 128x128 stride-4 pixels; 1280 anchors each keeps
        # VOC's 2560 anchors per step (VOC: 10 x 256).
        "pc2seg": {"pc2seg.anchors_per_image": 1280},
        # Contextrast (paper §4.1): DeepLabV3 on D-ResNet-101 (output stride 8), batch 8,
        # 512x1024 crops, 40K iterations, SGD momentum 0.9 + poly, colour jitter, flip, random
        # scaling (no blur), single-scale testing. Ours: lr 0.01, wd 5e-4 and scale range
        # (0.5, 2.0) (Pissas et al., spec §4.1). The paper crops 512x1024 of the 1024x2048
        # images; ReCo's stored images are 512x1024, so a crop sees the whole (rescaled) image.
        "contextrast": {"model.name": "deeplabv3", "model.backbone": "resnet101",
                        "model.output_stride": 8, "input.streams.labeled.batch_size": 8,
                        "input.eval_batch_size": 8, "input.crop_size": (512, 1024),
                        "input.scale_range": (0.5, 2.0), "num_train_steps": 40_000,
                        "optim.lr": 0.01, "optim.weight_decay": 5e-4, "optim.nesterov": False,
                        "input.blur_prob": 0.0, "eval_every_steps": 2000,
                        "checkpoint_every_steps": 2000},
    },
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Cityscapes protocol; `arg` = "method=<preset>,variant=<''|smoke>"."""
  return common.protocol_get_config(PROTOCOL, arg, DEFAULT_METHOD)
