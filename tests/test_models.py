"""Backbones and heads: Keras parameter counts, shapes, names, modes and dtypes.

Full-size backbones are only traced (`jax.eval_shape`), never run; the tiny variants
run for real at 32x32. Their variables are filled from NumPy rather than by `init`,
because compiling Flax's per-parameter threefry initialisers costs far more CPU time
than the forward passes under test (init itself is traced by `eval_shape` here).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax import models
from comtriplet_jax.models import common
from comtriplet_jax.models import heads

# Keras `count_params()` with include_top=False at 224x224 (issue 2).
KERAS_PARAM_COUNTS = {
    "vgg16": 14_714_688,
    "resnet50": 23_587_712,
    "densenet121": 7_037_504,
    "densenet169": 12_642_880,
    "efficientnetb3": 10_783_535,
}

# Feature maps at 224x224, [h, w, c] after the batch axis.
EXPECTED_FEATURES_224 = {
    "vgg16": {"block1_pool": (112, 112, 64), "block2_pool": (56, 56, 128),
              "block3_pool": (28, 28, 256), "block4_pool": (14, 14, 512),
              "block5_pool": (7, 7, 512)},
    "resnet50": {"conv2_block3_out": (56, 56, 256), "conv3_block4_out": (28, 28, 512),
                 "conv4_block6_out": (14, 14, 1024), "conv5_block3_out": (7, 7, 2048)},
    "densenet121": {"pool2_relu": (56, 56, 256), "pool3_relu": (28, 28, 512),
                    "pool4_relu": (14, 14, 1024), "relu": (7, 7, 1024)},
    "densenet169": {"pool2_relu": (56, 56, 256), "pool3_relu": (28, 28, 512),
                    "pool4_relu": (14, 14, 1280), "relu": (7, 7, 1664)},
    "efficientnetb3": {"stem_activation": (112, 112, 40), "block1b_add": (112, 112, 24),
                       "block2c_add": (56, 56, 32), "block3c_add": (28, 28, 48),
                       "block4e_add": (14, 14, 96), "block5e_add": (14, 14, 136),
                       "block6f_add": (7, 7, 232), "block7b_add": (7, 7, 384),
                       "top_activation": (7, 7, 1536)},
}
EXPECTED_POOLED = {"vgg16": 512, "resnet50": 2048, "densenet121": 1024,
                   "densenet169": 1664, "efficientnetb3": 1536}
TINY = ("tiny_vgg", "tiny_resnet", "tiny_densenet", "tiny_efficientnet")
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


@functools.lru_cache(maxsize=None)
def _traced(name: str, size: int, dtype=jnp.float32):
  """(pooled, features), variables of `name` as ShapeDtypeStructs, batch 2."""
  model = models.get_backbone(name, dtype=dtype)
  return jax.eval_shape(
      lambda: model.init_with_output(RNGS, jnp.zeros((2, size, size, 3)), train=False))


def _num_elements(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _filled_variables(shapes, seed: int = 0):
  """Concrete variables for `shapes`: He-normal kernels, BN statistics 0 / 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = path[-1].key
    if key == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
    if key in ("scale", "var", "variance"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if key == "bias":
      return jnp.asarray(rng.normal(0, 0.05, leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)  # BN mean, Normalization mean/count.

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(batch: int = 4, size: int = 32, seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)),
                     jnp.float32)


@functools.lru_cache(maxsize=None)
def _tiny_apply(name: str):
  """Jitted train and eval applies of a tiny backbone, and its filled variables."""
  model = models.get_backbone(name)
  (_, _), shapes = _traced(name, 32)
  variables = _filled_variables(shapes)

  @jax.jit
  def train(variables, images, dropout_rng):
    return model.apply(variables, images, train=True, mutable=["batch_stats"],
                       rngs={"dropout": dropout_rng})

  @jax.jit
  def evaluate(variables, images):
    return model.apply(variables, images, train=False)

  return variables, train, evaluate


@pytest.mark.parametrize("name", sorted(KERAS_PARAM_COUNTS))
def test_full_backbones_match_keras_counts_and_shapes_at_224(name):
  (pooled, features), variables = _traced(name, 224)
  assert set(variables) == {"params", "batch_stats"} or (
      name == "vgg16" and set(variables) == {"params"})
  assert _num_elements(variables) == KERAS_PARAM_COUNTS[name]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert pooled.shape == (2, EXPECTED_POOLED[name]) and pooled.dtype == jnp.float32
  assert {k: v.shape[1:] for k, v in features.items()} == EXPECTED_FEATURES_224[name]
  assert all(v.shape[0] == 2 for v in features.values())
  assert set(features) == set(models.FEATURES[name])


@pytest.mark.parametrize("name, layer, collection, shapes", [
    ("densenet121", "conv5_block16_2_conv", "params", {"kernel": (3, 3, 128, 32)}),
    ("densenet121", "pool4_bn", "batch_stats", {"mean": (1024,), "var": (1024,)}),
    ("densenet169", "conv5_block32_1_conv", "params", {"kernel": (1, 1, 1632, 128)}),
    ("densenet169", "bn", "params", {"scale": (1664,), "bias": (1664,)}),
    ("resnet50", "conv5_block3_3_bn", "params", {"scale": (2048,), "bias": (2048,)}),
    ("resnet50", "conv3_block1_0_conv", "params",
     {"kernel": (1, 1, 256, 512), "bias": (512,)}),
    ("resnet50", "conv1_conv", "params", {"kernel": (7, 7, 3, 64), "bias": (64,)}),
    ("vgg16", "block5_conv3", "params", {"kernel": (3, 3, 512, 512), "bias": (512,)}),
    ("efficientnetb3", "stem_conv", "params", {"kernel": (3, 3, 3, 40)}),
    # Depthwise kernels are [k, k, 1, C] (Keras: [k, k, C, 1]).
    ("efficientnetb3", "block2a_dwconv", "params", {"kernel": (3, 3, 1, 144)}),
    ("efficientnetb3", "block7b_se_expand", "params",
     {"kernel": (1, 1, 96, 2304), "bias": (2304,)}),
    ("efficientnetb3", "top_bn", "batch_stats", {"mean": (1536,), "var": (1536,)}),
    ("efficientnetb3", "normalization", "batch_stats",
     {"mean": (3,), "variance": (3,), "count": ()}),
])
def test_parameters_are_keyed_by_keras_layer_names(name, layer, collection, shapes):
  _, variables = _traced(name, 224)
  entry = variables[collection][layer]
  assert {k: v.shape for k, v in entry.items()} == shapes


def test_efficientnet_stage_outputs_are_keras_layer_names():
  b3 = models.get_backbone("efficientnetb3")
  assert b3.stage_output_names() == (
      "block1b_add", "block2c_add", "block3c_add", "block4e_add", "block5e_add",
      "block6f_add", "block7b_add")
  _, variables = _traced("efficientnetb3", 224)
  # The last block of each stage exists under the name its output is keyed by.
  for stage_output in b3.stage_output_names():
    assert stage_output.replace("_add", "_project_bn") in variables["params"]
  assert "block7c_project_bn" not in variables["params"]


@pytest.mark.parametrize("size, kernel", [(s, k) for s in range(4, 12) for k in (3, 5)])
def test_keras_correct_pad_equals_tensorflow_same_for_stride_two(size, kernel):
  total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)
  expected = (total // 2, total - total // 2)
  assert common.keras_correct_pad((size, size + 1), kernel)[0] == expected
  assert common.keras_correct_pad((size + 1, size), kernel)[1] == expected


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbones_train_and_eval_forward(name):
  variables, train, evaluate = _tiny_apply(name)
  images = _images()
  (pooled, features), updates = train(variables, images, jax.random.key(3))
  eval_pooled, eval_features = evaluate(variables, images)

  full_name = {"tiny_vgg": "vgg16", "tiny_resnet": "resnet50",
               "tiny_densenet": "densenet121",
               "tiny_efficientnet": "efficientnetb3"}[name]
  # jit returns dicts with sorted keys, so the depth order lives in FEATURES.
  assert set(features) == set(eval_features) == set(models.FEATURES[full_name])
  assert models.FEATURES[name] == models.FEATURES[full_name]
  assert pooled.dtype == eval_pooled.dtype == jnp.float32
  assert pooled.shape == eval_pooled.shape and pooled.shape[0] == 4
  last = features[models.FEATURES[name][-1]]
  np.testing.assert_allclose(pooled, last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # Each named exit halves the resolution or keeps it, never grows it.
  heights = [features[k].shape[1] for k in models.FEATURES[name]]
  assert heights == sorted(heights, reverse=True) and heights[-1] == 1
  for value in (pooled, eval_pooled, *features.values()):
    assert np.all(np.isfinite(value))

  if name == "tiny_vgg":
    assert updates == {} or not updates.get("batch_stats")
    np.testing.assert_allclose(pooled, eval_pooled, rtol=1e-6)
    return
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new) and len(old) > 1
  for layer in old:
    for stat in old[layer]:
      changed = not np.allclose(old[layer][stat], new[layer][stat])
      # BatchNorm running averages move; EfficientNet's input constants must not.
      assert changed == (layer != "normalization"), (layer, stat)
  # Batch statistics (train) and running averages (eval) give different outputs.
  assert not np.allclose(pooled, eval_pooled)


def test_momentum_matches_keras_running_average_update():
  variables, train, _ = _tiny_apply("tiny_densenet")
  images = _images()
  _, updates = train(variables, images, jax.random.key(0))
  # The stem BN sees conv1_conv's output; recompute its batch mean directly.
  kernel = variables["params"]["conv1_conv"]["kernel"]
  x = jnp.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  batch_mean = np.asarray(y.mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(updates["batch_stats"]["conv1_bn"]["mean"],
                             0.01 * batch_mean, rtol=1e-4, atol=1e-6)


def test_stochastic_depth_needs_rng_and_is_off_in_eval():
  variables, train, evaluate = _tiny_apply("tiny_efficientnet")
  images = _images()
  outputs = [train(variables, images, jax.random.key(k))[0][0] for k in (0, 0, 1)]
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert not np.allclose(outputs[0], outputs[2])
  np.testing.assert_array_equal(evaluate(variables, images)[0],
                                evaluate(variables, images)[0])
  model = models.get_backbone("tiny_efficientnet")
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, images, train=True,
                                         mutable=["batch_stats"]), variables)


def test_without_drop_connect_train_mode_needs_no_rng():
  model = models.get_backbone("tiny_efficientnet", drop_connect_rate=0.0)
  _, variables = _traced("tiny_efficientnet", 32)
  (pooled, _), _ = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=True,
                            mutable=["batch_stats"]), variables)
  assert pooled.shape == (2, 32)


def test_bfloat16_compute_keeps_float32_params_and_pooled_output():
  for name, size in (("densenet121", 224), ("tiny_efficientnet", 32),
                     ("tiny_resnet", 32), ("tiny_vgg", 32)):
    (pooled, features), variables = _traced(name, size, jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert pooled.dtype == jnp.float32
    assert all(v.dtype == jnp.bfloat16 for v in features.values())
  # And for real: bfloat16 compute stays close to float32 on the same variables.
  model = models.get_backbone("tiny_densenet", dtype=jnp.bfloat16)
  variables, _, evaluate = _tiny_apply("tiny_densenet")
  images = _images()
  low, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  high, _ = evaluate(variables, images)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, rtol=0.05,
                             atol=0.05 * float(np.abs(high).max()))


def test_axis_name_averages_batch_statistics_across_devices():
  devices = jax.local_devices()[:4]
  if len(devices) < 2:
    pytest.skip("needs several (fake) devices")
  n = len(devices)
  model = models.get_backbone("tiny_resnet", axis_name="data")
  variables, single_train, _ = _tiny_apply("tiny_resnet")
  images = _images(batch=2 * n)

  def step(v, x):
    (pooled, _), updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    return pooled, updates["batch_stats"]

  pooled, stats = jax.pmap(step, axis_name="data", in_axes=(None, 0),
                           devices=devices)(variables, images.reshape(n, 2, 32, 32, 3))
  (single_pooled, _), single = single_train(variables, images, jax.random.key(0))
  # Float32 rounding only: the last stage normalises over 8 values at 1x1.
  np.testing.assert_allclose(pooled.reshape(2 * n, -1), single_pooled, rtol=1e-3,
                             atol=1e-4)
  assert jax.tree.structure(stats) == jax.tree.structure(single["batch_stats"])
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(single["batch_stats"]),
                  strict=True):
    np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), rtol=1e-3, atol=1e-5)
  # Without the axis name each device would normalise with its own batch only.
  local = models.get_backbone("tiny_resnet")
  local_pooled = jax.pmap(lambda v, x: local.apply(v, x, train=True,
                                                   mutable=["batch_stats"])[0][0],
                          in_axes=(None, 0), devices=devices)(
                              variables, images.reshape(n, 2, 32, 32, 3))
  assert not np.allclose(local_pooled.reshape(2 * n, -1), single_pooled, atol=1e-3)


def test_heads_shapes_dtypes_and_dropout_only_in_train():
  pooled = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16)), jnp.bfloat16)
  head = heads.EmbeddingHead(embedding_size=8, dtype=jnp.bfloat16)
  variables = head.init({"params": jax.random.key(0)}, pooled, train=False)
  assert variables["params"]["embedding"]["kernel"].shape == (16, 8)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
  evals = [head.apply(variables, pooled, train=False,
                      rngs={"dropout": jax.random.key(k)}) for k in (0, 1)]
  assert evals[0].shape == (6, 8) and evals[0].dtype == jnp.float32
  np.testing.assert_array_equal(evals[0], evals[1])
  kernel = variables["params"]["embedding"]["kernel"]
  bias = variables["params"]["embedding"]["bias"]
  np.testing.assert_allclose(
      evals[0], np.asarray(pooled, np.float32) @ np.asarray(kernel) + np.asarray(bias),
      rtol=0.05, atol=0.05)
  trains = [head.apply(variables, pooled, train=True,
                       rngs={"dropout": jax.random.key(k)}) for k in (0, 1)]
  assert not np.allclose(trains[0], trains[1])
  assert not np.allclose(trains[0], evals[0])

  # Exact dropout arithmetic in float32: the kept inputs are scaled by 1 / (1 - 0.3).
  head32 = heads.EmbeddingHead(embedding_size=1, dropout_rate=0.3)
  x = jnp.ones((1, 1000))
  w = {"params": {"embedding": {"kernel": jnp.ones((1000, 1)), "bias": jnp.zeros(1)}}}
  out = head32.apply(w, x, train=True, rngs={"dropout": jax.random.key(0)})
  kept = float(out[0, 0]) * 0.7
  assert kept == pytest.approx(round(kept), abs=1e-2) and 600 < kept < 800

  classifier = heads.ClassifierHead(num_classes=3)
  cvars = classifier.init({"params": jax.random.key(0)}, pooled, train=False)
  logits = classifier.apply(cvars, pooled, train=True)  # Rate 0: no rng needed.
  assert logits.shape == (6, 3) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, classifier.apply(cvars, pooled, train=False))
  dropping = heads.ClassifierHead(num_classes=3, dropout_rate=0.5)
  a, b = (dropping.apply(cvars, pooled, train=True, rngs={"dropout": jax.random.key(k)})
          for k in (0, 1))
  assert not np.allclose(a, b)


def test_heads_reject_bad_inputs():
  with pytest.raises(ValueError, match="pooled features"):
    heads.EmbeddingHead(8).init(RNGS, jnp.zeros((2, 3, 3, 4)), train=False)
  with pytest.raises(ValueError, match="dropout_rate"):
    heads.EmbeddingHead(8, dropout_rate=1.0).init(RNGS, jnp.zeros((2, 4)), train=False)
  with pytest.raises(ValueError, match="num_classes"):
    heads.ClassifierHead(0).init(RNGS, jnp.zeros((2, 4)), train=False)


def test_registry_names_preprocessing_and_errors():
  assert set(models.BACKBONES) == set(KERAS_PARAM_COUNTS) | set(TINY) | {"small_resnet"}
  assert set(models.PREPROCESSING) == set(models.BACKBONES) == set(models.FEATURES)
  assert {k: models.PREPROCESSING[k] for k in KERAS_PARAM_COUNTS} == {
      "vgg16": "imagenet_caffe", "resnet50": "imagenet_caffe",
      "densenet121": "imagenet_torch", "densenet169": "imagenet_torch",
      "efficientnetb3": "raw"}
  with pytest.raises(ValueError, match="densenet121.*tiny_vgg"):
    models.get_backbone("densenet201")
  with pytest.raises(ValueError, match="growth"):
    models.get_backbone("resnet50", growth_rate=12)
  with pytest.raises(ValueError, match="dtype"):
    models.get_backbone("tiny_vgg", dtype=jnp.int32)
  model = models.get_backbone("densenet121", dtype=jnp.bfloat16, axis_name="data",
                              growth_rate=16)
  assert (model.growth_rate, model.axis_name, model.dtype) == (16, "data", jnp.bfloat16)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    jax.eval_shape(lambda: models.get_backbone("tiny_vgg").init(
        RNGS, jnp.zeros((2, 32, 32, 1)), train=False))


@pytest.mark.parametrize("name", sorted(KERAS_PARAM_COUNTS))
def test_counts_equal_keras_applications(name):
  keras = pytest.importorskip("keras")
  build = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50,
           "densenet121": keras.applications.DenseNet121,
           "densenet169": keras.applications.DenseNet169,
           "efficientnetb3": keras.applications.EfficientNetB3}[name]
  keras_model = build(weights=None, include_top=False, input_shape=(224, 224, 3))
  _, variables = _traced(name, 224)
  assert keras_model.count_params() == _num_elements(variables)
  ours = set(variables["params"]) | set(variables.get("batch_stats", {}))
  theirs = {layer.name for layer in keras_model.layers if layer.weights}
  # Keras names its Normalization layer by instance count ('normalization', ...).
  assert {n for n in ours if n != "normalization"} == {
      n for n in theirs if not n.startswith("normalization")}
