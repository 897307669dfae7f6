"""Host-side input pipelines: split, decode, crop, resize, batch per device.

The flow:

1. Read every example's label, group id and image id, without decoding images
   (``tfds.decode.SkipDecoding``), from all of a builder's official splits.
2. In NumPy (``splits.py``): grouped stratified split, task mapping, imbalance
   control. Each split's examples get an index: their position in the split,
   ordered by image id, so indices do not depend on how the builder stored them.
3. In tf.data: look every example's image id up in a static hash table, keep
   the ones of the split (and of this process), decode, centre-crop to a
   square, resize to ``image_size`` (bilinear, antialiased) and keep uint8:
   normalisation and augmentation happen on the device (``augment.py``).

Training batches are ``{'image': [D, b, S, S, 3] uint8, 'label': [D, b] int32,
'index': [D, b] int32}`` for D local devices of b examples each, from an
infinite, per-epoch shuffled stream. The training split is dealt to the devices
of the whole job (:func:`deal_to_devices`), and each device's stream is a
function of its shard, the shuffle seed and its global device index only; so the
global batch of every step is the same however the devices are grouped into
processes (one process with four devices, two with two: tested), and a process
reads only its own devices' shards. Evaluation batches add ``'mask'`` (bool,
False on padding) and carry ``index = -1`` on padding; every example of the
split appears exactly once over all processes and devices, and every process
yields the same number of batches, so a collective evaluation step never waits
on a process that ran out of data.

Corrupt images: the builders check every image when they prepare a dataset, but
a file damaged later would make ``tf.io`` fail with a message that names no
file. Decoding errors are therefore caught in the graph (``ignore_errors``) and
the stream is compared, example by example, with the list of image ids expected
in it; the first one missing raises an error naming it. This costs nothing per
image, where decoding through ``tf.py_function`` halves throughput on small
images.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from comtriplet_jax.data import builders
from comtriplet_jax.data import split_file as split_file_lib
from comtriplet_jax.data import splits

SPLIT_BY = ("lesion", "image")

# Features every builder provides; others (ISIC 2020's diagnosis) are dropped.
_FEATURES = ("image", "label", "group_id", "image_id")
_METADATA_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class ExampleSource:
  """A dataset's examples before splitting.

  Attributes:
    examples: finite tf.data.Dataset of dicts: ``image`` (tf.string, encoded
      JPEG/PNG/BMP bytes), ``label`` (int, dataset label), ``group_id`` and
      ``image_id`` (tf.string). Must yield the same order on every iteration.
    class_names: the dataset's classes, in label order.
    diagnoses: class name -> canonical diagnosis (see ``splits``).
    name: dataset name, for error messages.
  """
  examples: tf.data.Dataset
  class_names: tuple[str, ...]
  diagnoses: Mapping[str, str]
  name: str = "the dataset"


@dataclasses.dataclass(frozen=True)
class Metadata:
  """Per-example arrays read from an ``ExampleSource``, in its order.

  Attributes:
    labels: [N] int64 dataset labels.
    group_ids: [N] str group ids (the image id where a group id is empty).
    image_ids: [N] str image ids, unique.
  """
  labels: np.ndarray
  group_ids: np.ndarray
  image_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """Which examples form each split, in index order.

  Attributes:
    split_names: e.g. ('train', 'validation', 'test').
    rows: split name -> [n] int64 rows of ``Metadata`` in index order.
    task_labels: [N] int32 task label of every row, -1 where the task drops it.
    class_names: the task's class names.
  """
  split_names: tuple[str, ...]
  rows: dict[str, np.ndarray]
  task_labels: np.ndarray
  class_names: list[str]


@dataclasses.dataclass
class Datasets:
  """Everything the training loop needs from the data.

  Attributes:
    train: infinite training dataset (see the module docstring).
    eval: split name -> finite evaluation dataset ('validation' when there is
      one, 'test').
    eval_labels: split name -> [n] task labels in index order, for metrics.
    class_names: the task's class names.
    num_classes: ``len(class_names)``.
    train_class_counts: [num_classes] training examples per class (after
      imbalance control).
    num_examples: split name -> number of examples (all processes).
    split_group_ids: split name -> set of group ids in it.
    eval_steps: split name -> batches per process in one pass.
    train_examples: this process's training examples, finite, unshuffled and
      cached like ``train``: ``{'image', 'label', 'index'}`` per example, for
      methods that sample their own batches (SDC's triplets).
    train_labels: [n_local] task labels of ``train_examples``, in its order.
    train_shards: [n_local] int32, the local device (0 .. D-1) whose shard each
      example of ``train_examples`` belongs to (``train_examples`` holds the
      shards one after another, in device order, each in source order).
    listing: split name -> ``{'image_id', 'group_id', 'label'}`` arrays of its
      examples (all processes) in index order, ``label`` the task label: what
      ``splits.csv`` records (``split_file.write``).
  """
  train: tf.data.Dataset
  eval: dict[str, tf.data.Dataset]
  eval_labels: dict[str, np.ndarray]
  class_names: list[str]
  num_classes: int
  train_class_counts: np.ndarray
  num_examples: dict[str, int]
  split_group_ids: dict[str, set[str]]
  eval_steps: dict[str, int]
  train_examples: tf.data.Dataset
  train_labels: np.ndarray
  train_shards: np.ndarray
  listing: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


# --- reading -----------------------------------------------------------------

def source_from_builder(builder: tfds.core.DatasetBuilder) -> ExampleSource:
  """All official splits of a prepared builder, images left encoded.

  The project makes its own grouped splits, so the official ones (ISIC 2017's
  train/validation/test) are concatenated, in sorted split-name order.
  """
  parts = []
  for split in sorted(builder.info.splits.keys()):
    part = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()})
    parts.append(part.map(lambda ex: {k: ex[k] for k in _FEATURES}))
  if not parts:
    raise ValueError(f"{builder.name} has no prepared split")
  examples = parts[0]
  for part in parts[1:]:
    examples = examples.concatenate(part)
  return ExampleSource(examples, tuple(builder.CLASS_NAMES),
                       dict(builder.DIAGNOSES), builder.name)


def read_metadata(source: ExampleSource) -> Metadata:
  """Reads every example's label, group id and image id; decodes no image."""
  columns = source.examples.map(
      lambda ex: (ex["label"], ex["group_id"], ex["image_id"])).batch(
          _METADATA_BATCH)
  labels, groups, ids = [], [], []
  for label, group, image_id in columns.as_numpy_iterator():
    labels.append(label)
    groups.extend(g.decode("utf-8") for g in group)
    ids.extend(i.decode("utf-8") for i in image_id)
  if not ids:
    raise ValueError(f"{source.name} has no examples")
  labels = np.concatenate(labels).astype(np.int64)
  image_ids = np.asarray(ids, dtype=str)
  group_ids = np.asarray(groups, dtype=str)
  # An image without a group id is its own group.
  group_ids = np.where(group_ids == "", image_ids, group_ids)
  unique, counts = np.unique(image_ids, return_counts=True)
  if unique.size != image_ids.size:
    raise ValueError(f"{source.name}: image ids are not unique, e.g. "
                     f"{unique[counts > 1][:5].tolist()}")
  return Metadata(labels, group_ids, image_ids)


def plan_splits(metadata: Metadata, source: ExampleSource, *, task: str,
                split_scheme: str, split_seed: int, val_fraction: float = 0.1,
                train_class_counts: str = "", split_file: str = "") -> SplitPlan:
  """Splits, maps to the task and subsamples the training split, in NumPy.

  The split is stratified by the dataset's own classes, so that every task on a
  dataset uses the same lesions for training and testing; the task then drops
  the classes it does not use, and imbalance control subsamples only training.
  With ``split_file`` (a run's ``splits.csv``, see ``split_file.py``) the file
  says which example is in which split instead.
  """
  task_labels, keep, class_names = splits.map_task_labels(
      task, metadata.labels, source.class_names, source.diagnoses,
      dataset=source.name)
  if split_file:
    split_of_row, split_names = split_file_lib.read(
        split_file, metadata.image_ids, np.where(keep, task_labels, -1), class_names)
  else:
    split_of_row, split_names = splits.split_examples(
        metadata.labels, metadata.group_ids, scheme=split_scheme,
        seed=split_seed, val_fraction=val_fraction)
  rows = {}
  for k, name in enumerate(split_names):
    members = np.flatnonzero((split_of_row == k) & keep)
    rows[name] = members[np.argsort(metadata.image_ids[members], kind="stable")]
  counts = splits.parse_class_counts(train_class_counts, class_names)
  if counts is not None:
    train = rows[splits.TRAIN]
    kept = splits.subsample_to_counts(
        task_labels[train], metadata.group_ids[train], counts, seed=split_seed,
        keys=metadata.image_ids[train], class_names=class_names)
    rows[splits.TRAIN] = train[kept]
  for name, members in rows.items():
    if members.size == 0:
      raise ValueError(
          f"the {name} split of {source.name} for task {task!r} is empty: "
          f"{metadata.labels.size} examples are too few for split_scheme "
          f"{split_scheme!r}")
  return SplitPlan(split_names, rows, task_labels, class_names)


# --- images ------------------------------------------------------------------

def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes, centre-crops to a square and resizes one image.

  The square is the centred crop of the shorter side (both papers centre-crop
  before downsampling). Resizing is bilinear with antialiasing, so downsampling
  averages over the source pixels instead of skipping them. (Cropping JPEGs
  while decoding, ``decode_and_crop_jpeg``, changes the chroma of the edge
  pixels and measured no faster on HAM10000.)

  Args:
    encoded: scalar tf.string, JPEG, PNG, BMP or GIF bytes.
    image_size: output side S.

  Returns:
    [S, S, 3] uint8 RGB image.
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = image[top:top + side, left:left + side]
  resized = tf.image.resize(square, [image_size, image_size],
                            method=tf.image.ResizeMethod.BILINEAR,
                            antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _image_stream(source: ExampleSource, table: tf.lookup.StaticHashTable,
                  metadata: Metadata, plan: SplitPlan, rows: np.ndarray,
                  index_of_row: np.ndarray, image_size: int) -> tf.data.Dataset:
  """Decoded examples of ``rows``, in source order, corrupt images named.

  Returns a finite dataset of ``{'image': [S, S, 3] uint8, 'label': int32,
  'index': int32}``.
  """
  num_rows = metadata.labels.size
  selected = np.zeros(num_rows, bool)
  selected[rows] = True
  selected = tf.constant(selected)
  task_labels = tf.constant(plan.task_labels, tf.int32)
  index_of_row = tf.constant(index_of_row, tf.int32)

  def locate(example):
    return example["image"], table.lookup(example["image_id"])

  def is_selected(encoded, row):
    del encoded
    return (row >= 0) & tf.gather(selected, tf.maximum(row, 0))

  def decode(encoded, row):
    return {"image": decode_and_resize(encoded, image_size),
            "label": tf.gather(task_labels, row),
            "index": tf.gather(index_of_row, row),
            "row": row}

  decoded = (source.examples.map(locate).filter(is_selected)
             .map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
             .ignore_errors(log_warning=True))
  # A sentinel at the end of both streams: if the last image failed, the
  # decoded stream's sentinel meets a real expected row and the check fires.
  sentinel = {"image": tf.zeros([image_size, image_size, 3], tf.uint8),
              "label": tf.constant(-1, tf.int32),
              "index": tf.constant(-1, tf.int32),
              "row": tf.constant(-1, tf.int64)}
  decoded = decoded.concatenate(tf.data.Dataset.from_tensors(sentinel))
  in_order = np.sort(rows)
  expected = tf.data.Dataset.from_tensor_slices(
      (np.append(in_order, -1).astype(np.int64),
       np.append(metadata.image_ids[in_order], "")))

  def check(example, expected_row, expected_id):
    found = tf.debugging.Assert(
        tf.equal(example["row"], expected_row),
        [f"{source.name}: could not read or decode image", expected_id,
         "(corrupt or unreadable file; tf.data logs the decoder's message as a "
         "warning)"])
    with tf.control_dependencies([found]):
      return {k: tf.identity(example[k]) for k in ("image", "label", "index",
                                                    "row")}

  checked = tf.data.Dataset.zip(decoded, expected).map(
      lambda example, e: check(example, *e))
  return checked.filter(lambda ex: ex["row"] >= 0).map(
      lambda ex: {k: ex[k] for k in ("image", "label", "index")})


def _per_device(batch: Mapping[str, tf.Tensor], num_devices: int
                ) -> dict[str, tf.Tensor]:
  """[local_batch, ...] -> [num_devices, local_batch // num_devices, ...]."""
  out = {}
  for key, value in batch.items():
    shape = value.shape.as_list()
    out[key] = tf.reshape(value, [num_devices, shape[0] // num_devices]
                          + shape[1:])
  return out


def deal_to_devices(rows: np.ndarray, labels: np.ndarray, num_devices: int
                    ) -> list[np.ndarray]:
  """Deals training rows to the devices of the whole job, class by class.

  The rows, ordered by class (stably, so by index within a class), are dealt
  round-robin: every device gets the floor or the ceiling of ``n_c / num_devices``
  examples of each class c, so a rare class reaches every device that it can
  (SDC's triplets need both classes on each device).

  Args:
    rows: [n] rows of the training split, in index order.
    labels: task label of every row (indexed by row).
    num_devices: devices of the job (local devices x processes).

  Returns:
    ``num_devices`` arrays of rows, each sorted (source order).
  """
  by_class = rows[np.argsort(labels[rows], kind="stable")]
  return [np.sort(by_class[g::num_devices]) for g in range(num_devices)]


def _shard_seed(shuffle_seed: int, device: int) -> int:
  """A tf.data shuffle seed for one device's shard, distinct per device."""
  return int(np.random.SeedSequence([shuffle_seed, device]).generate_state(
      1, np.uint32)[0])


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
  # The corrupt-image check compares the stream with the expected order, and
  # runs must be reproducible from their seeds.
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


# --- assembling --------------------------------------------------------------

def _check_arguments(*, task: str, split_scheme: str, image_size: int,
                     batch_size: int, eval_batch_size: int,
                     num_local_devices: int, process_index: int,
                     process_count: int, val_fraction: float,
                     shuffle_buffer_size: int | None, split_by: str = "lesion"
                     ) -> None:
  """Rejects bad arguments before any data is read, naming them."""
  if split_by not in SPLIT_BY:
    raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
  if task not in splits.TASKS:
    raise ValueError(f"task must be one of {splits.TASKS}, got {task!r}")
  if split_scheme not in splits.SPLIT_SCHEMES:
    raise ValueError(f"split_scheme must be one of {splits.SPLIT_SCHEMES}, got "
                     f"{split_scheme!r}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(
        f"image_size must be a positive integer, got {image_size!r}")
  if num_local_devices < 1:
    raise ValueError(f"num_local_devices must be >= 1, got {num_local_devices}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in "
                     f"[0, process_count={process_count})")
  devices = num_local_devices * process_count
  for name, value in (("batch_size", batch_size),
                      ("eval_batch_size", eval_batch_size)):
    if value < 1 or value % devices:
      raise ValueError(
          f"{name}={value} must be a positive multiple of the device count "
          f"{devices} (num_local_devices={num_local_devices} x "
          f"process_count={process_count})")
  if shuffle_buffer_size is not None and shuffle_buffer_size < 1:
    raise ValueError(
        f"shuffle_buffer_size must be positive, got {shuffle_buffer_size}")


def build_datasets(source: ExampleSource, *, task: str, split_scheme: str,
                   split_seed: int, image_size: int, batch_size: int,
                   eval_batch_size: int, num_local_devices: int,
                   process_index: int = 0, process_count: int = 1,
                   train_class_counts: str = "", val_fraction: float = 0.1,
                   cache: bool = True, shuffle_seed: int = 0,
                   shuffle_buffer_size: int | None = None,
                   split_by: str = "lesion", split_file: str = "") -> Datasets:
  """Training and evaluation pipelines from an ``ExampleSource``.

  See ``create_datasets`` for the arguments; ``shuffle_buffer_size`` (None: the
  whole training shard) bounds the memory of shuffling decoded images when
  ``cache`` is False.
  """
  _check_arguments(
      task=task, split_scheme=split_scheme, image_size=image_size,
      batch_size=batch_size, eval_batch_size=eval_batch_size,
      num_local_devices=num_local_devices, process_index=process_index,
      process_count=process_count, val_fraction=val_fraction,
      shuffle_buffer_size=shuffle_buffer_size, split_by=split_by)
  metadata = read_metadata(source)
  if split_by == "image" and not split_file:
    shared = metadata.group_ids.size - np.unique(metadata.group_ids).size
    message = (f"split_by='image': {source.name}'s images are split one by one, so "
               f"images of one lesion can land in different splits ({shared} of its "
               f"{metadata.group_ids.size} images share a lesion with another). Test "
               "metrics are then optimistic; use it only to measure that leakage.")
    warnings.warn(message)
    logging.warning(message)
    metadata = dataclasses.replace(metadata, group_ids=metadata.image_ids)
  plan = plan_splits(metadata, source, task=task, split_scheme=split_scheme,
                     split_seed=split_seed, val_fraction=val_fraction,
                     train_class_counts=train_class_counts, split_file=split_file)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(metadata.image_ids),
          tf.range(metadata.image_ids.size, dtype=tf.int64)),
      default_value=-1)

  def index_of_rows(split):
    rows = plan.rows[split]
    index_of_row = np.full(metadata.labels.size, -1, np.int32)
    index_of_row[rows] = np.arange(rows.size, dtype=np.int32)
    return index_of_row

  def local_stream(split):
    """This process's share: every process_count-th index, from its own."""
    local = plan.rows[split][process_index::process_count]
    stream = _image_stream(source, table, metadata, plan, local,
                           index_of_rows(split), image_size)
    return (stream.cache() if cache else stream), local.size

  # Training: one stream per device of this process, each reading, decoding and
  # caching only its own shard (see the module docstring).
  num_devices = num_local_devices * process_count
  first_device = process_index * num_local_devices
  shards = deal_to_devices(plan.rows[splits.TRAIN], plan.task_labels,
                           num_devices)[first_device:first_device + num_local_devices]
  train_index_of_row = index_of_rows(splits.TRAIN)
  per_device = batch_size // num_devices
  shard_examples, device_streams = [], []
  for j, shard in enumerate(shards):
    if shard.size == 0:
      raise ValueError(
          f"device {first_device + j} of {num_devices} has no training example: "
          f"the training split has only {plan.rows[splits.TRAIN].size}")
    stream = _image_stream(source, table, metadata, plan, shard,
                           train_index_of_row, image_size)
    stream = stream.cache() if cache else stream
    shard_examples.append(stream)
    device_streams.append(
        stream.shuffle(shuffle_buffer_size or shard.size,
                       seed=_shard_seed(shuffle_seed, first_device + j),
                       reshuffle_each_iteration=True)
        .repeat()
        .batch(per_device, drop_remainder=True))
  train_examples = shard_examples[0]
  for stream in shard_examples[1:]:
    train_examples = train_examples.concatenate(stream)
  train_examples = _deterministic(train_examples)
  train = (tf.data.Dataset.zip(tuple(device_streams))
           .map(lambda *per: {k: tf.stack([b[k] for b in per]) for k in per[0]})
           .prefetch(tf.data.AUTOTUNE))

  eval_datasets, eval_labels, eval_steps = {}, {}, {}
  local_eval_batch = eval_batch_size // process_count
  padding = {"image": tf.zeros([image_size, image_size, 3], tf.uint8),
             "label": tf.constant(0, tf.int32),
             "index": tf.constant(-1, tf.int32),
             "mask": tf.constant(False)}
  for split in plan.split_names:
    if split == splits.TRAIN:
      continue
    stream, num_local = local_stream(split)
    # Every process runs as many batches as the one with the most examples.
    most = math.ceil(plan.rows[split].size / process_count)
    steps = math.ceil(most / local_eval_batch)
    stream = stream.map(lambda ex: {**ex, "mask": tf.constant(True)})
    stream = stream.concatenate(
        tf.data.Dataset.from_tensors(padding).repeat(
            steps * local_eval_batch - num_local))
    eval_datasets[split] = _deterministic(
        stream.batch(local_eval_batch, drop_remainder=True)
        .map(lambda b: _per_device(b, num_local_devices))
        .prefetch(tf.data.AUTOTUNE))
    eval_labels[split] = plan.task_labels[plan.rows[split]].copy()
    eval_steps[split] = steps

  num_classes = len(plan.class_names)
  return Datasets(
      train=_deterministic(train),
      eval=eval_datasets,
      eval_labels=eval_labels,
      class_names=list(plan.class_names),
      num_classes=num_classes,
      train_class_counts=np.bincount(plan.task_labels[plan.rows[splits.TRAIN]],
                                     minlength=num_classes),
      num_examples={name: int(rows.size) for name, rows in plan.rows.items()},
      split_group_ids={name: set(metadata.group_ids[rows].tolist())
                       for name, rows in plan.rows.items()},
      eval_steps=eval_steps,
      train_examples=train_examples,
      train_labels=plan.task_labels[np.concatenate(shards)],
      train_shards=np.repeat(np.arange(len(shards), dtype=np.int32),
                             [shard.size for shard in shards]),
      listing={name: {"image_id": metadata.image_ids[rows],
                      "group_id": metadata.group_ids[rows],
                      "label": plan.task_labels[rows]}
               for name, rows in plan.rows.items()})


def create_datasets(*, dataset: str, task: str, split_scheme: str,
                    split_seed: int, image_size: int, batch_size: int,
                    eval_batch_size: int, num_local_devices: int,
                    process_index: int = 0, process_count: int = 1,
                    data_dir: str | None = None, manual_dir: str | None = None,
                    train_class_counts: str = "", val_fraction: float = 0.1,
                    cache: bool = True, shuffle_seed: int = 0,
                    builder_config: str | None = None,
                    shuffle_buffer_size: int | None = None,
                    split_by: str = "lesion", split_file: str = "") -> Datasets:
  """Prepares a dataset and builds its training and evaluation pipelines.

  Args:
    dataset: builder name ('ham10000', 'ph2', 'isic2017', 'isic2019',
      'isic2020').
    task: one of ``splits.TASKS``.
    split_scheme: '75/12.5/12.5' or '80/20' (``splits.split_examples``).
    split_seed: seed of the split and of imbalance subsampling.
    image_size: side S of the square images.
    batch_size: global training batch, a multiple of the global device count.
    eval_batch_size: global evaluation batch, a multiple of the device count.
    num_local_devices: devices of this process (leading batch axis).
    process_index: this process's index.
    process_count: number of processes.
    data_dir: TFDS data dir (prepared data, downloads).
    manual_dir: folder of a manually downloaded dataset.
    train_class_counts: '' or per-class training counts such as '4500:75'
      (majority:minority for binary tasks; ``splits.parse_class_counts``).
    val_fraction: validation part of the training 80% for '80/20'.
    cache: keep decoded, resized images in memory after the first pass.
    shuffle_seed: seed of the per-epoch training shuffle.
    builder_config: builder config (None: the builder's choice).
    shuffle_buffer_size: see ``build_datasets``.
    split_by: 'lesion' (every image of a lesion or patient in one split) or
      'image' (each image on its own, with a warning: lesions leak across
      splits; only for measuring that leakage).
    split_file: a run's ``splits.csv`` whose ``split`` column replaces the
      seeded split (``split_file.read``); scheme, seed and ``split_by`` are then
      not used.

  Returns:
    ``Datasets``.
  """
  # Before a dataset is prepared, which can mean a download.
  _check_arguments(
      task=task, split_scheme=split_scheme, image_size=image_size,
      batch_size=batch_size, eval_batch_size=eval_batch_size,
      num_local_devices=num_local_devices, process_index=process_index,
      process_count=process_count, val_fraction=val_fraction,
      shuffle_buffer_size=shuffle_buffer_size, split_by=split_by)
  builder = builders.get_builder(dataset, data_dir=data_dir,
                                 manual_dir=manual_dir, config=builder_config)
  builders.prepare(builder)
  return build_datasets(
      source_from_builder(builder), task=task, split_scheme=split_scheme,
      split_seed=split_seed, image_size=image_size, batch_size=batch_size,
      eval_batch_size=eval_batch_size, num_local_devices=num_local_devices,
      process_index=process_index, process_count=process_count,
      train_class_counts=train_class_counts, val_fraction=val_fraction,
      cache=cache, shuffle_seed=shuffle_seed,
      shuffle_buffer_size=shuffle_buffer_size, split_by=split_by,
      split_file=split_file)


def iterate_train(data: Datasets, start_step: int = 0):
  """Training batches as NumPy, from step ``start_step`` on.

  The training stream is a pure function of ``shuffle_seed`` (seeded per-epoch
  shuffles of a fixed order), so a resumed run skips the batches it already
  consumed and continues exactly where the interrupted run was. Skipping reads
  the skipped batches, which is cheap once images are cached in memory.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  return data.train.skip(start_step).as_numpy_iterator()
