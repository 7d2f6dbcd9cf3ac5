"""Every kind of bad input is reported with its file, row and fix, never crashes the build, and fails under strict."""

import csv
import pathlib

import numpy as np
import pytest
import soundfile

from exvo_jax.data import builders
from exvo_jax.data import report as report_lib
from exvo_jax.data import schema
import release_fixtures


def _release(tmp_path):
  rows = release_fixtures.make_clips()
  root = release_fixtures.write_release(tmp_path / "release", rows)
  return root, rows


def _edit_info(root, line, column, value):
  """Sets data_info.csv `column` on 1-based `line` (header = 1)."""
  path = root / "data_info.csv"
  with open(path, newline="") as f:
    table = list(csv.reader(f))
  table[line - 1][table[0].index(column)] = value
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(table)


def _build(root, tmp_path, strict=False):
  """Builds the audio config; returns (report dict, {stem: record} of all splits)."""
  return release_fixtures.build(root, tmp_path / "tfds", strict)


def _only_problem(report, kind):
  problems = [p for p in report["problems"] if p["kind"] == kind]
  assert len(problems) == 1, report["problems"]
  return problems[0]


def _assert_strict_fails(root, tmp_path, *fragments):
  with pytest.raises(report_lib.CorpusError) as error:
    _build(root, tmp_path / "strict", strict=True)
  for fragment in fragments:
    assert fragment in str(error.value)


def test_missing_required_column_names_the_file_and_the_fix(tmp_path):
  root, _ = _release(tmp_path)
  path = root / "data_info.csv"
  text = path.read_text().replace("Split", "Partition_name", 1)
  path.write_text(text)
  with pytest.raises(report_lib.CorpusError) as error:
    _build(root, tmp_path)
  message = str(error.value)
  assert "data_info.csv row 1" in message and "split" in message and "needs File_ID and Split" in message


def test_missing_optional_column_is_reported_and_the_build_goes_on(tmp_path):
  root, rows = _release(tmp_path)
  path = root / "data_info.csv"
  path.write_text(path.read_text().replace("Age", "Years_old", 1))
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "missing_column")
  assert problem["row"] == 1 and "Age is missing" in problem["message"] and problem["action"] == "repaired"
  assert len(records) == len(rows) and all(np.isnan(r["age"]) for r in records.values())
  _assert_strict_fails(root, tmp_path, "Age is missing", "strict")


def test_non_numeric_age(tmp_path):
  root, rows = _release(tmp_path)
  _edit_info(root, 3, "Age", "n/a years")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "bad_age")
  assert problem["file"].endswith("data_info.csv") and problem["row"] == 3
  assert "'n/a years'" in problem["message"] and "expected years" in problem["message"]
  assert len(records) == len(rows)  # the clip is kept, with its age unknown
  assert np.isnan(records[rows[1]["stem"]]["age"])
  _assert_strict_fails(root, tmp_path, "row 3", "n/a years")


def test_unknown_country(tmp_path):
  root, rows = _release(tmp_path)
  _edit_info(root, 2, "Country", "Atlantis")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "unknown_country")
  assert problem["row"] == 2 and "'Atlantis'" in problem["message"] and "Venezuela" in problem["message"]
  assert records[rows[0]["stem"]]["country"] == -1 and len(records) == len(rows)
  _assert_strict_fails(root, tmp_path, "Atlantis")


def test_duplicate_file_id_keeps_the_first_row(tmp_path):
  root, rows = _release(tmp_path)
  _edit_info(root, 4, "File_ID", f"[{rows[0]['stem']}]")  # row 4 now repeats row 2's id
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "duplicate_id")
  assert problem["row"] == 4 and "repeats row 2" in problem["message"] and problem["action"] == "skipped"
  assert len(records) == len(rows) - 1
  np.testing.assert_array_equal(records[rows[0]["stem"]]["audio"], rows[0]["audio"])
  _assert_strict_fails(root, tmp_path, "repeats row 2")


def test_missing_wav(tmp_path):
  root, rows = _release(tmp_path)
  (root / "wav" / f"{rows[2]['stem']}.wav").unlink()
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "missing_audio")
  assert problem["file"].endswith(f"{rows[2]['stem']}.wav") and "not found" in problem["message"]
  assert "data_info.csv row 4" in problem["message"] and problem["action"] == "skipped"
  assert rows[2]["stem"] not in records and len(records) == len(rows) - 1
  _assert_strict_fails(root, tmp_path, "not found")


def test_zero_length_wav(tmp_path):
  root, rows = _release(tmp_path)
  soundfile.write(root / "wav" / f"{rows[0]['stem']}.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "empty_audio")
  assert "zero-length" in problem["message"] and rows[0]["stem"] not in records
  _assert_strict_fails(root, tmp_path, "zero-length")


def test_zero_byte_file(tmp_path):
  root, rows = _release(tmp_path)
  (root / "wav" / f"{rows[0]['stem']}.wav").write_bytes(b"")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "empty_audio")
  assert "0 bytes" in problem["message"] and rows[0]["stem"] not in records


def test_truncated_wav(tmp_path):
  root, rows = _release(tmp_path)
  path = root / "wav" / f"{rows[1]['stem']}.wav"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "truncated_audio")
  assert "truncated" in problem["message"] and "copy it again" in problem["message"]
  assert rows[1]["stem"] not in records and len(records) == len(rows) - 1
  _assert_strict_fails(root, tmp_path, "truncated")


def test_non_audio_file(tmp_path):
  root, rows = _release(tmp_path)
  (root / "wav" / f"{rows[1]['stem']}.wav").write_text("<html>404 not found</html>")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "unreadable_audio")
  assert "not a readable audio file" in problem["message"] and rows[1]["stem"] not in records
  _assert_strict_fails(root, tmp_path, "not a readable audio file")


def test_silent_clip(tmp_path):
  root, rows = _release(tmp_path)
  soundfile.write(root / "wav" / f"{rows[3]['stem']}.wav", np.zeros(8000, np.int16), 16000, subtype="PCM_16")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "silent_audio")
  assert "silent" in problem["message"] and problem["action"] == "skipped" and rows[3]["stem"] not in records
  _assert_strict_fails(root, tmp_path, "silent")


def test_stereo_44k_file_is_converted_and_counted(tmp_path):
  root, rows = _release(tmp_path)
  t = np.arange(44100) / 44100
  stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], axis=1)
  soundfile.write(root / "wav" / f"{rows[0]['stem']}.wav", stereo, 44100, subtype="PCM_16")
  report, records = _build(root, tmp_path)
  problem = _only_problem(report, "converted")
  assert report["num_converted"] == 1 and "2 channel(s) PCM_16 at 44100 Hz" in problem["message"]
  converted = records[rows[0]["stem"]]["audio"]
  assert converted.dtype == np.int16 and converted.size == 16000  # 1 s at 16 kHz
  # Channels averaged: a 440 Hz tone at amplitude 0.4 survives resampling.
  assert abs(np.abs(converted[1000:-1000]).max() / 32768 - 0.4) < 0.01
  _, strict_records = _build(root, tmp_path / "strict", strict=True)  # a conversion is not a failure
  assert len(strict_records) == len(rows)


def test_labels_outside_unit_range_are_clipped_and_reported(tmp_path):
  root, rows = _release(tmp_path)
  _edit_info(root, 2, "Fear", "1.7")
  _edit_info(root, 3, "Awe", "-0.2")
  report, records = _build(root, tmp_path)
  problems = [p for p in report["problems"] if p["kind"] == "label_range"]
  assert [p["row"] for p in problems] == [2, 3]
  assert all("outside [0, 1]" in p["message"] and "clipped" in p["message"] for p in problems)
  assert records[rows[0]["stem"]]["emotions"][schema.EMOTIONS.index("Fear")] == 1.0
  assert records[rows[1]["stem"]]["emotions"][schema.EMOTIONS.index("Awe")] == 0.0
  _assert_strict_fails(root, tmp_path, "outside [0, 1]")


def test_report_file_lists_every_problem(tmp_path):
  root, rows = _release(tmp_path)
  _edit_info(root, 3, "Age", "old")
  (root / "wav" / f"{rows[4]['stem']}.wav").unlink()
  builder, report = builders.prepare("hume_vb", root, config="audio", data_dir=tmp_path / "tfds")
  assert {p["kind"] for p in report["problems"]} == {"bad_age", "missing_audio"}
  assert report["num_skipped"] == 1
  stored = pathlib.Path(builder.data_dir) / builders.REPORT_FILE
  assert stored.is_file() and '"bad_age"' in stored.read_text()
