"""Task `describe`: build the datasets of the configured corpus and print a per-split summary."""

import os

import numpy as np

from exvo_jax import writers
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.data import schema


def summarise(records, sample_rate=schema.SAMPLE_RATE):
  """Per-split figures from a split's records: clips, speakers, hours and label means (from the metadata: no audio
  is decoded for a built split)."""
  columns = pipeline.metadata(records)
  num_clips = len(records)
  summary = {
      "clips": num_clips,
      "speakers": len(set(columns["speaker"].tolist())) if num_clips else 0,
      "hours": float(columns["num_samples"].sum()) / sample_rate / 3600 if num_clips else 0.0,
  }
  if num_clips and "emotions" in columns:
    labelled = columns["emotions"][columns["labelled"].astype(bool)].reshape(-1, len(schema.EMOTIONS))
    summary["labelled_clips"] = int(labelled.shape[0])
    summary["emotion_means"] = dict(zip(schema.EMOTIONS, labelled.mean(0).round(3).tolist())) if labelled.size \
        else {}
    ages = columns["age"].astype(np.float64)
    summary["age_mean"] = float(np.nanmean(ages)) if np.isfinite(ages).any() else float("nan")
    countries = columns["country"]
    summary["countries"] = {c: int((countries == i).sum()) for i, c in enumerate(schema.COUNTRIES)}
    summary["countries"]["unknown"] = int((countries < 0).sum())
  if num_clips and "category" in columns:
    summary["categories"] = int(len(set(columns["category"].tolist())))
  return summary


def format_summary(name, s):
  line = f"{name:>10}: {s['clips']:6d} clips, {s['speakers']:4d} speakers, {s['hours']:6.2f} h"
  if "emotion_means" in s:
    line += f", {s['labelled_clips']} labelled, age {s['age_mean']:.1f}"
    line += "\n            emotion means: " + " ".join(f"{k[:5]} {v:.2f}" for k, v in s["emotion_means"].items())
    line += "\n            countries: " + ", ".join(f"{k} {v}" for k, v in s["countries"].items())
  if "categories" in s:
    line += f", {s['categories']} categories"
  return line


def check_config(config):
  """Nothing beyond the shared data keys `main` checks."""
  del config


def checkpointed_stages(config, workdir):  # pylint: disable=unused-argument
  """It trains nothing."""
  return []


def run(config, workdir):
  """Builds `config.data` and writes `<workdir>/summary.json`; returns the summary."""
  data = config.data
  root = corpus.of_config(data)
  builder, report = builders.prepare(data.dataset, root, config="audio" if data.dataset == "hume_vb" else None,
                                     data_dir=data.tfds_dir or None, strict=data.strict)
  print(f"{data.dataset} from {root}: {report['num_problems']} reported problem(s), "
        f"{report['num_converted']} converted file(s), {report['num_skipped']} skipped; "
        f"report at {os.path.join(builder.data_dir, builders.REPORT_FILE)}")
  summary = {"corpus": str(root), "report": {k: report[k] for k in ("num_problems", "num_converted",
                                                                     "num_skipped")}, "splits": {}}
  for split in builder.info.splits:
    summary["splits"][split] = summarise(builders.data_source(builder, split))
    print(format_summary(split, summary["splits"][split]))
  writers.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
