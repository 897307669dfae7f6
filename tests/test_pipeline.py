"""tf.data pipelines: splits by group, per-device batches, padded evaluation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf

from comtriplet_jax.data import pipeline

CLASSES = ("mel", "nv", "bkl")
DIAGNOSES = {"mel": "melanoma", "nv": "nevus", "bkl": "bkl"}
IMAGE_SIZE = 8


def _synthetic_source(num_groups=40, seed=0, corrupt=None, max_group_size=3):
  """Groups of 1-3 images, each a flat colour whose red and blue encode its row.

  Images are PNG (lossless, so the colour survives exactly) of varying
  non-square sizes, except every fifth, a JPEG, to cover both decoding paths.
  """
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, max_group_size + 1, num_groups)
  group_labels = rng.choice(3, num_groups, p=(0.3, 0.5, 0.2))
  labels = np.repeat(group_labels, sizes)
  groups = np.repeat([f"lesion_{g:03d}" for g in range(num_groups)], sizes)
  images, ids = [], []
  for row in range(labels.size):
    height, width = (10, 14) if row % 2 else (15, 9)
    pixels = np.zeros((height, width, 3), np.uint8)
    # Steps of 4 survive JPEG's colour rounding; see _row_in.
    pixels[..., 0] = 4 * (row % 64)
    pixels[..., 1] = 128
    pixels[..., 2] = 4 * (row // 64)
    if row % 5 == 0:
      images.append(tf.io.encode_jpeg(pixels, quality=100).numpy())
    else:
      images.append(tf.io.encode_png(pixels).numpy())
    ids.append(f"ISIC_{1000 + row:07d}")
  if corrupt is not None:
    images[corrupt] = images[corrupt][:20]
  groups[3] = ""  # no group id: the image is its own group
  examples = tf.data.Dataset.from_tensor_slices({
      "image": images, "label": labels.astype(np.int64), "group_id": groups,
      "image_id": ids})
  source = pipeline.ExampleSource(examples, CLASSES, DIAGNOSES, "synthetic")
  return source, labels, groups, np.array(ids)


def _build(source, **overrides):
  kwargs = dict(task="all", split_scheme="75/12.5/12.5", split_seed=0,
                image_size=IMAGE_SIZE, batch_size=4, eval_batch_size=8,
                num_local_devices=4)
  kwargs.update(overrides)
  return pipeline.build_datasets(source, **kwargs)


def _row_in(images):
  """Source rows encoded in images [..., S, S, 3] (see _synthetic_source)."""
  pixel = images[..., 0, 0, :].astype(np.int64)
  return np.round(pixel[..., 0] / 4).astype(np.int64) + 64 * np.round(
      pixel[..., 2] / 4).astype(np.int64)


def test_decode_and_resize_centre_crops_the_shorter_side():
  # Wide image: 2 red columns each side of an 8x8 green square.
  pixels = np.zeros((8, 12, 3), np.uint8)
  pixels[:, :2, 0] = pixels[:, -2:, 0] = 255
  pixels[:, 2:-2, 1] = 255
  out = pipeline.decode_and_resize(tf.io.encode_png(pixels), 4).numpy()
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 1], 255)
  np.testing.assert_array_equal(out[..., 0], 0)
  # JPEG: the same as decoding, cropping and resizing by hand (JPEG's chroma
  # blur across the red edges is in both).
  encoded = tf.io.encode_jpeg(pixels, quality=100)
  full = tf.io.decode_jpeg(encoded, channels=3)[:, 2:10]
  expected = tf.cast(tf.round(tf.image.resize(full, [4, 4], antialias=True)),
                     tf.uint8).numpy()
  out = pipeline.decode_and_resize(encoded, 4).numpy()
  np.testing.assert_array_equal(out, expected)
  # Tall image, upscaled: only the centre rows remain.
  tall = np.zeros((12, 6, 3), np.uint8)
  tall[3:9] = 200
  out = pipeline.decode_and_resize(tf.io.encode_png(tall), 12).numpy()
  assert out.shape == (12, 12, 3)
  np.testing.assert_array_equal(out, 200)


def test_splits_are_grouped_and_cover_the_dataset():
  source, labels, groups, _ = _synthetic_source()
  data = _build(source)
  assert data.class_names == list(CLASSES) and data.num_classes == 3
  assert sum(data.num_examples.values()) == labels.size
  names = list(data.split_group_ids)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not data.split_group_ids[a] & data.split_group_ids[b]
  assert data.train_class_counts.sum() == data.num_examples["train"]
  assert set(data.eval) == {"validation", "test"}


def _source_rows_by_split(data) -> dict[str, np.ndarray]:
  """The source rows of every prepared example, read from the images themselves."""
  rows = {"train": np.array([_row_in(e["image"]) for e in
                             data.train_examples.as_numpy_iterator()])}
  for split, dataset in data.eval.items():
    rows[split] = np.concatenate([
        _row_in(b["image"]).reshape(-1)[b["mask"].reshape(-1)]
        for b in dataset.as_numpy_iterator()])
  return rows


def test_every_source_lesion_lies_in_exactly_one_split():
  # Checked against the source, not against ids that the split made: each
  # prepared example's pixels encode its source row, and the row's lesion is
  # read from the source's own column. Lesions hold 1-5 images.
  source, labels, groups, ids = _synthetic_source(num_groups=30, seed=5,
                                                  max_group_size=5)
  lesion = np.where(groups == "", ids, groups)
  assert np.sum(np.unique(lesion, return_counts=True)[1] >= 3) >= 10
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)   # no split_by warning by default
    data = _build(source, num_local_devices=1, eval_batch_size=4)
  split_of_row = np.full(labels.size, "", dtype=object)
  for split, rows in _source_rows_by_split(data).items():
    assert np.all(split_of_row[rows] == ""), "a source row is in two examples"
    split_of_row[rows] = split
  assert np.all(split_of_row != ""), "a source row is in no split"
  for name in np.unique(lesion):
    splits = set(split_of_row[lesion == name])
    assert len(splits) == 1, f"lesion {name} is in the splits {sorted(splits)}"


def test_split_by_image_leaks_lesions_only_when_asked_for():
  source, labels, groups, ids = _synthetic_source(num_groups=30, seed=5,
                                                  max_group_size=5)
  lesion = np.where(groups == "", ids, groups)
  with pytest.warns(UserWarning, match=r"split_by='image'.* share a lesion"):
    data = _build(source, num_local_devices=1, eval_batch_size=4, split_by="image")
  split_of_row = np.full(labels.size, "", dtype=object)
  for split, rows in _source_rows_by_split(data).items():
    split_of_row[rows] = split
  assert np.all(split_of_row != "")
  leaked = [name for name in np.unique(lesion)
            if len(set(split_of_row[lesion == name])) > 1]
  assert leaked, "no lesion spans two splits"
  with pytest.raises(ValueError, match="split_by must be one of"):
    _build(source, split_by="patient")


def test_train_batches_for_one_and_four_devices():
  source, labels, _, _ = _synthetic_source()
  for devices, batch in ((1, 3), (4, 8)):
    data = _build(source, num_local_devices=devices, batch_size=batch)
    element = next(iter(data.train))
    per_device = batch // devices
    assert element["image"].shape == (devices, per_device, IMAGE_SIZE,
                                      IMAGE_SIZE, 3)
    assert element["image"].dtype == tf.uint8
    assert element["label"].shape == (devices, per_device)
    assert element["label"].dtype == tf.int32
    # Every image is its own example: label and index agree with the source.
    n_train = data.num_examples["train"]
    index = element["index"].numpy().reshape(-1)
    assert np.all((index >= 0) & (index < n_train))


def test_one_epoch_is_a_permutation_and_epochs_reshuffle():
  source, labels, _, ids = _synthetic_source()
  data = _build(source, num_local_devices=1, batch_size=1, shuffle_seed=3)
  n = data.num_examples["train"]
  stream = data.train.unbatch().take(2 * n)
  elements = list(stream.as_numpy_iterator())
  first = np.array([e["index"][0] for e in elements[:n]])
  second = np.array([e["index"][0] for e in elements[n:]])
  np.testing.assert_array_equal(np.sort(first), np.arange(n))
  np.testing.assert_array_equal(np.sort(second), np.arange(n))
  assert np.any(first != second)
  # Red channel carries the source row: images and labels match their example.
  for e in elements[:n]:
    assert e["label"][0] == labels[_row_in(e["image"][0])]
    np.testing.assert_allclose(e["image"][0, ..., 1], 128, atol=2)
  again = _build(source, num_local_devices=1, batch_size=1, shuffle_seed=3)
  repeat = [e["index"][0]
            for e in again.train.unbatch().take(n).as_numpy_iterator()]
  np.testing.assert_array_equal(repeat, first)
  other = _build(source, num_local_devices=1, batch_size=1, shuffle_seed=4)
  moved = [e["index"][0]
           for e in other.train.unbatch().take(n).as_numpy_iterator()]
  assert np.any(np.array(moved) != first)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_scores_every_example_once_with_padding(process_count):
  source, labels, _, _ = _synthetic_source()
  seen = {}
  batches = []
  for process_index in range(process_count):
    data = _build(source, num_local_devices=4 // process_count,
                  eval_batch_size=8, process_index=process_index,
                  process_count=process_count, cache=False)
    for split, dataset in data.eval.items():
      count = 0
      for batch in dataset.as_numpy_iterator():
        count += 1
        local = 8 // process_count
        assert batch["image"].shape == (4 // process_count, 2, IMAGE_SIZE,
                                        IMAGE_SIZE, 3)
        for key in ("label", "mask", "index"):
          assert batch[key].shape == (4 // process_count, 2), key
        assert batch["mask"].dtype == bool
        mask = batch["mask"].reshape(-1)
        index = batch["index"].reshape(-1)
        np.testing.assert_array_equal(index[~mask], -1)
        assert local == mask.size
        seen.setdefault(split, []).extend(index[mask].tolist())
        np.testing.assert_array_equal(batch["label"].reshape(-1)[mask],
                                      data.eval_labels[split][index[mask]])
        images = batch["image"].reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
        rows = _row_in(images[mask])
        np.testing.assert_array_equal(labels[rows],
                                      data.eval_labels[split][index[mask]])
      assert count == data.eval_steps[split]
      batches.append((split, count))
  # Padding is exercised: some split is not a multiple of the batch.
  assert any(data.num_examples[split] % 8 for split in seen)
  for split, indices in seen.items():
    assert sorted(indices) == list(range(data.num_examples[split])), split
  # Every process runs the same number of batches.
  for split in seen:
    assert len({c for s, c in batches if s == split}) == 1


def test_imbalance_control_gives_exact_training_counts():
  source, labels, _, _ = _synthetic_source(num_groups=80)
  data = _build(source, task="melanoma_vs_nevus", train_class_counts="30:6")
  assert data.class_names == ["nevus", "melanoma"]
  np.testing.assert_array_equal(data.train_class_counts, [30, 6])
  assert data.num_examples["train"] == 36
  # Validation and test keep every example of the two classes.
  kept = np.isin(labels, [0, 1]).sum()
  assert sum(data.num_examples.values()) == 36 + kept - np.sum(
      _build(source, task="melanoma_vs_nevus").train_class_counts)
  with pytest.raises(ValueError, match="train_class_counts.*'melanoma'"):
    _build(source, task="melanoma_vs_nevus", train_class_counts="30:600")


def test_bad_arguments_name_the_field():
  source, _, _, _ = _synthetic_source(num_groups=10)
  with pytest.raises(ValueError, match="batch_size=6 .*device count 4"):
    _build(source, batch_size=6)
  with pytest.raises(ValueError, match="eval_batch_size=2 "):
    _build(source, eval_batch_size=2)
  with pytest.raises(ValueError, match="task must be one of"):
    _build(source, task="melanoma")
  with pytest.raises(ValueError, match="split_scheme must be one of"):
    _build(source, split_scheme="50/50")
  with pytest.raises(ValueError, match="process_index"):
    _build(source, process_index=2, process_count=2)


def test_create_datasets_checks_arguments_before_reading_data(tmp_path):
  # The manual folder does not exist: only an early check can answer first.
  kwargs = dict(dataset="ham10000", task="all", split_scheme="80/20",
                split_seed=0, image_size=8, batch_size=8, eval_batch_size=8,
                num_local_devices=4, data_dir=str(tmp_path),
                manual_dir=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="batch_size=6 "):
    pipeline.create_datasets(**{**kwargs, "batch_size": 6})
  with pytest.raises(ValueError, match="val_fraction"):
    pipeline.create_datasets(**{**kwargs, "val_fraction": 1.5})
  with pytest.raises(ValueError, match="image_size"):
    pipeline.create_datasets(**{**kwargs, "image_size": 0})


@pytest.mark.parametrize("cache", [True, False])
def test_corrupt_image_error_names_the_image(cache):
  source, _, _, ids = _synthetic_source(corrupt=7)
  data = _build(source, cache=cache, split_scheme="80/20", val_fraction=0.0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=ids[7]):
    for split in ("test",):
      for _ in data.eval[split]:
        pass
    for _, _ in zip(range(100), data.train):
      pass


def test_corrupt_last_image_is_named_too():
  source, labels, _, ids = _synthetic_source(corrupt=None)
  last = labels.size - 1
  source_bad, _, _, _ = _synthetic_source(corrupt=last)
  data = _build(source_bad, num_local_devices=1, batch_size=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match=ids[last]):
    for dataset in [*data.eval.values()]:
      for _ in dataset:
        pass
    for _, _ in zip(range(200), data.train):
      pass


# --- the real HAM10000 -------------------------------------------------------

@pytest.fixture(scope="session")
def ham10000_builder(ham10000_dir, tmp_path_factory):
  builders = pytest.importorskip("comtriplet_jax.data.builders")
  builder = builders.get_builder("ham10000",
                                 data_dir=str(tmp_path_factory.mktemp("tfds")),
                                 manual_dir=str(ham10000_dir))
  builders.prepare(builder)
  return builder


def test_real_ham10000_splits_have_no_shared_lesion(ham10000_builder):
  source = pipeline.source_from_builder(ham10000_builder)
  data = pipeline.build_datasets(
      source, task="melanoma_vs_nevus", split_scheme="75/12.5/12.5",
      split_seed=0, image_size=16, batch_size=4, eval_batch_size=4,
      num_local_devices=4, cache=False, shuffle_buffer_size=16,
      train_class_counts="4500:75")
  assert data.class_names == ["nevus", "melanoma"]
  np.testing.assert_array_equal(data.train_class_counts, [4500, 75])
  groups = data.split_group_ids
  assert not groups["train"] & groups["validation"]
  assert not groups["train"] & groups["test"]
  assert not groups["validation"] & groups["test"]
  for split in ("validation", "test"):
    counts = np.bincount(data.eval_labels[split], minlength=2)
    # 12.5% of 6705 nevus and 1113 melanoma images, to within a few lesions.
    assert abs(counts[0] - 6705 / 8) < 30 and abs(counts[1] - 1113 / 8) < 15
  batch = next(iter(data.train))
  assert batch["image"].shape == (4, 1, 16, 16, 3)
  everything = pipeline.build_datasets(
      source, task="all", split_scheme="80/20", split_seed=1, image_size=16,
      batch_size=4, eval_batch_size=4, num_local_devices=4, cache=False)
  assert sum(everything.num_examples.values()) == 10015
  assert sum(len(g) for g in everything.split_group_ids.values()) == 7470


def test_a_split_file_gives_back_the_split_it_was_written_from(tmp_path):
  from comtriplet_jax.data import split_file  # pylint: disable=g-import-not-at-top
  source, labels, groups, ids = _synthetic_source(num_groups=30, seed=7)
  first = _build(source, num_local_devices=1, split_seed=3)
  path = split_file.write(tmp_path / "splits.csv", first.listing, first.class_names)
  # Another seed would split otherwise; the file wins.
  other = _build(source, num_local_devices=1, split_seed=4)
  assert any(set(other.listing[s]["image_id"]) != set(first.listing[s]["image_id"])
             for s in first.listing)
  again = _build(source, num_local_devices=1, split_seed=4, split_file=str(path))
  for split in first.listing:
    for column in ("image_id", "group_id", "label"):
      np.testing.assert_array_equal(again.listing[split][column],
                                    first.listing[split][column])
  assert again.num_examples == first.num_examples
  # The evaluation streams follow the listing: the test images are the file's.
  test_rows = _source_rows_by_split(again)["test"]
  assert sorted(ids[test_rows]) == sorted(first.listing["test"]["image_id"])
