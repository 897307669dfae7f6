"""The training loop end to end on a small generated HAM10000-like folder.

Four fake CPU devices, a tiny backbone at 32 px: a few steps train, evaluate,
checkpoint and write metrics; a killed run resumes to the same parameters; a
non-finite loss stops the run and keeps the last good checkpoint; pmap and
shard_map runs give the same parameters.
"""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from comtriplet_jax import configlib
from comtriplet_jax import train
from comtriplet_jax.data import pipeline

def make_config(fake_ham, data_dir, **overrides):
  config = configlib.base_config()
  config.update(dict(
      method="classifier", dataset="ham10000", manual_dir=str(fake_ham),
      tfds_data_dir=str(data_dir), task="melanoma_vs_nevus", image_size=32,
      backbone="tiny_resnet", batch_size=8, eval_batch_size=8, learning_rate=1e-3,
      num_train_steps=6, log_every_steps=2, eval_every_steps=3,
      checkpoint_every_steps=3))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _final_params(workdir: pathlib.Path):
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  restored = mngr.restore(mngr.latest_step())
  return mngr.latest_step(), restored


def test_train_evaluate_writes_everything(fake_ham, data_dir, tmp_path):
  config = make_config(fake_ham, data_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert set(results) >= {"validation", "test", "best_step"}
  written = json.loads((tmp_path / "results.json").read_text())
  for split in ("validation", "test"):
    assert 0.0 <= written[split]["accuracy"] <= 1.0
    assert sum(map(sum, written[split]["confusion_matrix"])) == results["num_examples"][split]
  assert (tmp_path / "best.json").exists()
  assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event file"
  step, _ = _final_params(tmp_path)
  assert step == 6


def test_killed_run_resumes_to_the_same_parameters(fake_ham, data_dir, tmp_path,
                                                   monkeypatch):
  config = make_config(fake_ham, data_dir, augment=True)
  train.train_and_evaluate(config, str(tmp_path / "whole"))

  # Kill the second run right after its step-3 checkpoint, while it is fetching
  # the batch of step 5.
  real_iterate = pipeline.iterate_train

  def dying_iterate(data, start_step):
    for i, batch in enumerate(real_iterate(data, start_step)):
      if start_step == 0 and i == 4:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(pipeline, "iterate_train", dying_iterate)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "killed"))
  step, _ = _final_params(tmp_path / "killed")
  assert step == 3
  train.train_and_evaluate(config, str(tmp_path / "killed"))

  step_a, whole = _final_params(tmp_path / "whole")
  step_b, resumed = _final_params(tmp_path / "killed")
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pmap_and_shard_map_runs_agree(fake_ham, data_dir, tmp_path):
  runs = {}
  for mode in ("pmap", "shard_map"):
    config = make_config(fake_ham, data_dir, parallelism=mode, num_train_steps=2,
                         eval_every_steps=2, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path / mode))
    runs[mode] = _final_params(tmp_path / mode)[1]
  for a, b in zip(jax.tree.leaves(runs["pmap"]), jax.tree.leaves(runs["shard_map"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(fake_ham, data_dir,
                                                             tmp_path):
  # A learning rate of 1e30 makes the parameters huge after one Adam step and
  # the loss infinite or NaN on the next.
  config = make_config(fake_ham, data_dir, learning_rate=1e30, log_every_steps=1,
                       checkpoint_every_steps=1, eval_every_steps=100)
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.train_and_evaluate(config, str(tmp_path))
  step, state = _final_params(tmp_path)
  assert step >= 1
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))


def test_bad_config_is_rejected_before_reading_data(tmp_path):
  config = configlib.base_config()
  config.backbone = "alexnet"
  with pytest.raises(ValueError, match="config.backbone"):
    train.train_and_evaluate(config, str(tmp_path))
  config = configlib.base_config()
  config.method = "magic"
  with pytest.raises(ValueError, match="config.method"):
    train.train_and_evaluate(config, str(tmp_path))
