"""pmap, shard_map and a single device agree on a data-parallel step.

The steps use plain SGD: Adam divides by the gradient's magnitude, which turns
the float32 rounding noise of exactly-zero gradients (a conv bias right before
BatchNorm) into full-size steps that differ between summation orders.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from comtriplet_jax import parallel


class _SmallNet(nn.Module):
  """Conv, cross-device BatchNorm, optional dropout, dense."""
  axis_name: str | None = parallel.AXIS
  dropout: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


def _step_fn(model, tx):
  def step(state, batch, rng):
    params, batch_stats, opt_state, step = state
    rng = parallel.device_rng(rng, step)

    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats},
                                batch["x"], train=True, mutable=["batch_stats"],
                                rngs={"dropout": rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      return loss, upd["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = parallel.pmean(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, new_stats, opt_state, step + 1), parallel.pmean(loss)
  return step


def _run(mode, num_devices, batch, init_state, dropout):
  model = _SmallNet(dropout=dropout)
  tx = optax.sgd(0.1)
  par = parallel.DataParallel(mode, devices=jax.devices()[:num_devices])
  p_step = par.map(_step_fn(model, tx), sharded_argnums=(1,), donate_argnums=(0,))
  state = par.replicate(init_state)
  rng = par.replicate(jax.random.PRNGKey(1))
  per_device = {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}
  losses = []
  for _ in range(2):
    state, loss = p_step(state, par.shard_batch(per_device), rng)
    losses.append(float(par.unreplicate(loss)))
  return par.unreplicate(state), losses


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 6, 6, 2)).astype(np.float32),
           "y": rng.integers(0, 3, size=8).astype(np.int32)}
  model = _SmallNet(axis_name=None)
  variables = model.init(jax.random.PRNGKey(0), batch["x"][:1], train=False)
  tx = optax.sgd(0.1)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]),
           jnp.zeros((), jnp.int32))
  return batch, jax.tree.map(np.asarray, state)


def test_pmap_and_shard_map_agree_on_four_devices(setup):
  batch, state = setup
  s_pmap, l_pmap = _run("pmap", 4, batch, state, True)
  s_shard, l_shard = _run("shard_map", 4, batch, state, True)
  np.testing.assert_allclose(l_pmap, l_shard, rtol=1e-6)
  assert jax.tree.structure(s_pmap) == jax.tree.structure(s_shard)
  for a, b in zip(jax.tree.leaves(s_pmap), jax.tree.leaves(s_shard), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_four_devices_equal_one_device_without_dropout(setup):
  # Dropout masks depend on the device index, so compare a dropout-free net:
  # gradients averaged over devices and cross-device batch statistics make
  # four devices of 2 examples equal one device of 8.
  batch, state = setup
  one, l_one = _run("pmap", 1, batch, state, False)
  four, l_four = _run("pmap", 4, batch, state, False)
  four_sm, _ = _run("shard_map", 4, batch, state, False)
  np.testing.assert_allclose(l_one, l_four, rtol=1e-5)
  assert (jax.tree.structure(one) == jax.tree.structure(four)
          == jax.tree.structure(four_sm))
  for a, b, c in zip(jax.tree.leaves(one), jax.tree.leaves(four),
                     jax.tree.leaves(four_sm), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)


def test_bad_mode_and_bad_batch_are_named():
  with pytest.raises(ValueError, match="parallelism"):
    parallel.DataParallel("vmap")
  par = parallel.DataParallel("pmap")
  with pytest.raises(ValueError, match="local device count"):
    par.shard_batch({"x": np.zeros((3, 2))})


def test_sharded_outputs_come_back_in_device_order():
  for mode in parallel.MODES:
    par = parallel.DataParallel(mode)
    f = par.map(lambda x: {"y": x * 2 + jax.lax.axis_index(parallel.AXIS)},
                sharded_argnums=(0,), sharded_out=True)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = par.local_outputs(f(par.shard_batch(x)))["y"]
    np.testing.assert_allclose(out, x * 2 + np.arange(4)[:, None])


def test_loss_with_cross_device_counts_gives_the_global_gradient():
  # Per-batch class weights are counted over the global batch with lax.psum
  # inside the loss; averaging gradients with pmean must then give exactly the
  # gradient of the single-device loss on the whole batch.
  from comtriplet_jax import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  y = np.array([0, 0, 0, 1, 0, 0, 1, 0], np.int32)
  w = rng.normal(size=(5, 2)).astype(np.float32)

  def grad_step(w, batch):
    def loss_fn(w):
      return losses.weighted_cross_entropy(batch["x"] @ w, batch["y"],
                                           weighting="batch",
                                           axis_name=parallel.AXIS)
    loss, g = jax.value_and_grad(loss_fn)(w)
    return parallel.pmean(g), parallel.pmean(loss)

  results = []
  for mode, n in (("pmap", 1), ("pmap", 4), ("shard_map", 4)):
    par = parallel.DataParallel(mode, devices=jax.devices()[:n])
    f = par.map(grad_step, sharded_argnums=(1,))
    batch = {"x": x.reshape(n, -1, 5), "y": y.reshape(n, -1)}
    g, loss = f(par.replicate(w), par.shard_batch(batch))
    results.append((par.unreplicate(g), float(par.unreplicate(loss))))
  for g, loss in results[1:]:
    np.testing.assert_allclose(g, results[0][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, results[0][1], rtol=1e-6)
  assert np.isfinite(results[0][1])
