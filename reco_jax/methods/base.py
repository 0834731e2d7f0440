"""The `Method` interface, with the defaults most methods keep.

A method bundles what makes it different from plain supervised training (scenic's
`BaseModel` idea): the input streams it reads, the state it keeps besides the student
(`TrainState.extra`), its loss, what it does after the optimiser update and which weights
are evaluated. Everything else (the step, the loop, checkpoints, evaluation, the input
pipeline) is generic and calls only these methods.

Methods are plain Python objects holding static hyper-parameters: they are closed over by
the jitted step, so nothing here may depend on traced values except through the arguments.
"""
from typing import Any, Callable

import flax.linen as nn
import jax

from input_pipeline import datasets

PyTree = Any


def check_choice(config: Any, key: str, known: tuple[str, ...]) -> str:
  """`config[key]` (`key` = "section.field", e.g. "cac.numerics") if it is one of `known`;
  else the one-line error every method's settings use for a named choice."""
  section, field = key.split(".")
  value = config[section][field]
  if value not in known:
    raise ValueError(f"config {key}={value!r} is invalid; expected one of {', '.join(known)}")
  return value


LABELED = "labeled"
# The unlabelled stream's conventional name (the methods that read unlabelled images call
# it so); the trainer's BatchNorm re-estimation prefers it (train.bn_stream).
UNLABELED = "unlabeled"
# The official labelled stream: the labelled subset with the full augmentation of build_data.py.
LABELED_STREAM = datasets.Stream(subset="labeled", augment=True)


class Method:
  """Supervised training on the labelled stream; subclasses override what differs.

  Attributes:
    description: one line saying what the method is (shown by `main.py --list`).
    model: the student, a flax module whose `apply(variables, images, train)` returns
      {'logits', 'rep', 'features', ...}. A method that trains extra heads (a projector, say)
      wraps the segmentation model it is given and passes the wrapper here: the trainer
      initialises, trains, checkpoints and evaluates `model`.
  """
  description = "base method"

  def __init__(self, model: nn.Module):
    self.model = model

  @property
  def apply_fn(self) -> Callable:
    return self.model.apply

  def streams(self) -> dict[str, datasets.Stream]:
    """The named input streams `loss` reads; their global batch sizes are the config fields
    `input.streams.<name>.batch_size`."""
    return {LABELED: LABELED_STREAM}

  def init_extra(self, key: jax.Array, variables: PyTree) -> PyTree:
    """The method's own state, stored in `TrainState.extra` (checkpointed, replicated).

    Args:
      key: PRNG key for anything the method initialises.
      variables: the freshly initialised student {'params', 'batch_stats'}. Return *copies*
        of its buffers, never the buffers themselves: the state is donated to the step.
    """
    del key, variables
    return {}

  def loss(self, params: PyTree, state, batch: dict, key: jax.Array
           ) -> tuple[jax.Array, tuple[dict, dict]]:
    """The differentiated objective.

    Args:
      params: the student parameters (the argument `value_and_grad` differentiates).
      state: the `TrainState` before the update (student batch_stats, `extra`, `step`).
      batch: {stream name: {'image': f32[B,H,W,3], 'label': i32[B,H,W]}}, sharded on `data`.
      key: the step's PRNG key, `fold_in(key(seed), step)`.
    Returns:
      (loss f32[], (metrics {name: f32[]} including 'loss', aux)): aux must hold
      'batch_stats', the student's new BatchNorm state, and may hold anything
      `after_update` needs.
    """
    raise NotImplementedError

  def after_update(self, state, aux: dict, key: jax.Array):
    """The state after the optimiser step: `state.step`, params, batch_stats and opt_state
    are already the new ones; update `state.extra` here (EMA teacher, banks, ...)."""
    del aux, key
    return state

  def after_update_and_metrics(self, state, aux: dict, key: jax.Array) -> tuple[Any, dict]:
    """`after_update` plus the scalar metrics {name: f32[]} it computes (a second model's
    loss, say), which the trainer merges into the step's metrics. The trainer calls this
    one; a method whose update has nothing to report only overrides `after_update`."""
    return self.after_update(state, aux, key), {}

  def eval_variables(self, state) -> PyTree:
    """{'params', 'batch_stats'} to evaluate (and keep as the best checkpoint). Must only
    select from `state` (it is also applied to abstract states)."""
    return {"params": state.params, "batch_stats": state.batch_stats}

  def load_eval_variables(self, state, variables: PyTree):
    """The state with `variables` ({'params', 'batch_stats'} shaped as `eval_variables`'s,
    e.g. the best checkpoint's) put where `eval_variables` reads them, so that
    `eval_variables(load_eval_variables(state, v))` is `v`. The trainer's best-checkpoint
    reload (`config.reload_best_patience_steps`) calls it eagerly; the step counter, the
    optimiser state and whatever else the method keeps continue. A method that overrides
    `eval_variables` overrides this too. Place each given buffer once (copy it for a second
    place): the state is donated to the step."""
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])

  # ---- helpers for subclasses --------------------------------------------------------------

  def apply_train(self, params: PyTree, batch_stats: PyTree, images: jax.Array
                  ) -> tuple[dict, PyTree]:
    """Student forward in train mode -> (outputs {'logits', 'rep', 'features'}, new batch_stats)."""
    outputs, updates = self.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    return outputs, updates["batch_stats"]
