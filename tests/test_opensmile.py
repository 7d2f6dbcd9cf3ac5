"""openSMILE extraction: parity with the opensmile package, a resumable cache, parallel = serial."""

import os

import numpy as np
import opensmile
import pytest
import soundfile

from exvo_jax.features import opensmile as opensmile_lib


def _burst(seed, seconds=1.2, sr=16_000):
  """A voiced burst with vibrato and breath noise, as int16."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sr)) / sr
  f0 = 180 + 40 * np.sin(2 * np.pi * 5 * t) + 30 * seed
  phase = 2 * np.pi * np.cumsum(f0) / sr
  voice = sum(np.sin(k * phase) / k for k in range(1, 12)) * np.hanning(t.size)
  x = 0.3 * voice / np.abs(voice).max() + 0.01 * rng.normal(size=t.size)
  return np.round(x * 32767).astype(np.int16)


@pytest.mark.parametrize("feature_set,dims", [("compare", 6373), ("egemaps", 88)])
def test_functionals_equal_what_opensmile_returns_for_the_file(tmp_path, feature_set, dims):
  samples = _burst(1)
  path = tmp_path / "clip.wav"
  soundfile.write(path, samples, 16_000, subtype="PCM_16")
  ours = opensmile_lib.extract(["clip"], lambda stem: samples, feature_set, tmp_path / "cache", processes=1,
                               log=None)["clip"]
  set_name, level = opensmile_lib.FEATURE_SETS[feature_set]
  reference = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, set_name),
                              feature_level=getattr(opensmile.FeatureLevel, level)).process_file(str(path))
  reference = reference.to_numpy(np.float32)[0]
  assert ours.shape == (dims,) == reference.shape
  np.testing.assert_array_equal(ours, reference)


class Interrupted(Exception):
  """Stands for the run being killed (pytest reserves KeyboardInterrupt for itself)."""

def test_interrupted_extraction_resumes_without_recomputing(tmp_path):
  clips = {f"c{i}": _burst(i, seconds=0.6) for i in range(5)}
  reads, interrupt = [], [True]

  def read(stem):
    reads.append(stem)
    if stem == "c3" and interrupt[0]:
      interrupt[0] = False
      raise Interrupted  # the run is cut off while reading the 4th clip
    return clips[stem]

  with pytest.raises(Interrupted):
    opensmile_lib.extract(sorted(clips), read, "egemaps", tmp_path, processes=1, log=None)
  cached = sorted(p.name for p in tmp_path.iterdir())
  assert cached == ["c0.npy", "c1.npy", "c2.npy"]  # finished clips only, no partial file
  stamps = {p: os.path.getmtime(tmp_path / p) for p in cached}
  reads.clear()
  result = opensmile_lib.extract(sorted(clips), read, "egemaps", tmp_path, processes=1, log=None)
  assert reads == ["c3", "c4"]  # only the clips not done before are read and computed
  assert {p: os.path.getmtime(tmp_path / p) for p in cached} == stamps
  assert sorted(result) == sorted(clips) and all(v.shape == (88,) for v in result.values())


def test_parallel_extraction_matches_serial(tmp_path):
  clips = {f"c{i}": _burst(i, seconds=0.5) for i in range(4)}
  serial = opensmile_lib.extract(sorted(clips), clips.__getitem__, "egemaps", tmp_path / "a", processes=1, log=None)
  lines = []
  parallel = opensmile_lib.extract(sorted(clips), clips.__getitem__, "egemaps", tmp_path / "b", processes=2,
                                   log=lines.append)
  for stem in clips:
    np.testing.assert_array_equal(serial[stem], parallel[stem])
  assert any("clips/s" in line and "ETA" in line for line in lines)
