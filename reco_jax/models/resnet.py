"""Dilated ResNet v1.5 backbone in flax.linen, with PyTorch layer semantics.

Matches torchvision's ResNet (stride on the 3x3 of the bottleneck, "v1.5") after the
official `DeepLabv3Plus._nostride_dilate` surgery (reco_spec §6.1, §6.2):
* output stride 16: layer4 is dilated with `dilate=2`;
* output stride 8: layer3 with `dilate=2` and layer4 with `dilate=4`.
Padding is explicit and symmetric as in PyTorch, so that spatial sizes follow PyTorch's
floor arithmetic (321 -> layer1 81, layer4 21 at output stride 16; 513 -> 129).

`ResNet` returns every stage's output, `{"layer1", "layer2", "layer3", "layer4"}`, at strides

  output stride | layer1 | layer2 | layer3 | layer4
  16            | 4      | 8      | 16     | 16
  8             | 4      | 8      | 8      | 8
  32            | 4      | 8      | 16     | 32

Output stride 32 is the undilated torchvision ResNet; the segmentation models do not offer it
(as officially: `models.OUTPUT_STRIDES`), it exists to check imported ImageNet weights against
torchvision's own outputs (`reco_jax/tools/import_weights.py`). The stem's output (after the
max-pool, stride 4) is sown as `intermediates/stem` (returned only when the caller makes
"intermediates" mutable).

Parameters are always float32; `dtype` is the compute dtype (float32 or bfloat16).
"""
from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's nn.Conv2d default: kaiming_uniform_(a=sqrt(5)) = U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision's ResNet constructor re-initialises its convs with
# kaiming_normal_(mode='fan_out', nonlinearity='relu'); used for the backbone.
torchvision_resnet_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Per-stage dilation factor given to `_nostride_dilate` (1 = stage left as is).
_STAGE_DILATES = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4), 32: (1, 1, 1, 1)}


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default conv/linear bias init, U(±1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def nostride_dilate(dilate: int, kernel_size: int, stride: int) -> tuple[int, int, int]:
  """Conv geometry after the official `_nostride_dilate(m, dilate)`.

  Args:
    dilate: the stage's dilation factor (2 or 4).
    kernel_size: the conv's (square) kernel size.
    stride: the conv's original stride (1 or 2).

  Returns:
    (stride, dilation, padding) of the conv after the surgery. A 3x3 that had stride 2
    gets dilation = padding = dilate // 2, other 3x3s get dilate; 1x1s only lose the stride.
  """
  if stride == 2:
    dilation = dilate // 2 if kernel_size == 3 else 1
    stride = 1
  else:
    dilation = dilate if kernel_size == 3 else 1
  padding = dilation if kernel_size == 3 else 0
  return stride, dilation, padding


def conv_geometry(kernel_size: int, stride: int, dilate: int) -> tuple[int, int, int]:
  """(stride, dilation, padding) of a torchvision ResNet conv in a stage dilated by `dilate`."""
  if dilate == 1:
    return stride, 1, (kernel_size - 1) // 2
  return nostride_dilate(dilate, kernel_size, stride)


class Conv2d(nn.Module):
  """PyTorch-style 2-D convolution on NHWC inputs with an HWIO float32 kernel.

  Padding is explicit and symmetric (PyTorch `padding=`), so the output size is
  floor((H + 2p - d(k-1) - 1) / s) + 1 exactly as in PyTorch.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = False
  kernel_init: Initializer = torch_default_kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """f32|bf16[B,H,W,Cin] -> dtype[B,H',W',features]."""
    k = self.kernel_size
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features),
                        jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=((self.padding, self.padding), (self.padding, self.padding)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", torch_default_bias_init(in_features * k * k),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch `nn.BatchNorm2d` semantics over all but the last axis.

  * Train mode normalises with the batch mean and the *biased* batch variance, and updates
    the running variance with the *unbiased* one (factor n/(n-1)), as PyTorch does
    (flax's `nn.BatchNorm` would store the biased one). Momentum 0.9 in flax's convention
    is PyTorch's 0.1; epsilon 1e-5.
  * Eval mode uses the running statistics.
  * No axis_name: under jit with a data-sharded batch the statistics cover the global
    batch, i.e. SyncBN.
  Statistics and normalisation are computed in float32; the output is cast to `dtype`.
  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (flax's names).
  Unlike PyTorch, a train-mode batch with one value per channel does not raise: its
  running variance update uses n/max(n-1, 1).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x[..., C] -> dtype[..., C]; updates batch_stats when `train` (must be mutable)."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      # Two-pass variance: more accurate than E[x^2] - E[x]^2 for large-mean features.
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x32 * mul + (bias - mean * mul)).astype(self.dtype)


class BasicBlock(nn.Module):
  """torchvision BasicBlock (two 3x3 convs); the first 3x3 carries the stride."""
  planes: int
  stride: int = 1
  dilate: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(Conv2d, kernel_init=torchvision_resnet_kernel_init,
                             dtype=self.dtype)
    norm = functools.partial(BatchNorm, dtype=self.dtype)
    s, d, p = conv_geometry(3, self.stride, self.dilate)
    y = conv(self.planes, 3, s, d, p, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    s2, d2, p2 = conv_geometry(3, 1, self.dilate)
    y = conv(self.planes, 3, s2, d2, p2, name="conv2")(y)
    y = norm(name="bn2")(y, train)
    return nn.relu(y + _shortcut(x, self, train))


class BottleneckBlock(nn.Module):
  """torchvision Bottleneck v1.5: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 channels)."""
  planes: int
  stride: int = 1
  dilate: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(Conv2d, kernel_init=torchvision_resnet_kernel_init,
                             dtype=self.dtype)
    norm = functools.partial(BatchNorm, dtype=self.dtype)
    y = conv(self.planes, 1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    s, d, p = conv_geometry(3, self.stride, self.dilate)
    y = conv(self.planes, 3, s, d, p, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(self.planes * self.expansion, 1, name="conv3")(y)
    y = norm(name="bn3")(y, train)
    return nn.relu(y + _shortcut(x, self, train))


def _shortcut(x: jax.Array, block: BasicBlock | BottleneckBlock, train: bool) -> jax.Array:
  """Identity, or torchvision's 1x1 conv + BN downsample when the shape changes.

  A free function called inside the block's compact `__call__`, so the submodules it
  creates are the block's children.
  The need for a downsample is decided on the *original* stride (as torchvision does);
  the dilation surgery then only removes the 1x1's stride.
  """
  out_features = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  s, d, p = conv_geometry(1, block.stride, block.dilate)
  y = Conv2d(out_features, 1, s, d, p, kernel_init=torchvision_resnet_kernel_init,
             dtype=block.dtype, name="downsample_conv")(x)
  return BatchNorm(dtype=block.dtype, name="downsample_bn")(y, train)


class ResNet(nn.Module):
  """Dilated ResNet returning the four stages' features (module docstring: strides).

  Attributes:
    stage_sizes: number of blocks in layer1..layer4.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    width: base width (64 = standard); stage i has width * 2**i planes.
    output_stride: 16 or 8 (see the module docstring); 32 = undilated (weight checks only).
    dtype: compute dtype; parameters and batch statistics stay float32.
  """
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  width: int = 64
  output_stride: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """f32[B,H,W,3] -> {"layer1".."layer4": dtype[B,h_i,w_i,C_i]}, PyTorch floor sizes.

    layer1 is at stride 4 and layer4 at `output_stride`; C_i = width * 2**(i-1) * expansion.
    """
    if self.output_stride not in _STAGE_DILATES:
      raise ValueError(f"ResNet output_stride={self.output_stride!r}; expected 8, 16 or 32")
    x = Conv2d(self.width, 7, stride=2, padding=3, kernel_init=torchvision_resnet_kernel_init,
               dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    # flax pads max_pool with -inf, like PyTorch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    # A no-op unless "intermediates" is mutable: lets the import tests compare torchvision's
    # recorded stem without a fifth feature that every model would carry.
    self.sow("intermediates", "stem", x)
    features = {}
    for i, (num_blocks, dilate) in enumerate(zip(self.stage_sizes,
                                                 _STAGE_DILATES[self.output_stride])):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = self.block_cls(planes=self.width * 2**i, stride=stride, dilate=dilate,
                           dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      features[f"layer{i + 1}"] = x
    return features


resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BottleneckBlock)
resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)

BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet_tiny": resnet_tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}
