"""A deterministic synthetic stand-in for the HUME-VB release: the real layout, learnable vocal bursts.

HUME-VB is not public, so tests, smoke runs and tutorials use a DEMO CORPUS written by this module in exactly
the release's layout (docs/hume_vb.md sections 1-2):

  data_info.csv            File_ID ('[01234]'), Subject_ID ('Speaker_17'), Split, Age, Country, 10 emotions
  wav/<id>.wav             16 kHz mono 16-bit PCM (audio/wav/<id>.wav in the A-VB release's layout)
  labels/high_info.csv     A-VB High: File_ID, Split, 10 emotions           (Test rows: -1)
  labels/two_info.csv      A-VB Two: File_ID, Split, Valence, Arousal       (Test rows: -1)
  labels/culture_info.csv  A-VB Culture: File_ID, Split, 40 <Country>_<Emotion> columns (Test rows: -1)
  labels/type_info.csv     A-VB Type: File_ID, Split, Voc_Type              (Test rows: -1)

Test rows keep their Age, Country and emotions empty, except two clips per Test speaker whose emotions are
filled (the ExVo-FewShot support set). Splits are speaker-independent.

The generative model (all random draws from generators seeded by (seed, stream, index), so a file depends only on
the seed and its own index, never on the processing order):

1. Speaker. Country (balanced per split), age (20-39.5 years, step 0.5), sex, a base pitch f0 (about 120 or 215
   Hz, spread 10 %), a formant scale (timbre), a voice-quality profile (tilt, breathiness, jitter), a loudness and
   a recording set-up (room, microphone EQ, noise floor, mains hum), and a PERSONAL BIAS: a [10] vector of
   offsets (std `_BIAS_STD`) on how intensely the speaker expresses each non-dominant emotion. Age lowers f0 and
   formants slightly and adds jitter, breathiness and a darker tilt; country shifts the formant pattern, the
   spectral tilt, the f0 and the rhythm of pulsed bursts, and biases the intensity of each emotion
   (`_COUNTRY_STYLE`). These are weaker cues than the emotion signatures.
2. Clip labels. Each speaker's clips cycle through the ten emotions as the dominant one (intensity exactly 1.0).
   Every other emotion gets a low baseline intensity, one to three affine emotions (`_AFFINE`, e.g. Fear with
   Horror) get a secondary intensity, and speaker bias plus country style are added. The "expressed" intensities
   `a` (what the audio shows) carry only `_BIAS_IN_AUDIO` of the speaker bias; the rated labels `y` carry all of
   it plus rater noise. So a speaker's labelled clips reveal a bias the audio alone barely shows: the signal
   few-shot personalisation must exploit.
3. Audio. The clip is a sequence of bursts: the dominant emotion's signature and, for the strongest secondary
   emotions, shorter and quieter renderings of their signatures (length and level grow with the intensity).
   Global voice parameters (pitch, effort, "smile" formant shift) are interpolated from all ten intensities
   through per-emotion valence/arousal prototypes, so low intensities also leave a trace. Signatures
   (`_SIGNATURES`): a glottal-pulse source (Rosenberg pulses with jitter, shimmer and optional period doubling)
   plus aspiration noise, through a cascade of five formant resonators scaled by the speaker, under an
   amplitude envelope:
     Amusement    Laugh   pulsed voiced 'ha-ha-ha' with aspirated onsets, slowly falling pitch
     Excitement   Pant    fast, short, breathy pulses with a steeply rising pitch, alternating in/out breaths
     Awe          Other   long breathy 'ahh-oh' with a slow attack and a falling pitch
     Triumph      Other   loud tense 'yeah!' shout: rising glide then a sustained high vowel
     Fear         Scream  very high, tense, noisy 'ii' scream with fast tremor
     Horror       Scream  lower, rougher (period doubling, more noise) falling 'oh' scream
     Distress     Groan   strained, pressed, jittery mid-pitch groan with slow tremor
     Sadness      Cry     two to four sobs with arched pitch and vibrato, inhaled breaths between them
     Awkwardness  Grunt   one to three short low nasal hums 'mm'/'uh' with hesitation gaps
     Surprise     Gasp    short sharp inhaled noise burst followed by a brief rising 'oh!'
4. Recording. The speaker's room (a short reverberant impulse response), background noise (pink-ish) at the
   speaker's absolute noise floor (so quiet bursts have a lower SNR), occasional 50/60 Hz hum, the speaker's
   microphone (a random peaking EQ and a bass roll-off), then a random gain (peak -8 to -1 dBFS, never clipped).
5. A-VB labels. Valence/arousal: label-weighted mean of per-emotion prototypes (`_VALENCE_AROUSAL`). Culture:
   the ten labels times a fixed per-country x per-emotion factor (`_CULTURE_FACTOR`) for each of the four rater
   countries, plus a little rater noise, clipped to [0, 1]. Voc_Type: the dominant emotion's type above.

Usage: `ensure_demo_corpus(cache_dir)` (built once, then reused) or
`python -m exvo_jax.data.demo OUT_DIR --size small --seed 0`.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import multiprocessing
import os
import pathlib
import shutil
import tempfile

import numpy as np
import scipy.signal
import soundfile

from exvo_jax import cores
from exvo_jax.data import schema

# From this many clips on, ensure_demo_corpus renders in worker processes (starting them costs about 2 s).
PARALLEL_CLIPS = 4096
# Bumped whenever the generator's output changes, so cached corpora are rebuilt.
GENERATOR_VERSION = 2  # 2: culture_info.csv columns in the A-VB release's order
_MARKER = ".demo_complete"
# Where each release layout keeps the audio.
AUDIO_DIRS = {"exvo": "wav", "avb": "audio/wav"}

SR = schema.SAMPLE_RATE
NUM_EMOTIONS = len(schema.EMOTIONS)
_E = {name: i for i, name in enumerate(schema.EMOTIONS)}

MIN_SECONDS, MAX_SECONDS = 0.6, 2.5  # clip length range (s)
_BIAS_STD = 0.15  # per-speaker offset on non-dominant intensities
_BIAS_IN_AUDIO = 0.2  # share of the speaker bias the audio shows (the rest is only in the labels)
_RATER_NOISE = 0.04  # std of per-clip label noise, absent from the audio

# Random streams: (seed, stream, index) keys keep every draw independent of processing order.
_CORPUS_STREAM, _SPEAKER_STREAM, _CLIP_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """How many speakers per split and clips per speaker a demo corpus has.

  `clips` optionally gives each split's (Train, Val, Test) clip count; a split's clips are then spread as evenly as
  possible over its speakers (the first speakers get one more). Without it every speaker has `clips_per_speaker`.
  """
  train_speakers: int
  val_speakers: int
  test_speakers: int
  clips_per_speaker: int
  clips: tuple[int, int, int] | None = None

  def speaker_clips(self, split):
    """Clips of each speaker of `split` ('Train', 'Val' or 'Test'), in speaker order."""
    speakers = {"Train": self.train_speakers, "Val": self.val_speakers, "Test": self.test_speakers}[split]
    if self.clips is None:
      return [self.clips_per_speaker] * speakers
    total = self.clips[schema.SPLITS.index(split)]
    base, extra = divmod(total, speakers)
    return [base + (i < extra) for i in range(speakers)]

  @property
  def num_clips(self):
    return sum(sum(self.speaker_clips(split)) for split in schema.SPLITS)


SIZES = {
    "tiny": DemoSize(6, 3, 3, 8),  # 96 clips: unit tests, ~1 s
    "small": DemoSize(32, 24, 4, 8),  # 480 clips: learnability tests (many speakers, few clips each), ~6 s
    "default": DemoSize(48, 20, 20, 16),  # 1,408 clips (~51 min of audio): smoke runs, tutorials; ~17 s
    # The release's shape (Table 1 of the ExVo paper): 59,201 clips, about 36 h; benchmarks/full_size.py.
    "release": DemoSize(571, 568, 563, 35, clips=(19_990, 19_396, 19_815)),
}

# ---------------------------------------------------------------------------------------------------------------
# Fixed tables (independent of the seed: they are the "world" every demo corpus lives in).

# Per-emotion (valence, arousal) prototypes in [0, 1], schema.EMOTIONS order.
_VALENCE_AROUSAL = np.array([
    (0.75, 0.40),  # Awe
    (0.85, 0.85),  # Excitement
    (0.85, 0.65),  # Amusement
    (0.35, 0.30),  # Awkwardness
    (0.15, 0.85),  # Fear
    (0.10, 0.75),  # Horror
    (0.15, 0.60),  # Distress
    (0.90, 0.90),  # Triumph
    (0.15, 0.25),  # Sadness
    (0.55, 0.80),  # Surprise
])

# Emotions likely to co-occur as secondaries with each dominant one, most likely first.
_AFFINE = {
    "Awe": ("Surprise", "Excitement", "Triumph", "Amusement"),
    "Excitement": ("Amusement", "Triumph", "Surprise", "Awe"),
    "Amusement": ("Excitement", "Awkwardness", "Surprise", "Triumph"),
    "Awkwardness": ("Amusement", "Distress", "Sadness", "Surprise"),
    "Fear": ("Horror", "Distress", "Surprise", "Sadness"),
    "Horror": ("Fear", "Distress", "Surprise", "Sadness"),
    "Distress": ("Sadness", "Fear", "Horror", "Awkwardness"),
    "Triumph": ("Excitement", "Amusement", "Awe", "Surprise"),
    "Sadness": ("Distress", "Awkwardness", "Horror", "Fear"),
    "Surprise": ("Awe", "Fear", "Excitement", "Amusement"),
}
_AFFINE_PROBS = np.array([0.4, 0.3, 0.2, 0.1])

# A-VB Type of each emotion's signature. Every type is used; the two exclamations with no type of their own
# (an awed 'ahh-oh', a triumphant 'yeah!') are 'Other', the strained distress groan is 'Groan'.
VOC_TYPE = {
    "Amusement": "Laugh", "Excitement": "Pant", "Awe": "Other", "Triumph": "Other", "Fear": "Scream",
    "Horror": "Scream", "Distress": "Groan", "Sadness": "Cry", "Awkwardness": "Grunt", "Surprise": "Gasp",
}

# Country acoustics, schema.COUNTRIES order: F1/F2/F3 multipliers, spectral tilt offset, f0 factor, burst rate.
_COUNTRY_FORMANTS = np.array([(1.00, 1.08, 1.04), (1.08, 0.94, 0.96), (0.94, 1.00, 0.94), (1.04, 1.03, 1.08)])
_COUNTRY_TILT = np.array([0.04, -0.06, 0.0, 0.04])  # added to the source low-pass coefficient
_COUNTRY_F0 = np.array([1.05, 0.95, 1.0, 1.02])
_COUNTRY_RATE = np.array([0.92, 1.0, 1.04, 1.12])


def _fixed_tables():
  """Country expression style [4, 10] (offsets on secondary intensities) and culture factors [4, 10]."""
  rng = np.random.default_rng(20220722)  # fixed: the tables are part of the generator, not of the seed
  style = rng.normal(0.0, 0.05, (len(schema.COUNTRIES), NUM_EMOTIONS))
  culture = rng.uniform(0.7, 1.3, (len(schema.AVB_CULTURE_COUNTRIES), NUM_EMOTIONS))
  return style, culture


_COUNTRY_STYLE, _CULTURE_FACTOR = _fixed_tables()  # _CULTURE_FACTOR rows: schema.AVB_CULTURE_COUNTRIES order
# Where each schema.AVB_CULTURE column sits in the flattened [country, emotion] culture factors.
_CULTURE_COLUMNS = np.array([schema.AVB_CULTURE_COUNTRIES.index(name.split("_")[0]) * NUM_EMOTIONS
                             + schema.EMOTIONS.index(name.split("_")[1]) for name in schema.AVB_CULTURE])

# Vowel formants F1-F3 (Hz, adult male reference); F4, F5 fixed. 'm' approximates a nasal hum.
_VOWELS = {
    "a": (730, 1090, 2440), "i": (280, 2250, 2900), "u": (310, 870, 2250), "o": (570, 840, 2410),
    "e": (530, 1840, 2480), "@": (500, 1500, 2500), "ae": (660, 1720, 2410), "m": (260, 1000, 2200),
}
_F45 = (3300.0, 4200.0)
_BANDWIDTHS = np.array([70.0, 90.0, 150.0, 250.0, 300.0])


# ---------------------------------------------------------------------------------------------------------------
# Speakers and clips.


@dataclasses.dataclass
class _Speaker:
  """Everything fixed for one speaker (voice, recording set-up, expression bias)."""
  index: int
  subject: str  # Subject_ID as written
  split: str
  country: int  # schema.COUNTRIES index
  age: float  # years
  f0: float  # base pitch (Hz)
  formants: np.ndarray  # [3] multipliers of F1-F3 (timbre x country pattern)
  formant_scale: float  # multiplier of F4-F5
  tilt: float  # source low-pass coefficient in [0, 0.9]: higher = darker voice
  breath: float  # aspiration share
  jitter: float  # relative f0 perturbation
  rate: float  # tempo multiplier for pulsed bursts
  loudness: float  # voice level (linear)
  bias: np.ndarray  # [10] personal offsets on non-dominant intensities
  snr_db: float  # voice-to-background ratio (dB) of a 0 dB burst at loudness 1
  eq_sos: np.ndarray  # microphone colouring, second-order sections
  hum: tuple  # (frequency Hz, relative level) or (0, 0)
  room_ir: np.ndarray  # [m] room impulse response (direct path first)
  dominants: np.ndarray  # [clips_per_speaker] dominant emotion of each clip


def _peaking_sos(freq, gain_db, q):
  """RBJ peaking-EQ biquad as one second-order section."""
  amp = 10.0 ** (gain_db / 40.0)
  w0 = 2 * np.pi * freq / SR
  alpha = np.sin(w0) / (2 * q)
  b = np.array([1 + alpha * amp, -2 * np.cos(w0), 1 - alpha * amp])
  a = np.array([1 + alpha / amp, -2 * np.cos(w0), 1 - alpha / amp])
  return np.concatenate([b / a[0], a / a[0]])[None]


def _room_ir(rng):
  """[m] impulse response of a small room: direct path plus an exponentially decaying diffuse tail."""
  rt60 = rng.uniform(0.08, 0.45)  # s; home rooms, from dry to somewhat live
  m = int(rt60 * SR)
  tail = rng.normal(0, 1, m) * np.exp(-6.9 * np.arange(m) / m)  # -60 dB at rt60
  tail = scipy.signal.lfilter([0.5], [1, -0.5], tail)  # walls absorb the highs
  ir = rng.uniform(0.05, 0.35) * tail / np.sqrt(np.sum(tail ** 2))
  ir[0] = 1.0
  return ir


def _make_speaker(seed, index, subject, split, country, clips_per_speaker):
  """Draws one speaker's voice, recording set-up and expression bias from its own random stream."""
  rng = np.random.default_rng([seed, _SPEAKER_STREAM, index])
  age = float(rng.integers(40, 80)) / 2  # 20.0-39.5 in half years
  years = age - 20.0
  female = rng.random() < 0.5
  # Age: slightly lower pitch and formants, a darker, breathier and more jittery voice.
  f0 = (215.0 if female else 120.0) * np.exp(rng.normal(0, 0.1)) * (1 - 0.004 * years) * _COUNTRY_F0[country]
  scale = (1.08 if female else 0.94) * np.exp(rng.normal(0, 0.03)) * (1 - 0.002 * years)
  formants = scale * _COUNTRY_FORMANTS[country] * np.exp(rng.normal(0, 0.015, 3))
  tilt = np.clip(0.4 + 0.005 * years + _COUNTRY_TILT[country] + rng.normal(0, 0.08), 0.0, 0.85)
  breath = np.clip(0.03 + 0.006 * years + rng.normal(0, 0.02), 0.0, 0.3)
  jitter = 0.004 + 0.0004 * years + abs(rng.normal(0, 0.002))
  rate = _COUNTRY_RATE[country] * np.exp(rng.normal(0, 0.05))
  loudness = 10 ** (rng.normal(0, 3) / 20)
  bias = rng.normal(0, _BIAS_STD, NUM_EMOTIONS)
  # Recording set-up: a mains hum now and then, a microphone with a resonance and a bass roll-off, a room.
  snr_db = rng.uniform(15, 40)
  hum = (float(rng.choice([50.0, 60.0])), float(rng.uniform(0.02, 0.06))) if rng.random() < 0.25 else (0.0, 0.0)
  eq = np.concatenate([
      _peaking_sos(rng.uniform(300, 4000), rng.normal(0, 4), rng.uniform(0.7, 2.0)),
      scipy.signal.butter(1, rng.uniform(40, 150), "highpass", fs=SR, output="sos"),
  ])
  room_ir = _room_ir(rng)
  # Each speaker expresses every emotion about equally often as the dominant one.
  rounds = -(-clips_per_speaker // NUM_EMOTIONS)
  dominants = np.concatenate([rng.permutation(NUM_EMOTIONS) for _ in range(rounds)])[:clips_per_speaker]
  return _Speaker(
      index=index, subject=subject, split=split, country=country, age=age, f0=float(f0), formants=formants,
      formant_scale=float(scale), tilt=float(tilt), breath=float(breath), jitter=float(jitter), rate=float(rate),
      loudness=float(loudness), bias=bias, snr_db=float(snr_db), eq_sos=eq, hum=hum, room_ir=room_ir,
      dominants=dominants)


def _clip_intensities(spk, dominant, rng):
  """Returns (expressed [10], labels [10]): what the audio shows and what raters wrote, both with max 1.0."""
  base = rng.uniform(0.08, 0.25, NUM_EMOTIONS)
  affine = [_E[name] for name in _AFFINE[schema.EMOTIONS[dominant]]]
  num_secondary = rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25])
  for e in rng.choice(affine, num_secondary, replace=False, p=_AFFINE_PROBS):
    base[e] += rng.uniform(0.2, 0.65)
  if rng.random() < 0.3:  # now and then an unrelated emotion, so the affinities are not the whole story
    base[rng.integers(NUM_EMOTIONS)] += rng.uniform(0.1, 0.4)
  style = _COUNTRY_STYLE[spk.country]
  expressed = np.clip(base + style + _BIAS_IN_AUDIO * spk.bias, 0.0, 0.95)
  labels = np.clip(expressed + (1 - _BIAS_IN_AUDIO) * spk.bias + rng.normal(0, _RATER_NOISE, NUM_EMOTIONS),
                   0.0, 0.95)
  expressed[dominant] = labels[dominant] = 1.0  # ratings were rescaled per clip: the dominant one is 1.0
  return expressed, labels


# ---------------------------------------------------------------------------------------------------------------
# Synthesis toolkit. Signals are float64 arrays of samples at SR; levels are relative (the clip is normalised last).


@dataclasses.dataclass
class _Voice:
  """The speaker's voice with the clip's global blend applied."""
  f0: float  # Hz
  formants: np.ndarray  # [3] F1-F3 multipliers
  formant_scale: float  # F4-F5 multiplier
  tilt: float  # source low-pass coefficient
  breath: float
  jitter: float
  rate: float
  effort: float  # 0 (lax) - 1 (pressed): arousal-driven vocal effort


def _contour(n, points):
  """Piecewise-linear [n] contour through (fraction of the length, value) points."""
  xs, ys = zip(*points)
  return np.interp(np.linspace(0.0, 1.0, n), xs, ys)


def _smooth_noise(n, rng, rate_hz):
  """[n] zero-mean unit-std noise band-limited to about `rate_hz` (for jitter, shimmer, tremor)."""
  control = rng.normal(0, 1, int(n * rate_hz / SR) + 4)
  return np.interp(np.arange(n) * rate_hz / SR, np.arange(control.size), control)


def _glottal(f0, voice, rng, *, tension=0.5, subharmonic=0.0, shimmer=0.05):
  """Glottal flow derivative [n] for an f0 track [n] in Hz.

  Rosenberg pulses: opening and closing quarter-cosines whose closing gets sharper with `tension` (0-1), which
  strengthens the upper harmonics; `subharmonic` (0-1) attenuates every other period (period doubling, a rough
  voice); jitter and shimmer are smooth random perturbations of f0 and amplitude.
  """
  n = f0.size
  f0 = np.minimum(f0 * (1 + voice.jitter * _smooth_noise(n, rng, 150.0)), 1400.0)
  phase = np.cumsum(f0) / SR + rng.random()
  frac = phase % 1.0
  tension = np.clip(tension + 0.3 * (voice.effort - 0.5), 0.0, 1.0)
  open_q = 0.75 - 0.35 * tension  # share of the period the glottis is open
  rise, fall = 0.65 * open_q, 0.35 * open_q * (1.2 - tension)
  grid = np.linspace(0.0, 1.0, 1025)  # one period tabulated, then looked up: much cheaper than cosines per sample
  table = np.where(grid < rise, 0.5 * (1 - np.cos(np.pi * grid / rise)),
                   np.where(grid < rise + fall, np.cos(0.5 * np.pi * (grid - rise) / fall), 0.0))
  flow = np.interp(frac, grid, table)
  amp = 1 + shimmer * _smooth_noise(n, rng, 120.0)
  if subharmonic:
    amp = amp * (1 - subharmonic * (np.floor(phase) % 2))
  source = np.diff(flow * amp, prepend=0.0) * SR / np.maximum(f0, 50.0)  # level roughly independent of f0
  return scipy.signal.lfilter([1 - voice.tilt], [1, -voice.tilt], source)  # spectral tilt (darker voice)


def _tract_sos(vowel, voice, bw_scale=1.0):
  """Cascade of five formant resonators (unit gain at DC) for a vowel in the speaker's vocal tract."""
  freqs = np.concatenate([np.array(_VOWELS[vowel]) * voice.formants, np.array(_F45) * voice.formant_scale])
  sections = []
  for f, bw in zip(freqs, _BANDWIDTHS * bw_scale):
    if f >= 0.45 * SR:
      continue
    r = np.exp(-np.pi * bw / SR)
    a1, a2 = -2 * r * np.cos(2 * np.pi * f / SR), r * r
    sections.append([1 + a1 + a2, 0, 0, 1, a1, a2])
  return np.array(sections)


def _tract(x, voice, vowels, bw_scale=1.0):
  """Filters x [n] through the vocal tract, gliding linearly from vowels[0] to vowels[-1]."""
  first = scipy.signal.sosfilt(_tract_sos(vowels[0], voice, bw_scale), x)
  if len(vowels) == 1 or vowels[-1] == vowels[0]:
    return first
  last = scipy.signal.sosfilt(_tract_sos(vowels[-1], voice, bw_scale), x)
  mix = np.linspace(0.0, 1.0, x.size)  # crossfading two static filters approximates a formant transition
  return (1 - mix) * first + mix * last


def _noise(n, rng, lowpass=0.0):
  """[n] white (or one-pole low-passed) Gaussian noise with unit std."""
  x = rng.normal(0, 1, n)
  if lowpass:
    x = scipy.signal.lfilter([1 - lowpass], [1, -lowpass], x)
    x /= x.std() + 1e-12
  return x


def _adsr(n, attack, release, curve=1.0):
  """[n] envelope with linear attack and release of `attack`/`release` seconds (powered by `curve`)."""
  env = np.ones(n)
  na, nr = min(int(attack * SR), n // 2), min(int(release * SR), n // 2)
  if na:
    env[:na] = np.linspace(0, 1, na)
  if nr:
    env[n - nr:] = np.minimum(env[n - nr:], np.linspace(1, 0, nr))
  return env ** curve


def _pulses(n, onsets, lengths, attack=0.2):
  """[n] envelope of pulses (onsets, lengths in seconds), like the syllables of a laugh.

  Each pulse rises quickly over the first `attack` share of its length, then decays smoothly.
  """
  env = np.zeros(n)
  for onset, length in zip(onsets, lengths):
    start, size = int(onset * SR), max(int(length * SR), 8)
    if start >= n:
      break
    t = np.linspace(0, 1, size)
    shape = np.where(t < attack, np.sin(0.5 * np.pi * t / attack), np.cos(0.5 * np.pi * (t - attack) / (1 - attack)))
    stop = min(start + size, n)
    env[start:stop] = np.maximum(env[start:stop], shape[:stop - start] ** 1.5)
  return env


_HISS_SOS = scipy.signal.butter(2, 3500, "highpass", fs=SR, output="sos")


def _phonate(voice, f0, vowels, rng, *, tension=0.5, breath=0.0, subharmonic=0.0, shimmer=0.05, bw_scale=1.0,
             noise_env=None):
  """Voiced sound [n]: glottal source plus aspiration (its share `breath` + the speaker's), through the tract.

  The aspiration follows the glottal cycle a little (pulsed breath noise) and may have its own envelope.
  """
  n = f0.size
  voiced = _glottal(f0, voice, rng, tension=tension, subharmonic=subharmonic, shimmer=shimmer)
  voiced /= np.abs(voiced).max() + 1e-9
  share = np.clip(breath + voice.breath, 0.0, 0.95)
  aspiration = _noise(n, rng) * (0.6 + 0.4 * np.abs(voiced))
  if noise_env is not None:
    aspiration *= noise_env
  hiss = scipy.signal.sosfilt(_HISS_SOS, aspiration)  # turbulence above the formants, bypassing the tract
  return _tract((1 - share) * voiced + share * 0.5 * aspiration, voice, vowels, bw_scale) + 0.03 * share * hiss


def _normalise(x):
  return x / (np.abs(x).max() + 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# One function per emotion signature: (voice, seconds, rng) -> [n] float burst with peak 1.


def _amusement(voice, seconds, rng):
  """Laugh: 'ha-ha-ha' syllables at ~5 Hz, aspirated onsets, each falling in pitch, the series decaying."""
  n = int(seconds * SR)
  period = 1 / (rng.uniform(4.2, 5.6) * voice.rate)
  onsets = np.arange(0.02, seconds - 0.06, period)
  lengths = period * rng.uniform(0.55, 0.8, onsets.size)
  decay = np.interp(np.arange(n) / n, [0, 1], [1.0, rng.uniform(0.4, 0.8)])
  voiced_env = _pulses(n, onsets + 0.025, lengths - 0.025, attack=0.15) * decay
  h_env = _pulses(n, onsets, np.full(onsets.size, 0.06), attack=0.3)
  syllable_fall = 1 - 0.12 * ((np.arange(n) / SR - 0.02) % period) / period  # each 'ha' falls a little
  f0 = voice.f0 * rng.uniform(1.3, 1.6) * _contour(n, [(0, 1.05), (1, 0.85)]) * syllable_fall
  voiced = _phonate(voice, f0, ["ae"], rng, tension=0.4, breath=0.15) * voiced_env
  h = _tract(_noise(n, rng), voice, ["a"], bw_scale=2.0) * h_env
  return _normalise(voiced + 0.5 * h)


def _excitement(voice, seconds, rng):
  """Pant: fast (7-9 Hz) short breathy pulses with a steeply rising pitch; every other one an in-breath."""
  n = int(seconds * SR)
  period = 1 / (rng.uniform(7.0, 9.0) * voice.rate)
  onsets = np.arange(0.01, seconds - 0.04, period)
  lengths = period * rng.uniform(0.5, 0.7, onsets.size)
  out_breaths, in_breaths = onsets[::2], onsets[1::2]
  f0 = voice.f0 * _contour(n, [(0, rng.uniform(1.3, 1.6)), (1, rng.uniform(2.0, 2.5))])
  voiced = _phonate(voice, f0, ["a", "ae"], rng, tension=0.6, breath=0.35)
  voiced *= _pulses(n, out_breaths, lengths[::2], attack=0.25)
  inhale = _tract(_noise(n, rng), voice, ["@"], bw_scale=2.5) * _pulses(n, in_breaths, lengths[1::2], attack=0.5)
  return _normalise(voiced + 0.35 * inhale)


def _awe(voice, seconds, rng):
  """Long breathy 'ahh-oh' (a wow): slow attack, pitch falling from high to low, long release."""
  n = int(seconds * SR)
  f0 = voice.f0 * _contour(n, [(0, rng.uniform(1.35, 1.6)), (0.3, 1.3), (1, rng.uniform(0.8, 0.95))])
  env = _adsr(n, rng.uniform(0.08, 0.18), 0.5 * seconds, curve=1.5)
  x = _phonate(voice, f0, ["a", "o"], rng, tension=0.2, breath=0.3, noise_env=np.linspace(1.5, 0.5, n))
  return _normalise(x * env)


def _triumph(voice, seconds, rng):
  """Loud tense 'yeah!' shout: a fast rising glide /e/ -> /a/, then a sustained high vowel."""
  n = int(seconds * SR)
  peak = rng.uniform(1.7, 2.1)
  f0 = voice.f0 * _contour(n, [(0, 1.2), (0.3, peak), (0.85, peak * 0.95), (1, peak * 0.85)])
  x = _phonate(voice, f0, ["e", "a"], rng, tension=0.85, breath=0.05, shimmer=0.08)
  return _normalise(x * _adsr(n, 0.03, 0.15))


def _fear(voice, seconds, rng):
  """Scream: very high tense 'ii' with a sharp onset, fast tremor and strong noise."""
  n = int(seconds * SR)
  level = rng.uniform(2.6, 3.4)
  tremor = 1 + 0.03 * np.sin(2 * np.pi * rng.uniform(8, 11) * np.arange(n) / SR)
  f0 = voice.f0 * _contour(n, [(0, level * 0.8), (0.15, level), (1, level * 1.05)]) * tremor
  x = _phonate(voice, f0, ["i", "ae"], rng, tension=0.9, breath=0.3, bw_scale=1.5)
  return _normalise(x * _adsr(n, 0.02, 0.12))


def _horror(voice, seconds, rng):
  """Lower, rougher scream: falling 'oh' with period doubling, more jitter and more noise than fear."""
  n = int(seconds * SR)
  level = rng.uniform(1.7, 2.2)
  rough = dataclasses.replace(voice, jitter=voice.jitter * 3)
  f0 = voice.f0 * _contour(n, [(0, level), (0.2, level * 1.05), (1, level * 0.75)])
  x = _phonate(rough, f0, ["a", "o"], rng, tension=0.8, breath=0.45, subharmonic=0.5, shimmer=0.2, bw_scale=1.6)
  return _normalise(x * _adsr(n, 0.03, 0.25))


def _distress(voice, seconds, rng):
  """Groan: strained, pressed mid-pitch voice with strong jitter and shimmer, slow tremor, slightly falling."""
  n = int(seconds * SR)
  strained = dataclasses.replace(voice, jitter=voice.jitter * 4)
  f0 = voice.f0 * _contour(n, [(0, rng.uniform(1.05, 1.25)), (0.4, 1.2), (1, rng.uniform(0.9, 1.0))])
  tremor = 1 + 0.25 * np.sin(2 * np.pi * rng.uniform(3, 4.5) * np.arange(n) / SR + rng.uniform(0, 6.3))
  x = _phonate(strained, f0, ["e", "@"], rng, tension=0.95, breath=0.2, shimmer=0.25)
  return _normalise(x * tremor * _adsr(n, 0.08, 0.2))


def _sadness(voice, seconds, rng):
  """Cry: two to four sobs with an arched pitch and 5-7 Hz vibrato, short inhaled breaths between them."""
  n = int(seconds * SR)
  sobs = int(np.clip(round(seconds / 0.45), 2, 4))
  slot = seconds / sobs
  onsets = np.arange(sobs) * slot
  t = np.arange(n) / SR
  arch = np.sin(np.pi * np.clip((t % slot) / (0.75 * slot), 0, 1))  # rise then fall within each sob
  vibrato = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(5, 7) * t)
  f0 = voice.f0 * rng.uniform(1.2, 1.5) * (0.85 + 0.3 * arch) * vibrato
  sob_env = _pulses(n, onsets, np.full(sobs, 0.75 * slot), attack=0.3)
  inhale_env = _pulses(n, onsets + 0.78 * slot, np.full(sobs, 0.2 * slot), attack=0.6)
  voiced = _phonate(voice, f0, ["u", "@"], rng, tension=0.3, breath=0.3) * sob_env
  inhale = _tract(_noise(n, rng), voice, ["i"], bw_scale=2.0) * inhale_env
  return _normalise(voiced + 0.3 * inhale)


def _awkwardness(voice, seconds, rng):
  """Grunt: one to three short low nasal hums ('mm', 'uh') separated by hesitation gaps."""
  n = int(seconds * SR)
  hums = int(rng.integers(1, 4))
  lengths = rng.uniform(0.12, 0.3, hums)
  gaps = rng.uniform(0.1, 0.3, hums)
  onsets = np.concatenate([[0.0], np.cumsum(lengths + gaps)[:-1]]) * seconds / (lengths + gaps).sum()
  f0 = voice.f0 * rng.uniform(0.8, 0.95) * _contour(n, [(0, 1.0), (1, 0.9)])
  vowel = "m" if rng.random() < 0.6 else "@"
  x = _phonate(voice, f0, [vowel], rng, tension=0.35, breath=0.05, bw_scale=1.3)
  if vowel == "m":
    x = scipy.signal.lfilter([0.3], [1, -0.7], x)  # the closed mouth removes the upper formants
  return _normalise(x * _pulses(n, onsets, lengths * seconds / (lengths + gaps).sum(), attack=0.3))


def _surprise(voice, seconds, rng):
  """Gasp: a sharp inhaled noise burst with formants rising (/@/ -> /a/), then a brief rising 'oh!'."""
  n = int(seconds * SR)
  split = int(n * rng.uniform(0.45, 0.6))
  inhale = _tract(_noise(split, rng), voice, ["@", "a"], bw_scale=1.8) * _adsr(split, 0.01, 0.05) ** 0.5
  f0 = voice.f0 * _contour(n - split, [(0, 1.3), (1, rng.uniform(1.8, 2.2))])
  oh = _phonate(voice, f0, ["o", "a"], rng, tension=0.6, breath=0.25) * _adsr(n - split, 0.01, 0.08)
  return _normalise(np.concatenate([0.8 * _normalise(inhale), _normalise(oh)]))


# emotion -> (signature, duration range in s as the dominant burst, level in dB)
_SIGNATURES = {
    "Awe": (_awe, (0.9, 1.8), -5.0),
    "Excitement": (_excitement, (0.6, 1.2), -3.0),
    "Amusement": (_amusement, (0.7, 1.6), -3.0),
    "Awkwardness": (_awkwardness, (0.5, 1.1), -10.0),
    "Fear": (_fear, (0.5, 1.2), 0.0),
    "Horror": (_horror, (0.6, 1.3), -1.0),
    "Distress": (_distress, (0.7, 1.5), -4.0),
    "Triumph": (_triumph, (0.6, 1.3), 0.0),
    "Sadness": (_sadness, (0.9, 1.8), -7.0),
    "Surprise": (_surprise, (0.35, 0.6), -3.0),
}


def _clip_voice(spk, expressed, rng):
  """The speaker's voice with the clip's global blend: pitch, effort and formants follow all ten intensities."""
  weights = expressed / expressed.sum()
  valence, arousal = weights @ _VALENCE_AROUSAL
  smile = 1 + 0.05 * (valence - 0.5)  # spread lips shorten the tract: higher F2/F3
  return _Voice(
      f0=spk.f0 * (1 + 0.3 * (arousal - 0.5)) * np.exp(rng.normal(0, 0.04)),
      formants=spk.formants * np.array([1.0, smile, smile]) * np.exp(rng.normal(0, 0.01, 3)),
      formant_scale=spk.formant_scale, tilt=float(np.clip(spk.tilt - 0.3 * (arousal - 0.5), 0, 0.9)),
      breath=spk.breath, jitter=spk.jitter, rate=spk.rate * np.exp(rng.normal(0, 0.04)), effort=float(arousal))


def _render_clip(spk, dominant, expressed, rng):
  """Clip audio [n] int16 at SR: the dominant burst, secondary bursts, then the recording chain."""
  voice = _clip_voice(spk, expressed, rng)
  secondary = [e for e in np.argsort(-expressed) if e != dominant and expressed[e] >= 0.35][:2]
  bursts = []
  for e, strength in [(dominant, 1.0)] + [(e, expressed[e]) for e in secondary]:
    fn, (lo, hi), level_db = _SIGNATURES[schema.EMOTIONS[e]]
    seconds = rng.uniform(lo, hi) * (1.0 if e == dominant else 0.25 + 0.5 * strength)
    level = 10 ** (level_db / 20) * (1.0 if e == dominant else 0.2 + 0.8 * strength)
    bursts.append((max(seconds, 0.15), level, fn))
  lead, trail = rng.uniform(0.04, 0.2, 2)  # room tone before and after the voice
  gaps = rng.uniform(0.04, 0.15, len(bursts) - 1)
  budget = MAX_SECONDS - lead - trail - gaps.sum()
  squeeze = min(1.0, budget / sum(b[0] for b in bursts))  # long blends are shortened to fit the clip
  order = rng.permutation(len(bursts))  # secondaries may come before or after the dominant burst
  pieces = [np.zeros(int(lead * SR))]
  for k, i in enumerate(order):
    seconds, level, fn = bursts[i]
    if k:
      pieces.append(np.zeros(int(gaps[k - 1] * SR)))
    pieces.append(level * fn(voice, max(seconds * squeeze, 0.12), rng))
  pieces.append(np.zeros(int(trail * SR)))
  voice_track = np.concatenate(pieces)
  voice_track = np.pad(voice_track, (0, max(0, int(MIN_SECONDS * SR) - voice_track.size)))  # a lone short gasp
  voice_track = voice_track[:int(MAX_SECONDS * SR)] * spk.loudness
  return _record(spk, voice_track, rng)


_VOICE_RMS = 0.25  # typical RMS of a burst at 0 dB level (peak 1): the reference for noise levels


def _record(spk, x, rng):
  """Room, microphone and gain: reverb, background noise at the speaker's SNR, hum, EQ, int16 at a random peak."""
  n = x.size
  x = scipy.signal.fftconvolve(x, spk.room_ir)[:n]  # the room colours the voice, not the noise added later
  # The noise floor is absolute: quiet speakers and quiet bursts (a grunt) end up with a lower SNR.
  noise_rms = _VOICE_RMS * 10 ** (-(spk.snr_db + rng.normal(0, 3)) / 20)
  x = x + _noise(n, rng, lowpass=rng.uniform(0.5, 0.9)) * noise_rms
  if spk.hum[0]:
    t = np.arange(n) / SR + rng.random()
    hum = np.sin(2 * np.pi * spk.hum[0] * t) + 0.5 * np.sin(2 * np.pi * 3 * spk.hum[0] * t)
    x = x + spk.hum[1] * _VOICE_RMS * hum  # a sum of sinusoids: no DC
  x = scipy.signal.sosfilt(spk.eq_sos, x)
  x -= x.mean()
  peak_db = rng.uniform(-8.0, -1.0)
  x *= 10 ** (peak_db / 20) / (np.abs(x).max() + 1e-12)
  return np.round(x * 32767).astype(np.int16)


def _avb_labels(labels, dominant, rng):
  """A-VB labels from the rated emotions [10]: ([2] valence/arousal, [40] culture, Voc_Type name)."""
  two = np.clip(labels @ _VALENCE_AROUSAL / labels.sum() + rng.normal(0, 0.02, 2), 0.0, 1.0)
  culture = np.clip(labels[None] * _CULTURE_FACTOR + rng.normal(0, 0.03, _CULTURE_FACTOR.shape), 0.0, 1.0)
  return two, culture.reshape(-1)[_CULTURE_COLUMNS], VOC_TYPE[schema.EMOTIONS[dominant]]


# ---------------------------------------------------------------------------------------------------------------
# Writing the release.


def _resolve_size(size):
  if isinstance(size, DemoSize):
    return size
  if size not in SIZES:
    raise ValueError(f"demo corpus size {size!r} unknown; expected one of {', '.join(SIZES)} or a DemoSize")
  return SIZES[size]


def _fmt(value, digits=4):
  return f"{value:.{digits}f}"


def _write_csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def write_demo_corpus(root, *, size="default", seed=0, country_as="name", processes=1, layout="exvo"):
  """Writes a synthetic corpus in the HUME-VB (+ A-VB labels) release layout under `root`.

  Args:
    root: output folder (created; existing files of the same names are overwritten).
    size: a key of `SIZES` or a `DemoSize`.
    seed: integer; the same seed gives byte-identical files, different seeds different corpora.
    country_as: "name" writes the country name in `Country`; "code" writes the integer 0-3 (schema.COUNTRIES
      order) in `Country` plus the name in `Country_string` (both variants exist in circulation).
    processes: worker processes rendering the clips (the files do not depend on it). Each worker holds one clip's
      audio at a time; the parent keeps only the CSV rows.
    layout: "exvo" puts the audio in wav/ (the ExVo release), "avb" in audio/wav/ (the A-VB release); every file
      is the same either way.
  Returns:
    `root` as a pathlib.Path.
  """
  if country_as not in ("name", "code"):
    raise ValueError(f"country_as is {country_as!r}; expected 'name' or 'code'")
  if layout not in AUDIO_DIRS:
    raise ValueError(f"layout is {layout!r}; expected one of {', '.join(AUDIO_DIRS)}")
  size = _resolve_size(size)
  root = pathlib.Path(root)
  (root / AUDIO_DIRS[layout]).mkdir(parents=True, exist_ok=True)
  (root / "labels").mkdir(exist_ok=True)

  corpus_rng = np.random.default_rng([seed, _CORPUS_STREAM])
  counts = {"Train": size.train_speakers, "Val": size.val_speakers, "Test": size.test_speakers}
  num_speakers = sum(counts.values())
  subjects = corpus_rng.choice(10 * num_speakers + 100, num_speakers, replace=False)
  file_ids = corpus_rng.choice(100_000, size.num_clips, replace=False)  # 5 digits, zero-padded when written
  jobs, first_clip = [], 0
  for split in schema.SPLITS:
    countries = corpus_rng.permutation(np.resize(np.arange(len(schema.COUNTRIES)), counts[split]))  # balanced
    for country, num_clips in zip(countries, size.speaker_clips(split)):
      index = len(jobs)
      speaker = _make_speaker(seed, index, f"Speaker_{subjects[index]}", split, int(country), num_clips)
      jobs.append(_SpeakerJob(os.fspath(root / AUDIO_DIRS[layout]), seed, country_as, speaker, first_clip,
                              file_ids[first_clip:first_clip + num_clips]))
      first_clip += num_clips
  for job in jobs:
    if job.speaker.split == "Test":
      job.support = set(corpus_rng.choice(len(job.file_ids), 2, replace=False).tolist())

  rows = {name: [] for name in ("info", "high", "two", "culture", "type")}
  if processes > 1:
    # spawn, not fork: the caller may hold JAX's threads. Jobs are whole speakers, results come back in order.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
      results = pool.map(_write_speaker, jobs, chunksize=4)
      for result in results:
        for name, speaker_rows in result.items():
          rows[name].extend(speaker_rows)
  else:
    for job in jobs:
      for name, speaker_rows in _write_speaker(job).items():
        rows[name].extend(speaker_rows)

  info_header = ["File_ID", "Subject_ID", "Split", "Age", "Country"]
  info_header += ["Country_string"] if country_as == "code" else []
  info_header += list(schema.EMOTIONS)
  _write_csv(root / "data_info.csv", info_header, rows["info"])
  _write_csv(root / "labels" / "high_info.csv", ["File_ID", "Split", *schema.EMOTIONS], rows["high"])
  _write_csv(root / "labels" / "two_info.csv", ["File_ID", "Split", *schema.AVB_TWO], rows["two"])
  _write_csv(root / "labels" / "culture_info.csv", ["File_ID", "Split", *schema.AVB_CULTURE], rows["culture"])
  _write_csv(root / "labels" / "type_info.csv", ["File_ID", "Split", "Voc_Type"], rows["type"])
  return root


@dataclasses.dataclass
class _SpeakerJob:
  """One speaker's clips to render: global clip indices first_clip, first_clip + 1, ... (their random streams)."""
  audio_dir: str
  seed: int
  country_as: str
  speaker: _Speaker
  first_clip: int
  file_ids: np.ndarray
  support: set = dataclasses.field(default_factory=set)  # Test speakers: which of their clips carry labels


def _write_speaker(job):
  """Renders and writes one speaker's wav files; returns their CSV rows {csv name: [row, ...]} in clip order."""
  spk, wav_dir = job.speaker, pathlib.Path(job.audio_dir)
  rows = {name: [] for name in ("info", "high", "two", "culture", "type")}
  for k, dominant in enumerate(spk.dominants):
    rng = np.random.default_rng([job.seed, _CLIP_STREAM, job.first_clip + k])
    expressed, labels = _clip_intensities(spk, int(dominant), rng)
    samples = _render_clip(spk, int(dominant), expressed, rng)
    two, culture, voc_type = _avb_labels(labels, int(dominant), rng)
    stem = f"{job.file_ids[k]:05d}"
    buffer = io.BytesIO()  # one write per file: soundfile's many small seeks are slow on some disks
    soundfile.write(buffer, samples, SR, subtype="PCM_16", format="WAV")
    (wav_dir / f"{stem}.wav").write_bytes(buffer.getvalue())

    file_id, test = f"[{stem}]", spk.split == "Test"
    if test:
      age, country = "", [""] * (2 if job.country_as == "code" else 1)
    else:
      name = schema.COUNTRIES[spk.country]
      age, country = f"{spk.age:.1f}", ([str(spk.country), name] if job.country_as == "code" else [name])
    emotions = [_fmt(v) for v in labels] if (not test or k in job.support) else [""] * NUM_EMOTIONS
    rows["info"].append([file_id, spk.subject, spk.split, age, *country, *emotions])
    hidden = lambda m: ["-1"] * m  # A-VB writes hidden test labels as -1
    rows["high"].append([file_id, spk.split, *(hidden(NUM_EMOTIONS) if test else [_fmt(v) for v in labels])])
    rows["two"].append([file_id, spk.split, *(hidden(2) if test else [_fmt(v) for v in two])])
    rows["culture"].append([file_id, spk.split, *(hidden(culture.size) if test else [_fmt(v) for v in culture])])
    rows["type"].append([file_id, spk.split, "-1" if test else voc_type])
  return rows


def _size_name(size):
  if isinstance(size, DemoSize):
    clips = f"x{size.clips_per_speaker}" if size.clips is None else "x" + "-".join(map(str, size.clips))
    return f"{size.train_speakers}-{size.val_speakers}-{size.test_speakers}{clips}"
  _resolve_size(size)
  return size


def ensure_demo_corpus(cache_dir, *, size="default", seed=0, processes=None, layout="exvo"):
  """Returns `<cache_dir>/demo-<size>-seed<seed>` (with `-avb` for the A-VB layout), building it first if it is
  absent or incomplete.

  The corpus is written to a temporary folder beside it and renamed into place with a completion marker (which
  records GENERATOR_VERSION), so an interrupted build, or one from an older generator, is rebuilt. Prints nothing.
  `processes` (default: the machine's cores for corpora of PARALLEL_CLIPS clips or more, else 1) render clips.
  """
  cache_dir = pathlib.Path(cache_dir)
  target = cache_dir / (f"demo-{_size_name(size)}-seed{seed}" + ("" if layout == "exvo" else f"-{layout}"))
  if _is_complete(target):
    return target
  cache_dir.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
  try:
    if processes is None:
      processes = cores.usable() if _resolve_size(size).num_clips >= PARALLEL_CLIPS else 1
    write_demo_corpus(staging, size=size, seed=seed, processes=processes, layout=layout)
    (staging / _MARKER).write_text(_marker_text())  # written last: its presence means the build finished
    if _is_complete(target):
      return target  # another process finished the same build meanwhile
    if target.exists():
      shutil.rmtree(target)  # an interrupted or outdated build
    try:
      os.replace(staging, target)
    except OSError:
      if not _is_complete(target):  # lost a race to another finished build: fine; anything else is an error
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _marker_text():
  return f"exvo_jax demo corpus, generator version {GENERATOR_VERSION}\n"


def _is_complete(corpus):
  marker = pathlib.Path(corpus) / _MARKER
  return marker.is_file() and marker.read_text() == _marker_text()


def main(argv=None):
  parser = argparse.ArgumentParser(description="Write a synthetic HUME-VB-layout demo corpus.")
  parser.add_argument("out_dir", type=pathlib.Path)
  parser.add_argument("--size", default="default", choices=sorted(SIZES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--country_as", default="name", choices=("name", "code"))
  parser.add_argument("--processes", type=int, default=cores.usable(), help="worker processes")
  parser.add_argument("--layout", default="exvo", choices=sorted(AUDIO_DIRS),
                      help="exvo: audio in wav/; avb: audio in audio/wav/ as in the A-VB release")
  args = parser.parse_args(argv)
  root = write_demo_corpus(args.out_dir, size=args.size, seed=args.seed, country_as=args.country_as,
                           processes=args.processes, layout=args.layout)
  print(root)


if __name__ == "__main__":
  main()
