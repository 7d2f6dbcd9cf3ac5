"""Entry point: `python -m exvo_jax.main --config=configs/<task>.py[:variant] [--workdir=DIR] [--config.x=y]`.

Parses the flags, checks the config's values and refuses URL workdirs (before any work), starts the multi-process
runtime when the run is distributed, checks the workdir and that its checkpointed stages were made by this
configuration (`stages`), installs the SIGTERM handler, sets up the TensorBoard / wandb logging (`config.log`),
writes the config to `<workdir>/config.json` (not `predict`, whose workdir is the trained run it reads), then hands
the config and workdir to the task named by `config.task`.

Exit status: 0 done or preempted (rerun the same command to resume), 1 an error, 2 a usage error (a config typo,
a URL workdir, checkpoints made by another configuration, a `predict` workdir or audio argument it cannot use), 3 a
non-finite loss.
"""

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from exvo_jax import tasks

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
  if config.log.wandb and importlib.util.find_spec("wandb") is None:
    raise config_check.ConfigError("--config.log.wandb=True logs to Weights & Biases, and the wandb package is not "
                                   "installed: pip install wandb (and wandb login), or leave it False")
  tasks.module(config.task).check_config(config)


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
  if config.task not in tasks.MODULES:
    raise app.UsageError(f"config.task is {config.task!r}; known tasks: {', '.join(sorted(tasks.MODULES))}")
  from exvo_jax import config_check  # pylint: disable=import-outside-toplevel
  from exvo_jax import runtime  # pylint: disable=import-outside-toplevel
  from exvo_jax import stages  # pylint: disable=import-outside-toplevel
  try:
    check_config(config)
  except config_check.ConfigError as error:
    raise app.UsageError(str(error), exitcode=2) from None
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings that back
    logging.set_verbosity(logging.WARNING)
  started = runtime.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  runtime.check_workdir(workdir)
  task = tasks.module(config.task)
  try:
    stages.check(task.checkpointed_stages(config, workdir), restart_changed=config.restart_changed)
  except stages.StageMismatch as error:
    _stop(error, 2)
  runtime.preemption.install()
  from exvo_jax import prediction  # pylint: disable=import-outside-toplevel
  from exvo_jax import writers  # pylint: disable=import-outside-toplevel
  writers.configure(tensorboard=config.log.tensorboard, wandb=config.log.wandb,
                    wandb_project=config.log.wandb_project, run_name=os.path.basename(os.path.abspath(workdir)))
  if getattr(task, "WRITES_CONFIG", True) and writers.is_writer():  # what `predict` reads to rebuild the model
    os.makedirs(workdir, exist_ok=True)
    writers.write_json(os.path.join(workdir, prediction.CONFIG_FILE), config.to_dict())
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
  except prediction.PredictError as error:
    _stop(error, 2)


if __name__ == "__main__":
  app.run(main)
