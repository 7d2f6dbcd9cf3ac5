"""Task `predict`: a trained run's best model applied to new audio files.

`--workdir` is the trained run (its `config.json` says which task trained it, and how); `config.audio` names the
files. Every file is decoded as 16 kHz mono int16 (any rate, channels, wav / flac / ogg / mp3); files that cannot
be decoded are reported with the reason and skipped (with `data.strict`, they fail the run before any prediction).
The trained task's `predictor` restores its best checkpoint and predicts; the outputs go to
`<output>/predictions.csv` (`file`, then a column per output, named), the skipped files to `skipped.csv`, and with
`config.charts` a bar chart per file to `charts/`.
"""

import os

import numpy as np

from exvo_jax import config_check
from exvo_jax import figures
from exvo_jax import prediction
from exvo_jax import tasks
from exvo_jax import writers

WRITES_CONFIG = False  # main leaves the trained run's config.json as it is


def check_config(config):
  if not config.audio:
    raise config_check.ConfigError("--config.audio is empty: name a file, a folder or a glob of audio to predict")
  if config.batch_size < 1:
    raise config_check.ConfigError(f"--config.batch_size={config.batch_size}: expected >= 1")


def checkpointed_stages(config, workdir):
  del config, workdir  # nothing is trained
  return []


def output_folder(config, workdir):
  return config.output or os.path.join(workdir, "predictions")


def run(config, workdir):
  trained = prediction.read_trained_config(workdir)
  module = tasks.module(trained.task) if trained.task in tasks.MODULES else None
  if module is None or not hasattr(module, "predictor"):
    able = sorted(name for name in tasks.MODULES if name != "predict"
                  and hasattr(tasks.module(name), "predictor"))
    raise prediction.PredictError(f"--workdir={workdir} was trained by task {trained.task!r}, whose models predict "
                                  f"cannot apply; it applies the models of: {', '.join(able)}")
  paths = prediction.audio_files(config.audio)
  decoded, skipped = prediction.decode(paths)
  if skipped and config.data.strict:
    raise prediction.PredictError(f"{len(skipped)} of {len(paths)} file(s) could not be decoded (listed above); "
                                  "with --config.data.strict=True that stops the run: fix or remove them")
  predictor = module.predictor(trained, workdir)
  print(f"predict: {predictor.describe}; {len(decoded)} of {len(paths)} file(s) decoded")
  rows = []
  for start in range(0, len(decoded), config.batch_size):
    chunk = decoded[start:start + config.batch_size]
    rows += predictor.predict([samples for _, samples in chunk])
  out = output_folder(config, workdir)
  if writers.is_writer():
    os.makedirs(out, exist_ok=True)
  writers.write_csv(os.path.join(out, "predictions.csv"), ["file", *predictor.columns],
                    ([path, *(_cell(v) for v in row)] for (path, _), row in zip(decoded, rows)))
  writers.write_csv(os.path.join(out, "skipped.csv"), ["file", "problem", "reason"], skipped)
  if config.charts:
    chosen = [predictor.columns.index(c) for c in predictor.chart_columns]
    for (path, _), row in zip(decoded, rows):
      figures.save(figures.bars({"prediction": [row[k] for k in chosen]}, predictor.chart_columns,
                                title=os.path.basename(path), ylabel="predicted"),
                   os.path.join(out, "charts", _chart_name(path, config.audio) + ".png"))
  print(f"wrote {len(rows)} prediction(s) to {os.path.join(os.path.abspath(out), 'predictions.csv')}"
        + (f"; {len(skipped)} file(s) skipped (skipped.csv)" if skipped else ""))
  return {"predicted": len(rows), "skipped": len(skipped)}


def _cell(value):
  return f"{value:.6f}" if isinstance(value, (float, np.floating)) else value


def _chart_name(path, pattern):
  """The chart's file name: the audio file's path below the folder given, extension kept (so a.wav and a.mp3, or
  equal names in subfolders, get charts of their own)."""
  base = pattern if os.path.isdir(pattern) else os.path.dirname(path)
  return os.path.relpath(path, base).replace(os.sep, "__")
