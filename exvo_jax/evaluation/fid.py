"""The ExVo-Generate evaluation in the FID classifier's space: embeddings, FID tables, the controls, HEEP, S_GEN.

Training-time validation (`validation_scores`, which ranks a GAN's checkpoints) and the final scores (`score`,
written to scores.json) both call this module. The classifier is Emo18 trained on the Train split; its 256-d LSTM
output at the last frame is the embedding (`Classifier.embed`).

FIDs compare sets of embeddings; a set with fewer than 2 clips gives NaN. Two controls tell whether generated clips
follow their condition: the shuffled-label control (the emotion's real bin against generated clips whose emotion
labels were permuted) and the wrong-bin FIDs (the emotion's generated clips against the other emotions' bins).
"""

import csv
import dataclasses
import os
from typing import Any, Callable

import numpy as np

from exvo_jax import emo18_trainer
from exvo_jax import metrics
from exvo_jax.data import pipeline
from exvo_jax.data import schema

EMOTIONS = schema.EMOTIONS
BEST_METRIC = "val_fid"  # what `validation_scores` ranks a GAN's checkpoints by (lower is better)


@dataclasses.dataclass(frozen=True)
class Classifier:
  """The FID feature extractor: a trained Emo18's data-parallel predict function and its (replicated) variables.

  options: how clips are read (cut at the recipe's max length); batch_size: global evaluation batch;
  num_outputs / hidden: the widths of its predictions and of its embedding (for empty sets).
  """
  predict_fn: Callable
  variables: Any
  options: pipeline.AudioOptions
  batch_size: int
  num_outputs: int
  hidden: int

  def embed(self, source):
    """(predicted intensities [N, 10], embeddings [N, hidden]) of every clip of `source` (records), in order."""
    if not len(source):
      return np.zeros((0, self.num_outputs), np.float32), np.zeros((0, self.hidden), np.float32)
    return emo18_trainer.predict_split(self.predict_fn, self.variables, source, self.options, self.batch_size)


def fid_matrix(rows, columns, min_clips=2):
  """FID between every pair of embedding sets: [len(rows), len(columns)], NaN where a set has < min_clips."""
  result = np.full((len(rows), len(columns)), np.nan)
  for i, a in enumerate(rows):
    for j, b in enumerate(columns):
      if len(a) >= min_clips and len(b) >= min_clips:
        result[i, j] = float(metrics.fid(a, b))
  return result


def shuffled_label_fid(generated, columns, num_shuffles=5, seed=0, min_clips=2):
  """The shuffled-label control: FID of each emotion's bin against generated clips whose labels were permuted.

  generated: [rows] embedding sets, one per conditioned emotion; columns: the matching training bins (same order).
  All generated clips are pooled, their emotion labels permuted at random (each set keeps its size) and the set
  now labelled e scored against e's bin, averaged over `num_shuffles` permutations. A generator that ignores its
  condition scores the same as this control, up to sampling noise; one that follows it scores lower. Unlike
  comparing a row with the other bins, the reference bin is held fixed, so bins that happen to lie near (or far
  from) every generated set do not decide the comparison. Returns (mean [rows], std [rows]) over permutations.
  """
  sizes = [len(g) for g in generated]
  pooled = np.concatenate(generated)
  rng = np.random.default_rng(seed)
  values = np.full((num_shuffles, len(generated)), np.nan)
  for s in range(num_shuffles):
    order = rng.permutation(len(pooled))
    start = 0
    for i, (size, column) in enumerate(zip(sizes, columns)):
      chosen = pooled[order[start:start + size]]
      start += size
      if size >= min_clips and len(column) >= min_clips:
        values[s, i] = float(metrics.fid(chosen, column))
  return values.mean(axis=0), values.std(axis=0)


def read_ratings(path, file_ids):
  """Mean human intensity ratings [N, 10] for `file_ids` (wav stems) from a CSV of File_ID + the 10 emotions."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("File_ID", *EMOTIONS) if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; expected File_ID and the ten emotions "
                       f"({', '.join(EMOTIONS)})")
    rows = {}
    for line, row in enumerate(reader, start=2):
      key = os.path.splitext(os.path.basename(row["File_ID"].strip("[]")))[0]
      try:
        rows[key] = [float(row[e]) for e in EMOTIONS]
      except ValueError as error:
        raise ValueError(f"{path} row {line}: {error}; ratings must be numbers") from None
  absent = [i for i in file_ids if i not in rows]
  if absent:
    raise ValueError(f"{path}: no ratings for {len(absent)} generated clips, e.g. {absent[:3]}; rate every clip "
                     "of the samples folder (File_ID = the wav file's name)")
  return np.array([rows[i] for i in file_ids])


def heep_and_s_gen(ratings, fids, emotion_of):
  """Per emotion: HEEP over that emotion's clips (Pearson of one-hot targets vs ratings) and S_GEN."""
  result = {}
  for k, e in enumerate(EMOTIONS):
    rows = emotion_of == k
    if not rows.any():
      continue
    onehot = np.zeros((rows.sum(), len(EMOTIONS)))
    onehot[:, k] = 1.0
    heep = float(metrics.heep(onehot, ratings[rows]))
    result[e] = {"heep": heep, "s_gen": float(metrics.s_gen(fids[e], heep)) if np.isfinite(fids[e]) else None}
  return result



def train_val_floor(train_emb, val_emb):
  """The paper's Table 3: FID of every emotion's training bin against every emotion's validation bin.

  train_emb, val_emb: {emotion: embeddings} for all ten. The diagonal is the floor a generator can reach (real
  clips of the same emotion); it should be below the rest of its row. Returns the JSON-able table with bin sizes.
  """
  table = fid_matrix([train_emb[e] for e in EMOTIONS], [val_emb[e] for e in EMOTIONS])
  return {"rows": "train bins", "columns": "validation bins", "emotions": list(EMOTIONS), "fid": table,
          "train_clips": [len(train_emb[e]) for e in EMOTIONS], "val_clips": [len(val_emb[e]) for e in EMOTIONS]}


def validation_scores(classifier, generated, val_emb, *, num_shuffles, seed):
  """`{"val_fid": mean, "val_fid_<emotion>": ...}` of generated clips against the validation bins.

  generated: {emotion: records}; val_emb: {emotion: embeddings of its validation bin}. The mean skips NaN FIDs
  (a side under 2 clips). With more than one emotion it adds the shuffled-label control on the same bins:
  `val_shuffled` (its mean over emotions) and `val_below_shuffled` (how many emotions' FID is below their control),
  so a run shows during training whether its clips follow their condition.
  """
  emotions = list(generated)
  embedded = [classifier.embed(generated[e])[1] for e in emotions]
  fids = {e: fid_matrix([g], [val_emb[e]])[0, 0] for e, g in zip(emotions, embedded)}
  finite = [v for v in fids.values() if np.isfinite(v)]
  result = {BEST_METRIC: float(np.mean(finite)) if finite else float("nan"),
            **{f"{BEST_METRIC}_{e}": float(v) for e, v in fids.items()}}
  if len(emotions) > 1:
    shuffled = shuffled_label_fid(embedded, [val_emb[e] for e in emotions], num_shuffles=num_shuffles, seed=seed)[0]
    both = [(fids[e], c) for e, c in zip(emotions, shuffled) if np.isfinite(fids[e]) and np.isfinite(c)]
    result["val_shuffled"] = float(np.mean([c for _, c in both])) if both else float("nan")
    result["val_below_shuffled"] = int(sum(f < c for f, c in both))
  return result


def describe_validation(scores):
  """One line for the training log: the mean validation FID and the control."""
  control = ""
  if "val_shuffled" in scores:
    control = (f"; shuffled-label control {scores['val_shuffled']:.3f}, {scores['val_below_shuffled']} emotions "
               "below it")
  return f"validation FID {scores[BEST_METRIC]:.3f} (mean over emotions{control})"


def score(classifier, generated, train_emb, train_clips, *, num_shuffles, seed, ratings_csv=""):
  """The scores JSON: FID per emotion, generated-vs-train matrix (control), classifier HEEP, optional human HEEP.

  generated: {emotion: records of its generated clips}; train_emb: {emotion: classifier embeddings of that
  emotion's training bin} for all ten; train_clips: {emotion: size of its training bin}; ratings_csv: File_ID + mean
  human intensity ratings of the generated clips (HEEP and S_GEN), or "".
  """
  emotions = [e for e in EMOTIONS if e in generated]
  predictions, gen_emb, emotion_of, file_ids = [], {}, [], []
  for e in emotions:
    outputs, embeddings = classifier.embed(generated[e])
    gen_emb[e] = embeddings
    predictions.append(outputs)
    emotion_of += [EMOTIONS.index(e)] * len(outputs)
    file_ids += [r["file_id"] for r in generated[e]]
  predictions, emotion_of = np.concatenate(predictions), np.array(emotion_of)
  generated_sets = [gen_emb[e] for e in emotions]
  matrix = fid_matrix(generated_sets, [train_emb[e] for e in EMOTIONS])
  fids = {e: matrix[i, EMOTIONS.index(e)] for i, e in enumerate(emotions)}
  classifier_rated = heep_and_s_gen(predictions, fids, emotion_of)
  shuffled, shuffled_std = shuffled_label_fid(generated_sets, [train_emb[e] for e in emotions],
                                               num_shuffles=num_shuffles, seed=seed)
  per_emotion = {}
  for i, e in enumerate(emotions):
    wrong = np.delete(matrix[i], EMOTIONS.index(e))
    per_emotion[e] = {
        "fid": fids[e], "shuffled_label_fid": _finite_or_none(shuffled[i]),
        "shuffled_label_fid_std": _finite_or_none(shuffled_std[i]),
        "wrong_bin_fid_mean": float(np.nanmean(wrong)) if np.isfinite(wrong).any() else None,
        "wrong_bin_fid_min": float(np.nanmin(wrong)) if np.isfinite(wrong).any() else None,
        "train_clips": int(train_clips[e]), "generated_clips": int(len(gen_emb[e])),
        "classifier_heep": classifier_rated.get(e, {}).get("heep"),
        "classifier_s_gen": classifier_rated.get(e, {}).get("s_gen"),
    }
  result = {
      "per_emotion": per_emotion,
      "mean_fid": float(np.nanmean([fids[e] for e in emotions])),
      "mean_shuffled_label_fid": float(np.nanmean(shuffled)) if np.isfinite(shuffled).any() else None,
      "below_shuffled_label": int(sum(fids[e] < shuffled[i] for i, e in enumerate(emotions))),
      "mean_wrong_bin_fid": float(np.nanmean([np.nan if per_emotion[e]["wrong_bin_fid_mean"] is None
                                              else per_emotion[e]["wrong_bin_fid_mean"] for e in emotions])),
      "below_wrong_bin_mean": int(sum(fids[e] < per_emotion[e]["wrong_bin_fid_mean"] for e in emotions
                                      if per_emotion[e]["wrong_bin_fid_mean"] is not None)),
      "controls_note": "shuffled_label_fid: the emotion's training bin against generated clips with permuted "
                       "emotion labels (mean over permutations); wrong_bin_fid_mean: the emotion's generated "
                       "clips against the other emotions' training bins",
      "generated_vs_train_fid": {"rows": emotions, "columns": list(EMOTIONS), "fid": matrix},
      "classifier_heep_all": float(metrics.heep(np.eye(len(EMOTIONS))[emotion_of], predictions)),
      "classifier_heep_note": "HEEP with the FID classifier's predicted intensities in place of human ratings",
  }
  if ratings_csv:
    ratings = read_ratings(ratings_csv, file_ids)
    human = heep_and_s_gen(ratings, fids, emotion_of)
    for e, values in human.items():
      per_emotion[e]["heep"], per_emotion[e]["s_gen"] = values["heep"], values["s_gen"]
    result["mean_s_gen"] = float(np.nanmean([v["s_gen"] for v in human.values() if v["s_gen"] is not None]))
  return result

def _finite_or_none(value):
  return float(value) if np.isfinite(value) else None


def format_scores(result):
  """Table: FID, the shuffled-label control, the wrong-bin mean and the classifier-rated HEEP per emotion."""
  nan = float("nan")
  value = lambda v: nan if v is None else v
  lines = [f"{'emotion':<12} {'FID':>8} {'shuffled':>9} {'wrong bin':>9} {'HEEP(clf)':>9}"]
  for e, v in result["per_emotion"].items():
    lines.append(f"{e:<12} {v['fid']:8.3f} {value(v['shuffled_label_fid']):9.3f} "
                 f"{value(v['wrong_bin_fid_mean']):9.3f} {value(v['classifier_heep']):9.3f}")
  lines.append(f"{'mean':<12} {result['mean_fid']:8.3f} {value(result['mean_shuffled_label_fid']):9.3f} "
               f"{result['mean_wrong_bin_fid']:9.3f}")
  n = len(result["per_emotion"])
  lines.append(f"below control: shuffled label {result['below_shuffled_label']}/{n}, "
               f"wrong-bin mean {result['below_wrong_bin_mean']}/{n}")
  return "\n".join(lines)
