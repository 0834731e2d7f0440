"""Compile time, steady-state step time and images/s of the train step of any method preset.

Prints a table over (backbone x crop size) on whatever devices are present:

  python benchmarks/train_step.py                       # default grid
  python benchmarks/train_step.py --backbones=resnet101 --crops=321 --batch=8 --dtype=bfloat16
  python benchmarks/train_step.py --method=classmix_reco --backbones=resnet_tiny --crops=64

Each step gets a fresh random host batch, placed on the devices before the clock starts
(`benchmarks/timing.py`, shared with the loss benchmarks).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from benchmarks import timing  # noqa: E402
from configs import common  # noqa: E402


def benchmark(backbone: str, crop: int, batch: int, dtype: str, steps: int, num_classes: int = 21,
              preset: str = "supervised"):
  config = common.base_config()  # official optimiser and model settings
  common.apply_method(config, preset)
  config.model.backbone = backbone
  config.model.dtype = dtype
  config.input.crop_size = (crop, crop)
  for stream in config.input.streams.values():
    stream.batch_size = batch
  if backbone == "resnet_tiny":
    config.model.width, config.model.head_dim, config.model.rep_dim = 16, 64, 64
  compile_s, step_s = timing.train_step_seconds(config, num_classes, steps)
  return compile_s, step_s, batch / step_s


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backbones", default="resnet_tiny,resnet18,resnet50,resnet101")
  parser.add_argument("--crops", default="64,161,321")
  parser.add_argument("--batch", type=int, default=jax.device_count() * 2)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--method", default="supervised", help="a preset of configs/common.py")
  args = parser.parse_args()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch {args.batch}; "
        f"dtype {args.dtype}; method {args.method}; median of {args.steps} steps")
  print("| backbone | crop | compile (s) | step (s) | images/s |")
  print("|---|---|---|---|---|")
  for backbone in args.backbones.split(","):
    for crop in (int(c) for c in args.crops.split(",")):
      compile_s, step_s, ips = benchmark(backbone, crop, args.batch, args.dtype, args.steps, preset=args.method)
      print(f"| {backbone} | {crop} | {compile_s:.1f} | {step_s:.3f} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
  main()
