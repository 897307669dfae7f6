"""SDC end to end on four fake devices with a generated HAM10000-like folder.

A tiny VGG at 32 px (it compiles four times faster than tiny_resnet); a few
steps train, evaluate with the prototypes and write the report (feature
selection, embedding picture); the centres are the same on every device and
are checkpointed, so a run resumed from a mid-run checkpoint ends with the
same parameters and centres;
pmap and shard_map give the same SDC step; bad SDC fields are named.
"""

import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from comtriplet_jax import parallel
from comtriplet_jax import train
from comtriplet_jax.data import triplets
from comtriplet_jax.methods import sdc

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


def _latest(workdir: pathlib.Path):
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  return mngr.latest_step(), mngr.restore(mngr.latest_step())


def test_sdc_trains_evaluates_resumes_and_reports(fake_ham, data_dir, tmp_path,
                                                  monkeypatch):
  config = make_config(fake_ham, data_dir)
  results = train.train_and_evaluate(config, str(tmp_path / "whole"))
  written = json.loads((tmp_path / "whole" / "results.json").read_text())
  for split in ("validation", "test"):
    assert 0.0 <= written[split]["auc"] <= 1.0
    for rule in ("range", "mean_difference"):
      selected = written["feature_selection"][rule]
      assert 1 <= selected["num_features_kept"] <= 16
      assert 0.0 <= selected[split]["auc"] <= 1.0
      assert selected[split]["num_examples"] == results["num_examples"][split]
  assert written["prototypes"]["num_updates"] >= 1
  assert 0.0 < written["prototypes"]["separation"] <= 2.0
  png = pathlib.Path(written["embedding_plot"])
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Resume from the step-3 checkpoint: a copy of the run without its later
  # checkpoint is what a run killed after step 3 leaves behind. The resumed run
  # must draw the triplets of steps 4-6 and restore the step-3 centres, and end
  # where the uninterrupted run ended.
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  step, killed = _latest(tmp_path / "resumed")
  assert step == 3
  assert int(killed["method_state"]["centres"]["num_updates"]) >= 1
  config.sdc.embedding_plot = False   # the report was checked above
  config.sdc.feature_selection = "none"
  starts = []
  real_stream = triplets.triplet_stream

  def recording_stream(*args, start_step=0, **kwargs):
    starts.append(start_step)
    return real_stream(*args, start_step=start_step, **kwargs)

  monkeypatch.setattr(triplets, "triplet_stream", recording_stream)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert starts == [3]

  step_a, whole = _latest(tmp_path / "whole")
  step_b, resumed = _latest(tmp_path / "resumed")
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(whole["method_state"]["centres"]["num_updates"],
                                resumed["method_state"]["centres"]["num_updates"])


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
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
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
