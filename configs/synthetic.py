"""The embedded synthetic dataset (input_pipeline/synthetic.py): a quick, label-scarce recipe.

8 classes, 512 training and 64 validation images of 64x64, generated on the fly (no files, no
downloads). `configs/default.py` is this file's default (`classmix_reco`), what
`python main.py --workdir=W` trains:

  python main.py --config=configs/synthetic.py --workdir=W                      # classmix_reco
  python main.py --config=configs/synthetic.py:method=supervised --workdir=W    # the baseline
  python main.py --config=configs/synthetic.py:method=cutmix,variant=smoke --workdir=W

Argument: `method=<preset>` (configs/common.py: METHOD_PRESETS; default `classmix_reco`) and
`variant=smoke` (3 steps, tiny model, 32x32 images, 4 of 16 images labelled).

One recipe for every method, so that their results compare: 1/8 of the training images
labelled (64 of 512; the rest form the unlabelled stream of the mean-teacher methods),
8 labelled (+ 8 unlabelled) 64x64 crops per step, a small DeepLabv3+ (ResNet-tiny of width
16, 64-channel heads and representations), 800 steps. Sized so that the default
(`classmix_reco`) trains and evaluates in about 4 minutes on a 2-core CPU. The supervised
presets read the same 64 labelled images with the same batch (not doubled), model, crops and
steps, without the unlabelled stream.

Departures from the official protocol, because this model starts from scratch instead of
fine-tuning an ImageNet backbone and has 800 steps instead of 40k: learning rate 0.03
(official 2.5e-3; 0.01-0.03 learn several times faster here) and the small model. The
ReCo, mean-teacher and augmentation settings are the official ones.

Measured (2-core CPU, idle): the default reaches mIoU 0.438 at step 800 in 3.6 minutes; the
supervised baseline of the same recipe (`configs/synthetic.py:method=supervised`) 0.439 (1.3
minutes idle, 2.7 with another job running). At this budget a from-scratch teacher is still
weak when its pseudo-labels start to count, so semi-supervision does not pay off yet; the
default is there to run every loss end to end quickly (the CamVid comparison: README).
"""
import ml_collections

from configs import common

DEFAULT_METHOD = "classmix_reco"
NUM_LABELED = 64  # of input.synthetic.num_train = 512
SMOKE_NUM_LABELED = 4  # of the smoke variant's 16 images
CROP_SIZE = (64, 64)
BATCH = 8  # labelled, and unlabelled for the mean-teacher methods
LEARNING_RATE = 0.03


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The synthetic recipe; `arg` = "method=<preset>,variant=<''|smoke>"."""
  args = common.parse_arg(arg, method=DEFAULT_METHOD, variant="")
  common.check_variant(args.variant, common.VARIANTS)
  config = common.base_config()
  common.apply_method(config, args.method)
  config.input.dataset = "synthetic"
  config.input.num_labeled = NUM_LABELED
  config.input.crop_size = CROP_SIZE
  config.input.eval_size = CROP_SIZE
  config.input.streams.labeled.batch_size = BATCH
  config.input.streams.unlabeled.batch_size = BATCH
  config.input.eval_batch_size = BATCH
  config.model.backbone = "resnet_tiny"
  config.model.width = 16
  config.model.head_dim = 64
  config.model.rep_dim = 64
  config.optim.lr = LEARNING_RATE
  config.num_train_steps = 800
  config.log_every_steps = 50
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400
  if args.variant:
    common.apply_variant(config, args.variant)
    config.input.num_labeled = SMOKE_NUM_LABELED
  return config
