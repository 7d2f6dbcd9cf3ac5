"""Training Emo18 on raw audio: what it predicts, its splits, its train and predict steps, and base training.

Shared by the FewShot task (the model it personalises), the Generate task (its FID feature extractor: the 256-d
LSTM embedding) and the A-VB task (End2You's end-to-end recipe, one output slice per A-VB task). `train_base` takes
a `BaseSettings` and the train and validation `Split`s.
"""

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import optax
from flax.training import train_state

from exvo_jax import checkpoint
from exvo_jax import loop
from exvo_jax import parallel
from exvo_jax import targets
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.models import emo18


class TrainState(train_state.TrainState):
  batch_stats: Any


# ---------------------------------------------------------------------------------------------------------------
# What is predicted and how it is scored: a `targets.Target`, on Emo18's linear outputs (End2You's recipe puts no
# activation on them), so its loss takes the raw outputs.

def make_target(dataset):
  """The target Emo18 trains on for `dataset`: HUME-VB's 10 intensities or EmoGator's 30 categories."""
  return targets.get("category" if dataset == "emogator" else "emotions")

# A `targets.Joint` serves as well: Emo18's one linear layer then has an output slice per target (one linear head
# each) and the split's labels are the joint target's packed array.


# ---------------------------------------------------------------------------------------------------------------
# Clips of a split: metadata in memory, audio read from the records when a batch needs it.

@dataclasses.dataclass
class Split:
  """One split's records and their metadata (row i describes source[i])."""
  source: Any
  file_id: np.ndarray
  speaker: np.ndarray
  labels: np.ndarray  # target.labels_of: [N, 10] float (NaN unlabelled), [N] int categories, or packed [N, W]
  labelled: np.ndarray  # [N] bool: the row carries the target's labels (target.known)

  @classmethod
  def read(cls, source, target):
    """The split's metadata (no audio decoded when `source` is a built split, see `pipeline.metadata`)."""
    columns = pipeline.metadata(source)
    if len(source) == 0:
      width = getattr(target, "label_width", None)  # a Joint's packed labels have columns even when empty
      return cls(source, np.zeros(0, str), np.zeros(0, str), np.zeros(0) if width is None else
                 np.zeros((0, width), np.float32), np.zeros(0, bool))
    labels = target.labels_of(columns)
    return cls(source, np.asarray(columns["file_id"]).astype(str), np.asarray(columns["speaker"]).astype(str),
               labels, np.asarray(target.known(labels)))

  def batch(self, indices, options, batch_size=None):
    """A collated batch of the clips at `indices` (padded with invalid rows up to `batch_size`)."""
    records = [pipeline.prepare_audio(self.source[int(i)], options) for i in indices]
    return pipeline.collate(records, batch_size=batch_size or len(records), options=options)


def make_train_step(model, target, masked=True):
  """Per-device (pmap-style) step; BatchNorm statistics are summed over the `data` axis inside the model.
  `masked=False` when every training label is known (`targets.Target.loss`)."""

  def train_step(state, batch):
    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["audio"],
                                 batch["length"], train=True, mutable=["batch_stats"])
      return target.loss(out["outputs"], batch["labels"], masked), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    loss = jax.lax.pmean(loss, parallel.DATA_AXIS)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), {"loss": loss}

  return train_step


def make_predict_step(model):
  def predict_step(variables, batch):
    return model.apply(variables, batch["audio"], batch["length"], train=False)
  return predict_step


def device_batch(batch, target):
  """The fields of a collated batch that the train step takes."""
  return {"audio": batch["audio"], "length": batch["length"], "labels": target.labels_of(batch)}


def predict_split(predict_fn, variables, source, options, batch_size):
  """Outputs and embeddings of every clip of `source` (random-access records), in order: ([N, K], [N, H]).

  `batch_size` is global. In a multi-process run every process predicts its own shard and receives all outputs.
  """
  result = parallel.predict_all(
      lambda batch: predict_fn(variables, batch), len(source), predict_fn.mesh, batch_size=batch_size,
      make_batches=lambda shard_index, shard_count, local_batch: pipeline.make_pipeline(
          source, batch_size=local_batch, train=False, audio=options, shard_index=shard_index,
          shard_count=shard_count),
      fields=("audio", "length"), outputs=("outputs", "embedding"))
  return result["outputs"], result["embedding"]


@dataclasses.dataclass(frozen=True)
class BaseSettings:
  """How `train_base` trains: the recipe's Adam learning rate and batch, epochs, and clip lengths.

  Attributes:
    seed: initialisation and shuffling seed (epoch e shuffles with seed * 1000 + e).
    learning_rate: Adam's.
    batch_size: global training batch (divisible by the processes and devices).
    eval_batch_size: global batch of the validation pass (rounded to the devices).
    max_seconds: clips are cut to this many seconds.
    num_epochs: epochs; the one with the best validation score is returned.
    log_every_s: seconds between progress lines.
    log_every: steps between metric read-backs (the NaN check) and metrics-log lines.
  """
  seed: int = 0
  learning_rate: float = 1e-4
  batch_size: int = 8
  eval_batch_size: int = 32
  max_seconds: float = 20.0
  num_epochs: int = 6
  log_every_s: float = 30.0
  log_every: int = 20

  def audio_options(self):
    return pipeline.AudioOptions(max_samples=int(self.max_seconds * schema.SAMPLE_RATE),
                                 pad_multiple=emo18.FRAME_SAMPLES)


def base_record(data_record, settings, model):
  """The configuration that shapes a base model (`stages`): its corpus, recipe, width and seed (not its length: more
  epochs continue it as an uninterrupted longer run would). FewShot's base model and Generate's FID classifier
  record the same keys, so a FewShot run's model can serve as the classifier."""
  return {**data_record, "seed": settings.seed, "hidden": model.hidden, "num_layers": model.num_layers,
          "learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
          "max_seconds": settings.max_seconds}


def base_directory(workdir):
  return os.path.join(workdir, "checkpoints", "base")


def emo18_state_fn(model, settings):
  """sample batch -> a fresh TrainState of Emo18, initialised with `settings.seed`, Adam at its learning rate."""

  def make_state(sample):
    variables = model.init(jax.random.PRNGKey(settings.seed), sample["audio"], sample["length"], train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=optax.adam(settings.learning_rate))

  return make_state


def restore_base(workdir, make_state, options, target, mesh):
  """The best variables ({'params', 'batch_stats'}) of the base model `train_base` trained in `workdir`, replicated
  over `mesh`, read only; `make_state` as `train_base`'s (sample batch -> TrainState)."""
  sample = pipeline.collate([pipeline.prepare_audio({"audio": np.zeros(options.pad_multiple, np.int16)}, options)],
                            batch_size=1, options=options)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = checkpoint.with_sharding(jax.eval_shape(lambda: make_state(sample)), replicated)
  directory = base_directory(workdir)
  with checkpoint.Checkpointer(directory, best_metric=target.metric, best_mode="max", read_only=True) as ckpt:
    state = ckpt.restore_best(abstract)
  if state is None:
    raise FileNotFoundError(f"{directory}: no best checkpoint of the base model; finish the run first (same "
                            "command and --workdir)")
  return {"params": state.params, "batch_stats": state.batch_stats}


def train_base(settings, model, target, train, val, mesh, workdir, log=print, record=None, read_only=False,
               name="base model", describe=None, make_state=None, train_step=None, learning_rates=None):
  """Trains Emo18 on `train`, keeping the epoch with the best validation score; returns (best variables, history,
  predict_fn, the history entry of the best epoch: the one whose variables are returned).

  `train`, `val`: `Split`s. Checkpoints go to `workdir/checkpoints/base` (resumed from there first); the training
  loop (`loop.train`) evaluates on `val` at the end of every epoch and saves mid-epoch with the iterator's position
  when SIGTERM arrives, so a resumed run continues with the very next batch. `record`: the configuration that shapes
  this model (`stages`); `read_only`: `workdir` is another run's, whose finished model is only restored;
  `describe`: scores -> the text logged after an evaluation (default: the target's metric).

  Another raw-audio model plugs in with the same call signature and outputs as Emo18 (`model.apply(variables,
  audio, length, train=...)` -> {"outputs", "embedding"}) and its own `make_state(sample batch) -> TrainState` and
  per-device `train_step` (the fine-tuned speech encoder: `exvo_jax/ssl_trainer.py`), and `learning_rates` (step ->
  {name: rate}, for TensorBoard; default Adam's one rate).
  """
  options = settings.audio_options()
  sample = train.batch([0], options)
  make_state = make_state or emo18_state_fn(model, settings)

  predict_fn = parallel.data_parallel(make_predict_step(model), mesh, donate_argnums=(),
                                      out_specs=jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  eval_batch = max(settings.eval_batch_size // mesh.size, 1) * mesh.size
  processes = jax.process_count()
  if settings.batch_size % processes:
    raise ValueError(f"batch_size {settings.batch_size} is not divisible by the {processes} processes")
  steps_per_epoch = len(train.source) // settings.batch_size

  def evaluate(state):
    outputs, _ = predict_split(predict_fn, {"params": state.params, "batch_stats": state.batch_stats}, val.source,
                               options, eval_batch)
    return target.score(outputs[val.labelled], val.labels[val.labelled])

  masked = not target.all_known(train.labels)
  trainer = loop.Trainer(
      name=name, directory=base_directory(workdir),
      init_state=lambda: make_state(sample),
      step=parallel.data_parallel(train_step or make_train_step(model, target, masked), mesh),
      batches=lambda epoch: pipeline.make_pipeline(
          train.source, batch_size=settings.batch_size // processes, train=True, num_epochs=1,
          seed=settings.seed * 1000 + epoch, audio=options, shard_index=jax.process_index(),
          shard_count=processes),
      to_device=lambda batch: device_batch(batch, target), evaluate=evaluate, best_metric=target.metric,
      metrics_log=None if read_only else os.path.join(workdir, "metrics_log.jsonl"), record=record,
      learning_rates=learning_rates or (lambda _: {"adam": settings.learning_rate}),
      read_only=read_only, describe=describe or (lambda scores: f"val {target.metric} {scores[target.metric]:.4f}"),
      per_item=("clips", settings.batch_size), progress_every_s=settings.log_every_s, log=log)
  schedule = loop.Schedule(total_steps=steps_per_epoch * settings.num_epochs, steps_per_epoch=steps_per_epoch,
                           eval_every=steps_per_epoch, log_every=settings.log_every)
  result = loop.train(trainer, schedule, mesh)
  best = result.best_state
  return {"params": best.params, "batch_stats": best.batch_stats}, result.history, predict_fn, result.best_entry()
