"""One module per task: build data, model and state; run the loop; evaluate; write outputs.

`MODULES` maps `config.task` to its module, which offers `check_config(config)` and `checkpointed_stages(config,
workdir)` (run by main before any work) and `run(config, workdir)`; a task whose trained models `predict` can apply
to new audio also offers `predictor(trained_config, workdir)` (`exvo_jax/prediction.py`). Modules are imported when
needed, so JAX is not loaded before the cheap checks have passed.
"""

import importlib

MODULES = {
    "avb": "exvo_jax.tasks.avb",
    "describe": "exvo_jax.tasks.describe",
    "fewshot": "exvo_jax.tasks.fewshot",
    "generate": "exvo_jax.tasks.generate",
    "multitask": "exvo_jax.tasks.multitask",
    "predict": "exvo_jax.tasks.predict",
}


def module(name):
  """The module of task `name` (a key of MODULES)."""
  return importlib.import_module(MODULES[name])
