"""Task `avb` (A-VB 2022): High (10 emotions), Two (valence, arousal), Culture (40 country-specific emotions) and
Type (8 burst types) on HUME-VB's audio, one task or the four jointly.

Targets are data (exvo_jax/targets.py: avb_high, avb_two, avb_culture, avb_type); the models are the existing
trainers:
- `model=mlp`: the organisers' feature MLP (the MultiTask trunk D-128-64 with one 64-32-k head per task, sigmoid
  on regression outputs, logits for Type) over standardised ComParE / eGeMAPS / BoAW features; MSE, cross-entropy
  for Type; Adam 1e-3, batch 8, at most 20 epochs, early stopping with patience 5, the best epoch restored;
  `num_seeds` seeds (5), mean +- std, and the best seed's Test predictions submitted.
- `model=emo18`: End2You's end-to-end recipe (exvo_jax/emo18_trainer.py): raw waveform, 0.1 s frames, the last
  valid frame's linear outputs (one output slice per task: a `targets.Joint`), batch 8, Adam 1e-4, 30 epochs, the
  best epoch by validation restored (the organisers' script never restores it); one seed.
- `model=ssl`: a speech encoder fine-tuned end to end (exvo_jax/ssl_trainer.py), attention pooling and one output
  slice per task, trained by the same raw-audio trainer as Emo18; one seed.

With several tasks (`:all`), one trunk carries one head per task, the loss is the sum of the tasks' own masked
losses (or `loss_weights`, or learned uncertainty weights with the MLP or the fine-tuned encoder) and the best epoch is chosen on
`mean_score`, the mean over tasks of their metrics.

Scores on Val: per dimension CCC and their mean (population moments; the organisers' evaluation mixes
1/(n-1) variances with a 1/n covariance, which is not copied), UAR and per-class recall for Type. A clip whose
labels for a task are missing or bad (the build report names them) is left out of that task's loss and score only.
Test predictions go to `A-VB-<Task>_<team>_<n>.csv` in the organisers' format: `File_ID` as written in
data_info.csv (the release writes it the same way in its label files, `[10119]`), then the task's columns (Type as
class names). When the release's Test labels are known (not -1), Test is scored
too.
"""

import dataclasses
import json
import os
import re

import numpy as np

from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import figures
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax import ssl_trainer
from exvo_jax import stages
from exvo_jax import targets
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data.report import CorpusError
from exvo_jax.models import emo18

# Task name -> (target, title in file names and tables).
TASKS = {"high": ("avb_high", "High"), "two": ("avb_two", "Two"), "culture": ("avb_culture", "Culture"),
         "type": ("avb_type", "Type")}
MODELS = ("mlp", "emo18", "ssl")
FEATURE_SETS = ("compare", "egemaps", "boaw", "ssl")
SPLITS = ("train", "validation", "test")

# The organisers' published Test scores (A-VB 2022 baseline paper; docs/hume_vb.md sections 2 and 3): the rows of
# Table 7 our runs are printed beside.
PUBLISHED_TEST = {
    "organisers: ComParE + MLP": {"high": 0.521, "two": 0.499, "culture": 0.380, "type": 0.384},
    "organisers: End2You (Emo18)": {"high": 0.5686, "two": 0.5084, "culture": 0.4401, "type": 0.4172},
}


def chosen_targets(config):
  return [targets.get(TASKS[name][0]) for name in config.tasks]


def joint_target(config):
  """The run's tasks as one `targets.Joint` (per-task loss weights; 1 each when none are configured)."""
  return targets.Joint(chosen_targets(config), weights=tuple(config.loss_weights) or None)


def submission_name(config, task):
  return f"A-VB-{TASKS[task][1]}_{config.team}_{config.submission_number}.csv"


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work, and the stages a run trains.

def check_config(config):
  """Fails before any work on a value outside its choices."""
  config_check.subset(config, "tasks", tuple(TASKS))
  if not config.tasks or len(set(config.tasks)) != len(config.tasks):
    raise config_check.ConfigError(f"--config.tasks={tuple(config.tasks)!r}: name each of {', '.join(TASKS)} at "
                                   "most once, at least one")
  config_check.choice(config, "model", MODELS)
  config_check.choice(config, "data.dataset", ("hume_vb",), "the A-VB labels are HUME-VB's")
  if config.loss_weights and len(config.loss_weights) != len(config.tasks):
    raise config_check.ConfigError(f"--config.loss_weights has {len(config.loss_weights)} values for "
                                   f"{len(config.tasks)} tasks ({', '.join(config.tasks)}); give one per task")
  if config.uncertainty_weighting and (config.model == "emo18" or config.loss_weights or len(config.tasks) < 2):
    raise config_check.ConfigError("--config.uncertainty_weighting=True needs model=mlp or ssl, two tasks or more "
                                   "(:all) and no loss_weights")
  if not re.fullmatch(r"[A-Za-z0-9._-]+", config.team) or config.submission_number < 1:
    raise config_check.ConfigError(f"--config.team={config.team!r} / --config.submission_number="
                                   f"{config.submission_number!r}: the submission file is A-VB-<Task>_<team>_<n>.csv; "
                                   "use letters, digits, '.', '_' or '-' for the team and n >= 1")
  if config.model == "mlp":
    mlp_trainer.check_features(config, FEATURE_SETS)
    if config.num_seeds < 1:
      raise config_check.ConfigError(f"--config.num_seeds={config.num_seeds}: train at least one seed")
  if config.model == "ssl":
    ssl_trainer.check_config(config, joint_target(config))


def emo18_record(config):
  """What shapes the end-to-end model: the corpus, the recipe, its width and seed, and the tasks it trains on."""
  model = emo18.Emo18(num_outputs=joint_target(config).num_outputs, hidden=config.hidden,
                      num_layers=config.num_layers)
  return {**emo18_trainer.base_record(stages.data_record(config), base_settings(config), model),
          "tasks": list(config.tasks), "loss_weights": list(config.loss_weights)}


def checkpointed_stages(config, workdir):
  if config.model == "mlp":
    return mlp_trainer.checkpointed_stages(config, workdir)
  if config.model == "ssl":
    return [stages.Stage(SSL_NAME, emo18_trainer.base_directory(workdir), ssl_trainer.record(config))]
  return [stages.Stage("Emo18", emo18_trainer.base_directory(workdir), emo18_record(config))]


SSL_NAME = "fine-tuned encoder"


# ---------------------------------------------------------------------------------------------------------------
# Scores, floors and outputs.

def _table_labels(joint, table):
  return joint.labels_of({t.field: getattr(table, t.field) for t in joint.members})


def _stack(joint, predictions):
  """{target name: [N, k]} -> [N, sum k] in the joint target's order."""
  return np.concatenate([np.asarray(predictions[t.name]).reshape(len(predictions[t.name]), -1)
                         for t in joint.members], axis=1)


def floor_predictions(joint, train_labels, n):
  """The training-mean predictor, [n, sum k]: each regression dimension's mean over known training labels, and for a
  classification the majority training class (its UAR is chance, 1 / classes)."""
  labels = joint.unpack(train_labels)
  parts = []
  for t in joint.members:
    values = np.asarray(labels[t.name])
    known = np.asarray(t.known(values))
    if t.kind == targets.CLASSIFICATION:
      row = np.full(t.num_outputs, -1.0)
      row[np.bincount(values[known], minlength=t.num_outputs).argmax()] = 1.0
    else:
      row = values[known].mean(0)
    parts.append(np.tile(row, (n, 1)))
  return np.concatenate(parts, axis=1).astype(np.float32)


def describe(joint, scores):
  """The log line of an evaluation: each task's metric and, with several, their mean (metrics.json has them all)."""
  parts = [f"{t.name}/{t.metric} {scores[f'{t.name}/{t.metric}']:.4f}" for t in joint.members]
  return " ".join(parts + ([f"mean_score {scores['mean_score']:.4f}"] if len(parts) > 1 else []))


def require_labels(joint, labels):
  """Stops before training when a task has no known label in Train or Validation (e.g. its label file was left
  out of the build: its build report says why), naming the task and the fix."""
  for split in ("train", "validation"):
    unpacked = joint.unpack(labels[split])
    for t in joint.members:
      if not np.asarray(t.known(unpacked[t.name])).any():
        task = next(k for k, (name, _) in TASKS.items() if name == t.name)
        raise CorpusError(f"no {split} clip has {TASKS[task][1]} labels (labels/{task}_info.csv; see the build "
                          f"report build_report.json for what was left out); fix that file or leave the task out "
                          f"(--config.tasks)")


def write_submissions(config, workdir, joint, file_ids, outputs):
  """One `A-VB-<Task>_<team>_<n>.csv` per task: File_ID, then the task's columns (Type as class names)."""
  per_target = joint.split_outputs(outputs)
  for task in config.tasks:
    target = targets.get(TASKS[task][0])
    writers.write_csv(os.path.join(workdir, submission_name(config, task)), ["File_ID", *target.submission],
                      ([file_id, *target.submission_values(per_target[target.name][i])]
                       for i, file_id in enumerate(file_ids)))


def task_scores(config, scores):
  """{task: the task's main score} from a joint target's scores (NaN for a task without labels)."""
  return {task: scores.get(f"{TASKS[task][0]}/{targets.get(TASKS[task][0]).metric}", float("nan"))
          for task in config.tasks}


def format_summary(config, result):
  """Lines printed at the end of a run: each task's Val score (mean +- std over seeds) beside the floor."""
  lines = ["| task | metric | Val | floor (training-mean predictor) |", "|---|---|---|---|"]
  for task in config.tasks:
    target = targets.get(TASKS[task][0])
    key = f"{target.name}/{target.metric}"
    spread = f" +- {result['std'][key]:.3f}" if len(result["seeds"]) > 1 else " (1 seed)"
    lines.append(f"| {TASKS[task][1]} | {target.metric} | {result['mean'][key]:.3f}{spread} | "
                 f"{result['floor'][key]:.3f} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The two models. Each returns a `Trained`.

@dataclasses.dataclass
class Trained:
  """What a model run hands back: each seed's result ({seed, best_epoch, history, val scores}), which seed is
  submitted, its Test outputs [N, sum k] with their File_IDs, and each split's packed labels."""
  seeds: list
  best: int
  test_outputs: np.ndarray
  test_ids: np.ndarray
  labels: dict


def run_mlp(config, workdir, root, joint):
  """`num_seeds` feature MLPs on the clips with a label for at least one of the tasks."""
  tables = mlp_trainer.load_tables(config, root, workdir)
  train = tables["train"]
  tables["train"] = train.select(np.asarray(joint.known(_table_labels(joint, train))))
  require_labels(joint, {s: _table_labels(joint, tables[s]) for s in ("train", "validation")})
  tables, mesh = mlp_trainer.prepare_tables(config, workdir, tables)
  train, val, test = (tables[s] for s in SPLITS)
  print(f"A-VB {'+'.join(config.tasks)} with the MLP on {'+'.join(config.features.sets)} "
        f"({train.features.shape[1]} dims): {len(train)} train, {len(val)} val, {len(test)} test clips, "
        f"{mesh.size} device(s)")
  objective = mlp_trainer.targets_objective(
      [t.name for t in joint.members],
      lambda predictions, table: joint.score(_stack(joint, predictions), _table_labels(joint, table)),
      joint.metric, weights=joint.weights if config.loss_weights else None,
      uncertainty=config.uncertainty_weighting, describe=lambda scores: describe(joint, scores),
      layers=mlp_trainer.input_layers(config))
  runs = mlp_trainer.train_seeds(config, objective, tables, workdir, mesh)
  best = int(np.argmax([r[0]["val"][joint.metric] for r in runs]))
  _, params, predict_fn = runs[best]
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  test_outputs = _stack(joint, mlp_trainer.predict(predict_fn, params, test, eval_batch))
  return Trained([r[0] for r in runs], best, test_outputs, test.file_id,
                 {s: _table_labels(joint, tables[s]) for s in SPLITS})


def base_settings(config):
  return emo18_trainer.BaseSettings(
      seed=config.seed, learning_rate=config.learning_rate, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, max_seconds=config.max_seconds, num_epochs=config.num_epochs,
      log_every_s=config.log_every_s)


def run_audio(config, workdir, root, joint):
  """A raw-audio model on the tasks (one seed): End2You's Emo18 (`model=emo18`) or a fine-tuned speech encoder
  (`model=ssl`). Clips without a label for a task add nothing to its loss."""
  builder, _ = builders.prepare("hume_vb", root, config="audio", data_dir=config.data.tfds_dir or None,
                                strict=config.data.strict)
  splits = {s: emo18_trainer.Split.read(builders.data_source(builder, s), joint) for s in SPLITS}
  require_labels(joint, {s: splits[s].labels for s in ("train", "validation")})
  mesh = parallel.make_mesh(config.num_devices or None)
  settings = base_settings(config)
  if settings.batch_size % mesh.size:
    raise ValueError(f"batch_size {settings.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.batch_size to a multiple of the device count")
  train, val, test = (splits[s] for s in SPLITS)
  counts = (f"{int(train.labelled.sum())} labelled train, {len(val.file_id)} val, {len(test.file_id)} test clips, "
            f"{mesh.size} device(s)")
  show = lambda scores: describe(joint, scores)
  if config.model == "emo18":
    model = emo18.Emo18(num_outputs=joint.num_outputs, hidden=config.hidden, num_layers=config.num_layers)
    print(f"A-VB {'+'.join(config.tasks)} with Emo18 (hidden {config.hidden}): {counts}")
    variables, history, predict_fn, best = emo18_trainer.train_base(
        settings, model, joint, train, val, mesh, workdir, record=emo18_record(config), name="Emo18", describe=show)
  else:
    print(f"A-VB {'+'.join(config.tasks)} with a fine-tuned encoder: {counts}")
    ssl_trainer.report_short_clips(splits, mlp_trainer.encoder_config(config))
    variables, history, predict_fn, best, _ = ssl_trainer.finetune(config, joint, train, val, mesh, workdir,
                                                                   name=SSL_NAME, describe=show, settings=settings)
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  test_outputs, _ = emo18_trainer.predict_split(predict_fn, variables, test.source, settings.audio_options(),
                                                eval_batch)
  seed = {"seed": config.seed, "best_epoch": best["epoch"], "history": history,
          "val": {k: v for k, v in best.items() if k not in ("step", "epoch") and not k.startswith("train_")}}
  return Trained([seed], 0, np.asarray(test_outputs), test.file_id, {s: splits[s].labels for s in SPLITS})


def run(config, workdir):
  """Trains the configured model on the configured A-VB tasks; writes metrics.json and one submission per task."""
  root = corpus.of_config(config.data)
  joint = joint_target(config)
  trained = (run_mlp if config.model == "mlp" else run_audio)(config, workdir, root, joint)
  values = {k: np.array([s["val"][k] for s in trained.seeds]) for k in trained.seeds[0]["val"]}
  mean = {k: float(v.mean()) for k, v in values.items()}
  val_labels = trained.labels["validation"]
  result = {
      "model": config.model, "tasks": list(config.tasks), "split": "validation",
      **({"features": list(config.features.sets), **mlp_trainer.encoder_summary(config)}
         if config.model == "mlp" else {}),
      **(ssl_trainer.summary(config) if config.model == "ssl" else {}),
      "val_scores": task_scores(config, mean), "seeds": trained.seeds, "mean": mean,
      "std": {k: float(v.std()) for k, v in values.items()},
      "floor": joint.score(floor_predictions(joint, trained.labels["train"], len(val_labels)), val_labels),
      "submission_seed": trained.seeds[trained.best]["seed"],
      "submissions": [submission_name(config, task) for task in config.tasks],
  }
  if writers.is_writer():
    os.makedirs(workdir, exist_ok=True)
  write_submissions(config, workdir, joint, trained.test_ids, trained.test_outputs)
  test = joint.score(trained.test_outputs, trained.labels["test"])
  test_scores = {task: v for task, v in task_scores(config, test).items() if np.isfinite(v)}
  if test_scores:  # a release whose Test labels are out (for some tasks or all): score them too
    result["test"], result["test_scores"] = test, test_scores
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  figures.save(figures.training_curves({f"seed {s['seed']}": s["history"] for s in trained.seeds},
                                       metric=joint.metric, title=f"A-VB {'+'.join(config.tasks)} ({config.model})"),
               os.path.join(workdir, "training_curves.png"))
  print(format_summary(config, result))
  return result


# ---------------------------------------------------------------------------------------------------------------
# Table 7 of the HUME-VB / A-VB datasets paper from finished runs.

def row_name(result):
  if result["model"] == "mlp":
    return f"MLP on {'+'.join(result['features'])}"
  if result["model"] == "ssl":
    encoder = result["encoder"]
    return f"fine-tuned encoder ({'untrained random' if encoder['untrained'] else encoder['checkpoint']})"
  return "Emo18 (End2You recipe)"


def format_table(workdirs):
  """Table 7's shape: a row per model, Val (dev) and Test columns for High, Two, Culture and Type, from the
  metrics.json of finished runs (runs of the same model on different tasks fill one row), then the organisers'
  published Test scores. Test is '-' where the Test labels are hidden (submit the CSVs to score it)."""
  rows, missing = {}, []
  for workdir in workdirs:
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
      missing.append(workdir)
      continue
    with open(path) as f:
      result = json.load(f)
    row = rows.setdefault(row_name(result), {})
    for task in result["tasks"]:
      row[task] = (result["val_scores"][task], result.get("test_scores", {}).get(task))
  header = "| model | " + " | ".join(f"{TASKS[t][1]} dev | {TASKS[t][1]} test" for t in TASKS) + " |"
  lines = [header, "|---" * (1 + 2 * len(TASKS)) + "|"]
  cell = lambda value: "-" if value is None else f"{value:.3f}"
  for name, row in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{cell(row.get(t, (None, None))[0])} | "
                                             f"{cell(row.get(t, (None, None))[1])}" for t in TASKS) + " |")
  for name, scores in PUBLISHED_TEST.items():
    lines.append(f"| {name} (published) | " + " | ".join(f"- | {scores[t]:.3f}" for t in TASKS) + " |")
  lines += [f"(not finished: {w}; see its log)" for w in missing]
  return "\n".join(lines)


def main(argv):
  """`python -m exvo_jax.tasks.avb WORKDIR...` prints Table 7 from finished runs."""
  print(format_table(argv[1:]))


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  main(sys.argv)
