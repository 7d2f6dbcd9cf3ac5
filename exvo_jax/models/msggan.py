"""MSG-GAN on log-mel spectrograms: the ExVo-Generate baseline (Karnewar & Wang 2020, on ProGAN's layers).

Recipe (docs/hume_vb.md section 4): images are log-mel spectrograms, NHWC [batch, 128 mel bands, 512 frames, 1].
The generator maps a 512-d latent on the sphere of radius sqrt(512) through 7 scales, 2x8 -> 128x512, each block
a bilinear x2 upsampling and two 3x3 convolutions (the first block: a dense layer to 2x8 and one 3x3 conv), with
channels 512, 512, 512, 512, 256, 128, 64; every convolution is followed by LeakyReLU(0.2) and pixel norm, and a
1x1 convolution writes a 1-channel image at EVERY scale (the multi-scale gradients). The discriminator mirrors it
and reads the image at every scale: a 1x1 'from image' convolution at 128x512, then per scale two 3x3 convs with
LeakyReLU(0.2) and a 2x2 average pool, after which the next (smaller) image is concatenated to the features as
one extra channel (MSG-GAN's 'simple' combine, phi_simple(x, o) = [x; o], the cheapest of the paper's three:
no 1x1 convolution on the image); at 2x8 the minibatch standard deviation adds one feature map, then a 3x3 conv, a dense
layer over the flattened map and a dense layer to the score. Relativistic average hinge loss.

Equalised learning rate everywhere (ProGAN): weights are stored N(0, 1) and multiplied at run time by
gain / sqrt(fan_in) (the He constant, gain sqrt(2) before a LeakyReLU, 1 for the linear output layers), biases
start at zero. Adam then moves every layer at the same relative speed whatever its fan-in.

The image outputs are linear and start with an RMS of roughly 0.2-1 per pixel, while the stored spectrograms,
log(mel + 1e-6) / 2, lie around -7 ... +2: standardise the real spectrograms (e.g. with the training set's mean
and std) before they meet the discriminator, whose untrained scores already separate a constant offset.

Conditional variant (num_conditions > 0), one generator for all emotions: the condition is a [batch, 10] vector
of emotion intensities in [0, 1]. The generator embeds it with an equalised dense layer to the latent size,
concatenates the embedding to the normalised latent before its first layer, and modulates every convolution's
output with it: after the pixel norm, x * (1 + gamma) + beta with per-channel gamma, beta = dense(embedding) (the
condition reaches every scale directly, as in conditional batch norm, instead of having to survive six
pixel-normalised blocks). The discriminator is a projection discriminator (Miyato & Koyama 2018): score =
dense(h) + <embed(condition), h> on its final feature vector h; with `auxiliary=True` it also predicts the
condition (AC-GAN, Odena et al. 2017: logits trained on real clips; the generator is then asked to make clips
whose predicted emotions are the ones it was given, see `auxiliary_loss`). The logits are a linear function of h
plus a linear function of each mel band's mean and standard deviation over time at the top scale: at /16 width
the convolutional features alone learnt the emotions slowly (a pure classifier of this shape reached 25% top-1
on the demo's dominant emotion after 400 steps of 8 clips; with the band statistics, 34%).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

SCALES = ((2, 8), (4, 16), (8, 32), (16, 64), (32, 128), (64, 256), (128, 512))  # (mel bands, frames)
LATENT_DIM = 512
CHANNELS = (512, 512, 512, 512, 256, 128, 64)  # generator channels per scale, smallest scale first
SQRT2 = math.sqrt(2.0)
standard_normal = nn.initializers.normal(stddev=1.0)


def he_scale(fan_in, gain=SQRT2):
  """The equalised-learning-rate multiplier of a weight stored N(0, 1): gain / sqrt(fan_in)."""
  return gain / math.sqrt(fan_in)


def sample_latent(rng, batch_size, dim=LATENT_DIM):
  """[batch_size, dim] gaussian latents rescaled to norm sqrt(dim) (uniform on that sphere)."""
  z = jax.random.normal(rng, (batch_size, dim))
  return pixel_norm(z)


def pixel_norm(x, eps=1e-8):
  """Each position's feature vector (last axis) scaled to unit RMS: x / sqrt(mean(x^2) + eps)."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def leaky_relu(x):
  return nn.leaky_relu(x, negative_slope=0.2)


def minibatch_stddev(x, group_size=4):
  """[B, H, W, C] -> [B, H, W, C + 1]: ProGAN's minibatch standard deviation feature map.

  The batch is split into groups of min(group_size, B) consecutive samples (sample b in group b // group size;
  ProGAN strides them instead, which makes the groups depend on the batch size); within a group the standard
  deviation of every feature over the samples is averaged over H, W, C, and that one number fills the extra
  channel of each of the group's samples. Under data parallelism the groups are formed within each device's
  batch, so with a per-device batch that is a multiple of the group size the groups, and the step, do not depend
  on the number of devices.
  """
  batch = x.shape[0]
  group = min(group_size, batch)
  if batch % group:
    raise ValueError(f"minibatch_stddev: batch {batch} is not a multiple of the group size {group}")
  y = x.reshape(batch // group, group, *x.shape[1:]).astype(jnp.float32)  # [M, G, H, W, C]
  std = jnp.sqrt(jnp.var(y, axis=1) + 1e-8)  # [M, H, W, C]
  per_group = jnp.mean(std, axis=(1, 2, 3))  # [M]
  feature = jnp.repeat(per_group, group).astype(x.dtype)  # [B]: sample b gets group b // G
  return jnp.concatenate([x, jnp.broadcast_to(feature[:, None, None, None], (*x.shape[:3], 1))], axis=-1)


def _upsample_axis(x, axis):
  """Doubles one axis by linear interpolation with half-pixel centres and clamped edges."""
  n = x.shape[axis]
  part = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
  before = jnp.concatenate([part(0, 1), part(0, n - 1)], axis=axis)  # x[i - 1], the first row repeated
  after = jnp.concatenate([part(1, n), part(n - 1, n)], axis=axis)  # x[i + 1], the last row repeated
  even, odd = 0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after
  shape = list(x.shape)
  shape[axis] *= 2
  return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def upsample2x(x):
  """[B, H, W, C] -> [B, 2H, 2W, C] bilinear, equal to jax.image.resize(..., 'bilinear').

  Written as shifted weighted sums rather than jax.image.resize so that its gradient is as cheap as the forward.
  """
  return _upsample_axis(_upsample_axis(x, 1), 2)


def downsample2x(x):
  """[B, H, W, C] -> [B, H/2, W/2, C]: 2x2 average pooling (a reshape and a mean; cheap gradient on CPU)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def image_pyramid(images, depth=len(SCALES)):
  """[batch, 128, 512, 1] spectrograms -> `depth` arrays [batch, H_i, W_i, 1], smallest first (2x8 ... 128x512),
  by repeated 2x2 average pooling: the real images at every scale, as the discriminator reads them."""
  if images.ndim != 4 or images.shape[1] % 2 ** (depth - 1) or images.shape[2] % 2 ** (depth - 1):
    raise ValueError(f"image_pyramid: images of shape {images.shape}; expected [batch, H, W, C] with H and W "
                     f"multiples of {2 ** (depth - 1)} (e.g. [batch, 128, 512, 1])")
  pyramid = [images]
  for _ in range(depth - 1):
    pyramid.append(downsample2x(pyramid[-1]))
  return pyramid[::-1]


class EqualizedDense(nn.Module):
  """[..., fan_in] -> [..., features]: x @ (kernel * scale) + bias with kernel ~ N(0, 1), scale = he_scale."""
  features: int
  gain: float = SQRT2
  use_bias: bool = True

  def scale(self, fan_in):
    return he_scale(fan_in, self.gain)

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", standard_normal, (fan_in, self.features))
    y = x @ (kernel * self.scale(fan_in))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class EqualizedConv(nn.Module):
  """[B, H, W, C] -> [B, H, W, features]: SAME convolution with kernel * scale, kernel [kh, kw, C, features]
  ~ N(0, 1), scale = he_scale(kh * kw * C)."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  gain: float = SQRT2

  def scale(self, in_channels):
    return he_scale(self.kernel_size[0] * self.kernel_size[1] * in_channels, self.gain)

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    kernel = self.param("kernel", standard_normal, (*self.kernel_size, in_channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jax.lax.conv_general_dilated(x, kernel * self.scale(in_channels), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def _check_condition(num_conditions, condition, batch, who):
  if num_conditions and (condition is None or condition.shape != (batch, num_conditions)):
    got = None if condition is None else condition.shape
    raise ValueError(f"{who}: num_conditions={num_conditions} needs condition [{batch}, {num_conditions}]; "
                     f"got {got}")
  if not num_conditions and condition is not None:
    raise ValueError(f"{who}: a condition was given to an unconditional model; set num_conditions")


class Generator(nn.Module):
  """Latent [batch, latent_dim] (and condition [batch, num_conditions] if conditional) -> a list of
  len(channels) spectrograms [batch, H_i, W_i, 1], smallest first: SCALES with the default 7 channels.

  The latent is rescaled to norm sqrt(latent_dim) here too, so any gaussian sample may be passed in.

  Attributes:
    channels: feature maps per scale, smallest scale first (CHANNELS; divide them for small CPU runs).
    num_conditions: size of the condition vector (10 emotions), 0 for an unconditional generator.
    latent_dim: size of the latent vector.
  """
  channels: tuple[int, ...] = CHANNELS
  num_conditions: int = 0
  latent_dim: int = LATENT_DIM

  @nn.compact
  def __call__(self, latent, condition=None):
    batch = latent.shape[0]
    if latent.shape != (batch, self.latent_dim):
      raise ValueError(f"Generator: latent of shape {latent.shape}; expected [batch, {self.latent_dim}]")
    _check_condition(self.num_conditions, condition, batch, "Generator")
    x = pixel_norm(latent)
    embedded = None
    if self.num_conditions:
      embedded = EqualizedDense(self.latent_dim, gain=1.0, name="condition_embed")(condition)
      x = jnp.concatenate([x, embedded], axis=-1)
    height, width = SCALES[0]
    # The dense layer equals MSG-GAN's transposed conv from 1x1 to 2x8 (same fan-in: the input size).
    x = EqualizedDense(height * width * self.channels[0], name="input_dense")(x)
    x = pixel_norm(leaky_relu(x.reshape(batch, height, width, self.channels[0])))
    x = self._modulate(x, embedded, "input") if self.num_conditions else x
    images = []
    for i, width_i in enumerate(self.channels):
      for j in (0, 1) if i else (1,):
        if j == 0:
          x = upsample2x(x)
        x = pixel_norm(leaky_relu(EqualizedConv(width_i, name=f"block{i}_conv{j}")(x)))
        if self.num_conditions:
          x = self._modulate(x, embedded, f"block{i}_conv{j}")
      images.append(EqualizedConv(1, (1, 1), gain=1.0, name=f"to_image{i}")(x))
    return images

  def _modulate(self, x, embedded, name):
    """x * (1 + gamma) + beta with per-channel gamma, beta = an equalised dense layer of the condition embedding."""
    channels = x.shape[-1]
    gamma_beta = EqualizedDense(2 * channels, gain=1.0, name=f"{name}_modulation")(embedded)
    gamma, beta = jnp.split(gamma_beta[:, None, None, :].astype(x.dtype), 2, axis=-1)
    return x * (1.0 + gamma) + beta


class Discriminator(nn.Module):
  """Images at every scale (a list [batch, H_i, W_i, 1], smallest first, as Generator returns or image_pyramid
  makes) and condition [batch, num_conditions] if conditional -> scores [batch] (higher = more real).

  Attributes:
    channels: the GENERATOR's channels per scale, smallest first; the discriminator uses them in reverse, from
      the largest scale down.
    num_conditions: size of the condition vector for the projection head, 0 for an unconditional critic.
    group_size: the minibatch standard deviation's group size (min(4, batch)).
    auxiliary: also return condition logits [batch, num_conditions] predicted from the final features and the
      top-scale band statistics (AC-GAN); the call then returns (scores, logits).
  """
  channels: tuple[int, ...] = CHANNELS
  num_conditions: int = 0
  group_size: int = 4
  auxiliary: bool = False

  @nn.compact
  def __call__(self, images, condition=None):
    if len(images) != len(self.channels):
      raise ValueError(f"Discriminator: {len(images)} images; expected one per scale ({len(self.channels)})")
    batch = images[0].shape[0]
    _check_condition(self.num_conditions, condition, batch, "Discriminator")
    widths = self.channels[::-1]  # largest scale first
    top = len(widths) - 1
    x = leaky_relu(EqualizedConv(widths[0], (1, 1), name="from_image")(images[-1]))
    for i in range(top):
      x = leaky_relu(EqualizedConv(widths[i], name=f"block{i}_conv0")(x))
      x = leaky_relu(EqualizedConv(widths[i + 1], name=f"block{i}_conv1")(x))
      x = downsample2x(x)
      image = images[top - 1 - i]
      if image.shape[1:3] != x.shape[1:3]:
        raise ValueError(f"Discriminator: image {top - 1 - i} has shape {image.shape}; expected "
                         f"[batch, {x.shape[1]}, {x.shape[2]}, 1] (halve each scale)")
      x = jnp.concatenate([x, image.astype(x.dtype)], axis=-1)  # phi_simple: the image as one more channel
    x = minibatch_stddev(x, self.group_size)
    x = leaky_relu(EqualizedConv(widths[-1], name="final_conv")(x))
    features = leaky_relu(EqualizedDense(widths[-1], name="final_dense")(x.reshape(batch, -1)))  # [B, F]
    scores = EqualizedDense(1, gain=1.0, name="score")(features)[:, 0]
    if self.num_conditions:
      # Projection: the condition selects a direction in feature space; no bias (dense(h) already has one).
      embedded = EqualizedDense(features.shape[-1], gain=1.0, use_bias=False, name="condition_embed")(condition)
      scores = scores + jnp.sum(embedded * features, axis=-1)
    if self.auxiliary:
      if not self.num_conditions:
        raise ValueError("Discriminator: auxiliary=True predicts the condition; set num_conditions")
      top = images[-1][..., 0].astype(jnp.float32)  # [B, bands, frames]
      # Each band's mean and standard deviation over time: the spectral envelope and its movement, which a
      # linear head reads at once (the convolutional features alone learn the emotions slowly).
      spectrum = jnp.concatenate([jnp.mean(top, axis=2), jnp.std(top, axis=2)], axis=-1)
      logits = (EqualizedDense(self.num_conditions, gain=1.0, name="condition_logits")(features)
                + EqualizedDense(self.num_conditions, gain=1.0, name="spectrum_logits")(spectrum))
      return scores, logits.astype(features.dtype)
    return scores


def _batch_mean(scores, axis_name):
  mean = jnp.mean(scores)
  return jax.lax.pmean(mean, axis_name) if axis_name else mean


def rahinge_discriminator_loss(real_scores, fake_scores, axis_name=None):
  """Relativistic average hinge loss of the discriminator, scores [batch] -> scalar:
  mean(relu(1 - (real - mean(fake)))) + mean(relu(1 + (fake - mean(real)))).

  With `axis_name` (inside a data-parallel step) the other side's mean is over the global batch (a pmean of the
  per-device means, which are over equal numbers of samples), so the loss does not depend on the device count.
  """
  mean_real, mean_fake = _batch_mean(real_scores, axis_name), _batch_mean(fake_scores, axis_name)
  return (jnp.mean(jax.nn.relu(1.0 - (real_scores - mean_fake)))
          + jnp.mean(jax.nn.relu(1.0 + (fake_scores - mean_real))))


def rahinge_generator_loss(real_scores, fake_scores, axis_name=None):
  """Relativistic average hinge loss of the generator (the roles of real and fake swapped), scalar:
  mean(relu(1 + (real - mean(fake)))) + mean(relu(1 - (fake - mean(real)))); `axis_name` as above.
  """
  mean_real, mean_fake = _batch_mean(real_scores, axis_name), _batch_mean(fake_scores, axis_name)
  return (jnp.mean(jax.nn.relu(1.0 + (real_scores - mean_fake)))
          + jnp.mean(jax.nn.relu(1.0 - (fake_scores - mean_real))))


def auxiliary_loss(logits, condition):
  """AC-GAN's auxiliary loss: sigmoid cross-entropy between condition logits [batch, K] and the condition
  intensities [batch, K] in [0, 1] (soft targets), summed over the K emotions and averaged over the (local) batch;
  with soft targets its minimum is their entropy, not 0. In a data-parallel step the gradients' pmean makes it
  the global batch's mean, as the per-device batches are equal.
  """
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, condition), axis=-1))
