"""`python -m exvo_jax.main`: the describe task on the tiny demo corpus, overrides, the data root, config typos."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import smoke
from exvo_jax.data import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(config, workdir, *flags, env=None):
  return smoke.run_main(config, workdir, *flags, env=env, timeout=600, check=False)


def test_describe_smoke_builds_the_demo_corpus_and_writes_a_summary(tmp_path):
  out = _main("configs/describe.py:smoke", f"{tmp_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "using the demo corpus at" in out.stdout  # the cache path is printed
  summary = json.loads((tmp_path / "summary.json").read_text())
  splits = summary["splits"]
  assert set(splits) == {"train", "validation", "test"}
  for name, s in splits.items():
    assert s["clips"] > 0 and s["speakers"] > 0 and s["hours"] > 0
    assert set(s["emotion_means"]) == set(schema.EMOTIONS)
  assert splits["test"]["labelled_clips"] == 2 * splits["test"]["speakers"]  # the few-shot support set
  assert splits["train"]["labelled_clips"] == splits["train"]["clips"]
  assert "train:" in out.stdout and "emotion means" in out.stdout
  saved = json.loads((tmp_path / "config.json").read_text())  # what `predict` reads back
  assert saved["task"] == "describe" and saved["data"]["demo_size"] == "tiny" and saved["log"]["tensorboard"]


def test_overrides_and_unknown_variants(tmp_path):
  out = _main("configs/describe.py:smoke", f"{tmp_path}", "--config.data.root=/nonexistent/x")
  assert out.returncode != 0 and "/nonexistent/x: corpus folder not found" in out.stderr
  out = _main("configs/describe.py:smok", f"{tmp_path}")
  assert out.returncode != 0 and "unknown config variant 'smok'" in out.stderr


def test_data_root_from_environment(tmp_path):
  import release_fixtures
  root = release_fixtures.write_release(tmp_path / "release", release_fixtures.make_clips())
  out = _main("configs/describe.py", f"{tmp_path / 'wd'}", env={"EXVO_DATA": str(root)})
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "wd" / "summary.json").read_text())
  assert summary["corpus"] == str(root.resolve()) and summary["splits"]["train"]["clips"] == 6


EMOGATOR = ROOT.parent / "shared" / "data" / "emogator"


@pytest.mark.skipif(not (EMOGATOR / "mp3").is_dir(), reason="EmoGator folder absent")
def test_emogator_reader_on_the_shared_folder():
  """The real corpus: 7,200 clips, 80 speakers, 30 categories, every clip decoded at 16 kHz."""
  import numpy as np
  from exvo_jax.data import audio, emogator
  clips, report = emogator.read_emogator(EMOGATOR)
  assert len(clips) == 7200 and len({c.speaker for c in clips}) == 80
  assert len({c.category for c in clips}) == 30
  assert {c.split for c in clips} == {"train", "val"}
  assert not {c.speaker for c in clips if c.split == "train"} & {c.speaker for c in clips if c.split == "val"}
  decoded = list(audio.iter_clip_audio(clips, report))
  assert len(decoded) + report.num_skipped == 7200
  lengths = np.array([s.size for _, s in decoded])
  info = report.to_json()
  print(f"EmoGator: {len(decoded)} decoded, {report.num_converted} converted to 16 kHz mono, "
        f"{report.num_skipped} skipped; lengths {lengths.min() / 16000:.2f}-{lengths.max() / 16000:.2f} s")
  assert report.num_skipped == 0, info["problems"][:5]
  assert all(s.dtype == np.int16 for _, s in decoded)
  assert 0.3 * 16000 < np.median(lengths) < 5 * 16000  # 0.8-2 s bursts, at 16 kHz


@pytest.mark.parametrize("config, flag, fragments", [
    ("configs/fewshot.py:smoke", "--config.adaptation=finetun",
     ["--config.adaptation='finetun' is not one of: none, finetune, maml, fomaml"]),
    ("configs/fewshot.py:smoke=ture", None, ["smoke='ture' is not a boolean; use true/1/yes or false/0/no"]),
    ("configs/generate.py:smoke", "--config.sample.checkpoint=lastest",
     ["--config.sample.checkpoint='lastest' is not one of: best, latest"]),
    ("configs/multitask.py:smoke,fusion=compare+egemap", None,
     ["--config.features.sets: 'egemap' not among: compare, egemaps, boaw, deepspectrum"]),
    ("configs/describe.py:smoke", "--config.data.demo_size=tinny", ["--config.data.demo_size='tinny' is not one of"]),
    ("configs/avb.py:smoke,hihg", None, ["unknown config variant 'hihg'"]),
    ("configs/predict.py", None, ["--config.audio is empty"]),
    ("configs/predict.py:chart", None, ["unknown config variant 'chart'"]),
    ("configs/avb.py:smoke", "--config.data.demo_layout=abv",
     ["--config.data.demo_layout='abv' is not one of: exvo, avb"]),
])
def test_a_config_typo_fails_before_any_data_is_built(tmp_path, config, flag, fragments):
  """Every task: the key, the value and the choices are named, and nothing is built (a fresh cache stays empty)."""
  cache = tmp_path / "cache"
  out = _main(config, tmp_path / "run", *([flag] if flag else []),
              env={"EXVO_CACHE": str(cache)})
  assert out.returncode != 0
  for fragment in fragments:
    assert fragment in out.stderr, out.stderr[-2000:]
  assert not cache.exists() or not any(cache.iterdir())


def test_a_non_finite_loss_exits_with_status_3(tmp_path):
  """An absurd learning rate makes the first steps' loss NaN: main stops with status 3 and says what to do."""
  out = _main("configs/multitask.py:smoke,seeds=1", tmp_path, "--config.learning_rate=1e30")
  assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
  assert "non-finite loss" in out.stderr and "Lower the learning rate" in out.stderr


def test_a_url_workdir_is_refused_at_start_with_the_reason():
  """gs:// fails at once, exit status 2, before JAX is even imported (nothing else can have run)."""
  probe = ("import runpy, sys\n"
           "sys.argv = ['main', '--config=configs/fewshot.py:smoke', '--workdir=gs://bucket/run']\n"
           "try:\n"
           "  runpy.run_module('exvo_jax.main', run_name='__main__')\n"
           "finally:\n"
           "  print('jax imported:', 'jax' in sys.modules)\n")
  done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=smoke.main_env(), capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 2, done.stderr
  assert "--workdir=gs://bucket/run: a URL is not supported as a workdir" in done.stderr and "gcsfuse" in done.stderr
  assert "jax imported: False" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_logging_without_the_package_fails_before_any_work(tmp_path):
  out = _main("configs/describe.py:smoke", tmp_path / "run", "--config.log.wandb=True",
              env={"EXVO_CACHE": str(tmp_path / "cache")})
  assert out.returncode == 2 and "pip install wandb" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "cache").exists()


def test_predict_refuses_what_it_cannot_use_with_the_fix(tmp_path):
  """A folder that is no trained run, a run of a task without a predictor, a glob that names no file: status 2."""
  (tmp_path / "audio").mkdir()
  (tmp_path / "audio" / "a.wav").write_bytes(b"")
  untrained = _main("configs/predict.py", tmp_path / "nothing", f"--config.audio={tmp_path / 'audio'}")
  assert untrained.returncode == 2 and "no config.json, so this is not the workdir of a trained run" in \
      untrained.stderr, untrained.stderr[-2000:]
  generated = tmp_path / "generate_run"
  generated.mkdir()
  (generated / "config.json").write_text(json.dumps({"task": "generate"}))
  out = _main("configs/predict.py", generated, f"--config.audio={tmp_path / 'audio'}")
  assert out.returncode == 2 and "trained by task 'generate', whose models predict cannot apply; it applies the " \
      "models of: fewshot, multitask" in out.stderr, out.stderr[-2000:]
  (generated / "config.json").write_text(json.dumps({"task": "multitask"}))
  out = _main("configs/predict.py", generated, f"--config.audio={tmp_path / 'audio' / '*.flac'}")
  assert out.returncode == 2 and "names no file" in out.stderr, out.stderr[-2000:]

