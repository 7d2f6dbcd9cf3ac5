"""The ExVo-Generate mel front end in jnp (runs inside a jitted step, on batches), and its Griffin-Lim inverse.

Recipe (docs/hume_vb.md section 4, ExVo-Generate): 16 kHz audio; STFT with n_fft 512, hop 128, periodic Hann
window and centred frames (the signal is zero-padded by n_fft // 2 = 256 samples on each side: librosa 0.11's
default `center=True, pad_mode='constant'`); power spectrogram |X|^2; 128 mel bands from 0 to 8 kHz on the
Slaney mel scale, each filter scaled to unit sum (librosa's `filters.mel(..., norm=1)` divides each row by its
L1 norm); stored value log(mel + 1e-6) / 2. A clip of T samples has 1 + T // 128 frames, so clips are cut or
zero-padded to CLIP_SAMPLES = 65,408 samples for NUM_FRAMES = 512 frames (~4.1 s); a frame that sees only
padding holds exactly PAD_VALUE = log(1e-6) / 2.

`log_mel` matches `librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=128, n_mels=128, norm=1)`
followed by log(x + 1e-6) / 2 to within 2e-4 (float32 FFT rounding, which the log magnifies in quiet bins; mean
difference ~1e-6; tests/test_mel.py). `mel_to_audio` inverts it like `librosa.feature.inverse.mel_to_audio`:
mel power -> non-negative linear power -> magnitude -> fast Griffin-Lim.

Frames are cut without a gather: as n_fft = 4 * hop, the padded signal is viewed as 128-sample blocks and frame f
is blocks f..f+3 side by side; the overlap-add of the inverse is the same view backwards.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 512
HOP = 128
N_MELS = 128
NUM_FRAMES = 512
FLOOR = 1e-6
PAD_VALUE = float(np.log(FLOOR) / 2)
CLIP_SAMPLES = (NUM_FRAMES - 1) * HOP
N_BINS = N_FFT // 2 + 1
MOMENTUM = 0.99  # librosa.griffinlim's default ("fast Griffin-Lim", Perraudin et al. 2013)
NNLS_ITERS = 16  # projected-gradient steps after the clipped pseudo-inverse; see mel_to_magnitude

_BLOCKS_PER_FRAME = N_FFT // HOP
assert _BLOCKS_PER_FRAME * HOP == N_FFT, "framing by blocks needs n_fft to be a multiple of hop"
# Full-precision matmuls: on GPU/TPU the default float32 precision is TF32/bf16.
_HIGHEST = jax.lax.Precision.HIGHEST


def _hz_to_mel(hz):
  """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4)."""
  hz = np.asarray(hz, np.float64)
  log_step = np.log(6.4) / 27.0
  linear = hz / (200.0 / 3.0)
  return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / log_step, linear)


def _mel_to_hz(mel):
  """Inverse of `_hz_to_mel`."""
  mel = np.asarray(mel, np.float64)
  log_step = np.log(6.4) / 27.0
  linear = mel * (200.0 / 3.0)
  return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (np.maximum(mel, 15.0) - 15.0)), linear)


def band_of(hz):
  """The (fractional) mel band whose filter centres on `hz`, for axis ticks: band i centres on edge i + 1 of the
  N_MELS + 2 edges equally spaced in mel from 0 Hz to Nyquist; clipped to the bands' range [-0.5, N_MELS - 0.5]."""
  top = _hz_to_mel(SAMPLE_RATE / 2)
  position = (_hz_to_mel(hz) - _hz_to_mel(0.0)) / (top - _hz_to_mel(0.0)) * (N_MELS + 1) - 1.0
  return float(np.clip(position, -0.5, N_MELS - 0.5))


@functools.cache
def _filterbank64():
  """[N_MELS, N_BINS] float64 triangular filters, each scaled to unit sum."""
  bin_hz = np.arange(N_BINS) * (SAMPLE_RATE / N_FFT)
  # N_MELS + 2 edges equally spaced in mel from 0 Hz to Nyquist; band i rises over edges i..i+1, falls over i+1..i+2.
  edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
  lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
  rising = (bin_hz - lower) / (centre - lower)
  falling = (upper - bin_hz) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  return weights / weights.sum(axis=1, keepdims=True)  # every band covers at least one bin at these settings


@functools.cache
def _filterbank_cached():
  weights = _filterbank64().astype(np.float32)
  weights.setflags(write=False)
  return weights


def filterbank():
  """The mel filterbank, [N_MELS, N_FFT // 2 + 1] float32 (rows: bands from low to high; each row sums to 1).

  Equal to `librosa.filters.mel(sr=16000, n_fft=512, n_mels=128, norm=1)` to float32 rounding. Read-only (cached).
  """
  return _filterbank_cached()


@functools.cache
def _pseudo_inverse():
  """[N_BINS, N_MELS] float32 Moore-Penrose pseudo-inverse of the filterbank (the minimum-norm solution)."""
  return np.linalg.pinv(_filterbank64()).astype(np.float32)


@functools.cache
def _projected_gradient_step():
  """1 / L for the NNLS gradient, with L = largest eigenvalue of F^T F (so each step cannot increase the error)."""
  return float(1.0 / np.linalg.norm(_filterbank64(), ord=2) ** 2)


@functools.cache
def _window():
  """[N_FFT] float32 periodic Hann window (scipy.signal.get_window('hann', N_FFT), librosa's 'hann')."""
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


@functools.cache
def _inverse_normalizer(num_frames):
  """[(num_frames - 1) * HOP] float32: 1 / (summed squared window) over the kept ISTFT samples (1 where ~0)."""
  squared = np.asarray(_window(), np.float64) ** 2
  total = np.zeros((num_frames + _BLOCKS_PER_FRAME - 1) * HOP)
  for frame in range(num_frames):
    total[frame * HOP:frame * HOP + N_FFT] += squared
  kept = total[N_FFT // 2:N_FFT // 2 + (num_frames - 1) * HOP]
  # librosa divides only where the sum exceeds the smallest normal float; elsewhere the signal is left as is.
  return np.where(kept > np.finfo(np.float32).tiny, 1.0 / np.maximum(kept, 1e-30), 1.0).astype(np.float32)


def _as_float(audio):
  """jnp float array (>= float32); integer samples (int16) are scaled by 1/32768 to [-1, 1)."""
  audio = jnp.asarray(audio)
  if jnp.issubdtype(audio.dtype, jnp.floating):
    return audio.astype(jnp.promote_types(audio.dtype, jnp.float32))
  return audio.astype(jnp.float32) / 32768.0


def fit_samples(audio):
  """Cuts or zero-pads the last axis of `audio` to CLIP_SAMPLES (numpy; dtype kept).

  Args:
    audio: [..., T] samples at 16 kHz.
  Returns:
    [..., CLIP_SAMPLES]: the first CLIP_SAMPLES samples, or the clip followed by zeros.
  """
  audio = np.asarray(audio)
  if audio.shape[-1] >= CLIP_SAMPLES:
    return audio[..., :CLIP_SAMPLES]
  padding = [(0, 0)] * (audio.ndim - 1) + [(0, CLIP_SAMPLES - audio.shape[-1])]
  return np.pad(audio, padding)


def _frames(audio):
  """[B, T] -> [B, 1 + T // HOP, N_FFT] centred, zero-padded frames (not yet windowed)."""
  num_frames = 1 + audio.shape[-1] // HOP
  num_blocks = num_frames + _BLOCKS_PER_FRAME - 1
  # Padding at least N_FFT // 2 on the right covers the last frame; the surplus beyond num_blocks blocks is cut.
  padded = jnp.pad(audio, ((0, 0), (N_FFT // 2, N_FFT // 2 + HOP)))[:, :num_blocks * HOP]
  blocks = padded.reshape(audio.shape[0], num_blocks, HOP)
  return jnp.concatenate([blocks[:, k:k + num_frames] for k in range(_BLOCKS_PER_FRAME)], axis=-1)


def _stft(audio):
  """[B, T] float -> [B, frames, N_BINS] complex STFT (frames on axis 1, for the Griffin-Lim loop)."""
  return jnp.fft.rfft(_frames(audio) * _window(), axis=-1)


def _istft(spectrum):
  """[B, F, N_BINS] complex -> [B, (F - 1) * HOP] float, librosa's `istft(center=True)`.

  Each frame's inverse FFT is multiplied by the window again and overlap-added; the sum is divided by the
  overlap-added squared window (1.5 inside the signal for Hann at 75 % overlap, less at the two ends), which makes
  istft(stft(x)) = x. The first N_FFT // 2 samples (the centring pad) are dropped.
  """
  batch, num_frames = spectrum.shape[:2]
  frames = jnp.fft.irfft(spectrum, n=N_FFT, axis=-1) * _window()
  blocks = frames.reshape(batch, num_frames, _BLOCKS_PER_FRAME, HOP)
  overlapped = sum(
      jnp.pad(blocks[:, :, k], ((0, 0), (k, _BLOCKS_PER_FRAME - 1 - k), (0, 0)))
      for k in range(_BLOCKS_PER_FRAME))
  signal = overlapped.reshape(batch, -1)[:, N_FFT // 2:N_FFT // 2 + (num_frames - 1) * HOP]
  return signal * _inverse_normalizer(num_frames)


def stft_magnitude(audio):
  """|STFT| of audio, same framing as `log_mel`.

  Args:
    audio: [batch, T] (or [T]) float samples at 16 kHz; int16 is scaled by 1/32768.
  Returns:
    [batch, N_FFT // 2 + 1, 1 + T // HOP] (or unbatched) float32 magnitudes, frequency bins on axis 1.
  """
  audio = _as_float(audio)
  if audio.ndim == 1:
    return stft_magnitude(audio[None])[0]
  return jnp.swapaxes(jnp.abs(_stft(audio)), 1, 2)


def log_mel(audio):
  """Log-mel spectrogram, the ExVo-Generate representation; jit-able.

  Args:
    audio: [batch, T] (or [T]) float samples at 16 kHz in [-1, 1] (jnp or np); int16 is scaled by 1/32768.
  Returns:
    [batch, N_MELS, 1 + T // HOP] (or [N_MELS, frames]) float32 log(mel power + 1e-6) / 2, low bands at index 0.
  """
  audio = _as_float(audio)
  if audio.ndim == 1:
    return log_mel(audio[None])[0]
  spectrum = _stft(audio)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = jnp.einsum("bfk,mk->bmf", power, filterbank(), precision=_HIGHEST)
  return jnp.log(mel + FLOOR) / 2


def _griffin_lim(magnitude, seed, num_iters):
  """[B, F, N_BINS] magnitude -> [B, (F - 1) * HOP] audio; see `griffin_lim`."""
  key = jax.random.PRNGKey(seed)
  angles = jnp.exp(2j * jnp.pi * jax.random.uniform(key, magnitude.shape, magnitude.dtype))
  tiny = jnp.finfo(magnitude.dtype).tiny

  def iteration(_, state):
    angles, previous = state
    rebuilt = _stft(_istft(magnitude * angles))
    # librosa.griffinlim's update: a momentum step on the re-analysed STFT, then projected to unit modulus.
    accelerated = rebuilt - (MOMENTUM / (1 + MOMENTUM)) * previous
    return accelerated / (jnp.abs(accelerated) + tiny), rebuilt

  angles, _ = jax.lax.fori_loop(0, num_iters, iteration, (angles, jnp.zeros_like(angles)))
  return _istft(magnitude * angles)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def griffin_lim(magnitude, *, num_iters=32, seed=0):
  """Fast Griffin-Lim (librosa.griffinlim with momentum 0.99 and random initial phases); jitted.

  Starts from uniformly random phases drawn with `jax.random.PRNGKey(seed)` (so the result differs from librosa's
  numpy draws); each iteration is ISTFT -> STFT -> momentum step -> unit-modulus phases, and the result is the
  ISTFT of the magnitude with the last phases. The ISTFT overlap-adds the windowed inverse FFTs and divides by the
  overlap-added squared window (see `_istft`).

  Args:
    magnitude: [batch, N_FFT // 2 + 1, frames] (or unbatched) linear STFT magnitude.
    num_iters: Griffin-Lim iterations (static).
    seed: int seed of the initial phases.
  Returns:
    [batch, (frames - 1) * HOP] (or unbatched) float32 audio at 16 kHz.
  """
  magnitude = jnp.asarray(magnitude, jnp.float32)
  if magnitude.ndim == 2:
    return griffin_lim(magnitude[None], num_iters=num_iters, seed=seed)[0]
  return _griffin_lim(jnp.swapaxes(magnitude, 1, 2), seed, num_iters)


def mel_to_magnitude(log_mel_values, *, nnls_iters=NNLS_ITERS):
  """Log-mel -> linear STFT magnitude, the counterpart of `librosa.feature.inverse.mel_to_stft`.

  The log is undone (exp(2 x) - 1e-6, clipped at 0) and the mel power M is mapped to a linear power P >= 0 with
  F P ~ M (F = filterbank), a non-negative least squares (NNLS) problem. librosa solves it with L-BFGS-B started
  from the clipped pseudo-inverse; here, at a fixed cost in jnp, the clipped pseudo-inverse max(pinv(F) M, 0) is
  followed by `nnls_iters` projected-gradient steps P <- max(P - (1/L) F^T (F P - M), 0), L = ||F||_2^2.
  The magnitude is sqrt(P).

  Measured (spectral convergence, SC, between magnitudes): librosa's L-BFGS-B uses an absolute tolerance and, on
  real clips (small mel powers), stops at its starting point, so there the clipped pseudo-inverse alone equals
  librosa's result (SC 1e-7) and 16 steps move away from it by SC 0.001-0.002. They move towards the true |STFT|
  instead: median SC to it over 40 EmoGator clips 0.028 with the pseudo-inverse alone, 0.024 after 16 steps,
  0.0235 after 64. On a loud synthetic chirp, where librosa does iterate, 16 steps are also closer to librosa's
  result (SC 0.028 against 0.062). Each step is two [128 x 257] matmuls per frame, hence 16 and not more.

  Args:
    log_mel_values: [batch, N_MELS, frames] (or unbatched) values of `log_mel`.
    nnls_iters: projected-gradient steps (a Python int).
  Returns:
    [batch, N_FFT // 2 + 1, frames] (or unbatched) float32 magnitudes.
  """
  log_mel_values = jnp.asarray(log_mel_values, jnp.float32)
  mel_power = jnp.maximum(jnp.exp(2 * log_mel_values) - FLOOR, 0.0)
  weights = filterbank()
  power = jnp.maximum(jnp.einsum("km,...mf->...kf", _pseudo_inverse(), mel_power, precision=_HIGHEST), 0.0)
  step = _projected_gradient_step()
  for _ in range(nnls_iters):
    residual = jnp.einsum("mk,...kf->...mf", weights, power, precision=_HIGHEST) - mel_power
    gradient = jnp.einsum("mk,...mf->...kf", weights, residual, precision=_HIGHEST)
    power = jnp.maximum(power - step * gradient, 0.0)
  return jnp.sqrt(power)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def mel_to_audio(log_mel_values, *, num_iters=32, seed=0):
  """Audio from a log-mel spectrogram: `mel_to_magnitude` then `griffin_lim`; jitted, on batches.

  Same steps as `librosa.feature.inverse.mel_to_audio(M, sr=16000, n_fft=512, hop_length=128, norm=1, n_iter=32)`
  with M = exp(2 x) - 1e-6: NNLS by clipped pseudo-inverse + projected gradient (see `mel_to_magnitude`), square
  root, fast Griffin-Lim. Each ISTFT multiplies the inverse FFT of every frame by the Hann window, overlap-adds
  the frames and divides by the overlap-added squared window (librosa's `window_sumsquare` normalisation).

  Args:
    log_mel_values: [batch, N_MELS, frames] (or [N_MELS, frames]) values of `log_mel`.
    num_iters: Griffin-Lim iterations (static).
    seed: int seed of Griffin-Lim's random initial phases.
  Returns:
    [batch, (frames - 1) * HOP] (or [samples]) float32 audio at 16 kHz, roughly in [-1, 1]; CLIP_SAMPLES samples
    for NUM_FRAMES frames.
  """
  return griffin_lim(mel_to_magnitude(log_mel_values), num_iters=num_iters, seed=seed)


def spectral_convergence(reference_magnitude, estimate_magnitude):
  """||S - S_hat||_F / ||S||_F over all entries (whole batch), as a Python float (0 = identical).

  Args:
    reference_magnitude: [...] STFT magnitudes S (e.g. `stft_magnitude` of the original clip).
    estimate_magnitude: [...] magnitudes S_hat of the same shape (e.g. of the reconstruction).
  """
  reference = np.asarray(reference_magnitude, np.float64)
  estimate = np.asarray(estimate_magnitude, np.float64)
  return float(np.linalg.norm(reference - estimate) / np.linalg.norm(reference))


SILENCE_MARGIN = 1.0
SOUNDING_BANDS = 8


def sounding_samples(log_mel_values, *, margin=SILENCE_MARGIN, min_bands=SOUNDING_BANDS):
  """How many samples of each clip to keep so that trailing silence is cut: [batch, N_MELS, frames] -> [batch].

  A frame sounds when at least `min_bands` of its bands reach PAD_VALUE + margin (mel power 6.4e-6 with margin
  1); the frames of zero padding hold exactly PAD_VALUE. The clip is kept up to the end of the window of its last
  sounding frame (frame f is centred on sample f * HOP: f * HOP + N_FFT // 2 samples), at most (frames - 1) * HOP;
  one hop when no frame sounds.

  Short clips are zero-padded to CLIP_SAMPLES for the GAN, which then learns to end its bursts with silence;
  cutting it matters for scoring: an embedding that reads a clip to its end (Emo18's LSTM) sees seconds of
  silence otherwise, and no real clip of the bin ends that way.

  Why a count of bands and not the loudest band: a generator's silence is near PAD_VALUE in the middle of the
  spectrogram but not at its borders (the convolutions' zero padding). In the width-16 demo run at 10,000 steps
  the two lowest bands (centred at 23 and 47 Hz, below any voice) and the top few (centred at 6.8-7.8 kHz) stay
  above the threshold through the silent tail, and so do the last frames; with the loudest band deciding, no clip
  was cut and every one was written 4.09 s long with a faint rumble and hiss where the burst had ended. Any vocal
  sound lights many bands at once (harmonics, breath noise): on 128 zero-padded demo-corpus training clips, 8 of
  128 bands cut at most one hop (8 ms) more than the loudest band did, and a harmonic tone peaking near -60 dBFS
  is kept whole (tests/test_mel.py).
  """
  values = np.asarray(log_mel_values)
  if values.ndim == 2:
    return sounding_samples(values[None], margin=margin, min_bands=min_bands)[0]
  frames = values.shape[-1]
  sounding = (values >= PAD_VALUE + margin).sum(axis=1) >= min_bands  # [batch, frames]
  last = frames - 1 - np.argmax(sounding[:, ::-1], axis=1)
  return np.where(sounding.any(axis=1), np.minimum(last * HOP + N_FFT // 2, (frames - 1) * HOP), HOP)
