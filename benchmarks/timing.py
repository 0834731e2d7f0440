"""The whole train step of a config, timed on random batches: the denominator of the loss benchmarks.

Each loss benchmark reports its loss as a share of the train step of the config it belongs to;
this module builds that step exactly as the trainer does (mesh, model, method, state,
`train.make_train_step`) so the benchmarks share one definition of "the train step".
"""
import statistics
import time

import jax
import ml_collections
import numpy as np

from reco_jax import methods, models, parallel, train


def train_step_seconds(config: ml_collections.ConfigDict, num_classes: int,
                       runs: int) -> tuple[float, float]:
  """Times `runs` train steps of `config` after one compiling step.

  Every step gets a fresh host batch (images f32[B,H,W,3] ~ N(0, 1), labels i32[B,H,W] uniform
  in [-1, num_classes), -1 = ignore) for each stream the method reads, with that stream's
  `config.input.streams.<name>.batch_size` and `config.input.crop_size`, placed on the mesh
  before the clock starts (the trainer prefetches), and is synced on its metrics.

  Returns:
    (seconds of the first step, compilation included; median seconds of the other steps).
  """
  mesh = parallel.create_mesh()
  model = models.create_model(config.model, num_classes)
  method = methods.get_method(config, num_classes=num_classes, model=model)
  state = train.create_state(config, method, mesh)
  step = train.make_train_step(mesh, method, config.seed)
  rng = np.random.RandomState(0)
  height, width = config.input.crop_size

  def host_batch():
    batch = {}
    for name in method.streams():
      size = config.input.streams[name].batch_size
      batch[name] = {
          "image": rng.randn(size, height, width, 3).astype(np.float32),
          "label": rng.randint(-1, num_classes, (size, height, width)).astype(np.int32)}
    return parallel.to_global_batch(batch, mesh)

  batch = host_batch()
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first_step = time.perf_counter() - start
  times = []
  for _ in range(runs):
    batch = host_batch()
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return first_step, statistics.median(times)
