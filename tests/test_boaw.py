"""Bag-of-audio-words: codebook, assignment and histograms against numpy."""

import numpy as np
import pytest

from exvo_jax.features import boaw
from exvo_jax.features import opensmile as opensmile_lib


def _frames(rng, n_clips=6, dims=5):
  return [rng.normal(size=(int(rng.integers(20, 60)), dims)).astype(np.float32) * 3 + 1 for _ in range(n_clips)]


def test_codebook_shape_and_training_only_statistics():
  rng = np.random.default_rng(0)
  train = _frames(rng)
  book = boaw.learn_codebook(train, 16, seed=0)
  assert book.words.shape == (16, 5) and book.mean.shape == (5,) and book.std.shape == (5,)
  stacked = np.concatenate(train)
  np.testing.assert_allclose(book.mean, stacked.mean(0), rtol=1e-5)
  np.testing.assert_allclose(book.std, stacked.std(0), rtol=1e-5)
  standardised = (stacked - book.mean) / book.std
  # Random sampling: every word is one of the (standardised) training frames.
  for word in book.words:
    assert np.min(np.abs(standardised - word).max(1)) < 1e-5
  refined = boaw.learn_codebook(train, 16, seed=0, kmeans_iterations=5)
  assert refined.words.shape == (16, 5) and not np.allclose(refined.words, book.words)


@pytest.mark.parametrize("num_assignments", [1, 3])
def test_assignment_matches_numpy_brute_force(num_assignments):
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(300, 7)).astype(np.float32)
  words = rng.normal(size=(40, 7)).astype(np.float32)
  ours = np.asarray(boaw.assign(frames, words, num_assignments))
  distances = ((frames[:, None, :].astype(np.float64) - words[None].astype(np.float64)) ** 2).sum(-1)
  reference = np.argsort(distances, axis=1, kind="stable")[:, :num_assignments]
  assert ours.shape == (300, num_assignments)
  np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("num_assignments", [1, 2])
def test_histogram_counts_every_frame_before_the_log(num_assignments):
  rng = np.random.default_rng(2)
  clips = _frames(rng, n_clips=4)
  book = boaw.learn_codebook(clips, 10, seed=1, num_assignments=num_assignments)
  raw = boaw.histograms(clips, book, log_weighting=False)
  for clip, row in zip(clips, raw):
    assert row.sum() == clip.shape[0] * num_assignments
    np.testing.assert_array_equal(boaw.counts(clip, book), row)
  np.testing.assert_allclose(boaw.histograms(clips, book), np.log1p(raw), rtol=1e-6)
  # Against a brute-force count of nearest words for one clip.
  standardised = (clips[0] - book.mean) / book.std
  d = ((standardised[:, None, :] - book.words[None]) ** 2).sum(-1)
  expected = np.zeros(10)
  for row in np.argsort(d, axis=1, kind="stable")[:, :num_assignments]:
    expected[row] += 1
  np.testing.assert_array_equal(raw[0], expected)


def test_codebook_round_trips_through_a_file(tmp_path):
  book = boaw.learn_codebook(_frames(np.random.default_rng(3)), 8, seed=0, num_assignments=2)
  book.save(tmp_path / "codebook.npz")
  loaded = boaw.Codebook.load(tmp_path / "codebook.npz")
  np.testing.assert_array_equal(loaded.words, book.words)
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
    np.testing.assert_allclose(streamed.mean, np.concatenate(clips).astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(streamed.std, np.concatenate(clips).astype(np.float64).std(0), rtol=1e-6)
    np.testing.assert_array_equal(boaw.histograms(on_disk, streamed, group_frames=50),
                                  boaw.histograms(clips, in_memory))
