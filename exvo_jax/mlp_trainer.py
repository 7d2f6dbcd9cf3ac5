"""Training the feature MLP (`models/mlp.MultiTaskMLP`) on a list of targets: feature tables, standardisation,
objectives, the data-parallel steps, seeds trained by the one loop with early stopping, and their stage records.

Shared by the ExVo-MultiTask task (emotions, age, country; EmoGator's categories) and the A-VB task (High, Two,
Culture, Type). Like `gan.make_gan`, it reads the config's MLP keys (features, learning_rate, batch_size,
eval_batch_size, num_epochs, patience, num_seeds, seed, log_every_s, num_devices, data) instead of a settings
dataclass: both tasks' configs share them.
"""

import dataclasses
import hashlib
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from exvo_jax import checkpoint
from exvo_jax import config_check
from exvo_jax import loop
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import stages
from exvo_jax import targets
from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import pipeline
from exvo_jax.features import ssl_embeddings
from exvo_jax.features import tables as tables_lib
from exvo_jax.models import mlp
from exvo_jax.models import ssl_checkpoint
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
    per_set.append(audio_feature_tables(config, name, audio_sources, feature_cache, workdir, log))
  return {s: tables_lib.fuse([t[s] for t in per_set]) for s in SPLITS}


def audio_feature_tables(config, name, audio_sources, feature_cache, workdir, log=print):
  """{split: SplitTable} of one feature set computed from audio records {split: source} ('train' among them):
  openSMILE functionals, bag-of-audio-words or encoder embeddings, through the corpus's feature cache. Process 0
  extracts into the shared cache first and the other processes then read it; encoder embeddings are split between
  the processes (`ssl_embeddings.extract`)."""
  features = config.features
  processes = features.processes or None
  if name == "boaw":
    codebook = os.path.join(workdir, f"codebook{features.boaw_words}.npz") if writers.is_writer() else None
    return runtime.process_zero_first(lambda: tables_lib.bag_of_audio_words(
        audio_sources, features.boaw_words, feature_cache, seed=config.seed,
        kmeans_iterations=features.boaw_kmeans_iterations, num_assignments=features.boaw_assignments,
        processes=processes, log=log, codebook_path=codebook), "bag-of-audio-words")
  if name == "ssl":
    enc = config.encoder
    encoder = ssl_embeddings.load_encoder(enc.checkpoint, enc.seed, log=log)
    cache = ssl_embeddings.cache_folder(feature_cache, encoder, enc.pooling)
    layer = encoder_layer(config, encoder.config)
    # Every process takes part: the clips are split between them, and process 0 writes the cache.
    return tables_lib.from_encoder(audio_sources, encoder, cache, layer=layer, pooling=enc.pooling,
                                   batch_size=enc.batch_size, log=log)
  return runtime.process_zero_first(lambda: tables_lib.from_audio(
      audio_sources, name, feature_cache, processes=processes, log=log), f"{name} features")


def encoder_summary(config):
  """{'encoder': what metrics.json records of it} when its embeddings are used, else {} (other runs' metrics.json
  stay as they were)."""
  if "ssl" not in config.features.sets:
    return {}
  return {"encoder": {**encoder_identity(config.encoder), "pooling": config.encoder.pooling}}


def encoder_identity(encoder):
  """Which encoder `config.encoder` names, for metrics.json: its checkpoint (or the random one's seed) and layer."""
  return {"checkpoint": encoder.checkpoint or None, "untrained": not encoder.checkpoint, "layer": str(encoder.layer),
          **({"seed": encoder.seed} if not encoder.checkpoint else {})}


def encoder_config(config):
  """The EncoderConfig of `config.encoder` (the checkpoint's config.json, or the random encoder's), read cheaply."""
  if config.encoder.checkpoint:
    return ssl_checkpoint.read_config(config.encoder.checkpoint)
  return ssl_embeddings.RANDOM_ENCODER


def encoder_layer(config, encoder):
  """The hidden state the MLP reads: its index, or None for all of them (the learned weighted sum)."""
  layer = str(config.encoder.layer)
  if layer == "weighted":
    return None
  return encoder.num_hidden_layers if layer == "last" else int(layer)


def input_layers(config):
  """How many layers the MLP's input holds: the encoder's hidden states for the weighted sum, else 1."""
  if "ssl" in config.features.sets and str(config.encoder.layer) == "weighted":
    return encoder_config(config).num_hidden_layers + 1
  return 1


def standardiser(train_features):
  """Mean and std [D] of the training features; constant features get std 1 (they stay 0 after scaling)."""
  mean = train_features.mean(0, dtype=np.float64)
  std = train_features.std(0, dtype=np.float64)
  return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Objectives and steps.

def losses(outputs, batch, names):
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


def targets_objective(names, score_fn, select, *, weights=None, uncertainty=False, age_bias=0.0, describe=None,
                      layers=1):
  """One head per target on the shared trunk; the loss is the weighted (or uncertainty-weighted) sum of the
  targets' own losses. `score_fn` and `select` say how a run is scored and which metric picks its best epoch.
  `layers` > 1: the features are that many layers' embeddings, combined by a learned softmax-weighted sum."""
  chosen = [targets.get(n) for n in names]
  model = mlp.MultiTaskMLP(heads=tuple(_head(t) for t in chosen), age_bias_init=age_bias, layers=layers)

  def loss(outputs, batch, params):
    parts = losses(outputs, batch, names)
    return total_loss(parts, params["log_sigma"] if uncertainty else None, weights), parts

  extra = {"log_sigma": np.full((len(names),), -0.33, np.float32)} if uncertainty else {}
  return Objective(model, tuple(t.field for t in chosen), loss, score_fn, select, extra, describe)


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


# ---------------------------------------------------------------------------------------------------------------
# Training seeds.

def state_fn(config, objective, dim, seed):
  """() -> a fresh TrainState of one seed's MLP on `dim` features (with the objective's extra parameters)."""

  def make_state():
    params = {"mlp": objective.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim), jnp.float32))["params"],
              **{k: jnp.asarray(v) for k, v in objective.extra_params.items()}}
    return TrainState.create(apply_fn=objective.model.apply, params=params, tx=optax.adam(config.learning_rate))

  return make_state


def restore_seed(config, objective, dim, seed, workdir):
  """The best parameters of a trained seed (`train_seed` in `workdir/seed<k>`), restored on one device, read only."""
  abstract = checkpoint.with_sharding(jax.eval_shape(state_fn(config, objective, dim, seed)),
                                      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  directory = os.path.join(workdir, f"seed{seed}", "checkpoints")
  with checkpoint.Checkpointer(directory, best_metric=objective.select, best_mode="max", read_only=True) as ckpt:
    state = ckpt.restore_best(abstract)
  if state is None:
    raise FileNotFoundError(f"{directory}: no best checkpoint of seed {seed}; finish the run first (same command "
                            "and --workdir)")
  return state.params


def train_seed(config, objective, tables, seed, workdir, mesh, log=print):
  """Trains one seed with early stopping on `objective.select`.

  Returns (best params, predict_fn, {best_epoch, val (scores of the best epoch), history}).
  """
  train = tables["train"]
  make_state = state_fn(config, objective, train.features.shape[1], seed)

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
      best_metric=objective.select, describe=objective.describe, per_item=("clips", config.batch_size),
      metrics_log=os.path.join(workdir, "metrics_log.jsonl"), learning_rates=lambda _: {"adam": config.learning_rate},
      progress_every_s=config.log_every_s, log=log)
  # These steps take well under a millisecond: the loss is read back (and SIGTERM agreed) every 50 steps.
  schedule = loop.Schedule(total_steps=steps_per_epoch * config.num_epochs, steps_per_epoch=steps_per_epoch,
                           eval_every=steps_per_epoch, log_every=50, patience=config.patience)
  result = loop.train(trainer, schedule, mesh)
  best = result.best_entry()
  return result.best_state.params, predict_fn, {
      "best_epoch": best["epoch"], "history": result.history,
      "val": {k: v for k, v in best.items() if k not in ("step", "epoch") and not k.startswith("train_")}}


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


# ---------------------------------------------------------------------------------------------------------------
# Config checks and stage records.

FEATURE_SETS = ("compare", "egemaps", "boaw", "deepspectrum", "ssl")


# Keys of a config that shape one seed's MLP, when the config has them (MultiTask's; A-VB adds its tasks and weights).
SEED_RECORD_KEYS = ("features", "learning_rate", "batch_size", "patience", "uncertainty_weighting",
                    "age_bias_at_mean", "tasks", "loss_weights")


def seed_record(config, seed):
  """The configuration that shapes the MLP of one seed. With the encoder's embeddings, its settings too, and the
  checkpoint as what identifies its weights (`encoder_fingerprint`) rather than its path; the records of other
  feature sets are as before."""
  keys = [k for k in SEED_RECORD_KEYS if k in config]
  exclude = ["features.processes"]
  record = {}
  if "ssl" in config.features.sets:
    keys.append("encoder")
    exclude += ["encoder.batch_size", "encoder.checkpoint"] + (["encoder.seed"] if config.encoder.checkpoint else [])
    record["encoder.weights"] = encoder_fingerprint(config.encoder.checkpoint)
  return {**stages.data_record(config), "seed": seed, **stages.pick(config, keys, exclude=exclude), **record}


def encoder_fingerprint(checkpoint):
  """What identifies a checkpoint's weights without reading them: a hash of its config.json and of each weight
  file's name and size ('random' without a checkpoint)."""
  if not checkpoint:
    return "random"
  digest = hashlib.sha256(pathlib.Path(checkpoint, ssl_checkpoint.CONFIG_FILE).read_bytes())
  for path in ssl_checkpoint.weight_files(checkpoint):
    digest.update(f"{path.name}:{path.stat().st_size}".encode())
  return digest.hexdigest()[:16]


def checkpointed_stages(config, workdir):
  """One stage per seed: `<workdir>/seed<k>/checkpoints`."""
  return [stages.Stage(f"seed {seed}", os.path.join(workdir, f"seed{seed}", "checkpoints"), seed_record(config, seed))
          for seed in range(config.seed, config.seed + config.num_seeds)]


def check_features(config, allowed=FEATURE_SETS):
  """The feature sets are among `allowed`, and there is at least one; the encoder's settings, with its
  checkpoint's config.json read (not its weights), when its embeddings are used."""
  config_check.subset(config, "features.sets", allowed)
  if not config.features.sets:
    raise config_check.ConfigError(f"--config.features.sets is empty; choose from {', '.join(allowed)}")
  if "ssl" not in config.features.sets:
    return
  if config.features.from_release:
    raise config_check.ConfigError("--config.features.from_release=True reads the release's feats/, which hold no "
                                   "encoder embeddings; the ssl set is computed from the audio: leave it False")
  config_check.choice(config, "encoder.pooling", ssl_embeddings.POOLINGS)
  check_encoder(config)
  if str(config.encoder.layer) == "weighted" and tuple(config.features.sets) != ("ssl",):
    raise config_check.ConfigError(
        f"--config.encoder.layer=weighted reads the encoder's layers alone; --config.features.sets is "
        f"{tuple(config.features.sets)}: use one layer (--config.encoder.layer=last or a number) to fuse sets")
  if config.encoder.batch_size < 1:
    raise config_check.ConfigError(f"--config.encoder.batch_size={config.encoder.batch_size}: expected >= 1")


def check_encoder(config):
  """The encoder's checkpoint (its config.json read and its weight files present, not read) and layer; returns its
  EncoderConfig."""
  try:
    encoder = encoder_config(config)
    if config.encoder.checkpoint:
      ssl_checkpoint.weight_files(config.encoder.checkpoint)  # present (read later, after the checks)
  except ssl_checkpoint.CheckpointError as error:
    raise config_check.ConfigError(f"--config.encoder.checkpoint: {error}") from None
  layers = encoder.num_hidden_layers
  layer = str(config.encoder.layer)
  if layer not in ("weighted", "last") and not (layer.lstrip("-").isdigit() and 0 <= int(layer) <= layers):
    raise config_check.ConfigError(
        f"--config.encoder.layer={config.encoder.layer!r}: expected 'weighted', 'last' or a layer number 0..{layers} "
        f"(0 is the first transformer layer's input; this encoder has {layers} layers)")
  return encoder
