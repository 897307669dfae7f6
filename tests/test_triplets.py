"""The triplet stream of SDC and the unlabelled stream of UDC."""

import types

import numpy as np
import pytest
import tensorflow as tf

from comtriplet_jax.data import triplets

# 40 majority, 3 minority: the minority is tiny, as in the imbalance study.
LABELS = np.array([0] * 40 + [1] * 3, np.int32)


def _train_images(labels=LABELS, size=4):
  n = labels.size
  # Every image is filled with its own position, so a batch shows what it holds.
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  return triplets.TrainImages(images, labels.copy())


def test_classes_are_right_and_positive_is_never_the_anchor():
  for step in range(50):
    a, p, n = triplets.sample_triplets(LABELS, 15, seed=1, step=step)
    np.testing.assert_array_equal(LABELS[p], LABELS[a])
    assert np.all(LABELS[n] != LABELS[a])
    assert np.all(p != a)
    assert np.unique(a).size == a.size, "anchors repeat within a step"


def test_deterministic_from_seed_and_step():
  one = triplets.sample_triplets(LABELS, 15, seed=7, step=3)
  two = triplets.sample_triplets(LABELS, 15, seed=7, step=3)
  for x, y in zip(one, two):
    np.testing.assert_array_equal(x, y)
  other_step = triplets.sample_triplets(LABELS, 15, seed=7, step=4)
  other_seed = triplets.sample_triplets(LABELS, 15, seed=8, step=3)
  other_process = triplets.sample_triplets(LABELS, 15, seed=7, step=3, process_index=1)
  for other in (other_step, other_seed, other_process):
    assert any(not np.array_equal(x, y) for x, y in zip(one, other))


def test_minority_appears_every_step_and_is_never_exhausted():
  minority = np.flatnonzero(LABELS == 1)
  used = np.zeros(LABELS.size, int)
  for step in range(400):
    a, p, n = triplets.sample_triplets(LABELS, 15, seed=0, step=step)
    every = np.concatenate([a, p, n])
    # Every triplet holds both classes, so every step has minority images.
    assert np.isin(every, minority).sum() >= 15
    np.add.at(used, every, 1)
  # Over 400 steps the 3 minority images keep being drawn, all about equally.
  minority_use = used[minority]
  assert minority_use.min() > 0.7 * minority_use.mean()
  # At least 15 draws per step fall on 3 minority images, so each is drawn
  # several times per step, far more often than any majority image: the
  # minority is reused as often as the triplets need it, never used up.
  assert minority_use.min() > 5 * used[LABELS == 0].max()


def test_single_image_class_pairs_the_anchor_with_itself():
  labels = np.array([0, 0, 0, 1], np.int32)
  for step in range(20):
    a, p, n = triplets.sample_triplets(labels, 4, seed=0, step=step)
    lone = a == 3
    np.testing.assert_array_equal(p[lone], a[lone])
    assert np.all(p[~lone] != a[~lone])
    np.testing.assert_array_equal(n[lone] < 3, True)


@pytest.mark.parametrize("labels,message", [
    (np.zeros(5, np.int32), "both classes"),
    (np.array([0, 1, 2]), "binary"),
])
def test_bad_labels_are_named(labels, message):
  with pytest.raises(ValueError, match=message):
    triplets.sample_triplets(labels, 2, seed=0, step=0)


def test_triplet_stream_layout_and_contents():
  train = _train_images()
  stream = triplets.triplet_stream(train, batch_size=8, num_local_devices=4, seed=0)
  batch = next(stream)
  for key in ("anchor", "positive", "negative"):
    assert batch[key].shape == (4, 2, 4, 4, 3) and batch[key].dtype == np.uint8
    # Pixels hold the example position: the images are the indexed ones.
    np.testing.assert_array_equal(batch[key][..., 0, 0, 0], batch[f"{key}_index"])
  assert batch["anchor_label"].shape == (4, 2)
  np.testing.assert_array_equal(batch["anchor_label"], LABELS[batch["anchor_index"]])
  np.testing.assert_array_equal(LABELS[batch["positive_index"]], batch["anchor_label"])
  np.testing.assert_array_equal(LABELS[batch["negative_index"]],
                                1 - batch["anchor_label"])


def test_resumed_stream_equals_the_uninterrupted_one():
  train = _train_images()
  whole = triplets.triplet_stream(train, batch_size=8, num_local_devices=2, seed=5)
  batches = [next(whole) for _ in range(7)]
  resumed = triplets.triplet_stream(train, batch_size=8, num_local_devices=2, seed=5,
                                    start_step=4)
  for expected in batches[4:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # Reshuffled every iteration: consecutive steps differ.
  assert not np.array_equal(batches[0]["anchor_index"], batches[1]["anchor_index"])


def test_unlabelled_stream():
  train = _train_images()
  whole = triplets.unlabelled_stream(train, images_per_step=12, num_local_devices=4,
                                     seed=2)
  batches = [next(whole) for _ in range(5)]
  for batch in batches:
    assert batch["image"].shape == (4, 3, 4, 4, 3)
    index = batch["index"].reshape(-1)
    assert np.unique(index).size == 12
    np.testing.assert_array_equal(batch["image"][..., 0, 0, 0], batch["index"])
    np.testing.assert_array_equal(batch["label"], LABELS[batch["index"]])
  resumed = triplets.unlabelled_stream(train, images_per_step=12, num_local_devices=4,
                                       seed=2, start_step=3)
  np.testing.assert_array_equal(next(resumed)["index"], batches[3]["index"])


def test_batch_must_split_over_devices():
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple"):
    next(triplets.triplet_stream(_train_images(), batch_size=6, num_local_devices=4,
                                 seed=0))
  with pytest.raises(ValueError, match="images_per_step"):
    next(triplets.unlabelled_stream(_train_images(), images_per_step=6,
                                    num_local_devices=4, seed=0))


def test_load_train_images_checks_the_order():
  train = _train_images()
  examples = tf.data.Dataset.from_tensor_slices(
      {"image": train.images, "label": train.labels,
       "index": np.arange(train.labels.size, dtype=np.int32)})
  data = types.SimpleNamespace(train_examples=examples, train_labels=train.labels)
  loaded = triplets.load_train_images(data, read_batch=16)
  np.testing.assert_array_equal(loaded.images, train.images)
  np.testing.assert_array_equal(loaded.labels, train.labels)
  data.train_labels = train.labels[::-1].copy()
  with pytest.raises(ValueError, match="disagree"):
    triplets.load_train_images(data)
