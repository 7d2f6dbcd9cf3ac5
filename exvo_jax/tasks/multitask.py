"""Task `multitask` (ExVo-MultiTask): 10 emotion intensities, age and native country from openSMILE features.

Recipe (docs/hume_vb.md section 4): features standardised with training statistics; MultiTaskMLP; summed losses
(MSE emotions, MSE age in years, cross-entropy country) or learned uncertainty weighting; Adam lr 1e-3, batch 8,
at most 20 epochs, early stopping with patience 5 on the validation S_MTL, and the best epoch restored (the
reference code never restores it). `num_seeds` runs with seeded initialisation and shuffling; metrics.json holds
each seed's Val scores and their mean +- std, and the Test predictions of the best seed on Val are written in the
ExVo-Multi submission format. The training itself is `exvo_jax/mlp_trainer.py`, shared with the A-VB task.
"""

import json
import os

import jax
import numpy as np

from exvo_jax import config_check
from exvo_jax import figures
from exvo_jax import metrics
from exvo_jax import mlp_trainer
from exvo_jax import prediction
from exvo_jax import targets
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import schema
from exvo_jax.features import opensmile as opensmile_lib
from exvo_jax.features import tables as tables_lib

SCORES = ("emo_ccc", "cou_uar", "age_mae", "s_mtl")
EXVO_TARGETS = ("emotions", "age", "country")


def exvo_objective(config, train_age_mean):
  """The ExVo-MultiTask objective: emotions + age + country, selected on S_MTL (the age head's bias starts at
  `train_age_mean` with `config.age_bias_at_mean`)."""
  return mlp_trainer.targets_objective(EXVO_TARGETS, score, "s_mtl", uncertainty=config.uncertainty_weighting,
                                       age_bias=train_age_mean if config.age_bias_at_mean else 0.0,
                                       layers=mlp_trainer.input_layers(config))


def category_objective(config):
  """EmoGator's categories on the same trunk, selected on UAR."""
  category = targets.get("category")
  return mlp_trainer.targets_objective(("category",), lambda predictions, table: category.score(
      predictions["category"], table.category), "uar", layers=mlp_trainer.input_layers(config))


def score(predictions, table):
  """Emo-CCC, Cou-UAR, Age-MAE and S_MTL of predictions against a labelled table (known labels only)."""
  labelled = table.labelled
  emo = float(metrics.mean_ccc(predictions["emotions"][labelled], table.emotions[labelled]))
  known_country = table.country >= 0
  cou = float(metrics.uar(predictions["country"][known_country].argmax(-1), table.country[known_country],
                          len(schema.COUNTRIES)))
  known_age = np.isfinite(table.age)
  age = float(metrics.mae(predictions["age"][known_age], table.age[known_age]))
  return {"emo_ccc": emo, "cou_uar": cou, "age_mae": age, "s_mtl": float(metrics.s_mtl(emo, cou, age))}


def mean_predictor(train, n):
  """The training-mean predictor: mean intensities, mean age, the majority country (a floor to beat)."""
  countries = np.bincount(train.country[train.country >= 0], minlength=len(schema.COUNTRIES))
  logits = np.full(len(schema.COUNTRIES), -1.0, np.float32)
  logits[countries.argmax()] = 1.0
  return {"emotions": np.tile(np.nanmean(train.emotions[train.labelled], 0), (n, 1)),
          "age": np.full(n, np.nanmean(train.age), np.float32), "country": np.tile(logits, (n, 1))}


# ---------------------------------------------------------------------------------------------------------------
# Outputs.

def write_submission(path, table, predictions):
  """ExVo-Multi CSV: File_ID (as in data_info.csv), Country (code), Age, then the ten emotions."""
  writers.write_csv(path, ["File_ID", "Country", "Age", *schema.EMOTIONS],
                    ([file_id, int(predictions["country"][i].argmax()), f"{predictions['age'][i]:.4f}",
                      *(f"{v:.6f}" for v in predictions["emotions"][i])] for i, file_id in enumerate(table.file_id)))


def format_row(name, dims, summary):
  mean, std = summary["mean"], summary["std"]
  cells = " | ".join(f"{mean[k]:.3f} +- {std[k]:.3f}" for k in SCORES)
  return f"| {name} | {dims} | {cells} |"


TABLE_HEADER = "| features | Dims | Emo-CCC | Cou-UAR | Age-MAE | S_MTL |\n|---|---|---|---|---|---|"


def format_table(workdirs):
  """Table 2 of the ExVo paper from finished runs' metrics.json (rows that did not finish say so)."""
  lines = [TABLE_HEADER]
  for workdir in workdirs:
    path = os.path.join(workdir, "metrics.json")
    name = os.path.basename(os.path.normpath(workdir))
    if not os.path.isfile(path):
      lines.append(f"| {name} | - | not run (see its log) | | | |")
      continue
    with open(path) as f:
      result = json.load(f)
    lines.append(format_row(name, result["dims"], result))
  return "\n".join(lines)


def _summary(seeds, keys):
  values = {k: np.array([s["val"][k] for s in seeds]) for k in keys}
  return {"mean": {k: float(v.mean()) for k, v in values.items()},
          "std": {k: float(v.std()) for k, v in values.items()}}


def write_figures(config, seeds, metric, workdir):
  """training_curves.png: every seed's training loss and validation `metric` per epoch, its best epoch starred."""
  figures.save(figures.training_curves({f"seed {s['seed']}": s["history"] for s in seeds}, metric=metric,
                                       title=f"MultiTask MLP on {'+'.join(config.features.sets)}"),
               os.path.join(workdir, "training_curves.png"))


def check_config(config):
  """Fails before any work on a value outside its choices."""
  mlp_trainer.check_features(config)
  if config.data.dataset == "emogator":
    config_check.subset(config, "features.sets", ("compare", "egemaps", "ssl"))


def run(config, workdir):
  """Trains `config.num_seeds` MLPs; writes metrics.json (and the ExVo-Multi submission for HUME-VB)."""
  data = config.data
  root = corpus.of_config(data)
  if data.dataset == "emogator":
    return run_categories(config, workdir, root)
  tables = mlp_trainer.load_tables(config, root, workdir)
  tables["train"] = tables["train"].select(tables["train"].labelled)
  tables, mesh = mlp_trainer.prepare_tables(config, workdir, tables)
  train = tables["train"]
  dims = train.features.shape[1]
  print(f"multitask on {'+'.join(config.features.sets)} ({dims} dims): {len(train)} train, "
        f"{len(tables['validation'])} val, {len(tables['test'])} test clips, {mesh.size} device(s)")
  objective = exvo_objective(config, float(np.nanmean(train.age)))
  runs = mlp_trainer.train_seeds(config, objective, tables, workdir, mesh)
  seeds = [r[0] for r in runs]
  summary = _summary(seeds, SCORES)
  best = int(np.argmax([s["val"]["s_mtl"] for s in seeds]))
  _, params, predict_fn = runs[best]
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  submission = os.path.join(workdir, f"ExVo-Multi_{config.team}_{config.submission_number}.csv")
  write_submission(submission, tables["test"], mlp_trainer.predict(predict_fn, params, tables["test"], eval_batch))
  reference = score(mean_predictor(train, len(tables["validation"])), tables["validation"])
  result = {
      "features": list(config.features.sets), **mlp_trainer.encoder_summary(config), "dims": dims,
      "split": "validation", "seeds": seeds,
      **summary, "train_mean_predictor": reference,
      "submission": os.path.basename(submission), "submission_seed": seeds[best]["seed"],
  }
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  write_figures(config, seeds, "s_mtl", workdir)
  validation = tables["validation"].select(tables["validation"].labelled)
  per_emotion = np.asarray(metrics.ccc(mlp_trainer.predict(predict_fn, params, validation, eval_batch)["emotions"],
                                       validation.emotions))
  figures.save(figures.bars({f"seed {seeds[best]['seed']}": per_emotion}, schema.EMOTIONS,
                            title="Val: CCC per emotion (the seed best on Val)", ylabel="CCC"),
               os.path.join(workdir, "per_emotion_ccc.png"))
  name = "+".join(config.features.sets) + (f"({config.features.boaw_words})" if "boaw" in config.features.sets
                                           else "")
  print(TABLE_HEADER)
  print(format_row(name, dims, summary))
  print("training-mean predictor on Val: " + " ".join(f"{k} {v:.3f}" for k, v in reference.items()))
  return result


def run_categories(config, workdir, root):
  """The same trunk with one categorical head, on a corpus with category labels (EmoGator: 30 categories)."""
  from exvo_jax.data import emogator as emogator_lib  # only this path needs the category names
  builder, _ = builders.prepare("emogator", root, data_dir=config.data.tfds_dir or None, strict=config.data.strict)
  sources = {"train": builders.data_source(builder, "train"), "validation": builders.data_source(builder, "val")}
  feature_cache = builders.cache_dir() / "features" / builders.corpus_key(root)
  per_set = [mlp_trainer.audio_feature_tables(config, name, sources, feature_cache, workdir)
             for name in config.features.sets]
  tables = {s: tables_lib.fuse([t[s] for t in per_set]) for s in sources}
  tables, mesh = mlp_trainer.prepare_tables(config, workdir, tables)
  num_categories = len(emogator_lib.CATEGORIES)
  print(f"categories on {'+'.join(config.features.sets)} ({tables['train'].features.shape[1]} dims): "
        f"{len(tables['train'])} train, {len(tables['validation'])} val clips, {num_categories} categories")
  runs = mlp_trainer.train_seeds(config, category_objective(config), tables, workdir, mesh)
  seeds = [r[0] for r in runs]
  result = {"features": list(config.features.sets), **mlp_trainer.encoder_summary(config),
            "dims": int(tables["train"].features.shape[1]),
            "split": "validation", "seeds": seeds, **_summary(seeds, ("uar",)), "chance_uar": 1 / num_categories}
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  write_figures(config, seeds, "uar", workdir)
  print(f"val UAR {result['mean']['uar']:.3f} +- {result['std']['uar']:.3f} (chance {1 / num_categories:.3f})")
  return result


checkpointed_stages = mlp_trainer.checkpointed_stages  # one stage per seed: `<workdir>/seed<k>/checkpoints`


# ---------------------------------------------------------------------------------------------------------------
# Prediction on new audio (the `predict` task).

PREDICTABLE_SETS = ("compare", "egemaps")


def predictor(config, workdir):
  """The seed this run submitted (the best on Val), its features extracted from each clip with openSMILE and
  standardised with the run's training statistics: the emotions, age and country (with its probabilities), or
  EmoGator's categories."""
  sets = tuple(config.features.sets)
  if config.features.from_release or not set(sets) <= set(PREDICTABLE_SETS):
    raise prediction.PredictError(
        f"this MultiTask run used the feature set(s) {'+'.join(sets)}"
        f"{' from the release' if config.features.from_release else ''}; predict extracts "
        f"{' and '.join(PREDICTABLE_SETS)} functionals from new audio (bag-of-audio-words, DeepSpectrum and encoder "
        "embeddings are not extracted for new files yet)")
  result_path = os.path.join(workdir, "metrics.json")
  if not os.path.isfile(result_path):
    raise prediction.PredictError(f"{result_path} is missing: the run has not finished; rerun its training command "
                                  "with the same --workdir")
  with open(result_path) as f:
    result = json.load(f)
  categories = config.data.dataset == "emogator"
  seeds = result["seeds"]
  seed = (seeds[int(np.argmax([s["val"]["uar"] for s in seeds]))]["seed"] if categories
          else result["submission_seed"])
  moments = np.load(os.path.join(workdir, "standardiser.npz"))
  mean, std = moments["mean"], moments["std"]
  objective = category_objective(config) if categories else exvo_objective(config, 0.0)  # the bias is restored
  params = mlp_trainer.restore_seed(config, objective, len(mean), seed, workdir)
  apply = jax.jit(lambda x: objective.model.apply({"params": params["mlp"]}, x))
  smiles = [opensmile_lib.make_smile(name) for name in sets]
  if categories:
    from exvo_jax.data import emogator as emogator_lib  # pylint: disable=import-outside-toplevel
    names = list(emogator_lib.CATEGORIES)
    columns, chart = prediction.class_columns("category", names), [f"p_category_{n}" for n in names]
  else:
    columns = [*schema.EMOTIONS, "age", *prediction.class_columns("country", schema.COUNTRIES)]
    chart = list(schema.EMOTIONS)

  def predict(clips):
    features = np.stack([np.concatenate([opensmile_lib.compute(smile, clip) for smile in smiles]) for clip in clips])
    outputs = {k: np.asarray(v) for k, v in apply(((features - mean) / std).astype(np.float32)).items()}
    if categories:
      return prediction.class_values(outputs["category"], names)
    countries = prediction.class_values(outputs["country"], schema.COUNTRIES)
    return [[*map(float, outputs["emotions"][i]), float(outputs["age"][i]), *countries[i]]
            for i in range(len(clips))]

  return prediction.Predictor(columns, predict, chart, f"MultiTask MLP seed {seed} (best on Val) on "
                              f"{'+'.join(sets)} from {workdir}")

