"""DenseNet-121/169 as in Keras Applications (Huang et al. 2017), without the top.

Dense blocks of BN-ReLU-1x1(4k)-BN-ReLU-3x3(k) units whose outputs are concatenated
to their inputs (growth rate k = 32), transitions of BN-ReLU-1x1 (halving the
channels)-2x2 average pool, and a final BatchNormalization 'bn' + ReLU 'relu'. No
convolution has a bias. The stem zero-pads by 3 before the 7x7/2 convolution and by 1
before the 3x3/2 max pool, as Keras does.

The named early exits are the transitions' ReLU outputs, which BIIGMA-Net taps
(issue 5): at 224x224 DenseNet-121 gives pool2_relu 56x56x256, pool3_relu 28x28x512,
pool4_relu 14x14x1024 and relu 7x7x1024.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


class DenseNet(nn.Module):
  """DenseNet feature extractor.

  Attributes:
    blocks: units per dense block conv2..conv5 ((6, 12, 24, 16) DenseNet-121,
      (6, 12, 32, 32) DenseNet-169). Exactly four, since the exit names are fixed.
    growth_rate: channels each unit adds (k).
    stem_filters: channels of the 7x7 stem convolution.
    reduction: fraction of channels a transition keeps.
    dtype: compute dtype; parameters are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  stem_filters: int = 64
  reduction: float = 0.5
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network.

    Args:
      images: float [B, H, W, 3], already normalised ('imagenet_torch').
      train: batch statistics and running-average updates when True.

    Returns:
      pooled: float32 [B, C_final] (1024 for DenseNet-121, 1664 for -169), global
        average of the final 'relu'.
      features: 'pool2_relu' [B, H/4, W/4, .], 'pool3_relu' [B, H/8, W/8, .],
        'pool4_relu' [B, H/16, W/16, .] and 'relu' [B, H/32, W/32, C_final], in the
        compute dtype.
    """
    common.check_images(images, "DenseNet")
    if len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(
          f"DenseNet needs four dense blocks of >= 1 unit, got {tuple(self.blocks)}")
    if not 0.0 < self.reduction <= 1.0:
      raise ValueError(f"reduction must lie in (0, 1], got {self.reduction}")
    conv = common.conv_factory(self.dtype)

    def norm(name: str) -> nn.BatchNorm:
      return common.batch_norm(
          train=train, epsilon=common.RESNET_DENSENET_BN_EPSILON, dtype=self.dtype,
          axis_name=self.axis_name, name=name)

    x = images.astype(self.dtype)
    x = common.zero_pad(x, ((3, 3), (3, 3)))
    x = conv(self.stem_filters, (7, 7), strides=(2, 2), use_bias=False,
             name="conv1_conv")(x)
    x = nn.relu(norm("conv1_bn")(x))
    x = common.zero_pad(x, ((1, 1), (1, 1)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")  # Keras 'pool1'.

    features = {}
    for d, num_units in enumerate(self.blocks):
      stage = f"conv{d + 2}"
      for u in range(1, num_units + 1):
        name = f"{stage}_block{u}"
        y = nn.relu(norm(f"{name}_0_bn")(x))
        y = conv(4 * self.growth_rate, (1, 1), use_bias=False, name=f"{name}_1_conv")(y)
        y = nn.relu(norm(f"{name}_1_bn")(y))
        y = conv(self.growth_rate, (3, 3), padding="SAME", use_bias=False,
                 name=f"{name}_2_conv")(y)
        x = jnp.concatenate([x, y], axis=-1)  # Keras '{name}_concat': old first.
      if d < len(self.blocks) - 1:
        transition = f"pool{d + 2}"
        x = nn.relu(norm(f"{transition}_bn")(x))
        features[f"{transition}_relu"] = x
        x = conv(int(x.shape[-1] * self.reduction), (1, 1), use_bias=False,
                 name=f"{transition}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = nn.relu(norm("bn")(x))
    features["relu"] = x
    return common.global_average_pool(x), features
