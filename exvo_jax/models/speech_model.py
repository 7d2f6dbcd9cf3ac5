"""A speech encoder fine-tuned end to end: `SpeechEncoder`, a layer choice, attention pooling and a head.

`SpeechModel` takes what Emo18 takes, `(audio [B, S] float, length [B] int, train)`, and returns what Emo18 returns,
`{"outputs": [B, K] linear outputs, "embedding": [B, H] pooled clip vector}`, so that the raw-audio trainer
(`emo18_trainer.train_base`), its prediction passes and FewShot's personalisation (fine-tuning a parameter subset,
MAML, speaker normalisation of the embedding) run on it unchanged.

- Layers: `layer` 'weighted' (a learned softmax-weighted sum of every hidden state), 'last', or a number, as the
  frozen-embedding feature set reads them (`exvo_jax/features/ssl_embeddings.py`).
- Attention pooling: a score per frame (Dense(tanh(Dense(x)))), a softmax over the clip's valid frames, the
  weighted mean of the frames.
- Head: one linear layer of K outputs, or with `chain` a classifier chain (output k reads outputs 1..k-1;
  teacher-forced with the labels when `teacher` is given, i.e. in training).
- Training (`train=True`): dropout as the checkpoint's config says, and time masking as in pre-training: spans of
  `mask_time_length` frames, each valid frame starting one with probability `mask_time_prob / mask_time_length`,
  replaced by the learned `masked_spec_embed` (rngs 'dropout' and 'mask'). Unlike transformers' sampler there is
  no minimum number of spans per clip (its `mask_time_min_masks`).
- `freeze`: 'none', 'feature_encoder' (the CNN gets no gradient: the standard fine-tuning recipe) or 'encoder'
  (the whole encoder: pooling and head train on frozen hidden states).
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from exvo_jax.models import ssl

FREEZE = ("none", "feature_encoder", "encoder")


def sample_time_mask(rng, frame_mask, prob, length):
  """[B, T] bool: spans of `length` frames starting at each valid frame with probability prob / length, cut at the
  clip's end (the expected masked share is about `prob`, less where spans overlap)."""
  starts = jax.random.bernoulli(rng, prob / length, frame_mask.shape) & frame_mask
  counts = jnp.cumsum(starts.astype(jnp.int32), axis=1)
  before = jnp.pad(counts, ((0, 0), (length, 0)))[:, :counts.shape[1]]  # counts[t - length], 0 before the start
  return (counts - before > 0) & frame_mask


class AttentionPooling(nn.Module):
  """[B, T, H] frames and their [B, T] mask -> [B, H]: softmax(score) over the valid frames, weighted mean."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x, mask):
    scores = nn.Dense(1, name="score")(jnp.tanh(nn.Dense(self.hidden, name="proj")(x)))[..., 0]
    scores = jnp.where(mask, scores.astype(jnp.float32), -1e30)
    weights = jax.nn.softmax(scores, axis=-1) * mask  # a row without valid frames gets zeros, not NaN
    return jnp.einsum("bt,bth->bh", weights, x.astype(jnp.float32))


class ChainHead(nn.Module):
  """K outputs where output k also reads outputs 1..k-1 (a classifier chain, as the 2022 FewShot and A-VB winners
  put on the 10 emotions): y_k = h . w_k + sum_{j<k} y_j v_jk + b_k, with y_j the teacher's values when given
  (training: the labels; where one is unknown, the model's own output) and the model's own outputs otherwise. The outputs are linear, as Emo18's: predictions
  of the labels themselves."""
  num_outputs: int

  @nn.compact
  def __call__(self, h, teacher=None):
    k = self.num_outputs
    base = nn.Dense(k, name="features")(h)
    chain = jnp.triu(self.param("chain", nn.initializers.zeros_init(), (k, k)), 1)  # [j, k], j < k only
    outputs = []
    for i in range(k):
      earlier = jnp.stack(outputs, axis=-1) @ chain[:i, i] if i else 0.0
      outputs.append(base[:, i] + earlier)
    own = jnp.stack(outputs, axis=-1)
    if teacher is None:
      return own
    # Teacher forcing; where a label is unknown (NaN) the chain reads the model's own output there, as at inference.
    teacher = jnp.where(jnp.isfinite(teacher), teacher.astype(base.dtype), jax.lax.stop_gradient(own))
    return base + teacher @ chain


class SpeechModel(nn.Module):
  """See the module docstring. `layer`: 'weighted', 'last' or a layer number (as a string or int)."""
  config: ssl.EncoderConfig
  num_outputs: int
  layer: str = "weighted"
  pooling_hidden: int = 128
  chain: bool = False
  freeze: str = "feature_encoder"
  mask_time_prob: float = 0.05
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  loss_scales: int = 0  # > 0: a `log_sigma` parameter per task for learned uncertainty weighting (read by the loss)

  @nn.compact
  def __call__(self, audio, length, train=False, teacher=None):
    c = self.config
    if self.loss_scales:
      self.param("log_sigma", nn.initializers.constant(-0.33), (self.loss_scales,))
    # A padding row (length 0) or a clip shorter than one frame's receptive field reads as a zero-padded clip of
    # one frame, so that no row is empty (its outputs are dropped or, for a short clip, reported by the caller).
    length = jnp.maximum(length, c.receptive_field)
    waveform = jnp.pad(audio, ((0, 0), (0, max(c.receptive_field - audio.shape[1], 0))))
    sample_mask = jnp.arange(waveform.shape[1])[None, :] < length[:, None]
    if c.normalize_waveform:
      waveform = ssl.normalize_waveform(waveform, sample_mask)
    time_mask = None
    if train and self.mask_time_prob > 0 and self.freeze != "encoder":
      frame_mask = jnp.arange(c.num_frames(waveform.shape[1]))[None, :] < ssl.valid_frames(c, length)[:, None]
      time_mask = sample_time_mask(self.make_rng("mask"), frame_mask, self.mask_time_prob, c.mask_time_length)
    encoder = ssl.SpeechEncoder(c, dtype=self.dtype, remat=self.remat,
                                freeze_feature_encoder=self.freeze == "feature_encoder", name="encoder")
    out = encoder(waveform, sample_mask, time_mask, deterministic=not train or self.freeze == "encoder")
    states = out["hidden_states"]
    if self.freeze == "encoder":
      states = jax.lax.stop_gradient(states)
    if self.layer == "weighted":
      weights = jax.nn.softmax(self.param("layer_weights", nn.initializers.zeros_init(), (len(states),)))
      x = sum(w * s.astype(jnp.float32) for w, s in zip(weights, states))
    else:
      x = states[-1 if self.layer == "last" else int(self.layer)]
    embedding = AttentionPooling(self.pooling_hidden, name="pooling")(x, out["frame_mask"])
    if self.chain:
      outputs = ChainHead(self.num_outputs, name="head")(embedding, teacher)
    else:
      outputs = nn.Dense(self.num_outputs, name="head")(embedding)
    return {"outputs": outputs.astype(jnp.float32), "embedding": embedding}
