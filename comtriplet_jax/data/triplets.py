"""Host-side batch streams of deep clustering: triplets (SDC) and 3M images (UDC).

Both streams draw from this process's training examples, decoded once into
memory (:func:`load_train_images`, from ``Datasets.train_examples``). Where the
examples come with their device shards (``TrainImages.shards``, as the pipeline
deals them), each device draws its part of a step from its own shard, and its
batch is a pure function of ``(seed, step, global device index)``: the global
batch is then the same however the job's devices are grouped into processes.
Without shards, the process draws its part from all its examples, a function of
``(seed, step, process_index)``. Either way a resumed run that starts the stream
at ``start_step`` gets exactly the batches the uninterrupted run got from that
step on, without replaying the earlier ones.

Triplets (Algorithm 1, "Randomly select triplets for iteration n"), each step:

* M anchors drawn uniformly at random from the training split, without
  replacement within the step (the anchors' classes follow the data's imbalance,
  as in the paper's "a batch of M images are randomly selected for A");
* for each anchor a positive drawn uniformly from the anchor's class, never the
  anchor itself (unless the class has a single image), and a negative drawn
  uniformly from the other class.

How the minority class is never exhausted: positives and negatives are drawn
with replacement, independently at every step, instead of walking through
per-epoch permutations of each class. A walk without replacement would run
through the minority's few images long before the majority's (every triplet
needs at least one minority image, as anchor-positive pair or as negative),
while per-step draws with replacement simply reuse them: the minority's images
are sampled at the rate the triplets need, each equally likely, at every step.
Every triplet holds both classes, so each step's batch has minority images even
when no anchor is a minority one. The draws are reshuffled every iteration
because each step has its own generator.

Batches are ``{'anchor', 'positive', 'negative': uint8 [D, b, S, S, 3],
'anchor_label': int32 [D, b], 'anchor_index', 'positive_index',
'negative_index': int32 [D, b]}`` for D local devices of b = M / (D * processes)
triplets each; indices are positions in the local training examples.

Unlabelled images (UDC: "a total of 3M images are randomly selected from the
unlabeled dermoscopic dataset"), each step: 3M images drawn uniformly without
replacement within the step: ``{'image': uint8 [D, 3b, S, S, 3], 'label',
'index': int32 [D, 3b]}``. The labels ride along for monitoring only (how well
the GMM's pseudo-labels agree with the truth); UDC's loss never reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from comtriplet_jax.data import pipeline

# Distinguishes the generators of the two streams made from one seed.
_TRIPLET_STREAM = 0x7219
_UNLABELLED_STREAM = 0x3E3


@dataclasses.dataclass(frozen=True)
class TrainImages:
  """This process's training examples in memory.

  Attributes:
    images: [n, S, S, 3] uint8.
    labels: [n] int32 task labels (1 = minority/melanoma, 0 = majority).
    shards: None, or [n] int32: the local device (0 .. D-1) whose shard each
      example is (``Datasets.train_shards``).
  """
  images: np.ndarray
  labels: np.ndarray
  shards: np.ndarray | None = None

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f"images must be [n, S, S, 3], got {self.images.shape}")
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"labels must be [n] = [{self.images.shape[0]}], got "
                       f"{self.labels.shape}")
    if self.shards is not None and self.shards.shape != self.labels.shape:
      raise ValueError(f"shards must be [n] = [{self.labels.shape[0]}], got "
                       f"{self.shards.shape}")

  def shard_members(self, num_local_devices: int) -> list[np.ndarray] | None:
    """Positions of each local device's shard, or None without shards."""
    if self.shards is None:
      return None
    members = [np.flatnonzero(self.shards == j) for j in range(num_local_devices)]
    if sum(m.size for m in members) != self.labels.size or any(
        m.size == 0 for m in members):
      raise ValueError(
          f"the examples' shards {np.unique(self.shards).tolist()} do not match "
          f"{num_local_devices} local devices")
    return members


def load_train_images(data: pipeline.Datasets, *, read_batch: int = 256
                      ) -> TrainImages:
  """Decodes ``data.train_examples`` once into NumPy arrays (uint8, S x S).

  Memory: n S^2 3 bytes, e.g. 72 MB for HAM10000's ~5,900 melanoma/nevus
  training images at 64 px, 1.2 GB at 256 px.

  Raises:
    ValueError: if the examples disagree with ``data.train_labels``.
  """
  images, labels = [], []
  for batch in data.train_examples.batch(read_batch).as_numpy_iterator():
    images.append(batch["image"])
    labels.append(batch["label"])
  if not images:
    raise ValueError("the training split has no example")
  shards = getattr(data, "train_shards", None)
  out = TrainImages(np.concatenate(images), np.concatenate(labels).astype(np.int32),
                    None if shards is None else np.asarray(shards, np.int32))
  expected = np.asarray(data.train_labels)
  if not np.array_equal(out.labels, expected):
    raise ValueError(
        f"train_examples ({out.labels.size} examples) disagree with train_labels "
        f"({expected.size}): the pipeline's example order changed")
  return out


def _class_members(labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  """Per-class sorted example positions and each example's rank in its class."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty [n] array, got {labels.shape}")
  bad = ~np.isin(labels, (0, 1))
  if np.any(bad):
    raise ValueError(f"triplets need binary labels 0/1, got {np.unique(labels[bad])}")
  members = [np.flatnonzero(labels == c) for c in (0, 1)]
  for c, m in enumerate(members):
    if m.size == 0:
      raise ValueError(
          f"triplets need examples of both classes; class {c} has none among the "
          f"{labels.size} training examples")
  rank = np.empty(labels.size, np.int64)
  for m in members:
    rank[m] = np.arange(m.size)
  return members, rank


def _generator(seed: int, step: int, process_index: int, stream: int
               ) -> np.random.Generator:
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return np.random.default_rng([seed, step, process_index, stream])


def sample_triplets(labels: np.ndarray, num_anchors: int, *, seed: int, step: int,
                    process_index: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices of one step's triplets (see the module docstring).

  Args:
    labels: [n] binary labels of the examples.
    num_anchors: M, triplets of this process in this step.
    seed: stream seed.
    step: training step (0-based count of updates done).
    process_index: this process (or this device, for per-device shards), so
      that processes (devices) draw different triplets.

  Returns:
    (anchor, positive, negative): [M] int64 example positions; labels[positive]
    == labels[anchor] != labels[negative].
  """
  if num_anchors < 1:
    raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
  labels = np.asarray(labels)
  members, rank = _class_members(labels)
  rng = _generator(seed, step, process_index, _TRIPLET_STREAM)
  anchor = rng.choice(labels.size, size=num_anchors, replace=num_anchors > labels.size)
  anchor_class = labels[anchor]
  # Class c's examples are by_class[start[c]:start[c] + size[c]].
  by_class = np.concatenate(members)
  size = np.array([m.size for m in members])
  start = np.array([0, size[0]])
  own = size[anchor_class]
  # A positive among the class's other images: draw one of n_c - 1 slots and
  # step over the anchor's own slot (a single-image class can only pair the
  # anchor with itself).
  slot = rng.integers(0, np.maximum(own - 1, 1))
  slot = np.where(own > 1, slot + (slot >= rank[anchor]), 0)
  positive = by_class[start[anchor_class] + slot]
  other = 1 - anchor_class
  negative = by_class[start[other] + rng.integers(0, size[other])]
  return anchor, positive, negative


def sample_images(num_examples: int, num_images: int, *, seed: int, step: int,
                  process_index: int = 0) -> np.ndarray:
  """[num_images] positions drawn uniformly, without replacement within a step."""
  if num_examples < 1 or num_images < 1:
    raise ValueError(f"need num_examples >= 1 and num_images >= 1, got "
                     f"{num_examples} and {num_images}")
  rng = _generator(seed, step, process_index, _UNLABELLED_STREAM)
  return rng.choice(num_examples, size=num_images, replace=num_images > num_examples)


def _per_device_count(global_count: int, num_local_devices: int,
                      process_count: int, what: str) -> int:
  devices = num_local_devices * process_count
  if global_count < devices or global_count % devices:
    raise ValueError(f"{what}={global_count} must be a positive multiple of the "
                     f"device count {devices}")
  return global_count // devices


def _split(x: np.ndarray, num_devices: int) -> np.ndarray:
  return x.reshape((num_devices, -1) + x.shape[1:])


def _shard_members(train: TrainImages, num_local_devices: int, *,
                   need_both_classes: bool, process_index: int
                   ) -> list[np.ndarray] | None:
  """Each local device's positions (None without shards), checked now, not later."""
  members = train.shard_members(num_local_devices)
  if not need_both_classes:
    return members
  if members is None:
    _class_members(train.labels)
    return None
  for j, m in enumerate(members):
    try:
      _class_members(train.labels[m])
    except ValueError as e:
      raise ValueError(f"the training shard of device "
                       f"{process_index * num_local_devices + j}: {e}") from None
  return members


def triplet_stream(train: TrainImages, *, batch_size: int, num_local_devices: int,
                   seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless triplet batches from ``start_step`` on.

  Args:
    train: this process's training images and labels (and shards).
    batch_size: M, the global number of triplets per step (the paper: 15).
    num_local_devices: D, the leading axis of every array.
    seed: stream seed.
    start_step: the first step to yield (a resumed run's step).
    process_index: this process.
    process_count: number of processes (each draws M / process_count).

  Yields:
    Batches as described in the module docstring.
  """
  per_device = _per_device_count(batch_size, num_local_devices, process_count,
                                 "batch_size")
  local = per_device * num_local_devices
  members = _shard_members(train, num_local_devices, need_both_classes=True,
                           process_index=process_index)
  first_device = process_index * num_local_devices
  step = start_step
  while True:
    if members is None:
      anchor, positive, negative = sample_triplets(
          train.labels, local, seed=seed, step=step, process_index=process_index)
    else:
      # Each device draws from its own shard, keyed by its global index.
      drawn = [sample_triplets(train.labels[m], per_device, seed=seed, step=step,
                               process_index=first_device + j)
               for j, m in enumerate(members)]
      anchor, positive, negative = (
          np.concatenate([m[d[k]] for m, d in zip(members, drawn)]) for k in range(3))
    yield {
        "anchor": _split(train.images[anchor], num_local_devices),
        "positive": _split(train.images[positive], num_local_devices),
        "negative": _split(train.images[negative], num_local_devices),
        "anchor_label": _split(train.labels[anchor], num_local_devices),
        "anchor_index": _split(anchor.astype(np.int32), num_local_devices),
        "positive_index": _split(positive.astype(np.int32), num_local_devices),
        "negative_index": _split(negative.astype(np.int32), num_local_devices),
    }
    step += 1


def unlabelled_stream(train: TrainImages, *, images_per_step: int,
                      num_local_devices: int, seed: int, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1
                      ) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of ``images_per_step`` (3M) unlabelled images per step.

  Arguments as :func:`triplet_stream`; ``images_per_step`` is global.
  """
  per_device = _per_device_count(images_per_step, num_local_devices, process_count,
                                 "images_per_step")
  local = per_device * num_local_devices
  members = _shard_members(train, num_local_devices, need_both_classes=False,
                           process_index=process_index)
  first_device = process_index * num_local_devices
  step = start_step
  while True:
    if members is None:
      index = sample_images(train.labels.size, local, seed=seed, step=step,
                            process_index=process_index)
    else:
      index = np.concatenate([
          m[sample_images(m.size, per_device, seed=seed, step=step,
                          process_index=first_device + j)]
          for j, m in enumerate(members)])
    yield {
        "image": _split(train.images[index], num_local_devices),
        "label": _split(train.labels[index], num_local_devices),
        "index": _split(index.astype(np.int32), num_local_devices),
    }
    step += 1
