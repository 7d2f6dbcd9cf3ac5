"""The Generate task: emotion bins, the config check, best/latest checkpoint choice, and `:smoke` through main."""

import json
import shutil

import jax
import numpy as np
import pytest
import soundfile

import smoke
from configs import generate as generate_config
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import gan as gan_lib
from exvo_jax import parallel
from exvo_jax import sampling
from exvo_jax.data import augment as augment_lib
from exvo_jax.data import schema
from exvo_jax.features import mel
from exvo_jax.tasks import generate

def test_emotion_bins_take_clips_labelled_one():
  labels = np.zeros((4, 10), np.float32)
  labels[0, 2] = labels[1, 2] = labels[2, 5] = 1.0
  labels[3, 2] = 0.99
  split = emo18_trainer.Split(None, np.array(["a"] * 4), np.array(["s"] * 4), labels,
                              np.array([True, True, True, False]))
  bins = generate.emotion_bins(split)
  assert bins["Amusement"].tolist() == [0, 1] and bins["Horror"].tolist() == [2] and not len(bins["Awe"])


def test_smoke_run_trains_samples_and_scores(tmp_path):
  """`configs/generate.py:smoke` through main: wav folders, headers, lengths (trailing silence cut), not silent;
  finite FID per emotion;
  then mode=sample restores the same GAN and writes the same clips."""
  workdir = tmp_path / "run"
  smoke.run_main("configs/generate.py:smoke", workdir, devices=2)
  scores = json.loads((workdir / "scores.json").read_text())
  config = generate_config.get_config("smoke")
  per_emotion = scores["per_emotion"]
  assert set(per_emotion) == set(schema.EMOTIONS)
  for emotion in schema.EMOTIONS:
    assert np.isfinite(per_emotion[emotion]["fid"]) and per_emotion[emotion]["fid"] > 0
    folder = workdir / "samples" / emotion
    files = sorted(folder.glob("*.wav"))
    assert len(files) == config.sample.num_per_emotion
    for path in files:
      info = soundfile.info(str(path))
      assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
      # Cut after the last sounding frame (mel.sounding_samples), so at most the GAN's 4.1 s.
      assert mel.HOP <= info.frames <= mel.CLIP_SAMPLES
      audio, _ = soundfile.read(str(path), dtype="int16")
      assert np.abs(audio).max() > 1000  # not silent
  assert (workdir / "samples" / "spectrograms.png").read_bytes()[:4] == b"\x89PNG"
  # The validation FID every gan.eval_every steps; the lowest one's checkpoint is the one sampled.
  rows = [json.loads(line) for line in (workdir / "metrics_log_gan_all.jsonl").read_text().splitlines()]
  scored = {row["step"]: row["val_fid"] for row in rows if "val_fid" in row}
  # Beside it, the shuffled-label control on the same validation bins and how many emotions beat it.
  for row in (row for row in rows if "val_fid" in row):
    assert 0 <= row["val_below_shuffled"] <= 10 and row["val_shuffled"] > 0, row
  assert sorted(scored) == list(range(config.gan.eval_every, config.gan.steps + 1, config.gan.eval_every))
  best = min(scored, key=scored.get)
  assert scores["sampled_checkpoints"]["all"] == {"checkpoint": "best", "step": best, "val_fid": scored[best],
                                                  "latest_step": config.gan.steps}
  # TensorBoard: the validation FID of every evaluation, the losses and learning rates, the training grids; the
  # sampled clips' grid and a few clips per emotion as audio.
  scalars = smoke.validation_events(workdir / "tensorboard" / "GAN_all",
                                    [{"step": s, "val_fid": v} for s, v in sorted(scored.items())], "val_fid",
                                    loss="g_loss")
  assert {"train/g_loss", "train/d_loss", "learning_rate/generator", "learning_rate/discriminator"} <= set(scalars)
  _, images, _ = smoke.read_events(workdir / "tensorboard" / "GAN_all")
  assert images == ["samples/spectrograms"]
  _, images, audio = smoke.read_events(workdir / "tensorboard" / "samples")
  assert images == ["samples/spectrograms"]
  per_emotion_clips = min(config.sample.tensorboard_clips, config.sample.num_per_emotion)
  assert sorted(audio) == sorted(f"samples/{e}/{e}_{k:04d}" for e in schema.EMOTIONS
                                 for k in range(1, per_emotion_clips + 1))
  for name in ("train_val_fid.png", "generated_vs_train_fid.png", "training_curves_gan_all.png",
               "training_curves_classifier.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  table3 = json.loads((workdir / "train_val_fid.json").read_text())
  assert np.array(table3["fid"], dtype=float).shape == (10, 10)
  clips = {p.relative_to(workdir): p.read_bytes() for p in sorted((workdir / "samples").rglob("*.wav"))}

  # mode=sample restores the same GAN and writes the same clips; SIGTERM while it samples the second emotion stops
  # it (exit 0, preempted), and the rerun writes every clip and score as the uninterrupted run did.
  shutil.rmtree(workdir / "samples")
  stopped = smoke.run_main("configs/generate.py:smoke", workdir, "--config.mode=sample", devices=2,
                           sigterm_at=("exvo_jax.sampling:sample_clips", 2))
  assert "preempted: sampling Excitement stopped at clip 1 of 4" in stopped.stdout, stopped.stdout[-2000:]
  smoke.run_main("configs/generate.py:smoke", workdir, "--config.mode=sample", devices=2)
  assert {p.relative_to(workdir): p.read_bytes() for p in sorted((workdir / "samples").rglob("*.wav"))} == clips
  assert json.loads((workdir / "scores.json").read_text())["per_emotion"] == per_emotion


def test_sample_mode_without_a_trained_gan_says_what_to_do(tmp_path):
  config = generate_config.get_config("smoke")
  gan = gan_lib.make_gan(config.gan, conditional=True)
  mesh = parallel.make_mesh(1)
  with pytest.raises(FileNotFoundError, match="train it first"):
    generate.restore_gan(config, gan, "all", mesh, str(tmp_path))


def test_sample_weights_pick_the_moving_average_or_the_last_weights():
  config = generate_config.get_config("smoke")
  state = gan_lib.GanState(step=0, generator="last", generator_ema="average", generator_opt=None,
                            discriminator=None, discriminator_opt=None)
  gans, means = {"all": ("gan", state)}, {"Awe": "awe-vector"}
  assert generate.generator_for(config, "Awe", means, gans) == ("gan", "average", "awe-vector")
  config.sample.weights = "raw"
  assert generate.generator_for(config, "Awe", means, gans) == ("gan", "last", "awe-vector")


@pytest.mark.parametrize("key, value", [("sample.weights", "best"), ("sample.checkpoint", "newest"),
                                        ("sample.condition", "mean"), ("mode", "sampel"),
                                        ("generator", "per_emotions"), ("gan.optimiser", "extraadam")])
def test_a_value_outside_its_choices_fails_the_config_check(key, value):
  config = generate_config.get_config("smoke")
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_check.ConfigError, match=rf"--config\.{key}='{value}' is not one of: "):
    generate.check_config(config)


def test_the_checkpoint_with_the_lowest_validation_fid_is_sampled(tmp_path):
  """train_gan keeps the state with the lowest finite val_fid as the best; restore_gan samples it (or the latest)."""
  config = generate_config.get_config("smoke")
  config.gan.steps, config.gan.eval_every, config.gan.checkpoint_every = 8, 2, 100
  config.gan.sample_every = 100
  gan = gan_lib.make_gan(config.gan, conditional=True)
  rng = np.random.default_rng(0)
  source = [{"audio": (rng.normal(0, 3000, mel.CLIP_SAMPLES)).astype(np.int16),
             "emotions": np.eye(10, dtype=np.float32)[k % 10], "file_id": f"c{k}", "speaker": "s"}
            for k in range(16)]
  scripted = {2: 5.0, 4: 3.0, 6: float("nan"), 8: 4.0}  # step 6: nothing to rank by, so not a best candidate
  seen = []

  def evaluate(state):
    step = int(state.step)
    seen.append(step)
    return {"val_fid": scripted[step], "val_fid_Awe": scripted[step]}

  mesh = parallel.make_mesh(1)
  logged = []
  final = generate.train_gan(config, gan, "all", source, mesh, str(tmp_path), grid_conditions=np.eye(10),
                             evaluate=evaluate, log=logged.append).state
  assert seen == [2, 4, 6, 8] and int(final.step) == 8
  assert any("validation FID 3.000" in line and line.endswith(" *") for line in logged), logged  # a new best
  lines = [json.loads(line) for line in (tmp_path / "metrics_log_gan_all.jsonl").read_text().splitlines()]
  assert [row["step"] for row in lines if "val_fid" in row] == [2, 4, 6, 8]

  state, which = generate.restore_gan(config, gan, "all", mesh, str(tmp_path))
  assert which == {"checkpoint": "best", "step": 4, "val_fid": 3.0, "latest_step": 8}
  assert int(state.step) == 4
  expected = jax.tree.leaves(final.generator_ema)[0]
  assert not np.allclose(jax.tree.leaves(state.generator_ema)[0], expected)  # an earlier state, not the last
  config.sample.checkpoint = "latest"
  state, which = generate.restore_gan(config, gan, "all", mesh, str(tmp_path))
  assert (which["checkpoint"], which["step"], int(state.step)) == ("latest", 8, 8)
  np.testing.assert_array_equal(jax.tree.leaves(state.generator_ema)[0], expected)


def test_a_per_emotion_gan_without_validation_scores_is_sampled_from_its_latest_checkpoint(tmp_path):
  """`generator=per_emotion`: an unconditional GAN per emotion bin, its own checkpoint folder and stage record;
  with no validation scores its latest checkpoint is sampled, with no condition, into the emotion's folder."""
  config = generate_config.get_config("smoke,generator=per_emotion")
  config.gan.steps, config.gan.sample_every = 2, 100
  gan = gan_lib.make_gan(config.gan, conditional=False)
  source = [{"audio": np.full(mel.CLIP_SAMPLES, 100 * k, np.int16), "emotions": np.zeros(10, np.float32),
             "file_id": f"c{k}", "speaker": "s"} for k in range(8)]
  mesh = parallel.make_mesh(1)
  generate.train_gan(config, gan, "Awe", source, mesh, str(tmp_path), log=lambda _: None)
  state, which = generate.restore_gan(config, gan, "Awe", mesh, str(tmp_path))
  assert which == {"checkpoint": "latest", "step": 2, "val_fid": None, "latest_step": 2}
  assert int(state.step) == 2
  record = json.loads((tmp_path / "checkpoints" / "gan_Awe" / "stage.json").read_text())["record"]
  assert record["generator"] == "per_emotion" and "emotions" not in record
  gans = {"Awe": (gan, state), "Fear": None}
  chosen, params, condition = generate.generator_for(config, "Awe", {"Awe": np.ones(10)}, gans)
  assert chosen is gan and condition is None and params is state.generator_ema
  records, spectrograms = sampling.sample_clips(gan_lib.make_generate_fn(gan), params, "Awe", condition,
                                                str(tmp_path / "samples"), num=2, seed=0, batch_size=2,
                                                griffin_lim_iters=2, griffin_lim_seed=0)
  assert spectrograms.shape == (2, mel.N_MELS, mel.NUM_FRAMES) and len(records) == 2
  assert sorted(p.name for p in (tmp_path / "samples" / "Awe").iterdir()) == ["Awe_0001.wav", "Awe_0002.wav"]


def test_augment_variant_feeds_the_reference_augmentations_to_the_gan_batches(monkeypatch):
  """`:augment` sets the reference's ranges (speed 0.2, pitch 3 semitones, shift 0.2 s, noise 0.01) and the GAN's
  batches are made with them; without it the batches are not augmented."""
  made = []
  monkeypatch.setattr(generate.pipeline, "make_pipeline", lambda source, **kwargs: made.append(kwargs))
  for arg, expected in (("smoke,augment", augment_lib.Augmentation(0.2, 3.0, 0.2, 0.01)), ("smoke", None)):
    generate.gan_batches(generate_config.get_config(arg), source=[])
    assert made[-1]["augment"] == expected and made[-1]["train"]
