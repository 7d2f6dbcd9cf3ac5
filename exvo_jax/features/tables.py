"""Per-split feature tables (one row per clip) from the release's feats/ or extracted from the audio.

A table holds what the MultiTask MLP needs: features [N, D] and the labels of the same clips, in the order of the
split's records. Tables of several feature sets over the same clips can be fused by concatenation.
"""

import dataclasses
import pathlib

import numpy as np

from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.features import boaw as boaw_lib
from exvo_jax.features import opensmile as opensmile_lib
from exvo_jax.features import ssl_embeddings


@dataclasses.dataclass
class SplitTable:
  """One split's clips: features [N, D] float32; emotions [N, 10] (NaN unlabelled); age [N] (NaN unknown);
  country [N] int32 (-1 unknown); file_id, speaker [N] str; labelled [N] bool; category [N] int32 (corpora with
  categorical labels such as EmoGator, else -1); the A-VB labels avb_high [N, 10], avb_two [N, 2], avb_culture
  [N, 40] (NaN unknown or hidden) and avb_type [N] int32 (-1). A label field is named by its `targets.Target.field`."""
  features: np.ndarray
  emotions: np.ndarray
  age: np.ndarray
  country: np.ndarray
  file_id: np.ndarray
  speaker: np.ndarray
  labelled: np.ndarray
  category: np.ndarray
  avb_high: np.ndarray = None
  avb_two: np.ndarray = None
  avb_culture: np.ndarray = None
  avb_type: np.ndarray = None

  def __post_init__(self):
    n = len(self.file_id)
    for name, width in _AVB_WIDTHS.items():  # A-VB labels not given: unknown
      if getattr(self, name) is None:
        setattr(self, name, np.full(n, -1, np.int32) if not width else np.full((n, width), np.nan, np.float32))

  def select(self, rows):
    """The table restricted to `rows` (a boolean mask or indices)."""
    return SplitTable(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

  def __len__(self):
    return self.features.shape[0]

  def records(self):
    """Rows as dicts, the form the grain pipelines batch."""
    return [{"features": self.features[i], "emotions": np.nan_to_num(self.emotions[i]),
             "age": np.float32(self.age[i]), "country": np.int32(self.country[i]),
             "category": np.int32(self.category[i]), "file_id": self.file_id[i], "speaker": self.speaker[i],
             **{name: getattr(self, name)[i] for name in _AVB_WIDTHS}}
            for i in range(len(self))]


# A-VB label fields and their widths (0: a class index); records without them (EmoGator) read as unknown.
_AVB_WIDTHS = {"avb_high": len(schema.EMOTIONS), "avb_two": len(schema.AVB_TWO),
               "avb_culture": len(schema.AVB_CULTURE), "avb_type": 0}


def _table(records, features):
  """A table from records of either corpus: fields a corpus lacks are filled with 'unknown'."""
  no_emotions = np.full(10, np.nan, np.float32)
  return SplitTable(
      features=np.stack(features).astype(np.float32) if features else np.zeros((0, 0), np.float32),
      emotions=np.array([r.get("emotions", no_emotions) for r in records], np.float32).reshape(len(records), -1),
      age=np.array([r.get("age", np.nan) for r in records], np.float32),
      country=np.array([r.get("country", -1) for r in records], np.int32),
      file_id=np.array([pipeline.as_str(r["file_id"]) for r in records]),
      speaker=np.array([pipeline.as_str(r["speaker"]) for r in records]),
      labelled=np.array([bool(r.get("labelled", "category" in r)) for r in records]),
      category=np.array([r.get("category", -1) for r in records], np.int32),
      **{name: (np.array([r.get(name, -1) for r in records], np.int32) if not width else
                np.array([r.get(name, np.full(width, np.nan)) for r in records], np.float32).reshape(-1, width))
         for name, width in _AVB_WIDTHS.items()})


def _stem(record):
  return pipeline.as_str(record["file_id"]).strip().strip("[]")


def from_release(sources):
  """Tables from a TFDS feature-set config: {split: records with a `features` field}."""
  return {split: _table(list(records), [r["features"] for r in records]) for split, records in sources.items()}


def _located_records(sources):
  """({split: records without audio}, {stem: (split, row)}, {stem: num_samples}) from the splits' metadata,
  without decoding any audio."""
  located, records, lengths = {}, {}, {}
  for split, source in sources.items():
    columns = pipeline.metadata(source)
    samples = columns.pop("num_samples", None)
    records[split] = [{k: v[i] for k, v in columns.items()} for i in range(len(source))]
    for i, record in enumerate(records[split]):
      located[_stem(record)] = (split, i)
      if samples is not None:
        lengths[_stem(record)] = int(samples[i])
  return records, located, lengths


def from_encoder(sources, encoder, cache_dir, *, layer, pooling="mean", batch_size=8, log=print):
  """Tables of frozen speech-encoder embeddings ({split: audio records}): `layer` picks one hidden state
  ([N, P]); None keeps them all, flattened layer by layer ([N, (layers + 1) * P], for the MLP's weighted sum).
  P is the hidden size, doubled with pooling 'mean_std'."""
  records, located, lengths = _located_records(sources)
  stems = list(located)
  values, _ = ssl_embeddings.extract(
      stems, [lengths[s] for s in stems], lambda stem: sources[located[stem][0]][located[stem][1]]["audio"],
      encoder, cache_dir, pooling=pooling, batch_size=batch_size, log=log)
  pick = (lambda v: v.reshape(-1)) if layer is None else (lambda v: v[layer])
  return {split: _table(records[split], [pick(values[_stem(r)]) for r in records[split]]) for split in sources}


def _clip_features(sources, feature_set, cache_dir, processes, log, load=True):
  """{split: (records without audio, features per clip)}, extracting (or loading) one openSMILE set.

  All splits go through one extraction call, so the worker pool starts once. With `load=False` each split's
  features are an `opensmile.CachedFeatures` that reads a clip's file on access (frame-level descriptors of a
  full-size corpus do not fit in memory).
  """
  records, located, _ = _located_records(sources)  # ids and labels without decoding any audio
  values = opensmile_lib.extract(located, lambda stem: sources[located[stem][0]][located[stem][1]]["audio"],
                                 feature_set, pathlib.Path(cache_dir) / feature_set, processes=processes, log=log,
                                 load=load)
  result = {}
  for split in sources:
    per_clip = [values[_stem(r)] for r in records[split]]
    result[split] = (records[split], per_clip if load else opensmile_lib.CachedFeatures(per_clip))
  return result


def from_audio(sources, feature_set, cache_dir, *, processes=None, log=print):
  """Tables of openSMILE functionals ('compare' or 'egemaps') computed from audio records {split: source}."""
  return {split: _table(records, features)
          for split, (records, features) in _clip_features(sources, feature_set, cache_dir, processes, log).items()}


def bag_of_audio_words(sources, num_words, cache_dir, *, train_split="train", seed=0, kmeans_iterations=0,
                       num_assignments=1, processes=None, log=print, codebook_path=None):
  """Tables of bag-of-audio-words histograms; the codebook is learned on `train_split` only (and saved).

  The frame-level descriptors are read clip by clip from their cache files: memory holds the drawn code words and
  one group of clips' frames, not the corpus's frames.
  """
  frames = _clip_features(sources, "compare_lld", cache_dir, processes, log, load=False)
  codebook = boaw_lib.learn_codebook(frames[train_split][1], num_words, seed=seed,
                                     kmeans_iterations=kmeans_iterations, num_assignments=num_assignments)
  if codebook_path is not None:
    codebook.save(codebook_path)
  return {split: _table(records, list(boaw_lib.histograms(clip_frames, codebook)))
          for split, (records, clip_frames) in frames.items()}


def fuse(tables):
  """Concatenates the features of several tables clip by clip (matched by File_ID), in the first table's order.

  A clip missing from any table is left out of the fused one (each table's build report says why it is missing).
  """
  common = set(tables[0].file_id).intersection(*(set(t.file_id) for t in tables[1:]))
  keep = np.array([f in common for f in tables[0].file_id], bool)
  first = tables[0]
  order = first.file_id[keep]
  parts = []
  for t in tables:
    position = {f: i for i, f in enumerate(t.file_id)}
    parts.append(t.features[[position[f] for f in order]])
  return dataclasses.replace(first.select(keep), features=np.concatenate(parts, axis=1))
