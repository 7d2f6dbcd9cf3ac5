"""MSG-GAN: shapes at every scale, equalised learning rate, pixel norm, minibatch stddev, the latent sphere,
the RaHinge losses against hand computations, and a discriminator that learns on a toy batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exvo_jax.models import msggan

SMALL = (8, 8, 8, 8, 4, 4, 4)  # generator channels per scale for tests (the recipe's are 512 ... 64)
BATCH = 2


def init_params(module, *args, seed=0):
  """Parameters of `module` as its init makes them (kernels N(0, 1), biases 0), drawn with numpy.

  The shapes come from jax.eval_shape(module.init): on this CPU, compiling jax.random.normal costs about a second
  per distinct parameter shape (partitionable threefry), some 10 s per network; the init's own values are checked
  on one layer in test_equalized_dense_init_and_output_by_hand.
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(rng.standard_normal(leaf.shape) if path[-1].key == "kernel"
                                     else np.zeros(leaf.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def conditional_gan():
  """A small conditional G and D, their parameters, a latent batch, a condition batch and G's images."""
  generator = msggan.Generator(SMALL, num_conditions=10)
  discriminator = msggan.Discriminator(SMALL, num_conditions=10)
  latent = msggan.sample_latent(jax.random.PRNGKey(0), BATCH)
  condition = jax.random.uniform(jax.random.PRNGKey(1), (BATCH, 10))
  g_params = init_params(generator, latent, condition, seed=1)
  images = jax.jit(generator.apply)({"params": g_params}, latent, condition)
  d_params = init_params(discriminator, images, condition, seed=2)
  return generator, discriminator, g_params, d_params, latent, condition, images


def numpy_pyramid(images):
  """[B, 128, 512, C] -> the 7 scales, smallest first, by 2^k x 2^k block means (float64 numpy)."""
  images = np.asarray(images, np.float64)
  b, h, w, c = images.shape
  return [images.reshape(b, h // 2**k, 2**k, w // 2**k, 2**k, c).mean(axis=(2, 4)) for k in range(6, -1, -1)]


def test_unconditional_shapes_at_every_scale_and_real_pyramid():
  generator, discriminator = msggan.Generator(SMALL), msggan.Discriminator(SMALL)
  generate, score = jax.jit(generator.apply), jax.jit(discriminator.apply)
  latent = msggan.sample_latent(jax.random.PRNGKey(0), BATCH)
  g_params = init_params(generator, latent, seed=1)
  images = generate({"params": g_params}, latent)
  assert [image.shape for image in images] == [(BATCH, h, w, 1) for h, w in msggan.SCALES]
  assert all(bool(jnp.all(jnp.isfinite(image))) for image in images)
  # The generator puts the latent on the sphere itself: a rescaled latent gives the same images (up to float
  # rounding, which pixel norm over 4 channels amplifies where a feature vector is near zero).
  np.testing.assert_allclose(generate({"params": g_params}, 3.0 * latent)[-1], images[-1], atol=2e-3)

  d_params = init_params(discriminator, images, seed=2)
  assert score({"params": d_params}, images).shape == (BATCH,)
  real = jax.random.normal(jax.random.PRNGKey(3), (BATCH, 128, 512, 1))
  pyramid = jax.jit(msggan.image_pyramid)(real)
  assert [image.shape for image in pyramid] == [image.shape for image in images]
  scores = score({"params": d_params}, pyramid)
  assert scores.shape == (BATCH,) and bool(jnp.all(jnp.isfinite(scores)))
  with pytest.raises(ValueError, match="unconditional"):
    discriminator.apply({"params": d_params}, images, jnp.zeros((BATCH, 10)))


def test_conditional_shapes_and_projection_head(conditional_gan):
  generator, discriminator, g_params, d_params, latent, condition, images = conditional_gan
  generate = jax.jit(generator.apply)
  # The scores and the final dense layer's output (before its LeakyReLU), to redo the projection by hand.
  score = jax.jit(lambda params, images, condition: discriminator.apply(
      {"params": params}, images, condition, capture_intermediates=True, mutable=["intermediates"]))
  assert [image.shape for image in images] == [(BATCH, h, w, 1) for h, w in msggan.SCALES]
  other_images = generate({"params": g_params}, latent, 1.0 - condition)
  assert float(jnp.max(jnp.abs(other_images[-1] - images[-1]))) > 1e-3

  scores_per_condition = []
  for c in (condition, 1.0 - condition):
    scores, state = score(d_params, images, c)
    assert scores.shape == (BATCH,)
    scores_per_condition.append(scores)
    h = np.asarray(jax.nn.leaky_relu(state["intermediates"]["final_dense"]["__call__"][0], 0.2), np.float64)
    head, embed = d_params["score"], d_params["condition_embed"]
    # score = dense(h) + <embed(c), h>, both equalised with gain 1: scale 1 / sqrt(fan_in).
    expected = (h @ (np.asarray(head["kernel"])[:, 0] / np.sqrt(h.shape[1])) + float(head["bias"][0])
                + np.sum((np.asarray(c) @ (np.asarray(embed["kernel"]) / np.sqrt(10))) * h, axis=1))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(scores_per_condition[0] - scores_per_condition[1]))) > 1e-4

  with pytest.raises(ValueError, match="num_conditions=10"):
    generator.apply({"params": g_params}, latent)
  with pytest.raises(ValueError, match="num_conditions=10"):
    discriminator.apply({"params": d_params}, images, condition[:, :3])


def test_equalized_dense_init_and_output_by_hand():
  layer = msggan.EqualizedDense(512)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 512))
  params = layer.init(jax.random.PRNGKey(1), x)["params"]
  kernel = np.asarray(params["kernel"])
  assert abs(kernel.mean()) < 0.01 and abs(kernel.std() - 1.0) < 0.01  # stored N(0, 1): 262,144 draws
  assert np.all(np.asarray(params["bias"]) == 0)
  assert layer.scale(512) == pytest.approx(np.sqrt(2 / 512))
  bias = jax.random.normal(jax.random.PRNGKey(2), (512,))
  out = layer.apply({"params": {"kernel": params["kernel"], "bias": bias}}, x)
  expected = np.asarray(x, np.float64) @ (kernel * np.sqrt(2 / 512)) + np.asarray(bias)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  linear = msggan.EqualizedDense(3, gain=1.0)
  assert linear.scale(16) == pytest.approx(0.25)


def test_equalized_conv_output_by_hand():
  layer = msggan.EqualizedConv(5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
  params = init_params(layer, x)
  assert params["kernel"].shape == (3, 3, 3, 5) and params["bias"].shape == (5,)
  bias = jax.random.normal(jax.random.PRNGKey(2), (5,))
  out = np.asarray(layer.apply({"params": {"kernel": params["kernel"], "bias": bias}}, x))
  w = np.asarray(params["kernel"], np.float64) * np.sqrt(2 / (3 * 3 * 3))  # fan_in = kh * kw * in_channels
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))  # SAME for a 3x3 kernel
  expected = np.zeros((2, 4, 6, 5))
  for i in range(4):
    for j in range(6):
      patch = padded[:, i:i + 3, j:j + 3, :].reshape(2, -1)  # [B, kh * kw * C], same order as w's rows
      expected[:, i, j] = patch @ w.reshape(-1, 5) + np.asarray(bias)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert msggan.EqualizedConv(1, (1, 1), gain=1.0).scale(64) == pytest.approx(1 / 8)


def test_pixel_norm_gives_unit_rms_over_channels():
  x = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8, 32)) + 2.0
  rms = np.sqrt(np.mean(np.square(np.asarray(msggan.pixel_norm(x), np.float64)), axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-5)


@pytest.mark.parametrize("batch", [8, 2])
def test_minibatch_stddev_matches_numpy(batch):
  x = np.random.default_rng(batch).normal(size=(batch, 2, 8, 6)).astype(np.float32)
  out = np.asarray(msggan.minibatch_stddev(jnp.asarray(x), group_size=4))
  assert out.shape == (batch, 2, 8, 7)
  np.testing.assert_array_equal(out[..., :6], x)
  group = min(4, batch)
  for b in range(batch):  # consecutive groups: sample b sits in group b // group
    same_group = x[(b // group) * group:(b // group + 1) * group].astype(np.float64)
    expected = np.mean(np.sqrt(np.var(same_group, axis=0) + 1e-8))  # population std over the group, averaged
    np.testing.assert_allclose(out[b, ..., 6], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="multiple of the group size"):
    msggan.minibatch_stddev(jnp.zeros((6, 2, 8, 3)))


def test_latent_on_the_sphere():
  latent = msggan.sample_latent(jax.random.PRNGKey(0), 16)
  assert latent.shape == (16, msggan.LATENT_DIM)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(latent, np.float64), axis=1), np.sqrt(512), rtol=1e-5)


def test_upsampling_and_pyramid():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 3))
  ours, reference = jax.jit(lambda x: (msggan.upsample2x(x), jax.image.resize(x, (2, 8, 16, 3), "bilinear")))(x)
  np.testing.assert_allclose(ours, reference, atol=1e-6)
  real = np.random.default_rng(0).normal(size=(2, 128, 512, 1)).astype(np.float32)
  pyramid = jax.jit(msggan.image_pyramid)(jnp.asarray(real))
  assert [level.shape for level in pyramid] == [(2, h, w, 1) for h, w in msggan.SCALES]
  for level, expected in zip(pyramid, numpy_pyramid(real)):  # the 2x8 level averages 64 x 64 blocks
    np.testing.assert_allclose(level, expected, atol=1e-5)
  np.testing.assert_array_equal(pyramid[-1], real)


def test_rahinge_losses_by_hand():
  # real [1, 2], fake [0, -1]: mean(fake) -0.5, mean(real) 1.5.
  # D: relu(1 - [1.5, 2.5]) = [0, 0]; relu(1 + [-1.5, -2.5]) = [0, 0]  -> 0 (D already wins by the margin)
  # G: relu(1 + [1.5, 2.5]) = [2.5, 3.5] mean 3; relu(1 - [-1.5, -2.5]) = [2.5, 3.5] mean 3  -> 6
  real, fake = jnp.array([1.0, 2.0]), jnp.array([0.0, -1.0])
  assert float(msggan.rahinge_discriminator_loss(real, fake)) == pytest.approx(0.0)
  assert float(msggan.rahinge_generator_loss(real, fake)) == pytest.approx(6.0)
  # real [1, 2], fake [0.5, 3]: mean(fake) 1.75, mean(real) 1.5.
  # D: relu(1 - [-0.75, 0.25]) = [1.75, 0.75] mean 1.25; relu(1 + [-1, 1.5]) = [0, 2.5] mean 1.25  -> 2.5
  # G: relu(1 + [-0.75, 0.25]) = [0.25, 1.25] mean 0.75; relu(1 - [-1, 1.5]) = [2, 0] mean 1  -> 1.75
  real, fake = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
  assert float(msggan.rahinge_discriminator_loss(real, fake)) == pytest.approx(2.5)
  assert float(msggan.rahinge_generator_loss(real, fake)) == pytest.approx(1.75)

  rng = np.random.default_rng(0)
  r, f = rng.normal(size=64), rng.normal(size=64) - 0.5
  relu = lambda v: np.maximum(v, 0.0)
  d = relu(1 - (r - f.mean())).mean() + relu(1 + (f - r.mean())).mean()
  g = relu(1 + (r - f.mean())).mean() + relu(1 - (f - r.mean())).mean()
  assert float(msggan.rahinge_discriminator_loss(jnp.asarray(r), jnp.asarray(f))) == pytest.approx(d, rel=1e-5)
  assert float(msggan.rahinge_generator_loss(jnp.asarray(r), jnp.asarray(f))) == pytest.approx(g, rel=1e-5)


def test_discriminator_learns_a_toy_batch(conditional_gan):
  _, discriminator, _, d_params, _, condition, _ = conditional_gan
  # Real 'spectrograms': a smooth ripple; fakes: the same ripple, fainter, under white noise (not the untrained
  # generator's output, which the untrained critic may already separate by chance, with a loss of 0).
  mel, frames = np.meshgrid(np.arange(128), np.arange(512), indexing="ij")
  ripple = np.broadcast_to(np.sin(mel / 9.0) * np.cos(frames / 23.0), (BATCH, 128, 512))[..., None]
  noise = np.random.default_rng(0).normal(size=ripple.shape)
  real, fake = ([jnp.asarray(level, jnp.float32) for level in numpy_pyramid(images)]
                for images in (ripple, 0.5 * ripple + 0.5 * noise))
  tx = optax.adam(3e-3, b1=0.0, b2=0.99)

  def loss(params):
    apply = lambda images: discriminator.apply({"params": params}, images, condition)
    return msggan.rahinge_discriminator_loss(apply(real), apply(fake))

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params, opt_state = d_params, tx.init(d_params)
  losses = []
  for _ in range(8):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  # Measured: 1.86, 1.67, 1.48, 1.25, 0.95, 0.54, 0.08, 0.0001.
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.25 * losses[0], losses


def test_condition_modulates_every_convolution_and_auxiliary_head(conditional_gan):
  generator, _, g_params, _, latent, condition, images = conditional_gan
  # One modulation layer per generator convolution (13: one in the first block, two in each of the other six),
  # plus the one after the input layer, each giving a scale and a shift per channel.
  modulations = {name: p["kernel"].shape for name, p in g_params.items() if name.endswith("_modulation")}
  assert len(modulations) == 1 + 1 + 2 * (len(SMALL) - 1)
  assert modulations["block6_conv1_modulation"] == (msggan.LATENT_DIM, 2 * SMALL[-1])
  # Through the modulation alone (the input concatenation zeroed), the condition still changes the top scale.
  params = dict(g_params, input_dense=dict(g_params["input_dense"]))
  kernel = np.array(params["input_dense"]["kernel"])
  kernel[msggan.LATENT_DIM:] = 0.0
  params["input_dense"]["kernel"] = jnp.asarray(kernel)
  a, b = (generator.apply({"params": params}, latent, c)[-1] for c in (condition, 1.0 - condition))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3

  auxiliary = msggan.Discriminator(SMALL, num_conditions=10, auxiliary=True)
  d_params = init_params(auxiliary, images, condition, seed=3)
  scores, logits = auxiliary.apply({"params": d_params}, images, condition)
  assert scores.shape == (BATCH,) and logits.shape == (BATCH, 10)
  with pytest.raises(ValueError, match="set num_conditions"):
    msggan.Discriminator(SMALL, auxiliary=True).init(jax.random.PRNGKey(0), images)


def test_auxiliary_loss_is_soft_target_sigmoid_cross_entropy():
  rng = np.random.default_rng(0)
  logits, targets = 4.0 * rng.normal(size=(6, 10)), rng.uniform(size=(6, 10))
  p = 1.0 / (1.0 + np.exp(-logits))
  expected = np.mean(np.sum(-(targets * np.log(p) + (1.0 - targets) * np.log(1.0 - p)), axis=1))
  got = float(msggan.auxiliary_loss(jnp.asarray(logits), jnp.asarray(targets)))
  assert got == pytest.approx(expected, rel=1e-5)
  # Large logits do not overflow; the minimum over logits is the targets' entropy (at logit(target)).
  assert np.isfinite(float(msggan.auxiliary_loss(jnp.full((1, 10), 1e4), jnp.zeros((1, 10)))))
  best = jnp.log(targets / (1.0 - targets))
  entropy = np.mean(np.sum(-(targets * np.log(targets) + (1 - targets) * np.log(1 - targets)), axis=1))
  assert float(msggan.auxiliary_loss(best, jnp.asarray(targets))) == pytest.approx(entropy, rel=1e-5)
