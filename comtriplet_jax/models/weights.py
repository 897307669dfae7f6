"""Loading weights into a model: backbone checkpoints, and fitting trees to a model.

* :func:`load_backbone_variables` reads a backbone's ``{'params',
  'batch_stats'}`` from an orbax checkpoint: converted ImageNet weights
  (``init_from='imagenet'``, see ``keras_import.py``) or any path.
* :func:`fit_variables` checks that a loaded tree has exactly the keys and
  shapes of the model's and casts it to the model's dtypes; every loader uses
  it (the training loop's ``init_from``, the shallow baselines, loading a
  finished run), so a tree that does not fit is always refused the same way,
  naming what is missing, unexpected, or of another shape.
* :func:`merge_backbone` puts loaded backbone variables into a method model's
  ``backbone`` subtree.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def load_backbone_variables(init_from: str, backbone: str) -> dict[str, PyTree]:
  """Backbone ``{'params', 'batch_stats'}`` from an orbax checkpoint directory.

  ``init_from='imagenet'`` looks for converted ImageNet weights at
  ``$COMTRIPLET_WEIGHTS_DIR/<backbone>`` (default ``~/.cache/comtriplet_jax/weights``).
  """
  if init_from == "imagenet":
    root = pathlib.Path(os.environ.get(
        "COMTRIPLET_WEIGHTS_DIR", "~/.cache/comtriplet_jax/weights")).expanduser()
    path = root / backbone
    if not path.exists():
      raise FileNotFoundError(
          f"ImageNet weights for backbone {backbone!r} were not found at {path}. "
          "Convert the Keras Applications weights into that folder first (see "
          "README, 'Transfer learning'), or set COMTRIPLET_WEIGHTS_DIR, or use "
          "config.init_from=PATH / strategy=NP.")
  else:
    path = pathlib.Path(init_from).expanduser()
    if not path.exists():
      raise FileNotFoundError(f"config.init_from={init_from!r}: no such checkpoint")
  restored = ocp.StandardCheckpointer().restore(path.absolute())
  if "params" not in restored:
    raise ValueError(f"checkpoint {path} has no 'params' entry: not backbone variables")
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


def fit_variables(target: PyTree, source: PyTree, what: str,
                  into: str = "the model") -> PyTree:
  """``source`` with ``target``'s keys, shapes and dtypes, or a ValueError.

  Args:
    target: the model's tree (arrays or shape-dtype structs).
    source: the loaded tree.
    what: names the source in the error, e.g. "init_from weights".
    into: names the target, e.g. "backbone 'vgg16' (params)".

  Raises:
    ValueError: naming up to five missing and unexpected keys and keys whose
      shapes differ (with both shapes).
  """
  t_flat = flax.traverse_util.flatten_dict(target, sep="/") if target else {}
  s_flat = flax.traverse_util.flatten_dict(source, sep="/") if source else {}
  missing = sorted(set(t_flat) - set(s_flat))
  unexpected = sorted(set(s_flat) - set(t_flat))
  wrong = sorted(k for k in set(t_flat) & set(s_flat)
                 if np.shape(t_flat[k]) != np.shape(s_flat[k]))
  if missing or unexpected or wrong:
    raise ValueError(
        f"{what} do not fit {into}: missing {missing[:5]}, unexpected "
        f"{unexpected[:5]}, "
        f"shape mismatch (loaded, expected) "
        f"{[(k, np.shape(s_flat[k]), np.shape(t_flat[k])) for k in wrong[:5]]}")
  if not t_flat:
    return {}
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, t_flat[k].dtype) for k, v in s_flat.items()}, sep="/")


def merge_backbone(variables: dict[str, PyTree], loaded: dict[str, PyTree],
                   backbone: str) -> dict[str, PyTree]:
  """Puts loaded backbone variables into the model's ``backbone`` subtree."""
  out = {}
  for collection in ("params", "batch_stats"):
    merged = dict(variables[collection])
    target = variables[collection].get("backbone", {})
    fitted = fit_variables(target, loaded.get(collection, {}), "init_from weights",
                           f"backbone {backbone!r} ({collection})")
    if target:
      merged["backbone"] = fitted
    out[collection] = merged
  return out
