"""grain pipelines over the TFDS records: shard, shuffle, repeat, crop/pad, peak-normalise, batch with masks.

A batch is a dict of numpy arrays with a leading batch axis:
  audio   [B, T] float32 in [-1, 1], peak-normalised per clip, zero after the clip's end
  length  [B] int32 samples of real audio in each row (T >= length)
  mask    [B, T] bool, True on real samples
  valid   [B] bool, False on rows that only pad the last evaluation batch
  ...     every other numeric field of the record (emotions, age, country, features, ...) stacked
  file_id, speaker: [B] str (host-side only; drop them before sending a batch to devices)
Feature-set records (no `audio`) get the same treatment minus the audio fields.

Training pipelines shuffle, repeat and drop the last partial batch. The shuffle and the random crops depend on the
seed and on a record's position in the global order only, so the global batches are the same whatever the number of
processes: with P processes, global batch k is the k-th block of P * batch_size shuffled indices and process p
reads rows [p * batch_size, (p + 1) * batch_size) of it. Evaluation pipelines read each record of the process's
shard (`shard_index::shard_count`) exactly once, in order, padding the last batch with `valid=False` rows; shards
are padded to equal length so that all processes run the same number of steps.
"""

import dataclasses

import grain
import numpy as np

STRING_FIELDS = ("file_id", "speaker")
# Batches read ahead of the consumer (by as many threads) in every pipeline.
PREFETCH_BATCHES = 8
# Below this peak (about -90 dBFS) a crop is treated as silence and left at zero instead of amplified.
PEAK_FLOOR = 3e-5


@dataclasses.dataclass(frozen=True)
class AudioOptions:
  """How clips become fixed-size rows.

  Attributes:
    clip_samples: crop/pad every clip to this many samples; None pads each batch to its longest clip (rounded up
      to `pad_multiple`, at most `max_samples`).
    max_samples: clips longer than this are cut (20 s at 16 kHz in the recipes).
    pad_multiple: batch lengths are rounded up to a multiple of this, so jit sees few distinct shapes.
    random_crop: take a random window of long clips (training) instead of their start (evaluation).
    peak_normalise: scale each clip's kept samples to a peak of 1.
  """
  clip_samples: int | None = None
  max_samples: int = 20 * 16_000
  pad_multiple: int = 1_600
  random_crop: bool = False
  peak_normalise: bool = True


def crop(audio, target, rng=None):
  """int16 or float [n] -> a window of at most `target` samples: random start when `rng` is given, else the start."""
  if audio.shape[0] <= target:
    return audio
  start = int(rng.integers(0, audio.shape[0] - target + 1)) if rng is not None else 0
  return audio[start:start + target]


def peak_normalise(audio):
  """float [n] -> audio / max|audio|; a silent (or near-silent) clip stays as it is instead of becoming NaN."""
  peak = np.max(np.abs(audio)) if audio.size else 0.0
  return audio / peak if peak > PEAK_FLOOR else audio


def prepare_audio(record, options, rng=None, augment=None):
  """One record: int16 audio -> float32 cropped (and normalised) audio plus its `length`.

  `augment(audio float32 [n], rng) -> float32 [m]` (training only) runs on the whole clip before the crop.
  """
  record = dict(record)
  target = options.clip_samples or options.max_samples
  audio = np.asarray(record["audio"])
  if augment is not None:
    audio = augment(audio.astype(np.float32) / 32768.0, rng)
    audio = crop(audio, target, rng if options.random_crop else None).astype(np.float32)
  else:
    audio = crop(audio, target, rng if options.random_crop else None)
    audio = audio.astype(np.float32) / 32768.0
  if options.peak_normalise:
    audio = peak_normalise(audio)
  record["audio"] = audio
  record["length"] = np.int32(audio.shape[0])
  return record


def as_str(value):
  """A record's text field (bytes from TFDS, or str) as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


# Record fields that are not metadata: the audio (its length is kept as `num_samples`) and feature vectors.
NOT_METADATA = ("audio", "features")


def metadata_columns(records):
  """Records (dicts) -> {field: array with a leading [N] axis}: every field but NOT_METADATA (text as str), plus
  `num_samples` when the records hold audio."""
  columns = {}
  for record in records:
    for key, value in record.items():
      if key == "audio":
        columns.setdefault("num_samples", []).append(np.shape(value)[0])
      elif key not in NOT_METADATA:
        columns.setdefault(key, []).append(value)
  return {key: np.array([as_str(v) for v in values]) if isinstance(values[0], (str, bytes))
          else np.stack([np.asarray(v) for v in values]) for key, values in columns.items()}


def metadata(source):
  """A split's `metadata_columns` without decoding audio when the source carries them.

  Built splits (`builders.Records`) keep these in a file written at build time; any other sequence of dicts
  (in-memory tables, test doubles) is read record by record.
  """
  if hasattr(source, "metadata"):
    return dict(source.metadata)  # a new dict: callers may drop keys without changing the cached one
  return metadata_columns(source[i] for i in range(len(source)))


def collate(records, *, batch_size, options=None):
  """Stacks records (None = padding row) into a batch of `batch_size` rows; see the module docstring."""
  template = next(r for r in records if r is not None)
  records = list(records) + [None] * (batch_size - len(records))
  valid = np.array([r is not None for r in records])
  batch = {"valid": valid}
  for key, value in template.items():
    if key == "audio":
      continue
    if key in STRING_FIELDS:
      batch[key] = np.array([as_str(r[key]) if r is not None else "" for r in records])
    else:
      batch[key] = np.stack([np.asarray(r[key] if r is not None else np.zeros_like(value)) for r in records])
  if "audio" in template:
    lengths = np.array([r["audio"].shape[0] if r is not None else 0 for r in records], np.int32)
    if options is not None and options.clip_samples:
      width = options.clip_samples
    else:
      multiple = options.pad_multiple if options is not None else 1
      width = max(multiple, -(-int(lengths.max()) // multiple) * multiple)
    audio = np.zeros((batch_size, width), np.float32)
    for i, r in enumerate(records):
      if r is not None:
        audio[i, :lengths[i]] = r["audio"]
    batch["audio"] = audio
    batch["length"] = lengths
    batch["mask"] = np.arange(width)[None, :] < lengths[:, None]
  return batch


def make_pipeline(source, *, batch_size, train, seed=0, num_epochs=None, audio=None, shard_index=0,
                  shard_count=1, worker_count=0, augment=None):
  """A grain dataset of batches over one split's records.

  Args:
    source: random-access records (`builders.data_source(builder, split)`, or any sequence of dicts).
    batch_size: rows per batch on this process (the global batch is batch_size * shard_count).
    train: shuffle + repeat + drop the remainder (True), or one ordered pass with padded final batch (False).
    seed: shuffling and random-crop seed (the same on every process).
    num_epochs: training epochs, None = forever.
    audio: `AudioOptions` for records with audio; ignored for feature records.
    shard_index, shard_count: this process's part of the data (multi-host); see the module docstring.
    worker_count: grain worker processes (0 = read in this process). Workers need absl flags parsed.
    augment: training-only audio augmentation, `(audio float32 [n], rng) -> float32 [m]`.
  Returns:
    A `grain.IterDataset`; `iter()` gives a checkpointable iterator (`get_state`/`set_state`).
  """
  options = audio or AudioOptions(random_crop=train)
  has_audio = len(source) > 0 and "audio" in source[0]
  if train:
    global_batch = batch_size * shard_count
    # Positions in the global shuffled order; this process keeps its rows of every global batch.
    positions = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(num_epochs)
    positions = positions.map_with_index(lambda k, index: (k, index)).batch(global_batch, drop_remainder=True)
    rows = positions.map(lambda b: (b[0][shard_index * batch_size:(shard_index + 1) * batch_size],
                                    b[1][shard_index * batch_size:(shard_index + 1) * batch_size]))

    def load(block):
      records = []
      for k, index in zip(*block):
        record = source[int(index)]
        if has_audio:  # the crop/augmentation draw depends on the global position only
          record = prepare_audio(record, options, np.random.default_rng([seed, int(k)]), augment)
        records.append(record)
      return collate(records, batch_size=batch_size, options=options)

    ds = rows.map(load)
  else:
    shard = grain.MapDataset.source(source)
    if shard_count > 1:
      shard = shard[shard_index::shard_count]
    per_shard = -(-len(source) // shard_count)  # equal step counts on every process
    padded = -(-per_shard // batch_size) * batch_size
    template = prepare_audio(source[0], options) if has_audio else source[0]
    # Padding rows are None; a batch made only of padding is collated from the template with valid=False.
    ds = grain.MapDataset.range(padded).map(lambda i: shard[i] if i < len(shard) else None)
    if has_audio:
      ds = ds.map(lambda r: prepare_audio(r, options) if r is not None else None)

    def eval_collate(rs):
      if all(r is None for r in rs):
        batch = collate([template], batch_size=batch_size, options=options)
        batch["valid"][:] = False
        return batch
      return collate(rs, batch_size=batch_size, options=options)

    ds = ds.batch(batch_size, drop_remainder=False, batch_fn=eval_collate)
  # grain's default read-ahead is 500 elements: 500 batches of 32 clips of 2.5 s is about 3 GB. A few batches keep
  # the step fed (reading a batch takes milliseconds) and bound memory by the batch size, not the split's length.
  ds = ds.to_iter_dataset(read_options=grain.ReadOptions(num_threads=min(PREFETCH_BATCHES, 16),
                                                         prefetch_buffer_size=PREFETCH_BATCHES))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds

