"""Entry point: `python -m exvo_jax.main --config=configs/<task>.py[:variant] [--workdir=DIR] [--config.x=y]`.

Parses the flags, checks the config's values and refuses URL workdirs (before any work), starts the multi-process
runtime when the run is distributed, checks the workdir and that its checkpointed stages were made by this
configuration (`stages`), installs the SIGTERM handler, then hands the config and workdir to the task named by
`config.task`.

Exit status: 0 done or preempted (rerun the same command to resume), 1 an error, 2 a usage error (a config typo,
a URL workdir, checkpoints made by another configuration), 3 a non-finite loss.
"""

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/fewshot.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes checkpoints, metrics and outputs, and resumes from. "
                    "Default: runs/<task>.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0. Slurm and TPU pods "
                    "are detected without it.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config"])

# config.task -> its module: `check_config(config)` and `checkpointed_stages(config, workdir)` run before any work,
# then `run(config, workdir)`. Imported when needed: JAX is not loaded before the cheap checks have passed.
TASKS = {
    "avb": "exvo_jax.tasks.avb",
    "describe": "exvo_jax.tasks.describe",
    "fewshot": "exvo_jax.tasks.fewshot",
    "generate": "exvo_jax.tasks.generate",
    "multitask": "exvo_jax.tasks.multitask",
}


def task_module(name):
  return importlib.import_module(TASKS[name])


def _stop(message, status):
  print(f"stopped: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def check_config(config):
  """Every task's shared data keys, then the task's own; raises config_check.ConfigError."""
  from exvo_jax import config_check  # pylint: disable=import-outside-toplevel
  from exvo_jax.data import demo  # pylint: disable=import-outside-toplevel
  config_check.choice(config, "data.dataset", ("hume_vb", "emogator"))
  config_check.choice(config, "data.demo_size", tuple(demo.SIZES))
  config_check.choice(config, "data.demo_layout", tuple(demo.AUDIO_DIRS))
  task_module(config.task).check_config(config)


def refuse_url(workdir):
  """A URL workdir (gs://, s3://...) stops the run at once: metrics, submissions, samples, feature caches and stage
  records are written with local file calls, so it would fail after training. A mounted bucket (gcsfuse) works."""
  if "://" in workdir:
    _stop(f"--workdir={workdir}: a URL is not supported as a workdir (metrics, submissions and samples are written "
          "with local file calls); use a local folder or a mounted bucket (gcsfuse) and copy the results", 2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", config.task)
  refuse_url(workdir)
  if config.task not in TASKS:
    raise app.UsageError(f"config.task is {config.task!r}; known tasks: {', '.join(sorted(TASKS))}")
  from exvo_jax import config_check  # pylint: disable=import-outside-toplevel
  from exvo_jax import runtime  # pylint: disable=import-outside-toplevel
  from exvo_jax import stages  # pylint: disable=import-outside-toplevel
  try:
    check_config(config)
  except config_check.ConfigError as error:
    raise app.UsageError(str(error)) from None
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings that back
    logging.set_verbosity(logging.WARNING)
  started = runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  runtime.check_workdir(workdir)
  task = task_module(config.task)
  try:
    stages.check(task.checkpointed_stages(config, workdir), restart_changed=config.restart_changed)
  except stages.StageMismatch as error:
    _stop(error, 2)
  runtime.preemption.install()
  print(f"task {config.task}, workdir {os.path.abspath(workdir)}, {started}", flush=True)
  try:
    task.run(config, workdir)
  except stages.StageMismatch as error:
    _stop(error, 2)
  except runtime.Preempted as preempted:
    print(f"preempted: {preempted}. Rerun the same command (same --workdir) to resume.", flush=True)
    sys.exit(0)
  except runtime.NonFiniteLoss as error:
    _stop(error, 3)


if __name__ == "__main__":
  app.run(main)
