"""Segmentation models by name: `create_model(config.model, num_classes)`.

`MODELS` and `resnet.BACKBONES` are the name -> constructor tables (flax/imagenet's
`getattr(models, name)` idea, made explicit).
"""
from collections.abc import Callable
import math

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from reco_jax.models import deeplab
from reco_jax.models import resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3plus": deeplab.DeepLabV3Plus,
    "deeplabv2": deeplab.DeepLabV2,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OUTPUT_STRIDES = (8, 16)
# Official DeepLabv3+ low-level projection width, for the official head_dim of 256.
_OFFICIAL_PROJECT_DIM = 48
_OFFICIAL_HEAD_DIM = 256


def project_dim_for(head_dim: int) -> int:
  """Low-level projection width: 48 at head_dim 256, scaled with head_dim, at least 8."""
  return max(8, math.floor(_OFFICIAL_PROJECT_DIM * head_dim / _OFFICIAL_HEAD_DIM))


def _check(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise ValueError(f"config.model.{field}={value!r} is invalid; expected {expected}")


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model described by `config.model` (configs/default.py).

  Args:
    model_config: fields name, backbone, output_stride, rep_dim, head_dim, width, dtype.
    num_classes: number of classifier outputs.

  Returns:
    An un-initialised linen module with `__call__(images f32[B,H,W,3], train: bool) ->
    (logits f32[B,h,w,num_classes], rep f32[B,h,w,rep_dim])`.

  Raises:
    ValueError: one line naming the invalid field and value.
  """
  c = model_config
  _check(c.name in MODELS, "name", c.name, f"one of {sorted(MODELS)}")
  _check(c.backbone in resnet.BACKBONES, "backbone", c.backbone,
         f"one of {sorted(resnet.BACKBONES)}")
  _check(c.output_stride in OUTPUT_STRIDES, "output_stride", c.output_stride, "8 or 16")
  _check(c.dtype in DTYPES, "dtype", c.dtype, f"one of {sorted(DTYPES)}")
  for field in ("rep_dim", "head_dim", "width"):
    value = c[field]
    _check(isinstance(value, int) and value > 0, field, value, "a positive int")
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f"num_classes={num_classes!r} is invalid; expected a positive int")

  dtype = DTYPES[c.dtype]
  backbone = resnet.BACKBONES[c.backbone](width=c.width, output_stride=c.output_stride,
                                          dtype=dtype)
  if c.name == "deeplabv3plus":
    return deeplab.DeepLabV3Plus(backbone=backbone, num_classes=num_classes,
                                 rep_dim=c.rep_dim, head_dim=c.head_dim,
                                 project_dim=project_dim_for(c.head_dim), dtype=dtype)
  return deeplab.DeepLabV2(backbone=backbone, num_classes=num_classes, rep_dim=c.rep_dim,
                           dtype=dtype)
