"""Task `fewshot` (ExVo-FewShot): the raw-waveform CNN-LSTM and per-speaker personalisation from 2 labelled clips.

`model=ssl` puts a speech encoder in Emo18's place (exvo_jax/ssl_trainer.py: fine-tuned end to end, or with
`ssl.freeze=encoder` its frozen hidden states under a trained attention pooling and head); every adaptation below
works on it the same way, on its pooled embedding and its parameter subset (`adapt_subset`, e.g. pooling + head).

1. Train Emo18 on the Train split (MSE on the 10 emotions, Adam 1e-4, batch 8, clips cut at 20 s), keeping the
   epoch with the best validation mean CCC.
2. Optionally meta-train it (`maml` / `fomaml`, exvo_jax/meta_trainer.py): episodes of one training speaker with 2
   support and Q query clips, k inner steps on a parameter subset, the outer loss on the query clips.
3. Evaluate on Val with 2 support clips per speaker (chosen by a fixed seed) and every other clip of that speaker
   as a query: per-emotion CCC and mean CCC over the query clips, for the chosen adaptation and for `none` on the
   very same clips.
4. Predict the Test clips (support = the release's labelled Test clips) and write the ExVo-Few submission.
5. With `config.compare` (`:compare`), every listed adaptation (rows may carry their own settings) is scored from
   the same trained model on `config.support_draws` support draws, with per-speaker counts and the support clips'
   classes scored apart (`compare`, `exvo_jax/evaluation/personalisation.py`); written to comparison.md and
   metrics.json.

Adaptations (`config.adaptation`; exvo_jax/personaliser.py computes them):
  none            the trained model as it is
  finetune        per speaker, k gradient steps on the support clips (default subset: LSTM + head; a subset names
                  top-level parameters or paths, e.g. 'head/bias' or 'encoder/MaskedBatchNorm'), restarting from
                  the trained model for every speaker (the reference code never reset it: a defect not copied)
  maml, fomaml    meta-trained initialisation, then the same inner loop as finetune (`maml.query_other_classes`:
                  episodes query other classes than their support clips')
  speaker_norm    the embedding z-normalised with the speaker's own mean and std over ALL of that speaker's clips
                  (support and query audio, no labels), and a linear read-out refit on training embeddings
                  normalised the same way per training speaker; speaker_norm+finetune: k steps of that read-out
                  on the speaker's normalised support clips
  refit           its control: the same read-out refit, on embeddings normalised with the training set's global
                  moments (no speaker statistics)
  embedding_norm  the embedding standardised with the speaker's moments (as speaker_norm, no labels) and mapped
                  onto the training embeddings' global mean and std, read by the model's own head (no refit)
  speaker_bn      Emo18's BatchNorm statistics re-estimated over all of the speaker's clips (no labels);
                  speaker_bn+embedding_norm: then embedding_norm on the embeddings this gives
  support_bias    (regression) the support clips' mean residual, shrunk toward 0, added to the speaker's outputs
`config.speaker_norm` shrinks the speaker's moments toward the training ones (speaker_norm, embedding_norm).
"""

import copy
import hashlib
import json
import os
import re
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from exvo_jax import adaptation
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import figures
from exvo_jax import meta_trainer
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax import personaliser as personaliser_lib
from exvo_jax import prediction
from exvo_jax import runtime
from exvo_jax import ssl_trainer
from exvo_jax import stages
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import schema
from exvo_jax.evaluation import personalisation
from exvo_jax.features import ssl_embeddings
from exvo_jax.models import emo18

SPLITS = {"hume_vb": ("train", "validation", "test"), "emogator": ("train", "val")}
MODELS = ("emo18", "ssl")


def support_query(split, *, num_support, seed):
  """{speaker: (support indices, query indices)}.

  A split with labelled and unlabelled clips (Test) uses its labelled clips as support; a fully labelled split
  (Val) draws `num_support` clips per speaker with `seed`. Queries are all other clips of the speaker.
  """
  rng = np.random.default_rng(seed)
  fully_labelled = bool(split.labelled.all())
  result = {}
  for speaker, rows in sorted(meta_trainer.rows_by_speaker(split.speaker).items()):
    if fully_labelled:
      support = np.sort(rng.choice(rows, size=min(num_support, len(rows) - 1), replace=False))
    else:
      support = rows[split.labelled[rows]]
    query = np.setdiff1d(rows, support)
    if len(support) and len(query):
      result[speaker] = (support, query)
  return result


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


def write_figures(config, target, history, results, workdir):
  """training_curves.png (the base model's training loss and validation metric per epoch) and, for the emotion
  intensities, per_emotion_ccc.png: each emotion's CCC on the query clips, no adaptation beside the chosen one."""
  figures.save(figures.training_curves({"base model": history}, metric=target.metric,
                                       title=f"FewShot base model ({config.model})"),
               os.path.join(workdir, "training_curves.png"))
  if target.kind == "regression":
    figures.save(figures.bars({mode: [scores[name] for name in target.names] for mode, scores in results.items()},
                              target.names, title=f"{config.val_split} query clips: CCC per emotion",
                              ylabel="CCC"), os.path.join(workdir, "per_emotion_ccc.png"))


def write_submission(path, split, predictions):
  """ExVo-Few CSV: File_ID (as in data_info.csv) and the ten emotions, for every Test query clip."""
  writers.write_csv(path, ["File_ID", *schema.EMOTIONS], ([split.file_id[index], *(f"{v:.6f}" for v in
                                                                                   predictions[index])]
                                                         for index in sorted(predictions)))


ADAPTATIONS = ("none", "finetune", "maml", "fomaml", "speaker_norm", "speaker_norm+finetune", "refit",
               "embedding_norm", "speaker_bn", "speaker_bn+embedding_norm", "support_bias")

# ---------------------------------------------------------------------------------------------------------------
# The comparison's rows: an adaptation, optionally with settings of its own ('finetune[adapt_subset=head/bias,
# finetune.anchor_weight=1.0]'); a tuple setting takes its items joined by '+'.

_ROW = re.compile(r"^([a-z_+]+)(?:\[(.*)\])?$")


def parse_row(config, row):
  """(adaptation, the config of this row: `config` with the row's settings) for a row of `config.compare`."""
  match = _ROW.match(row.strip())
  if not match:
    raise config_check.ConfigError(f"--config.compare row {row!r}: expected MODE or MODE[key=value,...], e.g. "
                                   "'finetune[adapt_subset=head/bias,finetune.anchor_weight=1.0]'")
  mode, settings = match.group(1), match.group(2)
  if mode not in ADAPTATIONS:
    raise config_check.ConfigError(f"--config.compare row {row!r}: adaptation {mode!r} is not one of: "
                                   f"{', '.join(ADAPTATIONS)}")
  row_config = copy.deepcopy(config)
  with row_config.unlocked():
    row_config.adaptation = mode
    row_config.compare = ()
    for item in filter(None, (settings or "").split(",")):
      key, equals, text = item.partition("=")
      key = key.strip()
      if not equals:
        raise config_check.ConfigError(f"--config.compare row {row!r}: {item!r} is not key=value")
      try:
        current = config_check.value_of(config, key)
      except (KeyError, AttributeError):
        raise config_check.ConfigError(f"--config.compare row {row!r}: no config key {key!r}") from None
      if _shared(config, key) or hasattr(current, "items"):
        raise config_check.ConfigError(
            f"--config.compare row {row!r}: {key!r} is not a setting a row can change: every row adapts the same "
            "base model on the same support draws (set it for the whole run instead)")
      value = _parse_value(row, key, text.strip(), current)
      parent = row_config
      *path, last = key.split(".")
      for part in path:
        parent = parent[part]
      parent[last] = value
  return mode, row_config


def _shared(config, key):
  """Whether `key` shapes what every row shares: the base model, the corpus, the draws, the comparison itself."""
  if key in ("compare", "support_draws", "adaptation", "task", "model", "num_support", "support_seed", "val_split",
             "seed", "num_epochs") or key.split(".")[0] in ("data", "encoder", "ssl"):
    return True
  return key in base_record(config)


def _parse_value(row, key, text, current):
  if isinstance(current, (tuple, list)):
    return tuple(filter(None, text.split("+")))
  if isinstance(current, bool):
    if text not in ("True", "False", "true", "false"):
      raise config_check.ConfigError(f"--config.compare row {row!r}: {key} takes True or False, not {text!r}")
    return text.lower() == "true"
  if isinstance(current, (int, float)):
    kind = "an integer" if isinstance(current, int) else "a number"
    try:
      return type(current)(text)
    except ValueError:
      raise config_check.ConfigError(f"--config.compare row {row!r}: {key} takes {kind}, not {text!r}") from None
  return text


def comparison_rows(config):
  """[(row name, adaptation, row config)]: no adaptation first, then `config.compare`'s rows and the run's own
  adaptation (when not among them)."""
  names = list(dict.fromkeys(["none", *config.compare, config.adaptation]))
  return [(name, *parse_row(config, name)) for name in names]


def meta_learned(config, row_config, mode, model, target, variables, train, mesh, workdir):
  """The variables meta-trained (`mode` maml or fomaml) with `row_config`'s settings, in their own folder."""
  return meta_trainer.meta_train(row_config, model, target, variables, train, mesh, first_order=mode == "fomaml",
                                 directory=row_meta_directory(config, row_config, mode, workdir),
                                 record=meta_record(row_config, mode))


def row_meta_directory(config, row_config, mode, workdir):
  """Where a comparison row meta-trains: the run's own folder for its mode when the row's meta-training settings
  are the run's, else a folder named by a hash of the row's meta record."""
  record = meta_record(row_config, mode)
  if record == meta_record(config, mode):
    return meta_directory(workdir, mode)
  digest = hashlib.sha256(json.dumps(writers.plain(record), sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(workdir, "checkpoints", f"{mode}-{digest}")


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
  record = {**base_record(config), "meta": mode,
            **stages.pick(config, ("maml", "adapt_subset", "num_support"),
                          exclude=("maml.checkpoint_every", "maml.log_every", "maml.meta_steps"))}
  if not record["maml.query_other_classes"]:  # absent from the records of the runs before it: they still resume
    del record["maml.query_other_classes"]
  return record


def meta_directory(workdir, mode):
  return os.path.join(workdir, "checkpoints", mode)


def checkpointed_stages(config, workdir):
  """The stages this run trains (or resumes): the base model, and meta-training for maml / fomaml (the run's own
  and the comparison rows')."""
  result = [stages.Stage("base model", emo18_trainer.base_directory(workdir), base_record(config))]
  seen = set()
  rows = comparison_rows(config) if config.compare else [(config.adaptation, config.adaptation, config)]
  for name, mode, row_config in rows:
    for meta in sorted(set(mode.split("+")) & {"maml", "fomaml"}):
      directory = row_meta_directory(config, row_config, meta, workdir)
      if directory not in seen:
        seen.add(directory)
        result.append(stages.Stage(f"meta-training ({meta}{', row ' + name if name != meta else ''})", directory,
                                   meta_record(row_config, meta)))
  return result


def check_config(config):
  """Fails before any work on a value outside its choices, and on a comparison row that names a bad setting."""
  check_adaptation(config)
  if config.support_draws < 1:
    raise config_check.ConfigError(f"--config.support_draws={config.support_draws}: at least 1 support draw")
  for _, _, row_config in comparison_rows(config) if config.compare else ():
    check_adaptation(row_config)


def check_adaptation(config):
  """The checks of one adaptation's settings (the run's, or a comparison row's)."""
  config_check.choice(config, "adaptation", ADAPTATIONS)
  config_check.choice(config, "val_split", SPLITS[config.data.dataset][1:2])
  config_check.choice(config, "model", MODELS)
  target = emo18_trainer.make_target(config.data.dataset)
  if config.model == "ssl":
    ssl_trainer.check_config(config, target)
  modes = set(config.adaptation.split("+"))
  if "support_bias" in modes and target.kind != "regression":
    raise config_check.ConfigError(
        f"--config.adaptation=support_bias adds a per-speaker offset to regression outputs; {config.data.dataset}'s "
        f"target is a classification ({target.name}), whose offset would be the support clips' class priors")
  if "speaker_bn" in modes and config.model != "emo18":
    raise config_check.ConfigError("--config.adaptation=speaker_bn re-estimates BatchNorm statistics; the "
                                   f"{config.model} model has no BatchNorm (try embedding_norm or speaker_norm)")
  if "embedding_norm" in modes and config.model == "ssl" and config.ssl.chain:
    raise config_check.ConfigError("--config.adaptation=embedding_norm reads the model's linear head; with "
                                   "--config.ssl.chain=True the head is a chain (try speaker_norm, which refits one)")
  if modes & {"finetune", "maml", "fomaml"}:  # they adapt the parameters named by adapt_subset
    model = make_model(config, target)
    audio = jax.ShapeDtypeStruct((1, schema.SAMPLE_RATE), jnp.float32)
    length = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(lambda a, n: model.init(jax.random.key(0), a, n, train=False), audio, length)["params"]
    names = [adaptation.path_name(p) for p in flax.traverse_util.flatten_dict(flax.core.unfreeze(params))]
    unmatched = [p for p in config.adapt_subset if not any(n.startswith(p) for n in names)]
    if unmatched or not config.adapt_subset:
      raise config_check.ConfigError(
          f"--config.adapt_subset={tuple(config.adapt_subset)!r}: {', '.join(map(repr, unmatched)) or 'nothing'} "
          f"names no parameter of the {config.model} model; its top-level parameters are "
          f"{', '.join(sorted(params))}, deeper ones are named by their path (e.g. "
          f"{'pooling,head' if config.model == 'ssl' else 'lstm,head or encoder/MaskedBatchNorm,head/bias'})")


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
    adapted_variables = meta_learned(config, config, "fomaml" if "fomaml" in modes else "maml", model, target,
                                     variables, splits["train"], mesh, workdir)

  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  options = personaliser_lib.audio_options(config)
  replicated = []  # (variables, their replicated copy): the base model's and the meta-learned ones

  def predict_all(v, split):
    copy_of = next((r for w, r in replicated if w is v), None)
    if copy_of is None:
      copy_of = parallel.replicate(v, mesh)
      replicated.append((v, copy_of))
    return emo18_trainer.predict_split(predict_fn, copy_of, split.source, options, eval_batch)

  train_cache = []

  def train_embeddings():  # one pass over Train, only for the adaptations that need it
    if not train_cache:
      train_cache.append(predict_all(variables, splits["train"])[1])
    return train_cache[0]

  def personaliser(name, v):  # the unadapted outputs and embeddings of the split only when a mode needs them
    return personaliser_lib.Personaliser(model, target, v, splits[name], None, None, splits["train"],
                                         train_embeddings, predictions=lambda: predict_all(v, splits[name]))

  val = splits[config.val_split]
  val_personalisers = {"none": personaliser(config.val_split, variables)}
  val_personalisers["adapted"] = (val_personalisers["none"] if adapted_variables is variables
                                  else personaliser(config.val_split, adapted_variables))
  val_episodes = support_query(val, num_support=config.num_support, seed=config.support_seed)
  query = np.concatenate([q for _, q in val_episodes.values()])
  results, per_speaker = {}, {}  # per_speaker: {mode: {speaker: the loss (MSE or cross-entropy) on its queries}}
  for mode in dict.fromkeys(["none", config.adaptation]):
    predictions = val_personalisers["adapted" if mode != "none" else "none"].predict(config, mode, val_episodes)
    results[mode] = target.score(np.stack([predictions[i] for i in query]), val.labels[query])
    per_speaker[mode] = {
        speaker: float(target.loss(np.stack([predictions[i] for i in rows]), val.labels[rows], masked=False))
        for speaker, (_, rows) in val_episodes.items()}
  table = format_table(target, results)
  write_figures(config, target, history, results, workdir)
  print(f"{config.val_split}: {len(query)} query clips of {len(val_episodes)} speakers "
        f"({config.num_support} support clips each, seed {config.support_seed})")
  print(table)
  comparison = None
  if config.compare:
    comparison = compare(config, model, target, variables, history, splits, mesh, workdir,
                         val_personalisers["none"], personaliser)

  submission = None
  if "test" in splits:
    test = splits["test"]
    test_episodes = support_query(test, num_support=config.num_support, seed=config.support_seed)
    predictions = personaliser("test", adapted_variables).predict(config, config.adaptation, test_episodes)
    submission = os.path.join(workdir, f"ExVo-Few_{config.team}_{config.submission_number}.csv")
    write_submission(submission, test, predictions)
  result = {
      "dataset": data.dataset, "model": config.model, "hidden": config.hidden, "adaptation": config.adaptation,
      **(ssl_trainer.summary(config) if config.model == "ssl" else {}),
      "main_metric": target.metric, "split": config.val_split, "num_query_clips": int(len(query)),
      "num_speakers": len(val_episodes), "results": results, "per_speaker_loss": per_speaker,
      **({"comparison": comparison} if comparison else {}),
      "base": {"history": history}, "submission": os.path.basename(submission) if submission else None,
      "seconds": time.monotonic() - start,
  }
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  return result


def compare(config, model, target, variables, history, splits, mesh, workdir, base, personaliser, log=print):
  """Every row of `config.compare` (and no adaptation, and the run's own adaptation) on `config.support_draws`
  draws of the support clips (seeds support_seed, support_seed + 1, ...), from the one trained model; prints and
  returns the table (`evaluation.personalisation`). Each row's scores are kept in `comparison/` as soon as it
  ends, tied to its settings, so a rerun after SIGTERM goes on with the next row."""
  val = splits[config.val_split]
  classes = personalisation.clip_classes(target, val.labels)
  seeds = [config.support_seed + d for d in range(config.support_draws)]
  draws = [support_query(val, num_support=config.num_support, seed=seed) for seed in seeds]
  folder = os.path.join(workdir, "comparison")
  if writers.is_writer():
    os.makedirs(folder, exist_ok=True)
  rows, scored = {}, {}
  for name, mode, row_config in comparison_rows(config):
    # What the row's predictions depend on: the base model (its record and training history), the draws and, but
    # for no adaptation, the settings.
    settings = {} if mode == "none" else stages.pick(row_config, [k for k in row_config if k not in _NOT_ADAPTATION],
                                                     exclude=_NOT_PREDICTION)
    record = {"base": base_record(config), "base_history": history, "row": name, "seeds": seeds,
              "settings": settings}
    path = os.path.join(folder, hashlib.sha256(name.encode()).hexdigest()[:12] + ".json")
    kept = runtime.from_process_zero(_read_json(path) if writers.is_writer() else None)  # process 0 wrote it
    if kept is not None and kept["record"] == writers.plain(record):
      scored[name] = kept["draws"]
      log(f"comparison: {name}: kept from {path}")
    else:
      row_start = time.monotonic()
      v = variables
      for meta in sorted(set(mode.split("+")) & {"maml", "fomaml"}):
        v = meta_learned(config, row_config, meta, model, target, variables, splits["train"], mesh, workdir)
      source = base if v is variables else personaliser(config.val_split, v)
      scored[name] = [personalisation.score_draw(target, val.labels, classes, episodes,
                                                 source.predict(row_config, mode, episodes, v))
                      for episodes in draws]
      writers.write_json(path, {"record": record, "draws": scored[name]})
      log(f"comparison: {name}: {np.mean([d['score'] for d in scored[name]]):.4f} {target.metric} over "
          f"{len(draws)} draws ({time.monotonic() - row_start:.0f} s)")
    rows[name] = personalisation.summarise(scored[name], scored["none"])
  table = personalisation.format_comparison(target, rows, len(draws), len(draws[0]))
  per_emotion = format_table(target, {name: r["per_emotion"] for name, r in rows.items()})
  text = (f"{config.val_split}: {len(draws[0])} speakers, {config.num_support} support clips each, {len(draws)} "
          f"draws (support seeds {seeds[0]}..{seeds[-1]}); every other clip of a speaker is a query\n\n"
          f"{table}\n\nMeans over the draws:\n\n{per_emotion}\n")
  print(text)
  if writers.is_writer():
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(text)
  return {"seeds": seeds, "rows": rows}


# Keys that do not change what an adaptation predicts (a comparison row's record leaves them out).
_NOT_ADAPTATION = ("compare", "support_draws", "log_every_s", "log", "team", "submission_number", "num_devices",
                   "restart_changed", "eval_batch_size", "adapt_query_batch")
_NOT_PREDICTION = ("maml.log_every", "maml.checkpoint_every")


def _read_json(path):
  """A kept comparison row ({'record', 'draws'}), or None when there is none or it cannot be read (then the row is
  computed again; process 0 must not fail here while the others wait for its answer)."""
  try:
    with open(path) as f:
      kept = json.load(f)
  except (OSError, ValueError):
    return None
  return kept if isinstance(kept, dict) and {"record", "draws"} <= set(kept) else None


# ---------------------------------------------------------------------------------------------------------------
# Prediction on new audio (the `predict` task).

def predictor(config, workdir):
  """The trained base model (Emo18 or the speech encoder), its best epoch, with no per-speaker adaptation (a new
  file's speaker and labels are unknown); clips are read as in the task (cut at max_seconds)."""
  target = emo18_trainer.make_target(config.data.dataset)
  mesh = parallel.make_mesh()
  model = make_model(config, target)
  if config.model == "ssl":
    encoder = ssl_embeddings.load_encoder(config.encoder.checkpoint, config.encoder.seed)
    make_state = ssl_trainer.make_state_fn(config, model, encoder)
  else:
    make_state = emo18_trainer.emo18_state_fn(model, base_settings(config))
  options = personaliser_lib.audio_options(config)
  variables = emo18_trainer.restore_base(workdir, make_state, options, target, mesh)
  predict_fn = parallel.data_parallel(emo18_trainer.make_predict_step(model), mesh, donate_argnums=(),
                                      out_specs=jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  if target.kind == "regression":
    columns, chart = list(target.names), list(target.names)
  else:
    columns = prediction.class_columns(target.name, target.names)
    chart = columns[1:]

  def predict(clips):
    records = [{"audio": clip, "file_id": str(i), "speaker": ""} for i, clip in enumerate(clips)]
    outputs, _ = emo18_trainer.predict_split(predict_fn, variables, records, options, batch)
    outputs = np.asarray(outputs)
    if target.kind == "regression":
      return [list(map(float, row)) for row in outputs]
    return prediction.class_values(outputs, target.names)

  what = "Emo18" if config.model == "emo18" else "fine-tuned speech encoder"
  return prediction.Predictor(columns, predict, chart, f"FewShot {what} (best epoch, no adaptation) from {workdir}")
