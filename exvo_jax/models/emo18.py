"""The end-to-end CNN-LSTM of the ExVo baselines ('Emo18'): raw 16 kHz waveform -> per-frame features -> LSTM.

Recipe (docs/hume_vb.md section 4): the waveform is cut into 1,600-sample frames (0.1 s) inside the jitted
function; per frame three blocks Conv1d -> BatchNorm -> LeakyReLU(0.01) -> MaxPool with stride-1 convolutions
(1->64 kernel 8 pad 3 pool 10; 64->128 kernel 6 pad 2 pool 8; 128->256 kernel 6 pad 2 pool 8), giving 256 x 2 =
512 features per frame; a 2-layer LSTM over the frames; a linear layer per frame; the clip's prediction is the
output at its LAST VALID frame. Kaiming-uniform weights, zero biases (the convolutions have none: each feeds
a BatchNorm, whose shift replaces it).

All frames of a batch go through the convolutions at once (channels-last), which measured faster on CPU than a
scan over frames. Frames that only pad a clip are masked out of the BatchNorm statistics, and the LSTM is causal,
so padding never changes a clip's output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

FRAME_SAMPLES = 1_600
CONV_BLOCKS = ((64, 8, 3, 10), (128, 6, 2, 8), (256, 6, 2, 8))  # (channels, kernel, padding, pool)
kaiming_uniform = nn.initializers.kaiming_uniform()


class MaskedBatchNorm(nn.Module):
  """BatchNorm over [N, L, C] whose statistics count only rows with `mask` set, summed across `axis_name`.

  Unlike averaging per-device means, summing the masked sums and counts over devices gives exactly the statistics
  of the whole global batch, whatever the number of valid rows on each device.
  """
  use_running_average: bool
  axis_name: str | None = None
  momentum: float = 0.9  # PyTorch's momentum 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, mask):
    channels = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(channels, jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones(channels, jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      # Sum each row over its length first, then weight the [N, C] row sums by the mask: the large [N, L, C]
      # tensor is read once per moment, with no mask broadcast over it.
      weight = mask.astype(x.dtype)[:, None]
      sums = jnp.stack([jnp.sum(jnp.sum(x, axis=1) * weight, axis=0),
                        jnp.sum(jnp.sum(x * x, axis=1) * weight, axis=0)])
      count = jnp.sum(weight) * x.shape[1]
      if self.axis_name is not None:
        sums, count = jax.lax.psum((sums, count), self.axis_name)
      count = jnp.maximum(count, 1.0)
      mean = sums[0] / count
      var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    gain = jax.lax.rsqrt(var + self.epsilon) * scale
    return x * gain + (bias - mean * gain)


def frames_per_clip(lengths, frame_samples=FRAME_SAMPLES):
  """[B] samples -> [B] frames (a partial last frame counts; an empty clip still has one frame)."""
  return jnp.maximum((lengths + frame_samples - 1) // frame_samples, 1)


def _max_pool(x, pool):
  """Non-overlapping max pooling over axis 1 (VALID: a remainder shorter than `pool` is dropped).

  A reshape and a max, rather than `nn.max_pool`: the gradient of reduce_window is select-and-scatter, which is
  slow on CPU, while the gradient of a plain max is cheap.
  """
  length = (x.shape[1] // pool) * pool
  return x[:, :length].reshape(x.shape[0], length // pool, pool, x.shape[2]).max(axis=2)


class FrameEncoder(nn.Module):
  """[N, 1600] frames -> [N, 512] features (three conv blocks)."""
  train: bool
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, frames, frame_mask):
    x = frames[..., None]  # channels-last: [N, 1600, 1]
    for channels, kernel, padding, pool in CONV_BLOCKS:
      # No conv bias: BatchNorm subtracts it right away, so its true gradient is 0 and Adam would only turn
      # float noise into +-lr steps (which also made 1- and 8-device runs drift apart).
      x = nn.Conv(channels, (kernel,), padding=[(padding, padding)], use_bias=False,
                  kernel_init=kaiming_uniform)(x)
      x = MaskedBatchNorm(use_running_average=not self.train, axis_name=self.bn_axis_name,
                          momentum=self.bn_momentum)(x, frame_mask)
      x = nn.leaky_relu(x, negative_slope=0.01)
      x = _max_pool(x, pool)
    return x.reshape(x.shape[0], -1)


class Emo18(nn.Module):
  """Raw waveform -> outputs at each clip's last valid frame.

  Attributes:
    num_outputs: 10 emotion intensities (MSE), or the number of classes (logits).
    hidden: LSTM width (256 in the paper; ablations 64 and 128).
    num_layers: stacked LSTM layers.
    bn_axis_name: the data-parallel axis over which BatchNorm statistics are summed (None outside a mesh).
    bn_momentum: weight of the old running statistics in each training-mode update; 0 makes them the batch's own
      (how `adaptation.batch_norm_statistics` re-estimates them over one speaker's clips).

  Call: (audio [B, T] float32 with T a multiple of 1,600, lengths [B] int32 samples, train) ->
    {'outputs': [B, num_outputs], 'embedding': [B, hidden] (the LSTM output at the last valid frame,
     the feature space of the Generate track's FID)}.
  """
  num_outputs: int = 10
  hidden: int = 256
  num_layers: int = 2
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, audio, lengths, train=False):
    batch, samples = audio.shape
    if samples % FRAME_SAMPLES:
      raise ValueError(f"audio has {samples} samples per row; pad it to a multiple of {FRAME_SAMPLES}")
    num_frames = samples // FRAME_SAMPLES
    valid_frames = frames_per_clip(lengths)
    frame_mask = jnp.arange(num_frames)[None, :] < valid_frames[:, None]  # [B, F]
    features = FrameEncoder(train=train, bn_axis_name=self.bn_axis_name, bn_momentum=self.bn_momentum,
                            name="encoder")(
        audio.reshape(batch * num_frames, FRAME_SAMPLES), frame_mask.reshape(-1))
    x = features.reshape(batch, num_frames, -1)
    for i in range(self.num_layers):
      x = nn.RNN(nn.OptimizedLSTMCell(self.hidden, kernel_init=kaiming_uniform, name=f"lstm_{i}",
                                      recurrent_kernel_init=kaiming_uniform, bias_init=nn.initializers.zeros))(x)
    last = valid_frames - 1
    embedding = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, hidden]
    head = nn.Dense(self.num_outputs, kernel_init=kaiming_uniform, bias_init=nn.initializers.zeros, name="head")
    # The head is per frame; taking it at the last valid frame equals applying it to that frame's LSTM output.
    return {"outputs": head(embedding), "embedding": embedding}
