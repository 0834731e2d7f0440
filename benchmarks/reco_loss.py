"""Speed and memory of the ReCo loss (`reco_jax.losses.reco.reco_loss`), forward + backward.

Run (nothing else heavy on the machine, if possible):
  cd <repo> && /work/venv/bin/python -m benchmarks.reco_loss [--runs 20] [--cases voc,...]
  cd <repo> && /work/venv/bin/python -m benchmarks.reco_loss --cases voc,cityscapes --with_train_step

Cases (synthetic inputs, Q=256, K=512, tau=0.5, delta_s=0.97):
* voc:         rep 20x81x81x256, 21 classes, 6 present (VOC: batch 10+10, 321 crops);
* voc_19:      the same with 19 present classes;
* cityscapes:  rep 4x128x128x256, 19 classes, all present (batch 2+2, 512 crops);
* official_9, official_19: rep 4x81x81x256, 21 classes, 9 / 19 present: the geometry at
  which the official PyTorch loss was timed on this 2-core CPU (reco_spec "Timing":
  5.1 s forward+backward with 9 classes; about 16 s with 19 classes).

Each row: median (min-max) wall time of `runs` calls after 3 warm-ups, every call with a
fresh key; the compiled program's temporary and peak memory from
`jax.jit(...).lower(...).compile().memory_analysis()`.

`--with_train_step` also times, for each case, the supervised ResNet-101 DeepLabv3+ train
step (forward, CE, backward; `train_step_seconds`) on the images that produce that case's
representation (voc: 20 crops of 321; cityscapes: 4 crops of 512) and prints the ReCo loss
time as a fraction of it. `--train_batch=N` uses N images instead (and times ReCo again at
that batch): with fewer images the fraction is an upper bound, since the ReCo cost is
dominated by the fixed Q x K draws while the step scales with the batch.
"""
import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.losses import reco, supervised


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  height: int
  width: int
  dim: int
  num_classes: int
  num_present: int
  official_seconds: float | None = None  # official forward+backward on this CPU
  official_note: str = ""


CASES = {
    "voc": Case("voc", 20, 81, 81, 256, 21, 6, 3.1,
                "official: ~3.1 s interpolated at batch 4 (lower bound for batch 20)"),
    "voc_19": Case("voc_19", 20, 81, 81, 256, 21, 19, 16.0,
                   "official: ~16 s at batch 4 (lower bound for batch 20)"),
    "cityscapes": Case("cityscapes", 4, 128, 128, 256, 19, 19),
    "official_9": Case("official_9", 4, 81, 81, 256, 21, 9, 5.1,
                       "official: 5.1 s (reco_spec Timing)"),
    "official_19": Case("official_19", 4, 81, 81, 256, 21, 19, 16.0, "official: ~16 s"),
}


def synthetic_inputs(case: Case, seed: int = 0):
  """Blob label maps with `num_present` classes over the batch, 5% void, ~30% hard pixels.

  Returns numpy `(rep f32[B,h,w,D], labels i32[B,h,w], valid bool[B,h,w], probs f32[B,h,w,C])`.
  """
  rng = np.random.default_rng(seed)
  b, h, w = case.batch, case.height, case.width
  present = rng.choice(case.num_classes, case.num_present, replace=False)
  seeds_per_image = max(3, -(-case.num_present // b))
  # Each image: nearest-seed (Voronoi) regions; seed classes cycle through `present`, so
  # every present class occurs somewhere in the batch.
  seed_classes = present[np.arange(b * seeds_per_image) % case.num_present]
  seed_classes = seed_classes.reshape(b, seeds_per_image)
  seed_yx = rng.uniform(0, [h, w], size=(b, seeds_per_image, 2))
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  dist = (yy[None, None] - seed_yx[..., 0, None, None])**2 + (
      xx[None, None] - seed_yx[..., 1, None, None])**2
  nearest = np.argmin(dist, axis=1)  # [B,h,w]
  labels = np.take_along_axis(seed_classes, nearest.reshape(b, -1), axis=1).reshape(b, h, w)
  valid = rng.random((b, h, w)) >= 0.05
  # A margin of 12 makes a pixel easy (p > 0.99), a margin of 2 hard, for ~30% of pixels.
  margin = np.where(rng.random((b, h, w)) < 0.3, 2.0, 12.0)
  logits = margin[..., None] * np.eye(case.num_classes)[labels] + 0.5 * rng.standard_normal(
      (b, h, w, case.num_classes))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  centres = 2.0 * rng.standard_normal((case.num_classes, case.dim))
  rep = centres[labels] + rng.standard_normal((b, h, w, case.dim))
  return (rep.astype(np.float32), labels.astype(np.int32), valid,
          probs.astype(np.float32))


def _time_calls(fn, args_for_run, runs: int, warmup: int = 3) -> list[float]:
  for i in range(warmup):
    jax.block_until_ready(fn(*args_for_run(i)))
  times = []
  for i in range(runs):
    args = args_for_run(warmup + i)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def benchmark_case(case: Case, runs: int, num_queries: int = 256, num_negatives: int = 512):
  """Returns a dict of timings (s) and memory (bytes) for one case."""
  rep, labels, valid, probs = synthetic_inputs(case)
  hard = np.take_along_axis(probs, labels[..., None], -1)[..., 0] < 0.97
  rep, labels, valid, probs = map(jnp.asarray, (rep, labels, valid, probs))

  # Labels, mask and probabilities are arguments, as in a train step: closed-over
  # constants would let XLA constant-fold the sort at compile time.
  def loss_fn(r, key, labels, valid, probs):
    return reco.reco_loss(key, r, labels, valid, probs, num_queries=num_queries,
                          num_negatives=num_negatives)

  base_key = jax.random.key(0)
  inputs = (rep, base_key, labels, valid, probs)
  fwd = jax.jit(loss_fn).lower(*inputs).compile()
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn)).lower(*inputs).compile()
  memory = fwd_bwd.memory_analysis()
  keys = lambda i: (rep, jax.random.fold_in(base_key, i), labels, valid, probs)
  return {
      "fwd": _time_calls(fwd, keys, runs),
      "fwd_bwd": _time_calls(fwd_bwd, keys, runs),
      "temp_bytes": memory.temp_size_in_bytes,
      "peak_bytes": getattr(memory, "peak_memory_in_bytes", 0),
      "hard_fraction": float(np.mean(hard[np.asarray(valid)])),
  }


CROP_SIZES = {"voc": 321, "voc_19": 321, "cityscapes": 512, "official_9": 321, "official_19": 321}


def train_step_seconds(batch: int, crop: int, num_classes: int, backbone: str,
                       runs: int, warmup: int = 1) -> tuple[float, int]:
  """Median wall time of a supervised DeepLabv3+ step (forward, CE, backward, no update).

  The reference for "ReCo cost relative to the train step": the ReCo loss adds its own
  forward+backward on top of this. The model is the official one (`common.base_config()`:
  DeepLabv3+, output stride 16, 256-channel heads) on `backbone`.

  Returns:
    (median seconds, compiled temporary memory in bytes).
  """
  from configs import common  # pylint: disable=import-outside-toplevel
  from reco_jax import models  # pylint: disable=import-outside-toplevel

  model_config = common.base_config().model
  model_config.backbone = backbone
  model = models.create_model(model_config, num_classes)
  images = jax.random.normal(jax.random.key(1), (batch, crop, crop, 3))
  labels = jax.random.randint(jax.random.key(2), (batch, crop, crop), 0, num_classes)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), images[:1])

  def loss(params, batch_stats, images, labels):
    outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"])
    return supervised.supervised_loss(outputs["logits"], labels), updates

  args = (variables["params"], variables["batch_stats"], images, labels)
  step = jax.jit(jax.grad(loss, has_aux=True)).lower(*args).compile()
  temp_bytes = step.memory_analysis().temp_size_in_bytes
  print(f"  {backbone} step at {batch}x{crop}^2 compiled, temporary memory "
        f"{temp_bytes / 2**30:.1f} GiB", flush=True)
  return statistics.median(_time_calls(step, lambda i: args, runs, warmup=warmup)), temp_bytes


def _ms(seconds: float) -> str:
  return f"{1e3 * seconds:.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--with_train_step", action="store_true")
  parser.add_argument("--train_batch", type=int, default=0,
                      help="images per train step; 0: the case's batch (e.g. 20 for voc)")
  parser.add_argument("--train_backbone", default="resnet101")
  parser.add_argument("--train_runs", type=int, default=3)
  args = parser.parse_args()
  names = [n for n in args.cases.split(",") if n]
  for name in names:
    if name not in CASES:
      raise SystemExit(f"--cases: unknown case {name!r}; known: {', '.join(CASES)}")

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), runs {args.runs}")
  header = ("case", "rep B x h x w x D", "C", "present", "hard", "fwd ms", "fwd+bwd ms (min-max)",
            "temp MB", "peak MB", "vs official")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  results = {}
  for name in names:
    case = CASES[name]
    r = benchmark_case(case, args.runs)
    results[name] = r
    fb = r["fwd_bwd"]
    speedup = (f"{case.official_seconds / statistics.median(fb):.0f}x ({case.official_note})"
               if case.official_seconds else "")
    print(f"| {name} | {case.batch}x{case.height}x{case.width}x{case.dim} | "
          f"{case.num_classes} | {case.num_present} | {r['hard_fraction']:.2f} | "
          f"{_ms(statistics.median(r['fwd']))} | {_ms(statistics.median(fb))} "
          f"({_ms(min(fb))}-{_ms(max(fb))}) | {r['temp_bytes'] / 2**20:.0f} | "
          f"{r['peak_bytes'] / 2**20:.0f} | {speedup} |", flush=True)

  if args.with_train_step:
    print(f"\nReCo loss vs the supervised {args.train_backbone} DeepLabv3+ step (forward, CE, "
          f"backward) at the same images, median of {args.train_runs} steps")
    print("| case | images | step s | step temp GiB | ReCo fwd+bwd ms | ReCo / step |")
    print("|---|---|---|---|---|---|")
    for name in names:
      case, crop = CASES[name], CROP_SIZES[name]
      batch = args.train_batch or case.batch
      if batch != case.batch:  # ReCo at the same (smaller) batch: an upper bound on the ratio
        case = dataclasses.replace(case, batch=batch)
        reco_seconds = statistics.median(benchmark_case(case, args.runs)["fwd_bwd"])
      else:
        reco_seconds = statistics.median(results[name]["fwd_bwd"])
      seconds, temp_bytes = train_step_seconds(batch, crop, case.num_classes,
                                               args.train_backbone, args.train_runs)
      print(f"| {name} | {batch}x{crop}^2 | {seconds:.1f} | {temp_bytes / 2**30:.1f} | "
            f"{_ms(reco_seconds)} | {100 * reco_seconds / seconds:.2f}% |", flush=True)

if __name__ == "__main__":
  main()
