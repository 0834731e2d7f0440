"""Test-session setup: 8 forced CPU devices, float32-exact matmuls, shared fixtures.

The device count must be fixed before anything initialises a JAX backend, so this
module sets the environment before importing jax.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
