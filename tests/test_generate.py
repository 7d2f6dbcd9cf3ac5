"""ExVo-Generate: PNG writer, augmentations, bins, ratings, HEEP/S_GEN, the GAN step, and `:smoke` through main."""

import dataclasses
import json
import os
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import soundfile

from configs import generate as generate_config
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import gan as gan_lib
from exvo_jax import images
from exvo_jax import metrics
from exvo_jax import optim
from exvo_jax import parallel
from exvo_jax import sampling
from exvo_jax.data import augment
from exvo_jax.data import schema
from exvo_jax.evaluation import fid
from exvo_jax.features import mel
from exvo_jax.tasks import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _decode_png(data):
  """Minimal PNG reader for what encode_png writes (8-bit RGB, filter 0): -> uint8 [H, W, 3]."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, chunks = 8, {}
  while pos < len(data):
    length, = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    chunks[kind] = chunks.get(kind, b"") + body
    pos += 12 + length
  width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
  assert (depth, color) == (8, 2)
  raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
  assert (raw[:, 0] == 0).all()
  return raw[:, 1:].reshape(height, width, 3)


def test_png_round_trip_and_heat_map_marks_row_minimum():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(images.encode_png(image)), image)
  heat = images.heat_map(np.array([[3.0, 1.0], [0.5, 2.0]]), cell=4)
  assert heat.shape == (8, 8, 3)
  assert (heat[0, 4:8] == 255).all() and (heat[4, 0:4] == 255).all()  # frames on (0, 1) and (1, 0)
  assert not (heat[0, 0:4] == 255).all()
  grid = images.spectrogram_grid(np.zeros((3, 4, 6)), columns=2, gap=1)
  assert grid.shape == (2 * 4 + 1, 2 * 6 + 1, 3)


def test_augmentations_do_what_they_say():
  rng = np.random.default_rng(0)
  audio = np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000).astype(np.float32)
  faster = augment.Augmentation(speed=0.2)(audio, np.random.default_rng(1))
  assert faster.shape != audio.shape and 0.8 * 16_000 <= faster.size <= 1.25 * 16_000
  shifted = augment.Augmentation(shift_seconds=0.2)(audio, np.random.default_rng(3))
  delay = shifted.size - audio.size
  assert 0 < delay <= 3_200 and not shifted[:delay].any()
  np.testing.assert_array_equal(shifted[delay:], audio)
  noisy = augment.Augmentation(noise_std=0.01)(audio, rng)
  assert abs(np.std(noisy - audio) - 0.01) < 1e-3
  assert not augment.Augmentation().active and augment.Augmentation.reference().active
  pitched = augment.Augmentation(pitch_semitones=3.0)(audio, np.random.default_rng(2))
  assert pitched.size == audio.size
  spectrum = np.abs(np.fft.rfft(pitched))
  peak_hz = np.argmax(spectrum) * 16_000 / pitched.size
  assert abs(peak_hz - 440) > 5 and 440 * 2 ** (-3 / 12) - 5 <= peak_hz <= 440 * 2 ** (3 / 12) + 5


def test_emotion_bins_take_clips_labelled_one():
  labels = np.zeros((4, 10), np.float32)
  labels[0, 2] = labels[1, 2] = labels[2, 5] = 1.0
  labels[3, 2] = 0.99
  split = emo18_trainer.Split(None, np.array(["a"] * 4), np.array(["s"] * 4), labels,
                              np.array([True, True, True, False]))
  bins = generate.emotion_bins(split)
  assert bins["Amusement"].tolist() == [0, 1] and bins["Horror"].tolist() == [2] and not len(bins["Awe"])


def test_heep_and_s_gen_follow_the_formulas(tmp_path):
  rng = np.random.default_rng(0)
  ratings = rng.uniform(size=(6, 10))
  emotion_of = np.array([0, 0, 0, 3, 3, 3])
  fids = {e: 2.0 for e in schema.EMOTIONS}
  result = fid.heep_and_s_gen(ratings, fids, emotion_of)
  onehot = np.zeros((3, 10))
  onehot[:, 3] = 1
  expected = np.corrcoef(onehot.ravel(), ratings[3:].ravel())[0, 1]
  assert result["Awkwardness"]["heep"] == pytest.approx(expected, abs=1e-6)
  assert result["Awkwardness"]["s_gen"] == pytest.approx((1 / 2.0 + expected) / 2, abs=1e-6)
  assert set(result) == {"Awe", "Awkwardness"}
  # Ratings CSV: names match by wav stem; a missing clip and a non-numeric value are named.
  path = tmp_path / "ratings.csv"
  path.write_text("File_ID," + ",".join(schema.EMOTIONS) + "\nAwe_0001.wav," + ",".join(["0.5"] * 10) + "\n")
  np.testing.assert_allclose(fid.read_ratings(str(path), ["Awe_0001"]), [[0.5] * 10])
  with pytest.raises(ValueError, match="no ratings for 1 generated clips"):
    fid.read_ratings(str(path), ["Awe_0001", "Awe_0002"])
  path.write_text("File_ID," + ",".join(schema.EMOTIONS) + "\nAwe_0001," + ",".join(["x"] * 10) + "\n")
  with pytest.raises(ValueError, match="row 2"):
    fid.read_ratings(str(path), ["Awe_0001"])


def _smoke_gan(conditional, optimiser):
  config = generate_config.get_config(f"smoke,optimiser={optimiser}")
  return gan_lib.make_gan(config.gan, conditional=conditional), config


@pytest.mark.parametrize("optimiser", ["adam", "extra_adam"])
def test_gan_step_is_the_same_on_1_and_8_devices(optimiser):
  """Both step kinds (alternating, extragradient) with SGD inside: Adam's first steps are +-lr whatever the
  gradient's size, so rounding-level gradient differences would show as lr-sized parameter differences."""
  gan, _ = _smoke_gan(True, optimiser)
  sgd = optax.sgd(1e-2)
  inner = optim.extragradient(sgd) if gan.extragradient else sgd
  # Without the mode-seeking term: its gradient, 1 / ratio^2 with the near-identical clips of an untrained tiny
  # generator, amplifies rounding differences to 1e-4 after one SGD step. It is a mean over pairs made on the
  # same device, like the auxiliary loss, so it does not make the step depend on the device count.
  gan = dataclasses.replace(gan, generator_tx=inner, discriminator_tx=inner, diversity_weight=0.0)
  rng = np.random.default_rng(0)
  # 32 clips: 4 per device on 8 devices, one minibatch-stddev group each.
  batch = {"audio": (0.3 * rng.standard_normal((32, mel.CLIP_SAMPLES))).astype(np.float32),
           "condition": rng.uniform(size=(32, 10)).astype(np.float32)}
  results = []
  for devices in (1, 8):
    mesh = parallel.make_mesh(devices)
    step = parallel.data_parallel(gan_lib.make_gan_step(gan, global_batch=32, seed=0), mesh)
    state = parallel.replicate(gan_lib.init_gan_state(gan, 0), mesh)
    state, step_metrics = step(state, parallel.shard_batch(batch, mesh))
    results.append((jax.device_get(state), {k: float(v) for k, v in step_metrics.items()}))
  (one, m1), (eight, m8) = results
  assert int(one.step) == 1
  for a, b in zip(jax.tree.leaves(one.generator) + jax.tree.leaves(one.discriminator),
                  jax.tree.leaves(eight.generator) + jax.tree.leaves(eight.discriminator)):
    # Summation order differs (~1e-6 after one gradient). The extragradient step takes its second gradient at
    # the extrapolated point, and these tiny networks' gradients (pixel norm over 4-16 channels) amplify that
    # 1e-6 about 100-fold (measured 2e-4 at most), hence the looser bound there.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4 if optimiser == "extra_adam" else 1e-5)
  assert m1 == pytest.approx(m8, rel=1e-3 if optimiser == "extra_adam" else 1e-5)
  assert {"d_aux", "g_aux"} <= set(m1)  # the conditional smoke GAN has the AC-GAN head
  # The EMA warms up: at step 0 its decay is min(0.999, 1 / 10), so it is 0.1 init + 0.9 the new generator.
  init = gan_lib.init_gan_state(gan, 0)
  for e, p0, p1 in zip(jax.tree.leaves(one.generator_ema), jax.tree.leaves(init.generator),
                       jax.tree.leaves(one.generator)):
    np.testing.assert_allclose(e, 0.1 * np.asarray(p0) + 0.9 * np.asarray(p1), rtol=1e-5, atol=1e-6)


def test_discriminator_learns_to_tell_real_from_generated():
  """With the generator frozen, a few steps on one fixed batch drive the discriminator's RaHinge loss to ~0."""
  config = generate_config.get_config("smoke")
  config.gan.discriminator_learning_rate = 1e-3
  gan = dataclasses.replace(gan_lib.make_gan(config.gan, conditional=False), generator_tx=optax.sgd(0.0))
  t = np.arange(mel.CLIP_SAMPLES) / 16_000
  batch = {"audio": np.stack([np.sin(2 * np.pi * (300 + 50 * i) * t) for i in range(8)]).astype(np.float32),
           "condition": np.zeros((8, 10), np.float32)}
  mesh = parallel.make_mesh(1)
  step = parallel.data_parallel(gan_lib.make_gan_step(gan, global_batch=8, seed=0), mesh)
  state = parallel.replicate(gan_lib.init_gan_state(gan, 0), mesh)
  losses = []
  for _ in range(12):
    state, step_metrics = step(state, parallel.shard_batch(batch, mesh))
    losses.append(float(step_metrics["d_loss"]))
  assert np.all(np.isfinite(losses))
  assert max(losses[-3:]) < min(0.05, losses[0] / 2), losses


def test_smoke_run_trains_samples_and_scores(tmp_path):
  """`configs/generate.py:smoke` through main: wav folders, headers, lengths (trailing silence cut), not silent;
  finite FID per emotion;
  then mode=sample restores the same GAN and writes the same clips."""
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  command = [sys.executable, "-m", "exvo_jax.main", "--config=configs/generate.py:smoke", f"--workdir={workdir}"]
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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
  assert (workdir / "train_val_fid.png").exists()
  table3 = json.loads((workdir / "train_val_fid.json").read_text())
  assert np.array(table3["fid"], dtype=float).shape == (10, 10)
  first = soundfile.read(str(workdir / "samples" / "Awe" / "Awe_0001.wav"), dtype="int16")[0]

  (workdir / "samples" / "Awe" / "Awe_0001.wav").unlink()
  again = subprocess.run(command[:-1] + [f"--workdir={workdir}", "--config.mode=sample"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  np.testing.assert_array_equal(soundfile.read(str(workdir / "samples" / "Awe" / "Awe_0001.wav"),
                                               dtype="int16")[0], first)


def test_sample_mode_without_a_trained_gan_says_what_to_do(tmp_path):
  gan, config = _smoke_gan(True, "adam")
  mesh = parallel.make_mesh(1)
  with pytest.raises(FileNotFoundError, match="train it first"):
    generate.restore_gan(config, gan, "all", mesh, str(tmp_path))


def test_fid_matrix_marks_small_bins_nan():
  rng = np.random.default_rng(0)
  a, b, tiny = rng.normal(size=(40, 3)), rng.normal(1.0, 1.0, size=(40, 3)), rng.normal(size=(1, 3))
  matrix = fid.fid_matrix([a, b], [a, b, tiny])
  assert matrix[0, 0] == pytest.approx(0.0, abs=1e-6) and matrix[0, 1] > 1.0 and np.isnan(matrix[0, 2])
  assert matrix[0, 1] == pytest.approx(float(metrics.fid(a, b)))


def test_mode_seeking_loss_by_hand():
  rng = np.random.default_rng(0)
  first, second = rng.normal(size=(3, 4, 8, 1)), rng.normal(size=(3, 4, 8, 1))
  z1, z2 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  ratio = np.abs(first - second).mean(axis=(1, 2, 3)) / np.abs(z1 - z2).mean(axis=1)
  got = float(gan_lib.mode_seeking_loss(*(jnp.asarray(a) for a in (first, second, z1, z2))))
  assert got == pytest.approx(np.mean(1.0 / (ratio + 1e-5)), rel=1e-5)
  # Identical clips from different latents cost 1e5 per pair: the generator is pushed to spread them.
  assert float(gan_lib.mode_seeking_loss(jnp.asarray(first), jnp.asarray(first), jnp.asarray(z1),
                                          jnp.asarray(z2))) == pytest.approx(1e5)


def test_shuffled_label_control_separates_followed_from_ignored_conditions():
  """Generated sets that follow their condition score below the control; sets that ignore it do not."""
  rng = np.random.default_rng(0)
  centres = rng.normal(0.0, 2.0, size=(4, 6))
  bins = [c + rng.normal(size=(60, 6)) for c in centres]
  # A common offset from every bin (fakes look fake) plus the condition's own centre.
  follows = [c + 1.5 + rng.normal(size=(80, 6)) for c in centres]
  fids = [float(metrics.fid(g, b)) for g, b in zip(follows, bins)]
  control, spread = fid.shuffled_label_fid(follows, bins, num_shuffles=4, seed=0)
  assert control.shape == spread.shape == (4,)
  assert all(f < c for f, c in zip(fids, control))
  # Same seed, same control; each permutation keeps the set sizes, so the pooled clips are all used once.
  np.testing.assert_array_equal(fid.shuffled_label_fid(follows, bins, num_shuffles=4, seed=0)[0], control)
  # A generator that ignores its condition: every set is a draw from the same mixture.
  mixture = np.concatenate(follows)
  ignores = [mixture[rng.permutation(len(mixture))[:80]] for _ in centres]
  ignored_fids = np.array([float(metrics.fid(g, b)) for g, b in zip(ignores, bins)])
  ignored_control, _ = fid.shuffled_label_fid(ignores, bins, num_shuffles=8, seed=1)
  assert np.abs(ignored_fids - ignored_control).max() < 0.25 * ignored_control.min()
  assert (ignored_fids >= ignored_control).any()
  # A set smaller than min_clips gets NaN.
  tiny, _ = fid.shuffled_label_fid([follows[0], follows[1][:1]], bins[:2], num_shuffles=2)
  assert np.isfinite(tiny[0]) and np.isnan(tiny[1])


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


def test_without_validation_scores_the_latest_checkpoint_is_sampled(tmp_path):
  config = generate_config.get_config("smoke")
  config.gan.steps, config.gan.sample_every = 2, 100
  gan = gan_lib.make_gan(config.gan, conditional=False)
  source = [{"audio": np.full(mel.CLIP_SAMPLES, 100 * k, np.int16), "emotions": np.zeros(10, np.float32),
             "file_id": f"c{k}", "speaker": "s"} for k in range(8)]
  mesh = parallel.make_mesh(1)
  generate.train_gan(config, gan, "Awe", source, mesh, str(tmp_path), log=lambda _: None)
  state, which = generate.restore_gan(config, gan, "Awe", mesh, str(tmp_path))
  assert which == {"checkpoint": "latest", "step": 2, "val_fid": None, "latest_step": 2}
  assert int(state.step) == 2


def test_generated_clips_are_asked_for_the_bin_labels_or_their_mean():
  config = generate_config.get_config("smoke")
  labels = np.random.default_rng(0).uniform(size=(9, 10))
  bins = {e: np.array([], int) for e in schema.EMOTIONS}
  bins["Awe"], bins["Fear"] = np.array([0, 3, 5]), np.array([1, 2, 4, 6, 7, 8])
  conditions = sampling.sample_conditions(config.sample.condition, labels, bins)  # default: bin_labels
  np.testing.assert_array_equal(conditions["Awe"], labels[[0, 3, 5]])
  np.testing.assert_array_equal(conditions["Horror"], np.eye(10)[[5]])  # an empty bin: its one-hot vector
  # Dealt in shuffled rounds: every row once per round, so 7 clips use each of 3 rows 2 or 3 times.
  dealt = sampling.deal_conditions(conditions["Awe"], 7, np.random.default_rng(1))
  assert dealt.shape == (7, 10) and dealt.dtype == np.float32
  rows = [int(np.flatnonzero(np.isclose(labels[[0, 3, 5]], d).all(1))[0]) for d in dealt]
  assert sorted(rows[:3]) == [0, 1, 2] and sorted(rows[3:6]) == [0, 1, 2] and rows[6] in (0, 1, 2)
  np.testing.assert_array_equal(sampling.deal_conditions(conditions["Awe"], 7, np.random.default_rng(1)), dealt)
  config.sample.condition = "bin_mean"
  conditions = sampling.sample_conditions(config.sample.condition, labels, bins)
  np.testing.assert_allclose(conditions["Fear"], labels[[1, 2, 4, 6, 7, 8]].mean(0))
  np.testing.assert_allclose(sampling.deal_conditions(conditions["Fear"], 4, None),
                             np.tile(labels[[1, 2, 4, 6, 7, 8]].mean(0), (4, 1)), rtol=1e-6)
