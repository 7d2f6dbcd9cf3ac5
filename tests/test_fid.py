"""The Generate evaluation: FID tables, the shuffled-label control, ratings, HEEP and S_GEN."""

import numpy as np
import pytest

from exvo_jax import metrics
from exvo_jax.data import schema
from exvo_jax.evaluation import fid


def test_heep_and_s_gen_follow_the_formulas(tmp_path):
  rng = np.random.default_rng(0)
  ratings = rng.uniform(size=(6, 10))
  emotion_of = np.array([0, 0, 0, 3, 3, 3])
  fids = {e: 2.0 for e in schema.EMOTIONS}
  result = fid.heep_and_s_gen(ratings, fids, emotion_of)
  onehot = np.zeros((3, 10))
  onehot[:, 3] = 1
  expected = np.corrcoef(onehot.ravel(), ratings[3:].ravel())[0, 1]
  assert result["Awkwardness"]["heep"] == pytest.approx(expected, abs=1e-6)
  assert result["Awkwardness"]["s_gen"] == pytest.approx((1 / 2.0 + expected) / 2, abs=1e-6)
  assert set(result) == {"Awe", "Awkwardness"}
  # Ratings CSV: names match by wav stem; a missing clip and a non-numeric value are named.
  path = tmp_path / "ratings.csv"
  path.write_text("File_ID," + ",".join(schema.EMOTIONS) + "\nAwe_0001.wav," + ",".join(["0.5"] * 10) + "\n")
  np.testing.assert_allclose(fid.read_ratings(str(path), ["Awe_0001"]), [[0.5] * 10])
  with pytest.raises(ValueError, match="no ratings for 1 generated clips"):
    fid.read_ratings(str(path), ["Awe_0001", "Awe_0002"])
  path.write_text("File_ID," + ",".join(schema.EMOTIONS) + "\nAwe_0001," + ",".join(["x"] * 10) + "\n")
  with pytest.raises(ValueError, match="row 2"):
    fid.read_ratings(str(path), ["Awe_0001"])


def test_fid_matrix_marks_small_bins_nan():
  rng = np.random.default_rng(0)
  a, b, tiny = rng.normal(size=(40, 3)), rng.normal(1.0, 1.0, size=(40, 3)), rng.normal(size=(1, 3))
  matrix = fid.fid_matrix([a, b], [a, b, tiny])
  assert matrix[0, 0] == pytest.approx(0.0, abs=1e-6) and matrix[0, 1] > 1.0 and np.isnan(matrix[0, 2])
  assert matrix[0, 1] == pytest.approx(float(metrics.fid(a, b)))


def test_shuffled_label_control_separates_followed_from_ignored_conditions():
  """Generated sets that follow their condition score below the control; sets that ignore it do not."""
  rng = np.random.default_rng(0)
  centres = rng.normal(0.0, 2.0, size=(4, 6))
  bins = [c + rng.normal(size=(60, 6)) for c in centres]
  # A common offset from every bin (fakes look fake) plus the condition's own centre.
  follows = [c + 1.5 + rng.normal(size=(80, 6)) for c in centres]
  fids = [float(metrics.fid(g, b)) for g, b in zip(follows, bins)]
  control, spread = fid.shuffled_label_fid(follows, bins, num_shuffles=4, seed=0)
  assert control.shape == spread.shape == (4,)
  assert all(f < c for f, c in zip(fids, control))
  # Same seed, same control; each permutation keeps the set sizes, so the pooled clips are all used once.
  np.testing.assert_array_equal(fid.shuffled_label_fid(follows, bins, num_shuffles=4, seed=0)[0], control)
  # A generator that ignores its condition: every set is a draw from the same mixture.
  mixture = np.concatenate(follows)
  ignores = [mixture[rng.permutation(len(mixture))[:80]] for _ in centres]
  ignored_fids = np.array([float(metrics.fid(g, b)) for g, b in zip(ignores, bins)])
  ignored_control, _ = fid.shuffled_label_fid(ignores, bins, num_shuffles=8, seed=1)
  assert np.abs(ignored_fids - ignored_control).max() < 0.25 * ignored_control.min()
  assert (ignored_fids >= ignored_control).any()
  # A set smaller than min_clips gets NaN.
  tiny, _ = fid.shuffled_label_fid([follows[0], follows[1][:1]], bins[:2], num_shuffles=2)
  assert np.isfinite(tiny[0]) and np.isnan(tiny[1])
