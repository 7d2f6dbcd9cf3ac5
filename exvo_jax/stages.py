"""What shaped each checkpointed stage of a run, recorded beside its checkpoints, so a rerun resumes only its own work.

A stage is one training run with its own checkpoint folder: FewShot's base model and its meta-training, one
MultiTask seed, Generate's FID classifier and each GAN. Its record is the flat {config key: value} of everything
that shapes what it trains (data, model, targets, recipe, seeds); the training loop writes it to
`<folder>/stage.json` when the stage starts.

Before any work, `main` asks the task for the stages this run will train or read (`<task>.stages(config, workdir)`)
and `check` compares each with the record on disk:
- the same record: the stage resumes (or, finished, is reused);
- a different one: the run stops, naming the stage, every differing key (recorded -> now) and the fixes: another
  --workdir, or --config.restart_changed=true, which deletes the changed stages' checkpoints and trains them
  afresh (a stage read from another workdir is never deleted);
- checkpoints without a record (written before records existed) count as different: nothing says what made them.

Keys that only say how often to log or save are left out of records: changing them never blocks a resume. So is
a stage's length (epochs, steps, meta-steps): the steps of a longer run begin with those of a shorter one (the data
order and the optimiser do not depend on the total), so more of them continue a finished stage exactly as an
uninterrupted longer run would; fewer than were trained stop the run (`loop.train`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

import jax

from exvo_jax import writers

RECORD = "stage.json"


class StageMismatch(Exception):
  """A stage's checkpoints were made by another configuration; the message names the keys and the fixes."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One checkpointed stage of a run.

  Attributes:
    name: how messages call it ("base model", "seed 3", "GAN all").
    directory: its checkpoint folder.
    record: {config key: JSON-able value} of what shapes it.
    read_only: read from another run's workdir: used as it is, never trained further nor deleted.
    compare: keys of `record` to compare; None: all of them (and a key recorded but not wanted differs). Generate's
      mode=sample compares only what shapes the GAN, not how its training-time checkpoint ranking was done.
  """
  name: str
  directory: str
  record: Mapping[str, Any]
  read_only: bool = False
  compare: Sequence[str] | None = None


def pick(config, keys: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
  """{dotted key: value} of `config` for `keys`; a key naming a sub-config takes all its leaves but `exclude`."""
  exclude = set(exclude)
  result = {}

  def add(key, value):
    if key in exclude:
      return
    if hasattr(value, "items"):  # a sub-config (ConfigDict) or a dict
      for name, item in value.items():
        add(f"{key}.{name}", item)
    else:
      result[key] = writers.plain(value)

  for key in keys:
    value = config
    for part in key.split("."):
      value = value[part]
    add(key, value)
  return result


def data_record(config) -> dict[str, Any]:
  """What names the corpus: the dataset and its folder (resolved as `corpus.locate` does), or the demo corpus's
  size and seed when none is configured."""
  data = config.data
  root = data.root or os.environ.get("EXVO_DATA", "")
  if root:
    return {"data.dataset": data.dataset, "data.root": os.path.realpath(os.path.expanduser(root))}
  layout = {"data.demo_layout": data.demo_layout} if data.demo_layout != "exvo" else {}  # older records lack it
  return {"data.dataset": data.dataset, "data.root": "", "data.demo_size": data.demo_size,
          "data.demo_seed": data.demo_seed, **layout}


def path_of(directory) -> str:
  return os.path.join(os.fspath(directory), RECORD)


def read(directory) -> dict[str, Any] | None:
  """The record in `directory`, or None when there is none."""
  try:
    with open(path_of(directory)) as f:
      return json.load(f)["record"]
  except FileNotFoundError:
    return None


def has_checkpoints(directory) -> bool:
  latest = os.path.join(os.fspath(directory), "latest")
  return os.path.isdir(latest) and any(name.isdigit() for name in os.listdir(latest))


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any],
                compare: Sequence[str] | None = None) -> list[tuple[str, Any, Any]]:
  """[(key, recorded value, wanted value)] of the keys that differ; a missing key is shown as '(none)'."""
  keys = sorted(set(recorded) | set(wanted)) if compare is None else sorted(compare)
  missing = "(none)"
  return [(k, recorded.get(k, missing), wanted.get(k, missing)) for k in keys
          if recorded.get(k, missing) != writers.plain(wanted.get(k, missing))]


def mismatch(stage: Stage) -> str | None:
  """Why `stage`'s checkpoints cannot be resumed by this run (a text listing the keys), or None when they can."""
  recorded = read(stage.directory)
  if recorded is None:
    if has_checkpoints(stage.directory):
      return (f"{stage.name}: {stage.directory} holds checkpoints without a record of the configuration that made "
              f"them ({RECORD}; written by an older version)")
    if stage.read_only:
      return f"{stage.name}: nothing trained in {stage.directory}"
    return None
  diff = differences(recorded, stage.record, stage.compare)
  if not diff:
    return None
  return f"{stage.name} in {stage.directory} was made with another configuration:\n" + "\n".join(
      f"    {key}: {old!r} -> {new!r}" for key, old, new in diff)


def check(stages: Sequence[Stage], *, restart_changed: bool = False, log=print) -> None:
  """Stops (StageMismatch) before any work when a stage on disk was made by another configuration.

  With `restart_changed`, the changed stages of this workdir are deleted (by process 0) and trained afresh;
  a changed read-only stage still stops the run.
  """
  problems = [(stage, why) for stage in stages if (why := mismatch(stage))]
  if not problems:
    return
  keep = [(s, why) for s, why in problems if s.read_only or not restart_changed]
  if keep:
    fixes = ["use another --workdir"]
    if any(not s.read_only for s, _ in keep):
      fixes.append("rerun with --config.restart_changed=true to delete the changed stages' checkpoints and train "
                   "them afresh")
    if any(s.read_only for s, _ in keep):
      fixes.append("point the reused stage (e.g. --config.classifier.workdir) at a run made with this "
                   "configuration, or leave it empty to train one here")
    raise StageMismatch("\n".join(why for _, why in keep) + "\nFix: " + "; or ".join(fixes) + ".")
  for stage, why in problems:
    log(f"restart_changed: {why}\n  deleting {stage.directory} and training {stage.name} afresh")
    if jax.process_index() == 0:
      shutil.rmtree(stage.directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("stages restarted")


def ensure(stage: Stage) -> None:
  """Called by the training loop as a stage starts: writes its record (process 0), or stops when the record on
  disk differs (a stage `check` did not see)."""
  check([stage])
  if stage.read_only or jax.process_index() != 0 or read(stage.directory) is not None:
    return
  os.makedirs(stage.directory, exist_ok=True)
  tmp = path_of(stage.directory) + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"stage": stage.name, "record": {k: writers.plain(v) for k, v in stage.record.items()}}, f, indent=1,
              sort_keys=True)
  os.replace(tmp, path_of(stage.directory))
