"""Task `fewshot` (ExVo-FewShot): the raw-waveform CNN-LSTM and per-speaker personalisation from 2 labelled clips.

1. Train Emo18 on the Train split (MSE on the 10 emotions, Adam 1e-4, batch 8, clips cut at 20 s), keeping the
   epoch with the best validation mean CCC.
2. Optionally meta-train it (`maml` / `fomaml`): episodes of one training speaker with 2 support and Q query clips,
   k inner steps on a parameter subset, the outer loss on the query clips.
3. Evaluate on Val with 2 support clips per speaker (chosen by a fixed seed) and every other clip of that speaker
   as a query: per-emotion CCC and mean CCC over the query clips, for the chosen adaptation and for `none` on the
   very same clips.
4. Predict the Test clips (support = the release's labelled Test clips) and write the ExVo-Few submission.

Adaptations (`config.adaptation`, '+' combines speaker_norm with finetune):
  none          the trained model as it is
  finetune      per speaker, k gradient steps on the support clips (default subset: LSTM + head), restarting from
                the trained model for every speaker (the reference code never reset it: a defect not copied)
  maml, fomaml  meta-trained initialisation, then the same inner loop as finetune
  speaker_norm  the LSTM embedding z-normalised with the speaker's own mean and std over ALL of that speaker's clips
                (support and query audio, no labels), and a linear read-out refit on training embeddings normalised
                the same way per training speaker
"""

import csv
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from exvo_jax import adaptation
from exvo_jax import checkpoint
from exvo_jax import metrics
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.models import emo18

SPLITS = {"hume_vb": ("train", "validation", "test"), "emogator": ("train", "val")}


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
    file_ids, speakers, labels, labelled = [], [], [], []
    for i in range(len(source)):
      record = source[i]
      file_ids.append(pipeline.as_str(record["file_id"]))
      speakers.append(pipeline.as_str(record["speaker"]))
      labels.append(record[target.label_key])
      labelled.append(bool(record.get("labelled", True)))
    return cls(source, np.array(file_ids), np.array(speakers), np.array(labels), np.array(labelled, bool))

  def batch(self, indices, options, batch_size=None):
    """A collated batch of the clips at `indices` (padded with invalid rows up to `batch_size`)."""
    records = [pipeline.prepare_audio(self.source[int(i)], options) for i in indices]
    return pipeline.collate(records, batch_size=batch_size or len(records), options=options)


def support_query(split, *, num_support, seed):
  """{speaker: (support indices, query indices)}.

  A split with labelled and unlabelled clips (Test) uses its labelled clips as support; a fully labelled split
  (Val) draws `num_support` clips per speaker with `seed`. Queries are all other clips of the speaker.
  """
  rng = np.random.default_rng(seed)
  fully_labelled = bool(split.labelled.all())
  result = {}
  for speaker in sorted(set(split.speaker)):
    rows = np.flatnonzero(split.speaker == speaker)
    if fully_labelled:
      support = np.sort(rng.choice(rows, size=min(num_support, len(rows) - 1), replace=False))
    else:
      support = rows[split.labelled[rows]]
    query = np.setdiff1d(rows, support)
    if len(support) and len(query):
      result[speaker] = (support, query)
  return result


# ---------------------------------------------------------------------------------------------------------------
# Steps.

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


def clip_loss_fn(model, target, batch_stats):
  """(params, batch) -> loss with frozen BatchNorm statistics: the loss every adaptation step minimises."""
  def loss_fn(params, batch):
    out = model.apply({"params": params, "batch_stats": batch_stats}, batch["audio"], batch["length"], train=False)
    return target.loss(out["outputs"], batch["labels"])
  return loss_fn


def make_meta_step(model, target, batch_stats, mask, maml, num_support, first_order):
  """Per-device MAML step over a batch of episodes [E_local, S + Q, ...]; the outer gradient is pmean'ed."""
  loss_fn = clip_loss_fn(model, target, batch_stats)

  def episode_loss(params, episode):
    support = jax.tree.map(lambda x: x[:num_support], episode)
    query = jax.tree.map(lambda x: x[num_support:], episode)
    adapted = adaptation.inner_loop(loss_fn, params, support, steps=maml.inner_steps,
                                    learning_rate=maml.inner_learning_rate, mask=mask,
                                    anchor_weight=maml.anchor_weight, first_order=first_order)
    return loss_fn(adapted, query)

  def meta_step(state, episodes):
    def outer(params):
      return jnp.mean(jax.vmap(episode_loss, in_axes=(None, 0))(params, episodes))
    loss, grads = jax.value_and_grad(outer)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    return state.apply_gradients(grads=grads), {"loss": jax.lax.pmean(loss, parallel.DATA_AXIS)}

  return meta_step


# ---------------------------------------------------------------------------------------------------------------
# Training.

def _labels(batch, target):
  return batch[target.label_key]


def _device_batch(batch, target):
  return {"audio": batch["audio"], "length": batch["length"], "labels": _labels(batch, target)}


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
  """Trains Emo18, keeping the epoch with the best validation score; returns (best variables, history).

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
  progress = writers.Progress(total_steps, what="steps", per_item=("clips", config.batch_size),
                              every_s=config.log_every_s)
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
      state, step_metrics = step(state, parallel.global_batch_from_local(_device_batch(batch, target), mesh))
      loss = float(step_metrics["loss"])
      runtime.check_finite({"loss": loss}, step=global_step, what=f"base model epoch {epoch}",
                           checkpoint_dir=ckpt.directory, last_good_step=ckpt.latest_step())
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


def sample_episodes(split, rng, *, num_episodes, num_support, num_query):
  """Index arrays [E, S + Q] of episodes: each row one training speaker's support then query clips."""
  rows_of = {s: np.flatnonzero((split.speaker == s) & split.labelled) for s in set(split.speaker)}
  eligible = sorted(s for s, rows in rows_of.items() if len(rows) >= num_support + num_query)
  if not eligible:
    raise ValueError(f"no training speaker has {num_support + num_query} labelled clips for a MAML episode; "
                     "lower config.maml.num_query")
  speakers = rng.choice(eligible, size=num_episodes, replace=len(eligible) < num_episodes)
  return np.stack([rng.choice(rows_of[s], size=num_support + num_query, replace=False) for s in speakers])


def meta_train(config, model, target, variables, splits, mesh, workdir, *, first_order, log=print):
  """MAML (or first-order MAML) from the trained model; returns the meta-learned variables."""
  maml = config.maml
  train = splits["train"]
  options = pipeline.AudioOptions(clip_samples=int(maml.clip_seconds * schema.SAMPLE_RATE), random_crop=True)
  mask = adaptation.subset_mask(variables["params"], tuple(config.adapt_subset))
  meta_step = parallel.data_parallel(
      make_meta_step(model, target, variables["batch_stats"], mask, maml, config.num_support, first_order), mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def make_state():
    # A copy: the meta step donates its state, and the trained model's buffers are still needed afterwards.
    own = jax.tree.map(jnp.copy, variables)
    return TrainState.create(apply_fn=model.apply, params=own["params"], batch_stats=own["batch_stats"],
                             tx=optax.adam(maml.outer_learning_rate))

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "maml"), max_to_keep=1)
  abstract = jax.eval_shape(make_state)
  resumed = ckpt.restore_latest(checkpoint.with_sharding(abstract, replicated))
  state, done = (parallel.replicate(make_state(), mesh), 0) if resumed is None else (resumed[1], resumed[0])
  episodes_per_step = max(maml.episodes_per_step // mesh.size, 1) * mesh.size
  progress = writers.Progress(maml.meta_steps, what="meta-steps", per_item=("episodes", episodes_per_step),
                              every_s=config.log_every_s)
  rng = np.random.default_rng([config.seed, 7])
  for _ in range(done):  # the same episode sequence after a resume
    sample_episodes(train, rng, num_episodes=episodes_per_step, num_support=config.num_support,
                    num_query=maml.num_query)
  per_episode = config.num_support + maml.num_query
  for i in range(done + 1, maml.meta_steps + 1):
    episodes = sample_episodes(train, rng, num_episodes=episodes_per_step, num_support=config.num_support,
                               num_query=maml.num_query)
    batch = train.batch(episodes.reshape(-1), options)
    batch = jax.tree.map(lambda x: x.reshape(episodes_per_step, per_episode, *x.shape[1:]),
                         _device_batch(batch, target))
    state, step_metrics = meta_step(state, parallel.shard_batch(batch, mesh))
    progress.update(i, extra=f"outer loss {float(step_metrics['loss']):.4f}")
    if i % maml.checkpoint_every == 0 or i == maml.meta_steps:
      ckpt.save(i, state)
  ckpt.close()
  if done >= maml.meta_steps:
    log(f"meta-training: resumed after {done} meta-steps (done)")
  return {"params": state.params, "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------------------------------
# Personalised evaluation.

def _options(config):
  return pipeline.AudioOptions(max_samples=int(config.max_seconds * schema.SAMPLE_RATE),
                               pad_multiple=config.eval_pad_seconds * schema.SAMPLE_RATE)


def _chunks(indices, size):
  return [indices[i:i + size] for i in range(0, len(indices), size)]


def personalise(config, model, target, variables, mode, split, outputs, embeddings, episodes, read_out=None):
  """Predictions for every query clip of `split` under `mode`; returns {index: prediction}.

  Args:
    variables: the model's variables (for maml/fomaml: the meta-learned ones).
    mode: 'none', 'finetune', 'maml', 'fomaml', 'speaker_norm' or 'speaker_norm+finetune'.
    outputs, embeddings: the model's outputs and embeddings of every clip of the split (no adaptation).
    episodes: {speaker: (support, query)} from `support_query`.
    read_out: for speaker_norm, the linear read-out fitted on normalised training embeddings.
  """
  modes = set(mode.split("+"))
  predictions = {}
  if modes == {"none"}:
    for _, query in episodes.values():
      predictions.update(zip(query.tolist(), outputs[query]))
    return predictions
  if "speaker_norm" in modes:
    steps = config.finetune.steps if "finetune" in modes else 0
    head_mask = {"kernel": True, "bias": True}

    def head_loss(head, batch):
      return target.loss(batch["x"] @ head["kernel"] + head["bias"], batch["labels"])

    adapt_head = jax.jit(lambda head, batch: adaptation.inner_loop(
        head_loss, head, batch, steps=steps, learning_rate=config.finetune.learning_rate, mask=head_mask,
        anchor_weight=config.finetune.anchor_weight))
    for speaker, (support, query) in episodes.items():
      rows = np.concatenate([support, query])  # all of the speaker's clips; their labels are not used
      normalised = adaptation.speaker_normalise(embeddings[rows], split.speaker[rows])
      head = read_out
      if steps:
        head = adapt_head(read_out, {"x": normalised[:len(support)], "labels": split.labels[support]})
      out = normalised[len(support):] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
      predictions.update(zip(query.tolist(), out))
    return predictions
  # finetune, maml, fomaml: the same inner loop, restarted from `variables` for every speaker.
  settings = config.finetune if mode == "finetune" else config.maml
  steps = settings.steps if mode == "finetune" else config.maml.inner_steps
  learning_rate = settings.learning_rate if mode == "finetune" else config.maml.inner_learning_rate
  mask = adaptation.subset_mask(variables["params"], tuple(config.adapt_subset))
  loss_fn = clip_loss_fn(model, target, variables["batch_stats"])
  adapt = jax.jit(lambda params, support: adaptation.inner_loop(
      loss_fn, params, support, steps=steps, learning_rate=learning_rate, mask=mask,
      anchor_weight=settings.anchor_weight))
  predict = jax.jit(lambda params, batch: model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                                      batch["audio"], batch["length"], train=False)["outputs"])
  options = _options(config)
  for speaker, (support, query) in episodes.items():
    support_batch = split.batch(support, options)
    adapted = adapt(variables["params"], {"audio": support_batch["audio"], "length": support_batch["length"],
                                          "labels": split.labels[support]})
    for chunk in _chunks(query, config.adapt_query_batch):
      batch = split.batch(chunk, options, batch_size=config.adapt_query_batch)
      out = np.asarray(predict(adapted, {"audio": batch["audio"], "length": batch["length"]}))
      predictions.update(zip(chunk.tolist(), out[:len(chunk)]))
  return predictions


def fit_read_out(target, splits, embeddings_train, l2):
  """The linear read-out of speaker_norm, fitted on training embeddings normalised per training speaker."""
  train = splits["train"]
  rows = train.labelled
  normalised = adaptation.speaker_normalise(embeddings_train[rows], train.speaker[rows])
  return adaptation.fit_linear_head(normalised, train.labels[rows], kind=target.kind, l2=l2,
                                    num_classes=target.num_outputs)


# ---------------------------------------------------------------------------------------------------------------
# Outputs.

def format_table(target, results):
  """Table-4-style rows: one per adaptation, one column per emotion (or UAR), on the same query clips."""
  columns = (*target.names, "mean_ccc") if target.kind == "regression" else ("uar",)
  short = [c[:5] if c != "mean_ccc" else "Mean" for c in columns] if target.kind == "regression" else ["UAR"]
  lines = ["| adaptation | " + " | ".join(short) + " |", "|---|" + "---|" * len(columns)]
  for mode, scores in results.items():
    lines.append(f"| {mode} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")
  return "\n".join(lines)


def write_submission(path, split, predictions):
  """ExVo-Few CSV: File_ID (as in data_info.csv) and the ten emotions, for every Test query clip."""
  if not writers.is_writer():
    return
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["File_ID", *schema.EMOTIONS])
    for index in sorted(predictions):
      writer.writerow([split.file_id[index], *(f"{v:.6f}" for v in predictions[index])])


def run(config, workdir):
  data = config.data
  root = corpus.locate(data.root, dataset=data.dataset, demo_size=data.demo_size, demo_seed=data.demo_seed)
  builder, _ = builders.prepare(data.dataset, root, config="audio" if data.dataset == "hume_vb" else None,
                                data_dir=data.tfds_dir or None, strict=data.strict)
  target = make_target(data.dataset)
  splits = {s: Split.read(builders.data_source(builder, s), target) for s in SPLITS[data.dataset]}
  mesh = parallel.make_mesh(config.num_devices or None)
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.batch_size to a multiple of the device count")
  model = emo18.Emo18(num_outputs=target.num_outputs, hidden=config.hidden, num_layers=config.num_layers,
                      bn_axis_name=parallel.DATA_AXIS)
  print(f"fewshot on {data.dataset}: " + ", ".join(f"{s} {len(v.source)} clips / {len(set(v.speaker))} speakers"
                                                   for s, v in splits.items())
        + f"; Emo18 hidden {config.hidden}; adaptation {config.adaptation}; {mesh.size} device(s)")
  start = time.monotonic()
  variables, history, predict_fn = train_base(config, model, target, splits, mesh, workdir)
  modes = set(config.adaptation.split("+"))
  unknown = modes - {"none", "finetune", "maml", "fomaml", "speaker_norm"}
  if unknown or (len(modes) > 1 and "speaker_norm" not in modes) or ({"maml", "fomaml"} & modes and len(modes) > 1):
    raise ValueError(f"adaptation {config.adaptation!r}: use none, finetune, maml, fomaml, speaker_norm or "
                     "speaker_norm+finetune")
  adapted_variables = variables
  if modes & {"maml", "fomaml"}:
    adapted_variables = meta_train(config, model, target, variables, splits, mesh, workdir,
                                   first_order="fomaml" in modes)

  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  options = _options(config)
  results, outputs_of = {}, {}
  read_out = None
  for name in [s for s in SPLITS[data.dataset] if s != "train"]:
    split = splits[name]
    outputs_of[name] = {}
    for key, v in (("none", variables), ("adapted", adapted_variables)):
      if key == "adapted" and v is variables:
        outputs_of[name][key] = outputs_of[name]["none"]
      else:
        outputs_of[name][key] = predict_split(predict_fn, parallel.replicate(v, mesh), split, options, eval_batch)
  if "speaker_norm" in modes:
    _, train_embeddings = predict_split(predict_fn, parallel.replicate(variables, mesh), splits["train"], options,
                                        eval_batch)
    read_out = fit_read_out(target, splits, train_embeddings, config.read_out_l2)

  val = splits[config.val_split]
  val_episodes = support_query(val, num_support=config.num_support, seed=config.support_seed)
  query = np.concatenate([q for _, q in val_episodes.values()])
  for mode in dict.fromkeys(["none", config.adaptation]):
    outs, embs = outputs_of[config.val_split]["adapted" if mode == config.adaptation else "none"]
    predictions = personalise(config, model, target, adapted_variables if mode != "none" else variables, mode, val,
                              outs, embs, val_episodes, read_out)
    results[mode] = target.score(np.stack([predictions[i] for i in query]), val.labels[query])
  table = format_table(target, results)
  print(f"{config.val_split}: {len(query)} query clips of {len(val_episodes)} speakers "
        f"({config.num_support} support clips each, seed {config.support_seed})")
  print(table)

  submission = None
  if "test" in splits:
    test = splits["test"]
    test_episodes = support_query(test, num_support=config.num_support, seed=config.support_seed)
    outs, embs = outputs_of["test"]["adapted"]
    predictions = personalise(config, model, target, adapted_variables, config.adaptation, test, outs, embs,
                              test_episodes, read_out)
    submission = os.path.join(workdir, f"ExVo-Few_{config.team}_{config.submission_number}.csv")
    write_submission(submission, test, predictions)
  result = {
      "dataset": data.dataset, "hidden": config.hidden, "adaptation": config.adaptation,
      "main_metric": target.main_metric, "split": config.val_split, "num_query_clips": int(len(query)),
      "num_speakers": len(val_episodes), "results": results,
      "base": {"history": history}, "submission": os.path.basename(submission) if submission else None,
      "seconds": time.monotonic() - start,
  }
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  return result
