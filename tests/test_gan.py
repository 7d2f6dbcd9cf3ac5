"""The GAN step: the same on 1 and 8 devices, a discriminator that learns, the mode-seeking term by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import generate as generate_config
from exvo_jax import gan as gan_lib
from exvo_jax import optim
from exvo_jax import parallel
from exvo_jax.features import mel


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
