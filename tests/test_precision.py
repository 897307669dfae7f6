"""Mixed precision (``config.dtype='bfloat16'``) end to end through the train step.

The classifier and SDC take two data-parallel training steps on four fake CPU
devices with a tiny backbone at 32 px. The switch must make the convolutions
compute in bfloat16, while parameters, batch statistics, optimiser state and the
method state stay float32 and the heads hand float32 to the losses, which then
compute in float32; the model's outputs must agree with the float32 model's.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comtriplet_jax import configlib
from comtriplet_jax import methods
from comtriplet_jax import parallel
from comtriplet_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
PER_DEVICE = 2
CONFIGS = {
    # LW: the batch-weighted cross-entropy, with its cross-device class counts.
    "classifier": ("classifier.py", "strategy=LW,size=32"),
    "sdc": ("sdc.py", "size=32"),
}


def _config(name: str, dtype: str, backbone: str):
  file, arg = CONFIGS[name]
  spec = importlib.util.spec_from_file_location(f"precision_{file}",
                                                ROOT / "configs" / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{arg},backbone={backbone}")
  config.dtype = dtype
  config.batch_size = PER_DEVICE * jax.device_count()
  config.learning_rate = 1e-3
  if name == "sdc":
    config.sdc.embedding_size = 8
  configlib.validate(config)
  return config


def _batch(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A host batch [local devices, per device, ...] with both classes on every device."""
  shape = (jax.local_device_count(), PER_DEVICE)
  images = lambda: rng.integers(0, 256, shape + (SIZE, SIZE, 3), dtype=np.uint8)  # noqa: E731
  labels = np.tile(np.arange(PER_DEVICE, dtype=np.int32) % 2, (shape[0], 1))
  if name == "classifier":
    return {"image": images(), "label": labels}
  return {"anchor": images(), "positive": images(), "negative": images(),
          "anchor_label": labels}


def _float_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def _conv_input_dtypes(jaxpr) -> set[str]:
  """dtypes of every convolution's operands in a jaxpr and its sub-jaxprs."""
  found: set[str] = set()

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  return found


def _setup(name: str, dtype: str, backbone: str, *, abstract: bool = False):
  """Config, method, optimiser and the initial train state (shapes only if abstract)."""
  config = _config(name, dtype, backbone)
  method = methods.get_method(config.method)(
      config, num_classes=2, train_class_counts=np.array([30.0, 14.0]))
  tx = train.create_optimizer(config)

  def initial_state(rng):
    variables, method_state = method.init(rng, SIZE)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"],
                            opt_state=tx.init(variables["params"]),
                            method_state=method_state)

  init = jax.eval_shape if abstract else (lambda f, x: f(x))
  return config, method, tx, init(initial_state, jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_step_computes_in_bfloat16_and_keeps_float32_state(name):
  """The traced step of a batch-norm backbone (no compilation): dtypes only."""
  config, method, tx, state = _setup(name, "bfloat16", "tiny_resnet", abstract=True)
  # Parameters are created float32 whatever the compute dtype.
  assert _float_dtypes(state.params) == {"float32"}
  assert _float_dtypes(state.batch_stats) == {"float32"}
  step_fn = train.make_train_step(method, tx, config)
  one_device = jax.tree.map(lambda x: x[0], _batch(name, np.random.default_rng(1)))
  jaxpr, (new_state, step_metrics) = jax.make_jaxpr(
      step_fn, axis_env=[(parallel.AXIS, jax.device_count())], return_shape=True)(
          state, one_device, jax.random.PRNGKey(2))
  # The compute dtype reaches every convolution ...
  assert _conv_input_dtypes(jaxpr) == {"bfloat16"}
  # ... while the updated state (parameters, batch statistics, Adam moments,
  # cluster centres) and every step metric, the loss first, stay float32.
  for part in ("params", "batch_stats", "opt_state"):
    assert _float_dtypes(getattr(new_state, part)) == {"float32"}, part
  assert _float_dtypes(new_state.method_state) <= {"float32"}
  if name == "sdc":
    assert _float_dtypes(new_state.method_state) == {"float32"}  # the centres
  assert step_metrics["loss"].dtype == jnp.float32
  assert _float_dtypes(step_metrics) == {"float32"}


@pytest.fixture()
def quick_compiles():
  """XLA without most optimisations: a tenth of the compile time of ``method.init``.

  What is checked here (dtypes, finite losses, bf16 close to float32) does not
  depend on XLA's optimisation level, and the flag is restored afterwards.
  """
  saved = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", saved)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_training_steps_are_finite_and_near_float32(name, quick_compiles):
  """Two real data-parallel steps on four devices (VGG: a quick compile)."""
  config, method, tx, state = _setup(name, "bfloat16", "tiny_vgg")
  step_fn = train.make_train_step(method, tx, config)
  batch = _batch(name, np.random.default_rng(1))
  one_device = jax.tree.map(lambda x: x[0], batch)
  rng = jax.random.PRNGKey(2)

  # The heads hand float32 to the losses, close to the float32 model's output.
  _, method32, _, _ = _setup(name, "float32", "tiny_vgg", abstract=True)
  images = method.prepare_images(jnp.asarray(one_device.get(
      "image", one_device.get("anchor"))), None, train=False)
  forward = lambda m: jax.jit(lambda v, x: m.model.apply(v, x, train=False))  # noqa: E731
  out16 = forward(method)(state.variables(), images)
  out32 = forward(method32)(state.variables(), images)
  assert out16.dtype == out32.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, rtol=0.05,
                             atol=0.05 * float(jnp.max(jnp.abs(out32))))
  assert not np.array_equal(out16, out32)  # bf16 rounding shows: the switch acts

  par = parallel.DataParallel("pmap")
  p_train = par.map(step_fn, sharded_argnums=(1,))
  placed = par.replicate(state)
  p_rng = par.replicate(rng)
  for _ in range(2):
    placed, step_metrics = p_train(placed, par.shard_batch(batch), p_rng)
    host_metrics = par.unreplicate(step_metrics)
    # The step returns the loss as the method computed it (a bf16 loss would
    # stay bf16 through the mean over devices).
    assert host_metrics["loss"].dtype == np.float32
    assert np.isfinite(host_metrics["loss"]) and host_metrics["nonfinite"] == 0
  final = par.unreplicate(placed)
  assert int(final.step) == 2
  for part in ("params", "batch_stats", "opt_state", "method_state"):
    assert _float_dtypes(getattr(final, part)) <= {"float32"}, part
  assert _float_dtypes(final.params) == _float_dtypes(final.opt_state) == {"float32"}
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       state.params, final.params)
  assert max(jax.tree.leaves(moved)) > 0
