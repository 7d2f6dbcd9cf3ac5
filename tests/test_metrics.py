"""Tests of exvo_jax.metrics against independent float64 references.

References: numpy formulas written out here, scipy.stats.pearsonr,
sklearn.metrics and scipy.linalg.sqrtm.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from sklearn import metrics as skm

from exvo_jax import metrics

RTOL = 1e-6
ATOL = 1e-6  # For values that are ~0 by construction.


@pytest.fixture
def x64():
  """Enables float64 in JAX for one test and restores the previous setting."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def _ccc_ref(x, y):
  """Per-column CCC with population moments, float64 numpy."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  mx, my = x.mean(0), y.mean(0)
  cov = ((x - mx) * (y - my)).mean(0)
  return 2 * cov / (x.var(0) + y.var(0) + (mx - my) ** 2)


def _fid_sqrtm_ref(e1, e2):
  """FID via scipy.linalg.sqrtm, float64, real part (pytorch-fid style)."""
  mu1, mu2 = e1.mean(0), e2.mean(0)
  s1, s2 = np.cov(e1, rowvar=False), np.cov(e2, rowvar=False)
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _fid_nuclear_ref(e1, e2):
  """FID via Tr((S1 S2)^(1/2)) = nuclear norm of A1 A2^T, float64.

  With S_i = A_i^T A_i, A_i = Xc_i / sqrt(n_i - 1) (centred embeddings), the
  eigenvalues of S1 S2 are the squared singular values of the n1 x n2 matrix
  A1 A2^T; no square root of a rounded zero, so accurate when rank-deficient.
  """
  a1 = (e1 - e1.mean(0)) / np.sqrt(len(e1) - 1)
  a2 = (e2 - e2.mean(0)) / np.sqrt(len(e2) - 1)
  tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
  return (np.sum((e1.mean(0) - e2.mean(0)) ** 2) + np.sum(a1 ** 2) + np.sum(a2 ** 2)
          - 2 * tr_covmean)


# ---------------------------------------------------------------- CCC ----


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 1), (64, 10), (300, 3)])
def test_ccc_matches_population_formula(x64, seed, shape):
  rng = np.random.default_rng(seed)
  target = rng.uniform(size=shape)
  # Correlated but biased and rescaled predictions, so all CCC terms matter.
  pred = 0.6 * target + 0.3 * rng.normal(size=shape) + 0.1
  got = metrics.ccc(pred, target)
  assert got.shape == (shape[1],)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, _ccc_ref(pred, target), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics.mean_ccc(pred, target),
                             _ccc_ref(pred, target).mean(), rtol=RTOL)


def test_ccc_uses_population_not_sample_variances(x64):
  # For n=4 the ddof=1 variant of the reference code gives a different value.
  pred = np.array([1.0, 2.0, 3.0, 5.0])
  target = np.array([1.5, 1.0, 4.0, 4.0])
  mixed = 2 * np.mean((pred - pred.mean()) * (target - target.mean())) / (
      pred.var(ddof=1) + target.var(ddof=1) + (pred.mean() - target.mean()) ** 2)
  got = metrics.ccc(pred, target)
  assert got.shape == ()
  np.testing.assert_allclose(got, _ccc_ref(pred, target), rtol=RTOL)
  assert abs(float(got) - mixed) > 1e-2


def test_ccc_edge_cases(x64):
  rng = np.random.default_rng(3)
  target = rng.uniform(size=(50, 4))
  # Identical inputs: perfect agreement.
  np.testing.assert_allclose(metrics.ccc(target, target), np.ones(4), rtol=RTOL)
  # A constant prediction has zero covariance with any target.
  const = np.full_like(target, 0.3)
  np.testing.assert_array_equal(metrics.ccc(const, target), np.zeros(4))
  # Both constant and equal: undefined, documented to be 0 (not NaN).
  got = metrics.ccc(const, const)
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got, np.zeros(4))
  # Both constant but different means: denominator > 0, covariance 0.
  np.testing.assert_array_equal(metrics.ccc(const, const + 1.0), np.zeros(4))
  # Perfectly anti-correlated and mean-matched: -1.
  np.testing.assert_allclose(metrics.ccc(target, 2 * target.mean(0) - target),
                             -np.ones(4), rtol=RTOL)


def test_ccc_float32_default_and_integer_inputs():
  pred = np.arange(10)
  target = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7, 9])
  got = metrics.ccc(pred, target)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _ccc_ref(pred, target), rtol=1e-5)


# ------------------------------------------------------------ Pearson ----


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [5, 1000])
def test_pearson_matches_scipy(x64, seed, n):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3))
  y = 0.5 * x + rng.normal(size=(n, 3))
  got = metrics.pearson(x, y)
  want = [scipy.stats.pearsonr(x[:, j], y[:, j])[0] for j in range(3)]
  assert got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics.pearson(x[:, 0], y[:, 0]), want[0], rtol=RTOL)


def test_pearson_constant_input_is_zero(x64):
  y = np.random.default_rng(0).normal(size=(5, 3))
  const = np.full((5, 3), 0.7)
  np.testing.assert_array_equal(metrics.pearson(const, y), np.zeros(3))
  np.testing.assert_array_equal(metrics.pearson(y, const), np.zeros(3))
  np.testing.assert_allclose(metrics.pearson(y, 3 * y - 1), np.ones(3), rtol=RTOL)


# ---------------------------------------------------------------- MAE ----


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(1,), (200,), (40, 3)])
def test_mae_matches_sklearn(x64, seed, shape):
  rng = np.random.default_rng(seed)
  pred, target = rng.normal(size=shape) * 10, rng.normal(size=shape) * 10
  want = skm.mean_absolute_error(np.reshape(target, (shape[0], -1)),
                                 np.reshape(pred, (shape[0], -1)))
  got = metrics.mae(pred, target)
  assert got.shape == ()
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_mae_integer_inputs():
  np.testing.assert_allclose(metrics.mae(np.array([20, 30, 41]), np.array([25, 30, 40])),
                             2.0, rtol=1e-7)


# ---------------------------------------------------------------- UAR ----


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n,num_classes", [(20, 4), (500, 4), (300, 10)])
def test_uar_matches_balanced_accuracy(x64, seed, n, num_classes):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, num_classes, size=n)
  # Mostly right, to keep the score away from chance.
  pred = np.where(rng.uniform(size=n) < 0.6, true, rng.integers(0, num_classes, size=n))
  got = metrics.uar(pred, true, num_classes)
  assert got.shape == ()
  np.testing.assert_allclose(got, skm.balanced_accuracy_score(true, pred), rtol=RTOL)
  # When every class occurs in both, macro recall is the same quantity.
  if len(np.unique(true)) == len(np.unique(np.concatenate([true, pred]))):
    np.testing.assert_allclose(got, skm.recall_score(true, pred, average="macro"),
                               rtol=RTOL)


def test_uar_ignores_classes_absent_from_true_labels(x64):
  true = np.array([0, 0, 1, 1, 1, 1])
  pred = np.array([0, 3, 1, 1, 2, 1])  # Classes 2 and 3 only predicted.
  got = float(metrics.uar(pred, true, num_classes=4))
  with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
    balanced = skm.balanced_accuracy_score(true, pred)
  np.testing.assert_allclose(got, balanced, rtol=RTOL)
  np.testing.assert_allclose(got, (1 / 2 + 3 / 4) / 2, rtol=RTOL)
  # sklearn's macro recall also averages the predicted-only classes (recall 0).
  with pytest.warns(Warning):
    macro = skm.recall_score(true, pred, average="macro")
  assert abs(got - macro) > 0.1


def test_uar_edge_cases(x64):
  # A single class in the true labels: UAR is that class' recall.
  true = np.full(8, 2)
  pred = np.array([2, 2, 2, 0, 1, 2, 2, 3])
  with pytest.warns(Warning):  # sklearn warns about predicted-only classes.
    want = skm.balanced_accuracy_score(true, pred)
  np.testing.assert_allclose(metrics.uar(pred, true, 4), want, rtol=RTOL)
  np.testing.assert_allclose(metrics.uar(pred, true, 4), 5 / 8, rtol=RTOL)
  # All wrong and all right.
  true = np.array([0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(metrics.uar((true + 1) % 3, true, 3), 0.0)
  np.testing.assert_allclose(metrics.uar(true, true, 3), 1.0, rtol=RTOL)
  # Constant prediction of one class among 3 balanced classes: chance, 1/3.
  np.testing.assert_allclose(metrics.uar(np.zeros(6, int), true, 3), 1 / 3, rtol=RTOL)


def test_uar_float32_default():
  got = metrics.uar(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 0.75, rtol=1e-7)


# -------------------------------------------------------------- S_MTL ----


def test_s_mtl_is_harmonic_mean(x64):
  rng = np.random.default_rng(0)
  c, u, m = rng.uniform(0.1, 1, 5), rng.uniform(0.1, 1, 5), rng.uniform(1, 10, 5)
  got = metrics.s_mtl(c, u, m)
  np.testing.assert_allclose(got, 3 / (1 / c + 1 / u + m), rtol=RTOL)
  # Harmonic mean of CCC, UAR and 1/MAE, computed the other way round.
  np.testing.assert_allclose(got, scipy.stats.hmean(np.stack([c, u, 1 / m]), axis=0),
                             rtol=RTOL)
  # Paper-style scalar inputs, and zero CCC gives zero.
  np.testing.assert_allclose(metrics.s_mtl(0.5, 0.4, 5.0), 3 / (2 + 2.5 + 5), rtol=RTOL)
  assert float(metrics.s_mtl(0.0, 0.4, 5.0)) == 0.0


# -------------------------------------------------------- Gaussian/FID ----


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_stats_matches_numpy(x64, seed):
  e = np.random.default_rng(seed).normal(size=(40, 6))
  mu, sigma = metrics.gaussian_stats(e)
  np.testing.assert_allclose(mu, e.mean(0), rtol=RTOL, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(e, rowvar=False), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n,d", [(40, 16), (500, 64)])
def test_fid_matches_scipy_sqrtm(seed, n, d):
  rng = np.random.default_rng(seed)
  e1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
  e2 = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + 0.3
  got = metrics.fid(e1, e2)
  assert isinstance(got, np.float64)
  np.testing.assert_allclose(got, _fid_sqrtm_ref(e1, e2), rtol=RTOL)
  np.testing.assert_allclose(got, _fid_nuclear_ref(e1, e2), rtol=RTOL)
  # frechet_distance on the float64 statistics gives the same value.
  s1, s2 = np.cov(e1, rowvar=False), np.cov(e2, rowvar=False)
  np.testing.assert_allclose(metrics.frechet_distance(e1.mean(0), s1, e2.mean(0), s2),
                             got, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_fid_rank_deficient(seed):
  # n=50 < d=100: both covariances have rank 49.
  rng = np.random.default_rng(seed)
  e1 = rng.normal(size=(50, 100))
  e2 = 0.5 * e1[rng.permutation(50)] + rng.normal(size=(50, 100)) + 0.2
  got = metrics.fid(e1, e2)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, _fid_nuclear_ref(e1, e2), rtol=RTOL)
  np.testing.assert_allclose(got, _fid_sqrtm_ref(e1, e2), rtol=RTOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_fid_rank_deficient_nearby_sets_is_accurate(seed):
  # A small FID between rank-deficient sets: the rounding noise of the 51 zero
  # eigenvalues must not leak through the square roots (it would add ~1e-6).
  rng = np.random.default_rng(seed)
  e1 = rng.normal(size=(50, 100))
  e2 = e1 + 0.01 * rng.normal(size=e1.shape)
  want = _fid_nuclear_ref(e1, e2)
  assert 1e-3 < want < 1e-1
  np.testing.assert_allclose(metrics.fid(e1, e2), want, rtol=1e-9)
  # scipy's sqrtm agrees to its own ~1e-6 absolute accuracy on singular input.
  np.testing.assert_allclose(metrics.fid(e1, e2), _fid_sqrtm_ref(e1, e2), atol=1e-5)


def test_fid_of_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  for e in (rng.normal(size=(500, 64)), rng.normal(size=(50, 100))):
    total_var = np.trace(np.cov(e, rowvar=False))
    assert abs(metrics.fid(e, e)) < 1e-9 * total_var
  # Sanity check of the scale: a shifted copy is far from 0.
  e = rng.normal(size=(500, 64))
  np.testing.assert_allclose(metrics.fid(e, e + 1.0), 64.0, rtol=RTOL)


def test_frechet_distance_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(0)
  d = 32
  a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
  a[:5] = 0.0  # Singular covariance.
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, want, rtol=RTOL)
  # Rotating both Gaussians by the same orthogonal matrix leaves the distance.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  got_rot = metrics.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2,
                                     q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got_rot, want, rtol=RTOL)


def test_fid_runs_in_float64_without_x64():
  # Float64 arithmetic is needed: float32 inputs that are exactly representable
  # reproduce the float64 reference to 1e-9, which float32 arithmetic cannot.
  assert not jax.config.jax_enable_x64
  rng = np.random.default_rng(0)
  e1 = rng.normal(size=(500, 64)).astype(np.float32)
  e2 = (rng.normal(size=(500, 64)) * 1.1 + 1e-3).astype(np.float32)
  got = metrics.fid(e1, e2)
  want = _fid_nuclear_ref(e1.astype(np.float64), e2.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert not jax.config.jax_enable_x64  # The switch did not leak.


def test_fid_refuses_tracers():
  e = np.random.default_rng(0).normal(size=(10, 3))
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(metrics.fid)(e, e)


# ----------------------------------------------------------- HEEP/S_GEN ----


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heep_matches_corrcoef(x64, seed):
  rng = np.random.default_rng(seed)
  n = 60
  labels = rng.integers(0, 10, size=n)
  onehot = np.eye(10, dtype=int)[labels]
  ratings = rng.uniform(0, 100, size=(n, 10)) + 30 * onehot  # Targeted emotion rated higher.
  got = metrics.heep(onehot, ratings)
  want = np.corrcoef(onehot.ravel().astype(np.float64), ratings.ravel())[0, 1]
  assert got.shape == ()
  assert want > 0.1
  np.testing.assert_allclose(got, want, rtol=RTOL)
  np.testing.assert_allclose(metrics.heep(onehot.astype(bool), ratings), want, rtol=RTOL)


def test_s_gen_hand_computed_values(x64):
  """S_GEN = (1/FID + HEEP) / 2 (ExVo 2022, hume_vb.md), on numbers worked out by hand."""
  # (1/2 + 0.3)/2 = 0.4; (1/10 - 0.1)/2 = 0; (1/0.5 + 0)/2 = 1; (1/40 + 0.9)/2 = (0.025 + 0.9)/2 = 0.4625.
  np.testing.assert_allclose(metrics.s_gen(np.array([2.0, 10.0, 0.5, 40.0]), np.array([0.3, -0.1, 0.0, 0.9])),
                             [0.4, 0.0, 1.0, 0.4625], rtol=RTOL, atol=1e-12)
  np.testing.assert_allclose(metrics.s_gen(4.0, 0.5), 0.375, rtol=RTOL)  # (0.25 + 0.5)/2
  # One HEEP broadcast over per-emotion FIDs: (1/2 + 0.2)/2 = 0.35, (0.1 + 0.2)/2 = 0.15, (2 + 0.2)/2 = 1.1,
  # (0.025 + 0.2)/2 = 0.1125.
  np.testing.assert_allclose(metrics.s_gen(np.array([2.0, 10.0, 0.5, 40.0]), 0.2), [0.35, 0.15, 1.1, 0.1125],
                             rtol=RTOL)


def test_s_gen_float32_default_and_integer_fid():
  got = metrics.s_gen(np.array([1, 8]), 0.5)  # (1 + 0.5)/2 = 0.75, (0.125 + 0.5)/2 = 0.3125
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [0.75, 0.3125], rtol=1e-7)


def test_s_gen_of_hand_computed_fid_and_heep():
  """End to end on 1-D embeddings and a 20-value HEEP whose values are worked out by hand.

  FID: e1 = {0, 2}: mean 1, variance (1 + 1)/(2 - 1) = 2; e2 = {3, 7}: mean 5, variance (4 + 4)/1 = 8;
  FID = (1 - 5)^2 + 2 + 8 - 2 sqrt(2 * 8) = 16 + 10 - 8 = 18.
  HEEP: flattened targets x have two 1s among 20 values; the ratings y are 3 at those two, 0 at nine others and
  2 at the remaining nine. mean(x) = 0.1, var(x) = 0.09; mean(y) = (6 + 18)/20 = 1.2,
  var(y) = (18 + 36)/20 - 1.44 = 1.26; cov = 6/20 - 0.1 * 1.2 = 0.18; r = 0.18 / sqrt(0.09 * 1.26) = sqrt(2/7).
  S_GEN = (1/18 + sqrt(2/7)) / 2.
  """
  fid_value = metrics.fid(np.array([[0.0], [2.0]]), np.array([[3.0], [7.0]]))
  np.testing.assert_allclose(fid_value, 18.0, rtol=1e-12)
  targets = np.zeros((2, 10), int)
  targets[:, 4] = 1
  ratings = np.zeros((2, 10))
  ratings[1] = 2.0
  ratings[:, 4] = 3.0
  heep_value = metrics.heep(targets, ratings)
  np.testing.assert_allclose(heep_value, np.sqrt(2 / 7), rtol=1e-6)
  np.testing.assert_allclose(metrics.s_gen(fid_value, heep_value), (1 / 18 + np.sqrt(2 / 7)) / 2, rtol=1e-6)


# ---------------------------------------------------------------- jit ----


def test_metrics_are_jitted():
  x = jnp.ones((8, 3))
  labels = jnp.zeros(8, jnp.int32)
  lowered = {
      "ccc": metrics.ccc.lower(x, x),
      "mean_ccc": metrics.mean_ccc.lower(x, x),
      "pearson": metrics.pearson.lower(x, x),
      "mae": metrics.mae.lower(x, x),
      "uar": metrics.uar.lower(labels, labels, num_classes=4),
      "s_mtl": metrics.s_mtl.lower(0.5, 0.5, 1.0),
      "gaussian_stats": metrics.gaussian_stats.lower(x),
      "heep": metrics.heep.lower(x, x),
      "s_gen": metrics.s_gen.lower(1.0, 0.5),
      "fid_core": metrics._fid_core.lower(x, x),  # pylint: disable=protected-access
      "frechet_core": metrics._frechet_distance_core.lower(  # pylint: disable=protected-access
          x[0], jnp.eye(3), x[0], jnp.eye(3)),
  }
  for name, low in lowered.items():
    assert "func" in low.as_text(), name
  # num_classes is static: a traced value is rejected.
  with pytest.raises(Exception):
    jax.jit(lambda k: metrics.uar(labels, labels, k))(4)
