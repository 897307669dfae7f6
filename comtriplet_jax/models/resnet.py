"""ResNet50 v1 as in Keras Applications (He et al. 2016), without the top.

Keras' v1 differs from the torchvision/"v1.5" ResNet in two ways kept here so ImageNet
weights import unchanged: the stride of a downsampling bottleneck sits on its first 1x1
convolution (``*_1_conv``), not on the 3x3, and every convolution has a bias. The stem
zero-pads by 3 before the 7x7/2 convolution and by 1 before the 3x3/2 max pool (Keras
'conv1_pad' and 'pool1_pad'), both with 'valid' windows. Layer names follow Keras:
``conv1_conv``, ``conv1_bn``, ``conv{s}_block{n}_{0,1,2,3}_{conv,bn}``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


class ResNet(nn.Module):
  """Bottleneck ResNet v1 feature extractor.

  Attributes:
    stage_sizes: bottleneck blocks per stage conv2..conv5 ((3, 4, 6, 3) for
      ResNet50).
    stage_filters: bottleneck width of each stage; blocks output 4x that.
    stem_filters: channels of the 7x7 stem convolution.
    feature_names: keys of the stage outputs in `features`, one per stage; None
      gives Keras' names for this depth ('conv{s}_block{last}_out'). The tiny test
      variant passes ResNet50's names so code written for ResNet50 runs on it.
    dtype: compute dtype; parameters are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  stage_filters: Sequence[int] = (64, 128, 256, 512)
  stem_filters: int = 64
  feature_names: Sequence[str] | None = None
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network.

    Args:
      images: float [B, H, W, 3], already normalised ('imagenet_caffe').
      train: batch statistics and running-average updates when True.

    Returns:
      pooled: float32 [B, 4 * stage_filters[-1]] (2048 for ResNet50), global
        average of the last stage.
      features: the output of each stage under `feature_names`, by default its
        Keras name 'conv{s}_block{last}_out' (ResNet50: conv2_block3_out
        [B, H/4, W/4, 256], conv3_block4_out /8 x 512, conv4_block6_out /16 x 1024,
        conv5_block3_out /32 x 2048), in the compute dtype.
    """
    common.check_images(images, "ResNet")
    if len(self.stage_sizes) != len(self.stage_filters):
      raise ValueError(
          f"stage_sizes {tuple(self.stage_sizes)} and stage_filters "
          f"{tuple(self.stage_filters)} must have the same length")
    if min(self.stage_sizes) < 1:
      raise ValueError(f"every stage needs >= 1 block, got {tuple(self.stage_sizes)}")
    feature_names = self.feature_names or [
        f"conv{s + 2}_block{n}_out" for s, n in enumerate(self.stage_sizes)]
    if len(feature_names) != len(self.stage_sizes):
      raise ValueError(f"feature_names {tuple(feature_names)} must name each of the "
                       f"{len(self.stage_sizes)} stages")
    conv = common.conv_factory(self.dtype)

    def norm(name: str) -> nn.BatchNorm:
      return common.batch_norm(
          train=train, epsilon=common.RESNET_DENSENET_BN_EPSILON, dtype=self.dtype,
          axis_name=self.axis_name, name=name)

    x = images.astype(self.dtype)
    x = common.zero_pad(x, ((3, 3), (3, 3)))
    x = conv(self.stem_filters, (7, 7), strides=(2, 2), name="conv1_conv")(x)
    x = nn.relu(norm("conv1_bn")(x))
    # Zero padding equals -inf padding here only because x >= 0 after the ReLU; it is
    # what Keras does, so keep it literal.
    x = common.zero_pad(x, ((1, 1), (1, 1)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")

    features = {}
    for s, (num_blocks, filters) in enumerate(
        zip(self.stage_sizes, self.stage_filters)):
      stage = f"conv{s + 2}"
      for n in range(1, num_blocks + 1):
        name = f"{stage}_block{n}"
        # Keras' stack1: conv2 keeps the resolution (the max pool already halved
        # it), later stages halve it in their first block.
        stride = 2 if (n == 1 and s > 0) else 1
        if n == 1:
          shortcut = conv(4 * filters, (1, 1), strides=(stride, stride),
                          name=f"{name}_0_conv")(x)
          shortcut = norm(f"{name}_0_bn")(shortcut)
        else:
          shortcut = x
        y = conv(filters, (1, 1), strides=(stride, stride), name=f"{name}_1_conv")(x)
        y = nn.relu(norm(f"{name}_1_bn")(y))
        y = conv(filters, (3, 3), padding="SAME", name=f"{name}_2_conv")(y)
        y = nn.relu(norm(f"{name}_2_bn")(y))
        y = conv(4 * filters, (1, 1), name=f"{name}_3_conv")(y)
        y = norm(f"{name}_3_bn")(y)
        x = nn.relu(shortcut + y)
      features[feature_names[s]] = x
    return common.global_average_pool(x), features
