"""The training loop every trainer runs: resume, step, guard, log, evaluate, keep the best, save, stop on SIGTERM.

A trainer (the MultiTask MLP, Emo18 base training, MAML meta-training, the GAN) describes itself with a `Trainer`
(its state, its data-parallel step, its batches and its evaluation) and a `Schedule` (how many steps, and every
how many steps to evaluate, read the metrics back, save), then calls `train`. The loop is one pass over global
steps 1..total_steps, in the shape of the flax ImageNet example; an epoch is only "a fresh batch iterator every
`steps_per_epoch` steps, and an evaluation at its end".

What the loop guarantees:
- Resume: the newest readable checkpoint in `Trainer.directory` is restored with the batch iterator's position,
  the train-metric sums of the current evaluation period, the evaluation history and the early-stopping count,
  so a rerun after any stop ends exactly as an uninterrupted run (the steps are deterministic).
- The step's metrics stay on the device; every `log_every` steps (and before any save or evaluation) they are
  read back together, checked for NaN/Inf (`runtime.NonFiniteLoss`, exit status 3, naming the first bad step and
  the last good checkpoint), summed for the period's mean, written to the metrics log and shown on the progress
  line. A checkpoint is therefore never written after a non-finite step.
- TensorBoard (`writers.EventLog`, process 0): the read-back step metrics as `train/<name>`, the learning rates as
  `learning_rate/<name>`, every evaluation as `val/<name>`, and whatever the trainer's actions add (the GAN's
  spectrogram grids); a resumed run purges the events the interrupted one wrote after its checkpoint.
- Evaluation every `eval_every` steps and at the last: its metrics go to the log and the history, the checkpoint
  with the best `Trainer.best_metric` is kept (orbax, beside the latest), and `patience` evaluations without
  improvement end training early.
- SIGTERM (`runtime.preemption`): checked after every step (in multi-process runs, where the check is a collective,
  at every `log_every`-th step); the state is saved with the iterator's position and `runtime.Preempted` raised;
  `main` exits 0 and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from exvo_jax import checkpoint
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import stages
from exvo_jax import writers


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When things happen, in global steps.

  Attributes:
    total_steps: steps of the whole run.
    steps_per_epoch: a fresh batch iterator (`Trainer.batches(epoch)`) every this many steps; None: one iterator
      (`batches(1)`) for the whole run.
    eval_every: evaluate every this many steps and at the last step; 0: never.
    checkpoint_every: also save every this many steps; 0: only at evaluations, the end and SIGTERM.
    log_every: read the step metrics back, check them and log them every this many steps (and at every
      evaluation, save and epoch end).
    patience: stop after this many evaluations in a row without a better `best_metric`; 0: never.
  """
  total_steps: int
  steps_per_epoch: int | None = None
  eval_every: int = 0
  checkpoint_every: int = 0
  log_every: int = 10
  patience: int = 0

  def epoch_of(self, step: int) -> int | None:
    """The 1-based epoch that global step `step` (1-based) belongs to; None without epochs."""
    return None if self.steps_per_epoch is None else (step - 1) // self.steps_per_epoch + 1


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What one training run supplies to the loop.

  Attributes:
    name: names the run in messages ("base model", "seed 3", "GAN all", "meta-training").
    directory: its checkpoint folder (resumed from first).
    init_state: () -> a fresh training state (one pytree); it is replicated over the mesh.
    step: the data-parallel step, `(state, global batch) -> (state, {name: scalar})` (`parallel.data_parallel`).
    batches: epoch (1-based) -> an iterator of this process's local batches with `get_state`/`set_state` (a grain
      iterator, or any object that behaves alike).
    to_device: local batch -> the dict of arrays the step takes (this process's rows).
    evaluate: None, or state -> {name: float}: the metrics of the current state (e.g. on the validation split).
    best_metric: key of `evaluate`'s result that ranks checkpoints; None keeps no best.
    best_mode: "max" or "min".
    max_to_keep: latest checkpoints kept.
    metrics_log: JSONL file of the train and evaluation metrics; None: none.
    events: the TensorBoard folder of the run; None: `writers.events_folder` beside `metrics_log` (none without it).
    learning_rates: None, or step -> {name: the learning rate at that step} (logged with the step metrics).
    actions: (every, fn(step, state, events)) run every `every` steps and at the last step (e.g. sample grids);
      `events` is the run's `writers.EventLog` (None when it has none).
    describe: {name: float} -> the text shown after an evaluation; None: every metric.
    per_item: (name, count per step) for the progress line's second rate, e.g. ("clips", 32).
    progress_every_s: seconds between progress lines (the first step's line always shows).
    log: where the loop's own lines go.
    record: {config key: value} of what shapes this run (`stages`), written beside its checkpoints when it starts;
      a checkpoint folder recorded with another one stops the run (`stages.StageMismatch`). None: no record.
    read_only: the run belongs to another workdir (a reused stage): it must be finished there; it is restored,
      never trained, saved or logged.
  """
  name: str
  directory: str
  init_state: Callable[[], Any]
  step: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]]
  batches: Callable[[int], Iterator]
  to_device: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
  evaluate: Callable[[Any], Mapping[str, float]] | None = None
  best_metric: str | None = None
  best_mode: str = "max"
  max_to_keep: int = 2
  metrics_log: str | None = None
  events: str | None = None
  learning_rates: Callable[[int], Mapping[str, float]] | None = None
  actions: Sequence[tuple[int, Callable[[int, Any, Any], None]]] = ()
  describe: Callable[[Mapping[str, float]], str] | None = None
  per_item: tuple[str, int] | None = None
  progress_every_s: float = 30.0
  log: Callable[[str], None] = print
  record: Mapping[str, Any] | None = None
  read_only: bool = False


@dataclasses.dataclass
class Result:
  """The end of a run: the final state, the best one (the final one when nothing was ranked), the evaluations."""
  state: Any
  best_state: Any
  step: int
  history: list[dict[str, Any]]
  best_step: int | None

  def best_entry(self) -> dict[str, Any] | None:
    """The history entry of the best step (None when nothing was ranked)."""
    return next((h for h in self.history if h["step"] == self.best_step), None)


class _Window:
  """The step metrics not yet read back, and the sums of those read since the last evaluation."""

  def __init__(self, sums=None, count=0):
    self.pending: list[tuple[int, Any]] = []
    self.sums: dict[str, float] = dict(sums or {})
    self.count = count
    self.last: dict[str, float] = {}

  def add(self, step, metrics):
    self.pending.append((step, metrics))

  def flush(self):
    """Reads the pending metrics back: {name: mean over them}, or {} when none; raises on a non-finite value."""
    if not self.pending:
      return {}
    steps = [s for s, _ in self.pending]
    values = jax.device_get([m for _, m in self.pending])
    self.pending = []
    for step, metrics in zip(steps, values):
      bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
      if bad:
        return {"_bad_step": step, **bad}
    means = {}
    for key in values[0]:
      column = [float(m[key]) for m in values]
      self.sums[key] = self.sums.get(key, 0.0) + sum(column)
      means[key] = sum(column) / len(column)
    self.count += len(values)
    self.last = means
    return means

  def period_means(self):
    """{train_<name>: mean since the last evaluation}; resets the sums."""
    result = {f"train_{k}": v / self.count for k, v in self.sums.items()} if self.count else {}
    self.sums, self.count = {}, 0
    return result


def train(trainer: Trainer, schedule: Schedule, mesh: jax.sharding.Mesh) -> Result:
  """Runs (or resumes, or only restores when finished) one training run; see the module docstring."""
  if schedule.eval_every and trainer.evaluate is None:
    raise ValueError(f"{trainer.name}: eval_every {schedule.eval_every} but no evaluate function")
  if trainer.record is not None or trainer.read_only:
    stages.ensure(stages.Stage(trainer.name, trainer.directory, dict(trainer.record or {}),
                               read_only=trainer.read_only))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = checkpoint.with_sharding(jax.eval_shape(trainer.init_state), replicated)
  if trainer.read_only:
    return _restore_finished(trainer, schedule, abstract)
  ckpt = checkpoint.Checkpointer(trainer.directory, max_to_keep=trainer.max_to_keep,
                                 best_metric=trainer.best_metric, best_mode=trainer.best_mode)
  total = schedule.total_steps
  resumed = ckpt.restore_latest(abstract)
  if resumed is None:
    state, done, extra = parallel.replicate(trainer.init_state(), mesh), 0, {}
  else:
    done, state, extra = resumed
    if done > total:
      ckpt.close()
      _stop_past_the_schedule(trainer, done, total)
    where = ""
    if schedule.steps_per_epoch:
      epoch, into = divmod(done, schedule.steps_per_epoch)
      where = f" (epoch {epoch + 1}, step {into} of {schedule.steps_per_epoch})" if into else f" (after epoch {epoch})"
    trainer.log(f"{trainer.name}: resumed at step {done} of {total}{where}"
                + (", finished" if done >= total or extra.get("stopped_early") else ""))
  history = list(extra.get("history", []))
  bad_evals = int(extra.get("bad_evals", 0))
  best_step = extra.get("best_step")
  window = _Window(**extra.get("window", {}))
  metrics_log = writers.MetricsLog(trainer.metrics_log) if trainer.metrics_log else None
  events_folder = trainer.events or (writers.events_folder(os.path.dirname(trainer.metrics_log), trainer.name)
                                     if trainer.metrics_log else None)
  unfinished = done < total and not extra.get("stopped_early")
  events = (writers.EventLog(events_folder, purge_step=done + 1 if done else None) if events_folder and unfinished
            else None)
  progress = writers.Progress(total, what="steps", per_item=trainer.per_item, start=done,
                              every_s=trainer.progress_every_s)
  iterator, epoch = None, None
  multi = jax.process_count() > 1

  def snapshot(step, position):
    return {"history": history, "bad_evals": bad_evals, "best_step": best_step,
            "window": {"sums": window.sums, "count": window.count}, "stopped_early": stopped_early,
            **({"data": position} if position is not None else {})}

  def read_back(step):
    means = window.flush()
    if "_bad_step" in means:
      bad_step = means.pop("_bad_step")
      runtime.check_finite(means, step=bad_step, what=trainer.name, checkpointer=ckpt)
    if means and metrics_log is not None:
      metrics_log.write(step, **means)
    if means and events is not None:
      events.scalars(step, means, prefix="train/")
      if trainer.learning_rates is not None:
        events.scalars(step, trainer.learning_rates(step), prefix="learning_rate/")
    return means

  try:
    stopped_early = bool(extra.get("stopped_early", False))
    step = done
    for step in range(done + 1, total + 1) if not stopped_early else ():
      epoch_start = schedule.steps_per_epoch is not None and (step - 1) % schedule.steps_per_epoch == 0
      if iterator is None or epoch_start:
        epoch = schedule.epoch_of(step) or 1
        iterator = iter(trainer.batches(epoch))
        if "data" in extra and not epoch_start:  # resumed mid-epoch (or mid-stream): continue where it stopped
          iterator.set_state(extra.pop("data"))
      state, step_metrics = trainer.step(state, parallel.global_batch_from_local(
          trainer.to_device(next(iterator)), mesh))
      window.add(step, step_metrics)
      last = step == total
      epoch_end = schedule.steps_per_epoch is not None and step % schedule.steps_per_epoch == 0
      evaluating = bool(schedule.eval_every) and (step % schedule.eval_every == 0 or last)
      if step % schedule.log_every == 0 or epoch_end or evaluating or last:
        read_back(step)
      progress.update(step, extra=trainer.name + (f" epoch {epoch}" if schedule.steps_per_epoch else "")
                      + ("" if not window.last else " | " + " ".join(f"{k} {v:.4f}" for k, v in window.last.items())))
      scores = None
      if evaluating:
        with runtime.preemption.deferred():  # a SIGTERM meanwhile is handled below, after the save
          scores = dict(trainer.evaluate(state))
        improved = _improves(scores, trainer, ckpt.best_value)
        history.append({"step": step, **({"epoch": epoch} if schedule.steps_per_epoch else {}),
                        **window.period_means(), **scores})
        if metrics_log is not None:
          metrics_log.write(step, **scores)
        if events is not None:
          events.scalars(step, scores, prefix="val/")
          events.flush()
        bad_evals = 0 if improved else bad_evals + 1
        best_step = step if improved else best_step
        text = trainer.describe(scores) if trainer.describe else " ".join(
            f"{k} {v:.4f}" for k, v in scores.items())
        train_loss = history[-1].get("train_loss")
        trainer.log(f"{trainer.name} step {step}" + (f" (epoch {epoch})" if schedule.steps_per_epoch else "")
                    + (f": train loss {train_loss:.4f} |" if train_loss is not None else ":")
                    + f" {text}" + (" *" if improved else ""))
        stopped_early = bool(schedule.patience) and bad_evals >= schedule.patience and not last
      for every, action in trainer.actions:
        if step % every == 0 or last:
          with runtime.preemption.deferred():
            action(step, state, events)
      stop = not last and (not multi or step % schedule.log_every == 0) and runtime.preemption.should_stop()
      if (evaluating or last or stop or stopped_early
          or (schedule.checkpoint_every and step % schedule.checkpoint_every == 0)):
        read_back(step)
        mid_epoch = schedule.steps_per_epoch is None or not epoch_end
        ranked = scores is not None and trainer.best_metric is not None and np.isfinite(scores[trainer.best_metric])
        ckpt.save(step, state, metrics={trainer.best_metric: scores[trainer.best_metric]} if ranked else None,
                  extra=snapshot(step, iterator.get_state() if mid_epoch and not last else None))
      if stopped_early:
        trainer.log(f"{trainer.name}: stopped early at step {step}: {schedule.patience} evaluations without a better "
                    f"{trainer.best_metric}")
        break
      if stop:
        ckpt.close()
        where = f", epoch {epoch}" if schedule.steps_per_epoch else ""
        raise runtime.Preempted(f"{trainer.name} saved at step {step} of {total}{where} in {ckpt.directory}")
    best_state = state
    if trainer.best_metric is not None and ckpt.best_step() is not None:
      best_state = ckpt.restore_best(abstract)
    ckpt.close()
  finally:
    if events is not None:
      events.close()
  return Result(state=state, best_state=best_state, step=max(step, done), history=history, best_step=best_step)


def _stop_past_the_schedule(trainer, done, total):
  """A checkpoint past this run's last step: its best state could come from steps this run does not have."""
  raise stages.StageMismatch(
      f"{trainer.name}: {trainer.directory} holds step {done}, past this run's {total} steps (fewer epochs or "
      "steps than were trained). Fix: use another --workdir, or ask for at least as many steps")


def _restore_finished(trainer, schedule, abstract):
  """The finished run of a read-only trainer, restored without writing anything."""
  ckpt = checkpoint.Checkpointer(trainer.directory, max_to_keep=trainer.max_to_keep, best_metric=trainer.best_metric,
                                 best_mode=trainer.best_mode, read_only=True)
  try:
    resumed = ckpt.restore_latest(abstract)
    if resumed is None:
      raise stages.StageMismatch(f"{trainer.name}: nothing trained in {trainer.directory}")
    done, state, extra = resumed
    if done > schedule.total_steps:
      _stop_past_the_schedule(trainer, done, schedule.total_steps)
    if done < schedule.total_steps and not extra.get("stopped_early"):
      raise stages.StageMismatch(f"{trainer.name} in {trainer.directory} stopped at step {done} of "
                                 f"{schedule.total_steps}; finish it with its own run (same command and --workdir) "
                                 "before reusing it")
    best_state = state
    if trainer.best_metric is not None and ckpt.best_step() is not None:
      best_state = ckpt.restore_best(abstract)
    trainer.log(f"{trainer.name}: reused from {trainer.directory} (step {done}, read only)")
    return Result(state=state, best_state=best_state, step=done, history=list(extra.get("history", [])),
                  best_step=extra.get("best_step"))
  finally:
    ckpt.close()


def _improves(scores, trainer, best_value):
  if trainer.best_metric is None:
    return False
  value = float(scores[trainer.best_metric])
  if not np.isfinite(value):
    return False
  if best_value is None:
    return True
  return value > best_value if trainer.best_mode == "max" else value < best_value
