"""Where a run's corpus is: the configured folder, $EXVO_DATA, or the demo corpus built in the cache."""

import os
import pathlib

from exvo_jax import runtime
from exvo_jax.data import builders
from exvo_jax.data import demo
from exvo_jax.data.report import CorpusError


def locate(root, *, dataset="hume_vb", demo_size="default", demo_seed=0, demo_layout="exvo", log=print):
  """Returns the corpus folder for `dataset`.

  Args:
    root: the configured folder; empty means $EXVO_DATA, and if that is unset the demo corpus (hume_vb only),
      built once in `<cache>/demo/` (the path is logged).
    dataset: 'hume_vb' or 'emogator'.
    demo_size, demo_seed: which demo corpus to build.
    demo_layout: its folders, 'exvo' (wav/) or 'avb' (audio/wav/, as the A-VB release); the files are the same.
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
      lambda: demo.ensure_demo_corpus(builders.cache_dir() / "demo", size=demo_size, seed=demo_seed,
                                      layout=demo_layout), "demo corpus")
  log(f"No data configured: using the demo corpus at {path} (set config.data.root or EXVO_DATA to use the "
      "HUME-VB release)")
  return path


def of_config(data, log=print):
  """`locate` with a task config's `data` section (root, dataset and the demo corpus's size, seed and layout)."""
  return locate(data.root, dataset=data.dataset, demo_size=data.demo_size, demo_seed=data.demo_seed,
                demo_layout=data.demo_layout, log=log)
