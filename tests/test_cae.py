"""The convolutional auto-encoder baseline: corruption, prototypes, steps, the loop."""

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from comtriplet_jax import configlib
from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.methods import cae
from comtriplet_jax.models import cae as cae_model

import method_checks

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("cae_config", CONFIGS / "cae.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**overrides):
  config = load_config("size=32,code=8")
  config.cae.filters = (4, 8)
  config.cae.buffer_size = 16
  config.batch_size = 8
  config.eval_batch_size = 8
  config.learning_rate = 3e-3
  config.heatmap_images = 0   # the CAE's Grad-CAM is checked in test_gradcam.py
  config.update(overrides)
  return config


# ------------------------------------------------------------------ corruption
corrupt = jax.jit(cae.corrupt, static_argnames=("noise_std", "crop_min"))


def test_corruption_is_deterministic_from_the_key():
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3))
  a = corrupt(jax.random.PRNGKey(1), images, noise_std=0.1, crop_min=0.7)
  b = corrupt(jax.random.PRNGKey(1), images, noise_std=0.1, crop_min=0.7)
  c = corrupt(jax.random.PRNGKey(2), images, noise_std=0.1, crop_min=0.7)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Each image has its own key: two copies of one image are corrupted differently.
  twins = corrupt(jax.random.PRNGKey(1), jnp.stack([images[0], images[0]]),
                      noise_std=0.1, crop_min=0.7)
  assert not np.allclose(twins[0], twins[1])


def test_no_crop_and_no_noise_is_the_identity():
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  out = corrupt(jax.random.PRNGKey(5), images, noise_std=0.0, crop_min=1.0)
  np.testing.assert_allclose(out, images, atol=1e-6)


def test_crop_resized_back_zooms_a_ramp():
  # Rows hold their own index: a crop of side f * S resized to S turns the ramp's
  # slope from 1 to f per row, with f in [crop_min, 1].
  size = 32
  ramp = jnp.broadcast_to(jnp.arange(size, dtype=jnp.float32)[:, None, None] / 100.0,
                          (size, size, 3))
  out = np.asarray(corrupt(jax.random.PRNGKey(3), jnp.stack([ramp] * 6),
                               noise_std=0.0, crop_min=0.6))
  for image in out:
    slopes = np.diff(image[2:-2, size // 2, 0]) * 100.0
    np.testing.assert_allclose(slopes, slopes[0], atol=1e-4)  # a uniform zoom
    assert 0.6 - 1e-4 <= slopes[0] <= 1.0 + 1e-4
    np.testing.assert_allclose(image[:, :, 0], image[:, :1, 0].repeat(size, 1),
                               atol=1e-6)  # columns untouched by a row ramp
  assert np.ptp([np.diff(im[2:4, 0, 0])[0] for im in out]) > 1e-3  # crops differ


def test_noise_has_the_configured_std():
  images = jnp.full((4, 32, 32, 3), 0.5)
  out = corrupt(jax.random.PRNGKey(0), images, noise_std=0.1, crop_min=1.0)
  assert float(jnp.std(out - images)) == pytest.approx(0.1, abs=0.005)
  assert float(jnp.mean(out - images)) == pytest.approx(0.0, abs=0.005)


def test_corruption_rejects_bad_settings():
  images = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="crop_min"):
    cae.corrupt(jax.random.PRNGKey(0), images, noise_std=0.1, crop_min=0.0)
  with pytest.raises(ValueError, match="noise_std"):
    cae.corrupt(jax.random.PRNGKey(0), images, noise_std=-1.0, crop_min=0.5)


# ------------------------------------------------------------------ prototypes
def test_running_prototypes_by_hand():
  rng = np.random.default_rng(0)
  major = np.array([5.0, 0.0]) + rng.normal(0, 0.1, (7, 2))
  minor = np.array([0.0, 5.0]) + rng.normal(0, 0.1, (3, 2))
  buffer = np.concatenate([major[:4], minor, major[4:]])
  prototypes, sizes = jax.jit(functools.partial(
      cae.running_prototypes, n_init=4, max_iter=50))(
          jax.random.PRNGKey(0), jnp.asarray(buffer, jnp.float32))
  np.testing.assert_allclose(prototypes[0], major.mean(0), atol=1e-5)
  np.testing.assert_allclose(prototypes[1], minor.mean(0), atol=1e-5)
  np.testing.assert_array_equal(sizes, [7.0, 3.0])


def test_update_state_fills_a_ring_buffer():
  method = cae.CAE(tiny_config(), num_classes=2, train_class_counts=[5, 3])
  update = jax.jit(method.update_state)
  state = method.init_method_state(None)
  for step in range(3):  # 3 x 8 rows into a buffer of 16: wraps once
    features = jnp.full((8, 8), float(step)) + jnp.arange(8.0)[:, None] * 1e-3
    state = update(state, {"features": features})
    if step == 0:  # half full: not clustered yet
      np.testing.assert_array_equal(state["prototypes"], 0.0)
  assert int(state["seen"]) == 24
  np.testing.assert_allclose(state["features"][:8, 0], 2.0 + jnp.arange(8.0) * 1e-3)
  np.testing.assert_allclose(state["features"][8:, 0], 1.0 + jnp.arange(8.0) * 1e-3)
  # Two tight groups of 8: the prototypes are their means.
  np.testing.assert_array_equal(state["cluster_sizes"], [8.0, 8.0])
  np.testing.assert_allclose(sorted(np.asarray(state["prototypes"][:, 0])),
                             [1.0035, 2.0035], atol=1e-5)


def test_config_is_validated_by_name():
  for field, value, message in [
      ("noise_std", -0.1, "config.cae.noise_std"),
      ("crop_min", 1.5, "config.cae.crop_min"),
      ("buffer_size", 4, "config.cae.buffer_size"),
      ("distance", "l1", "config.cae.distance='l1'"),
      ("final_prototypes", "best", "config.cae.final_prototypes"),
  ]:
    config = tiny_config()
    config.cae[field] = value
    with pytest.raises(ValueError, match=message):
      cae.CAE(config, num_classes=2, train_class_counts=[5, 3])
  with pytest.raises(ValueError, match="divisible"):
    cae.CAE(tiny_config(image_size=34), num_classes=2, train_class_counts=[5, 3])
  for arg in ("", "runlocal"):  # the shipped configs build
    config = load_config(arg)
    configlib.validate(config)
    cae.CAE(config, num_classes=2, train_class_counts=[5, 3])
  with pytest.raises(ValueError, match="config.normalization"):
    cae.CAE(tiny_config(normalization="backbone"), num_classes=2,
            train_class_counts=[5, 3])


def test_model_shapes():
  model = cae_model.ConvAutoEncoder(image_size=32, filters=(4, 8), code_size=6)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  reconstruction, code = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables, images)
  assert reconstruction.shape == (2, 32, 32, 3) and code.shape == (2, 6)
  assert reconstruction.dtype == code.dtype == jnp.float32
  code = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method="encode"),
                        variables, images)
  assert code.shape == (2, 6)
  with pytest.raises(ValueError, match="built for images"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 16, 16, 3)), train=False),
                   variables)
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(lambda: cae_model.ConvAutoEncoder(image_size=36, filters=(4, 8, 8))
                   .init(jax.random.PRNGKey(0), jnp.zeros((1, 36, 36, 3)), train=False))


# ------------------------------------------------------------- data-parallel step
def _fixed_batch(devices, per_device, size=32):
  """Smooth blobs, dark or bright, as uint8 [D, b, S, S, 3]."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size] / size
  images = []
  for i in range(devices * per_device):
    cy, cx = rng.uniform(0.3, 0.7, 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
    base = 200 if i % 2 else 60
    images.append((base * blob[..., None] + 30 * rng.uniform(size=3)).clip(0, 255))
  images = np.asarray(images, np.uint8).reshape((devices, per_device, size, size, 3))
  labels = np.zeros((devices, per_device), np.int32)
  return {"image": images, "label": labels}


def test_steps_on_four_devices_lower_the_loss_and_agree_on_the_state():
  par = parallel.DataParallel("pmap")
  assert par.num_devices == 4
  config = tiny_config()
  method = cae.CAE(config, num_classes=2, train_class_counts=[5, 3])
  variables, method_state = method.init(jax.random.PRNGKey(0), 32)
  tx = train.create_optimizer(config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]),
                           method_state=method_state)
  p_train = par.map(train.make_train_step(method, tx, config), sharded_argnums=(1,),
                    donate_argnums=(0,))
  state = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  batch = par.shard_batch(_fixed_batch(4, 2))
  losses = []
  for _ in range(25):
    state, metrics = p_train(state, batch, rng)
    losses.append(float(np.asarray(metrics["loss"])[0]))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  assert np.all(np.diff(losses[::5]) < 0), losses
  method_state = jax.device_get(state.method_state)
  for leaf in jax.tree.leaves(method_state):
    for d in range(1, 4):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  assert int(method_state["seen"][0]) == 25 * 8
  assert float(np.abs(method_state["prototypes"][0]).sum()) > 0


def test_loss_reconstructs_the_clean_image_and_features_are_clean_codes():
  method = cae.CAE(tiny_config(), num_classes=2, train_class_counts=[5, 3])
  variables, state = method.init(jax.random.PRNGKey(0), 32)
  batch = _fixed_batch(2, 2)
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  loss, (_, metrics, aux) = jax.jit(jax.vmap(
      lambda b, r: method.loss(variables["params"], variables["batch_stats"], state,
                               b, r, step=jnp.int32(0)),
      axis_name=parallel.AXIS))(batch, keys)
  clean = batch["image"].astype(np.float32) / 255
  noisy = jnp.stack([
      cae.corrupt(jax.random.split(keys[d])[1], jnp.asarray(clean[d]), noise_std=0.1,
                  crop_min=0.8) for d in range(2)])
  assert np.abs(np.asarray(noisy) - clean).mean() > 0.01
  # Training mode, as the loss, with batch statistics synchronised over devices.
  reconstruction = jax.vmap(lambda x: method.model.apply(
      variables, x, train=True, mutable=["batch_stats"])[0][0],
                            axis_name=parallel.AXIS)(noisy)
  codes = []
  for d in range(2):
    expected = np.mean((np.asarray(reconstruction[d], np.float64) - clean[d]) ** 2)
    np.testing.assert_allclose(loss[d], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["mse"][d], expected, rtol=1e-5)
    codes.append(method.model.apply(variables, jnp.asarray(clean[d]), train=False,
                                    method="encode"))
  # Every device gets the inference-mode codes of the clean images of all devices.
  for d in range(2):
    np.testing.assert_allclose(aux["features"][d], np.concatenate(codes), rtol=1e-5,
                               atol=1e-6)


def test_predict_labels_by_the_nearer_prototype_minority_second():
  method = cae.CAE(tiny_config(), num_classes=2, train_class_counts=[5, 3])
  variables, state = method.init(jax.random.PRNGKey(0), 32)
  images = _fixed_batch(1, 4)["image"][0]
  codes = np.asarray(method.encode_images(variables, images))
  # Row 0 the majority prototype, row 1 the minority one (running_prototypes' order).
  state = dict(state, prototypes=jnp.asarray(codes[[0, 1]]))
  out = method.predict(variables, state, images[:2])
  np.testing.assert_array_equal(out["predictions"], [0, 1])
  distances = lambda x, p: 1 - x @ p / (np.linalg.norm(x, axis=1) * np.linalg.norm(p))  # noqa: E731
  expected = distances(codes[:2], codes[0]) - distances(codes[:2], codes[1])
  np.testing.assert_allclose(out["scores"], expected, rtol=1e-4, atol=1e-6)
  assert out["scores"][0] < 0 < out["scores"][1]


# ------------------------------------------------------------------ end to end
def test_train_and_evaluate_end_to_end(fake_ham, tmp_path):
  config = tiny_config(manual_dir=str(fake_ham), tfds_data_dir=str(tmp_path / "tfds"),
                       num_train_steps=4, eval_every_steps=2, log_every_steps=2,
                       checkpoint_every_steps=2)
  results = train.train_and_evaluate(config, str(tmp_path / "work"))
  written = json.loads((tmp_path / "work" / "results.json").read_text())
  # The loop's metrics are those of the running prototypes: recomputed outside it.
  method, data, scored = method_checks.score_splits(config, tmp_path / "work")
  for split, (labels, scores, predictions) in scored.items():
    for name, value in method_checks.sklearn_metrics(labels, scores, predictions,
                                                     2).items():
      assert written["running_prototypes"][split][name] == pytest.approx(value,
                                                                          abs=1e-6)
  for split in ("validation", "test"):
    assert written[split]["num_examples"] == results["num_examples"][split]
    assert np.isfinite(written["cae"]["reconstruction_mse"][split])
  # predictions.csv and predict score against the final prototypes, as results.json.
  method_checks.assert_run_is_usable(tmp_path / "work", fake_ham / "images",
                                     tmp_path / "predict")

  # The final prototypes are K-Means of every training image's code under the
  # selected model (a converged Lloyd iteration: each is the mean of the codes
  # nearest to it), majority first; the reported metrics are theirs.
  labels = scored["test"][0]
  _, best = method_checks.latest_checkpoint(tmp_path / "work", "best_checkpoint")
  variables = {"params": best["params"], "batch_stats": best["batch_stats"]}
  encode = jax.jit(method.encode_images)
  train_codes = np.concatenate([
      np.asarray(encode(variables, b["image"]))
      for b in data.train_examples.batch(8).as_numpy_iterator()]).astype(np.float64)
  prototypes = np.asarray(written["cae"]["prototype_vectors"], np.float64)
  nearest = np.argmin(((train_codes[:, None] - prototypes[None]) ** 2).sum(-1), 1)
  sizes = np.bincount(nearest, minlength=2)
  assert sizes[0] >= sizes[1] >= 1
  assert sizes.tolist() == sorted(written["cae"]["final_cluster_sizes"], reverse=True)
  for k in range(2):
    np.testing.assert_allclose(prototypes[k], train_codes[nearest == k].mean(0),
                               rtol=1e-4, atol=1e-5)
  x = method_checks.split_features(lambda images: encode(variables, images),
                                   data.eval["test"])
  cosine = lambda a, p: 1 - a @ p / (np.linalg.norm(a, axis=1) * np.linalg.norm(p))  # noqa: E731
  scores = cosine(x, prototypes[0]) - cosine(x, prototypes[1])
  assert written["test"]["auc"] == pytest.approx(skm.roc_auc_score(labels, scores),
                                                 abs=1e-6)
  assert written["test"]["accuracy"] == pytest.approx(
      np.mean((scores > 0) == labels), abs=1e-9)
  assert "K-Means on" in written["cae"]["prototypes"]
  assert pathlib.Path(written["cae"]["reconstructions_png"]).is_file()
  assert pathlib.Path(written["cae"]["embeddings_png"]).is_file()

  # Killed after the step-2 checkpoint and resumed: the ring buffer and its
  # count are checkpointed, so the run ends exactly as the uninterrupted one.
  method_checks.kill_and_resume(config, tmp_path / "resumed", kill_at_batch=3)
  method_checks.assert_resumed_run_equals_whole_run(tmp_path / "work",
                                                    tmp_path / "resumed")
