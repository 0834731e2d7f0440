"""The train state: student, optional EMA teacher, optimiser state and step counter."""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a train step reads and writes, replicated over the mesh.

  The teacher fields are None for purely supervised methods. `step` lives in the state
  (a replicated device scalar) so it is checkpointed with everything else; the per-step
  PRNG key is derived from it (`fold_in(key(seed), step)`), so a resumed run draws the
  same randomness as an uninterrupted one.
  """
  step: jax.Array  # i32[]
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  ema_params: PyTree | None = None
  ema_batch_stats: PyTree | None = None
  apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

  def eval_variables(self, use_teacher: bool = True) -> dict:
    """Variables for inference: the teacher when there is one (and it is wanted)."""
    if use_teacher and self.ema_params is not None:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(key: jax.Array, model: flax.linen.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], with_teacher: bool) -> TrainState:
  """Initialises the student (and a teacher copy). Jit it with `out_shardings` to create
  the state directly on its sharding.

  Args:
    key: PRNG key for the parameter init.
    model: returns `(logits, rep)`.
    tx: optax transformation for the student parameters.
    image_shape: `(B, H, W, 3)` of a dummy batch used to trace the model.
    with_teacher: also create an EMA teacher, as *copies* of the student's buffers:
      aliased buffers plus state donation make XLA donate one buffer twice (segfault).
  """
  variables = model.init(key, jnp.zeros(image_shape, jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  ema_params = ema_batch_stats = None
  if with_teacher:
    ema_params = jax.tree.map(jnp.copy, params)
    ema_batch_stats = jax.tree.map(jnp.copy, batch_stats)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=ema_params,
                    ema_batch_stats=ema_batch_stats, apply_fn=model.apply, tx=tx)
