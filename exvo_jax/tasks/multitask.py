"""Task `multitask` (ExVo-MultiTask): 10 emotion intensities, age and native country from openSMILE features.

Recipe (docs/hume_vb.md section 4): features standardised with training statistics; MultiTaskMLP; summed losses
(MSE emotions, MSE age in years, cross-entropy country) or learned uncertainty weighting; Adam lr 1e-3, batch 8,
at most 20 epochs, early stopping with patience 5 on the validation S_MTL, and the best epoch restored (the
reference code never restores it). `num_seeds` runs with seeded initialisation and shuffling; metrics.json holds
each seed's Val scores and their mean +- std, and the Test predictions of the best seed on Val are written in the
ExVo-Multi submission format.
"""

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from exvo_jax import config_check
from exvo_jax import loop
from exvo_jax import metrics
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import stages
from exvo_jax import targets
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.features import tables as tables_lib
from exvo_jax.models import mlp

SCORES = ("emo_ccc", "cou_uar", "age_mae", "s_mtl")
SPLITS = ("train", "validation", "test")


class TrainState(train_state.TrainState):
  pass


# ---------------------------------------------------------------------------------------------------------------
# Data.

def _release_config(name, boaw_words):
  return f"boaw{boaw_words}" if name == "boaw" else name


def load_tables(config, root, workdir, log=print):
  """{split: SplitTable} for `config.features.sets` (several sets are fused by concatenation)."""
  features = config.features
  feature_cache = builders.cache_dir() / "features" / builders.corpus_key(root)
  audio_sources = None
  per_set = []
  for name in features.sets:
    from_release = features.from_release or name == "deepspectrum"
    if from_release:
      builder, _ = builders.prepare("hume_vb", root, config=_release_config(name, features.boaw_words),
                                    data_dir=config.data.tfds_dir or None, strict=config.data.strict)
      per_set.append(tables_lib.from_release({s: builders.data_source(builder, s) for s in SPLITS}))
      continue
    if audio_sources is None:
      builder, _ = builders.prepare("hume_vb", root, config="audio", data_dir=config.data.tfds_dir or None,
                                    strict=config.data.strict)
      audio_sources = {s: builders.data_source(builder, s) for s in SPLITS}
    processes = features.processes or None
    # Process 0 extracts into the shared feature cache first; the other processes then read it.
    if name == "boaw":
      codebook = os.path.join(workdir, f"codebook{features.boaw_words}.npz") if writers.is_writer() else None
      per_set.append(runtime.process_zero_first(lambda: tables_lib.bag_of_audio_words(
          audio_sources, features.boaw_words, feature_cache, seed=config.seed,
          kmeans_iterations=features.boaw_kmeans_iterations, num_assignments=features.boaw_assignments,
          processes=processes, log=log, codebook_path=codebook), "bag-of-audio-words"))
    elif name in ("compare", "egemaps"):
      per_set.append(runtime.process_zero_first(lambda: tables_lib.from_audio(  # pylint: disable=cell-var-from-loop
          audio_sources, name, feature_cache, processes=processes, log=log), f"{name} features"))
  return {s: tables_lib.fuse([t[s] for t in per_set]) for s in SPLITS}


def standardiser(train_features):
  """Mean and std [D] of the training features; constant features get std 1 (they stay 0 after scaling)."""
  mean = train_features.mean(0, dtype=np.float64)
  std = train_features.std(0, dtype=np.float64)
  return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Steps.

EXVO_TARGETS = ("emotions", "age", "country")


def losses(outputs, batch, names=EXVO_TARGETS):
  """Per-target losses on a batch ({name: scalar}); unknown labels (NaN ages, country -1) are left out."""
  chosen = [targets.get(name) for name in names]
  return {t.name: t.loss(outputs[t.name], batch[t.field]) for t in chosen}


def total_loss(parts, log_sigma=None, weights=None):
  """Weighted sum of the target losses (weights default to 1), or Kendall et al.'s uncertainty weighting
  sum_i exp(-2 s_i) L_i / 2 + s_i; targets in the order of `parts`."""
  stacked = jnp.stack(list(parts.values()))
  if log_sigma is not None:
    return jnp.sum(0.5 * jnp.exp(-2.0 * log_sigma) * stacked + log_sigma)
  return stacked.sum() if weights is None else jnp.sum(jnp.asarray(weights, stacked.dtype) * stacked)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one training run optimises and how it is scored.

  Attributes:
    model: the network.
    label_keys: batch fields (besides `features`) the loss reads.
    loss: (outputs, batch, params) -> (total loss, {name: part}).
    score: (predictions {head: [N, ...]}, table) -> {metric: value}.
    select: the validation metric that picks the best epoch (larger is better).
    extra_params: parameters beside the network's, e.g. learned loss weights.
    describe: scores -> the text logged after an evaluation; None: every score.
  """
  model: mlp.MultiTaskMLP
  label_keys: tuple[str, ...]
  loss: Callable
  score: Callable
  select: str
  extra_params: dict = dataclasses.field(default_factory=dict)
  describe: Callable | None = None


def _head(target):
  """The MLP head of a target: (name, outputs, 'sigmoid' | 'scalar' | 'linear' | 'logits')."""
  kind = "scalar" if target.scalar else target.activation
  return target.name, target.num_outputs, kind


def targets_objective(names, score_fn, select, *, weights=None, uncertainty=False, age_bias=0.0, describe=None):
  """One head per target on the shared trunk; the loss is the weighted (or uncertainty-weighted) sum of the
  targets' own losses. `score_fn` and `select` say how a run is scored and which metric picks its best epoch."""
  chosen = [targets.get(n) for n in names]
  model = mlp.MultiTaskMLP(heads=tuple(_head(t) for t in chosen), age_bias_init=age_bias)

  def loss(outputs, batch, params):
    parts = losses(outputs, batch, names)
    return total_loss(parts, params["log_sigma"] if uncertainty else None, weights), parts

  extra = {"log_sigma": np.full((len(names),), -0.33, np.float32)} if uncertainty else {}
  return Objective(model, tuple(t.field for t in chosen), loss, score_fn, select, extra, describe)


def exvo_objective(config, train):
  """The ExVo-MultiTask objective: emotions + age + country, selected on S_MTL."""
  return targets_objective(EXVO_TARGETS, score, "s_mtl", uncertainty=config.uncertainty_weighting,
                           age_bias=float(np.nanmean(train.age)) if config.age_bias_at_mean else 0.0)


def category_objective():
  """EmoGator's categories on the same trunk, selected on UAR."""
  category = targets.get("category")
  return targets_objective(("category",), lambda predictions, table: category.score(
      predictions["category"], table.category), "uar")


def make_train_step(objective):
  """Per-device (pmap-style) step: (state, batch) -> (state, metrics); gradients averaged over `data`."""

  def train_step(state, batch):
    def loss_fn(params):
      outputs = objective.model.apply({"params": params["mlp"]}, batch["features"])
      return objective.loss(outputs, batch, params)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    step_metrics = jax.lax.pmean({"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}},
                                 parallel.DATA_AXIS)
    return state.apply_gradients(grads=grads), step_metrics

  return train_step


def make_predict_step(model):
  def predict_step(params, batch):
    return model.apply({"params": params["mlp"]}, batch["features"])
  return predict_step


def predict(predict_fn, params, table, batch_size):
  """Predictions for every row of `table`: {head: [N, ...]} numpy arrays (every process gets all of them)."""
  records = table.records()
  return parallel.predict_all(
      lambda batch: predict_fn(params, batch), len(records), predict_fn.mesh, batch_size=batch_size,
      make_batches=lambda index, count, local: pipeline.make_pipeline(
          records, batch_size=local, train=False, shard_index=index, shard_count=count),
      fields=("features",))


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
# Training one seed.

def train_seed(config, objective, tables, seed, workdir, mesh, log=print):
  """Trains one seed with early stopping on `objective.select`.

  Returns (best params, predict_fn, {best_epoch, val (scores of the best epoch), history}).
  """
  train = tables["train"]
  init_rng = jax.random.PRNGKey(seed)
  dim = train.features.shape[1]

  def make_state():
    params = {"mlp": objective.model.init(init_rng, jnp.zeros((1, dim), jnp.float32))["params"],
              **{k: jnp.asarray(v) for k, v in objective.extra_params.items()}}
    return TrainState.create(apply_fn=objective.model.apply, params=params, tx=optax.adam(config.learning_rate))

  # Predictions stay split over devices like their batch (out_specs P('data')), unlike the replicated state.
  predict_fn = parallel.data_parallel(make_predict_step(objective.model), mesh, donate_argnums=(),
                                      out_specs=jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  records = train.records()
  steps_per_epoch = len(records) // config.batch_size
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  keys = ("features", *objective.label_keys)
  processes = jax.process_count()
  if config.batch_size % processes:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {processes} processes")
  trainer = loop.Trainer(
      name=f"seed {seed}", directory=os.path.join(workdir, "checkpoints"), init_state=make_state,
      record=seed_record(config, seed),
      step=parallel.data_parallel(make_train_step(objective), mesh),
      # One pipeline per epoch, seeded by (seed, epoch); each process reads its rows of every global batch.
      batches=lambda epoch: pipeline.make_pipeline(
          records, batch_size=config.batch_size // processes, train=True, num_epochs=1, seed=seed * 1000 + epoch,
          shard_index=jax.process_index(), shard_count=processes),
      to_device=lambda batch: {k: batch[k] for k in keys},
      evaluate=lambda state: objective.score(predict(predict_fn, state.params, tables["validation"], eval_batch),
                                             tables["validation"]),
      best_metric=objective.select, describe=objective.describe, per_item=("clips", config.batch_size), progress_every_s=config.log_every_s,
      log=log)
  # These steps take well under a millisecond: the loss is read back (and SIGTERM agreed) every 50 steps.
  schedule = loop.Schedule(total_steps=steps_per_epoch * config.num_epochs, steps_per_epoch=steps_per_epoch,
                           eval_every=steps_per_epoch, log_every=50, patience=config.patience)
  result = loop.train(trainer, schedule, mesh)
  best = result.best_entry()
  return result.best_state.params, predict_fn, {
      "best_epoch": best["epoch"], "history": result.history,
      "val": {k: v for k, v in best.items() if k not in ("step", "epoch") and not k.startswith("train_")}}


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


def train_seeds(config, objective, tables, workdir, mesh):
  """`config.num_seeds` runs; returns [(seed result, params, predict_fn)]."""
  runs = []
  for k in range(config.num_seeds):
    seed = config.seed + k
    params, predict_fn, result = train_seed(config, objective, tables, seed,
                                            os.path.join(workdir, f"seed{seed}"), mesh)
    runs.append(({"seed": seed, **result}, params, predict_fn))
  return runs


def prepare_tables(config, workdir, tables):
  """Standardises every split once with training statistics (saved with the run) and makes the mesh.

  Returns (standardised tables, mesh); an indivisible batch size fails here with a clear message.
  """
  mean, std = standardiser(tables["train"].features)
  if writers.is_writer():
    os.makedirs(workdir, exist_ok=True)
    np.savez(os.path.join(workdir, "standardiser.npz"), mean=mean, std=std)
  mesh = parallel.make_mesh(config.num_devices or None)
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.batch_size to a multiple of the device count")
  scaled = {s: dataclasses.replace(t, features=(t.features - mean) / std) for s, t in tables.items()}
  return scaled, mesh


FEATURE_SETS = ("compare", "egemaps", "boaw", "deepspectrum")


# Keys of a config that shape one seed's MLP, when the config has them (MultiTask's; A-VB adds its tasks and weights).
SEED_RECORD_KEYS = ("features", "learning_rate", "batch_size", "patience", "uncertainty_weighting",
                    "age_bias_at_mean", "tasks", "loss_weights")


def seed_record(config, seed):
  """The configuration that shapes the MLP of one seed."""
  return {**stages.data_record(config), "seed": seed,
          **stages.pick(config, [k for k in SEED_RECORD_KEYS if k in config], exclude=("features.processes",))}


def checkpointed_stages(config, workdir):
  """One stage per seed: `<workdir>/seed<k>/checkpoints`."""
  return [stages.Stage(f"seed {seed}", os.path.join(workdir, f"seed{seed}", "checkpoints"), seed_record(config, seed))
          for seed in range(config.seed, config.seed + config.num_seeds)]


def check_features(config, allowed=FEATURE_SETS):
  """The feature sets are among `allowed`, and there is at least one."""
  config_check.subset(config, "features.sets", allowed)
  if not config.features.sets:
    raise config_check.ConfigError(f"--config.features.sets is empty; choose from {', '.join(allowed)}")


def check_config(config):
  """Fails before any work on a value outside its choices."""
  check_features(config)
  if config.data.dataset == "emogator":
    config_check.subset(config, "features.sets", ("compare", "egemaps"))


def run(config, workdir):
  """Trains `config.num_seeds` MLPs; writes metrics.json (and the ExVo-Multi submission for HUME-VB)."""
  data = config.data
  root = corpus.of_config(data)
  if data.dataset == "emogator":
    return run_categories(config, workdir, root)
  tables = load_tables(config, root, workdir)
  tables["train"] = tables["train"].select(tables["train"].labelled)
  tables, mesh = prepare_tables(config, workdir, tables)
  train = tables["train"]
  dims = train.features.shape[1]
  print(f"multitask on {'+'.join(config.features.sets)} ({dims} dims): {len(train)} train, "
        f"{len(tables['validation'])} val, {len(tables['test'])} test clips, {mesh.size} device(s)")
  runs = train_seeds(config, exvo_objective(config, train), tables, workdir, mesh)
  seeds = [r[0] for r in runs]
  summary = _summary(seeds, SCORES)
  best = int(np.argmax([s["val"]["s_mtl"] for s in seeds]))
  _, params, predict_fn = runs[best]
  eval_batch = max(config.eval_batch_size // mesh.size, 1) * mesh.size
  submission = os.path.join(workdir, f"ExVo-Multi_{config.team}_{config.submission_number}.csv")
  write_submission(submission, tables["test"], predict(predict_fn, params, tables["test"], eval_batch))
  reference = score(mean_predictor(train, len(tables["validation"])), tables["validation"])
  result = {
      "features": list(config.features.sets), "dims": dims, "split": "validation", "seeds": seeds,
      **summary, "train_mean_predictor": reference,
      "submission": os.path.basename(submission), "submission_seed": seeds[best]["seed"],
  }
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
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
  per_set = [runtime.process_zero_first(lambda: tables_lib.from_audio(  # pylint: disable=cell-var-from-loop
      sources, name, feature_cache, processes=config.features.processes or None), f"{name} features")
             for name in config.features.sets]
  tables = {s: tables_lib.fuse([t[s] for t in per_set]) for s in sources}
  tables, mesh = prepare_tables(config, workdir, tables)
  num_categories = len(emogator_lib.CATEGORIES)
  print(f"categories on {'+'.join(config.features.sets)} ({tables['train'].features.shape[1]} dims): "
        f"{len(tables['train'])} train, {len(tables['validation'])} val clips, {num_categories} categories")
  runs = train_seeds(config, category_objective(), tables, workdir, mesh)
  seeds = [r[0] for r in runs]
  result = {"features": list(config.features.sets), "dims": int(tables["train"].features.shape[1]),
            "split": "validation", "seeds": seeds, **_summary(seeds, ("uar",)), "chance_uar": 1 / num_categories}
  writers.write_json(os.path.join(workdir, "metrics.json"), result)
  print(f"val UAR {result['mean']['uar']:.3f} +- {result['std']['uar']:.3f} (chance {1 / num_categories:.3f})")
  return result
