"""DeepLabv3+ and DeepLabv2 segmentation heads and models (reco_spec §6).

Both models map images f32[B,H,W,3] to the dict

  {"logits": f32[B,h,w,num_classes], "rep": f32[B,h,w,rep_dim],
   "features": {"layer1", "layer2", "layer3", "layer4"[, "decoder"]}}

`logits` and `rep` are float32 in every compute dtype; the features are in the compute dtype.
`layer1..4` are the backbone's stages (strides in `resnet`'s docstring):
* `DeepLabV3Plus`: ASPP on layer4 + a one-3x3 decoder on layer1; outputs at stride 4.
  `features["decoder"]` is the decoder map both heads read, `concat(project(layer1),
  upsample(ASPP(layer4)))`, `[B,h,w,project_dim + head_dim]` at stride 4.
* `DeepLabV2`: sum of four dilated 3x3 convs on layer4; outputs at the output stride
  (no decoder).
* `DeepLabV3`: ASPP on layer4 and the two heads on its output; outputs at the output stride
  (no decoder; the network of Contextrast's DeepLabV3 rows, "D-ResNet-101").
The heads are separate modules (`DeepLabV3PlusHead`, `DeepLabV2Head`) so that they can be
applied alone to fixed backbone features (the `heads.npz` goldens); they return
`{"logits", "rep"}` (plus `"decoder"` for DeepLabv3+).
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reco_jax import resampling
from reco_jax.models import resnet
from reco_jax.models.resnet import BatchNorm, Conv2d, Dtype

# ASPP atrous rates per output stride (deeplabv3.py: ASPP(2048, [6, 12, 18]) at OS16; the
# OS8 rates are the ones the official code names for dilate_scale=8).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
# deeplabv2.py: Classifier_Module dilations.
DEEPLABV2_RATES = (6, 12, 18, 24)


class ConvBNReLU(nn.Module):
  """Conv (no bias, padding = dilation * (k-1)/2) + BatchNorm + ReLU."""
  features: int
  kernel_size: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    padding = self.dilation * (self.kernel_size - 1) // 2
    y = Conv2d(self.features, self.kernel_size, dilation=self.dilation, padding=padding,
               dtype=self.dtype, name="conv")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(y, train))


class ASPP(nn.Module):
  """aspp.py: ASPP. Five branches of `features` channels, concatenated, then 1x1 + BN + ReLU.

  Branches `convs_0` (1x1), `convs_1..3` (3x3, dilation = padding = rate) and `convs_4`
  (global average pool + 1x1, broadcast back: bilinear up-sampling from 1x1 is a copy).
  No dropout (it is commented out in the official code).
  """
  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[B,h,w,Cin] -> dtype[B,h,w,features]."""
    branches = [ConvBNReLU(self.features, 1, dtype=self.dtype, name="convs_0")(x, train)]
    for i, rate in enumerate(self.rates):
      branches.append(ConvBNReLU(self.features, 3, rate, dtype=self.dtype,
                                 name=f"convs_{i + 1}")(x, train))
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    pooled = ConvBNReLU(self.features, 1, dtype=self.dtype,
                        name=f"convs_{len(self.rates) + 1}")(pooled, train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = jnp.concatenate(branches, axis=-1)
    return ConvBNReLU(self.features, 1, dtype=self.dtype, name="project")(y, train)


class ConvHead(nn.Module):
  """deeplabv3.py classifier / representation head.

  3x3 conv (no bias, pad 1) + BN + ReLU + 1x1 conv with bias; only one 3x3, as officially.
  """
  hidden_features: int
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Conv2d(self.hidden_features, 3, padding=1, dtype=self.dtype, name="conv")(x)
    y = nn.relu(BatchNorm(dtype=self.dtype, name="bn")(y, train))
    return Conv2d(self.out_features, 1, use_bias=True, dtype=self.dtype, name="out")(y)


class DeepLabV3PlusHead(nn.Module):
  """deeplabv3.py: DeepLabv3Plus minus the backbone.

  Attributes:
    num_classes: classifier outputs.
    rep_dim: representation channels (`output_dim`).
    head_dim: ASPP / decoder width (256 officially).
    project_dim: width of the low-level projection (48 officially).
    aspp_rates: ASPP atrous rates ((6, 12, 18) at output stride 16).
    dtype: compute dtype.
  """
  num_classes: int
  rep_dim: int = 256
  head_dim: int = 256
  project_dim: int = 48
  aspp_rates: Sequence[int] = ASPP_RATES[16]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_low: jax.Array, x_high: jax.Array,
               train: bool) -> dict[str, jax.Array]:
    """Decoder and heads on fixed backbone features.

    Args:
      x_low: layer1 features [B,h,w,C1] (stride 4).
      x_high: layer4 features [B,h',w',C4] (output stride).
      train: batch statistics (and their running update) when True.

    Returns:
      {"logits": f32[B,h,w,num_classes], "rep": f32[B,h,w,rep_dim],
       "decoder": dtype[B,h,w,project_dim + head_dim]} (the map both heads read).
    """
    aspp = ASPP(self.head_dim, self.aspp_rates, dtype=self.dtype, name="ASPP")(x_high, train)
    low = ConvBNReLU(self.project_dim, 1, dtype=self.dtype, name="project")(x_low, train)
    aspp = resampling.resize_bilinear_align_corners(aspp, low.shape[1:3])
    decoder = jnp.concatenate([low, aspp.astype(low.dtype)], axis=-1)
    logits = ConvHead(self.head_dim, self.num_classes, dtype=self.dtype,
                      name="classifier")(decoder, train)
    rep = ConvHead(self.head_dim, self.rep_dim, dtype=self.dtype,
                   name="representation")(decoder, train)
    return {"logits": logits.astype(jnp.float32), "rep": rep.astype(jnp.float32),
            "decoder": decoder}


class DeepLabV3Head(nn.Module):
  """DeepLabv3 minus the backbone: the `DeepLabV3PlusHead`'s ASPP and heads without the
  low-level decoder (torchvision's `DeepLabHead`: ASPP with its 1x1 projection, then one
  3x3 + BN + ReLU + 1x1; mmsegmentation's `ASPPHead` instead runs its 3x3 bottleneck on the
  un-projected concatenation, a difference of one 1x1 conv)."""
  num_classes: int
  rep_dim: int = 256
  head_dim: int = 256
  aspp_rates: Sequence[int] = ASPP_RATES[8]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_high: jax.Array, train: bool) -> dict[str, jax.Array]:
    """x_high [B,h,w,C4] -> {"logits": f32[B,h,w,classes], "rep": f32[B,h,w,rep_dim],
    "aspp": dtype[B,h,w,head_dim]}."""
    aspp = ASPP(self.head_dim, self.aspp_rates, dtype=self.dtype, name="ASPP")(x_high, train)
    logits = ConvHead(self.head_dim, self.num_classes, dtype=self.dtype,
                      name="classifier")(aspp, train)
    rep = ConvHead(self.head_dim, self.rep_dim, dtype=self.dtype,
                   name="representation")(aspp, train)
    return {"logits": logits.astype(jnp.float32), "rep": rep.astype(jnp.float32), "aspp": aspp}


class DilatedConvSum(nn.Module):
  """deeplabv2.py: Classifier_Module, the sum of 3x3 convs with bias, dilation = padding = rate."""
  features: int
  rates: Sequence[int] = DEEPLABV2_RATES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = 0
    for i, rate in enumerate(self.rates):
      # Official init: weights N(0, 0.01), PyTorch-default biases.
      out = out + Conv2d(self.features, 3, dilation=rate, padding=rate, use_bias=True,
                         kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                         name=f"conv_{i}")(x)
    return out


class DeepLabV2Head(nn.Module):
  """deeplabv2.py: DeepLabv2 minus the backbone; outputs at the input's resolution."""
  num_classes: int
  rep_dim: int = 256
  rates: Sequence[int] = DEEPLABV2_RATES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_high: jax.Array, train: bool) -> dict[str, jax.Array]:
    """x_high [B,h,w,C4] -> {"logits": f32[B,h,w,classes], "rep": f32[B,h,w,rep_dim]}.

    `train` is unused (no BN).
    """
    del train
    logits = DilatedConvSum(self.num_classes, self.rates, dtype=self.dtype,
                            name="classifier")(x_high)
    rep = Conv2d(self.rep_dim, 1, use_bias=True, dtype=self.dtype,
                 name="representation")(x_high)
    return {"logits": logits.astype(jnp.float32), "rep": rep.astype(jnp.float32)}


class DeepLabV3Plus(nn.Module):
  """Backbone + `DeepLabV3PlusHead`; logits and rep at stride 4, float32 (module docstring).

  Attributes:
    backbone: a `resnet.ResNet`; its `output_stride` picks the ASPP rates.
    num_classes, rep_dim, head_dim, project_dim, dtype: as in `DeepLabV3PlusHead`.
  """
  backbone: resnet.ResNet
  num_classes: int
  rep_dim: int = 256
  head_dim: int = 256
  project_dim: int = 48
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict:
    """f32[B,H,W,3] -> {"logits", "rep", "features"} (module docstring), h = layer1 height."""
    features = self.backbone(images, train)
    head = DeepLabV3PlusHead(self.num_classes, self.rep_dim, self.head_dim, self.project_dim,
                             ASPP_RATES[self.backbone.output_stride], dtype=self.dtype,
                             name="head")(features["layer1"], features["layer4"], train)
    return {"logits": head["logits"], "rep": head["rep"],
            "features": {**features, "decoder": head["decoder"]}}


class DeepLabV3(nn.Module):
  """Backbone + `DeepLabV3Head`; logits and rep at the backbone's output stride, float32.

  `features` adds "aspp" (the map both heads read) to the backbone's stages.
  """
  backbone: resnet.ResNet
  num_classes: int
  rep_dim: int = 256
  head_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict:
    """f32[B,H,W,3] -> {"logits", "rep", "features"} (module docstring), h = layer4 height."""
    features = self.backbone(images, train)
    head = DeepLabV3Head(self.num_classes, self.rep_dim, self.head_dim,
                         ASPP_RATES[self.backbone.output_stride], dtype=self.dtype,
                         name="head")(features["layer4"], train)
    return {"logits": head["logits"], "rep": head["rep"],
            "features": {**features, "aspp": head["aspp"]}}


class DeepLabV2(nn.Module):
  """Backbone + `DeepLabV2Head`; logits and rep at the backbone's output stride, float32.

  The official DeepLabv2 always runs at output stride 8 (the registry's default for it).
  """
  backbone: resnet.ResNet
  num_classes: int
  rep_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict:
    """f32[B,H,W,3] -> {"logits", "rep", "features"} (module docstring), h = layer4 height."""
    features = self.backbone(images, train)
    head = DeepLabV2Head(self.num_classes, self.rep_dim, dtype=self.dtype,
                         name="head")(features["layer4"], train)
    return {"logits": head["logits"], "rep": head["rep"], "features": features}
