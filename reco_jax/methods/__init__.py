"""Training methods as plug-ins: one module per method family, looked up by name.

`config.method` names a module of this package (`supervised`, `mean_teacher`, ...) or, for a
method that lives elsewhere (a user's project, a test), its import path. The module has a
`create(config, *, num_classes, model) -> Method` factory. The historical names (`classmix_reco`,
`supervised_reco`, ...) are config presets (configs/common.py: METHOD_PRESETS) that resolve to
a module plus its settings.

The trainer, the evaluator and the checkpoints only use the `Method` interface (base.py):

  streams()                           -> {name: input_pipeline.datasets.Stream}
  init_extra(key, variables)          -> the method's PyTree in `TrainState.extra`
  loss(params, state, batch, key)     -> (loss, (metrics, aux)); aux["batch_stats"] is the
                                         student's new BatchNorm state
  after_update(state, aux, key)       -> state (EMA, a bank enqueue, a second model's update)
  after_update_and_metrics(...)       -> (state, metrics): the same, with the scalars it
                                         computes (S4GAN's discriminator loss); default: none
  eval_variables(state)               -> {'params', 'batch_stats'} that evaluate and the best
                                         checkpoint use
  load_eval_variables(state, v)       -> state with `v` put where eval_variables reads it
                                         (config.reload_best_patience_steps)
  description                         -> one line for `--list` and the logs

The generic step is `value_and_grad(method.loss)` -> optimiser update ->
`after_update_and_metrics` (whose metrics join the step's).
Auxiliary pixel-contrastive terms are pluggable by name (auxiliary.py, `config.aux_losses`).
"""
import importlib
import pkgutil

from reco_jax.methods.base import Method

__all__ = ["Method", "get_method", "known_methods", "module_name"]

# Modules of this package that are building blocks, not methods.
_NOT_METHODS = frozenset({"base", "auxiliary"})


def known_methods() -> tuple[str, ...]:
  """Names of the method modules of this package."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_METHODS and not m.name.startswith("_")))


def module_name(name: str) -> str:
  """`config.method` -> the module to import: this package's module of that name, else `name`
  as an absolute import path (a method defined in a user's module or a test)."""
  return f"{__name__}.{name}" if name in known_methods() else name


def get_method(config, *, num_classes: int, model) -> Method:
  """The method of `config.method`, built for `config`, `num_classes` and the segmentation
  `model` (`method.model` is the student: that model, or a wrapper with the method's heads).

  Raises:
    ValueError: one line naming `config.method` and the known methods.
  """
  name = config.method
  unknown = (f"unknown config method={name!r}; known methods: {', '.join(known_methods())} "
             f"(presets such as classmix_reco go in the config argument: "
             f"--config=configs/<dataset>.py:method=classmix_reco), or the import path of a "
             f"module with create(config, *, num_classes, model)")
  if not isinstance(name, str) or not name:
    raise ValueError(unknown)
  try:
    module = importlib.import_module(module_name(name))
  except ModuleNotFoundError as e:
    if e.name and module_name(name).startswith(e.name):
      raise ValueError(unknown) from e
    raise
  if not callable(getattr(module, "create", None)):
    raise ValueError(unknown)
  return module.create(config, num_classes=num_classes, model=model)
