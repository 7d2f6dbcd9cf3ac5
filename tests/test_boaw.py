"""Bag-of-audio-words: codebook, assignment and histograms against hand counts and a scipy brute force.

References: a 1-D codebook whose nearest words are counted by hand; scipy.spatial.distance.cdist + a stable argsort
per frame (nearest first) counted with np.bincount; numpy mean/std and Lloyd iterations written out in numpy.
"""

import numpy as np
import pytest
from scipy.spatial import distance

from exvo_jax.features import boaw
from exvo_jax.features import opensmile as opensmile_lib
from exvo_jax.features import tables


def _frames(rng, n_clips=6, dims=5):
  return [rng.normal(size=(int(rng.integers(20, 60)), dims)).astype(np.float32) * 3 + 1 for _ in range(n_clips)]


def _brute_force_counts(frames, mean, std, words, num_assignments):
  """[N] word counts of one clip: standardise in float64, cdist to every word, the k nearest of each frame."""
  standardised = (np.asarray(frames, np.float64) - mean) / std
  d = distance.cdist(standardised, np.asarray(words, np.float64), "sqeuclidean")
  nearest = np.argsort(d, axis=1, kind="stable")[:, :num_assignments]
  return np.bincount(nearest.ravel(), minlength=len(words)).astype(np.float64)


# ---------------------------------------------------------------------------------------------- hand counted ----


def _one_dimensional_book(num_assignments):
  """Words 0, 10, 20 in the standardised space; raw frames standardised with mean 5 and std 2."""
  return boaw.Codebook(mean=np.array([5.0], np.float32), std=np.array([2.0], np.float32),
                       words=np.array([[0.0], [10.0], [20.0]], np.float32), num_assignments=num_assignments)


# Raw 7, 9, 23, 27 | 43, 65, -5 -> standardised (x - 5)/2 = 1, 2, 9, 11 | 19, 30, -5.
_CLIP_A = np.array([[7.0], [9.0], [23.0], [27.0]], np.float32)
_CLIP_B = np.array([[43.0], [65.0], [-5.0]], np.float32)
_EMPTY = np.zeros((0, 1), np.float32)


def test_one_dimensional_counts_by_hand_with_one_assignment():
  """Nearest of 0/10/20: 1 -> 0, 2 -> 0, 9 -> 10, 11 -> 10 | 19 -> 20, 30 -> 20, -5 -> 0.

  Clip A counts [2, 2, 0], clip B [1, 0, 2]; an empty clip counts nothing.
  """
  book = _one_dimensional_book(1)
  raw = boaw.histograms([_CLIP_A, _EMPTY, _CLIP_B], book, log_weighting=False)
  np.testing.assert_array_equal(raw, [[2, 2, 0], [0, 0, 0], [1, 0, 2]])
  np.testing.assert_array_equal(boaw.counts(_CLIP_B, book), [1, 0, 2])
  # log(1 + count): log 3, log 3, log 1 = 0 | log 2, 0, log 3.
  np.testing.assert_allclose(boaw.histograms([_CLIP_A, _EMPTY, _CLIP_B], book),
                             [[np.log(3), np.log(3), 0], [0, 0, 0], [np.log(2), 0, np.log(3)]], rtol=1e-6)


def test_one_dimensional_counts_by_hand_with_two_assignments():
  """The two nearest of 0/10/20 per frame: 1 -> (0, 10), 2 -> (0, 10), 9 -> (10, 0), 11 -> (10, 20) |
  19 -> (20, 10), 30 -> (20, 10), -5 -> (0, 10).

  Clip A counts [3, 4, 1] (8 = 4 frames x 2), clip B [1, 3, 2] (6 = 3 x 2); the assignment lists nearest first.
  """
  book = _one_dimensional_book(2)
  np.testing.assert_array_equal(boaw.histograms([_CLIP_A, _CLIP_B], book, log_weighting=False), [[3, 4, 1], [1, 3, 2]])
  np.testing.assert_allclose(boaw.histograms([_CLIP_A, _CLIP_B], book),
                             [[np.log(4), np.log(5), np.log(2)], [np.log(2), np.log(4), np.log(3)]], rtol=1e-6)
  standardised = (np.concatenate([_CLIP_A, _CLIP_B]) - 5.0) / 2.0
  np.testing.assert_array_equal(boaw.assign(standardised, book.words, 2),
                                [[0, 1], [0, 1], [1, 0], [1, 2], [2, 1], [2, 1], [0, 1]])


# ------------------------------------------------------------------------------------------ scipy brute force ----


@pytest.mark.parametrize("num_assignments", [1, 3])
def test_assignment_matches_cdist_argsort(num_assignments):
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(300, 7)).astype(np.float32)
  words = rng.normal(size=(40, 7)).astype(np.float32)
  ours = np.asarray(boaw.assign(frames, words, num_assignments))
  d = distance.cdist(frames.astype(np.float64), words.astype(np.float64), "sqeuclidean")
  assert ours.shape == (300, num_assignments)
  np.testing.assert_array_equal(ours, np.argsort(d, axis=1, kind="stable")[:, :num_assignments])


@pytest.mark.parametrize("num_assignments", [1, 3])
def test_histograms_match_cdist_brute_force_across_chunks_and_groups(num_assignments):
  """Clips totalling more than one assignment chunk (CHUNK_FRAMES), read in several groups; a given codebook
  (not learned) with its own standardisation. Raw counts and log(1 + count) against the brute force per clip."""
  rng = np.random.default_rng(2)
  lengths = [1500, 7, 2600, 0, 900]
  assert sum(lengths) > boaw.CHUNK_FRAMES
  clips = [(rng.normal(size=(n, 5)) * [1, 2, 3, 4, 5] + 2).astype(np.float32) for n in lengths]
  book = boaw.Codebook(mean=np.array([2, 2, 2, 2, 2], np.float32), std=np.array([1, 2, 3, 4, 5], np.float32),
                       words=rng.normal(size=(12, 5)).astype(np.float32), num_assignments=num_assignments)
  expected = np.stack([_brute_force_counts(c, book.mean, book.std, book.words, num_assignments) for c in clips])
  np.testing.assert_array_equal(expected.sum(1), np.array(lengths) * num_assignments)  # the reference's own check
  raw = boaw.histograms(clips, book, log_weighting=False, group_frames=2000)
  assert raw.shape == (5, 12) and raw.dtype == np.float32
  np.testing.assert_array_equal(raw, expected)
  np.testing.assert_allclose(boaw.histograms(clips, book), np.log1p(expected), rtol=1e-6)


# ------------------------------------------------------------------------------------------------- codebooks ----


def test_codebook_shape_and_training_only_statistics():
  rng = np.random.default_rng(0)
  train = _frames(rng)
  book = boaw.learn_codebook(train, 16, seed=0)
  assert book.words.shape == (16, 5) and book.mean.shape == (5,) and book.std.shape == (5,)
  stacked = np.concatenate(train).astype(np.float64)
  np.testing.assert_allclose(book.mean, stacked.mean(0), rtol=1e-5)
  np.testing.assert_allclose(book.std, stacked.std(0), rtol=1e-5)
  # Random sampling: the words are 16 distinct training frames, standardised.
  standardised = (stacked - stacked.mean(0)) / stacked.std(0)
  sources = [int(np.argmin(np.abs(standardised - word).max(1))) for word in book.words]
  assert len(set(sources)) == 16
  np.testing.assert_allclose(book.words, standardised[sources], rtol=1e-5, atol=1e-5)


def test_constant_descriptor_gets_unit_std():
  rng = np.random.default_rng(5)
  clips = [np.column_stack([rng.normal(size=30), np.full(30, 4.0)]).astype(np.float32) for _ in range(3)]
  book = boaw.learn_codebook(clips, 4, seed=0)
  assert book.std[1] == 1.0 and book.mean[1] == pytest.approx(4.0)
  np.testing.assert_array_equal(book.words[:, 1], 0.0)


def test_kmeans_refinement_equals_lloyd_iterations_in_numpy():
  """Lloyd's algorithm written out: each standardised training frame goes to its nearest word (cdist argmin), each
  word moves to the mean of its frames; the start is openXBOW's random sampling (numpy's seeded choice of frames)."""
  rng = np.random.default_rng(6)
  clips = _frames(rng, n_clips=5, dims=3)
  stacked = np.concatenate(clips).astype(np.float64)
  mean, std = stacked.mean(0), stacked.std(0)
  standardised = (stacked - mean) / std
  words = standardised[np.random.default_rng(3).choice(len(stacked), 6, replace=False)]
  for _ in range(4):
    owner = distance.cdist(standardised, words, "sqeuclidean").argmin(1)
    words = np.stack([standardised[owner == k].mean(0) if np.any(owner == k) else words[k] for k in range(6)])
  refined = boaw.learn_codebook(clips, 6, seed=3, kmeans_iterations=4)
  np.testing.assert_allclose(refined.words, words, rtol=1e-4, atol=1e-4)


def test_too_few_training_frames_is_an_error():
  with pytest.raises(ValueError, match="cannot seed 10 words"):
    boaw.learn_codebook([np.zeros((3, 2), np.float32), np.ones((4, 2), np.float32)], 10)


def test_codebook_round_trips_through_a_file(tmp_path):
  book = boaw.learn_codebook(_frames(np.random.default_rng(3)), 8, seed=0, num_assignments=2)
  book.save(tmp_path / "codebook.npz")
  loaded = boaw.Codebook.load(tmp_path / "codebook.npz")
  np.testing.assert_array_equal(loaded.words, book.words)
  np.testing.assert_array_equal(loaded.mean, book.mean)
  np.testing.assert_array_equal(loaded.std, book.std)
  assert loaded.num_assignments == 2


def test_codebook_and_histograms_from_cache_files_equal_the_in_memory_ones(tmp_path):
  """Frames read clip by clip from .npy files (as at full size, where they do not fit in memory), in groups smaller
  than a clip set and with a k-means subsample: the same statistics, words and histograms as lists in memory, and
  statistics equal to numpy's over the concatenated frames."""
  rng = np.random.default_rng(4)
  clips = _frames(rng, n_clips=12, dims=6)
  paths = []
  for i, clip in enumerate(clips):
    paths.append(tmp_path / f"{i}.npy")
    np.save(paths[-1], clip)
  on_disk = opensmile_lib.CachedFeatures(paths)
  assert [on_disk.num_frames(i) for i in range(len(clips))] == [c.shape[0] for c in clips]
  # openXBOW's random sampling, written out on the concatenated frames: the words are the drawn rows, standardised.
  stacked = np.concatenate(clips)
  mean, std = stacked.astype(np.float64).mean(0), stacked.astype(np.float64).std(0)
  drawn = np.random.default_rng(2).choice(stacked.shape[0], 8, replace=False)
  np.testing.assert_allclose(boaw.learn_codebook(on_disk, 8, seed=2).words, (stacked[drawn] - mean) / std,
                             rtol=1e-5, atol=1e-6)
  for kmeans_iterations, max_kmeans_frames in ((0, 10_000), (3, 10_000), (3, 100)):
    kwargs = dict(seed=2, kmeans_iterations=kmeans_iterations, max_kmeans_frames=max_kmeans_frames)
    in_memory = boaw.learn_codebook(clips, 8, **kwargs)
    streamed = boaw.learn_codebook(on_disk, 8, **kwargs)
    np.testing.assert_array_equal(streamed.words, in_memory.words)
    np.testing.assert_allclose(streamed.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(streamed.std, std, rtol=1e-6)
    np.testing.assert_array_equal(boaw.histograms(on_disk, streamed, group_frames=50),
                                  boaw.histograms(clips, in_memory))


# --------------------------------------------------------------------------------------------------- table path ----


def _record(stem, speaker, rng):
  return {"audio": np.zeros(160, np.int16), "file_id": f"[{stem}]", "speaker": speaker,
          "emotions": rng.uniform(size=10).astype(np.float32), "age": np.float32(rng.uniform(20, 40)),
          "country": np.int32(rng.integers(0, 4)), "labelled": True}


def test_bag_of_audio_words_tables_learn_on_train_only_and_save_the_codebook(tmp_path):
  """`tables.bag_of_audio_words` on in-memory sources whose ComParE LLDs are already in the cache
  (`<cache>/compare_lld/<stem>.npy`, so openSMILE never runs): the saved codebook's statistics are numpy's over the
  TRAINING frames only, its words are training frames, and every row of every table is the log(1 + count) histogram
  recomputed by brute force from the reloaded codebook."""
  rng = np.random.default_rng(7)
  sources = {"train": [_record(f"{i:05d}", f"s{i % 2}", rng) for i in range(4)],
             "validation": [_record(f"{i:05d}", f"v{i % 2}", rng) for i in range(10, 13)]}
  cache = tmp_path / "cache"
  (cache / "compare_lld").mkdir(parents=True)
  frames = {}
  for split, offset in (("train", 0.0), ("validation", 50.0)):  # validation frames far off: they must not count
    for record in sources[split]:
      stem = record["file_id"][1:-1]
      frames[stem] = (offset + rng.normal(size=(int(rng.integers(15, 40)), 4)) * [1, 2, 3, 4]).astype(np.float32)
      np.save(cache / "compare_lld" / f"{stem}.npy", frames[stem])
  codebook_path = tmp_path / "codebook.npz"
  result = tables.bag_of_audio_words(sources, 6, str(cache), seed=1, num_assignments=2, processes=1, log=None,
                                     codebook_path=codebook_path)
  assert codebook_path.is_file()
  book = boaw.Codebook.load(codebook_path)
  assert book.num_assignments == 2 and book.words.shape == (6, 4)
  train_frames = np.concatenate([frames[r["file_id"][1:-1]] for r in sources["train"]]).astype(np.float64)
  np.testing.assert_allclose(book.mean, train_frames.mean(0), rtol=1e-5)
  np.testing.assert_allclose(book.std, train_frames.std(0), rtol=1e-5)
  standardised = (train_frames - train_frames.mean(0)) / train_frames.std(0)
  assert distance.cdist(book.words, standardised).min(1).max() < 1e-4  # every word is a training frame
  assert set(result) == {"train", "validation"}
  for split, records in sources.items():
    table = result[split]
    assert len(table) == len(records) and table.features.shape == (len(records), 6)
    assert list(table.file_id) == [r["file_id"] for r in records]
    assert list(table.speaker) == [r["speaker"] for r in records]
    np.testing.assert_array_equal(table.emotions, np.stack([r["emotions"] for r in records]))
    np.testing.assert_array_equal(table.country, [r["country"] for r in records])
    for row, record in zip(table.features, records):
      clip = frames[record["file_id"][1:-1]]
      counts = _brute_force_counts(clip, train_frames.mean(0), train_frames.std(0), book.words, 2)
      assert counts.sum() == 2 * clip.shape[0]
      np.testing.assert_allclose(row, np.log1p(counts), rtol=1e-6)
