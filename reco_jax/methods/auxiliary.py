"""Auxiliary pixel-contrastive terms, pluggable by name (`config.aux_losses`).

Any method that has per-pixel representations, labels and a validity mask adds
`sum_i weight_i * term_i` to its loss by listing the terms' names in `config.aux_losses`:
"mean teacher + ClassMix + X" is then a config, not a new method. Each term reads its
hyper-parameters from `config.<name>` (its `weight` among them).

A term is `term(key, rep, logits, labels, valid) -> (loss f32[], metrics {name: f32[]})` with
rep `f[B,h,w,D]`, logits `f[B,h,w,C]` (the student's, same resolution), labels `i32[B,H,W]`
and valid `bool[B,H,W]` at the label resolution.
"""
import dataclasses
from typing import Callable

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


# name -> factory from the term's config section `config.<name>`.
TERMS: dict[str, Callable[[ml_collections.ConfigDict], Callable]] = {
    "reco": ReCoTerm.from_config,
}


@dataclasses.dataclass(frozen=True)
class AuxLosses:
  """The configured terms, applied together."""
  terms: tuple[tuple[str, Callable], ...] = ()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "AuxLosses":
    """Raises a one-line ValueError for an unknown name in `config.aux_losses`."""
    names = tuple(config.get("aux_losses", ()) or ())
    for name in names:
      if name not in TERMS:
        raise ValueError(f"unknown config aux_losses entry {name!r}; known: {', '.join(sorted(TERMS))}")
      if name not in config:
        raise ValueError(f"config aux_losses names {name!r} but the config has no section {name!r}")
    return cls(tuple((name, TERMS[name](config[name])) for name in names))

  def __bool__(self) -> bool:
    return bool(self.terms)

  def __call__(self, key: jax.Array, rep: jax.Array, logits: jax.Array, labels: jax.Array,
               valid: jax.Array) -> tuple[jax.Array, dict]:
    """(sum of weight * term, the terms' metrics)."""
    # A single term draws with the key itself (the draws of the pre-plug-in trainer); several
    # terms get independent keys.
    keys = [key] if len(self.terms) == 1 else list(jax.random.split(key, len(self.terms)))
    total, metrics = jnp.zeros((), jnp.float32), {}
    for term_key, (_, term) in zip(keys, self.terms):
      loss, term_metrics = term(term_key, rep, logits, labels, valid)
      total = total + term.weight * loss
      metrics.update(term_metrics)
    return total, metrics
