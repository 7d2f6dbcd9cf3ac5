"""Frozen speech-encoder embeddings as a feature set: extraction against PyTorch per clip, the cache, short clips,
the MLP's weighted sum over layers, the config checks and the smoke runs through main."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import smoke
from configs import avb as avb_config
from configs import multitask as multitask_config
from exvo_jax import config_check
from exvo_jax import mlp_trainer
from exvo_jax import runtime
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.features import ssl_embeddings
from exvo_jax.models import mlp

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
LENGTHS = (16000, 250, 9000, 12345, 400, 23000, 5000)  # one shorter than the receptive field (400 samples)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY, attn_implementation="eager")).eval()
  folder = tmp_path_factory.mktemp("tiny_wav2vec2")
  model.save_pretrained(folder)  # no preprocessor_config.json: clips are normalised (the extractor's default)
  return model, folder


@pytest.fixture(scope="module")
def clips():
  rng = np.random.default_rng(0)
  return {f"clip{i}": (rng.normal(size=n) * 3000).astype(np.int16) for i, n in enumerate(LENGTHS)}


def _reference(model, samples, pooling):
  """PyTorch on the clip alone: int16 -> [-1, 1), zero-padded to 400 samples, normalised, every hidden state
  pooled over its frames (float64 numpy)."""
  x = samples.astype(np.float64) / 32768.0
  x = np.pad(x, (0, max(400 - len(x), 0)))
  x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
  with torch.no_grad():
    hidden = model(torch.tensor(x[None], dtype=torch.float32), output_hidden_states=True).hidden_states
  hidden = np.stack([h[0].numpy().astype(np.float64) for h in hidden])  # [layers + 1, frames, H]
  mean = hidden.mean(axis=1)
  return mean if pooling == "mean" else np.concatenate([mean, hidden.std(axis=1)], axis=-1)


@pytest.mark.parametrize("pooling", ["mean", "mean_std"])
def test_embeddings_equal_pytorch_on_each_clip_alone(checkpoint, clips, tmp_path, pooling):
  """Batches of 3 clips of different lengths (padded to 1 s buckets) give each clip what PyTorch gives it alone."""
  model, folder = checkpoint
  lines = []
  encoder = ssl_embeddings.load_encoder(str(folder), log=lines.append)
  assert not encoder.untrained
  values, short = ssl_embeddings.extract(list(clips), [len(c) for c in clips.values()], clips.__getitem__,
                                         encoder, tmp_path, pooling=pooling, batch_size=3, log=lines.append)
  assert short == ["clip1"]
  for stem, samples in clips.items():
    expected = _reference(model, samples, pooling)
    assert values[stem].shape == expected.shape == (3, 32 * (1 if pooling == "mean" else 2))
    np.testing.assert_allclose(values[stem], expected, atol=2e-4, rtol=0, err_msg=stem)


def test_extraction_resumes_from_the_cache_and_reports_short_clips(checkpoint, clips, tmp_path):
  _, folder = checkpoint
  encoder = ssl_embeddings.load_encoder(str(folder), log=lambda line: None)
  lengths = [len(c) for c in clips.values()]
  lines = []
  first, _ = ssl_embeddings.extract(list(clips), lengths, clips.__getitem__, encoder, tmp_path, batch_size=4,
                                    log=lines.append)
  assert any("1 clip(s) shorter than the encoder's receptive field (400 samples = 25 ms) are zero-padded to it: "
             "clip1" in line for line in lines)
  (tmp_path / "clip3.npy").unlink()
  read = []
  lines.clear()
  again, _ = ssl_embeddings.extract(list(clips), lengths, lambda stem: read.append(stem) or clips[stem], encoder,
                                    tmp_path, batch_size=4, log=lines.append)
  assert read == ["clip3"] and any("6 of 7 clips cached, embedding 1" in line for line in lines)
  for stem in clips:
    np.testing.assert_allclose(again[stem], first[stem], atol=1e-5, rtol=0)


def test_sigterm_stops_between_batches_with_the_finished_batches_cached(checkpoint, clips, tmp_path, monkeypatch):
  _, folder = checkpoint
  encoder = ssl_embeddings.load_encoder(str(folder), log=lambda line: None)
  lengths = [len(c) for c in clips.values()]
  saves = []
  original = ssl_embeddings.save_batch

  def save_then_signal(cache, stems, pooled):
    original(cache, stems, pooled)
    saves.append(stems)
    runtime.preemption.requested = True  # what the SIGTERM handler sets

  monkeypatch.setattr(ssl_embeddings, "save_batch", save_then_signal)
  monkeypatch.setattr(runtime.preemption, "requested", False)
  with pytest.raises(runtime.Preempted, match=r"embedding stopped after 2 of 7 clips; they are cached in"):
    ssl_embeddings.extract(list(clips), lengths, clips.__getitem__, encoder, tmp_path, batch_size=2)
  assert len(saves) == 1 and sorted(p.name for p in tmp_path.glob("*.npy")) == sorted(f"{s}.npy" for s in saves[0])


def test_the_random_encoder_is_announced_as_untrained_and_its_cache_named_by_its_weights():
  lines = []
  encoder = ssl_embeddings.load_encoder("", seed=0, log=lines.append)
  assert encoder.untrained and "UNTRAINED" in encoder.description
  assert any("RANDOMLY INITIALISED, UNTRAINED encoder" in line for line in lines)
  other = ssl_embeddings.load_encoder("", seed=1, log=lambda line: None)
  assert ssl_embeddings.load_encoder("", seed=0, log=lambda line: None).key == encoder.key != other.key


def test_the_mlp_weighted_sum_is_a_softmax_over_layers():
  """MultiTaskMLP(layers=3) on [B, 3 * P] equals the 1-layer MLP with the same trunk and heads applied to the
  softmax-weighted sum of the three blocks, computed here in numpy."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3 * 4)).astype(np.float32)
  weighted = mlp.MultiTaskMLP(layers=3)
  params = weighted.init(jax.random.key(0), x)["params"]
  params = dict(params, layer_weights=jnp.array([0.5, -1.0, 2.0]))
  w = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
  combined = np.einsum("l,blp->bp", w, x.reshape(5, 3, 4))
  single = mlp.MultiTaskMLP(layers=1)
  expected = single.apply({"params": {k: v for k, v in params.items() if k != "layer_weights"}}, combined)
  got = weighted.apply({"params": params}, x)
  for head in expected:
    np.testing.assert_allclose(got[head], expected[head], atol=1e-5, rtol=0)


def test_encoder_settings_fail_before_any_work(tmp_path):
  config = multitask_config.get_config("ssl")
  mlp_trainer.check_features(config)  # the defaults are valid
  assert mlp_trainer.input_layers(config) == ssl_embeddings.RANDOM_ENCODER.num_hidden_layers + 1
  for key, value, message in (
      ("layer", "7", r"encoder\.layer='7': expected 'weighted', 'last' or a layer number 0\.\.4"),
      ("pooling", "max", r"encoder\.pooling='max' is not one of: mean, mean_std"),
      ("checkpoint", str(tmp_path / "nowhere"), r"encoder\.checkpoint: .*nowhere: no such checkpoint folder")):
    bad = multitask_config.get_config("ssl")
    bad.encoder[key] = value
    with pytest.raises(config_check.ConfigError, match=message):
      mlp_trainer.check_features(bad)
  fused = multitask_config.get_config("fusion=ssl+egemaps")
  with pytest.raises(config_check.ConfigError, match=r"layer=weighted reads the encoder's layers alone"):
    mlp_trainer.check_features(fused)
  fused.encoder.layer = "last"
  mlp_trainer.check_features(fused)
  assert mlp_trainer.input_layers(fused) == 1


def test_multitask_on_encoder_embeddings_runs_through_main_and_resumes_after_sigterm(tmp_path):
  """The smoke run on the random encoder writes metrics; a SIGTERM during the embedding (a fresh cache) exits 0,
  and the rerun ends with the uninterrupted run's metrics and submission."""
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  flags = (f"--config.data.root={root}", f"--config.data.tfds_dir={builders.default_data_dir(root)}",
           "--config.encoder.batch_size=16")
  done = smoke.run_main("configs/multitask.py:ssl,smoke", tmp_path / "reference", *flags)
  assert "RANDOMLY INITIALISED, UNTRAINED encoder" in done.stdout
  reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())
  assert reference["features"] == ["ssl"] and len(reference["seeds"]) == 2
  env = {"EXVO_CACHE": str(tmp_path / "cache")}
  stopped = smoke.run_main("configs/multitask.py:ssl,smoke", tmp_path / "run", *flags, env=env,
                           sigterm_at=("exvo_jax.features.ssl_embeddings:save_batch", 2))
  assert "preempted: embedding stopped after 32 of 96 clips" in stopped.stdout, stopped.stdout[-2000:]
  assert len(list((tmp_path / "cache").rglob("*.npy"))) == 32
  again = smoke.run_main("configs/multitask.py:ssl,smoke", tmp_path / "run", *flags, env=env)
  assert "32 of 96 clips cached, embedding 64" in again.stdout
  result = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert result["seeds"] == reference["seeds"]
  assert ((tmp_path / "run" / result["submission"]).read_bytes()
          == (tmp_path / "reference" / reference["submission"]).read_bytes())


def test_avb_on_encoder_embeddings_runs_through_main(tmp_path):
  config = avb_config.get_config("ssl,smoke,type")
  assert config.features.sets == ("ssl",)
  done = smoke.run_main("configs/avb.py:ssl,smoke,type", tmp_path, "--config.encoder.layer=last")
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert "UNTRAINED" in done.stdout and "type" in json.dumps(result)
  assert list(tmp_path.glob("A-VB-Type_*.csv"))


def test_seed_records_name_the_encoder_s_weights_only_when_its_embeddings_are_used(checkpoint, tmp_path):
  """Other feature sets' records (and metrics.json's keys) are as before; with a checkpoint the record holds what
  identifies its weights, not its path or the random encoder's seed."""
  plain = multitask_config.get_config("egemaps")
  assert not [k for k in mlp_trainer.seed_record(plain, 0) if k.startswith("encoder")]
  assert mlp_trainer.encoder_summary(plain) == {}
  _, folder = checkpoint
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in ("config.json", "model.safetensors"):
    (copy / name).write_bytes((folder / name).read_bytes())
  records = []
  for path, seed in ((folder, 0), (copy, 5)):
    config = multitask_config.get_config("ssl")
    config.encoder.checkpoint, config.encoder.seed = str(path), seed
    records.append(mlp_trainer.seed_record(config, 0))
  assert records[0] == records[1]  # the same weights at another path, another (unused) seed
  assert "encoder.checkpoint" not in records[0] and "encoder.seed" not in records[0]
  (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b"\0" * 8)
  config = multitask_config.get_config("ssl")
  config.encoder.checkpoint = str(copy)
  assert mlp_trainer.seed_record(config, 0)["encoder.weights"] != records[0]["encoder.weights"]
  random = multitask_config.get_config("ssl")
  assert mlp_trainer.seed_record(random, 0)["encoder.weights"] == "random"
  assert mlp_trainer.seed_record(random, 0)["encoder.seed"] == 0


def test_conflicting_variants_and_release_features_are_refused():
  with pytest.raises(ValueError, match="config variant ssl chooses the feature set"):
    multitask_config.get_config("ssl,egemaps")
  with pytest.raises(ValueError, match="config variant ssl chooses the feature set"):
    avb_config.get_config("ssl,boaw=500")
  config = multitask_config.get_config("ssl")
  config.features.from_release = True
  with pytest.raises(config_check.ConfigError, match=r"from_release=True reads the release's feats/"):
    mlp_trainer.check_features(config)
