"""Trusted reruns: every checkpointed stage records the configuration that shaped it; a rerun with another one stops
before any work naming the keys (or, asked to, trains the changed stages afresh); a stage reused from another
workdir is read only. Unit rules on hand-made records, then through main (FewShot) and the FID classifier."""

import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

import smoke
from configs import generate as generate_config
from exvo_jax import emo18_trainer
from exvo_jax import parallel
from exvo_jax import stages
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.tasks import generate


def _stage(directory, read_only=False, compare=None, **record):
  return stages.Stage("base model", str(directory), {"hidden": 32, "seed": 0, **record}, read_only=read_only,
                      compare=compare)


def _fake_checkpoint(directory):
  (pathlib.Path(directory) / "latest" / "6").mkdir(parents=True)


def test_pick_flattens_sub_configs_and_leaves_out_excluded_keys():
  config = ml_collections.ConfigDict({"seed": 3, "maml": {"inner_steps": 3, "log_every": 5, "lr": 0.01},
                                      "adapt_subset": ("lstm", "head")})
  assert stages.pick(config, ("maml", "adapt_subset", "seed"), exclude=("maml.log_every",)) == {
      "maml.inner_steps": 3, "maml.lr": 0.01, "adapt_subset": ["lstm", "head"], "seed": 3}


def test_a_stage_resumes_only_under_the_configuration_it_recorded(tmp_path):
  stages.ensure(_stage(tmp_path / "base"))
  written = json.loads((tmp_path / "base" / "stage.json").read_text())
  assert written == {"stage": "base model", "record": {"hidden": 32, "seed": 0}}
  stages.check([_stage(tmp_path / "base")])  # the same record: nothing to say
  with pytest.raises(stages.StageMismatch) as error:
    stages.check([_stage(tmp_path / "base", hidden=64, seed=1)])
  message = str(error.value)
  assert "hidden: 32 -> 64" in message and "seed: 0 -> 1" in message
  assert "--workdir" in message and "--config.restart_changed=true" in message
  with pytest.raises(stages.StageMismatch, match=r"width: '\(none\)' -> 8"):  # a key that is new counts too
    stages.check([_stage(tmp_path / "base", width=8)])
  with pytest.raises(stages.StageMismatch, match="hidden: 32 -> 64"):  # the loop checks again as it starts
    stages.ensure(_stage(tmp_path / "base", hidden=64))


def test_checkpoints_without_a_record_are_not_resumed(tmp_path):
  _fake_checkpoint(tmp_path / "old")
  with pytest.raises(stages.StageMismatch, match="without a record"):
    stages.check([_stage(tmp_path / "old")])
  stages.check([_stage(tmp_path / "new")])  # an empty folder, or none: a fresh stage


def test_restart_changed_deletes_only_changed_stages_and_never_a_read_only_one(tmp_path):
  for name in ("same", "changed", "reused"):
    stages.ensure(_stage(tmp_path / name))
    _fake_checkpoint(tmp_path / name)
  lines = []
  stages.check([_stage(tmp_path / "same"), _stage(tmp_path / "changed", hidden=8)], restart_changed=True,
               log=lines.append)
  assert not (tmp_path / "changed").exists() and (tmp_path / "same" / "latest" / "6").is_dir()
  assert "hidden: 32 -> 8" in lines[0] and "deleting" in lines[0]
  with pytest.raises(stages.StageMismatch, match="classifier.workdir"):
    stages.check([_stage(tmp_path / "reused", hidden=8, read_only=True)], restart_changed=True)
  assert (tmp_path / "reused" / "latest" / "6").is_dir()


def test_compare_limits_the_keys_compared(tmp_path):
  stages.ensure(_stage(tmp_path / "gan", **{"sample.seed": 0}))
  stages.check([_stage(tmp_path / "gan", compare=("hidden", "seed"), **{"sample.seed": 5})])
  with pytest.raises(stages.StageMismatch, match="hidden: 32 -> 16"):
    stages.check([_stage(tmp_path / "gan", compare=("hidden", "seed"), hidden=16)])


# ---------------------------------------------------------------------------------------------------------------
# Through main: FewShot's base model and its two meta-training variants.

MAML = "configs/fewshot.py:smoke,adaptation=maml"
FOMAML = "configs/fewshot.py:smoke,adaptation=fomaml"


def test_maml_then_fomaml_meta_train_separately_and_a_changed_key_stops_the_rerun(tmp_path):
  maml = smoke.run_main(MAML, tmp_path, devices=1)
  assert "meta-training (maml)" in maml.stdout
  fomaml = smoke.run_main(FOMAML, tmp_path, devices=1)
  assert "base model: resumed at step 6 of 6 (after epoch 1), finished" in fomaml.stdout
  assert "meta-training (fomaml)" in fomaml.stdout and "meta-training (fomaml): resumed" not in fomaml.stdout
  for mode in ("maml", "fomaml"):
    assert json.loads((tmp_path / "checkpoints" / mode / "stage.json").read_text())["record"]["meta"] == mode
    assert sorted(os.listdir(tmp_path / "checkpoints" / mode / "latest")) == ["2"]  # meta_steps of smoke
  assert json.loads((tmp_path / "metrics.json").read_text())["adaptation"] == "fomaml"

  # A changed meta-training key, or a changed model, stops before any work, naming the key.
  changed = smoke.run_main(MAML, tmp_path, "--config.maml.inner_steps=5", devices=1, check=False)
  assert changed.returncode == 2, changed.stdout + changed.stderr
  assert "maml.inner_steps: 3 -> 5" in changed.stderr and "fewshot on" not in changed.stdout
  wider = smoke.run_main(MAML, tmp_path, "--config.hidden=16", devices=1, check=False)
  assert wider.returncode == 2 and "hidden: 32 -> 16" in wider.stderr
  assert "meta-training (maml)" in wider.stderr  # it shapes meta-training too: both are named

  assert "--config.restart_changed=true" in changed.stderr  # the fix it names (what it deletes: the unit test above)


# ---------------------------------------------------------------------------------------------------------------
# Generate's FID classifier reused from another workdir.

def _snapshot(folder):
  """{relative path: (bytes, mtime_ns)} of every file, and the set of folders, under `folder`."""
  files, folders = {}, set()
  for path in sorted(pathlib.Path(folder).rglob("*")):
    relative = str(path.relative_to(folder))
    if path.is_dir():
      folders.add(relative)
    else:
      files[relative] = (path.read_bytes(), path.stat().st_mtime_ns)
  return files, folders


def test_a_reused_classifier_is_read_only_and_must_match(tmp_path):
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  builder, _ = builders.prepare("hume_vb", root, config="audio")
  target = emo18_trainer.make_target("hume_vb")
  splits = {s: emo18_trainer.Split.read(builders.data_source(builder, s), target) for s in ("train", "validation")}
  mesh = parallel.make_mesh(2)
  config = generate_config.get_config("smoke")
  config.classifier.max_seconds = 2.0
  owner = tmp_path / "owner"
  trained, _ = generate.train_classifier(config, splits, mesh, str(owner))
  before = _snapshot(owner)
  assert "classifier/checkpoints/base/stage.json" in before[0] and "classifier/metrics_log.jsonl" in before[0]

  config.classifier.workdir = str(owner / "classifier")
  reused, history = generate.train_classifier(config, splits, mesh, str(tmp_path / "user"))
  assert _snapshot(owner) == before and not (tmp_path / "user").exists()
  assert history and history[-1]["step"] == 6
  clips = generate.Subset(splits["validation"].source, np.arange(8))
  np.testing.assert_array_equal(reused.embed(clips)[1], trained.embed(clips)[1])

  config.classifier.num_epochs = 2  # would train it further: stops instead, and the owner is untouched
  with pytest.raises(stages.StageMismatch, match="stopped at step 6 of 12; finish it with its own run"):
    generate.train_classifier(config, splits, mesh, str(tmp_path / "user"))
  config.classifier.num_epochs, config.classifier.hidden = 1, 16  # another model: named, and untouched too
  with pytest.raises(stages.StageMismatch, match=r"FID classifier in .* another configuration:\n +hidden: 32 -> 16"):
    generate.train_classifier(config, splits, mesh, str(tmp_path / "user"))
  assert _snapshot(owner) == before and not (tmp_path / "user").exists()
