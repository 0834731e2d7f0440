"""Label efficiency on CamVid: every method preset of the table with few labels.

Trains each method with `main.py` on the same labelled subset (`--num_labeled` of the 367
training images, chosen class-balanced by `input_pipeline/splits.py`; the other images form
the unlabelled stream of the mean-teacher methods) and prints a table of the **val** mIoU
(last and best evaluation, teacher for the mean-teacher methods) and the wall time, and writes
the runs' loss and mIoU curves and last per-class IoU next to it, to
`<workdir>/camvid_label_efficiency.png` (`reco_jax/tools/plot.py`):

  python -m benchmarks.camvid_label_efficiency --workdir=runs/camvid_le
  python -m benchmarks.camvid_label_efficiency --workdir=runs/camvid_le --table_only

Each run is `configs/camvid.py:method=<method>,variant=cpu` (a tiny ResNet from scratch on
128x160 crops, sized for a 2-core CPU) plus `--config.input.num_labeled=N --config.seed=S`;
`ROW_OVERRIDES` puts a method whose cpu recipe uses another network on the table's
network; `--extra=--config.X=V` (repeatable) appends further overrides to every run. Runs that already
finished are not repeated (main.py resumes a workdir), so an interrupted benchmark is continued
by running it again.
The test split is held out: tune on val only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from reco_jax.tools import plot

REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
FIGURE = "camvid_label_efficiency.png"  # written into --workdir, next to the runs
METHODS = ("supervised", "classmix", "classmix_reco", "cac", "s4gan", "pc2seg",
           "memory_bank", "contextrast")  # presets of configs/common.py
# Every row of the table trains the supervised row's network and augmentation (DeepLabv3+ on
# the cpu ResNet, output stride 16, blur; tests/test_configs.py checks it). Contextrast's cpu
# recipe keeps its paper's DeepLabV3 at output stride 8, no blur and plain momentum for its own
# all-labels comparison (README); its row takes the Supervised row's back, Nesterov included,
# so that only its loss differs from that row.
ROW_OVERRIDES = {
    "contextrast": ("--config.model.name=deeplabv3plus", "--config.model.output_stride=16",
                    "--config.input.blur_prob=0.5", "--config.optim.nesterov=True"),
}


def run_command(method: str, workdir: str, num_labeled: int, seed: int,
                extra: list[str]) -> list[str]:
  """The main.py command line of one run."""
  return [sys.executable, "main.py", f"--config=configs/camvid.py:method={method},variant=cpu",
          f"--config.input.num_labeled={num_labeled}", f"--config.seed={seed}",
          f"--workdir={workdir}", *ROW_OVERRIDES.get(method, ()), *extra]


def read_evals(workdir: str) -> list[dict]:
  """The eval records of `workdir/metrics.jsonl` (empty when the run has not evaluated yet)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["split"] == "eval"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="parent directory of the runs")
  parser.add_argument("--num_labeled", type=int, default=20)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seed", type=int, default=0,
                      help="config.seed: the labelled subset, the initialisation and the data order")
  parser.add_argument("--extra", action="append", default=[],
                      help="an extra override for every run, e.g. --extra=--config.optim.lr=0.02")
  parser.add_argument("--table_only", action="store_true", help="print the table, train nothing")
  args = parser.parse_args()
  method_list = args.methods.split(",")
  timings_path = os.path.join(args.workdir, "wall_times.json")
  os.makedirs(args.workdir, exist_ok=True)
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

  for method in method_list if not args.table_only else ():
    workdir = os.path.join(args.workdir, method)
    cmd = run_command(method, workdir, args.num_labeled, args.seed, args.extra)
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    timings[method] = timings.get(method, 0.0) + time.time() - start
    with open(timings_path, "w") as f:
      json.dump(timings, f)

  print(f"\nCamVid val mIoU, {args.num_labeled} labelled of 367 training images, seed "
        f"{args.seed} (configs/camvid.py:method=<method>,variant=cpu)\n")
  print("| method | steps | last val mIoU | best val mIoU | wall time (min) |")
  print("|---|---:|---:|---:|---:|")
  for method in method_list:
    evals = read_evals(os.path.join(args.workdir, method))
    if not evals:
      print(f"| {method} | - | - | - | - |")
      continue
    last = evals[-1]
    best = max(r["miou"] for r in evals)
    minutes = timings.get(method)
    wall = f"{minutes / 60:.1f}" if minutes is not None else "-"
    print(f"| {method} | {last['step']} | {last['miou']:.4f} | {best:.4f} | {wall} |")

  plotted = [os.path.join(args.workdir, m) for m in method_list
             if os.path.exists(os.path.join(args.workdir, m, "metrics.jsonl"))]
  if plotted:
    figure = os.path.join(args.workdir, FIGURE)
    plot.plot_workdirs(plotted, figure, title=f"CamVid val, {args.num_labeled} labelled of 367 "
                       f"training images, seed {args.seed}")
    print(f"\ncurves: {figure}")


if __name__ == "__main__":
  main()
