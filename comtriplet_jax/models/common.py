"""Pieces shared by the backbones: Keras-equivalent initialisers, padding and pooling.

Every backbone mirrors a Keras Applications model layer by layer so that ImageNet
weights can be imported by layer name (issue 6). The parameter tree of a backbone is
flat: one entry per Keras layer that holds weights, keyed by that layer's Keras name
(``params['conv1_conv']['kernel']``). Keras and Flax store weights in the same layout
(Conv2D kernel [kh, kw, in, out], Dense kernel [in, out]); the only renames are
BatchNormalization gamma -> ``scale``, beta -> ``bias`` in ``params`` and
moving_mean -> ``mean``, moving_variance -> ``var`` in ``batch_stats``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Keras' default Conv2D/Dense kernel initialiser (glorot_uniform) with zero biases, so a
# model trained from scratch starts where the papers' Keras models started.
KERAS_GLOROT_UNIFORM = nn.initializers.glorot_uniform()

# The BatchNormalization settings Keras uses: momentum 0.99 everywhere, and epsilon
# 1.001e-5 in ResNet/DenseNet (EfficientNet keeps Keras' default 1e-3).
KERAS_BN_MOMENTUM = 0.99
RESNET_DENSENET_BN_EPSILON = 1.001e-5
KERAS_DEFAULT_BN_EPSILON = 1e-3


def check_images(images: jax.Array, model_name: str) -> None:
  """Raises ValueError unless `images` is a float [B, H, W, 3] batch."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"{model_name} expects images of shape [B, H, W, 3], got {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"{model_name} expects float images (already normalised), got dtype "
        f"{images.dtype}")


def batch_norm(*, train: bool, epsilon: float, dtype: Dtype,
               axis_name: str | None, name: str) -> nn.BatchNorm:
  """A Keras-equivalent BatchNormalization layer bound to the calling module.

  Args:
    train: batch statistics (and an update of the running averages) when True,
      the running averages when False.
    epsilon: added to the variance; Keras' value for the architecture.
    dtype: compute dtype; statistics are reduced in float32 by Flax regardless.
    axis_name: named mapped axis over which batch statistics are averaged (the
      data-parallel axis under pmap/shard_map), or None for per-device statistics.
    name: the Keras layer name.

  Returns:
    The (unbound) BatchNorm module, created in the caller's compact scope.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=KERAS_BN_MOMENTUM,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=axis_name,
      name=name)


def conv_factory(dtype: Dtype, kernel_init=KERAS_GLOROT_UNIFORM):
  """nn.Conv with float32 parameters, `dtype` compute and Keras' 'valid' default."""
  return functools.partial(
      nn.Conv, dtype=dtype, param_dtype=jnp.float32, padding="VALID",
      kernel_init=kernel_init)


def zero_pad(x: jax.Array,
             pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Keras ZeroPadding2D: pads [B, H, W, C] by ((top, bottom), (left, right))."""
  (top, bottom), (left, right) = pads
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def keras_correct_pad(spatial: Sequence[int],
                      kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The padding of Keras' `imagenet_utils.correct_pad` for a stride-2 convolution.

  Keras pads one pixel less on the top/left than on the bottom/right when the input
  size is even, so that a 'valid' stride-2 convolution sees the same window as
  TensorFlow's 'SAME'. Reproducing it exactly keeps imported weights valid.

  Args:
    spatial: the static (H, W) of the input.
    kernel_size: the (square) kernel size.

  Returns:
    ((top, bottom), (left, right)).
  """
  half = kernel_size // 2
  height, width = spatial
  return ((half - (1 - height % 2), half), (half - (1 - width % 2), half))


def global_average_pool(x: jax.Array) -> jax.Array:
  """Keras GlobalAveragePooling2D in float32: [B, H, W, C] -> [B, C]."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
