"""ExVo-MultiTask: the MLP, its losses, the end-to-end smoke run and learning on the demo corpus."""

import csv
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import smoke
from configs import multitask as multitask_config
from exvo_jax.data import schema
from exvo_jax.tasks import multitask

def test_losses_ignore_unknown_age_and_country():
  outputs = {"emotions": jnp.full((2, 10), 0.5), "age": jnp.array([30.0, 50.0]),
             "country": jnp.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])}
  batch = {"emotions": jnp.zeros((2, 10)), "age": jnp.array([32.0, jnp.nan]), "country": jnp.array([0, -1])}
  parts = multitask.losses(outputs, batch)
  assert float(parts["emotions"]) == pytest.approx(0.25)
  assert float(parts["age"]) == pytest.approx(4.0)  # only the known age counts
  expected_xent = -np.log(np.exp(5) / (np.exp(5) + 3))
  assert float(parts["country"]) == pytest.approx(expected_xent, rel=1e-5)
  assert float(multitask.total_loss(parts)) == pytest.approx(0.25 + 4.0 + expected_xent, rel=1e-5)
  s = jnp.array([0.1, -0.2, 0.3])
  by_hand = sum(0.5 * np.exp(-2 * si) * li + si for si, li in zip(np.array(s), [0.25, 4.0, expected_xent]))
  assert float(multitask.total_loss(parts, s)) == pytest.approx(by_hand, rel=1e-5)


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


def test_smoke_end_to_end_writes_metrics_and_submission(tmp_path):
  out = smoke.run_main("configs/multitask.py:smoke", tmp_path)
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert len(result["seeds"]) == 2 and result["dims"] == 88
  for key in multitask.SCORES:
    assert np.isfinite(result["mean"][key]) and np.isfinite(result["std"][key])
    assert all(np.isfinite(s["val"][key]) for s in result["seeds"])
  assert "| egemaps | 88 |" in out.stdout
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
  # The run resumes: a second call with the same workdir trains nothing more and gives the same scores.
  again = smoke.run_main("configs/multitask.py:smoke", tmp_path)
  assert "seed 0: resumed at step 12 of 12 (after epoch 2), finished" in again.stdout
  assert json.loads((tmp_path / "metrics.json").read_text())["mean"] == result["mean"]


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
