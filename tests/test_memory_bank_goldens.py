"""Alonso et al.'s class-wise memory bank against the official code (golden/wave2, README §2).

`reco_jax/losses/memory_bank.py`: the masked-BatchNorm heads, the per-class selectors, the
memory update (§2.3) and the closed-form loss (§2.4, §2.7). The goldens are torch state-dict
names and NCHW features; the port takes NHWC rows. Tolerances are the README's (§2.6): head
outputs and memory contents atol 1e-5, losses rtol 1e-5, feature gradients atol 1e-8, selector
gradients atol 1e-6, running statistics rtol 1e-5 / atol 1e-6; counts, masks and sizes exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.losses import memory_bank as mb

C = 4  # num_classes of every Alonso golden
LOSS_CASES = ["L1_all_classes", "L2_skipped_classes", "L3_memory_from_update"]
STATS_TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# torch state dict -> flax variables.


def head_variables(w: dict, name: str) -> dict:
  """`projection_head` / `prediction_head` (Linear, BN1d, ReLU, Linear) -> PixelMLP variables."""
  a = lambda k: jnp.asarray(w[f"{name}.{k}"])
  params = {"linear_0": {"kernel": a("0.weight").T, "bias": a("0.bias")},
            "bn": {"scale": a("1.weight"), "bias": a("1.bias")},
            "linear_1": {"kernel": a("3.weight").T, "bias": a("3.bias")}}
  stats = {"bn": {"mean": a("1.running_mean"), "var": a("1.running_var")}}
  return {"params": params, "batch_stats": stats}


def selector_variables(w: dict, prefix: str) -> dict:
  """The 4 modules `<prefix><c>` (Linear, BN1d, LeakyReLU, Linear(1)) stacked -> ClassSelectors
  variables. prefix: 'contrastive_class_selector_' or 'contrastive_class_selector_memory'."""
  s = lambda k: jnp.stack([jnp.asarray(w[f"{prefix}{c}.{k}"]) for c in range(C)])
  params = {"kernel_0": jnp.swapaxes(s("0.weight"), 1, 2), "bias_0": s("0.bias"),
            "bn_scale": s("1.weight"), "bn_bias": s("1.bias"),
            "kernel_1": jnp.swapaxes(s("3.weight"), 1, 2), "bias_1": s("3.bias")}
  stats = {"bn_mean": s("1.running_mean"), "bn_var": s("1.running_var")}
  return {"params": params, "batch_stats": stats}


def selector_grad_to_torch(grads: dict, c: int) -> dict:
  """Class c's slice of stacked ClassSelectors gradients, under torch parameter names."""
  return {"0.weight": grads["kernel_0"][c].T, "0.bias": grads["bias_0"][c],
          "1.weight": grads["bn_scale"][c], "1.bias": grads["bn_bias"][c],
          "3.weight": grads["kernel_1"][c].T, "3.bias": grads["bias_1"][c]}


def memory_from_golden(g: dict, key: str = "memory_class{c}") -> dict:
  """Per-class arrays (rows = count; 0 rows = None) -> {'features': [C,K,D], 'count': [C]}."""
  rows = [np.asarray(g[key.format(c=c)], np.float32) for c in range(C)]
  capacity = max(1, max(len(r) for r in rows))
  bank = np.zeros((C, capacity, rows[0].shape[1]), np.float32)
  for c, r in enumerate(rows):
    bank[c, :len(r)] = r
  return {"features": jnp.asarray(bank), "count": jnp.asarray([len(r) for r in rows], jnp.int32)}


def nhwc_rows(x):
  """NCHW -> [B·H·W, C] rows in flat pixel order."""
  x = np.transpose(np.asarray(x), (0, 2, 3, 1))
  return jnp.asarray(x.reshape(-1, x.shape[-1]))


def assert_head_stats(stats, g, name, prefix="after_"):
  np.testing.assert_allclose(stats["bn"]["mean"], g[f"{prefix}{name}.1.running_mean"], **STATS_TOL)
  np.testing.assert_allclose(stats["bn"]["var"], g[f"{prefix}{name}.1.running_var"], **STATS_TOL)


def assert_selector_stats(stats, g, template):
  """template: e.g. 'after_contrastive_class_selector_{c}' (class c's torch module)."""
  for c in range(C):
    name = template.format(c=c)
    np.testing.assert_allclose(stats["bn_mean"][c], g[f"{name}.1.running_mean"], **STATS_TOL,
                               err_msg=f"{name} running_mean")
    np.testing.assert_allclose(stats["bn_var"][c], g[f"{name}.1.running_var"], **STATS_TOL,
                               err_msg=f"{name} running_var")


HEAD = mb.PixelMLP(hidden=256, out=256)
SELECTORS = mb.ClassSelectors(num_classes=C)


def apply_train(module, variables, x, mask):
  """Train-mode call -> (output, new variables)."""
  out, new = module.apply(variables, x, mask, train=True, mutable=["batch_stats"])
  return out, {"params": variables["params"], "batch_stats": new["batch_stats"]}


@pytest.fixture(scope="module")
def weights(golden):
  return golden("wave2/alonso_weights.npz")


# ------------------------------------------------------------------------------------------
# 1. Heads.


def test_heads_eval_and_train_match_the_official_heads(weights, golden):
  """PixelMLP = projection/prediction head in eval mode (running stats) and train mode (biased
  batch variance), plus the running statistics the train-mode calls leave (unbiased, 0.9/0.1)."""
  g = golden("wave2/alonso_heads.npz")
  proj_v, pred_v = head_variables(weights, "projection_head"), head_variables(weights, "prediction_head")
  x = jnp.asarray(g["x"])
  proj_eval = HEAD.apply(proj_v, x, None, train=False)
  pred_eval = HEAD.apply(pred_v, proj_eval, None, train=False)
  np.testing.assert_allclose(proj_eval, g["proj_eval"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(pred_eval, g["pred_eval"], rtol=0, atol=1e-5)
  for mask in (None, jnp.ones(x.shape[0], bool)):
    proj_train, proj_new = apply_train(HEAD, proj_v, x, mask)
    pred_train, pred_new = apply_train(HEAD, pred_v, proj_train, mask)
    np.testing.assert_allclose(proj_train, g["proj_train"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(pred_train, g["pred_train"], rtol=0, atol=1e-5)
    assert_head_stats(proj_new["batch_stats"], g, "projection_head")
    assert_head_stats(pred_new["batch_stats"], g, "prediction_head")


def test_masked_head_equals_the_head_on_the_gathered_rows(weights, golden):
  """A mask over padded rows = BatchNorm1d on the gathered rows (outputs and running stats):
  the excluded rows, however large, must not leak into the statistics."""
  g = golden("wave2/alonso_heads.npz")
  v = head_variables(weights, "projection_head")
  x = np.asarray(g["x"]).copy()
  mask = np.random.default_rng(0).random(x.shape[0]) < 0.6
  x[~mask] *= 50.0  # padding far from the kept rows
  out_masked, new_masked = apply_train(HEAD, v, jnp.asarray(x), jnp.asarray(mask))
  out_sub, new_sub = apply_train(HEAD, v, jnp.asarray(x[mask]), None)
  np.testing.assert_allclose(np.asarray(out_masked)[mask], out_sub, rtol=0, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(new_masked["batch_stats"]["bn"][k], new_sub["batch_stats"]["bn"][k],
                               **STATS_TOL)
  # And the stats did move (the check above is not vacuous).
  assert not np.allclose(new_sub["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])


# ------------------------------------------------------------------------------------------
# 2. masked_batch_norm.


def np_masked_batch_norm(x, mask, scale, bias, rm, rv, momentum=0.9, eps=1e-5):
  """float64 BatchNorm1d over each class's masked rows (x [C,N,D], mask [C,N]); rows outside
  the mask get NaN (undefined). Running stats move only with >= 2 rows (torch raises below)."""
  x = np.asarray(x, np.float64)
  y = np.full(x.shape, np.nan)
  new_m, new_v = np.array(rm, np.float64), np.array(rv, np.float64)
  for c in range(x.shape[0]):
    rows = x[c][mask[c]]
    if len(rows) == 0:
      continue
    mean, var = rows.mean(0), rows.var(0)
    y[c][mask[c]] = (rows - mean) / np.sqrt(var + eps) * scale[c] + bias[c]
    if len(rows) >= 2:
      new_m[c] = momentum * rm[c] + (1 - momentum) * mean
      new_v[c] = momentum * rv[c] + (1 - momentum) * rows.var(0, ddof=1)
  return y, new_m, new_v


def test_masked_batch_norm_matches_a_numpy_reference():
  """Per-class masked BN: biased variance to normalise, unbiased to the running var, momentum
  0.9 (flax convention), and counts 0 and 1 leave the running statistics untouched."""
  rng = np.random.default_rng(1)
  n_cls, n, d = 5, 12, 7
  x = rng.normal(size=(n_cls, n, d)).astype(np.float32) * 3 + 1
  mask = rng.random((n_cls, n)) < 0.5
  mask[0] = False  # count 0
  mask[1] = False
  mask[1, 4] = True  # count 1
  mask[2] = False
  mask[2, [3, 9]] = True  # count 2 (the smallest that updates)
  mask[3] = True  # every row
  scale, bias = rng.normal(size=(n_cls, d)).astype(np.float32), rng.normal(size=(n_cls, d)).astype(np.float32)
  rm, rv = rng.normal(size=(n_cls, d)).astype(np.float32), (0.5 + rng.random((n_cls, d))).astype(np.float32)
  y, new_m, new_v = mb.masked_batch_norm(jnp.asarray(x), jnp.asarray(mask), scale, bias, rm, rv,
                                         train=True)
  ref_y, ref_m, ref_v = np_masked_batch_norm(x, mask, scale, bias, rm, rv)
  np.testing.assert_allclose(np.asarray(y)[mask], ref_y[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_m, ref_m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_v, ref_v, rtol=1e-5, atol=1e-6)
  for c in (0, 1):  # no update below two rows: bit-identical
    np.testing.assert_array_equal(new_m[c], rm[c])
    np.testing.assert_array_equal(new_v[c], rv[c])
  # mask=None is the all-True mask; a 2-D input (no class axis) works the same.
  y_none, m_none, v_none = mb.masked_batch_norm(jnp.asarray(x[3]), None, scale[3], bias[3], rm[3], rv[3],
                                                train=True)
  np.testing.assert_allclose(y_none, ref_y[3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m_none, ref_m[3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v_none, ref_v[3], rtol=1e-5, atol=1e-6)
  # Eval mode: running statistics, unchanged.
  y_eval, m_eval, v_eval = mb.masked_batch_norm(jnp.asarray(x), jnp.asarray(mask), scale, bias, rm, rv,
                                                train=False)
  ref_eval = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5) * scale[:, None] + bias[:, None]
  np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(m_eval, rm)
  np.testing.assert_array_equal(v_eval, rv)


# ------------------------------------------------------------------------------------------
# 3. Memory update.


def test_memory_update_reproduces_the_official_three_steps(weights, golden):
  """§2.3: three steps on one memory. Teacher projection head (train-mode BN over the correct
  rows), teacher selectors run only for classes with n_c > E (train-mode BN over the class's
  candidates, stats carried from step to step), ascending ranking (the E *lowest* scores),
  newest-first FIFO truncated at K."""
  g = golden("wave2/alonso_memory_update.npz")
  e, capacity = int(g["elements_per_class"]), int(g["memory_per_class"])
  assert int(g["num_classes"]) == C
  proj_v = head_variables(weights, "projection_head")
  sel_v = selector_variables(weights, "contrastive_class_selector_")
  memory = mb.init_memory(C, capacity, 256)
  for t in range(3):
    p = f"step{t}_"
    # The teacher's projection head on the correct & confident rows.
    proj, proj_v = apply_train(HEAD, proj_v, jnp.asarray(g[p + "features_correct"]), None)
    np.testing.assert_allclose(proj, g[p + "proj_features_correct"], rtol=0, atol=1e-5)
    assert_head_stats(proj_v["batch_stats"], g, "projection_head", prefix=p + "after_")
    # Selection and insertion, from the recorded projected rows.
    features = jnp.asarray(g[p + "proj_features_correct"])
    labels = jnp.asarray(g[p + "labels_down_correct"], jnp.int32)
    candidates = jnp.ones(labels.shape, bool)
    n = mb.candidate_counts(labels, candidates, C)
    np.testing.assert_array_equal(n, g[p + "n_candidates"])
    masks = mb.class_masks(labels, candidates, C) & (n > e)[:, None]
    logits, sel_v = apply_train(SELECTORS, sel_v, features, masks)
    scores = jax.nn.sigmoid(logits)
    for c in range(C):
      if f"{p}class{c}_score" in g:
        np.testing.assert_allclose(np.asarray(scores[c])[np.asarray(labels) == c],
                                   g[f"{p}class{c}_score"], rtol=0, atol=1e-5)
    assert_selector_stats(sel_v["batch_stats"], g, p + "after_contrastive_class_selector_{c}")
    memory = mb.memory_update(memory, features, labels, candidates, scores, elements_per_class=e,
                              ranking="ascending")
    for c in range(C):
      expected = g[f"{p}memory_after_class{c}"]
      assert int(memory["count"][c]) == len(expected), (t, c)
      assert bool(g[f"{p}memory_after_is_none_class{c}"]) == (len(expected) == 0)
      np.testing.assert_allclose(np.asarray(memory["features"][c])[:len(expected)], expected,
                                 rtol=0, atol=1e-5, err_msg=f"step {t} class {c}")


def test_descending_ranking_keeps_the_highest_scores(golden):
  """ranking='descending' (the paper) inserts the E highest-scored candidates, best first;
  'ascending' (official) the E lowest, in the official sort order."""
  g = golden("wave2/alonso_memory_update.npz")
  e = int(g["elements_per_class"])
  features = jnp.asarray(g["step0_proj_features_correct"])
  labels = np.asarray(g["step0_labels_down_correct"], np.int32)
  rows = np.flatnonzero(labels == 0)
  score0 = np.asarray(g["step0_class0_score"])
  scores = np.zeros((C, len(labels)), np.float32)
  scores[0, rows] = score0
  args = (jnp.asarray(labels), jnp.ones(len(labels), bool), jnp.asarray(scores))
  empty = mb.init_memory(C, 10, 256)
  up = mb.memory_update(empty, features, *args, elements_per_class=e, ranking="descending")
  np.testing.assert_array_equal(up["features"][0, :e], np.asarray(features)[rows[np.argsort(-score0)[:e]]])
  down = mb.memory_update(empty, features, *args, elements_per_class=e, ranking="ascending")
  np.testing.assert_array_equal(down["features"][0, :e],
                                np.asarray(features)[rows[g["step0_class0_sorted_idx"][:e]]])
  with pytest.raises(ValueError, match="ranking"):
    mb.memory_update(empty, features, *args, elements_per_class=e, ranking="random")


def np_memory_update(mem, features, labels, candidates, scores, e, capacity, ranking="ascending"):
  """The official rule on a list of per-class arrays (float64-free: rows are copied)."""
  out = []
  for c, old in enumerate(mem):
    idx = np.flatnonzero(candidates & (labels == c))
    if len(idx) > e:
      key = scores[c, idx] if ranking == "ascending" else -scores[c, idx]
      new = features[idx[np.argsort(key, kind="stable")[:e]]]
    else:
      new = features[idx]
    out.append(np.concatenate([new, old])[:capacity])
  return out


@pytest.mark.parametrize("capacity,e", [(6, 4), (3, 4), (9, 1)])
@pytest.mark.parametrize("ranking", ["ascending", "descending"])
def test_memory_update_matches_the_official_rule_on_random_steps(capacity, e, ranking):
  """Random multi-step sequences with n_c = 0, n_c == E (not ranked: row order), n_c < E,
  n_c > E and n_c > K, and K < E; contents and counts exact."""
  rng = np.random.default_rng(capacity * 10 + e)
  n_cls, n_rows, d = 5, 30, 3
  mem = [np.zeros((0, d), np.float32) for _ in range(n_cls)]
  memory = mb.init_memory(n_cls, capacity, d)
  for step in range(4):
    per_class = [0, e, max(e - 1, 0), e + 3, 12]  # candidates per class
    labels = np.full(n_rows, -1, np.int32)
    candidates = np.zeros(n_rows, bool)
    order = rng.permutation(n_rows)
    start = 0
    for c, k in enumerate(per_class):
      labels[order[start:start + k]] = c
      candidates[order[start:start + k]] = True
      start += k
    # Non-candidate rows of real classes must be ignored.
    spare = order[start:]
    labels[spare] = rng.integers(0, n_cls, len(spare))
    features = rng.normal(size=(n_rows, d)).astype(np.float32)
    scores = rng.random((n_cls, n_rows)).astype(np.float32)
    mem = np_memory_update(mem, features, labels, candidates, scores, e, capacity, ranking)
    memory = mb.memory_update(memory, jnp.asarray(features), jnp.asarray(labels), jnp.asarray(candidates),
                              jnp.asarray(scores), elements_per_class=e, ranking=ranking)
    np.testing.assert_array_equal(mb.candidate_counts(jnp.asarray(labels), jnp.asarray(candidates), n_cls),
                                  per_class)
    for c in range(n_cls):
      assert int(memory["count"][c]) == len(mem[c]), (step, c)
      np.testing.assert_array_equal(np.asarray(memory["features"][c])[:len(mem[c])], mem[c],
                                    err_msg=f"step {step} class {c}")
      # Empty slots stay zero.
      assert not np.any(np.asarray(memory["features"][c])[len(mem[c]):])


# ------------------------------------------------------------------------------------------
# 4. per_class_samples_per_image.


def test_per_class_samples_per_image_matches_the_official_table(golden):
  """Every (dataset, num_samples, memory_per_class) of the official constructor, banker's round."""
  g = golden("wave2/alonso_per_class_samples.npz")
  got = [mb.per_class_samples_per_image(str(r), int(nc), int(ns), int(m))
         for r, nc, ns, m in zip(g["dataset"], g["n_classes"], g["num_samples"], g["memory_per_class"])]
  np.testing.assert_array_equal(got, g["per_class_samples_per_image"])
  with pytest.raises(ValueError, match="rule"):
    mb.per_class_samples_per_image("camvid", 11, 100, 256)


# ------------------------------------------------------------------------------------------
# 5. The loss on the official cases.


def selector_loss_fn(features, labels, valid, memory, masks, memory_weights=None):
  """params, batch_stats -> (loss, (contributing, new batch_stats, a)). a = sigmoid of each row's
  own-class selector on the *detached* features."""
  def f(params, stats):
    logits, new = SELECTORS.apply({"params": params, "batch_stats": stats},
                                  jax.lax.stop_gradient(features), masks, train=True,
                                  mutable=["batch_stats"])
    a = mb.own_class_scores(jax.nn.sigmoid(logits), labels)
    loss, contributing = mb.contrastive_loss(features, labels, valid, a, memory, memory_weights)
    return loss, (contributing, new["batch_stats"], a)
  return f


@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_gradients_and_selector_stats_match_the_official_code(case, weights, golden):
  """§2.4 cases: loss, contributing classes, feature weights a, ∂/∂features, ∂/∂selector params
  (contributing classes), and the feature-side selectors' running statistics. The official
  only runs selector c for contributing classes, so its mask is class membership ∧ contributing."""
  g = golden(f"wave2/alonso_loss_{case}.npz")
  features = jnp.asarray(g["features"])
  labels = jnp.asarray(g["class_labels"], jnp.int32)
  valid = jnp.ones(labels.shape, bool)
  memory = memory_from_golden(g)
  for c in range(C):
    assert bool(g[f"memory_is_none_class{c}"]) == (int(memory["count"][c]) == 0)
  sel_v = selector_variables(weights, "contrastive_class_selector_")
  ones = jnp.ones(labels.shape)
  _, contributing = mb.contrastive_loss(features, labels, valid, ones, memory)
  np.testing.assert_array_equal(np.flatnonzero(contributing), g["contributing_classes"])
  masks = mb.class_masks(labels, valid, C) & contributing[:, None]

  f = selector_loss_fn(features, labels, valid, memory, masks)
  (loss, (contributing, stats, a)), grads = jax.value_and_grad(f, has_aux=True)(
      sel_v["params"], sel_v["batch_stats"])
  np.testing.assert_allclose(float(loss), g["loss"], rtol=1e-5)
  np.testing.assert_allclose(float(loss), g["ref64_loss"], rtol=1e-5)
  np.testing.assert_array_equal(np.flatnonzero(contributing), g["contributing_classes"])
  for c in g["contributing_classes"]:
    np.testing.assert_allclose(np.asarray(a)[np.asarray(labels) == c], g[f"class{c}_weights"],
                               rtol=0, atol=1e-5)
    for name, value in selector_grad_to_torch(grads, c).items():
      np.testing.assert_allclose(value, g[f"grad_contrastive_class_selector_{c}.{name}"], rtol=0,
                                 atol=1e-6, err_msg=f"class {c} {name}")
  for c in set(range(C)) - set(g["contributing_classes"].tolist()):
    assert not any(np.any(np.asarray(v)) for v in selector_grad_to_torch(grads, c).values())
  assert_selector_stats(stats, g, "after_contrastive_class_selector_{c}")
  if case == "L2_skipped_classes":
    # Why the masks carry `contributing`: class 2 (10 rows, no memory) is never run by the
    # official code, but plain class-membership masks would move its statistics.
    _, plain = apply_train(SELECTORS, sel_v, features, mb.class_masks(labels, valid, C))
    assert not np.allclose(plain["batch_stats"]["bn_mean"][2],
                           g["after_contrastive_class_selector_2.1.running_mean"], **STATS_TOL)

  # ∂loss/∂features: only through f̂ (a is computed from the detached features).
  grad_features = jax.grad(lambda x: mb.contrastive_loss(x, labels, valid, a, memory)[0])(features)
  np.testing.assert_allclose(grad_features, g["grad_features"], rtol=0, atol=1e-8)
  grad_through_selector = jax.grad(lambda x: selector_loss_fn(x, labels, valid, memory, masks)(
      sel_v["params"], sel_v["batch_stats"])[0])(features)
  np.testing.assert_allclose(grad_through_selector, g["grad_features"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("case", LOSS_CASES)
def test_memory_side_selectors_reproduce_the_official_side_effects(case, weights, golden):
  """The memory selectors on q̂ (train-mode BN over each *contributing* class's filled slots, as
  the official runs them) give the official b and running statistics. The official w' =
  (1/b)·b ≡ 1: passing it (recorded, 0.99999994 included) as memory_weights gives the official
  loss. `mean_one_weights` is the paper's Eq. 8 (N_c b / Σb, not ≡ 1): the loss with it equals
  the explicit formula with those w'."""
  g = golden(f"wave2/alonso_loss_{case}.npz")
  features = jnp.asarray(g["features"])
  labels = jnp.asarray(g["class_labels"], jnp.int32)
  valid = jnp.ones(labels.shape, bool)
  memory = memory_from_golden(g)
  mem_v = selector_variables(weights, "contrastive_class_selector_memory")
  _, contributing = mb.contrastive_loss(features, labels, valid, jnp.ones(labels.shape), memory)
  mem_mask = mb.memory_slots(memory) & contributing[:, None]
  logits, mem_v = apply_train(SELECTORS, mem_v, mb.l2_normalize(memory["features"]), mem_mask)
  b = jax.nn.sigmoid(logits)
  assert_selector_stats(mem_v["batch_stats"], g, "after_contrastive_class_selector_memory{c}")
  w_paper = np.asarray(mb.mean_one_weights(b, mem_mask))
  w_official = np.zeros(w_paper.shape, np.float32)
  for c in g["contributing_classes"]:
    n_c = int(memory["count"][c])
    b_ref = g[f"class{c}_memory_weights"].astype(np.float64)
    np.testing.assert_allclose(b[c, :n_c], b_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(w_paper[c, :n_c], n_c * b_ref / b_ref.sum(), rtol=1e-5, atol=1e-6)
    w_official[c, :n_c] = g[f"class{c}_rescaled_memory_weights"]
  assert not np.any(w_paper[~np.asarray(mem_mask)])
  # The official feature weights a; the loss with the official w' is the official loss.
  sel_v = selector_variables(weights, "contrastive_class_selector_")
  masks = mb.class_masks(labels, valid, C) & contributing[:, None]
  loss_fn = lambda w: selector_loss_fn(features, labels, valid, memory, masks, w)(
      sel_v["params"], sel_v["batch_stats"])
  loss, (_, _, a) = loss_fn(jnp.asarray(w_official))
  np.testing.assert_allclose(float(loss), g["loss"], rtol=1e-5)
  loss_paper, _ = loss_fn(jnp.asarray(w_paper))
  ref, _ = np_explicit_loss(g["features"], np.asarray(labels), np.ones(len(labels), bool), np.asarray(a),
                            np.asarray(memory["features"]), np.asarray(memory["count"]), w_paper)
  np.testing.assert_allclose(float(loss_paper), ref, rtol=1e-5)
  assert abs(float(loss_paper) - float(g["loss"])) > 1e-4  # Eq. 8 does change the loss


# ------------------------------------------------------------------------------------------
# 6. The labelled block end to end.


def test_labelled_block_end_to_end(weights, golden):
  """§2.5: NCHW features -> rows, valid = label != 255, projection then prediction head (masked
  train-mode BN over the 144 valid of 162 rows), selectors, loss against the final memory;
  ∂loss/∂features vanishes at the ignore pixels."""
  g = golden("wave2/alonso_e2e_labelled_block.npz")
  x = nhwc_rows(g["labeled_features"])
  labels_np = np.asarray(g["labels_down"]).reshape(-1)
  valid_np = labels_np != int(g["ignore_label"])
  assert valid_np.sum() == 144 and len(valid_np) == 162
  np.testing.assert_array_equal(labels_np[valid_np], g["labels_down_all"])
  labels = jnp.asarray(np.where(valid_np, labels_np, 0), jnp.int32)
  valid = jnp.asarray(valid_np)
  memory = memory_from_golden(g)
  proj_v, pred_v = head_variables(weights, "projection_head"), head_variables(weights, "prediction_head")
  sel_v = selector_variables(weights, "contrastive_class_selector_")

  def block(rows):
    proj, proj_new = apply_train(HEAD, proj_v, rows, valid)
    pred, pred_new = apply_train(HEAD, pred_v, proj, valid)
    _, contributing = mb.contrastive_loss(pred, labels, valid, jnp.ones(labels.shape), memory)
    masks = mb.class_masks(labels, valid, C) & contributing[:, None]
    loss, _ = selector_loss_fn(pred, labels, valid, memory, masks)(sel_v["params"], sel_v["batch_stats"])
    return loss, (proj, pred, proj_new, pred_new)

  (loss, (proj, pred, proj_new, pred_new)), grad = jax.value_and_grad(block, has_aux=True)(x)
  np.testing.assert_allclose(float(loss), g["loss_contr_labeled"], rtol=1e-5)
  np.testing.assert_allclose(0.1 * float(loss), g["loss_total_term"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(proj)[valid_np], g["proj_features"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pred)[valid_np], g["pred_features"], rtol=0, atol=1e-5)
  assert_head_stats(proj_new["batch_stats"], g, "projection_head")
  assert_head_stats(pred_new["batch_stats"], g, "prediction_head")
  grad_nchw = np.transpose(np.asarray(grad).reshape(2, 9, 9, 256), (0, 3, 1, 2))
  max_g = float(np.abs(g["grad_labeled_features"]).max())
  np.testing.assert_allclose(grad_nchw, g["grad_labeled_features"], rtol=0, atol=max(1e-8, 1e-4 * max_g))
  assert not np.any(np.asarray(grad)[~valid_np])


# ------------------------------------------------------------------------------------------
# 7. Closed form vs the explicit M x N formula.


def np_explicit_loss(features, labels, valid, a, bank, count, memory_weights=None):
  """§2.4 literally, float64: per class the (M_c x N_c) distance matrix, w = M a / Σa, w'."""
  f = np.asarray(features, np.float64)
  num_classes = bank.shape[0]
  total, contributing = 0.0, np.zeros(num_classes, bool)
  for c in range(num_classes):
    rows = valid & (labels == c)
    m, n = int(rows.sum()), int(count[c])
    if m <= 1 or n <= 1:
      continue
    contributing[c] = True
    fh = f[rows] / np.maximum(np.linalg.norm(f[rows], axis=1, keepdims=True), 1e-12)
    q = np.asarray(bank[c, :n], np.float64)
    qh = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    w = m * a[rows] / a[rows].sum()
    wq = np.ones(n) if memory_weights is None else np.asarray(memory_weights[c, :n], np.float64)
    total += np.mean((1.0 - fh @ qh.T) * w[:, None] * wq[None, :])
  return total / num_classes, contributing


@pytest.mark.parametrize("with_memory_weights", [False, True])
def test_closed_form_equals_the_explicit_distance_matrix(with_memory_weights):
  """Random data, 7 classes: regular, M_c = 1, N_c = 1, N_c = 0, absent, invalid rows of a
  contributing class (ignored), zero memory padding; optional random memory weights (Eq. 8)."""
  rng = np.random.default_rng(7)
  n_cls, n_rows, capacity, d = 7, 40, 7, 16
  labels = rng.choice([0, 0, 0, 2, 3, 4, 5], size=n_rows).astype(np.int32)  # class 6 absent
  labels[5] = 1  # class 1: a single row
  valid = rng.random(n_rows) < 0.85
  valid[5] = True
  features = (rng.normal(size=(n_rows, d)) * rng.uniform(0.1, 5.0, size=(n_rows, 1))).astype(np.float32)
  a = rng.uniform(0.05, 1.0, n_rows).astype(np.float32)
  count = np.array([7, 5, 3, 1, 0, 4, 6], np.int32)  # class 3: N=1, class 4: empty
  bank = np.zeros((n_cls, capacity, d), np.float32)
  for c in range(n_cls):
    bank[c, :count[c]] = rng.normal(size=(count[c], d)) + 0.5
  w_mem = (rng.uniform(0.2, 2.0, (n_cls, capacity)).astype(np.float32) if with_memory_weights else None)
  memory = {"features": jnp.asarray(bank), "count": jnp.asarray(count)}
  loss, contributing = mb.contrastive_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(valid),
                                           jnp.asarray(a), memory,
                                           None if w_mem is None else jnp.asarray(w_mem))
  ref, ref_contributing = np_explicit_loss(features, labels, valid, a, bank, count, w_mem)
  np.testing.assert_array_equal(contributing, ref_contributing)
  assert ref_contributing.sum() >= 2 and not ref_contributing[[1, 3, 4, 6]].any()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5, atol=1e-7)


def test_no_contributing_class_gives_zero_and_finite_gradients():
  """Official returns 0 when no class qualifies; the closed form must give 0 without NaN."""
  features = jnp.asarray(np.random.default_rng(3).normal(size=(6, 8)), jnp.float32)
  labels = jnp.asarray([0, 1, 1, 2, 2, 2], jnp.int32)
  memory = {"features": jnp.zeros((3, 4, 8)), "count": jnp.asarray([4, 1, 0], jnp.int32)}
  f = lambda x, a: mb.contrastive_loss(x, labels, jnp.ones(6, bool), a, memory)[0]
  assert float(f(features, jnp.full(6, 0.5))) == 0.0
  gx, ga = jax.grad(f, argnums=(0, 1))(features, jnp.full(6, 0.5))
  assert float(jnp.max(jnp.abs(gx))) == 0.0 and float(jnp.max(jnp.abs(ga))) == 0.0


def test_zero_feature_row_has_a_finite_gradient():
  """`F.normalize` has a finite gradient at a zero row (torch's norm backward is 0 at 0), and a
  row outside `valid` gets exactly zero gradient. A zero row arises from zero-padded buffers
  (`pred * valid[:, None]`), where one NaN would poison the whole backward pass (differentiating
  `jnp.linalg.norm` at 0 gives sqrt'(0) = inf times a zero cotangent = NaN)."""
  rng = np.random.default_rng(5)
  features = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32).at[5].set(0.0)
  labels = jnp.asarray([0, 0, 1, 1, 1, 0], jnp.int32)
  valid = jnp.asarray([True] * 5 + [False])
  memory = {"features": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
            "count": jnp.asarray([3, 3], jnp.int32)}
  grad = jax.grad(lambda x: mb.contrastive_loss(x, labels, valid, jnp.ones(6), memory)[0])(features)
  bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(grad)), axis=1))
  assert len(bad) == 0, f"non-finite gradient in rows {bad.tolist()}"
  assert not np.any(np.asarray(grad)[5])
