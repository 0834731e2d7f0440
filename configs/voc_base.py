"""Pascal VOC 2012 + SBD (ReCo's `pascal`) with the official benchmark protocol.

Not a config file itself: `configs/voc_<method>.py` call `dataset_config(method, arg)`.
Constants from build_data.py: BuildDataLoader and the training scripts (reco_spec §4, §7):
21 classes, train = train_aug (10582), eval on val (1449) padded to 513x513, crops 321x321,
scale range (0.5, 1.5), 40k iterations, DeepLabv3+ on ResNet-101 with output stride 16.

Prepare once (layout in input_pipeline/builders/voc.py):
  python -m input_pipeline.prepare --dataset=voc --manual_dir=DIR/pascal --data_dir=TFDS
then pass `--config.input.data_dir=TFDS` (or `--config.input.manual_dir=DIR/pascal` to
prepare on the first run).

Labelled subset: `--config.input.num_labeled=60` (README: 60, 200, 600 ...) selects with the
official class-balanced rule (threshold 3, `--config.input.min_classes` to lower it) and
`--config.seed` (README seeds 0, 1, 2); 0 = every image labelled. Field splits:
`--config.input.labeled_ids='("splits/pascal/92/labeled.txt",)'`. Partial labels: see
`input_pipeline/partial_labels.py` and set `--config.input.partial_labels_dir=OUT/p1_seed0
--config.semi.partial_labels=True` (num_labeled must stay 0).

Devices: every global batch must divide the device count. The semi-supervised 10 + 10 runs on
1, 2, 5 or 10 devices and the supervised 20 on 1, 2, 4, 5, 10 or 20; elsewhere change
`input.batch_size` / `input.unlabeled_batch_size` (e.g. 8 + 8 on 8 devices), which departs from
the protocol.
"""
import ml_collections

from configs import default
from reco_jax import methods

CROP_SIZE = (321, 321)
SCALE_RANGE = (0.5, 1.5)
EVAL_SIZE = (513, 513)  # im_size: val images (<= 500x500) are padded right/bottom to this
SEMI_BATCH = 10  # labelled = unlabelled (train_semisup.py --batch_size 10)
SUPERVISED_BATCH = 20  # train_sup.py doubles the batch


def dataset_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The VOC config of `method` (a `reco_jax.methods.METHODS` key), with variant `arg`."""
  uses_teacher = methods.get_method(method).uses_teacher
  config = default.get_config()
  config.method = method
  config.input.dataset = "voc"
  config.input.train_split = "train"
  config.input.eval_split = "val"
  config.input.crop_size = CROP_SIZE
  config.input.scale_range = SCALE_RANGE
  config.input.eval_size = EVAL_SIZE
  config.input.batch_size = SEMI_BATCH if uses_teacher else SUPERVISED_BATCH
  config.input.unlabeled_batch_size = SEMI_BATCH if uses_teacher else 0
  # The official test batch is 4; the eval batch does not change the metrics, and equal to the
  # labelled batch it fits every device count that training fits.
  config.input.eval_batch_size = config.input.batch_size
  config.model.name = "deeplabv3plus"
  config.model.backbone = "resnet101"
  config.model.output_stride = 16
  config.model.width = 64
  config.model.head_dim = 256
  config.model.rep_dim = 256
  config.num_train_steps = 40_000  # 200 epochs x 200 iterations
  # The official PolyLR steps once per 200-iteration epoch ('epoch'); the project default
  # 'iteration' decays every step (reco_spec §10).
  config.optim.schedule_unit = "iteration"
  config.optim.steps_per_epoch = 200
  # Official: validate after every epoch and report the best mIoU (a larger value saves time).
  config.eval_every_steps = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  if arg:
    default.apply_variant(config, arg)
    # Keep the dataset's eval size so that the smoke variant also runs on the real images.
    config.input.eval_size = EVAL_SIZE
    config.input.unlabeled_batch_size = config.input.batch_size if uses_teacher else 0
  return config
