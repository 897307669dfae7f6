"""The training loop end to end on a small generated HAM10000-like folder.

Four fake CPU devices, a tiny backbone at 32 px: a few steps train, evaluate,
checkpoint and write metrics that scikit-learn recomputes from the selected
checkpoint; a killed run resumes to exactly the same state and results; a
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

import method_checks


def make_config(fake_ham, data_dir, **overrides):
  config = configlib.base_config()
  config.update(dict(
      method="classifier", dataset="ham10000", manual_dir=str(fake_ham),
      tfds_data_dir=str(data_dir), task="melanoma_vs_nevus", image_size=32,
      backbone="tiny_resnet", batch_size=8, eval_batch_size=8, learning_rate=1e-3,
      num_train_steps=6, log_every_steps=2, eval_every_steps=3,
      checkpoint_every_steps=3, heatmap_images=0))
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
  config = make_config(fake_ham, data_dir, heatmap_images=8)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert set(results) >= {"validation", "test", "best_step"}
  written = json.loads((tmp_path / "results.json").read_text())
  for split in ("validation", "test"):
    assert sum(map(sum, written[split]["confusion_matrix"])) == results["num_examples"][split]
  # The loop's metrics equal scikit-learn's on the selected checkpoint's scores,
  # computed one image at a time outside the loop.
  method_checks.assert_results_match_rescoring(config, tmp_path, written)
  card = method_checks.assert_run_is_usable(tmp_path, fake_ham / "images",
                                            tmp_path / "predict")
  assert (card["method"], card["image_size"], card["operating_point"]) == (
      "classifier", 32, "paper")
  assert (tmp_path / "best.json").exists()
  events = list(tmp_path.glob("events.out.tfevents.*"))
  assert events, "no TensorBoard event file"
  # The selected model's pictures, also in TensorBoard.
  for name in ("gradcam_test.png", "roc_test.png"):
    assert (tmp_path / name).stat().st_size > 1000, name
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(events[0]))
  acc.Reload()
  pictures = acc.Tags()["images"] + acc.Tags()["tensors"]
  assert {"pictures/gradcam_test", "pictures/roc_test"} <= set(pictures), pictures
  step, _ = _final_params(tmp_path)
  assert step == 6


def test_killed_run_resumes_to_the_same_parameters(fake_ham, data_dir, tmp_path):
  config = make_config(fake_ham, data_dir, augment=True)
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  # Killed right after its step-3 checkpoint, while fetching the batch of step 5.
  method_checks.kill_and_resume(config, tmp_path / "killed", kill_at_batch=4)
  method_checks.assert_resumed_run_equals_whole_run(tmp_path / "whole",
                                                    tmp_path / "killed")


def test_pmap_and_shard_map_runs_agree(fake_ham, data_dir, tmp_path):
  runs = {}
  for mode in ("pmap", "shard_map"):
    config = make_config(fake_ham, data_dir, parallelism=mode, num_train_steps=2,
                         eval_every_steps=2, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path / mode))
    runs[mode] = _final_params(tmp_path / mode)[1]
  assert jax.tree.structure(runs["pmap"]) == jax.tree.structure(runs["shard_map"])
  for a, b in zip(jax.tree.leaves(runs["pmap"]), jax.tree.leaves(runs["shard_map"]),
                  strict=True):
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


def test_learning_rate_schedules_by_hand():
  config = configlib.base_config()
  config.learning_rate = 1e-3
  assert train.learning_rate(config, 100) == 1e-3     # constant: the papers'
  config.lr_schedule, config.warmup_steps = "cosine", 10
  configlib.validate(config)
  schedule = train.learning_rate(config, 110)
  # Linear warm-up to the peak at step 10, then 1e-3 * (1 + cos(pi t / 100)) / 2.
  for step, expected in ((0, 0.0), (5, 5e-4), (10, 1e-3), (60, 5e-4), (110, 0.0),
                         (35, 1e-3 * (1 + np.cos(np.pi * 25 / 100)) / 2)):
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-9), step
  with pytest.raises(ValueError, match="needs the number of training steps"):
    train.learning_rate(config)
  # Fewer steps than the warm-up (a smoke run): warm up, then one step of decay.
  short = train.learning_rate(config, 2)
  assert [float(short(t)) for t in (0, 1, 2)] == pytest.approx([0.0, 1e-3, 0.0])
  config.warmup_steps = -1
  with pytest.raises(ValueError, match="config.warmup_steps"):
    configlib.validate(config)
  config.warmup_steps, config.lr_schedule = 0, "step"
  with pytest.raises(ValueError, match="config.lr_schedule"):
    configlib.validate(config)
