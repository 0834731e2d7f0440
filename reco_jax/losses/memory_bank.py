"""Class-wise memory bank (Alonso et al., ICCV 2021): heads, memory update and loss.

The official code (`Shathe/SemiSeg-Contrastive`, other_methods_spec §2) works on *flattened
pixel sets*: its heads are `Linear -> BatchNorm1d -> act -> Linear` applied to the rows it
selected (valid pixels, correct-and-confident pixels, the pixels of one class), so every
BatchNorm sees statistics of that subset only. Static shapes keep every pixel and carry a
mask instead: `masked_batch_norm` normalises with the statistics of the masked rows and
updates the running statistics from them, exactly as BatchNorm1d on the gathered rows.

Pieces:
* `PixelMLP`: projection / prediction head (ReLU) on `f32[N,D]` rows with a row mask.
* `ClassSelectors`: the C per-class selector MLPs (`Linear -> BN1d -> LeakyReLU(0.2) ->
  Linear(1)`), parameters stacked on a leading class axis; class c sees the rows of its mask.
* `memory_update`: the per-class FIFO ring buffer `f32[C,K,D]` + `i32[C]` counts (§2.3).
* `contrastive_loss`: `contrastive_class_to_class_learned_memory` (§2.4) in the closed form
  of §2.7: no (M x N) distance matrix, one (P x D)·(D x C) product.

Hand-written because no library has BatchNorm over a row subset with static shapes.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# BatchNorm1d defaults of the official heads (torch momentum 0.1 = flax momentum 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# F.normalize's eps.
NORMALIZE_EPS = 1e-12
RANKINGS = ("ascending", "descending")
SAMPLE_RULES = ("pascal_voc", "cityscapes")


# ------------------------------------------------------------------------------------------
# Masked BatchNorm1d.


def masked_moments(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, biased variance and row count of the masked rows.

  Args:
    x: f32[..., N, D].
    mask: bool[..., N] (None = every row).
  Returns:
    (mean f32[..., D], var f32[..., D], count f32[...]).
  """
  w = jnp.ones(x.shape[:-1], x.dtype) if mask is None else mask.astype(x.dtype)
  count = jnp.sum(w, axis=-1)
  denom = jnp.maximum(count, 1.0)[..., None]
  mean = jnp.sum(w[..., None] * x, axis=-2) / denom
  var = jnp.sum(w[..., None] * jnp.square(x - mean[..., None, :]), axis=-2) / denom
  return mean, var, count


def masked_batch_norm(x: jax.Array, mask: jax.Array | None, scale: jax.Array, bias: jax.Array,
                      running_mean: jax.Array, running_var: jax.Array, *, train: bool,
                      momentum: float = BN_MOMENTUM, epsilon: float = BN_EPSILON
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm1d over the masked rows of `x` (torch semantics).

  Train mode normalises with the biased batch variance of the masked rows and moves the
  running statistics toward their mean and *unbiased* variance. PyTorch raises on fewer than
  two rows; here the running statistics are then left unchanged (the outputs of such a call
  are never used by the method).

  Args:
    x: f32[..., N, D]; mask: bool[..., N] or None; scale, bias, running_mean, running_var:
      f32[..., D] (a leading class axis broadcasts with x's).
  Returns:
    (y f32[..., N, D], new running_mean, new running_var).
  """
  if not train:
    mean, var = running_mean, running_var
    new_mean, new_var = running_mean, running_var
  else:
    mean, var, count = masked_moments(x, mask)
    unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))[..., None]
    update = (count >= 2)[..., None]
    new_mean = jnp.where(update, momentum * running_mean + (1 - momentum) * mean, running_mean)
    new_var = jnp.where(update, momentum * running_var + (1 - momentum) * unbiased, running_var)
  y = (x - mean[..., None, :]) * jax.lax.rsqrt(var[..., None, :] + epsilon)
  return y * scale[..., None, :] + bias[..., None, :], new_mean, new_var


def torch_linear_init(fan_in: int):
  """PyTorch's default `nn.Linear` init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PixelMLP(nn.Module):
  """`Linear(d_in, hidden) -> BatchNorm1d (masked) -> act -> Linear(hidden, out)` on rows.

  The official `projection_head` / `prediction_head` (ReLU). `__call__(x f32[N,d_in],
  mask bool[N] | None, train)` -> f32[N,out]. Parameters `linear_0`, `bn`
  {scale, bias}, `linear_1`; batch_stats `bn` {mean, var}.
  """
  hidden: int = 256
  out: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    d_in = x.shape[-1]
    h = nn.Dense(self.hidden, kernel_init=torch_linear_init(d_in), bias_init=torch_linear_init(d_in),
                 name="linear_0")(x)
    h = _MaskedBN(name="bn")(h, mask, train)
    h = nn.relu(h)
    return nn.Dense(self.out, kernel_init=torch_linear_init(self.hidden),
                    bias_init=torch_linear_init(self.hidden), name="linear_1")(h)


class _MaskedBN(nn.Module):
  """`masked_batch_norm` with flax variables: params {scale, bias}, batch_stats {mean, var}."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((d,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((d,), jnp.float32))
    y, new_mean, new_var = masked_batch_norm(x, mask, scale, bias, mean.value, var.value,
                                             train=train)
    if train and not self.is_initializing():
      mean.value, var.value = new_mean, new_var
    return y


class ClassSelectors(nn.Module):
  """The per-class selector MLPs, stacked: class c is `Linear(d, hidden) -> BN1d ->
  LeakyReLU(0.2) -> Linear(hidden, 1)` (official `contrastive_class_selector_c`).

  `__call__(x, masks bool[C,N], train)` -> logits f32[C,N] (apply a sigmoid for the
  weights). `x` is f32[N,d] (every class sees the same rows; its BatchNorm uses the rows of
  its mask) or f32[C,N,d] (class c sees its own rows, the memory side). Memory: C·N·hidden
  floats for the hidden layer.
  `own_class(x f32[N,d], classes i32[N], mask bool[N], train)` -> f32[N]: row i under its own
  class's selector only (class c's BatchNorm over the masked rows of class c), what the loss
  and the memory need; a scan over the classes with rematerialisation keeps the memory at
  N·hidden floats (same values as `__call__` with `class_masks(classes, mask)`).
  Parameters (leading axis C): kernel_0 [C,d,h], bias_0 [C,h], bn_scale, bn_bias [C,h],
  kernel_1 [C,h,1], bias_1 [C,1]; batch_stats bn_mean, bn_var [C,h].
  """
  num_classes: int
  hidden: int = 256
  negative_slope: float = 0.2
  in_features: int | None = None  # None: `hidden` (the selectors read the heads' output)

  def setup(self):
    c, h = self.num_classes, self.hidden
    d = self.in_features or h
    self.kernel_0 = self.param("kernel_0", torch_linear_init(d), (c, d, h), jnp.float32)
    self.bias_0 = self.param("bias_0", torch_linear_init(d), (c, h), jnp.float32)
    self.bn_scale = self.param("bn_scale", nn.initializers.ones, (c, h), jnp.float32)
    self.bn_bias = self.param("bn_bias", nn.initializers.zeros, (c, h), jnp.float32)
    self.kernel_1 = self.param("kernel_1", torch_linear_init(h), (c, h, 1), jnp.float32)
    self.bias_1 = self.param("bias_1", torch_linear_init(h), (c, 1), jnp.float32)
    self.bn_mean = self.variable("batch_stats", "bn_mean", lambda: jnp.zeros((c, h), jnp.float32))
    self.bn_var = self.variable("batch_stats", "bn_var", lambda: jnp.ones((c, h), jnp.float32))

  def _store(self, train: bool, new_mean, new_var) -> None:
    if train and not self.is_initializing():
      self.bn_mean.value, self.bn_var.value = new_mean, new_var

  def __call__(self, x: jax.Array, masks: jax.Array, train: bool) -> jax.Array:
    spec = "nd,cdh->cnh" if x.ndim == 2 else "cnd,cdh->cnh"
    hid = jnp.einsum(spec, x, self.kernel_0) + self.bias_0[:, None, :]
    hid, new_mean, new_var = masked_batch_norm(hid, masks, self.bn_scale, self.bn_bias,
                                               self.bn_mean.value, self.bn_var.value, train=train)
    self._store(train, new_mean, new_var)
    hid = nn.leaky_relu(hid, self.negative_slope)
    return jnp.einsum("cnh,cho->cno", hid, self.kernel_1)[..., 0] + self.bias_1

  def own_class(self, x: jax.Array, classes: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    p = {"kernel_0": self.kernel_0, "bias_0": self.bias_0, "bn_scale": self.bn_scale,
         "bn_bias": self.bn_bias, "kernel_1": self.kernel_1, "bias_1": self.bias_1}
    slope = self.negative_slope

    @jax.checkpoint
    def one_class(out, per_class):
      c, q, rm, rv = per_class
      rows = mask & (classes == c)
      hid = x @ q["kernel_0"] + q["bias_0"]
      hid, new_rm, new_rv = masked_batch_norm(hid, rows, q["bn_scale"], q["bn_bias"], rm, rv,
                                              train=train)
      logit = nn.leaky_relu(hid, slope) @ q["kernel_1"][:, 0] + q["bias_1"][0]
      return jnp.where(classes == c, logit, out), (new_rm, new_rv)

    init = jnp.zeros(x.shape[:1], jnp.float32)
    xs = (jnp.arange(self.num_classes), p, self.bn_mean.value, self.bn_var.value)
    out, (new_mean, new_var) = jax.lax.scan(one_class, init, xs)
    self._store(train, new_mean, new_var)
    return out


def own_class_scores(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """`scores[labels[i], i]`: f32[C,N] selector outputs, i32[N] labels (clipped) -> f32[N]."""
  index = jnp.clip(labels, 0, scores.shape[0] - 1)
  return jnp.take_along_axis(scores, index[None, :], axis=0)[0]


def class_masks(labels: jax.Array, valid: jax.Array, num_classes: int) -> jax.Array:
  """bool[C,N]: row i belongs to class c (and is valid)."""
  return valid[None, :] & (labels[None, :] == jnp.arange(num_classes)[:, None])


# ------------------------------------------------------------------------------------------
# The memory.


def per_class_samples_per_image(rule: str, num_classes: int, num_labeled: int,
                                memory_per_class: int) -> int:
  """`FeatureMemory.per_class_samples_per_image` (Python's banker's `round`, as official).

  cityscapes: `max(1, int(round(m/n)))`; pascal_voc: `max(1, int(C/3 · round(m/n)))`.
  """
  if rule not in SAMPLE_RULES:
    raise ValueError(f"per_class_samples_per_image: rule must be one of {SAMPLE_RULES}, got {rule!r}")
  per_image = round(memory_per_class / num_labeled)
  if rule == "cityscapes":
    return max(1, int(per_image))
  return max(1, int(num_classes / 3 * per_image))


def init_memory(num_classes: int, memory_per_class: int, dim: int) -> dict:
  """{'features': f32[C,K,D] zeros, 'count': i32[C] zeros} (empty memory)."""
  return {"features": jnp.zeros((num_classes, memory_per_class, dim), jnp.float32),
          "count": jnp.zeros((num_classes,), jnp.int32)}


def candidate_counts(labels: jax.Array, candidates: jax.Array, num_classes: int) -> jax.Array:
  """i32[C]: candidate rows per class."""
  return jnp.sum(class_masks(labels, candidates, num_classes), axis=1).astype(jnp.int32)


def memory_update(memory: dict, features: jax.Array, labels: jax.Array, candidates: jax.Array,
                  scores: jax.Array, elements_per_class: int, ranking: str = "ascending") -> dict:
  """`FeatureMemory.add_features_from_sample_learned` with static shapes.

  Per class c with n_c candidates: if n_c > E, the E candidates first in the score order
  (official: `torch.sort` ascending, i.e. the E *lowest*-scored; `ranking='descending'` is the
  paper's highest-scored); otherwise all candidates in their row order. They go in front,
  newest first: `mem_c <- concat(new, mem_c)[:K]`.

  Args:
    memory: {'features': f32[C,K,D], 'count': i32[C]}.
    features: f32[N,D] the teacher's projected features of every row.
    labels: i32[N] class of each row.
    candidates: bool[N] rows that may enter (correct and confident).
    scores: f32[C,N] the selector score of row i for class c, or f32[N] the score of row i
      under its own class (only read where row i is a candidate of class c and n_c > E).
    elements_per_class: E (static).
    ranking: 'ascending' (official) or 'descending' (paper).
  Returns:
    The new memory dict.
  """
  if ranking not in RANKINGS:
    raise ValueError(f"memory_update: ranking must be one of {RANKINGS}, got {ranking!r}")
  bank, count = memory["features"], memory["count"]
  num_classes, capacity, _ = bank.shape
  n_rows = features.shape[0]
  in_class = class_masks(labels, candidates, num_classes)
  n = jnp.sum(in_class, axis=1).astype(jnp.int32)
  take = min(int(elements_per_class), capacity, n_rows)
  ranked = n > elements_per_class
  scores = jnp.broadcast_to(scores, (num_classes, n_rows))
  score_key = -scores if ranking == "ascending" else scores
  # Unranked classes keep the original row order: the earliest row gets the largest key.
  row_key = -jnp.arange(n_rows, dtype=jnp.float32)[None, :]
  key = jnp.where(ranked[:, None], score_key, row_key)
  key = jnp.where(in_class, key, -jnp.inf)
  _, top = jax.lax.top_k(key, take)  # [C, take]
  new = features[top]  # [C, take, D]
  n_new = jnp.minimum(n, take)
  slot = jnp.arange(capacity)
  from_new = slot[None, :] < n_new[:, None]
  new_index = jnp.broadcast_to(jnp.minimum(slot, take - 1)[None, :, None], (num_classes, capacity, 1))
  new_rows = jnp.take_along_axis(new, new_index, axis=1)
  old_rows = jnp.take_along_axis(bank, jnp.clip(slot[None, :] - n_new[:, None], 0, capacity - 1)
                                 [..., None], axis=1)
  bank = jnp.where(from_new[..., None], new_rows, old_rows)
  return {"features": bank, "count": jnp.minimum(count + n_new, capacity).astype(jnp.int32)}


# ------------------------------------------------------------------------------------------
# The loss.


def l2_normalize(x: jax.Array) -> jax.Array:
  """`F.normalize(x, dim=-1)`: x / max(||x||, 1e-12).

  Written as sqrt(max(||x||², eps²)) so that an all-zero row (a masked-out pixel) has a
  finite gradient, as in PyTorch (`jnp.linalg.norm`'s gradient at 0 is NaN).
  """
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(squared, NORMALIZE_EPS ** 2))


def memory_slots(memory: dict) -> jax.Array:
  """bool[C,K]: the filled slots."""
  capacity = memory["features"].shape[1]
  return jnp.arange(capacity)[None, :] < memory["count"][:, None]


def contributing_classes(labels: jax.Array, valid: jax.Array, memory: dict) -> jax.Array:
  """bool[C]: classes the loss uses (M_c > 1 valid rows and N_c > 1 memory entries); the
  official code runs a class's selectors only for these."""
  num_classes = memory["features"].shape[0]
  rows = jnp.sum(class_masks(labels, valid, num_classes), axis=1)
  return (rows > 1) & (memory["count"] > 1)


def contrastive_loss(features: jax.Array, labels: jax.Array, valid: jax.Array,
                     feature_weights: jax.Array, memory: dict,
                     memory_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`contrastive_class_to_class_learned_memory` in closed form (other_methods_spec §2.4, §2.7).

  For class c with M_c valid rows and N_c memory entries (skipped unless M_c > 1 and
  N_c > 1): `term_c = mean_ij (1 - f̂_i·q̂_j)·w_i·w'_j` with `w_i = M_c a_i / Σ a` and the
  memory weights `w'` (official: identically 1). Since `Σ_j w'_j (1 - f̂_i·q̂_j) = W_c -
  f̂_i·μ_c` with `W_c = Σ_j w'_j`, `μ_c = Σ_j w'_j q̂_j`:
  `term_c = Σ_i a_i (W_c - f̂_i·μ_c) / (N_c Σ_i a_i)`. Loss = Σ_c term_c / C.

  Args:
    features: f32[N,D] the student's prediction-head outputs (not normalised).
    labels: i32[N]; valid: bool[N] rows that take part.
    feature_weights: f32[N] `a_i = sigmoid(selector_{label_i}(sg(features_i)))` (gradients
      flow to the selector through it).
    memory: {'features': f32[C,K,D], 'count': i32[C]} (treated as constant).
    memory_weights: f32[C,K] `w'` (the paper's Eq. 8 weighting) or None (official: 1).
  Returns:
    (loss f32[], contributing bool[C]).
  """
  bank = jax.lax.stop_gradient(memory["features"])
  num_classes = bank.shape[0]
  slots = memory_slots(memory).astype(jnp.float32)
  w_mem = slots if memory_weights is None else slots * memory_weights
  q_hat = l2_normalize(bank)
  total_weight = jnp.sum(w_mem, axis=1)  # W_c
  mu = jnp.einsum("ck,ckd->cd", w_mem, q_hat)  # μ_c
  onehot = class_masks(labels, valid, num_classes).T.astype(jnp.float32)  # [N, C]
  m = jnp.sum(onehot, axis=0)
  n = memory["count"].astype(jnp.float32)
  contributing = (m > 1) & (n > 1)
  f_hat = l2_normalize(features)
  sims = jnp.dot(f_hat, mu.T, precision=jax.lax.Precision.HIGHEST)  # [N, C]
  weighted = onehot * feature_weights[:, None]
  numerator = jnp.sum(weighted * (total_weight[None, :] - sims), axis=0)
  a_sum = jnp.sum(weighted, axis=0)
  safe = jnp.where(contributing, n * a_sum, 1.0)
  terms = jnp.where(contributing, numerator / safe, 0.0)
  return jnp.sum(terms) / num_classes, contributing


def mean_one_weights(scores_sigmoid: jax.Array, mask: jax.Array) -> jax.Array:
  """f32[C,K]: `N_c b_j / Σ_k b_k` over the masked entries of each class (0 elsewhere): the
  paper's memory-side weighting rescaled to mean 1 (Eq. 8)."""
  b = jnp.where(mask, scores_sigmoid, 0.0)
  count = jnp.sum(mask, axis=1, keepdims=True).astype(b.dtype)
  return jnp.where(mask, count * b / jnp.maximum(jnp.sum(b, axis=1, keepdims=True), 1e-30), 0.0)


def sigmoid_ramp_up(step: jax.Array, length: int) -> jax.Array:
  """`sigmoid_ramp_up(iter, max_iter)` of trainSSL.py: exp(-5 (1 - t/T)^2), 1 from T on."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.where(t >= length, 1.0, jnp.exp(-5.0 * jnp.square(1.0 - t / length)))


def entropy_loss(probs: jax.Array, valid: jax.Array) -> jax.Array:
  """`entropy_loss` of trainSSL.py: mean over valid pixels of -Σ p log2 p / log2(C).

  Args: probs f32[B,H,W,C]; valid bool[B,H,W].
  """
  num_classes = probs.shape[-1]
  ent = -jnp.sum(probs * jnp.log2(probs + 1e-30), axis=-1)
  v = valid.astype(jnp.float32)
  return jnp.sum(ent * v) / (jnp.maximum(jnp.sum(v), 1.0) * math.log2(num_classes))


def alonso_ema_decay(step: jax.Array, num_steps: int) -> jax.Array:
  """Teacher decay `min(1 - 1/(10 t + 1), 1 - 0.005 (cos(π t/T) + 1)/2)` (other_methods_spec
  §2.1), t = the iteration (0-based) whose update this is."""
  t = jnp.asarray(step, jnp.float32)
  cap = 1.0 - 0.005 * (jnp.cos(jnp.pi * t / num_steps) + 1.0) / 2.0
  return jnp.minimum(1.0 - 1.0 / (10.0 * t + 1.0), cap)
