"""The claims study: its verdict rule by hand, its plan, and a tiny study end to end."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from comtriplet_jax import configlib
from comtriplet_jax.evaluation import reproduce


def test_verdict_rule_on_hand_computed_intervals():
  # n = 3: t(0.975, 2) = 4.302653; sd of (0.1, 0.2, 0.3) is 0.1, so the half
  # width is 4.302653 * 0.1 / sqrt(3) = 0.248414 around the mean 0.2.
  mean, low, high = reproduce.paired_interval([0.1, 0.2, 0.3])
  assert mean == pytest.approx(0.2)
  assert (low, high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
  assert reproduce.verdict(low, high) == "inconclusive"
  # sd 0.01: half width 0.024841, the interval (0.285159, 0.334841) lies above 0.
  _, low, high = reproduce.paired_interval([0.30, 0.31, 0.32])
  assert low == pytest.approx(0.31 - 0.0248414, abs=1e-6)
  assert reproduce.verdict(low, high) == "holds"
  _, low, high = reproduce.paired_interval([-0.30, -0.31, -0.32])
  assert reproduce.verdict(low, high) == "reversed"
  # One seed has no interval: never a verdict either way.
  mean, low, high = reproduce.paired_interval([0.5])
  assert mean == 0.5 and math.isnan(low) and math.isnan(high)
  assert reproduce.verdict(low, high) == "inconclusive"


def test_differences_gain_against_the_best_other_arm_and_slopes():
  c2 = next(c for c in reproduce.CLAIMS if c.id == "C2")
  values = {"SDC_COM-Triplet": {0: 0.80, 1: 0.70},
            "classifier NP": {0: 0.75, 1: 0.72},
            "classifier LW": {0: 0.78, 1: 0.60}}
  np.testing.assert_allclose(reproduce.claim_differences(c2, values, [0, 1]),
                             [0.80 - 0.78, 0.70 - 0.72])
  c3 = next(c for c in reproduce.CLAIMS if c.id == "C3")
  # SDC: AUC 0.9 - 0.01 ln(r); classifier: 0.9 - 0.05 ln(r). Slopes -0.01 and -0.05.
  values = {a.label: {0: 0.9 - (0.01 if a.group == "sdc" else 0.05) * np.log(a.ratio)}
            for a in c3.arms}
  np.testing.assert_allclose(reproduce.claim_differences(c3, values, [0]), [0.04])


def test_every_arm_of_every_claim_is_a_valid_config_under_every_preset():
  for preset in reproduce.PRESETS.values():
    runs = reproduce.plan(reproduce.CLAIMS, preset, [0, 1])
    assert len({r.name for r in runs}) == len(runs)
    for spec in runs:
      config = reproduce._load_config(spec)
      configlib.validate(config)
      assert config.seed == spec.seed
  # The study's arms differ where their claims say, and only there.
  cpu = reproduce.PRESETS["cpu"]
  l1 = next(c for c in reproduce.CLAIMS if c.id == "L1")
  by_image, by_lesion = (reproduce._load_config(reproduce.run_for(a, cpu, 0))
                         for a in l1.arms)
  assert (by_image.split_by, by_lesion.split_by) == ("image", "lesion")
  assert by_image.to_dict() == dict(by_lesion.to_dict(), split_by="image")
  with pytest.raises(ValueError, match="unknown claim"):
    reproduce.select_claims(["C9"])


def test_tiny_study_runs_reports_and_resumes(fake_ham, tmp_path):
  extra = reproduce.parse_set([
      f"manual_dir={fake_ham}", f"tfds_data_dir={tmp_path / 'tfds'}",
      "image_size=32", "backbone=tiny_vgg", "batch_size=8", "eval_batch_size=8",
      "num_train_steps=2", "eval_every_steps=2", "checkpoint_every_steps=2",
      "sdc.embedding_size=8", "sdc.embedding_plot=False",
      "sdc.feature_selection=none", "heatmap_images=0"])
  out = tmp_path / "study"
  lines = []
  report = reproduce.run_study(out, preset="smoke", seeds=2, only=["C1", "C5"],
                               extra=extra, runner=reproduce.run_in_process,
                               log=lines.append)
  # Three distinct arms (C1 and C5 share SDC_COM-Triplet), two seeds each.
  runs = sorted(p.name for p in (out / "runs").iterdir())
  assert len(runs) == 6
  written = json.loads((out / "report.json").read_text())
  assert [c["id"] for c in written["claims"]] == ["C1", "C5"]
  for claim in written["claims"]:
    assert claim["verdict"] in reproduce.VERDICTS
    per_arm = []
    for arm in claim["arms"]:
      values = [json.loads((out / "runs" / run / "results.json").read_text())
                ["test"]["auc"] for run in arm["runs"]]
      assert arm["per_seed"] == pytest.approx(values)
      per_arm.append(values)
    differences = np.subtract(per_arm[0], per_arm[1])
    assert claim["differences"] == pytest.approx(differences)
    mean, low, high = reproduce.paired_interval(differences)
    assert claim["interval"] == pytest.approx([low, high])
    assert claim["verdict"] == reproduce.verdict(low, high)
    assert (out / claim["figure"]).read_bytes()[:4] == b"\x89PNG"
  markdown = (out / "report.md").read_text()
  assert "| C1 | SDC_COM-Triplet has a higher AUC than SDC_Triplet | auc |" in markdown
  assert "98.76 vs 98.46" in markdown
  assert report["claims"][0]["verdict"] == written["claims"][0]["verdict"]

  # Finished runs are read, not rerun; a run without results.json runs again.
  redo = runs[0]
  saved = out / "saved_results.json"
  shutil.move(out / "runs" / redo / "results.json", saved)
  started = []

  def runner(spec, workdir):
    started.append(spec.name)
    shutil.copy(saved, workdir / "results.json")

  again = reproduce.run_study(out, preset="smoke", seeds=2, only=["C1", "C5"],
                              extra=extra, runner=runner, log=lines.append)
  assert started == [redo]
  assert [c["verdict"] for c in again["claims"]] == [
      c["verdict"] for c in written["claims"]]
  # Another preset or other fields in the same folder would mix run sizes.
  with pytest.raises(ValueError, match="preset='smoke'.*use another --out"):
    reproduce.run_study(out, preset="cpu", seeds=2, only=["C1"], extra=extra,
                        runner=runner, log=lines.append)


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="--preset='laptop'"):
    reproduce.run_study(tmp_path, preset="laptop")
  with pytest.raises(ValueError, match="--seeds=0"):
    reproduce.run_study(tmp_path, seeds=0)
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    reproduce.parse_set(["image_size"])
  spec = reproduce.run_for(reproduce.CLAIMS[0].arms[0], reproduce.PRESETS["cpu"], 0,
                           [("no_such_field", 1)])
  with pytest.raises(ValueError, match="no_such_field: configs/sdc.py has no such field"):
    reproduce._load_config(spec)
