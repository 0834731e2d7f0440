"""Speed and memory of CAC's directional contrastive loss (`reco_jax.losses.cac.cac_loss`),
forward + backward w.r.t. both views' feature maps.

Run:
  cd <repo> && python -m benchmarks.cac_loss [--cases voc,cityscapes] [--time voc] [--runs 3]

Cases (the official geometry, other_methods_spec §1.5/§1.7; global batch of 8 pairs):
* voc:        8 pairs of 320² crops -> 8x40x40 per view, D=128, bank of (step_save+1)=3
              steps x 2 views x 8 x 1600 = 76,800 rows (ResNet-101 VOC config);
* voc_r50:    the same with step_save 1 (51,200 rows);
* cityscapes: 8 pairs of 720² crops -> 8x90x90 per view, step_save 0 (129,600 rows).

The loss computes both directions for every stride-8 position (2·B·h·w anchors; the overlap
is a mask), so its cost does not depend on the drawn geometry. Each row: the compiled
program's temporary memory (`jax.jit(...).lower(...).compile().memory_analysis()`) for the
given `--chunk_size`, and, for the cases in `--time`, the median wall time of `--runs` calls
after one warm-up.

`--with_train_step` also times, for each timed case, the supervised DeepLabv3+ step
(`benchmarks.reco_loss.train_step_seconds`: forward, CE, backward on `--train_backbone`) on the
images one CAC step pushes through the network: the labelled batch plus both views of every
pair (8 + 2x8 crops of 320² at VOC size), and prints the loss time as a fraction of it. The CAC
step's own extras (the projector, the dropout classifier, the bank write) are small next to
the backbone, so this is the step the loss is added to.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.losses import cac

CROPS = {"voc": 320, "voc_r50": 320, "cityscapes": 720}  # crop side of each case (§1.7)
CASES = {  # name: (batch, feature side, step_save)
    "voc": (8, 40, 2),
    "voc_r50": (8, 40, 1),
    "cityscapes": (8, 90, 0),
}
DIM, CLASSES = 128, 21


def inputs(batch: int, side: int, step_save: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.randn(*s, DIM).astype(np.float32))
  feat1, feat2 = unit(batch, side, side), unit(batch, side, side)
  rows = (step_save + 1) * 2 * batch * side * side
  crop = side * 8
  off = np.stack([rng.randint(-side // 2, side // 2 + 1, batch) * 8] * 2, axis=1)
  ul1, ul2 = np.maximum(off, 0), np.maximum(-off, 0)
  br1 = np.minimum(crop, crop + off)
  return dict(
      feat1=jnp.asarray(feat1), feat2=jnp.asarray(feat2),
      conf1=jnp.asarray(rng.uniform(0.3, 1.0, (batch, side, side)).astype(np.float32)),
      conf2=jnp.asarray(rng.uniform(0.3, 1.0, (batch, side, side)).astype(np.float32)),
      plabel1=jnp.asarray(rng.randint(0, CLASSES, (batch, side, side)), jnp.int32),
      plabel2=jnp.asarray(rng.randint(0, CLASSES, (batch, side, side)), jnp.int32),
      ul1=jnp.asarray(ul1, jnp.int32), br1=jnp.asarray(br1, jnp.int32), ul2=jnp.asarray(ul2, jnp.int32),
      flip=jnp.asarray(rng.rand(batch, 2) < 0.5),
      bank_feats=jnp.asarray(unit(rows)), bank_labels=jnp.asarray(rng.randint(0, CLASSES, rows), jnp.int32),
      bank_valid=jnp.ones(rows, bool))


def make_fn(chunk_size: int, num_groups: int):
  def total(feat1, feat2, rest):
    loss1, loss2, _ = cac.cac_loss(feat1, feat2, **rest, chunk_size=chunk_size, num_groups=num_groups)
    return loss1 + loss2
  return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="voc,voc_r50,cityscapes")
  parser.add_argument("--time", default="voc", help="cases to time (others: memory only)")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--chunk_size", type=int, default=1024)
  parser.add_argument("--num_groups", type=int, default=2)
  parser.add_argument("--with_train_step", action="store_true")
  parser.add_argument("--train_backbone", default="resnet101")
  parser.add_argument("--train_runs", type=int, default=1)
  args = parser.parse_args()
  loss_seconds = {}
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), chunk_size {args.chunk_size}")
  for name in args.cases.split(","):
    batch, side, step_save = CASES[name]
    x = inputs(batch, side, step_save)
    feat1, feat2 = x.pop("feat1"), x.pop("feat2")
    fn = make_fn(args.chunk_size, args.num_groups)
    compiled = fn.lower(feat1, feat2, x).compile()
    mem = compiled.memory_analysis()
    anchors, rows = 2 * batch * side * side, x["bank_labels"].shape[0]
    line = (f"{name}: {anchors} anchors x {rows} bank rows; temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
            f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB, dense matrix would be "
            f"{anchors * rows * 4 / 2**30:.2f} GiB")
    if name in args.time.split(","):
      jax.block_until_ready(compiled(feat1, feat2, x))
      times = []
      for _ in range(args.runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(feat1, feat2, x))
        times.append(time.perf_counter() - start)
      line += f"; fwd+bwd median {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}, {args.runs} runs)"
      loss_seconds[name] = statistics.median(times)
    print(line, flush=True)
  if args.with_train_step:
    from benchmarks import reco_loss  # pylint: disable=import-outside-toplevel
    for name, seconds in loss_seconds.items():
      batch, crop = CASES[name][0], CROPS[name]
      images = 3 * batch  # labelled batch + both views of every pair
      step, temp_bytes = reco_loss.train_step_seconds(images, crop, CLASSES, args.train_backbone,
                                                     args.train_runs, warmup=0)
      print(f"{name}: {args.train_backbone} DeepLabv3+ step at {images}x{crop}^2 {step:.1f} s "
            f"(temp {temp_bytes / 2**30:.1f} GiB); CAC loss fwd+bwd {seconds:.1f} s = "
            f"{100 * seconds / step:.1f}% of it", flush=True)


if __name__ == "__main__":
  main()
