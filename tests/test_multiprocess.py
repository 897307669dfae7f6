"""Scaling out: two processes with two devices each equal one process with four.

The multi-process test is real: two Python processes on localhost, each with two
fake CPU devices, join through ``jax.distributed`` (coordinator on a free loopback
port, gloo collectives on CPU) by running ``python -m comtriplet_jax.main`` with
``--coordinator_address --num_processes --process_id``, and train SDC with
augmentation for a few steps on a generated HAM10000-like folder. Their final
checkpoint, SDC's centres and the evaluation results must equal those of the
same config trained in this pytest process on four devices: each device's
training stream and augmentation key depend on its global index only
(``pipeline.deal_to_devices``, ``triplets``), so both runs see the same global
batches. SDC covers the most cross-process state (triplets sampled per device,
centres merged across devices, the sharded evaluation). The classifier's one
collective of its own, LW's class counts over the global batch, is a sum over the
same ``data`` axis, checked on four devices in ``test_classification_losses``.
One two-process job instead of one per method keeps this test to two extra
interpreters on CI's two cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from comtriplet_jax import train
from comtriplet_jax.data import builders

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What both runs train: tiny models, 32 px, three steps, one evaluation.
# Adam's eps is raised so that gradient entries near zero, whose sign can differ
# with the order of the cross-device sums, are not scaled up to full-size steps.
COMMON = dict(image_size=32, backbone="tiny_resnet", batch_size=8, eval_batch_size=8,
              learning_rate=1e-3, adam_eps=1e-3, num_train_steps=3, log_every_steps=1,
              eval_every_steps=3, checkpoint_every_steps=3, heatmap_images=0)
RUNS = {
    # DA: per-device augmentation keys from the global device index.
    "sdc": ("sdc.py", "strategy=DA", {"sdc.embedding_size": 16,
                                       "sdc.embedding_plot": False}),
}


def _load_config(file: str, arg: str) -> ml_collections.ConfigDict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(file, ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _overrides(name: str, fake_ham: pathlib.Path, data_dir: pathlib.Path
               ) -> dict[str, object]:
  return {**COMMON, **RUNS[name][2], "manual_dir": str(fake_ham),
          "tfds_data_dir": str(data_dir)}


def _config(name: str, fake_ham, data_dir) -> ml_collections.ConfigDict:
  file, arg, _ = RUNS[name]
  config = _load_config(file, arg)
  for key, value in _overrides(name, fake_ham, data_dir).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _free_ports(n: int) -> list[int]:
  """n distinct free loopback ports (all bound at once, so none repeats)."""
  sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _launch_two_processes(name: str, fake_ham, data_dir, workdir: pathlib.Path,
                          port: int) -> list[subprocess.Popen]:
  file, arg, _ = RUNS[name]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  flags = [f"--config.{k}={v}" for k, v in _overrides(name, fake_ham, data_dir).items()]
  procs = []
  for process_id in range(2):
    log = open(workdir.parent / f"{name}_process{process_id}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "comtriplet_jax.main",
         f"--config={ROOT / 'configs' / file}:{arg}", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={process_id}", *flags],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(name: str, procs: list[subprocess.Popen], workdir: pathlib.Path) -> None:
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for process_id, code in enumerate(codes):
    log = (workdir.parent / f"{name}_process{process_id}.log").read_text()
    assert code == 0, f"{name} process {process_id} failed:\n{log[-4000:]}"


def _latest(workdir: pathlib.Path):
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  step = mngr.latest_step()
  return step, mngr.restore(step)


def test_two_processes_equal_one_process_with_four_devices(fake_ham, tmp_path):
  data_dir = tmp_path / "tfds"
  # Prepare the dataset before anything runs concurrently on it.
  builders.prepare(builders.get_builder("ham10000", data_dir=str(data_dir),
                                        manual_dir=str(fake_ham)))
  # The two-process jobs start (their start-up is mostly single-threaded) and
  # the references train here meanwhile.
  launched = {}
  for name, port in zip(RUNS, _free_ports(len(RUNS))):
    workdir = tmp_path / "two" / name
    workdir.mkdir(parents=True)
    launched[name] = _launch_two_processes(name, fake_ham, data_dir, workdir, port)
  reference = {}
  try:
    for name in RUNS:
      reference[name] = train.train_and_evaluate(
          _config(name, fake_ham, data_dir), str(tmp_path / "one" / name))
  finally:
    for name in RUNS:
      _wait(name, launched[name], tmp_path / "two" / name)

  for name in RUNS:
    one, two = tmp_path / "one" / name, tmp_path / "two" / name
    step_one, state_one = _latest(one)
    step_two, state_two = _latest(two)
    assert step_one == step_two == COMMON["num_train_steps"]
    leaves_one = jax.tree_util.tree_leaves_with_path(state_one)
    leaves_two = jax.tree.leaves(state_two)
    assert len(leaves_one) == len(leaves_two)
    # Same batches and keys; only the order of the cross-process sums differs,
    # and three Adam steps carry that rounding into every leaf: compare each
    # leaf to within 1e-3 of its own scale (each Adam step moves a parameter
    # by up to the learning rate, 1e-3, so a different batch or key shows).
    # The floor, a tenth of one step, is for leaves whose true gradient is 0 (a
    # convolution's bias before batch norm): they hold rounding noise only, which
    # Adam's normalisation scales up towards a step.
    for (path, a), b in zip(leaves_one, leaves_two):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      scale = float(np.max(np.abs(b), initial=0.0))
      assert np.max(np.abs(a - b), initial=0.0) <= 1e-3 * scale + 1e-4, (
          f"{name}: {jax.tree_util.keystr(path)} differs by "
          f"{np.max(np.abs(a - b)):.3g} at scale {scale:.3g}")
    # Evaluation gathered from both processes scores every example once.
    results_two = json.loads((two / "results.json").read_text())
    for split in ("validation", "test"):
      expected = reference[name][split]
      assert results_two[split]["confusion_matrix"] == expected["confusion_matrix"]
      np.testing.assert_allclose(results_two[split]["auc"], expected["auc"],
                                 atol=1e-6)
    # Only process 0 writes TensorBoard events.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1, name
  centres_one = _latest(tmp_path / "one" / "sdc")[1]["method_state"]["centres"]
  centres_two = _latest(tmp_path / "two" / "sdc")[1]["method_state"]["centres"]
  assert int(centres_one["num_updates"]) == int(centres_two["num_updates"]) >= 1
