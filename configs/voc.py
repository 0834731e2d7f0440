"""Pascal VOC 2012 + SBD (ReCo's `pascal`) with the official benchmark protocol.

Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
21 classes, train = train_aug (10582), eval on val (1449) padded to 513x513, crops 321x321,
scale range (0.5, 1.5), 40k iterations, DeepLabv3+ on ResNet-101 with output stride 16.

Argument: `method=<preset>` (configs/common.py: METHOD_PRESETS; default `classmix_reco`, the
paper's method; official counterparts `train_sup.py [--apply_reco]` and
`train_semisup.py --apply_aug {cutout,cutmix,classmix} [--apply_reco]`) and `variant=smoke`
(3 steps, tiny model, small crops; eval size kept: it runs on the real data). The README's
fewest-label run, seed 0:

  python main.py --config=configs/voc.py:method=classmix_reco --config.input.num_labeled=60 \
      --config.input.data_dir=TFDS --config.seed=0 --workdir=W

Prepare once (layout in input_pipeline/builders/voc.py):
  python -m input_pipeline.prepare --dataset=voc --manual_dir=DIR/pascal --data_dir=TFDS
then pass `--config.input.data_dir=TFDS` (or `--config.input.manual_dir=DIR/pascal` to
prepare on the first run).

Labelled subset: `--config.input.num_labeled=60` (README: 60, 200, 600 ...) selects with the
official class-balanced rule (threshold 3, `--config.input.min_classes` to lower it) and
`--config.seed` (README seeds 0, 1, 2); 0 = every image labelled. Field splits:
`--config.input.labeled_ids='("splits/pascal/92/labeled.txt",)'`. Partial labels: see
`input_pipeline/partial_labels.py` and set `--config.input.partial_labels_dir=OUT/p1_seed0`,
which switches on the partial-label step (num_labeled must stay 0).

Devices: every global batch must divide the device count. The semi-supervised 10 + 10 runs on
1, 2, 5 or 10 devices and the supervised 20 on 1, 2, 4, 5, 10 or 20; elsewhere change
`input.streams.labeled.batch_size` / `input.streams.unlabeled.batch_size` (e.g. 8 + 8 on 8
devices), which departs from the protocol.
"""
import ml_collections

from configs import common

DEFAULT_METHOD = "classmix_reco"
PROTOCOL = common.Protocol(
    dataset="voc",
    eval_split="val",
    crop_size=(321, 321),
    scale_range=(0.5, 1.5),
    eval_size=(513, 513),  # im_size: val images (<= 500x500) are padded right/bottom to this
    semi_batch=10,  # labelled = unlabelled (train_semisup.py --batch_size 10)
    supervised_batch=20,  # train_sup.py doubles the batch
    method_settings={
        # ReCo's S4GAN row (Table 5) is DeepLabv2; train_s4GAN.py's VOC values (s4gan_spec §8);
        # the official fixed pool fits 321 crops (used only with s4gan.pool='fixed').
        "s4gan": {"model.name": "deeplabv2", "s4gan.threshold_st": 0.6, "s4gan.lr_d": 1e-4,
                  "s4gan.pool_size": (20, 20)},
        # Memory bank: configSSL_pascal_*_COCO/imagenet (other_methods_spec §2.5): DeepLabv2-
        # R101, 14 labelled + 7 unlabelled (x2 views) 321 crops, 150k iterations, SGD lr 2e-4
        # (no Nesterov, one group), wd 5e-4; the *_v3 family: README.
        "memory_bank": {"model.name": "deeplabv2", "input.streams.labeled.batch_size": 14,
                        "input.streams.unlabeled.batch_size": 7, "num_train_steps": 150_000,
                        "optim.lr": 2e-4, "optim.weight_decay": 5e-4, "optim.nesterov": False,
                        "memory_bank.samples_rule": "pascal_voc",
                        "memory_bank.drop_background": True, "eval_every_steps": 1000},
        # PC²Seg: base_config's config.pc2seg is sized for VOC (10 unlabelled 321 crops, 81x81
        # stride-4 pixels each: 256 anchors per image, a pool of 4096, 512 negatives).
    },
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The VOC protocol; `arg` = "method=<preset>,variant=<''|smoke>"."""
  return common.protocol_get_config(PROTOCOL, arg, DEFAULT_METHOD)
