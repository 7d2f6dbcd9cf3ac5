"""Sampling a trained generator to the submission layout: wav files per emotion, their conditions and weights.

A conditional generator is asked for emotion e with the intensity vectors of e's training bin (`bin_labels`,
dealt to the clips in shuffled rounds) or with their mean (`bin_mean`); a per-emotion generator has no condition.
Log-mels become audio with Griffin-Lim; each clip is cut after its last sounding frame and written as 16-bit PCM.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import soundfile

from exvo_jax import runtime
from exvo_jax import writers
from exvo_jax.data import schema
from exvo_jax.features import mel
from exvo_jax.models import msggan

EMOTIONS = schema.EMOTIONS
WEIGHTS = ("ema", "raw")
CONDITIONS = ("bin_labels", "bin_mean")


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


def sample_clips(generate, g_params, emotion, condition, out_dir, *, num, seed, batch_size, griffin_lim_iters,
                 griffin_lim_seed):
  """Writes `num` wav files for `emotion` in `out_dir/<emotion>/`; returns (records, log-mels [N, 128, 512]).

  condition: None (an unconditional generator), one intensity vector [10] for every clip, or the intensity
  vectors of the emotion's training bin [n, 10], dealt to the clips in shuffled rounds (each used once before any
  is used again), so the clips' conditions follow the bin's label distribution. out_dir None writes nothing (the
  validation FID during training). The latents and the dealing are drawn from `seed` and the
  emotion, so the same call makes the same clips.

  `generate` is `make_generate_fn(gan)` (made once per GAN, so it compiles once). Each clip is cut after its last
  sounding frame (`mel.sounding_samples`): the generator learnt from clips zero-padded to 4.1 s and ends short
  bursts with silence, which a submission (and the FID classifier, which reads a clip to its end) should not get.
  """
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
  for start in range(0, num, batch_size):
    runtime.preemption.check(f"sampling {emotion} stopped at clip {start + 1} of {num} (the rerun samples again: the "
                             "same clips)")
    latent = latents[start:start + batch_size]
    cond = None if conditions is None else jnp.asarray(conditions[start:start + batch_size])
    spectrogram = generate(g_params, latent, cond)
    audio = np.asarray(mel.mel_to_audio(spectrogram, num_iters=griffin_lim_iters, seed=griffin_lim_seed))
    spectrograms.append(np.asarray(spectrogram))
    keep = mel.sounding_samples(spectrograms[-1])
    for j, clip in enumerate(audio):
      name = f"{emotion}_{start + j + 1:04d}"
      pcm = to_int16(clip[:keep[j]])
      if write:
        soundfile.write(os.path.join(folder, f"{name}.wav"), pcm, schema.SAMPLE_RATE, subtype="PCM_16")
      records.append({"audio": pcm, "file_id": name, "speaker": "generated"})
  return records, np.concatenate(spectrograms)


def pick_weights(weights):
  """`state -> generator params` for `weights` (one of WEIGHTS): the moving average (ema) or the last weights (raw)."""
  return (lambda state: state.generator_ema) if weights == "ema" else (lambda state: state.generator)


def bin_label_rows(labels, bins):
  """{emotion: the intensity vectors of its training bin [n, 10]}; an empty bin gets its emotion's one-hot [1, 10]."""
  return {e: labels[bins[e]] if len(bins[e]) else np.eye(len(EMOTIONS))[k][None] for k, e in enumerate(EMOTIONS)}


def sample_conditions(kind, labels, bins):
  """{emotion: the condition a conditional generator is asked for}, per `kind` (one of CONDITIONS).

  bin_labels (default): the intensity vectors of the emotion's training bin, [n, 10] (`sample_clips` deals them
  to the clips): the generator was trained on each clip's own vector, and the clips of one bin differ in their
  other nine intensities, so asking for the bin's vectors asks for the bin's spread too. bin_mean: the mean vector
  of the bin, [10], for every clip (a typical label; the generated set then varies by its latents alone). An
  empty bin asks for the one-hot vector of its emotion.
  """
  rows = bin_label_rows(labels, bins)
  return rows if kind == "bin_labels" else {e: r.mean(0) for e, r in rows.items()}
