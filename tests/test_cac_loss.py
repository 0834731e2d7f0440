"""CAC's directional contrastive loss against the official code (golden/wave2, README §1.2-1.5).

The goldens are NCHW; the port is NHWC. Tolerances are the README's (§1.5): loss rtol 1e-5 /
atol 1e-6, gradients atol 1e-6, masks and indices exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.losses import cac

CASES = ["A_default", "B_no_threshold_subset", "C_same_class_negatives", "D_empty_selection",
         "E_multichunk_world4", "F_no_negatives_eps", "G_full_forward"]


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def loss_fn(g, numerics="official", chunk_size=1000, num_groups=1):
  """(feat1, feat2) -> (loss1, loss2, extras) on the recorded inputs of golden `g`."""
  i32 = lambda k: jnp.asarray(g[k], jnp.int32)

  def f(feat1, feat2):
    return cac.cac_loss(feat1, feat2, jnp.asarray(g["conf1"]), jnp.asarray(g["conf2"]),
                        i32("plabel1"), i32("plabel2"), i32("ul1"), i32("br1"), i32("ul2"),
                        jnp.asarray(g["flip"]), jnp.asarray(g["bank_feats"]), i32("bank_labels"),
                        jnp.ones(len(g["bank_labels"]), bool), temperature=float(g["temp"]),
                        pos_threshold=float(g["pos_thresh_value"]), numerics=numerics,
                        chunk_size=chunk_size, num_groups=num_groups)
  return f


@pytest.mark.parametrize("case", CASES)
def test_loss_masks_and_gradients_match_the_official_code(case, golden):
  g = golden(f"wave2/cac_loss_{case}.npz")
  f = loss_fn(g)
  feat1, feat2 = nhwc(g["feat1"]), nhwc(g["feat2"])
  loss1, loss2, extras = jax.jit(f)(feat1, feat2)
  np.testing.assert_allclose(float(loss1), g["loss1"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss2), g["loss2"], rtol=1e-5, atol=1e-6)
  # Selected positions: as many as the official masks select, inside the overlap.
  assert int(extras["mask1"].sum()) == int(g["pos_mask1"].sum())
  assert int(extras["mask2"].sum()) == int(g["pos_mask2"].sum())
  assert int(extras["overlap"].sum()) == len(g["overlap_flat1"])
  grads1 = jax.jit(jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1)))(feat1, feat2)
  grads2 = jax.jit(jax.grad(lambda a, b: f(a, b)[1], argnums=(0, 1)))(feat1, feat2)
  np.testing.assert_allclose(nchw(grads1[0]), g["grad_loss1_feat1"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(nchw(grads2[1]), g["grad_loss2_feat2"], rtol=0, atol=1e-6)
  # The target and the bank are detached: no cross gradient at all.
  assert float(jnp.max(jnp.abs(grads1[1]))) == 0.0
  assert float(jnp.max(jnp.abs(grads2[0]))) == 0.0


def test_empty_selection_gives_exact_zeros(golden):
  g = golden("wave2/cac_loss_D_empty_selection.npz")
  feat1, feat2 = nhwc(g["feat1"]), nhwc(g["feat2"])
  f = loss_fn(g)
  loss1, loss2, _ = f(feat1, feat2)
  assert float(loss1) == 0.0 and float(loss2) == 0.0
  grad = jax.grad(lambda a, b: sum(f(a, b)[:2]), argnums=(0, 1))(feat1, feat2)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in grad)


def test_no_negative_loss_is_the_epsilon_artefact_and_exact_numerics_drop_it(golden):
  """Case F: every negative is filtered; the official ε after the max-shift leaves ≈ 0.52,
  the exact log-sum-exp switch gives ≈ 0."""
  g = golden("wave2/cac_loss_F_no_negatives_eps.npz")
  feat1, feat2 = nhwc(g["feat1"]), nhwc(g["feat2"])
  official = loss_fn(g)(feat1, feat2)
  exact = loss_fn(g, numerics="exact")(feat1, feat2)
  assert float(official[0]) > 0.5
  assert abs(float(exact[0])) < 1e-6 and abs(float(exact[1])) < 1e-6


@pytest.mark.parametrize("case", ["A_default", "E_multichunk_world4"])
def test_exact_numerics_agree_with_the_official_where_epsilon_does_not_matter(case, golden):
  g = golden(f"wave2/cac_loss_{case}.npz")
  loss1, loss2, _ = loss_fn(g, numerics="exact")(nhwc(g["feat1"]), nhwc(g["feat2"]))
  np.testing.assert_allclose([float(loss1), float(loss2)], [g["ref64_loss1"], g["ref64_loss2"]],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [7, 8000, 20000])
def test_chunk_size_of_the_scan_does_not_change_the_result(chunk_size, golden):
  """Case E has 8192 rows: the official M comes from rows 0..7999 whatever the scan chunks."""
  g = golden("wave2/cac_loss_E_multichunk_world4.npz")
  loss1, loss2, _ = loss_fn(g, chunk_size=chunk_size)(nhwc(g["feat1"]), nhwc(g["feat2"]))
  np.testing.assert_allclose([float(loss1), float(loss2)], [g["loss1"], g["loss2"]],
                             rtol=1e-5, atol=1e-6)


def test_unknown_numerics_is_named(golden):
  g = golden("wave2/cac_loss_A_default.npz")
  with pytest.raises(ValueError, match=r"config cac.numerics='exactly' is invalid"):
    loss_fn(g, numerics="exactly")(nhwc(g["feat1"]), nhwc(g["feat2"]))


def test_masked_mean_is_per_group_then_averaged(golden):
  """Two 'devices' of one sample each: mean of the per-group masked means (official per-GPU
  normalisation + DDP gradient average), not the masked mean over the global batch."""
  g = golden("wave2/cac_loss_A_default.npz")
  feat1, feat2 = nhwc(g["feat1"]), nhwc(g["feat2"])
  grouped = loss_fn(g, num_groups=2)(feat1, feat2)
  per_sample = []
  for b in range(2):
    gb = dict(g)
    for k in ("conf1", "conf2", "plabel1", "plabel2", "ul1", "br1", "ul2", "flip"):
      gb[k] = g[k][b:b + 1]
    per_sample.append(loss_fn(gb)(feat1[b:b + 1], feat2[b:b + 1]))
  for v in (0, 1):
    np.testing.assert_allclose(float(grouped[v]), np.mean([float(p[v]) for p in per_sample]), rtol=1e-6)
  whole = loss_fn(g)(feat1, feat2)
  assert abs(float(whole[0]) - float(grouped[0])) > 1e-4  # the grouping does matter here
  with pytest.raises(ValueError, match=r"config cac.mean_groups=3 does not divide"):
    loss_fn(g, num_groups=3)(feat1, feat2)


def test_confidence_and_pseudo_label_from_logits(golden):
  g = golden("wave2/cac_loss_G_full_forward.npz")
  conf, label = cac.confidence_and_label(nhwc(g["logits1"]))
  np.testing.assert_allclose(np.asarray(conf), g["conf1"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(label), g["plabel1"])


def test_overlap_positions_match_the_official_slices(golden):
  """cac_overlap_positions: the view-1 mask and the shifted partner, mapped to network-output
  flat indices (flipped views mirrored), reproduce the official concatenation exactly."""
  g = golden("wave2/cac_overlap_positions.npz")
  h, w = (int(x) for x in g["feat_hw"])
  i32 = lambda k: jnp.asarray(g[k], jnp.int32)
  overlap, partner = cac.overlap_alignment(i32("ul1"), i32("br1"), i32("ul2"), h, w)
  overlap, partner = np.asarray(overlap), np.asarray(partner).reshape(-1, h, w)
  np.testing.assert_array_equal(overlap.sum(axis=(1, 2)), g["overlap_count"])
  flat1, flat2 = [], []
  for b in range(overlap.shape[0]):
    rows, cols = np.nonzero(overlap[b])  # row-major, as the official slice + flatten
    f1, f2 = g["flip"][b]
    flat1 += list(b * h * w + rows * w + (w - 1 - cols if f1 else cols))
    r2, c2 = np.divmod(partner[b][rows, cols], w)
    flat2 += list(b * h * w + r2 * w + (w - 1 - c2 if f2 else c2))
  np.testing.assert_array_equal(flat1, g["overlap_flat1"])
  np.testing.assert_array_equal(flat2, g["overlap_flat2"])


def test_ring_buffer_reproduces_the_official_bank_sequence(golden):
  """Four consecutive official calls (step_save 1): the ring buffer written before the loss,
  read oldest first with unfilled slots masked, gives the official banks bit for bit and the
  official losses and gradients."""
  g = golden("wave2/cac_bank_sequence.npz")
  slots = int(g["step_save"]) + 1
  rows, dim = g["step0_entry_feats"].shape
  bank = cac.init_bank(slots, rows, dim)
  for t in range(int(g["n_steps"])):
    k = lambda name: g[f"step{t}_{name}"]
    feat1, feat2 = nhwc(k("feat1")), nhwc(k("feat2"))
    conf1, label1 = cac.confidence_and_label(nhwc(k("logits1")))
    conf2, label2 = cac.confidence_and_label(nhwc(k("logits2")))
    # The entry: the official selected rows (a permutation), view 1 then view 2.
    d = feat1.shape[-1]
    entry = jnp.concatenate([feat1.reshape(-1, d)[k("selected_idx1")], feat2.reshape(-1, d)[k("selected_idx2")]])
    entry_labels = jnp.concatenate([label1.reshape(-1)[k("selected_idx1")], label2.reshape(-1)[k("selected_idx2")]])
    np.testing.assert_array_equal(np.asarray(entry), k("entry_feats"))
    np.testing.assert_array_equal(np.asarray(entry_labels), k("entry_labels"))
    bank = cac.bank_write(bank, jnp.int32(t), entry, entry_labels)
    feats, labels, valid = cac.bank_in_official_order(bank, jnp.int32(t))
    n = len(k("bank_labels"))
    assert int(valid.sum()) == n and bool(valid[:n].all())
    np.testing.assert_array_equal(np.asarray(feats[:n]), k("bank_feats"))
    np.testing.assert_array_equal(np.asarray(labels[:n]), k("bank_labels"))
    i32 = lambda name: jnp.asarray(k(name), jnp.int32)

    def f(a, b):
      return cac.cac_loss(a, b, conf1, conf2, label1, label2, i32("ul1"), i32("br1"), i32("ul2"),
                          jnp.asarray(k("flip")), feats, labels, valid, temperature=float(g["temp"]),
                          pos_threshold=float(g["pos_thresh_value"]), chunk_size=100)
    loss1, loss2, _ = f(feat1, feat2)
    np.testing.assert_allclose([float(loss1), float(loss2)], [k("loss1"), k("loss2")], rtol=1e-5, atol=1e-6)
    grad1 = jax.grad(lambda a: f(a, feat2)[0])(feat1)
    grad2 = jax.grad(lambda b: f(feat1, b)[1])(feat2)
    np.testing.assert_allclose(nchw(grad1), k("grad_loss1_feat1"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(nchw(grad2), k("grad_loss2_feat2"), rtol=0, atol=1e-6)
