"""The A-VB 2022 release layout read end to end, and each bad A-VB label file reported with its file, row and fix.

The fixture is written in the A-VB layout: audio/wav/, features/ComParE/<id>.csv (openSMILE's `;` CSV), labels/ with
-1 on the test rows, a data_info.csv without Subject_ID and Age, and the culture header with the misspelled
`SouthAfrica_Sadness` column of one copy in circulation.
"""

import csv

import numpy as np
import pytest

from exvo_jax.data import release
from exvo_jax.data import report as report_lib
from exvo_jax.data import schema
import release_fixtures

MISSPELLED = tuple("SouthAfrica_Sadness" if c == "South Africa_Sadness" else c for c in schema.AVB_CULTURE)


def _avb_release(tmp_path):
  rows = release_fixtures.make_clips()
  root = release_fixtures.write_release(tmp_path / "avb", rows, layout="avb", drop_columns=("Subject_ID", "Age"),
                                        culture_header=MISSPELLED)
  return root, rows


def _build(root, tmp_path, strict=False):
  """Builds the audio config; returns (report dict, {stem: record} of all splits)."""
  return release_fixtures.build(root, tmp_path / "tfds", strict)


def _edit(path, line, column, value):
  """Sets `column` on 1-based `line` (header = 1) of a CSV file."""
  with open(path, newline="") as f:
    table = list(csv.reader(f))
  table[line - 1][table[0].index(column)] = value
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(table)


def _append_row(path, row):
  with open(path, "a", newline="") as f:
    csv.writer(f).writerow(row)


def _problems(report, kind):
  return [p for p in report["problems"] if p["kind"] == kind]


def test_the_avb_layout_reads_back_every_label_exactly(tmp_path):
  assert "SouthAfrica_Sadness" in MISSPELLED and "South Africa_Sadness" not in MISSPELLED
  root, rows = _avb_release(tmp_path)
  assert (root / "audio" / "wav").is_dir() and not (root / "wav").exists()
  report, records = _build(root, tmp_path)
  # Only the two columns this copy of data_info.csv lacks are reported; nothing about the labels.
  assert sorted(p["message"].split()[1] for p in report["problems"]) == ["Age", "Subject_ID"]
  assert len(records) == len(rows)
  for r in rows:
    got = records[r["stem"]]
    if r["split"] == "Test":  # -1 in every label file: hidden, so unknown
      assert np.isnan(got["avb_high"]).all() and np.isnan(got["avb_two"]).all()
      assert np.isnan(got["avb_culture"]).all() and got["avb_type"] == -1
      continue
    np.testing.assert_array_equal(got["avb_high"], r["emotions"])
    np.testing.assert_array_equal(got["avb_two"], r["valence_arousal"])
    np.testing.assert_array_equal(got["avb_culture"], r["culture"])  # the misspelled column read by name
    assert schema.AVB_TYPES[int(got["avb_type"])] == r["voc_type"]
    assert np.isnan(got["age"])
  features = release.read_feature_set(root, "ComParE", report_lib.BuildReport())
  assert sorted(features) == sorted(r["stem"] for r in rows)
  for r in rows:
    np.testing.assert_array_equal(features[r["stem"]], r["features"])


def test_a_label_row_whose_file_id_is_not_in_data_info_is_reported_and_strict_fails(tmp_path):
  root, rows = _avb_release(tmp_path)
  _append_row(root / "labels" / "two_info.csv", ["[99999]", "Train", "0.5", "0.5"])
  report, records = _build(root, tmp_path)
  (problem,) = _problems(report, "unknown_id")
  assert problem["file"].endswith("labels/two_info.csv") and problem["row"] == len(rows) + 2
  assert "[99999]" in problem["message"] and "data_info.csv" in problem["message"]
  assert "99999" not in records and len(records) == len(rows)
  with pytest.raises(report_lib.CorpusError, match="99999"):
    _build(root, tmp_path / "strict", strict=True)


def test_a_type_outside_the_eight_names_leaves_the_clip_out_of_type_only(tmp_path):
  root, rows = _avb_release(tmp_path)
  _edit(root / "labels" / "type_info.csv", 2, "Voc_Type", "Sigh")
  report, records = _build(root, tmp_path)
  (problem,) = _problems(report, "bad_label")
  assert problem["file"].endswith("labels/type_info.csv") and problem["row"] == 2
  assert "'Sigh'" in problem["message"] and "Cry, Gasp, Groan" in problem["message"]
  got = records[rows[0]["stem"]]
  assert got["avb_type"] == -1
  np.testing.assert_array_equal(got["avb_two"], rows[0]["valence_arousal"])  # still serves the other tasks
  np.testing.assert_array_equal(got["avb_high"], rows[0]["emotions"])
  with pytest.raises(report_lib.CorpusError, match="Sigh"):
    _build(root, tmp_path / "strict", strict=True)


def test_a_culture_file_missing_columns_names_them_and_the_other_tasks_are_kept(tmp_path):
  root, rows = _avb_release(tmp_path)
  path = root / "labels" / "culture_info.csv"
  with open(path, newline="") as f:
    table = list(csv.reader(f))
  dropped = {table[0].index("Venezuela_Fear"), table[0].index("China_Surprise")}
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([[c for i, c in enumerate(row) if i not in dropped] for row in table])
  report, records = _build(root, tmp_path)
  (problem,) = [p for p in _problems(report, "missing_column") if p["file"].endswith("culture_info.csv")]
  assert "Venezuela_Fear" in problem["message"] and "China_Surprise" in problem["message"]
  assert "restore" in problem["message"]
  for r in rows:
    got = records[r["stem"]]
    assert np.isnan(got["avb_culture"]).all()
    if r["split"] != "Test":
      np.testing.assert_array_equal(got["avb_two"], r["valence_arousal"])
  with pytest.raises(report_lib.CorpusError, match="Venezuela_Fear"):
    _build(root, tmp_path / "strict", strict=True)


def test_a_row_with_some_but_not_all_of_a_tasks_labels_leaves_the_clip_out_of_that_task(tmp_path):
  root, rows = _avb_release(tmp_path)
  _edit(root / "labels" / "two_info.csv", 3, "Arousal", "")
  _edit(root / "labels" / "culture_info.csv", 4, "China_Awe", "")
  report, records = _build(root, tmp_path)
  problems = _problems(report, "bad_label")
  assert [(p["file"].split("/")[-1], p["row"]) for p in problems] == [("two_info.csv", 3), ("culture_info.csv", 4)]
  assert "Arousal" in problems[0]["message"] and "China_Awe" in problems[1]["message"]
  assert np.isnan(records[rows[1]["stem"]]["avb_two"]).all()
  assert np.isnan(records[rows[2]["stem"]]["avb_culture"]).all()
  np.testing.assert_array_equal(records[rows[1]["stem"]]["avb_culture"], rows[1]["culture"])
  np.testing.assert_array_equal(records[rows[2]["stem"]]["avb_two"], rows[2]["valence_arousal"])
  with pytest.raises(report_lib.CorpusError, match="Arousal"):
    _build(root, tmp_path / "strict", strict=True)
