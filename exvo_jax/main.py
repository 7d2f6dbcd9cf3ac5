"""Entry point: `python -m exvo_jax.main --config=configs/<task>.py[:variant] [--workdir=DIR] [--config.x=y]`.

Parses the flags, checks the config's values (before any work), starts the multi-process runtime when the run is
distributed, checks the workdir, installs the SIGTERM handler, then hands the config and workdir to the task named
by `config.task`.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from exvo_jax import config_check
from exvo_jax import runtime
from exvo_jax.data import demo
from exvo_jax.tasks import describe
from exvo_jax.tasks import fewshot
from exvo_jax.tasks import generate
from exvo_jax.tasks import multitask

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

# config.task -> its module: `check_config(config)` runs before any work, then `run(config, workdir)`.
TASKS = {
    "describe": describe,
    "fewshot": fewshot,
    "generate": generate,
    "multitask": multitask,
}


def check_config(config):
  """Every task's shared data keys, then the task's own; raises config_check.ConfigError."""
  config_check.choice(config, "data.dataset", ("hume_vb", "emogator"))
  config_check.choice(config, "data.demo_size", tuple(demo.SIZES))
  TASKS[config.task].check_config(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.task not in TASKS:
    raise app.UsageError(f"config.task is {config.task!r}; known tasks: {', '.join(sorted(TASKS))}")
  try:
    check_config(config)
  except config_check.ConfigError as error:
    raise app.UsageError(str(error)) from None
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings that back
    logging.set_verbosity(logging.WARNING)
  started = runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  workdir = FLAGS.workdir or os.path.join("runs", config.task)
  runtime.check_workdir(workdir)
  runtime.preemption.install()
  print(f"task {config.task}, workdir {os.path.abspath(workdir)}, {started}", flush=True)
  try:
    TASKS[config.task].run(config, workdir)
  except runtime.Preempted as preempted:
    print(f"preempted: {preempted}. Rerun the same command (same --workdir) to resume.", flush=True)
    sys.exit(0)
  except runtime.NonFiniteLoss as error:
    print(f"stopped: {error}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
