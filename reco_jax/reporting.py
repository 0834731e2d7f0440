"""Metric logging: clu writers (TensorBoard) plus `workdir/metrics.jsonl`, on process 0.

Each line of metrics.jsonl is one JSON object `{"step": int, "split": "train" | "eval",
<metric>: float, ...}`, flushed as it is written so that a killed run keeps its log.
"""
import json
import math
import os

import jax
import numpy as np
from clu import metric_writers, parameter_overview

from reco_jax.constants import IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX


class MetricsLogger:
  """Writes scalars and images to TensorBoard and scalars to metrics.jsonl."""

  def __init__(self, workdir: str):
    self.is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_writer else None

  def write_scalars(self, step: int, split: str, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
    if self._jsonl is not None:
      record = {"step": int(step), "split": split}
      # NaN/inf are not JSON; write them as null so every line stays parseable.
      record.update({k: (v if math.isfinite(v) else None) for k, v in scalars.items()})
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()

  def write_images(self, step: int, images: dict) -> None:
    self.writer.write_images(step, {k: np.asarray(v) for k, v in images.items()})

  def write_hparams(self, hparams: dict) -> None:
    self.writer.write_hparams(hparams)

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


PARAMETERS_FILE = "parameters.txt"


def write_parameter_overview(workdir: str, params) -> tuple[str, int, str]:
  """Writes clu's parameter table (name, shape, size, mean, std per array) to
  `workdir/parameters.txt`. Returns (the table, the number of parameters, the file's path)."""
  table = parameter_overview.get_parameter_overview(params)
  path = os.path.join(workdir, PARAMETERS_FILE)
  with open(path, "w") as f:
    f.write(table + "\n")
  return table, parameter_overview.count_parameters(params), path


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """`int[...,H,W]` class map -> `u8[...,H,W,3]`; ignored pixels (<0) are black."""
  palette = np.concatenate([np.asarray(palette, np.uint8), np.zeros((1, 3), np.uint8)])
  return palette[np.where(labels < 0, len(palette) - 1, labels)]


def denormalize(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised `f32[...,3]` -> `u8[...,3]` for display."""
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return np.clip((images * std + mean) * float(UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)
