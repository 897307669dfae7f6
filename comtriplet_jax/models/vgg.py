"""VGG16 as in Keras Applications (Simonyan & Zisserman 2015), without the top.

Five blocks of 3x3 'same' convolutions with bias and ReLU, no batch normalisation, each
block closed by a 2x2 stride-2 max pool. Layer names follow Keras:
``block{b}_conv{i}`` and ``block{b}_pool``. With ``include_top=False, pooling='avg'``
Keras returns the global average of ``block5_pool``, which is the pooled output here.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


class VGG(nn.Module):
  """VGG feature extractor.

  Attributes:
    convs_per_block: convolutions in each of the five blocks ((2, 2, 3, 3, 3) for
      VGG16).
    block_filters: output channels of the convolutions of each block.
    dtype: compute dtype; parameters are float32.
    axis_name: unused (VGG has no batch normalisation); kept so every backbone is
      built the same way.
  """
  convs_per_block: Sequence[int] = (2, 2, 3, 3, 3)
  block_filters: Sequence[int] = (64, 128, 256, 512, 512)
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network.

    Args:
      images: float [B, H, W, 3], already normalised ('imagenet_caffe').
      train: unused apart from the signature shared by all backbones (no dropout
        or batch normalisation in VGG).

    Returns:
      pooled: float32 [B, block_filters[-1]], global average of block5_pool.
      features: 'block1_pool' .. 'block5_pool', each [B, H / 2^b, W / 2^b, C_b]
        in the compute dtype.
    """
    del train
    common.check_images(images, "VGG")
    if len(self.convs_per_block) != len(self.block_filters):
      raise ValueError(
          f"convs_per_block {tuple(self.convs_per_block)} and block_filters "
          f"{tuple(self.block_filters)} must have the same length")
    conv = common.conv_factory(self.dtype)
    x = images.astype(self.dtype)
    features = {}
    for b, (num_convs, filters) in enumerate(
        zip(self.convs_per_block, self.block_filters), start=1):
      for i in range(1, num_convs + 1):
        x = conv(filters, (3, 3), padding="SAME", name=f"block{b}_conv{i}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      features[f"block{b}_pool"] = x
    return common.global_average_pool(x), features
