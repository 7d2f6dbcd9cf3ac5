"""Outputs of a run: JSON metrics, CSV submissions, a JSONL metrics log, TensorBoard events (and optionally
Weights & Biases), and a progress line with rate and ETA.

Only process 0 writes (multi-host runs call these on every process; the others return at once).
"""

import csv
import itertools
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np


def is_writer():
  return jax.process_index() == 0


def plain(value):
  """numpy/jax scalars and arrays -> JSON-able Python values (NaN -> None)."""
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, "tolist"):
    return plain(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path, obj):
  """Writes `obj` as indented JSON atomically (a reader never sees half a file)."""
  if not is_writer():
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(plain(obj), f, indent=1)
  os.replace(tmp, path)


def write_csv(path, header, rows):
  """Writes a CSV (a submission) atomically: `header` then every row of the iterable `rows`."""
  if not is_writer():
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  os.replace(tmp, path)


class MetricsLog:
  """Appends one JSON object per line: {'step': ..., **metrics}."""

  def __init__(self, path):
    self.path = path

  def write(self, step, **metrics):
    if is_writer():
      with open(self.path, "a") as f:
        f.write(json.dumps(plain({"step": step, **metrics})) + "\n")


class Progress:
  """A progress line every `every_s` seconds, and after the first update (how long start-up took shows): done/total,
  items/s (and a second rate), ETA."""

  def __init__(self, total, *, what="steps", every_s=10.0, stream=sys.stdout, per_item=None, start=0,
               first_line=True):
    self.total, self.what, self.every_s, self.stream = total, what, every_s, stream
    self.first = start  # items already done before this run (a resumed run): not counted in the rate
    self.per_item = per_item  # optional (name, count per item), e.g. ('clips', batch_size)
    self.start = self.last = time.monotonic()
    self.done = 0
    self.printed = not first_line  # False: the first update prints

  def update(self, done, extra=""):
    self.done = done
    now = time.monotonic()
    if self.printed and now - self.last < self.every_s and done < self.total:
      return
    self.last, self.printed = now, True
    elapsed = max(now - self.start, 1e-9)
    rate = (done - self.first) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    line = f"{done}/{self.total} {self.what}, {rate:.2f} {self.what}/s"
    if self.per_item:
      line += f", {rate * self.per_item[1]:.1f} {self.per_item[0]}/s"
    line += f", ETA {eta:.0f} s" if math.isfinite(eta) else ""
    if extra:
      line += f" | {extra}"
    if is_writer():
      print(line, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard event files (tensorboardX: no TensorFlow needed) and, optionally, Weights & Biases.

_SETTINGS = {"tensorboard": True, "wandb": False, "wandb_project": "exvo_jax", "run_name": ""}
_WANDB_RUN = []  # the one wandb run of this process, started on the first event
_FILE_NUMBERS = itertools.count()


def configure(*, tensorboard=True, wandb=False, wandb_project="exvo_jax", run_name=""):
  """What `EventLog`s write: TensorBoard event files (default) and/or a Weights & Biases run (`wandb` installed;
  `run_name` names it, e.g. the workdir). `main` calls this from `config.log` before the task starts."""
  _SETTINGS.update(tensorboard=tensorboard, wandb=wandb, wandb_project=wandb_project, run_name=run_name)


def _wandb_run():
  if not _WANDB_RUN:
    import wandb  # pylint: disable=import-outside-toplevel  # optional; main checks it is installed
    _WANDB_RUN.append(wandb.init(project=_SETTINGS["wandb_project"], name=_SETTINGS["run_name"] or None))
  return _WANDB_RUN[0]


def events_folder(directory, name):
  """The event-file folder of the run `name` (a trainer's name, e.g. 'seed 3') under `directory`:
  `directory/tensorboard/<name>`, each run of characters other than letters, digits, '.' and '-' made one '_'
  ('seed_3'); `tensorboard --logdir` lists it as that run."""
  return os.path.join(directory, "tensorboard", re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_"))


class EventLog:
  """Scalars, images and audio of one run, as TensorBoard events in `folder` (and in the wandb run, prefixed by
  the folder's name, when configured). Only process 0 writes; elsewhere every call returns at once.

  `purge_step`: a resumed run's first step: TensorBoard drops events at or after it left by the interrupted run.
  """

  def __init__(self, folder, purge_step=None):
    self.folder = folder
    self.name = os.path.basename(folder)
    self._writer = None
    if is_writer() and _SETTINGS["tensorboard"]:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      os.makedirs(folder, exist_ok=True)
      # A file name of its own: tensorboardX names files by the second, and a resumed run may start within it.
      self._writer = SummaryWriter(folder, purge_step=purge_step, flush_secs=10,
                                   filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS)}")
    self._wandb = _wandb_run() if is_writer() and _SETTINGS["wandb"] else None
    if self._wandb is not None:  # each run's own step axis: several runs (seeds, base then MAML) share the wandb run
      self._wandb.define_metric(f"{self.name}/step")
      self._wandb.define_metric(f"{self.name}/*", step_metric=f"{self.name}/step")

  def scalars(self, step, values, prefix=""):
    """{name: number} at `step`; non-finite and non-numeric values are left out."""
    finite = {f"{prefix}{k}": float(v) for k, v in values.items()
              if isinstance(v, (int, float, np.number)) and math.isfinite(float(v))}
    if self._writer is not None:
      for key, value in finite.items():
        self._writer.add_scalar(key, value, step)
    if self._wandb is not None and finite:
      self._log_wandb(step, finite)

  def image(self, step, tag, image):
    """An RGB image uint8 [H, W, 3]."""
    if self._writer is not None:
      self._writer.add_image(tag, np.asarray(image, np.uint8), step, dataformats="HWC")
    if self._wandb is not None:
      import wandb  # pylint: disable=import-outside-toplevel
      self._log_wandb(step, {tag: wandb.Image(np.asarray(image, np.uint8))})

  def audio(self, step, tag, samples, sample_rate):
    """One clip: float [n] in [-1, 1] or int16 [n]."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
      samples = samples.astype(np.float32) / 32768.0
    samples = np.clip(samples.astype(np.float32), -1.0, 1.0)
    if self._writer is not None:
      self._writer.add_audio(tag, samples, step, sample_rate=sample_rate)
    if self._wandb is not None:
      import wandb  # pylint: disable=import-outside-toplevel
      self._log_wandb(step, {tag: wandb.Audio(samples, sample_rate=sample_rate)})

  def _log_wandb(self, step, values):
    self._wandb.log({f"{self.name}/step": step, **{f"{self.name}/{k}": v for k, v in values.items()}})

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
