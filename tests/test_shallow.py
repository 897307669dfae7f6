"""Shallow baselines: decision rules by hand, each baseline on toy data, end to end."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from comtriplet_jax import models
from comtriplet_jax.baselines import shallow
from comtriplet_jax.clustering import prototypes

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("shallow_config", CONFIGS / "shallow.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------- 1-D threshold
def _brute_force_split(z):
  """Best split of sorted z by direct within-group sums of squares."""
  zs = np.sort(z)
  costs = [np.sum((zs[:k] - zs[:k].mean()) ** 2) + np.sum((zs[k:] - zs[k:].mean()) ** 2)
           for k in range(1, zs.size)]
  k = int(np.argmin(costs)) + 1
  return zs[:k].mean(), zs[k:].mean()


def test_two_means_threshold_high_minority():
  rule = shallow.two_means_threshold(np.array([0.0, 0.1, 0.2, 10.0, 10.1]))
  assert rule.low_mean == pytest.approx(0.1)
  assert rule.high_mean == pytest.approx(10.05)
  assert rule.threshold == pytest.approx(5.075)
  assert rule.sign == 1.0
  assert (rule.minority_size, rule.majority_size) == (2, 3)
  scores, predictions = rule.scores(np.array([-1.0, 5.0, 5.2, 20.0]))
  np.testing.assert_allclose(scores, [-6.075, -0.075, 0.125, 14.925])
  np.testing.assert_array_equal(predictions, [0, 0, 1, 1])


def test_two_means_threshold_low_minority_flips_the_sign():
  rule = shallow.two_means_threshold(np.array([-10.1, -10.0, 0.0, 0.1, 0.2]))
  assert rule.sign == -1.0
  assert rule.threshold == pytest.approx(0.5 * (-10.05 + 0.1))
  scores, predictions = rule.scores(np.array([-12.0, 3.0]))
  assert scores[0] > 0 > scores[1]
  np.testing.assert_array_equal(predictions, [1, 0])


def test_two_means_threshold_matches_brute_force():
  rng = np.random.default_rng(3)
  for _ in range(5):
    z = np.concatenate([rng.normal(0, 1, 40), rng.normal(4, 1.5, 9)]) * 1e3 + 5e4
    rule = shallow.two_means_threshold(z)
    low, high = _brute_force_split(z)
    assert rule.low_mean == pytest.approx(low, rel=1e-9)
    assert rule.high_mean == pytest.approx(high, rel=1e-9)
    # The nearest-mean rule puts every training point on its group's side.
    assert np.sum(z > rule.threshold) == np.sum(z >= 0.5 * (low + high))


def test_two_means_threshold_rejects_bad_input():
  with pytest.raises(ValueError, match="at least 2"):
    shallow.two_means_threshold(np.array([1.0]))
  with pytest.raises(ValueError, match="NaN"):
    shallow.two_means_threshold(np.array([1.0, np.nan, 2.0]))


# ------------------------------------------------------------------- prototypes
def test_prototype_scores_by_hand():
  # The baselines' rows (majority, minority), scored by the one Eq. 14 scorer.
  rows = np.array([[1.0, 0.0], [0.0, 1.0]])  # majority, minority
  x = np.array([[2.0, 0.0], [1.0, 1.0], [0.5, 2.0], [0.0, -1.0]])
  out = prototypes.prototype_scores(x, rows[1], rows[0], distance="cosine")
  # d_maj - d_min = (1 - cos to maj) - (1 - cos to min) = cos_min - cos_maj.
  cos_maj = x[:, 0] / np.linalg.norm(x, axis=1)
  cos_min = x[:, 1] / np.linalg.norm(x, axis=1)
  np.testing.assert_allclose(out["scores"], cos_min - cos_maj, atol=1e-6)
  np.testing.assert_array_equal(out["predictions"], [0, 0, 1, 0])  # tie -> majority
  out = prototypes.prototype_scores(x, rows[1], rows[0], distance="euclidean")
  d_maj = np.linalg.norm(x - rows[0], axis=1)
  d_min = np.linalg.norm(x - rows[1], axis=1)
  np.testing.assert_allclose(out["scores"], d_maj - d_min, atol=1e-6)
  np.testing.assert_allclose(out["d_min"], d_min, atol=1e-6)
  np.testing.assert_array_equal(out["predictions"], [0, 0, 1, 0])
  with pytest.raises(ValueError, match=r"prototypes must be \[S\]"):
    prototypes.prototype_scores(x, np.zeros(3), np.zeros(2))
  with pytest.raises(ValueError, match="distance"):
    prototypes.prototype_scores(x, rows[1], rows[0], distance="manhattan")


def test_order_prototypes_puts_the_smaller_cluster_second():
  centres = np.array([[0.0, 1.0], [5.0, 5.0]])
  ordered, minority = shallow.order_prototypes(centres, np.array([3, 10]))
  assert minority == 0
  np.testing.assert_array_equal(ordered, centres[[1, 0]])
  ordered, minority = shallow.order_prototypes(centres, np.array([0.9, 0.1]))
  assert minority == 1
  np.testing.assert_array_equal(ordered, centres)


# ------------------------------------------------------------ every baseline
def _two_clusters(rng, n_major, n_minor, dim=6):
  major = rng.normal(0.0, 0.3, (n_major, dim)) + np.eye(dim)[0] * 4 + 1.0
  minor = rng.normal(0.0, 0.3, (n_minor, dim)) + np.eye(dim)[1] * 4 + 1.0
  x = np.concatenate([major, minor])
  y = np.concatenate([np.zeros(n_major, int), np.ones(n_minor, int)])
  return x, y


@pytest.mark.parametrize("name", shallow.BASELINES)
def test_each_baseline_separates_two_clear_clusters(name):
  rng = np.random.default_rng(0)
  train_x, _ = _two_clusters(rng, 120, 25)
  test_x, test_y = _two_clusters(rng, 40, 10)
  settings = shallow.default_settings()
  fitted = shallow.fit_baseline(name, train_x, settings=settings, seed=0)
  metrics = shallow.evaluate_baselines([fitted], {"test": test_x},
                                       {"test": test_y})[name]["test"]
  assert metrics["auc"] > 0.95
  assert metrics["accuracy"] > 0.9
  scores, predictions = fitted.scores(test_x)
  assert scores.shape == predictions.shape == (50,)
  np.testing.assert_array_equal(predictions, (scores > 0).astype(int))
  if name in shallow.CLUSTERINGS:
    assert fitted.prototypes.shape == (2, 6)
    assert fitted.details["cluster_sizes"][fitted.details["minority_cluster"]] == min(
        fitted.details["cluster_sizes"])
  else:
    assert fitted.details["minority_size"] <= fitted.details["majority_size"]


def test_settings_are_validated_by_name():
  settings = shallow.default_settings()
  settings.methods = "gmm+pca"
  with pytest.raises(ValueError, match="config.shallow.methods"):
    shallow.validate_settings(settings)
  settings = shallow.default_settings()
  settings.distance = "l1"
  with pytest.raises(ValueError, match="config.shallow.distance='l1'"):
    shallow.validate_settings(settings)
  settings = shallow.default_settings()
  settings.kmeans_n_init = 0
  with pytest.raises(ValueError, match="config.shallow.kmeans_n_init"):
    shallow.validate_settings(settings)
  with pytest.raises(ValueError, match="only NP or TL"):
    load_config("strategy=TL+DA")
  with pytest.raises(ValueError, match="config.shallow.methods"):
    load_config("methods=gmm+magic")
  config = load_config("runlocal,methods=gmm+lle,distance=euclidean")
  assert shallow.parse_methods(config.shallow.methods) == ("gmm", "lle")
  assert config.backbone == "small_resnet" and config.image_size == 64


# ------------------------------------------------------------------ end to end
def _tiny_config(fake_ham, data_dir, arg=""):
  config = load_config(f"backbone=tiny_resnet,size=32{',' + arg if arg else ''}")
  config.manual_dir = str(fake_ham)
  config.tfds_data_dir = str(data_dir)
  config.eval_batch_size = 8
  return config


def test_run_writes_every_baseline(fake_ham, tmp_path):
  config = _tiny_config(fake_ham, tmp_path / "tfds")
  results = shallow.run(config, str(tmp_path / "work"))
  written = json.loads((tmp_path / "work" / "results.json").read_text())
  table = (tmp_path / "work" / "results.md").read_text()
  assert written["settings"]["feature_size"] == 32  # tiny_resnet: 4 x 8 channels
  for name in shallow.BASELINES:
    for split in ("validation", "test"):
      metrics = written[name][split]
      assert metrics["num_examples"] == results["settings"]["num_examples"][split]
    # Dark nevi and bright melanomas: the brightness direction dominates the
    # pooled features, so every baseline ranks the test melanomas first (all
    # score 0.875-1.0 here; a minority side or prototype order taken the wrong
    # way round scores 1 - AUC).
    assert written[name]["test"]["auc"] >= 0.8, name
    assert shallow.PAPER_NAMES[name] in table
  # The clusterings draw their prototypes among the test embeddings.
  for name in ("gmm", "kmeans"):
    assert (tmp_path / "work" / f"embeddings_test_{name}.png").stat().st_size > 1000
    assert written[name]["embedding_plot"].endswith(f"embeddings_test_{name}.png")
  assert not list((tmp_path / "work").glob("embeddings_test_lle.png"))


def test_embeddings_come_from_a_training_checkpoint(fake_ham, tmp_path):
  config = _tiny_config(fake_ham, tmp_path / "tfds")
  model = models.get_backbone("tiny_resnet")
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                         train=False))
  rng = np.random.default_rng(7)
  other = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  # A classifier-like train state: the backbone sits under 'backbone'.
  state = {"step": np.int32(3),
           "params": {"backbone": other["params"], "head": {"w": np.ones(2)}},
           "batch_stats": {"backbone": other["batch_stats"]}}
  manager = ocp.CheckpointManager((tmp_path / "run" / "checkpoints").absolute(),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  config.shallow.checkpoint = str(tmp_path / "run")
  variables, source = shallow.backbone_variables(config, model, 32)
  assert "checkpoints/3/default" in source
  expected = {"params": other["params"], "batch_stats": other["batch_stats"]}
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)
  config.shallow.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.shallow.checkpoint"):
    shallow.backbone_variables(config, model, 32)
  config.backbone = "tiny_vgg"
  config.shallow.checkpoint = str(tmp_path / "run")
  with pytest.raises(ValueError, match="do not fit the backbone"):
    shallow.backbone_variables(config, models.get_backbone("tiny_vgg"), 32)
