"""grain pipelines: cropping, padding, masks, silent clips, epochs, shards and the padded evaluation pass."""

import itertools

import numpy as np
import pytest

from exvo_jax.data import pipeline


def _records(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [{"audio": rng.integers(-3000, 3000, n, dtype=np.int16), "file_id": f"[{i:05d}]".encode(),
           "speaker": b"7", "emotions": np.full(10, i / 100, np.float32), "country": np.int32(i % 4)}
          for i, n in enumerate(lengths)]


def test_peak_normalise_is_safe_on_silence():
  silent = np.zeros(100, np.float32)
  out = pipeline.peak_normalise(silent)
  assert np.all(np.isfinite(out)) and np.all(out == 0)
  loud = np.array([0.1, -0.25, 0.05], np.float32)
  np.testing.assert_allclose(pipeline.peak_normalise(loud), loud / 0.25)


def test_eval_pass_reads_each_record_once_in_order_with_padding_and_masks():
  records = _records([500, 3000, 1700, 40, 1600])
  options = pipeline.AudioOptions(pad_multiple=800)
  batches = list(pipeline.make_pipeline(records, batch_size=2, train=False, audio=options))
  assert len(batches) == 3
  ids = [i for b in batches for i, v in zip(b["file_id"], b["valid"]) if v]
  assert ids == [r["file_id"].decode() for r in records]
  assert batches[-1]["valid"].tolist() == [True, False]
  first = batches[0]
  assert first["audio"].shape == (2, 3200)  # longest clip 3000, rounded up to a multiple of 800
  assert first["length"].tolist() == [500, 3000]
  np.testing.assert_array_equal(first["mask"], np.arange(3200)[None] < first["length"][:, None])
  assert np.all(first["audio"][0, 500:] == 0)  # no audio leaks into the padding
  raw = records[0]["audio"].astype(np.float32) / 32768
  np.testing.assert_allclose(first["audio"][0, :500], raw / np.abs(raw).max(), rtol=1e-6)
  assert np.abs(first["audio"][1]).max() == pytest.approx(1.0)
  np.testing.assert_array_equal(first["emotions"][1], records[1]["emotions"])


def test_fixed_length_crop_and_pad():
  records = _records([100, 5000])
  options = pipeline.AudioOptions(clip_samples=1000, random_crop=True)
  batch = next(iter(pipeline.make_pipeline(records, batch_size=2, train=True, audio=options, seed=3)))
  assert batch["audio"].shape == (2, 1000)
  assert sorted(batch["length"].tolist()) == [100, 1000]
  assert batch["valid"].all()


def test_random_crop_takes_a_window_of_the_clip():
  audio = np.arange(10_000, dtype=np.int16)
  windows = {int(pipeline.crop(audio, 100, np.random.default_rng(s))[0]) for s in range(5)}
  assert len(windows) > 1  # different starts for different seeds
  window = pipeline.crop(audio, 100, np.random.default_rng(0))
  np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 100))  # contiguous samples
  np.testing.assert_array_equal(pipeline.crop(audio, 100), audio[:100])  # evaluation: from the start


def test_training_shuffles_repeats_and_is_deterministic_by_seed():
  records = _records([800] * 6)

  def ids(seed, n=6):
    ds = pipeline.make_pipeline(records, batch_size=2, train=True, seed=seed)
    return [i for b in itertools.islice(iter(ds), n) for i in b["file_id"]]

  first = ids(0)
  assert sorted(first[:6]) == sorted(r["file_id"].decode() for r in records)  # epoch 1: each record once
  assert sorted(first[6:]) == sorted(first[:6])  # epoch 2 repeats them
  assert first[:6] != first[6:]  # ... in a new order
  assert ids(0) == first and ids(1) != first


def test_iterator_state_resumes_where_it_stopped():
  records = _records([800] * 6)
  ds = pipeline.make_pipeline(records, batch_size=2, train=True, seed=0)
  it = iter(ds)
  next(it)
  state = it.get_state()
  expected = [b["file_id"].tolist() for b in itertools.islice(it, 4)]
  resumed = iter(ds)
  resumed.set_state(state)
  assert [b["file_id"].tolist() for b in itertools.islice(resumed, 4)] == expected


def test_shards_are_disjoint_cover_the_split_and_take_equal_steps():
  records = _records([800] * 7)
  seen, steps = [], []
  for index in range(3):
    batches = list(pipeline.make_pipeline(records, batch_size=2, train=False, shard_index=index, shard_count=3))
    steps.append(len(batches))
    seen += [i for b in batches for i, v in zip(b["file_id"], b["valid"]) if v]
  assert sorted(seen) == sorted(r["file_id"].decode() for r in records)
  assert len(set(steps)) == 1  # 7 records over 3 processes: every process runs 2 steps


def test_feature_records_batch_without_audio_fields():
  records = [{"features": np.full(5, i, np.float32), "file_id": b"[1]", "speaker": b"1",
              "emotions": np.zeros(10, np.float32)} for i in range(3)]
  batches = list(pipeline.make_pipeline(records, batch_size=2, train=False))
  assert batches[0]["features"].shape == (2, 5) and "audio" not in batches[0]
  assert batches[1]["valid"].tolist() == [True, False]


def test_training_global_batches_do_not_depend_on_the_process_count():
  records = _records([300 + 100 * i for i in range(10)])
  options = pipeline.AudioOptions(clip_samples=400, random_crop=True)

  def batches(index, count):
    ds = pipeline.make_pipeline(records, batch_size=4 // count, train=True, seed=5, audio=options,
                                shard_index=index, shard_count=count)
    return list(itertools.islice(iter(ds), 5))

  single = batches(0, 1)
  halves = [batches(0, 2), batches(1, 2)]
  for k in range(5):
    for key in ("audio", "file_id", "length"):
      joined = np.concatenate([halves[0][k][key], halves[1][k][key]])
      np.testing.assert_array_equal(joined, single[k][key])  # same clips, same crops, same order
