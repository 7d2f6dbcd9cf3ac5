"""Waveform augmentations of the ExVo-Generate reference: speed, pitch, shift and noise (host-side numpy).

Each is drawn per clip from the generator passed in (the pipeline seeds it by the clip's global position, so a
resumed or multi-process run draws the same augmentations). The reference's ranges: speed +-20 %, pitch
+-3 semitones, shift up to 0.2 s, Gaussian noise of standard deviation 0.01.
"""

import dataclasses

import numpy as np

from exvo_jax.data import schema


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random waveform changes; a zero field switches that change off.

  Attributes:
    speed: relative speed change range: a factor drawn from [1 - speed, 1 + speed] (tempo and pitch together).
    pitch_semitones: pitch shift range in semitones, duration kept (librosa's phase-vocoder shift; slow on CPU).
    shift_seconds: the clip starts after a random silence of up to this long.
    noise_std: standard deviation of added Gaussian noise (audio in [-1, 1]).
  """
  speed: float = 0.0
  pitch_semitones: float = 0.0
  shift_seconds: float = 0.0
  noise_std: float = 0.0

  @classmethod
  def reference(cls):
    return cls(speed=0.2, pitch_semitones=3.0, shift_seconds=0.2, noise_std=0.01)

  @property
  def active(self):
    return any(v > 0 for v in dataclasses.astuple(self))

  def __call__(self, audio, rng):
    """float32 [n] in [-1, 1] at 16 kHz -> float32 [m] (m != n after a speed change or a shift)."""
    audio = np.asarray(audio, np.float32)
    if self.speed > 0 and audio.size > 1:
      factor = rng.uniform(1.0 - self.speed, 1.0 + self.speed)
      positions = np.arange(0.0, audio.size - 1, factor)  # faster: fewer samples
      audio = np.interp(positions, np.arange(audio.size), audio).astype(np.float32)
    if self.pitch_semitones > 0 and audio.size >= 2048:
      import librosa  # pylint: disable=import-outside-toplevel  (only this option needs it)
      steps = rng.uniform(-self.pitch_semitones, self.pitch_semitones)
      audio = librosa.effects.pitch_shift(audio, sr=schema.SAMPLE_RATE, n_steps=steps).astype(np.float32)
    if self.shift_seconds > 0:
      delay = int(rng.integers(0, int(self.shift_seconds * schema.SAMPLE_RATE) + 1))
      audio = np.concatenate([np.zeros(delay, np.float32), audio])
    if self.noise_std > 0:
      audio = audio + rng.normal(0.0, self.noise_std, audio.shape).astype(np.float32)
    return audio
