"""How the classifier and SDC wire their equations, on stand-in models with known outputs.

The equations themselves are tested against NumPy elsewhere; here each method's
``loss``, ``update_state`` and ``predict`` must hand them the right inputs. The
stand-ins replace the network by something whose output is computed here by hand
(the classifier: a dense layer on each image's mean colour; SDC: the first pixel
values of an image plus a trainable shift), so every expected value below
comes from NumPy or from the loss function applied to what the method should
give it. Four "devices" are a ``vmap`` with the ``data`` axis bound, which runs
the same collectives as the training loop's ``pmap``. The training step's
in-step guard against non-finite updates is tested here too, called directly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax import configlib
from comtriplet_jax import losses
from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.data import augment
from comtriplet_jax.methods import classifier
from comtriplet_jax.methods import sdc

from method_checks import load_config

DEVICES = 4
STEP = jnp.asarray(0, jnp.int32)


def on_devices(fn):
  """``fn`` on a leading device axis, with the ``data`` axis bound as in the loop."""
  return jax.jit(jax.vmap(fn, axis_name=parallel.AXIS))


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cosine_distance(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ------------------------------------------------------------------ classifier
class MeanColourModel(nn.Module):
  """Logits = Dense(mean colour of the image): computable by hand."""
  num_classes: int

  @nn.compact
  def __call__(self, images, train):
    del train
    return nn.Dense(self.num_classes, name="head")(jnp.mean(images, axis=(1, 2)))


class StandInClassifier(classifier.Classifier):
  def build_model(self):
    return MeanColourModel(self.num_classes)


def classifier_config(**overrides):
  config = configlib.base_config()
  config.update(dict(method="classifier", image_size=4, batch_size=12,
                     learning_rate=1e-2))
  config.update(overrides)
  return config


def numpy_logits(variables, images):
  head = variables["params"]["head"]
  x = np.asarray(images, np.float64) / 255.0
  return x.mean(axis=(-3, -2)) @ np.asarray(head["kernel"], np.float64) + np.asarray(
      head["bias"], np.float64)


# 9 majority and 3 minority examples, unevenly spread over the four devices, so
# per-device and global class counts differ.
LABELS = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 0]], np.int32)
TRAIN_COUNTS = np.array([30, 10])


@pytest.mark.parametrize("weighting", ["none", "dataset", "batch"])
def test_classifier_loss_is_eq1_on_its_logits_with_the_strategy_weights(weighting):
  method = StandInClassifier(classifier_config(loss_weighting=weighting),
                             num_classes=2, train_class_counts=TRAIN_COUNTS)
  variables, _ = method.init(jax.random.PRNGKey(0), 4)
  images = np.random.default_rng(0).integers(0, 256, (DEVICES, 3, 4, 4, 3), np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(1), DEVICES)
  loss, (_, metrics, _) = on_devices(lambda b, r: method.loss(
      variables["params"], variables["batch_stats"], {}, b, r, step=STEP))(
          {"image": images, "label": LABELS}, keys)

  logits = numpy_logits(variables, images.reshape(12, 4, 4, 3))
  labels = LABELS.reshape(-1)
  ce = -log_softmax(logits)[np.arange(12), labels]
  weights = {"none": np.ones(2),
             # training set: 40 / (2 * [30, 10])
             "dataset": np.array([40 / 60, 40 / 20]),
             # LW: the global batch's counts, 12 / (2 * [9, 3])
             "batch": np.array([12 / 18, 12 / 6])}[weighting]
  expected = np.sum(weights[labels] * ce) / 12
  # Every device returns the loss of the global batch.
  np.testing.assert_allclose(loss, np.full(DEVICES, expected), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["accuracy"], (logits.argmax(-1) == labels).reshape(4, 3).mean(1))


def test_classifier_augments_training_images_only_with_da():
  config = classifier_config(augment=True)
  method = StandInClassifier(config, num_classes=2, train_class_counts=TRAIN_COUNTS)
  variables, _ = method.init(jax.random.PRNGKey(0), 8)
  images = np.random.default_rng(1).integers(0, 256, (1, 6, 8, 8, 3), np.uint8)
  labels = np.array([[0, 1, 0, 0, 1, 0]], np.int32)
  rng = jax.random.PRNGKey(2)[None]
  run = lambda m: on_devices(lambda b, r: m.loss(  # noqa: E731
      variables["params"], variables["batch_stats"], {}, b, r, step=STEP)[0])(
          {"image": images, "label": labels}, rng)[0]
  # DA: the loss sees augment.augment(aug_rng, x), aug_rng the first half of the
  # step's key, as the method's docstring says.
  aug_rng = jax.random.split(rng[0])[0]
  augmented = np.asarray(augment.augment(aug_rng, jnp.asarray(images[0], jnp.float32)))
  assert np.abs(augmented - images[0]).max() > 10
  ce = -log_softmax(numpy_logits(variables, augmented))[np.arange(6), labels[0]]
  np.testing.assert_allclose(run(method), ce.mean(), rtol=1e-5)
  # Without DA the images are used as they are.
  plain = StandInClassifier(classifier_config(augment=False), num_classes=2,
                            train_class_counts=TRAIN_COUNTS)
  ce = -log_softmax(numpy_logits(variables, images[0]))[np.arange(6), labels[0]]
  np.testing.assert_allclose(run(plain), ce.mean(), rtol=1e-5)
  # Prediction never augments, DA or not.
  np.testing.assert_allclose(
      method.predict(variables, {}, images[0])["scores"],
      np.exp(log_softmax(numpy_logits(variables, images[0])))[:, 1], rtol=1e-5)


def test_classifier_predict_gives_the_class_of_the_larger_logit():
  method = StandInClassifier(classifier_config(), num_classes=2,
                             train_class_counts=TRAIN_COUNTS)
  # logit_1 - logit_0 = 4 (red - blue) on x / 255: red images are class 1.
  variables = {"params": {"head": {"kernel": np.array([[-2., 2.], [0., 0.], [2., -2.]],
                                                      np.float32),
                                   "bias": np.zeros(2, np.float32)}},
               "batch_stats": {}}
  images = np.zeros((3, 4, 4, 3), np.uint8)
  images[0, ..., 0] = 255          # red: class 1
  images[1, ..., 2] = 255          # blue: class 0
  images[2, ..., 0] = 64           # dark red, just class 1
  out = method.predict(variables, {}, images)
  np.testing.assert_array_equal(out["predictions"], [1, 0, 1])
  margin = 4 * np.array([1.0, -1.0, 64 / 255])
  np.testing.assert_allclose(out["scores"], 1 / (1 + np.exp(-margin)), rtol=1e-6)


def test_strategies_set_the_fields_the_loop_and_loss_read():
  assert configlib.parse_strategy("NP") == dict(init_from="", augment=False,
                                                loss_weighting="none")
  assert configlib.parse_strategy("TL+DA+LW") == dict(init_from="imagenet",
                                                      augment=True,
                                                      loss_weighting="batch")


# ------------------------------------------------------------------------ SDC
def pixels(images, size):
  return images.reshape(images.shape[0], -1)[:, :size].astype(jnp.float32)


class StandInSDC(sdc.SDC):
  """SDC whose embedding is an image's first S pixel values plus ``params['shift']``."""

  def _train_embeddings(self, params, batch_stats, images, rng):
    del rng
    return pixels(images, self.cfg.embedding_size) + params["shift"], batch_stats

  def embed(self, variables, images):
    return pixels(images, self.cfg.embedding_size)


EMBEDDING = 8
# Anchor classes per device: both classes, unevenly spread.
ANCHOR_LABELS = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], np.int32)


def stand_in_sdc(**fields):
  config = load_config("sdc")
  config.sdc.embedding_size = EMBEDDING
  config.sdc.update(fields)
  return StandInSDC(config, num_classes=2, train_class_counts=[30, 10])


def triplet_images(seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.integers(0, 256, (DEVICES, 3, 2, 2, 3), np.uint8)
          for name in ("anchor", "positive", "negative")}


@pytest.mark.parametrize("fields,loss_fn", [
    ({}, lambda a, p, n: losses.com_triplet_loss(a, p, n, reduction="none")),
    ({"margin": "0.6"},
     lambda a, p, n: losses.com_triplet_loss(a, p, n, margin=0.6, reduction="none")),
    ({"margin_gradient": False},
     lambda a, p, n: losses.com_triplet_loss(a, p, n, margin_gradient=False,
                                             reduction="none")),
    ({"loss": "triplet", "margin": "0.2"},
     lambda a, p, n: losses.triplet_loss(a, p, n, margin=0.2, reduction="none")),
])
def test_sdc_loss_is_the_configured_triplet_loss_of_each_devices_triplets(fields,
                                                                         loss_fn):
  method = stand_in_sdc(**fields)
  images = triplet_images()
  batch = dict(images, anchor_label=ANCHOR_LABELS)
  state = method.init_method_state(None)
  keys = jax.random.split(jax.random.PRNGKey(0), DEVICES)
  shift = jnp.linspace(-40.0, 40.0, EMBEDDING)

  def device_loss(shift, b, r):
    return method.loss({"shift": shift}, {}, state, b, r, step=STEP)[0]

  values, grads = on_devices(jax.value_and_grad(device_loss))(
      jnp.tile(shift, (DEVICES, 1)), batch, keys)
  for d in range(DEVICES):
    a, p, n = (pixels(jnp.asarray(images[k][d]), EMBEDDING)
               for k in ("anchor", "positive", "negative"))
    want, want_grad = jax.value_and_grad(
        lambda s: jnp.mean(loss_fn(a + s, p + s, n + s)))(shift)
    np.testing.assert_allclose(values[d], want, rtol=1e-5)
    np.testing.assert_allclose(grads[d], want_grad, rtol=1e-4,
                               atol=1e-4 * np.abs(want_grad).max())
    assert np.abs(want_grad).max() > 0


def test_sdc_centres_are_eq6_over_the_global_batch_with_negatives_of_the_other_class():
  method = stand_in_sdc()
  images = triplet_images(1)
  batch = dict(images, anchor_label=ANCHOR_LABELS)
  state = method.init_method_state(None)
  _, (_, metrics, aux) = on_devices(lambda b, r: method.loss(
      {"shift": jnp.zeros(EMBEDDING)}, {}, state, b, r, step=STEP))(
          batch, jax.random.split(jax.random.PRNGKey(0), DEVICES))
  flat = {k: np.asarray(v, np.float64).reshape(12, -1)[:, :EMBEDDING]
          for k, v in images.items()}
  anchor_class = ANCHOR_LABELS.reshape(-1)
  embeddings = np.concatenate([flat["anchor"], flat["positive"], flat["negative"]])
  classes = np.concatenate([anchor_class, anchor_class, 1 - anchor_class])
  for d in range(DEVICES):   # the same centres on every device
    np.testing.assert_allclose(aux["centre_min"][d],
                               embeddings[classes == 1].mean(0), rtol=1e-5)
    np.testing.assert_allclose(aux["centre_maj"][d],
                               embeddings[classes == 0].mean(0), rtol=1e-5)
    assert bool(aux["valid"][d])
  np.testing.assert_allclose(metrics["minority_anchor_fraction"],
                             ANCHOR_LABELS.mean(1))
  np.testing.assert_allclose(
      metrics["batch_separation"][0],
      cosine_distance(embeddings[classes == 1].mean(0), embeddings[classes == 0].mean(0)),
      rtol=1e-4)


def _centres(centre_min, centre_maj, separation, updates=0):
  return {"centres": {"centre_min": jnp.asarray(centre_min, jnp.float32),
                      "centre_maj": jnp.asarray(centre_maj, jnp.float32),
                      "separation": jnp.asarray(separation, jnp.float32),
                      "num_updates": jnp.asarray(updates, jnp.int32)}}


@pytest.mark.parametrize("rule", ["monotone", "last"])
def test_sdc_centre_update_is_eq7_or_the_latest_pair(rule):
  method = stand_in_sdc(centre_update=rule)
  stored = _centres([1, 0], [0, 1], 1.0, updates=3)      # d = 1
  closer = {"centre_min": jnp.asarray([1., 0.]), "centre_maj": jnp.asarray([1., 1.]),
            "valid": jnp.asarray(True)}                  # d = 1 - 1/sqrt(2)
  further = {"centre_min": jnp.asarray([1., 0.]), "centre_maj": jnp.asarray([-1., 0.25]),
             "valid": jnp.asarray(True)}
  missing_class = dict(further, valid=jnp.asarray(False))
  update = jax.jit(method.update_state)

  got = update(stored, closer)["centres"]
  if rule == "monotone":   # Eq. 7: a pair closer together never replaces the stored one
    np.testing.assert_array_equal(got["centre_maj"], [0., 1.])
    assert float(got["separation"]) == 1.0 and int(got["num_updates"]) == 3
  else:
    np.testing.assert_array_equal(got["centre_maj"], [1., 1.])
    assert float(got["separation"]) == pytest.approx(1 - 1 / np.sqrt(2), rel=1e-6)
    assert int(got["num_updates"]) == 4
  got = update(stored, further)["centres"]   # both rules take a better pair
  np.testing.assert_array_equal(got["centre_maj"], [-1., 0.25])
  assert float(got["separation"]) == pytest.approx(
      cosine_distance([1, 0], [-1, 0.25]), rel=1e-6)
  assert int(got["num_updates"]) == 4
  got = update(stored, missing_class)["centres"]   # no pair without both classes
  np.testing.assert_array_equal(got["centre_maj"], [0., 1.])
  assert int(got["num_updates"]) == 3


def test_sdc_predict_labels_by_the_nearer_prototype_and_scores_d_maj_minus_d_min():
  method = stand_in_sdc()
  centre_min = np.array([200, 10, 200, 10, 200, 10, 200, 10], np.float32)
  centre_maj = np.array([10, 200, 10, 200, 10, 200, 10, 200], np.float32)
  state = _centres(centre_min, centre_maj, 0.9, updates=1)
  rng = np.random.default_rng(2)
  images = np.zeros((4, 2, 2, 3), np.uint8)
  flat = images.reshape(4, -1)
  flat[0, :8] = centre_min + rng.integers(0, 20, 8)   # near the minority prototype
  flat[1, :8] = centre_maj + rng.integers(0, 20, 8)
  flat[2, :8] = [150, 60] * 4                         # nearer the minority one
  flat[3, :8] = [60, 150] * 4
  out = method.predict({}, state, images)
  np.testing.assert_array_equal(out["predictions"], [1, 0, 1, 0])
  x = flat[:, :8].astype(np.float64)
  expected = cosine_distance(x, centre_maj) - cosine_distance(x, centre_min)
  np.testing.assert_allclose(out["scores"], expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.sign(out["scores"]) == [1, -1, 1, -1])


# ------------------------------------------------------- the train step's guard
def test_train_step_skips_and_counts_a_non_finite_update():
  config = classifier_config()
  method = StandInClassifier(config, num_classes=2, train_class_counts=TRAIN_COUNTS)
  variables, method_state = method.init(jax.random.PRNGKey(0), 4)
  tx = train.create_optimizer(config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]),
                           method_state=method_state)
  par = parallel.DataParallel("pmap")
  p_train = par.map(train.make_train_step(method, tx, config), sharded_argnums=(1,))
  rng = par.replicate(jax.random.PRNGKey(1))
  images = np.random.default_rng(3).integers(0, 256, (DEVICES, 3, 4, 4, 3)).astype(
      np.float32)
  batch = {"image": images, "label": LABELS}
  # One finite step first, so that the optimiser state is not the initial one.
  state, metrics = p_train(par.replicate(state), par.shard_batch(batch), rng)
  assert par.unreplicate(metrics)["nonfinite"] == 0.0
  before = jax.device_get(par.unreplicate(state))

  poisoned = dict(batch, image=images.copy())
  poisoned["image"][2, 1, 0, 0, 0] = np.nan      # one pixel on one device
  after, metrics = p_train(state, par.shard_batch(poisoned), rng)
  metrics = par.unreplicate(metrics)
  assert metrics["nonfinite"] == 1.0 and not np.isfinite(metrics["loss"])
  after = jax.device_get(par.unreplicate(after))
  for field in ("params", "batch_stats", "opt_state", "method_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field),
                 getattr(before, field))
  assert int(after.step) == int(before.step) + 1
  # The same batch without the NaN is applied.
  applied, metrics = p_train(state, par.shard_batch(batch), rng)
  assert par.unreplicate(metrics)["nonfinite"] == 0.0
  assert not np.array_equal(par.unreplicate(applied).params["head"]["kernel"],
                            before.params["head"]["kernel"])


def test_departures_name_the_schedule_the_papers_do_not_use():
  plain = StandInClassifier(classifier_config(), num_classes=2,
                            train_class_counts=TRAIN_COUNTS)
  assert plain.departures() == {}
  local = load_config("classifier", "runlocal")
  scheduled = StandInClassifier(local, num_classes=2, train_class_counts=TRAIN_COUNTS)
  assert scheduled.departures() == {"lr_schedule": "cosine", "warmup_steps": 50}
