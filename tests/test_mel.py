"""The jnp mel front end against librosa on the same clips (synthetic and real EmoGator), and its Griffin-Lim inverse.

Real clips are read from ../shared/data/emogator (48 kHz MP3, converted to 16 kHz by `data.audio.load_audio`);
those checks skip cleanly when the folder is absent.
"""
import pathlib

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from exvo_jax.data import audio as audio_lib
from exvo_jax.features import mel

EMOGATOR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "emogator"
# Three takes of different speakers and loudness (peaks 0.32, 0.92, 0.64 of full scale), 1.9 s each.
REAL_FILES = ("000003-01-1.mp3", "000005-04-2.mp3", "000011-11-1.mp3")

# Our float32 log-mel against librosa's float32 one, over ALL bins. The FFTs of both round to ~1e-7 of the
# frame's peak magnitude (XLA's CPU FFT measured ~3x numpy's), which log(mel + 1e-6) / 2 turns into large
# relative errors in quiet bins of loud frames. Measured max abs difference: 2.2e-4 over the 3 clips below and
# 1.9e-4 over 40 other EmoGator clips and 4 synthetic chirps; the mean is ~8e-7. The tolerance leaves ~4x
# margin; a wrong window, padding, filterbank or log would be off by 1e-2 or more.
LOG_MEL_ATOL = 1e-3
LOG_MEL_MEAN_ATOL = 1e-5


def _librosa_log_mel(audio):
  mel_power = librosa.feature.melspectrogram(y=audio, sr=16_000, n_fft=512, hop_length=128, n_mels=128, power=2.0,
                                             norm=1)
  return np.log(mel_power + 1e-6) / 2


def _chirp(num_samples, seed):
  """[num_samples] float32: a 150 -> 450 Hz chirp with 8 harmonics under a swell envelope, plus noise at -40 dB."""
  rng = np.random.default_rng(seed)
  phase = 2 * np.pi * np.cumsum(np.linspace(150.0, 450.0, num_samples)) / mel.SAMPLE_RATE
  envelope = np.sin(np.pi * np.arange(num_samples) / num_samples) ** 0.5
  harmonics = sum(0.5 / k * np.sin(k * phase) for k in range(1, 9))
  return (envelope * harmonics + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def real_clips():
  """[3] float32 clips at 16 kHz in [-1, 1] (raw lengths), or a skip without the EmoGator folder."""
  if not (EMOGATOR / "mp3").is_dir():
    pytest.skip(f"EmoGator folder not found at {EMOGATOR}")
  return [audio_lib.load_audio(EMOGATOR / "mp3" / name)[0].astype(np.float32) / 32768 for name in REAL_FILES]


def test_filterbank_matches_librosa():
  weights = mel.filterbank()
  reference = librosa.filters.mel(sr=16_000, n_fft=512, n_mels=128, norm=1)
  assert weights.shape == (mel.N_MELS, mel.N_FFT // 2 + 1) and weights.dtype == np.float32
  # Ours rounds float64 weights once; librosa normalises in float32: measured max difference 6e-8 (1 ulp).
  np.testing.assert_allclose(weights, reference, rtol=0, atol=1e-7)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-6)  # norm=1: unit L1 norm per band
  assert mel.filterbank() is weights  # cached


def test_constants():
  assert mel.CLIP_SAMPLES == 65_408 and 1 + mel.CLIP_SAMPLES // mel.HOP == mel.NUM_FRAMES
  assert mel.PAD_VALUE == pytest.approx(np.log(1e-6) / 2)


def test_fit_samples_cuts_and_pads():
  clip = np.arange(1, 1001, dtype=np.int16)
  padded = mel.fit_samples(clip)
  assert padded.shape == (mel.CLIP_SAMPLES,) and padded.dtype == np.int16
  np.testing.assert_array_equal(padded[:1000], clip)
  assert not padded[1000:].any()
  long_batch = np.ones((2, mel.CLIP_SAMPLES + 7), np.float32)
  assert mel.fit_samples(long_batch).shape == (2, mel.CLIP_SAMPLES)


def _check_against_librosa(clip):
  """Shape (1 + T // 128 frames) and values of our log-mel against librosa's; returns our [N_MELS, frames]."""
  ours = np.asarray(mel.log_mel(clip[None]))[0]
  reference = _librosa_log_mel(clip)
  assert ours.shape == reference.shape == (mel.N_MELS, 1 + len(clip) // mel.HOP)
  difference = np.abs(ours - reference)
  assert difference.max() < LOG_MEL_ATOL, difference.max()
  assert difference.mean() < LOG_MEL_MEAN_ATOL, difference.mean()
  return ours


def _check_padding(clip):
  """Frames of a fit_samples-padded clip that see only zeros hold exactly PAD_VALUE."""
  values = _check_against_librosa(mel.fit_samples(clip))
  assert values.shape == (mel.N_MELS, mel.NUM_FRAMES)
  # Frame f covers samples [128 f - 256, 128 f + 256): past the clip from frame ceil((T + 256) / 128) on.
  first_padding_frame = -(-(len(clip) + mel.N_FFT // 2) // mel.HOP)
  np.testing.assert_array_equal(values[:, first_padding_frame:], np.float32(mel.PAD_VALUE))
  assert (values[:, first_padding_frame - 1] > mel.PAD_VALUE).any()


@pytest.mark.parametrize("num_samples", [65_408, 30_001, 100_000])
def test_log_mel_matches_librosa_on_synthetic_clips(num_samples):
  # Measured max abs differences: 1.2e-4, 1.2e-4 (raw and padded alike), 1.0e-4.
  clip = _chirp(num_samples, seed=num_samples)
  _check_against_librosa(clip)
  if num_samples < mel.CLIP_SAMPLES:
    _check_padding(clip)


def test_log_mel_matches_librosa_on_real_clips(real_clips):
  # Measured max abs differences: 7.3e-5, 1.2e-4, 2.2e-4 (raw and padded alike).
  for clip in real_clips:
    _check_against_librosa(clip)
    _check_padding(clip)


def test_jit_batch_and_unbatched_agree():
  clips = np.stack([_chirp(20_000, seed=1), 0.1 * _chirp(20_000, seed=2)])
  eager = np.asarray(mel.log_mel(clips))
  jitted = np.asarray(jax.jit(mel.log_mel)(jnp.asarray(clips)))
  np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(mel.log_mel(clips[i:i + 1]))[0], eager[i], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mel.log_mel(clips[i])), eager[i], rtol=0, atol=1e-6)  # [T] input
  # int16 input is read as samples / 32768.
  int16_clip = audio_lib.to_int16(clips[0])
  np.testing.assert_allclose(np.asarray(mel.log_mel(int16_clip)),
                             np.asarray(mel.log_mel(int16_clip.astype(np.float32) / 32768)), rtol=0, atol=1e-6)


def test_stft_magnitude_and_istft():
  clip = _chirp(10_000, seed=3)
  reference = np.abs(librosa.stft(clip, n_fft=512, hop_length=128))
  np.testing.assert_allclose(np.asarray(mel.stft_magnitude(clip)), reference, rtol=0, atol=1e-4 * reference.max())
  # The ISTFT's division by the overlap-added squared window makes istft(stft(x)) = x, ends included.
  length = (1 + len(clip) // mel.HOP - 1) * mel.HOP
  rebuilt = np.asarray(mel._istft(mel._stft(jnp.asarray(clip[None]))))[0]
  assert rebuilt.shape == (length,)
  np.testing.assert_allclose(rebuilt, clip[:length], rtol=0, atol=1e-5)


def test_spectral_convergence():
  magnitude = np.abs(np.random.default_rng(0).standard_normal((3, 257, 9)))
  assert mel.spectral_convergence(magnitude, magnitude) == 0.0
  assert mel.spectral_convergence(magnitude, np.zeros_like(magnitude)) == pytest.approx(1.0)
  assert mel.spectral_convergence(magnitude, 1.1 * magnitude) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def griffin_lim_clips():
  """[2, CLIP_SAMPLES] float32: two real clips padded by fit_samples, or two synthetic chirps without EmoGator."""
  if (EMOGATOR / "mp3").is_dir():
    clips = [audio_lib.load_audio(EMOGATOR / "mp3" / name)[0].astype(np.float32) / 32768 for name in REAL_FILES[:2]]
  else:
    clips = [_chirp(25_000, seed=4), 0.3 * _chirp(30_000, seed=5)]
  return np.stack([mel.fit_samples(clip) for clip in clips])


def test_griffin_lim_reconstruction(griffin_lim_clips):
  """Ours against librosa's mel_to_audio (mel_to_stft then griffinlim, 32 iterations) on the same log-mel.

  Spectral convergence (SC) between |STFT| of the clip and of the reconstruction, each clip alone, seeds 0-2:
    000003-01-1: ours 0.080 0.086 0.088, librosa 0.083 0.092 0.084
    000005-04-2: ours 0.048 0.054 0.044, librosa 0.058 0.052 0.061
    chirp (no EmoGator): ours 0.088 0.092 0.077, librosa 0.076 0.079 0.086
    chirp x 0.3: ours 0.095 0.085 0.089, librosa 0.101 0.103 0.105
  (in this batch of 2, seed 0: 0.080 / 0.046 ours, 0.083 / 0.058 librosa). The SC of either method moves by up
  to ~0.03 with the random initial phases; the bounds (0.15 absolute, librosa's + 0.04) leave room for that.
  """
  log_mels = mel.log_mel(griffin_lim_clips)
  audio = np.asarray(mel.mel_to_audio(log_mels, num_iters=32, seed=0))
  assert audio.shape == (2, mel.CLIP_SAMPLES) and audio.dtype == np.float32
  assert np.isfinite(audio).all()
  for original, ours, values in zip(griffin_lim_clips, audio, np.asarray(log_mels)):
    assert np.abs(ours).max() < 1.5
    assert np.sqrt(np.mean(ours ** 2)) > 0.5 * np.sqrt(np.mean(original ** 2))  # not silent
    mel_power = np.maximum(np.exp(2 * values) - 1e-6, 0)
    magnitude = librosa.feature.inverse.mel_to_stft(mel_power, sr=16_000, n_fft=512, power=2.0, norm=1)
    theirs = librosa.griffinlim(magnitude, n_iter=32, hop_length=128, n_fft=512, random_state=0)
    reference = np.asarray(mel.stft_magnitude(original))
    ours_sc = mel.spectral_convergence(reference, mel.stft_magnitude(ours))
    theirs_sc = mel.spectral_convergence(reference, mel.stft_magnitude(theirs))
    print(f"spectral convergence: ours {ours_sc:.4f}, librosa {theirs_sc:.4f}")
    assert ours_sc < 0.15
    assert ours_sc < theirs_sc + 0.04


def test_sounding_samples_cuts_trailing_silence():
  rng = np.random.default_rng(0)
  lengths = (4_000, 20_000, 40_000, mel.CLIP_SAMPLES)
  audio = np.zeros((len(lengths) + 1, mel.CLIP_SAMPLES), np.float32)  # the last clip stays silent
  for row, length in enumerate(lengths):
    audio[row, :length] = 0.1 * rng.standard_normal(length)
  keep = mel.sounding_samples(mel.log_mel(audio))
  for got, length in zip(keep, lengths):
    # The last frame that sees the clip is centred within n_fft / 2 of its end; nothing after that is kept.
    assert min(length, mel.CLIP_SAMPLES) <= got <= min(length + mel.N_FFT, mel.CLIP_SAMPLES), (got, length)
  assert keep[-1] == mel.HOP
  assert mel.sounding_samples(np.asarray(mel.log_mel(audio[1]))) == keep[1]


def test_sounding_samples_ignores_a_few_stray_bands_but_keeps_quiet_voice():
  # A generator's silent tail (as seen in trained GANs): near the padding value, except the two lowest and four
  # highest bands and one more band in the last three frames, which sit above the threshold (7 bands at most).
  # The burst ends at frame 200.
  values = np.full((mel.N_MELS, mel.NUM_FRAMES), mel.PAD_VALUE + 0.2, np.float32)
  values[:, :201] = -1.0  # the burst: every band loud
  values[:2, 201:] = mel.PAD_VALUE + 2.0
  values[-4:, 201:] = mel.PAD_VALUE + 1.5
  values[64, -3:] = mel.PAD_VALUE + 3.0
  assert mel.sounding_samples(values) == 200 * mel.HOP + mel.N_FFT // 2
  # The loudest-band rule keeps the whole clip: the stray bands decide.
  assert mel.sounding_samples(values, min_bands=1) == (mel.NUM_FRAMES - 1) * mel.HOP

  # A quiet voiced sound (F0 120 Hz, 12 harmonics, peak about -60 dBFS) followed by zeros is kept to its end.
  length = 30_000
  t = np.arange(length) / mel.SAMPLE_RATE
  voice = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 13)) * 1e-3 / 3
  audio = np.zeros(mel.CLIP_SAMPLES, np.float32)
  audio[:length] = voice
  keep = mel.sounding_samples(np.asarray(mel.log_mel(audio[None])))[0]
  assert length <= keep <= length + mel.N_FFT, keep
