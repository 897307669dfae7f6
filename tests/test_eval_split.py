"""data.eval_split: outputs of a padded evaluation split, in index order, once each."""

import numpy as np
import pytest
import tensorflow as tf

from comtriplet_jax.data import eval_split


def _padded_split(indices, devices=2, per_device=3):
  """Batches [D, b] of the given indices in stream order, padded with -1."""
  per_batch = devices * per_device
  total = -(-len(indices) // per_batch) * per_batch
  index = np.full(total, -1, np.int32)
  index[:len(indices)] = indices
  images = np.zeros((total, 2, 2, 3), np.uint8)
  images[:, 0, 0, 0] = np.where(index >= 0, index * 3, 255)   # the index, in a pixel
  shape = (-1, devices, per_device)
  return tf.data.Dataset.from_tensor_slices({
      "image": images.reshape(shape + (2, 2, 3)), "index": index.reshape(shape),
      "mask": (index >= 0).reshape(shape), "label": np.zeros(total, np.int32).reshape(shape)})


def test_outputs_come_back_in_index_order_without_padding():
  order = np.array([4, 0, 6, 2, 1, 5, 3])
  dataset = _padded_split(order)
  seen_shapes = []

  def fn(batch):
    seen_shapes.append(batch["image"].shape)
    pixel = batch["image"][:, 0, 0, 0].astype(np.int64)
    # One output flat [D * b], one per device [D, b, 2].
    return {"flat": pixel, "per_device": np.stack([pixel, -pixel], 1).reshape(2, 3, 2)}

  out, indices = eval_split.outputs(fn, dataset, num_examples=7)
  np.testing.assert_array_equal(indices, np.arange(7))
  np.testing.assert_array_equal(out["flat"], 3 * np.arange(7))
  np.testing.assert_array_equal(out["per_device"][:, 1], -3 * np.arange(7))
  assert seen_shapes == [(6, 2, 2, 3), (6, 2, 2, 3)]   # padding kept: one shape


def test_a_split_not_covered_exactly_once_is_an_error():
  with pytest.raises(RuntimeError, match="covered 3 examples but the split has 4"):
    eval_split.outputs(lambda b: {"x": b["index"]}, _padded_split([0, 2, 1]),
                       num_examples=4)
  with pytest.raises(ValueError, match="output 'x' has shape"):
    eval_split.outputs(lambda b: {"x": np.zeros(5)}, _padded_split([0, 1]))


def test_first_examples_are_those_of_lowest_index_in_the_first_batches():
  # The first batch holds 4, 0, 6, 2, 1, 5: enough for 3.
  images, indices = eval_split.first_examples(_padded_split([4, 0, 6, 2, 1, 5, 3]), 3)
  np.testing.assert_array_equal(indices, [0, 1, 2])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 3, 6])
  _, indices = eval_split.first_examples(_padded_split([4, 0, 6, 2, 1, 5, 3]), 7)
  np.testing.assert_array_equal(indices, np.arange(7))


def test_the_picture_grid_takes_the_classes_in_turn():
  from comtriplet_jax.evaluation import run_pictures  # pylint: disable=g-import-not-at-top
  labels = np.array([0, 0, 0, 1, 0, 2, 1, 0])
  np.testing.assert_array_equal(run_pictures.balanced_selection(labels, 4), [0, 1, 3, 5])
  np.testing.assert_array_equal(run_pictures.balanced_selection(labels, 20), np.arange(8))
