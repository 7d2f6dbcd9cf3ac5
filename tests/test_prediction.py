"""What `predict` reads: the files a pattern names, their decoding and the trained run's config; class outputs."""

import json

import numpy as np
import pytest
import scipy.signal
import scipy.special
import soundfile

from exvo_jax import prediction


def test_audio_files_from_a_file_a_folder_and_a_glob(tmp_path):
  for name in ("b.wav", "a.mp3", "sub/c.flac", ".hidden.wav", ".cache/d.wav", "notes.txt"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  assert prediction.audio_files(str(tmp_path / "b.wav")) == [str(tmp_path / "b.wav")]
  assert prediction.audio_files(str(tmp_path)) == [str(tmp_path / n) for n in ("a.mp3", "b.wav", "notes.txt",
                                                                              "sub/c.flac")]
  assert prediction.audio_files(str(tmp_path / "**" / "*.flac")) == [str(tmp_path / "sub" / "c.flac")]
  with pytest.raises(prediction.PredictError, match=r"names no file: give an audio file, a folder or a glob"):
    prediction.audio_files(str(tmp_path / "*.ogg"))


def test_decode_converts_any_rate_and_channels_and_reports_what_it_cannot_read(tmp_path):
  rng = np.random.default_rng(0)
  clip = (0.3 * rng.standard_normal(16_000)).astype(np.float32)
  pcm = np.clip(np.round(clip * 32768), -32768, 32767).astype(np.int16)
  soundfile.write(tmp_path / "mono16k.wav", pcm, 16_000, subtype="PCM_16")
  stereo = scipy.signal.resample_poly(clip, 441, 160)
  soundfile.write(tmp_path / "stereo44k.flac", np.stack([stereo, stereo], axis=1), 44_100)
  soundfile.write(tmp_path / "clip.ogg", clip, 16_000)
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "text.mp3").write_text("hello")
  logged = []
  decoded, skipped = prediction.decode(sorted(str(p) for p in tmp_path.iterdir()), log=logged.append)
  decoded = {p.rsplit("/", 1)[1]: samples for p, samples in decoded}
  assert sorted(decoded) == ["clip.ogg", "mono16k.wav", "stereo44k.flac"]
  np.testing.assert_array_equal(decoded["mono16k.wav"], pcm)  # 16 kHz mono 16-bit: bit-exact
  for name in ("stereo44k.flac", "clip.ogg"):  # back at 16 kHz: about the same signal (Vorbis is lossy on noise)
    samples = decoded[name]
    assert samples.dtype == np.int16 and abs(len(samples) - 16_000) <= 1
    n = min(len(samples), 16_000)
    assert np.corrcoef(samples[:n].astype(float), pcm[:n].astype(float))[0, 1] > 0.9, name
  assert [(p.rsplit("/", 1)[1], kind) for p, kind, _ in skipped] == [("empty.wav", "empty_audio"),
                                                                      ("text.mp3", "unreadable_audio")]
  assert all("restore it from the release" not in reason for _, _, reason in skipped)
  assert len(logged) == 2 and "empty.wav" in logged[0]


def test_class_values_are_the_argmax_name_and_the_softmax():
  logits = np.array([[2.0, -1.0, 0.5], [-3.0, 4.0, 0.0]])
  rows = prediction.class_values(logits, ("a", "b", "c"))
  assert [r[0] for r in rows] == ["a", "b"]
  np.testing.assert_allclose([r[1:] for r in rows], scipy.special.softmax(logits, axis=-1), rtol=1e-12)
  assert prediction.class_columns("country", ("China", "USA")) == ["country", "p_country_China", "p_country_USA"]


def test_the_trained_config_comes_back_with_its_tuples(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"task": "multitask", "features": {"sets": ["egemaps"]},
                                                    "seed": 3}))
  config = prediction.read_trained_config(str(tmp_path))
  assert config.task == "multitask" and config.features.sets == ("egemaps",) and config.seed == 3
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(prediction.PredictError, match="not valid JSON"):
    prediction.read_trained_config(str(tmp_path))
