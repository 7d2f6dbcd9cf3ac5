"""The Flax speech encoders against the transformers PyTorch models, and the checkpoint loader's formats and errors.

Each family and norm variant is a tiny randomly initialised transformers model saved with `save_pretrained`; the
Flax encoder loads the folder and must give every hidden state within 1e-4 of PyTorch (eager attention, float32)
on a batch of clips of different lengths.
"""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from exvo_jax.models import ssl
from exvo_jax.models import ssl_checkpoint

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
# WavLM with few buckets, so that ~50 frames reach its logarithmic buckets (from offset 8) and the clamp (40).
VARIANTS = {
    "wav2vec2_group_postln": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model,
                              dict(feat_extract_norm="group", do_stable_layer_norm=False)),
    "wav2vec2_layer_preln": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model,
                             dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert": (transformers.HubertConfig, transformers.HubertModel,
               dict(feat_extract_norm="group", do_stable_layer_norm=False, feat_proj_layer_norm=False)),
    "hubert_large_style": (transformers.HubertConfig, transformers.HubertModel,
                           dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "wavlm_base": (transformers.WavLMConfig, transformers.WavLMModel,
                   dict(feat_extract_norm="group", do_stable_layer_norm=False, num_buckets=32,
                        max_bucket_distance=40)),
    "wavlm_large_style": (transformers.WavLMConfig, transformers.WavLMModel,
                          dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_buckets=32,
                               max_bucket_distance=40)),
}
LENGTHS = (16000, 9000, 400, 12345)  # 1 s down to the receptive field: 49, 28, 1 and 38 frames


def _batch():
  rng = np.random.default_rng(0)
  waveform = np.zeros((len(LENGTHS), max(LENGTHS)), np.float32)
  for i, n in enumerate(LENGTHS):
    waveform[i, :n] = rng.normal(size=n) * 0.1
  return waveform, np.arange(waveform.shape[1])[None] < np.array(LENGTHS)[:, None]


def _save(tmp_path_factory, name, config_class, model_class, extra):
  torch.manual_seed(0)
  model = model_class(config_class(**TINY, **extra, attn_implementation="eager")).eval()
  if model.config.model_type == "wavlm":
    # At the default init (std 0.02) the gates sit near sigmoid(0) and the bias near 0, too small for a wrong gate
    # or bucket to show at 1e-4: unit-scale values make the relative position bias shape every layer's output.
    with torch.no_grad():
      for layer in model.encoder.layers:
        attention = layer.attention
        attention.gru_rel_pos_linear.weight.normal_(0.0, 1.0)
        attention.gru_rel_pos_linear.bias.normal_(0.0, 1.0)
        attention.gru_rel_pos_const.uniform_(0.5, 2.0)
      model.encoder.layers[0].attention.rel_attn_embed.weight.normal_(0.0, 1.0)
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
  config_class, model_class, extra = VARIANTS[request.param]
  return _save(tmp_path_factory, request.param, config_class, model_class, extra)


def _flax_hidden_states(folder, waveform, sample_mask):
  checkpoint = ssl_checkpoint.load(folder, log=lambda line: None)
  out = ssl.SpeechEncoder(checkpoint.config).apply(
      {"params": checkpoint.params}, jnp.asarray(waveform), None if sample_mask is None else jnp.asarray(sample_mask))
  return [np.asarray(h) for h in out["hidden_states"]], np.asarray(out["last_hidden_state"]), np.asarray(
      out["frame_mask"])


def _torch_hidden_states(model, waveform, sample_mask):
  mask = None if sample_mask is None else torch.tensor(sample_mask.astype(np.int64))
  with torch.no_grad():
    out = model(torch.tensor(waveform), attention_mask=mask, output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def test_every_hidden_state_matches_transformers_on_a_batch_of_different_lengths(saved):
  """Layer-norm models get the attention mask (their padding must not matter); group-norm models run on the
  zero-padded batch without one, as they were trained (GroupNorm sees the padding in PyTorch as here)."""
  model, folder = saved
  waveform, sample_mask = _batch()
  if model.config.feat_extract_norm == "group":
    sample_mask = None
  assert model.config._attn_implementation == "eager"
  expected, expected_last = _torch_hidden_states(model, waveform, sample_mask)
  hidden_states, last, frame_mask = _flax_hidden_states(folder, waveform, sample_mask)
  assert len(hidden_states) == len(expected) == model.config.num_hidden_layers + 1
  frames = ssl.EncoderConfig().num_frames(np.array(LENGTHS))
  np.testing.assert_array_equal(frame_mask.sum(1), frames if sample_mask is not None else frames.max())
  for layer, (got, want) in enumerate(zip(hidden_states, expected)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got[frame_mask], want[frame_mask], atol=1e-4, rtol=0, err_msg=f"layer {layer}")
  np.testing.assert_allclose(last[frame_mask], expected_last[frame_mask], atol=1e-4, rtol=0)
  if model.config.model_type == "wavlm":  # the position bias matters far beyond the tolerance
    checkpoint = ssl_checkpoint.load(folder, log=lambda line: None)
    params = jax.tree.map(lambda x: x, checkpoint.params)
    params["encoder"]["layers_0"]["attention"]["rel_attn_embed"] = np.zeros_like(
        params["encoder"]["layers_0"]["attention"]["rel_attn_embed"])
    unbiased = ssl.SpeechEncoder(checkpoint.config).apply(
        {"params": params}, jnp.asarray(waveform), None if sample_mask is None else jnp.asarray(sample_mask))
    assert np.max(np.abs(np.asarray(unbiased["hidden_states"][1]) - hidden_states[1])[frame_mask]) > 1e-2
  if model.config.do_stable_layer_norm:  # transformers 5.x: hidden_states[-1] before the final LayerNorm
    assert np.max(np.abs(hidden_states[-1] - last)) > 1e-2


@pytest.mark.parametrize("variant", ["wavlm_large_style", "wav2vec2_group_postln"])
def test_a_masked_clip_in_a_padded_batch_equals_the_clip_alone_in_pytorch(tmp_path_factory, variant):
  """With the sample mask, each clip of a padded batch matches PyTorch run on that clip alone, unpadded: the
  attention mask, and for group-norm models the first GroupNorm's statistics over the clip's own frames."""
  model, folder = _save(tmp_path_factory, f"masked_{variant}", *VARIANTS[variant])
  waveform, sample_mask = _batch()
  hidden_states, _, frame_mask = _flax_hidden_states(folder, waveform, sample_mask)
  for i, n in enumerate(LENGTHS):
    alone, _ = _torch_hidden_states(model, waveform[i:i + 1, :n], None)
    for layer, want in enumerate(alone):
      np.testing.assert_allclose(hidden_states[layer][i, frame_mask[i]], want[0], atol=1e-4, rtol=0,
                                 err_msg=f"clip {i} layer {layer}")


def test_relative_position_buckets_match_wavlm():
  attention = transformers.models.wavlm.modeling_wavlm.WavLMAttention(32, 4, num_buckets=320, max_distance=800)
  offsets = torch.arange(1200)[None, :] - torch.arange(1200)[:, None]
  expected = attention._relative_positions_bucket(offsets).numpy()
  np.testing.assert_array_equal(ssl.relative_position_buckets(1200, 320, 800), expected)
  assert expected.min() == 0 and expected.max() == 319  # both halves and the clamp are exercised


def test_receptive_field_and_frame_count_follow_the_pytorch_formula():
  config = ssl.EncoderConfig()
  assert config.receptive_field == 400 and config.frame_stride == 320
  for samples in (399, 400, 719, 720, 16000, 48000):  # floor((n - k) / s) + 1 per layer, by hand for 400 and 720
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY))
    expected = int(model._get_feat_extract_output_lengths(torch.tensor(samples)))
    assert config.num_frames(samples) == max(expected, 0)
  assert config.num_frames(400) == 1 and config.num_frames(720) == 2 and config.num_frames(399) == 0


# ------------------------------------------------------------------------------------------- formats and key sets
def _old_weight_norm_names(state):
  """The pre-parametrization key names of older checkpoint files: weight_g / weight_v."""
  renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
  out = {}
  for key, value in state.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    out[key] = value
  return out


def _copy_config(source, target):
  target.mkdir()
  shutil.copy(source / "config.json", target / "config.json")


def _reference_params(folder):
  return ssl_checkpoint.load(folder, log=lambda line: None).params


def _assert_same_tree(a, b):
  flat_a, flat_b = dict(ssl_checkpoint._flat(a)), dict(ssl_checkpoint._flat(b))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=str(path))


def test_both_weight_norm_key_sets_and_both_file_formats_load_the_same_parameters(tmp_path_factory):
  model, folder = _save(tmp_path_factory, "formats", *VARIANTS["wav2vec2_group_postln"])
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  assert any("parametrizations.weight.original0" in k for k in state)  # what transformers 5.x writes
  reference = _reference_params(folder)
  root = tmp_path_factory.mktemp("variants")
  for name, keys in (("new", state), ("old", _old_weight_norm_names(state))):
    assert any("weight_g" in k for k in keys) == (name == "old")
    safetensors_folder, bin_folder = root / f"safetensors_{name}", root / f"bin_{name}"
    _copy_config(folder, safetensors_folder)
    safetensors.torch.save_file(keys, safetensors_folder / "model.safetensors")
    _copy_config(folder, bin_folder)
    torch.save(keys, bin_folder / "pytorch_model.bin")
    for variant in (safetensors_folder, bin_folder):
      _assert_same_tree(_reference_params(variant), reference)


def test_a_plain_positional_weight_loads_as_its_weight_norm(tmp_path_factory):
  """A file that stores the positional convolution's weight itself (no g / v split) gives the same weight."""
  model, folder = _save(tmp_path_factory, "plain", *VARIANTS["hubert"])
  torch.nn.utils.parametrize.remove_parametrizations(model.encoder.pos_conv_embed.conv, "weight")
  plain = tmp_path_factory.mktemp("plain_weight")
  shutil.copy(folder / "config.json", plain / "config.json")
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "encoder.pos_conv_embed.conv.weight" in state
  safetensors.torch.save_file(state, plain / "model.safetensors")
  waveform, _ = _batch()
  expected, _ = _torch_hidden_states(model, waveform, None)
  hidden_states, _, _ = _flax_hidden_states(plain, waveform, None)
  np.testing.assert_allclose(hidden_states[-1], expected[-1], atol=1e-4, rtol=0)


def test_a_model_with_a_head_loads_without_its_prefix_and_reports_the_head_keys(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.WavLMForSequenceClassification(
      transformers.WavLMConfig(**TINY, num_labels=3, num_buckets=32, max_bucket_distance=40)).eval()
  folder = tmp_path_factory.mktemp("with_head")
  model.save_pretrained(folder)
  lines = []
  checkpoint = ssl_checkpoint.load(folder, log=lines.append)
  head_keys = sorted(k for k in model.state_dict() if not k.startswith("wavlm."))
  assert head_keys and list(checkpoint.unused_keys) == head_keys
  assert any("not used" in line and head_keys[0] in line for line in lines)
  waveform, _ = _batch()
  with torch.no_grad():
    expected = model.wavlm(torch.tensor(waveform), output_hidden_states=True).hidden_states
  hidden_states, _, _ = _flax_hidden_states(folder, waveform, None)
  for got, want in zip(hidden_states, expected):
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_safetensors_writer_round_trips_through_the_reference_reader(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.integers(0, 9, 7).astype(np.int64),
            "c.half": rng.normal(size=(2, 2, 2)).astype(np.float16)}
  ssl_checkpoint.write_safetensors(tmp_path / "x.safetensors", arrays)
  read = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
  assert read.keys() == arrays.keys()
  for key in arrays:
    np.testing.assert_array_equal(read[key], arrays[key])
    assert read[key].dtype == arrays[key].dtype


def test_bfloat16_safetensors_load_as_float32(tmp_path_factory):
  model, folder = _save(tmp_path_factory, "bf16", *VARIANTS["wav2vec2_layer_preln"])
  half = tmp_path_factory.mktemp("bf16_file")
  shutil.copy(folder / "config.json", half / "config.json")
  safetensors.torch.save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
                              half / "model.safetensors")
  params, reference = _reference_params(half), _reference_params(folder)
  for path, value in ssl_checkpoint._flat(params):
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, dict(ssl_checkpoint._flat(reference))[path], rtol=1e-2, atol=1e-2)


def test_the_conversion_command_writes_safetensors_from_a_bin_folder(tmp_path_factory):
  model, folder = _save(tmp_path_factory, "convert", *VARIANTS["hubert"])
  converted = tmp_path_factory.mktemp("convert_bin") / "m"
  _copy_config(folder, converted)
  torch.save(_old_weight_norm_names(model.state_dict()), converted / "pytorch_model.bin")
  result = subprocess.run([sys.executable, "-m", "exvo_jax.models.ssl_checkpoint", "--to_safetensors",
                           str(converted)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  (converted / "pytorch_model.bin").unlink()
  _assert_same_tree(_reference_params(converted), _reference_params(folder))


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def good(tmp_path_factory):
  return _save(tmp_path_factory, "good", *VARIANTS["wav2vec2_group_postln"])[1]


def _variant_of(good, tmp_path, config=None, state=None, weights="model.safetensors", name="checkpoint"):
  folder = tmp_path / name
  folder.mkdir()
  raw = json.loads((good / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config(raw) if config else raw))
  tensors = safetensors.numpy.load_file(str(good / "model.safetensors"))
  tensors = state(tensors) if state else tensors
  if weights == "model.safetensors":
    safetensors.numpy.save_file(tensors, str(folder / weights))
  else:
    torch.save({k: torch.tensor(v) for k, v in tensors.items()}, folder / weights)
  return folder


def test_a_folder_without_config_json_names_the_file_and_the_fix(good, tmp_path):
  folder = _variant_of(good, tmp_path)
  (folder / "config.json").unlink()
  with pytest.raises(ssl_checkpoint.CheckpointError, match=r"checkpoint/config\.json: missing; .*came with"):
    ssl_checkpoint.load(folder)
  with pytest.raises(ssl_checkpoint.CheckpointError, match="no such checkpoint folder"):
    ssl_checkpoint.load(tmp_path / "nowhere")


def test_an_unsupported_model_type_lists_the_supported_ones(good, tmp_path):
  folder = _variant_of(good, tmp_path, config=lambda raw: dict(raw, model_type="wav2vec2-conformer"))
  with pytest.raises(ssl_checkpoint.CheckpointError,
                     match=r"config\.json: model_type 'wav2vec2-conformer' is not supported; supported: "
                           r"wav2vec2, hubert, wavlm"):
    ssl_checkpoint.load(folder)


def test_a_parameter_whose_shape_does_not_match_the_config_is_named(good, tmp_path):
  folder = _variant_of(good, tmp_path, config=lambda raw: dict(raw, intermediate_size=48))
  with pytest.raises(ssl_checkpoint.CheckpointError,
                     match=r"model\.safetensors: encoder\.layers\.0\.feed_forward\.intermediate_dense\.bias has "
                           r"shape \[64\], but config\.json makes it \[48\]; .*config\.json that came"):
    ssl_checkpoint.load(folder)


def test_missing_keys_are_named_and_unexpected_keys_reported(good, tmp_path):
  def drop(tensors):
    return {k: v for k, v in tensors.items() if k not in ("encoder.layers.1.attention.k_proj.bias",
                                                          "feature_projection.layer_norm.weight")}
  folder = _variant_of(good, tmp_path, state=drop)
  with pytest.raises(ssl_checkpoint.CheckpointError) as error:
    ssl_checkpoint.load(folder)
  message = str(error.value)
  assert "2 parameter(s) the config needs are not in the file" in message
  assert "encoder.layers.1.attention.k_proj.bias" in message and "feature_projection.layer_norm.weight" in message

  extra_folder = _variant_of(good, tmp_path, name="extra",
                             state=lambda t: dict(t, **{"quantizer.codevectors": np.zeros((1, 4, 2), np.float32)}))
  lines = []
  checkpoint = ssl_checkpoint.load(extra_folder, log=lines.append)
  assert checkpoint.unused_keys == ("quantizer.codevectors",)
  assert any("not used: quantizer.codevectors" in line for line in lines)


def test_a_missing_masked_spec_embed_is_initialised_and_reported(good, tmp_path):
  folder = _variant_of(good, tmp_path, state=lambda t: {k: v for k, v in t.items() if k != "masked_spec_embed"})
  lines = []
  checkpoint = ssl_checkpoint.load(folder, log=lines.append)
  assert checkpoint.initialised_keys == ("masked_spec_embed",)
  assert checkpoint.params["masked_spec_embed"].shape == (32,)
  assert any("masked_spec_embed not in" in line for line in lines)


def test_a_bin_file_without_torch_says_to_install_it_or_convert(good, tmp_path, monkeypatch):
  folder = _variant_of(good, tmp_path, weights="pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ssl_checkpoint.CheckpointError,
                     match=r"pytorch_model\.bin: a PyTorch pickle, and reading it needs torch, which is not "
                           r"installed\. Either pip install torch .* --to_safetensors .*checkpoint"):
    ssl_checkpoint.load(folder)


def test_a_folder_without_weights_names_the_expected_files(good, tmp_path):
  folder = _variant_of(good, tmp_path)
  (folder / "model.safetensors").unlink()
  with pytest.raises(ssl_checkpoint.CheckpointError, match=r"no weights; expected model\.safetensors or "
                                                           r"pytorch_model\.bin"):
    ssl_checkpoint.load(folder)


def test_a_truncated_safetensors_file_says_to_download_it_again(good, tmp_path):
  folder = _variant_of(good, tmp_path)
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:-100])
  with pytest.raises(ssl_checkpoint.CheckpointError,
                     match=r"model\.safetensors: tensor .* lies outside the file \(truncated download"):
    ssl_checkpoint.load(folder)


def test_an_unimplemented_config_option_is_named(good, tmp_path):
  folder = _variant_of(good, tmp_path, config=lambda raw: dict(raw, add_adapter=True))
  with pytest.raises(ssl_checkpoint.CheckpointError, match=r"config\.json: add_adapter is true"):
    ssl_checkpoint.load(folder)


def test_the_check_command_loads_a_folder_and_reports_its_hidden_states(good, tmp_path, capsys):
  assert ssl_checkpoint.main(["ssl_checkpoint", "--check", str(good)]) == 0
  out = capsys.readouterr().out
  assert "encoder: wav2vec2 from" in out and "2 layers, post-LN, group-norm feature encoder" in out
  assert "1 s of audio -> 3 hidden states of shape [49, 32]" in out  # 16,000 samples: 49 frames, width 32
  assert ssl_checkpoint.main(["ssl_checkpoint", "--check", str(tmp_path / "nowhere")]) == 2
  assert "no such checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(2, 37, 32, 4, 16), (3, 20, 12, 3, 7), (1, 9, 8, 1, 33)])
def test_the_grouped_convolution_s_own_gradient_equals_autodiff_of_lax_conv(shape):
  """The positional convolution's custom kernel gradient (windows, blocks of 16 taps) against JAX's autodiff of
  lax.conv_general_dilated, for even and odd kernels, several groups, more taps than frames."""
  batch, frames, channels, groups, kernel_size = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, frames, channels)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(kernel_size, channels // groups, channels)).astype(np.float32))
  cotangent = jnp.asarray(rng.normal(size=(batch, frames + 2 * (kernel_size // 2) - kernel_size + 1, channels)),
                          jnp.float32)

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1,), [(kernel_size // 2,) * 2],
                                        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)

  for fn in (reference, lambda x, k: ssl.grouped_conv(x, k, groups, kernel_size // 2)):
    assert fn(x, kernel).shape == cotangent.shape
  expected = jax.vjp(reference, x, kernel)[1](cotangent)
  got = jax.vjp(lambda x, k: ssl.grouped_conv(x, k, groups, kernel_size // 2), x, kernel)[1](cotangent)
  for name, a, b in zip(("input", "kernel"), got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))), err_msg=name)


def test_bfloat16_compute_stays_close_to_float32_and_trains(good):
  """dtype=bfloat16 computes in bfloat16 (statistics and parameters in float32): the last hidden state within a few
  percent of float32's, and finite gradients through the positional convolution's own gradient."""
  checkpoint = ssl_checkpoint.load(good, log=lambda line: None)
  waveform, _ = _batch()
  full = ssl.SpeechEncoder(checkpoint.config).apply({"params": checkpoint.params}, jnp.asarray(waveform))
  half_model = ssl.SpeechEncoder(checkpoint.config, dtype=jnp.bfloat16)
  half = half_model.apply({"params": checkpoint.params}, jnp.asarray(waveform))
  assert half["last_hidden_state"].dtype == jnp.bfloat16
  reference = np.asarray(full["last_hidden_state"])
  error = np.abs(np.asarray(half["last_hidden_state"], np.float32) - reference)
  assert error.max() < 0.05 * np.abs(reference).max()
  grads = jax.grad(lambda p: half_model.apply({"params": p}, jnp.asarray(waveform))["last_hidden_state"].astype(
      jnp.float32).mean())(checkpoint.params)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  assert grads["encoder"]["pos_conv_embed"]["conv"]["weight_v"].dtype == jnp.float32
