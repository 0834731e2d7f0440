"""CamVid (SegNet 11-class layout: 367 train / 101 val / 233 test images of 360x480).

CamVid is not one of ReCo's benchmarks. The settings follow the official VOC protocol where
it transfers (`common.protocol_config`: DeepLabv3+ on ResNet-101, output stride 16, scale
range (0.5, 1.5), 40k iterations, official optimiser, ReCo and mean-teacher settings,
labelled = unlabelled batch) and train on whole 360x480 images. The supervised batch stays 8
(it is not doubled as in train_sup.py), so that it fits 8 devices.

Argument: `method=<preset>` (configs/common.py: METHOD_PRESETS; default `classmix_reco`) and
`variant=smoke` (3 steps, tiny model, small crops, whole-image evaluation) or `variant=cpu` (a
tiny ResNet from scratch on 128x160 crops for 2000 steps at learning rate 0.01, sized for a
2-core CPU: benchmarks/camvid_label_efficiency.py):

  python main.py --config=configs/camvid.py:method=supervised --workdir=W
  python main.py --config=configs/camvid.py:method=classmix_reco,variant=cpu \
      --config.input.num_labeled=20 --workdir=W
  python main.py --config=configs/camvid.py:method=contextrast,variant=cpu \
      --config.contextrast.loss=none --workdir=W    # contextrast | pissas | none

The raw directory is read once through the TFDS builder (`input.manual_dir`, default
`../shared/datasets/camvid` beside the repo) into `input.data_dir`. Evaluate on the held-out
test split, when you have it, with `--config.input.eval_split=test`.

Labelled subset: `--config.input.num_labeled=N` (e.g. 20 or 46, about 1/8; chosen with the VOC
class-balanced rule, input_pipeline/splits.py); 0 (default) labels
every image, and the mean-teacher methods then also use every image as unlabelled, as the
official scripts do with 0 labels.
"""
import os

import ml_collections

from configs import common

DEFAULT_METHOD = "classmix_reco"
VARIANTS = ("cpu", "smoke")
CAMVID_DIR = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "camvid"))
IMAGE_SIZE = (360, 480)
BATCH = 8  # labelled, and unlabelled for the mean-teacher methods
# Contextrast (paper §4.1, "Training/Testing settings"): DeepLabV3 on D-ResNet-101 (output
# stride 8), batch 16, 6K iterations, SGD momentum 0.9 with poly decay, augmentation = colour
# jitter, flip, random scaling (no blur), multi-scale (0.75-2.0 step 0.25) + flip testing.
# Not in the paper: lr 0.01 and weight decay 5e-4 (Pissas et al.'s recipe, spec §4.1; mmseg's
# DeepLabV3), plain momentum (mmseg), the protocol's crop and scale range.
CONTEXTRAST = {
    "model.name": "deeplabv3", "model.backbone": "resnet101", "model.output_stride": 8,
    "input.streams.labeled.batch_size": 16, "num_train_steps": 6000,
    "optim.lr": 0.01, "optim.weight_decay": 5e-4, "optim.nesterov": False,
    "input.blur_prob": 0.0, "eval.scales": (0.75, 1.0, 1.25, 1.5, 1.75, 2.0), "eval.flip": True,
    "eval_every_steps": 1000, "checkpoint_every_steps": 1000,
}
PROTOCOL = common.Protocol(
    dataset="camvid",
    eval_split="val",
    crop_size=IMAGE_SIZE,
    scale_range=(0.5, 1.5),
    eval_size=IMAGE_SIZE,
    semi_batch=BATCH,
    supervised_batch=BATCH,  # not doubled: fits 8 devices
    method_settings={
        # Not an official S4GAN dataset: VOC's values; DeepLabv3+ as the other CamVid rows.
        "s4gan": {"s4gan.threshold_st": 0.6, "s4gan.lr_d": 1e-4},
        # Memory bank: not an official dataset: DeepLabv3+ as the other CamVid rows, the
        # official unlabelled batch (half the labelled one, two views each), Cityscapes' E rule.
        "memory_bank": {"input.streams.unlabeled.batch_size": BATCH // 2,
                        "memory_bank.samples_rule": "cityscapes"},
        # PC²Seg: base_config's values (8 x 90x120 stride-4 pixels per step; cpu: below).
        "contextrast": CONTEXTRAST,
    },
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CamVid config; `arg` = "method=<preset>,variant=<''|smoke|cpu>"."""
  args = common.parse_arg(arg, method=DEFAULT_METHOD, variant="")
  common.check_variant(args.variant, VARIANTS)
  config = common.protocol_config(PROTOCOL, args.method,
                                  "" if args.variant == "cpu" else args.variant)
  config.input.manual_dir = CAMVID_DIR
  if args.variant == "cpu":
    config.input.crop_size = (128, 160)
    config.model.backbone = "resnet_tiny"
    config.model.width = 16
    config.model.head_dim = 64
    config.model.rep_dim = 64
    # From scratch instead of an ImageNet backbone: 4x the official rate learns much faster
    # in 2000 steps (as on the synthetic recipe); not tuned further.
    config.optim.lr = 0.01
    config.num_train_steps = 2000
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.log_every_steps = 100
    if config.method == "cac":
      # CAC needs square crops (a multiple of 8); 128x128 pairs with the long side drawn in
      # [192, 480] (base 240). The schedule keeps CAC's shape: no unsupervised term for the
      # first 5/80 of the steps. From scratch, the backbone learns at the full rate (CAC's
      # lr/10 assumes an ImageNet backbone). Smaller heads, as the other cpu rows.
      config.input.crop_size = (128, 128)
      config.cac.base_size = 240
      config.cac.unsup_start_step = config.num_train_steps * 5 // 80
      config.cac.proj_hidden = 64
      config.cac.decoder_dim = 64
      config.optim.backbone_lr_mult = 1.0
    if config.method == "memory_bank":
      # The official phases (memory from step 1000, contrast, ClassMix and the end of the
      # pseudo-label ramp-up at 2000, of 150k) would never start in 2000 steps: the memory from
      # step 250, the rest from 500. Heads as wide as the other cpu rows' (64).
      config.memory_bank.dim = 64
      config.memory_bank.memory_start_step = 250
      config.memory_bank.contrastive_start_step = 500
      config.memory_bank.classmix_start_step = 500
      config.memory_bank.ramp_up_steps = 500
    if config.method == "contextrast":
      # Every image labelled (input.num_labeled=0: Contextrast is supervised); the cpu rows'
      # batch, heads and single-scale evaluation (the full recipe: 16, 256, TTA); the
      # DeepLabV3 head at output stride 8 stays. The Table 2 rows of one recipe:
      # contextrast.loss=contextrast|pissas|none.
      config.input.num_labeled = 0
      config.input.streams.labeled.batch_size = 8
      config.contextrast.proj_dim = 64
      # Pissas's pixel-pixel budget: 10000 features per level (per GPU, spec §4.1) costs
      # ~16 train steps here (benchmarks/contextrast_loss.py); 1000 keeps it affordable.
      config.contextrast.pissas.max_features_total = 1000
      config.eval.scales = (1.0,)
      config.eval.flip = False
    if config.method == "pc2seg":
      # A smaller projection, as the other cpu rows' heads (rep_dim 64); anchors, pool and
      # negatives as the full recipe (8 x 32x40 stride-4 pixels per step).
      config.pc2seg.proj_dim = 32
  elif args.variant:
    config.input.eval_batch_size = BATCH  # whole 360x480 images, as the full config
    # One pass per image: the Contextrast recipe's multi-scale + flip testing is 12 passes.
    config.eval.scales = (1.0,)
    config.eval.flip = False
  else:
    config.log_every_steps = 100
    config.eval_every_steps = 2000
  return config
