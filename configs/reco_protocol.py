"""The official ReCo training protocol, shared by the VOC, Cityscapes and SUN RGB-D configs.

Not a config file itself: `configs/<dataset>_base.py` call `protocol_config` with the
dataset's constants of reco_spec §7 (build_data.py: BuildDataLoader).
"""
import ml_collections

from configs import default
from reco_jax import methods


def protocol_config(method: str, arg: str | None, *, dataset: str, eval_split: str,
                    crop_size: tuple[int, int], scale_range: tuple[float, float],
                    eval_size: tuple[int, int], semi_batch: int,
                    supervised_batch: int) -> ml_collections.ConfigDict:
  """The config of `method` (a `reco_jax.methods.METHODS` key) on `dataset`, variant `arg`."""
  uses_teacher = methods.get_method(method).uses_teacher
  config = default.base_config()
  config.method = method
  config.input.dataset = dataset
  config.input.train_split = "train"
  config.input.eval_split = eval_split
  config.input.crop_size = crop_size
  config.input.scale_range = scale_range
  config.input.eval_size = eval_size
  # train_semisup.py: labelled = unlabelled batch; train_sup.py doubles the batch.
  config.input.batch_size = semi_batch if uses_teacher else supervised_batch
  config.input.unlabeled_batch_size = semi_batch if uses_teacher else 0
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
    config.input.eval_size = eval_size
    config.input.unlabeled_batch_size = config.input.batch_size if uses_teacher else 0
  return config
