"""Speed and memory of PC²Seg's unlabelled loss (`reco_jax.losses.pc2seg`), forward + backward.

Run:
  cd <repo> && python -m benchmarks.pc2seg_loss [--cases voc,voc_s8,cityscapes] [--runs 5]
  cd <repo> && python -m benchmarks.pc2seg_loss --cases camvid_cpu --with_train_step
  cd <repo> && python -m benchmarks.pc2seg_loss --cases voc --with_train_step   # accelerator

What is timed (one jitted function, as inside the train step): the linear projection of both
views' representation maps, the softmax of both views' logits, the draws (anchors, pool,
negatives; `config.pc2seg` defaults: 256 anchors per image, a pool of 4096, 512 negatives with
replacement, different image + debiased) and λ1·L_ce + λ2·L_cy, with the gradient w.r.t. both
representation maps, the strong logits and the projection.

Cases (synthetic inputs):
* voc:        10 unlabelled 321² crops, 256-d `rep` at stride 4 -> 10 x 81 x 81 x 256, D 128;
* voc_s8:     the same at stride 8 -> 10 x 41 x 41 x 256;
* cityscapes: 2 unlabelled 512² crops at stride 4 -> 2 x 128 x 128 x 256 (1280 anchors/image);
* camvid_cpu: the CamVid `cpu` recipe: 8 crops of 128x160 -> 8 x 32 x 40 x 64, D 32.

Each row: median (min-max) wall time of `--runs` calls after one warm-up, every call with a
fresh key; the compiled program's temporary memory (`memory_analysis()`); and what a dense
(anchors x batch pixels x D) tensor would take. `--with_train_step` also times the whole
PC²Seg train step of the case's config (`configs/<dataset>.py:method=pc2seg`: labelled +
weak + strong passes and the update, random batches; `--train_backbone` overrides the
backbone) and prints the loss as a fraction of it.
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
from reco_jax.losses import pc2seg


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  height: int  # feature map
  width: int
  config: str  # config argument of the train step: "<dataset>:<arg>"
  rep_dim: int = 256
  proj_dim: int = 128
  anchors_per_image: int = 256
  num_classes: int = 21


CASES = {
    "voc": Case("voc", 10, 81, 81, "voc:method=pc2seg"),
    "voc_s8": Case("voc_s8", 10, 41, 41, "voc:method=pc2seg"),
    "cityscapes": Case("cityscapes", 2, 128, 128, "cityscapes:method=pc2seg",
                       anchors_per_image=1280, num_classes=19),
    "camvid_cpu": Case("camvid_cpu", 8, 32, 40, "camvid:method=pc2seg,variant=cpu", rep_dim=64,
                       proj_dim=32, num_classes=11),
}


def make_loss(case: Case, settings: pc2seg.LossSettings, pool_size: int, num_negatives: int):
  """(rep_w, rep_s, logits_w, logits_s, kernel, valid, key) -> loss, as in the method."""

  def loss(rep_w, rep_s, logits_w, logits_s, kernel, valid, key):
    z_w, z_s = rep_w @ kernel, rep_s @ kernel
    probs_w = jax.nn.softmax(jax.lax.stop_gradient(logits_w), axis=-1)
    probs_s = jax.nn.softmax(logits_s, axis=-1)
    draws = pc2seg.draw(key, valid, probs_w, rule="different_image_debiased",
                        anchors_per_image=case.anchors_per_image, pool_size=pool_size,
                        num_negatives=num_negatives, replacement=True)
    return pc2seg.unlabelled_loss(draws, z_w, z_s, probs_w, probs_s, valid, settings)[0]

  return loss


def benchmark_case(case: Case, runs: int, pool_size: int, num_negatives: int):
  rng = np.random.RandomState(0)
  shape = (case.batch, case.height, case.width)
  args = (jnp.asarray(rng.randn(*shape, case.rep_dim), jnp.float32),
          jnp.asarray(rng.randn(*shape, case.rep_dim), jnp.float32),
          jnp.asarray(3 * rng.randn(*shape, case.num_classes), jnp.float32),
          jnp.asarray(3 * rng.randn(*shape, case.num_classes), jnp.float32),
          jnp.asarray(rng.randn(case.rep_dim, case.proj_dim) / np.sqrt(case.rep_dim), jnp.float32),
          jnp.asarray(rng.rand(*shape) > 0.02))
  loss = make_loss(case, pc2seg.LossSettings(), pool_size, num_negatives)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4)))
  key = jax.random.key(0)
  compiled = fn.lower(*args, key).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args, key))
  times = []
  for i in range(runs):
    k = jax.random.fold_in(key, i + 1)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args, k))
    times.append(time.perf_counter() - start)
  anchors = case.batch * case.anchors_per_image
  dense = anchors * case.batch * case.height * case.width * case.proj_dim * 4
  return times, temp, anchors, dense


def train_step_seconds(case: Case, backbone: str, runs: int) -> float:
  """Median PC²Seg train step of the case's config on random batches (1 warm-up step)."""
  dataset, arg = case.config.split(":")
  config = importlib.import_module(f"configs.{dataset}").get_config(arg)
  if backbone:
    config.model.backbone = backbone
  compile_s, seconds = timing.train_step_seconds(config, case.num_classes, runs)
  h, w = config.input.crop_size
  print(f"  {case.config} ({config.model.backbone}, {config.input.streams.labeled.batch_size}+"
        f"{config.input.streams.unlabeled.batch_size} x {h}x{w}): first step {compile_s:.1f} s, "
        f"step {seconds:.3f} s", flush=True)
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="voc,voc_s8,cityscapes")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--pool_size", type=int, default=4096)
  parser.add_argument("--num_negatives", type=int, default=512)
  parser.add_argument("--with_train_step", action="store_true")
  parser.add_argument("--train_backbone", default="", help="override the config's backbone")
  parser.add_argument("--train_runs", type=int, default=5)
  args = parser.parse_args()
  names = [n for n in args.cases.split(",") if n]
  for name in names:
    if name not in CASES:
      raise SystemExit(f"--cases: unknown case {name!r}; known: {', '.join(CASES)}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"pool {args.pool_size}, N={args.num_negatives}, runs {args.runs}")
  print("| case | rep B x h x w x dim | D | anchors | fwd+bwd ms (min-max) | temp MiB | dense A x M x D |")
  print("|---|---|---|---|---|---|---|")
  results = {}
  for name in names:
    case = CASES[name]
    times, temp, anchors, dense = benchmark_case(case, args.runs, args.pool_size, args.num_negatives)
    results[name] = statistics.median(times)
    print(f"| {name} | {case.batch}x{case.height}x{case.width}x{case.rep_dim} | {case.proj_dim} | {anchors} | "
          f"{1e3 * results[name]:.1f} ({1e3 * min(times):.1f}-{1e3 * max(times):.1f}) | "
          f"{temp / 2**20:.1f} | {dense / 2**30:.1f} GiB |", flush=True)
  if args.with_train_step:
    print(f"\nPC²Seg loss vs the PC²Seg train step of the case's config (median of "
          f"{args.train_runs} steps)")
    print("| case | train step s | loss fwd+bwd ms | loss / step |")
    print("|---|---|---|---|")
    for name in names:
      seconds = train_step_seconds(CASES[name], args.train_backbone, args.train_runs)
      print(f"| {name} | {seconds:.2f} | {1e3 * results[name]:.1f} | "
            f"{100 * results[name] / seconds:.2f}% |", flush=True)


if __name__ == "__main__":
  main()
