"""Walking a padded evaluation split: the one place that knows its batch layout.

An evaluation split (``pipeline.Datasets.eval[split]``) yields batches
``{'image': [D, b, S, S, 3], 'label': [D, b], 'index': [D, b], 'mask': [D, b]}``
for D local devices, padded to whole batches (``mask`` False, ``index`` -1 on
padding); every process yields the same number of batches, and the real
examples of all processes together are every index of the split once.

* :func:`padded_batches`: the batches with their device axis flattened, padding
  kept, so that a function jitted on them compiles once;
* :func:`outputs`: a function's outputs for every real example, in index order
  (optionally gathered from all processes, checked to cover the split);
* :func:`first_examples`: the first real examples, for pictures.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np


def padded_batches(dataset) -> Iterator[dict[str, np.ndarray]]:
  """Each batch with ``[D, b, ...]`` flattened to ``[D * b, ...]``, padding kept."""
  for batch in dataset.as_numpy_iterator():
    yield {k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in batch.items()}


def _per_example(value: np.ndarray, n: int, name: str) -> np.ndarray:
  """[n, ...] from [n, ...] or [D, b, ...] with D * b = n."""
  if value.ndim >= 1 and value.shape[0] == n:
    return value
  if value.ndim >= 2 and value.shape[0] * value.shape[1] == n:
    return value.reshape((n,) + value.shape[2:])
  raise ValueError(f"output {name!r} has shape {value.shape}; a batch of {n} examples "
                   f"needs [{n}, ...] or [devices, {n} / devices, ...]")


def outputs(fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]], dataset, *,
            num_examples: int | None = None, gather: bool = False
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``fn``'s outputs for every real example, in index order.

  Args:
    fn: a flattened padded batch (:func:`padded_batches`) -> a dict of arrays
      whose leading axes hold its ``D * b`` examples (``[D * b, ...]`` or
      ``[D, b, ...]``).
    dataset: a padded evaluation split.
    num_examples: when given, every index 0 .. num_examples - 1 must appear
      exactly once (the whole split; with several processes, pass ``gather``).
    gather: all-gather the outputs of every process first (every process must
      call this; padding is dropped after the gather).

  Returns:
    (outputs: name -> [n, ...] in index order, the indices [n]).

  Raises:
    RuntimeError: when ``num_examples`` is given and the indices do not cover
      the split exactly once.
  """
  parts: dict[str, list[np.ndarray]] = {}
  indices, masks = [], []
  for batch in padded_batches(dataset):
    n = batch["mask"].size
    for name, value in fn(batch).items():
      parts.setdefault(name, []).append(_per_example(np.asarray(value), n, name))
    indices.append(batch["index"])
    masks.append(batch["mask"])
  values = {name: np.concatenate(chunks) for name, chunks in parts.items()}
  index, mask = np.concatenate(indices), np.concatenate(masks)
  if gather:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      # Every process ran the same number of padded batches: equal shapes.
      values = {k: np.concatenate(list(multihost_utils.process_allgather(v)))
                for k, v in values.items()}
      index, mask = (np.concatenate(list(multihost_utils.process_allgather(a)))
                     for a in (index, mask))
  index = index[mask]
  order = np.argsort(index, kind="stable")
  if num_examples is not None and not np.array_equal(index[order],
                                                     np.arange(num_examples)):
    raise RuntimeError(
        f"evaluation covered {index.size} examples but the split has {num_examples}; "
        "every example must be scored exactly once")
  return {k: v[mask][order] for k, v in values.items()}, index[order]


def first_examples(dataset, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The ``count`` real examples of lowest index in the first batches that hold
  that many: (images [<= count, S, S, 3], indices)."""
  images, indices = [], []
  for batch in padded_batches(dataset):
    images.append(batch["image"][batch["mask"]])
    indices.append(batch["index"][batch["mask"]])
    if sum(i.size for i in indices) >= count:
      break
  images, indices = np.concatenate(images), np.concatenate(indices)
  order = np.argsort(indices, kind="stable")[:count]
  return images[order], indices[order]
