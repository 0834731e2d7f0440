"""reco_jax.resampling against the PyTorch goldens (`resampling.npz`, golden README §7)."""
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import resampling

_NEAREST_CASES = [(33, 9), (321, 81), (512, 128), (513, 129), (41, 321)]


@pytest.mark.parametrize("in_size,out_size", _NEAREST_CASES)
def test_torch_nearest_indices_match_golden_exactly(golden, in_size, out_size):
  expected = golden("resampling.npz")[f"nearest_src_index_{in_size}_to_{out_size}"]
  np.testing.assert_array_equal(resampling.torch_nearest_indices(in_size, out_size), expected)


def test_resize_nearest_torch_gathers_the_golden_indices(golden):
  rows = golden("resampling.npz")["nearest_src_index_33_to_9"]
  cols = golden("resampling.npz")["nearest_src_index_41_to_321"]
  x = np.arange(2 * 33 * 41 * 3).reshape(2, 33, 41, 3)
  out = resampling.resize_nearest_torch(jnp.asarray(x), (9, 321))
  np.testing.assert_array_equal(np.asarray(out), x[:, rows][:, :, cols])


@pytest.mark.parametrize("in_key,out_key", [("bilinear_in_9", "bilinear_ac_true_9_to_33"),
                                            ("bilinear_in_21", "bilinear_ac_true_21_to_81")])
def test_bilinear_align_corners_matches_golden(golden, in_key, out_key):
  g = golden("resampling.npz")
  x = np.transpose(g[in_key], (0, 2, 3, 1))  # NCHW -> NHWC
  expected = np.transpose(g[out_key], (0, 2, 3, 1))
  out = resampling.resize_bilinear_align_corners(jnp.asarray(x), expected.shape[1:3])
  assert out.shape == expected.shape
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)


def test_bilinear_align_corners_keeps_corners_and_identity():
  x = np.random.RandomState(0).standard_normal((1, 5, 7, 2)).astype(np.float32)
  out = np.asarray(resampling.resize_bilinear_align_corners(jnp.asarray(x), (9, 13)))
  # align_corners=True maps corner pixel centres onto each other exactly.
  np.testing.assert_allclose(out[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                             x[:, [0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-6)
  same = resampling.resize_bilinear_align_corners(jnp.asarray(x), (5, 7))
  np.testing.assert_array_equal(np.asarray(same), x)
