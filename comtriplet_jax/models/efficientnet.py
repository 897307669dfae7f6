"""EfficientNet-B3 as in Keras Applications (Tan & Le 2019), without the top.

Mirrors `keras.applications.EfficientNetB3` layer by layer so that its ImageNet weights
import by name:

* Input normalisation inside the model, as Keras does: ``Rescaling(1/255)`` then a
  ``Normalization`` layer whose mean, variance and count are non-trainable weights.
  They live in the ``batch_stats`` collection under ``normalization`` (Keras' automatic
  layer name) and are never updated by training; count is stored as float32 (Keras:
  int) so that averaging batch statistics over devices leaves it unchanged. Keras
  initialises them to 0, 1, 0 for ``weights=None``; importing ImageNet weights
  overwrites them. With ``weights='imagenet'`` Keras additionally multiplies by
  1/sqrt(ImageNet std) (keras-team, tensorflow#49930); ``imagenet_rescaling=True``
  does the same and must be set together with imported ImageNet weights.
* MBConv blocks ``block{stage}{letter}_`` with expansion, depthwise convolution,
  squeeze-and-excitation and projection, swish activations, BatchNormalization with
  Keras' defaults (epsilon 1e-3, momentum 0.99).
* Stride-2 depthwise convolutions (and the stem) use Keras' explicit asymmetric zero
  padding (`imagenet_utils.correct_pad`) and a 'valid' window.
* Stochastic depth: a block with an identity skip drops its residual branch per example
  with rate ``drop_connect_rate * b / num_blocks`` (b the block index), scaling the
  kept ones by 1 / (1 - rate), as Keras' ``Dropout(noise_shape=(None, 1, 1, 1))``. It
  is active when ``train=True`` and then needs a ``'dropout'`` rng in ``apply``.

Unavoidable difference from Keras' weights: a depthwise kernel is stored by Flax as
[k, k, 1, C] (a grouped convolution), Keras' DepthwiseConv2D as [k, k, C, 1]; the
converter transposes the last two axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common

IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
KERAS_BACKEND_EPSILON = 1e-7

# Keras' CONV_KERNEL_INITIALIZER: VarianceScaling(2.0, 'fan_out', truncated normal).
CONV_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
# Keras computes a DepthwiseConv2D kernel [k, k, C, 1]'s fan_out as k * k; Flax's
# grouped kernel is [k, k, 1, C], so read the fans from swapped axes to match.
DEPTHWISE_KERNEL_INIT = nn.initializers.variance_scaling(
    2.0, "fan_out", "truncated_normal", in_axis=-1, out_axis=-2)


class BlockArgs(NamedTuple):
  """One stage of MBConv blocks, before width/depth scaling (Keras' blocks_args)."""
  kernel_size: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int
  se_ratio: float = 0.25


# EfficientNet-B0's stages, scaled by width and depth coefficients (Keras
# DEFAULT_BLOCKS_ARGS; every stage has id_skip=True).
DEFAULT_BLOCKS_ARGS = (
    BlockArgs(3, 1, 32, 16, 1, 1),
    BlockArgs(3, 2, 16, 24, 6, 2),
    BlockArgs(5, 2, 24, 40, 6, 2),
    BlockArgs(3, 3, 40, 80, 6, 2),
    BlockArgs(5, 3, 80, 112, 6, 1),
    BlockArgs(5, 4, 112, 192, 6, 2),
    BlockArgs(3, 1, 192, 320, 6, 1),
)


def round_filters(filters: int, width_coefficient: float, divisor: int) -> int:
  """Keras' channel scaling: nearest multiple of `divisor`, never 10% below."""
  scaled = filters * width_coefficient
  new_filters = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Keras' depth scaling: ceil(depth_coefficient * repeats)."""
  return int(math.ceil(depth_coefficient * repeats))


class KerasNormalization(nn.Module):
  """Keras' `Normalization` layer with its statistics as non-trainable constants.

  (x - mean) / max(sqrt(variance), 1e-7) per channel, on [B, H, W, 3].
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((3,), jnp.float32))
    variance = self.variable("batch_stats", "variance",
                             lambda: jnp.ones((3,), jnp.float32))
    # Stored only so the variables count like Keras' (and import); unused by call.
    self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.float32))
    std = jnp.maximum(jnp.sqrt(variance.value), KERAS_BACKEND_EPSILON)
    return (x - mean.value) / std


class EfficientNet(nn.Module):
  """EfficientNet feature extractor; defaults are B3 (width 1.2, depth 1.4).

  Attributes:
    width_coefficient: channel scaling (B3: 1.2).
    depth_coefficient: repeat scaling (B3: 1.4).
    drop_connect_rate: maximal stochastic-depth rate, reached by the last block.
    depth_divisor: channels are rounded to multiples of this.
    blocks_args: the unscaled stages.
    top_filters: channels of the final 1x1 convolution before scaling (1280).
    stage_feature_names: keys of the stage outputs in `features`, one per stage;
      None gives Keras' names for this depth (`stage_output_names`). The tiny test
      variant passes B3's names so code written for B3 runs on it.
    imagenet_rescaling: multiply by 1/sqrt(ImageNet std) after the normalisation,
      as Keras does when it loads ImageNet weights; set it with imported weights.
    dtype: compute dtype; parameters are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  width_coefficient: float = 1.2
  depth_coefficient: float = 1.4
  drop_connect_rate: float = 0.2
  depth_divisor: int = 8
  blocks_args: Sequence[BlockArgs] = DEFAULT_BLOCKS_ARGS
  top_filters: int = 1280
  stage_feature_names: Sequence[str] | None = None
  imagenet_rescaling: bool = False
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  def stage_output_names(self) -> tuple[str, ...]:
    """Keras' name of the layer that ends each stage, e.g. 'block3c_add' for B3.

    The last block of a stage ends in an '_add' when it has an identity skip
    (stride 1, equal widths), else in its '_project_bn'.
    """
    names = []
    for i, args in enumerate(self.blocks_args, start=1):
      repeats = round_repeats(args.repeats, self.depth_coefficient)
      letter = chr(ord("a") + repeats - 1)
      filters_in = round_filters(args.filters_in, self.width_coefficient,
                                 self.depth_divisor)
      filters_out = round_filters(args.filters_out, self.width_coefficient,
                                  self.depth_divisor)
      has_skip = repeats > 1 or (args.strides == 1 and filters_in == filters_out)
      names.append(f"block{i}{letter}_{'add' if has_skip else 'project_bn'}")
    return tuple(names)

  @nn.compact
  def __call__(self, images: jax.Array,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the network.

    Args:
      images: float [B, H, W, 3] RGB pixels in [0, 255] ('raw'): the model
        normalises them itself.
      train: batch statistics, running-average updates and stochastic depth (needs a
        'dropout' rng) when True.

    Returns:
      pooled: float32 [B, round_filters(top_filters)] (1536 for B3), global average
        of 'top_activation'.
      features: 'stem_activation' [B, H/2, W/2, .], each stage's output under
        `stage_feature_names`, by default the Keras name of its last layer (see
        `stage_output_names`; B3: block1b_add /2, block2c_add /4, block3c_add /8,
        block4e_add and block5e_add /16, block6f_add and block7b_add /32), and
        'top_activation' [B, H/32, W/32, 1536], in the compute dtype.
    """
    common.check_images(images, "EfficientNet")
    if not 0.0 <= self.drop_connect_rate < 1.0:
      raise ValueError(
          f"drop_connect_rate must lie in [0, 1), got {self.drop_connect_rate}")
    for args in self.blocks_args:
      if args.repeats < 1 or args.strides not in (1, 2):
        raise ValueError(f"bad EfficientNet stage {args}: repeats must be >= 1 and "
                         "strides 1 or 2")
    stage_names = self.stage_feature_names or self.stage_output_names()
    if len(stage_names) != len(self.blocks_args):
      raise ValueError(f"stage_feature_names {tuple(stage_names)} must name each of "
                       f"the {len(self.blocks_args)} stages")

    def filters(n: int) -> int:
      return round_filters(n, self.width_coefficient, self.depth_divisor)

    conv = common.conv_factory(self.dtype, kernel_init=CONV_KERNEL_INIT)

    def norm(name: str) -> nn.BatchNorm:
      return common.batch_norm(
          train=train, epsilon=common.KERAS_DEFAULT_BN_EPSILON, dtype=self.dtype,
          axis_name=self.axis_name, name=name)

    # The input scaling is cheap, so do it in float32 before the compute dtype.
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    x = KerasNormalization(name="normalization")(x)
    if self.imagenet_rescaling:
      x = x * jnp.asarray([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB],
                          jnp.float32)
    x = x.astype(self.dtype)

    x = common.zero_pad(x, common.keras_correct_pad(x.shape[1:3], 3))
    x = conv(filters(32), (3, 3), strides=(2, 2), use_bias=False, name="stem_conv")(x)
    x = nn.swish(norm("stem_bn")(x))
    features = {"stem_activation": x}

    def mbconv(x: jax.Array, name: str, args: BlockArgs, filters_in: int,
               filters_out: int, strides: int, drop_rate: float) -> jax.Array:
      inputs = x
      expanded = filters_in * args.expand_ratio
      if args.expand_ratio != 1:
        x = conv(expanded, (1, 1), use_bias=False, name=f"{name}expand_conv")(x)
        x = nn.swish(norm(f"{name}expand_bn")(x))
      if strides == 2:
        x = common.zero_pad(x, common.keras_correct_pad(x.shape[1:3], args.kernel_size))
        padding = "VALID"
      else:
        padding = "SAME"
      x = nn.Conv(expanded, (args.kernel_size, args.kernel_size),
                  strides=(strides, strides), padding=padding,
                  feature_group_count=expanded, use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=DEPTHWISE_KERNEL_INIT,
                  name=f"{name}dwconv")(x)
      x = nn.swish(norm(f"{name}bn")(x))
      if 0 < args.se_ratio <= 1:
        # Keras sizes the squeeze from the block's input width, not the expanded one.
        squeezed = max(1, int(filters_in * args.se_ratio))
        se = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        se = se.astype(self.dtype)
        se = nn.swish(conv(squeezed, (1, 1), name=f"{name}se_reduce")(se))
        se = nn.sigmoid(conv(expanded, (1, 1), name=f"{name}se_expand")(se))
        x = x * se
      x = conv(filters_out, (1, 1), use_bias=False, name=f"{name}project_conv")(x)
      x = norm(f"{name}project_bn")(x)
      if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
          x = nn.Dropout(drop_rate, broadcast_dims=(1, 2, 3),
                         deterministic=not train, name=f"{name}drop")(x)
        x = x + inputs
      return x

    repeats = [round_repeats(a.repeats, self.depth_coefficient)
               for a in self.blocks_args]
    num_blocks = float(sum(repeats))
    b = 0
    for i, (args, stage_repeats) in enumerate(zip(self.blocks_args, repeats)):
      filters_in, filters_out = filters(args.filters_in), filters(args.filters_out)
      for j in range(stage_repeats):
        x = mbconv(
            x, name=f"block{i + 1}{chr(ord('a') + j)}_", args=args,
            filters_in=filters_in if j == 0 else filters_out,
            filters_out=filters_out, strides=args.strides if j == 0 else 1,
            drop_rate=self.drop_connect_rate * b / num_blocks)
        b += 1
      features[stage_names[i]] = x

    x = conv(filters(self.top_filters), (1, 1), use_bias=False, name="top_conv")(x)
    x = nn.swish(norm("top_bn")(x))
    features["top_activation"] = x
    return common.global_average_pool(x), features
