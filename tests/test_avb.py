"""A-VB 2022: the config, a smoke run per task and model through main on the tiny demo corpus in the A-VB layout,
the release layout end to end, the floors and Table 7."""

import csv
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

import release_fixtures
import smoke
from configs import avb as avb_config
from exvo_jax import config_check
from exvo_jax import targets
from exvo_jax.data import schema
from exvo_jax.data.report import CorpusError
from exvo_jax.tasks import avb

# The organisers' submission columns, written out here (not taken from the code under test).
COLUMNS = {
    "high": ["Awe", "Excitement", "Amusement", "Awkwardness", "Fear", "Horror", "Distress", "Triumph", "Sadness",
             "Surprise"],
    "two": ["Valence", "Arousal"],
    "culture": [f"{c}_{e}" for c in ("China", "United States", "South Africa", "Venezuela")
                for e in ("Awe", "Excitement", "Amusement", "Awkwardness", "Fear", "Horror", "Distress", "Triumph",
                          "Sadness")] + [f"{c}_Surprise" for c in ("China", "United States", "South Africa",
                                                                   "Venezuela")],
    "type": ["Voc_Type"],
}
TITLES = {"high": "High", "two": "Two", "culture": "Culture", "type": "Type"}
TYPES = {"Cry", "Gasp", "Groan", "Grunt", "Laugh", "Other", "Pant", "Scream"}


def _demo_root():
  return next(pathlib.Path(os.environ["EXVO_CACHE"], "demo").glob("demo-tiny-seed0-avb"))


def _label_rows(root, task):
  with open(root / "labels" / f"{task}_info.csv", newline="") as f:
    return list(csv.DictReader(f))


def _check_submission(path, task, test_ids):
  """The organisers' format: File_ID then the task's columns, one row per Test clip, values in range."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["File_ID", *COLUMNS[task]]
  assert sorted(r[0] for r in rows[1:]) == sorted(test_ids)
  for r in rows[1:]:
    assert len(r) == 1 + len(COLUMNS[task])
    if task == "type":
      assert r[1] in TYPES
    else:
      assert all(np.isfinite(float(v)) for v in r[1:])


def test_config_variants_and_checks():
  config = avb_config.get_config()
  assert (config.tasks, config.model, config.num_seeds, config.learning_rate, config.batch_size,
          config.num_epochs, config.features.sets, config.data.demo_layout) == (
              ("high",), "mlp", 5, 1e-3, 8, 20, ("compare",), "avb")
  assert avb_config.get_config("all").tasks == ("high", "two", "culture", "type")
  assert avb_config.get_config("type,two").tasks == ("two", "type")
  e2e = avb_config.get_config("culture,model=emo18")
  assert (e2e.tasks, e2e.learning_rate, e2e.batch_size, e2e.num_epochs, e2e.hidden) == (
      ("culture",), 1e-4, 8, 30, 256)
  assert len(avb_config.get_sweep()) == 8
  with pytest.raises(ValueError, match="unknown config variant 'low'"):
    avb_config.get_config("low")
  with pytest.raises(ValueError, match="belong to model=mlp"):
    avb_config.get_config("high,model=emo18,egemaps")
  avb.check_config(avb_config.get_config("all,model=emo18"))
  bad = [("model=emo19", None, "--config.model='emo19' is not one of: mlp, emo18"),
         ("all", {"loss_weights": (1.0, 2.0)}, "loss_weights has 2 values for 4 tasks"),
         ("all,model=emo18", {"uncertainty_weighting": True}, "needs model=mlp"),
         ("high", {"tasks": ("high", "lwo")}, "'lwo' not among: high, two, culture, type"),
         ("egemaps", {"features": {"sets": ("deepspectrum",)}}, "'deepspectrum' not among: compare, egemaps, boaw")]
  bad += [("all", {"team": "my team/x"}, "A-VB-<Task>_<team>_<n>.csv"),
          ("high,uncertainty", None, "two tasks or more"),
          ("high", {"num_seeds": 0}, "train at least one seed")]
  for arg, change, message in bad:
    config = avb_config.get_config(arg)
    for key, value in (change or {}).items():
      if isinstance(value, dict):
        config[key].update(value)
      else:
        config[key] = value
    with pytest.raises(config_check.ConfigError, match=message):
      avb.check_config(config)


@pytest.mark.parametrize("task", ["high", "two", "culture", "type"])
def test_mlp_smoke_per_task_writes_metrics_and_the_organisers_submission(task, tmp_path):
  done = smoke.run_main(f"configs/avb.py:smoke,{task}", tmp_path)
  result = json.loads((tmp_path / "metrics.json").read_text())
  target = targets.get(f"avb_{task}")
  key = f"avb_{task}/{target.metric}"
  assert result["tasks"] == [task] and result["model"] == "mlp" and len(result["seeds"]) == 2
  assert np.isfinite(result["mean"][key]) and result["val_scores"][task] == result["mean"][key]
  root = _demo_root()
  test_ids = [r["File_ID"] for r in _label_rows(root, task) if r["Split"] == "Test"]
  val = [r for r in _label_rows(root, task) if r["Split"] == "Val"]
  if task == "type":  # the majority class's UAR is 1 / (classes in Val)
    assert result["floor"][key] == pytest.approx(1 / len({r["Voc_Type"] for r in val}), abs=1e-6)
  assert "test" not in result  # the demo's Test labels are -1 (hidden)
  assert result["submissions"] == [f"A-VB-{TITLES[task]}_exvo_jax_1.csv"]
  _check_submission(tmp_path / result["submissions"][0], task, test_ids)
  assert f"| {TITLES[task]} | {target.metric} |" in done.stdout
  for seed in result["seeds"]:
    smoke.validation_events(tmp_path / f"seed{seed['seed']}" / "tensorboard" / f"seed_{seed['seed']}",
                            seed["history"], key)
  assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emo18_smoke_on_the_four_tasks_jointly(tmp_path):
  """One Emo18 with an output slice per task; one submission per task; the best epoch by the mean score."""
  smoke.run_main("configs/avb.py:smoke,all,model=emo18", tmp_path, "--config.num_epochs=2")
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert result["tasks"] == ["high", "two", "culture", "type"] and result["model"] == "emo18"
  (seed,) = result["seeds"]
  history = seed["history"]
  assert [h["epoch"] for h in history] == [1, 2]
  best = max(history, key=lambda h: h["mean_score"])
  assert seed["best_epoch"] == best["epoch"]
  mains = [best["avb_high/mean_ccc"], best["avb_two/mean_ccc"], best["avb_culture/mean_ccc"], best["avb_type/uar"]]
  assert best["mean_score"] == pytest.approx(np.mean(mains))
  assert result["val_scores"] == {"high": mains[0], "two": mains[1], "culture": mains[2], "type": mains[3]}
  root = _demo_root()
  for task in COLUMNS:
    test_ids = [r["File_ID"] for r in _label_rows(root, task) if r["Split"] == "Test"]
    _check_submission(tmp_path / f"A-VB-{TITLES[task]}_exvo_jax_1.csv", task, test_ids)
  stage = json.loads((tmp_path / "checkpoints" / "base" / "stage.json").read_text())["record"]
  assert stage["tasks"] == ["high", "two", "culture", "type"] and stage["data.demo_layout"] == "avb"
  smoke.validation_events(tmp_path / "tensorboard" / "Emo18", history, "mean_score")
  assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emo18_smoke_on_one_task(tmp_path):
  smoke.run_main("configs/avb.py:smoke,type,model=emo18", tmp_path)
  result = json.loads((tmp_path / "metrics.json").read_text())
  (seed,) = result["seeds"]
  assert result["tasks"] == ["type"] and set(seed["val"]) >= {"avb_type/uar", "mean_score"}
  assert seed["val"]["mean_score"] == seed["val"]["avb_type/uar"]
  test_ids = [r["File_ID"] for r in _label_rows(_demo_root(), "type") if r["Split"] == "Test"]
  _check_submission(tmp_path / "A-VB-Type_exvo_jax_1.csv", "type", test_ids)
  smoke.validation_events(tmp_path / "tensorboard" / "Emo18", seed["history"], "avb_type/uar")


def test_the_avb_release_layout_end_to_end_with_its_shipped_features(tmp_path):
  """`:type,release` on an A-VB-layout release (audio/wav, features/ComParE in openSMILE's `;` CSV, labels/ with -1
  test rows, no Subject_ID or Age): trains on the shipped features and submits a class name for every Test clip;
  with the Test labels written out (a release after the challenge), Test is scored too."""
  rows = release_fixtures.make_clips((4, 2, 2), clips_per_speaker=6)
  root = release_fixtures.write_release(tmp_path / "avb", rows, layout="avb", drop_columns=("Subject_ID", "Age"))
  config = avb_config.get_config("smoke,type,release")
  config.data.root, config.data.tfds_dir, config.log_every_s = str(root), str(tmp_path / "tfds"), 1e9
  result = avb.run(config, str(tmp_path / "run"))
  assert result["features"] == ["compare"] and "test" not in result
  test_ids = [f"[{r['stem']}]" for r in rows if r["split"] == "Test"]
  _check_submission(tmp_path / "run" / "A-VB-Type_exvo_jax_1.csv", "type", test_ids)

  # The same release with its Test labels known: Test is scored, and the score is the submission's UAR.
  with open(root / "labels" / "type_info.csv", newline="") as f:
    table = list(csv.reader(f))
  truth = {r["stem"]: r["voc_type"] for r in rows}
  for line in table[1:]:
    line[2] = truth[line[0].strip("[]")]
  with open(root / "labels" / "type_info.csv", "w", newline="") as f:
    csv.writer(f).writerows(table)
  config.data.tfds_dir = str(tmp_path / "tfds2")
  result = avb.run(config, str(tmp_path / "run2"))
  with open(tmp_path / "run2" / "A-VB-Type_exvo_jax_1.csv", newline="") as f:
    submitted = {r["File_ID"].strip("[]"): r["Voc_Type"] for r in csv.DictReader(f)}
  stems = sorted(submitted)
  uar = balanced_accuracy_score([truth[s] for s in stems], [submitted[s] for s in stems])
  assert result["test_scores"]["type"] == pytest.approx(uar, abs=1e-6)


def test_the_floor_is_the_training_mean_and_the_majority_class():
  joint = targets.Joint([targets.get("avb_two"), targets.get("avb_type")])
  two = np.array([[0.1, 0.5], [0.3, np.nan], [0.5, 0.9], [np.nan, np.nan]], np.float32)
  voc_type = np.array([2, 2, 5, -1], np.int32)
  floor = avb.floor_predictions(joint, joint.labels_of({"avb_two": two, "avb_type": voc_type}), 3)
  assert floor.shape == (3, 10)
  np.testing.assert_allclose(floor[:, :2], [[0.3, 0.7]] * 3, rtol=1e-6)  # rows 0 and 2 only: 1 and 3 are partial
  assert (floor[:, 2:].argmax(1) == schema.AVB_TYPES.index("Groan")).all()  # class 2, the majority


def test_table7_has_a_row_per_model_with_dev_and_test_columns(tmp_path):
  def write(name, model, tasks, val, test=None):
    result = {"model": model, "tasks": tasks, "val_scores": dict(zip(tasks, val)),
              **({"features": ["compare"]} if model == "mlp" else {}),
              **({"test_scores": dict(zip(tasks, test))} if test else {})}
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps(result))
    return str(tmp_path / name)

  workdirs = [write("mlp_high", "mlp", ["high"], [0.61]), write("mlp_type", "mlp", ["type"], [0.4], [0.35]),
              write("e2e_all", "emo18", ["high", "two", "culture", "type"], [0.5, 0.45, 0.4, 0.3]),
              str(tmp_path / "unfinished")]
  lines = avb.format_table(workdirs).splitlines()
  assert lines[0] == ("| model | High dev | High test | Two dev | Two test | Culture dev | Culture test | Type dev "
                      "| Type test |")
  assert lines[2] == "| MLP on compare | 0.610 | - | - | - | - | - | 0.400 | 0.350 |"
  assert lines[3] == "| Emo18 (End2You recipe) | 0.500 | - | 0.450 | - | 0.400 | - | 0.300 | - |"
  assert lines[5] == "| organisers: End2You (Emo18) (published) | - | 0.569 | - | 0.508 | - | 0.440 | - | 0.417 |"
  assert "not finished" in lines[6] and "unfinished" in lines[6]


def test_the_table7_launch_script_runs_its_cells_and_prints_the_table(tmp_path):
  env = smoke.main_env(devices=1, env={"WORKDIR": str(tmp_path), "CELLS": "smoke,high,seeds=1 smoke,type,seeds=1"})
  done = subprocess.run(["bash", "launch/avb_table7.sh"], cwd=smoke.REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  high = json.loads((tmp_path / "smoke_high_seeds_1" / "metrics.json").read_text())["val_scores"]["high"]
  voc_type = json.loads((tmp_path / "smoke_type_seeds_1" / "metrics.json").read_text())["val_scores"]["type"]
  assert f"| MLP on egemaps | {high:.3f} | - | - | - | - | - | {voc_type:.3f} | - |" in done.stdout
  assert "| organisers: ComParE + MLP (published) | - | 0.521 | - | 0.499 | - | 0.380 | - | 0.384 |" in done.stdout


def test_a_task_whose_label_file_was_left_out_stops_before_training_and_the_others_run(tmp_path):
  """A Culture file missing columns is left out of the build (the build report says so): `:all` stops before
  training, naming the file and the fix; the other three tasks train on the same build."""
  rows = release_fixtures.make_clips((4, 2, 2), clips_per_speaker=6)
  root = release_fixtures.write_release(tmp_path / "avb", rows, layout="avb")
  path = root / "labels" / "culture_info.csv"
  with open(path, newline="") as f:
    table = list(csv.reader(f))
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([row[:-1] for row in table])  # drops Venezuela_Surprise
  config = avb_config.get_config("smoke,all,release,seeds=1")
  config.data.root, config.data.tfds_dir, config.log_every_s = str(root), str(tmp_path / "tfds"), 1e9
  with pytest.raises(CorpusError, match=r"no train clip has Culture labels \(labels/culture_info.csv"):
    avb.run(config, str(tmp_path / "all"))
  assert not (tmp_path / "all" / "seed0").exists()
  config.tasks = ("high", "two", "type")
  result = avb.run(config, str(tmp_path / "three"))
  assert set(result["val_scores"]) == {"high", "two", "type"}
  assert all(np.isfinite(v) for v in result["val_scores"].values())
