"""BIIGMA-Net: MICA, spatial attention, background sampling, loss, config, table.

Tiny DenseNet at 64 px (exits pool3_relu 8x8x14, pool4_relu 4x4x15, R = relu
2x2x11); four fake CPU devices (conftest) for the data-parallel parts.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from comtriplet_jax import configlib
from comtriplet_jax import losses
from comtriplet_jax import models
from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.evaluation import ablation_table
from comtriplet_jax.evaluation import biigma_plots
from comtriplet_jax.methods import biigma as biigma_method
from comtriplet_jax.models import biigma
from comtriplet_jax.models import mica

import method_checks

EXITS = ("pool3_relu", "pool4_relu", "relu")
SIZE = 64
NUM_CLASSES = 3
CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "biigma.py"


def _load_config_module():
  spec = importlib.util.spec_from_file_location("biigma_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


biigma_config = _load_config_module()


def make_config(**biigma_overrides) -> ml_collections.ConfigDict:
  """runlocal at test size: the narrow tiny DenseNet, no schedule or augmentation."""
  config = biigma_config.get_config("runlocal")
  config.num_train_steps = 4
  config.augment = False
  config.lr_schedule = "constant"
  config.biigma.backbone_overrides = ml_collections.ConfigDict()
  config.biigma.l2_weight = 0.01
  config.biigma.update(biigma_overrides)
  return config


def make_method(counts=(20, 6, 4), steps_per_epoch=10, **biigma_overrides):
  config = make_config(**biigma_overrides)
  return biigma_method.BIIGMA(config, num_classes=len(counts),
                              train_class_counts=np.array(counts),
                              steps_per_epoch=steps_per_epoch)


def random_images(key, n, size=SIZE):
  return jax.random.randint(key, (n, size, size, 3), 0, 256).astype(jnp.uint8)


def on_one_device(fn):
  """Runs ``fn`` with the 'data' axis bound (size 1), as the loop's step does."""
  def wrapped(*args):
    out = jax.vmap(lambda *a: fn(*a), axis_name=parallel.AXIS)(
        *jax.tree.map(lambda x: x[None], args))
    return jax.tree.map(lambda x: x[0], out)
  return wrapped


# ------------------------------------------------------------------------ MICA
def test_mica_heads_are_parallel_conv_se_blocks_concatenated_to_k_times_c():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  module = mica.MICA(num_heads=3, features=5, se_reduction=2)
  variables = module.init(jax.random.PRNGKey(1), x)
  concatenated, heads = module.apply(variables, x)
  assert concatenated.shape == (2, 4, 4, 15)
  assert heads.shape == (2, 3, 4, 4, 5)
  kernels = mica.projection_kernels(variables["params"])
  assert kernels.shape == (3, 1, 1, 6, 5)
  for k in range(3):
    np.testing.assert_array_equal(concatenated[..., 5 * k:5 * (k + 1)], heads[:, k])
    # Head k alone, from its slice of the parameters: 1x1 conv, ReLU, SE.
    one = jax.tree.map(lambda p, k=k: p[k], variables["params"]["heads"])
    expected = mica.ProjectionHead(5, se_reduction=2).apply({"params": one}, x)
    np.testing.assert_allclose(heads[:, k], expected, rtol=1e-5, atol=1e-6)
    # By hand: relu(x W) * sigmoid(relu(mean(.) W1) W2).
    y = np.maximum(np.einsum("bhwc,cd->bhwd", x, np.asarray(kernels[k, 0, 0])), 0)
    s = np.maximum(y.mean(axis=(1, 2)) @ np.asarray(one["se"]["squeeze"]["kernel"][0, 0]), 0)
    s = 1 / (1 + np.exp(-s @ np.asarray(one["se"]["excite"]["kernel"][0, 0])))
    np.testing.assert_allclose(heads[:, k], y * s[:, None, None, :], rtol=1e-4,
                               atol=1e-5)
  # Independently initialised heads.
  assert not np.allclose(kernels[0], kernels[1])


def test_mica_rejects_bad_input():
  with pytest.raises(ValueError, match="feature map"):
    mica.MICA(2).init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 3)))


# ----------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny_model_and_variables():
  model = biigma.BIIGMANet(models.get_backbone("tiny_densenet"), NUM_CLASSES, EXITS)
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, SIZE, SIZE, 3))
  variables = model.init({"params": jax.random.PRNGKey(1),
                          "sampling": jax.random.PRNGKey(2)}, images, train=False,
                         hybrid=True)
  return model, variables, images


def test_shapes_through_every_block(tiny_model_and_variables):
  model, variables, images = tiny_model_and_variables
  _, features = model.backbone.apply(
      {k: variables[k]["backbone"] for k in ("params", "batch_stats")}, images,
      train=False)
  assert features["pool3_relu"].shape == (4, 8, 8, 14)
  assert features["pool4_relu"].shape == (4, 4, 4, 15)
  assert features["relu"].shape == (4, 2, 2, 11)
  # Adapters: a 1x1 convolution keeping the channels, then pooling to 2x2.
  adapters = variables["params"]["spatial_attention"]
  assert {k: v["kernel"].shape for k, v in adapters.items()} == {
      "adapter_pool3_relu": (1, 1, 14, 14), "adapter_pool4_relu": (1, 1, 15, 15),
      "adapter_relu": (1, 1, 11, 11)}
  for name, window in (("pool3_relu", 4), ("pool4_relu", 2), ("relu", 1)):
    pooled = biigma.pool_to(features[name], (2, 2), "max")
    assert pooled.shape == (4, 2, 2, features[name].shape[-1])
    np.testing.assert_allclose(
        pooled[:, 0, 0], jnp.max(features[name][:, :window, :window], axis=(1, 2)))
  out = model.apply(variables, images, train=False, hybrid=True,
                    rngs={"sampling": jax.random.PRNGKey(3)})
  assert out["logits"].shape == out["hybrid_logits"].shape == (4, NUM_CLASSES)
  assert out["head_outputs"].shape == (4, 3, 2, 2, 11)
  assert out["attention_map"].shape == out["background_source"].shape == (4, 2, 2)
  assert np.all((out["attention_map"] > 0) & (out["attention_map"] < 1))
  # The classifier sees the K C = 33 concatenated channels.
  assert variables["params"]["classifier"]["logits"]["kernel"].shape == (33, NUM_CLASSES)


def test_inference_runs_the_clean_branch_only(tiny_model_and_variables):
  model, variables, images = tiny_model_and_variables
  # No 'sampling' rng: the inference path must not sample.
  out = model.apply(variables, images, train=False)
  assert set(out) == {"logits", "head_outputs"}
  with_hybrid = model.apply(variables, images, train=False, hybrid=True,
                            rngs={"sampling": jax.random.PRNGKey(9)})
  np.testing.assert_allclose(out["logits"], with_hybrid["logits"], rtol=1e-6)
  method = make_method()
  x = (images * 255).astype(jnp.uint8)
  predicted = method.predict(variables, {}, x)
  logits = model.apply(variables, method.prepare_images(x, None, train=False),
                       train=False)["logits"]
  np.testing.assert_allclose(predicted["scores"], jax.nn.softmax(logits), rtol=1e-5)


# ------------------------------------------------------ attention and pruning
def test_pruning_keeps_high_variance_channels_and_map_is_sigmoid_of_their_mean():
  rng = np.random.default_rng(0)
  # Channel c has spatial standard deviation c + 1 (sample 0) / reversed (1).
  base = rng.normal(size=(2, 3, 3, 4))
  base = (base - base.mean(axis=(1, 2), keepdims=True)) / base.std(axis=(1, 2),
                                                                   keepdims=True)
  scale = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
  features = jnp.asarray(base * scale[:, None, None, :] + 0.5, jnp.float32)
  keep = biigma.high_variance_channels(features)
  # Variances 1, 4, 9, 16: mean 7.5, keep the channels of variance 9 and 16.
  np.testing.assert_array_equal(keep, [[False, False, True, True],
                                       [True, True, False, False]])
  attention = biigma.channel_mean_attention(features, keep)
  f = np.asarray(features)
  expected = np.stack([f[0, ..., 2:].mean(-1), f[1, ..., :2].mean(-1)])
  np.testing.assert_allclose(attention, 1 / (1 + np.exp(-expected)), rtol=1e-5)
  np.testing.assert_allclose(biigma.channel_mean_attention(features),
                             1 / (1 + np.exp(-f.mean(-1))), rtol=1e-5)


# ------------------------------------------------------------------- sampling
def _sampling_inputs(batch=3, height=4, width=4, channels=5, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.uniform(0.5, 2.0, size=(batch, height, width, channels))
  salient = rng.uniform(size=(batch, height, width)) < 0.5
  # A few background positions hold zero vectors: the set must leave them out.
  zero = (~salient) & (rng.uniform(size=salient.shape) < 0.3)
  features[zero] = 0.0
  return jnp.asarray(features, jnp.float32), jnp.asarray(salient, jnp.float32)


def test_salient_positions_keep_their_vectors_background_comes_from_the_set():
  features, attention = _sampling_inputs()
  theta, source = biigma.sample_background(features, attention, jax.random.PRNGKey(0))
  hybrid = np.asarray(biigma.hybrid_features(features, attention, theta))
  f, m = np.asarray(features), np.asarray(attention).astype(bool)
  np.testing.assert_array_equal(hybrid[m], f[m])
  # The background set: the non-zero vectors R * M_inv of the batch.
  flat = (f * (1 - np.asarray(attention))[..., None]).reshape(-1, f.shape[-1])
  allowed = np.flatnonzero(np.any(flat != 0, axis=-1))
  src = np.asarray(source)
  assert np.isin(src, allowed).all()
  np.testing.assert_array_equal(hybrid[~m], flat[src[~m]])
  np.testing.assert_array_equal(np.asarray(theta).reshape(-1, f.shape[-1]),
                                flat[src.reshape(-1)])
  # Vectors come from other images too, not only the image's own background.
  images_of_source = src // (f.shape[1] * f.shape[2])
  assert np.any(images_of_source != np.arange(f.shape[0])[:, None, None])


def test_sampling_is_deterministic_from_the_key_and_has_no_gradient():
  features, attention = _sampling_inputs()
  a = biigma.sample_background(features, attention, jax.random.PRNGKey(1))
  b = biigma.sample_background(features, attention, jax.random.PRNGKey(1))
  c = biigma.sample_background(features, attention, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[1], c[1])
  grad = jax.grad(lambda r: jnp.sum(biigma.sample_background(
      r, attention, jax.random.PRNGKey(1))[0]))(features)
  np.testing.assert_array_equal(grad, 0.0)


def test_empty_background_set_gives_zero_background():
  features, _ = _sampling_inputs()
  theta, _ = biigma.sample_background(features, jnp.ones(features.shape[:3]),
                                      jax.random.PRNGKey(0))
  np.testing.assert_array_equal(theta, 0.0)


def test_background_set_is_gathered_across_devices():
  devices = 4
  features, attention = _sampling_inputs(batch=2 * devices, seed=3)
  sharded = lambda x: x.reshape((devices, 2) + x.shape[1:])  # noqa: E731
  keys = jax.random.split(jax.random.PRNGKey(0), devices)
  for mode in ("uniform", "permutation"):
    theta, source = jax.pmap(
        functools.partial(biigma.sample_background, mode=mode, axis_name="data"),
        axis_name="data")(sharded(features), sharded(attention), keys)
    flat = np.asarray(features * (1 - attention)[..., None]).reshape(
        -1, features.shape[-1])
    source = np.asarray(source)
    np.testing.assert_array_equal(np.asarray(theta).reshape(-1, flat.shape[-1]),
                                  flat[source.reshape(-1)])
    device_of_source = source // (2 * 4 * 4)
    assert np.any(device_of_source != np.arange(devices)[:, None, None, None]), mode
    if mode == "permutation":
      # The authors' shuffle: one permutation of the global batch, device 0's key,
      # exactly what one device shuffling the concatenated batch does.
      _, single = biigma.sample_background(features, attention, keys[0],
                                           mode="permutation")
      np.testing.assert_array_equal(source.reshape(single.shape), single)
      assert sorted(source.reshape(-1)) == list(range(flat.shape[0]))


def test_head_variance_map_matches_numpy():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4, 4, 6))
  got = biigma.head_variance_map(x)
  v = np.asarray(x).var(axis=(2, 3))
  keep = v > v.mean(axis=(0, 2))[None, :, None]
  maps = np.ones((3, 4, 4))
  for b in range(3):
    for k in range(2):
      mean = np.asarray(x)[b, k][..., keep[b, k]].mean(-1)
      maps[b] *= 1 / (1 + np.exp(-mean))
  np.testing.assert_allclose(got, maps, rtol=1e-5)


# ----------------------------------------------------------------------- loss
def _loss_inputs(method, batch=6):
  variables, _ = method.init(jax.random.PRNGKey(0), SIZE)
  images = random_images(jax.random.PRNGKey(1), batch)
  labels = jnp.arange(batch, dtype=jnp.int32) % method.num_classes
  return variables, {"image": images, "label": labels}


def _run_loss(method, variables, batch, step, rng=jax.random.PRNGKey(5)):
  fn = on_one_device(lambda p, s, b, r, t: method.loss(p, s, {}, b, r, step=t))
  loss, (_, metrics, _) = fn(variables["params"], variables["batch_stats"], batch, rng,
                             jnp.asarray(step, jnp.int32))
  return float(loss), {k: float(v) for k, v in metrics.items()}


def test_hybrid_term_is_off_before_the_start_epoch():
  method = make_method(sampling_start_epoch=2.0)  # 10 steps per epoch: step 20
  assert method.sampling_start_step == 20
  variables, batch = _loss_inputs(method)
  before, m_before = _run_loss(method, variables, batch, 19)
  after, m_after = _run_loss(method, variables, batch, 20)
  assert m_before["sampling_active"] == 0.0 and m_after["sampling_active"] == 1.0
  indep = m_before["indep"] + m_before["head_l2"]
  np.testing.assert_allclose(before, m_before["wce_clean"] + indep, rtol=1e-5)
  np.testing.assert_allclose(after, m_after["wce_clean"] + m_after["wce_hybrid"] + indep,
                             rtol=1e-5)
  assert m_after["wce_hybrid"] > 0


def test_independence_loss_on_the_model_heads_equals_the_kernel():
  method = make_method()
  variables, batch = _loss_inputs(method)
  rng = jax.random.PRNGKey(5)
  _, metrics = _run_loss(method, variables, batch, 0, rng)
  # The same forward pass by hand (same rng split as the loss), then the kernel.
  aug_rng, dropout_rng, sampling_rng = jax.random.split(rng, 3)
  images = method.prepare_images(batch["image"], aug_rng, train=True)
  out = on_one_device(lambda v, x: method.model.apply(
      v, x, train=True, hybrid=True, mutable=["batch_stats"],
      rngs={"dropout": dropout_rng, "sampling": sampling_rng})[0]["head_outputs"])(
          variables, images)
  b, k, h, w, c = out.shape
  expected = losses.hsic_independence_loss(out.reshape(b, k, h * w, c), sigma=1.0)
  np.testing.assert_allclose(metrics["indep"], expected, rtol=1e-5)
  kernel = np.asarray(variables["params"]["mica"]["heads"]["projection"]["kernel"])
  assert kernel.shape == (3, 1, 1, 11, 11)
  # Eq. 3 read literally: lambda times the l2 norm of the head kernels, not its
  # square.
  np.testing.assert_allclose(
      metrics["head_l2"],
      method.cfg.l2_weight * np.sqrt(np.sum(kernel.astype(np.float64)**2)), rtol=1e-5)
  assert metrics["indep"] > 0


def _forward_by_hand(method, variables, batch, rng=jax.random.PRNGKey(5)):
  """The loss' training forward pass, repeated here with the same key split."""
  aug_rng, dropout_rng, sampling_rng = jax.random.split(rng, 3)
  images = method.prepare_images(batch["image"], aug_rng, train=True)
  return on_one_device(lambda v, x: method.model.apply(
      v, x, train=True, hybrid=True, mutable=["batch_stats"],
      rngs={"dropout": dropout_rng, "sampling": sampling_rng})[0])(variables, images)


@pytest.mark.parametrize("class_weighting", ["dataset", "batch"])
def test_classification_terms_are_the_wce_of_the_clean_and_hybrid_logits(
    class_weighting):
  counts = (20, 6, 4)
  method = make_method(counts=counts, sampling_start_epoch=0.0,
                       class_weighting=class_weighting)
  variables, batch = _loss_inputs(method)
  batch["label"] = jnp.asarray([0, 0, 0, 0, 1, 2], jnp.int32)
  loss, m = _run_loss(method, variables, batch, 0)
  out = _forward_by_hand(method, variables, batch)
  if class_weighting == "dataset":   # Eq. 8: inverse frequency of the training set
    wce = functools.partial(losses.weighted_cross_entropy,
                            class_weights=losses.class_weights_from_counts(counts))
  else:                              # the authors' code: the batch's counts
    wce = functools.partial(losses.weighted_cross_entropy, weighting="batch")
  np.testing.assert_allclose(m["wce_clean"], wce(out["logits"], batch["label"]),
                             rtol=1e-5)
  np.testing.assert_allclose(m["wce_hybrid"], wce(out["hybrid_logits"], batch["label"]),
                             rtol=1e-5)
  assert not np.isclose(m["wce_clean"], m["wce_hybrid"])
  np.testing.assert_allclose(
      loss, m["wce_clean"] + m["wce_hybrid"] + m["indep"] + m["head_l2"], rtol=1e-5)


@pytest.mark.parametrize("ablation", ["no_indep", "cosine_indep", "no_sampling"])
def test_each_ablation_removes_or_replaces_only_its_term(ablation):
  fields = {"no_indep": dict(indep_measure="none"),
            "cosine_indep": dict(indep_measure="cosine"),
            "no_sampling": dict(sampling="none")}[ablation]
  paper = make_method(sampling_start_epoch=0.0)
  method = make_method(sampling_start_epoch=0.0, **fields)
  variables, batch = _loss_inputs(paper)
  _, m_paper = _run_loss(paper, variables, batch, 0)
  loss, m = _run_loss(method, variables, batch, 0)
  np.testing.assert_allclose(m["wce_clean"], m_paper["wce_clean"], rtol=1e-6)
  if ablation == "no_indep":       # neither HSIC nor the l2 term
    assert "indep" not in m and "head_l2" not in m
    np.testing.assert_allclose(loss, m["wce_clean"] + m["wce_hybrid"], rtol=1e-6)
  elif ablation == "cosine_indep":  # |cosine| instead of HSIC, the l2 term kept
    heads = _forward_by_hand(method, variables, batch)["head_outputs"]
    b, k, h, w, c = heads.shape
    expected = losses.hsic_independence_loss(heads.reshape(b, k, h * w, c),
                                             measure="cosine")
    np.testing.assert_allclose(m["indep"], expected, rtol=1e-5)
    assert m["head_l2"] == m_paper["head_l2"]
    np.testing.assert_allclose(
        loss, m["wce_clean"] + m["wce_hybrid"] + m["indep"] + m["head_l2"], rtol=1e-5)
  else:                             # no hybrid branch at all
    assert "wce_hybrid" not in m and "sampling_active" not in m
    assert m["indep"] == pytest.approx(m_paper["indep"], rel=1e-5)
    np.testing.assert_allclose(loss, m["wce_clean"] + m["indep"] + m["head_l2"],
                               rtol=1e-5)


def test_official_switches_change_what_they_should():
  paper = make_method(sampling_start_epoch=0.0)
  official = make_method(**dict(biigma_method.official_overrides(),
                                sampling_start_epoch=0.0))
  variables, batch = _loss_inputs(paper)
  official_variables, _ = official.init(jax.random.PRNGKey(0), SIZE)
  # Pooling-only adapters have no parameters.
  assert "spatial_attention" in variables["params"]
  assert "spatial_attention" not in official_variables["params"]
  loss, m = _run_loss(official, official_variables, batch, 0)
  assert m["kept_channel_fraction"] == 1.0  # no pruning on the exits
  assert m["head_l2"] == 0.0                # the l2 term is off
  np.testing.assert_allclose(
      loss, 0.5 * (m["indep"] + m["wce_clean"] + m["wce_hybrid"] + m["kl"]
                   + m["map_distance"]), rtol=1e-5)
  assert m["kl"] > 0 and m["map_distance"] > 0
  # Unordered pairs (sum over i < j) are K^2 / 2 = 4.5 times the paper's (1/K^2)
  # sum over ordered pairs at the same sigma and parameters.
  unordered = make_method(sampling_start_epoch=0.0, hsic_pairs="unordered")
  _, m_paper = _run_loss(paper, variables, batch, 0)
  _, m_unordered = _run_loss(unordered, variables, batch, 0)
  np.testing.assert_allclose(m_unordered["indep"], 4.5 * m_paper["indep"], rtol=1e-5)
  # Per-batch class weights: the batch's inverse counts, not the data set's.
  batch_weighted = make_method(sampling_start_epoch=0.0, class_weighting="batch")
  _, m_batch = _run_loss(batch_weighted, variables, batch, 0)
  assert not np.isclose(m_batch["wce_clean"], m_paper["wce_clean"])
  # Official permutation and start epoch 10 in the config.
  config = biigma_config.get_config("official")
  for field, value in biigma_method.official_overrides().items():
    assert config.biigma[field] == value, field
  assert config.learning_rate == 5e-5 and config.biigma.sigma == 2.5
  assert official.sampling_start_step == 0
  assert biigma_config.get_config("official").biigma.sampling_start_epoch == 10.0


def test_without_mica_and_without_sampling():
  baseline = make_method(use_mica=False, indep_measure="none", sampling="none")
  variables, batch = _loss_inputs(baseline)
  assert "mica" not in variables["params"]
  assert "spatial_attention" not in variables["params"]
  loss, m = _run_loss(baseline, variables, batch, 0)
  np.testing.assert_allclose(loss, m["wce_clean"], rtol=1e-6)
  assert "indep" not in m and "wce_hybrid" not in m
  with pytest.raises(ValueError, match="config.biigma.indep_measure"):
    make_method(use_mica=False)


def test_bad_config_values_name_the_field():
  with pytest.raises(ValueError, match="config.biigma.adapter"):
    make_method(adapter="conv")
  with pytest.raises(ValueError, match="config.biigma.sigma"):
    make_method(sigma=-1.0)
  with pytest.raises(ValueError, match="config.biigma.exits"):
    make_method(exits="pool3_relu,block5_pool")
  with pytest.raises(ValueError, match="unknown config argument"):
    biigma_config.get_config("heads=3,colour=red")
  with pytest.raises(ValueError, match="dataset"):
    biigma_config.get_config("dataset=isic20")


def test_config_defaults_and_arguments():
  config = biigma_config.get_config()
  assert (config.backbone, config.image_size, config.learning_rate) == (
      "densenet121", 224, 1e-4)
  assert (config.normalization, config.split_scheme, config.val_fraction) == (
      "unit", "80/20", 0.1)
  assert config.selection_metric == "f1_macro" and config.init_from == "imagenet"
  assert config.biigma.sampling_start_epoch == 20.0 and config.num_epochs == 100.0
  assert (config.dataset, config.task, config.biigma.sigma) == ("ham10000", "all", 1.0)
  mel = biigma_config.get_config("dataset=isic17_mel")
  assert (mel.dataset, mel.task, mel.biigma.sigma) == ("isic2017", "melanoma_vs_rest", 2.0)
  assert biigma_config.get_config("dataset=isic19").dataset == "isic2019"
  assert biigma_config.get_config("heads=2,sigma=4").biigma.num_heads == 2
  assert biigma_config.get_config("cosine_indep").biigma.indep_measure == "cosine"
  local = biigma_config.get_config("runlocal")
  configlib.validate(local)
  # The CPU recipe's departures from the paper are what results.json records.
  method = biigma_method.BIIGMA(local, num_classes=7, train_class_counts=np.ones(7),
                                steps_per_epoch=225)
  assert method.departures() == {"l2_weight": 0.044, "augment": True,
                                 "lr_schedule": "cosine"}
  assert dict(local.biigma.backbone_overrides) == {"growth_rate": 16,
                                                   "stem_filters": 24}
  runs = biigma_config.get_sweep("table2,runlocal,steps=300")
  assert len(runs) == len(set(runs)) == 12
  assert all(r.endswith(",runlocal,steps=300") for r in runs)
  assert "dataset=isic18,runlocal,steps=300" in runs  # heads 3, sigma 1: the best


# --------------------------------------------------------- end to end, 4 devices
DX = ["nv"] * 30 + ["mel"] * 12 + ["bkl"] * 6


@pytest.fixture(scope="module")
def fake_ham(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("ham_biigma")
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
  for i, dx in enumerate(DX):
    base = {"nv": 60, "mel": 190, "bkl": 120}[dx]
    pixels = rng.normal(base, 25, size=(30, 40, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"ISIC_{i:07d}.jpg", quality=95)
    rows.append(f"HAM_{i:07d},ISIC_{i:07d},{dx},histo,50.0,male,back")
  (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
  return root


def _e2e_config(fake_ham, data_dir, **overrides):
  config = make_config(sampling_start_epoch=0.0, report_images=3)
  config.update(dict(manual_dir=str(fake_ham), tfds_data_dir=str(data_dir),
                     batch_size=8, eval_batch_size=8, num_train_steps=3,
                     eval_every_steps=3, log_every_steps=1,
                     checkpoint_every_steps=3, heatmap_images=0))
  config.update(overrides)
  return config


def test_train_step_gathers_the_background_set_across_four_devices():
  method = make_method(sampling_start_epoch=0.0)
  par = parallel.DataParallel("pmap")
  assert par.num_devices == 4
  variables, _ = method.init(jax.random.PRNGKey(0), SIZE)
  tx = train.create_optimizer(method.config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]), method_state={})
  p_train = par.map(train.make_train_step(method, tx, method.config),
                    sharded_argnums=(1,))
  state = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  images = np.asarray(random_images(jax.random.PRNGKey(2), 8)).reshape(4, 2, SIZE,
                                                                       SIZE, 3)
  batch = {"image": images, "label": np.array([[0, 1], [2, 0], [1, 2], [0, 0]],
                                              np.int32)}
  for _ in range(2):
    state, metrics = p_train(state, par.shard_batch(batch), rng)
  metrics = par.unreplicate(metrics)
  assert metrics["nonfinite"] == 0.0 and np.isfinite(metrics["loss"])
  # Uniform draws from 4 devices' backgrounds: about 3/4 from the others.
  assert 0.3 < metrics["background_from_other_devices"] <= 1.0
  assert metrics["sampling_active"] == 1.0
  host = par.unreplicate(state)
  assert int(host.step) == 2


def test_train_and_evaluate_writes_metrics_and_pictures(fake_ham, tmp_path_factory,
                                                        tmp_path):
  config = _e2e_config(fake_ham, tmp_path_factory.mktemp("tfds"),
                       task="all", parallelism="shard_map", num_train_steps=4,
                       eval_every_steps=2, checkpoint_every_steps=2)
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["test"]["num_examples"] == results["num_examples"]["test"]
  method_checks.assert_results_match_rescoring(config, tmp_path, written)
  method_checks.assert_run_is_usable(tmp_path, fake_ham / "images", tmp_path / "predict")
  assert written["calibration"]["fitted_on"] == "validation"
  info = written["biigma"]
  # runlocal at test size departs from the paper in lambda only (scaled to the
  # tiny heads).
  assert info["settings"]["departures"] == {"l2_weight": 0.01}
  assert np.asarray(info["head_cosine"]).shape == (3, 3)
  np.testing.assert_allclose(np.diag(info["head_cosine"]), 1.0, atol=1e-4)
  for name in ("head_correlation.png", "attention_maps.png"):
    assert (tmp_path / name).stat().st_size > 1000
  assert set(info["figures"]) == {"head_correlation.png", "attention_maps.png"}

  # Killed after the step-2 checkpoint and resumed: the background sampling keys
  # come from the step, so the run ends exactly as the uninterrupted one.
  config.biigma.report_images = 0
  method_checks.kill_and_resume(config, tmp_path / "resumed", kill_at_batch=3)
  method_checks.assert_resumed_run_equals_whole_run(tmp_path, tmp_path / "resumed")


# ------------------------------------------------------------ plots and table
def test_plots_write_pngs_and_reject_bad_shapes(tmp_path):
  path = biigma_plots.plot_head_correlation({"a": np.eye(3), "b": np.ones((3, 3))},
                                            tmp_path / "h.png")
  assert path.stat().st_size > 1000
  images = np.zeros((2, 32, 32, 3), np.uint8)
  attention = np.full((2, 2, 2), 0.6)
  source = np.arange(8).reshape(2, 2, 2)[::-1]
  path = biigma_plots.plot_attention_samples(images, attention, source, [0, 1], [1, 1],
                                             ["a", "b"], tmp_path / "m.png")
  assert path.stat().st_size > 1000
  with pytest.raises(ValueError, match="square"):
    biigma_plots.plot_head_correlation({"a": np.ones((2, 3))}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="source"):
    biigma_plots.plot_attention_samples(images, attention, source[:1], [0, 1], [1, 1],
                                        ["a", "b"], tmp_path / "y.png")


def _fake_run(root, name, departures, f1, seed=0):
  workdir = root / name
  workdir.mkdir(parents=True)
  metrics = {"f1_macro": f1, "accuracy": f1 + 0.1, "recall_macro": f1 - 0.01,
             "precision_macro": f1 + 0.02}
  settings = {"dataset": "ham10000", "task": "all", "backbone": "tiny_densenet",
              "image_size": 64, "batch_size": 32, "seed": seed, "paper_sigma": 1.0,
              "sampling_start_step": 225, "departures": departures}
  (workdir / "results.json").write_text(json.dumps({
      "test": metrics, "validation": metrics, "best_step": 10,
      "num_train_steps": 300,
      "biigma": {"settings": settings,
                 "head_cosine": (np.eye(3) * f1 + 0.1).tolist()}}))


def test_ablation_table_from_a_sweep_directory(tmp_path):
  _fake_run(tmp_path, "best_s0", {}, 0.50, seed=0)
  _fake_run(tmp_path, "best_s1", {}, 0.60, seed=1)
  _fake_run(tmp_path, "heads1", {"num_heads": 1}, 0.40)
  _fake_run(tmp_path, "sigma2", {"sigma": 2.0}, 0.45)
  _fake_run(tmp_path, "noindep", {"indep_measure": "none"}, 0.30)
  _fake_run(tmp_path, "base", {"use_mica": False, "indep_measure": "none",
                               "sampling": "none"}, 0.20)
  _fake_run(tmp_path, "odd", {"adapter": "avgpool"}, 0.9)
  table = ablation_table.write_table(tmp_path)
  rows = table["rows"]
  np.testing.assert_allclose(rows["Heads = 3"]["f1"], 0.55)
  np.testing.assert_allclose(rows["Heads = 3"]["f1_std"], np.std([0.5, 0.6], ddof=1))
  assert rows["Sigma = 1.0"]["runs"] == rows["Heads = 3"]["runs"]
  assert rows["Heads = 1"]["f1"] == 0.40 and rows["Sigma = 2.0"]["f1"] == 0.45
  assert rows["Baseline"]["f1"] == 0.20 and "f1" not in rows["W/O MICA"]
  assert rows["Best Configuration"]["row"] == "Heads = 3"
  assert rows["Baseline"]["paper_isic18"]["f1"] == 0.7256
  assert table["unmatched_runs"] == ["odd"]
  markdown = (tmp_path / "table2.md").read_text()
  assert "| Baseline | 0.2000 |" in markdown and "0.7256" in markdown
  assert json.loads((tmp_path / "table2.json").read_text())["setting"]["seeds"] == [0, 1]
  assert (tmp_path / "figure3.png").exists()
  commands = ablation_table.run_sweep(tmp_path / "new", sweep="table2,runlocal,steps=5",
                                      config_file=CONFIG_FILE, dry_run=True)
  assert len(commands) == 12 and all("comtriplet_jax.main" in c for c in commands)


def test_ablation_table_sets_aside_a_departure_every_run_shares(tmp_path):
  # runlocal scales lambda in every run: that is the sweep's setting, and the
  # rows still match. Once runs differ in lambda, none of them is set aside.
  shared = {"l2_weight": 0.01}
  _fake_run(tmp_path, "best", dict(shared), 0.50)
  _fake_run(tmp_path, "heads1", {"num_heads": 1, **shared}, 0.40)
  _fake_run(tmp_path, "noindep", {"indep_measure": "none", **shared}, 0.30)
  table = ablation_table.write_table(tmp_path)
  assert table["rows"]["Heads = 3"]["runs"] == ["best"]
  assert table["rows"]["Heads = 1"]["f1"] == 0.40
  assert table["rows"]["W/O Lindep"]["f1"] == 0.30
  assert table["unmatched_runs"] == []
  assert table["setting"]["shared_departures"] == shared
  assert "departs from the paper in {'l2_weight': 0.01}" in (
      tmp_path / "table2.md").read_text()
  _fake_run(tmp_path, "other_lambda", {"l2_weight": 1.0}, 0.9)
  table = ablation_table.write_table(tmp_path)
  assert table["unmatched_runs"] == ["best", "heads1", "noindep", "other_lambda"]
  assert table["setting"]["shared_departures"] == {}
