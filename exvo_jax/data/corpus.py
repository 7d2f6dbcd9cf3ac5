"""Where a run's corpus is: the configured folder, $EXVO_DATA, or the demo corpus built in the cache."""

import os
import pathlib

from exvo_jax import runtime
from exvo_jax.data import builders
from exvo_jax.data import demo
from exvo_jax.data.report import CorpusError


def locate(root, *, dataset="hume_vb", demo_size="default", demo_seed=0, log=print):
  """Returns the corpus folder for `dataset`.

  Args:
    root: the configured folder; empty means $EXVO_DATA, and if that is unset the demo corpus (hume_vb only),
      built once in `<cache>/demo/` (the path is logged).
    dataset: 'hume_vb' or 'emogator'.
    demo_size, demo_seed: which demo corpus to build.
  """
  root = root or os.environ.get("EXVO_DATA", "")
  if root:
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
      raise CorpusError(f"{path}: corpus folder not found; set config.data.root (or EXVO_DATA) to the folder "
                        f"of the {dataset} release")
    return path.resolve()
  if dataset != "hume_vb":
    raise CorpusError(f"no folder given for {dataset}; set config.data.root (or EXVO_DATA)")
  path = runtime.process_zero_first(
      lambda: demo.ensure_demo_corpus(builders.cache_dir() / "demo", size=demo_size, seed=demo_seed), "demo corpus")
  log(f"No data configured: using the demo corpus at {path} (set config.data.root or EXVO_DATA to use the "
      "HUME-VB release)")
  return path
