"""Adam and ExtraAdam: the bilinear game min_x max_y x*y (simultaneous steps fail, extragradient steps converge),
a numpy reference for ExtraAdam's moment updates, a quadratic sanity check and a jit round trip of the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exvo_jax import optim

START = {"x": jnp.array(1.0), "y": jnp.array(1.0)}


def bilinear_field(p):
  """min_x max_y x*y as one descent field: x descends on f (df/dx = y), y descends on -f (-df/dy = -x)."""
  return {"x": p["y"], "y": -p["x"]}


def distance(p):
  """Distance of (x, y) to the equilibrium (0, 0), float64 numpy, elementwise over a path."""
  return np.hypot(np.asarray(p["x"], np.float64), np.asarray(p["y"], np.float64))


def simultaneous_run(tx, steps, field=bilinear_field, params=START):
  """Both players step at once from the same point (one optax step on the joint field).

  Returns (final params, the params after every step, stacked on a leading [steps] axis).
  """
  def step(carry, _):
    p, s = carry
    updates, s = tx.update(field(p), s, p)
    p = optax.apply_updates(p, updates)
    return (p, s), p
  (final, _), path = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(params)
  return final, path


def extragradient_run(opt, steps, field=bilinear_field, params=START):
  """Extrapolate with the field at p, update p with the field at the extrapolated point; as `simultaneous_run`."""
  def step(carry, _):
    p, s = carry
    half, s = opt.extrapolate(field(p), s, p)
    p, s = opt.step(field(half), s)
    return (p, s), p
  (final, _), path = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps))(params)
  return final, path


def test_sgd_bilinear_simultaneous_diverges_extragradient_converges():
  # z = x + iy: a simultaneous step is z <- (1 + i lr) z, an extragradient step z <- (1 - lr^2 + i lr) z, so the
  # distance grows by sqrt(1 + lr^2) or shrinks by sqrt(1 - lr^2 + lr^4) per step, exactly.
  lr, steps = 0.2, 500
  start = np.sqrt(2.0)
  simultaneous = distance(simultaneous_run(optax.sgd(lr), steps)[1])
  extra = distance(extragradient_run(optim.extragradient(optax.sgd(lr)), steps)[1])
  n = np.arange(1, steps + 1)
  np.testing.assert_allclose(simultaneous, start * (1 + lr**2) ** (n / 2), rtol=1e-3)
  np.testing.assert_allclose(extra, start * (1 - lr**2 + lr**4) ** (n / 2), rtol=1e-3)
  assert simultaneous[-1] > 1e4 and extra[-1] < 1e-4


@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_adam_bilinear_cycles_extra_adam_converges(lr):
  # Adam's steps are normalised by the gradient's RMS, so neither method reaches (0, 0) exactly at a constant
  # learning rate: both end on a cycle whose radius scales with lr. Measured (b1 = 0, b2 = 0.99): simultaneous
  # Adam settles at ~28 lr (0.28 at lr 0.01, 2.8 at lr 0.1: at lr 0.1 it moves AWAY from the start at sqrt(2)),
  # ExtraAdam at ~1.15 lr, some 25 times closer.
  steps = 2000
  adam = distance(simultaneous_run(optim.adam(lr), steps)[1])
  extra = distance(extragradient_run(optim.extra_adam(lr), steps)[1])
  assert adam[-1] > 20 * lr
  assert adam[-500:].min() > 0.95 * adam[-1]  # a cycle, not a slow approach
  assert extra[-1] < 1.5 * lr
  assert extra[-1] < adam[-1] / 15


def test_with_a_decaying_learning_rate_extra_adam_reaches_the_equilibrium_and_adam_does_not():
  # lr 0.1 decayed tenfold every 1,000 steps (ExtraAdam's schedule advances twice per iteration, as its count
  # does). Measured: Adam stalls at a distance of ~0.30 from (0, 0); ExtraAdam ends at ~1e-26.
  schedule = optax.exponential_decay(0.1, transition_steps=1000, decay_rate=0.1)
  adam = distance(simultaneous_run(optim.adam(schedule), 4000)[1])
  extra = distance(extragradient_run(optim.extra_adam(schedule), 4000)[1])
  assert adam[-1] > 0.2 and abs(adam[-1] - adam[-1000]) < 0.01  # stuck away from the equilibrium
  assert extra[-1] < 1e-8 and extra[-1] < extra[-1000]  # converged, and still approaching


def test_extra_adam_matches_numpy_reference():
  """Gidel et al.'s ExtraAdam: both the extrapolation and the update step advance Adam's moments and count."""
  lr, b1, b2, eps = 0.05, 0.5, 0.9, 1e-8
  opt = optim.extra_adam(lr, b1=b1, b2=b2, eps=eps)
  final, _ = extragradient_run(opt, 5, params={"x": jnp.array(1.0), "y": jnp.array(1.0)})

  p = np.array([1.0, 1.0])
  m, v, t = np.zeros(2), np.zeros(2), 0

  def adam_step(point, grad):
    nonlocal m, v, t
    t += 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad**2
    return point - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)

  field = lambda q: np.array([q[1], -q[0]])
  for _ in range(5):
    half = adam_step(p, field(p))
    p = adam_step(p, field(half))
  np.testing.assert_allclose([final["x"], final["y"]], p, rtol=1e-5)


def test_quadratic_minimum_same_as_adam():
  target = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}

  def grads(p):
    return jax.grad(lambda q: sum(jnp.sum((q[k] - target[k]) ** 2) for k in q) / 2)(p)

  # A decaying learning rate: at a constant one ExtraAdam's normalised steps keep it ~lr from the minimum.
  schedule = optax.exponential_decay(0.05, transition_steps=500, decay_rate=0.1)
  start = jax.tree.map(jnp.zeros_like, target)
  with_adam, _ = simultaneous_run(optim.adam(schedule), 2000, field=grads, params=start)
  with_extra, _ = extragradient_run(optim.extra_adam(schedule), 2000, field=grads, params=start)
  for result in (with_adam, with_extra):
    for key in target:
      np.testing.assert_allclose(result[key], target[key], atol=1e-4)


def test_state_is_a_pytree_of_arrays_and_survives_jit():
  opt = optim.extra_adam(0.1)
  params = {"w": jnp.arange(3.0), "b": jnp.array(1.0)}
  state = opt.init(params)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))

  def iteration(p, s):
    half, s = opt.extrapolate(jax.tree.map(lambda x: 2 * x, p), s, p)
    return opt.step(jax.tree.map(lambda x: 2 * x, half), s)

  eager = iteration(params, state)
  round_tripped = jax.jit(lambda s: s)(state)
  assert jax.tree.structure(round_tripped) == jax.tree.structure(state)
  jitted = jax.jit(iteration)(params, round_tripped)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  new_params, new_state = jitted
  assert int(new_state.inner[0].count) == 2  # Adam's count advanced at both steps
  for a, b in zip(jax.tree.leaves(new_state.anchor), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(a, b)
