"""What every config file shares: the fields, the method presets, the argument and the variants.

`base_config()` declares every field of every config (the single source of field names) at
neutral values: the official hyper-parameters of lorenmt/reco and the synthetic dataset,
method 'supervised', every image labelled. The dataset configs (`configs/<dataset>.py`) start
from it and override values; `configs/default.py` is the synthetic one.

A config file's argument is a comma-separated list of `key=value` pairs (`parse_arg`), e.g.
`--config=configs/voc.py:method=classmix_reco,variant=smoke`: `method` names a preset of
`METHOD_PRESETS` (`apply_method`), `variant` a shared variant (`apply_variant`: `smoke`) or a
dataset's own (CamVid's `cpu`).

Official values are cited as `file: symbol` of lorenmt/reco (see ../shared/reference).
This module imports only ml_collections and the standard library: configs name the library's
parts (`config.method`, `config.aux_losses`) by string.
"""
import typing

import ml_collections

# The historical method names, as presets of (method module, mixing, auxiliary losses).
# `method` names a module of reco_jax/methods/; `mix` is `mean_teacher.mix` (None: the method
# has no teacher and the field keeps its value); `aux_losses` the auxiliary pixel losses.
METHOD_PRESETS = {
    # train_sup.py
    "supervised": {"method": "supervised", "mix": None, "aux_losses": ()},
    # train_sup.py --apply_reco
    "supervised_reco": {"method": "supervised", "mix": None, "aux_losses": ("reco",)},
    # train_semisup.py --apply_aug {cutout,cutmix,classmix}
    "cutout": {"method": "mean_teacher", "mix": "cutout", "aux_losses": ()},
    "cutmix": {"method": "mean_teacher", "mix": "cutmix", "aux_losses": ()},
    "classmix": {"method": "mean_teacher", "mix": "classmix", "aux_losses": ()},
    # train_semisup.py --apply_aug {cutout,cutmix,classmix} --apply_reco
    "cutout_reco": {"method": "mean_teacher", "mix": "cutout", "aux_losses": ("reco",)},
    "cutmix_reco": {"method": "mean_teacher", "mix": "cutmix", "aux_losses": ("reco",)},
    "classmix_reco": {"method": "mean_teacher", "mix": "classmix", "aux_losses": ("reco",)},
    # Context-Aware-Consistency train.py (Lai et al., CVPR 2021); settings in config.cac.
    "cac": {"method": "cac", "mix": None, "aux_losses": ()},
    # semisup-semseg train_s4GAN.py (Mittal et al., TPAMI 2019); settings in config.s4gan.
    "s4gan": {"method": "s4gan", "mix": None, "aux_losses": ()},
    # PC²Seg (Zhong et al., ICCV 2021; no public code); settings in config.pc2seg.
    "pc2seg": {"method": "pc2seg", "mix": None, "aux_losses": ()},
    # ReCo + ClassMix with Alonso et al.'s memory-bank terms as a second auxiliary term.
    "classmix_reco_memory_bank": {"method": "mean_teacher", "mix": "classmix",
                                  "aux_losses": ("reco", "memory_bank")},
    # SemiSeg-Contrastive trainSSL.py (Alonso et al., ICCV 2021); settings in config.memory_bank.
    "memory_bank": {"method": "memory_bank", "mix": None, "aux_losses": ()},
    # Contextrast (Sung et al., CVPR 2024; no public code): supervised; settings in config.contextrast.
    "contextrast": {"method": "contextrast", "mix": None, "aux_losses": ()},
    # ClassMix mean teacher with Contextrast's term on the labelled pixels.
    "classmix_contextrast": {"method": "mean_teacher", "mix": "classmix",
                             "aux_losses": ("contextrast",)},
}

VARIANTS = ("smoke",)  # the variants every config file offers (apply_variant)


def base_config() -> ml_collections.ConfigDict:
  """Every field, at neutral values (official hyper-parameters, synthetic data, supervised).

  With every image labelled, 600 steps of supervised training on the synthetic dataset
  (ResNet-tiny of width 64, 256-channel heads) reach mIoU about 0.50 in about 13 minutes on
  a 2-core CPU (the default before ReCo + ClassMix).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A module of reco_jax/methods/ ("supervised", "mean_teacher") or the dotted import path of
  # an out-of-tree method module. Set with the config argument `method=<preset>`.
  config.method = "supervised"
  # Auxiliary pixel-contrastive losses, e.g. ("reco",) (train_*.py --apply_reco); () none.
  config.aux_losses = ()
  config.method_preset = "supervised"  # the preset applied (METHOD_PRESETS), for display only

  # ---- data -----------------------------------------------------------------------------
  config.input = ml_collections.ConfigDict()
  config.input.dataset = "synthetic"  # synthetic | camvid | voc | cityscapes | sun
  # TFDS data_dir where prepared datasets live; None -> ~/tensorflow_datasets.
  config.input.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Raw directory in the official layout, read once by the TFDS builder (manual_dir).
  config.input.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.input.train_split = "train"
  config.input.eval_split = "val"
  config.input.crop_size = (64, 64)  # (H, W) of training crops
  config.input.scale_range = (0.5, 1.5)  # build_data.py: BuildDataLoader (VOC/SUN)
  # Global batch of each training stream. A method reads the streams it needs (supervised:
  # labeled; mean teacher: both); a config may size a stream its method does not read.
  config.input.streams = ml_collections.ConfigDict()
  config.input.streams.labeled = ml_collections.ConfigDict()
  config.input.streams.labeled.batch_size = 8  # global labelled batch
  config.input.streams.unlabeled = ml_collections.ConfigDict()
  # Global unlabelled batch; train_semisup.py: the same --batch_size as the labelled one.
  config.input.streams.unlabeled.batch_size = 8
  # CAC's overlapping crop pairs (one pair per unlabelled image; CAC: 8 pairs per step).
  config.input.streams.unlabeled_pair = ml_collections.ConfigDict()
  config.input.streams.unlabeled_pair.batch_size = 8
  # S4GAN's discriminator "real" batch: a third, independent draw of labelled images.
  config.input.streams.labeled_real = ml_collections.ConfigDict()
  config.input.streams.labeled_real.batch_size = 8
  # How a stream draws its subset: 'replacement' = i.i.d. uniform draws over the whole subset
  # (build_data.py: BuildDataLoader, RandomSampler(replacement=True)); 'permutation' = a fresh
  # full permutation per epoch.
  config.input.sampling = "replacement"
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
  config.model.name = "deeplabv3plus"  # deeplabv3plus | deeplabv2 | deeplabv3 (reco_jax/models)
  config.model.backbone = "resnet_tiny"  # resnet_tiny | resnet18 | resnet34 | resnet50 | resnet101
  # None = the model's default: deeplabv3plus 16 (deeplabv3.py: dilate_scale=16), deeplabv2 and
  # deeplabv3 8.
  config.model.output_stride = ml_collections.FieldReference(None, field_type=int)
  config.model.rep_dim = 256  # deeplabv3.py: output_dim
  config.model.head_dim = 256  # ASPP/decoder width (256 in the official code)
  config.model.width = 64  # backbone base width (64 = standard ResNet)
  config.model.dtype = "float32"  # float32 | bfloat16 (compute dtype; params stay float32)
  # ImageNet weights for the student's backbone (and so the teacher's copy) at step 0: a
  # directory written by `python -m reco_jax.tools.import_weights` or a torchvision-named
  # .safetensors/.pth file (officially torchvision resnet101(pretrained=True), reco_spec 6.1).
  # None = random init, our default (reco-jax downloads nothing). Not read on resume.
  config.model.pretrained = ml_collections.FieldReference(None, field_type=str)

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
  # Learning-rate factor of the backbone's parameters (params under a 'backbone' module);
  # 1.0 = one parameter group (the ReCo optimiser). CAC: 0.1 (diff_lrs).
  config.optim.backbone_lr_mult = 1.0

  # ---- mean teacher (train_semisup.py) --------------------------------------------------
  config.mean_teacher = ml_collections.ConfigDict()
  # Mixing of the pseudo-labelled images: cutout | cutmix | classmix (--apply_aug).
  config.mean_teacher.mix = "classmix"
  config.mean_teacher.ema_decay_max = 0.99  # module_list.py: EMA alpha
  config.mean_teacher.strong_threshold = 0.97
  config.mean_teacher.weak_threshold = 0.7
  # Official: the teacher pseudo-labels in train() mode (BN batch statistics, its own
  # running statistics updated by that pass) and only parameters are averaged.
  config.mean_teacher.teacher_train_mode = True
  config.mean_teacher.ema_batch_stats = False  # True: EMA the student's BN statistics too
  # "Partial labels, full dataset" mode (reco_spec §4 P): sparse labels override the teacher.
  # Switched on by input.partial_labels_dir; True without that directory is an error.
  config.mean_teacher.partial_labels = False
  config.mean_teacher.quantize = True  # emulate the official uint8 PIL round trips
  # Value of the unsupervised loss when no pixel has CE > 0: 'nan' is the official value;
  # 'zero' (default) has the same (zero) gradient but does not trip the NaN guard.
  config.mean_teacher.unsup_empty_policy = "zero"
  config.mean_teacher.eval_use_teacher = True  # evaluate the EMA teacher (official)

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

  # ---- CAC (Context-Aware-Consistency: models/model.py, configs/voc_cac_*.json) ----------
  config.cac = ml_collections.ConfigDict()
  config.cac.temperature = 0.1  # temp
  config.cac.pos_threshold = 0.75  # pos_thresh_value (gamma)
  config.cac.weight = 0.1  # weight_unsup; the two directions are summed
  config.cac.proj_dim = 128  # proj_final_dim
  config.cac.proj_hidden = 256
  config.cac.decoder_dim = 256  # CAC's decoder tail (two 3x3 convs); 0 = our decoder map as is
  config.cac.dropout = 0.1  # classifier Dropout (also active for the pseudo-labels)
  config.cac.step_save = 1  # bank = step_save + 1 steps (R50 VOC 1, R101 VOC 2, City 0)
  # epoch_start_unsup (5) x iterations per epoch (1157), in steps: no unlabelled pass before.
  config.cac.unsup_start_step = 5 * 1157
  # 'official': max-shift over the positive + first 8000 bank rows, eps after the shift
  # (with no surviving negative the loss is not 0); 'exact': -log_softmax.
  config.cac.numerics = "official"
  config.cac.chunk_size = 1024  # bank rows per lax.scan step (temp memory ~ 5 B x 2P x chunk_size)
  config.cac.max_shift_rows = 8000  # the official first chunk
  # How the steps before unsup_start_step skip the unlabelled branch: cond (no work, as the
  # official code), select (compute, discard: same numbers; XLA:CPU runs convolutions inside a
  # lax.cond branch ~10x slower), auto (select on CPU, cond elsewhere).
  config.cac.warmup_skip = "auto"
  # Groups of the per-GPU masked mean (the official GPU count: VOC 2, Cityscapes 4).
  config.cac.mean_groups = 1
  # Crop pairs (dataloaders/voc.py: PairVOCDataset): long side in scale_range x base_size.
  config.cac.base_size = 400
  config.cac.scale_range = (0.8, 2.0)
  config.cac.iou_bound = (0.1, 1.0)
  config.cac.pair_variant = "voc"  # voc | city (how a zero overlap is rejected)
  config.cac.jitter_prob = 0.8
  config.cac.blur_prob = 0.5
  config.cac.grayscale_prob = 0.2

  # ---- S4GAN (semisup-semseg train_s4GAN.py, model/discriminator.py; s4gan_spec §8) ----
  config.s4gan = ml_collections.ConfigDict()
  config.s4gan.threshold_st = 0.6  # --threshold-st: 0.6 VOC / Context, 0.7 Cityscapes
  config.s4gan.lambda_fm = 0.1  # --lambda-fm
  config.s4gan.lambda_st = 1.0  # --lambda-st
  config.s4gan.lr_d = 1e-4  # --learning-rate-D: 1e-4 VOC, 1e-5 Cityscapes; poly as the student
  config.s4gan.beta1 = 0.9  # Adam betas of the discriminator
  config.s4gan.beta2 = 0.99
  config.s4gan.ndf = 64  # discriminator base width
  config.s4gan.dropout = 0.5  # Dropout2d after conv1-3, active in every D forward (official)
  # 'global': mean over D's last map (any crop); 'fixed': the official AvgPool2d(pool_size),
  # a global mean only at the design crop (VOC 321: (20, 20); Cityscapes 256x512: (16, 32)).
  config.s4gan.pool = "global"
  config.s4gan.pool_size = (20, 20)
  # D's real batch: 'separate' (official: stream labeled_real) or 'labeled' (the CE batch).
  config.s4gan.real_batch = "separate"
  # Official: the real images are scaled by the *labelled CE batch's* value range.
  config.s4gan.real_range_from_labeled = True

  # ---- PC²Seg (article: ../shared/reference/papers/pc2seg_article.txt; README table) -----
  # Values the article does not give are our choices (README: PC²Seg, value/source table).
  config.pc2seg = ml_collections.ConfigDict()
  config.pc2seg.contrastive_weight = 0.1  # λ1 of l_ce
  config.pc2seg.consistency_weight = 1.0  # λ2 of l_cy
  config.pc2seg.temperature = 0.1  # τ
  config.pc2seg.proj_dim = 128  # D of the linear projection of `rep`
  # uniform | different_image | debiased | different_image_debiased (the article's choice)
  config.pc2seg.negative_sampling = "different_image_debiased"
  config.pc2seg.anchors_per_image = 256  # anchors i per unlabelled image (feature pixels)
  config.pc2seg.pool_size = 4096  # candidate pool per step, uniform over the batch's pixels
  config.pc2seg.num_negatives = 512  # N per anchor
  config.pc2seg.replacement = True  # i.i.d. draws (article: z_in⁻ ~ Discrete); False: top-N
  config.pc2seg.anchor_view = "weak"  # article: z_i from the weak view; 'strong' swaps roles
  config.pc2seg.anchor_grad = True  # gradient through the anchor z_i
  config.pc2seg.positive_grad = True  # gradient through the positive z_i⁺
  config.pc2seg.negative_grad = False  # gradient through the negatives z_in⁻
  config.pc2seg.reduction = "mean"  # 'sum': the article's Σ_i literally
  config.pc2seg.consistency_pixels = "anchors"  # l_cy over the anchors i, or 'all' valid pixels

  # ---- Class-wise memory bank (SemiSeg-Contrastive trainSSL.py; other_methods_spec §2) ---
  config.memory_bank = ml_collections.ConfigDict()
  config.memory_bank.feature_source = "auto"  # auto: DLv2 layer4, DLv3+ decoder | layer4 | decoder
  config.memory_bank.dim = 256  # projection / prediction / selector width
  config.memory_bank.memory_per_class = 256  # FeatureMemory(memory_per_class=256)
  # E per class per step; 0: labelled batch x per_class_samples_per_image(samples_rule).
  config.memory_bank.elements_per_class = 0
  config.memory_bank.samples_rule = "pascal_voc"  # pascal_voc | cityscapes (FeatureMemory)
  config.memory_bank.confidence = 0.95  # teacher p_max for memory candidates
  config.memory_bank.ranking = "ascending"  # official torch.sort; 'descending': the paper
  config.memory_bank.memory_weighting = "official"  # memory weights = 1; 'paper': Eq. 8
  config.memory_bank.memory_start_step = 1000  # i_iter > RAMP_UP_ITERS - 1000
  config.memory_bank.contrastive_start_step = 2000  # i_iter > RAMP_UP_ITERS
  config.memory_bank.classmix_start_step = 2000  # unlabelled ClassMix only after ramp-up
  config.memory_bank.ramp_up_steps = 2000  # sigmoid_ramp_up of the pseudo-label weight
  config.memory_bank.labeled_contrastive_weight = 0.1
  config.memory_bank.unlabeled_contrastive_weight = 0.1
  config.memory_bank.entropy_weight = 0.01
  config.memory_bank.pseudo_label_power = 6.0  # pixel weight p_max^6
  config.memory_bank.drop_background = False  # ClassMix never pastes class 0 (VOC: True)
  # augment_samples_weak (labelled) and augment_samples (each unlabelled view).
  config.memory_bank.weak = ml_collections.ConfigDict(dict(
      classmix_prob=0.2, scale_prob=0.5, scale_range=(0.75, 1.75), flip_prob=0.5,
      jitter_prob=0.25, jitter_strength=0.125, blur_prob=0.0, blur_sigma=(0.1, 1.5)))
  config.memory_bank.strong = ml_collections.ConfigDict(dict(
      classmix_prob=0.75, scale_prob=0.8, scale_range=(0.75, 1.75), flip_prob=0.5,
      jitter_prob=0.8, jitter_strength=0.25, blur_prob=0.2, blur_sigma=(0.1, 1.5)))
  # ---- Contextrast (Sung et al., CVPR 2024; reco_jax/methods/contextrast.py) ------------
  # None = the loss module's default (reco_jax/losses/contextrast.py: ContextrastSettings,
  # PissasSettings, ContrastiveSegSettings hold each value once, with its source).
  config.contextrast = ml_collections.ConfigDict()
  # The auxiliary term (paper Table 2 rows): contextrast | pissas ([31]) | contrastiveseg
  # ([41], on the last level) | none (CE only).
  config.contextrast.loss = "contextrast"
  # Model maps projected, highest resolution first: the backbone stages (paper: the I = 4
  # encoder layers; Pissas: the four HRNet branches, spec §4.1).
  config.contextrast.levels = ("layer1", "layer2", "layer3", "layer4")
  config.contextrast.proj_dim = 256  # Pissas ms_projector d = 256 (spec §4.1)
  # Aux term on the mean-teacher methods: also the augmented pseudo-labelled batch (its
  # pixels with teacher confidence >= delta_w, as ReCo's term). False: the labelled batch only.
  config.contextrast.aux_pseudo_labels = False
  for name, kind in (("temperature", float), ("alpha", float), ("level_weights", tuple),
                     ("w_low", float), ("w_high", float), ("absent_rule", str),
                     ("anchor_normalization", str), ("normalize_features", bool),
                     ("stop_gradient_anchors", bool), ("negatives", str), ("reduction", str),
                     ("use_bane", bool), ("bane_ratio", float), ("error_map", str),
                     ("selection_scope", str), ("distance_window", int), ("num_negatives", int),
                     ("fallback", str)):
    config.contextrast[name] = ml_collections.FieldReference(None, field_type=kind)
  config.contextrast.pissas = ml_collections.ConfigDict()
  for name, kind in (("temperature", float), ("cross_scale_temperature", float),
                     ("level_weights", tuple), ("alpha", float), ("cross_scale", bool),
                     ("w_high_low", float), ("w_high_mid", float), ("min_views", int),
                     ("max_views", int), ("max_features_total", int), ("detach_deepest", bool),
                     ("chunk", int)):
    config.contextrast.pissas[name] = ml_collections.FieldReference(None, field_type=kind)
  config.contextrast.contrastiveseg = ml_collections.ConfigDict()
  for name, kind in (("temperature", float), ("base_temperature", float), ("max_samples", int),
                     ("max_views", int), ("loss_weight", float), ("sampling", str), ("chunk", int)):
    config.contextrast.contrastiveseg[name] = ml_collections.FieldReference(None, field_type=kind)
  # ---- train-time diagnostics (reco_jax/diagnostics.py) ----------------------------------
  config.diagnostics = ml_collections.ConfigDict()
  # Log pseudo_* train metrics: the pseudo-labels of the unlabelled batch against its ground
  # truth (accuracy, precision / recall of the confident pixels, ECE). Metrics only: the
  # ground truth never reaches a loss. NaN (null in metrics.jsonl) without unlabelled labels.
  config.diagnostics.pseudo_labels = True
  # (δs, δw) for methods without confidence thresholds of their own (memory_bank, pc2seg,
  # s4gan; cac's δw): ReCo's values, so that every method's metrics read on one scale.
  config.diagnostics.reference_thresholds = (0.97, 0.7)
  # ---- loop, evaluation, checkpoints ------------------------------------------------------
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  config.max_checkpoints_to_keep = 2
  config.keep_best_checkpoint = True
  # > 0: after an evaluation, when the best mIoU has not improved for this many steps (since
  # the best checkpoint or the last reload), the evaluated weights go back to the best
  # checkpoint's and training continues (step, optimiser, the method's state continue);
  # trainSSL.py: T/5 iterations. 0 = off. Needs keep_best_checkpoint.
  config.reload_best_patience_steps = 0
  # > 0: at the end, this many train-mode forwards of the evaluated model over the unlabelled
  # stream (else the labelled one) re-estimate its BatchNorm statistics; the result is
  # evaluated and kept in the best checkpoint only if better (trainSSL.py: 1000). 0 = off.
  config.bn_reestimation_steps = 0
  config.num_eval_images_to_log = 4
  # A class absent from both GT and predictions has IoU 0/0: 'nan' is the official
  # behaviour (mIoU becomes NaN), 'exclude' leaves it out of the mean (README).
  config.eval_absent_classes = "exclude"
  # ---- evaluation metrics beyond mIoU (README: Evaluation and analysis) -------------------
  config.eval = ml_collections.ConfigDict()
  # Boundary IoU (Cheng et al., CVPR 2021) at these widths in pixels, reported as
  # boundary_miou_<d>px; () turns it off. Every evaluation (reco_jax/evaluate.py).
  config.eval.boundary_widths = (5, 7, 10)
  # ---- evaluation protocol (reco_jax/inference.py; README: Evaluation and analysis) -------
  # The defaults (whole, (1.0,), no flip) are the official single-pass evaluation.
  # "whole": one forward per (padded) image; "slide": overlapping windows whose softmax
  # probabilities are averaged per pixel (UniMatch / U2PL / mmseg `slide` inference).
  config.eval.mode = "whole"
  config.eval.window = ()  # slide: (H, W) window; () = input.crop_size
  config.eval.stride = ()  # slide: (H, W) stride; () = int(window * 2 / 3) per axis
  # slide: windows per image per forward, to bound activation memory on large images
  # (e.g. 2048x1024 Cityscapes at window 769); 0 = all windows in one forward. Same result.
  config.eval.window_batch = 0
  # Test-time augmentation: image scales (bilinear, align_corners=True) and horizontal flip;
  # softmax probabilities averaged at the label size.
  config.eval.scales = (1.0,)
  config.eval.flip = False
  return config


def apply_method(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets method, mean_teacher.mix, aux_losses and method_preset from preset `name`."""
  if name not in METHOD_PRESETS:
    raise ValueError(f"unknown method preset {name!r}; known presets: "
                     f"{', '.join(METHOD_PRESETS)}")
  preset = METHOD_PRESETS[name]
  config.method = preset["method"]
  if preset["mix"] is not None:
    config.mean_teacher.mix = preset["mix"]
  config.aux_losses = tuple(preset["aux_losses"])
  config.method_preset = name


def _parse_value(key: str, text: str, default):
  """`text` converted to the type of `default` (bool accepts true/false/1/0 and yes/no)."""
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"config argument {key}={text!r}: expected a boolean (true/false)")
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r}: expected "
                       f"{type(default).__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument "k1=v1,k2=v2" (big_vision style) into a ConfigDict.

  Every key must be one of `defaults`, whose values give the types (str, int, float, bool);
  a bare key `k` means `k=True` for a boolean key. Keys not given keep their defaults.
  Example: `parse_arg("method=classmix,variant=smoke", method="supervised", variant="")`.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument key {key!r} in {arg!r}; known keys: "
                       f"{', '.join(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...) in {arg!r}")
      result[key] = True
      continue
    result[key] = _parse_value(key, text.strip(), defaults[key])
  return result


def check_variant(variant: str, known: typing.Sequence[str]) -> None:
  """Fails with one line if `variant` is neither '' (none) nor one of `known`."""
  if variant and variant not in known:
    raise ValueError(f"unknown config variant {variant!r}; known variants: "
                     f"{', '.join(sorted(known))}")


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Applies a shared variant: '' (none) or 'smoke' (a few steps, a tiny model, small crops)."""
  check_variant(variant, VARIANTS)
  if variant == "smoke":
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 2
    config.input.crop_size = (32, 32)
    config.input.eval_size = (32, 32)
    # Labelled = unlabelled, as the official scripts (8 fits 1, 2, 4 or 8 devices).
    config.input.streams.labeled.batch_size = 8
    config.input.streams.unlabeled.batch_size = 8
    config.input.eval_batch_size = 8
    config.input.synthetic.num_train = 16
    config.input.synthetic.num_val = 8
    config.input.synthetic.image_size = (32, 32)
    config.model.backbone = "resnet_tiny"
    config.model.width = 8
    config.model.head_dim = 16
    config.model.rep_dim = 16
    config.input.streams.unlabeled_pair.batch_size = 8
    config.input.streams.labeled_real.batch_size = 8
    # S4GAN: every image passes the discriminator's gate, so the self-training term runs.
    config.s4gan.threshold_st = 0.0
    # CAC: small heads, the unsupervised term from the first step, a crop-sized long side.
    config.cac.proj_hidden = 16
    config.cac.proj_dim = 16
    config.cac.decoder_dim = 16
    config.cac.unsup_start_step = 0
    # No confidence threshold (golden case B): an untrained model's confidences stay below
    # the official 0.75, and the smoke run should exercise the unsupervised gradient.
    config.cac.pos_threshold = 0.0
    config.cac.base_size = 32
    # PC²Seg: small head and draws (a 32x32 crop has 64 stride-4 pixels per image).
    config.pc2seg.proj_dim = 8
    config.pc2seg.anchors_per_image = 16
    config.pc2seg.pool_size = 256
    config.pc2seg.num_negatives = 32
    # Memory bank: small heads and memory; every phase from the first step.
    config.memory_bank.dim = 16
    config.memory_bank.memory_per_class = 16
    config.memory_bank.elements_per_class = 4
    config.memory_bank.confidence = 0.0
    config.memory_bank.memory_start_step = -1
    config.memory_bank.contrastive_start_step = -1
    config.memory_bank.classmix_start_step = -1
    # Contextrast: small projectors and negative sets (a 32x32 crop has 64 stride-4 pixels).
    config.contextrast.proj_dim = 16
    config.contextrast.num_negatives = 64
    # Fewer ReCo draws: same code path, a smaller gather per class.
    config.reco.num_queries = 32
    config.reco.num_negatives = 64
    config.num_eval_images_to_log = 2
    # No boundary IoU in smoke runs (a bigger eval program to compile for every test);
    # `--config.eval.boundary_widths=(5,7,10)` turns it back on.
    config.eval.boundary_widths = ()


class Protocol(typing.NamedTuple):
  """A ReCo benchmark dataset's protocol constants (reco_spec §7; build_data.py)."""
  dataset: str  # config.input.dataset
  eval_split: str
  crop_size: tuple[int, int]
  scale_range: tuple[float, float]
  eval_size: tuple[int, int]  # im_size: eval images are padded to this
  semi_batch: int  # train_semisup.py --batch_size: labelled = unlabelled batch
  supervised_batch: int  # train_sup.py doubles the labelled batch
  # The dataset's values for a method module: {config.method: {dotted key: value}}, applied
  # before the variant (e.g. {"s4gan": {"s4gan.threshold_st": 0.7}}).
  method_settings: typing.Mapping[str, typing.Mapping[str, typing.Any]] | None = None


# CAC's official settings per dataset (other_methods_spec §1.7; configs/*_cac_*.json), applied
# by `protocol_config` for method=cac: (crop, base_size, head lr, step_save, GPUs = groups of
# the per-GPU masked mean, pair variant). VOC: the ResNet-101 config (step_save 2). CamVid is
# and SUN RGB-D are not official CAC datasets: VOC's values (CamVid's long side around 480).
CAC_PROTOCOLS = {
    "voc": dict(crop=320, base_size=400, lr=0.01, step_save=2, mean_groups=2, variant="voc"),
    "cityscapes": dict(crop=720, base_size=2048, lr=0.1, step_save=0, mean_groups=4, variant="city"),
    "camvid": dict(crop=320, base_size=480, lr=0.01, step_save=1, mean_groups=2, variant="voc"),
    "sun": dict(crop=320, base_size=400, lr=0.01, step_save=1, mean_groups=2, variant="voc"),
}
CAC_ITERS_PER_EPOCH = 1157  # train.py: hard-coded iter_per_epoch


def apply_cac_protocol(config: ml_collections.ConfigDict, dataset: str) -> None:
  """CAC's training recipe on `dataset`: 8 labelled + 8 pairs, square crops, SGD (momentum
  0.9, no Nesterov, wd 1e-4) with the backbone at lr/10, poly per iteration, 80 epochs of
  1157 iterations, the unsupervised term from epoch 5."""
  p = CAC_PROTOCOLS.get(dataset)
  if p is None:
    raise ValueError(f"method=cac has no recipe for config input.dataset={dataset!r}; known: "
                     f"{', '.join(CAC_PROTOCOLS)}")
  config.input.crop_size = (p["crop"], p["crop"])
  config.input.scale_range = (0.5, 2.0)  # base _augmentation of the labelled images
  config.input.streams.labeled.batch_size = 8
  config.input.streams.unlabeled_pair.batch_size = 8
  config.cac.base_size = p["base_size"]
  config.cac.step_save = p["step_save"]
  config.cac.mean_groups = p["mean_groups"]
  config.cac.pair_variant = p["variant"]
  config.cac.unsup_start_step = 5 * CAC_ITERS_PER_EPOCH
  config.optim.lr = p["lr"]
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.backbone_lr_mult = 0.1
  config.optim.schedule_unit = "iteration"
  config.num_train_steps = 80 * CAC_ITERS_PER_EPOCH
  config.input.eval_batch_size = 8


def protocol_get_config(protocol: Protocol, arg: str | None,
                        default_method: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a benchmark dataset file: "method=<preset>,variant=<''|smoke>"."""
  args = parse_arg(arg, method=default_method, variant="")
  check_variant(args.variant, VARIANTS)
  return protocol_config(protocol, args.method, args.variant)


def protocol_config(protocol: Protocol, method: str,
                    variant: str = "") -> ml_collections.ConfigDict:
  """The official ReCo training protocol on `protocol`'s dataset, preset `method`, `variant`.

  Shared by the VOC, Cityscapes, SUN RGB-D (and CamVid) configs: DeepLabv3+ on ResNet-101
  with the model's output stride 16, 40k iterations, the official optimiser, ReCo and
  mean-teacher settings.
  """
  config = base_config()
  apply_method(config, method)
  config.input.dataset = protocol.dataset
  config.input.train_split = "train"
  config.input.eval_split = protocol.eval_split
  config.input.crop_size = protocol.crop_size
  config.input.scale_range = protocol.scale_range
  config.input.eval_size = protocol.eval_size
  # train_semisup.py: labelled = unlabelled batch; train_sup.py doubles the labelled batch.
  config.input.streams.labeled.batch_size = (
      protocol.supervised_batch if config.method == "supervised" else protocol.semi_batch)
  config.input.streams.unlabeled.batch_size = protocol.semi_batch
  config.input.streams.labeled_real.batch_size = config.input.streams.labeled.batch_size
  # The official test batch is 4; the eval batch does not change the metrics, and equal to the
  # labelled batch it fits every device count that training fits.
  config.input.eval_batch_size = config.input.streams.labeled.batch_size
  config.model.name = "deeplabv3plus"
  config.model.backbone = "resnet101"
  # None: the model's default (deeplabv3plus 16, deeplabv3.py: dilate_scale=16; deeplabv2 8).
  config.model.output_stride = None
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
  if config.method == "cac":
    apply_cac_protocol(config, protocol.dataset)
  for key, value in (protocol.method_settings or {}).get(config.method, {}).items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  if variant:
    apply_variant(config, variant)
    # Keep the dataset's eval size so that the smoke variant also runs on the real images.
    config.input.eval_size = protocol.eval_size
  return config
