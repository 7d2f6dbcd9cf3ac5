"""Applying a trained model to new audio files: which files, their decoding, and what a task hands the `predict`
task (`Predictor`).

A trained task module offers `predictor(trained_config, workdir) -> Predictor`: its best checkpoint restored, and
a function from clips (16 kHz mono int16) to named outputs. `exvo_jax/tasks/predict.py` finds the files, decodes
them (`decode`), calls the predictor and writes the CSV.
"""

import dataclasses
import glob
import json
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np

from exvo_jax.data import audio as audio_lib

CONFIG_FILE = "config.json"  # written by main in every run's workdir


class PredictError(Exception):
  """A workdir or audio argument `predict` cannot use; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A trained model, ready for new clips.

  Attributes:
    columns: the name of every output (CSV columns after `file`), e.g. the ten emotions, 'age', 'country' and
      the country probabilities 'p_country_<name>'.
    predict: clips (a list of int16 [n] arrays at 16 kHz) -> one row per clip: a list of values (numbers, or
      names for a class), in the order of `columns`.
    chart_columns: the columns drawn in a clip's bar chart (e.g. the emotions).
    describe: one line naming the model (its task, checkpoint and features), printed and kept in the CSV's folder.
  """
  columns: Sequence[str]
  predict: Callable[[list], list]
  chart_columns: Sequence[str]
  describe: str


def class_columns(target_name, class_names):
  """The columns of a classification: the predicted class's name, then each class's probability."""
  return [target_name, *(f"p_{target_name}_{name}" for name in class_names)]


def class_values(logits, class_names):
  """Rows of `class_columns` from logits [N, K]: the argmax's name and the softmax probabilities."""
  logits = np.asarray(logits, np.float64)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  return [[class_names[int(k)], *p] for k, p in zip(probabilities.argmax(-1), probabilities)]


def read_trained_config(workdir):
  """The config a run in `workdir` was trained with (`config.json`), as a ConfigDict (JSON lists back to tuples)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise PredictError(f"--workdir={workdir}: no {CONFIG_FILE}, so this is not the workdir of a trained run (or it "
                       "was trained before runs recorded their config): point --workdir at a run's folder, or rerun "
                       "its training command once (it resumes and finishes at once, writing the file)")
  with open(path) as f:
    try:
      saved = json.load(f)
    except ValueError as error:
      raise PredictError(f"{path}: not valid JSON ({error}); rerun the training command to rewrite it") from None

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  return ml_collections.ConfigDict(tuples(saved))


def audio_files(pattern):
  """The files `pattern` names: one file, every file under a folder (recursively, hidden ones left out), or a glob;
  sorted. Raises PredictError when it names none."""
  if os.path.isfile(pattern):
    return [pattern]
  if os.path.isdir(pattern):
    found = []
    for folder, subfolders, names in os.walk(pattern):
      subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
      found += [os.path.join(folder, n) for n in names if not n.startswith(".")]
    paths = sorted(found)
  else:
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise PredictError(f"--config.audio={pattern!r} names no file: give an audio file, a folder or a glob "
                       "such as 'recordings/*.wav'")
  return paths


def decode(paths, log=print):
  """Reads every file as 16 kHz mono int16 (wav, flac, ogg, mp3 at any rate and channel count, converted the way
  the corpus reader converts); returns ([(path, samples)], [(path, problem, reason)]) of the decoded and the
  skipped files. Every skipped file is logged with its reason."""
  decoded, skipped = [], []
  for path in paths:
    try:
      samples, _ = audio_lib.load_audio(path)
    except audio_lib.AudioError as error:
      reason = str(error).split("; ")[0]  # the problem; the reader's fix speaks of restoring the release's copy
      skipped.append((path, error.kind, reason))
      log(f"skipped {path}: {error.kind}: {reason}")
      continue
    decoded.append((path, samples))
  return decoded, skipped
