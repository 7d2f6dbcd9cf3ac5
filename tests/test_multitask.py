"""ExVo-MultiTask: the MLP, its losses, the end-to-end smoke run and learning on the demo corpus."""

import csv
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import release_fixtures
import smoke
from configs import multitask as multitask_config
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import schema
from exvo_jax.features import tables as tables_lib
from exvo_jax.tasks import multitask

SMOKE = "configs/multitask.py:smoke"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The uninterrupted smoke run through main: (workdir, its stdout)."""
  workdir = tmp_path_factory.mktemp("multitask_smoke")
  return workdir, smoke.run_main(SMOKE, workdir).stdout


def test_losses_ignore_unknown_age_and_country():
  outputs = {"emotions": jnp.full((2, 10), 0.5), "age": jnp.array([30.0, 50.0]),
             "country": jnp.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])}
  batch = {"emotions": jnp.zeros((2, 10)), "age": jnp.array([32.0, jnp.nan]), "country": jnp.array([0, -1])}
  parts = mlp_trainer.losses(outputs, batch, multitask.EXVO_TARGETS)
  assert float(parts["emotions"]) == pytest.approx(0.25)
  assert float(parts["age"]) == pytest.approx(4.0)  # only the known age counts
  expected_xent = -np.log(np.exp(5) / (np.exp(5) + 3))
  assert float(parts["country"]) == pytest.approx(expected_xent, rel=1e-5)
  assert float(mlp_trainer.total_loss(parts)) == pytest.approx(0.25 + 4.0 + expected_xent, rel=1e-5)
  s = jnp.array([0.1, -0.2, 0.3])
  by_hand = sum(0.5 * np.exp(-2 * si) * li + si for si, li in zip(np.array(s), [0.25, 4.0, expected_xent]))
  assert float(mlp_trainer.total_loss(parts, s)) == pytest.approx(by_hand, rel=1e-5)


def test_a_targets_objective_weights_each_targets_own_masked_loss():
  """Any target list trains on the MLP: A-VB Two (sigmoid) and Type (logits) with weights 2 and 0.5; the loss is
  2 MSE over the rows with both values + 0.5 cross-entropy over the rows with a type, written out in numpy."""
  objective = mlp_trainer.targets_objective(("avb_two", "avb_type"), None, "uar", weights=(2.0, 0.5))
  assert objective.label_keys == ("avb_two", "avb_type")
  features = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  variables = objective.model.init(jax.random.key(0), features)
  outputs = objective.model.apply(variables, features)
  two, logits = np.asarray(outputs["avb_two"], np.float64), np.asarray(outputs["avb_type"], np.float64)
  assert two.shape == (4, 2) and ((two > 0) & (two < 1)).all() and logits.shape == (4, 8)
  labels_two = np.array([[0.2, 0.8], [np.nan, 0.5], [0.6, 0.4], [0.1, 0.1]], np.float32)
  labels_type = np.array([3, 1, -1, 7])
  total, parts = objective.loss(outputs, {"avb_two": labels_two, "avb_type": labels_type}, {"mlp": variables})
  rows = [0, 2, 3]
  mse = np.mean((two[rows] - labels_two[rows]) ** 2)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  xent = -np.mean(log_softmax[[0, 1, 3], labels_type[[0, 1, 3]]])
  assert float(parts["avb_two"]) == pytest.approx(mse, rel=1e-5)
  assert float(parts["avb_type"]) == pytest.approx(xent, rel=1e-5)
  assert float(total) == pytest.approx(2.0 * mse + 0.5 * xent, rel=1e-5)


def test_table2_variants_and_sweep():
  assert multitask_config.get_config().features.sets == ("compare",)
  assert multitask_config.get_config("egemaps").features.sets == ("egemaps",)
  boaw = multitask_config.get_config("boaw=1000").features
  assert boaw.sets == ("boaw",) and boaw.boaw_words == 1000
  assert multitask_config.get_config("fusion=compare+egemaps").features.sets == ("compare", "egemaps")
  assert multitask_config.get_config("deepspectrum").features.sets == ("deepspectrum",)
  config = multitask_config.get_config()
  assert (config.learning_rate, config.batch_size, config.num_epochs, config.patience, config.num_seeds) == \
      (1e-3, 8, 20, 5, 5)
  assert len(multitask_config.get_sweep()) == 9


def test_smoke_end_to_end_writes_metrics_and_submission(smoke_run):
  tmp_path, stdout = smoke_run
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert len(result["seeds"]) == 2 and result["dims"] == 88
  for key in multitask.SCORES:
    assert np.isfinite(result["mean"][key]) and np.isfinite(result["std"][key])
    assert all(np.isfinite(s["val"][key]) for s in result["seeds"])
  assert "| egemaps | 88 |" in stdout
  submission = tmp_path / result["submission"]
  assert submission.name == "ExVo-Multi_exvo_jax_1.csv"
  with open(submission) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["File_ID", "Country", "Age", *schema.EMOTIONS]
  # File_IDs exactly as written in the demo corpus's data_info.csv, for every Test clip.
  corpus = next(pathlib.Path(os.environ["EXVO_CACHE"], "demo").glob("demo-tiny-seed0"))
  with open(corpus / "data_info.csv") as f:
    test_ids = {r["File_ID"] for r in csv.DictReader(f) if r["Split"] == "Test"}
  assert {r[0] for r in rows[1:]} == test_ids and len(rows) - 1 == len(test_ids)
  for r in rows[1:]:
    assert int(r[1]) in range(4) and 0 <= min(map(float, r[3:])) and max(map(float, r[3:])) <= 1
  # TensorBoard: each seed's validation S_MTL per epoch, as in metrics.json; the figures.
  for seed in result["seeds"]:
    smoke.validation_events(tmp_path / f"seed{seed['seed']}" / "tensorboard" / f"seed_{seed['seed']}",
                            seed["history"], "s_mtl")
  for name in ("training_curves.png", "per_emotion_ccc.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  # The run resumes: a second call with the same workdir trains nothing more and gives the same scores.
  again = smoke.run_main(SMOKE, tmp_path)
  assert "seed 0: resumed at step 12 of 12 (after epoch 2), finished" in again.stdout
  assert json.loads((tmp_path / "metrics.json").read_text())["mean"] == result["mean"]


def test_sigterm_during_feature_extraction_exits_0_and_the_rerun_ends_like_an_uninterrupted_run(smoke_run, tmp_path):
  """A fresh feature cache (the same corpus and built records), SIGTERM at the 3rd clip's eGeMAPS: the run exits 0
  saying preempted with 3 clips cached; the rerun extracts the rest and writes what the uninterrupted run wrote."""
  reference, _ = smoke_run
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  flags = (f"--config.data.root={root}", f"--config.data.tfds_dir={builders.default_data_dir(root)}",
           "--config.features.processes=1")
  env = {"EXVO_CACHE": str(tmp_path / "cache")}
  stopped = smoke.run_main(SMOKE, tmp_path / "run", *flags, env=env,
                           sigterm_at=("exvo_jax.features.opensmile:_work", 3))
  assert "preempted: egemaps extraction stopped after 3 of 96 clips" in stopped.stdout, stopped.stdout[-2000:]
  cached = list((tmp_path / "cache" / "features").rglob("*.npy"))
  assert len(cached) == 3 and not (tmp_path / "run" / "metrics.json").exists()
  again = smoke.run_main(SMOKE, tmp_path / "run", *flags, env=env)
  assert "93 of 96 clips" not in again.stdout and "3 of 96 clips cached, extracting 93" in again.stdout
  result, expected = (json.loads((w / "metrics.json").read_text()) for w in (tmp_path / "run", reference))
  assert result["seeds"] == expected["seeds"]
  assert (tmp_path / "run" / result["submission"]).read_bytes() == (reference / expected["submission"]).read_bytes()
  shutil.rmtree(tmp_path / "cache")


def test_mlp_beats_the_training_mean_predictor_on_the_demo_corpus(tmp_path):
  """eGeMAPS + MLP, one seed, on the default demo corpus: every part beats the mean predictor with a margin."""
  config = multitask_config.get_config("egemaps,seeds=1")
  config.log_every_s = 1e9
  result = multitask.run(config, str(tmp_path))
  val, floor = result["seeds"][0]["val"], result["train_mean_predictor"]
  print(f"MLP {val} vs training mean {floor}")
  assert val["emo_ccc"] > floor["emo_ccc"] + 0.2
  assert val["cou_uar"] > 0.25 + 0.08  # chance for 4 countries
  assert val["age_mae"] < floor["age_mae"] - 0.3
  assert val["s_mtl"] > floor["s_mtl"] + 0.15


def _random_tables(n_train=64, n_val=32, seed=0):
  """Features [N, 6] with emotions, age (years) and country each a function of them."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(6, 10))

  def table(n):
    features = rng.normal(size=(n, 6)).astype(np.float32)
    emotions = (1 / (1 + np.exp(-features @ weights))).astype(np.float32)
    return tables_lib.SplitTable(features, emotions, (30 + 8 * features[:, 0]).astype(np.float32),
                                 (features[:, 1] > 0).astype(np.int32) + 2 * (features[:, 2] > 0),
                                 np.array([f"c{i}" for i in range(n)]), np.array([f"s{i % 3}" for i in range(n)]),
                                 np.ones(n, bool), np.full(n, -1, np.int32))
  return {"train": table(n_train), "validation": table(n_val)}


def test_early_stopping_returns_the_best_epoch_params_and_their_scores(tmp_path):
  """patience 1 over up to 12 epochs: training stops one evaluation after the best, and what train_seed returns is
  that best epoch: its index, its validation scores, and parameters that score exactly so on the validation clips."""
  config = multitask_config.get_config("smoke")
  config.num_epochs, config.patience, config.batch_size, config.learning_rate = 12, 1, 8, 3e-2
  config.log_every_s = 1e9
  tables = _random_tables()
  objective = multitask.exvo_objective(config, float(np.nanmean(tables["train"].age)))
  mesh = parallel.make_mesh(2)
  params, predict_fn, result = mlp_trainer.train_seed(config, objective, tables, 0, str(tmp_path), mesh,
                                                    log=lambda *_: None)
  history = result["history"]
  s_mtl = [h["s_mtl"] for h in history]
  best = int(np.argmax(s_mtl))
  assert result["best_epoch"] == history[best]["epoch"] == best + 1
  # Stopped by patience: the evaluation after the best was the last, unless the best came at the very end.
  assert len(history) == min(best + 2, 12)
  assert result["val"]["s_mtl"] == s_mtl[best]
  scores = multitask.score(mlp_trainer.predict(predict_fn, params, tables["validation"], 8), tables["validation"])
  for key in multitask.SCORES:
    assert scores[key] == pytest.approx(result["val"][key], abs=1e-6), key


def test_uncertainty_weighting_learns_a_larger_sigma_for_the_larger_loss(tmp_path):
  """Kendall et al.'s weighting: d/ds (exp(-2s) L / 2 + s) = 1 - exp(-2s) L, so from s = -0.33 the weight of a task
  whose loss stays above exp(-0.66) ~ 0.52 (age MSE in years) falls (s rises) and that of a task whose loss stays
  below it (emotion MSE ~ 0.05) rises (s falls)."""
  config = multitask_config.get_config("smoke,uncertainty")
  config.num_epochs, config.batch_size, config.log_every_s = 2, 8, 1e9
  tables = _random_tables()
  objective = multitask.exvo_objective(config, float(np.nanmean(tables["train"].age)))
  assert objective.extra_params["log_sigma"].tolist() == pytest.approx([-0.33] * 3)
  params, _, _ = mlp_trainer.train_seed(config, objective, tables, 0, str(tmp_path), parallel.make_mesh(1),
                                      log=lambda *_: None)
  emotions, age, _ = np.asarray(params["log_sigma"])
  assert age > -0.33 > emotions


def test_the_submission_comes_from_the_seed_best_on_validation(smoke_run):
  workdir, _ = smoke_run
  result = json.loads((workdir / "metrics.json").read_text())
  s_mtl = {s["seed"]: s["val"]["s_mtl"] for s in result["seeds"]}
  assert len(set(s_mtl.values())) == 2  # two different seeds: the choice matters
  assert result["submission_seed"] == max(s_mtl, key=s_mtl.get)


def test_release_variant_reads_the_features_shipped_with_the_release(tmp_path):
  """`:release` on a hand-written release folder (feats/ComParE, 7 features per clip): the tables hold exactly
  the shipped feature rows and labels of each split's clips, and the run trains on them and writes a submission
  for every Test clip."""
  rows = release_fixtures.make_clips((4, 2, 2), clips_per_speaker=5)
  root = release_fixtures.write_release(tmp_path / "release", rows)
  config = multitask_config.get_config("smoke,release")
  config.data.root, config.data.tfds_dir, config.log_every_s = str(root), str(tmp_path / "tfds"), 1e9
  tables = mlp_trainer.load_tables(config, root, str(tmp_path), log=lambda *_: None)
  for split, name in zip(mlp_trainer.SPLITS, schema.SPLITS):
    expected = {r["stem"]: r for r in rows if r["split"] == name}
    table = tables[split]
    stems = [f.strip("[]") for f in table.file_id]
    assert sorted(stems) == sorted(expected)
    for i, stem in enumerate(stems):
      np.testing.assert_array_equal(table.features[i], expected[stem]["features"])
      np.testing.assert_array_equal(table.emotions[i], expected[stem]["emotions"])
      assert table.age[i] == np.float32(expected[stem]["age"]) and table.country[i] == expected[stem]["country"]
  result = multitask.run(config, str(tmp_path / "run"))
  assert result["dims"] == 7 and all(np.isfinite(s["val"]["s_mtl"]) for s in result["seeds"])
  with open(tmp_path / "run" / result["submission"]) as f:
    submitted = [r[0].strip("[]") for r in list(csv.reader(f))[1:]]
  assert sorted(submitted) == sorted(r["stem"] for r in rows if r["split"] == "Test")


EMOGATOR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "emogator"


@pytest.mark.skipif(not (EMOGATOR / "labels.csv").is_file(), reason="the EmoGator folder is not on this machine")
def test_emogator_variant_learns_the_categories_of_real_bursts(tmp_path):
  """`:emogator,egemaps` through main on 6 real speakers (4 train, 2 val; 540 mp3 clips, 30 categories): eGeMAPS of
  real bursts and one 30-way head. Every speaker voices each category 3 times, so validation UAR is accuracy here,
  and it must beat chance (1/30) by a one-sided binomial test over the 180 validation clips (p < 0.01)."""
  labels = (EMOGATOR / "labels.csv").read_text().splitlines()
  speakers = {}
  for line in labels[1:]:
    speakers.setdefault(line.split(",")[1], {})[line.split(",")[2]] = True
  keep = set(list(speakers["train"])[:4] + list(speakers["val"])[:2])
  (tmp_path / "eg" / "mp3").mkdir(parents=True)
  rows = [labels[0]] + [line for line in labels[1:] if line.split(",")[2] in keep]
  (tmp_path / "eg" / "labels.csv").write_text("\n".join(rows) + "\n")
  for line in rows[1:]:
    name = line.split(",")[0]
    (tmp_path / "eg" / "mp3" / name).symlink_to((EMOGATOR / "mp3" / name).resolve())
  smoke.run_main("configs/multitask.py:emogator,egemaps,seeds=1", tmp_path / "run",
                 f"--config.data.root={tmp_path / 'eg'}", "--config.log_every_s=1e9")
  result = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert len(rows) - 1 == 540 and result["dims"] == 88 and result["chance_uar"] == pytest.approx(1 / 30)
  correct = round(result["mean"]["uar"] * 180)
  p_value = scipy.stats.binomtest(correct, 180, 1 / 30, alternative="greater").pvalue
  print(f"validation UAR {result['mean']['uar']:.3f} ({correct} of 180 clips), p = {p_value:.2g}")
  assert p_value < 0.01
  (seed,) = result["seeds"]
  smoke.validation_events(tmp_path / "run" / "seed0" / "tensorboard" / "seed_0", seed["history"], "uar")
  assert (tmp_path / "run" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_applies_the_submitted_seed_to_new_files_like_the_task(smoke_run, tmp_path):
  """`predict` on the smoke run over Test clips copied as 16 kHz wav, one of them also as 44.1 kHz stereo and as
  mp3, an empty file and a text file: every decodable file predicted, the bad ones reported; the 16 kHz copies get
  the submission's predictions (openSMILE on the same samples, the same standardiser, the same seed)."""
  workdir, _ = smoke_run
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  result = json.loads((workdir / "metrics.json").read_text())
  with open(workdir / result["submission"]) as f:
    submitted = {r["File_ID"]: r for r in csv.DictReader(f)}
  copies = smoke.mixed_audio_folder(tmp_path / "audio", root, sorted(submitted)[:3])
  done = smoke.run_main("configs/predict.py", workdir, f"--config.audio={tmp_path / 'audio'}",
                        f"--config.output={tmp_path / 'out'}")
  header, rows, skipped = smoke.read_predictions(tmp_path / "out")
  country_columns = [f"p_country_{c}" for c in schema.COUNTRIES]
  smoke.check_mixed_predictions(done, header, rows, skipped, copies,
                                [*schema.EMOTIONS, "age", "country", *country_columns])
  for name, file_id in copies.items():
    row, want = rows[name], submitted[file_id]
    for emotion in schema.EMOTIONS:
      assert float(row[emotion]) == pytest.approx(float(want[emotion]), abs=2e-6), (name, emotion)
    assert float(row["age"]) == pytest.approx(float(want["Age"]), abs=1e-4)
    assert schema.COUNTRIES.index(row["country"]) == int(want["Country"])
  for row in rows.values():
    probabilities = [float(row[c]) for c in country_columns]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert row["country"] == schema.COUNTRIES[int(np.argmax(probabilities))]
    assert all(0 <= float(row[e]) <= 1 for e in schema.EMOTIONS)

