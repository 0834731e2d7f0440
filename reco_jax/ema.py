"""Mean-teacher EMA of the student parameters (module_list.py: EMA; reco_spec §5).

The official update, run once after every optimiser step, is

    decay = min(1 - 1/(t+1), alpha)          # Python doubles; t = number of previous updates
    ema   = decay * ema + (1 - decay) * param  # float32 tensors, both scalars rounded to f32

so the teacher equals the student after the first update and is the uniform average of
the student iterates for the first `1/(1-alpha)` updates. Only *parameters* are averaged;
BatchNorm buffers are not (the caller passes the params tree only).

Bit-exactness: `decay` and `1 - decay` are rounded to float32 *separately* from doubles.
`optax.incremental_update` forms `1 - step_size` in float32 instead, which differs by one
ulp for some t (t = 2, 10, 30 with alpha 0.99), so it is not used. With x64 disabled the
doubles cannot be formed on device, so both scalars are tabulated on the host for every
t before the cap is reached (100 entries for alpha 0.99) and gathered by `t`.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# A cap this close to 1 would need a table of more than this many entries.
_MAX_TABLE_SIZE = 10_000_000


@functools.lru_cache(maxsize=None)
def _decay_table(decay_max: float) -> tuple[np.ndarray, np.ndarray]:
  """f32 `decay` and `1 - decay` for t = 0..t_cap, rounded from doubles as the official.

  Entry t_cap (the first t whose warm-up decay reaches `decay_max`) holds the capped value,
  which every later t reuses.
  """
  if not 0.0 <= decay_max < 1.0:
    raise ValueError(f"ema decay_max must be in [0, 1), got {decay_max!r}")
  # First t with 1 - 1/(t+1) >= decay_max, found in doubles as the official `min` sees it.
  t_cap = max(int(np.ceil(1.0 / (1.0 - decay_max))) - 3, 0)
  if t_cap > _MAX_TABLE_SIZE:
    raise ValueError(f"ema decay_max={decay_max!r} is too close to 1 (table of {t_cap} entries)")
  while 1.0 - 1.0 / (t_cap + 1) < decay_max:
    t_cap += 1
  decay = [min(1.0 - 1.0 / (t + 1), decay_max) for t in range(t_cap + 1)]
  decay_f32 = np.asarray(decay, np.float64).astype(np.float32)
  one_minus_f32 = np.asarray([1.0 - d for d in decay], np.float64).astype(np.float32)
  return decay_f32, one_minus_f32


def _decay_pair(num_updates: jax.Array, decay_max: float) -> tuple[jax.Array, jax.Array]:
  decay, one_minus = _decay_table(float(decay_max))
  index = jnp.clip(jnp.asarray(num_updates, jnp.int32), 0, decay.shape[0] - 1)
  return jnp.asarray(decay)[index], jnp.asarray(one_minus)[index]


def ema_decay(num_updates: jax.Array, decay_max: float = 0.99) -> jax.Array:
  """`f32[]` decay `min(1 - 1/(t+1), decay_max)` for `t = num_updates` (`i32[]`, may be traced).

  `decay_max` must be a Python float (it selects a host-side table), in [0, 1).
  """
  return _decay_pair(num_updates, decay_max)[0]


def ema_update(teacher_params: PyTree, student_params: PyTree, num_updates: jax.Array,
               decay_max: float = 0.99) -> PyTree:
  """Returns the new teacher `f32(decay)*teacher + f32(1-decay)*student`, leaf by leaf.

  Args:
    teacher_params: pytree of float arrays (the EMA/teacher parameters).
    student_params: pytree with the same structure (the student after its optimiser step).
    num_updates: `i32[]`, number of EMA updates done before this one (0 at the first call,
      which makes the teacher a copy of the student).
    decay_max: the cap `alpha` (0.99 in the official code); a static Python float.
  Returns:
    A pytree of fresh arrays (never the student's buffers, even at t = 0, so the result can
    be donated together with the student).
  """
  decay, one_minus = _decay_pair(num_updates, decay_max)
  # XLA fuses the two products and the sum into one loop, and LLVM then contracts
  # `d*teacher + om*student` into an FMA (one rounding instead of three), which is off by an
  # ulp from the official result for ~5% of the golden elements. Adding a zero that the
  # compiler cannot prove to be zero to each product gives any contraction only that zero
  # to absorb: fma(d, x, 0) == round(d*x), so the products are rounded as in PyTorch.
  zero = jnp.minimum(decay, 0.0)  # decay >= 0

  def update(teacher: jax.Array, student: jax.Array) -> jax.Array:
    d = decay.astype(teacher.dtype)
    om = one_minus.astype(teacher.dtype)
    z = zero.astype(teacher.dtype)
    return (d * teacher + z) + (om * student + z)

  return jax.tree.map(update, teacher_params, student_params)
