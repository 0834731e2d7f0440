"""Speed and memory of the class-wise memory bank's blocks (Alonso et al.), forward + backward.

Run:
  cd <repo> && python -m benchmarks.memory_bank_loss [--cases voc_v2,voc_v3,city_v2] [--runs 5]
  cd <repo> && python -m benchmarks.memory_bank_loss --cases camvid_cpu --with_train_step
  cd <repo> && python -m benchmarks.memory_bank_loss --cases voc_v2 --with_train_step  # accelerator

What is timed (one jitted function, as inside the train step, `methods/memory_bank.py`): the
memory update from the teacher's features (projection head with BatchNorm over the candidates,
the C selectors, top-E per class, FIFO insert into the (C, 256, 256) ring buffer) and both
contrastive terms (projection + prediction heads over the valid pixels, C selectors, the
closed-form loss) for the labelled batch and the two unlabelled views, with the gradient
w.r.t. every head parameter and both feature maps. The memory starts full.

Cases (synthetic inputs; official configs of other_methods_spec §2.5):
* voc_v2:     DeepLabv2 layer4, 14 labelled + 2x7 views of 321² -> 41x41x2048, C 21, E 98 (1/50);
* voc_v3:     DeepLabv3+ decoder, 20 + 2x10 views -> 81x81x256, C 21, E 140;
* city_v2:    DeepLabv2, 5 + 2x2 views of 512² -> 64x64x2048, C 19, E 15 (1/30);
* camvid_cpu: the CamVid `cpu` recipe: 8 + 2x4 views of 128x160 -> 32x40x64, heads 64, C 11, E 104.

Each row: median (min-max) wall time of `--runs` calls after a warm-up, the compiled program's
temporary memory (`memory_analysis()`) and what the explicit (pixels x memory) distance
matrices of the official code would take. `--with_train_step` times the whole train step of
the case's config (benchmarks.pc2seg_loss.train_step_seconds; `--train_backbone` overrides the
backbone) and prints the blocks' share of it.
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.pc2seg_loss import train_step_seconds
from reco_jax.losses import memory_bank as bank_lib
from reco_jax.methods import memory_bank as method_lib


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  labeled: int
  unlabeled: int  # per view; two views
  height: int  # feature map
  width: int
  feature_dim: int
  num_classes: int
  elements_per_class: int
  config: str  # "<dataset>:<arg>" of the train step
  dim: int = 256
  memory_per_class: int = 256


CASES = {
    "voc_v2": Case("voc_v2", 14, 7, 41, 41, 2048, 21, 98, "voc:method=memory_bank"),
    "voc_v3": Case("voc_v3", 20, 10, 81, 81, 256, 21, 140, "voc:method=memory_bank"),
    "city_v2": Case("city_v2", 5, 2, 64, 64, 2048, 19, 15, "cityscapes:method=memory_bank"),
    "camvid_cpu": Case("camvid_cpu", 8, 4, 32, 40, 64, 11, 104,
                       "camvid:method=memory_bank,variant=cpu", dim=64),
}


class _NoSegmenter:
  """The blocks never call the segmentation model."""


def head_variables(case: Case, model: method_lib.MemoryBankModel) -> dict:
  """Freshly initialised variables of the four heads."""
  key = jax.random.key(0)
  rows = jnp.zeros((2, case.feature_dim))
  proj = jnp.zeros((2, case.dim))
  masks = jnp.ones((case.num_classes, 2), bool)
  parts = [model.init(key, rows, None, False, method=method_lib.MemoryBankModel.project),
           model.init(key, proj, None, False, method=method_lib.MemoryBankModel.predict),
           model.init(key, proj, jnp.zeros((2,), jnp.int32), masks[0], False,
                      method=method_lib.MemoryBankModel.select_own),
           model.init(key, jnp.zeros((case.num_classes, 2, case.dim)), masks, False,
                      method=method_lib.MemoryBankModel.select_memory)]
  return {c: {k: v for p in parts for k, v in p[c].items()} for c in ("params", "batch_stats")}


def make_blocks(case: Case, model):
  def blocks(params, feats_l, feats_u, batch_stats, teacher, memory, labels_l, candidates, labels_u):
    memory, _ = method_lib.teacher_memory_update(
        model, teacher, memory, jax.lax.stop_gradient(feats_l), labels_l, candidates,
        elements_per_class=case.elements_per_class, ranking="ascending")
    loss_l, stats = method_lib.contrastive_term(model, params, batch_stats, feats_l, labels_l,
                                                labels_l >= 0, memory, "official")
    loss_u, _ = method_lib.contrastive_term(model, params, stats, feats_u, labels_u,
                                            labels_u >= 0, memory, "official")
    return 0.1 * (loss_l + loss_u)
  return blocks


def benchmark_case(case: Case, runs: int):
  model = method_lib.MemoryBankModel(segmenter=_NoSegmenter(), num_classes=case.num_classes,
                                     dim=case.dim)
  variables = head_variables(case, model)
  rng = np.random.RandomState(0)
  hw = (case.height, case.width)
  feats_l = jnp.asarray(rng.randn(case.labeled, *hw, case.feature_dim), jnp.float32)
  feats_u = jnp.asarray(rng.randn(2 * case.unlabeled, *hw, case.feature_dim), jnp.float32)
  labels_l = jnp.asarray(rng.randint(-1, case.num_classes, (case.labeled, *hw)), jnp.int32)
  labels_u = jnp.asarray(rng.randint(-1, case.num_classes, (2 * case.unlabeled, *hw)), jnp.int32)
  candidates = jnp.asarray(rng.rand(case.labeled, *hw) < 0.5)
  memory = {"features": jnp.asarray(rng.randn(case.num_classes, case.memory_per_class, case.dim),
                                    jnp.float32),
            "count": jnp.full((case.num_classes,), case.memory_per_class, jnp.int32)}
  fn = jax.jit(jax.value_and_grad(make_blocks(case, model), argnums=(0, 1, 2)))
  args = (variables["params"], feats_l, feats_u, variables["batch_stats"], variables, memory,
          labels_l, candidates, labels_u)
  compiled = fn.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  pixels = (case.labeled + 2 * case.unlabeled) * case.height * case.width
  explicit = pixels * case.memory_per_class * 4  # one (M_c x N_c) block per pixel's class
  return times, temp, pixels, explicit


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="voc_v2,voc_v3,city_v2")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--with_train_step", action="store_true")
  parser.add_argument("--train_backbone", default="", help="override the config's backbone")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  for name in args.cases.split(","):
    case = CASES[name]
    times, temp, pixels, explicit = benchmark_case(case, args.runs)
    median = statistics.median(times)
    print(f"{name}: memory update + 2 contrastive terms, fwd+bwd {median * 1e3:.1f} ms "
          f"({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}); temp {temp / 2**20:.0f} MiB; "
          f"{pixels} pixels; explicit distance matrices {explicit / 2**20:.0f} MiB", flush=True)
    if args.with_train_step:
      step = train_step_seconds(case, args.train_backbone, args.runs)
      print(f"  blocks / train step: {median / step:.1%}", flush=True)


if __name__ == "__main__":
  main()
