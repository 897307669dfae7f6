"""Faults and stale state: kills at every phase, wrong configs, wrong data folders.

The fault-injection test runs the real command (``python -m comtriplet_jax.main``)
in subprocesses that kill themselves with SIGKILL at named points
(``comtriplet_jax/faults.py``): during dataset preparation, between the best
checkpoint and its record, inside a step, while a periodic checkpoint is being
written, and during the final report. Each next process resumes what the last
one left, and the last ends bit-identical to an uninterrupted run: train state,
best checkpoint, ``best.json`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from comtriplet_jax import configlib
from comtriplet_jax import faults
from comtriplet_jax import train
from comtriplet_jax.data import builders
from comtriplet_jax.data import paths

import method_checks

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_classifier(fake_ham, data_dir, **overrides):
  config = configlib.base_config()
  config.update(dict(
      method="classifier", manual_dir=str(fake_ham), tfds_data_dir=str(data_dir),
      image_size=32, backbone="tiny_vgg", batch_size=8, eval_batch_size=8,
      learning_rate=1e-3, num_train_steps=2, log_every_steps=1, eval_every_steps=2,
      checkpoint_every_steps=2, heatmap_images=0))
  config.update(overrides)
  return config


# ------------------------------------------------------------ data folders
def test_data_folder_variable_set_to_a_wrong_folder_is_an_error(monkeypatch, tmp_path,
                                                                fake_ham):
  monkeypatch.setenv(paths.HAM10000_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=(
      r"COMTRIPLET_HAM10000_DIR='.*' is not a HAM10000 folder: it has no "
      r"HAM10000_metadata.csv and no images/")):
    paths.ham10000_dir()
  # What a run does with it: the same error, not the shared copy.
  with pytest.raises(FileNotFoundError, match="COMTRIPLET_HAM10000_DIR"):
    builders.get_builder("ham10000", data_dir=tmp_path / "tfds")
  monkeypatch.setenv(paths.HAM10000_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    paths.ham10000_dir()
  monkeypatch.setenv(paths.HAM10000_ENV, str(fake_ham))
  assert paths.ham10000_dir() == fake_ham


# ------------------------------------------------------------- the config
def test_validation_happens_before_anything_is_written(tmp_path, fake_ham):
  workdir = tmp_path / "run"
  config = tiny_classifier(fake_ham, tmp_path / "tfds", batch_size=6)  # 4 devices
  with pytest.raises(ValueError, match="config.batch_size=6 must be divisible"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  config = tiny_classifier(fake_ham, tmp_path / "tfds", eval_batch_size=10)
  with pytest.raises(ValueError, match="config.eval_batch_size=10"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_resume_refuses_another_config_and_fresh_starts_again(tmp_path, fake_ham):
  workdir = tmp_path / "run"
  config = tiny_classifier(fake_ham, tmp_path / "tfds")
  first = train.train_and_evaluate(config, str(workdir))
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["learning_rate"] == 1e-3 and recorded["method"] == "classifier"
  files = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}

  other = tiny_classifier(fake_ham, tmp_path / "tfds", learning_rate=1e-4,
                          num_train_steps=4)
  with pytest.raises(ValueError, match=(
      r"holds a run made with another config \(learning_rate: 0.001 in the run, "
      r"0.0001 now; num_train_steps: 2 in the run, 4 now\).*--fresh")):
    train.train_and_evaluate(other, str(workdir))
  # Refused before anything was written.
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == files

  # Logging and evaluation batch size may change: the finished run is resumed.
  relogged = tiny_classifier(fake_ham, tmp_path / "tfds", log_every_steps=2,
                             eval_batch_size=16)
  again = train.train_and_evaluate(relogged, str(workdir))
  assert again["test"] == first["test"] and again["best_step"] == first["best_step"]

  # --fresh: the old run is deleted and the new config trains from step 0.
  fresh = train.train_and_evaluate(other, str(workdir), fresh=True)
  assert fresh["num_train_steps"] == 4
  assert json.loads((workdir / "config.json").read_text())["learning_rate"] == 1e-4
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  assert mngr.all_steps() == [2, 4]
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1


# ------------------------------------------------------- best-model record
def test_best_checkpoint_without_its_record_is_dropped(tmp_path):
  state = {"w": np.arange(3.0)}
  mngr = ocp.CheckpointManager((tmp_path / "best_checkpoint").absolute(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                    create=True))
  mngr.save(4, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  # No best.json: the step-4 checkpoint is an orphan.
  best = train.reconcile_best(tmp_path, mngr)
  assert best.step == -1 and mngr.all_steps() == []
  # A record and its checkpoint agree: kept.
  mngr.save(6, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  (tmp_path / "best.json").write_text(json.dumps({"step": 6, "value": 0.7,
                                                  "metrics": {"auc": 0.7}}))
  best = train.reconcile_best(tmp_path, mngr)
  assert (best.step, best.value, mngr.all_steps()) == (6, 0.7, [6])
  # A record whose checkpoint is gone is dropped.
  (tmp_path / "best.json").write_text(json.dumps({"step": 3, "value": 0.9,
                                                  "metrics": {}}))
  best = train.reconcile_best(tmp_path, mngr)
  assert best.step == -1 and mngr.all_steps() == []


def test_unknown_crash_point_is_named(monkeypatch):
  monkeypatch.setenv(faults.ENV, "teatime:1")
  with pytest.raises(ValueError, match="crash point must be one of"):
    faults.point("step")


# ------------------------------------------------------------ kill and resume
def _command(fake_ham, data_dir, workdir):
  overrides = dict(manual_dir=fake_ham, tfds_data_dir=data_dir, image_size=32,
                   backbone="tiny_vgg", batch_size=8, eval_batch_size=8,
                   learning_rate=0.001, num_train_steps=6, log_every_steps=1,
                   eval_every_steps=3, checkpoint_every_steps=3, heatmap_images=0)
  return [sys.executable, "-m", "comtriplet_jax.main",
          "--config=configs/classifier.py", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def _run(command, fault=None):
  env = dict(os.environ)
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def test_killed_at_every_phase_the_run_resumes_to_the_same_end(fake_ham, tmp_path):
  reference = tmp_path / "reference"
  done = _run(_command(fake_ham, tmp_path / "tfds_reference", reference))
  assert done.returncode == 0, done.stderr[-3000:]

  workdir = tmp_path / "killed"
  command = _command(fake_ham, tmp_path / "tfds_killed", workdir)
  # In this order, each kill point is reached for sure: the first evaluation of
  # a run that starts from scratch always saves a best checkpoint.
  for fault in ("prepare:20", "best_recorded:1", "step:2", "checkpoint_write:1",
                "report:1"):
    killed = _run(command, fault)
    assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-3000:])
    assert not (workdir / "results.json").exists(), fault
    if fault == "best_recorded:1":   # the state that used to block every resume
      assert (workdir / "best_checkpoint" / "3").is_dir()
      assert not (workdir / "best.json").exists()
  done = _run(command)
  assert done.returncode == 0, done.stderr[-3000:]
  method_checks.assert_resumed_run_equals_whole_run(reference, workdir)
  assert (json.loads((reference / "best.json").read_text())
          == json.loads((workdir / "best.json").read_text()))
  assert ((reference / "results.json").read_text()
          == (workdir / "results.json").read_text())
