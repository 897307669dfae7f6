"""MICA: Multi-head Independence-guided Channel Attention (BIIGMA-Net, Sec. 2.1).

K parallel projection heads P_k, each a 1x1 convolution followed by a
squeeze-and-excitation block (Hu et al. 2018), all reading the same last
feature map R [B, H, W, C_in]; their outputs R_proj^k [B, H, W, C] are
concatenated channel-wise into R^CA [B, H, W, K C] (Eq. 4). The heads are kept
independent by the HSIC loss of Eq. 1-3 (``losses.hsic``), computed by the
method on the head outputs this module also returns.

The K heads are one ``nn.vmap`` of a single head module over a leading axis of
the parameters: one batched 1x1 convolution instead of K Python-level calls,
with independent initialisation per head (``split_rngs``). Every head
parameter therefore carries a leading axis K, e.g. the projection kernels are
``params['heads']['projection']['kernel']`` of shape [K, 1, 1, C_in, C]; this is
what the L2 term of Eq. 3 reads (:func:`projection_kernels`).

Layer details the paper leaves open follow the authors' code (which the paper
does not contradict): a ReLU after the 1x1 convolution and no biases; the SE
block is global average pooling, a 1x1 convolution to C / r channels with ReLU,
a 1x1 convolution back to C with a sigmoid, and a channel-wise rescale
(r = 16 as in SE-Net and the code).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


class SqueezeExcitation(nn.Module):
  """Channel recalibration: x * sigmoid(W2 relu(W1 GAP(x))), [B,H,W,C] -> same.

  Attributes:
    reduction: r; the bottleneck has max(1, C // r) channels.
    dtype: compute dtype; parameters are float32.
  """
  reduction: int = 16
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"SqueezeExcitation expects [B, H, W, C], got {x.shape}")
    if self.reduction < 1:
      raise ValueError(f"reduction must be >= 1, got {self.reduction}")
    channels = x.shape[-1]
    conv = common.conv_factory(self.dtype)
    # Squeeze in float32: a mean over H W positions in bf16 loses digits.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    s = nn.relu(conv(max(1, channels // self.reduction), (1, 1), use_bias=False,
                     name="squeeze")(s))
    s = nn.sigmoid(conv(channels, (1, 1), use_bias=False, name="excite")(s))
    return x * s


class ProjectionHead(nn.Module):
  """One head P_k: 1x1 convolution (ReLU) then SE, [B,H,W,C_in] -> [B,H,W,C].

  Attributes:
    features: C, the head's output channels.
    se_reduction: the SE block's r.
    dtype: compute dtype; parameters are float32.
  """
  features: int
  se_reduction: int = 16
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = common.conv_factory(self.dtype)
    y = nn.relu(conv(self.features, (1, 1), use_bias=False, name="projection")(x))
    return SqueezeExcitation(self.se_reduction, dtype=self.dtype, name="se")(y)


class MICA(nn.Module):
  """K parallel projection heads, concatenated channel-wise (Eq. 4).

  Attributes:
    num_heads: K (3 in the paper's best configuration; 1-4 in Table 2).
    features: C, channels per head; None keeps the input's channels (the
      authors' code: 1024 = DenseNet-121's last map).
    se_reduction: the SE block's r.
    dtype: compute dtype; parameters are float32.
  """
  num_heads: int = 3
  features: int | None = None
  se_reduction: int = 16
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projects ``x`` through every head.

    Args:
      x: [B, H, W, C_in] the last convolutional feature map R (or the hybrid H).

    Returns:
      concatenated: [B, H, W, K C], R^CA of Eq. 4, heads in order 0..K-1.
      heads: [B, K, H, W, C], each head's output R_proj^k (for L_indep, Eq. 3).
    """
    if x.ndim != 4:
      raise ValueError(f"MICA expects a feature map [B, H, W, C], got {x.shape}")
    if self.num_heads < 1:
      raise ValueError(f"MICA num_heads must be >= 1, got {self.num_heads}")
    features = x.shape[-1] if self.features is None else self.features
    if features < 1:
      raise ValueError(f"MICA features must be >= 1 (or None), got {features}")
    heads_module = nn.vmap(
        ProjectionHead, in_axes=None, out_axes=1, axis_size=self.num_heads,
        variable_axes={"params": 0}, split_rngs={"params": True})
    heads = heads_module(features, self.se_reduction, dtype=self.dtype,
                         name="heads")(x)
    batch, k, height, width, channels = heads.shape
    # [B, K, H, W, C] -> [B, H, W, K, C] -> [B, H, W, K C]: head k owns the
    # channels [k C, (k + 1) C).
    concatenated = jnp.transpose(heads, (0, 2, 3, 1, 4)).reshape(
        batch, height, width, k * channels)
    return concatenated, heads


def projection_kernels(mica_params: Any) -> jax.Array:
  """The heads' 1x1 convolution kernels [K, 1, 1, C_in, C] from MICA's params."""
  try:
    return mica_params["heads"]["projection"]["kernel"]
  except (KeyError, TypeError):
    raise ValueError("expected MICA parameters with heads/projection/kernel, got "
                     f"keys {list(mica_params) if hasattr(mica_params, 'keys') else mica_params!r}"
                     ) from None
