"""The memory-bank method (reco_jax/methods/memory_bank.py): its blocks through the model
wrapper against the official goldens, the ClassMix rule, the batch augmentation, the phase
gates of the step and the configs. The heads, memory update and loss on their own:
test_memory_bank_goldens.py; the 8-device / resume contract: test_methods.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_segmenter, with_overrides
from configs import camvid, cityscapes, synthetic, voc
from reco_jax import augment, methods
from reco_jax.losses import memory_bank as mb
from reco_jax.methods import memory_bank as method_lib
from test_memory_bank_goldens import (C, head_variables, memory_from_golden, nhwc_rows,
                                      selector_variables)


def golden_model_variables(weights) -> dict:
  """MemoryBankModel variables holding the official heads (no segmenter: the blocks never
  call it)."""
  parts = {"projection_head": head_variables(weights, "projection_head"),
           "prediction_head": head_variables(weights, "prediction_head"),
           "selectors": selector_variables(weights, "contrastive_class_selector_"),
           "memory_selectors": selector_variables(weights, "contrastive_class_selector_memory")}
  return {"params": {k: v["params"] for k, v in parts.items()},
          "batch_stats": {k: v["batch_stats"] for k, v in parts.items()}}


MODEL = method_lib.MemoryBankModel(segmenter=toy_segmenter(C), num_classes=C, dim=256)


@pytest.fixture(scope="module")
def weights(golden):
  return golden("wave2/alonso_weights.npz")


def test_memory_candidates_and_teacher_update_reproduce_the_official_memory_block(weights, golden):
  """trainSSL.py's memory block from the teacher's logits and features (NCHW goldens): the
  align_corners up-sampling, the nearest down-sampling of GT / argmax / p_max, the correct &
  p > 0.95 mask, then the teacher's projection + selectors + FIFO insert, three steps."""
  g = golden("wave2/alonso_memory_update.npz")
  e, capacity = int(g["elements_per_class"]), int(g["memory_per_class"])
  teacher = golden_model_variables(weights)
  memory = mb.init_memory(C, capacity, 256)
  for t in range(3):
    p = f"step{t}_"
    logits = jnp.asarray(np.transpose(g[p + "teacher_logits"], (0, 2, 3, 1)))
    labels = np.asarray(g[p + "labels_aug"])
    labels = jnp.asarray(np.where(labels == int(g["ignore_label"]), -1, labels), jnp.int32)
    labels_down, candidates = method_lib.memory_candidates(logits, labels, (9, 9),
                                                           float(g["confidence_threshold"]))
    expected_down = np.asarray(g[p + "labels_down"])
    np.testing.assert_array_equal(np.asarray(labels_down),
                                  np.where(expected_down == 255, -1, expected_down))
    np.testing.assert_array_equal(np.asarray(candidates), g[p + "mask_correct"])
    contrast = jnp.asarray(np.transpose(g[p + "teacher_features"], (0, 2, 3, 1)))
    memory, stats = method_lib.teacher_memory_update(MODEL, teacher, memory, contrast, labels_down,
                                                     candidates, elements_per_class=e,
                                                     ranking="ascending")
    teacher = {"params": teacher["params"], "batch_stats": stats}
    for c in range(C):
      expected = g[f"{p}memory_after_class{c}"]
      assert int(memory["count"][c]) == len(expected), (t, c)
      np.testing.assert_allclose(np.asarray(memory["features"][c])[:len(expected)], expected,
                                 rtol=0, atol=1e-5, err_msg=f"step {t} class {c}")
    proj_stats = stats["projection_head"]["bn"]
    np.testing.assert_allclose(proj_stats["mean"], g[p + "after_projection_head.1.running_mean"],
                               rtol=1e-5, atol=1e-6)
    for c in range(C):
      np.testing.assert_allclose(stats["selectors"]["bn_var"][c],
                                 g[f"{p}after_contrastive_class_selector_{c}.1.running_var"],
                                 rtol=1e-5, atol=1e-6)


def test_contrastive_term_reproduces_the_official_labelled_block(weights, golden):
  """trainSSL.py lines 639-658 through the model wrapper: masked heads, selector weights on the
  detached predictions, the loss, its gradient w.r.t. the features, the heads' statistics."""
  g = golden("wave2/alonso_e2e_labelled_block.npz")
  variables = golden_model_variables(weights)
  contrast = jnp.asarray(np.transpose(g["labeled_features"], (0, 2, 3, 1)))
  labels_np = np.asarray(g["labels_down"]).astype(np.int64)
  labels = jnp.asarray(np.where(labels_np == 255, -1, labels_np), jnp.int32)
  memory = memory_from_golden(g)

  def loss_fn(x):
    return method_lib.contrastive_term(MODEL, variables["params"], variables["batch_stats"], x,
                                       labels, labels >= 0, memory, "official")

  (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(contrast)
  np.testing.assert_allclose(float(loss), g["loss_contr_labeled"], rtol=1e-5)
  grad_nchw = np.transpose(np.asarray(grad), (0, 3, 1, 2))
  max_g = float(np.abs(g["grad_labeled_features"]).max())
  np.testing.assert_allclose(grad_nchw, g["grad_labeled_features"], rtol=0, atol=1e-4 * max_g)
  for head in ("projection_head", "prediction_head"):
    np.testing.assert_allclose(stats[head]["bn"]["var"], g[f"after_{head}.1.running_var"],
                               rtol=1e-5, atol=1e-6)
  # The paper's memory weighting is a different loss on the same inputs.
  paper, _ = method_lib.contrastive_term(MODEL, variables["params"], variables["batch_stats"],
                                         contrast, labels, labels >= 0, memory, "paper")
  assert abs(float(paper) - float(loss)) > 1e-6  # far beyond float32 rounding of ~1
  assert nhwc_rows(g["labeled_features"]).shape == (162, 256)


def np_alonso_kept_count(labels: np.ndarray, drop_background: bool) -> tuple[set, int]:
  """augment_samples' class list after its removals, and how many it keeps."""
  classes = set(np.unique(labels).tolist())
  if -1 in classes and len(classes) > 1:
    classes.discard(-1)
  if drop_background and 0 in classes and len(classes) > 1:
    classes.discard(0)
  n = len(classes)
  return classes, int((n - n % 2) / 2 + 1)


@pytest.mark.parametrize("drop_background", [False, True])
def test_alonso_classmix_mask_keeps_the_official_number_of_classes(drop_background):
  rng = np.random.default_rng(0)
  for trial in range(40):
    present = rng.choice(np.arange(-1, 6), size=rng.integers(1, 7), replace=False)
    labels = rng.choice(present, size=(12, 12))
    mask = np.asarray(augment.classmix_mask_alonso(jax.random.PRNGKey(trial), jnp.asarray(labels), 6,
                                                   drop_background))
    classes, count = np_alonso_kept_count(labels, drop_background)
    kept = set(np.unique(labels[mask > 0]).tolist())
    assert kept <= classes and len(kept) == count, (trial, present, kept, classes)
    # A kept class is pasted whole.
    assert all(np.all(mask[labels == k] == 1) for k in kept)


def _batch(rng, b=2, h=12, w=16):
  return (jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32),
          jnp.asarray(rng.integers(-1, 4, (b, h, w)), jnp.int32),
          jnp.asarray(rng.uniform(size=(b, h, w)), jnp.float32))


def _recipe(**kw):
  base = dict(classmix_prob=0.0, scale_prob=0.0, scale_range=(0.75, 1.75), flip_prob=0.0,
              jitter_prob=0.0, jitter_strength=0.25, blur_prob=0.0, blur_sigma=(0.1, 1.5))
  return method_lib.AugmentSettings(**{**base, **kw})


@pytest.mark.slow  # eager photometric ops: ~30 s on CI's two cores
def test_augment_batch_stages_act_on_the_whole_batch():
  """Probability 0: identity. Flip with probability 1 flips every image, label and p (one
  decision per batch, as the official); jitter and blur change pixels only; ClassMix with
  allow_mix False is off."""
  rng = np.random.default_rng(1)
  images, labels, probs = _batch(rng)
  kw = dict(num_classes=4, crop_size=(12, 16))
  key = jax.random.PRNGKey(0)
  same = method_lib.augment_batch(key, images, labels, probs, _recipe(), **kw)
  for got, want in zip(same, (images, labels, probs)):
    np.testing.assert_array_equal(got, want)
  flipped = method_lib.augment_batch(key, images, labels, probs, _recipe(flip_prob=1.0), **kw)
  for got, want in zip(flipped, (images, labels, probs)):
    np.testing.assert_array_equal(got, np.asarray(want)[:, :, ::-1])
  photo = method_lib.augment_batch(key, images, labels, probs,
                                   _recipe(jitter_prob=1.0, blur_prob=1.0), **kw)
  assert not np.allclose(photo[0], images)
  np.testing.assert_array_equal(photo[1], labels)
  no_mix = method_lib.augment_batch(key, images, labels, probs, _recipe(classmix_prob=1.0),
                                    allow_mix=False, **kw)
  np.testing.assert_array_equal(no_mix[1], labels)
  mixed = method_lib.augment_batch(key, images, labels, probs, _recipe(classmix_prob=1.0), **kw)
  assert not np.array_equal(mixed[1], labels)
  scaled = method_lib.augment_batch(key, images, labels, probs,
                                    _recipe(scale_prob=1.0, scale_range=(0.5, 0.5)), **kw)
  # Zoom-out pads the label with ignore and p with 0.
  assert np.all(np.asarray(scaled[1])[:, 6:] == -1) and np.all(np.asarray(scaled[2])[:, 6:] == 0)


def _gated_method(**overrides):
  config = synthetic.get_config("method=memory_bank,variant=smoke")
  with_overrides(config, {"input.crop_size": (16, 16), "memory_bank.feature_source": "rep",
                          "memory_bank.weak.jitter_prob": 0.0, "memory_bank.strong.jitter_prob": 0.0,
                          "memory_bank.strong.blur_prob": 0.0, **overrides})
  model = toy_segmenter(8)
  return config, methods.get_method(config, num_classes=8, model=model)


def test_phases_start_at_their_steps():
  """Before memory_start_step the memory stays empty and the teacher's head statistics do not
  move; before contrastive_start_step the contrastive terms are computed but neither enter
  the loss nor move the student's head statistics; from then on both do."""
  config, method = _gated_method(**{"memory_bank.memory_start_step": 1,
                                    "memory_bank.contrastive_start_step": 2})
  rng = np.random.RandomState(0)
  variables = method.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  extra = method.init_extra(jax.random.PRNGKey(1), variables)

  class State:  # the fields `loss` reads
    def __init__(self, step, extra):
      self.step, self.extra, self.batch_stats = jnp.int32(step), extra, variables["batch_stats"]

  batch = {name: {"image": jnp.asarray(rng.randn(8, 16, 16, 3), jnp.float32),
                  "label": jnp.asarray(rng.randint(0, 8, (8, 16, 16)), jnp.int32)}
           for name in method.streams()}
  loss_fn = jax.jit(lambda step, extra: method.loss(variables["params"], State(step, extra), batch,
                                                    jax.random.PRNGKey(2)))
  heads = lambda stats: (stats["projection_head"], stats["selectors"])
  for step in (1, 2, 3):
    _, (metrics, aux) = loss_fn(step, extra)
    memory_on, contrast_on = step > 1, step > 2
    assert (int(jnp.sum(aux["memory"]["count"])) > 0) == memory_on
    teacher_moved = not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(heads(aux["teacher_batch_stats"])), jax.tree.leaves(heads(extra["teacher"]["batch_stats"]))))
    assert teacher_moved == memory_on
    student_moved = not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(heads(aux["batch_stats"])), jax.tree.leaves(heads(variables["batch_stats"]))))
    assert student_moved == contrast_on
    base_unsup = metrics["pseudo_label_loss"] + 0.01 * metrics["entropy_loss"]
    extra_terms = 0.1 * (metrics["contrastive_labeled"] + metrics["contrastive_unlabeled"])
    np.testing.assert_allclose(metrics["unsup_loss"], base_unsup + (extra_terms if contrast_on else 0),
                               rtol=1e-5)
    if contrast_on:
      assert metrics["contrastive_labeled"] > 0
    extra = {**extra, "memory": aux["memory"]}


def test_alonso_ema_decay_matches_the_formula():
  t = np.arange(0, 5000, 7)
  want = np.minimum(1 - 1 / (10 * t + 1), 1 - 0.005 * (np.cos(np.pi * t / 5000) + 1) / 2)
  np.testing.assert_allclose(mb.alonso_ema_decay(jnp.asarray(t), 5000), want, rtol=0, atol=1e-6)


def test_configs_follow_the_official_families():
  v = voc.get_config("method=memory_bank")
  assert (v.model.name, v.input.streams.labeled.batch_size, v.input.streams.unlabeled.batch_size,
          v.optim.lr, v.num_train_steps) == ("deeplabv2", 14, 7, 2e-4, 150_000)
  assert v.memory_bank.drop_background and method_lib.feature_source(v) == "layer4"
  c = cityscapes.get_config("method=memory_bank")
  assert (c.input.streams.labeled.batch_size, c.input.streams.unlabeled.batch_size) == (5, 2)
  cpu = camvid.get_config("method=memory_bank,variant=cpu")
  cpu.input.num_labeled = 20
  assert method_lib.feature_source(cpu) == "decoder"
  # Cityscapes rule: max(1, round(256 / 20)) = 13 per image, times the labelled batch of 8.
  assert method_lib.elements_per_class(cpu, 11) == 13 * 8
  assert cpu.input.streams.unlabeled.batch_size == 4


def test_bad_settings_fail_with_one_line():
  config = camvid.get_config("method=memory_bank")
  with pytest.raises(ValueError, match="memory_bank.elements_per_class=0 derives E from input.num_labeled"):
    method_lib.elements_per_class(config, 11)
  config.input.num_labeled = 20
  config.memory_bank.ranking = "highest"
  with pytest.raises(ValueError, match=r"memory_bank.ranking='highest' is invalid"):
    method_lib.settings_from(config, 11)


def test_own_class_selectors_equal_the_stacked_evaluation():
  """`ClassSelectors.own_class` (a rematerialised scan over classes, N·hidden memory, what the
  method uses) gives each row's own-class logit, BatchNorm statistics and parameter gradients
  of the all-classes evaluation (C·N·hidden memory) that the golden tests check."""
  rng = np.random.default_rng(4)
  sel = mb.ClassSelectors(num_classes=5, hidden=16)
  x = jnp.asarray(rng.normal(size=(40, 16)), jnp.float32)
  classes = jnp.asarray(rng.integers(0, 5, 40), jnp.int32)
  mask = jnp.asarray(rng.uniform(size=40) > 0.3).at[classes == 4].set(False)  # class 4: no rows
  masks = mb.class_masks(classes, mask, 5)
  v = sel.init(jax.random.key(0), x, masks, False)
  stats = jax.tree.map(lambda a: a + 0.1, v["batch_stats"])

  def stacked(params):
    out, new = sel.apply({"params": params, "batch_stats": stats}, x, masks, True, mutable=["batch_stats"])
    return jnp.sum(jnp.where(mask, mb.own_class_scores(out, classes), 0.0) ** 2), (out, new)

  def own(params):
    out, new = sel.apply({"params": params, "batch_stats": stats}, x, classes, mask, True,
                         method=mb.ClassSelectors.own_class, mutable=["batch_stats"])
    return jnp.sum(jnp.where(mask, out, 0.0) ** 2), (out, new)

  (_, (out_a, new_a)), grad_a = jax.value_and_grad(stacked, has_aux=True)(v["params"])
  (_, (out_b, new_b)), grad_b = jax.value_and_grad(own, has_aux=True)(v["params"])
  np.testing.assert_allclose(np.where(mask, out_b, 0), np.where(mask, mb.own_class_scores(out_a, classes), 0),
                             rtol=0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(new_b["batch_stats"]["bn_mean"][4], stats["bn_mean"][4])
  for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a mean-teacher step with the term compiles for a minute on CI's two cores
def test_memory_bank_as_an_auxiliary_term_of_the_mean_teacher(single_device_mesh):
  """`classmix_reco_memory_bank`: the mean teacher's model gains the heads, the memory lives in
  extra['aux'] and fills from the teacher's view of the labelled batch, the weighted terms join
  the loss, and a method without a teacher refuses the term in one line."""
  from reco_jax import parallel, train
  config = synthetic.get_config("method=classmix_reco_memory_bank,variant=smoke")
  with_overrides(config, {"input.crop_size": (16, 16), "memory_bank.feature_source": "rep",
                          "mean_teacher.quantize": False, "memory_bank.contrastive_start_step": 0})
  method = methods.get_method(config, num_classes=8, model=toy_segmenter(8))
  assert isinstance(method.model, method_lib.MemoryBankModel)
  state = train.create_state(config, method, single_device_mesh)
  assert int(jnp.sum(state.extra["aux"]["memory_bank"]["count"])) == 0
  step = train.make_train_step(single_device_mesh, method, config.seed)
  rng = np.random.RandomState(0)
  for _ in range(2):
    batch = {name: {"image": rng.randn(8, 16, 16, 3).astype(np.float32),
                    "label": rng.randint(0, 8, (8, 16, 16)).astype(np.int32)}
             for name in method.streams()}
    state, metrics = step(state, parallel.to_global_batch(batch, single_device_mesh))
  metrics = jax.device_get(metrics)
  assert int(jnp.sum(state.extra["aux"]["memory_bank"]["count"])) > 0
  assert metrics["memory_bank_contrastive_labeled"] > 0 and metrics["stateful_aux_loss"] > 0
  np.testing.assert_allclose(metrics["loss"], metrics["sup_loss"] + metrics["unsup_loss"]
                             + metrics["reco_loss"] + metrics["stateful_aux_loss"], rtol=1e-6)
  config = synthetic.get_config("method=supervised,variant=smoke")
  config.aux_losses = ("memory_bank",)
  with pytest.raises(ValueError, match="'memory_bank' needs a teacher"):
    methods.get_method(config, num_classes=8, model=toy_segmenter(8))
