"""Apply a trained run to new audio: `--workdir=<the trained run> --config.audio=<file, folder or glob>`.

Works on the workdirs of MultiTask (openSMILE functionals, extracted from each file on the fly) and FewShot (Emo18
or the fine-tuned speech encoder, without per-speaker adaptation: the files' speakers are unknown). Writes
predictions.csv (one row per decoded file, a column per output), skipped.csv (the files that could not be
decoded, with the reason) and, with `:charts`, a bar chart per file, in `--config.output` (default
`<workdir>/predictions`).

Variants:
  :charts     a bar chart of each file's emotion intensities (or class probabilities)
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, charts=False)
  config = common.get_config()
  config.task = "predict"
  config.audio = ""  # a file, a folder (every file under it) or a glob, e.g. 'recordings/**/*.wav'
  config.output = ""  # the folder of predictions.csv; empty: <workdir>/predictions
  config.charts = arg.charts
  config.batch_size = 8  # clips per prediction batch (rounded to the devices)
  config.data.strict = False  # True: a file that cannot be decoded fails the run instead of being skipped
  return config
