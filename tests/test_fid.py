"""The Generate evaluation: FID tables, the shuffled-label control, ratings, HEEP and S_GEN.

References: FIDs from numpy means/covariances and scipy.linalg.sqrtm (`_fid_reference`), closed forms on 1-D sets,
and HEEP/S_GEN values worked out by hand (ExVo 2022 definitions, shared/design/hume_vb.md).
"""

import copy
import itertools

import numpy as np
import pytest
import scipy.linalg

from exvo_jax.data import schema
from exvo_jax.evaluation import fid

EMOTIONS = schema.EMOTIONS


def _fid_reference(a, b):
  """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), covariances divided by n - 1, in float64 numpy/scipy."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _pearson_reference(x, y):
  """Pearson correlation written out with numpy population moments."""
  x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
  return float(np.mean((x - x.mean()) * (y - y.mean())) / (x.std() * y.std()))


# ------------------------------------------------------------------------------------------------- HEEP/S_GEN ----


def test_heep_and_s_gen_per_emotion_hand_computed():
  """Two Fear clips rated 3 on Fear, 0 (clip 1) and 2 (clip 2) elsewhere; two Awe clips rated exactly one-hot.

  Fear: the flattened targets x have two 1s among 20 values; the ratings y are 3 at those, 0 at nine others and 2 at
  the other nine. mean(x) = 0.1, var(x) = 0.09; mean(y) = (6 + 18)/20 = 1.2, var(y) = (18 + 36)/20 - 1.2^2 = 1.26;
  cov = 6/20 - 0.1 * 1.2 = 0.18; HEEP = 0.18 / sqrt(0.09 * 1.26) = sqrt(2/7) ~ 0.5345.
  With FID 4: S_GEN = (1/4 + sqrt(2/7)) / 2 ~ 0.3923.
  Awe: ratings equal the one-hot targets, HEEP = 1; its FID is NaN (a bin under 2 clips), so no S_GEN.
  """
  fear, awe = EMOTIONS.index("Fear"), EMOTIONS.index("Awe")
  ratings = np.zeros((4, 10))
  ratings[0, awe] = ratings[1, awe] = 1.0
  ratings[3] = 2.0
  ratings[2:, fear] = 3.0
  emotion_of = np.array([awe, awe, fear, fear])
  fids = {e: 4.0 for e in EMOTIONS}
  fids["Awe"] = float("nan")
  result = fid.heep_and_s_gen(ratings, fids, emotion_of)
  assert set(result) == {"Awe", "Fear"}  # emotions without generated clips are left out
  assert result["Fear"]["heep"] == pytest.approx(np.sqrt(2 / 7), abs=1e-6)
  assert result["Fear"]["s_gen"] == pytest.approx((0.25 + np.sqrt(2 / 7)) / 2, abs=1e-6)
  assert result["Awe"]["heep"] == pytest.approx(1.0, abs=1e-6)
  assert result["Awe"]["s_gen"] is None


def test_read_ratings_matches_wav_stems_and_names_bad_rows(tmp_path):
  path = tmp_path / "ratings.csv"
  header = "File_ID," + ",".join(EMOTIONS) + "\n"
  path.write_text(header + "[Awe_0002.wav]," + ",".join(["0.25"] * 10) + "\nAwe_0001.wav,"
                  + ",".join(str(k) for k in range(10)) + "\n")
  # Rows come back in the order asked for, matched by stem ("[...]" and ".wav" dropped).
  np.testing.assert_array_equal(fid.read_ratings(str(path), ["Awe_0001", "Awe_0002"]),
                                [list(range(10)), [0.25] * 10])
  with pytest.raises(ValueError, match="no ratings for 1 generated clips"):
    fid.read_ratings(str(path), ["Awe_0001", "Awe_0003"])
  path.write_text(header + "Awe_0001," + ",".join(["x"] * 10) + "\n")
  with pytest.raises(ValueError, match="row 2"):
    fid.read_ratings(str(path), ["Awe_0001"])
  path.write_text("File_ID,Awe\nAwe_0001,0.5\n")
  with pytest.raises(ValueError, match="missing columns"):
    fid.read_ratings(str(path), ["Awe_0001"])


# ------------------------------------------------------------------------------------------------- FID tables ----


def test_fid_matrix_matches_scipy_sqrtm_and_marks_small_bins_nan():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 3))
  b = rng.normal(1.0, 1.0, size=(40, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 2.0]])
  tiny = rng.normal(size=(1, 3))
  matrix = fid.fid_matrix([a, b], [a, b, tiny])
  assert matrix.shape == (2, 3)
  for i, row in enumerate([a, b]):
    for j, column in enumerate([a, b]):
      assert matrix[i, j] == pytest.approx(_fid_reference(row, column), rel=1e-6, abs=1e-9), (i, j)
  assert matrix[0, 1] > 1.0 and abs(matrix[0, 0]) < 1e-9
  assert np.isnan(matrix[:, 2]).all()  # a set with one clip has no covariance
  # min_clips raises the bar: 40-clip sets stay, a 3-clip set becomes NaN.
  three = fid.fid_matrix([a[:3], b], [b], min_clips=5)
  assert np.isnan(three[0, 0]) and three[1, 0] == pytest.approx(0.0, abs=1e-9)


def test_fid_matrix_closed_form_on_one_dimensional_sets():
  """1-D sets: {0, 2} has mean 1, variance 2; {3, 7} has mean 5, variance 8; {1, 3} has mean 2, variance 2.

  FID({0,2}, {3,7}) = 16 + 2 + 8 - 2 sqrt(16) = 18; FID({0,2}, {1,3}) = 1 + 2 + 2 - 2 * 2 = 1;
  FID({3,7}, {1,3}) = 9 + 8 + 2 - 2 * 4 = 11.
  """
  sets = [np.array([[0.0], [2.0]]), np.array([[3.0], [7.0]]), np.array([[1.0], [3.0]])]
  np.testing.assert_allclose(fid.fid_matrix(sets, sets), [[0, 18, 1], [18, 0, 11], [1, 11, 0]], atol=1e-9)


def test_train_val_floor_is_the_train_by_validation_fid_table():
  rng = np.random.default_rng(1)
  train = {e: rng.normal(k / 3, 1.0, size=(6, 2)) for k, e in enumerate(EMOTIONS)}
  val = {e: rng.normal(k / 3, 1.0, size=(5, 2)) for k, e in enumerate(EMOTIONS)}
  val["Triumph"] = val["Triumph"][:1]
  table = fid.train_val_floor(train, val)
  assert table["emotions"] == list(EMOTIONS)
  assert table["train_clips"] == [6] * 10 and table["val_clips"] == [5] * 7 + [1] + [5] * 2
  reference = np.array([[_fid_reference(train[r], val[c]) if len(val[c]) > 1 else np.nan for c in EMOTIONS]
                        for r in EMOTIONS])
  np.testing.assert_allclose(table["fid"], reference, rtol=1e-6, atol=1e-9)  # NaN column where it must be
  assert np.isnan(table["fid"][:, EMOTIONS.index("Triumph")]).all()


class _FakeClassifier:
  """Stands for the trained Emo18: each record carries its own embedding and predicted intensities."""

  def embed(self, records):
    return np.array([r["output"] for r in records]), np.array([r["embedding"] for r in records])


def test_score_reports_fids_controls_and_heep_against_references(tmp_path):
  rng = np.random.default_rng(2)
  train = {e: rng.normal(k / 2, 1.0, size=(8, 3)) for k, e in enumerate(EMOTIONS)}
  generated_emb = {"Awe": train["Awe"][:6] + rng.normal(0, 0.3, size=(6, 3)),
                   "Fear": rng.normal(0, 1.5, size=(6, 3))}
  outputs = {e: rng.uniform(size=(6, 10)) for e in generated_emb}
  generated = {e: [{"file_id": f"{e}_{i:04d}", "embedding": generated_emb[e][i], "output": outputs[e][i]}
                   for i in range(6)] for e in ("Fear", "Awe")}  # given out of EMOTIONS order
  ratings = {e: rng.uniform(size=(6, 10)) for e in generated_emb}
  csv_path = tmp_path / "ratings.csv"
  csv_path.write_text("File_ID," + ",".join(EMOTIONS) + "\n" + "".join(
      f"{e}_{i:04d}.wav," + ",".join(repr(float(v)) for v in ratings[e][i]) + "\n" for e in ratings for i in range(6)))
  result = fid.score(_FakeClassifier(), generated, train, {e: 8 for e in EMOTIONS}, num_shuffles=3, seed=0,
                     ratings_csv=str(csv_path))
  assert list(result["per_emotion"]) == ["Awe", "Fear"]  # EMOTIONS order
  matrix = np.array([[_fid_reference(generated_emb[r], train[c]) for c in EMOTIONS] for r in ("Awe", "Fear")])
  np.testing.assert_allclose(result["generated_vs_train_fid"]["fid"], matrix, rtol=1e-6)
  for i, e in enumerate(("Awe", "Fear")):
    own = EMOTIONS.index(e)
    values = result["per_emotion"][e]
    assert values["fid"] == pytest.approx(matrix[i, own], rel=1e-6)
    wrong = np.delete(matrix[i], own)
    assert values["wrong_bin_fid_mean"] == pytest.approx(wrong.mean(), rel=1e-6)
    assert values["wrong_bin_fid_min"] == pytest.approx(wrong.min(), rel=1e-6)
    assert values["train_clips"] == 8 and values["generated_clips"] == 6
    onehot = np.zeros((6, 10))
    onehot[:, own] = 1.0
    assert values["classifier_heep"] == pytest.approx(_pearson_reference(onehot, outputs[e]), abs=1e-5)
    heep = _pearson_reference(onehot, ratings[e])
    assert values["heep"] == pytest.approx(heep, abs=1e-5)
    assert values["s_gen"] == pytest.approx((1 / matrix[i, own] + heep) / 2, abs=1e-5)
  assert result["mean_fid"] == pytest.approx(np.mean([matrix[0, 0], matrix[1, EMOTIONS.index("Fear")]]), rel=1e-6)
  all_onehot = np.zeros((12, 10))
  all_onehot[:6, 0] = all_onehot[6:, EMOTIONS.index("Fear")] = 1.0
  assert result["classifier_heep_all"] == pytest.approx(
      _pearson_reference(all_onehot, np.concatenate([outputs["Awe"], outputs["Fear"]])), abs=1e-5)
  # Awe's clips are near Awe's bin: its FID is its row's smallest, below its wrong-bin mean.
  assert matrix[0, 0] == matrix[0].min() and result["below_wrong_bin_mean"] >= 1


# ------------------------------------------------------------------------------------- shuffled-label control ----


def test_shuffled_label_control_separates_followed_from_ignored_conditions():
  """Generated sets that follow their condition score below the control; sets that ignore it do not."""
  rng = np.random.default_rng(0)
  centres = rng.normal(0.0, 2.0, size=(4, 6))
  bins = [c + rng.normal(size=(60, 6)) for c in centres]
  # A common offset from every bin (fakes look fake) plus the condition's own centre.
  follows = [c + 1.5 + rng.normal(size=(80, 6)) for c in centres]
  fids = [_fid_reference(g, b) for g, b in zip(follows, bins)]
  control, spread = fid.shuffled_label_fid(follows, bins, num_shuffles=4, seed=0)
  assert control.shape == spread.shape == (4,)
  assert all(f < c for f, c in zip(fids, control))
  # A generator that ignores its condition: every set is a draw from the same mixture.
  mixture = np.concatenate(follows)
  ignores = [mixture[rng.permutation(len(mixture))[:80]] for _ in centres]
  ignored_fids = np.array([_fid_reference(g, b) for g, b in zip(ignores, bins)])
  ignored_control, _ = fid.shuffled_label_fid(ignores, bins, num_shuffles=8, seed=1)
  assert np.abs(ignored_fids - ignored_control).max() < 0.25 * ignored_control.min()
  assert (ignored_fids >= ignored_control).any()
  # A set smaller than min_clips gets NaN.
  tiny, _ = fid.shuffled_label_fid([follows[0], follows[1][:1]], bins[:2], num_shuffles=2)
  assert np.isfinite(tiny[0]) and np.isnan(tiny[1])


def test_shuffled_label_control_is_seeded():
  """Two calls on freshly built copies of the inputs agree for one seed; another seed draws other permutations."""

  def inputs():
    rng = np.random.default_rng(3)
    return [rng.normal(k, 1.0, size=(10, 2)) for k in range(3)], [rng.normal(k, 1.0, size=(12, 2)) for k in range(3)]

  generated, bins = inputs()
  first = fid.shuffled_label_fid(generated, bins, num_shuffles=3, seed=5)
  generated_again, bins_again = copy.deepcopy(inputs())
  second = fid.shuffled_label_fid(generated_again, bins_again, num_shuffles=3, seed=5)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  assert not np.allclose(fid.shuffled_label_fid(generated, bins, num_shuffles=3, seed=6)[0], first[0])


def test_shuffled_label_control_draws_partitions_of_the_pooled_clips():
  """Each permutation splits the pooled clips into sets of the original sizes.

  One generated set: every permutation is that set, so the control is its FID (scipy) with spread 0.
  Two sets of 2 one-dimensional clips and one shuffle: the value for set 0 is the FID of some pair of the 4 pooled
  clips, and set 1 gets the complementary pair; both are checked against every partition, and the seeds must not
  all draw the same partition (the clips are shuffled, not kept in their sets).
  """
  rng = np.random.default_rng(4)
  only, column = rng.normal(size=(7, 2)), rng.normal(1.0, 1.0, size=(9, 2))
  mean, spread = fid.shuffled_label_fid([only], [column], num_shuffles=3, seed=0)
  assert mean[0] == pytest.approx(_fid_reference(only, column), rel=1e-6) and spread[0] == pytest.approx(0, abs=1e-9)
  pooled = np.array([[0.0], [1.0], [3.0], [7.0]])
  columns = [np.array([[0.0], [2.0]]), np.array([[5.0], [6.0]])]
  partitions = []
  for first in itertools.combinations(range(4), 2):
    second = [k for k in range(4) if k not in first]
    partitions.append((_fid_reference(pooled[list(first)], columns[0]),
                       _fid_reference(pooled[second], columns[1])))
  drawn = set()
  for seed in range(4):
    values, _ = fid.shuffled_label_fid([pooled[:2], pooled[2:]], columns, num_shuffles=1, seed=seed)
    matches = [k for k, p in enumerate(partitions) if np.allclose(values, p, rtol=1e-6, atol=1e-9)]
    assert matches, (seed, values)
    drawn.update(matches)
  assert len(drawn) > 1
