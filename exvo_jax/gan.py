"""The ExVo-Generate GAN: its state, its data-parallel training step and its generator function.

The networks are `models/msggan.py`; this module holds what training them needs: one `GanState` pytree (a
generator part and a discriminator part), `make_gan_step` (RaHinge losses, optional AC-GAN and mode-seeking
terms, Adam with alternating D/G updates or ExtraAdam's extragradient steps, the generator's moving average),
the log-mel <-> image scaling, and the jitted generator that sampling calls.
"""

import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

from exvo_jax import optim
from exvo_jax import parallel
from exvo_jax.data import schema
from exvo_jax.features import mel
from exvo_jax.models import msggan

EMOTIONS = schema.EMOTIONS
# config.gan.optimiser -> (make one player's optimiser from its learning rate, whether it is extragradient)
OPTIMISERS = {"adam": (optim.adam, False), "extra_adam": (optim.extra_adam, True)}


@flax.struct.dataclass
class GanState:
  """One pytree for the GAN: a generator part (params, EMA params, optimiser state) and a discriminator part."""
  step: jax.Array
  generator: Any
  generator_ema: Any
  generator_opt: Any
  discriminator: Any
  discriminator_opt: Any


@dataclasses.dataclass(frozen=True)
class Gan:
  """The two networks and their optimisers (Adam: alternating D then G steps; ExtraAdam: extragradient)."""
  generator: msggan.Generator
  discriminator: msggan.Discriminator
  generator_tx: Any
  discriminator_tx: Any
  extragradient: bool
  ema_decay: float
  auxiliary_weight: float = 0.0  # > 0: D also predicts the condition (AC-GAN), and G is asked to match it
  diversity_weight: float = 0.0  # > 0: G's mode-seeking term (different latents, same condition -> different clips)

  @property
  def conditional(self):
    return self.generator.num_conditions > 0


def make_gan(gan_config, *, conditional):
  channels = tuple(max(1, c // gan_config.channel_divisor) for c in gan_config.channels)
  num_conditions = len(EMOTIONS) if conditional else 0
  make_tx, extragradient = OPTIMISERS[gan_config.optimiser]
  auxiliary_weight = gan_config.auxiliary_weight if conditional else 0.0
  diversity_weight = gan_config.diversity_weight if conditional else 0.0
  return Gan(msggan.Generator(channels=channels, num_conditions=num_conditions),
             msggan.Discriminator(channels=channels, num_conditions=num_conditions, auxiliary=auxiliary_weight > 0),
             make_tx(gan_config.generator_learning_rate), make_tx(gan_config.discriminator_learning_rate),
             extragradient, gan_config.ema_decay, auxiliary_weight, diversity_weight)


def init_gan_state(gan, seed):
  key_g, key_d = jax.random.split(jax.random.PRNGKey(seed))
  latent = msggan.sample_latent(key_g, 2)
  condition = jnp.zeros((2, len(EMOTIONS))) if gan.conditional else None
  g_params = gan.generator.init(key_g, latent, condition)["params"]
  fake = gan.generator.apply({"params": g_params}, latent, condition)
  d_params = gan.discriminator.init(key_d, fake, condition)["params"]
  return GanState(step=jnp.zeros((), jnp.int32), generator=g_params, generator_ema=jax.tree.map(jnp.copy, g_params),
                  generator_opt=gan.generator_tx.init(g_params), discriminator=d_params,
                  discriminator_opt=gan.discriminator_tx.init(d_params))


class GanInputs(NamedTuple):
  """What both players' losses read in one step (per device).

  real_pyramid: the real clips' log-mel images at every scale; latent: [b, 512]; condition: [b, 10] intensities
  or None (unconditional); second_latent: [b, 512] for the mode-seeking term, or None.
  """
  real_pyramid: Any
  latent: jax.Array
  condition: Any
  second_latent: Any


class Judgement(NamedTuple):
  """The discriminator's view of a real and a generated batch: scores per scale, condition logits (None without
  the AC head), and the generator's fakes at every scale."""
  real: Any
  fake: Any
  real_logits: Any
  fake_logits: Any
  fakes: Any


class LossParts(NamedTuple):
  """The parts a player's loss includes (times their weights): AC-GAN auxiliary and mode-seeking (G only)."""
  auxiliary: jax.Array
  mode_seeking: jax.Array


def make_gan_step(gan, *, global_batch, seed):
  """The per-device step `(state, batch) -> (state, metrics)`; batch: audio [b, CLIP_SAMPLES], condition [b, 10].

  The log-mel of the real clips is computed inside the step. Latents are drawn for the whole global batch from
  (seed, step) and each device takes its rows, so the step does not depend on the number of devices. The fakes
  are generated with the real batch's conditions.

  Losses: RaHinge; with `auxiliary_weight` > 0 the discriminator adds weight x the auxiliary loss of its
  condition logits on the REAL clips, and the generator weight x the same loss on its fakes against the
  conditions it was given (AC-GAN with the classifier trained on real data only, so fakes that do not show
  their emotion are not rewarded by a classifier that learnt them).
  With `diversity_weight` > 0 the generator also makes a second batch from fresh latents with the same
  conditions and adds weight x the mode-seeking term of Mao et al. 2019 (MSGAN), 1 / (ratio + 1e-5) averaged over
  the pairs, ratio = mean |G(z1, c) - G(z2, c)| / mean |z1 - z2| per pair (top scale): in a conditional batch the
  minibatch standard deviation sees the spread across conditions, not within one, so it does not stop a generator
  from making one clip per emotion.
  The EMA of the generator warms up: decay min(ema_decay, (1 + t) / (10 + t)) at step t, so that a short run's
  average is not dominated by the random initial weights (with 0.999 from the start they would still weigh
  0.999^2000 = 13.5% after 2,000 steps).
  """
  def latents(step, local_batch, draw=0):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    key = jax.random.fold_in(key, draw) if draw else key
    every = msggan.sample_latent(key, global_batch)
    start = jax.lax.axis_index(parallel.DATA_AXIS) * local_batch
    return jax.lax.dynamic_slice_in_dim(every, start, local_batch)

  weight, diversity = gan.auxiliary_weight, gan.diversity_weight

  def judge(g_params, d_params, inputs):
    fakes = gan.generator.apply({"params": g_params}, inputs.latent, inputs.condition)
    real_out = gan.discriminator.apply({"params": d_params}, inputs.real_pyramid, inputs.condition)
    fake_out = gan.discriminator.apply({"params": d_params}, fakes, inputs.condition)
    if weight:  # the discriminator also returns its condition logits
      return Judgement(real_out[0], fake_out[0], real_out[1], fake_out[1], fakes)
    return Judgement(real_out, fake_out, None, None, fakes)

  def d_loss_fn(d_params, g_params, inputs):
    seen = judge(jax.lax.stop_gradient(g_params), d_params, inputs)
    loss = msggan.rahinge_discriminator_loss(seen.real, seen.fake, axis_name=parallel.DATA_AXIS)
    aux = msggan.auxiliary_loss(seen.real_logits, inputs.condition) if weight else jnp.zeros(())
    return loss + weight * aux, LossParts(aux, jnp.zeros(()))

  def g_loss_fn(g_params, d_params, inputs):
    seen = judge(g_params, jax.lax.stop_gradient(d_params), inputs)
    loss = msggan.rahinge_generator_loss(seen.real, seen.fake, axis_name=parallel.DATA_AXIS)
    aux = msggan.auxiliary_loss(seen.fake_logits, inputs.condition) if weight else jnp.zeros(())
    spread = jnp.zeros(())
    if diversity:  # a second batch from other latents, same conditions; the first batch of fakes is reused
      second = gan.generator.apply({"params": g_params}, inputs.second_latent, inputs.condition)[-1]
      spread = mode_seeking_loss(seen.fakes[-1], second, inputs.latent, inputs.second_latent)
    return loss + weight * aux + diversity * spread, LossParts(aux, spread)

  def grads(fn, wrt, other, inputs):
    (loss, parts), grad = jax.value_and_grad(fn, has_aux=True)(wrt, other, inputs)
    return jax.lax.pmean((loss, parts), parallel.DATA_AXIS), jax.lax.pmean(grad, parallel.DATA_AXIS)

  def step(state, batch):
    real = to_image(mel.log_mel(batch["audio"]))[..., None]
    inputs = GanInputs(real_pyramid=msggan.image_pyramid(real), latent=latents(state.step, real.shape[0]),
                       condition=batch["condition"] if gan.conditional else None,
                       second_latent=latents(state.step, real.shape[0], draw=1) if diversity else None)
    g, d = state.generator, state.discriminator
    if gan.extragradient:
      _, d_grad = grads(d_loss_fn, d, g, inputs)
      _, g_grad = grads(g_loss_fn, g, d, inputs)
      d_half, d_opt = gan.discriminator_tx.extrapolate(d_grad, state.discriminator_opt, d)
      g_half, g_opt = gan.generator_tx.extrapolate(g_grad, state.generator_opt, g)
      (d_loss, d_parts), d_grad = grads(d_loss_fn, d_half, g_half, inputs)
      (g_loss, g_parts), g_grad = grads(g_loss_fn, g_half, d_half, inputs)
      d, d_opt = gan.discriminator_tx.step(d_grad, d_opt)
      g, g_opt = gan.generator_tx.step(g_grad, g_opt)
    else:  # alternating: the discriminator first, then the generator against the updated discriminator
      (d_loss, d_parts), d_grad = grads(d_loss_fn, d, g, inputs)
      updates, d_opt = gan.discriminator_tx.update(d_grad, state.discriminator_opt, d)
      d = jax.tree.map(jnp.add, d, updates)
      (g_loss, g_parts), g_grad = grads(g_loss_fn, g, d, inputs)
      updates, g_opt = gan.generator_tx.update(g_grad, state.generator_opt, g)
      g = jax.tree.map(jnp.add, g, updates)
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(gan.ema_decay, (1.0 + t) / (10.0 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.generator_ema, g)
    new_state = GanState(step=state.step + 1, generator=g, generator_ema=ema, generator_opt=g_opt,
                         discriminator=d, discriminator_opt=d_opt)
    result = {"d_loss": d_loss, "g_loss": g_loss}
    if weight:  # the auxiliary parts (included in the losses above, times the weight)
      result.update(d_aux=d_parts.auxiliary, g_aux=g_parts.auxiliary)
    if diversity:
      result.update(g_mode_seeking=g_parts.mode_seeking)
    return new_state, result

  return step


def mode_seeking_loss(first, second, latent, other_latent):
  """MSGAN's term for pairs (G(z1, c), G(z2, c)): mean over pairs of 1 / (mean|G1 - G2| / mean|z1 - z2| + 1e-5)."""
  axes = tuple(range(1, first.ndim))
  ratio = jnp.mean(jnp.abs(first - second), axis=axes) / jnp.mean(jnp.abs(latent - other_latent), axis=-1)
  return jnp.mean(1.0 / (ratio + 1e-5))


def to_image(log_mel):
  """Stored log-mel values -> the GAN's scale: the padding value (silence) -> -1, 0 (a loud band) -> +1.

  The stored values run from log(1e-6)/2 = -6.9 to about +2; the networks' outputs start near 0 with unit spread.
  """
  return 2.0 * (log_mel - mel.PAD_VALUE) / -mel.PAD_VALUE - 1.0


def from_image(image):
  """The inverse of `to_image`."""
  return (image + 1.0) * -mel.PAD_VALUE / 2.0 + mel.PAD_VALUE


def make_generate_fn(gan):
  """Jitted `(g_params, latent [n, 512], condition [n, 10] | None) -> log-mel [n, 128, 512]` (the top scale)."""
  @jax.jit
  def generate(g_params, latent, condition):
    return from_image(gan.generator.apply({"params": g_params}, latent, condition)[-1][..., 0])
  return generate

