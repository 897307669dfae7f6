"""Named crash points for the crash-safety tests: a process can kill itself at one.

The training loop and the dataset builders call :func:`point` at the moments where
a crash is most likely to leave state behind (inside a step, while a checkpoint
is written, between the best checkpoint and its record, during the final report,
while a dataset is prepared). Outside the tests nothing is set and a call is one
environment lookup. With ``COMTRIPLET_FAULT=<name>:<n>`` the process sends itself
SIGKILL (no ``finally`` block, no flush: what a power cut or the out-of-memory
killer does) the n-th time it passes point ``<name>``, so a test can kill a real
run at an exact moment without sleeping and hoping.
"""

from __future__ import annotations

import os
import signal

ENV = "COMTRIPLET_FAULT"
POINTS = ("prepare", "step", "checkpoint_write", "best_recorded", "report")
_passes: dict[str, int] = {}


def point(name: str) -> None:
  """Kills this process if ``COMTRIPLET_FAULT`` names this pass of this point."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, count = spec.partition(":")
  if target not in POINTS:
    raise ValueError(f"{ENV}={spec!r}: the crash point must be one of {POINTS}")
  if target != name:
    return
  _passes[name] = _passes.get(name, 0) + 1
  if _passes[name] == int(count or 1):
    os.kill(os.getpid(), signal.SIGKILL)
