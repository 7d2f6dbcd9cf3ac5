"""Scoring personalisation honestly: several support draws, per-speaker counts, and the class-split control.

FewShot's comparison (`configs/fewshot.py:compare`) adapts one trained model in every mode for several draws of
the 2 support clips per speaker. This module scores what those runs predicted; it takes predictions, not models:

- per draw, the task's metric over all query clips (mean CCC, or UAR) and on each speaker's own query clips;
- each speaker-draw counted as helped / hurt / unchanged against no adaptation on the same draw and clips (a
  change of less than `UNCHANGED` in the speaker's own metric counts as unchanged);
- the query clips of the support clips' classes scored apart from those of the other classes: adapting to 2 clips
  can teach a model their classes rather than the speaker (docs/hume_vb.md, findings). A clip's class is its
  category, or for the 10 intensities its strongest emotion.
"""

import numpy as np

UNCHANGED = 0.005  # a speaker's metric moving less than this counts as unchanged


def clip_classes(target, labels):
  """[N] int class of each clip: the category (classification) or the index of the strongest emotion (regression);
  -1 where unknown."""
  labels = np.asarray(labels)
  if target.kind == "classification":
    return labels.astype(np.int64)
  known = np.all(np.isfinite(labels), axis=-1)
  return np.where(known, np.argmax(np.where(np.isfinite(labels), labels, -np.inf), axis=-1), -1)


def score_draw(target, labels, classes, episodes, predictions):
  """Scores of one adaptation on one support draw.

  Args:
    labels: [N] or [N, K] labels of the split; classes: `clip_classes` of them.
    episodes: {speaker: (support indices, query indices)}.
    predictions: {query index: prediction [K]}.
  Returns:
    {'score': metric over all query clips, 'scores': every score of `target.score`, 'per_speaker': {speaker:
     metric on its query clips}, 'support_classes' / 'other_classes': the metric on the query clips whose class is
     / is not among their speaker's support classes (NaN when there are none)}.
  """
  query = np.concatenate([q for _, q in episodes.values()])
  stacked = np.stack([predictions[i] for i in query])
  scores = target.score(stacked, labels[query])
  per_speaker = {speaker: target.score(np.stack([predictions[i] for i in q]), labels[q])[target.metric]
                 for speaker, (_, q) in episodes.items()}
  own = np.concatenate([np.isin(classes[q], classes[s]) for s, q in episodes.values()])
  subset = {}
  for name, rows in (("support_classes", own), ("other_classes", ~own)):
    subset[name] = (target.score(stacked[rows], labels[query][rows])[target.metric] if rows.any()
                    else float("nan"))
  return {"score": scores[target.metric], "scores": scores, "per_speaker": per_speaker, **subset}


def summarise(draws, reference):
  """One row of the comparison from its per-draw scores and no adaptation's on the same draws.

  Returns {'mean', 'std' (over draws, ddof 1; 0 for one draw), 'gain' (mean of the per-draw differences to
  `reference`), 'helped', 'hurt', 'unchanged' (speaker-draws), 'support_classes', 'other_classes' (means over
  draws), 'draws' (each draw's score), 'per_emotion' (mean over draws of every score)}.
  """
  # Scores read back from JSON hold None where they were NaN (writers.plain).
  score = np.array([d["score"] for d in draws], np.float64)
  gain = score - np.array([d["score"] for d in reference], np.float64)
  pairs = [(d["per_speaker"][s], r["per_speaker"][s]) for d, r in zip(draws, reference) for s in d["per_speaker"]]
  adapted, before = np.array(pairs, np.float64).reshape(-1, 2).T
  # A metric undefined in both counts as unchanged; undefined after the adaptation only (a diverged one) as hurt,
  # undefined before it only as helped.
  change = np.where(np.isnan(adapted) & np.isnan(before), 0.0,
                    np.where(np.isnan(adapted), -np.inf, np.where(np.isnan(before), np.inf, adapted - before)))
  return {
      "mean": float(score.mean()), "std": float(score.std(ddof=1)) if len(score) > 1 else 0.0,
      "gain": float(gain.mean()), "helped": int(np.sum(change >= UNCHANGED)),
      "hurt": int(np.sum(change <= -UNCHANGED)), "unchanged": int(np.sum(np.abs(change) < UNCHANGED)),
      "support_classes": _nanmean([d["support_classes"] for d in draws]),
      "other_classes": _nanmean([d["other_classes"] for d in draws]),
      "draws": score.tolist(),
      "per_emotion": {k: float(np.mean(np.array([d["scores"][k] for d in draws], np.float64)))
                      for k in draws[0]["scores"]},
  }


def _nanmean(values):
  """The mean of the finite values; NaN when there are none (a corpus whose speakers never repeat a class)."""
  values = np.asarray(values, np.float64)
  return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def format_comparison(target, rows, num_draws, num_speakers):
  """Markdown: the comparison table ({row name: `summarise` result}, the first row no adaptation)."""
  metric = target.metric
  lines = [f"| adaptation | {metric} (mean +- std over {num_draws} draws) | gain over none | speaker-draws helped / "
           f"hurt / unchanged (of {num_draws * num_speakers}) | {metric}, support clips' classes | {metric}, other "
           f"classes |", "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['mean']:.3f} +- {r['std']:.3f} | {r['gain']:+.3f} | {r['helped']} / {r['hurt']} / "
                 f"{r['unchanged']} | {r['support_classes']:.3f} | {r['other_classes']:.3f} |")
  return "\n".join(lines)
