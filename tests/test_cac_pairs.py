"""CAC crop-pair geometry against the official pair datasets (golden/wave2 README §1.1)."""
import random

import numpy as np
import pytest

from input_pipeline import crop_pairs

PREFIXES = ["voc", "city", "voc_tight", "voc_small"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_geometry_reproduces_every_recorded_draw(prefix, golden):
  g = golden("wave2/cac_crop_pairs.npz")
  k = lambda name: g[f"{prefix}_{name}"]
  base, crop, stride = (int(x) for x in k("config"))
  variant = "city" if k("dataset_class") == "PairCityDataset" else "voc"
  for i, seed in enumerate(k("seed")):
    geo = crop_pairs.pair_geometry(random.Random(int(seed)), tuple(int(x) for x in k("orig_hw")[i]),
                                   base_size=base, crop=crop, stride=stride,
                                   iou_bound=tuple(k("iou_bound")), variant=variant)
    assert geo.longside == k("longside")[i]
    assert geo.resized_hw == tuple(k("resized_hw")[i])
    assert geo.pad_hw == tuple(k("pad_hw")[i])
    assert geo.crop1_yx == tuple(k("crop1_yx")[i]) and geo.crop2_yx == tuple(k("crop2_yx")[i])
    assert geo.n_tries == k("n_tries")[i] and geo.fallback == k("fallback")[i]
    assert geo.iou == pytest.approx(float(k("iou_unclipped")[i]), abs=1e-12)
    for name in ("ul1", "br1", "ul2", "br2"):
      assert getattr(geo, name) == tuple(k(name)[i]), (prefix, i, name)
    assert geo.flip == tuple(bool(x) for x in k("flip")[i])
    slices = crop_pairs.feature_slices(geo, stride)
    for v in ("1", "2"):
      assert slices["rows" + v] == tuple(k("feat_rows" + v)[i])
      assert slices["cols" + v] == tuple(k("feat_cols" + v)[i])


def test_fallback_and_padding_cases_are_exercised(golden):
  g = golden("wave2/cac_crop_pairs.npz")
  assert g["voc_tight_fallback"].sum() == 6
  assert (g["voc_small_pad_hw"].sum(axis=1) > 0).sum() == 19


def test_both_crops_hold_the_same_pixels_in_the_overlap_box():
  rng = random.Random(3)
  image = np.arange(50 * 70 * 3, dtype=np.float32).reshape(50, 70, 3)
  label = np.arange(50 * 70, dtype=np.int32).reshape(50, 70) % 200
  for _ in range(20):
    geo = crop_pairs.pair_geometry(rng, (50, 70), base_size=64, crop=64)
    h, w = geo.resized_hw
    img = np.resize(image, (h, w, 3))  # any content of the resized size
    lab = np.resize(label, (h, w))
    i1, l1, i2, l2 = crop_pairs.crop_pair(img, lab, geo, 64, np.zeros(3, np.float32), 255)
    (y0, x0), (y1, x1) = geo.ul1, geo.br1
    (v0, u0), (v1, u1) = geo.ul2, geo.br2
    np.testing.assert_array_equal(i1[y0:y1, x0:x1], i2[v0:v1, u0:u1])
    np.testing.assert_array_equal(l1[y0:y1, x0:x1], l2[v0:v1, u0:u1])


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match=r"pair variant 'voc2' is invalid"):
    crop_pairs.pair_geometry(random.Random(0), (10, 10), base_size=8, crop=8, variant="voc2")


# ------------------------------------------------------------------------------------------
# The `unlabeled_pair` stream.
# ------------------------------------------------------------------------------------------


def _pair_iterator(start_step=0, photometric=True, batch=4):
  from configs import synthetic
  from input_pipeline import datasets
  config = synthetic.get_config("method=supervised,variant=smoke")
  config.input.num_threads = 1
  settings = crop_pairs.PairSettings(
      crop=32, base_size=32, jitter_prob=0.8 if photometric else 0.0,
      blur_prob=0.5 if photometric else 0.0, grayscale_prob=0.2 if photometric else 0.0)
  stream = datasets.Stream(subset="unlabeled", augment=False, kind="pair", pair=settings)
  return datasets.create_train_iterator(config.input, stream_name="unlabeled_pair", stream=stream,
                                        seed=0, local_batch_size=batch, process_index=0,
                                        process_count=1, start_step=start_step)


def test_pair_stream_delivers_aligned_views_and_resumes_exactly():
  it = _pair_iterator(photometric=False)
  batches = [next(it) for _ in range(3)]
  b = batches[0]
  assert b["image1"].shape == b["image2"].shape == (4, 32, 32, 3)
  assert b["label1"].shape == (4, 32, 32) and b["flip"].shape == (4, 2) and b["ul1"].shape == (4, 2)
  # Without photometric augmentation the overlap boxes (unflipped) hold the same pixels.
  for batch in batches:
    for i in range(4):
      views = []
      for v in ("1", "2"):
        img, lab = batch["image" + v][i], batch["label" + v][i]
        if batch["flip"][i, int(v) - 1]:
          img, lab = img[:, ::-1], lab[:, ::-1]
        (y0, x0), (y1, x1) = batch["ul" + v][i], batch["br" + v][i]
        views.append((img[y0:y1, x0:x1], lab[y0:y1, x0:x1]))
      np.testing.assert_array_equal(views[0][1], views[1][1])
      np.testing.assert_allclose(views[0][0], views[1][0], atol=1e-6)
      # Box offsets between the views are multiples of the stride (exact feature mapping).
      assert ((np.asarray(batch["ul2"][i]) - np.asarray(batch["ul1"][i])) % 8 == 0).all()
  resumed = next(_pair_iterator(start_step=2, photometric=False))
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], batches[2][k])


def test_pair_stream_augments_each_view_independently():
  b = next(_pair_iterator(photometric=True, batch=8))
  again = next(_pair_iterator(photometric=True, batch=8))
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])  # deterministic from seed and position
  assert b["flip"].any() and not b["flip"].all()
