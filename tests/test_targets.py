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


def _avb_labels(rng, n):
  """Random labels of the four A-VB tasks with unknown rows in each: {field: array}."""
  high = rng.uniform(0, 1, (n, 10)).astype(np.float32)
  two = rng.uniform(0, 1, (n, 2)).astype(np.float32)
  culture = rng.uniform(0, 1, (n, 40)).astype(np.float32)
  voc_type = rng.integers(0, 8, n).astype(np.int32)
  high[0] = np.nan  # a hidden test row in High only
  two[1, 0] = np.nan  # a partial Two row
  culture[2:4] = np.nan
  voc_type[5] = -1
  return {"avb_high": high, "avb_two": two, "avb_culture": culture, "avb_type": voc_type}


def test_a_joint_target_sums_its_members_losses_on_their_own_output_slices():
  rng = np.random.default_rng(3)
  n = 16
  labels = _avb_labels(rng, n)
  outputs = rng.normal(size=(n, 10 + 2 + 40 + 8)).astype(np.float32)
  joint = targets.Joint([targets.get(f"avb_{t}") for t in ("high", "two", "culture", "type")],
                        weights=(1.0, 2.0, 0.5, 3.0))
  assert joint.num_outputs == 60
  packed = joint.labels_of(labels)
  assert packed.shape == (n, 10 + 2 + 40 + 1)
  # Hand-computed member losses on the slices 0:10, 10:12, 12:52, 52:60, each over its own known rows.
  mse = lambda p, y: np.mean((p[np.isfinite(y).all(1)] - y[np.isfinite(y).all(1)]) ** 2)
  known = labels["avb_type"] >= 0
  logits = outputs[known, 52:].astype(np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  xent = -np.mean(log_softmax[np.arange(known.sum()), labels["avb_type"][known]])
  expected = (mse(outputs[:, :10], labels["avb_high"]) + 2 * mse(outputs[:, 10:12], labels["avb_two"])
              + 0.5 * mse(outputs[:, 12:52], labels["avb_culture"]) + 3 * xent)
  assert float(joint.loss(outputs, packed)) == pytest.approx(expected, rel=1e-5)
  # Row 0 has no High label but the other three: it is known to the joint target; no row lacks all four.
  np.testing.assert_array_equal(joint.known(packed), np.ones(n, bool))
  # Scores: each member's own, prefixed, and mean_score the mean of the four main metrics.
  scores = joint.score(outputs, packed)
  keep = np.isfinite(labels["avb_two"]).all(1)
  assert scores["avb_two/Valence"] == pytest.approx(_ccc(outputs[keep, 10].astype(np.float64),
                                                         labels["avb_two"][keep, 0]), abs=1e-5)
  assert scores["avb_type/uar"] == pytest.approx(
      balanced_accuracy_score(labels["avb_type"][known], outputs[known, 52:].argmax(-1)), abs=1e-6)
  mains = [scores["avb_high/mean_ccc"], scores["avb_two/mean_ccc"], scores["avb_culture/mean_ccc"],
           scores["avb_type/uar"]]
  assert scores["mean_score"] == pytest.approx(np.mean(mains))


def test_a_joint_target_refuses_a_lower_is_better_member_and_mismatched_weights():
  with pytest.raises(ValueError, match="age are scored lower-is-better"):
    targets.Joint([targets.get("emotions"), targets.get("age")])
  with pytest.raises(ValueError, match="1 loss weights for 2 targets"):
    targets.Joint([targets.get("avb_two"), targets.get("avb_type")], weights=(1.0,))


def test_a_member_without_known_labels_scores_nan_and_the_mean_is_over_the_others():
  """A release whose Test labels are out for some tasks only: the others are still scored."""
  rng = np.random.default_rng(4)
  labels = _avb_labels(rng, 12)
  labels["avb_high"][:] = np.nan  # High hidden, Type known
  joint = targets.Joint([targets.get("avb_high"), targets.get("avb_type")])
  outputs = rng.normal(size=(12, 18)).astype(np.float32)
  scores = joint.score(outputs, joint.labels_of(labels))
  known = labels["avb_type"] >= 0
  uar = balanced_accuracy_score(labels["avb_type"][known], outputs[known, 10:].argmax(-1))
  assert np.isnan(scores["avb_high/mean_ccc"]) and scores["avb_type/uar"] == pytest.approx(uar, abs=1e-6)
  assert scores["mean_score"] == pytest.approx(uar, abs=1e-6)
  assert np.isnan(targets.get("avb_two").score(np.zeros((2, 2)), np.full((2, 2), np.nan))["mean_ccc"])


def test_the_unmasked_loss_is_the_plain_mean_and_all_known_says_when_it_applies():
  rng = np.random.default_rng(5)
  predictions = rng.normal(size=(6, 10)).astype(np.float32)
  labels = rng.uniform(size=(6, 10)).astype(np.float32)
  emotions = targets.get("emotions")
  assert emotions.all_known(labels)
  plain = float(emotions.loss(predictions, labels, masked=False))
  assert plain == pytest.approx(np.mean((predictions.astype(np.float64) - labels) ** 2), rel=1e-6)
  assert plain == pytest.approx(float(emotions.loss(predictions, labels)), rel=1e-6)
  labels[2, 3] = np.nan
  assert not emotions.all_known(labels)
  logits = rng.normal(size=(5, 8)).astype(np.float32)
  classes = np.array([0, 3, 7, 1, 1])
  log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  voc_type = targets.get("avb_type")
  assert float(voc_type.loss(logits, classes, masked=False)) == pytest.approx(
      -np.mean(log_softmax[np.arange(5), classes]), rel=1e-5)
  joint = targets.Joint([targets.get("avb_two"), voc_type])
  two = rng.uniform(size=(5, 2)).astype(np.float32)
  assert joint.all_known(joint.labels_of({"avb_two": two, "avb_type": classes}))
  classes[0] = -1
  assert not joint.all_known(joint.labels_of({"avb_two": two, "avb_type": classes}))
