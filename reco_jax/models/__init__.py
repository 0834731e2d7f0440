"""Segmentation models by name: `create_model(config.model, num_classes)`.

`MODELS` and `resnet.BACKBONES` are the name -> constructor tables (flax/imagenet's
`getattr(models, name)` idea, made explicit). A model is added by one `MODELS` entry.

Every model's `apply(variables, images f32[B,H,W,3], train=bool)` returns
`{"logits": f32[B,h,w,C], "rep": f32[B,h,w,rep_dim], "features": {"layer1", "layer2",
"layer3", "layer4"[, "decoder" | "aspp"]}}` (features in the compute dtype; `deeplab` docstring).
"""
from collections.abc import Callable
import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from reco_jax.models import deeplab
from reco_jax.models import resnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OUTPUT_STRIDES = (8, 16)
# Official DeepLabv3+ low-level projection width, for the official head_dim of 256.
_OFFICIAL_PROJECT_DIM = 48
_OFFICIAL_HEAD_DIM = 256


def project_dim_for(head_dim: int) -> int:
  """Low-level projection width: 48 at head_dim 256, scaled with head_dim, at least 8."""
  return max(8, math.floor(_OFFICIAL_PROJECT_DIM * head_dim / _OFFICIAL_HEAD_DIM))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One registered model.

  Attributes:
    build: `(model_config, backbone, num_classes, dtype) -> nn.Module`; `backbone` is the
      `resnet.ResNet` already built at the resolved output stride.
    default_output_stride: the output stride used when `config.model.output_stride` is None.
  """
  build: Callable[[ml_collections.ConfigDict, resnet.ResNet, int, resnet.Dtype], nn.Module]
  default_output_stride: int


def _build_deeplabv3plus(c, backbone, num_classes, dtype) -> nn.Module:
  return deeplab.DeepLabV3Plus(backbone=backbone, num_classes=num_classes, rep_dim=c.rep_dim,
                               head_dim=c.head_dim, project_dim=project_dim_for(c.head_dim),
                               dtype=dtype)


def _build_deeplabv3(c, backbone, num_classes, dtype) -> nn.Module:
  return deeplab.DeepLabV3(backbone=backbone, num_classes=num_classes, rep_dim=c.rep_dim,
                           head_dim=c.head_dim, dtype=dtype)


def _build_deeplabv2(c, backbone, num_classes, dtype) -> nn.Module:
  return deeplab.DeepLabV2(backbone=backbone, num_classes=num_classes, rep_dim=c.rep_dim,
                           dtype=dtype)


MODELS: dict[str, ModelSpec] = {
    # deeplabv3.py: DeepLabv3Plus(dilate_scale=16).
    "deeplabv3plus": ModelSpec(build=_build_deeplabv3plus, default_output_stride=16),
    # Contextrast's DeepLabV3 rows: "D-ResNet-101", the dilated (output stride 8) ResNet.
    "deeplabv3": ModelSpec(build=_build_deeplabv3, default_output_stride=8),
    # deeplabv2.py always dilates layer3 and layer4 (reco_spec §6.2): output stride 8.
    "deeplabv2": ModelSpec(build=_build_deeplabv2, default_output_stride=8),
}


def _check(ok: bool, field: str, value, expected: str) -> None:
  if not ok:
    raise ValueError(f"config.model.{field}={value!r} is invalid; expected {expected}")


def resolve_output_stride(model_config: ml_collections.ConfigDict) -> int:
  """`config.model.output_stride`, or the model's default when it is None (name must be valid)."""
  c = model_config
  spec = MODELS[c.name]
  value = c.output_stride
  if value is None:
    return spec.default_output_stride
  _check(isinstance(value, int) and not isinstance(value, bool) and value in OUTPUT_STRIDES,
         "output_stride", value,
         f"8, 16 or None (the model's default, {spec.default_output_stride} for {c.name})")
  return value


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the model described by `config.model` (configs/default.py).

  Args:
    model_config: fields name, backbone, output_stride (8, 16 or None for the model's
      default: deeplabv3plus 16, deeplabv2 and deeplabv3 8), rep_dim, head_dim, width, dtype.
    num_classes: number of classifier outputs.

  Returns:
    An un-initialised linen module with `__call__(images f32[B,H,W,3], train: bool) ->
    {"logits": f32[B,h,w,num_classes], "rep": f32[B,h,w,rep_dim], "features": {...}}`.

  Raises:
    ValueError: one line naming the invalid field and value.
  """
  c = model_config
  _check(c.name in MODELS, "name", c.name, f"one of {sorted(MODELS)}")
  _check(c.backbone in resnet.BACKBONES, "backbone", c.backbone,
         f"one of {sorted(resnet.BACKBONES)}")
  output_stride = resolve_output_stride(c)
  _check(c.dtype in DTYPES, "dtype", c.dtype, f"one of {sorted(DTYPES)}")
  for field in ("rep_dim", "head_dim", "width"):
    value = c[field]
    _check(isinstance(value, int) and value > 0, field, value, "a positive int")
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f"num_classes={num_classes!r} is invalid; expected a positive int")

  dtype = DTYPES[c.dtype]
  backbone = resnet.BACKBONES[c.backbone](width=c.width, output_stride=output_stride,
                                          dtype=dtype)
  return MODELS[c.name].build(c, backbone, num_classes, dtype)
