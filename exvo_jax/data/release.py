"""The HUME-VB release folder (ExVo 2022, with the A-VB 2022 labels when present) -> validated clip records.

Layout (docs/hume_vb.md sections 1-2):
  data_info.csv           one row per clip; columns looked up by header name, never by position
  wav/<id>.wav            16 kHz mono int16 (also accepted: audio/wav/<id>.wav, the A-VB layout)
  feats/<Set>/*.csv       pre-extracted features (also accepted: features/<Set>/), ',' or ';' CSV dialects
  labels/*_info.csv       A-VB labels (high, two, culture, type); test labels are -1

Every problem found is recorded in a `BuildReport` naming the file, the row and the fix; the row's clip is then
skipped or repaired as the entry says. Audio is validated when it is read (`audio.iter_clip_audio`), not here.
"""

import csv
import dataclasses
import math
import os
import pathlib
import re

import numpy as np

from exvo_jax.data import schema
from exvo_jax.data.report import BuildReport, CorpusError

NUM_EMOTIONS = len(schema.EMOTIONS)


@dataclasses.dataclass(slots=True)  # no per-instance dict: the release has 59,201 of them
class Clip:
  """One clip of the release with its labels.

  Attributes:
    file_id: File_ID exactly as written in data_info.csv (e.g. '[58712]'); submissions must echo it.
    stem: the id without brackets/quotes, the audio file's name without extension ('58712').
    split: 'Train', 'Val' or 'Test'.
    speaker: speaker id as a canonical string (digits of 'Speaker_12' or '12' -> '12').
    age: years, NaN when unknown (Test rows).
    country: code 0-3 in schema.COUNTRIES order, -1 when unknown.
    emotions: [10] float32 intensities in schema.EMOTIONS order, NaN when unlabelled.
    audio_path: path of the audio file.
    row: line of data_info.csv this clip came from (header = line 1).
    avb_high: [10] float32 A-VB High labels, NaN when absent or -1 (test).
    avb_two: [2] float32 valence, arousal.
    avb_culture: [40] float32, schema.AVB_CULTURE order.
    avb_type: class index in schema.AVB_TYPES, -1 when absent.
  """
  file_id: str
  stem: str
  split: str
  speaker: str
  age: float
  country: int
  emotions: np.ndarray
  audio_path: str
  row: int
  avb_high: np.ndarray = dataclasses.field(default_factory=lambda: np.full(NUM_EMOTIONS, np.nan, np.float32))
  avb_two: np.ndarray = dataclasses.field(default_factory=lambda: np.full(2, np.nan, np.float32))
  avb_culture: np.ndarray = dataclasses.field(
      default_factory=lambda: np.full(len(schema.AVB_CULTURE), np.nan, np.float32))
  avb_type: int = -1

  @property
  def labelled(self):
    """True when all ten emotion intensities are known (every Train/Val clip, the Test support clips)."""
    return bool(np.all(np.isfinite(self.emotions)))

  @property
  def is_support(self):
    """A labelled Test clip: one of the two few-shot support clips of its speaker."""
    return self.split == "Test" and self.labelled


def _key(name):
  """Header-name key: case, spaces, underscores and brackets do not matter ('File_ID' == 'file id')."""
  return re.sub(r"[^a-z0-9]", "", name.lower())


_COLUMN_ALIASES = {
    "file_id": ("fileid", "file", "id", "filename"),
    "split": ("split", "set", "partition"),
    "speaker": ("subjectid", "subject", "speakerid", "speaker"),
    "age": ("age",),
    "country": ("country", "countrycode"),
    "country_string": ("countrystring", "countryname"),
}
_COUNTRY_ALIASES = {_key(c): i for i, c in enumerate(schema.COUNTRIES)}
_COUNTRY_ALIASES.update({"usa": 2, "us": 2, "unitedstatesofamerica": 2, "southafrican": 1, "rsa": 1})


def clip_stem(file_id):
  """'[58712]', '58712.wav', "'58712.wav'" or 58712 -> '58712' (zero padding kept as written)."""
  stem = str(file_id).strip().strip("'\"").strip("[]").strip().strip("'\"")
  return os.path.splitext(os.path.basename(stem))[0] if stem.lower().endswith((".wav", ".webm", ".mp3")) else stem


def _canonical_speaker(value):
  m = re.fullmatch(r"(?:speaker|subject|spk)?[ _-]*0*(\d+)", value.strip(), flags=re.IGNORECASE)
  return m.group(1) if m else value.strip()


def _parse_float(value):
  """'' / 'nan' -> NaN; otherwise float(value); raises ValueError on text."""
  value = value.strip()
  if value == "" or value.lower() in ("nan", "na", "n/a", "none", "null"):
    return math.nan
  return float(value)


def _read_csv(path):
  """Returns (header, rows) with the delimiter detected (',' or ';' or tab); `rows` is an iterator that reads the
  file as it goes (the release's label files have 59,201 rows: holding them all as lists of strings costs more than
  the clips they describe)."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    first = f.readline()
  if not first.strip("\r\n"):
    raise CorpusError(f"{path}: file is empty; expected a header row")
  delimiter = max((";", ",", "\t"), key=first.count)
  return next(csv.reader([first], delimiter=delimiter)), _rows(path, delimiter)


def _rows(path, delimiter):
  """The rows after the header; the file is opened at the first row asked for and closed after the last."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = csv.reader(f, delimiter=delimiter)
    next(rows, None)
    yield from rows


def _find_columns(header, required, optional=()):
  """Maps logical names to column indices by header name. Missing required columns are errors."""
  keys = [_key(h) for h in header]
  found = {}
  for name in tuple(required) + tuple(optional):
    aliases = _COLUMN_ALIASES.get(name, (_key(name),))
    for alias in aliases:
      if alias in keys:
        found[name] = keys.index(alias)
        break
  return found, [name for name in required if name not in found]


@dataclasses.dataclass
class Release:
  """A validated release: its clips (bad rows already reported and skipped) and the report."""
  root: pathlib.Path
  clips: list[Clip]
  report: BuildReport
  has_avb: bool = False

  def split(self, name):
    return [c for c in self.clips if c.split == name]


def _audio_dir(root):
  for candidate in (root / "wav", root / "audio" / "wav"):
    if candidate.is_dir():
      return candidate
  return root / "wav"


def read_release(root, *, strict=False, report=None):
  """Reads and validates data_info.csv (and A-VB labels/ when present) of the release at `root`.

  Args:
    root: the release folder.
    strict: turn any reported problem into a `CorpusError`.
    report: an existing report to add to (a fresh one otherwise).
  Returns:
    A `Release`. Clips whose rows are unusable are skipped and reported; their audio is not read here.
  Raises:
    CorpusError: data_info.csv is missing or lacks File_ID/Split (nothing can be built), or strict mode.
  """
  root = pathlib.Path(root)
  report = report if report is not None else BuildReport(strict=strict)
  info_path = root / "data_info.csv"
  if not info_path.is_file():
    raise CorpusError(f"{info_path}: not found; point the config's data.root (or EXVO_DATA) at the folder "
                      "of the HUME-VB release that holds data_info.csv, wav/ and feats/")
  header, rows = _read_csv(info_path)
  columns, missing = _find_columns(header, required=("file_id", "split"),
                                   optional=("speaker", "age", "country", "country_string"))
  if missing:
    raise CorpusError(f"{info_path} row 1: required column(s) {', '.join(missing)} missing from the header "
                      f"{header}; data_info.csv needs File_ID and Split (named as in the release)")
  header_keys = [_key(h) for h in header]
  emotion_cols = {e: header_keys.index(_key(e)) for e in schema.EMOTIONS if _key(e) in header_keys}
  avb_layout = (root / "audio" / "wav").is_dir()  # the A-VB release's folders (ExVo's has wav/)
  for name, what in (("speaker", "Subject_ID"), ("age", "Age"), ("country", "Country")):
    if name not in columns:
      # Some A-VB copies of data_info.csv have no Subject_ID or Age: a fact of that layout, not a fault.
      optional_here = avb_layout and name in ("speaker", "age")
      report.add("missing_column", info_path, 1,
                 f"column {what} is missing; its values are treated as unknown for every clip "
                 + ("(this A-VB copy has none; tasks that need them need the ExVo data_info.csv)" if optional_here
                    else "(add the column from the release to use them)"), "noted" if optional_here else "repaired")
  missing_emotions = [e for e in schema.EMOTIONS if e not in emotion_cols]
  if missing_emotions:
    report.add("missing_column", info_path, 1,
               f"emotion column(s) {', '.join(missing_emotions)} missing; emotion labels are unknown for "
               "every clip (use the release's data_info.csv with all ten emotion columns)", "repaired")

  audio_dir = _audio_dir(root)
  clips, seen, listed = [], {}, set()
  for line, row in enumerate(rows, start=2):
    if not any(cell.strip() for cell in row):
      continue  # blank line
    def cell(name, row=row):
      i = columns.get(name)
      return row[i] if i is not None and i < len(row) else ""
    file_id = cell("file_id").strip()
    listed.add(clip_stem(file_id))
    split = cell("split").strip().capitalize()
    if not file_id:
      report.add("bad_row", info_path, line, "File_ID is empty; fill it in or delete the row", "skipped")
      continue
    if split not in schema.SPLITS:
      report.add("bad_row", info_path, line, f"Split is {cell('split')!r}; expected Train, Val or Test",
                 "skipped")
      continue
    stem = clip_stem(file_id)
    if stem in seen:
      report.add("duplicate_id", info_path, line,
                 f"File_ID {file_id} repeats row {seen[stem]}; the first row is kept, delete the duplicate",
                 "skipped")
      continue
    seen[stem] = line
    labelled_split = split in ("Train", "Val")

    age_text = cell("age")
    try:
      age = _parse_float(age_text)
    except ValueError:
      age = math.nan
      report.add("bad_age", info_path, line, f"Age is {age_text!r}; expected years as a number (e.g. 27.5). "
                 "The clip is kept with age unknown", "repaired")
    country = _parse_country(cell("country"), cell("country_string"), info_path, line, report,
                             required="country" in columns and labelled_split)

    emotions = np.full(NUM_EMOTIONS, np.nan, np.float32)
    bad_emotion = None
    for j, name in enumerate(schema.EMOTIONS):
      if name in emotion_cols:
        text = row[emotion_cols[name]] if emotion_cols[name] < len(row) else ""
        try:
          emotions[j] = _parse_float(text)
        except ValueError:
          bad_emotion = (name, text)
    if bad_emotion is not None:
      report.add("bad_label", info_path, line,
                 f"{bad_emotion[0]} is {bad_emotion[1]!r}; expected an intensity in [0, 1]", "skipped")
      continue
    known = np.isfinite(emotions)
    if known.any() and not known.all():
      if labelled_split:
        report.add("bad_label", info_path, line,
                   f"emotion(s) {', '.join(np.array(schema.EMOTIONS)[~known])} empty; a {split} clip needs all "
                   "ten intensities", "skipped")
        continue
      report.add("bad_label", info_path, line, "Test row has some but not all ten emotions; it is treated as "
                 "unlabelled (a support clip needs all ten)", "repaired")
      emotions[:] = np.nan
    elif labelled_split and not known.any() and not missing_emotions:
      report.add("bad_label", info_path, line, f"{split} clip has no emotion labels; fill them in from the "
                 "release", "skipped")
      continue
    if known.all() and (np.any(emotions < 0) or np.any(emotions > 1)):
      report.add("label_range", info_path, line,
                 f"emotion intensities {np.round(emotions, 3).tolist()} fall outside [0, 1]; they were clipped "
                 "to [0, 1] (check the column scale: the release stores 0-1)", "repaired")
      emotions = np.clip(emotions, 0.0, 1.0)

    speaker = _canonical_speaker(cell("speaker")) if "speaker" in columns else ""
    if "speaker" in columns and not speaker:
      report.add("bad_row", info_path, line, "Subject_ID is empty; the clip is kept with its own speaker id "
                 "(fill it in to group the speaker's clips)", "repaired")
      speaker = f"unknown-{stem}"
    clips.append(Clip(file_id=file_id, stem=stem, split=split, speaker=speaker or f"unknown-{stem}",
                      age=float(age), country=country, emotions=emotions,
                      audio_path=os.fspath(audio_dir / f"{stem}.wav"), row=line))

  has_avb = _attach_avb_labels(root, clips, listed, report)
  if not clips:
    raise CorpusError(f"{info_path}: no usable rows; see the build report:\n{report.summary()}")
  return Release(root=root, clips=clips, report=report, has_avb=has_avb)


def _parse_country(value, value_string, path, line, report, required):
  """Country as a name ('Venezuela') or a code (0-3, possibly '2.0'); -1 when empty or unknown."""
  for text in (value.strip(), value_string.strip()):
    if not text or text.lower() == "nan":
      continue
    try:
      code = float(text)
    except ValueError:
      code = None
    if code is not None:
      if code == int(code) and 0 <= int(code) < len(schema.COUNTRIES):
        return int(code)
    elif _key(text) in _COUNTRY_ALIASES:
      return _COUNTRY_ALIASES[_key(text)]
    report.add("unknown_country", path, line,
               f"Country is {text!r}; expected one of {', '.join(schema.COUNTRIES)} or a code 0-3. "
               "The clip is kept with country unknown", "repaired")
    return -1
  if required:
    report.add("unknown_country", path, line, "Country is empty; the clip is kept with country unknown",
               "repaired")
  return -1


_AVB_FILES = {
    "high": ("high_info.csv", schema.EMOTIONS),
    "two": ("two_info.csv", schema.AVB_TWO),
    "culture": ("culture_info.csv", schema.AVB_CULTURE),
    "type": ("type_info.csv", ("Voc_Type",)),
}


def _attach_avb_labels(root, clips, listed, report):
  """Reads labels/*_info.csv when present and fills the clips' A-VB fields. Returns True if any was read.

  A problem with one task's label (an unknown type, some but not all of a row's values, a missing column) leaves
  the clip out of that task only; it keeps its other labels. `listed`: the stems data_info.csv lists, so that a
  label row for a clip data_info.csv does not know is reported (one skipped there is reported there already).
  """
  labels_dir = root / "labels"
  if not labels_dir.is_dir():
    return False
  by_stem = {c.stem: c for c in clips}
  any_read = False
  for task, (filename, names) in _AVB_FILES.items():
    path = labels_dir / filename
    if not path.is_file():
      continue
    any_read = True
    header, rows = _read_csv(path)
    keys = [_key(h) for h in header]
    if "fileid" not in keys or any(_key(n) not in keys for n in names):
      missing = ["File_ID"] * ("fileid" not in keys) + [n for n in names if _key(n) not in keys]
      report.add("missing_column", path, 1, f"column(s) {', '.join(missing)} missing; the A-VB {task} labels "
                 "are not used (restore the file from the A-VB release)", "skipped")
      continue
    id_col = keys.index("fileid")
    cols = [keys.index(_key(n)) for n in names]
    for line, row in enumerate(rows, start=2):
      if not any(cell.strip() for cell in row):
        continue
      stem = clip_stem(row[id_col])
      clip = by_stem.get(stem)
      if clip is None:
        if stem not in listed:
          report.add("unknown_id", path, line, f"File_ID {row[id_col].strip()} is not in data_info.csv; its "
                     f"{task} labels are not used (use the label files and data_info.csv of one release)",
                     "skipped")
        continue  # rows of clips skipped in data_info.csv are already reported there
      values = [row[i].strip() if i < len(row) else "" for i in cols]
      if task == "type":
        name = values[0]
        if name in ("", "-1"):
          continue
        if name not in schema.AVB_TYPES:
          report.add("bad_label", path, line, f"Voc_Type is {name!r}; expected one of "
                     f"{', '.join(schema.AVB_TYPES)}. The clip is kept without a type label", "repaired")
          continue
        clip.avb_type = schema.AVB_TYPES.index(name)
        continue
      try:
        array = np.array([_parse_float(v) for v in values], np.float32)
      except ValueError:
        report.add("bad_label", path, line, f"non-numeric A-VB {task} label in {values}; the clip is kept "
                   "without these labels", "repaired")
        continue
      if np.all(array == -1):
        continue  # the A-VB convention for hidden test labels
      if np.isnan(array).any():
        if not np.isnan(array).all():
          empty = [n for n, v in zip(names, array) if np.isnan(v)]
          report.add("bad_label", path, line, f"A-VB {task} label(s) {', '.join(empty)} empty; the clip is left "
                     f"out of {task} (fill in all {len(names)} values or none)", "repaired")
        continue
      if np.any(array < 0) or np.any(array > 1):
        report.add("label_range", path, line, f"A-VB {task} labels fall outside [0, 1]; clipped to [0, 1]",
                   "repaired")
        array = np.clip(array, 0.0, 1.0)
      setattr(clip, f"avb_{task}", array)
  return any_read


# ---------------------------------------------------------------------------------------------------------------
# Pre-extracted feature sets.

FEATURE_SETS = ("ComParE", "eGeMAPS", "DeepSpectrum") + tuple(f"openXBOW/{n}" for n in (125, 250, 500, 1000, 2000))
_ID_HEADERS = {"name", "file", "filename", "fileid", "id", "frametime", "instancename", "class"}


def _is_number(text):
  try:
    float(text)
    return True
  except ValueError:
    return False


def _feature_dir(root, feature_set):
  for base in ("feats", "features"):
    candidate = pathlib.Path(root) / base / feature_set
    if candidate.is_dir():
      return candidate
  return None


def read_feature_set(root, feature_set, report):
  """Reads `feats/<Set>/` (or `features/<Set>/`) into {stem: [D] float32}.

  Both layouts in circulation are read: one CSV per clip (named after the clip) or CSVs with one row per clip whose
  first column names the clip. Separators ',' and ';' are detected, and leading non-feature columns (an id/name
  column, openSMILE's `name;frameTime`) are dropped by header name or because their values are not numbers.
  Rows that cannot be parsed, or whose width differs from the rest, are reported and left out.
  """
  directory = _feature_dir(root, feature_set)
  if directory is None:
    raise CorpusError(f"{pathlib.Path(root) / 'feats' / feature_set}: feature folder not found; the release's "
                      f"feats/ holds {', '.join(FEATURE_SETS)} (or extract the features with exvo_jax.features)")
  features, width = {}, None
  files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".csv")
  if not files:
    raise CorpusError(f"{directory}: no .csv files in the feature folder")
  for path in files:
    header, rows = _read_csv(path)
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
      report.add("bad_features", path, None, "feature file has no data rows; re-extract it", "skipped")
      continue
    lead = 0
    while lead < len(header) and (_key(header[lead]) in _ID_HEADERS or not _is_number(rows[0][lead])):
      lead += 1
    per_clip_file = len(rows) == 1
    for line, row in enumerate(rows, start=2):
      stem = path.stem if per_clip_file else clip_stem(row[0])
      try:
        vector = np.array([float(v) for v in row[lead:]], np.float32)
      except ValueError:
        report.add("bad_features", path, line, "non-numeric feature value; re-extract this clip's features",
                   "skipped")
        continue
      if width is None:
        width = vector.size
      if vector.size != width:
        report.add("bad_features", path, line, f"{vector.size} features where the set has {width}; re-extract "
                   "this clip's features", "skipped")
        continue
      features[stem] = vector
  return features
