"""Fine-tuning a speech encoder: the model's pieces against hand-computed references, the optimiser's layer-wise
rates, the CCC loss against numpy, the config checks, and the trainer through `main` (A-VB jointly with uncertainty
weighting; FewShot on the encoder with SIGTERM and resume). The loop's resume-equals-uninterrupted and NaN checks
run on this trainer in tests/test_loop.py."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import smoke
from configs import avb as avb_config
from configs import fewshot as fewshot_config
from exvo_jax import config_check
from exvo_jax import ssl_trainer
from exvo_jax import targets
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.models import speech_model
from exvo_jax.models import ssl

TINY = ssl.EncoderConfig(conv_dim=(16,) * 7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)


# ---------------------------------------------------------------------------------------------------------------
# The model's pieces.

def test_time_masks_are_spans_inside_the_clip_covering_the_expected_share():
  """Each frame starts a span with probability p / L: a frame is masked unless none of the L starts that reach it
  fired, so the masked share is 1 - (1 - p / L)^L away from the clip's start; spans never leave the valid frames,
  and every masked run is at least L frames long unless it meets the clip's end."""
  prob, length, frames = 0.5, 10, 400
  valid = np.array([400, 250, 37, 0] * 64)
  frame_mask = np.arange(frames)[None, :] < valid[:, None]
  mask = np.asarray(speech_model.sample_time_mask(jax.random.key(0), jnp.asarray(frame_mask), prob, length))
  assert not (mask & ~frame_mask).any()
  share = mask[valid == 400][:, length:].mean()
  assert share == pytest.approx(1 - (1 - prob / length) ** length, abs=0.01)
  for row, n in zip(mask, valid):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row[:n].astype(int), [0]])))
    for start, stop in zip(edges[::2], edges[1::2]):
      assert stop - start >= length or stop == n, (start, stop, n)
  other = np.asarray(speech_model.sample_time_mask(jax.random.key(1), jnp.asarray(frame_mask), prob, length))
  assert (other != mask).any()


def test_attention_pooling_ignores_padded_frames_and_keeps_a_constant():
  pool = speech_model.AttentionPooling(hidden=8)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 5)).astype(np.float32)
  params = pool.init(jax.random.key(0), x, np.ones((2, 12), bool))
  mask = np.arange(12)[None, :] < np.array([[7], [12]])
  garbage = x.copy()
  garbage[0, 7:] = 1e3
  alone = pool.apply(params, x[:1, :7], np.ones((1, 7), bool))
  padded = pool.apply(params, garbage, mask)
  np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-6)
  constant = np.broadcast_to(rng.normal(size=(1, 1, 5)), (2, 12, 5)).astype(np.float32)
  np.testing.assert_allclose(pool.apply(params, constant, mask), constant[:, 0], rtol=1e-5, atol=1e-6)


def test_the_chain_reads_earlier_outputs_only_and_teacher_forcing_is_its_fixed_point():
  """Numpy reference: y_k = h w_k + b_k + sum_{j<k} y_j v_jk, computed one output at a time."""
  head = speech_model.ChainHead(4)
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 6)).astype(np.float32)
  params = head.init(jax.random.key(0), h)
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  w, b = np.asarray(params["params"]["features"]["kernel"]), np.asarray(params["params"]["features"]["bias"])
  v = np.asarray(params["params"]["chain"])
  expected = np.zeros((3, 4))
  for k in range(4):
    expected[:, k] = h @ w[:, k] + b[k] + sum(expected[:, j] * v[j, k] for j in range(k))
  own = np.asarray(head.apply(params, h))
  np.testing.assert_allclose(own, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(head.apply(params, h, teacher=own), own, rtol=1e-4, atol=1e-5)
  teacher = rng.normal(size=(3, 4)).astype(np.float32)
  # d output[0, k] / d teacher[0, j], as [j, k]: v_jk above the diagonal, 0 where j >= k.
  jacobian = np.asarray(jax.jacobian(lambda t: head.apply(params, h, teacher=t)[0])(teacher))[:, 0, :].T
  assert np.all(jacobian[np.tril_indices(4)] == 0)  # output k never reads teacher values j >= k
  np.testing.assert_allclose(jacobian[np.triu_indices(4, 1)], v[np.triu_indices(4, 1)], rtol=1e-6)


def _model(config=TINY, **kwargs):
  return speech_model.SpeechModel(config, num_outputs=3, **kwargs)


def _batch():
  rng = np.random.default_rng(1)
  audio = rng.normal(size=(2, 4800)).astype(np.float32)
  length = np.array([4800, 3100], np.int32)
  audio[1, 3100:] = 0.0
  return audio, length


def test_a_padded_clip_predicts_what_it_predicts_alone():
  model = _model()
  audio, length = _batch()
  params = model.init(jax.random.key(0), audio, length)
  both = model.apply(params, audio, length)
  alone = model.apply(params, audio[1:, :3100], length[1:])
  np.testing.assert_allclose(both["outputs"][1], alone["outputs"][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(both["embedding"][1], alone["embedding"][0], rtol=1e-4, atol=1e-5)
  padding_row = model.apply(params, np.zeros((1, 4800), np.float32), np.zeros(1, np.int32))["outputs"]
  assert np.isfinite(padding_row).all()  # a batch's padding row (length 0) reads as a silent frame


@pytest.mark.parametrize("freeze, frozen", [("none", ()), ("feature_encoder", ("feature_extractor",)),
                                            ("encoder", ("feature_extractor", "feature_projection", "encoder"))])
def test_freezing_stops_exactly_the_frozen_parameters_gradients(freeze, frozen):
  short_spans = ssl.EncoderConfig(**{**TINY.__dict__, "mask_time_length": 2})  # a mask surely falls on 14 frames
  model = _model(short_spans, freeze=freeze, mask_time_prob=0.8)
  audio, length = _batch()
  params = model.init(jax.random.key(0), audio, length)["params"]

  def loss(p):
    out = model.apply({"params": p}, audio, length, train=True,
                      rngs={"mask": jax.random.key(1), "dropout": jax.random.key(2)})
    return jnp.sum(out["outputs"] ** 2)

  grads = flax.traverse_util.flatten_dict(jax.grad(loss)(params))
  for path, g in grads.items():
    if path[0] == "encoder" and path[1] == "masked_spec_embed":
      continue  # trained only where a mask falls, frozen or not (its gradient is checked below)
    is_frozen = path[0] == "encoder" and path[1] in frozen
    assert (np.abs(np.asarray(g)).max() == 0) == is_frozen, (path, freeze)
  if freeze != "encoder":  # time masking replaced some frames by the learned vector
    assert np.abs(np.asarray(grads[("encoder", "masked_spec_embed")])).max() > 0


def test_training_draws_masks_and_dropout_from_its_rngs_and_evaluation_is_deterministic():
  model = _model(mask_time_prob=0.3)
  audio, length = _batch()
  params = model.init(jax.random.key(0), audio, length)
  run = lambda k: np.asarray(model.apply(params, audio, length, train=True,
                                         rngs={"mask": jax.random.key(k), "dropout": jax.random.key(k)})["outputs"])
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))
  np.testing.assert_array_equal(model.apply(params, audio, length)["outputs"],
                                model.apply(params, audio, length)["outputs"])


# ---------------------------------------------------------------------------------------------------------------
# The optimiser and the losses.

def test_layer_wise_rates_and_the_first_adam_step_moves_each_parameter_by_its_rate():
  """Adam's first step is lr * g / (|g| + eps): each parameter with a gradient moves by its own rate."""
  model = _model()
  audio, length = _batch()
  params = model.init(jax.random.key(0), audio, length)["params"]
  rates = flax.traverse_util.flatten_dict(ssl_trainer.learning_rates(params, TINY, 1e-3, 1e-4, 0.5))
  assert rates[("head", "kernel")] == 1e-3 and rates[("pooling", "proj", "kernel")] == 1e-3
  layer = ("encoder", "encoder", "layers_{}", "attention", "q_proj", "kernel")
  assert rates[tuple(p.format(1) for p in layer)] == pytest.approx(1e-4)  # the top layer (L = 2)
  assert rates[tuple(p.format(0) for p in layer)] == pytest.approx(0.5e-4)
  assert rates[("encoder", "feature_extractor", "conv_layers_0", "conv", "kernel")] == pytest.approx(0.25e-4)
  stable = ssl.EncoderConfig(**{**TINY.__dict__, "do_stable_layer_norm": True})
  stable_rates = flax.traverse_util.flatten_dict(ssl_trainer.learning_rates(params, stable, 1e-3, 1e-4, 0.5))
  assert stable_rates[("encoder", "encoder", "layer_norm", "scale")] == pytest.approx(1e-4)  # the top norm
  assert rates[("encoder", "encoder", "layer_norm", "scale")] == pytest.approx(0.25e-4)  # post-LN: below layer 0

  tree = ssl_trainer.learning_rates(params, TINY, 1e-3, 1e-4, 0.5)
  tx = optax.chain(optax.scale_by_adam(eps=1e-30), ssl_trainer.scale_by_tree(tree, warmup_steps=4))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.7), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in flax.traverse_util.flatten_dict(updates).items():
    np.testing.assert_allclose(np.asarray(u), -rates[path] / 4, rtol=1e-5, err_msg=str(path))  # warm-up 1 of 4


def _numpy_ccc(x, y):
  mx, my = x.mean(0), y.mean(0)
  cov = ((x - mx) * (y - my)).mean(0)
  return 2 * cov / (x.var(0) + y.var(0) + (mx - my) ** 2)


def test_the_ccc_loss_is_one_minus_the_mean_ccc_of_the_known_rows():
  rng = np.random.default_rng(0)
  target = targets.get("avb_two")
  pred = rng.normal(size=(12, 2)).astype(np.float32)
  labels = (0.5 * pred + rng.normal(size=(12, 2))).astype(np.float32)
  expected = 1 - _numpy_ccc(pred.astype(np.float64), labels.astype(np.float64)).mean()
  assert float(target.ccc_loss(pred, labels)) == pytest.approx(expected, abs=1e-5)
  assert float(target.objective(pred, labels, "ccc")) == pytest.approx(expected, abs=1e-5)
  mse = np.mean((pred - labels) ** 2)
  assert float(target.objective(pred, labels, "mse+ccc")) == pytest.approx(expected + mse, abs=1e-5)
  holes = labels.copy()
  holes[[2, 5]] = np.nan
  keep = np.isfinite(holes).all(1)
  assert float(target.ccc_loss(pred, holes)) == pytest.approx(
      1 - _numpy_ccc(pred[keep].astype(np.float64), labels[keep].astype(np.float64)).mean(), abs=1e-5)
  assert np.isfinite(np.asarray(jax.grad(lambda p: target.ccc_loss(p, holes))(pred))).all()
  country = targets.get("country")  # a classification keeps its cross-entropy
  logits, classes = rng.normal(size=(5, len(country.names))), np.arange(5) % len(country.names)
  assert float(country.objective(logits, classes, "ccc")) == pytest.approx(float(country.loss(logits, classes)))


# ---------------------------------------------------------------------------------------------------------------
# Config checks and the trainer through main.

def test_fine_tuning_settings_fail_before_any_work():
  config = avb_config.get_config("smoke,model=ssl,all")
  ssl_trainer.check_config(config, targets.Joint([targets.get("avb_high"), targets.get("avb_type")]))
  cases = [("ssl.freeze", "cnn", "is not one of"), ("ssl.loss", "l1", "is not one of"),
           ("ssl.dtype", "float16", "is not one of"), ("ssl.layer_decay", 1.5, "layer_decay"),
           ("ssl.mask_time_prob", 1.0, "mask_time_prob"), ("encoder.layer", "9", "layer number 0..4"),
           ("ssl.chain", True, "chain=True chains regression outputs")]
  for key, value, message in cases:
    bad = avb_config.get_config("smoke,model=ssl,all")
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(config_check.ConfigError, match=message):
      ssl_trainer.check_config(bad, targets.Joint([targets.get("avb_high"), targets.get("avb_type")]))
  with pytest.raises(ValueError, match="model=ssl fine-tunes the encoder"):
    avb_config.get_config("model=ssl,egemaps")
  typo = smoke.run_main("configs/avb.py:smoke,model=ssl", "/nonexistent/never", "--config.ssl.freez=none",
                        check=False)
  assert typo.returncode != 0 and "freez" in typo.stderr + typo.stdout


def test_avb_jointly_on_a_fine_tuned_encoder_with_uncertainty_weighting_through_main(tmp_path):
  done = smoke.run_main("configs/avb.py:smoke,model=ssl,all,uncertainty", tmp_path)
  assert "RANDOMLY INITIALISED, UNTRAINED encoder" in done.stdout
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert result["model"] == "ssl" and result["encoder"]["untrained"] and result["ssl"]["freeze"] == "feature_encoder"
  (seed,) = result["seeds"]
  assert {"avb_high/mean_ccc", "avb_type/uar", "mean_score"} <= set(seed["val"])
  for task in ("High", "Two", "Culture", "Type"):
    assert (tmp_path / f"A-VB-{task}_exvo_jax_1.csv").is_file()
  stage = json.loads((tmp_path / "checkpoints" / "base" / "stage.json").read_text())["record"]
  assert stage["model"] == "ssl" and stage["encoder.weights"] == "random" and stage["uncertainty_weighting"]
  logs = [json.loads(line) for line in (tmp_path / "metrics_log.jsonl").read_text().splitlines()]
  assert any("loss_avb_type" in entry for entry in logs)  # each task's own loss is logged beside the total


def test_fewshot_on_a_fine_tuned_encoder_resumes_after_sigterm_like_an_uninterrupted_run(tmp_path):
  """FewShot with the encoder in Emo18's place and MAML on its pooling and head. A SIGTERM during base training
  (the fine-tuning trainer) exits 0; the rerun finishes fine-tuning, meta-trains and ends with the uninterrupted
  run's scores and a byte-identical submission."""
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  flags = (f"--config.data.root={root}", f"--config.data.tfds_dir={builders.default_data_dir(root)}",
           "--config.max_seconds=2.0", "--config.ssl.mask_time_prob=0.2")
  config = "configs/fewshot.py:smoke,model=ssl,adaptation=maml"
  assert fewshot_config.get_config("smoke,model=ssl").adapt_subset == ("pooling", "head")
  smoke.run_main(config, tmp_path / "reference", *flags)
  reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())
  assert reference["model"] == "ssl" and set(reference["results"]) == {"none", "maml"}
  stopped = smoke.run_main(config, tmp_path / "run", *flags, sigterm_at=("exvo_jax.emo18_trainer:device_batch", 3))
  assert "preempted" in stopped.stdout and not (tmp_path / "run" / "metrics.json").exists(), stopped.stdout[-2000:]
  again = smoke.run_main(config, tmp_path / "run", *flags)
  assert "base model: resumed at step 3 of 6" in again.stdout, again.stdout[-2000:]
  result = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert result["results"] == reference["results"]
  assert result["base"]["history"] == reference["base"]["history"]
  name = reference["submission"]
  assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()

