"""Training curves of one or more workdirs in one figure.

  python -m reco_jax.tools.plot runs/camvid_le/supervised runs/camvid_le/classmix_reco --out=le.png

Reads each workdir's `metrics.jsonl` (train lines: "split": "train" with "loss"; eval lines:
"split": "eval" with "miou" and "iou/<class>") and `config.json`, and draws the training loss
and the validation mIoU against the step, and the per-class IoU of each run's last evaluation
as grouped bars. Each run is labelled with its workdir's name, method preset, seed and
labelled-subset size. A run still training can be plotted: a torn last line is skipped.
"""
import argparse
import json
import os
import sys
import typing
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

from reco_jax import errors  # noqa: E402
from reco_jax import workdir as workdir_lib  # noqa: E402

METRICS_FILE = workdir_lib.METRICS_FILE
CONFIG_FILE = workdir_lib.CONFIG_FILE


class Run(typing.NamedTuple):
  """One workdir's records, as plotted."""
  label: str
  train: list[dict]  # "split": "train" records, in file order
  evals: list[dict]  # "split": "eval" records, in file order


def read_records(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`; a torn last line (a run writing) is skipped."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir {workdir} has no {METRICS_FILE} (has it trained?)")
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise ValueError(f"{path}:{number} is not a JSON object") from None
  return records


def run_label(workdir: str, config: dict) -> str:
  """E.g. 'classmix_reco: classmix_reco, seed 0, 20 labelled' (workdir name first)."""
  parts = []
  if config.get("method_preset"):
    parts.append(str(config["method_preset"]))
  if "seed" in config:
    parts.append(f"seed {config['seed']}")
  num_labeled = config.get("input", {}).get("num_labeled")
  if num_labeled:
    parts.append(f"{num_labeled} labelled")
  name = os.path.basename(os.path.normpath(workdir))
  return f"{name}: {', '.join(parts)}" if parts else name


def load_run(workdir: str) -> Run:
  """The records of `workdir` and its label (its config.json, when present, names it)."""
  records = read_records(workdir)
  config_path = os.path.join(workdir, CONFIG_FILE)
  config = {}
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
  return Run(run_label(workdir, config),
             [r for r in records if r.get("split") == "train"],
             [r for r in records if r.get("split") == "eval"])


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that hold `key`."""
  points = [(r["step"], r[key]) for r in records if key in r]
  return np.array([p[0] for p in points]), np.array([p[1] for p in points], np.float64)


def class_names(runs: Sequence[Run]) -> list[str]:
  """The classes of the runs' last evaluations, in the order the first run logged them."""
  names: dict[str, None] = {}
  for run in runs:
    if run.evals:
      names.update((k[len("iou/"):], None) for k in run.evals[-1] if k.startswith("iou/"))
  return list(names)


def plot_runs(runs: Sequence[Run], out: str, title: str | None = None) -> None:
  """Writes the figure of `runs` to `out` (the format follows its extension, e.g. .png)."""
  figure = plt.figure(figsize=(13, 9), layout="constrained")
  grid = figure.add_gridspec(2, 2)
  loss_axes, miou_axes = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
  class_axes = figure.add_subplot(grid[1, :])
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for k, run in enumerate(runs):
    colour = colours[k % len(colours)]
    loss_axes.plot(*_series(run.train, "loss"), color=colour, label=run.label)
    miou_axes.plot(*_series(run.evals, "miou"), color=colour, marker="o", markersize=3,
                   label=run.label)
  loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
  miou_axes.set(title="validation mIoU", xlabel="step", ylabel="mIoU")
  miou_axes.set_ylim(bottom=0)

  names = class_names(runs)
  width = 0.8 / max(len(runs), 1)
  positions = np.arange(len(names))
  for k, run in enumerate(runs):
    last = run.evals[-1] if run.evals else {}
    # NaN (a class absent from ground truth and prediction) draws no bar.
    values = [last.get(f"iou/{name}", np.nan) for name in names]
    step = f" (step {last['step']})" if "step" in last else ""
    class_axes.bar(positions + (k - (len(runs) - 1) / 2) * width, values, width,
                   color=colours[k % len(colours)], label=f"{run.label}{step}")
  class_axes.set_xticks(positions, names, rotation=30 if len(names) > 8 else 0, ha="right"
                        if len(names) > 8 else "center")
  class_axes.set(title="per-class IoU at the last evaluation", ylabel="IoU", ylim=(0, 1))
  for axes in (loss_axes, miou_axes):
    axes.grid(alpha=0.3)
  class_axes.grid(axis="y", alpha=0.3)
  # One legend for the three panels, below them, where it hides no curve or bar.
  figure.legend(*class_axes.get_legend_handles_labels(), loc="outside lower center",
                ncols=min(len(runs), 2), fontsize="small")
  if title:
    figure.suptitle(title)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure.savefig(out, dpi=100)
  plt.close(figure)


def plot_workdirs(workdirs: Sequence[str], out: str, title: str | None = None) -> None:
  """Reads `workdirs` and writes their figure to `out`."""
  if not workdirs:
    raise ValueError("no workdir given")
  plot_runs([load_run(w) for w in workdirs], out, title)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m reco_jax.tools.plot",
      description="Loss and mIoU curves and last per-class IoU of one or more workdirs.")
  parser.add_argument("workdirs", nargs="+", help="workdirs holding metrics.jsonl")
  parser.add_argument("--out", required=True, help="the figure to write, e.g. curves.png")
  parser.add_argument("--title", default=None, help="a title above the figure")
  args = parser.parse_args(argv)
  try:
    plot_workdirs(args.workdirs, args.out, args.title)
  except errors.ONE_LINE_ERRORS as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
