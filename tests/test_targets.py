"""Tests of exvo_jax/targets.py against numpy / scikit-learn on hand-made labels with missing rows."""

import jax
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import mean_absolute_error
from sklearn.metrics import recall_score

from exvo_jax import targets
from exvo_jax.data import schema


def _ccc(x, y):
  """Concordance correlation with population moments, written out."""
  cov = np.mean((x - x.mean()) * (y - y.mean()))
  return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_the_catalogue_holds_every_label_set_with_its_facts():
  assert set(targets.NAMES) == {"emotions", "age", "country", "avb_high", "avb_two", "avb_culture", "avb_type",
                                "category"}
  culture = targets.get("avb_culture")
  assert culture.num_outputs == 40 and culture.submission[36:] == tuple(
      f"{c}_Surprise" for c in ("China", "United States", "South Africa", "Venezuela"))
  voc_type = targets.get("avb_type")
  assert (voc_type.kind, voc_type.metric, voc_type.submission) == ("classification", "uar", ("Voc_Type",))
  assert targets.get("avb_two").submission == ("Valence", "Arousal")
  assert targets.get("category").num_outputs == 30
  assert not targets.get("age").higher_is_better and targets.get("emotions").higher_is_better
  with pytest.raises(ValueError, match="unknown target 'avb_low'; known targets: emotions, age"):
    targets.get("avb_low")
  with pytest.raises(ValueError, match="does not suit a classification"):
    targets.Target("x", "x", "classification", ("a", "b"), "sigmoid", "uar", ("X",))


def test_a_regression_row_with_any_missing_dimension_is_left_out_of_loss_and_score():
  rng = np.random.default_rng(0)
  labels = rng.uniform(0, 1, (12, 2)).astype(np.float32)
  labels[3, 1] = np.nan  # a row with some but not all labels
  labels[7] = np.nan  # a hidden test row
  predictions = rng.uniform(0, 1, (12, 2)).astype(np.float32)
  target = targets.get("avb_two")
  keep = np.ones(12, bool)
  keep[[3, 7]] = False
  np.testing.assert_array_equal(np.asarray(target.known(labels)), keep)
  expected = np.mean((predictions[keep].astype(np.float64) - labels[keep]) ** 2)
  assert float(target.loss(predictions, labels)) == pytest.approx(expected, rel=1e-6)
  scores = target.score(predictions, labels)
  for j, name in enumerate(("Valence", "Arousal")):
    assert scores[name] == pytest.approx(_ccc(predictions[keep, j].astype(np.float64), labels[keep, j]), abs=1e-5)
  assert scores["mean_ccc"] == pytest.approx((scores["Valence"] + scores["Arousal"]) / 2)


def test_age_is_a_scalar_regression_scored_by_mae_over_known_ages():
  labels = np.array([20.0, np.nan, 35.0, 41.0], np.float32)
  outputs = np.array([[22.0], [99.0], [30.0], [41.0]], np.float32)
  target = targets.get("age")
  predictions = np.asarray(target.activate(outputs))
  assert predictions.shape == (4,)
  assert float(target.loss(predictions, labels)) == pytest.approx((4 + 25 + 0) / 3)
  assert target.score(predictions, labels) == {"mae": pytest.approx(mean_absolute_error([20, 35, 41], [22, 30, 41]))}


def test_classification_loss_uar_and_recalls_match_numpy_and_sklearn():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(40, 8)).astype(np.float32)
  labels = rng.integers(0, 8, 40)
  labels[:5] = -1  # unknown (A-VB test rows)
  labels[labels == 6] = 2  # class 6 absent: UAR averages over the classes present
  target = targets.get("avb_type")
  known = labels >= 0
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean(log_softmax[known, labels[known]])
  assert float(target.loss(logits, labels)) == pytest.approx(expected, rel=1e-5)
  scores = target.score(logits, labels)
  chosen = logits[known].argmax(-1)
  assert scores["uar"] == pytest.approx(balanced_accuracy_score(labels[known], chosen), abs=1e-6)
  present = sorted(set(labels[known]))
  recalls = recall_score(labels[known], chosen, labels=present, average=None)
  assert scores == {"uar": scores["uar"],
                    **{f"recall_{schema.AVB_TYPES[c]}": pytest.approx(r) for c, r in zip(present, recalls)}}
  assert "recall_Pant" not in scores  # class 6, absent


def test_no_known_row_gives_a_zero_loss_not_nan():
  assert float(targets.get("avb_high").loss(np.zeros((3, 10)), np.full((3, 10), np.nan))) == 0.0
  assert float(targets.get("country").loss(np.zeros((3, 4)), np.full(3, -1))) == 0.0


def test_activations_and_submission_cells():
  outputs = np.array([[0.0, 2.0, -2.0]])
  sigmoid = np.asarray(targets.Target("t", "t", "regression", ("a", "b", "c"), "sigmoid", "mean_ccc",
                                      ("a", "b", "c")).activate(outputs))
  np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-outputs)), rtol=1e-6)
  logits = np.zeros(8)
  logits[schema.AVB_TYPES.index("Scream")] = 1.0
  assert targets.get("avb_type").submission_values(logits) == ["Scream"]
  assert targets.get("country").submission_values(np.array([0.1, 0.0, 3.0, 0.2])) == ["2"]
  assert targets.get("avb_two").submission_values(np.array([0.25, 0.123456])) == ["0.2500", "0.1235"]


def test_the_gradient_is_finite_and_zero_on_unknown_rows():
  """d/dp of sum over known (p - y)^2 / (known rows * k) is 2 (p - y) / (known rows * k) there, 0 elsewhere, even
  though the unknown labels are NaN."""
  predictions = np.array([[0.2, 0.4], [0.5, 0.5], [0.9, 0.1]], np.float32)
  labels = np.array([[0.0, 1.0], [np.nan, 0.3], [1.0, 0.0]], np.float32)
  grad = np.asarray(jax.grad(targets.get("avb_two").loss)(predictions, labels))
  expected = 2 * (predictions - np.nan_to_num(labels)) / (2 * 2)
  expected[1] = 0.0
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
