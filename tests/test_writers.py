"""The run's writers: TensorBoard events read back with TensorBoard's own reader, the optional wandb mirror, the
JSONL log and atomic JSON."""

import json
import sys
import types

import numpy as np
import pytest

import smoke
from exvo_jax import writers


def test_event_log_scalars_images_and_audio_read_back_with_tensorboard(tmp_path):
  folder = writers.events_folder(tmp_path, "GAN all (seed 0)")
  assert folder == str(tmp_path / "tensorboard" / "GAN_all_seed_0")
  events = writers.EventLog(folder)
  events.scalars(1, {"loss": 2.5, "skipped": float("nan"), "name": "text"}, prefix="train/")
  events.scalars(2, {"loss": np.float32(1.25)}, prefix="train/")
  image = np.zeros((6, 8, 3), np.uint8)
  image[:, :4, 0] = 255
  events.image(2, "grid", image)
  events.audio(2, "clip", np.full(1600, 1000, np.int16), 16_000)
  events.close()
  scalars, images, audio = smoke.read_events(folder)
  assert scalars == {"train/loss": [(1, 2.5), (2, 1.25)]}  # non-finite and non-numeric values left out
  assert images == ["grid"] and audio == ["clip"]
  from tensorboard.backend.event_processing import event_accumulator  # the stored PNG's size and the clip's rate
  accumulator = event_accumulator.EventAccumulator(folder)
  accumulator.Reload()
  (stored,) = accumulator.Images("grid")
  assert (stored.width, stored.height) == (8, 6)
  (clip,) = accumulator.Audio("clip")
  assert clip.sample_rate == 16_000 and clip.length_frames == 1600


def test_a_resumed_event_log_purges_the_steps_after_its_start(tmp_path):
  folder = writers.events_folder(tmp_path, "run")
  first = writers.EventLog(folder)
  for step in range(1, 7):
    first.scalars(step, {"loss": float(step)})
  first.close()
  resumed = writers.EventLog(folder, purge_step=4)  # the checkpoint was at step 3: steps 4-6 are redone
  for step in range(4, 6):
    resumed.scalars(step, {"loss": 10.0 * step})
  resumed.close()
  scalars, _, _ = smoke.read_events(folder)
  assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_wandb_gets_each_run_s_values_on_its_own_step_axis(tmp_path, monkeypatch):
  calls = []

  class Run:
    def define_metric(self, name, step_metric=None):
      calls.append(("define", name, step_metric))

    def log(self, values):
      calls.append(("log", values))

  fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or Run(),
                               Image=lambda array: ("image", array.shape),
                               Audio=lambda samples, sample_rate: ("audio", sample_rate))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setattr(writers, "_WANDB_RUN", [])
  monkeypatch.setattr(writers, "_SETTINGS", dict(writers._SETTINGS))
  writers.configure(tensorboard=False, wandb=True, wandb_project="bursts", run_name="fewshot")
  events = writers.EventLog(writers.events_folder(tmp_path, "seed 1"))
  events.scalars(3, {"loss": 0.5}, prefix="train/")
  events.image(3, "grid", np.zeros((2, 2, 3), np.uint8))
  events.close()
  assert calls == [("init", {"project": "bursts", "name": "fewshot"}),
                   ("define", "seed_1/step", None), ("define", "seed_1/*", "seed_1/step"),
                   ("log", {"seed_1/step": 3, "seed_1/train/loss": 0.5}),
                   ("log", {"seed_1/step": 3, "seed_1/grid": ("image", (2, 2, 3))})]
  assert not (tmp_path / "tensorboard").exists()  # tensorboard=False writes no event file


def test_json_and_the_metrics_log(tmp_path):
  writers.write_json(tmp_path / "m.json", {"a": np.float32(0.5), "b": float("nan"), "c": (1, 2)})
  assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": None, "c": [1, 2]}
  log = writers.MetricsLog(tmp_path / "log.jsonl")
  log.write(1, loss=np.float64(2.0))
  log.write(2, loss=1.0)
  assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
      {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
  with pytest.raises(TypeError):
    writers.write_json(tmp_path / "bad.json", {"x": object()})
