"""Runs `python -m exvo_jax.main` with a real SIGTERM sent to itself at a chosen point of the run.

Usage: python tests/sigterm_main.py MODULE:FUNCTION N [main flags...]

The N-th call of MODULE.FUNCTION first sends SIGTERM to this process (main's own handler receives it), then runs
as usual; the run must notice at its next unit of work. Tests use it to stop a given pass deterministically.
"""

import functools
import importlib
import os
import signal
import sys


def _arm(target, n):
  module_name, attr = target.split(":")
  module = importlib.import_module(module_name)
  original = getattr(module, attr)
  calls = [0]

  @functools.wraps(original)
  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
      print(f"sigterm_main: sending SIGTERM at call {n} of {target}", flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  setattr(module, attr, wrapped)


if __name__ == "__main__":
  target, n = sys.argv[1], int(sys.argv[2])
  sys.argv = [sys.argv[0], *sys.argv[3:]]
  from absl import app  # pylint: disable=g-import-not-at-top
  from exvo_jax import main  # pylint: disable=g-import-not-at-top
  _arm(target, n)
  app.run(main.main)
