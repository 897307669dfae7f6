"""Device-side image normalisation and the COM-Triplet augmentation (pure JAX).

The host pipeline hands over uint8 images; everything here runs inside the
jitted step, per device, so augmentation costs no host CPU and follows the
step's RNG.

Augmentation (COM-Triplet paper, Sec. IV, "Implementation details"): random
shift of up to +-25 px at 256 px (scaled with the image size), horizontal and
vertical flips, rotation of +-10 degrees and zoom of 90-110%. All of them are
composed into one affine map per image and applied with a single bilinear
resampling, so an image is interpolated once however many transforms it gets.

Coordinates are (row, column) in pixels, with the image centre at
((H - 1) / 2, (W - 1) / 2). An image is flipped, then rotated (a positive
angle turns it counter-clockwise as displayed, like ``jnp.rot90``), then zoomed
(a zoom above 1 magnifies) about its centre, then shifted. Warping samples the
input at ``matrix @ (row, col, 1)`` of every output pixel, i.e. ``matrix`` is
the inverse of that forward map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NORMALIZATION_MODES = ("unit", "imagenet_caffe", "imagenet_torch", "raw")
FILL_MODES = ("nearest", "reflect", "constant")

# Keras' ``imagenet_utils.preprocess_input`` constants.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)

# The paper's shift range is +-25 px on 256 px images.
_PAPER_SHIFT_PX = 25.0
_PAPER_IMAGE_SIZE = 256.0


def normalize(images: jax.Array, mode: str,
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Maps uint8 (or 0-255 float) RGB images to a backbone's input range.

  Modes:
    unit: x / 255, as in both papers.
    imagenet_caffe: Keras VGG16 / ResNet50 ('caffe'): RGB -> BGR, then subtract
      the ImageNet mean [103.939, 116.779, 123.68] (BGR order); no scaling.
    imagenet_torch: Keras DenseNet ('torch'): x / 255, subtract mean
      [0.485, 0.456, 0.406], divide by std [0.229, 0.224, 0.225] (RGB).
    raw: float 0-255, for Keras EfficientNet, which normalises inside the model.

  Args:
    images: [..., H, W, 3] RGB values in [0, 255].
    mode: one of ``NORMALIZATION_MODES``.
    dtype: output dtype.

  Returns:
    [..., H, W, 3] images of ``dtype``.
  """
  if mode not in NORMALIZATION_MODES:
    raise ValueError(
        f"normalization mode must be one of {NORMALIZATION_MODES}, got "
        f"{mode!r}")
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(
        f"images must be [..., H, W, 3] RGB, got shape {images.shape}")
  x = images.astype(jnp.float32)
  if mode == "unit":
    x = x / 255.0
  elif mode == "imagenet_caffe":
    x = x[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)
  elif mode == "imagenet_torch":
    x = (x / 255.0 - jnp.asarray(_TORCH_MEAN_RGB, jnp.float32)) / jnp.asarray(
        _TORCH_STD_RGB, jnp.float32)
  return x.astype(dtype)


class AffineParams(NamedTuple):
  """Per-image parameters of the augmentation warp, each of shape [B].

  Attributes:
    flip_rows: True flips the image upside down (vertical flip).
    flip_cols: True mirrors the image left-right (horizontal flip).
    angle: rotation in radians, counter-clockwise as displayed.
    zoom: scale factor about the centre; above 1 magnifies.
    shift_rows: shift in pixels, positive moves content down.
    shift_cols: shift in pixels, positive moves content right.
  """
  flip_rows: jax.Array
  flip_cols: jax.Array
  angle: jax.Array
  zoom: jax.Array
  shift_rows: jax.Array
  shift_cols: jax.Array


def identity_params(batch: int) -> AffineParams:
  """Parameters of the identity warp for ``batch`` images."""
  zeros = jnp.zeros((batch,), jnp.float32)
  no = jnp.zeros((batch,), bool)
  ones = jnp.ones((batch,), jnp.float32)
  return AffineParams(no, no, zeros, ones, zeros, zeros)


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def random_affine_params(key: jax.Array, batch: int,
                         image_size: int | tuple[int, int], *,
                         max_shift_px: float | None = None,
                         rotation_deg: float = 10.0,
                         zoom: tuple[float, float] = (0.9, 1.1),
                         hflip: bool = True, vflip: bool = True
                         ) -> AffineParams:
  """Samples the COM-Triplet augmentation parameters, one key per image.

  Every image draws from its own key (``jax.random.split(key, batch)``), so an
  image's warp does not depend on the batch size it is drawn in.

  Args:
    key: PRNG key.
    batch: number of images B.
    image_size: H (square) or (H, W).
    max_shift_px: shift range in pixels along both axes; None scales the paper's
      +-25 px at 256 px to the image size (e.g. 6.25 px at 64 px).
    rotation_deg: rotation range +-degrees.
    zoom: (low, high) range of the zoom factor.
    hflip: whether to flip left-right with probability 1/2.
    vflip: whether to flip upside down with probability 1/2.

  Returns:
    ``AffineParams`` of arrays of shape [B].
  """
  height, width = _image_hw(image_size)
  if zoom[0] <= 0 or zoom[0] > zoom[1]:
    raise ValueError(
        f"zoom must be (low, high) with 0 < low <= high, got {zoom}")
  if rotation_deg < 0:
    raise ValueError(f"rotation_deg must be >= 0, got {rotation_deg}")
  if max_shift_px is None:
    max_rows = _PAPER_SHIFT_PX * height / _PAPER_IMAGE_SIZE
    max_cols = _PAPER_SHIFT_PX * width / _PAPER_IMAGE_SIZE
  elif max_shift_px < 0:
    raise ValueError(f"max_shift_px must be >= 0, got {max_shift_px}")
  else:
    max_rows = max_cols = float(max_shift_px)
  max_angle = jnp.deg2rad(rotation_deg)

  def sample_one(image_key):
    keys = jax.random.split(image_key, 6)
    return AffineParams(
        flip_rows=jax.random.bernoulli(keys[0]) & vflip,
        flip_cols=jax.random.bernoulli(keys[1]) & hflip,
        angle=jax.random.uniform(keys[2], (), jnp.float32, -max_angle,
                                 max_angle),
        zoom=jax.random.uniform(keys[3], (), jnp.float32, zoom[0], zoom[1]),
        shift_rows=jax.random.uniform(keys[4], (), jnp.float32, -max_rows,
                                      max_rows),
        shift_cols=jax.random.uniform(keys[5], (), jnp.float32, -max_cols,
                                      max_cols))

  return jax.vmap(sample_one)(jax.random.split(key, batch))


def affine_matrices(params: AffineParams,
                    image_size: int | tuple[int, int]) -> jax.Array:
  """Sampling matrices of the warps: output (row, col, 1) -> input position.

  The forward map is p_out = c + t + zoom * R(angle) F (p_in - c), with F the
  flips, R the rotation, c the centre and t the shift; its inverse is
  p_in = c + F R(-angle) (p_out - c - t) / zoom. With identity parameters every
  entry is exactly 0 or 1 and the offset exactly 0, so warping is exact.

  Args:
    params: ``AffineParams`` with arrays of shape [B].
    image_size: H (square) or (H, W).

  Returns:
    [B, 3, 3] float32 matrices.
  """
  height, width = _image_hw(image_size)
  centre = jnp.asarray([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)

  def one(flip_rows, flip_cols, angle, zoom, shift_rows, shift_cols):
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # R(-angle) in (row, col) coordinates with rows pointing down.
    unrotate = jnp.stack([jnp.stack([cos, sin]), jnp.stack([-sin, cos])])
    unflip = jnp.stack([jnp.where(flip_rows, -1.0, 1.0),
                        jnp.where(flip_cols, -1.0, 1.0)])
    linear = unflip[:, None] * unrotate / zoom
    shift = jnp.stack([shift_rows, shift_cols]).astype(jnp.float32)
    # Elementwise rather than a matmul: default TPU/GPU matmul precision (bf16,
    # TF32) would move sampling points by a fraction of a pixel.
    offset = centre - jnp.sum(linear * (centre + shift)[None, :], axis=1)
    top = jnp.concatenate([linear, offset[:, None]], axis=1)
    return jnp.concatenate([top, jnp.asarray([[0.0, 0.0, 1.0]], jnp.float32)])

  return jax.vmap(one)(*params)


def _fix_index(index: jax.Array, size: int,
               fill_mode: str) -> tuple[jax.Array, jax.Array | None]:
  """Maps integer indices into [0, size) by the fill mode.

  Returns the fixed indices and, for 'constant', a mask of the indices that were
  inside the image (None for the other modes, where every sample is used).
  """
  if fill_mode == "nearest":
    return jnp.clip(index, 0, size - 1), None
  if fill_mode == "reflect":
    # scipy.ndimage 'reflect' (half-sample symmetric): dcba | abcd | dcba.
    period = 2 * size
    folded = jnp.mod(index, period)
    return jnp.where(folded >= size, period - 1 - folded, folded), None
  return jnp.clip(index, 0, size - 1), (index >= 0) & (index < size)


def warp_images(images: jax.Array, matrices: jax.Array, *,
                fill_mode: str = "nearest", cval: float = 0.0) -> jax.Array:
  """Resamples every image at its affine map with bilinear interpolation.

  Equivalent to ``jax.scipy.ndimage.map_coordinates(order=1, mode=fill_mode)``
  per channel, but gathers all channels of a pixel at once.

  Args:
    images: [B, H, W, C] float images.
    matrices: [B, 3, 3] (or [B, 2, 3]) sampling matrices, as from
      ``affine_matrices``.
    fill_mode: how samples outside the image are filled: 'nearest' (Keras'
      default: repeat the edge pixel), 'reflect' (scipy's half-sample mirror) or
      'constant' (``cval``).
    cval: fill value for 'constant'.

  Returns:
    [B, H, W, C] warped images, same dtype as ``images``.
  """
  if fill_mode not in FILL_MODES:
    raise ValueError(
        f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point (normalise first), got "
                     f"{images.dtype}")
  batch, height, width, _ = images.shape
  if matrices.shape not in ((batch, 3, 3), (batch, 2, 3)):
    raise ValueError(f"matrices must be [{batch}, 3, 3] for {batch} images, "
                     f"got shape {matrices.shape}")
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")

  def warp_one(image, matrix):
    matrix = matrix.astype(jnp.float32)
    # Elementwise multiply-adds, exact in float32 where a matmul may not be.
    coords = jnp.stack(
        [matrix[i, 0] * rows + matrix[i, 1] * cols + matrix[i, 2]
         for i in (0, 1)], axis=-1)  # [H, W, 2] input (row, col)
    lower = jnp.floor(coords)
    upper_weight = coords - lower
    lower = lower.astype(jnp.int32)
    out = jnp.zeros(image.shape, jnp.float32)
    for d_row in (0, 1):  # the four bilinear corners, not samples
      row, row_ok = _fix_index(lower[..., 0] + d_row, height, fill_mode)
      w_row = upper_weight[..., 0] if d_row else 1.0 - upper_weight[..., 0]
      for d_col in (0, 1):
        col, col_ok = _fix_index(lower[..., 1] + d_col, width, fill_mode)
        w_col = upper_weight[..., 1] if d_col else 1.0 - upper_weight[..., 1]
        values = image[row, col].astype(jnp.float32)  # [H, W, C]
        if row_ok is not None:
          values = jnp.where((row_ok & col_ok)[..., None], values, cval)
        out = out + (w_row * w_col)[..., None] * values
    return out.astype(image.dtype)

  return jax.vmap(warp_one)(images, matrices)


def augment(key: jax.Array, images: jax.Array, *,
            max_shift_px: float | None = None, rotation_deg: float = 10.0,
            zoom: tuple[float, float] = (0.9, 1.1), hflip: bool = True,
            vflip: bool = True, fill_mode: str = "nearest") -> jax.Array:
  """The COM-Triplet augmentation: one random affine warp per image.

  Args:
    key: PRNG key; image i uses ``jax.random.split(key, B)[i]``.
    images: [B, H, W, C] float images (normalised or not: bilinear interpolation
      and 'nearest'/'reflect' filling keep values within the input's range).
    max_shift_px, rotation_deg, zoom, hflip, vflip: as in
      ``random_affine_params``.
    fill_mode: see ``warp_images``; 'nearest' is Keras' default.

  Returns:
    [B, H, W, C] augmented images, same dtype as ``images``.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if fill_mode not in FILL_MODES:
    raise ValueError(
        f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
  batch, height, width, _ = images.shape
  params = random_affine_params(key, batch, (height, width),
                                max_shift_px=max_shift_px,
                                rotation_deg=rotation_deg, zoom=zoom,
                                hflip=hflip, vflip=vflip)
  return warp_images(images, affine_matrices(params, (height, width)),
                     fill_mode=fill_mode)
