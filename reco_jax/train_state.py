"""The train state: step counter, student, optimiser state and the method's own state."""
from typing import Any, Callable

import flax
import jax
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a train step reads and writes, replicated over the mesh.

  `extra` is the method's PyTree (methods/base.py: `init_extra`): an EMA teacher, ring
  buffers, a second model and its optimiser state; `{}` for plain supervised training.
  `step` lives in the state (a replicated device scalar) so it is checkpointed with
  everything else; the per-step PRNG key is derived from it (`fold_in(key(seed), step)`),
  so a resumed run draws the same randomness as an uninterrupted one.
  """
  step: jax.Array  # i32[]
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  extra: PyTree
  apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
