"""UDC: GMM pseudo-labels on embeddings gathered from four fake devices, end to end.

The data-parallel logic is checked on a stand-in embedding (the images' pixels),
so no network has to be compiled for it: every device must fit the same GMM to
the embeddings of all devices, take the smaller component as the minority, and
apply the loss to its own slice of the pseudo-labels, and each switch must
change the loss or the fit as it says. A short run on a generated
HAM10000-like folder then trains the real model and writes the report, whose
metrics are recomputed here from the selected checkpoint; killed and resumed,
it ends exactly as the uninterrupted run.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax import losses
from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.clustering import gmm
from comtriplet_jax.methods import udc

import method_checks

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def make_config(fake_ham=None, data_dir=None, arg=None, **overrides):
  config = load_config("udc", arg)
  config.update(dict(
      manual_dir=str(fake_ham or ""), tfds_data_dir=str(data_dir or ""),
      image_size=32, backbone="tiny_vgg", batch_size=4, eval_batch_size=8,
      learning_rate=1e-3, num_train_steps=4, log_every_steps=2, eval_every_steps=2,
      checkpoint_every_steps=2, heatmap_images=0))
  config.udc.embedding_size = 8
  config.update(overrides)
  return config


class _PixelUDC(udc.UDC):
  """UDC whose 'embedding' of an image is its first pixels (no network)."""

  def _train_embeddings(self, params, batch_stats, images, rng):
    del params, rng
    size = self.cfg.embedding_size
    flat = images.reshape(images.shape[0], -1)[:, :size].astype(jnp.float32)
    return flat, batch_stats


def _two_cluster_images(rng, per_device=6, devices=4, size=8):
  """9 'minority' points around one direction, 15 'majority' around another."""
  n = per_device * devices
  minority = np.zeros(n, bool)
  minority[rng.permutation(n)[:9]] = True
  base = np.where(minority[:, None], np.r_[200, 30, 200, 30, 200, 30, 200, 30],
                  np.r_[30, 200, 30, 200, 30, 200, 30, 200])
  pixels = np.clip(base + rng.normal(0, 8, size=(n, size)), 0, 255)
  images = np.zeros((n, 2, 2, 3), np.uint8)
  images.reshape(n, -1)[:, :size] = pixels.astype(np.uint8)
  return images.reshape(devices, per_device, 2, 2, 3), minority


def test_every_device_fits_the_same_gmm_to_all_embeddings():
  config = make_config()
  method = _PixelUDC(config, num_classes=2, train_class_counts=[15, 9])
  images, minority = _two_cluster_images(np.random.default_rng(0))
  state = method.init_method_state(None)
  step = jnp.asarray(5, jnp.int32)

  def per_device(images, rng):
    loss, (_, metrics, aux) = method.loss({}, {}, state, {"image": images}, rng,
                                          step=step)
    return loss, metrics, aux, method.update_state(state, aux)

  par = parallel.DataParallel("pmap")
  loss, metrics, aux, new_state = par.map(per_device, sharded_argnums=(0,),
                                          sharded_out=True)(
      par.shard_batch(images), par.replicate(jax.random.PRNGKey(0)))
  aux = jax.tree.map(np.asarray, aux)
  for leaf in jax.tree.leaves(aux) + jax.tree.leaves(new_state):
    leaf = np.asarray(leaf)
    for d in range(1, 4):
      np.testing.assert_array_equal(leaf[d], leaf[0])

  # The same fit on the host, from all 24 embeddings.
  embeddings = images.reshape(24, -1)[:, :8].astype(np.float32)
  pseudo, mu_min, mu_maj, fit = jax.jit(method.fit_clusters)(embeddings, step)
  np.testing.assert_allclose(aux["centre_min"][0], mu_min, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(aux["centre_maj"][0], mu_maj, rtol=1e-5, atol=1e-4)
  # Smaller component = minority, and here it is the 9-point cluster exactly.
  assert float(jnp.min(fit.weights)) == pytest.approx(9 / 24, abs=1e-3)
  np.testing.assert_array_equal(np.asarray(pseudo), minority.astype(np.int32))
  np.testing.assert_allclose(mu_min, embeddings[minority].mean(0), rtol=1e-4)
  assert bool(aux["valid"][0])
  assert int(np.asarray(new_state["centres"]["num_updates"])[0]) == 1

  # Each device's loss is the centre COM-Triplet loss of its own slice with its
  # slice of the pseudo-labels (Eq. 12-13).
  for d in range(4):
    rows = slice(6 * d, 6 * d + 6)
    expected, _ = losses.centre_com_triplet_loss(
        embeddings[rows], mu_min, mu_maj, assignment=np.asarray(pseudo)[rows])
    np.testing.assert_allclose(np.asarray(loss)[d], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["anchor_minority_fraction"])[d],
                               minority[rows].mean(), rtol=1e-6)


def _overlapping_cluster_images(rng):
  """Two tight clusters whose directions are only ~28 degrees apart, and one point
  that the GMM puts in the majority cluster but whose direction is nearer the
  minority mean's: triplet hinges are active, and the two assignments differ."""
  minority = np.zeros(24, bool)
  minority[rng.permutation(23)[:9]] = True
  base = np.where(minority[:, None], np.tile([200, 120], 4), np.tile([60, 100], 4))
  pixels = np.clip(base + rng.normal(0, 6, size=(24, 8)), 0, 255)
  pixels[23] = np.tile([90, 85], 4)
  images = np.zeros((24, 2, 2, 3), np.uint8)
  images.reshape(24, -1)[:, :8] = pixels.astype(np.uint8)
  return images.reshape(4, 6, 2, 2, 3), minority


@pytest.mark.parametrize("fields,loss_fn,features", [
    ({"loss": "triplet", "margin": "0.2"},
     lambda e, lo, hi, pseudo: losses.centre_triplet_loss(
         e, lo, hi, margin=0.2, assignment=pseudo), "raw"),
    ({"assignment": "nearest"},
     lambda e, lo, hi, pseudo: losses.centre_com_triplet_loss(e, lo, hi), "raw"),
    ({"margin": "0.6"},
     lambda e, lo, hi, pseudo: losses.centre_com_triplet_loss(
         e, lo, hi, margin=0.6, assignment=pseudo), "raw"),
    ({"gmm_features": "unit"},
     lambda e, lo, hi, pseudo: losses.centre_com_triplet_loss(
         e, lo, hi, assignment=pseudo), "unit"),
    ({"covariance_type": "full"},
     lambda e, lo, hi, pseudo: losses.centre_com_triplet_loss(
         e, lo, hi, assignment=pseudo), "raw"),
])
def test_each_switch_changes_the_loss_or_the_fit_as_it_says(fields, loss_fn, features):
  config = make_config()
  config.udc.update(fields)
  method = _PixelUDC(config, num_classes=2, train_class_counts=[15, 9])
  images, minority = _overlapping_cluster_images(np.random.default_rng(2))
  labels = minority.reshape(4, 6).astype(np.int32)
  labels[0, :2] = 1 - labels[0, :2]   # two wrong labels: agreement is not 1
  state = method.init_method_state(None)
  step = jnp.asarray(7, jnp.int32)
  loss, (_, metrics, aux) = jax.jit(jax.vmap(
      lambda x, y, r: method.loss({}, {}, state, {"image": x, "label": y}, r, step=step),
      axis_name=parallel.AXIS))(images, labels, jax.random.split(jax.random.PRNGKey(0), 4))

  embeddings = images.reshape(24, -1)[:, :8].astype(np.float32)
  fitted = embeddings
  if features == "unit":
    fitted = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                              udc._GMM_KEY_TAG), step)
  fit = gmm.fit_gmm(jnp.asarray(fitted), 2, key=key,
                    covariance_type=config.udc.covariance_type, reg_covar=1e-6,
                    tol=1e-3, max_iter=config.udc.gmm_max_iter)
  small = int(np.argmin(fit.weights))
  mu_min, mu_maj = np.asarray(fit.means[small]), np.asarray(fit.means[1 - small])
  pseudo = (np.argmax(fit.responsibilities, 1) == small).astype(np.int32)
  # The two clusters are found (the last point is the ambiguous one).
  np.testing.assert_array_equal(pseudo[:23], minority[:23])
  if features == "raw":
    # The data tell the switches apart: the GMM's and the nearest-mean (cosine)
    # assignments differ on the last point.
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    nearer_min = (unit(embeddings) @ unit(mu_min)) > (unit(embeddings) @ unit(mu_maj))
    assert nearer_min[23] and not pseudo[23]
  for d in range(4):
    np.testing.assert_allclose(aux["centre_min"][d], mu_min, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["centre_maj"][d], mu_maj, rtol=1e-5, atol=1e-6)
    rows = slice(6 * d, 6 * d + 6)
    expected = jnp.mean(loss_fn(embeddings[rows], mu_min, mu_maj, pseudo[rows])[0])
    assert expected > 0
    np.testing.assert_allclose(loss[d], expected, rtol=1e-5, atol=1e-6)
    # Monitoring only: the share of this device's pseudo-labels that are right.
    np.testing.assert_allclose(metrics["pseudo_label_agreement"][d],
                               np.mean(pseudo[rows] == labels[d]))


def test_gmm_key_comes_from_the_seed_and_the_step(monkeypatch):
  keys = []
  real_fit = gmm.fit_gmm

  def recording_fit(x, k, *, key, **kwargs):
    keys.append(np.asarray(key))
    return real_fit(x, k, key=key, **kwargs)

  monkeypatch.setattr(udc.gmm, "fit_gmm", recording_fit)
  config = make_config(seed=3)
  method = _PixelUDC(config, num_classes=2, train_class_counts=[15, 9])
  images, _ = _two_cluster_images(np.random.default_rng(1))
  x = jnp.asarray(images.reshape(24, -1)[:, :8], jnp.float32)
  for step in (4, 5, 4):
    method.fit_clusters(x, jnp.asarray(step, jnp.int32))
  expected = [np.asarray(jax.random.fold_in(jax.random.fold_in(
      jax.random.PRNGKey(3), udc._GMM_KEY_TAG), step)) for step in (4, 5, 4)]
  np.testing.assert_array_equal(np.stack(keys), np.stack(expected))
  assert not np.array_equal(keys[0], keys[1])


def test_diag_fit_matches_the_gmm_module():
  config = make_config()
  method = _PixelUDC(config, num_classes=2, train_class_counts=[15, 9])
  images, _ = _two_cluster_images(np.random.default_rng(1))
  x = images.reshape(24, -1)[:, :8].astype(np.float32)
  step = jnp.asarray(3, jnp.int32)
  _, mu_min, mu_maj, fit = method.fit_clusters(jnp.asarray(x), step)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                              udc._GMM_KEY_TAG), step)
  direct = gmm.fit_gmm(jnp.asarray(x), 2, key=key, covariance_type="diag",
                       reg_covar=1e-6, tol=1e-3, max_iter=100)
  np.testing.assert_allclose(fit.means, direct.means, rtol=1e-6)
  small = int(np.argmin(direct.weights))
  np.testing.assert_allclose(mu_min, direct.means[small], rtol=1e-6)
  np.testing.assert_allclose(mu_maj, direct.means[1 - small], rtol=1e-6)
  assert fit.covariances.shape == (2, 8)  # 'diag' is the default


def test_udc_runs_end_to_end(fake_ham, data_dir, tmp_path):
  config = make_config(fake_ham, data_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  written = json.loads((tmp_path / "results.json").read_text())
  assert "smaller mixture weight" in written["auc_convention"]
  assert written["prototypes"]["num_updates"] >= 1
  method_checks.assert_results_match_rescoring(config, tmp_path, written)
  method_checks.assert_run_is_usable(tmp_path, fake_ham / "images", tmp_path / "predict")
  for split in ("validation", "test"):
    assert written["feature_selection"]["mean_difference"][split]["num_examples"] == (
        results["num_examples"][split])
  assert pathlib.Path(written["embedding_plot"]).exists()
  events = list(tmp_path.glob("events.out.tfevents.*"))
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(events[0]))
  acc.Reload()
  tags = acc.Tags()["tensors"] + acc.Tags()["scalars"]
  for tag in ("train/loss", "train/gmm_iterations", "train/pseudo_label_agreement"):
    assert tag in tags, tags

  # Killed after the step-2 checkpoint and resumed: the GMM keys depend on the
  # step only, so the run ends exactly as the uninterrupted one.
  config.udc.embedding_plot = False
  method_checks.kill_and_resume(config, tmp_path / "resumed", kill_at_batch=3)
  method_checks.assert_resumed_run_equals_whole_run(tmp_path, tmp_path / "resumed")


@pytest.mark.parametrize("field,value,message", [
    ("covariance_type", "spherical", "config.udc.covariance_type='spherical'"),
    ("assignment", "random", "config.udc.assignment"),
    ("gmm_tol", 0.0, "config.udc.gmm_tol"),
    ("gmm_reg_covar", -1.0, "config.udc.gmm_reg_covar"),
    ("gmm_max_iter", 0, "config.udc.gmm_max_iter"),
    ("gmm_features", "pca", "config.udc.gmm_features"),
    ("loss", "hinge", "config.udc.loss"),
])
def test_bad_udc_fields_are_named(field, value, message):
  config = make_config()
  config.udc[field] = value
  with pytest.raises(ValueError, match=message):
    udc.UDC(config, num_classes=2, train_class_counts=[3, 1])


def test_udc_config():
  config = load_config("udc", "loss=triplet,covariance=full")
  assert (config.udc.loss, config.udc.margin, config.udc.covariance_type) == (
      "triplet", "0.2", "full")
  assert (config.udc.gmm_tol, config.udc.gmm_reg_covar) == (1e-3, 1e-6)
  udc.UDC(config, num_classes=2, train_class_counts=[3, 1])


def test_departures_name_the_gmm_features_the_paper_does_not_use():
  paper = udc.UDC(load_config("udc"), num_classes=2, train_class_counts=[3, 1])
  assert paper.departures() == {}
  local = udc.UDC(load_config("udc", "runlocal"), num_classes=2,
                  train_class_counts=[3, 1])
  assert local.cfg.gmm_features == "unit"
  assert local.departures() == {"lr_schedule": "cosine", "warmup_steps": 50,
                                "gmm_features": "unit"}
