"""Task `generate` (ExVo-Generate): MSG-GAN on log-mel spectrograms, Griffin-Lim to audio, FID / HEEP / S_GEN.

mode=train (default):
1. The FID classifier: Emo18 trained on the Train split (or reused from a FewShot workdir); its 256-d LSTM output at
   the last frame is the embedding. The train-vs-val FID matrix across emotions (the paper's Table 3) is written as
   JSON and a heat-map PNG: it is the floor a generator can reach.
2. The GAN(s): one conditional generator for all emotions (`generator=conditional`, the emotion intensity vector as
   input), or one generator per emotion on that emotion's bin (`per_emotion`, the paper's baseline). Training is
   data-parallel, checkpointed (with the data iterator's position), logs a progress line, and writes spectrogram
   grids of fixed latents as PNG every `sample_every` steps. Every `eval_every` steps the generator's clips are
   scored against the validation bins (FID); the checkpoint with the lowest mean is kept as the best.
3. Then sampling and scoring as in mode=sample.
mode=sample: restores the trained generator(s) (the best checkpoint by validation FID, or the latest: see
`sample.checkpoint`), writes N clips per emotion as 16 kHz wav files (trailing silence
cut) in one folder per emotion (the submission layout), a PNG grid of their spectrograms, and scores.json: FID
per emotion (generated clips vs that emotion's training bin), the generated-vs-train FID matrix (row e: emotion
e's generated clips against every emotion's training clips; the off-diagonal entries are the shuffled-label
control), HEEP and S_GEN from a ratings CSV when `ratings_csv` is given, and a classifier-rated HEEP (the same
formula with the classifier's predicted intensities in place of human ratings), reported as such.

Bins: training clips whose label for an emotion is 1.0 (the dominant emotion of the clip). A conditional generator
is asked for emotion e with the intensity vectors of e's training clips, one per generated clip, or with their
mean (`sample.condition`; see `sample_conditions`).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from exvo_jax import checkpoint
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import figures
from exvo_jax import gan as gan_lib
from exvo_jax import loop
from exvo_jax import parallel
from exvo_jax import sampling
from exvo_jax import stages
from exvo_jax import writers
from exvo_jax.data import augment as augment_lib
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.evaluation import fid
from exvo_jax.features import mel
from exvo_jax.models import emo18
from exvo_jax.models import msggan

EMOTIONS = schema.EMOTIONS
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------------------------
# Data.

class Subset:
  """Rows `indices` of a random-access source, itself random-access (grain reads it lazily)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


def emotion_bins(split):
  """{emotion: indices of the split's labelled clips whose label for it is 1.0}."""
  labels = np.nan_to_num(split.labels.astype(np.float64), nan=-1.0)
  return {e: np.flatnonzero(split.labelled & (labels[:, k] >= 1.0)) for k, e in enumerate(EMOTIONS)}


def _augmentation(config):
  a = config.augment
  augmentation = augment_lib.Augmentation(speed=a.speed, pitch_semitones=a.pitch_semitones,
                                          shift_seconds=a.shift_seconds, noise_std=a.noise_std)
  return augmentation if augmentation.active else None


# ---------------------------------------------------------------------------------------------------------------
# Training.

def gan_batches(config, source):
  """This process's stream of GAN training batches: random 4.1 s crops of `source`'s clips, augmented (`:augment`)."""
  processes = jax.process_count()
  return pipeline.make_pipeline(
      source, batch_size=config.gan.batch_size // processes, train=True, seed=config.seed,
      audio=pipeline.AudioOptions(clip_samples=mel.CLIP_SAMPLES, random_crop=True),
      shard_index=jax.process_index(), shard_count=processes, augment=_augmentation(config))


def train_gan(config, gan, name, source, mesh, workdir, *, grid_conditions=None, evaluate=None, log=print):
  """Trains one GAN on `source` (the clips of its bin, or all training clips); returns the `loop.Result`.

  evaluate: None, or `state -> {"val_fid": float, ...}` (`make_validation_fid`), called every `gan.eval_every`
  steps and at the last one; the state with the lowest finite `val_fid` is also kept as the best checkpoint
  (sampling reads it, `sample.checkpoint`). GAN training does not converge to a point: the sample quality of one run
  rises and falls by a wide margin between checkpoints, so the step to sample is chosen on held-out clips rather
  than being whichever came last.
  """
  gc = config.gan
  if gc.batch_size % mesh.size:
    raise ValueError(f"gan.batch_size {gc.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.gan.batch_size to a multiple of the device count")
  if len(source) < gc.batch_size:
    raise ValueError(f"GAN {name!r}: {len(source)} training clips, fewer than one batch of {gc.batch_size}; "
                     "lower --config.gan.batch_size or leave this emotion out (--config.emotions)")
  generate = gan_lib.make_generate_fn(gan)
  grid_latent = msggan.sample_latent(jax.random.PRNGKey(config.seed + 1), gc.grid_size)
  grid_condition = None
  if gan.conditional:
    grid_condition = jnp.asarray(np.resize(grid_conditions, (gc.grid_size, len(EMOTIONS))), jnp.float32)
  samples_dir = os.path.join(workdir, "train_samples")
  if writers.is_writer():
    os.makedirs(samples_dir, exist_ok=True)

  grid_names = None  # a conditional grid cycles through the emotions' bin means (`grid_conditions`' rows)
  if gan.conditional:
    emotions = list(config.emotions or EMOTIONS)
    grid_names = [emotions[i % len(emotions)] for i in range(gc.grid_size)]

  def write_grid(step, state, events):
    grid = np.asarray(generate(state.generator_ema, grid_latent, grid_condition))
    fig = figures.spectrogram_grid(grid, columns=min(gc.grid_size, 5), vmin=mel.PAD_VALUE, names=grid_names,
                                   title=f"GAN {name}, step {step} (EMA generator, fixed latents)")
    figures.save(fig, os.path.join(samples_dir, f"{name}_step{step:06d}.png"))
    if events is not None:
      events.image(step, "samples/spectrograms", figures.to_image(fig))

  trainer = loop.Trainer(
      name=f"GAN {name}", directory=gan_directory(workdir, name), record=gan_record(config, name),
      init_state=lambda: gan_lib.init_gan_state(gan, config.seed),
      step=parallel.data_parallel(gan_lib.make_gan_step(gan, global_batch=gc.batch_size, seed=config.seed), mesh),
      batches=lambda _: gan_batches(config, source),
      to_device=lambda batch: {"audio": batch["audio"], "condition": batch["emotions"].astype(np.float32)},
      evaluate=evaluate, best_metric=fid.BEST_METRIC, best_mode="min",
      metrics_log=os.path.join(workdir, f"metrics_log_gan_{name}.jsonl"), actions=((gc.sample_every, write_grid),),
      learning_rates=lambda _: {"generator": gc.generator_learning_rate,
                                "discriminator": gc.discriminator_learning_rate},
      describe=fid.describe_validation, per_item=("clips", gc.batch_size), progress_every_s=gc.log_every_s, log=log)
  schedule = loop.Schedule(total_steps=gc.steps, eval_every=gc.eval_every if evaluate else 0,
                           checkpoint_every=gc.checkpoint_every, log_every=gc.log_every)
  return loop.train(trainer, schedule, mesh)


def write_sample_events(config, workdir, generated, grid_image, sampled):
  """The sampled clips' spectrogram grid and the first `sample.tensorboard_clips` clips of every emotion as audio,
  in the TensorBoard run `samples`, at the sampled GAN step."""
  step = max(int(which["step"]) for which in sampled.values())
  events = writers.EventLog(writers.events_folder(workdir, "samples"))
  try:
    events.image(step, "samples/spectrograms", grid_image)
    for emotion, records in generated.items():
      for record in records[:config.sample.tensorboard_clips]:
        events.audio(step, f"samples/{emotion}/{record['file_id']}", record["audio"], schema.SAMPLE_RATE)
  finally:
    events.close()


def restore_gan(config, gan, name, mesh, workdir):
  """(state, which) of the trained GAN in `workdir` to sample, or a clear error when it has not been trained.

  `config.sample.checkpoint`: "best" (default) restores the checkpoint with the lowest validation FID
  (`train_gan`'s `evaluate`), or the latest when none was scored (gan.eval_every = 0, or a run trained before
  this existed); "latest" restores the newest. `which` records the choice for scores.json: {"checkpoint",
  "step", "val_fid" (None for an unscored latest), "latest_step"}.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  directory = gan_directory(workdir, name)
  with checkpoint.Checkpointer(directory, best_metric=fid.BEST_METRIC, best_mode="min") as ckpt:
    abstract = checkpoint.with_sharding(jax.eval_shape(lambda: gan_lib.init_gan_state(gan, config.seed)),
                                        replicated)
    resumed = ckpt.restore_latest(abstract)
    if resumed is None:
      raise FileNotFoundError(f"mode=sample: no trained GAN {name!r} in {directory}; train it first with the same "
                              "--workdir (mode=train)")
    latest = resumed[0]
    if latest < config.gan.steps:
      print(f"GAN {name}: the latest checkpoint is step {latest} of {config.gan.steps} (training was not finished)")
    which = {"checkpoint": "latest", "step": latest, "val_fid": None, "latest_step": latest}
    best = ckpt.best_step()
    if config.sample.checkpoint == "best" and best is not None:
      which.update(checkpoint="best", step=best, val_fid=ckpt.best_value)
      state = ckpt.restore_best(abstract)
    else:
      if config.sample.checkpoint == "best":
        print(f"GAN {name}: no checkpoint was scored on the validation clips (gan.eval_every = 0?); sampling the "
              "latest")
      state = resumed[1]
  print(f"GAN {name}: sampling step {which['step']} ({which['checkpoint']}"
        + ("" if which["val_fid"] is None else f", validation FID {which['val_fid']:.3f}") + ")")
  return state, which


# ---------------------------------------------------------------------------------------------------------------
# The FID classifier, validation and sampling.

def train_classifier(config, splits, mesh, workdir):
  """Emo18 on Train (best epoch by validation mean CCC); returns (`fid.Classifier`, its training history).

  With `classifier.workdir` set, the finished classifier of that run is reused read only: the run must have been
  made with the same classifier configuration, and nothing in its workdir is written.
  """
  c = config.classifier
  target = emo18_trainer.make_target("hume_vb")
  model, settings = _classifier_model(config), _classifier_settings(config)
  variables, history, predict_fn, _ = emo18_trainer.train_base(
      settings, model, target, splits["train"], splits["validation"], mesh, classifier_workdir(config, workdir),
      record=classifier_record(config), read_only=bool(c.workdir), name="FID classifier")
  classifier = fid.Classifier(predict_fn, parallel.replicate(variables, mesh), settings.audio_options(),
                              max(c.eval_batch_size // mesh.size, 1) * mesh.size, target.num_outputs, c.hidden)
  return classifier, history


def make_validation_fid(config, gan, emotions, classifier, val_emb, conditions):
  """`state -> fid.validation_scores` of one GAN's clips, to pick the checkpoint to sample.

  Generates `gan.eval_per_emotion` clips of each of `emotions` from fixed latents (seed sample.seed + 1, so every
  evaluation compares like with like, and none of them are the clips sampled at the end), with the weights
  sampling uses (`sample.weights`), turned into audio as sampling does, and scores them against the validation
  bins (`val_emb`), which are held out from GAN and classifier training.
  """
  pick = sampling.pick_weights(config.sample.weights)
  generate = gan_lib.make_generate_fn(gan)  # made once: every evaluation reuses its compilation

  def evaluate(state):
    generated = {e: _sample(config, generate, pick(state), e, conditions[e] if gan.conditional else None, None,
                            num=config.gan.eval_per_emotion, seed=config.sample.seed + 1)[0] for e in emotions}
    return fid.validation_scores(classifier, generated, val_emb, num_shuffles=config.sample.control_shuffles,
                                 seed=config.seed)
  return evaluate


def _sample(config, generate, params, emotion, condition, out_dir, *, num, seed):
  s = config.sample
  return sampling.sample_clips(generate, params, emotion, condition, out_dir, num=num, seed=seed,
                               batch_size=s.batch_size, griffin_lim_iters=s.griffin_lim_iters,
                               griffin_lim_seed=config.seed)


def generator_for(config, emotion, conditions, gans):
  """(gan, params, condition or None) that produce `emotion`; params per `config.sample.weights`."""
  pick = sampling.pick_weights(config.sample.weights)
  gan, state = gans["all"] if config.generator == "conditional" else gans[emotion]
  return gan, pick(state), conditions[emotion] if config.generator == "conditional" else None


# ---------------------------------------------------------------------------------------------------------------
# Checkpointed stages and what shapes them.

GAN_EXCLUDED = ("gan.steps", "gan.log_every", "gan.log_every_s", "gan.sample_every", "gan.grid_size",
                "gan.checkpoint_every")
# Only the checkpoint ranking (gan.eval_every > 0) reads these: mode=sample does not compare them.
RANKING_KEYS = ("sample.weights", "sample.seed", "sample.griffin_lim_iters", "sample.condition",
                "sample.control_shuffles")


def classifier_workdir(config, workdir):
  return config.classifier.workdir or os.path.join(workdir, "classifier")


def _classifier_model(config):
  return emo18.Emo18(num_outputs=len(EMOTIONS), hidden=config.classifier.hidden, bn_axis_name=parallel.DATA_AXIS)


def _classifier_settings(config):
  c = config.classifier
  return emo18_trainer.BaseSettings(
      seed=config.seed, learning_rate=c.learning_rate, batch_size=c.batch_size, eval_batch_size=c.eval_batch_size,
      max_seconds=c.max_seconds, num_epochs=c.num_epochs, log_every_s=config.gan.log_every_s)


def classifier_record(config):
  """What shapes the FID classifier: the keys of any Emo18 base model (a FewShot run's can be reused)."""
  return emo18_trainer.base_record(stages.data_record(config), _classifier_settings(config),
                                   _classifier_model(config))


def gan_directory(workdir, name):
  return os.path.join(workdir, "checkpoints", f"gan_{name}")


def _gan_shape_record(config):
  return {**stages.data_record(config), **stages.pick(config, ("seed", "generator", "gan", "augment"),
                                                      exclude=GAN_EXCLUDED)}


def gan_record(config, name):
  """What shapes GAN `name`: its data, recipe and augmentation and, when checkpoints are ranked on validation FID,
  the classifier and the sampling that rank them."""
  record = _gan_shape_record(config)
  if config.gan.eval_every > 0:
    record.update({f"classifier.{k}": v for k, v in classifier_record(config).items() if not k.startswith("data.")},
                  **stages.pick(config, RANKING_KEYS))
    if name == "all":
      record["emotions"] = list(config.emotions or EMOTIONS)
  return record


def checkpointed_stages(config, workdir):
  """The FID classifier (read only from `classifier.workdir`) and the GANs (read only in mode=sample)."""
  result = []
  if config.mode == "train" or config.score:
    result.append(stages.Stage("FID classifier", emo18_trainer.base_directory(classifier_workdir(config, workdir)),
                               classifier_record(config), read_only=bool(config.classifier.workdir)))
  for name in ["all"] if config.generator == "conditional" else list(config.emotions or EMOTIONS):
    sampling_only = config.mode == "sample"
    if sampling_only and not os.path.isdir(gan_directory(workdir, name)):
      continue  # restore_gan says to train it first
    result.append(stages.Stage(f"GAN {name}", gan_directory(workdir, name), gan_record(config, name),
                               read_only=sampling_only,
                               compare=tuple(_gan_shape_record(config)) if sampling_only else None))
  return result


# ---------------------------------------------------------------------------------------------------------------
# The task.

def check_config(config):
  """Fails before any work on a value outside its choices (see `config_check`)."""
  config_check.choice(config, "mode", ("train", "sample"))
  config_check.choice(config, "generator", ("conditional", "per_emotion"))
  config_check.choice(config, "gan.optimiser", tuple(gan_lib.OPTIMISERS))
  config_check.choice(config, "sample.checkpoint", ("best", "latest"))
  config_check.choice(config, "sample.condition", sampling.CONDITIONS)
  config_check.choice(config, "sample.weights", sampling.WEIGHTS)
  config_check.choice(config, "data.dataset", ("hume_vb",), why="generate needs the HUME-VB emotion intensities")
  config_check.subset(config, "emotions", EMOTIONS)


def run(config, workdir):
  data = config.data
  root = corpus.of_config(data)
  builder, _ = builders.prepare(data.dataset, root, config="audio", data_dir=data.tfds_dir or None,
                                strict=data.strict)
  target = emo18_trainer.make_target(data.dataset)
  splits = {s: emo18_trainer.Split.read(builders.data_source(builder, s), target) for s in SPLITS}
  mesh = parallel.make_mesh(config.num_devices or None)
  train, val = splits["train"], splits["validation"]
  bins = emotion_bins(train)
  emotions = list(config.emotions or EMOTIONS)
  labels = np.nan_to_num(train.labels.astype(np.float64))
  conditions = sampling.sample_conditions(config.sample.condition, labels, bins)
  bins_mean = {e: rows.mean(0) for e, rows in sampling.bin_label_rows(labels, bins).items()}  # training grids' rows
  print(f"generate ({config.mode}): {config.generator} MSG-GAN, {config.gan.optimiser}, {config.gan.steps} steps "
        f"of {config.gan.batch_size}; train bins " + ", ".join(f"{e} {len(bins[e])}" for e in EMOTIONS)
        + f"; {mesh.size} device(s)")
  start = time.monotonic()

  classifier, floor, train_emb, val_emb = None, None, None, None
  if config.mode == "train" or config.score:
    classifier, history = train_classifier(config, splits, mesh, workdir)
    figures.save(figures.training_curves({"FID classifier": history}, metric=emo18_trainer.make_target(
        "hume_vb").metric), os.path.join(workdir, "training_curves_classifier.png"))
    val_bins = emotion_bins(val)
    train_emb = {e: classifier.embed(Subset(train.source, bins[e]))[1] for e in EMOTIONS}
    val_emb = {e: classifier.embed(Subset(val.source, val_bins[e]))[1] for e in EMOTIONS}
    floor = dict(fid.train_val_floor(train_emb, val_emb), classifier_history=history)
    writers.write_json(os.path.join(workdir, "train_val_fid.json"), floor)
    figures.save(figures.fid_matrix(floor["fid"], EMOTIONS, EMOTIONS, title="FID of the classifier's embeddings, "
                                    "Train vs Val bins (the floor)", row_label="Train bin",
                                    column_label="Val bin"), os.path.join(workdir, "train_val_fid.png"))
    print("train-vs-val FID (rows train, columns val), diagonal: "
          + ", ".join(f"{e} {floor['fid'][k, k]:.2f}" for k, e in enumerate(EMOTIONS)))

  gans, sampled = {}, {}
  for name in ["all"] if config.generator == "conditional" else emotions:
    gan = gan_lib.make_gan(config.gan, conditional=config.generator == "conditional")
    if config.mode == "train":
      source = Subset(train.source, np.flatnonzero(train.labelled) if name == "all" else bins[name])
      grid = np.stack([bins_mean[e] for e in emotions]) if gan.conditional else None
      evaluate = None
      if config.gan.eval_every > 0:
        evaluate = make_validation_fid(config, gan, emotions if name == "all" else [name], classifier, val_emb,
                                       conditions)
      trained = train_gan(config, gan, name, source, mesh, workdir, grid_conditions=grid, evaluate=evaluate)
      figures.save(figures.training_curves({f"GAN {name}": trained.history}, metric=fid.BEST_METRIC, mode="min",
                                           losses=("train_g_loss", "train_d_loss")),
                   os.path.join(workdir, f"training_curves_gan_{name}.png"))
    state, sampled[name] = restore_gan(config, gan, name, mesh, workdir)  # the best scored, per sample.checkpoint
    gans[name] = (gan, state)

  out_dir = os.path.join(workdir, "samples")
  generated, grids, generate_fns = {}, [], {}
  for e in emotions:
    gan, params, condition = generator_for(config, e, conditions, gans)
    generate = generate_fns.setdefault(id(gan), gan_lib.make_generate_fn(gan))
    generated[e], spectrograms = _sample(config, generate, params, e, condition, out_dir,
                                         num=config.sample.num_per_emotion, seed=config.sample.seed)
    grids.append(spectrograms[:config.sample.grid_columns])
  grid = figures.spectrogram_grid(np.concatenate(grids), columns=config.sample.grid_columns, vmin=mel.PAD_VALUE,
                                  row_names=emotions, title="generated clips, one row per emotion")
  figures.save(grid, os.path.join(out_dir, "spectrograms.png"))
  write_sample_events(config, workdir, generated, figures.to_image(grid), sampled)
  print(f"wrote {sum(len(v) for v in generated.values())} clips to {os.path.abspath(out_dir)} "
        f"({config.sample.num_per_emotion} per emotion; one row per emotion in spectrograms.png)")

  result = {"mode": config.mode, "samples": out_dir, "seconds": None, "sampled_checkpoints": sampled}
  if classifier is not None:
    result.update(generator=config.generator, optimiser=config.gan.optimiser, steps=config.gan.steps)
    result.update(fid.score(classifier, generated, train_emb, {e: len(bins[e]) for e in EMOTIONS},
                            num_shuffles=config.sample.control_shuffles, seed=config.seed,
                            ratings_csv=config.ratings_csv))
    result["train_val_fid_diagonal"] = [float(floor["fid"][k, k]) for k in range(len(EMOTIONS))]
    print(fid.format_scores(result))
    matrix = result["generated_vs_train_fid"]
    figures.save(figures.fid_matrix(matrix["fid"], matrix["rows"], matrix["columns"],
                                    title="FID of generated clips against each Train bin", row_label="generated as",
                                    column_label="Train bin"), os.path.join(workdir, "generated_vs_train_fid.png"))
  result["seconds"] = time.monotonic() - start
  writers.write_json(os.path.join(workdir, "scores.json"), result)
  return result
