"""Makes known one-line bugs, one at a time, in a copy of the tree; runs their tests.

Every test of how a method wires its equations must fail when the wiring is
wrong. This script is that check: each entry of ``MUTANTS`` is a plausible bug
(a swapped argument, an inverted switch, a dropped term) with the tests that
must catch it. For each, the checkout's files (tracked and untracked, not
ignored) are copied to a temporary folder, the one line is changed there, and
pytest runs in the copy; the mutant is "caught" when a test fails. Nothing in
the checkout is modified. Not collected by pytest (the name does not start with
``test_``); run it from the repository root:

  .venv/bin/python tests/run_mutants.py [NAME ...]

It prints one line per mutant and exits 1 if any was missed.
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

W = "tests/test_method_wiring.py"
MUTANTS = [
    # name, file, old, new, tests
    ("sdc_eq6_negatives_labelled_as_anchor", "comtriplet_jax/methods/sdc.py",
     "labels = jnp.concatenate([anchor_label, anchor_label, 1 - anchor_label])",
     "labels = jnp.concatenate([anchor_label, anchor_label, anchor_label])", [W]),
    ("sdc_eq7_monotone_and_last_swapped", "comtriplet_jax/methods/sdc.py",
     'update = (prototypes.update_centres if self.cfg.centre_update == "monotone"',
     'update = (prototypes.update_centres if self.cfg.centre_update == "last"', [W]),
    ("sdc_eq14_prototypes_swapped", "comtriplet_jax/methods/sdc.py",
     'centres["centre_min"], centres["centre_maj"])\n\n',
     'centres["centre_maj"], centres["centre_min"])\n\n', [W]),
    ("sdc_margin_ignored", "comtriplet_jax/methods/sdc.py",
     "return losses.com_triplet_loss(anchor, positive, negative, margin=self.margin,",
     "return losses.com_triplet_loss(anchor, positive, negative, margin=None,", [W]),
    ("classifier_lw_off", "comtriplet_jax/methods/classifier.py",
     '"batch": "batch"}[weighting]', '"batch": "none"}[weighting]', [W]),
    ("classifier_score_of_class_0", "comtriplet_jax/methods/classifier.py",
     "scores = probs[:, 1] if", "scores = probs[:, 0] if", [W]),
    ("augmentation_never_applied", "comtriplet_jax/methods/base.py",
     "if train and self.config.augment:", "if train and False:", [W]),
    ("every_image_its_own_group", "comtriplet_jax/data/pipeline.py",
     'group_ids = np.where(group_ids == "", image_ids, group_ids)',
     "group_ids = image_ids", ["tests/test_pipeline.py"]),
    ("train_step_applies_non_finite_update", "comtriplet_jax/train.py",
     "lambda n, o: jnp.where(finite, n, o), new, old)",
     "lambda n, o: n, new, old)", [W]),
    ("evaluation_misaligns_examples", "comtriplet_jax/data/eval_split.py",
     "return {k: v[mask][order] for k, v in values.items()}, index[order]",
     "return {k: v[mask] for k, v in values.items()}, index[order]",
     ["tests/test_train.py::test_train_evaluate_writes_everything"]),
    ("resume_restarts_the_stream_at_0", "comtriplet_jax/train.py",
     "train_iter: Iterator = method.train_stream(data, start_step)",
     "train_iter: Iterator = method.train_stream(data, 0)",
     ["tests/test_train.py::test_killed_run_resumes_to_the_same_parameters"]),
    ("udc_majority_taken_as_minority", "comtriplet_jax/methods/udc.py",
     "minority = jnp.argmin(fit.weights)", "minority = jnp.argmax(fit.weights)",
     ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("udc_assignment_switch_inverted", "comtriplet_jax/methods/udc.py",
     'assignment = local_pseudo if self.cfg.assignment == "gmm" else None',
     'assignment = local_pseudo if self.cfg.assignment == "nearest" else None',
     ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("udc_unit_features_ignored", "comtriplet_jax/methods/udc.py",
     "features = losses.unit_vectors(embeddings)", "features = embeddings",
     ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("udc_triplet_switch_ignored", "comtriplet_jax/methods/udc.py",
     'if self.cfg.loss == "triplet":\n      per_anchor',
     'if False:\n      per_anchor', ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("udc_every_device_takes_slice_0", "comtriplet_jax/methods/udc.py",
     "start = jax.lax.axis_index(parallel.AXIS) * local", "start = 0 * local",
     ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("udc_gmm_key_ignores_the_step", "comtriplet_jax/methods/udc.py",
     "jax.random.PRNGKey(self.config.seed), _GMM_KEY_TAG), step)",
     "jax.random.PRNGKey(self.config.seed), _GMM_KEY_TAG), 0)",
     ["tests/test_udc.py", "-k", "not end_to_end"]),
    ("biigma_wce_always_batch_weighted", "comtriplet_jax/methods/biigma.py",
     'if self.cfg.class_weighting == "batch":', 'if True:',
     ["tests/test_biigma.py", "-k", "wce_of or official or ablation"]),
    ("biigma_hybrid_wce_on_clean_logits", "comtriplet_jax/methods/biigma.py",
     'wce_hybrid = self._wce(out["hybrid_logits"], labels)',
     'wce_hybrid = self._wce(out["logits"], labels)',
     ["tests/test_biigma.py", "-k", "wce_of or official or ablation or hybrid_term"]),
    ("biigma_indep_measure_ignored", "comtriplet_jax/methods/biigma.py",
     "measure=cfg.indep_measure,", 'measure="hsic",',
     ["tests/test_biigma.py", "-k", "wce_of or official or ablation"]),
    ("biigma_l2_term_dropped", "comtriplet_jax/methods/biigma.py",
     "total += cfg.indep_weight * dependence + l2",
     "total += cfg.indep_weight * dependence",
     ["tests/test_biigma.py", "-k", "wce_of or official or ablation"]),
    ("biigma_uniform_class_weights", "comtriplet_jax/methods/biigma.py",
     "self.class_weights = losses.class_weights_from_counts(self.train_class_counts)",
     "self.class_weights = jnp.ones_like(self.train_class_counts)",
     ["tests/test_biigma.py", "-k", "wce_of or official or ablation"]),
    ("biigma_sampling_starts_a_step_late", "comtriplet_jax/methods/biigma.py",
     "active = (step >= self.sampling_start_step)",
     "active = (step > self.sampling_start_step)",
     ["tests/test_biigma.py", "-k", "hybrid_term"]),
    ("cae_loss_against_the_noisy_image", "comtriplet_jax/methods/cae.py",
     "mse = jnp.mean((reconstruction - clean.astype(jnp.float32)) ** 2)",
     "mse = jnp.mean((reconstruction - noisy.astype(jnp.float32)) ** 2)",
     ["tests/test_cae.py", "-k", "not end_to_end"]),
    ("cae_features_of_noisy_images", "comtriplet_jax/methods/cae.py",
     'codes = self.model.apply(variables, clean, train=False, method="encode")',
     'codes = self.model.apply(variables, noisy, train=False, method="encode")',
     ["tests/test_cae.py", "-k", "not end_to_end"]),
    ("cae_ring_buffer_overwrites_the_start", "comtriplet_jax/methods/cae.py",
     "rows = (seen + jnp.arange(features.shape[0], dtype=jnp.int32)) % size",
     "rows = jnp.arange(features.shape[0], dtype=jnp.int32) % size",
     ["tests/test_cae.py", "-k", "not end_to_end"]),
    ("cae_predict_prototypes_swapped", "comtriplet_jax/methods/cae.py",
     "return prototypes_lib.prototype_scores(codes, rows[1], rows[0],",
     "return prototypes_lib.prototype_scores(codes, rows[0], rows[1],",
     ["tests/test_cae.py", "-k", "not end_to_end"]),
    # Issue 21: using a run.
    ("operating_points_chosen_on_test", "comtriplet_jax/runs.py",
     'val_y, val_s = labels["validation"], scores["validation"]',
     'val_y, val_s = labels["test"], scores["test"]',
     ["tests/test_train.py::test_train_evaluate_writes_everything"]),
    ("cae_final_prototypes_not_used_for_inference", "comtriplet_jax/methods/cae.py",
     'if self.settings.final_prototypes != "train_kmeans" or vectors is None:',
     "if True:", ["tests/test_cae.py::test_train_and_evaluate_end_to_end"]),
    ("predict_ignores_the_operating_point", "comtriplet_jax/runs.py",
     "return operating_points.apply_threshold(scores, self.threshold(rule))",
     'return operating_points.apply_threshold(scores, self.threshold("paper"))',
     ["tests/test_inference.py"]),
    ("split_file_ignored", "comtriplet_jax/data/pipeline.py",
     "  if split_file:\n", "  if False:\n", ["tests/test_pipeline.py"]),
    ("eval_outputs_keep_padding", "comtriplet_jax/data/eval_split.py",
     "  index = index[mask]\n", "  mask = np.ones_like(mask)\n  index = index[mask]\n",
     ["tests/test_eval_split.py"]),
    # Issue 20's five faults, each put back as it was before its fix.
    ("resume_keeps_an_orphan_best_checkpoint", "comtriplet_jax/train.py",
     "  best = reconcile_best(workdir, best_ckpt)\n",
     "  best = _Best(**json.loads((workdir / BEST_FILE).read_text())) if (\n"
     "      workdir / BEST_FILE).exists() else _Best()\n",
     ["tests/test_faults.py", "-k", "killed_at_every"]),
    ("resume_ignores_another_config", "comtriplet_jax/train.py",
     "    check_resumable(config, workdir)\n", "    pass\n",
     ["tests/test_faults.py", "-k", "another_config"]),
    ("data_variable_falls_back", "comtriplet_jax/data/paths.py",
     "  if value:\n", "  if value and not _problem(pathlib.Path(value)):\n",
     ["tests/test_faults.py", "-k", "wrong_folder"]),
    ("workdir_written_before_the_checks", "comtriplet_jax/train.py",
     "  workdir = pathlib.Path(workdir)\n  par = parallel.DataParallel(",
     "  workdir = pathlib.Path(workdir)\n  workdir.mkdir(parents=True)\n"
     "  par = parallel.DataParallel(",
     ["tests/test_faults.py", "-k", "before_anything"]),
    ("stale_prepared_data_reused", "comtriplet_jax/data/builders.py",
     'data_dir = base / "sources" / source_fingerprint(folder)',
     'data_dir = base / "sources" / "same"',
     ["tests/test_builders.py", "-k", "follows_the_source"]),
    ("cae_running_prototypes_minority_first", "comtriplet_jax/methods/cae.py",
     "order = jnp.stack([1 - minority, minority])",
     "order = jnp.stack([minority, 1 - minority])",
     ["tests/test_cae.py", "-k", "not end_to_end"]),
]


def main(names) -> int:
  root = pathlib.Path(__file__).resolve().parents[1]
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True, text=True).stdout.split()
  results = {}
  with tempfile.TemporaryDirectory(prefix="comtriplet_mutants_") as tmp:
    copy = pathlib.Path(tmp)
    for name in files:
      if (root / name).is_file():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, copy / name)
    where = subprocess.run(
        [sys.executable, "-c", "import comtriplet_jax; print(comtriplet_jax.__file__)"],
        cwd=copy, check=True, capture_output=True, text=True).stdout.strip()
    if not pathlib.Path(where).is_relative_to(copy.resolve()):
      raise RuntimeError(f"the copy imports comtriplet_jax from {where}, not {copy}")
    for name, path, old, new, tests in MUTANTS:
      if names and name not in names:
        continue
      file = copy / path
      text = file.read_text()
      if text.count(old) != 1:
        raise ValueError(f"mutant {name}: {path} holds the line to change "
                         f"{text.count(old)} times, not once: {old!r}")
      file.write_text(text.replace(old, new))
      start = time.time()
      try:
        # The copy comes first on sys.path (python -m runs from it), ahead of
        # the checkout's editable install.
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             *tests], cwd=copy, capture_output=True, text=True)
      finally:
        file.write_text(text)
      caught = proc.returncode == 1
      failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
      if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
      results[name] = {"caught": caught, "returncode": proc.returncode,
                       "failed": failed[:3], "seconds": round(time.time() - start)}
      print(f"{name}: {'caught' if caught else 'MISSED'} (rc {proc.returncode}, "
            f"{time.time() - start:.0f} s) {failed[:1]}", flush=True)
  missed = [n for n, r in results.items() if not r["caught"]]
  print(f"{len(results) - len(missed)} of {len(results)} mutants caught"
        + (f"; missed: {', '.join(missed)}" if missed else ""))
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
