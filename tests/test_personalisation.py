"""Scoring of the FewShot comparison (exvo_jax/evaluation/personalisation.py) against hand-computed values."""

import numpy as np

from exvo_jax import emo18_trainer
from exvo_jax.evaluation import personalisation


def test_clip_classes_are_the_category_or_the_strongest_emotion():
  hume = emo18_trainer.make_target("hume_vb")
  labels = np.full((3, 10), 0.1, np.float32)
  labels[0, 4], labels[1, 9] = 1.0, 0.7
  labels[2] = np.nan
  np.testing.assert_array_equal(personalisation.clip_classes(hume, labels), [4, 9, -1])
  emogator = emo18_trainer.make_target("emogator")
  np.testing.assert_array_equal(personalisation.clip_classes(emogator, np.array([3, 0, 29])), [3, 0, 29])


def _one_hot(classes, width=3):
  return np.eye(width)[classes]


def test_score_draw_and_summarise_by_hand():
  """Two speakers of a 3-class task. Speaker A (support classes 0, 1): queries of classes 0, 1, 2, 2; speaker B
  (support classes 2, 2): queries of classes 2, 0, 1, 1."""
  target = emo18_trainer.make_target("emogator")
  target = type(target)(target.name, target.field, target.kind, ("x", "y", "z"), target.activation, target.metric,
                        target.submission)
  labels = np.array([0, 1, 0, 1, 2, 2, 2, 2, 2, 0, 1, 1])
  classes = personalisation.clip_classes(target, labels)
  episodes = {"A": (np.array([0, 1]), np.array([2, 3, 4, 5])), "B": (np.array([6, 7]), np.array([8, 9, 10, 11]))}
  none = {i: _one_hot(labels[i]) for i in range(12)}  # every query right
  none[5] = _one_hot(0)  # A's second class-2 clip wrong
  adapted = dict(none)
  adapted[5] = _one_hot(2)  # the adaptation mends it ...
  adapted[10] = _one_hot(2)  # ... and breaks one of B's class-1 clips
  draw_none = personalisation.score_draw(target, labels, classes, episodes, none)
  draw_adapted = personalisation.score_draw(target, labels, classes, episodes, adapted)
  # UAR over all 8 queries: none: class 0 2/2, class 1 3/3, class 2 2/3 -> (1 + 1 + 2/3) / 3.
  np.testing.assert_allclose(draw_none["score"], (1 + 1 + 2 / 3) / 3)
  np.testing.assert_allclose(draw_adapted["score"], (1 + 2 / 3 + 1) / 3)
  # Per speaker: A none: class 0 1/1, 1 1/1, 2 1/2 -> 5/6; adapted 1. B none 1; adapted: class 1 1/2 -> 5/6.
  np.testing.assert_allclose([draw_none["per_speaker"]["A"], draw_adapted["per_speaker"]["A"]], [5 / 6, 1.0])
  np.testing.assert_allclose([draw_none["per_speaker"]["B"], draw_adapted["per_speaker"]["B"]], [1.0, 5 / 6])
  # Support classes: A's queries of classes 0, 1 (clips 2, 3) and B's of class 2 (clip 8): all right in both.
  # Other classes: A's 4, 5 (class 2), B's 9, 10, 11 (classes 0, 1, 1).
  assert draw_none["support_classes"] == draw_adapted["support_classes"] == 1.0
  np.testing.assert_allclose(draw_none["other_classes"], (1 + 1 + 1 / 2) / 3)  # class 0 1/1, 1 2/2, 2 1/2
  np.testing.assert_allclose(draw_adapted["other_classes"], (1 + 1 / 2 + 1) / 3)
  # Two draws, the second one unchanged by the adaptation.
  row = personalisation.summarise([draw_adapted, draw_none], [draw_none, draw_none])
  assert (row["helped"], row["hurt"], row["unchanged"]) == (1, 1, 2)
  np.testing.assert_allclose(row["mean"], (draw_adapted["score"] + draw_none["score"]) / 2)
  np.testing.assert_allclose(row["std"], np.std([draw_adapted["score"], draw_none["score"]], ddof=1))
  np.testing.assert_allclose(row["gain"], (draw_adapted["score"] - draw_none["score"]) / 2)
  text = personalisation.format_comparison(target, {"none": personalisation.summarise([draw_none] * 2,
                                                                                      [draw_none] * 2),
                                                    "adapted": row}, 2, 2)
  assert "| none | 0.889 +- 0.000 | +0.000 | 0 / 0 / 4 |" in text and "| adapted |" in text


def test_a_speaker_whose_metric_becomes_undefined_counts_as_hurt():
  """CCC of a speaker whose adapted predictions are constant is NaN-free (0) but a diverged adaptation gives NaN:
  it counts as hurt, a speaker undefined both times as unchanged."""
  draw = lambda a, b, c: {"score": 0.5, "scores": {"mean_ccc": 0.5}, "per_speaker": {"A": a, "B": b, "C": c},
                          "support_classes": 0.5, "other_classes": 0.5}
  row = personalisation.summarise([draw(float("nan"), None, 0.6)], [draw(0.4, None, 0.4)])
  assert (row["helped"], row["hurt"], row["unchanged"]) == (1, 1, 1)
