"""Methods by name: what ``config.method`` selects.

Imported lazily so that a method's dependencies load only when it is used.
"""

from __future__ import annotations

import importlib

_REGISTRY = {
    "classifier": "comtriplet_jax.methods.classifier:Classifier",
    "sdc": "comtriplet_jax.methods.sdc:SDC",
    "udc": "comtriplet_jax.methods.udc:UDC",
    "cae": "comtriplet_jax.methods.cae:CAE",
    "biigma": "comtriplet_jax.methods.biigma:BIIGMA",
}
METHODS = tuple(_REGISTRY)


def get_method(name: str):
  """The method class registered as ``name``."""
  if name not in _REGISTRY:
    raise ValueError(f"config.method={name!r} is not allowed; choose one of "
                     f"{', '.join(METHODS)}")
  module, _, attr = _REGISTRY[name].partition(":")
  try:
    return getattr(importlib.import_module(module), attr)
  except ModuleNotFoundError as e:
    if e.name == module:
      raise ValueError(f"config.method={name!r} is not implemented yet") from e
    raise
