"""The end-to-end model (Emo18 on raw audio): what it predicts, its data, train and predict steps, and base training.

Shared by the FewShot task (the model it personalises) and the Generate task (its FID feature extractor: the 256-d
LSTM embedding). `train_base` takes a settings object with named fields (a ConfigDict slice; see its docstring).
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from exvo_jax import checkpoint
from exvo_jax import metrics
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import writers
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.models import emo18


class TrainState(train_state.TrainState):
  batch_stats: Any



# ---------------------------------------------------------------------------------------------------------------
# What is predicted and how it is scored.

@dataclasses.dataclass(frozen=True)
class Target:
  """The labels a corpus offers: HUME-VB's 10 intensities (regression) or EmoGator's 30 categories."""
  kind: str  # 'regression' or 'classification'
  names: tuple[str, ...]
  label_key: str  # record field: 'emotions' or 'category'
  main_metric: str  # 'mean_ccc' or 'uar'

  @property
  def num_outputs(self):
    return len(self.names)

  def loss(self, outputs, labels):
    if self.kind == "regression":
      return jnp.mean((outputs - labels) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

  def score(self, predictions, labels):
    """Per-dimension CCC and their mean (regression) or UAR (classification) of numpy predictions."""
    if self.kind == "regression":
      per = np.asarray(metrics.ccc(predictions, labels))
      return {**{n: float(v) for n, v in zip(self.names, per)}, "mean_ccc": float(per.mean())}
    return {"uar": float(metrics.uar(np.asarray(predictions).argmax(-1), labels, self.num_outputs))}


def make_target(dataset):
  if dataset == "emogator":
    from exvo_jax.data import emogator as emogator_lib  # category names only
    return Target("classification", emogator_lib.CATEGORIES, "category", "uar")
  return Target("regression", schema.EMOTIONS, "emotions", "mean_ccc")


# ---------------------------------------------------------------------------------------------------------------
# Clips of a split: metadata in memory, audio read from the records when a batch needs it.

@dataclasses.dataclass
class Split:
  """One split's records and their metadata (row i describes source[i])."""
  source: Any
  file_id: np.ndarray
  speaker: np.ndarray
  labels: np.ndarray  # [N, 10] float (NaN unlabelled) or [N] int categories
  labelled: np.ndarray

  @classmethod
  def read(cls, source, target):
    """The split's metadata (no audio decoded when `source` is a built split, see `pipeline.metadata`)."""
    columns = pipeline.metadata(source)
    n = len(source)
    if n == 0:
      return cls(source, np.zeros(0, str), np.zeros(0, str), np.zeros(0), np.zeros(0, bool))
    labelled = columns["labelled"].astype(bool) if "labelled" in columns else np.ones(n, bool)
    return cls(source, np.asarray(columns["file_id"]).astype(str), np.asarray(columns["speaker"]).astype(str),
               np.asarray(columns[target.label_key]), labelled)

  def batch(self, indices, options, batch_size=None):
    """A collated batch of the clips at `indices` (padded with invalid rows up to `batch_size`)."""
    records = [pipeline.prepare_audio(self.source[int(i)], options) for i in indices]
    return pipeline.collate(records, batch_size=batch_size or len(records), options=options)


def make_train_step(model, target):
  """Per-device (pmap-style) step; BatchNorm statistics are summed over the `data` axis inside the model."""

  def train_step(state, batch):
    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["audio"],
                                 batch["length"], train=True, mutable=["batch_stats"])
      return target.loss(out["outputs"], batch["labels"]), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    loss = jax.lax.pmean(loss, parallel.DATA_AXIS)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), {"loss": loss}

  return train_step


def make_predict_step(model):
  def predict_step(variables, batch):
    return model.apply(variables, batch["audio"], batch["length"], train=False)
  return predict_step


def labels(batch, target):
  return batch[target.label_key]


def device_batch(batch, target):
  return {"audio": batch["audio"], "length": batch["length"], "labels": labels(batch, target)}


def predict_split(predict_fn, variables, split, options, batch_size):
  """Outputs and embeddings of every clip of a split, in source order: ([N, K], [N, H]).

  `batch_size` is global. In a multi-process run every process predicts its own shard and receives all outputs.
  """
  result = parallel.predict_all(
      lambda batch: predict_fn(variables, batch), len(split.source), predict_fn.mesh, batch_size=batch_size,
      make_batches=lambda shard_index, shard_count, local_batch: pipeline.make_pipeline(
          split.source, batch_size=local_batch, train=False, audio=options, shard_index=shard_index,
          shard_count=shard_count),
      fields=("audio", "length"), outputs=("outputs", "embedding"))
  return result["outputs"], result["embedding"]


def train_base(config, model, target, splits, mesh, workdir, log=print):
  """Trains Emo18, keeping the epoch with the best validation score; returns (best variables, history, predict_fn).

  `config` fields read: seed, learning_rate, batch_size, eval_batch_size, max_seconds, num_epochs, log_every_s,
  val_split. `splits` maps 'train' and `config.val_split` to `Split`s; checkpoints go to
  `workdir/checkpoints/base` (resumed from there first).

  Checkpoints at the end of every epoch (step = epoch * steps_per_epoch), and mid-epoch with the data iterator's
  position when SIGTERM arrives, so a resumed run continues with the very next batch.
  """
  options = pipeline.AudioOptions(max_samples=int(config.max_seconds * schema.SAMPLE_RATE),
                                  pad_multiple=emo18.FRAME_SAMPLES)
  train, val = splits["train"], splits[config.val_split]
  sample = train.batch([0], options)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def make_state():
    variables = model.init(jax.random.PRNGKey(config.seed), sample["audio"], sample["length"], train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=optax.adam(config.learning_rate))

  abstract = jax.eval_shape(make_state)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "base"), best_metric=target.main_metric)
  resumed = ckpt.restore_latest(checkpoint.with_sharding(abstract, replicated))
  if resumed is None:
    state, extra = parallel.replicate(make_state(), mesh), {"epoch": 0, "history": []}
  else:
    _, state, extra = resumed
    where = extra.get("position")
    log(f"base model: resumed after epoch {extra['epoch']}"
        + (f", step {where['step']} of epoch {where['epoch']}" if where else ""))
  step = parallel.data_parallel(make_train_step(model, target), mesh)
  predict_fn = parallel.data_parallel(make_predict_step(model), mesh, donate_argnums=(),
                                      out_specs=jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  processes = jax.process_count()
  if config.batch_size % processes:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {processes} processes")
  steps_per_epoch = len(train.source) // config.batch_size
  metrics_log = writers.MetricsLog(os.path.join(workdir, "metrics_log.jsonl"))
  total_steps = steps_per_epoch * config.num_epochs
  already = extra["epoch"] * steps_per_epoch + (extra.get("position") or {}).get("step", 0)
  progress = writers.Progress(total_steps, what="steps", per_item=("clips", config.batch_size),
                              every_s=config.log_every_s, start=already)
  while extra["epoch"] < config.num_epochs:
    epoch = extra["epoch"] + 1
    batches = iter(pipeline.make_pipeline(train.source, batch_size=config.batch_size // processes, train=True,
                                          num_epochs=1, seed=config.seed * 1000 + epoch, audio=options,
                                          shard_index=jax.process_index(), shard_count=processes))
    position = extra.pop("position", None)
    first, losses = 1, []
    if position is not None:  # resume mid-epoch: the same iterator, at the batch after the last one trained
      batches.set_state(position["data"])
      first, losses = position["step"] + 1, list(position["losses"])
    for i, batch in enumerate(batches, start=first):
      global_step = (epoch - 1) * steps_per_epoch + i
      state, step_metrics = step(state, parallel.global_batch_from_local(device_batch(batch, target), mesh))
      loss = float(step_metrics["loss"])
      runtime.check_finite({"loss": loss}, step=global_step, what=f"base model epoch {epoch}",
                           checkpointer=ckpt)
      losses.append(loss)
      if i % 20 == 0 or i == steps_per_epoch:
        metrics_log.write(global_step, train_loss=loss)
      progress.update(global_step, extra=f"epoch {epoch}")
      if i < steps_per_epoch and runtime.preemption.should_stop():
        ckpt.save(global_step, state, extra={**extra, "position": {
            "epoch": epoch, "step": i, "data": batches.get_state(), "losses": losses}})
        ckpt.close()
        raise runtime.Preempted(f"base model saved at epoch {epoch}, step {i} of {steps_per_epoch}, in "
                                f"{ckpt.directory}")
    outputs, _ = predict_split(predict_fn, {"params": state.params, "batch_stats": state.batch_stats}, val,
                               options, eval_batch)
    labelled = val.labelled
    val_scores = target.score(outputs[labelled], val.labels[labelled])
    extra = {"epoch": epoch, "history": extra["history"] + [
        {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, **val_scores}]}
    ckpt.save(epoch * steps_per_epoch, state, metrics={target.main_metric: val_scores[target.main_metric]},
              extra=extra)
    metrics_log.write(epoch * steps_per_epoch, **{f"val_{k}": v for k, v in val_scores.items()})
    log(f"epoch {epoch}: train loss {extra['history'][-1]['train_loss']:.4f} | val {target.main_metric} "
        f"{val_scores[target.main_metric]:.4f}")
    if epoch < config.num_epochs and runtime.preemption.should_stop():
      ckpt.close()
      raise runtime.Preempted(f"base model saved after epoch {epoch} in {ckpt.directory}")
  best = ckpt.restore_best(checkpoint.with_sharding(abstract, replicated))
  ckpt.close()
  return {"params": best.params, "batch_stats": best.batch_stats}, extra["history"], predict_fn


