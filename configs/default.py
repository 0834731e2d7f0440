"""Default config: ReCo + ClassMix (method `classmix_reco`) on the embedded synthetic dataset.

`base_config()` declares every field of every config (the single source of field names) at
neutral values: the official hyper-parameters of lorenmt/reco and the synthetic dataset,
method 'supervised', every image labelled. Dataset configs start from it and override
values; they should not start from `get_config()`, whose values are tuned for a quick CPU
demo (a learning rate 12x the official one, a tiny model, 1/8 of the images labelled).

`get_config()` is `configs/synthetic_classmix_reco.py` (recipe in configs/synthetic_base.py):
`python main.py --workdir=W` trains it end to end in about 4 minutes on a 2-core CPU.
`--config=configs/default.py:smoke` gives a few-step variant for tests and CI.

Official values are cited as `file: symbol` of lorenmt/reco (see ../shared/reference).
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """ReCo + ClassMix on the synthetic dataset, label-scarce (configs/synthetic_base.py)."""
  # Imported here: synthetic_base builds on `base_config` of this module.
  from configs import synthetic_base
  return synthetic_base.dataset_config("classmix_reco", arg)


def base_config() -> ml_collections.ConfigDict:
  """Every field, at neutral values (official hyper-parameters, synthetic data, supervised).

  With every image labelled, 600 steps of supervised training on the synthetic dataset
  (ResNet-tiny of width 64, 256-channel heads) reach mIoU about 0.50 in about 13 minutes on
  a 2-core CPU (the default before ReCo + ClassMix).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = "supervised"  # a key of reco_jax.methods.METHODS, e.g. classmix_reco

  # ---- data -----------------------------------------------------------------------------
  config.input = ml_collections.ConfigDict()
  config.input.dataset = "synthetic"  # synthetic | camvid
  # TFDS data_dir where prepared datasets live; None -> ~/tensorflow_datasets.
  config.input.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Raw directory in the official layout, read once by the TFDS builder (manual_dir).
  config.input.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.input.train_split = "train"
  config.input.eval_split = "val"
  config.input.crop_size = (64, 64)  # (H, W) of training crops
  config.input.scale_range = (0.5, 1.5)  # build_data.py: BuildDataLoader (VOC/SUN)
  config.input.batch_size = 8  # global labelled batch
  config.input.unlabeled_batch_size = 0  # global unlabelled batch (semi-supervised)
  config.input.eval_batch_size = 8  # global eval batch
  config.input.eval_size = (64, 64)  # eval images are padded to this (H, W)
  config.input.num_labeled = 0  # 0 = every training image is labelled
  config.input.labeled_ids = ()  # explicit ids (or split-file paths) of labelled images
  # Class threshold of the official class-balanced selection (None: the dataset's, e.g.
  # VOC 3, Cityscapes 12; build_data.py: get_pascal_idx unique_num).
  config.input.min_classes = ml_collections.FieldReference(None, field_type=int)
  # Directory of sparse label maps ("partial labels, full dataset"; written by
  # `python -m input_pipeline.partial_labels`), e.g. <out>/p1_seed0. None = full labels.
  config.input.partial_labels_dir = ml_collections.FieldReference(None, field_type=str)
  config.input.num_threads = 0  # tf.data threads per process; 0 = half the host's cores
  config.input.shuffle_buffer = 512
  config.input.color_jitter_prob = 0.8  # build_data.py: transform
  config.input.blur_prob = 0.5
  config.input.flip_prob = 0.5
  config.input.prefetch = 2
  # The embedded synthetic dataset (input_pipeline/synthetic.py).
  config.input.synthetic = ml_collections.ConfigDict()
  config.input.synthetic.num_train = 512
  config.input.synthetic.num_val = 64
  config.input.synthetic.image_size = (64, 64)
  config.input.synthetic.seed = 0

  # ---- model ----------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = "deeplabv3plus"  # deeplabv3plus | deeplabv2
  config.model.backbone = "resnet_tiny"  # resnet_tiny | resnet18 | resnet50 | resnet101
  config.model.output_stride = 16  # deeplabv3.py: dilate_scale=16
  config.model.rep_dim = 256  # deeplabv3.py: output_dim
  config.model.head_dim = 256  # ASPP/decoder width (256 in the official code)
  config.model.width = 64  # backbone base width (64 = standard ResNet)
  config.model.dtype = "float32"  # float32 | bfloat16 (compute dtype; params stay float32)

  # ---- optimisation (module_list.py: PolyLR; train_*.py: SGD) --------------------------
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2.5e-3
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.poly_power = 0.9
  config.optim.min_lr = 1e-6
  # 'iteration': poly decay every step (default); 'epoch': the official per-epoch stepping.
  config.optim.schedule_unit = "iteration"
  config.optim.steps_per_epoch = 200  # build_data.py: num_samples = batch_size * 200

  # ---- semi-supervised (issue: mean teacher) -------------------------------------------
  config.semi = ml_collections.ConfigDict()
  config.semi.ema_decay_max = 0.99  # module_list.py: EMA alpha
  config.semi.strong_threshold = 0.97
  config.semi.weak_threshold = 0.7
  # Official: the teacher pseudo-labels in train() mode (BN batch statistics, its own
  # running statistics updated by that pass) and only parameters are averaged.
  config.semi.teacher_train_mode = True
  config.semi.ema_batch_stats = False  # True: EMA the student's BN statistics too
  # "Partial labels, full dataset" mode (reco_spec §4 P): sparse labels override the teacher.
  # Switched on by input.partial_labels_dir; True without that directory is an error.
  config.semi.partial_labels = False
  config.semi.quantize = True  # emulate the official uint8 PIL round trips
  # Value of the unsupervised loss when no pixel has CE > 0: 'nan' is the official value;
  # 'zero' (default) has the same (zero) gradient but does not trip the NaN guard.
  config.semi.unsup_empty_policy = "zero"

  # ---- ReCo (module_list.py: compute_reco_loss) -----------------------------------------
  config.reco = ml_collections.ConfigDict()
  config.reco.weight = 1.0
  config.reco.temperature = 0.5
  config.reco.num_queries = 256
  config.reco.num_negatives = 512
  config.reco.strong_threshold = 0.97
  # Ablations of the paper's Table 4 (losses/reco.py: reco_loss).
  config.reco.query_sampling = "active"  # active | random
  config.reco.key_sampling = "active"  # active | random | uniform_class
  config.reco.easy_queries = False

  # ---- loop, evaluation, checkpoints ------------------------------------------------------
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  config.max_checkpoints_to_keep = 2
  config.keep_best_checkpoint = True
  config.num_eval_images_to_log = 4
  # A class absent from both GT and predictions has IoU 0/0: 'nan' is the official
  # behaviour (mIoU becomes NaN), 'exclude' leaves it out of the mean (README).
  config.eval_absent_classes = "exclude"
  config.eval_use_teacher = True  # evaluate the EMA teacher when there is one (official)
  return config


def apply_variant(config: ml_collections.ConfigDict, arg: str) -> None:
  """Applies the `:variant` suffix of `--config=file.py:variant` (shared by every config)."""
  if arg == "smoke":
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 2
    config.input.crop_size = (32, 32)
    config.input.eval_size = (32, 32)
    config.input.batch_size = 8
    config.input.eval_batch_size = 8
    config.input.synthetic.num_train = 16
    config.input.synthetic.num_val = 8
    config.input.synthetic.image_size = (32, 32)
    config.input.shuffle_buffer = 16
    config.model.backbone = "resnet_tiny"
    config.model.width = 8
    config.model.head_dim = 16
    config.model.rep_dim = 16
    if config.input.unlabeled_batch_size:  # labelled = unlabelled, as the official scripts
      config.input.unlabeled_batch_size = config.input.batch_size
    # Fewer ReCo draws: same code path, a smaller gather per class.
    config.reco.num_queries = 32
    config.reco.num_negatives = 64
    config.num_eval_images_to_log = 2
  else:
    raise ValueError(f"unknown config variant {arg!r}; known variants: smoke")
