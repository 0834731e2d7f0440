"""Speed and memory of Contextrast's auxiliary loss (`reco_jax.losses.contextrast`), forward + backward.

Run:
  cd <repo> && python -m benchmarks.contextrast_loss                       # Cityscapes, accelerator
  cd <repo> && python -m benchmarks.contextrast_loss --scale 0.25 --runs 2  # reduced, CPU
  cd <repo> && python -m benchmarks.contextrast_loss --cases camvid_cpu --with_train_step

What is timed (one jitted function, as inside the train step): `contextrast_loss` (or a
Table 2 baseline, `--losses contextrast,pissas,contrastiveseg`) on the four projected levels,
with the gradient w.r.t. every level: the labels and the prediction nearest-down-sampled per
level, BANE (error maps, windowed distance transform, per-class selection, K negatives), the
anchors and their fusion, the pixel-anchor InfoNCE. Loss-module defaults
(`ContextrastSettings()`: K = 1024, window 32; Pissas: 10000 features; ContrastiveSeg: 1024).

Cases (synthetic inputs: blocky labels of 32x32-pixel regions, 5 % ignore, and a prediction
that is wrong on 20 % of the regions, so that every level has error maps):
* cityscapes:       8 x 512x1024 crops, 19 classes, 256-d embeddings at strides 4, 8, 8, 8
                    (the paper's DeepLabV3, D-ResNet-101 at output stride 8);
* cityscapes_hrnet: the same at strides 4, 8, 16, 32 (HRNet / an undilated backbone);
* camvid_cpu:       the CamVid `cpu` recipe, 8 x 128x160, 11 classes, 64-d, strides 4, 8, 8, 8.
`--scale s` multiplies the crop sides (0.25: 128x256 for Cityscapes).

Each row: median (min-max) wall time of `--runs` calls after one warm-up, every call with a
fresh key, and the compiled program's temporary memory (`memory_analysis()`).
`--with_train_step` also times the train step of the case's config (random batches, the
Contextrast method: the student pass, CE and the term) and prints the loss as a fraction of it.
"""
import argparse
import dataclasses
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from reco_jax.losses import contextrast as contextrast_lib


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  height: int  # crop
  width: int
  strides: tuple[int, ...]
  dim: int
  num_classes: int
  config: str  # "<dataset>:<arg>" of the train step


CASES = {
    "cityscapes": Case("cityscapes", 8, 512, 1024, (4, 8, 8, 8), 256, 19,
                       "cityscapes:method=contextrast"),
    "cityscapes_hrnet": Case("cityscapes_hrnet", 8, 512, 1024, (4, 8, 16, 32), 256, 19,
                             "cityscapes:method=contextrast"),
    "camvid_cpu": Case("camvid_cpu", 8, 128, 160, (4, 8, 8, 8), 64, 11,
                       "camvid:method=contextrast,variant=cpu"),
}
REGION = 32  # label region side (pixels)


def synthetic_inputs(case: Case, scale: float, seed: int = 0):
  """(feats [f32[B,H/s,W/s,D]], labels i32[B,H,W], pred i32[B,H,W])."""
  rng = np.random.RandomState(seed)
  h, w = int(case.height * scale), int(case.width * scale)
  cells = rng.randint(0, case.num_classes, (case.batch, -(-h // REGION), -(-w // REGION)))
  wrong = np.where(rng.rand(*cells.shape) < 0.2, rng.randint(0, case.num_classes, cells.shape), cells)
  up = lambda x: np.repeat(np.repeat(x, REGION, 1), REGION, 2)[:, :h, :w].astype(np.int32)
  labels, pred = up(cells), up(wrong)
  labels = np.where(rng.rand(*labels.shape) < 0.05, -1, labels).astype(np.int32)
  feats = [jnp.asarray(rng.randn(case.batch, h // s, w // s, case.dim), jnp.float32)
           for s in case.strides]
  return feats, jnp.asarray(labels), jnp.asarray(pred)


def make_loss(name: str, num_classes: int):
  """feats, labels, pred, key -> the weighted term, as in the method (`methods.contextrast`)."""
  def loss(feats, labels, pred, key):
    if name == "contextrast":
      return contextrast_lib.contextrast_loss(key, feats, labels, pred, num_classes)[0]
    if name == "pissas":
      return contextrast_lib.pissas_loss(key, feats, labels, num_classes)[0]
    return contextrast_lib.contrastiveseg_loss(key, feats[-1], labels, pred, num_classes)
  return loss


def benchmark(case: Case, loss_name: str, scale: float, runs: int):
  feats, labels, pred = synthetic_inputs(case, scale)
  fn = jax.jit(jax.value_and_grad(make_loss(loss_name, case.num_classes)))
  key = jax.random.key(0)
  compiled = fn.lower(feats, labels, pred, key).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  value, _ = jax.block_until_ready(compiled(feats, labels, pred, key))
  times = []
  for i in range(runs):
    k = jax.random.fold_in(key, i + 1)
    start = time.perf_counter()
    jax.block_until_ready(compiled(feats, labels, pred, k))
    times.append(time.perf_counter() - start)
  return times, temp, float(value)


def train_step_seconds(case: Case, scale: float, runs: int, backbone: str) -> float:
  """Median train step of the case's config at the case's crop (times `scale`)."""
  dataset, arg = case.config.split(":")
  config = importlib.import_module(f"configs.{dataset}").get_config(arg)
  config.input.crop_size = (int(case.height * scale), int(case.width * scale))
  config.input.streams.labeled.batch_size = case.batch
  if backbone:
    config.model.backbone = backbone
  _, seconds = timing.train_step_seconds(config, case.num_classes, runs)
  h, w = config.input.crop_size
  print(f"  train step {case.config} ({config.model.name}/{config.model.backbone}, {case.batch} x "
        f"{h}x{w}): {seconds:.3f} s", flush=True)
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="cityscapes")
  parser.add_argument("--losses", default="contextrast,pissas,contrastiveseg")
  parser.add_argument("--scale", type=float, default=1.0, help="crop side factor")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--with_train_step", action="store_true")
  parser.add_argument("--train_backbone", default="", help="override the config's backbone")
  args = parser.parse_args()
  print(f"{jax.devices()[0].platform} x {jax.device_count()}", flush=True)
  for name in args.cases.split(","):
    case = CASES[name]
    h, w = int(case.height * args.scale), int(case.width * args.scale)
    print(f"{name}: {case.batch} x {h}x{w}, strides {case.strides}, D {case.dim}, "
          f"{case.num_classes} classes", flush=True)
    step = train_step_seconds(case, args.scale, args.runs, args.train_backbone) if (
        args.with_train_step) else None
    for loss_name in args.losses.split(","):
      times, temp, value = benchmark(case, loss_name, args.scale, args.runs)
      med = statistics.median(times)
      ratio = f", {100 * med / step:.1f} % of the train step" if step else ""
      print(f"  {loss_name:15s} fwd+bwd {1000 * med:9.1f} ms ({1000 * min(times):.1f}-"
            f"{1000 * max(times):.1f}), temp {temp / 2**20:8.1f} MiB, loss {value:.4f}{ratio}",
            flush=True)


if __name__ == "__main__":
  main()
