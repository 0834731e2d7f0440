"""Label conventions shared by the losses, the metrics and the input pipeline.

On device, labels are `i32[B,H,W]` with `IGNORE_LABEL` (-1) for void/unlabelled pixels,
as in the official code after loading. Stored datasets use 255 for void (uint8 PNGs);
the input pipeline maps 255 -> -1.
"""
import jax
import jax.numpy as jnp

IGNORE_LABEL = -1
STORED_VOID = 255


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """`i32[...]` labels -> `f32[..., C]` one-hot; ignored pixels map to all zeros."""
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def valid_mask(labels: jax.Array) -> jax.Array:
  """`bool[...]`: pixels that carry a class label."""
  return labels >= 0
