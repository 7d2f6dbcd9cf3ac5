"""Linear probes of the speaker's age: how much of it a feature set carries, apart from any MLP.

Fits ridge regressions from standardised clip features to age on the Train split of the default demo corpus
(48 speakers) and prints the Val MAE next to the training-mean predictor's, for the `ssl` feature set (each
hidden state of the encoder, and all of them concatenated) and for eGeMAPS (all 88 functionals, and groups of
them). A feature set whose best probe stays at the mean predictor's MAE holds no linear age signal that 48
speakers can reveal, whatever head reads it.

  python benchmarks/age_probe.py                          # the random encoder (mean pooling) and eGeMAPS
  python benchmarks/age_probe.py --pooling mean_std --encoder_checkpoint /path/to/wav2vec2-base

Needs scikit-learn (`pip install -e '.[test]'`); features come from (and go to) the usual feature caches.
"""

import argparse

import numpy as np
from sklearn.linear_model import Ridge

from configs import multitask
from exvo_jax import mlp_trainer
from exvo_jax.data import corpus

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
# eGeMAPS functionals by the substring of their names (opensmile's eGeMAPSv02 order).
EGEMAPS_GROUPS = {"F0": ("F0semitone",), "jitter": ("jitter",), "shimmer": ("shimmer",), "HNR": ("HNR",),
                  "formant frequencies": ("frequency_sma3nz",), "MFCC": ("mfcc",),
                  "spectral slope, alpha, Hammarberg": ("slope", "alpha", "hammar"), "loudness": ("loudness",)}


def probe_row(name, train_x, train_age, val_x, val_age):
  """'| name | dims | MAE per alpha | best |' for ridge on features standardised with training statistics."""
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 1e-8, std, 1.0)
  train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
  maes = [float(np.abs(Ridge(alpha=a).fit(train_x, train_age).predict(val_x) - val_age).mean()) for a in ALPHAS]
  return f"| {name} | {train_x.shape[1]} | " + " | ".join(f"{m:.2f}" for m in maes) + f" | {min(maes):.2f} |"


def labelled(table):
  known = ~np.isnan(table.age)
  return table.features[known], table.age[known]


def load(variant, overrides):
  config = multitask.get_config(variant)
  for key, value in overrides.items():
    config.encoder[key] = value
  return mlp_trainer.load_tables(config, corpus.of_config(config.data), workdir=None, log=lambda *a: None), config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pooling", default="mean")
  parser.add_argument("--encoder_checkpoint", default="")
  args = parser.parse_args()

  ssl_tables, config = load("ssl", {"pooling": args.pooling, "checkpoint": args.encoder_checkpoint})
  train_x, train_age = labelled(ssl_tables["train"])
  val_x, val_age = labelled(ssl_tables["validation"])
  floor = float(np.abs(val_age - train_age.mean()).mean())
  print(f"Val Age-MAE of the training-mean predictor: {floor:.2f} ({len(train_age)} train clips of "
        f"{len(set(ssl_tables['train'].speaker))} speakers, {len(val_age)} Val clips)")
  print("| features | dims | " + " | ".join(f"alpha {a:g}" for a in ALPHAS) + " | best |")
  print("|---|---|" + "---|" * (len(ALPHAS) + 1))
  layers = mlp_trainer.encoder_config(config).num_hidden_layers + 1
  encoder = "random encoder" if not args.encoder_checkpoint else args.encoder_checkpoint
  split = lambda x: x.reshape(len(x), layers, -1)
  for layer in range(layers):
    print(probe_row(f"ssl ({encoder}, {args.pooling}), hidden state {layer}", split(train_x)[:, layer], train_age,
                    split(val_x)[:, layer], val_age))
  print(probe_row(f"ssl ({encoder}, {args.pooling}), every hidden state", train_x, train_age, val_x, val_age))

  import opensmile  # the names of the eGeMAPS functionals, in the order of the extracted vectors
  names = list(opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                               feature_level=opensmile.FeatureLevel.Functionals).feature_names)
  egemaps, _ = load("egemaps", {})
  train_x, train_age = labelled(egemaps["train"])
  val_x, val_age = labelled(egemaps["validation"])
  print(probe_row("eGeMAPS, all", train_x, train_age, val_x, val_age))
  for group, keys in EGEMAPS_GROUPS.items():
    columns = [i for i, n in enumerate(names) if any(k in n for k in keys)]
    print(probe_row(f"eGeMAPS, {group}", train_x[:, columns], train_age, val_x[:, columns], val_age))


if __name__ == "__main__":  # guards the openSMILE worker processes, which start by importing this file
  main()
