"""Grad-CAM: the maths against NumPy, localisation on toy CNNs, every method's target.

* The maths on a linear target whose gradient is known in closed form (the
  weight tensor), with an independent NumPy Grad-CAM including the bilinear
  upsampling (half-pixel centres, edges clamped).
* A toy CNN that sees only one quadrant of its input and reads only that
  quadrant of its feature map puts > 90% of the heat map there; its mutant
  that looks at the opposite quadrant does not. A third toy, reading one
  quadrant of a map whose channels respond everywhere, records what plain
  Grad-CAM does by design: its channel weights are spatial means of the
  gradient, so that map is spread over the image.
* For each method, ``heatmap_target`` gives ``predict``'s score (SDC, UDC,
  CAE) or the logits behind its probabilities (classifier, BIIGMA-Net), and the
  jitted Grad-CAM has the images' size, lies in [0, 1] and is finite.
* BIIGMA-Net's spatial attention M is the one its sampling branch computes.

Backbones downsample 32x, so the backbone methods run at 64 px (a 2 x 2 map,
the smallest with a picture); the CAE at 32 px (8 x 8). Variables are filled
from NumPy at the shapes ``init`` gives (:func:`random_variables`): compiling a
Flax ``init`` costs more than the rest of a test here, and any values serve.
"""

from __future__ import annotations

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from comtriplet_jax import models
from comtriplet_jax.evaluation import gradcam
from comtriplet_jax.methods import biigma
from comtriplet_jax.methods import cae
from comtriplet_jax.methods import classifier
from comtriplet_jax.methods import sdc
from comtriplet_jax.methods import udc
from comtriplet_jax.models import biigma as biigma_model

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ------------------------------------------------------------ NumPy reference
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear interpolation, half-pixel centres, clamped."""
  position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  low = np.floor(position).astype(int)
  high = np.minimum(low + 1, n_in - 1)
  frac = position - low
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
  np.add.at(matrix, (np.arange(n_out), high), frac)
  return matrix


def numpy_upsample(maps: np.ndarray, size) -> np.ndarray:
  rows = bilinear_matrix(maps.shape[1], size[0])
  cols = bilinear_matrix(maps.shape[2], size[1])
  return np.einsum("Hh,bhw,Ww->bHW", rows, maps, cols)


def numpy_grad_cam(feature_map, gradients, size) -> np.ndarray:
  a = np.asarray(feature_map, np.float64)
  g = np.asarray(gradients, np.float64)
  weights = g.mean(axis=(1, 2))                                   # [B, C]
  cam = np.maximum((a * weights[:, None, None, :]).sum(-1), 0.0)  # [B, h, w]
  up = numpy_upsample(cam, size)
  peak = up.max(axis=(1, 2), keepdims=True)
  return np.where(peak > 0, up / np.where(peak > 0, peak, 1.0), 0.0)


def random_variables(shapes, seed: int = 0):
  """Variables of the given shapes filled from NumPy (no jitted Flax init to compile).

  Kernels ~ N(0, 1 / fan_in), BatchNorm variances in [0.5, 1.5] and scales
  near 1, everything else ~ N(0, 0.1^2): any values serve these tests, which
  compare two computations on the same variables.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if "'var'" in name:
      values = rng.uniform(0.5, 1.5, shape)
    elif "'scale'" in name:
      values = rng.uniform(0.8, 1.2, shape)
    elif len(shape) >= 2:
      values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    else:
      values = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------- the maths
POOL = 4


def linear_target_fn(weight):
  """A = 4x4 average pool of the 'images'; target_b = sum(weight_b * A_b)."""
  def target_fn(images, delta):
    b, height, width, c = images.shape
    a = images.reshape(b, height // POOL, POOL, width // POOL, POOL, c).mean((2, 4))
    if delta is not None:
      a = a + delta
    return a, jnp.sum(a * weight, axis=(1, 2, 3))
  return target_fn


def test_linear_target_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 4 * POOL, 5 * POOL, 6)).astype(np.float32)
  # One weight tensor per image, so that images do not share a gradient.
  weight = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  fn = linear_target_fn(jnp.asarray(weight))

  feature_map, target, gradients = jax.jit(
      lambda x: gradcam.feature_gradients(fn, x))(images)
  pooled = images.reshape(3, 4, POOL, 5, POOL, 6).mean((2, 4))
  np.testing.assert_allclose(feature_map, pooled, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(target, (pooled * weight).sum((1, 2, 3)), rtol=1e-5,
                             atol=1e-5)
  # d target_b / dA_b = weight_b.
  np.testing.assert_allclose(gradients, weight, rtol=1e-6)

  result = jax.jit(lambda x: gradcam.grad_cam(fn, x))(images)
  assert result.heatmap.shape == (3, 4 * POOL, 5 * POOL)
  expected = numpy_grad_cam(pooled, weight, (4 * POOL, 5 * POOL))
  np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
  np.testing.assert_allclose(result.target, target)
  # The NumPy map is not trivial: ReLU cut part of it, and each image peaks at 1.
  assert (expected == 0).mean() > 0.05
  np.testing.assert_allclose(expected.max(axis=(1, 2)), 1.0)


def test_map_without_positive_evidence_is_zero_not_nan():
  # Every channel weight negative on a positive map: ReLU leaves nothing.
  images = np.ones((2, 8, 8, 3), np.float32)
  fn = linear_target_fn(-jnp.ones((2, 2, 2, 3)))
  heatmap = gradcam.grad_cam(fn, images).heatmap
  assert np.all(np.asarray(heatmap) == 0.0)


def test_target_function_shapes_are_checked():
  images = np.ones((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="one value per image"):
    gradcam.grad_cam(lambda x, d: (x, jnp.sum(x)), images)
  with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
    gradcam.grad_cam(lambda x, d: (x[..., 0], jnp.sum(x, (1, 2, 3))), images)
  with pytest.raises(ValueError, match="not a class"):
    gradcam.class_logit(jnp.zeros((2, 3)), 3)
  with pytest.raises(ValueError, match="classes 0"):
    gradcam.signed_score(jnp.zeros(2), 2)


# ------------------------------------------------------- toys and quadrants
SIDE = 64
QUADRANTS = {"top_left": (slice(0, 0.5), slice(0, 0.5)),
             "bottom_right": (slice(0.5, 1), slice(0.5, 1))}


def quadrant_slices(shape, name) -> tuple[slice, slice]:
  """Index of the quadrant ``name`` of a [H, W] grid (halves of each side)."""
  return tuple(slice(int(p.start * n), int(p.stop * n))
               for p, n in zip(QUADRANTS[name], shape))


def quadrant(x, name):
  """The quadrant ``name`` of [B, H, W, ...] x."""
  return x[(slice(None),) + quadrant_slices(x.shape[1:3], name)]


class QuadrantCNN(nn.Module):
  """Conv 3x3, ReLU, 2x2 pooling; the target reads one quadrant of the map.

  With ``sees_only_its_quadrant`` the input outside that quadrant is zeroed
  first, so the map's activity is there too.
  """
  looks_at: str
  sees_only_its_quadrant: bool = True

  @nn.compact
  def __call__(self, images, feature_delta=None):
    x = images
    if self.sees_only_its_quadrant:
      mask = jnp.zeros(x.shape[1:3])
      mask = mask.at[quadrant_slices(x.shape[1:3], self.looks_at)].set(1.0)
      x = x * mask[None, :, :, None]
    a = nn.relu(nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x))
    a = nn.avg_pool(a, (2, 2), strides=(2, 2))                  # [B, 32, 32, 8]
    if feature_delta is not None:
      a = a + feature_delta
    read = jnp.mean(quadrant(a, self.looks_at), axis=(1, 2))
    target = nn.Dense(1)(read)[:, 0]
    return a, target


def top_left_mass(model) -> np.ndarray:
  images = np.random.default_rng(1).uniform(size=(4, SIDE, SIDE, 3)).astype(np.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                              images))
  # Readout weights > 0, so that the map has positive evidence to show.
  variables["params"]["Dense_0"]["kernel"] = jnp.abs(
      variables["params"]["Dense_0"]["kernel"])
  heatmap = jax.jit(lambda v, x: gradcam.grad_cam(
      lambda y, d: model.apply(v, y, d), x).heatmap)(variables, images)
  heatmap = np.asarray(heatmap)
  assert heatmap.shape == (4, SIDE, SIDE) and heatmap.max() > 0
  return quadrant(heatmap, "top_left").sum((1, 2)) / heatmap.sum((1, 2))


def test_model_looking_at_one_quadrant_puts_its_heatmap_there():
  assert np.all(top_left_mass(QuadrantCNN("top_left")) > 0.9)
  # The mutant looking at another quadrant fails the same check.
  assert np.all(top_left_mass(QuadrantCNN("bottom_right")) < 0.1)


def test_plain_grad_cam_does_not_localise_a_readout_of_stationary_features():
  # Reads the top-left quadrant of a map whose channels fire everywhere alike:
  # Grad-CAM's weights are spatial means of the gradient, so about a quarter
  # of the map falls in that quadrant. Grad-CAM shows where the useful channels
  # are active, not where the gradient is.
  mass = top_left_mass(QuadrantCNN("top_left", sees_only_its_quadrant=False))
  assert np.all(mass < 0.5)


# ------------------------------------------------------------------ pictures
def test_overlay_and_grid(tmp_path):
  image = np.zeros((2, 4, 4, 3), np.uint8)
  image[..., 0] = 200
  heatmap = np.tile(np.linspace(0, 1, 4), (2, 4, 1))
  out = gradcam.overlay(image, heatmap, alpha=0.5, colormap="gray")
  assert out.dtype == np.uint8 and out.shape == image.shape
  # 'gray' maps h to (h, h, h): half the image plus half of 255 h.
  expected = np.rint(0.5 * image + 0.5 * 255 * heatmap[..., None])
  np.testing.assert_allclose(out, expected, atol=1)
  np.testing.assert_array_equal(gradcam.overlay(image, heatmap, alpha=0.0), image)
  with pytest.raises(ValueError, match="uint8"):
    gradcam.overlay(image.astype(np.float32), heatmap)
  with pytest.raises(ValueError, match="heatmap must be"):
    gradcam.overlay(image, heatmap[:, :3])

  images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  maps = np.random.default_rng(1).uniform(size=(5, 16, 16))
  path = gradcam.plot_gradcam_grid(tmp_path / "cams" / "grid.png", images, maps,
                                   titles=[f"image {i}" for i in range(5)],
                                   columns=3, title="Grad-CAM")
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size[0] > 100
  with pytest.raises(ValueError, match="titles"):
    gradcam.plot_gradcam_grid(tmp_path / "x.png", images, maps, titles=["a"])


# ------------------------------------------------------------------ methods
BATCH = 3


def _classifier():
  config = load_config("classifier")
  config.update(dict(image_size=64, backbone="tiny_vgg"))
  return classifier.Classifier(config, num_classes=2, train_class_counts=[3, 1])


def _clustering(module, name):
  def build():
    config = load_config(name)
    config.update(dict(image_size=64, backbone="tiny_vgg"))
    config[name].embedding_size = 8
    return getattr(module, name.upper())(config, num_classes=2,
                                         train_class_counts=[3, 1])
  return build


def _cae():
  config = load_config("cae", "size=32,code=8")
  config.cae.filters = (4, 8)
  config.cae.buffer_size = 16
  config.batch_size = 8
  return cae.CAE(config, num_classes=2, train_class_counts=[3, 1])


def _biigma():
  config = load_config("biigma", "runlocal")
  config.biigma.backbone_overrides = ml_collections.ConfigDict()
  return biigma.BIIGMA(config, num_classes=3, train_class_counts=np.array([20, 6, 4]))


BUILDERS = {"classifier": _classifier, "sdc": _clustering(sdc, "sdc"),
            "udc": _clustering(udc, "udc"), "cae": _cae, "biigma": _biigma}
LOGIT_METHODS = ("classifier", "biigma")


def _with_prototypes(name, method_state, key):
  """Random prototypes instead of the zero ones of a fresh state."""
  if name == "cae":
    return dict(method_state,
                prototypes=jax.random.normal(key, method_state["prototypes"].shape))
  if name in ("sdc", "udc"):
    centres = dict(method_state["centres"])
    k_min, k_maj = jax.random.split(key)
    centres["centre_min"] = jax.random.normal(k_min, centres["centre_min"].shape)
    centres["centre_maj"] = jax.random.normal(k_maj, centres["centre_maj"].shape)
    return dict(method_state, centres=centres)
  return method_state


def method_variables(method, seed: int = 0):
  shapes = jax.eval_shape(lambda key: method.init(key, method.config.image_size)[0],
                          jax.random.PRNGKey(0))
  return random_variables(shapes, seed)


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
  name = request.param
  method = BUILDERS[name]()
  size = method.config.image_size
  variables = method_variables(method)
  method_state = _with_prototypes(name, method.init_method_state(variables),
                                  jax.random.PRNGKey(2))
  images = jax.random.randint(jax.random.PRNGKey(1), (BATCH, size, size, 3), 0,
                              256).astype(jnp.uint8)
  return name, method, variables, method_state, images


def test_target_is_predicts_score_and_heatmap_is_a_picture(built):
  name, method, variables, method_state, images = built
  predicted = jax.jit(method.predict)(variables, method_state, images)
  cam = jax.jit(lambda v, s, x, c: gradcam.method_grad_cam(
      method, v, s, x, class_index=c))
  # One Grad-CAM per class (prototype scores: 1 = the score, 0 = its negative).
  classes = range(method.num_classes)
  results = [cam(variables, method_state, images, jnp.full((BATCH,), k))
             for k in classes]
  targets = np.stack([np.asarray(r.target) for r in results], axis=-1)
  _, default = method.heatmap_target(variables, method_state, images)
  if name in LOGIT_METHODS:
    # The targets are the logits behind predict's probabilities.
    probs = np.asarray(jax.nn.softmax(targets, axis=-1))
    scores = probs[:, 1] if method.num_classes == 2 else probs
    np.testing.assert_allclose(scores, predicted["scores"], atol=1e-5)
    default_class = (np.ones(BATCH, int) if method.num_classes == 2
                     else np.asarray(predicted["predictions"]))
    np.testing.assert_allclose(default, targets[np.arange(BATCH), default_class],
                               atol=1e-5)
  else:
    scores = np.asarray(predicted["scores"])
    assert np.ptp(scores) > 0   # not a constant target
    np.testing.assert_allclose(targets, np.stack([-scores, scores], -1), atol=1e-5)
    np.testing.assert_allclose(default, scores, atol=1e-5)
  size = images.shape[1]
  heatmaps = np.stack([np.asarray(r.heatmap) for r in results])   # [K, B, S, S]
  assert heatmaps.shape == (len(classes), BATCH, size, size)
  assert np.all(np.isfinite(heatmaps))
  assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
  # The gradient reaches the map: every image has evidence for some class,
  # and a map with any evidence peaks at 1.
  peaks = heatmaps.max(axis=(2, 3))
  assert np.all(peaks.max(axis=0) > 0)
  np.testing.assert_allclose(peaks[peaks > 0], 1.0, rtol=1e-6)


def test_feature_maps_are_the_last_convolutional_maps(built):
  name, method, variables, method_state, images = built
  feature_map, _ = method.heatmap_target(variables, method_state, images)
  x = method.prepare_images(images, None, train=False)
  if name == "cae":
    # The encoder's last BatchNorm output, through the ReLU, in image layout.
    _, state = method.model.apply(
        variables, x, train=False, method="encode", capture_intermediates=True,
        mutable=["intermediates"])
    last_bn = f"bn{len(method.settings.filters)}"
    expected = jax.nn.relu(state["intermediates"]["encoder"][last_bn]["__call__"][0])
  else:
    _, features = method.model.apply(
        variables, x, method=lambda m, y: m.backbone(y, train=False))
    last = (method.exit_names()[-1] if name == "biigma"
            else models.FEATURES[method.config.backbone][-1])
    expected = features[last]
  assert feature_map.shape == expected.shape and feature_map.shape[1] >= 2
  np.testing.assert_allclose(feature_map, expected, rtol=1e-6, atol=1e-6)


def test_biigma_spatial_attention_is_the_models_own():
  method = _biigma()
  size = method.config.image_size
  variables = method_variables(method)
  images = jax.random.randint(jax.random.PRNGKey(1), (BATCH, size, size, 3), 0,
                              256).astype(jnp.uint8)
  attention = np.asarray(jax.jit(method.spatial_attention)(variables, images))
  assert attention.shape == (BATCH, size, size)
  assert attention.min() >= 0.0 and attention.max() <= 1.0

  # M as the SpatialAttention module computes it inside a training-mode-free
  # hybrid pass, captured, then upsampled in NumPy.
  x = method.prepare_images(images, None, train=False)
  _, state = jax.jit(lambda v, y: method.build_model(axis_name=None).apply(
      v, y, train=False, hybrid=True, rngs={"sampling": jax.random.PRNGKey(7)},
      capture_intermediates=lambda m, _: isinstance(m, biigma_model.SpatialAttention),
      mutable=["intermediates"]))(variables, x)
  inside = np.asarray(state["intermediates"]["spatial_attention"]["__call__"][0]["map"])
  assert inside.shape[1:] == (2, 2) and np.ptp(inside) > 0
  np.testing.assert_allclose(attention, numpy_upsample(inside, (size, size)),
                             atol=1e-6)

  method.cfg.sampling = "none"
  method.cfg.kl_weight = 0.0
  method.cfg.map_distance_weight = 0.0
  with pytest.raises(ValueError, match="no spatial attention"):
    method.spatial_attention(variables, images)
