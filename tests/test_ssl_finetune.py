"""Fine-tuning a speech encoder: the model's pieces against hand-computed references, the optimiser's layer-wise
rates, the CCC loss against numpy, the config checks, and the trainer through `main` (A-VB jointly with uncertainty
weighting; FewShot on the encoder with SIGTERM and resume). The loop's resume-equals-uninterrupted and NaN checks
run on this trainer in tests/test_loop.py."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke
from configs import avb as avb_config
from configs import fewshot as fewshot_config
from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import parallel
from exvo_jax import ssl_trainer
from exvo_jax import targets
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.features import ssl_embeddings
from exvo_jax.models import speech_model
from exvo_jax.models import ssl
from exvo_jax.tasks import fewshot

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


def test_remat_per_layer_recomputes_the_same_outputs_and_gradients():
  audio, length = _batch()
  plain, remat = _model(), _model(remat=True)
  params = plain.init(jax.random.key(0), audio, length)["params"]

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, audio, length)["outputs"] ** 2)

  np.testing.assert_allclose(loss(remat, params), loss(plain, params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.grad(lambda p: loss(remat, p))(params)),
                  jax.tree.leaves(jax.grad(lambda p: loss(plain, p))(params)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


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

def test_layer_wise_rates_and_the_first_adam_step_of_the_trainer_s_state_moves_each_parameter_by_its_rate():
  """Adam's first step is lr * g / (|g| + eps): each parameter moves by its own rate, times the warm-up's 1/4."""
  config = fewshot_config.get_config("smoke,model=ssl")
  config.learning_rate, config.ssl.encoder_learning_rate, config.ssl.layer_decay, config.ssl.warmup_steps = (
      1e-3, 1e-4, 0.5, 4)
  model = _model()
  audio, length = _batch()
  encoder_params = ssl.SpeechEncoder(TINY).init(jax.random.key(5), audio[:, :400])["params"]
  encoder = ssl_embeddings.Encoder(TINY, encoder_params, "tiny", "key", True)
  state = ssl_trainer.make_state_fn(config, model, encoder)({"audio": audio, "length": length})
  flat = flax.traverse_util.flatten_dict(state.params)
  for path, value in flax.traverse_util.flatten_dict(encoder_params).items():  # the encoder's weights are put in
    np.testing.assert_array_equal(flat[("encoder", *path)], value)
  rates = flax.traverse_util.flatten_dict(ssl_trainer.learning_rates(state.params, TINY, 1e-3, 1e-4, 0.5))
  assert rates[("head", "kernel")] == 1e-3 and rates[("pooling", "proj", "kernel")] == 1e-3
  layer = ("encoder", "encoder", "layers_{}", "attention", "q_proj", "kernel")
  assert rates[tuple(p.format(1) for p in layer)] == pytest.approx(1e-4)  # the top layer (L = 2)
  assert rates[tuple(p.format(0) for p in layer)] == pytest.approx(0.5e-4)
  assert rates[("encoder", "feature_extractor", "conv_layers_0", "conv", "kernel")] == pytest.approx(0.25e-4)
  assert rates[("encoder", "encoder", "layer_norm", "scale")] == pytest.approx(0.25e-4)  # post-LN: below layer 0
  stepped = state.apply_gradients(grads=jax.tree.map(lambda p: jnp.full_like(p, 0.7), state.params))
  before = flax.traverse_util.flatten_dict(state.params)
  after = flax.traverse_util.flatten_dict(stepped.params)
  for path, rate in rates.items():
    start = np.asarray(before[path], np.float64)
    rounding = 2 * np.finfo(np.float32).eps * max(np.abs(start).max(), 1e-3)  # float32 steps of the parameter
    np.testing.assert_allclose(np.asarray(after[path], np.float64) - start, -rate / 4, rtol=1e-4, atol=rounding,
                               err_msg=str(path))


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


def test_the_ccc_loss_of_a_data_parallel_step_is_the_global_batch_s_with_its_gradient():
  """Two devices of 2 clips each: the loss and the pmean'ed gradient equal one device's on the 4 clips (where each
  device's own CCC would differ)."""
  target = targets.get("avb_two")
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  labels = rng.uniform(size=(4, 2)).astype(np.float32)
  labels[1, 0] = np.nan  # an unknown row, left out on its device
  w = rng.normal(size=(3, 2)).astype(np.float32)

  def step(w, batch):
    loss, grad = jax.value_and_grad(lambda w: target.ccc_loss(batch["x"] @ w, batch["labels"], True,
                                                              parallel.DATA_AXIS))(w)
    return jax.lax.pmean(loss, parallel.DATA_AXIS), jax.lax.pmean(grad, parallel.DATA_AXIS)

  loss, grad = parallel.data_parallel(step, parallel.make_mesh(2), donate_argnums=())(w, {"x": x, "labels": labels})
  whole_loss, whole_grad = jax.value_and_grad(lambda w: target.ccc_loss(x @ w, labels))(w)
  keep = np.isfinite(labels).all(1)
  expected = 1 - _numpy_ccc((x @ w)[keep].astype(np.float64), labels[keep].astype(np.float64)).mean()
  assert float(loss) == pytest.approx(expected, abs=1e-5) and float(whole_loss) == pytest.approx(expected, abs=1e-5)
  np.testing.assert_allclose(grad, whole_grad, rtol=1e-4, atol=1e-6)
  halves = [float(target.ccc_loss(x[i:i + 2] @ w, labels[i:i + 2])) for i in (0, 2)]
  assert all(abs(h - expected) > 1e-3 for h in halves)  # what each device alone would have trained on


def test_the_chain_reads_its_own_output_where_a_teacher_value_is_unknown():
  head = speech_model.ChainHead(3)
  rng = np.random.default_rng(2)
  h = rng.normal(size=(2, 5)).astype(np.float32)
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), head.init(jax.random.key(0), h))
  own = np.asarray(head.apply(params, h))
  teacher = rng.normal(size=(2, 3)).astype(np.float32)
  holes = teacher.copy()
  holes[0, 0] = np.nan
  filled = teacher.copy()
  filled[0, 0] = own[0, 0]
  np.testing.assert_allclose(head.apply(params, h, teacher=holes), head.apply(params, h, teacher=filled), rtol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(head.apply(p, h, teacher=holes) ** 2))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


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
  type_only = avb_config.get_config("smoke,model=ssl,type")
  type_only.ssl.loss = "ccc"
  with pytest.raises(config_check.ConfigError, match="no regression to take a CCC loss"):
    ssl_trainer.check_config(type_only, targets.Joint([targets.get("avb_type")]))
  with pytest.raises(ValueError, match="model=ssl fine-tunes the encoder"):
    avb_config.get_config("model=ssl,egemaps")
  typo = smoke.run_main("configs/avb.py:smoke,model=ssl", "/nonexistent/never", "--config.ssl.freez=none",
                        check=False)
  assert typo.returncode != 0 and "freez" in typo.stderr + typo.stdout


def test_time_masking_needs_the_checkpoint_s_masked_spec_embed(tmp_path):
  """A config.json with both mask probabilities 0 has no masked_spec_embed: time masking is refused before any work
  (the weight file is only looked for, not read)."""
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2", "mask_time_prob": 0.0}))
  (tmp_path / "model.safetensors").write_bytes(b"")
  config = avb_config.get_config("smoke,model=ssl")
  config.encoder.checkpoint = str(tmp_path)
  joint = targets.Joint([targets.get("avb_high")])
  with pytest.raises(config_check.ConfigError, match="needs the checkpoint's masked_spec_embed"):
    ssl_trainer.check_config(config, joint)
  config.ssl.mask_time_prob = 0.0
  ssl_trainer.check_config(config, joint)


def test_fewshot_refuses_an_adapt_subset_that_names_nothing_of_its_model():
  config = fewshot_config.get_config("smoke,adaptation=finetune")
  config.model = "ssl"  # set by a flag, not the variant: Emo18's subset stays
  with pytest.raises(config_check.ConfigError, match=r"'lstm' names no parameter of the ssl model; its top-level "
                                                      r"parameters are encoder, head, layer_weights, pooling"):
    fewshot.check_config(config)
  config.adapt_subset = ("pooling", "head")
  fewshot.check_config(config)


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
  scalars = smoke.validation_events(tmp_path / "tensorboard" / "fine-tuned_encoder", seed["history"], "mean_score")
  assert {"learning_rate/head", "learning_rate/encoder_top", "train/loss_avb_type"} <= set(scalars)


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
  smoke.validation_events(tmp_path / "run" / "tensorboard" / "base_model", result["base"]["history"], "mean_ccc")
  name = reference["submission"]
  assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()



def test_clips_shorter_than_the_receptive_field_are_named_in_the_log():
  rng = np.random.default_rng(0)
  records = [{"audio": rng.integers(-100, 100, n).astype(np.int16), "file_id": f"[{i}]"}
             for i, n in enumerate([16000, 399, 400, 12])]
  split = emo18_trainer.Split(records, np.array([r["file_id"] for r in records]), np.array(["s"] * 4),
                              np.zeros((4, 10), np.float32), np.ones(4, bool))
  lines = []
  ssl_trainer.report_short_clips({"train": split}, TINY, log=lines.append)
  assert len(lines) == 1 and "train: 2 clip(s) shorter than the encoder's receptive field (400 samples)" in lines[0]
  assert lines[0].endswith("[1], [3]")
