"""The convolutional auto-encoder (CAE) baseline of the COM-Triplet paper (Sec. IV).

"CAE was trained to reconstruct dermoscopic images from their noise-corrupted and
randomly cropped versions. The feature vectors as computed by the encoder were
processed with k-means to obtain two cluster centers." The paper gives no
architecture; this one is the usual shape of such a model:

* encoder: L convolutions 3x3 with stride 2 (each halves the side), BatchNorm and
  ReLU, then a dense layer from the flattened [S / 2^L, S / 2^L, f_L] map to the
  feature vector (the "code") of size ``code_size``, which the clustering uses;
* decoder: a dense layer back to the [S / 2^L, S / 2^L, f_L] map, then L transposed
  convolutions 3x3 with stride 2 (each doubles the side) with the encoder's widths
  in reverse, the last one to 3 channels, and a sigmoid: the reconstruction lies in
  [0, 1] like the ``'unit'``-normalised input (x / 255) it is compared with.

The code is linear (no activation) so that it can take both signs; the clustering
works on it as it is.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from comtriplet_jax.models import common


def _check_architecture(image_shape: Sequence[int], filters: Sequence[int],
                        code_size: int) -> None:
  if len(image_shape) != 4 or image_shape[-1] != 3:
    raise ValueError(f"the CAE expects images [B, H, W, 3], got {tuple(image_shape)}")
  if not filters or min(filters) < 1:
    raise ValueError(f"CAE filters must be a non-empty list of positive widths, got "
                     f"{tuple(filters)}")
  if code_size < 1:
    raise ValueError(f"CAE code_size must be >= 1, got {code_size}")
  factor = 2 ** len(filters)
  height, width = image_shape[1], image_shape[2]
  if height % factor or width % factor:
    raise ValueError(
        f"the CAE with {len(filters)} stride-2 layers needs image sides divisible by "
        f"{factor}, got {height}x{width}")


class Encoder(nn.Module):
  """Images [B, H, W, 3] in [0, 1] -> float32 codes [B, code_size].

  Attributes:
    filters: widths of the stride-2 convolutions, shallowest first.
    code_size: length of the feature vector.
    batch_norm: BatchNorm after each convolution.
    dtype: compute dtype; parameters are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  filters: Sequence[int] = (32, 64, 128, 256)
  code_size: int = 128
  batch_norm: bool = True
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    common.check_images(images, "CAE encoder")
    _check_architecture(images.shape, self.filters, self.code_size)
    x = images.astype(self.dtype)
    for i, width in enumerate(self.filters):
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                  param_dtype=jnp.float32, use_bias=not self.batch_norm,
                  name=f"conv{i + 1}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                         dtype=self.dtype, param_dtype=jnp.float32,
                         axis_name=self.axis_name, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    code = nn.Dense(self.code_size, dtype=self.dtype, param_dtype=jnp.float32,
                    name="code")(x)
    return code.astype(jnp.float32)


class Decoder(nn.Module):
  """Codes [B, code_size] -> float32 reconstructions [B, H, W, 3] in (0, 1).

  Attributes:
    image_size: (H, W) of the output.
    filters: the encoder's widths, shallowest first (used in reverse).
    batch_norm: BatchNorm after each hidden transposed convolution.
    dtype: compute dtype; parameters are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  image_size: tuple[int, int]
  filters: Sequence[int] = (32, 64, 128, 256)
  batch_norm: bool = True
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, code: jax.Array, train: bool) -> jax.Array:
    if code.ndim != 2:
      raise ValueError(f"the CAE decoder expects codes [B, code_size], got {code.shape}")
    factor = 2 ** len(self.filters)
    height, width = self.image_size[0] // factor, self.image_size[1] // factor
    x = nn.Dense(height * width * self.filters[-1], dtype=self.dtype,
                 param_dtype=jnp.float32, name="expand")(code.astype(self.dtype))
    x = nn.relu(x.reshape((code.shape[0], height, width, self.filters[-1])))
    # Hidden layers mirror the encoder: widths f_{L-1}, ..., f_1; the last layer
    # brings the side back to the image's and the channels to RGB.
    widths = list(self.filters[-2::-1]) + [3]
    for i, out in enumerate(widths):
      last = i == len(widths) - 1
      x = nn.ConvTranspose(out, (3, 3), strides=(2, 2), padding="SAME",
                           dtype=self.dtype, param_dtype=jnp.float32,
                           use_bias=last or not self.batch_norm,
                           name=f"deconv{i + 1}")(x)
      if not last:
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                           dtype=self.dtype, param_dtype=jnp.float32,
                           axis_name=self.axis_name, name=f"bn{i + 1}")(x)
        x = nn.relu(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class ConvAutoEncoder(nn.Module):
  """Encoder and decoder; ``__call__`` returns (reconstruction, code).

  Attributes:
    image_size: side S of the square input images; divisible by
      ``2 ** len(filters)``.
    filters: widths of the encoder's stride-2 convolutions.
    code_size: length of the encoder's feature vector.
    batch_norm: BatchNorm in encoder and decoder.
    dtype: compute dtype; parameters, codes and reconstructions are float32.
    axis_name: mapped axis for cross-device batch statistics, or None.
  """
  image_size: int
  filters: Sequence[int] = (32, 64, 128, 256)
  code_size: int = 128
  batch_norm: bool = True
  dtype: common.Dtype = jnp.float32
  axis_name: str | None = None

  def setup(self):
    _check_architecture((1, self.image_size, self.image_size, 3), self.filters,
                        self.code_size)
    self.encoder = Encoder(self.filters, self.code_size, self.batch_norm, self.dtype,
                           self.axis_name)
    self.decoder = Decoder((self.image_size, self.image_size), self.filters,
                           self.batch_norm, self.dtype, self.axis_name)

  def _check_side(self, images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"this CAE was built for images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.shape}")

  def encode(self, images: jax.Array, train: bool) -> jax.Array:
    """Images [B, S, S, 3] in [0, 1] -> float32 codes [B, code_size]."""
    self._check_side(images)
    return self.encoder(images, train=train)

  def __call__(self, images: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """Images [B, S, S, 3] in [0, 1] -> (reconstruction [B, S, S, 3], code [B, C])."""
    self._check_side(images)
    code = self.encoder(images, train=train)
    return self.decoder(code, train=train), code
