"""Device mesh, shardings and host->device batch placement.

This is the only module that knows about devices and processes. Data parallelism is
`jax.jit` over a 1-D mesh with axis `data`: the train state is replicated (`P()`) and
batches are sharded on their leading axis (`P('data')`). This is the modern
equivalent of `jax.pmap` (which is in maintenance mode): XLA inserts the gradient
all-reduce, and BatchNorm statistics cover the global batch (SyncBN semantics).
"""
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PyTree = Any


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` with Auto axes.

  `jax.make_mesh` defaults to Explicit axes in jax 0.10, under which contractions and
  scatters over the sharded batch axis (prototypes, confusion matrices, the ReCo loss)
  raise ShardingTypeError; Auto axes let XLA insert the collectives.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises a one-line ValueError when a global batch cannot be split over the mesh."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f"config {what}={global_batch_size} is not divisible by the device count "
        f"{num_devices}; choose a multiple of {num_devices}")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"config {what}={global_batch_size} is not divisible by the process count "
        f"{jax.process_count()}")


def local_batch_size(global_batch_size: int) -> int:
  """The rows of a global batch that this process reads."""
  return global_batch_size // jax.process_count()


def to_global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Host-local numpy batch (this process's rows) -> global arrays sharded on `data`."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
