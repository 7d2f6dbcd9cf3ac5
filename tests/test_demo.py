"""Tests of the synthetic demo corpus (exvo_jax/data/demo.py): layout, determinism, and learnability."""

import csv
import hashlib
import math
import pathlib

import librosa
import numpy as np
import pytest
import soundfile
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model import Ridge
from sklearn.metrics import balanced_accuracy_score

from exvo_jax.data import demo
from exvo_jax.data import release
from exvo_jax.data import schema

SEED = 0


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _float(text):
  return math.nan if text == "" else float(text)


def _emotions(row):
  """[10] float intensities of a data_info.csv row in schema.EMOTIONS order (NaN when empty)."""
  return np.array([_float(row[e]) for e in schema.EMOTIONS])


def _hashes(root):
  """{relative path: sha256} of every file under root."""
  root = pathlib.Path(root)
  return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _ccc(x, y):
  """[D] concordance correlation per column of x, y [N, D], population (1/n) moments throughout."""
  mx, my = x.mean(0), y.mean(0)
  cov = ((x - mx) * (y - my)).mean(0)
  return 2 * cov / (x.var(0) + y.var(0) + (mx - my) ** 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("tiny"), size="tiny", seed=SEED)


# ---------------------------------------------------------------------------------------------------------------
# Layout.


def test_data_info_layout(tiny):
  rows = _read_csv(tiny / "data_info.csv")
  size = demo.SIZES["tiny"]
  assert len(rows) == size.num_clips
  assert set(rows[0]) >= {"File_ID", "Subject_ID", "Split", "Age", "Country", *schema.EMOTIONS}
  ids = [r["File_ID"] for r in rows]
  assert len(set(ids)) == len(ids)
  assert all(len(i) == 7 and i[0] == "[" and i[-1] == "]" and i[1:-1].isdigit() for i in ids)
  assert all(r["Subject_ID"].startswith("Speaker_") for r in rows)
  assert {r["Split"] for r in rows} == set(schema.SPLITS)

  splits_of = {}
  for r in rows:
    splits_of.setdefault(r["Subject_ID"], set()).add(r["Split"])
  assert all(len(s) == 1 for s in splits_of.values()), "a speaker appears in two splits"
  speakers = {split: [s for s, v in splits_of.items() if split in v] for split in schema.SPLITS}
  assert [len(speakers[s]) for s in schema.SPLITS] == [size.train_speakers, size.val_speakers, size.test_speakers]

  for r in rows:
    y = _emotions(r)
    if r["Split"] == "Test":
      assert r["Age"] == "" and r["Country"] == ""
      assert np.all(np.isnan(y)) or np.all(np.isfinite(y))
    else:
      assert 20.0 <= float(r["Age"]) <= 39.5
      assert r["Country"] in schema.COUNTRIES
      assert np.all(np.isfinite(y))
      assert y.max() == 1.0  # the dominant emotion is exactly 1.0
    if np.all(np.isfinite(y)):
      assert np.all((y >= 0) & (y <= 1))
  for speaker in speakers["Test"]:
    labelled = [r for r in rows if r["Subject_ID"] == speaker and np.all(np.isfinite(_emotions(r)))]
    assert len(labelled) == 2, "each Test speaker has exactly two labelled (support) clips"
  for speaker in speakers["Train"] + speakers["Val"]:
    own = [r for r in rows if r["Subject_ID"] == speaker]
    assert len({r["Age"] for r in own}) == 1 and len({r["Country"] for r in own}) == 1


def test_audio_files(tiny):
  rows = _read_csv(tiny / "data_info.csv")
  stems = {r["File_ID"][1:-1] for r in rows}
  assert {p.stem for p in (tiny / "wav").glob("*.wav")} == stems
  for stem in sorted(stems):
    info = soundfile.info(tiny / "wav" / f"{stem}.wav")
    assert (info.samplerate, info.channels, info.subtype, info.format) == (schema.SAMPLE_RATE, 1, "PCM_16", "WAV")
    assert demo.MIN_SECONDS - 0.01 <= info.duration <= demo.MAX_SECONDS + 0.01
    samples, _ = soundfile.read(tiny / "wav" / f"{stem}.wav", dtype="int16")
    peak = np.abs(samples.astype(np.int32)).max()
    assert 3000 < peak < 32767, "non-silent and not clipped"
    assert abs(samples.mean()) < 200, "no DC offset"


def test_avb_labels(tiny):
  info = {r["File_ID"]: r for r in _read_csv(tiny / "data_info.csv")}
  files = {"high_info.csv": schema.EMOTIONS, "two_info.csv": schema.AVB_TWO,
           "culture_info.csv": schema.AVB_CULTURE, "type_info.csv": ("Voc_Type",)}
  for name, columns in files.items():
    rows = _read_csv(tiny / "labels" / name)
    assert list(rows[0]) == ["File_ID", "Split", *columns]
    assert [r["File_ID"] for r in rows] == list(info)
    for r in rows:
      assert r["Split"] == info[r["File_ID"]]["Split"]
      values = [r[c] for c in columns]
      if r["Split"] == "Test":
        assert values == ["-1"] * len(columns)
      elif name == "type_info.csv":
        assert values[0] in schema.AVB_TYPES
      else:
        assert all(0.0 <= float(v) <= 1.0 for v in values)
    if name == "high_info.csv":  # A-VB High is the same ten intensities
      for r in rows:
        if r["Split"] != "Test":
          np.testing.assert_allclose(_emotions(r), _emotions(info[r["File_ID"]]))
    if name == "type_info.csv":  # the type follows the dominant emotion
      for r in rows:
        if r["Split"] != "Test":
          dominant = schema.EMOTIONS[int(np.argmax(_emotions(info[r["File_ID"]])))]
          assert r["Voc_Type"] == demo.VOC_TYPE[dominant]


def test_avb_column_orders_are_the_releases():
  """Written out from the A-VB release: culture_info.csv has each country's nine emotions other than Surprise, then
  the four Surprise columns; Voc_Type is encoded alphabetically by the organisers."""
  nine = ["Awe", "Excitement", "Amusement", "Awkwardness", "Fear", "Horror", "Distress", "Triumph", "Sadness"]
  countries = ["China", "United States", "South Africa", "Venezuela"]
  expected = [f"{c}_{e}" for c in countries for e in nine] + [f"{c}_Surprise" for c in countries]
  assert list(schema.AVB_CULTURE) == expected and len(expected) == 40
  assert schema.AVB_CULTURE[9] == "United States_Awe" and schema.AVB_CULTURE[36] == "China_Surprise"
  assert list(schema.AVB_TYPES) == ["Cry", "Gasp", "Groan", "Grunt", "Laugh", "Other", "Pant", "Scream"]


def test_each_culture_column_follows_its_own_emotion(tiny):
  """A demo culture label is its emotion's intensity times a country factor plus noise: every column correlates
  most with the intensity its name says, whatever the column order."""
  info = {r["File_ID"]: r for r in _read_csv(tiny / "data_info.csv") if r["Split"] != "Test"}
  rows = [r for r in _read_csv(tiny / "labels" / "culture_info.csv") if r["File_ID"] in info]
  intensities = np.array([_emotions(info[r["File_ID"]]) for r in rows])
  for column in schema.AVB_CULTURE:
    values = np.array([float(r[column]) for r in rows])
    correlations = [np.corrcoef(values, intensities[:, j])[0, 1] for j in range(len(schema.EMOTIONS))]
    assert schema.EMOTIONS[int(np.argmax(correlations))] == column.split("_")[1], column


def test_country_as_code(tmp_path, tiny):
  root = demo.write_demo_corpus(tmp_path, size="tiny", seed=SEED, country_as="code")
  rows = _read_csv(root / "data_info.csv")
  named = {r["File_ID"]: r for r in _read_csv(tiny / "data_info.csv")}
  for r in rows:
    if r["Split"] == "Test":
      assert r["Country"] == r["Country_string"] == ""
    else:
      assert r["Country"] in ("0", "1", "2", "3")
      assert schema.COUNTRIES[int(r["Country"])] == r["Country_string"] == named[r["File_ID"]]["Country"]
  # Only the country columns differ: audio and A-VB labels are the same corpus.
  same = {k: v for k, v in _hashes(tiny).items() if k != "data_info.csv"}
  assert {k: v for k, v in _hashes(root).items() if k != "data_info.csv"} == same


def test_release_reader_accepts_demo(tiny):
  corpus = release.read_release(tiny, strict=True)  # strict: any reported problem raises
  assert len(corpus.clips) == demo.SIZES["tiny"].num_clips
  assert sum(c.is_support for c in corpus.clips) == 2 * demo.SIZES["tiny"].test_speakers


# ---------------------------------------------------------------------------------------------------------------
# Determinism and the cache.


def test_same_seed_is_byte_identical(tmp_path, tiny):
  again = demo.write_demo_corpus(tmp_path / "again", size="tiny", seed=SEED)
  assert _hashes(again) == _hashes(tiny)


def test_the_avb_layout_holds_the_same_files_with_the_audio_in_audio_wav(tmp_path, tiny):
  avb = demo.write_demo_corpus(tmp_path / "avb", size="tiny", seed=SEED, layout="avb")
  moved = {("audio/" + path if path.startswith("wav/") else path): digest for path, digest in _hashes(tiny).items()}
  assert _hashes(avb) == moved and not (avb / "wav").exists()
  clips = release.read_release(avb).clips  # the reader finds the audio there
  assert all(pathlib.Path(c.audio_path).parent == avb / "audio" / "wav" for c in clips)
  assert all(pathlib.Path(c.audio_path).is_file() for c in clips)
  with pytest.raises(ValueError, match="layout is 'AVB'; expected one of exvo, avb"):
    demo.write_demo_corpus(tmp_path / "bad", size="tiny", layout="AVB")


def test_other_seed_differs(tmp_path, tiny):
  other = _hashes(demo.write_demo_corpus(tmp_path / "other", size="tiny", seed=SEED + 1))
  assert other != _hashes(tiny)
  assert not set(other.values()) & set(_hashes(tiny).values()), "no file should be shared"


def test_ensure_demo_corpus_builds_once_and_repairs(tmp_path, monkeypatch):
  size = demo.DemoSize(2, 1, 1, 3)
  path = demo.ensure_demo_corpus(tmp_path, size=size, seed=3)
  assert path == tmp_path / "demo-2-1-1x3-seed3"
  assert (path / "data_info.csv").is_file() and len(list((path / "wav").glob("*.wav"))) == size.num_clips
  assert [p.name for p in tmp_path.iterdir()] == [path.name], "no staging folder left behind"
  expected = _hashes(path)

  def fail(*args, **kwargs):
    raise AssertionError("a complete corpus must not be rebuilt")
  with monkeypatch.context() as m:
    m.setattr(demo, "write_demo_corpus", fail)
    assert demo.ensure_demo_corpus(tmp_path, size=size, seed=3) == path

  # An interrupted build (no completion marker, a file missing) is rebuilt from scratch.
  (path / demo._MARKER).unlink()
  next((path / "wav").glob("*.wav")).unlink()
  assert demo.ensure_demo_corpus(tmp_path, size=size, seed=3) == path
  assert _hashes(path) == expected


def test_sizes():
  assert {"tiny", "small", "default", "release"} <= set(demo.SIZES)
  assert demo.SIZES["tiny"].num_clips < demo.SIZES["small"].num_clips < demo.SIZES["default"].num_clips
  with pytest.raises(ValueError):
    demo.write_demo_corpus("/nonexistent", size="huge")


def test_release_size_has_the_release_shape():
  """Table 1 of the ExVo paper: 19,990 / 19,396 / 19,815 clips of 571 / 568 / 563 speakers."""
  size = demo.SIZES["release"]
  assert size.num_clips == 59_201
  for split, clips, speakers in (("Train", 19_990, 571), ("Val", 19_396, 568), ("Test", 19_815, 563)):
    per_speaker = size.speaker_clips(split)
    assert len(per_speaker) == speakers and sum(per_speaker) == clips
    assert max(per_speaker) - min(per_speaker) <= 1  # as even as whole clips allow


def test_uneven_clip_counts_are_written_as_declared(tmp_path):
  size = demo.DemoSize(2, 2, 2, 3, clips=(7, 5, 6))  # 4 + 3, 3 + 2, 3 + 3 clips
  root = demo.write_demo_corpus(tmp_path / "uneven", size=size, seed=SEED)
  rows = _read_csv(root / "data_info.csv")
  per_speaker = {}
  for row in rows:
    per_speaker.setdefault((row["Split"], row["Subject_ID"]), []).append(row)
  counts = {split: sorted(len(v) for (s, _), v in per_speaker.items() if s == split) for split in schema.SPLITS}
  assert counts == {"Train": [3, 4], "Val": [2, 3], "Test": [3, 3]}
  assert len(list((root / "wav").glob("*.wav"))) == 18
  for (split, _), speaker_rows in per_speaker.items():  # two support clips per Test speaker, whatever its count
    labelled = sum(all(row[e] != "" for e in schema.EMOTIONS) for row in speaker_rows)
    assert labelled == (2 if split == "Test" else len(speaker_rows))


def test_parallel_writing_is_byte_identical_to_serial(tmp_path, tiny):
  parallel = demo.write_demo_corpus(tmp_path / "parallel", size="tiny", seed=SEED, processes=2)
  assert _hashes(parallel) == _hashes(tiny)


# ---------------------------------------------------------------------------------------------------------------
# Learnability: cheap acoustic features must predict the labels, the country and the speaker's bias.


def _clip_features(path):
  """[46] per-clip statistics: mean and std of 20 MFCCs, of log-energy and of the zero-crossing rate; duration."""
  y, sr = soundfile.read(path, dtype="float32")
  mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20, n_fft=512, hop_length=160)
  log_energy = np.log(librosa.feature.rms(y=y, frame_length=512, hop_length=160)[0] + 1e-5)
  zcr = librosa.feature.zero_crossing_rate(y, frame_length=512, hop_length=160)[0]
  return np.concatenate([mfcc.mean(1), mfcc.std(1), [log_energy.mean(), log_energy.std(), zcr.mean(), zcr.std(),
                                                     y.size / sr]])


@pytest.fixture(scope="module")
def small_features(tmp_path_factory):
  """Features, labels, countries, speakers and splits of the labelled (Train/Val) clips of a 'small' corpus."""
  root = demo.write_demo_corpus(tmp_path_factory.mktemp("small"), size="small", seed=SEED)
  rows = [r for r in _read_csv(root / "data_info.csv") if r["Split"] != "Test"]
  features = np.stack([_clip_features(root / "wav" / f"{r['File_ID'][1:-1]}.wav") for r in rows])
  labels = np.stack([_emotions(r) for r in rows])
  countries = np.array([schema.COUNTRIES.index(r["Country"]) for r in rows])
  speakers = np.array([r["Subject_ID"] for r in rows])
  splits = np.array([r["Split"] for r in rows])
  train = splits == "Train"
  mean, std = features[train].mean(0), features[train].std(0) + 1e-9
  return (features - mean) / std, labels, countries, speakers, splits


def test_emotions_are_learnable(small_features):
  x, y, _, _, splits = small_features
  train, val = splits == "Train", splits == "Val"
  predictions = Ridge(alpha=10.0).fit(x[train], y[train]).predict(x[val])
  ccc = _ccc(predictions, y[val])
  print(f"Val CCC per emotion {np.round(ccc, 2)}, mean {ccc.mean():.3f}")
  assert ccc.mean() > 0.3
  assert ccc.min() > 0.1, "every emotion must be learnable"
  dominant_accuracy = np.mean(predictions.argmax(1) == y[val].argmax(1))
  assert dominant_accuracy > 0.3  # chance: 0.1


def test_country_is_learnable(small_features):
  x, _, countries, _, splits = small_features
  train, val = splits == "Train", splits == "Val"
  model = LogisticRegression(C=1.0, max_iter=2000).fit(x[train], countries[train])
  uar = balanced_accuracy_score(countries[val], model.predict(x[val]))
  print(f"Val country UAR {uar:.3f}")
  assert uar > 0.35  # chance: 0.25


def test_two_clips_reveal_the_speaker_bias(small_features):
  """Few-shot signal: a speaker's residuals (label - prediction) on two clips predict those on the others."""
  x, y, _, speakers, splits = small_features
  train, val = splits == "Train", splits == "Val"
  predictions = Ridge(alpha=10.0).fit(x[train], y[train]).predict(x[val])
  y, speakers = y[val], speakers[val]
  # The dominant 1.0 is a per-clip rescaling, not the speaker's style: residuals of non-dominant emotions only.
  residuals = np.where(y < 1.0, y - predictions, np.nan)
  support_means, query_means, query_true, query_plain, query_adapted = [], [], [], [], []
  for speaker in np.unique(speakers):
    clips = np.flatnonzero(speakers == speaker)
    support, query = clips[:2], clips[2:]
    offset = np.nan_to_num(np.nanmean(residuals[support], 0))
    support_means.append(offset)
    query_means.append(np.nanmean(residuals[query], 0))
    query_true.append(y[query])
    query_plain.append(predictions[query])
    query_adapted.append(predictions[query] + offset)
  a, b = np.concatenate(support_means), np.concatenate(query_means)
  correlation = np.corrcoef(a[np.isfinite(b)], b[np.isfinite(b)])[0, 1]
  true = np.concatenate(query_true)
  plain, adapted = _ccc(np.concatenate(query_plain), true).mean(), _ccc(np.concatenate(query_adapted), true).mean()
  print(f"residual correlation {correlation:.3f}; query mean CCC {plain:.3f} -> {adapted:.3f} with the 2-clip offset")
  assert correlation > 0.3
  assert adapted > plain + 0.02
