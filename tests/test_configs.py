"""Every config file: loads with and without `:smoke`, locks, declares only default.py's fields,
names a known method, and its model config builds; the dataset x method grid is complete."""
import importlib.util

import ml_collections
import pytest

from conftest import REPO_ROOT
from configs import default
from reco_jax import methods, models, train

CONFIG_DIR = REPO_ROOT / "configs"
GRID_DATASETS = ("synthetic", "camvid")
GRID_METHODS = ("supervised", "supervised_reco", "cutout", "cutmix", "classmix", "classmix_reco")


def _load(path):
  """Imports a config file by path, as `config_flags` does for `--config=path`."""
  spec = importlib.util.spec_from_file_location(f"config_under_test_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_files():
  """Files that define `get_config` (the `*_base.py` helpers do not)."""
  return sorted(p.name for p in CONFIG_DIR.glob("*.py") if hasattr(_load(p), "get_config"))


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


@pytest.mark.parametrize("variant", [None, "smoke"])
@pytest.mark.parametrize("name", _config_files())
def test_config_loads_locks_and_builds(name, variant):
  config = _load(CONFIG_DIR / name).get_config(variant)
  config.lock()
  with pytest.raises(AttributeError, match="lrr"):
    config.optim.lrr = 0.1
  assert _flat_keys(config) == _flat_keys(default.base_config()), "fields outside default.py"
  method = methods.get_method(config.method)
  num_classes = 11
  models.create_model(config.model, num_classes)
  train.step_config_from(config, num_classes)  # also validates the semi settings
  assert config.input.batch_size > 0 and config.input.eval_batch_size > 0
  assert (config.input.unlabeled_batch_size > 0) == method.uses_teacher
  if variant == "smoke":
    assert config.num_train_steps <= 5
    assert config.model.backbone == "resnet_tiny" and config.model.width <= 8


@pytest.mark.parametrize("dataset", GRID_DATASETS)
@pytest.mark.parametrize("method", GRID_METHODS)
def test_dataset_method_grid(dataset, method):
  config = _load(CONFIG_DIR / f"{dataset}_{method}.py").get_config()
  assert (config.input.dataset, config.method) == (dataset, method)


def test_default_is_classmix_reco_on_label_scarce_synthetic_data():
  config = default.get_config()
  assert (config.method, config.input.dataset) == ("classmix_reco", "synthetic")
  assert 0 < config.input.num_labeled <= config.input.synthetic.num_train // 8
  assert config.to_dict() == _load(CONFIG_DIR / "synthetic_classmix_reco.py").get_config().to_dict()


def test_synthetic_supervised_is_the_default_recipe_without_unlabelled_data():
  supervised = _load(CONFIG_DIR / "synthetic_supervised.py").get_config().to_dict()
  recipe = default.get_config().to_dict()
  assert (supervised.pop("method"), recipe.pop("method")) == ("supervised", "classmix_reco")
  assert (supervised["input"].pop("unlabeled_batch_size"),
          recipe["input"].pop("unlabeled_batch_size")) == (0, recipe["input"]["batch_size"])
  assert supervised == recipe


def test_camvid_supervised_keeps_its_variants():
  module = _load(CONFIG_DIR / "camvid_supervised.py")
  full, cpu, smoke = (module.get_config(v) for v in (None, "cpu", "smoke"))
  assert full.input.crop_size == (360, 480) and full.model.backbone == "resnet101"
  assert cpu.input.crop_size == (128, 160) and cpu.model.backbone == "resnet_tiny"
  assert cpu.input.eval_size == smoke.input.eval_size == (360, 480)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'smok'"):
    _load(CONFIG_DIR / "camvid_cutmix.py").get_config("smok")


@pytest.mark.parametrize("name", [n for n in _config_files()
                                  if not n.startswith(("default", "synthetic_"))])
def test_dataset_configs_keep_the_official_hyper_parameters(name):
  """Only the synthetic demo recipe departs from them; real datasets start from base_config()
  (starting from get_config() would inherit the demo's lr 0.03 and 64 labelled images)."""
  config = _load(CONFIG_DIR / name).get_config()
  base = default.base_config()
  for group in ("optim", "semi", "reco"):
    assert config[group].to_dict() == base[group].to_dict(), group
  assert config.input.num_labeled == 0
