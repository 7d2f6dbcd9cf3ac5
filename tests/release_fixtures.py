"""Small hand-written HUME-VB release folders in each layout variant found in circulation (for tests)."""

import csv
import pathlib

import numpy as np
import soundfile

from exvo_jax.data import builders
from exvo_jax.data import schema


def make_clips(num_speakers_per_split=(2, 1, 1), clips_per_speaker=3, seed=0):
  """Returns a list of row dicts (with int16 audio) covering Train/Val/Test with two support clips per Test speaker."""
  rng = np.random.default_rng(seed)
  rows, next_id, next_speaker = [], 41000, 1
  for split, num_speakers in zip(schema.SPLITS, num_speakers_per_split):
    for _ in range(num_speakers):
      speaker, next_speaker = next_speaker, next_speaker + 1
      age = float(rng.integers(40, 80)) / 2
      country = int(rng.integers(0, len(schema.COUNTRIES)))
      for k in range(clips_per_speaker):
        emotions = np.round(rng.uniform(0, 0.9, len(schema.EMOTIONS)), 4).astype(np.float32)
        emotions[rng.integers(len(schema.EMOTIONS))] = 1.0
        labelled = split != "Test" or k < 2
        audio = rng.integers(-20000, 20000, size=int(rng.integers(1600, 8000)), dtype=np.int16)
        rows.append({
            "stem": f"{next_id:05d}", "split": split, "speaker": speaker, "age": age, "country": country,
            "emotions": emotions if labelled else np.full(len(schema.EMOTIONS), np.nan, np.float32),
            "audio": audio,
            "valence_arousal": np.round(rng.uniform(0, 1, 2), 4).astype(np.float32),
            "culture": np.round(rng.uniform(0, 1, len(schema.AVB_CULTURE)), 4).astype(np.float32),
            "voc_type": schema.AVB_TYPES[int(rng.integers(len(schema.AVB_TYPES)))],
            "features": rng.normal(size=7).astype(np.float32),
        })
        next_id += 1
  return rows


def _fmt(x):
  return "" if not np.isfinite(x) else repr(float(x))


def write_release(root, rows, *, brackets=True, country_as="name", speaker_prefix=True, feature_dialect=",",
                  feature_layout="per_clip", avb=True, column_order=None, layout="exvo", drop_columns=(),
                  culture_header=None):
  """Writes data_info.csv, wav/, feats/ComParE and (optionally) labels/ for `rows` into `root`.

  layout='avb' writes the A-VB release's folders instead: audio/wav/, features/ComParE/<id>.csv (openSMILE's `;`
  CSV, one file per clip). `drop_columns` leaves columns out of data_info.csv (an A-VB copy without Subject_ID and
  Age); `culture_header` replaces culture_info.csv's 40 column names (the misspelled copy in circulation).
  """
  root = pathlib.Path(root)
  audio_dir = root / ("audio/wav" if layout == "avb" else "wav")
  audio_dir.mkdir(parents=True, exist_ok=True)
  if layout == "avb":
    feature_dialect, feature_layout = ";", "per_clip"
  header = [h for h in ("File_ID", "Subject_ID", "Split", "Age", "Country") if h not in drop_columns]
  if country_as == "code":
    header.append("Country_string")
  header += list(schema.EMOTIONS)
  if column_order == "reversed":
    header = header[::-1]
  with open(root / "data_info.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for r in rows:
      values = {
          "File_ID": f"[{r['stem']}]" if brackets else r["stem"],
          "Subject_ID": f"Speaker_{r['speaker']}" if speaker_prefix else str(r["speaker"]),
          "Split": r["split"],
          "Age": repr(r["age"]),
          "Country": schema.COUNTRIES[r["country"]] if country_as == "name" else str(r["country"]),
          "Country_string": schema.COUNTRIES[r["country"]],
          **{e: _fmt(v) for e, v in zip(schema.EMOTIONS, r["emotions"])},
      }
      writer.writerow([values[h] for h in header])
  for r in rows:
    soundfile.write(audio_dir / f"{r['stem']}.wav", r["audio"], schema.SAMPLE_RATE, subtype="PCM_16")
  _write_features(root / ("features" if layout == "avb" else "feats") / "ComParE", rows, feature_dialect,
                  feature_layout)
  if avb:
    _write_avb(root / "labels", rows, brackets, culture_header or schema.AVB_CULTURE)
  return root


def _write_features(folder, rows, dialect, layout):
  folder.mkdir(parents=True, exist_ok=True)
  names = [f"f{i}" for i in range(rows[0]["features"].size)]
  lead = ["name", "frameTime"] if dialect == ";" else ["name"]

  def line(r):
    ident = [f"'{r['stem']}.wav'", "0.000000"] if dialect == ";" else [r["stem"]]
    return ident + [repr(float(v)) for v in r["features"]]

  if layout == "per_clip":
    for r in rows:
      with open(folder / f"{r['stem']}.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=dialect)
        writer.writerow(lead + names)
        writer.writerow(line(r))
  else:
    with open(folder / "all.csv", "w", newline="") as f:
      writer = csv.writer(f, delimiter=dialect)
      writer.writerow(lead + names)
      for r in rows:
        writer.writerow(line(r))


def _write_avb(folder, rows, brackets, culture_header):
  folder.mkdir(parents=True, exist_ok=True)

  def write(name, columns, values_of):
    with open(folder / name, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["File_ID", "Split"] + list(columns))
      for r in rows:
        hidden = r["split"] == "Test"
        values = ["-1"] * len(columns) if hidden else [str(v) for v in values_of(r)]
        writer.writerow([f"[{r['stem']}]" if brackets else r["stem"], r["split"]] + values)

  write("high_info.csv", schema.EMOTIONS, lambda r: [repr(float(v)) for v in r["emotions"]])
  write("two_info.csv", schema.AVB_TWO, lambda r: [repr(float(v)) for v in r["valence_arousal"]])
  write("culture_info.csv", culture_header, lambda r: [repr(float(v)) for v in r["culture"]])
  write("type_info.csv", ("Voc_Type",), lambda r: [r["voc_type"]])


def build(root, data_dir, strict=False):
  """Builds the audio config of the release at `root`; returns (report dict, {stem: record} of all splits)."""
  builder, report = builders.prepare("hume_vb", root, config="audio", data_dir=data_dir, strict=strict)
  records = {}
  for split in builders.TFDS_SPLITS.values():
    for r in builders.data_source(builder, split):
      records[r["file_id"].decode().strip("[]")] = r
  return report, records
