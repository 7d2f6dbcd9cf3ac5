"""TFDS builders that turn a corpus folder (their manual directory) into array_record files.

- `hume_vb`: config `audio` (int16 waveforms) and one config per pre-extracted feature set of the release
  (`compare`, `egemaps`, `deepspectrum`, `boaw125` ... `boaw2000`).
- `emogator`: the public EmoGator corpus (audio, 30 categories).

Audio is stored as `tfds.features.Tensor(shape=(None,), dtype=int16)` rather than `tfds.features.Audio` so that
neither building nor reading needs TensorFlow. The records are written by `prepare` itself (array_record shards in
parallel worker processes, one clip in memory per worker, then TFDS's dataset_info.json), never through TFDS's
shuffling writer, which spills through TensorFlow above 1 GB. Records are read back with `tfds.data_source` /
`grain`. Beside them go the build report (every problem met, see `report.py`) as `build_report.json` and, per
split, `metadata-<split>.npz`: every field but the audio, so a run's start-up never decodes audio.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time

from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import hashing as tfds_hashing
from tensorflow_datasets.core import naming

from exvo_jax import cores
from exvo_jax import runtime

from exvo_jax.data import audio as audio_lib
from exvo_jax.data import emogator as emogator_lib
from exvo_jax.data import pipeline
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
  """A builder that defines a dataset's name, version, configs and features, and reads it back.

  Writing goes through `prepare` (`_write_records`), not TFDS's `download_and_prepare`: TFDS's writer shuffles
  every example in memory up to 1 GB and then spills to disk through `tf.io.gfile`, which needs TensorFlow. A
  subclass says what to write: `split_items(manual_dir, report)` lists (key, clip, payload) per split, and
  `make_example(config_name, clip, payload, report)` (a classmethod, run in worker processes) turns one into an
  example dict, or None when the clip is reported and skipped.
  """

  def __init__(self, *, strict=False, **kwargs):
    self.report = BuildReport(strict=strict)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=self.features_dict(self.builder_config and self.builder_config.name))

  # Whether shards are written by worker processes: worth it when examples cost CPU (decoding audio), not when they
  # are payloads already in memory (feature vectors), which would be copied to every worker.
  parallel_write = True

  def _split_generators(self, dl_manager):
    raise NotImplementedError(f"build {self.name} with exvo_jax.data.builders.prepare(), which writes the records "
                              "in order without TensorFlow; download_and_prepare() would need it at full size")

  def _generate_examples(self, *args):
    raise NotImplementedError("see _split_generators")


class HumeVb(_ReportingBuilder):
  """HUME-VB (ExVo 2022 + A-VB 2022 labels) from the release folder given as manual_dir."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.1.0": "written by exvo_jax's own writer (no TensorFlow at any size), with metadata files",
                   "1.2.0": "avb_culture in the release's column order, avb_type in the organisers' alphabetical "
                            "class order"}
  BUILDER_CONFIGS = [HumeVbConfig(name="audio", description="16 kHz int16 waveforms")] + [
      HumeVbConfig(name=name, feature_set=folder, description=f"feats/{folder} functionals")
      for name, folder in _FEATURE_CONFIGS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Point manual_dir at the HUME-VB release folder (data_info.csv, wav/, feats/); "
                                  "the dataset is licensed and cannot be downloaded.")

  @property
  def parallel_write(self):
    return self.builder_config.feature_set is None

  @classmethod
  def features_dict(cls, config_name):
    features = _label_features()
    if config_name == "audio":
      features["audio"] = tfds.features.Tensor(shape=(None,), dtype=np.int16)
    else:
      features["features"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
    return tfds.features.FeaturesDict(features)

  def split_items(self, manual_dir, report):
    release = release_lib.read_release(manual_dir, report=report)
    features = None
    if self.builder_config.feature_set is not None:
      features = release_lib.read_feature_set(release.root, self.builder_config.feature_set, report)
    items = {}
    for split in schema.SPLITS:
      items[TFDS_SPLITS[split]] = [(clip.stem, clip, None if features is None else features.get(clip.stem))
                                   for clip in release.split(split)]
    return items

  @classmethod
  def make_example(cls, config_name, clip, payload, report):
    if config_name == "audio":
      samples = _load(clip, report)
      return None if samples is None else {**_label_values(clip), "audio": samples}
    if payload is None:
      report.add("missing_features", clip.audio_path, None,
                 f"no {_FEATURE_CONFIGS[config_name]} features for File_ID {clip.file_id} "
                 f"(data_info.csv row {clip.row}); restore its CSV under feats/ or re-extract", "skipped")
      return None
    return {**_label_values(clip), "features": payload}


class Emogator(_ReportingBuilder):
  """EmoGator (public, 30 categories) from its folder (mp3/, labels.csv) given as manual_dir."""

  name = "emogator"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "written by exvo_jax's own writer (no TensorFlow at any size), with metadata files"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at an EmoGator folder holding mp3/ (and labels.csv)."

  @classmethod
  def features_dict(cls, config_name):
    return tfds.features.FeaturesDict({
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        "file_id": tfds.features.Text(),
        "speaker": tfds.features.Text(),
        "category": tfds.features.Scalar(dtype=np.int32),
    })

  def split_items(self, manual_dir, report):
    clips, _ = emogator_lib.read_emogator(manual_dir, report=report)
    return {split: [(clip.file_id, clip, None) for clip in clips if clip.split == split]
            for split in ("train", "val")}

  @classmethod
  def make_example(cls, config_name, clip, payload, report):
    samples = _load(clip, report)
    if samples is None:
      return None
    return {"audio": samples, "file_id": clip.file_id, "speaker": clip.speaker, "category": np.int32(clip.category)}


def _load(clip, report):
  """The clip's int16 samples, or None when its audio is unusable (reported)."""
  for _, samples in audio_lib.iter_clip_audio([clip], report):
    return samples
  return None


BUILDERS = {"hume_vb": HumeVb, "emogator": Emogator}

# Records per array_record shard: each shard is written by one worker process, holding one clip at a time.
SHARD_RECORDS = 1024
# Below this many records a build runs in the calling process: starting workers costs more than it saves.
MIN_PARALLEL_RECORDS = 4096


def metadata_file(split):
  """The file beside a split's records holding their `pipeline.metadata_columns`."""
  return f"metadata-{split}.npz"


@dataclasses.dataclass
class _ShardJob:
  split: str
  dataset: str
  config_name: str | None
  path: str
  items: list  # (clip, payload) in record order
  strict: bool


def _write_shard(job):
  """Writes one shard of records; returns (num_records, num_bytes, problems, metadata columns).

  Runs in a worker process (or the caller's). Memory holds one clip's example at a time.
  """
  builder_cls = BUILDERS[job.dataset]
  features = builder_cls.features_dict(job.config_name)
  report = BuildReport(strict=job.strict)
  rows, num_records, num_bytes = [], 0, 0
  writer = array_record_module.ArrayRecordWriter(job.path, "group_size:1")
  try:
    for clip, payload in job.items:
      example = builder_cls.make_example(job.config_name, clip, payload, report)
      if example is None:
        continue
      data = features.serialize_example(example)
      writer.write(data)
      num_records += 1
      num_bytes += len(data)
      rows.append({key: value for key, value in example.items() if key not in pipeline.NOT_METADATA})
      if "audio" in example:  # its length, not the audio
        rows[-1]["num_samples"] = example["audio"].shape[0]
  finally:
    writer.close()
  # As arrays: a few hundred bytes a record in the parent, not a dozen Python objects.
  return num_records, num_bytes, report.problems, pipeline.metadata_columns(rows)


def _record_order(split, items):
  """`items` in the order TFDS's own writer gives records: by the md5 hash of their key salted with the split.

  Keeping TFDS's order keeps every seeded result of datasets built before this writer; it needs only the keys,
  so no example is held in memory to sort it.
  """
  hasher = tfds_hashing.Hasher(split)
  keyed = [(hasher.hash_key(key), i) for i, (key, _, _) in enumerate(items)]
  if len({k for k, _ in keyed}) != len(keyed):
    raise CorpusError(f"split {split}: two clips share a key; File_IDs must be unique")
  return [items[i] for _, i in sorted(keyed)]


def _write_records(builder, manual_dir, out_dir, *, strict, processes=None, log=print):
  """Writes every split of `builder` into `out_dir`: array_record shards, dataset_info.json and metadata files.

  Shards are written in parallel by `processes` workers (default: the machine's cores); the records of a split
  are in TFDS's key-hash order whatever the number of workers. Returns nothing; problems go to `builder.report`.
  """
  out_dir = pathlib.Path(out_dir)
  items = builder.split_items(manual_dir, builder.report)
  jobs = []
  for split, split_items in items.items():
    ordered = _record_order(split, split_items)
    for start in range(0, len(ordered), SHARD_RECORDS):
      jobs.append(_ShardJob(split, builder.name, builder.builder_config and builder.builder_config.name,
                            os.fspath(out_dir / f".{split}-{len(jobs):05d}.tmp"),
                            [(clip, payload) for _, clip, payload in ordered[start:start + SHARD_RECORDS]], strict))
  total = sum(len(job.items) for job in jobs)
  processes = min(processes or cores.usable(), len(jobs))
  if total < MIN_PARALLEL_RECORDS or not builder.parallel_write:
    processes = 1
  start_time = time.monotonic()
  results, done = [], 0

  def progress(result):
    nonlocal done
    done += result[0]
    elapsed = time.monotonic() - start_time
    if log and (len(results) % max(1, len(jobs) // 10) == 0 or len(results) == len(jobs)) and processes > 1:
      name = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
      log(f"{name}: {len(results)}/{len(jobs)} shards, {done} records, {done / max(elapsed, 1e-9):.0f} records/s")

  if processes == 1:
    for job in jobs:
      results.append(_write_shard(job))
      progress(results[-1])
  else:
    # spawn, not fork: the parent may hold JAX's threads, which a fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
      for result in pool.map(_write_shard, jobs):  # in job order: shard i of a split stays shard i
        results.append(result)
        progress(result)

  split_infos, metadata = [], {}
  for split in items:
    mine = [(job, result) for job, result in zip(jobs, results) if job.split == split]
    for _, (_, _, problems, _) in mine:
      builder.report.problems.extend(problems)
    kept = [(job, result) for job, result in mine if result[0] > 0]
    if not kept:
      raise CorpusError(f"{manual_dir}: no usable clip in split {split!r}; see the build report:\n"
                        f"{builder.report.summary()}")
    template = naming.ShardedFileTemplate(data_dir=out_dir, dataset_name=builder.name, split=split,
                                          filetype_suffix=file_adapters.FileFormat.ARRAY_RECORD.file_suffix)
    for index, (job, _) in enumerate(kept):
      os.replace(job.path, template.sharded_filepath(shard_index=index, num_shards=len(kept)))
    for job, result in mine:
      if result[0] == 0:
        os.remove(job.path)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[r[0] for _, r in kept],
                                           num_bytes=sum(r[1] for _, r in kept), filename_template=template))
    columns = {}
    for _, (_, _, _, shard_columns) in kept:
      for key, values in shard_columns.items():
        columns.setdefault(key, []).append(values)
    metadata[split] = {key: np.concatenate(parts) for key, parts in columns.items()}
  for split, columns in metadata.items():
    np.savez(out_dir / metadata_file(split), **columns)
  builder.info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD, override=True)
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(out_dir)


class Records:
  """One built split: records by index (audio decoded on access) and the split's metadata without any audio.

  `records[i]` is the TFDS record (a dict of numpy arrays). `records.metadata` is {field: [N] or [N, k] array} for
  every field but the audio or feature vector (`pipeline.NOT_METADATA`), plus `num_samples` [N] for audio
  datasets, read from the file written beside the records at build time: start-up reads ids, speakers and labels
  without touching the audio. Treat it as read-only (it is cached); `pipeline.metadata` hands out copies of the dict.
  """

  def __init__(self, source, metadata_path):
    self._source = source
    self._metadata_path = os.fspath(metadata_path)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  @functools.cached_property
  def metadata(self):
    with np.load(self._metadata_path) as data:
      columns = {key: data[key] for key in data.files}
    if any(len(v) != len(self) for v in columns.values()):
      raise CorpusError(f"{self._metadata_path}: {len(next(iter(columns.values())))} rows for {len(self)} "
                        "records; the dataset folder is inconsistent: delete it and build again")
    return columns


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


def prepare(dataset, corpus_root, *, config=None, data_dir=None, strict=False, processes=None, log=print):
  """Builds (once) and returns the TFDS builder of `dataset` ('hume_vb' or 'emogator') for a corpus folder.

  Args:
    dataset: key of BUILDERS.
    corpus_root: the corpus folder (the builder's manual_dir).
    config: builder config name (hume_vb: 'audio', 'compare', 'egemaps', ...).
    data_dir: where to write array_record files; default `default_data_dir(corpus_root)`.
    strict: fail on the first reported problem instead of skipping the clip.
    processes: worker processes writing shards (default: the machine's cores; small corpora use none).
    log: progress sink for large builds; None for silence.
  Returns:
    (builder, report dict as written to build_report.json). A built dataset is reused, with its stored report.
  """
  data_dir = pathlib.Path(data_dir or default_data_dir(corpus_root))

  def make_builder():
    return BUILDERS[dataset](config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                             strict=strict)

  def build():
    builder = make_builder()
    final = pathlib.Path(builder.data_dir)
    report_path = final / REPORT_FILE
    if not report_path.is_file():
      if final.exists():
        shutil.rmtree(final)  # records without a report: a build cut off before its end
      final.parent.mkdir(parents=True, exist_ok=True)
      # Written beside the final folder and renamed into place, report last: a cut-off build leaves no records.
      staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}-incomplete-", dir=final.parent))
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from the group
      try:
        _write_records(builder, corpus_root, staging, strict=strict, processes=processes, log=log)
        builder.report.write(staging / REPORT_FILE)
        try:
          os.replace(staging, final)
        except OSError:
          if not report_path.is_file():
            raise
          # Another run finished the same build meanwhile (a shared cache): its records are as good as ours.
      finally:
        shutil.rmtree(staging, ignore_errors=True)
      builder = make_builder()  # reads back the dataset_info.json just written
    return builder, report_path

  builder, report_path = runtime.process_zero_first(build, f"{dataset}/{config} records")
  with open(report_path) as f:
    report = json.load(f)
  if strict and report["num_problems"] - report["num_converted"] > 0:
    raise CorpusError(f"{report_path}: this dataset was built non-strict with {report['num_problems']} reported "
                      "problem(s); fix them, delete the folder and build again with strict")
  return builder, report


def data_source(builder, split):
  """One split's `Records`: random access without TensorFlow, and the metadata without reading audio."""
  return Records(builder.as_data_source(split=split), pathlib.Path(builder.data_dir) / metadata_file(split))
