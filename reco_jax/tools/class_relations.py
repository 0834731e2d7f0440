"""ReCo's class-relation graph and class dendrogram of a trained run (ReCo paper §5, Fig. 8).

  python -m reco_jax.tools.class_relations --workdir=runs/camvid_le/pc2seg_s0 [--out=DIR]
      [--split=val] [--max_images=N] [--linkage=average]

Restores the workdir's latest checkpoint (`evaluate.restore_for_evaluation`, the weights
evaluation uses), runs the model in eval mode over the evaluation split and averages the
representation head's output (`rep`, the embedding ReCo contrasts) over every labelled pixel
of each class. Then, as the paper:

* **Class means.** "averaged across all available pixel embeddings in each class from the
  validation set" (§5), of the raw representations, as ReCo's positive key (Eq. 2: the
  mean of the un-normalised representations; reco_spec §1.3). The labels are brought to the
  representation's resolution with PyTorch `nearest` (top-left aligned), as ReCo does for
  its class means (reco_spec §1.1: representations are never up-sampled). Ignore pixels,
  the padding of images and padded examples (batch 'mask' False) count for no class.
* **Relation graph.** Eq. 3: the normalised dot product (cosine similarity) of two class
  means, `r[i,j] = <m_i, m_j> / (|m_i| |m_j|)`, without the softmax (that turns one row
  into ReCo's negative-class sampling distribution during training, it is not what Fig. 8
  draws).
* **Dendrogram.** "the off-the-shelf hierarchical clustering algorithm in SciPy" (§5); the
  paper names neither the distance nor the method (the official repository has no code for
  the figure, reco_spec §11). Here: `scipy.cluster.hierarchy.linkage` on the distances
  `1 - r` with average linkage (UPGMA) by default: it needs only a dissimilarity, where
  ward/centroid/median assume Euclidean distances between observations, which `1 - cos`
  is not; single linkage chains (one close pair pulls whole groups together) and complete
  linkage is set by the single farthest pair.

Classes with no labelled pixel in the split have no mean: they are left out of the matrix
and the dendrogram, and listed in `relations.json` ("excluded_classes").

Writes into --out (default `<workdir>/class_relations`): `relations.png` (the heat map),
`dendrogram.png` and `relations.json` (class names, pixel counts, the matrix, the linkage).
"""
import argparse
import functools
import json
import os
import sys
import typing
from typing import Callable, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402
from scipy.spatial import distance  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from reco_jax import constants, errors, parallel, resampling  # noqa: E402

DEFAULT_OUT = "class_relations"  # under the workdir
RELATIONS_PNG = "relations.png"
DENDROGRAM_PNG = "dendrogram.png"
RELATIONS_JSON = "relations.json"
# Methods that need only a dissimilarity matrix (ward, centroid and median assume Euclidean
# distances between observations, which 1 - cosine is not).
LINKAGE_METHODS = ("average", "complete", "single", "weighted")
DEFAULT_LINKAGE = "average"
ANNOTATE_MAX_CLASSES = 15  # beyond this the numbers in the heat map cells are unreadable
COSINE_EPS = 1e-8  # torch's cosine: x / max(|x|, eps)


class ClassStats(typing.NamedTuple):
  """Per-class sums over a split, on the host."""
  sums: np.ndarray  # f64[C,D]: sum of the representations of each class's pixels
  counts: np.ndarray  # i64[C]: each class's number of pixels
  num_images: int  # real (unpadded) images seen


# ----------------------------------------------------------------------------------------
# On device.
# ----------------------------------------------------------------------------------------
def class_mean_sums(rep: jax.Array, labels: jax.Array,
                    num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Each class's sum of representations and its pixel count in one batch.

  Args:
    rep: `f32[B,h,w,D]` representations.
    labels: `i32[B,h,w]` labels at the representation's resolution; a pixel whose label is
      outside [0, num_classes) (ignore: -1) belongs to no class.
    num_classes: C.

  Returns:
    (sums `f32[C,D]`, counts `i32[C]`): sums[c] = sum of rep over the pixels of class c.
  """
  if rep.ndim != 4 or labels.shape != rep.shape[:3]:
    raise ValueError(f"class_mean_sums: rep {rep.shape} must be [B,h,w,D] and labels "
                     f"{labels.shape} [B,h,w]")
  flat = rep.reshape(-1, rep.shape[-1]).astype(jnp.float32)
  # One-hot rows are all zero for ignore labels (no class equals -1), so no masking needed.
  one_hot = (labels.reshape(-1, 1) == jnp.arange(num_classes)[None, :])
  # HIGHEST: a default-precision matmul runs in bf16 passes on TPU/GPU, and these sums are
  # over hundreds of thousands of pixels.
  sums = jnp.matmul(one_hot.astype(jnp.float32).T, flat, precision=jax.lax.Precision.HIGHEST)
  return sums, one_hot.sum(axis=0, dtype=jnp.int32)


def batch_class_sums(variables, batch: dict, *, apply_fn: Callable,
                     num_classes: int) -> tuple[jax.Array, jax.Array]:
  """`class_mean_sums` of the model's eval-mode `rep` for one padded eval batch
  ({'image': f32[B,H,W,3], 'label': i32[B,H,W], 'mask': bool[B]})."""
  rep = apply_fn(variables, batch["image"], train=False)["rep"]
  # The pipeline's padded examples are all ignore already; the mask is the contract
  # (`create_eval_iterator`), so honour it rather than rely on their labels.
  labels = jnp.where(batch["mask"][:, None, None], batch["label"], constants.IGNORE_LABEL)
  labels = resampling.resize_nearest_torch(labels, rep.shape[1:3])
  return class_mean_sums(rep, labels, num_classes)


def make_class_sums_step(mesh: jax.sharding.Mesh, apply_fn: Callable, num_classes: int) -> Callable:
  """`batch_class_sums` jitted: batch sharded over `data`, sums and counts replicated."""
  return jax.jit(functools.partial(batch_class_sums, apply_fn=apply_fn, num_classes=num_classes),
                 in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def accumulate_class_sums(step_fn: Callable, variables, batches: Iterator[dict],
                          mesh: jax.sharding.Mesh, max_images: int | None = None) -> ClassStats:
  """Sums `step_fn`'s per-batch class sums over `batches` (host-local numpy batches).

  The pixel sums are on device; the per-batch results are added on the host in float64 /
  int64 (a split's pixel count can pass 2**31 and float32 sums over millions of pixels lose
  digits), syncing each step as `evaluate.run_evaluation` does (back-to-back collective
  programs can deadlock on CPU). `max_images` keeps only the first that many examples of this
  process's batches (the rest of the last batch masked out).
  """
  sums = counts = None
  seen = 0
  for index, local_batch in enumerate(batches):
    if max_images is not None:
      # Stop on the batch index, not on `seen`: every process then runs the same number of
      # (collective) steps.
      first = index * len(local_batch["mask"])
      if first >= max_images:
        break
      keep = first + np.arange(len(local_batch["mask"])) < max_images
      local_batch = {**local_batch, "mask": local_batch["mask"] & keep}
    seen += int(np.sum(local_batch["mask"]))
    batch_sums, batch_counts = jax.device_get(
        step_fn(variables, parallel.to_global_batch(local_batch, mesh)))
    batch_sums = np.asarray(batch_sums, np.float64)
    batch_counts = np.asarray(batch_counts, np.int64)
    sums = batch_sums if sums is None else sums + batch_sums
    counts = batch_counts if counts is None else counts + batch_counts
  if sums is None:
    raise ValueError("the evaluation split produced no batches")
  return ClassStats(sums, counts, seen)


# ----------------------------------------------------------------------------------------
# On the host: means, relations, clustering.
# ----------------------------------------------------------------------------------------
def class_means(stats: ClassStats) -> tuple[np.ndarray, np.ndarray]:
  """(means f64[K,D], present i64[K]): the mean representation of each class with at least
  one pixel, and the indices of those K classes."""
  present = np.flatnonzero(stats.counts > 0)
  return stats.sums[present] / stats.counts[present, None], present


def relation_matrix(means: np.ndarray) -> np.ndarray:
  """ReCo's pair-wise class relation (paper Eq. 3): cosine similarity of class means.

  Args:
    means: `f[K,D]` class mean representations.

  Returns:
    `f64[K,K]`, symmetric, in [-1, 1], ones on the diagonal (for non-zero means).
  """
  means = np.asarray(means, np.float64)
  if means.ndim != 2:
    raise ValueError(f"relation_matrix: means {means.shape} must be [K,D]")
  unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), COSINE_EPS)
  matrix = unit @ unit.T
  # Exactly symmetric (a BLAS product need not be) and within [-1, 1] (rounding), so that
  # 1 - matrix is a valid distance matrix for scipy.
  return np.clip((matrix + matrix.T) / 2, -1.0, 1.0)


def dendrogram_linkage(matrix: np.ndarray, method: str = DEFAULT_LINKAGE) -> np.ndarray:
  """Hierarchical clustering of the classes on the distances `1 - matrix`.

  Args:
    matrix: `f64[K,K]` relation matrix (`relation_matrix`), K >= 2.
    method: a `scipy.cluster.hierarchy.linkage` method valid for a dissimilarity matrix
      (LINKAGE_METHODS).

  Returns:
    `f64[K-1,4]` SciPy linkage: row i merges clusters Z[i,0] and Z[i,1] (ids < K are the
    classes, K + j the cluster of row j) at distance Z[i,2], into Z[i,3] classes.
  """
  if method not in LINKAGE_METHODS:
    raise ValueError(f"--linkage={method} is not one of {', '.join(LINKAGE_METHODS)}")
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
    raise ValueError(f"dendrogram_linkage: matrix {matrix.shape} must be [K,K] with K >= 2 "
                     "(at least two classes with pixels)")
  distances = 1.0 - matrix
  np.fill_diagonal(distances, 0.0)
  return hierarchy.linkage(distance.squareform(distances, checks=False), method=method)


# ----------------------------------------------------------------------------------------
# Figures and files.
# ----------------------------------------------------------------------------------------
def plot_relations(matrix: np.ndarray, names: Sequence[str], out: str, title: str = "") -> None:
  """Writes the heat map of `matrix` `f[K,K]` with `names` on both axes to `out`; the values
  are written in the cells when there are at most ANNOTATE_MAX_CLASSES classes."""
  size = 3.0 + 0.45 * len(names)
  figure, axes = plt.subplots(figsize=(size + 1.5, size), layout="constrained")
  # Diverging, centred on 0: a cosine's sign means something (opposite directions).
  image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
  positions = np.arange(len(names))
  axes.set_xticks(positions, names, rotation=45, ha="right", rotation_mode="anchor")
  axes.set_yticks(positions, names)
  if len(names) <= ANNOTATE_MAX_CLASSES:
    for (i, j), value in np.ndenumerate(matrix):
      axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                color="white" if abs(value) > 0.6 else "black")
  figure.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity of class means")
  axes.set_title(title or "class relation graph", fontsize="medium")
  _save(figure, out)


def plot_dendrogram(linkage: np.ndarray, names: Sequence[str], out: str, method: str,
                    title: str = "") -> None:
  """Writes the dendrogram of `linkage` (`dendrogram_linkage`) with `names` as leaf labels
  (horizontal, so that long names stay readable) to `out`."""
  figure, axes = plt.subplots(figsize=(8, 1.5 + 0.35 * len(names)), layout="constrained")
  hierarchy.dendrogram(linkage, labels=list(names), orientation="left", ax=axes,
                       color_threshold=0.7 * float(np.max(linkage[:, 2])),
                       above_threshold_color="grey")
  axes.set_xlabel(f"1 - cosine similarity ({method} linkage)")
  axes.grid(axis="x", alpha=0.3)
  axes.set_title(title or "class dendrogram", fontsize="medium")
  _save(figure, out)


def _save(figure, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  figure.savefig(out, dpi=120)
  plt.close(figure)


def relations_record(class_names: Sequence[str], stats: ClassStats, present: np.ndarray,
                     matrix: np.ndarray, linkage: np.ndarray, method: str, **extra) -> dict:
  """The JSON-able content of relations.json (`extra`: run details, e.g. workdir, step)."""
  return {**extra,
          "num_images": stats.num_images,
          "pixel_counts": {name: int(n) for name, n in zip(class_names, stats.counts)},
          "class_names": [class_names[c] for c in present],  # the matrix's rows and columns
          "excluded_classes": [name for name, n in zip(class_names, stats.counts) if n == 0],
          "relation": "cosine similarity of the class means of the representation head "
                      "(ReCo Eq. 3)",
          "matrix": matrix.tolist(),
          "linkage_method": method,
          "linkage_distance": "1 - cosine similarity",
          "linkage": linkage.tolist()}


def write_outputs(out_dir: str, class_names: Sequence[str], stats: ClassStats, method: str,
                  title: str, **extra) -> dict:
  """Means, matrix and linkage of `stats`; writes the two figures and relations.json into
  `out_dir`; returns the JSON record."""
  means, present = class_means(stats)
  if len(present) < 2:
    raise ValueError(f"only {len(present)} class(es) have labelled pixels in the split: no "
                     "relation to draw")
  matrix = relation_matrix(means)
  linkage = dendrogram_linkage(matrix, method)
  names = [class_names[c] for c in present]
  record = relations_record(class_names, stats, present, matrix, linkage, method, **extra)
  excluded = record["excluded_classes"]
  subtitle = title + (f"\nnot in the split (left out): {', '.join(excluded)}" if excluded else "")
  os.makedirs(out_dir, exist_ok=True)
  plot_relations(matrix, names, os.path.join(out_dir, RELATIONS_PNG),
                 f"class relation graph: {subtitle}")
  plot_dendrogram(linkage, names, os.path.join(out_dir, DENDROGRAM_PNG), method,
                  f"class dendrogram: {subtitle}")
  with open(os.path.join(out_dir, RELATIONS_JSON), "w") as f:
    json.dump(record, f, indent=1)
  return record


# ----------------------------------------------------------------------------------------
# The tool.
# ----------------------------------------------------------------------------------------
def class_relations(workdir: str, out_dir: str, split: str | None = None,
                    max_images: int | None = None, method: str = DEFAULT_LINKAGE) -> dict:
  """Restores `workdir`, accumulates the class sums over `split` (default: the run's
  `input.eval_split`) and writes the outputs into `out_dir`; returns the JSON record."""
  # Imported here: these pull in TensorFlow and the methods (seconds), not needed by the
  # pure functions above.
  from input_pipeline import datasets
  from reco_jax import evaluate, train
  from reco_jax import workdir as workdir_lib

  if method not in LINKAGE_METHODS:  # fail before the minutes of restoring and running
    raise ValueError(f"--linkage={method} is not one of {', '.join(LINKAGE_METHODS)}")
  if max_images is not None and max_images < 1:
    raise ValueError(f"--max_images={max_images} must be at least 1")
  config = workdir_lib.load_config(workdir)
  if split is not None:
    config.input.eval_split = split  # a harmless field for the checkpoint's config check
  parallel.check_batch_divisible(config.input.eval_batch_size, parallel.create_mesh(),
                                 "input.eval_batch_size")
  train.prepare_data(config)
  run = evaluate.restore_for_evaluation(config, workdir)
  batches_fn = datasets.create_eval_iterator(
      config.input, split=config.input.eval_split,
      local_batch_size=parallel.local_batch_size(config.input.eval_batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())
  step_fn = make_class_sums_step(run.mesh, run.method.apply_fn, run.info.num_classes)
  stats = accumulate_class_sums(step_fn, run.variables, batches_fn(), run.mesh, max_images)
  name = os.path.basename(os.path.normpath(workdir))
  title = (f"{name} ({config.get('method_preset') or config.method}), step {run.step}, "
           f"{config.input.dataset} {config.input.eval_split}, {stats.num_images} images")
  if jax.process_index() != 0:
    return {}
  return write_outputs(out_dir, run.info.class_names, stats, method, title,
                       workdir=workdir, step=run.step, dataset=config.input.dataset,
                       split=config.input.eval_split)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m reco_jax.tools.class_relations",
      description="ReCo's class-relation graph (cosine of class-mean representations) and "
                  "class dendrogram of a trained run.")
  parser.add_argument("--workdir", required=True, help="a training workdir (config.json and "
                      "checkpoints)")
  parser.add_argument("--out", default=None,
                      help=f"output folder (default: <workdir>/{DEFAULT_OUT})")
  parser.add_argument("--split", default=None,
                      help="the split to average over (default: the run's input.eval_split)")
  parser.add_argument("--max_images", type=int, default=None,
                      help="use only the split's first N images (per process)")
  parser.add_argument("--linkage", default=DEFAULT_LINKAGE, choices=LINKAGE_METHODS,
                      help="scipy linkage method on the distances 1 - cosine")
  args = parser.parse_args(argv)
  out_dir = args.out or os.path.join(args.workdir, DEFAULT_OUT)
  try:
    class_relations(args.workdir, out_dir, args.split, args.max_images, args.linkage)
  except errors.ONE_LINE_ERRORS as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(f"wrote {os.path.join(out_dir, RELATIONS_PNG)}, {DENDROGRAM_PNG} and {RELATIONS_JSON}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
