"""The hume_vb and emogator TFDS builders: what is written is what is read back, in every layout variant."""

import os
import pathlib

import numpy as np
import pytest

from exvo_jax.data import builders
from exvo_jax.data import schema
import release_fixtures

VARIANTS = {
    "brackets-name-comma-perclip": dict(brackets=True, country_as="name", feature_dialect=",",
                                        feature_layout="per_clip"),
    "brackets-code-semicolon-perclip": dict(brackets=True, country_as="code", feature_dialect=";",
                                            feature_layout="per_clip", column_order="reversed"),
    "plain-code-semicolon-onefile": dict(brackets=False, country_as="code", feature_dialect=";",
                                         feature_layout="one_file", speaker_prefix=False),
    "plain-name-comma-onefile-noavb": dict(brackets=False, country_as="name", feature_dialect=",",
                                           feature_layout="one_file", avb=False),
}


def _by_stem(records):
  return {r["file_id"].decode().strip("[]"): r for r in records}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hume_vb_round_trip(tmp_path, variant):
  options = VARIANTS[variant]
  rows = release_fixtures.make_clips()
  root = release_fixtures.write_release(tmp_path / "release", rows, **options)
  data_dir = tmp_path / "tfds"
  audio_builder, report = builders.prepare("hume_vb", root, config="audio", data_dir=data_dir)
  feature_builder, _ = builders.prepare("hume_vb", root, config="compare", data_dir=data_dir)
  assert report["num_problems"] == 0, report
  assert (pathlib.Path(audio_builder.data_dir) / builders.REPORT_FILE).is_file()
  assert any(p.name.startswith("hume_vb-train.array_record") for p in pathlib.Path(audio_builder.data_dir).iterdir())

  for split, tfds_split in builders.TFDS_SPLITS.items():
    expected = [r for r in rows if r["split"] == split]
    audio_records = _by_stem(builders.data_source(audio_builder, tfds_split))
    feature_records = _by_stem(builders.data_source(feature_builder, tfds_split))
    assert sorted(audio_records) == sorted(r["stem"] for r in expected)
    assert sorted(feature_records) == sorted(audio_records)
    for r in expected:
      got = audio_records[r["stem"]]
      assert got["audio"].dtype == np.int16
      np.testing.assert_array_equal(got["audio"], r["audio"])  # bit-exact
      assert got["file_id"].decode() == (f"[{r['stem']}]" if options["brackets"] else r["stem"])
      assert got["speaker"].decode() == str(r["speaker"])
      np.testing.assert_array_equal(got["emotions"], r["emotions"])  # labels exact, NaN where unlabelled
      labelled = bool(np.isfinite(r["emotions"]).all())
      assert bool(got["labelled"]) == labelled
      assert got["age"] == np.float32(r["age"])
      assert got["country"] == r["country"]
      np.testing.assert_array_equal(feature_records[r["stem"]]["features"], r["features"])
      np.testing.assert_array_equal(feature_records[r["stem"]]["emotions"], r["emotions"])
      if options.get("avb", True) and split != "Test":
        np.testing.assert_array_equal(got["avb_high"], r["emotions"])
        np.testing.assert_array_equal(got["avb_two"], r["valence_arousal"])
        np.testing.assert_array_equal(got["avb_culture"], r["culture"])
        assert got["avb_type"] == schema.AVB_TYPES.index(r["voc_type"])
      else:  # hidden (-1) or absent A-VB labels read back as unknown
        assert np.isnan(got["avb_high"]).all() and np.isnan(got["avb_two"]).all()
        assert got["avb_type"] == -1
  # The Test split's support set: exactly two labelled clips per speaker.
  test_records = list(builders.data_source(audio_builder, "test"))
  speakers = {r["speaker"] for r in test_records}
  for s in speakers:
    assert sum(bool(r["labelled"]) for r in test_records if r["speaker"] == s) == 2


def test_prepare_reuses_a_built_dataset(tmp_path):
  root = release_fixtures.write_release(tmp_path / "release", release_fixtures.make_clips())
  builder, _ = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds")
  stamp = os.path.getmtime(pathlib.Path(builder.data_dir) / builders.REPORT_FILE)
  again, _ = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds")
  assert again.data_dir == builder.data_dir
  assert os.path.getmtime(pathlib.Path(again.data_dir) / builders.REPORT_FILE) == stamp


def test_no_tensorflow_needed(tmp_path):
  import subprocess, sys
  root = release_fixtures.write_release(tmp_path / "release", release_fixtures.make_clips((1, 1, 1), 2))
  code = ("import sys\n"
          "from exvo_jax.data import builders\n"
          f"b, _ = builders.prepare('hume_vb', {os.fspath(root)!r}, config='audio', data_dir={os.fspath(tmp_path)!r})\n"
          "print(len(builders.data_source(b, 'train')))\n"
          "assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules), 'TF imported'\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(),
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "2"  # one Train speaker with two clips


EMOGATOR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "emogator"


def test_emogator_builder_on_a_small_copy(tmp_path):
  """A 6-clip folder in EmoGator's layout: 48 kHz stereo audio (WAV content under the .mp3 names, which libsndfile
  detects by content) exercises the reader, the speaker split and the conversion to 16 kHz mono."""
  import soundfile
  mp3 = tmp_path / "eg" / "mp3"
  mp3.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for speaker in ("000001", "000002", "000003"):
    for category in (1, 30):
      x = rng.uniform(-0.5, 0.5, size=(4800, 2)).astype(np.float32)
      soundfile.write(mp3 / f"{speaker}-{category:02d}-1.mp3", x, 48000, format="WAV", subtype="FLOAT")
  builder, report = builders.prepare("emogator", tmp_path / "eg", data_dir=tmp_path / "tfds")
  assert report["num_converted"] == 6
  train = list(builders.data_source(builder, "train"))
  val = list(builders.data_source(builder, "val"))
  assert len(train) + len(val) == 6 and len(val) == 2  # one of three speakers drawn for validation
  assert {r["speaker"] for r in train}.isdisjoint({r["speaker"] for r in val})
  assert sorted({int(r["category"]) for r in train + val}) == [0, 29]
  assert all(r["audio"].dtype == np.int16 and r["audio"].size == 1600 for r in train + val)  # 0.3 s at 16 kHz


def test_cache_dir_is_exvo_cache_and_an_empty_value_counts_as_unset(tmp_path, monkeypatch):
  monkeypatch.setenv("EXVO_CACHE", str(tmp_path))
  assert builders.cache_dir() == tmp_path
  monkeypatch.setenv("EXVO_CACHE", "")  # not the current directory
  assert builders.cache_dir() == pathlib.Path.home() / ".cache" / "exvo_jax"
  monkeypatch.delenv("EXVO_CACHE")
  assert builders.cache_dir() == pathlib.Path.home() / ".cache" / "exvo_jax"
