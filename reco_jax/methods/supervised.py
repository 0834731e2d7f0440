"""Supervised training: cross-entropy on the labelled stream, plus any auxiliary terms.

Official: `train_sup.py` (with `--apply_reco` for the `supervised_reco` preset, i.e.
`config.aux_losses=("reco",)`).
"""
import jax
import ml_collections

from reco_jax.losses import supervised as supervised_lib
from reco_jax.methods import auxiliary, base


class Supervised(base.Method):
  """CE (+ sum of weighted auxiliary terms on every labelled pixel)."""

  def __init__(self, model, aux_losses: auxiliary.AuxLosses):
    super().__init__(model)
    self.aux_losses = aux_losses
    names = "+".join(name for name, _ in aux_losses.terms)
    self.description = "supervised cross-entropy" + (f" + {names}" if names else "")

  def loss(self, params, state, batch, key):
    labeled = batch[base.LABELED]
    # The second half of the step key, as the pre-plug-in trainer drew the ReCo samples.
    _, key_aux = jax.random.split(key)
    outputs, batch_stats = self.apply_train(params, state.batch_stats, labeled["image"])
    sup = supervised_lib.supervised_loss(outputs["logits"], labeled["label"])
    metrics = {"sup_loss": sup}
    loss = sup
    if self.aux_losses:
      aux_total, aux_metrics = self.aux_losses(key_aux, outputs["rep"], outputs["logits"],
                                               labeled["label"], labeled["label"] >= 0)
      loss = loss + aux_total
      metrics.update(aux_metrics)
    metrics["loss"] = loss
    return loss, (metrics, {"batch_stats": batch_stats})


def create(config: ml_collections.ConfigDict, *, num_classes: int, model) -> Supervised:
  del num_classes
  return Supervised(model, auxiliary.AuxLosses.from_config(config))
