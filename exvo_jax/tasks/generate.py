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

import csv
import dataclasses
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile

from exvo_jax import checkpoint
from exvo_jax import end_to_end
from exvo_jax import images
from exvo_jax import metrics
from exvo_jax import optim
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import writers
from exvo_jax.data import augment as augment_lib
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.features import mel
from exvo_jax.models import emo18
from exvo_jax.models import msggan

EMOTIONS = schema.EMOTIONS
SPLITS = ("train", "validation", "test")
BEST_METRIC = "val_fid"  # ranks a GAN's checkpoints (lower is better): see train_gan and restore_gan


# ---------------------------------------------------------------------------------------------------------------
# The GAN state and step.

@flax.struct.dataclass
class GanState:
  """One pytree for the GAN: a generator part (params, EMA params, optimiser state) and a discriminator part."""
  step: jax.Array
  generator: Any
  generator_ema: Any
  generator_opt: Any
  discriminator: Any
  discriminator_opt: Any


@dataclasses.dataclass(frozen=True)
class Gan:
  """The two networks and their optimisers (Adam: alternating D then G steps; ExtraAdam: extragradient)."""
  generator: msggan.Generator
  discriminator: msggan.Discriminator
  generator_tx: Any
  discriminator_tx: Any
  extragradient: bool
  ema_decay: float
  auxiliary_weight: float = 0.0  # > 0: D also predicts the condition (AC-GAN), and G is asked to match it
  diversity_weight: float = 0.0  # > 0: G's mode-seeking term (different latents, same condition -> different clips)

  @property
  def conditional(self):
    return self.generator.num_conditions > 0


def make_gan(gan_config, *, conditional):
  channels = tuple(max(1, c // gan_config.channel_divisor) for c in gan_config.channels)
  num_conditions = len(EMOTIONS) if conditional else 0
  if gan_config.optimiser == "extra_adam":
    make_tx, extragradient = optim.extra_adam, True
  elif gan_config.optimiser == "adam":
    make_tx, extragradient = optim.adam, False
  else:
    raise ValueError(f"gan.optimiser {gan_config.optimiser!r}: use adam or extra_adam")
  auxiliary_weight = gan_config.auxiliary_weight if conditional else 0.0
  diversity_weight = gan_config.diversity_weight if conditional else 0.0
  return Gan(msggan.Generator(channels=channels, num_conditions=num_conditions),
             msggan.Discriminator(channels=channels, num_conditions=num_conditions, auxiliary=auxiliary_weight > 0),
             make_tx(gan_config.generator_learning_rate), make_tx(gan_config.discriminator_learning_rate),
             extragradient, gan_config.ema_decay, auxiliary_weight, diversity_weight)


def init_gan_state(gan, seed):
  key_g, key_d = jax.random.split(jax.random.PRNGKey(seed))
  latent = msggan.sample_latent(key_g, 2)
  condition = jnp.zeros((2, len(EMOTIONS))) if gan.conditional else None
  g_params = gan.generator.init(key_g, latent, condition)["params"]
  fake = gan.generator.apply({"params": g_params}, latent, condition)
  d_params = gan.discriminator.init(key_d, fake, condition)["params"]
  return GanState(step=jnp.zeros((), jnp.int32), generator=g_params, generator_ema=jax.tree.map(jnp.copy, g_params),
                  generator_opt=gan.generator_tx.init(g_params), discriminator=d_params,
                  discriminator_opt=gan.discriminator_tx.init(d_params))


def make_gan_step(gan, *, global_batch, seed):
  """The per-device step `(state, batch) -> (state, metrics)`; batch: audio [b, CLIP_SAMPLES], condition [b, 10].

  The log-mel of the real clips is computed inside the step. Latents are drawn for the whole global batch from
  (seed, step) and each device takes its rows, so the step does not depend on the number of devices. The fakes
  are generated with the real batch's conditions.

  Losses: RaHinge; with `auxiliary_weight` > 0 the discriminator adds weight x the auxiliary loss of its
  condition logits on the REAL clips, and the generator weight x the same loss on its fakes against the
  conditions it was given (AC-GAN with the classifier trained on real data only, so fakes that do not show
  their emotion are not rewarded by a classifier that learnt them).
  With `diversity_weight` > 0 the generator also makes a second batch from fresh latents with the same
  conditions and adds weight x the mode-seeking term of Mao et al. 2019 (MSGAN), 1 / (ratio + 1e-5) averaged over
  the pairs, ratio = mean |G(z1, c) - G(z2, c)| / mean |z1 - z2| per pair (top scale): in a conditional batch the
  minibatch standard deviation sees the spread across conditions, not within one, so it does not stop a generator
  from making one clip per emotion.
  The EMA of the generator warms up: decay min(ema_decay, (1 + t) / (10 + t)) at step t, so that a short run's
  average is not dominated by the random initial weights (with 0.999 from the start they would still weigh
  0.999^2000 = 13.5% after 2,000 steps).
  """
  def latents(step, local_batch, draw=0):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    key = jax.random.fold_in(key, draw) if draw else key
    every = msggan.sample_latent(key, global_batch)
    start = jax.lax.axis_index(parallel.DATA_AXIS) * local_batch
    return jax.lax.dynamic_slice_in_dim(every, start, local_batch)

  weight, diversity = gan.auxiliary_weight, gan.diversity_weight

  def scores(g_params, d_params, real_pyramid, latent, condition):
    """(real scores, fake scores, real condition logits, fake condition logits, the fakes at every scale);
    logits None without AC."""
    fake = gan.generator.apply({"params": g_params}, latent, condition)
    real_out = gan.discriminator.apply({"params": d_params}, real_pyramid, condition)
    fake_out = gan.discriminator.apply({"params": d_params}, fake, condition)
    if weight:
      return real_out[0], fake_out[0], real_out[1], fake_out[1], fake
    return real_out, fake_out, None, None, fake

  def d_loss_fn(d_params, g_params, *inputs):
    real_scores, fake_scores, real_logits, _, _ = scores(jax.lax.stop_gradient(g_params), d_params, *inputs[:3])
    loss = msggan.rahinge_discriminator_loss(real_scores, fake_scores, axis_name=parallel.DATA_AXIS)
    aux = msggan.auxiliary_loss(real_logits, inputs[2]) if weight else jnp.zeros(())
    return loss + weight * aux, (aux, jnp.zeros(()))

  def g_loss_fn(g_params, d_params, *inputs):
    real_scores, fake_scores, _, fake_logits, fake = scores(g_params, jax.lax.stop_gradient(d_params),
                                                           *inputs[:3])
    loss = msggan.rahinge_generator_loss(real_scores, fake_scores, axis_name=parallel.DATA_AXIS)
    aux = msggan.auxiliary_loss(fake_logits, inputs[2]) if weight else jnp.zeros(())
    spread = jnp.zeros(())
    if diversity:  # inputs[3]: the second latents; the first batch of fakes is reused
      _, latent, condition, other = inputs
      second = gan.generator.apply({"params": g_params}, other, condition)[-1]
      spread = mode_seeking_loss(fake[-1], second, latent, other)
    return loss + weight * aux + diversity * spread, (aux, spread)

  def grads(fn, wrt, other, inputs):
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(wrt, other, *inputs)
    return jax.lax.pmean((loss, aux), parallel.DATA_AXIS), jax.lax.pmean(grad, parallel.DATA_AXIS)

  def step(state, batch):
    real = to_image(mel.log_mel(batch["audio"]))[..., None]
    inputs = (msggan.image_pyramid(real), latents(state.step, real.shape[0]),
              batch["condition"] if gan.conditional else None,
              latents(state.step, real.shape[0], draw=1) if diversity else None)
    g, d = state.generator, state.discriminator
    if gan.extragradient:
      _, d_grad = grads(d_loss_fn, d, g, inputs)
      _, g_grad = grads(g_loss_fn, g, d, inputs)
      d_half, d_opt = gan.discriminator_tx.extrapolate(d_grad, state.discriminator_opt, d)
      g_half, g_opt = gan.generator_tx.extrapolate(g_grad, state.generator_opt, g)
      (d_loss, (d_aux, _)), d_grad = grads(d_loss_fn, d_half, g_half, inputs)
      (g_loss, (g_aux, g_spread)), g_grad = grads(g_loss_fn, g_half, d_half, inputs)
      d, d_opt = gan.discriminator_tx.update(d_grad, d_opt)
      g, g_opt = gan.generator_tx.update(g_grad, g_opt)
    else:  # alternating: the discriminator first, then the generator against the updated discriminator
      (d_loss, (d_aux, _)), d_grad = grads(d_loss_fn, d, g, inputs)
      updates, d_opt = gan.discriminator_tx.update(d_grad, state.discriminator_opt, d)
      d = jax.tree.map(jnp.add, d, updates)
      (g_loss, (g_aux, g_spread)), g_grad = grads(g_loss_fn, g, d, inputs)
      updates, g_opt = gan.generator_tx.update(g_grad, state.generator_opt, g)
      g = jax.tree.map(jnp.add, g, updates)
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(gan.ema_decay, (1.0 + t) / (10.0 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.generator_ema, g)
    new_state = GanState(step=state.step + 1, generator=g, generator_ema=ema, generator_opt=g_opt,
                         discriminator=d, discriminator_opt=d_opt)
    result = {"d_loss": d_loss, "g_loss": g_loss}
    if weight:  # the auxiliary parts (included in the losses above, times the weight)
      result.update(d_aux=d_aux, g_aux=g_aux)
    if diversity:
      result.update(g_mode_seeking=g_spread)
    return new_state, result

  return step


def mode_seeking_loss(first, second, latent, other_latent):
  """MSGAN's term for pairs (G(z1, c), G(z2, c)): mean over pairs of 1 / (mean|G1 - G2| / mean|z1 - z2| + 1e-5)."""
  axes = tuple(range(1, first.ndim))
  ratio = jnp.mean(jnp.abs(first - second), axis=axes) / jnp.mean(jnp.abs(latent - other_latent), axis=-1)
  return jnp.mean(1.0 / (ratio + 1e-5))


def to_image(log_mel):
  """Stored log-mel values -> the GAN's scale: the padding value (silence) -> -1, 0 (a loud band) -> +1.

  The stored values run from log(1e-6)/2 = -6.9 to about +2; the networks' outputs start near 0 with unit spread.
  """
  return 2.0 * (log_mel - mel.PAD_VALUE) / -mel.PAD_VALUE - 1.0


def from_image(image):
  """The inverse of `to_image`."""
  return (image + 1.0) * -mel.PAD_VALUE / 2.0 + mel.PAD_VALUE


def make_generate_fn(gan):
  """Jitted `(g_params, latent [n, 512], condition [n, 10] | None) -> log-mel [n, 128, 512]` (the top scale)."""
  @jax.jit
  def generate(g_params, latent, condition):
    return from_image(gan.generator.apply({"params": g_params}, latent, condition)[-1][..., 0])
  return generate


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


def _device_batch(batch):
  return {"audio": batch["audio"], "condition": batch["emotions"].astype(np.float32)}


def _augmentation(config):
  a = config.augment
  augmentation = augment_lib.Augmentation(speed=a.speed, pitch_semitones=a.pitch_semitones,
                                          shift_seconds=a.shift_seconds, noise_std=a.noise_std)
  return augmentation if augmentation.active else None


# ---------------------------------------------------------------------------------------------------------------
# Training.

def train_gan(config, gan, name, source, mesh, workdir, *, grid_conditions=None, evaluate=None, log=print):
  """Trains one GAN on `source` (the clips of its bin, or all training clips); returns its final state.

  evaluate: None, or `state -> {"val_fid": float, ...}` (`make_validation_fid`), called every `gan.eval_every`
  steps and at the last one; its values go to the metrics log, and the state with the lowest finite `val_fid` is
  also kept as the best checkpoint (sampling reads it, `sample.checkpoint`). GAN training does not converge to a
  point: the sample quality of one run rises and falls by a wide margin between checkpoints, so the step to
  sample is chosen on held-out clips rather than being whichever came last.
  """
  gc = config.gan
  processes = jax.process_count()
  if gc.batch_size % mesh.size:
    raise ValueError(f"gan.batch_size {gc.batch_size} is not divisible by the {mesh.size} devices; set "
                     "--config.gan.batch_size to a multiple of the device count")
  if len(source) < gc.batch_size:
    raise ValueError(f"GAN {name!r}: {len(source)} training clips, fewer than one batch of {gc.batch_size}; "
                     "lower --config.gan.batch_size or leave this emotion out (--config.emotions)")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  make_state = lambda: init_gan_state(gan, config.seed)  # noqa: E731
  abstract = jax.eval_shape(make_state)
  directory = os.path.join(workdir, "checkpoints", f"gan_{name}")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2, best_metric=BEST_METRIC, best_mode="min")
  batches = pipeline.make_pipeline(
      source, batch_size=gc.batch_size // processes, train=True, seed=config.seed,
      audio=pipeline.AudioOptions(clip_samples=mel.CLIP_SAMPLES, random_crop=True),
      shard_index=jax.process_index(), shard_count=processes, augment=_augmentation(config))
  iterator = iter(batches)
  resumed = ckpt.restore_latest(checkpoint.with_sharding(abstract, replicated))
  if resumed is None:
    state, done = parallel.replicate(make_state(), mesh), 0
  else:
    done, state, extra = resumed
    iterator.set_state(extra["data"])
    log(f"GAN {name}: resumed after step {done}")
  step = parallel.data_parallel(make_gan_step(gan, global_batch=gc.batch_size, seed=config.seed), mesh)
  generate = make_generate_fn(gan)
  grid_latent = msggan.sample_latent(jax.random.PRNGKey(config.seed + 1), gc.grid_size)
  grid_condition = None
  if gan.conditional:
    grid_condition = jnp.asarray(np.resize(grid_conditions, (gc.grid_size, len(EMOTIONS))), jnp.float32)
  samples_dir = os.path.join(workdir, "train_samples")
  os.makedirs(samples_dir, exist_ok=True)
  metrics_log = writers.MetricsLog(os.path.join(workdir, f"metrics_log_gan_{name}.jsonl"))
  progress = writers.Progress(gc.steps, what="steps", per_item=("clips", gc.batch_size), every_s=gc.log_every_s,
                              start=done)
  last = None
  for i in range(done + 1, gc.steps + 1):
    batch = parallel.global_batch_from_local(_device_batch(next(iterator)), mesh)
    state, step_metrics = step(state, batch)
    if i % gc.log_every == 0 or i == gc.steps:
      last = {k: float(v) for k, v in step_metrics.items()}
      runtime.check_finite(last, step=i, what=f"GAN {name}", checkpointer=ckpt)
      metrics_log.write(i, **last)
    losses = ""
    if last:
      losses = f" | D {last['d_loss']:.3f} G {last['g_loss']:.3f}"
      losses += f" (aux D {last['d_aux']:.2f} G {last['g_aux']:.2f})" if "d_aux" in last else ""
      losses += f" (mode seeking {last['g_mode_seeking']:.2f})" if "g_mode_seeking" in last else ""
    progress.update(i, extra=f"GAN {name}{losses}")
    if i % gc.sample_every == 0 or i == gc.steps:
      grid = np.asarray(generate(state.generator_ema, grid_latent, grid_condition))
      images.write_png(os.path.join(samples_dir, f"{name}_step{i:06d}.png"),
                       images.spectrogram_grid(grid, columns=min(gc.grid_size, 5), vmin=mel.PAD_VALUE))
    scored = None
    if evaluate is not None and gc.eval_every > 0 and (i % gc.eval_every == 0 or i == gc.steps):
      scored = evaluate(state)
      metrics_log.write(i, **scored)
      best = ckpt.best_value
      value = scored[BEST_METRIC]
      control = ""
      if "val_shuffled" in scored:
        control = (f"; shuffled-label control {scored['val_shuffled']:.3f}, {scored['val_below_shuffled']} "
                   "emotions below it")
      log(f"GAN {name} step {i}: validation FID {value:.3f} (mean over emotions{control}; best so far "
          + ("none" if best is None else f"{best:.3f}") + ")")
      if not np.isfinite(value):
        scored = None  # nothing to rank by (every validation bin under 2 clips): not a best candidate
    stop = i < gc.steps and runtime.preemption.should_stop()
    if i % gc.checkpoint_every == 0 or i == gc.steps or stop or scored is not None:
      # Checked before saving, so a saved state never holds non-finite losses.
      runtime.check_finite({k: float(v) for k, v in step_metrics.items()}, step=i, what=f"GAN {name}",
                           checkpointer=ckpt)
      ckpt.save(i, state, extra={"data": iterator.get_state()},
                metrics=None if scored is None else {BEST_METRIC: scored[BEST_METRIC]})
    if stop:
      ckpt.close()
      raise runtime.Preempted(f"GAN {name} saved at step {i} of {gc.steps} in {directory}")
  ckpt.close()
  return state


def restore_gan(config, gan, name, mesh, workdir):
  """(state, which) of the trained GAN in `workdir` to sample, or a clear error when it has not been trained.

  `config.sample.checkpoint`: "best" (default) restores the checkpoint with the lowest validation FID
  (`train_gan`'s `evaluate`), or the latest when none was scored (gan.eval_every = 0, or a run trained before
  this existed); "latest" restores the newest. `which` records the choice for scores.json: {"checkpoint",
  "step", "val_fid" (None for an unscored latest), "latest_step"}.
  """
  if config.sample.checkpoint not in ("best", "latest"):
    raise ValueError(f"config.sample.checkpoint {config.sample.checkpoint!r}: use best (lowest validation FID) or "
                     "latest")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  directory = os.path.join(workdir, "checkpoints", f"gan_{name}")
  with checkpoint.Checkpointer(directory, best_metric=BEST_METRIC, best_mode="min") as ckpt:
    abstract = checkpoint.with_sharding(jax.eval_shape(lambda: init_gan_state(gan, config.seed)), replicated)
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
# The FID classifier and the scores.

def classifier_config(config):
  """The sub-config `end_to_end.train_base` reads, from config.classifier."""
  c = config.classifier
  result = ml_collections.ConfigDict({
      "seed": config.seed, "learning_rate": c.learning_rate, "batch_size": c.batch_size,
      "eval_batch_size": c.eval_batch_size, "max_seconds": c.max_seconds, "num_epochs": c.num_epochs,
      "log_every_s": config.gan.log_every_s, "val_split": "validation"})
  return result


def train_classifier(config, splits, mesh, workdir):
  """Emo18 on Train (best epoch by validation mean CCC); reused when config.classifier.workdir holds one."""
  target = end_to_end.make_target("hume_vb")
  model = emo18.Emo18(num_outputs=target.num_outputs, hidden=config.classifier.hidden,
                      bn_axis_name=parallel.DATA_AXIS)
  directory = config.classifier.workdir or os.path.join(workdir, "classifier")
  variables, history, predict_fn = end_to_end.train_base(classifier_config(config), model, target, splits, mesh,
                                                      directory)
  return parallel.replicate(variables, mesh), history, predict_fn


def embed(predict_fn, variables, source, config, mesh):
  """(predicted intensities [N, 10], embeddings [N, 256]) of every clip of `source`, in order."""
  if not len(source):
    return np.zeros((0, len(EMOTIONS)), np.float32), np.zeros((0, config.classifier.hidden), np.float32)
  options = pipeline.AudioOptions(max_samples=int(config.classifier.max_seconds * schema.SAMPLE_RATE),
                                  pad_multiple=emo18.FRAME_SAMPLES)
  eval_batch = max(config.classifier.eval_batch_size // mesh.size, 1) * mesh.size
  split = end_to_end.Split(source, None, None, None, None)
  return end_to_end.predict_split(predict_fn, variables, split, options, eval_batch)


def fid_matrix(rows, columns, min_clips=2):
  """FID between every pair of embedding sets: [len(rows), len(columns)], NaN where a set has < min_clips."""
  result = np.full((len(rows), len(columns)), np.nan)
  for i, a in enumerate(rows):
    for j, b in enumerate(columns):
      if len(a) >= min_clips and len(b) >= min_clips:
        result[i, j] = float(metrics.fid(a, b))
  return result


def shuffled_label_fid(generated, columns, num_shuffles=5, seed=0, min_clips=2):
  """The shuffled-label control: FID of each emotion's bin against generated clips whose labels were permuted.

  generated: [rows] embedding sets, one per conditioned emotion; columns: the matching training bins (same order).
  All generated clips are pooled, their emotion labels permuted at random (each set keeps its size) and the set
  now labelled e scored against e's bin, averaged over `num_shuffles` permutations. A generator that ignores its
  condition scores the same as this control, up to sampling noise; one that follows it scores lower. Unlike
  comparing a row with the other bins, the reference bin is held fixed, so bins that happen to lie near (or far
  from) every generated set do not decide the comparison. Returns (mean [rows], std [rows]) over permutations.
  """
  sizes = [len(g) for g in generated]
  pooled = np.concatenate(generated)
  rng = np.random.default_rng(seed)
  values = np.full((num_shuffles, len(generated)), np.nan)
  for s in range(num_shuffles):
    order = rng.permutation(len(pooled))
    start = 0
    for i, (size, column) in enumerate(zip(sizes, columns)):
      chosen = pooled[order[start:start + size]]
      start += size
      if size >= min_clips and len(column) >= min_clips:
        values[s, i] = float(metrics.fid(chosen, column))
  return values.mean(axis=0), values.std(axis=0)


def read_ratings(path, file_ids):
  """Mean human intensity ratings [N, 10] for `file_ids` (wav stems) from a CSV of File_ID + the 10 emotions."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("File_ID", *EMOTIONS) if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; expected File_ID and the ten emotions "
                       f"({', '.join(EMOTIONS)})")
    rows = {}
    for line, row in enumerate(reader, start=2):
      key = os.path.splitext(os.path.basename(row["File_ID"].strip("[]")))[0]
      try:
        rows[key] = [float(row[e]) for e in EMOTIONS]
      except ValueError as error:
        raise ValueError(f"{path} row {line}: {error}; ratings must be numbers") from None
  absent = [i for i in file_ids if i not in rows]
  if absent:
    raise ValueError(f"{path}: no ratings for {len(absent)} generated clips, e.g. {absent[:3]}; rate every clip "
                     "of the samples folder (File_ID = the wav file's name)")
  return np.array([rows[i] for i in file_ids])


def heep_and_s_gen(ratings, fids, emotion_of):
  """Per emotion: HEEP over that emotion's clips (Pearson of one-hot targets vs ratings) and S_GEN."""
  result = {}
  for k, e in enumerate(EMOTIONS):
    rows = emotion_of == k
    if not rows.any():
      continue
    onehot = np.zeros((rows.sum(), len(EMOTIONS)))
    onehot[:, k] = 1.0
    heep = float(metrics.heep(onehot, ratings[rows]))
    result[e] = {"heep": heep, "s_gen": float(metrics.s_gen(fids[e], heep)) if np.isfinite(fids[e]) else None}
  return result


# ---------------------------------------------------------------------------------------------------------------
# Sampling.

def to_int16(audio):
  """float [n] -> int16 at a peak of 0.9 (Griffin-Lim output has no meaningful absolute level)."""
  peak = float(np.max(np.abs(audio))) if audio.size else 0.0
  scaled = audio * (0.9 / peak) if peak > 0 else audio
  return np.round(np.clip(scaled, -1.0, 1.0) * 32767).astype(np.int16)


def deal_conditions(condition, num, rng):
  """[num, K] float32 conditions: `condition` [K] repeated, or the rows of [n, K] dealt in shuffled rounds."""
  condition = np.asarray(condition, np.float32)
  if condition.ndim == 1:
    return np.broadcast_to(condition, (num, len(condition)))
  rounds = -(-num // len(condition))
  return condition[np.concatenate([rng.permutation(len(condition)) for _ in range(rounds)])[:num]]


def sample_clips(config, generate, g_params, emotion, condition, out_dir, *, num=None, seed=None):
  """Writes `num` (config.sample.num_per_emotion) wav files for `emotion`; returns (records, log-mels [N, 128, 512]).

  condition: None (an unconditional generator), one intensity vector [10] for every clip, or the intensity
  vectors of the emotion's training bin [n, 10], dealt to the clips in shuffled rounds (each used once before any
  is used again), so the clips' conditions follow the bin's label distribution. out_dir None writes nothing (the
  validation FID during training). The latents and the dealing are drawn from `seed` (config.sample.seed) and the
  emotion, so the same call makes the same clips.

  `generate` is `make_generate_fn(gan)` (made once per GAN, so it compiles once). Each clip is cut after its last
  sounding frame (`mel.sounding_samples`): the generator learnt from clips zero-padded to 4.1 s and ends short
  bursts with silence, which a submission (and the FID classifier, which reads a clip to its end) should not get.
  """
  s = config.sample
  num = s.num_per_emotion if num is None else num
  seed = s.seed if seed is None else seed
  key = jax.random.fold_in(jax.random.PRNGKey(seed), EMOTIONS.index(emotion))
  latents = msggan.sample_latent(key, num)
  conditions = None
  if condition is not None:
    conditions = deal_conditions(condition, num, np.random.default_rng([seed, EMOTIONS.index(emotion)]))
  write = out_dir is not None and writers.is_writer()
  folder = None if out_dir is None else os.path.join(out_dir, emotion)
  if write:
    os.makedirs(folder, exist_ok=True)
  records, spectrograms = [], []
  for start in range(0, num, s.batch_size):
    latent = latents[start:start + s.batch_size]
    cond = None if conditions is None else jnp.asarray(conditions[start:start + s.batch_size])
    spectrogram = generate(g_params, latent, cond)
    audio = np.asarray(mel.mel_to_audio(spectrogram, num_iters=s.griffin_lim_iters, seed=config.seed))
    spectrograms.append(np.asarray(spectrogram))
    keep = mel.sounding_samples(spectrograms[-1])
    for j, clip in enumerate(audio):
      name = f"{emotion}_{start + j + 1:04d}"
      pcm = to_int16(clip[:keep[j]])
      if write:
        soundfile.write(os.path.join(folder, f"{name}.wav"), pcm, schema.SAMPLE_RATE, subtype="PCM_16")
      records.append({"audio": pcm, "file_id": name, "speaker": "generated"})
  return records, np.concatenate(spectrograms)


def pick_weights(config):
  """`state -> generator params` per `config.sample.weights`: the moving average (ema) or the last weights (raw)."""
  if config.sample.weights not in ("ema", "raw"):
    raise ValueError(f"config.sample.weights {config.sample.weights!r}: use ema (the generator's moving average) "
                     "or raw (its last training weights)")
  return (lambda state: state.generator_ema) if config.sample.weights == "ema" else (lambda state: state.generator)


def generator_for(config, emotion, conditions, gans):
  """(gan, params, condition or None) that produce `emotion`; params per `config.sample.weights`.

  conditions: {emotion: what `sample_clips` takes as its condition} (`sample_conditions`).
  """
  pick = pick_weights(config)
  if config.generator == "conditional":
    gan, state = gans["all"]
    return gan, pick(state), conditions[emotion]
  gan, state = gans[emotion]
  return gan, pick(state), None


def bin_label_rows(labels, bins):
  """{emotion: the intensity vectors of its training bin [n, 10]}; an empty bin gets its emotion's one-hot [1, 10]."""
  return {e: labels[bins[e]] if len(bins[e]) else np.eye(len(EMOTIONS))[k][None] for k, e in enumerate(EMOTIONS)}


def sample_conditions(config, labels, bins):
  """{emotion: the condition a conditional generator is asked for}, per `config.sample.condition`.

  bin_labels (default): the intensity vectors of the emotion's training bin, [n, 10] (`sample_clips` deals them
  to the clips): the generator was trained on each clip's own vector, and the clips of one bin differ in their
  other nine intensities, so asking for the bin's vectors asks for the bin's spread too. bin_mean: the mean vector
  of the bin, [10], for every clip (a typical label; the generated set then varies by its latents alone). An
  empty bin asks for the one-hot vector of its emotion.
  """
  if config.sample.condition not in ("bin_labels", "bin_mean"):
    raise ValueError(f"config.sample.condition {config.sample.condition!r}: use bin_labels (the training bin's "
                     "intensity vectors) or bin_mean (their mean)")
  rows = bin_label_rows(labels, bins)
  return rows if config.sample.condition == "bin_labels" else {e: r.mean(0) for e, r in rows.items()}


def make_validation_fid(config, gan, emotions, predict_fn, classifier_vars, mesh, val_emb, conditions):
  """`state -> {"val_fid": mean, "val_fid_<emotion>": ...}` for one GAN, to pick the checkpoint to sample.

  Generates `gan.eval_per_emotion` clips of each of `emotions` from fixed latents (seed sample.seed + 1, so every
  evaluation compares like with like, and none of them are the clips sampled at the end), with the weights
  sampling uses (`sample.weights`), turns them into audio as sampling does and scores each emotion's clips
  against its validation bin (`val_emb`: {emotion: embeddings}); the FID is NaN where either side has under 2
  clips, and the mean skips those. The validation bins are held out from GAN and classifier training, so the
  training bins that scores.json reports against are not used to choose the checkpoint.

  With more than one emotion it also logs the shuffled-label control on the same validation bins (`score`'s
  control, `sample.control_shuffles` permutations): `val_shuffled` (its mean over emotions) and
  `val_below_shuffled` (how many emotions' FID is below their control), so a run shows during training whether
  its clips follow their condition. They are logged only; the checkpoint is still ranked by `val_fid`.
  """
  pick = pick_weights(config)
  generate = make_generate_fn(gan)  # made once: every evaluation reuses its compilation

  def evaluate(state):
    params, fids, generated = pick(state), {}, []
    for e in emotions:
      condition = conditions[e] if gan.conditional else None
      records, _ = sample_clips(config, generate, params, e, condition, None, num=config.gan.eval_per_emotion,
                                seed=config.sample.seed + 1)
      generated.append(embed(predict_fn, classifier_vars, records, config, mesh)[1])
      fids[e] = fid_matrix([generated[-1]], [val_emb[e]])[0, 0]
    finite = [v for v in fids.values() if np.isfinite(v)]
    result = {BEST_METRIC: float(np.mean(finite)) if finite else float("nan"),
              **{f"{BEST_METRIC}_{e}": float(v) for e, v in fids.items()}}
    if len(emotions) > 1:
      shuffled = shuffled_label_fid(generated, [val_emb[e] for e in emotions],
                                    num_shuffles=config.sample.control_shuffles, seed=config.seed)[0]
      both = [(fids[e], c) for e, c in zip(emotions, shuffled) if np.isfinite(fids[e]) and np.isfinite(c)]
      result["val_shuffled"] = float(np.mean([c for _, c in both])) if both else float("nan")
      result["val_below_shuffled"] = int(sum(f < c for f, c in both))
    return result
  return evaluate


def score(config, predict_fn, classifier_vars, mesh, bins, train_emb, generated):
  """The scores JSON: FID per emotion, generated-vs-train matrix (control), classifier HEEP, optional human HEEP.

  train_emb: {emotion: classifier embeddings of that emotion's training bin}.
  """
  emotions = [e for e in EMOTIONS if e in generated]
  predictions, gen_emb, emotion_of, file_ids = [], {}, [], []
  for e in emotions:
    outputs, embeddings = embed(predict_fn, classifier_vars, generated[e], config, mesh)
    gen_emb[e] = embeddings
    predictions.append(outputs)
    emotion_of += [EMOTIONS.index(e)] * len(outputs)
    file_ids += [r["file_id"] for r in generated[e]]
  predictions, emotion_of = np.concatenate(predictions), np.array(emotion_of)
  generated_sets = [gen_emb[e] for e in emotions]
  matrix = fid_matrix(generated_sets, [train_emb[e] for e in EMOTIONS])
  fids = {e: matrix[i, EMOTIONS.index(e)] for i, e in enumerate(emotions)}
  classifier_rated = heep_and_s_gen(predictions, fids, emotion_of)
  shuffled, shuffled_std = shuffled_label_fid(generated_sets, [train_emb[e] for e in emotions],
                                               num_shuffles=config.sample.control_shuffles, seed=config.seed)
  per_emotion = {}
  for i, e in enumerate(emotions):
    wrong = np.delete(matrix[i], EMOTIONS.index(e))
    per_emotion[e] = {
        "fid": fids[e], "shuffled_label_fid": _finite_or_none(shuffled[i]),
        "shuffled_label_fid_std": _finite_or_none(shuffled_std[i]),
        "wrong_bin_fid_mean": float(np.nanmean(wrong)) if np.isfinite(wrong).any() else None,
        "wrong_bin_fid_min": float(np.nanmin(wrong)) if np.isfinite(wrong).any() else None,
        "train_clips": int(len(bins[e])), "generated_clips": int(len(gen_emb[e])),
        "classifier_heep": classifier_rated.get(e, {}).get("heep"),
        "classifier_s_gen": classifier_rated.get(e, {}).get("s_gen"),
    }
  result = {
      "generator": config.generator, "optimiser": config.gan.optimiser, "steps": config.gan.steps,
      "per_emotion": per_emotion,
      "mean_fid": float(np.nanmean([fids[e] for e in emotions])),
      "mean_shuffled_label_fid": float(np.nanmean(shuffled)) if np.isfinite(shuffled).any() else None,
      "below_shuffled_label": int(sum(fids[e] < shuffled[i] for i, e in enumerate(emotions))),
      "mean_wrong_bin_fid": float(np.nanmean([np.nan if per_emotion[e]["wrong_bin_fid_mean"] is None
                                              else per_emotion[e]["wrong_bin_fid_mean"] for e in emotions])),
      "below_wrong_bin_mean": int(sum(fids[e] < per_emotion[e]["wrong_bin_fid_mean"] for e in emotions
                                      if per_emotion[e]["wrong_bin_fid_mean"] is not None)),
      "controls_note": "shuffled_label_fid: the emotion's training bin against generated clips with permuted "
                       "emotion labels (mean over permutations); wrong_bin_fid_mean: the emotion's generated "
                       "clips against the other emotions' training bins",
      "generated_vs_train_fid": {"rows": emotions, "columns": list(EMOTIONS), "fid": matrix},
      "classifier_heep_all": float(metrics.heep(np.eye(len(EMOTIONS))[emotion_of], predictions)),
      "classifier_heep_note": "HEEP with the FID classifier's predicted intensities in place of human ratings",
  }
  if config.ratings_csv:
    ratings = read_ratings(config.ratings_csv, file_ids)
    human = heep_and_s_gen(ratings, fids, emotion_of)
    for e, values in human.items():
      per_emotion[e]["heep"], per_emotion[e]["s_gen"] = values["heep"], values["s_gen"]
    result["mean_s_gen"] = float(np.nanmean([v["s_gen"] for v in human.values() if v["s_gen"] is not None]))
  return result


# ---------------------------------------------------------------------------------------------------------------
# The task.

def _finite_or_none(value):
  return float(value) if np.isfinite(value) else None


def format_scores(result):
  """Table: FID, the shuffled-label control, the wrong-bin mean and the classifier-rated HEEP per emotion."""
  nan = float("nan")
  value = lambda v: nan if v is None else v
  lines = [f"{'emotion':<12} {'FID':>8} {'shuffled':>9} {'wrong bin':>9} {'HEEP(clf)':>9}"]
  for e, v in result["per_emotion"].items():
    lines.append(f"{e:<12} {v['fid']:8.3f} {value(v['shuffled_label_fid']):9.3f} "
                 f"{value(v['wrong_bin_fid_mean']):9.3f} {value(v['classifier_heep']):9.3f}")
  lines.append(f"{'mean':<12} {result['mean_fid']:8.3f} {value(result['mean_shuffled_label_fid']):9.3f} "
               f"{result['mean_wrong_bin_fid']:9.3f}")
  n = len(result["per_emotion"])
  lines.append(f"below control: shuffled label {result['below_shuffled_label']}/{n}, "
               f"wrong-bin mean {result['below_wrong_bin_mean']}/{n}")
  return "\n".join(lines)


def run(config, workdir):
  if config.mode not in ("train", "sample"):
    raise ValueError(f"config.mode {config.mode!r}: use train or sample")
  if config.generator not in ("conditional", "per_emotion"):
    raise ValueError(f"config.generator {config.generator!r}: use conditional or per_emotion")
  data = config.data
  if data.dataset != "hume_vb":
    raise ValueError("generate needs the HUME-VB emotion intensities (or the demo corpus); data.dataset "
                     f"{data.dataset!r} is not supported")
  root = corpus.locate(data.root, dataset=data.dataset, demo_size=data.demo_size, demo_seed=data.demo_seed)
  builder, _ = builders.prepare(data.dataset, root, config="audio", data_dir=data.tfds_dir or None,
                                strict=data.strict)
  target = end_to_end.make_target(data.dataset)
  splits = {s: end_to_end.Split.read(builders.data_source(builder, s), target) for s in SPLITS}
  mesh = parallel.make_mesh(config.num_devices or None)
  train = splits["train"]
  bins = emotion_bins(train)
  emotions = [e for e in (config.emotions or EMOTIONS)]
  unknown = set(emotions) - set(EMOTIONS)
  if unknown:
    raise ValueError(f"config.emotions: unknown {sorted(unknown)}; known: {', '.join(EMOTIONS)}")
  labels = np.nan_to_num(train.labels.astype(np.float64))
  conditions = sample_conditions(config, labels, bins)
  bins_mean = {e: rows.mean(0) for e, rows in bin_label_rows(labels, bins).items()}  # the training grids' rows
  print(f"generate ({config.mode}): {config.generator} MSG-GAN, {config.gan.optimiser}, {config.gan.steps} steps "
        f"of {config.gan.batch_size}; train bins " + ", ".join(f"{e} {len(bins[e])}" for e in EMOTIONS)
        + f"; {mesh.size} device(s)")
  start = time.monotonic()

  predict_fn, classifier_vars, floor, train_emb, val_emb = None, None, None, None, None
  if config.mode == "train" or config.score:
    classifier_vars, history, predict_fn = train_classifier(config, splits, mesh, workdir)
    val = splits["validation"]
    val_bins = emotion_bins(val)
    train_emb = {e: embed(predict_fn, classifier_vars, Subset(train.source, bins[e]), config, mesh)[1]
                 for e in EMOTIONS}
    val_emb = {e: embed(predict_fn, classifier_vars, Subset(val.source, val_bins[e]), config, mesh)[1]
               for e in EMOTIONS}
    table3 = fid_matrix([train_emb[e] for e in EMOTIONS], [val_emb[e] for e in EMOTIONS])
    floor = {"rows": "train bins", "columns": "validation bins", "emotions": list(EMOTIONS), "fid": table3,
             "train_clips": [len(bins[e]) for e in EMOTIONS], "val_clips": [len(val_bins[e]) for e in EMOTIONS],
             "classifier_history": history}
    writers.write_json(os.path.join(workdir, "train_val_fid.json"), floor)
    images.write_png(os.path.join(workdir, "train_val_fid.png"), images.heat_map(table3))
    print("train-vs-val FID (rows train, columns val), diagonal: "
          + ", ".join(f"{e} {table3[k, k]:.2f}" for k, e in enumerate(EMOTIONS)))

  gans, sampled = {}, {}
  names = ["all"] if config.generator == "conditional" else emotions
  for name in names:
    gan = make_gan(config.gan, conditional=config.generator == "conditional")
    if config.mode == "train":
      source = Subset(train.source, np.flatnonzero(train.labelled) if name == "all" else bins[name])
      grid = np.stack([bins_mean[e] for e in emotions]) if gan.conditional else None
      evaluate = None
      if config.gan.eval_every > 0:
        evaluate = make_validation_fid(config, gan, emotions if name == "all" else [name], predict_fn,
                                       classifier_vars, mesh, val_emb, conditions)
      train_gan(config, gan, name, source, mesh, workdir, grid_conditions=grid, evaluate=evaluate)
    state, sampled[name] = restore_gan(config, gan, name, mesh, workdir)  # the best scored, per sample.checkpoint
    gans[name] = (gan, state)

  out_dir = os.path.join(workdir, "samples")
  generated, grids, generate_fns = {}, [], {}
  for e in emotions:
    gan, params, condition = generator_for(config, e, conditions, gans)
    generate = generate_fns.setdefault(id(gan), make_generate_fn(gan))
    generated[e], spectrograms = sample_clips(config, generate, params, e, condition, out_dir)
    grids.append(spectrograms[:config.sample.grid_columns])
  images.write_png(os.path.join(out_dir, "spectrograms.png"),
                   images.spectrogram_grid(np.concatenate(grids), columns=config.sample.grid_columns,
                                           vmin=mel.PAD_VALUE))
  print(f"wrote {sum(len(v) for v in generated.values())} clips to {os.path.abspath(out_dir)} "
        f"({config.sample.num_per_emotion} per emotion; one row per emotion in spectrograms.png)")

  result = {"mode": config.mode, "samples": out_dir, "seconds": None, "sampled_checkpoints": sampled}
  if predict_fn is not None:
    result.update(score(config, predict_fn, classifier_vars, mesh, bins, train_emb, generated))
    result["train_val_fid_diagonal"] = [float(floor["fid"][k, k]) for k in range(len(EMOTIONS))]
    print(format_scores(result))
  result["seconds"] = time.monotonic() - start
  writers.write_json(os.path.join(workdir, "scores.json"), result)
  return result
