"""LR schedule (golden poly_lr.npz) and the SGD update rule against a NumPy torch replica."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from reco_jax import optim


def test_poly_lr_matches_official_per_epoch(golden):
  g = golden("poly_lr.npz")
  for key, base, max_iters in (("lr_base0.0025_max200", 2.5e-3, 200), ("lr_base0.01_max50", 1e-2, 50)):
    ours = np.array([float(optim.poly_lr(base, max_iters, e)) for e in range(max_iters + 1)])
    # The schedule runs in float32 on device; the golden is float64.
    np.testing.assert_allclose(ours, g[key], rtol=1e-6)


def test_epoch_schedule_is_piecewise_constant_and_iteration_schedule_is_not():
  config = common.base_config().optim
  config.schedule_unit = "epoch"
  config.steps_per_epoch = 200
  epoch = optim.create_lr_schedule(config, 40_000)
  assert float(epoch(0)) == float(epoch(199))
  np.testing.assert_allclose(float(epoch(0)), 2.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(epoch(200)), 2.5e-3 * (1 - 1 / 200) ** 0.9, rtol=1e-6)
  config.schedule_unit = "iteration"
  it = optim.create_lr_schedule(config, 40_000)
  np.testing.assert_allclose(float(it(199)), 2.5e-3 * (1 - 199 / 40_000) ** 0.9, rtol=1e-6)


def test_sgd_matches_torch_nesterov_with_l2_decay():
  """torch.optim.SGD(nesterov=True, weight_decay): g += wd*p; b = m*b + g; p -= lr*(g + m*b)."""
  config = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05))
  tx = optim.create_optimizer(config, lambda step: 0.1)
  rng = np.random.RandomState(0)
  p = rng.randn(5).astype(np.float32)
  params, state = jnp.asarray(p), tx.init(jnp.asarray(p))
  buf = np.zeros_like(p)
  for _ in range(4):
    grad = rng.randn(5).astype(np.float32)
    updates, state = tx.update(jnp.asarray(grad), state, params)
    params = params + updates
    g = grad + 0.05 * p
    buf = 0.9 * buf + g
    p = p - 0.1 * (g + 0.9 * buf)
  np.testing.assert_allclose(params, p, rtol=1e-5, atol=1e-6)
