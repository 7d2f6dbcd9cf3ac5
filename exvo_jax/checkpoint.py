"""Checkpoints of the training state: the latest few for resuming, plus the best one.

`Checkpointer` wraps two `orbax.checkpoint.CheckpointManager`s under one work
directory:

  <directory>/latest/<step>/{state,extra}  the `max_to_keep` most recent saves.
  <directory>/best/<step>/{state,extra}    one save: the best `metrics[best_metric]`
                                           so far; orbax stores the metric next to
                                           it, so the best value survives restarts.

Two managers rather than one with orbax's `best_fn`: a single manager would keep
only the best-scoring checkpoints, and could delete the one a resume needs.

Typical use (always try to resume from the work directory first):

  ckpt = Checkpointer(workdir, best_metric="val_ccc", best_mode="max")
  abstract = jax.eval_shape(make_state)          # keeps optax namedtuple types
  resumed = ckpt.restore_latest(abstract)
  step, state, extra = resumed if resumed else (0, make_state(), {})
  ...
  ckpt.save(step, state, metrics={"val_ccc": ccc}, extra={"epoch": epoch})
  ...
  ckpt.close()

Restoring into `jax.ShapeDtypeStruct`s that carry a sharding (see
`with_sharding`) places the arrays directly on those devices, e.g. replicated
on a data-parallel mesh. In a multi-process job every process calls every
method, with the same metrics.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import orbax.checkpoint as ocp
from etils import epath

_ITEMS = ("state", "extra")


def _absolute(directory: epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths; remote ones (gs://...) are left as they are."""
  directory = os.fspath(directory)
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def with_sharding(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Returns `abstract_tree` (e.g. from `jax.eval_shape`) with `sharding` on every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract_tree)


def _barrier_prefix(directory: epath.Path) -> ocp.options.MultiprocessingOptions:
  """Orbax names its multi-process barriers after the step: the latest and the best manager saving the same step
  at once would meet at one barrier name ("already ongoing") and hang; a prefix per manager folder (the same on
  every process) keeps them apart."""
  return ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix=hashlib.sha1(os.fspath(directory).encode()).hexdigest()[:12])


class Checkpointer:
  """Saves and restores the latest and the best training states under `directory`.

  Args:
    directory: work directory; created if missing. Made absolute.
    max_to_keep: how many of the latest checkpoints to keep.
    best_metric: key of `metrics` that ranks checkpoints; None keeps no best.
    best_mode: "max" or "min": whether a larger or a smaller metric is better.
    async_save: write in a background thread; `save` returns once the arrays
      are copied to host memory, so the state may be donated right after.
      Restores and `close` wait for outstanding writes; so does `wait`.
    read_only: only restore: nothing is created, saved or deleted (another run's checkpoints).
  """

  def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 2,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}.")
    self.directory = _absolute(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode

    def options(directory, **kwargs):
      if read_only:  # orbax warns about every save/keep setting that read_only overrides: none are set
        kwargs.update(max_to_keep=None, save_interval_steps=0, read_only=True)
      return ocp.CheckpointManagerOptions(create=not read_only, enable_async_checkpointing=async_save,
                                          multiprocessing_options=_barrier_prefix(directory), **kwargs)

    self._latest = ocp.CheckpointManager(self.directory / "latest", item_names=_ITEMS,
                                         options=options(self.directory / "latest", max_to_keep=max_to_keep))
    self._best = None
    self._best_value = None
    if best_metric is not None:
      self._best = ocp.CheckpointManager(
          self.directory / "best", item_names=_ITEMS,
          options=options(self.directory / "best", max_to_keep=1, best_fn=lambda m: m[best_metric],
                          best_mode=best_mode))
      self._best_value = self._stored_best_value()

  def _stored_best_value(self) -> float | None:
    """The metric of the best checkpoint on disk, from an earlier run; None if none."""
    step = self._best.best_step()
    if step is None:
      return None
    metrics = self._best.metrics(step) or {}
    if self.best_metric not in metrics:
      raise ValueError(f"The best checkpoint in {self.directory / 'best'} has metrics "
                       f"{sorted(metrics)}, not {self.best_metric!r}.")
    return float(metrics[self.best_metric])

  def _improves(self, value: float) -> bool:
    if math.isnan(value):
      return False
    if self._best_value is None:
      return True
    return value > self._best_value if self.best_mode == "max" else value < self._best_value

  @property
  def best_value(self) -> float | None:
    """The best `metrics[best_metric]` saved so far (across restarts), or None."""
    return self._best_value

  def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and the JSON-able dict `extra` as `step`.

    When `metrics[best_metric]` beats the best so far, the same state is also
    kept as the best checkpoint. Without `metrics`, only the latest is saved.

    Args:
      step: training step; saves at a step not above the latest are skipped
        (unless `force`, which raises if that step already exists).
      state: the training state, e.g. a flax TrainState.
      metrics: scalar metrics of this state; `best_metric` must be among them.
      extra: JSON-able data to resume with, e.g. {"epoch": 3, "data_position": 1200}.
      force: save even when the manager's policy would skip the step.

    Returns:
      Whether the latest checkpoint was written.
    """
    value = None
    if self._best is not None and metrics is not None:
      if self.best_metric not in metrics:
        raise ValueError(f"metrics {sorted(metrics)} lack best_metric {self.best_metric!r}.")
      value = float(metrics[self.best_metric])
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              extra=ocp.args.JsonSave(dict(extra or {})))
    saved = self._latest.save(step, args=args, force=force)
    if value is not None:
      # The step can already exist after resuming from an older latest checkpoint.
      if self._improves(value) and step not in self._best.all_steps():
        self._best.save(step, args=args, metrics={self.best_metric: value}, force=True)
        self._best_value = value
    return saved

  def latest_step(self) -> int | None:
    """The step of the newest saved checkpoint, or None if there is none."""
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    """The step of the best checkpoint, or None if there is none (or no best_metric)."""
    return None if self._best is None else self._best.best_step()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint into the structure of `abstract_state`.

    A newest checkpoint that cannot be read (corrupt, or cut short by a machine that died while writing it) while
    an older one can is moved aside to `<directory>/unreadable/` with a warning, and the older one is restored
    instead; moving it aside lets later saves reuse its step. When no checkpoint reads, nothing is moved and the
    first error is raised (a state that does not match the target, e.g. another model size). Orbax already
    ignores saves that never finished: they stay in temporary folders and are never listed.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct`s (from `jax.eval_shape`
        of the state constructor), optionally with shardings (`with_sharding`).

    Returns:
      (step, state, extra), or None when nothing (readable) has been saved.
    """
    self.wait()
    failed = []  # (step, error) of newer checkpoints that could not be read
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
      except Exception as error:  # pylint: disable=broad-except  (judged below: corrupt, or a wrong target)
        failed.append((step, error))
        continue
      for bad_step, error in failed:  # an older one reads: the newer ones are damaged
        self._set_aside(bad_step, error, step)
      return step, restored.state, dict(restored.extra)
    if failed:  # nothing reads: more likely a state that does not match the target than corruption everywhere
      raise RuntimeError(f"no checkpoint in {self.directory / 'latest'} restores into this run's state (steps "
                         f"{[s for s, _ in failed]}); unreadable, or written by another config or model? Use another "
                         "workdir, or remove that folder to start afresh") from failed[0][1]
    return None

  def _set_aside(self, step: int, error: Exception, fallback: int) -> None:
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    aside = self.directory / "unreadable" / str(step)
    logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved to %s; falling back to step %d", step,
                    self.directory / "latest", type(error).__name__, reason, aside, fallback)
    print(f"WARNING: checkpoint step {step} in {self.directory / 'latest'} is unreadable ({reason}); moved to "
          f"{aside}; falling back to step {fallback}", flush=True)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      if aside.exists():
        aside.rmtree()
      (self.directory / "latest" / str(step)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._latest.reload()

  def restore_best(self, abstract_state: Any) -> Any | None:
    """Restores the best checkpoint's state (see `restore_latest`); None if there is none."""
    if self._best is None:
      raise ValueError("This Checkpointer was created without best_metric.")
    self.wait()
    step = self._best.best_step()
    if step is None:
      return None
    restored = self._best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self._latest.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for outstanding saves and releases the managers."""
    self._latest.close()
    if self._best is not None:
      self._best.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
