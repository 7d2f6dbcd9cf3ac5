"""Outputs of a run: JSON metrics, CSV submissions, a JSONL metrics log, and a progress line with rate and ETA.

Only process 0 writes (multi-host runs call these on every process; the others return at once).
"""

import csv
import json
import math
import os
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
