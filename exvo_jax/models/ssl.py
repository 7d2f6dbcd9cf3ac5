"""Self-supervised speech encoders (wav2vec 2.0, HuBERT, WavLM) as one Flax Linen module, configured from the
`config.json` of a Hugging Face checkpoint folder (docs/ssl_encoders.md).

The families differ only in configuration:
- feature encoder: seven strided convolutions over the raw 16 kHz waveform (kernels 10,3,3,3,3,2,2, strides
  5,2,2,2,2,2,2: one frame per 320 samples, receptive field 400 samples). `feat_extract_norm="group"` (base models)
  puts a GroupNorm with one group per channel after the first convolution only, normalising each channel over the
  clip (over its valid frames when a sample mask is given); `"layer"` puts a LayerNorm over channels after every
  convolution.
- feature projection (LayerNorm, except HuBERT with `feat_proj_layer_norm=false`, then a linear map), a
  weight-normalised grouped convolution as the positional embedding, and a transformer that is post-LN
  (`do_stable_layer_norm=false`: LayerNorm before the first layer and after each sub-block) or pre-LN
  (`do_stable_layer_norm=true`: LayerNorm inside each residual branch and once at the end);
- WavLM adds a bucketed relative position bias, computed once from layer 0's table and gated in every layer by a
  GRU-style gate computed from that layer's attention input (per head, per query position).

Numerics follow PyTorch: exact (erf) GELU, normalisation eps 1e-5 (`layer_norm_eps` for the transformer's norms,
PyTorch's default 1e-5 for the feature encoder's), attention scaled by head_dim ** -0.5.

`SpeechEncoder.__call__` returns every hidden state, in transformers 5.x's convention: `hidden_states[0]` is the
input of the first transformer layer, `hidden_states[i]` the output of layer i, so there are num_hidden_layers + 1;
for a pre-LN model the last one is taken BEFORE the final LayerNorm, and `last_hidden_state` is after it (for a
post-LN model the two are the same array).

Parameter paths mirror the PyTorch names, a numbered module `layers.3` being `layers_3`
(`encoder.layers.3.attention.q_proj.weight` is `params['encoder']['layers_3']['attention']['q_proj']['kernel']`,
transposed), so that ssl_checkpoint.py maps one to the other by rule.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
PYTORCH_NORM_EPS = 1e-5  # nn.GroupNorm / nn.LayerNorm default, used by the feature encoder's norms
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # PyTorch's default GELU is the exact (erf) one
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The architecture, read from a checkpoint's config.json (see `from_json`); field names are transformers'."""
  model_type: str = "wav2vec2"
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  feat_proj_layer_norm: bool = True
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  num_buckets: int = 320  # WavLM only
  max_bucket_distance: int = 800  # WavLM only
  masked_spec_embed: bool = True  # the learned vector that replaces masked frames (pre-training's time masking)
  mask_time_length: int = 10
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  feat_proj_dropout: float = 0.0
  normalize_waveform: bool = True  # preprocessor_config.json's do_normalize: each clip to zero mean, unit variance

  @property
  def relative_position_bias(self) -> bool:
    return self.model_type == "wavlm"

  @property
  def receptive_field(self) -> int:
    """Samples that one output frame sees (400 for the standard feature encoder)."""
    field, jump = 1, 1
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      field += (kernel - 1) * jump
      jump *= stride
    return field

  @property
  def frame_stride(self) -> int:
    """Samples between consecutive frames (320, 20 ms at 16 kHz)."""
    return math.prod(self.conv_stride)

  def num_frames(self, num_samples):
    """Frames the feature encoder makes of `num_samples` (int or integer array; 0 where too short)."""
    return valid_frames(self, num_samples)


def _activation(name):
  return ACTIVATIONS[name]


class StridedConv(nn.Module):
  """Conv1d over [batch, time, channels] with VALID padding; kernel [kernel, in, out] (PyTorch's [out, in, kernel]
  transposed)."""
  features: int
  kernel_size: int
  stride: int
  use_bias: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.he_normal(), (self.kernel_size, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class ChannelGroupNorm(nn.Module):
  """GroupNorm with one group per channel over [batch, time, channels]: each channel normalised over time; with
  `mask` [batch, time], over the valid frames only (so that a padded clip is normalised as it is alone)."""
  epsilon: float = PYTORCH_NORM_EPS

  @nn.compact
  def __call__(self, x, mask=None):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x32 = x.astype(jnp.float32)
    weight = jnp.ones(x.shape[:2] + (1,), jnp.float32) if mask is None else mask[..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(x32 * weight, axis=1, keepdims=True) / count
    var = jnp.sum(jnp.square(x32 - mean) * weight, axis=1, keepdims=True) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def valid_frames(config, num_samples, layers=None):
  """Frames left after the first `layers` feature-encoder convolutions (all by default) of clips of
  `num_samples` samples (an int, a numpy array or a traced array, the result of the same kind); 0 where too
  short."""
  if isinstance(num_samples, (int, np.integer)):
    num_samples, maximum = int(num_samples), max  # a static shape stays a Python int
  elif isinstance(num_samples, np.ndarray):
    maximum = np.maximum
  else:
    maximum = jnp.maximum
  frames = num_samples
  for kernel, stride in list(zip(config.conv_kernel, config.conv_stride))[:layers]:
    frames = maximum((frames - kernel) // stride + 1, 0)
  return frames


def _layer_norm(eps, name):
  # Statistics in float32 even under bfloat16 compute, the variance in two passes like PyTorch's (E[x^2] - E[x]^2
  # loses precision on large residual activations).
  return nn.LayerNorm(epsilon=eps, dtype=None, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class ConvLayer(nn.Module):
  """One feature-encoder convolution, its norm (every layer's LayerNorm, or layer 0's GroupNorm) and activation."""
  config: EncoderConfig
  index: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, frame_mask=None):
    c, i = self.config, self.index
    x = StridedConv(c.conv_dim[i], c.conv_kernel[i], c.conv_stride[i], c.conv_bias, self.dtype, name="conv")(x)
    if c.feat_extract_norm == "layer":
      x = _layer_norm(PYTORCH_NORM_EPS, "layer_norm")(x).astype(self.dtype)
    elif c.feat_extract_norm == "group" and i == 0:
      x = ChannelGroupNorm(name="layer_norm")(x, frame_mask)
    return _activation(c.feat_extract_activation)(x)


class FeatureEncoder(nn.Module):
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, waveform, num_samples=None):
    """[batch, samples] float -> [batch, frames, conv_dim[-1]]. With `num_samples` [batch] (valid samples per
    row), the first layer's GroupNorm counts each row's valid frames only."""
    x = waveform[..., None].astype(self.dtype)
    for i in range(len(self.config.conv_dim)):
      mask = None
      if i == 0 and num_samples is not None:
        mask = jnp.arange(valid_frames(self.config, x.shape[1], 1))[None, :] < valid_frames(
            self.config, num_samples, 1)[:, None]
      x = ConvLayer(self.config, i, self.dtype, name=f"conv_layers_{i}")(x, mask)
    return x


class FeatureProjection(nn.Module):
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, deterministic):
    c = self.config
    x = _layer_norm(c.layer_norm_eps, "layer_norm")(features) if c.feat_proj_layer_norm else features
    x = nn.Dense(c.hidden_size, dtype=self.dtype, name="projection")(x.astype(self.dtype))
    return nn.Dropout(c.feat_proj_dropout)(x, deterministic=deterministic)


def _lax_grouped_conv(x, kernel, groups, padding):
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding=[(padding, padding)],
                                      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv(x, kernel, groups, padding):
  """Stride-1 grouped convolution, x [B, T, C], kernel [K, C / groups, C], `padding` frames each side.

  Same values as lax.conv_general_dilated; its kernel gradient is computed from the input's windows, a block of
  kernel positions at a time: XLA:CPU's own grouped filter gradient took 3.4 s at wav2vec2-base size (4 x 3 s),
  this 0.3 s, and the positional convolution was then most of a train step.
  """
  return _lax_grouped_conv(x, kernel, groups, padding)


def _grouped_conv_forward(x, kernel, groups, padding):
  return _lax_grouped_conv(x, kernel, groups, padding), (x, kernel)


def _grouped_conv_backward(groups, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _lax_grouped_conv(x, kernel, groups, padding), x)
  (dx,) = input_vjp(dy)  # a convolution itself: fast
  k, per_group = kernel.shape[0], kernel.shape[1]
  batch, frames = dy.shape[:2]
  padded = jnp.pad(x, ((0, 0), (padding, padding), (0, 0))).reshape(batch, -1, groups, per_group)
  dy = dy.reshape(batch, frames, groups, per_group)
  blocks = []
  for start in range(0, k, 16):  # windows of 16 kernel positions at a time bound the extra memory
    taps = np.arange(start, min(start + 16, k))
    windows = padded[:, np.arange(frames)[:, None] + taps[None, :]]  # [B, T, taps, G, c]
    blocks.append(jnp.einsum("btkgi,btgo->kigo", windows, dy))
  dkernel = jnp.concatenate(blocks).reshape(k, per_group, groups * per_group)
  return dx, dkernel.astype(kernel.dtype)


grouped_conv.defvjp(_grouped_conv_forward, _grouped_conv_backward)


class WeightNormConv(nn.Module):
  """A grouped convolution over [batch, time, channels] with `padding` frames each side, its weight normalised:
  weight = g * v / ||v||, the norm over everything but the kernel position (PyTorch's weight_norm with dim=2).
  Parameters: weight_g [K], weight_v [K, channels / groups, channels], bias [channels]."""
  kernel_size: int
  groups: int
  padding: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, channels = self.kernel_size, x.shape[-1]
    weight_v = self.param("weight_v", nn.initializers.normal(2 * math.sqrt(1 / (k * channels))),
                          (k, channels // self.groups, channels))
    weight_g = self.param("weight_g", lambda rng, shape: jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(1, 2))), (k,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    norm = jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(1, 2), keepdims=True))
    kernel = weight_v * (weight_g[:, None, None] / norm)
    y = grouped_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.groups, self.padding)
    return y + bias.astype(self.dtype)


class PositionalConv(nn.Module):
  """The positional embedding: the weight-normalised grouped convolution (kernel K, padding K // 2, the last frame
  dropped for even K, so that the output has the input's length), then the activation."""
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    k = c.num_conv_pos_embeddings
    y = WeightNormConv(k, c.num_conv_pos_embedding_groups, k // 2, self.dtype, name="conv")(x)
    if k % 2 == 0:
      y = y[:, :-1]
    return _activation(c.feat_extract_activation)(y)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """WavLM's bucket of each (query, key) offset, [length, length] int32: half the buckets for keys after the query;
  exact offsets below num_buckets // 4, then logarithmic up to max_distance. Computed in float32 like PyTorch."""
  half = num_buckets // 2
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  buckets = (offsets > 0).astype(np.int64) * half
  distance = np.abs(offsets)
  max_exact = half // 2
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0) for the exact offsets, which np.where discards
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact))
    large = (np.float32(max_exact) + log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class SelfAttention(nn.Module):
  """Multi-head self-attention; with `config.relative_position_bias` (WavLM) the gated relative position bias.

  `position_bias` [heads, T, T] is made from this layer's bucket table in layer 0 (`has_bias_table`) and returned
  ungated, for the next layers. Keys where `mask` [batch, T] is False are left out of every softmax.
  """
  config: EncoderConfig
  has_bias_table: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, position_bias, deterministic):
    c = self.config
    heads = c.num_attention_heads
    head_dim = x.shape[-1] // heads
    dense = functools.partial(nn.Dense, x.shape[-1], dtype=self.dtype)
    split = lambda y: y.reshape(y.shape[:-1] + (heads, head_dim))  # noqa: E731  [B, T, H, d]
    q, k, v = (split(dense(name=f"{n}_proj")(x)) for n in "qkv")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim ** -0.5), k).astype(jnp.float32)
    if c.relative_position_bias:
      if self.has_bias_table:
        table = self.param("rel_attn_embed", nn.initializers.normal(1.0), (c.num_buckets, heads))
        buckets = relative_position_buckets(x.shape[1], c.num_buckets, c.max_bucket_distance)
        position_bias = jnp.transpose(table[buckets], (2, 0, 1))  # [H, T, T]
      const = self.param("gru_rel_pos_const", nn.initializers.ones, (heads,))
      # The gate reads this layer's input split into heads (not the projected queries), as WavLM does.
      gates = nn.Dense(8, dtype=self.dtype, name="gru_rel_pos_linear")(split(x)).astype(jnp.float32)  # [B,T,H,8]
      gates = jax.nn.sigmoid(gates.reshape(gates.shape[:-1] + (2, 4)).sum(-1))  # [B, T, H, 2]
      gate = gates[..., 0] * (gates[..., 1] * const - 1.0) + 2.0  # [B, T, H]
      scores = scores + jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias[None]
    if mask is not None:
      scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = nn.Dropout(c.attention_dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(x.shape)
    return dense(name="out_proj")(out), position_bias


class FeedForward(nn.Module):
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    c = self.config
    y = _activation(c.hidden_act)(nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate_dense")(x))
    y = nn.Dropout(c.activation_dropout)(y, deterministic=deterministic)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="output_dense")(y)
    return nn.Dropout(c.hidden_dropout)(y, deterministic=deterministic)


class TransformerLayer(nn.Module):
  """Post-LN: x = LN(x + attn(x)); x = LN_final(x + FF(x)). Pre-LN: x += attn(LN(x)); x += FF(LN_final(x))."""
  config: EncoderConfig
  has_bias_table: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, position_bias, deterministic):
    c = self.config
    attention = SelfAttention(c, self.has_bias_table, self.dtype, name="attention")
    layer_norm = _layer_norm(c.layer_norm_eps, "layer_norm")
    final_layer_norm = _layer_norm(c.layer_norm_eps, "final_layer_norm")
    feed_forward = FeedForward(c, self.dtype, name="feed_forward")
    dropout = nn.Dropout(c.hidden_dropout)
    if c.do_stable_layer_norm:
      y, position_bias = attention(layer_norm(x).astype(self.dtype), mask, position_bias, deterministic)
      x = x + dropout(y, deterministic=deterministic)
      x = x + feed_forward(final_layer_norm(x).astype(self.dtype), deterministic)
    else:
      y, position_bias = attention(x, mask, position_bias, deterministic)
      x = layer_norm(x + dropout(y, deterministic=deterministic)).astype(self.dtype)
      x = final_layer_norm(x + feed_forward(x, deterministic)).astype(self.dtype)
    return x, position_bias


class Encoder(nn.Module):
  """The transformer over projected frames; returns (hidden states, last hidden state)."""
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, frame_mask, deterministic):
    c = self.config
    if frame_mask is not None:
      x = jnp.where(frame_mask[..., None], x, 0.0)
    x = x + PositionalConv(c, self.dtype, name="pos_conv_embed")(x)
    layer_norm = _layer_norm(c.layer_norm_eps, "layer_norm")
    if not c.do_stable_layer_norm:
      x = layer_norm(x).astype(self.dtype)
    x = nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)
    layer_class = nn.remat(TransformerLayer, static_argnums=(4,)) if self.remat else TransformerLayer
    hidden_states, position_bias = [x], None
    for i in range(c.num_hidden_layers):
      x, position_bias = layer_class(c, i == 0, self.dtype, name=f"layers_{i}")(
          x, frame_mask, position_bias, deterministic)
      hidden_states.append(x)
    return tuple(hidden_states), (layer_norm(x).astype(self.dtype) if c.do_stable_layer_norm else x)


class SpeechEncoder(nn.Module):
  """waveform [batch, samples] float (already normalised when the checkpoint asks for it) -> dict:
  `hidden_states`: tuple of num_hidden_layers + 1 arrays [batch, frames, hidden]; `last_hidden_state`;
  `frame_mask` [batch, frames] bool (all True without `sample_mask`); `features` [batch, frames, conv_dim[-1]].

  `sample_mask` [batch, samples] marks the valid samples of a zero-padded batch (a prefix per row): frames past a
  clip's end are left out of the first layer's GroupNorm statistics (group-norm models), zeroed before the
  positional convolution and left out of every attention, so that each clip's valid frames are what the clip alone
  gives. (PyTorch's group-norm models normalise over the padded length even with an attention mask; without a
  mask, this module does the same.)
  `time_mask` [batch, frames] bool replaces those frames with the learned `masked_spec_embed` (fine-tuning's
  time masking). `remat` recomputes each transformer layer in the backward pass; `freeze_feature_encoder` stops
  gradients at the feature encoder's output (its activations are then not kept for a backward pass: on 3 s clips
  they, not the transformer's, dominate a train step's memory); `dtype` is the compute type.
  """
  config: EncoderConfig
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  freeze_feature_encoder: bool = False

  @nn.compact
  def __call__(self, waveform, sample_mask=None, time_mask=None, deterministic=True):
    c = self.config
    num_samples = None if sample_mask is None else jnp.sum(sample_mask.astype(jnp.int32), axis=1)
    features = FeatureEncoder(c, self.dtype, name="feature_extractor")(waveform, num_samples)
    if self.freeze_feature_encoder:
      features = jax.lax.stop_gradient(features)
    frame_mask = None
    if sample_mask is not None:
      frame_mask = jnp.arange(features.shape[1])[None, :] < valid_frames(c, num_samples)[:, None]
    x = FeatureProjection(c, self.dtype, name="feature_projection")(features, deterministic)
    if c.masked_spec_embed:
      embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (c.hidden_size,))
      if time_mask is not None:
        x = jnp.where(time_mask[..., None], embed.astype(x.dtype), x)
    elif time_mask is not None:
      raise ValueError("time masking needs the checkpoint's masked_spec_embed, which this config has none of "
                       "(mask_time_prob and mask_feature_prob are 0 in config.json)")
    hidden_states, last = Encoder(c, self.dtype, self.remat, name="encoder")(x, frame_mask, deterministic)
    if frame_mask is None:
      frame_mask = jnp.ones(last.shape[:2], bool)
    return {"hidden_states": hidden_states, "last_hidden_state": last, "frame_mask": frame_mask,
            "features": features}


def normalize_waveform(waveform, sample_mask=None):
  """Each row to zero mean and unit variance over its valid samples (the feature extractor's do_normalize:
  (x - mean) / sqrt(var + 1e-7)); padding stays 0."""
  if sample_mask is None:
    sample_mask = jnp.ones(waveform.shape, bool)
  weight = sample_mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(waveform * weight, axis=1, keepdims=True) / count
  var = jnp.sum(jnp.square(waveform - mean) * weight, axis=1, keepdims=True) / count
  return jnp.where(sample_mask, (waveform - mean) * jax.lax.rsqrt(var + 1e-7), 0.0)
