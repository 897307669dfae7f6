"""Grouped stratified splits, task mappings and imbalance control."""

from __future__ import annotations

import numpy as np
import pytest

from comtriplet_jax.data import splits

HAM_CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")
HAM_DIAGNOSES = {"mel": "melanoma", "nv": "nevus", "bcc": "bcc",
                 "akiec": "akiec", "bkl": "bkl", "df": "df", "vasc": "vasc"}


def _random_dataset(num_groups=600, seed=0, class_probs=(0.7, 0.2, 0.1)):
  """Groups of 1-4 examples; each group has one label drawn from class_probs."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 5, num_groups)
  group_labels = rng.choice(len(class_probs), num_groups, p=class_probs)
  groups = np.repeat([f"lesion_{g:05d}" for g in range(num_groups)], sizes)
  labels = np.repeat(group_labels, sizes)
  return labels, groups


def _assert_groups_disjoint(split, groups):
  for g in np.unique(groups):
    assert np.unique(split[groups == g]).size == 1, g


def test_grouped_split_keeps_groups_whole_and_classes_proportional():
  labels, groups = _random_dataset()
  fractions = (0.75, 0.125, 0.125)
  split = splits.grouped_stratified_split(labels, groups, fractions, seed=3)
  assert split.shape == labels.shape
  assert set(np.unique(split)) == {0, 1, 2}
  _assert_groups_disjoint(split, groups)
  for k, fraction in enumerate(fractions):
    assert abs(np.mean(split == k) - fraction) < 0.02
    for label in range(3):
      share = np.mean(split[labels == label] == k)
      # Within about two groups of the target for every class.
      assert abs(share - fraction) < 0.04, (k, label, share)


def test_grouped_split_is_deterministic_and_independent_of_order():
  labels, groups = _random_dataset(seed=1)
  split = splits.grouped_stratified_split(labels, groups, (0.8, 0.2), seed=7)
  again = splits.grouped_stratified_split(labels, groups, (0.8, 0.2), seed=7)
  np.testing.assert_array_equal(split, again)
  perm = np.random.default_rng(0).permutation(labels.size)
  shuffled = splits.grouped_stratified_split(labels[perm], groups[perm],
                                             (0.8, 0.2), seed=7)
  np.testing.assert_array_equal(shuffled, split[perm])
  other = splits.grouped_stratified_split(labels, groups, (0.8, 0.2), seed=8)
  assert np.any(other != split)


def test_mixed_label_group_takes_its_majority_label():
  labels = np.array([0, 1, 1, 2, 2, 0, 1])
  groups = np.array(["a", "a", "a", "b", "b", "b", "c"])
  unique, group_of, label_of = splits.group_labels(labels, groups)
  assert unique.tolist() == ["a", "b", "c"]
  assert label_of.tolist() == [1, 2, 1]
  np.testing.assert_array_equal(group_of, [0, 0, 0, 1, 1, 1, 2])
  # Ties go to the smallest label, whatever the order.
  _, _, tie = splits.group_labels(np.array([2, 0]), np.array(["x", "x"]))
  assert tie.tolist() == [0]


def test_scheme_80_20_carves_a_grouped_validation_split():
  labels, groups = _random_dataset(num_groups=1500, seed=2)
  split, names = splits.split_examples(labels, groups, scheme="80/20", seed=0,
                                       val_fraction=0.1)
  assert names == ("train", "validation", "test")
  _assert_groups_disjoint(split, groups)
  assert abs(np.mean(split == 0) - 0.72) < 0.02
  assert abs(np.mean(split == 1) - 0.08) < 0.02
  assert abs(np.mean(split == 2) - 0.20) < 0.02
  for label in range(3):
    assert abs(np.mean(split[labels == label] == 1) - 0.08) < 0.03
  # The test split does not depend on the validation carve.
  no_val, names = splits.split_examples(labels, groups, scheme="80/20", seed=0,
                                        val_fraction=0.0)
  assert names == ("train", "test")
  np.testing.assert_array_equal(no_val == 1, split == 2)
  three, names = splits.split_examples(labels, groups, scheme="75/12.5/12.5",
                                       seed=0)
  assert names == ("train", "validation", "test")
  assert abs(np.mean(three == 0) - 0.75) < 0.02


def test_split_arguments_are_checked():
  labels, groups = _random_dataset(num_groups=20)
  with pytest.raises(ValueError, match="split_scheme"):
    splits.split_examples(labels, groups, scheme="70/30", seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    splits.split_examples(labels, groups, scheme="80/20", seed=0,
                          val_fraction=1.0)
  with pytest.raises(ValueError, match="sum to 1"):
    splits.grouped_stratified_split(labels, groups, (0.5, 0.4), seed=0)
  with pytest.raises(ValueError, match="differ in length"):
    splits.grouped_stratified_split(labels, groups[:-1], (0.5, 0.5), seed=0)


# --- tasks -------------------------------------------------------------------

def test_melanoma_vs_nevus_on_ham_labels():
  labels = [0, 1, 2, 1, 0, 6, 4]  # mel nv bcc nv mel vasc bkl
  task, keep, names = splits.map_task_labels("melanoma_vs_nevus", labels,
                                             HAM_CLASSES, HAM_DIAGNOSES)
  assert names == ["nevus", "melanoma"]
  assert keep.tolist() == [True, True, False, True, True, False, False]
  assert task.tolist() == [1, 0, -1, 0, 1, -1, -1]


def test_malignant_vs_benign_and_melanoma_vs_rest_on_ham_labels():
  labels = [0, 1, 2, 3, 4, 5, 6]
  task, keep, names = splits.map_task_labels("malignant_vs_benign", labels,
                                             HAM_CLASSES, HAM_DIAGNOSES)
  assert names == ["benign", "malignant"]
  assert task.tolist() == [1, 0, 1, 1, 0, 0, 0] and keep.all()
  task, keep, names = splits.map_task_labels("melanoma_vs_rest", labels,
                                             HAM_CLASSES, HAM_DIAGNOSES)
  assert names == ["rest", "melanoma"]
  assert task.tolist() == [1, 0, 0, 0, 0, 0, 0] and keep.all()


def test_all_classes_drops_unknown_and_keeps_class_order():
  classes = ("mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc", "unk")
  diagnoses = {"mel": "melanoma", "nv": "nevus", "bcc": "bcc", "ak": "akiec",
               "bkl": "bkl", "df": "df", "vasc": "vasc", "scc": "scc",
               "unk": "unknown"}
  labels = [8, 0, 7, 8, 3]
  task, keep, names = splits.map_task_labels("all", labels, classes, diagnoses)
  assert names == list(classes[:8])
  assert task.tolist() == [-1, 0, 7, -1, 3]
  assert keep.tolist() == [False, True, True, False, True]
  task, keep, _ = splits.map_task_labels("malignant_vs_benign", labels, classes,
                                         diagnoses)
  assert task.tolist() == [-1, 1, 1, -1, 1]


def test_sk_vs_rest_on_isic2017_and_error_without_sk_class():
  classes = ("nevus", "melanoma", "seborrheic_keratosis")
  diagnoses = {c: c for c in classes}
  task, keep, names = splits.map_task_labels("sk_vs_rest", [2, 0, 1, 2],
                                             classes, diagnoses)
  assert names == ["rest", "seborrheic_keratosis"]
  assert task.tolist() == [1, 0, 0, 1] and keep.all()
  with pytest.raises(ValueError, match="ham10000.*seborrheic_keratosis|"
                     "seborrheic_keratosis.*ham10000"):
    splits.map_task_labels("sk_vs_rest", [0, 1], HAM_CLASSES, HAM_DIAGNOSES,
                           dataset="ham10000")


def test_ph2_nevi_include_atypical_nevi():
  classes = ("common_nevus", "atypical_nevus", "melanoma")
  diagnoses = {"common_nevus": "nevus", "atypical_nevus": "atypical_nevus",
               "melanoma": "melanoma"}
  task, keep, _ = splits.map_task_labels("melanoma_vs_nevus", [0, 1, 2],
                                         classes, diagnoses)
  assert task.tolist() == [0, 0, 1] and keep.all()


def test_task_errors_name_the_problem():
  with pytest.raises(ValueError, match="melanoma_vs_nevus"):
    splits.map_task_labels("mel_vs_nv", [0], HAM_CLASSES, HAM_DIAGNOSES)
  with pytest.raises(ValueError, match="no entry.*'vasc'"):
    splits.map_task_labels("all", [0], HAM_CLASSES,
                           {k: v for k, v in HAM_DIAGNOSES.items()
                            if k != "vasc"})
  with pytest.raises(ValueError, match="not canonical"):
    splits.map_task_labels("all", [0], HAM_CLASSES,
                           {**HAM_DIAGNOSES, "df": "dermatofibroma"})
  with pytest.raises(ValueError, match=r"\[0, 7\)"):
    splits.map_task_labels("all", [7], HAM_CLASSES, HAM_DIAGNOSES)
  with pytest.raises(ValueError, match="nevus class"):
    splits.map_task_labels("melanoma_vs_nevus", [0], ("benign", "malignant"),
                           {"benign": "benign", "malignant": "melanoma"})


def test_malignant_set_matches_the_builders():
  builders = pytest.importorskip("comtriplet_jax.data.builders")
  assert splits.MALIGNANT_DIAGNOSES == frozenset(builders.MALIGNANT_DIAGNOSES)


# --- imbalance control -------------------------------------------------------

def _training_set(seed=0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 4, 400)
  group_labels = (rng.uniform(size=400) < 0.25).astype(np.int64)
  groups = np.repeat([f"g{i:04d}" for i in range(400)], sizes)
  labels = np.repeat(group_labels, sizes)
  keys = np.array([f"img{i:05d}" for i in range(labels.size)])
  return labels, groups, keys


def test_subsample_gives_exact_counts_from_whole_groups():
  labels, groups, keys = _training_set()
  counts = splits.parse_class_counts("300:75", ["nevus", "melanoma"])
  np.testing.assert_array_equal(counts, [300, 75])
  keep = splits.subsample_to_counts(labels, groups, counts, seed=5, keys=keys)
  assert np.sum(keep & (labels == 0)) == 300
  assert np.sum(keep & (labels == 1)) == 75
  # Whole groups: at most one group per class is cut.
  for label in (0, 1):
    members = labels == label
    partial = [g for g in np.unique(groups[members & keep])
               if not keep[members & (groups == g)].all()]
    assert len(partial) <= 1


def test_subsample_is_deterministic_and_independent_of_order():
  labels, groups, keys = _training_set(seed=1)
  keep = splits.subsample_to_counts(labels, groups, [200, 40], seed=3,
                                    keys=keys)
  again = splits.subsample_to_counts(labels, groups, [200, 40], seed=3,
                                     keys=keys)
  np.testing.assert_array_equal(keep, again)
  perm = np.random.default_rng(9).permutation(labels.size)
  shuffled = splits.subsample_to_counts(labels[perm], groups[perm], [200, 40],
                                        seed=3, keys=keys[perm])
  np.testing.assert_array_equal(shuffled, keep[perm])
  other = splits.subsample_to_counts(labels, groups, [200, 40], seed=4,
                                     keys=keys)
  assert np.any(other != keep)


def test_class_count_errors_name_the_field():
  labels, groups, keys = _training_set()
  available = int(np.sum(labels == 1))
  with pytest.raises(ValueError,
                     match=f"train_class_counts.*'melanoma'.*only {available}"):
    splits.subsample_to_counts(labels, groups, [10, available + 1], seed=0,
                               keys=keys, class_names=["nevus", "melanoma"])
  with pytest.raises(ValueError,
                     match="train_class_counts.*one count per class"):
    splits.parse_class_counts("4500:75:10", ["nevus", "melanoma"])
  with pytest.raises(ValueError, match="train_class_counts.*integers"):
    splits.parse_class_counts("4500:many", ["nevus", "melanoma"])
  with pytest.raises(ValueError, match="train_class_counts.*positive"):
    splits.parse_class_counts("4500:0", ["nevus", "melanoma"])
  assert splits.parse_class_counts("", ["nevus", "melanoma"]) is None
