"""Test-session setup: 8 forced CPU devices, float32-exact matmuls, shared fixtures.

The device count must be fixed before anything initialises a JAX backend, so this
module sets the environment before importing jax.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A persistent compilation cache for this test session only (fresh, deleted at exit), also
# inherited by the main.py subprocesses: many tests train the same smoke programs (train
# then resume, 1 device then 8, main.py twice), and XLA:CPU compiles dominate the suite's
# time. A cache hit runs the very program a compile would produce.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="reco_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Goldens were produced in float32; default CPU matmuls are already f32, but be explicit
# so that the tests mean the same on any backend.
jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("RECO_SHARED_DIR", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "reference" / "golden"
CAMVID_DIR = SHARED_DIR / "datasets" / "camvid"


def load_golden(name: str) -> dict:
  """Loads `../shared/reference/golden/<name>` as a dict of numpy arrays."""
  path = GOLDEN_DIR / name
  if not path.exists():
    raise FileNotFoundError(f"golden file {path} not found; set RECO_SHARED_DIR to the shared/ folder")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden():
  return load_golden


@pytest.fixture(scope="session")
def mesh():
  """1-D Auto-axes mesh over all 8 forced CPU devices."""
  from reco_jax import parallel
  return parallel.create_mesh()


@pytest.fixture(scope="session")
def single_device_mesh():
  from reco_jax import parallel
  return parallel.create_mesh(jax.devices()[:1])


def with_overrides(config, overrides: dict):
  """`config` with dotted-key overrides applied, e.g. `{"mean_teacher.quantize": False}`; returns it."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def restore_latest_state(config, workdir: str):
  """The latest resume checkpoint of `workdir` (a run of `config`), restored replicated onto
  all devices."""
  from reco_jax import checkpointing, parallel, train
  mesh = parallel.create_mesh()
  _, method = train.build(config)
  target = checkpointing.abstract_like(
      jax.eval_shape(lambda: train.create_state(config, method, mesh)), parallel.replicated(mesh))
  return checkpointing.restore_state(
      checkpointing.create_resume_manager(workdir, 2, read_only=True), target)


def toy_segmenter(num_classes: int, logit_scale: float = 4.0):
  """A one-conv segmenter with the models' interface, for step-level tests that compile fast.

  `apply(variables, images f32[B,H,W,3], train)` -> {'logits': f32[B,H/4,W/4,C],
  'rep': f32[B,H/4,W/4,8], 'features': {}}, with BatchNorm. `logit_scale` makes the randomly
  initialised classifier confident, so that some teacher confidences pass delta_w and
  delta_s and the unsupervised loss is not trivially 0.
  """
  import flax.linen as nn

  class _Toy(nn.Module):
    num_classes: int
    logit_scale: float

    @nn.compact
    def __call__(self, x, train):
      x = nn.avg_pool(x, (4, 4), strides=(4, 4))
      x = nn.Conv(8, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      return {"logits": self.logit_scale * nn.Conv(self.num_classes, (1, 1), name="classifier")(x),
              "rep": nn.Conv(8, (1, 1))(x), "features": {}}

  return _Toy(num_classes, logit_scale)


def golden_recipe_tensor(k: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """The k-th PyTorch state tensor of the goldens' NumPy recipe (golden README §8, wave2 §3.3)."""
  rs = np.random.RandomState(1000 + k)
  if name.endswith("running_var"):
    value = 0.5 + rs.random_sample(shape)
  elif name.endswith("running_mean") or name.endswith("bias"):
    value = 0.1 * rs.standard_normal(shape)
  elif len(shape) == 1:
    value = 1 + 0.1 * rs.standard_normal(shape)
  else:
    value = rs.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
  return value.astype(np.float32)
