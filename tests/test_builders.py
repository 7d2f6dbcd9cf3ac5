"""The hume_vb and emogator TFDS builders: what is written is what is read back, in every layout variant."""

import os
import pathlib
import subprocess
import sys

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


# A stand-in `tensorflow` package: importing it (in the test's process or any worker) leaves a marker file and
# fails, so even an import attempt that the caller would have caught is seen.
_FAKE_TENSORFLOW = """
import os, pathlib
pathlib.Path(os.environ["TF_IMPORT_MARKER"]).write_text("imported")
raise ImportError("tensorflow is not installed (test stand-in)")
"""


def _run_without_tensorflow(tmp_path, code):
  fake = tmp_path / "fake_tf"
  (fake / "tensorflow").mkdir(parents=True)
  (fake / "tensorflow" / "__init__.py").write_text(_FAKE_TENSORFLOW)
  marker = tmp_path / "tf_import_attempted"
  env = {**os.environ, "TF_IMPORT_MARKER": os.fspath(marker),
         "PYTHONPATH": os.pathsep.join([os.fspath(fake)] + sys.path)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), env=env,
                       timeout=300)
  return out, marker.exists()


def test_tfds_spill_path_needs_tensorflow(tmp_path):
  """The control: past its memory limit (lowered here to 0 bytes), TFDS's own shuffling writer spills to disk
  through tf.io.gfile, which fails without TensorFlow. This is how the real release's build used to fail."""
  code = ("import tensorflow_datasets as tfds\n"
          "from tensorflow_datasets.core import shuffle\n"
          "shuffle.MAX_MEM_BUFFER_SIZE = 0\n"
          f"shuffler = shuffle.Shuffler({os.fspath(tmp_path)!r}, 'train')\n"
          "shuffler.add(1, b'record')\n")
  out, attempted = _run_without_tensorflow(tmp_path, code)
  assert out.returncode != 0 and attempted, out.stderr[-2000:]


def test_build_never_imports_tensorflow_past_the_spill_limit(tmp_path):
  """The same lowered limit, a build in several shards written by 2 worker processes, every record read back:
  no process tries to import TensorFlow."""
  rows = release_fixtures.make_clips((2, 1, 1), 3)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  code = ("from tensorflow_datasets.core import shuffle\n"
          "shuffle.MAX_MEM_BUFFER_SIZE = 0\n"
          "from exvo_jax.data import builders\n"
          "builders.MIN_PARALLEL_RECORDS, builders.SHARD_RECORDS = 0, 2\n"
          f"b, report = builders.prepare('hume_vb', {os.fspath(root)!r}, config='audio', "
          f"data_dir={os.fspath(tmp_path / 'tfds')!r}, processes=2, log=None)\n"
          "n = 0\n"
          "for split in b.info.splits:\n"
          "  source = builders.data_source(b, split)\n"
          "  n += sum(int(source[i]['audio'].size > 0) for i in range(len(source)))\n"
          "print(n, len(b.info.splits['train'].shard_lengths))\n")
  out, attempted = _run_without_tensorflow(tmp_path, code)
  assert out.returncode == 0, out.stderr[-3000:]
  assert not attempted, "a process tried to import tensorflow"
  assert out.stdout.split() == [str(len(rows)), "3"]  # every clip; Train's 6 clips in 3 shards of 2


def _tfds_order(split, keys, tmp_path):
  """The order TFDS's own writer gives records: its shuffler, kept in memory (no spill, so no TensorFlow)."""
  from tensorflow_datasets.core import shuffle
  shuffler = shuffle.Shuffler(tmp_path, split)
  for key in keys:
    shuffler.add(key, key.encode())
  return [data.decode() for _, data in shuffler]


def test_parallel_shards_keep_the_record_order_and_the_metadata(tmp_path):
  """Shards of one record written by 2 workers, with a missing wav (its shard ends up empty and is dropped): the
  records come back in TFDS's order, the missing clip is reported, and the metadata file matches every record."""
  rows = release_fixtures.make_clips((3, 2, 2), 3)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  missing = next(r for r in rows if r["split"] == "Train")["stem"]
  (root / "wav" / f"{missing}.wav").unlink()
  serial, _ = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "serial", log=None)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(builders, "MIN_PARALLEL_RECORDS", 0)
    m.setattr(builders, "SHARD_RECORDS", 1)
    parallel, report = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "parallel",
                                        processes=2, log=None)
  assert [p["kind"] for p in report["problems"]] == ["missing_audio"] and missing in report["problems"][0]["file"]
  by_stem = {r["stem"]: r for r in rows}
  for split, tfds_split in builders.TFDS_SPLITS.items():
    expected = _tfds_order(tfds_split, [r["stem"] for r in rows if r["split"] == split and r["stem"] != missing],
                           tmp_path)
    records = builders.data_source(parallel, tfds_split)
    again = builders.data_source(serial, tfds_split)
    assert len(parallel.info.splits[tfds_split].shard_lengths) == len(expected)  # the empty shard was dropped
    assert [records[i]["file_id"].decode().strip("[]") for i in range(len(records))] == expected
    metadata = records.metadata
    assert sorted(metadata) == sorted(["file_id", "speaker", "age", "country", "emotions", "labelled", "avb_high",
                                       "avb_two", "avb_culture", "avb_type", "num_samples"])
    for i, stem in enumerate(expected):
      record, row = records[i], by_stem[stem]
      np.testing.assert_array_equal(record["audio"], row["audio"])
      np.testing.assert_array_equal(record["audio"], again[i]["audio"])  # one worker or two: the same records
      assert metadata["file_id"][i] == record["file_id"].decode() and metadata["speaker"][i] == str(row["speaker"])
      assert metadata["num_samples"][i] == row["audio"].size
      np.testing.assert_array_equal(metadata["emotions"][i], row["emotions"])  # NaN where unlabelled
      for key in ("age", "country", "labelled", "avb_type"):
        assert metadata[key][i] == record[key], key
      for key in ("avb_high", "avb_two", "avb_culture"):
        np.testing.assert_array_equal(metadata[key][i], record[key])
    for key in ("age", "country", "labelled", "avb_type", "emotions", "avb_high", "avb_two", "avb_culture"):
      feature = parallel.info.features[key]  # the dtype and shape the dataset declares
      assert metadata[key].dtype == feature.np_dtype and metadata[key].shape == (len(expected), *feature.shape), key


def test_strict_build_fails_in_a_worker_and_leaves_nothing(tmp_path):
  rows = release_fixtures.make_clips((2, 1, 1), 3)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  (root / "wav" / f"{rows[-1]['stem']}.wav").write_bytes(b"not audio")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(builders, "MIN_PARALLEL_RECORDS", 0)
    m.setattr(builders, "SHARD_RECORDS", 2)
    with pytest.raises(builders.CorpusError, match=f"{rows[-1]['stem']}.wav.*strict"):
      builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds", strict=True, processes=2,
                       log=None)
  left = [p.name for p in (tmp_path / "tfds").rglob("*") if p.is_file()]
  assert left == [], left  # no records, no report, no staging folder: the next run builds from scratch


def test_a_split_without_a_usable_clip_is_an_error_naming_it(tmp_path):
  rows = release_fixtures.make_clips((2, 1, 1), 3)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  for r in rows:
    if r["split"] == "Val":
      (root / "wav" / f"{r['stem']}.wav").unlink()
  with pytest.raises(builders.CorpusError, match="no usable clip in split 'validation'"):
    builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds", log=None)


def test_a_build_finished_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
  """Two runs sharing a cache both build; the one that finishes second keeps the first one's records."""
  root = release_fixtures.write_release(tmp_path / "release", release_fixtures.make_clips((2, 1, 1), 3))
  data_dir = tmp_path / "tfds"
  real_write = builders._write_records
  done = {}

  def write_then_race(builder, *args, **kwargs):
    real_write(builder, *args, **kwargs)
    if not done:  # the other run: a complete build appears at the final path before our rename
      done["other"] = True
      builders.prepare("hume_vb", root, config="audio", data_dir=data_dir, log=None)
  monkeypatch.setattr(builders, "_write_records", write_then_race)
  builder, report = builders.prepare("hume_vb", root, config="audio", data_dir=data_dir, log=None)
  assert report["num_problems"] == 0 and len(builders.data_source(builder, "train")) == 6
  assert [p.name for p in pathlib.Path(builder.data_dir).parent.iterdir()] == [pathlib.Path(builder.data_dir).name]


class _NoAudio:
  """Stands in for a split's records: any access to a record (and so to its audio) fails."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    raise AssertionError(f"record {index} was read: start-up must use the metadata file")


def test_start_up_reads_the_metadata_not_the_audio(tmp_path):
  from exvo_jax import emo18_trainer
  from exvo_jax.tasks import describe
  rows = release_fixtures.make_clips((2, 1, 1), 3)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  builder, _ = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds")
  target = emo18_trainer.make_target("hume_vb")
  for split, tfds_split in builders.TFDS_SPLITS.items():
    records = builders.data_source(builder, tfds_split)
    blind = builders.Records(_NoAudio(len(records)), records._metadata_path)
    table = emo18_trainer.Split.read(blind, target)
    summary = describe.summarise(blind)
    expected = [by for by in rows if by["split"] == split]
    order = [records[i]["file_id"].decode() for i in range(len(records))]
    assert list(table.file_id) == order
    want = {r["stem"]: r for r in expected}
    np.testing.assert_array_equal(table.labels, np.stack([want[f.strip("[]")]["emotions"] for f in order]))
    assert list(table.speaker) == [str(want[f.strip("[]")]["speaker"]) for f in order]
    assert summary["clips"] == len(expected)
    assert summary["speakers"] == len({r["speaker"] for r in expected})
    assert summary["hours"] == pytest.approx(sum(r["audio"].size for r in expected) / 16_000 / 3600)


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
  from exvo_jax import emo18_trainer
  for name, records in (("train", train), ("val", val)):  # the metadata file agrees with the records
    source = builders.data_source(builder, name)
    metadata = source.metadata
    assert sorted(metadata) == ["category", "file_id", "num_samples", "speaker"]
    assert metadata["category"].dtype == np.int32
    assert list(metadata["category"]) == [int(r["category"]) for r in records]
    assert list(metadata["file_id"]) == [r["file_id"].decode() for r in records]
    table = emo18_trainer.Split.read(source, emo18_trainer.make_target("emogator"))
    np.testing.assert_array_equal(table.labels, metadata["category"])
    assert table.labelled.all() and list(table.speaker) == [r["speaker"].decode() for r in records]


def test_cache_dir_is_exvo_cache_and_an_empty_value_counts_as_unset(tmp_path, monkeypatch):
  monkeypatch.setenv("EXVO_CACHE", str(tmp_path))
  assert builders.cache_dir() == tmp_path
  monkeypatch.setenv("EXVO_CACHE", "")  # not the current directory
  assert builders.cache_dir() == pathlib.Path.home() / ".cache" / "exvo_jax"
  monkeypatch.delenv("EXVO_CACHE")
  assert builders.cache_dir() == pathlib.Path.home() / ".cache" / "exvo_jax"
