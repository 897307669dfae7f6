"""Data parallelism: one per-device step, run under ``jax.pmap`` or ``jax.shard_map``.

A step is written once, for one device's slice of the batch, with named-axis
collectives over the ``data`` axis (``lax.pmean`` of gradients, cross-device batch
statistics, ``lax.axis_index`` for per-device randomness). :class:`DataParallel`
runs it either

* under ``jax.pmap`` (the programming model this project's users know): the train
  state is replicated with a leading device axis, or
* under ``jax.shard_map`` inside ``jax.jit`` over a one-axis device mesh (the form
  JAX steers new code to): the train state is one fully replicated global array.

The host always hands over batches shaped ``[local_devices, per_device, ...]``; the
step always sees ``[per_device, ...]``. Both modes give the same numbers (tested).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
MODES = ("pmap", "shard_map")

PyTree = Any


class DataParallel:
  """Runs per-device functions data-parallel over all devices.

  Attributes:
    mode: 'pmap' or 'shard_map'.
    num_devices: global device count (the size of the ``data`` axis).
    num_local_devices: devices attached to this process.
  """

  def __init__(self, mode: str = "pmap", devices: list[jax.Device] | None = None):
    if mode not in MODES:
      raise ValueError(f"config.parallelism must be one of {MODES}, got {mode!r}")
    self.mode = mode
    self.devices = list(devices) if devices is not None else jax.devices()
    self.local_devices = [d for d in self.devices
                          if d.process_index == jax.process_index()]
    self.num_devices = len(self.devices)
    self.num_local_devices = len(self.local_devices)
    self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    # pmap maps over this process' devices only; its arrays carry a leading
    # axis of local devices.
    self._local_sharded = NamedSharding(
        jax.sharding.Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P(AXIS))

  # ---------------------------------------------------------------- placement
  def replicate(self, tree: PyTree) -> PyTree:
    """Places a host pytree on every device in the layout the mode expects."""
    if self.mode == "pmap":
      n = self.num_local_devices
      return jax.tree.map(
          lambda x: jax.device_put(
              np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), self._local_sharded),
          tree)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), self._replicated, lambda idx, x=x: np.asarray(x)[idx]),
        tree)

  def unreplicate(self, tree: PyTree) -> PyTree:
    """One device's copy of a replicated pytree, as host NumPy arrays."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

  def shard_batch(self, batch: PyTree) -> PyTree:
    """Puts a host batch ``[local_devices, per_device, ...]`` onto the devices."""
    def put(x):
      x = np.asarray(x)
      if x.shape[0] != self.num_local_devices:
        raise ValueError(
            f"batch leading axis {x.shape[0]} != local device count "
            f"{self.num_local_devices}")
      if self.mode == "pmap":
        return jax.device_put(x, self._local_sharded)
      global_shape = (self.num_devices,) + x.shape[1:]
      return jax.make_array_from_process_local_data(self._sharded, x, global_shape)
    return jax.tree.map(put, batch)

  # ---------------------------------------------------------------- functions
  def map(self, fn: Callable[..., Any], *, sharded_argnums: tuple[int, ...],
          donate_argnums: tuple[int, ...] = (), sharded_out: bool = False
          ) -> Callable[..., Any]:
    """Wraps a per-device ``fn`` to run on every device.

    Args:
      fn: per-device function; arguments at ``sharded_argnums`` are pytrees of
        per-device batches ``[per_device, ...]``, the others replicated.
      sharded_argnums: positions of the batch-like arguments.
      donate_argnums: arguments whose buffers may be reused (the train state).
      sharded_out: whether outputs are per-device (e.g. evaluation scores) rather
        than replicated (state, averaged metrics).

    Returns:
      A function of the placed arguments (see :meth:`replicate`,
      :meth:`shard_batch`); per-device outputs come back as ``[devices, ...]``.
    """
    if self.mode == "pmap":
      # pmap takes the same global device list on every process and maps over
      # this process's share of it; the axis (collectives, axis_index) spans all.
      return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums,
                      devices=self.devices)

    def per_shard(*args):
      # Each shard holds a leading axis of 1 for sharded arguments: drop it so
      # the step sees exactly what it sees under pmap.
      args = [jax.tree.map(lambda x: x[0], a) if i in sharded_argnums else a
              for i, a in enumerate(args)]
      out = fn(*args)
      if sharded_out:
        out = jax.tree.map(lambda x: x[None], out)
      return out

    @functools.partial(jax.jit, donate_argnums=donate_argnums)
    def run(*args):
      in_specs = tuple(P(AXIS) if i in sharded_argnums else P()
                       for i in range(len(args)))
      out_specs = P(AXIS) if sharded_out else P()
      # check_vma=False keeps pmap's semantics for autodiff: the gradient of a
      # replicated parameter is each device's own, and the step averages it
      # with an explicit lax.pmean. (With check_vma=True, JAX would already sum
      # it over devices, and the same step would give D times the gradient.)
      return jax.shard_map(per_shard, mesh=self.mesh, in_specs=in_specs,
                           out_specs=out_specs, check_vma=False)(*args)
    return run

  def local_outputs(self, tree: PyTree) -> PyTree:
    """Per-device outputs of :meth:`map` as host arrays ``[local_devices, ...]``."""
    def fetch(x):
      if self.mode == "pmap":
        return np.asarray(x)
      shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
      return np.concatenate([np.asarray(s.data) for s in shards], axis=0)
    return jax.tree.map(fetch, tree)


def device_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """A key for this step and this device, from one seed (call inside a step)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def pmean(tree: PyTree) -> PyTree:
  """Mean over the data axis (call inside a step)."""
  return jax.lax.pmean(tree, AXIS)


def psum(tree: PyTree) -> PyTree:
  """Sum over the data axis (call inside a step)."""
  return jax.lax.psum(tree, AXIS)


def all_gather(tree: PyTree, *, tiled: bool = True) -> PyTree:
  """Gathers per-device arrays from all devices along axis 0 (call inside a step)."""
  return jax.lax.all_gather(tree, AXIS, tiled=tiled)

