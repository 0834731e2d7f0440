"""The benchmark protocols end to end on a tiny fake VOC folder: labelled-subset selection,
split files, partial labels, a smoke training run, and the benchmark datasets' configs."""
import dataclasses
import importlib
import json
import os
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import common
from configs import voc as voc_config
from input_pipeline import datasets
from input_pipeline import partial_labels
from input_pipeline import prepare
from input_pipeline import preprocess
from input_pipeline import splits
from input_pipeline.builders import voc
from reco_jax import train
from test_builders import _fake_voc, _save_label

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_IDS = tuple(f"2007_{k:06d}" for k in (32, 39, 61, 63, 68, 121, 129, 170, 241, 243, 250,
                                            256))
VAL_IDS = ("2008_000002", "2008_000003")
CROP = (12, 12)  # >= every fake image (7..11 pixels a side): each crop is a whole padded image


@dataclasses.dataclass
class FakeVoc:
  manual_dir: str
  data_dir: str
  train_ids: list[str]
  labels: dict[str, np.ndarray]  # u8[h,w], 255 = void
  presence: np.ndarray  # bool[N, 21], rows of train_ids


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory) -> FakeVoc:
  """A prepared fake VOC: images with 1..5 classes each, so the class threshold matters."""
  root = tmp_path_factory.mktemp("voc")
  rng = np.random.default_rng(0)
  train_ids, val_ids, labels = _fake_voc(root / "pascal", rng, TRAIN_IDS, VAL_IDS)
  for k, image_id in enumerate(train_ids + val_ids):
    classes = rng.choice(21, size=1 + k % 5, replace=False)
    label = rng.choice(classes, size=labels[image_id].shape).astype(np.uint8)
    label[0, :] = 255
    _save_label(root / "pascal" / "SegmentationClassAug" / f"{image_id}.png", label)
    labels[image_id] = label
  fake = FakeVoc(str(root / "pascal"), str(root / "tfds"), train_ids, labels,
                 np.stack([splits.class_presence(labels[i], 21) for i in train_ids]))
  datasets.prepare(_input_config(fake))
  return fake


def _input_config(fake: FakeVoc, **overrides):
  """`configs/voc.py:method=supervised,variant=smoke`'s input, unaugmented, whole-image crops."""
  cfg = voc_config.get_config("method=supervised,variant=smoke").input
  cfg.data_dir, cfg.manual_dir = fake.data_dir, fake.manual_dir
  cfg.crop_size, cfg.scale_range = CROP, (1.0, 1.0)
  cfg.flip_prob = cfg.color_jitter_prob = cfg.blur_prob = 0.0
  # Every image once per epoch, so that a few batches show a subset's whole membership (the
  # default i.i.d. draws need not cover it).
  cfg.sampling = "permutation"
  cfg.update(overrides)
  return cfg


def _batches(cfg, n, *, labeled=True, seed=0, workdir=None):
  stream = datasets.Stream(subset="labeled", augment=True) if labeled else datasets.Stream(
      subset="unlabeled", augment=False)
  it = datasets.create_train_iterator(cfg, stream_name="labeled" if labeled else "unlabeled",
                                      stream=stream, seed=seed, local_batch_size=4, process_index=0,
                                      process_count=1, workdir=workdir)
  return [next(it) for _ in range(n)]


def _device_label(label: np.ndarray) -> np.ndarray:
  """A stored `u8[h,w]` label as the pipeline yields it, padded to CROP with -1."""
  out = np.full(CROP, -1, np.int32)
  out[:label.shape[0], :label.shape[1]] = np.where(label == 255, -1, label.astype(np.int32))
  return out


def _ids_by_label(fake: FakeVoc, batches) -> set[str]:
  """Which training images the batches hold, recognised by their (full) labels."""
  wanted = {_device_label(fake.labels[i]).tobytes(): i for i in fake.train_ids}
  found = set()
  for batch in batches:
    for label in batch["label"]:
      assert label.tobytes() in wanted, "every example is a whole, unaugmented training image"
      found.add(wanted[label.tobytes()])
  return found


def test_num_labeled_uses_the_official_voc_rule_and_records_it(fake_voc, tmp_path):
  ids, presence = splits.load_class_presence(
      prepare.presence_path(voc.VocAug(data_dir=fake_voc.data_dir)))
  assert ids == fake_voc.train_ids and np.array_equal(presence, fake_voc.presence)
  want, rest = splits.select_labeled_subset(fake_voc.train_ids, fake_voc.presence, 4, 3, seed=1)
  assert all(fake_voc.presence[fake_voc.train_ids.index(i)].sum() >= 3 for i in want)
  cfg = _input_config(fake_voc, num_labeled=4)
  workdir = str(tmp_path / "run")
  assert _ids_by_label(fake_voc, _batches(cfg, 3, seed=1, workdir=workdir)) == set(want)
  recorded, header = splits.read_ids_with_header(os.path.join(workdir, "labeled_ids.txt"))
  assert recorded == want
  assert header == {"dataset": "voc", "num_labeled": "4", "seed": "1", "min_classes": "default"}
  assert _ids_by_label(fake_voc, _batches(cfg, 6, labeled=False, seed=1,
                                          workdir=workdir)) == set(rest)
  # input.min_classes overrides the threshold (here 1 gives another subset).
  lowered, _ = splits.select_labeled_subset(fake_voc.train_ids, fake_voc.presence, 4, 1, seed=1)
  assert lowered != want
  cfg.min_classes = 1
  _batches(cfg, 1, seed=1, workdir=str(tmp_path / "lowered"))
  assert splits.read_ids_with_header(str(tmp_path / "lowered" / "labeled_ids.txt"))[0] == lowered


def test_a_resumed_run_reads_labeled_ids_back_and_conflicts_fail(fake_voc, tmp_path):
  cfg = _input_config(fake_voc, num_labeled=4)
  workdir = str(tmp_path / "run")
  _batches(cfg, 1, seed=0, workdir=workdir)
  path = os.path.join(workdir, "labeled_ids.txt")
  selected, header = splits.read_ids_with_header(path)
  # Replace the recorded ids (same header): the next run must use the file, not re-select.
  others = [i for i in fake_voc.train_ids if i not in selected][:2]
  splits.write_ids(path, others, header)
  assert _ids_by_label(fake_voc, _batches(cfg, 2, seed=0, workdir=workdir)) == set(others)
  with pytest.raises(ValueError, match=r"labeled_ids.txt was written for .*'seed': '0'.* asks "
                                       r"for .*'seed': '3'"):
    _batches(cfg, 1, seed=3, workdir=workdir)
  cfg.num_labeled = 0
  with pytest.raises(ValueError, match=r"'num_labeled': '4'.* asks for .*'num_labeled': '0'"):
    _batches(cfg, 1, seed=0, workdir=workdir)


def test_split_file_labeled_ids(fake_voc, tmp_path):
  chosen = [fake_voc.train_ids[k] for k in (7, 2, 10)]
  split_file = tmp_path / "labeled.txt"
  split_file.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n"
                                for i in chosen))
  cfg = _input_config(fake_voc, labeled_ids=(str(split_file),), num_labeled=5)
  workdir = tmp_path / "run"
  assert _ids_by_label(fake_voc, _batches(cfg, 2, workdir=str(workdir))) == set(chosen)
  assert _ids_by_label(fake_voc, _batches(cfg, 6, labeled=False, workdir=str(workdir))) == (
      set(fake_voc.train_ids) - set(chosen))
  assert splits.read_ids_with_header(str(workdir / "labeled_ids.txt")) == (
      chosen, {"dataset": "voc", "source": "config.input.labeled_ids"})
  bad = tmp_path / "bad.txt"
  bad.write_text("2007_000032\n2012_999999\n")
  cfg.labeled_ids = (str(bad),)
  with pytest.raises(ValueError, match=r"bad.txt:2: id '2012_999999' is not in the training"):
    _batches(cfg, 1)


def test_partial_labels_feed_both_streams_and_leave_eval_alone(fake_voc, tmp_path):
  partial_labels.write_partial_labels(fake_voc.train_ids, fake_voc.labels.__getitem__,
                                      str(tmp_path / "partial"), seeds=[0])
  label_dir = partial_labels.partial_dir(str(tmp_path / "partial"), 25, 0)
  sparse = {i: np.asarray(Image.open(os.path.join(label_dir, f"{i}.png")))
            for i in fake_voc.train_ids}
  assert any((sparse[i] == 255).sum() > (fake_voc.labels[i] == 255).sum() for i in sparse)
  images = {}
  for i in fake_voc.train_ids:
    raw = tf.io.read_file(os.path.join(fake_voc.manual_dir, "JPEGImages", f"{i}.jpg"))
    images[i] = tf.io.decode_image(raw, channels=3).numpy().astype(np.float32)
  cfg = _input_config(fake_voc, partial_labels_dir=label_dir)
  mean, std = np.array(preprocess.IMAGENET_MEAN), np.array(preprocess.IMAGENET_STD)
  for labeled in (True, False):
    seen = set()
    for batch in _batches(cfg, 3, labeled=labeled):
      for image, label in zip((batch["image"] * std + mean) * 255, batch["label"]):
        # Recognise the image by its pixels; its label must be the sparse map.
        image_id = next(i for i, x in images.items()
                        if np.allclose(image[:x.shape[0], :x.shape[1]], x, atol=1e-3))
        np.testing.assert_array_equal(label, _device_label(sparse[image_id]))
        seen.add(image_id)
    assert len(seen) > 6, "the stream reads most of the training images"
  eval_batches = datasets.create_eval_iterator(cfg, split="val", local_batch_size=2,
                                               process_index=0, process_count=1)
  got = sorted(label[label != -1].tobytes() for label in next(eval_batches())["label"])
  want = sorted(fake_voc.labels[i][fake_voc.labels[i] != 255].astype(np.int32).tobytes()
                for i in VAL_IDS)
  assert got == want  # full labels (the partial folder has no val maps at all)
  cfg.num_labeled = 3
  with pytest.raises(ValueError, match=r"partial_labels_dir=.*num_labeled must be 0 .*got "
                                       r"num_labeled=3"):
    _batches(cfg, 1)
  cfg.num_labeled = 0
  os.remove(os.path.join(label_dir, f"{fake_voc.train_ids[5]}.png"))
  with pytest.raises(FileNotFoundError, match=rf"partial label .*p25_seed0/"
                                              rf"{fake_voc.train_ids[5]}.png does not exist"):
    _batches(cfg, 1)


def test_smoke_training_run_on_voc(fake_voc, tmp_path):
  config = voc_config.get_config("method=supervised,variant=smoke")
  config.input.data_dir, config.input.manual_dir = fake_voc.data_dir, fake_voc.manual_dir
  config.input.num_labeled = 4
  # The smoke variant keeps VOC's 513x513 so that it runs on the real images; the fake ones
  # fit 16x16, which saves ~half of this test's time on a 2-core CPU.
  config.input.eval_size = (16, 16)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  assert np.isfinite(results["miou"]) and "iou/tvmonitor" in results  # VOC's 21 classes
  # The trainer passes its workdir: the official selection was recorded there.
  want, _ = splits.select_labeled_subset(fake_voc.train_ids, fake_voc.presence, 4, 3, seed=0)
  assert splits.read_ids_with_header(os.path.join(workdir, "labeled_ids.txt"))[0] == want


# Slow (CI time, 90 s): the partial-label step is in the default suite through
# test_methods.py's pre-refactor regression case and test_semi_supervised.py.
@pytest.mark.slow
def test_partial_label_training_run_on_voc(fake_voc, tmp_path):
  """ReCo + ClassMix in "partial labels, full dataset" mode, from sparse maps on disk.

  `input.partial_labels_dir` alone switches the step into partial mode: the sparse labels
  override the untrained teacher with confidence 1, so pixels pass delta_s = 0.97 from the
  first step (the teacher's own 21-class confidence is far below it).
  """
  partial_labels.write_partial_labels(fake_voc.train_ids, fake_voc.labels.__getitem__,
                                      str(tmp_path / "partial"), seeds=[0])
  config = voc_config.get_config("method=classmix_reco,variant=smoke")
  config.input.data_dir, config.input.manual_dir = fake_voc.data_dir, fake_voc.manual_dir
  config.input.partial_labels_dir = partial_labels.partial_dir(str(tmp_path / "partial"), 25, 0)
  config.input.eval_size = (16, 16)
  config.num_train_steps = config.eval_every_steps = 2
  assert not config.mean_teacher.partial_labels
  _, method = train.build(config)
  assert method.settings.partial_labels
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in steps] == [1, 2]
  for r in steps:
    assert r["pseudo_label_confident_fraction"] > 0 and r["reco_loss"] > 0
    assert np.isfinite(r["unsup_loss"]) and r["unsup_loss"] > 0
  assert np.isfinite(results["miou"])
  config.input.partial_labels_dir = None
  config.mean_teacher.partial_labels = True
  with pytest.raises(ValueError, match=r"mean_teacher.partial_labels=True needs input.partial_labels_dir"):
    train.train_and_evaluate(config, str(tmp_path / "no_dir"))


# ---- configs -------------------------------------------------------------------------------

# reco_spec §7: eval split, crop, scale range, eval size, semi batch (labelled = unlabelled),
# supervised batch.
_PROTOCOLS = {
    "voc": ("val", (321, 321), (0.5, 1.5), (513, 513), 10, 20),
    "cityscapes": ("val", (512, 512), (1.0, 1.0), (512, 1024), 2, 4),
    "sun": ("test", (321, 321), (0.5, 1.5), (385, 513), 5, 10),
}
# The historical methods: the official train_sup.py / train_semisup.py runs.
_PRESETS = ("supervised", "supervised_reco", "cutout", "cutmix", "classmix", "classmix_reco")


def test_every_preset_is_offered_by_every_benchmark_config():
  assert set(_PRESETS) <= set(common.METHOD_PRESETS)
  for dataset in _PROTOCOLS:
    assert (REPO_ROOT / "configs" / f"{dataset}.py").is_file()


@pytest.mark.parametrize("dataset", sorted(_PROTOCOLS))
@pytest.mark.parametrize("preset", _PRESETS)
def test_composed_configs_follow_the_protocol_and_lock(dataset, preset):
  module = importlib.import_module(f"configs.{dataset}")
  eval_split, crop, scale, eval_size, semi, sup = _PROTOCOLS[dataset]
  config = module.get_config(f"method={preset}")
  config.lock()
  supervised = common.METHOD_PRESETS[preset]["method"] == "supervised"
  assert config.method_preset == preset and config.input.dataset == dataset
  assert config.method == ("supervised" if supervised else "mean_teacher")
  assert config.aux_losses == (("reco",) if preset.endswith("_reco") else ())
  assert config.input.eval_split == eval_split and config.input.eval_size == eval_size
  assert config.input.crop_size == crop and config.input.scale_range == scale
  streams = config.input.streams
  assert (streams.labeled.batch_size, streams.unlabeled.batch_size) == (
      (sup, semi) if supervised else (semi, semi))
  assert config.num_train_steps == 40_000 and config.optim.schedule_unit == "iteration"
  assert config.model.backbone == "resnet101"
  assert config.model.output_stride in (None, 16)  # None: deeplabv3plus' default, 16
  assert config.input.num_labeled == 0 and config.input.partial_labels_dir is None
  smoke = module.get_config(f"method={preset},variant=smoke")
  smoke.lock()
  assert smoke.num_train_steps == 3 and smoke.model.backbone == "resnet_tiny"
  assert smoke.input.eval_size == eval_size  # the real images still fit
  assert smoke.input.streams.labeled.batch_size == smoke.input.streams.unlabeled.batch_size
  assert smoke.input.streams.labeled.batch_size % 8 == 0
  assert smoke.input.eval_batch_size % 8 == 0
  with pytest.raises(ValueError, match="unknown config variant 'tiny'"):
    module.get_config(f"method={preset},variant=tiny")
