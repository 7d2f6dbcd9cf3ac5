"""Waveform augmentations for the GAN."""

import numpy as np

from exvo_jax.data import augment


def test_augmentations_do_what_they_say():
  rng = np.random.default_rng(0)
  audio = np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000).astype(np.float32)
  faster = augment.Augmentation(speed=0.2)(audio, np.random.default_rng(1))
  assert faster.shape != audio.shape and 0.8 * 16_000 <= faster.size <= 1.25 * 16_000
  shifted = augment.Augmentation(shift_seconds=0.2)(audio, np.random.default_rng(3))
  delay = shifted.size - audio.size
  assert 0 < delay <= 3_200 and not shifted[:delay].any()
  np.testing.assert_array_equal(shifted[delay:], audio)
  noisy = augment.Augmentation(noise_std=0.01)(audio, rng)
  assert abs(np.std(noisy - audio) - 0.01) < 1e-3
  assert not augment.Augmentation().active and augment.Augmentation.reference().active
  pitched = augment.Augmentation(pitch_semitones=3.0)(audio, np.random.default_rng(2))
  assert pitched.size == audio.size
  spectrum = np.abs(np.fft.rfft(pitched))
  peak_hz = np.argmax(spectrum) * 16_000 / pitched.size
  assert abs(peak_hz - 440) > 5 and 440 * 2 ** (-3 / 12) - 5 <= peak_hz <= 440 * 2 ** (3 / 12) + 5
