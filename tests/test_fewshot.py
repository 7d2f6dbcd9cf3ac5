"""The FewShot task: support/query sets, the Table 4 variants, episodes by speaker, and the end-to-end runs."""

import csv
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import scipy.stats

import smoke
from configs import fewshot as fewshot_config
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import meta_trainer
from exvo_jax import personaliser
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import schema
from exvo_jax.tasks import fewshot

SMOKE = "configs/fewshot.py:smoke"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The uninterrupted smoke run through main: (workdir, its stdout)."""
  workdir = tmp_path_factory.mktemp("fewshot_smoke")
  return workdir, smoke.run_main(SMOKE, workdir).stdout

def test_support_and_query_sets():
  target = emo18_trainer.make_target("hume_vb")
  records = [{"audio": np.ones(10, np.int16), "file_id": f"[{i}]", "speaker": str(i // 4),
              "emotions": np.zeros(10, np.float32) if i % 4 < 2 else np.full(10, np.nan, np.float32),
              "labelled": i % 4 < 2} for i in range(8)]
  test = emo18_trainer.Split.read(records, target)
  episodes = fewshot.support_query(test, num_support=2, seed=0)
  assert {s: (sup.tolist(), q.tolist()) for s, (sup, q) in episodes.items()} == {"0": ([0, 1], [2, 3]),
                                                                                 "1": ([4, 5], [6, 7])}
  for r in records:
    r["labelled"], r["emotions"] = True, np.zeros(10, np.float32)
  val = emo18_trainer.Split.read(records, target)
  a = fewshot.support_query(val, num_support=2, seed=3)
  assert {s: e[0].tolist() for s, e in a.items()} == {s: e[0].tolist()
                                                      for s, e in fewshot.support_query(val, num_support=2,
                                                                                        seed=3).items()}
  for support, query in a.values():
    assert len(support) == 2 and len(query) == 2 and not set(support) & set(query)


def test_table4_variants():
  assert fewshot_config.get_config().hidden == 256
  assert fewshot_config.get_config().adaptation == "speaker_bn+embedding_norm"  # the measured default
  assert fewshot_config.get_config("model=ssl").adaptation == "embedding_norm"  # no BatchNorm in the speech model
  assert fewshot_config.get_config("hidden=64").hidden == 64
  assert fewshot_config.get_config("adaptation=maml").adaptation == "maml"
  config = fewshot_config.get_config()
  assert (config.learning_rate, config.batch_size, config.max_seconds, config.adapt_subset) == \
      (1e-4, 8, 20.0, ("lstm", "head"))
  assert len(fewshot_config.get_sweep()) == 12


def test_smoke_end_to_end_writes_metrics_and_submission(smoke_run):
  tmp_path, stdout = smoke_run
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert set(result["results"]) == {"none", "speaker_bn+embedding_norm"}
  for scores in result["results"].values():
    assert set(scores) == {*schema.EMOTIONS, "mean_ccc"} and all(np.isfinite(v) for v in scores.values())
  assert "| none |" in stdout and "| speaker_bn+embedding_norm |" in stdout and "Awe" in stdout
  corpus = pathlib.Path(os.environ["EXVO_CACHE"], "demo", "demo-tiny-seed0")
  with open(corpus / "data_info.csv") as f:
    test_rows = [r for r in csv.DictReader(f) if r["Split"] == "Test"]
  query_ids = {r["File_ID"] for r in test_rows if r["Awe"] == ""}
  with open(tmp_path / result["submission"]) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["File_ID", *schema.EMOTIONS]
  assert {r[0] for r in rows[1:]} == query_ids and len(rows) - 1 == len(query_ids)
  assert all(np.isfinite([float(v) for v in r[1:]]).all() for r in rows[1:])
  smoke.validation_events(tmp_path / "tensorboard" / "base_model", result["base"]["history"], "mean_ccc")
  for name in ("training_curves.png", "per_emotion_ccc.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_sigterm_during_a_prediction_pass_exits_0_and_the_rerun_ends_like_an_uninterrupted_run(smoke_run, tmp_path):
  """The smoke run's trained base model copied to a new workdir, SIGTERM as the first prediction pass starts: exit 0
  saying preempted, nothing written; the rerun writes exactly what the uninterrupted run wrote."""
  reference, _ = smoke_run
  shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
  stopped = smoke.run_main(SMOKE, tmp_path, sigterm_at=("exvo_jax.emo18_trainer:predict_split", 1))
  assert "base model: resumed at step 6 of 6 (after epoch 1), finished" in stopped.stdout
  assert "preempted: prediction pass stopped at batch 1" in stopped.stdout, stopped.stdout[-2000:]
  assert not (tmp_path / "metrics.json").exists()
  smoke.run_main(SMOKE, tmp_path)
  result, expected = (json.loads((w / "metrics.json").read_text()) for w in (tmp_path, reference))
  assert result["results"] == expected["results"] and result["num_query_clips"] == expected["num_query_clips"]
  assert (tmp_path / result["submission"]).read_bytes() == (reference / expected["submission"]).read_bytes()


def test_finetune_lowers_the_query_loss_of_most_speakers_on_the_demo_corpus(tmp_path):
  """Demo speakers carry personal label biases, so 2 support clips help. Tested per speaker rather than against a
  margin read off one run: the fine-tuned model's query MSE is below the unadapted one's for more of the 20 Val
  speakers than chance would give (one-sided sign test, p < 0.05, scipy's binomtest), on the very same clips and
  base model (default demo corpus, a shortened base training). Measured: 19 of 20 speakers.

  MAML is not in this test: at budgets a test can afford its gain is not robust (30 meta-steps from this base model
  won for 17 of 20 speakers in one process environment and 12 of 20 under pytest's 8 virtual devices, whose base
  model differs in the last bits; 15 meta-steps: 13 and 8 of 20). Its steps are tested for resume, NaN, 2 processes
  and second-order gradients elsewhere; whether it helps is issue 20's question."""
  config = fewshot_config.get_config("adaptation=finetune,epochs=2")
  config.log_every_s = 1e9
  config.num_devices = 1  # 8 virtual devices on 2 cores only add overhead; the 8-device step is tested above
  result = fewshot.run(config, str(tmp_path))
  none, adapted = result["per_speaker_loss"]["none"], result["per_speaker_loss"]["finetune"]
  wins = sum(adapted[s] < none[s] for s in none)
  p_value = scipy.stats.binomtest(wins, len(none), 0.5, alternative="greater").pvalue
  print(f"finetune: lower query loss for {wins} of {len(none)} speakers (p = {p_value:.4f}); mean CCC "
        f"{result['results']['none']['mean_ccc']:.3f} -> {result['results']['finetune']['mean_ccc']:.3f}")
  assert len(none) == 20 and p_value < 0.05, wins


def test_speaker_norm_plus_finetune_adapts_the_read_out_on_the_normalised_support_clips():
  """Two speakers of hand-made embeddings. speaker_norm z-scores each speaker's embeddings over all of its clips and
  applies the read-out; +finetune first takes k plain gradient steps of the mean squared error on that speaker's
  normalised support clips (gradients written out by hand below), restarting from the read-out for each speaker."""
  rng = np.random.default_rng(0)
  speakers = np.array(["A"] * 5 + ["B"] * 5)
  embeddings = (rng.normal(size=(10, 3)) * [1.0, 2.0, 0.5] + np.where(speakers[:, None] == "A", 3.0, -1.0))
  embeddings = embeddings.astype(np.float32)
  labels = rng.uniform(0, 1, (10, 10)).astype(np.float32)
  split = emo18_trainer.Split(None, np.array([f"c{i}" for i in range(10)]), speakers, labels, np.ones(10, bool))
  episodes = {"A": (np.array([0, 1]), np.array([2, 3, 4])), "B": (np.array([5, 6]), np.array([7, 8, 9]))}
  read_out = {"kernel": rng.normal(size=(3, 10)).astype(np.float32), "bias": rng.normal(size=10).astype(np.float32)}
  target = emo18_trainer.make_target("hume_vb")
  config = fewshot_config.get_config("smoke")
  config.finetune.steps, config.finetune.learning_rate, config.finetune.anchor_weight = 3, 0.1, 0.0
  class GivenReadOut(personaliser.Personaliser):
    def read_out(self, config, per_speaker):
      assert per_speaker
      return read_out

  adapter = GivenReadOut(None, target, None, split, None, embeddings, None, None)
  for mode, steps in (("speaker_norm", 0), ("speaker_norm+finetune", 3)):
    predictions = adapter.predict(config, mode, episodes)
    assert sorted(predictions) == [2, 3, 4, 7, 8, 9]
    for support, query in episodes.values():
      rows = np.concatenate([support, query])
      x = embeddings[rows].astype(np.float64)
      z = (x - x.mean(0)) / x.std(0)
      z_support, z_query, y = z[:2], z[2:], labels[support].astype(np.float64)
      kernel, bias = read_out["kernel"].astype(np.float64), read_out["bias"].astype(np.float64)
      losses = []
      for _ in range(steps):  # d/dW mean((zW + b - y)^2) = 2 z^T e / e.size, d/db = 2 sum_rows(e) / e.size
        error = z_support @ kernel + bias - y
        losses.append(np.mean(error ** 2))
        kernel, bias = kernel - 0.1 * 2 * z_support.T @ error / error.size, bias - 0.1 * 2 * error.sum(0) / error.size
      assert losses == sorted(losses, reverse=True)  # each step lowers the support loss
      for i, row in enumerate(query):
        np.testing.assert_allclose(predictions[row], z_query[i] @ kernel + bias, atol=1e-4, err_msg=(mode, row))


def test_rows_by_speaker_matches_a_scan_per_speaker():
  rng = np.random.default_rng(0)
  speakers = np.array([f"Speaker_{i}" for i in rng.integers(0, 40, 1500)])
  keep = rng.random(1500) > 0.3
  for mask in (None, keep):
    got = meta_trainer.rows_by_speaker(speakers, mask)
    selected = np.ones(1500, bool) if mask is None else mask
    expected = {s: np.flatnonzero((speakers == s) & selected) for s in set(speakers[selected])}
    assert got.keys() == expected.keys()
    for s in expected:
      np.testing.assert_array_equal(got[s], expected[s])


def test_episodes_with_other_class_queries_never_query_a_support_class():
  # Speakers s0..s3: classes 0..5, two clips each; s4: 8 clips, 6 of them class 0, so 2 support clips of class 0
  # and 1 leave only 1 clip of another class: never drawn for 4 queries.
  speakers = np.concatenate([np.repeat([f"s{i}" for i in range(4)], 12), np.repeat(["s4"], 8)])
  labels = np.concatenate([np.tile(np.arange(6).repeat(2), 4), [0, 0, 0, 0, 0, 0, 1, 2]])
  split = emo18_trainer.Split(None, np.arange(56).astype(str), speakers, labels, np.ones(56, bool))
  classes = labels
  rng = np.random.default_rng(0)
  episodes = meta_trainer.sample_episodes(split, rng, num_episodes=200, num_support=2, num_query=4, classes=classes)
  assert episodes.shape == (200, 6)
  for row in episodes:
    assert len(set(speakers[row])) == 1 and len(set(row)) == 6 and speakers[row[0]] != "s4"
    assert not set(classes[row[2:]]) & set(classes[row[:2]])
  plain = meta_trainer.sample_episodes(split, rng, num_episodes=200, num_support=2, num_query=4)
  assert any(set(classes[row[2:]]) & set(classes[row[:2]]) for row in plain)  # without it they do overlap
  assert "s4" in set(speakers[plain[:, 0]])  # without classes it is eligible
  with pytest.raises(ValueError, match="with 9 outside any 2 support clips' classes"):
    meta_trainer.sample_episodes(split, rng, num_episodes=4, num_support=2, num_query=9, classes=classes)


def test_comparison_rows_take_their_own_settings_and_typos_fail_before_any_work():
  config = fewshot_config.get_config("smoke")
  mode, row = fewshot.parse_row(config, "finetune[adapt_subset=encoder/MaskedBatchNorm+head/bias,"
                                        "finetune.anchor_weight=0.5,finetune.steps=7]")
  assert mode == "finetune" and row.adaptation == "finetune"
  assert row.adapt_subset == ("encoder/MaskedBatchNorm", "head/bias")
  assert (row.finetune.anchor_weight, row.finetune.steps) == (0.5, 7) and isinstance(row.finetune.steps, int)
  assert config.finetune.steps == 5 and config.adapt_subset == ("lstm", "head")  # the run's own config untouched
  _, row = fewshot.parse_row(config, "maml[maml.query_other_classes=True]")
  assert row.maml.query_other_classes is True
  for bad, message in (("finetune[finetune.stepz=3]", "no config key 'finetune.stepz'"),
                       ("finetun", "adaptation 'finetun' is not one of"),
                       ("finetune[finetune.steps=many]", "takes an integer"),
                       ("finetune[finetune.learning_rate=fast]", "takes a number"),
                       ("maml[maml.query_other_classes=yes]", "takes True or False"),
                       ("finetune[finetune=3]", "not a setting a row can change"),
                       ("none[hidden=64]", "'hidden' is not a setting a row can change"),  # shapes the base model
                       ("finetune[num_support=4]", "'num_support' is not a setting a row can change"),  # the draws
                       ("finetune[finetune.steps]", "'finetune.steps' is not key=value"),
                       ("finetune[finetune.steps=2.0]", "finetune.steps takes an integer"),
                       ("finetune[adapt_subset=lstm_9]", "'lstm_9' names no parameter of the emo18 model")):
    config.compare = (bad,)
    with pytest.raises(config_check.ConfigError, match=re.escape(message)):
      fewshot.check_config(config)
  config.compare = fewshot_config.get_config("compare").compare
  fewshot.check_config(config)  # every default row is valid


def test_adaptations_that_do_not_apply_are_refused_before_any_work():
  config = fewshot_config.get_config("smoke,emogator,adaptation=support_bias")
  with pytest.raises(config_check.ConfigError, match="target is a classification"):
    fewshot.check_config(config)
  config = fewshot_config.get_config("smoke,model=ssl,adaptation=speaker_bn")
  with pytest.raises(config_check.ConfigError, match="the ssl model has no BatchNorm"):
    fewshot.check_config(config)
  config = fewshot_config.get_config("smoke,model=ssl,adaptation=embedding_norm")
  config.ssl.chain = True
  with pytest.raises(config_check.ConfigError, match="the head is a chain"):
    fewshot.check_config(config)
  for arg in ("compare,emogator", "compare,model=ssl", "compare,model=ssl,emogator"):
    fewshot.check_config(fewshot_config.get_config(arg))  # the comparison's rows are those that apply


def test_the_comparison_through_main_keeps_its_finished_rows_across_sigterm(smoke_run, tmp_path):
  """The comparison from the smoke run's base model, 2 support draws: SIGTERM in the third row exits 0 with the
  finished rows kept; the rerun takes them, meta-trains nothing again, and ends with the uninterrupted run's table."""
  reference, _ = smoke_run
  flags = ("--config.compare=('maml[maml.query_other_classes=True]','speaker_bn','refit','support_bias')",
           "--config.support_draws=2")
  for name in ("whole", "stopped"):
    (tmp_path / name).mkdir()
    shutil.copytree(reference / "checkpoints" / "base", tmp_path / name / "checkpoints" / "base")
  whole = smoke.run_main(SMOKE, tmp_path / "whole", *flags, devices=1)
  # score_draw calls: none 1-2, maml 3-4, speaker_bn 5 (its second draw reuses its per-speaker pass), refit stops.
  stopped = smoke.run_main(SMOKE, tmp_path / "stopped", *flags, devices=1,
                           sigterm_at=("exvo_jax.evaluation.personalisation:score_draw", 5))
  assert "preempted" in stopped.stdout and not (tmp_path / "stopped" / "metrics.json").exists(), stopped.stdout[-2000:]
  assert len(list((tmp_path / "stopped" / "comparison").glob("*.json"))) == 3
  rerun = smoke.run_main(SMOKE, tmp_path / "stopped", *flags, devices=1)
  for row in ("none", "maml[maml.query_other_classes=True]", "speaker_bn"):
    assert f"comparison: {row}: kept from" in rerun.stdout
  assert "meta-training" not in rerun.stdout  # the kept MAML row needs no meta-learned model
  got, expected = (json.loads((tmp_path / d / "metrics.json").read_text())["comparison"] for d in ("stopped", "whole"))
  assert got == expected
  rows = expected["rows"]
  assert list(rows) == ["none", "maml[maml.query_other_classes=True]", "speaker_bn", "refit", "support_bias",
                        "speaker_bn+embedding_norm"]  # no adaptation first, the run's own adaptation last
  assert expected["seeds"] == [0, 1] and all(len(r["draws"]) == 2 for r in rows.values())
  assert rows["none"]["gain"] == 0 and rows["none"]["unchanged"] == 2 * 3  # 3 Val speakers of the tiny corpus
  for r in rows.values():
    assert r["helped"] + r["hurt"] + r["unchanged"] == 6 and np.isfinite(r["mean"])
  table = (tmp_path / "whole" / "comparison.md").read_text()
  assert "| speaker_bn |" in table and "helped / hurt / unchanged (of 6)" in table
  assert "| adaptation | Awe |" in table  # the per-emotion means, Table 4's columns
  assert "validation: 3 speakers" in whole.stdout


def test_predict_applies_the_base_model_to_new_files_like_the_task(smoke_run, tmp_path):
  """`predict` (with a chart per file) on the smoke run over every Val clip copied as 16 kHz wav, plus a 44.1 kHz
  stereo wav, an mp3, an empty file and a text file: every decodable file predicted, the bad ones reported; the
  predictions of the Val query clips score what the task scored for no adaptation (metrics.json), emotion by
  emotion."""
  workdir, _ = smoke_run
  config = fewshot_config.get_config("smoke")
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  builder, _ = builders.prepare("hume_vb", root, config="audio")
  target = emo18_trainer.make_target("hume_vb")
  val = emo18_trainer.Split.read(builders.data_source(builder, "validation"), target)
  copies = smoke.mixed_audio_folder(tmp_path / "audio", root, list(val.file_id))
  done = smoke.run_main("configs/predict.py:charts", workdir, f"--config.audio={tmp_path / 'audio'}",
                        f"--config.output={tmp_path / 'out'}")
  header, rows, skipped = smoke.read_predictions(tmp_path / "out")
  smoke.check_mixed_predictions(done, header, rows, skipped, copies, list(schema.EMOTIONS))
  episodes = fewshot.support_query(val, num_support=config.num_support, seed=config.support_seed)
  query = np.concatenate([q for _, q in episodes.values()])
  by_id = {file_id: name for name, file_id in copies.items()}
  predicted = np.array([[float(rows[by_id[val.file_id[i]]][e]) for e in schema.EMOTIONS] for i in query])
  scored = json.loads((workdir / "metrics.json").read_text())["results"]["none"]
  ccc = [_ccc(predicted[:, k], val.labels[query, k]) for k in range(len(schema.EMOTIONS))]
  np.testing.assert_allclose(ccc, [scored[e] for e in schema.EMOTIONS], atol=2e-5)
  charts = sorted(p.name for p in (tmp_path / "out" / "charts").glob("*.png"))
  assert charts == sorted(f"{name}.png" for name in rows)


def _ccc(x, y):
  """Lin's concordance correlation, population moments (float64 numpy, independent of exvo_jax.metrics)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  covariance = np.mean((x - x.mean()) * (y - y.mean()))
  return 2 * covariance / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)

