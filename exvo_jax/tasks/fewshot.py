"""Task `fewshot` (ExVo-FewShot): the raw-waveform CNN-LSTM and per-speaker personalisation from 2 labelled clips.

`model=ssl` puts a speech encoder in Emo18's place (exvo_jax/ssl_trainer.py: fine-tuned end to end, or with
`ssl.freeze=encoder` its frozen hidden states under a trained attention pooling and head); every adaptation below
works on it the same way, on its pooled embedding and its parameter subset (`adapt_subset`, e.g. pooling + head).

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

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from exvo_jax import adaptation
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import loop
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import ssl_trainer
from exvo_jax import stages
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.models import emo18

SPLITS = {"hume_vb": ("train", "validation", "test"), "emogator": ("train", "val")}
MODELS = ("emo18", "ssl")


def rows_by_speaker(speakers, keep=None):
  """{speaker: ascending row indices} of a [N] speaker array (rows where `keep` is True), in O(N log N): a full-size
  split has about 570 speakers, and comparing every row with every speaker costs seconds each call."""
  rows = np.arange(len(speakers)) if keep is None else np.flatnonzero(keep)
  names, owner = np.unique(np.asarray(speakers)[rows], return_inverse=True)
  order = np.argsort(owner, kind="stable")
  bounds = np.searchsorted(owner[order], np.arange(len(names) + 1))
  return {name: rows[order[bounds[k]:bounds[k + 1]]] for k, name in enumerate(names.tolist())}


def support_query(split, *, num_support, seed):
  """{speaker: (support indices, query indices)}.

  A split with labelled and unlabelled clips (Test) uses its labelled clips as support; a fully labelled split
  (Val) draws `num_support` clips per speaker with `seed`. Queries are all other clips of the speaker.
  """
  rng = np.random.default_rng(seed)
  fully_labelled = bool(split.labelled.all())
  result = {}
  for speaker, rows in sorted(rows_by_speaker(split.speaker).items()):
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

def clip_loss_fn(model, target, batch_stats):
  """(params, batch) -> loss with frozen BatchNorm statistics: the loss every adaptation step minimises. Its clips
  are labelled ones (support, query, episodes), so the loss is the unmasked mean."""
  def loss_fn(params, batch):
    out = model.apply({"params": params, "batch_stats": batch_stats}, batch["audio"], batch["length"], train=False)
    return target.loss(out["outputs"], batch["labels"], masked=False)
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

def sample_episodes(split, rng, *, num_episodes, num_support, num_query):
  """Index arrays [E, S + Q] of episodes: each row one training speaker's support then query clips."""
  rows_of = rows_by_speaker(split.speaker, split.labelled)
  eligible = sorted(s for s, rows in rows_of.items() if len(rows) >= num_support + num_query)
  if not eligible:
    raise ValueError(f"no training speaker has {num_support + num_query} labelled clips for a MAML episode; "
                     "lower config.maml.num_query")
  speakers = rng.choice(eligible, size=num_episodes, replace=len(eligible) < num_episodes)
  return np.stack([rng.choice(rows_of[s], size=num_support + num_query, replace=False) for s in speakers])


class EpisodeBatches:
  """This process's rows of every meta-step's global batch of episodes: {audio, length, labels} [E_local, S + Q,
  ...].

  Every process draws the same global episodes from one seeded generator and reads only the clips of its own
  rows (process p: rows [p * E_local, (p + 1) * E_local)), so the global batch does not depend on the number of
  processes. The position is the number of draws; `set_state` replays them (index draws only, no audio).
  """

  def __init__(self, split, target, *, seed, num_episodes, num_support, num_query, options):
    self.split, self.target, self.options = split, target, options
    self.num_episodes, self.num_support, self.num_query = num_episodes, num_support, num_query
    self.seed = seed
    self.rng, self.draws = np.random.default_rng(seed), 0
    processes = jax.process_count()
    self.local = num_episodes // processes
    self.first = jax.process_index() * self.local

  def _draw(self):
    self.draws += 1
    return sample_episodes(self.split, self.rng, num_episodes=self.num_episodes, num_support=self.num_support,
                           num_query=self.num_query)

  def __iter__(self):
    return self

  def __next__(self):
    episodes = self._draw()[self.first:self.first + self.local]
    batch = emo18_trainer.device_batch(self.split.batch(episodes.reshape(-1), self.options), self.target)
    return jax.tree.map(lambda x: x.reshape(*episodes.shape, *x.shape[1:]), batch)

  def get_state(self):
    return {"draws": self.draws}

  def set_state(self, state):
    self.rng, self.draws = np.random.default_rng(self.seed), 0
    for _ in range(state["draws"]):
      self._draw()


def meta_train(config, model, target, variables, train, mesh, workdir, *, first_order, log=print):
  """MAML (or first-order MAML) from the trained model on the `train` Split; returns the meta-learned variables.

  Checkpoints go to `checkpoints/maml` or `checkpoints/fomaml`: the two never resume each other's.
  """
  mode = "fomaml" if first_order else "maml"
  maml = config.maml
  options = pipeline.AudioOptions(clip_samples=int(maml.clip_seconds * schema.SAMPLE_RATE), random_crop=True)
  mask = adaptation.subset_mask(variables["params"], tuple(config.adapt_subset))

  def make_state():
    # A copy: the meta step donates its state, and the trained model's buffers are still needed afterwards.
    own = jax.tree.map(jnp.copy, variables)
    return emo18_trainer.TrainState.create(apply_fn=model.apply, params=own["params"],
                                           batch_stats=own["batch_stats"], tx=optax.adam(maml.outer_learning_rate))

  episodes_per_step = max(maml.episodes_per_step // mesh.size, 1) * mesh.size
  if episodes_per_step % jax.process_count():
    raise ValueError(f"{episodes_per_step} episodes per meta-step are not divisible by the {jax.process_count()} "
                     "processes")
  trainer = loop.Trainer(
      name=f"meta-training ({mode})", directory=meta_directory(workdir, mode), init_state=make_state,
      record=meta_record(config, mode),
      step=parallel.data_parallel(make_meta_step(model, target, variables["batch_stats"], mask, maml,
                                                 config.num_support, first_order), mesh),
      batches=lambda _: EpisodeBatches(train, target, seed=[config.seed, 7], num_episodes=episodes_per_step,
                                       num_support=config.num_support, num_query=maml.num_query, options=options),
      to_device=lambda batch: batch, max_to_keep=1, per_item=("episodes", episodes_per_step),
      progress_every_s=config.log_every_s, log=log)
  schedule = loop.Schedule(total_steps=maml.meta_steps, checkpoint_every=maml.checkpoint_every,
                           log_every=maml.log_every)
  state = loop.train(trainer, schedule, mesh).state
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
      return target.loss(batch["x"] @ head["kernel"] + head["bias"], batch["labels"], masked=False)

    adapt_head = jax.jit(lambda head, batch: adaptation.inner_loop(
        head_loss, head, batch, steps=steps, learning_rate=config.finetune.learning_rate, mask=head_mask,
        anchor_weight=config.finetune.anchor_weight))
    for speaker, (support, query) in episodes.items():
      runtime.preemption.check(f"{mode} adaptation stopped at speaker {speaker} (the rerun adapts again)")
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
    runtime.preemption.check(f"{mode} adaptation stopped at speaker {speaker} (the rerun adapts again)")
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
  writers.write_csv(path, ["File_ID", *schema.EMOTIONS], ([split.file_id[index], *(f"{v:.6f}" for v in
                                                                                   predictions[index])]
                                                         for index in sorted(predictions)))


ADAPTATIONS = ("none", "finetune", "maml", "fomaml", "speaker_norm", "speaker_norm+finetune")

# ---------------------------------------------------------------------------------------------------------------
# Checkpointed stages and what shapes them.

def base_settings(config):
  return emo18_trainer.BaseSettings(
      seed=config.seed, learning_rate=config.learning_rate, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, max_seconds=config.max_seconds, num_epochs=config.num_epochs,
      log_every_s=config.log_every_s)


def make_model(config, target):
  if config.model == "ssl":
    return ssl_trainer.make_model(config, mlp_trainer.encoder_config(config), target)
  return emo18.Emo18(num_outputs=target.num_outputs, hidden=config.hidden, num_layers=config.num_layers,
                     bn_axis_name=parallel.DATA_AXIS)


def base_record(config):
  """The configuration that shapes the base model."""
  if config.model == "ssl":
    return ssl_trainer.record(config)
  target = emo18_trainer.make_target(config.data.dataset)
  return emo18_trainer.base_record(stages.data_record(config), base_settings(config), make_model(config, target))


def meta_record(config, mode):
  """The configuration that shapes meta-training (`mode` maml or fomaml): the base model's and its own."""
  return {**base_record(config), "meta": mode,
          **stages.pick(config, ("maml", "adapt_subset", "num_support"),
                        exclude=("maml.checkpoint_every", "maml.log_every", "maml.meta_steps"))}


def meta_directory(workdir, mode):
  return os.path.join(workdir, "checkpoints", mode)


def checkpointed_stages(config, workdir):
  """The stages this run trains (or resumes): the base model, and meta-training for maml / fomaml."""
  result = [stages.Stage("base model", emo18_trainer.base_directory(workdir), base_record(config))]
  for mode in sorted(set(config.adaptation.split("+")) & {"maml", "fomaml"}):
    result.append(stages.Stage(f"meta-training ({mode})", meta_directory(workdir, mode), meta_record(config, mode)))
  return result


def check_config(config):
  """Fails before any work on a value outside its choices."""
  config_check.choice(config, "adaptation", ADAPTATIONS)
  config_check.choice(config, "val_split", SPLITS[config.data.dataset][1:2])
  config_check.choice(config, "model", MODELS)
  target = emo18_trainer.make_target(config.data.dataset)
  if config.model == "ssl":
    ssl_trainer.check_config(config, target)
  if config.adaptation in ("finetune", "maml", "fomaml"):  # they adapt the parameters named by adapt_subset
    model = make_model(config, target)
    audio = jax.ShapeDtypeStruct((1, schema.SAMPLE_RATE), jnp.float32)
    length = jax.ShapeDtypeStruct((1,), jnp.int32)
    names = sorted(jax.eval_shape(lambda a, n: model.init(jax.random.key(0), a, n, train=False), audio,
                                  length)["params"])
    unmatched = [p for p in config.adapt_subset if not any(n.startswith(p) for n in names)]
    if unmatched or not config.adapt_subset:
      raise config_check.ConfigError(
          f"--config.adapt_subset={tuple(config.adapt_subset)!r}: {', '.join(map(repr, unmatched)) or 'nothing'} "
          f"names no parameter of the {config.model} model; its top-level parameters are {', '.join(names)} "
          f"(e.g. {'pooling,head' if config.model == 'ssl' else 'lstm,head'})")


def run(config, workdir):
  data = config.data
  root = corpus.of_config(data)
  builder, _ = builders.prepare(data.dataset, root, config="audio" if data.dataset == "hume_vb" else None,
                                data_dir=data.tfds_dir or None, strict=data.strict)
  target = emo18_trainer.make_target(data.dataset)
  splits = {s: emo18_trainer.Split.read(builders.data_source(builder, s), target) for s in SPLITS[data.dataset]}
  mesh = parallel.make_mesh(config.num_devices or None)
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.batch_size to a multiple of the device count")
  model = make_model(config, target)
  what = (f"Emo18 hidden {config.hidden}" if config.model == "emo18"
          else f"speech encoder (frozen: {config.ssl.freeze})")
  print(f"fewshot on {data.dataset}: " + ", ".join(f"{s} {len(v.source)} clips / {len(set(v.speaker))} speakers"
                                                   for s, v in splits.items())
        + f"; {what}; adaptation {config.adaptation}; {mesh.size} device(s)")
  start = time.monotonic()
  settings = base_settings(config)
  if config.model == "ssl":
    ssl_trainer.report_short_clips(splits, mlp_trainer.encoder_config(config))
    variables, history, predict_fn, _, model = ssl_trainer.finetune(
        config, target, splits["train"], splits[config.val_split], mesh, workdir, name="base model",
        settings=settings)
  else:
    variables, history, predict_fn, _ = emo18_trainer.train_base(settings, model, target, splits["train"],
                                                                 splits[config.val_split], mesh, workdir,
                                                                 record=base_record(config))
  modes = set(config.adaptation.split("+"))
  adapted_variables = variables
  if modes & {"maml", "fomaml"}:
    adapted_variables = meta_train(config, model, target, variables, splits["train"], mesh, workdir,
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
        outputs_of[name][key] = emo18_trainer.predict_split(predict_fn, parallel.replicate(v, mesh), split.source,
                                                            options, eval_batch)
  if "speaker_norm" in modes:
    _, train_embeddings = emo18_trainer.predict_split(predict_fn, parallel.replicate(variables, mesh),
                                                      splits["train"].source, options, eval_batch)
    read_out = fit_read_out(target, splits, train_embeddings, config.read_out_l2)

  val = splits[config.val_split]
  val_episodes = support_query(val, num_support=config.num_support, seed=config.support_seed)
  query = np.concatenate([q for _, q in val_episodes.values()])
  per_speaker = {}  # {mode: {speaker: the training loss (MSE or cross-entropy) on the speaker's query clips}}
  for mode in dict.fromkeys(["none", config.adaptation]):
    outs, embs = outputs_of[config.val_split]["adapted" if mode == config.adaptation else "none"]
    predictions = personalise(config, model, target, adapted_variables if mode != "none" else variables, mode, val,
                              outs, embs, val_episodes, read_out)
    results[mode] = target.score(np.stack([predictions[i] for i in query]), val.labels[query])
    per_speaker[mode] = {
        speaker: float(target.loss(np.stack([predictions[i] for i in rows]), val.labels[rows], masked=False))
        for speaker, (_, rows) in val_episodes.items()}
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
      "dataset": data.dataset, "model": config.model, "hidden": config.hidden, "adaptation": config.adaptation,
      **(ssl_trainer.summary(config) if config.model == "ssl" else {}),
      "main_metric": target.metric, "split": config.val_split, "num_query_clips": int(len(query)),
      "num_speakers": len(val_episodes), "results": results, "per_speaker_loss": per_speaker,
      "base": {"history": history}, "submission": os.path.basename(submission) if submission else None,
      "seconds": time.monotonic() - start,
  }
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  return result
