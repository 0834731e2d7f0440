"""Auxiliary pixel-contrastive terms, pluggable by name (`config.aux_losses`).

Any method that has per-pixel representations, labels and a validity mask adds
`sum_i weight_i * term_i` to its loss by listing the terms' names in `config.aux_losses`:
"mean teacher + ClassMix + X" is then a config, not a new method. Each term reads its
hyper-parameters from `config.<name>` (its `weight` among them).

A term is `term(key, rep, logits, labels, valid) -> (loss f32[], metrics {name: f32[]})` with
rep `f[B,h,w,D]`, logits `f[B,h,w,C]` (the student's, same resolution), labels `i32[B,H,W]`
and valid `bool[B,H,W]` at the label resolution.

A *stateful* term (it has `init_state`) also keeps state in `TrainState.extra['aux'][name]`, may
add heads to the model (`wrap_model`) and reads the whole step (`StepContext`: the student's
and the teacher's variables, the labelled batch, both passes' outputs); the mean-teacher
methods call it through `AuxLosses.apply_stateful`. The class-wise memory bank
(methods/memory_bank.py: `AuxTerm`) is one.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from reco_jax.losses import reco as reco_lib


@dataclasses.dataclass(frozen=True)
class ReCoTerm:
  """ReCo (module_list.py: compute_reco_loss) on labels/validity prepared at the rep size."""
  weight: float
  temperature: float
  num_queries: int
  num_negatives: int
  strong_threshold: float
  query_sampling: str
  key_sampling: str
  easy_queries: bool

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "ReCoTerm":
    return cls(weight=float(c.weight), temperature=float(c.temperature),
               num_queries=int(c.num_queries), num_negatives=int(c.num_negatives),
               strong_threshold=float(c.strong_threshold), query_sampling=c.query_sampling,
               key_sampling=c.key_sampling, easy_queries=bool(c.easy_queries))

  def __call__(self, key: jax.Array, rep: jax.Array, logits: jax.Array, labels: jax.Array,
               valid: jax.Array) -> tuple[jax.Array, dict]:
    labels_low, valid_low, probs_low = reco_lib.prepare_reco_inputs(labels, valid, logits)
    query_pix, negatives, query_classes = reco_lib.sample_reco_draws(
        key, rep, labels_low, valid_low, probs_low, strong_threshold=self.strong_threshold,
        temperature=self.temperature, num_queries=self.num_queries,
        num_negatives=self.num_negatives, query_sampling=self.query_sampling,
        key_sampling=self.key_sampling, easy_queries=self.easy_queries)
    loss = reco_lib.reco_loss_from_draws(rep, labels_low, valid_low, query_pix, negatives,
                                         query_classes, temperature=self.temperature)
    present = jnp.zeros((logits.shape[-1],), bool).at[jnp.where(valid_low, labels_low, 0)].max(valid_low)
    num_query_classes = jnp.where(jnp.sum(present) > 1, jnp.sum(query_classes & present), 0)
    return loss, {"reco_loss": loss, "reco_query_classes": num_query_classes.astype(jnp.float32)}


def _memory_bank_term(config: ml_collections.ConfigDict, num_classes: int):
  from reco_jax.methods import memory_bank  # pylint: disable=import-outside-toplevel
  return memory_bank.AuxTerm.from_config(config, num_classes)


def _contextrast_term(config: ml_collections.ConfigDict, num_classes: int):
  from reco_jax.methods import contextrast  # pylint: disable=import-outside-toplevel
  return contextrast.AuxTerm.from_config(config, num_classes)


# name -> factory `(config, num_classes) -> term`; a term reads its section `config.<name>`.
TERMS: dict[str, Callable[[ml_collections.ConfigDict, int], Callable]] = {
    "reco": lambda config, num_classes: ReCoTerm.from_config(config.reco),
    "memory_bank": _memory_bank_term,
    "contextrast": _contextrast_term,
}


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a stateful term reads of a mean-teacher step (after the student's passes).

  model: the method's (wrapped) model; params / batch_stats: the student's (batch_stats
  after its passes); teacher: {'params', 'batch_stats'}; step: i32[] (0-based iteration);
  images_l f32[B,H,W,3], labels_l i32[B,H,W]: the labelled batch as the student saw it;
  out_l / out_u: the student's outputs on it and on the unlabelled batch; labels_u
  i32[B',H,W]: the unlabelled batch's (augmented) pseudo-labels, -1 ignore; valid_u
  bool[B',H,W]: the confident ones, the stateless terms' rule (teacher confidence >= delta_w).
  """
  model: Any
  params: Any
  batch_stats: Any
  teacher: dict
  step: jax.Array
  images_l: jax.Array
  labels_l: jax.Array
  out_l: dict
  out_u: dict
  labels_u: jax.Array
  valid_u: jax.Array


@dataclasses.dataclass(frozen=True)
class AuxLosses:
  """The configured terms, applied together."""
  terms: tuple[tuple[str, Callable], ...] = ()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int = 0,
                  *, stateful_ok: bool = False) -> "AuxLosses":
    """Raises a one-line ValueError for an unknown name in `config.aux_losses`, and for a
    stateful term when the method cannot run one (`stateful_ok=False`)."""
    names = tuple(config.get("aux_losses", ()) or ())
    for name in names:
      if name not in TERMS:
        raise ValueError(f"unknown config aux_losses entry {name!r}; known: {', '.join(sorted(TERMS))}")
      if name not in config:
        raise ValueError(f"config aux_losses names {name!r} but the config has no section {name!r}")
    losses = cls(tuple((name, TERMS[name](config, num_classes)) for name in names))
    if losses.stateful and not stateful_ok:
      raise ValueError(f"config aux_losses={names!r}: {losses.stateful[0][0]!r} needs a teacher; "
                       f"use it with a mean-teacher method (e.g. method=classmix_reco)")
    return losses

  @property
  def stateful(self) -> tuple[tuple[str, Callable], ...]:
    """The terms with their own state (and heads, and a view of the whole step)."""
    return tuple((n, t) for n, t in self.terms if hasattr(t, "init_state"))

  def __bool__(self) -> bool:
    """True when there are per-pixel (stateless) terms for `__call__`."""
    return any(not hasattr(t, "init_state") for _, t in self.terms)

  def wrap_model(self, model):
    """The model with every stateful term's heads (`term.wrap_model`)."""
    for _, term in self.stateful:
      model = term.wrap_model(model)
    return model

  def init_state(self, key: jax.Array, variables) -> dict:
    """{name: the term's initial state} of the stateful terms."""
    return {name: term.init_state(key, variables) for name, term in self.stateful}

  def apply_stateful(self, key: jax.Array, ctx: StepContext, states: dict
                     ) -> tuple[jax.Array, dict, dict, Any, Any]:
    """Sum of weighted stateful terms -> (loss, metrics, new states, student batch_stats,
    teacher batch_stats); each term sees the batch_stats the previous one left."""
    total, metrics, new_states = jnp.zeros((), jnp.float32), {}, {}
    batch_stats, teacher_stats = ctx.batch_stats, ctx.teacher["batch_stats"]
    for (name, term), term_key in zip(self.stateful, jax.random.split(key, max(len(self.stateful), 1))):
      ctx = dataclasses.replace(ctx, batch_stats=batch_stats,
                                teacher={**ctx.teacher, "batch_stats": teacher_stats})
      loss, term_metrics, new_states[name], batch_stats, teacher_stats = term.stateful_call(
          term_key, ctx, states[name])
      total = total + loss
      metrics.update(term_metrics)
    return total, metrics, new_states, batch_stats, teacher_stats

  def __call__(self, key: jax.Array, rep: jax.Array, logits: jax.Array, labels: jax.Array,
               valid: jax.Array) -> tuple[jax.Array, dict]:
    """(sum of weight * term, the terms' metrics)."""
    # A single term draws with the key itself (the draws of the pre-plug-in trainer); several
    # terms get independent keys.
    terms = [t for _, t in self.terms if not hasattr(t, "init_state")]
    keys = [key] if len(terms) == 1 else list(jax.random.split(key, len(terms)))
    total, metrics = jnp.zeros((), jnp.float32), {}
    for term_key, term in zip(keys, terms):
      loss, term_metrics = term(term_key, rep, logits, labels, valid)
      total = total + term.weight * loss
      metrics.update(term_metrics)
    return total, metrics
