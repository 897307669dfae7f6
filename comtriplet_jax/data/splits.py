"""Grouped stratified splits, task label mapping and imbalance control (NumPy).

Everything here works on per-example arrays read from a dataset's metadata
(labels, group ids, image ids) and returns per-example arrays; no image is
touched. The tf.data side (``pipeline.py``) turns the result into filters.

Splits are by group (lesion or patient id), so no group is in two splits, and
stratified by the group's label, so every split keeps the class proportions of
the whole dataset. Both papers' schemes are offered:

- ``'75/12.5/12.5'``: train / validation / test (COM-Triplet paper, Sec. V).
- ``'80/20'``: train / test (BIIGMA-Net paper, Sec. 3.1), with a validation
  part carved from the training 80% (``val_fraction`` of it, grouped and
  stratified as well), so that model selection never looks at the test split.

Tasks map a dataset's own classes to the classes a model is trained on, through
the canonical diagnosis of each class (``builders.DIAGNOSES``). For binary tasks
label 1 is always the positive class of interest, which is also the minority
class on every dermoscopy dataset the project uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SPLIT_SCHEMES = ("75/12.5/12.5", "80/20")
TASKS = ("melanoma_vs_nevus", "malignant_vs_benign", "melanoma_vs_rest",
         "sk_vs_rest", "all")

CANONICAL_DIAGNOSES = frozenset({
    "melanoma", "nevus", "atypical_nevus", "bcc", "akiec", "bkl",
    "seborrheic_keratosis", "df", "vasc", "scc", "unknown", "benign"})
# The same set as ``builders.MALIGNANT_DIAGNOSES`` (a test checks that they
# agree); kept here so that task definitions read in one place.
MALIGNANT_DIAGNOSES = frozenset({"melanoma", "bcc", "akiec", "scc"})
# Nevus in 'melanoma vs nevus' means every melanocytic nevus: PH2's atypical
# (dysplastic) nevi are nevi, as HAM10000's 'nv' class includes them too.
_NEVUS_DIAGNOSES = frozenset({"nevus", "atypical_nevus"})

TRAIN, VALIDATION, TEST = "train", "validation", "test"


def _as_1d(name: str, values) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
  return array


def _check_examples(labels, groups) -> tuple[np.ndarray, np.ndarray]:
  labels = _as_1d("labels", labels)
  groups = _as_1d("groups", groups)
  if labels.shape != groups.shape:
    raise ValueError(f"labels {labels.shape} and groups {groups.shape} differ "
                     "in length")
  if labels.size == 0:
    raise ValueError("no examples to split: labels is empty")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  return labels, groups


def group_labels(labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The label of every group: the majority label of its examples.

  Groups whose examples disagree (rare: HAM10000 and ISIC give one diagnosis
  per lesion, but a patient id groups several lesions) take their most
  frequent label, ties going to the smallest label value, so the result does
  not depend on the order of the examples.

  Args:
    labels: [N] integer labels.
    groups: [N] group ids (any sortable type).

  Returns:
    unique_groups: [G] sorted group ids.
    group_of_example: [N] index into ``unique_groups`` of every example.
    label_of_group: [G] the label of every group.
  """
  labels, groups = _check_examples(labels, groups)
  unique_groups, group_of_example = np.unique(groups, return_inverse=True)
  unique_labels, label_index = np.unique(labels, return_inverse=True)
  counts = np.zeros((unique_groups.size, unique_labels.size), np.int64)
  np.add.at(counts, (group_of_example, label_index), 1)
  # argmax returns the first maximum, i.e. the smallest label on ties.
  label_of_group = unique_labels[np.argmax(counts, axis=1)]
  return unique_groups, group_of_example.reshape(-1), label_of_group


def _split_groups(labels, groups, fractions: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
  """Split indices per example; see ``grouped_stratified_split``."""
  _, group_of_example, label_of_group = group_labels(labels, groups)
  group_sizes = np.bincount(group_of_example, minlength=label_of_group.size)
  boundaries = np.cumsum(fractions)[:-1]
  split_of_group = np.empty(label_of_group.size, np.int64)
  for label in np.unique(label_of_group):  # a handful of classes, not samples
    members = np.flatnonzero(label_of_group == label)
    members = members[rng.permutation(members.size)]
    sizes = group_sizes[members]
    # Each group goes to the split its middle image falls in, counting images in
    # the shuffled order: image proportions follow the fractions even when group
    # sizes differ, and every split gets its share of every class.
    middle = (np.cumsum(sizes) - 0.5 * sizes) / sizes.sum()
    split_of_group[members] = np.searchsorted(boundaries, middle, side="right")
  return split_of_group[group_of_example]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
  fractions = np.asarray(fractions, np.float64)
  if fractions.ndim != 1 or fractions.size < 1:
    raise ValueError(f"fractions must be a non-empty list, got {fractions!r}")
  if np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
    raise ValueError(
        f"fractions must be positive and sum to 1, got {fractions.tolist()}")
  return fractions


def grouped_stratified_split(labels, groups, fractions: Sequence[float],
                             seed: int) -> np.ndarray:
  """Assigns every example to a split, groups whole and classes balanced.

  Groups are stratified by their label (``group_labels``): within each class the
  groups are shuffled and cut so that each split receives ``fractions`` of that
  class's images (to within one group). The result depends only on the seed and
  on the set of (label, group) pairs, never on the order of the examples: groups
  are sorted before shuffling.

  Args:
    labels: [N] integer labels.
    groups: [N] group ids; examples sharing one are kept in one split.
    fractions: [K] positive fractions summing to 1.
    seed: seed of the shuffle.

  Returns:
    [N] int64 split index in [0, K) of every example.
  """
  fractions = _check_fractions(fractions)
  return _split_groups(labels, groups, fractions, np.random.default_rng(seed))


def split_examples(labels, groups, *, scheme: str, seed: int,
                   val_fraction: float = 0.1
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Splits a dataset with one of the papers' schemes.

  Args:
    labels: [N] integer labels to stratify by (the dataset's own classes, so the
      split is the same whatever task is trained on it).
    groups: [N] group ids (lesion or patient).
    scheme: one of ``SPLIT_SCHEMES``.
    seed: split seed.
    val_fraction: for ``'80/20'``, the part of the training 80% carved out as a
      grouped, stratified validation split; 0 gives no validation split (the
      BIIGMA-Net authors' set-up). Ignored by ``'75/12.5/12.5'``, whose
      validation split is fixed.

  Returns:
    split_of_example: [N] int64 index into ``split_names``.
    split_names: ('train', 'validation', 'test') or ('train', 'test').
  """
  if scheme == "75/12.5/12.5":
    split = grouped_stratified_split(labels, groups, (0.75, 0.125, 0.125), seed)
    return split, (TRAIN, VALIDATION, TEST)
  if scheme != "80/20":
    raise ValueError(
        f"split_scheme must be one of {SPLIT_SCHEMES}, got {scheme!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  labels, groups = _check_examples(labels, groups)
  train_or_test = grouped_stratified_split(labels, groups, (0.8, 0.2), seed)
  if val_fraction == 0.0:
    return train_or_test, (TRAIN, TEST)
  split = np.where(train_or_test == 0, 0, 2)
  in_train = np.flatnonzero(train_or_test == 0)
  # A second, independent stream so the validation carve does not perturb the
  # train/test cut: the test split is the same for every val_fraction.
  carve = _split_groups(labels[in_train], groups[in_train],
                        np.array([1.0 - val_fraction, val_fraction]),
                        np.random.default_rng((seed, 1)))
  split[in_train] = carve
  return split, (TRAIN, VALIDATION, TEST)


def _check_diagnoses(class_names: Sequence[str],
                     diagnoses: Mapping[str, str]) -> list[str]:
  missing = [name for name in class_names if name not in diagnoses]
  if missing:
    raise ValueError(f"diagnoses has no entry for the classes {missing}")
  found = [diagnoses[name] for name in class_names]
  unknown = sorted(set(found) - CANONICAL_DIAGNOSES)
  if unknown:
    raise ValueError(f"diagnoses {unknown} are not canonical; allowed: "
                     f"{sorted(CANONICAL_DIAGNOSES)}")
  return found


def task_label_table(task: str, class_names: Sequence[str],
                     diagnoses: Mapping[str, str], *,
                     dataset: str = "the dataset"
                     ) -> tuple[np.ndarray, list[str]]:
  """Task label of every dataset class, -1 for classes the task drops.

  Tasks:
    melanoma_vs_nevus: melanoma (1) against nevi, atypical nevi included (0);
      all other classes dropped.
    malignant_vs_benign: melanoma, bcc, akiec, scc (1) against the rest (0).
    melanoma_vs_rest: melanoma (1) against every other class (0).
    sk_vs_rest: seborrheic keratosis (1) against every other class (0); needs a
      dataset with a seborrheic_keratosis class (ISIC 2017).
    all: every class, in ``class_names`` order.
  Every task drops classes whose diagnosis is 'unknown': their true class could
  be either side.

  Args:
    task: one of ``TASKS``.
    class_names: the dataset's classes, in label order.
    diagnoses: class name -> canonical diagnosis.
    dataset: dataset name, for error messages.

  Returns:
    table: [num_dataset_classes] int32 task label of every dataset label, or -1.
    task_class_names: names of the task's classes, in task label order.
  """
  found = _check_diagnoses(class_names, diagnoses)
  known = [d != "unknown" for d in found]
  if task == "melanoma_vs_nevus":
    positive = [d == "melanoma" for d in found]
    negative = [d in _NEVUS_DIAGNOSES for d in found]
    names = ["nevus", "melanoma"]
  elif task == "malignant_vs_benign":
    positive = [d in MALIGNANT_DIAGNOSES for d in found]
    negative = [k and not p for k, p in zip(known, positive)]
    names = ["benign", "malignant"]
  elif task == "melanoma_vs_rest":
    positive = [d == "melanoma" for d in found]
    negative = [k and not p for k, p in zip(known, positive)]
    names = ["rest", "melanoma"]
  elif task == "sk_vs_rest":
    positive = [d == "seborrheic_keratosis" for d in found]
    negative = [k and not p for k, p in zip(known, positive)]
    names = ["rest", "seborrheic_keratosis"]
  elif task == "all":
    kept = [name for name, k in zip(class_names, known) if k]
    if len(kept) < 2:
      raise ValueError(f"task 'all' needs two classes of known diagnosis; "
                       f"{dataset} has {kept}")
    table = np.full(len(class_names), -1, np.int32)
    table[np.flatnonzero(known)] = np.arange(len(kept), dtype=np.int32)
    return table, kept
  else:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  for side, present in ((names[1], positive), (names[0], negative)):
    if not any(present):
      raise ValueError(
          f"task {task!r} needs a {side} class, but {dataset} has none: its "
          f"classes are {dict(zip(class_names, found))}")
  table = np.where(positive, 1, np.where(negative, 0, -1)).astype(np.int32)
  return table, names


def map_task_labels(task: str, labels, class_names: Sequence[str],
                    diagnoses: Mapping[str, str], *,
                    dataset: str = "the dataset"
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Maps dataset labels to task labels.

  Args:
    task: one of ``TASKS`` (see ``task_label_table``).
    labels: [N] dataset labels in [0, len(class_names)).
    class_names: the dataset's classes, in label order.
    diagnoses: class name -> canonical diagnosis.
    dataset: dataset name, for error messages.

  Returns:
    task_labels: [N] int32 task labels, -1 where dropped.
    keep: [N] bool, False for examples the task drops.
    task_class_names: names of the task's classes, in task label order.
  """
  labels = _as_1d("labels", labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(f"labels must lie in [0, {len(class_names)}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  table, names = task_label_table(task, class_names, diagnoses, dataset=dataset)
  task_labels = table[labels.astype(np.int64)]
  return task_labels, task_labels >= 0, names


def parse_class_counts(spec: str | Sequence[int] | None,
                       class_names: Sequence[str]) -> np.ndarray | None:
  """Parses ``train_class_counts`` such as '4500:75'.

  One count per task class, in task label order, separated by ':'. For binary
  tasks that reads majority:minority (label 0 is the majority), as in the
  COM-Triplet paper's 4500:4500 ... 4500:75 study (Sec. V.C).

  Returns:
    [num_classes] int64 counts, or None for '' / None (no subsampling).
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  try:
    if isinstance(spec, str):
      counts = [int(part) for part in spec.split(":")]
    else:
      counts = [int(part) for part in spec]
  except ValueError:
    raise ValueError(f"train_class_counts must be integers separated by ':', "
                     f"got {spec!r}") from None
  if len(counts) != len(class_names):
    raise ValueError(
        f"train_class_counts needs one count per class {list(class_names)} "
        f"(in that order), got {spec!r}")
  if min(counts) < 1:
    raise ValueError(f"train_class_counts must be positive, got {spec!r}")
  return np.asarray(counts, np.int64)


def subsample_to_counts(labels, groups, counts, *, seed: int, keys=None,
                        class_names: Sequence[str] | None = None) -> np.ndarray:
  """Keeps exactly ``counts[c]`` examples of every class c, whole groups first.

  Within each class the groups are shuffled (from the seed, after sorting, so
  the result is independent of the example order) and taken whole until the
  count is reached; only the last group taken of a class may be cut, so the
  count is exact and as few lesions as possible are split between kept and
  dropped images.

  Args:
    labels: [N] task labels in [0, len(counts)); negative labels are never kept.
    groups: [N] group ids.
    counts: [C] number of examples to keep per class.
    seed: selection seed.
    keys: [N] unique per-example keys (image ids) that order the examples
      inside a group; without them the input order does, for groups cut in two.
    class_names: class names for error messages.

  Returns:
    [N] bool mask of the kept examples.
  """
  labels, groups = _check_examples(labels, groups)
  counts = _as_1d("counts", counts).astype(np.int64)
  names = list(class_names) if class_names is not None else [
      str(c) for c in range(counts.size)]
  if keys is None:
    key_rank = np.arange(labels.size)
  else:
    keys = _as_1d("keys", keys)
    if keys.shape != labels.shape:
      raise ValueError(f"keys {keys.shape} and labels {labels.shape} differ in "
                       "length")
    key_rank = np.unique(keys, return_inverse=True)[1].reshape(-1)
  group_rank = np.unique(groups, return_inverse=True)[1].reshape(-1)
  rng = np.random.default_rng((seed, 2))
  keep = np.zeros(labels.size, bool)
  for label, wanted in enumerate(counts):  # one pass per class, not per sample
    members = np.flatnonzero(labels == label)
    if wanted > members.size:
      raise ValueError(
          f"train_class_counts asks for {wanted} training examples of class "
          f"{names[label]!r} but the training split has only {members.size}")
    member_groups, inverse = np.unique(group_rank[members], return_inverse=True)
    shuffled_rank = np.empty(member_groups.size, np.int64)
    shuffled_rank[rng.permutation(member_groups.size)] = np.arange(
        member_groups.size)
    order = np.lexsort((key_rank[members], shuffled_rank[inverse.reshape(-1)]))
    keep[members[order[:wanted]]] = True
  return keep
