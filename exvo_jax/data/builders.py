"""TFDS builders that turn a corpus folder (their manual directory) into array_record files.

- `hume_vb`: config `audio` (int16 waveforms) and one config per pre-extracted feature set of the release
  (`compare`, `egemaps`, `deepspectrum`, `boaw125` ... `boaw2000`).
- `emogator`: the public EmoGator corpus (audio, 30 categories).

Audio is stored as `tfds.features.Tensor(shape=(None,), dtype=int16)` rather than `tfds.features.Audio` so that
neither building nor reading needs TensorFlow. Records are read back with `tfds.data_source` / `grain`.
The build report (every problem met, see `report.py`) is written next to the records as `build_report.json`.
"""

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import tensorflow_datasets as tfds

from exvo_jax import runtime

from exvo_jax.data import audio as audio_lib
from exvo_jax.data import emogator as emogator_lib
from exvo_jax.data import release as release_lib
from exvo_jax.data import schema
from exvo_jax.data.report import BuildReport, CorpusError

# TFDS split names for the release's Train / Val / Test.
TFDS_SPLITS = {"Train": "train", "Val": "validation", "Test": "test"}
REPORT_FILE = "build_report.json"


class HumeVbConfig(tfds.core.BuilderConfig):
  """`feature_set` is None for raw audio, else a folder name under feats/ (e.g. 'ComParE', 'openXBOW/500')."""

  def __init__(self, *, feature_set=None, **kwargs):
    super().__init__(**kwargs)
    self.feature_set = feature_set


_FEATURE_CONFIGS = {
    "compare": "ComParE", "egemaps": "eGeMAPS", "deepspectrum": "DeepSpectrum",
    **{f"boaw{n}": f"openXBOW/{n}" for n in (125, 250, 500, 1000, 2000)},
}


def _label_features():
  return {
      "file_id": tfds.features.Text(),
      "speaker": tfds.features.Text(),
      "age": tfds.features.Scalar(dtype=np.float32),
      "country": tfds.features.Scalar(dtype=np.int32),
      "emotions": tfds.features.Tensor(shape=(len(schema.EMOTIONS),), dtype=np.float32),
      "labelled": tfds.features.Scalar(dtype=np.bool_),
      "avb_high": tfds.features.Tensor(shape=(len(schema.EMOTIONS),), dtype=np.float32),
      "avb_two": tfds.features.Tensor(shape=(len(schema.AVB_TWO),), dtype=np.float32),
      "avb_culture": tfds.features.Tensor(shape=(len(schema.AVB_CULTURE),), dtype=np.float32),
      "avb_type": tfds.features.Scalar(dtype=np.int32),
  }


def _label_values(clip):
  return {
      "file_id": clip.file_id, "speaker": clip.speaker, "age": np.float32(clip.age),
      "country": np.int32(clip.country), "emotions": clip.emotions, "labelled": clip.labelled,
      "avb_high": clip.avb_high, "avb_two": clip.avb_two, "avb_culture": clip.avb_culture,
      "avb_type": np.int32(clip.avb_type),
  }


class _ReportingBuilder(tfds.core.GeneratorBasedBuilder):
  """Adds a `strict` option and a build report shared by the splits' generators."""

  def __init__(self, *, strict=False, **kwargs):
    self.report = BuildReport(strict=strict)
    super().__init__(**kwargs)

  def _info_from_features(self, features, description):
    # DatasetInfo directly: dataset_info_from_configs looks for metadata files beside the module.
    return tfds.core.DatasetInfo(builder=self, description=description,
                                 features=tfds.features.FeaturesDict(features))


class HumeVb(_ReportingBuilder):
  """HUME-VB (ExVo 2022 + A-VB 2022 labels) from the release folder given as manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [HumeVbConfig(name="audio", description="16 kHz int16 waveforms")] + [
      HumeVbConfig(name=name, feature_set=folder, description=f"feats/{folder} functionals")
      for name, folder in _FEATURE_CONFIGS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Point manual_dir at the HUME-VB release folder (data_info.csv, wav/, feats/); "
                                  "the dataset is licensed and cannot be downloaded.")

  def _info(self):
    features = _label_features()
    if self.builder_config.feature_set is None:
      features["audio"] = tfds.features.Tensor(shape=(None,), dtype=np.int16)
    else:
      features["features"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
    return self._info_from_features(features, "HUME-VB vocal bursts with ExVo and A-VB labels.")

  def _split_generators(self, dl_manager):
    release = release_lib.read_release(dl_manager.manual_dir, report=self.report)
    features = None
    if self.builder_config.feature_set is not None:
      features = release_lib.read_feature_set(release.root, self.builder_config.feature_set, self.report)
    return {TFDS_SPLITS[s]: self._generate_examples(release.split(s), features) for s in schema.SPLITS}

  def _generate_examples(self, clips, features):
    if features is None:
      for clip, samples in audio_lib.iter_clip_audio(clips, self.report):
        yield clip.stem, {**_label_values(clip), "audio": samples}
      return
    for clip in clips:
      vector = features.get(clip.stem)
      if vector is None:
        self.report.add("missing_features", clip.audio_path, None,
                        f"no {self.builder_config.feature_set} features for File_ID {clip.file_id} "
                        f"(data_info.csv row {clip.row}); restore its CSV under feats/ or re-extract", "skipped")
        continue
      yield clip.stem, {**_label_values(clip), "features": vector}


class Emogator(_ReportingBuilder):
  """EmoGator (public, 30 categories) from its folder (mp3/, labels.csv) given as manual_dir."""

  name = "emogator"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at an EmoGator folder holding mp3/ (and labels.csv)."

  def _info(self):
    return self._info_from_features({
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        "file_id": tfds.features.Text(),
        "speaker": tfds.features.Text(),
        "category": tfds.features.Scalar(dtype=np.int32),
    }, "EmoGator vocal bursts, 30 categories.")

  def _split_generators(self, dl_manager):
    clips, _ = emogator_lib.read_emogator(dl_manager.manual_dir, report=self.report)
    return {split: self._generate_examples([c for c in clips if c.split == split])
            for split in ("train", "val")}

  def _generate_examples(self, clips):
    for clip, samples in audio_lib.iter_clip_audio(clips, self.report):
      yield clip.file_id, {"audio": samples, "file_id": clip.file_id, "speaker": clip.speaker,
                           "category": np.int32(clip.category)}


BUILDERS = {"hume_vb": HumeVb, "emogator": Emogator}


def cache_dir():
  """Where built datasets and the demo corpus live: $EXVO_CACHE, else (unset or empty) ~/.cache/exvo_jax.

  An empty value counts as unset: `EXVO_CACHE= python -m ...` would otherwise build into the current directory.
  """
  return pathlib.Path(os.environ.get("EXVO_CACHE") or pathlib.Path.home() / ".cache" / "exvo_jax")


def corpus_key(corpus_root):
  """A folder name unique to a corpus folder ('<name>-<hash of its absolute path>')."""
  root = pathlib.Path(corpus_root).resolve()
  return f"{root.name}-{hashlib.sha1(os.fspath(root).encode()).hexdigest()[:10]}"


def default_data_dir(corpus_root):
  """A TFDS data_dir per corpus folder, so two releases (or demo seeds) never share records."""
  return cache_dir() / "tfds" / corpus_key(corpus_root)


def prepare(dataset, corpus_root, *, config=None, data_dir=None, strict=False):
  """Builds (once) and returns the TFDS builder of `dataset` ('hume_vb' or 'emogator') for a corpus folder.

  Args:
    dataset: key of BUILDERS.
    corpus_root: the corpus folder (the builder's manual_dir).
    config: builder config name (hume_vb: 'audio', 'compare', 'egemaps', ...).
    data_dir: where to write array_record files; default `default_data_dir(corpus_root)`.
    strict: fail on the first reported problem instead of skipping the clip.
  Returns:
    (builder, report dict as written to build_report.json). A built dataset is reused, with its stored report.
  """
  data_dir = pathlib.Path(data_dir or default_data_dir(corpus_root))

  def build():
    builder = BUILDERS[dataset](config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                                strict=strict)
    report_path = pathlib.Path(builder.data_dir) / REPORT_FILE
    if not report_path.is_file():
      if pathlib.Path(builder.data_dir).exists():
        shutil.rmtree(builder.data_dir)  # records without a report: a build cut off before its end
      tfds.disable_progress_bar()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(corpus_root)))
      builder.report.write(report_path)  # written last: its presence marks a finished build
    return builder, report_path

  builder, report_path = runtime.process_zero_first(build, f"{dataset}/{config} records")
  with open(report_path) as f:
    report = json.load(f)
  if strict and report["num_problems"] - report["num_converted"] > 0:
    raise CorpusError(f"{report_path}: this dataset was built non-strict with {report['num_problems']} reported "
                      "problem(s); fix them, delete the folder and build again with strict")
  return builder, report


def data_source(builder, split):
  """Random-access records of one split (no TensorFlow): a sequence of dicts of numpy arrays."""
  return builder.as_data_source(split=split)
