"""SDC end to end on four fake devices with a generated HAM10000-like folder.

A tiny VGG at 32 px (it compiles four times faster than tiny_resnet); a few
steps train, evaluate with the prototypes and write the report (feature
selection, embedding picture), whose metrics are recomputed here from the
selected checkpoint; the centres are the same on every device and are
checkpointed, so a killed run resumes to exactly the same state and results;
pmap and shard_map give the same SDC step; bad SDC fields are named. How SDC
wires its equations is tested on a stand-in embedding in test_method_wiring.py.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.data import triplets
from comtriplet_jax.methods import sdc

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
  config = load_config("sdc", arg)
  config.update(dict(
      manual_dir=str(fake_ham or ""), tfds_data_dir=str(data_dir or ""),
      image_size=32, backbone="tiny_vgg", batch_size=8, eval_batch_size=8,
      learning_rate=1e-3, num_train_steps=6, log_every_steps=2, eval_every_steps=3,
      checkpoint_every_steps=3))
  config.sdc.embedding_size = 16
  config.update(overrides)
  return config


def test_sdc_trains_evaluates_resumes_and_reports(fake_ham, data_dir, tmp_path):
  config = make_config(fake_ham, data_dir)
  # Keeps several features under both rules (at the default scale the 'range'
  # rule kept one feature of these 16, whose cosine distances are all 0 or 2 and
  # whose AUC is decided by rounding).
  config.sdc.feature_selection_scale = 0.2
  results = train.train_and_evaluate(config, str(tmp_path / "whole"))
  written = json.loads((tmp_path / "whole" / "results.json").read_text())
  # The loop's metrics equal scikit-learn's on prototype scores computed outside it.
  _, best = method_checks.latest_checkpoint(tmp_path / "whole", "best_checkpoint")
  method, data, scored = method_checks.score_splits(config, tmp_path / "whole",
                                                    state=best)
  for split, (labels, scores, predictions) in scored.items():
    for name, value in method_checks.sklearn_metrics(labels, scores, predictions,
                                                     2).items():
      assert written[split][name] == pytest.approx(value, abs=1e-6), (split, name)
  card = method_checks.assert_run_is_usable(tmp_path / "whole", fake_ham / "images",
                                            tmp_path / "predict")
  assert card["decision_boundary"] == 0.0
  centres = best["method_state"]["centres"]
  assert written["prototypes"]["num_updates"] == int(centres["num_updates"]) >= 1
  assert written["prototypes"]["separation"] == pytest.approx(
      float(centres["separation"]), rel=1e-6)

  # Feature selection: the kept features are those whose prototype difference
  # reaches the rule's threshold, and the metrics are those of the distances on
  # the kept features only.
  centre_min = np.asarray(centres["centre_min"], np.float64)
  centre_maj = np.asarray(centres["centre_maj"], np.float64)
  difference = np.abs(centre_min - centre_maj)
  spread = lambda c: c.max() - c.min()  # noqa: E731
  thresholds = {"range": 0.5 * (spread(centre_min) + spread(centre_maj)),
                "mean_difference": difference.mean()}
  labels = scored["test"][0]
  variables = {"params": best["params"], "batch_stats": best["batch_stats"]}
  embed = jax.jit(method.embed)
  x = method_checks.split_features(lambda images: embed(variables, images),
                                   data.eval["test"])
  for rule, threshold in thresholds.items():
    selected = written["feature_selection"][rule]
    keep = (difference >= config.sdc.feature_selection_scale * threshold) | (
        np.arange(difference.size) == difference.argmax())
    assert selected["num_features_kept"] == keep.sum() > 1
    cosine = lambda a, c: 1 - a @ c / (np.linalg.norm(a, axis=1) * np.linalg.norm(c))  # noqa: E731
    scores = (cosine(x[:, keep], centre_maj[keep]) - cosine(x[:, keep], centre_min[keep]))
    assert selected["test"]["auc"] == pytest.approx(skm.roc_auc_score(labels, scores),
                                                    abs=1e-6)
    assert selected["test"]["num_examples"] == results["num_examples"]["test"]
  png = pathlib.Path(written["embedding_plot"])
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Killed after the step-3 checkpoint, while drawing the triplets of step 5,
  # and resumed: the triplets of steps 4-6 and the step-3 centres are restored,
  # and the run ends exactly where the uninterrupted one ended.
  config.sdc.embedding_plot = False   # the report was checked above
  method_checks.kill_and_resume(config, tmp_path / "resumed", kill_at_batch=4)
  method_checks.assert_resumed_run_equals_whole_run(tmp_path / "whole",
                                                    tmp_path / "resumed")


def _random_triplets(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.array([0] * 12 + [1] * 4, np.int32)
  images = rng.integers(0, 256, size=(labels.size, 32, 32, 3), dtype=np.uint8)
  images[labels == 1] //= 2   # some signal between the classes
  train_images = triplets.TrainImages(images, labels)
  return triplets.triplet_stream(train_images, batch_size=batch_size,
                                 num_local_devices=4, seed=seed)


def _initial(config):
  method = sdc.SDC(config, num_classes=2, train_class_counts=[12, 4])
  variables, method_state = method.init(jax.random.PRNGKey(0), config.image_size)
  tx = train.create_optimizer(config)
  state = train.TrainState(
      step=np.zeros((), np.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
      method_state=method_state)
  return method, tx, state


def _two_steps(mode, config, method, tx, state):
  par = parallel.DataParallel(mode)
  p_train = par.map(train.make_train_step(method, tx, config), sharded_argnums=(1,),
                    donate_argnums=(0,))
  state = par.replicate(state)
  rng = par.replicate(jax.random.PRNGKey(1))
  stream = _random_triplets(config.batch_size)
  for _ in range(2):
    state, metrics = p_train(state, par.shard_batch(next(stream)), rng)
  return par, state, metrics


def test_centres_identical_on_every_device_and_pmap_equals_shard_map():
  config = make_config()
  method, tx, state = _initial(config)
  par_p, pmapped, metrics = _two_steps("pmap", config, method, tx, state)
  centres = pmapped.method_state["centres"]
  # pmap keeps one copy per device: all four must be the same, bit for bit.
  for leaf in jax.tree.leaves(centres):
    leaf = np.asarray(leaf)
    for d in range(1, leaf.shape[0]):
      np.testing.assert_array_equal(leaf[d], leaf[0])
  assert int(np.asarray(centres["num_updates"])[0]) >= 1
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))

  par_s, sharded, _ = _two_steps("shard_map", config, method, tx, state)
  for leaf in jax.tree.leaves(sharded.method_state):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    for s in shards[1:]:
      np.testing.assert_array_equal(s, shards[0])
  a, b = par_p.unreplicate(pmapped), par_s.unreplicate(sharded)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("loss", "contrastive", "config.sdc.loss='contrastive' is not allowed"),
    ("margin", "big", "config.sdc.margin='big'"),
    ("margin", "-0.2", "config.sdc.margin='-0.2'"),
    ("centre_update", "ema", "config.sdc.centre_update"),
    ("feature_selection", "range,median", "config.sdc.feature_selection"),
    ("embedding_size", 0, "config.sdc.embedding_size"),
    ("dropout_rate", 1.0, "config.sdc.dropout_rate"),
])
def test_bad_sdc_fields_are_named(field, value, message):
  config = make_config()
  config.sdc[field] = value
  with pytest.raises(ValueError, match=message):
    sdc.SDC(config, num_classes=2, train_class_counts=[3, 1])


def test_config_arguments():
  config = make_config(arg="loss=triplet")
  assert (config.sdc.loss, config.sdc.margin) == ("triplet", "0.2")
  config.sdc.margin = "adaptive"
  with pytest.raises(ValueError, match="needs config.sdc.loss='com_triplet'"):
    sdc.SDC(config, num_classes=2, train_class_counts=[3, 1])
  with pytest.raises(ValueError, match="config.task"):
    sdc.SDC(make_config(), num_classes=7, train_class_counts=[1] * 7)
  with pytest.raises(ValueError, match="LW"):
    load_config("sdc", "strategy=TL+LW")
  local = load_config("sdc", "runlocal,margin=0.6,counts=834:14")
  assert (local.backbone, local.image_size, local.sdc.margin,
          local.train_class_counts) == ("small_resnet", 64, "0.6", "834:14")
  spec = importlib.util.spec_from_file_location("sdc_cfg", CONFIGS / "sdc.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tables = module.get_sweep("tables,runlocal")
  assert "backbone=vgg16,strategy=TL,loss=triplet,margin=0.2,runlocal" in tables
  assert len(module.get_sweep("grid")) == 36
  assert module.get_sweep("imbalance") == [
      "counts=834:834", "counts=834:417", "counts=834:208", "counts=834:56",
      "counts=834:23", "counts=834:14"]
  for run in tables:
    load_config("sdc", run)   # every sweep entry is a valid argument string
