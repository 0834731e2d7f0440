"""Optimiser and learning-rate schedule (module_list.py: PolyLR; train_*.py: SGD).

The official optimiser is `SGD(lr=2.5e-3, momentum=0.9, nesterov=True,
weight_decay=5e-4)` with one parameter group: L2 decay is added to the gradient of
every parameter (BN and biases included) before momentum. optax's `sgd(nesterov=True)`
has the same update rule as torch's.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def poly_lr(base_lr: float, max_iters: int, it, power: float = 0.9, min_lr: float = 1e-6):
  """`max(base * (1 - it / max_iters) ** power, min_lr)`, the official PolyLR formula."""
  frac = jnp.clip(1.0 - jnp.asarray(it, jnp.float32) / max_iters, 0.0, 1.0)
  return jnp.maximum(base_lr * frac**power, min_lr)


def create_lr_schedule(optim_config: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Poly schedule per iteration (default) or the official per-epoch stepping.

  With `schedule_unit='epoch'` the LR is piecewise constant over blocks of
  `steps_per_epoch` iterations, `lr_e = base * (1 - e / num_epochs) ** power`, exactly as
  the official code calls `scheduler.step()` once per 200-iteration epoch.
  """
  unit = optim_config.schedule_unit
  if unit == "iteration":
    return lambda step: poly_lr(optim_config.lr, num_train_steps, step,
                                optim_config.poly_power, optim_config.min_lr)
  if unit == "epoch":
    steps_per_epoch = optim_config.steps_per_epoch
    num_epochs = max(num_train_steps // steps_per_epoch, 1)
    return lambda step: poly_lr(optim_config.lr, num_epochs, step // steps_per_epoch,
                                optim_config.poly_power, optim_config.min_lr)
  raise ValueError(f"config optim.schedule_unit must be 'iteration' or 'epoch', got {unit!r}")


def create_optimizer(optim_config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and L2 weight decay on all parameters.

  With `optim.backbone_lr_mult` != 1 (CAC's `diff_lrs`: the backbone at lr/10) the
  parameters under a module named 'backbone' form a second group whose learning rate is the
  schedule times that factor (an optax multi_transform); at 1.0 the optimiser is the single
  group, unchanged.
  """
  def sgd(lr):
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.sgd(lr, momentum=optim_config.momentum, nesterov=optim_config.nesterov),
    )

  mult = float(optim_config.get("backbone_lr_mult", 1.0))
  if mult == 1.0:
    return sgd(schedule)
  if mult <= 0:
    raise ValueError(f"config optim.backbone_lr_mult={mult} must be positive")
  return optax.multi_transform(
      {"backbone": sgd(lambda step: mult * schedule(step)), "head": sgd(schedule)},
      param_group_labels)


def param_group_labels(params):
  """'backbone' for every parameter under a module named 'backbone', else 'head'."""
  def label(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return "backbone" if "backbone" in names else "head"
  return jax.tree_util.tree_map_with_path(label, params)
