"""The composed configs: every dataset x method preset x variant loads through `--config` and
locks, declares exactly common.base_config()'s fields, keeps the official hyper-parameters and
the batch rules; the argument, presets and variants fail naming the culprit; config files
import no library code."""
import ast
import importlib
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from conftest import REPO_ROOT
from configs import common
from configs import default
from configs import synthetic

# config_flags loads config files with the deprecated `load_module()`.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
CONFIG_DIR = REPO_ROOT / "configs"
DATASETS = ("synthetic", "camvid", "voc", "cityscapes", "sun")
VARIANTS = {ds: ("", "smoke") for ds in DATASETS} | {"camvid": ("", "smoke", "cpu")}
PRESETS = ("supervised", "supervised_reco", "cutout", "cutmix", "classmix", "cutout_reco",
           "cutmix_reco", "classmix_reco")
GRID = [(ds, preset, variant) for ds in DATASETS for preset in PRESETS
        for variant in VARIANTS[ds]]
# reco_spec §7: eval split, crop, scale range, eval size, semi batch (labelled = unlabelled),
# supervised batch (train_sup.py doubles it; CamVid keeps 8 so that it fits 8 devices).
PROTOCOLS = {
    "voc": ("val", (321, 321), (0.5, 1.5), (513, 513), 10, 20),
    "cityscapes": ("val", (512, 512), (1.0, 1.0), (512, 1024), 2, 4),
    "sun": ("test", (321, 321), (0.5, 1.5), (385, 513), 5, 10),
    "camvid": ("val", (360, 480), (0.5, 1.5), (360, 480), 8, 8),
}


def _load(path_and_arg: str, *overrides: str) -> ml_collections.ConfigDict:
  """`--config=<path_and_arg> <overrides>` through config_flags, locked as main.py does."""
  argv = ["main.py", f"--config={CONFIG_DIR / path_and_arg}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _config(dataset: str, preset: str, variant: str = "") -> ml_collections.ConfigDict:
  arg = f"method={preset}" + (f",variant={variant}" if variant else "")
  return _load(f"{dataset}.py:{arg}")


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


@pytest.mark.parametrize("dataset,preset,variant", GRID)
def test_every_dataset_preset_and_variant_loads_locked(dataset, preset, variant):
  config = _config(dataset, preset, variant)
  assert config.is_locked
  with pytest.raises(AttributeError, match="lrr"):
    config.optim.lrr = 0.1
  assert _flat_keys(config) == _flat_keys(common.base_config()), "fields outside base_config()"
  entry = common.METHOD_PRESETS[preset]
  assert config.input.dataset == dataset and config.method_preset == preset
  assert config.method == entry["method"] and config.aux_losses == entry["aux_losses"]
  if entry["mix"] is not None:
    assert config.mean_teacher.mix == entry["mix"]
  streams = config.input.streams
  assert streams.labeled.batch_size > 0 and streams.unlabeled.batch_size > 0
  assert config.input.eval_batch_size > 0 and config.input.sampling == "replacement"
  if variant == "smoke":
    assert config.num_train_steps <= 5
    assert config.model.backbone == "resnet_tiny" and config.model.width <= 8
    assert streams.labeled.batch_size == streams.unlabeled.batch_size == 8
    assert config.input.eval_batch_size % 8 == 0


@pytest.mark.parametrize("dataset", sorted(PROTOCOLS))
@pytest.mark.parametrize("preset", PRESETS)
def test_protocol_values_and_the_supervised_batch_doubling(dataset, preset):
  eval_split, crop, scale, eval_size, semi, sup = PROTOCOLS[dataset]
  config = _config(dataset, preset)
  assert config.input.eval_split == eval_split and config.input.eval_size == eval_size
  assert config.input.crop_size == crop and config.input.scale_range == scale
  # train_sup.py doubles the labelled batch; train_semisup.py: labelled = unlabelled batch.
  labeled = sup if config.method == "supervised" else semi
  assert config.input.streams.labeled.batch_size == labeled
  assert config.input.streams.unlabeled.batch_size == semi
  assert config.input.eval_batch_size == labeled
  assert config.num_train_steps == 40_000 and config.optim.schedule_unit == "iteration"
  assert (config.model.name, config.model.backbone) == ("deeplabv3plus", "resnet101")
  assert config.model.output_stride is None  # deeplabv3plus' default, 16
  assert config.input.num_labeled == 0 and config.input.partial_labels_dir is None
  smoke = _config(dataset, preset, "smoke")
  assert smoke.input.eval_size == eval_size  # the real images still fit


@pytest.mark.parametrize("dataset", [d for d in DATASETS if d != "synthetic"])
def test_dataset_configs_keep_the_official_hyper_parameters(dataset):
  """Only the synthetic demo recipe (and CamVid's cpu variant) departs from them."""
  base = common.base_config()
  for preset in PRESETS:
    config = _config(dataset, preset)
    for group in ("optim", "reco"):
      assert config[group].to_dict() == base[group].to_dict(), (preset, group)
    teacher = config.mean_teacher.to_dict()
    official = base.mean_teacher.to_dict()
    teacher.pop("mix"), official.pop("mix")
    assert teacher == official, preset
    assert config.input.num_labeled == 0


def test_base_config_declares_the_official_values():
  config = common.base_config()
  assert (config.optim.lr, config.optim.momentum, config.optim.nesterov,
          config.optim.weight_decay, config.optim.poly_power) == (2.5e-3, 0.9, True, 5e-4, 0.9)
  assert (config.mean_teacher.ema_decay_max, config.mean_teacher.strong_threshold,
          config.mean_teacher.weak_threshold) == (0.99, 0.97, 0.7)
  assert config.mean_teacher.teacher_train_mode and config.mean_teacher.eval_use_teacher
  assert (config.reco.temperature, config.reco.num_queries, config.reco.num_negatives,
          config.reco.strong_threshold) == (0.5, 256, 512, 0.97)
  assert (config.method, config.aux_losses, config.method_preset) == ("supervised", (),
                                                                       "supervised")
  assert config.input.sampling == "replacement" and config.model.output_stride is None
  for removed in ("batch_size", "unlabeled_batch_size", "shuffle_buffer"):
    assert removed not in config.input
  assert "semi" not in config and "eval_use_teacher" not in config


def test_output_stride_is_an_optional_int():
  assert _load("voc.py", "--config.model.output_stride=8").model.output_stride == 8
  with pytest.raises(flags.IllegalFlagValueError):
    _load("voc.py", "--config.model.output_stride=x")


def test_stream_and_preset_fields_override_from_the_command_line():
  config = _load("voc.py:method=supervised", "--config.input.streams.labeled.batch_size=16",
                 "--config.input.streams.unlabeled.batch_size=4",
                 "--config.input.sampling=permutation", "--config.mean_teacher.mix=cutmix",
                 "--config.aux_losses=('reco',)")
  assert (config.input.streams.labeled.batch_size,
          config.input.streams.unlabeled.batch_size) == (16, 4)
  assert (config.input.sampling, config.mean_teacher.mix) == ("permutation", "cutmix")
  assert config.aux_losses == ("reco",)


@pytest.mark.parametrize("override,name", [("--config.optim.lrr=0.1", "lrr"),
                                           ("--config.input.batch_size=16", "batch_size"),
                                           ("--config.semi.ema_decay_max=0.9", "semi")])
def test_misspelt_or_removed_override_keys_fail(override, name):
  with pytest.raises((AttributeError, KeyError), match=name):
    _load("default.py", override)


def test_default_is_the_synthetic_classmix_reco_recipe():
  config = _load("default.py")
  assert (config.method, config.method_preset, config.input.dataset) == (
      "mean_teacher", "classmix_reco", "synthetic")
  assert config.aux_losses == ("reco",) and config.mean_teacher.mix == "classmix"
  assert config.input.num_labeled == synthetic.NUM_LABELED == 64
  assert config.input.synthetic.num_train == 512 and config.optim.lr == 0.03
  assert config.num_train_steps == 800 and config.model.width == 16
  assert config.to_dict() == synthetic.get_config().to_dict()
  assert config.to_dict() == default.get_config().to_dict()


@pytest.mark.parametrize("arg", ["smoke", "variant=smoke", "method=classmix_reco,variant=smoke"])
def test_default_smoke_variant_both_forms(arg):
  config = _load(f"default.py:{arg}")
  assert config.to_dict() == synthetic.get_config("variant=smoke").to_dict()
  assert config.num_train_steps == 3 and config.input.num_labeled == synthetic.SMOKE_NUM_LABELED
  assert config.method_preset == "classmix_reco"


def test_synthetic_supervised_is_the_recipe_without_the_teacher():
  supervised = synthetic.get_config("method=supervised").to_dict()
  recipe = synthetic.get_config().to_dict()
  for key in ("method", "aux_losses", "method_preset"):
    supervised.pop(key), recipe.pop(key)
  assert supervised == recipe  # same labelled subset, batches (not doubled), model, steps


def test_camvid_keeps_its_variants():
  full, cpu, smoke = (_config("camvid", "supervised", v) for v in ("", "cpu", "smoke"))
  assert full.input.crop_size == (360, 480) and full.model.backbone == "resnet101"
  assert (full.log_every_steps, full.eval_every_steps) == (100, 2000)
  assert cpu.input.crop_size == (128, 160) and cpu.model.backbone == "resnet_tiny"
  assert (cpu.model.width, cpu.optim.lr, cpu.num_train_steps) == (16, 0.01, 2000)
  assert cpu.input.eval_size == smoke.input.eval_size == (360, 480)
  assert smoke.input.eval_batch_size == 8 and smoke.num_train_steps == 3
  assert full.input.manual_dir.endswith("shared/datasets/camvid")


@pytest.mark.parametrize("path_and_arg,message", [
    ("voc.py:methd=classmix", r"unknown config argument key 'methd' .*known keys: method, "
                              r"variant"),
    ("camvid.py:method=classmix,varient=cpu", r"'varient'"),
    ("voc.py:method=cutmx", r"unknown method preset 'cutmx'; known presets: supervised, "
                            r"supervised_reco, cutout"),
    ("voc.py:variant=cpu", r"unknown config variant 'cpu'; known variants: smoke"),
    ("camvid.py:variant=smok", r"unknown config variant 'smok'; known variants: cpu, smoke"),
    ("default.py:smok", r"unknown config variant 'smok'"),
    ("synthetic.py:variant", r"'variant' needs a value"),
])
def test_bad_arguments_name_the_culprit_in_one_line(path_and_arg, message):
  path, arg = path_and_arg.split(":", 1)
  module = importlib.import_module(f"configs.{path[:-3]}")
  with pytest.raises(ValueError, match=message) as error:
    module.get_config(arg)
  assert "\n" not in str(error.value)
  with pytest.raises(flags.IllegalFlagValueError, match=message):  # what main.py shows
    _load(path_and_arg)


def test_parse_arg_is_typed_by_the_defaults():
  args = common.parse_arg("n=3,lr=0.5,flag,name=x=y", n=1, lr=0.1, flag=False, name="", off=True)
  assert (args.n, args.lr, args.flag, args.name, args.off) == (3, 0.5, True, "x=y", True)
  assert common.parse_arg(None, n=1).n == 1 and common.parse_arg("", n=1).n == 1
  assert common.parse_arg("off=false", off=True).off is False
  with pytest.raises(ValueError, match=r"n='x': expected int"):
    common.parse_arg("n=x", n=1)
  with pytest.raises(ValueError, match=r"unknown config argument key 'm'.*known keys: n"):
    common.parse_arg("m=1", n=1)


def test_apply_method_sets_the_preset_and_names_unknown_ones():
  config = common.base_config()
  common.apply_method(config, "cutmix_reco")
  assert (config.method, config.mean_teacher.mix, config.aux_losses, config.method_preset) == (
      "mean_teacher", "cutmix", ("reco",), "cutmix_reco")
  common.apply_method(config, "supervised")
  assert (config.method, config.aux_losses, config.method_preset) == ("supervised", (),
                                                                       "supervised")
  with pytest.raises(ValueError, match=r"'mean_teacher'.*known presets: .*classmix_reco, cac\b"):
    common.apply_method(config, "mean_teacher")


def _imported_modules(path):
  names = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path.name}: relative import"
      names.append(node.module)
  return names


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.name)
def test_config_files_import_no_library_code(path):
  for name in _imported_modules(path):
    top = name.split(".")[0]
    assert top in ("ml_collections", "configs") or top in sys.stdlib_module_names, (
        f"{path.name} imports {name}")


def test_config_files_are_one_per_dataset():
  assert sorted(p.stem for p in CONFIG_DIR.glob("*.py")) == sorted(
      {"common", "default", *DATASETS})


def test_every_label_efficiency_row_trains_the_supervised_rows_network():
  """The CamVid table compares methods on one network: a method whose cpu recipe brings its
  paper's network (Contextrast: DeepLabV3 at output stride 8) gets the table's back through the
  benchmark's per-row overrides."""
  from benchmarks import camvid_label_efficiency as table
  from reco_jax import models

  def network(method):
    config = _load(f"camvid.py:method={method},variant=cpu", *table.ROW_OVERRIDES.get(method, ()))
    m = config.model
    return (m.name, m.backbone, m.width, models.resolve_output_stride(m), config.input.blur_prob)

  reference = network("supervised")
  assert {method: network(method) for method in table.METHODS} == {
      method: reference for method in table.METHODS}
