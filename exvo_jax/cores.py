"""How many worker processes a pool should start: the cores this process may run on."""

import os


def usable():
  """Cores in this process's affinity mask (what a container or Slurm allots), not the machine's `os.cpu_count()`."""
  try:
    return len(os.sched_getaffinity(0)) or 1
  except AttributeError:  # platforms without affinity masks
    return os.cpu_count() or 1
