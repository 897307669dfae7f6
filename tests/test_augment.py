"""Device-side normalisation and the affine augmentation warp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax.data import augment


def _images(batch=3, height=16, width=16, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(0, 1, (batch, height, width, channels)),
                     jnp.float32)


def _params(batch, **overrides):
  params = augment.identity_params(batch)._asdict()
  for name, value in overrides.items():
    params[name] = jnp.full((batch,), value, params[name].dtype)
  return augment.AffineParams(**params)


@functools.partial(jax.jit, static_argnames=("fill_mode",))
def _warp(images, params, fill_mode="nearest"):
  matrices = augment.affine_matrices(params, images.shape[1:3])
  return augment.warp_images(images, matrices, fill_mode=fill_mode)


# Jitted once here: op-by-op dispatch of the vmapped sampler is slow on CPU.
_random_params = jax.jit(
    augment.random_affine_params, static_argnums=(1, 2),
    static_argnames=("max_shift_px", "rotation_deg", "zoom", "hflip", "vflip"))


# --- normalize ---------------------------------------------------------------

def test_normalize_modes_match_keras_formulas():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
  x = images.astype(np.float64)
  np.testing.assert_allclose(augment.normalize(jnp.asarray(images), "unit"),
                             x / 255, rtol=1e-6)
  np.testing.assert_allclose(augment.normalize(jnp.asarray(images), "raw"), x)
  caffe = x[..., ::-1] - np.array([103.939, 116.779, 123.68])
  np.testing.assert_allclose(
      augment.normalize(jnp.asarray(images), "imagenet_caffe"), caffe,
      rtol=1e-5, atol=1e-4)
  torch = (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(
      augment.normalize(jnp.asarray(images), "imagenet_torch"), torch,
      rtol=1e-5, atol=1e-5)
  # The caffe mode's first output channel is the blue input channel.
  out = augment.normalize(jnp.asarray(images), "imagenet_caffe")
  np.testing.assert_allclose(out[..., 0], x[..., 2] - 103.939, atol=1e-4)
  assert augment.normalize(jnp.asarray(images), "unit",
                           dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_normalize_rejects_unknown_mode_and_bad_shape():
  images = jnp.zeros((1, 4, 4, 3), jnp.uint8)
  with pytest.raises(ValueError, match="imagenet_torch"):
    augment.normalize(images, "imagenet")
  with pytest.raises(ValueError, match="RGB"):
    augment.normalize(jnp.zeros((1, 4, 4, 1), jnp.uint8), "unit")


# --- the warp ----------------------------------------------------------------

def test_identity_params_give_exactly_the_input():
  images = _images(height=12, width=16)
  for mode in augment.FILL_MODES:
    out = _warp(images, augment.identity_params(3), fill_mode=mode)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
  # Identity matrices are exactly the identity.
  matrices = augment.affine_matrices(augment.identity_params(2), (12, 16))
  np.testing.assert_array_equal(np.asarray(matrices),
                                np.broadcast_to(np.eye(3), (2, 3, 3)))


def test_augment_with_every_range_zero_is_identity():
  images = _images()
  out = jax.jit(functools.partial(
      augment.augment, max_shift_px=0.0, rotation_deg=0.0, zoom=(1.0, 1.0),
      hflip=False, vflip=False))(jax.random.key(3), images)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images))


def test_flips_alone_equal_jnp_flip_exactly():
  images = _images(height=10, width=14)
  np.testing.assert_array_equal(
      np.asarray(_warp(images, _params(3, flip_cols=True))),
      np.asarray(jnp.flip(images, axis=2)))
  np.testing.assert_array_equal(
      np.asarray(_warp(images, _params(3, flip_rows=True))),
      np.asarray(jnp.flip(images, axis=1)))
  np.testing.assert_array_equal(
      np.asarray(_warp(images, _params(3, flip_rows=True, flip_cols=True))),
      np.asarray(jnp.flip(images, axis=(1, 2))))


def test_quarter_turn_equals_rot90():
  images = _images(height=15, width=15)
  out = _warp(images, _params(3, angle=np.pi / 2))
  expected = jnp.rot90(images, k=1, axes=(1, 2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
  out = _warp(images, _params(3, angle=-np.pi / 2))
  expected = jnp.rot90(images, k=-1, axes=(1, 2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_integer_shift_moves_content_and_repeats_the_edge():
  images = _images(height=12, width=12)
  out = np.asarray(_warp(images, _params(3, shift_rows=2.0, shift_cols=-3.0)))
  x = np.asarray(images)
  # Content moves down by 2 and left by 3.
  np.testing.assert_array_equal(out[:, 2:, :-3], x[:, :-2, 3:])
  # 'nearest': the uncovered border repeats the edge pixels of the input.
  np.testing.assert_array_equal(out[:, 0, :-3], x[:, 0, 3:])
  np.testing.assert_array_equal(out[:, 2:, -1], x[:, :-2, -1])
  constant = np.asarray(_warp(images, _params(3, shift_rows=2.0),
                              fill_mode="constant"))
  np.testing.assert_array_equal(constant[:, :2], 0.0)


def test_zoom_two_magnifies_about_the_centre():
  # A 5x5 image: zoom 2 samples the centre pixel at the centre, and the output's
  # pixel next to the centre halfway between input pixels.
  images = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  out = np.asarray(_warp(images, _params(1, zoom=2.0)))[0, ..., 0]
  x = np.asarray(images)[0, ..., 0]
  assert out[2, 2] == x[2, 2]
  np.testing.assert_allclose(out[2, 3], 0.5 * (x[2, 2] + x[2, 3]))
  np.testing.assert_allclose(out[4, 4], x[3, 3])


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_warp_matches_scipy_style_map_coordinates(fill_mode):
  images = _images(batch=2, height=9, width=11, channels=2)
  params = _random_params(jax.random.key(0), 2, (9, 11), rotation_deg=30,
                          zoom=(0.6, 1.4))
  matrices = augment.affine_matrices(params, (9, 11))
  out = _warp(images, params, fill_mode=fill_mode)
  rows, cols = np.meshgrid(np.arange(9), np.arange(11), indexing="ij")
  for b in range(2):
    m = np.asarray(matrices[b], np.float64)
    coords = [m[0, 0] * rows + m[0, 1] * cols + m[0, 2],
              m[1, 0] * rows + m[1, 1] * cols + m[1, 2]]
    for c in range(2):
      expected = jax.scipy.ndimage.map_coordinates(
          images[b, ..., c], [jnp.asarray(a, jnp.float32) for a in coords],
          order=1, mode=fill_mode, cval=0.0)
      np.testing.assert_allclose(np.asarray(out[b, ..., c]),
                                 np.asarray(expected), atol=1e-5)


def test_augment_shapes_ranges_dtype_and_determinism():
  images = _images(batch=4, height=32, width=32)
  key = jax.random.key(7)
  run = jax.jit(augment.augment)
  out = run(key, images)
  assert out.shape == images.shape and out.dtype == images.dtype
  # Bilinear weights are convex and 'nearest' repeats pixels: no new extremes.
  assert float(out.min()) >= float(images.min()) - 1e-6
  assert float(out.max()) <= float(images.max()) + 1e-6
  np.testing.assert_array_equal(np.asarray(run(key, images)), np.asarray(out))
  other = run(jax.random.key(8), images)
  assert not np.allclose(np.asarray(other), np.asarray(out))
  # Each image gets its own warp: identical inputs come out different.
  same = jnp.broadcast_to(images[:1], images.shape)
  warped = np.asarray(run(key, same))
  assert not np.allclose(warped[0], warped[1])
  bf16 = run(key, images.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16


def test_augment_works_under_vmap_over_devices_axis():
  images = _images(batch=2, height=8, width=8)
  stacked = jnp.stack([images, images])  # [devices, B, H, W, C]
  keys = jax.random.split(jax.random.key(0), 2)
  out = jax.jit(jax.vmap(augment.augment))(keys, stacked)
  assert out.shape == stacked.shape
  np.testing.assert_array_equal(
      np.asarray(out[1]), np.asarray(jax.jit(augment.augment)(keys[1], images)))


def test_random_params_respect_the_paper_ranges():
  params = _random_params(jax.random.key(1), 4000, 64)
  max_shift = 25.0 * 64 / 256
  for shift in (params.shift_rows, params.shift_cols):
    assert float(jnp.abs(shift).max()) <= max_shift
    assert float(jnp.abs(shift).max()) > 0.9 * max_shift
  assert float(jnp.abs(params.angle).max()) <= np.deg2rad(10.0) + 1e-7
  assert 0.9 <= float(params.zoom.min()) and float(params.zoom.max()) <= 1.1
  for flip in (params.flip_rows, params.flip_cols):
    assert 0.45 < float(flip.mean()) < 0.55
  no_flips = _random_params(jax.random.key(1), 100, 64,
                                          hflip=False, vflip=False)
  assert not bool(no_flips.flip_rows.any() | no_flips.flip_cols.any())
  # One key per example: the first images' parameters do not depend on B.
  small = _random_params(jax.random.key(1), 100, 64)
  np.testing.assert_array_equal(np.asarray(small.angle),
                                np.asarray(params.angle[:100]))


def test_bad_arguments_are_rejected():
  images = _images()
  with pytest.raises(ValueError, match="fill_mode"):
    augment.augment(jax.random.key(0), images, fill_mode="wrap")
  with pytest.raises(ValueError, match="B, H, W, C"):
    augment.augment(jax.random.key(0), images[0])
  with pytest.raises(ValueError, match="zoom"):
    augment.augment(jax.random.key(0), images, zoom=(1.2, 0.8))
  with pytest.raises(ValueError, match="floating"):
    augment.warp_images(jnp.zeros((1, 4, 4, 3), jnp.uint8),
                        jnp.eye(3)[None])
  with pytest.raises(ValueError, match="matrices"):
    augment.warp_images(images, jnp.eye(3)[None])
