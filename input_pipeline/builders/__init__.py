"""TFDS builders for datasets read from a local directory, by dataset name.

A new dataset is a `base.SegmentationBuilder` subclass in its own module plus one line in
`_BUILDERS`; `input_pipeline.datasets` then accepts `input.dataset='<name>'`. Modules are
imported on first use so that a broken or heavy builder does not slow down the others.
"""
import importlib

from input_pipeline.builders import base

# dataset name -> 'module:Class'
_BUILDERS = {
    "camvid": "input_pipeline.builders.camvid:Camvid",
    "cityscapes": "input_pipeline.builders.cityscapes:CityscapesHalf",  # ReCo's 1024x512
    "cityscapes_full": "input_pipeline.builders.cityscapes:CityscapesFull",
    "sun": "input_pipeline.builders.sun:SunRgbd",
    "voc": "input_pipeline.builders.voc:VocAug",
}


def names() -> tuple[str, ...]:
  """Names of the registered builders."""
  return tuple(sorted(_BUILDERS))


def get_builder_class(name: str) -> type[base.SegmentationBuilder]:
  """The builder class registered as `name` (raises KeyError naming the known ones)."""
  if name not in _BUILDERS:
    raise KeyError(f"no TFDS builder named {name!r}; known: {', '.join(names())}")
  module_name, class_name = _BUILDERS[name].split(":")
  return getattr(importlib.import_module(module_name), class_name)
