"""Optimisers for the ExVo-Generate GAN: Adam with the GAN betas, and ExtraAdam (extragradient Adam).

Recipe (docs/hume_vb.md section 4): Adam or ExtraAdam with betas (0, 0.99) as in ProGAN/MSG-GAN, and separate
learning rates for the two players, generator 3e-3 and discriminator 3e-4. The learning rates are the caller's
business: build one optimiser per player (`adam(3e-3)` for G, `adam(3e-4)` for D, or the `extra_adam` pair).

ExtraAdam (Gidel et al. 2018, 'A Variational Inequality Perspective on Generative Adversarial Networks') takes
each step twice: an extrapolation from the current parameters with their gradients,
    params_half = params + inner_step(grads(params)),
then the real update of the ORIGINAL parameters with the gradients taken at the extrapolated point,
    new_params = params + inner_step(grads(params_half)).
On a bilinear game, simultaneous gradient steps circle out from the equilibrium while the extragradient steps
spiral into it (tests/test_optim.py shows both, with SGD and with Adam).

As in Gidel's reference implementation, the inner optimiser's state (Adam's moment estimates and step count) is
updated at BOTH steps, so one ExtraAdam iteration advances Adam's step count by two and feeds both gradients
into the moments (and a learning-rate schedule inside it runs at twice the iteration rate).

Adam's steps are normalised by the gradient's RMS, so they do not shrink near an equilibrium: at a constant
learning rate ExtraAdam ends in a neighbourhood of radius ~lr (measured ~1.15 lr on x*y, ~1.4 lr on a quadratic,
where plain Adam's lagging second moment does converge), while simultaneous Adam on x*y ends on a cycle of
radius ~28 lr. A decaying learning rate closes the gap.
"""

from typing import Any, Callable, NamedTuple

import optax


def adam(learning_rate, b1=0.0, b2=0.99, eps=1e-8):
  """optax.adam with the GAN defaults: no first-moment momentum (b1 = 0) and b2 = 0.99 (ProGAN, MSG-GAN)."""
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


class ExtragradientState(NamedTuple):
  """inner: the inner transformation's state; anchor: the parameters the next `step` starts from."""
  inner: Any
  anchor: Any


class Extragradient(NamedTuple):
  """An extragradient optimiser, optax-style: a tuple of pure functions over pytrees.

  init(params) -> state
  extrapolate(grads, state, params) -> (params_half, state): one inner step from `params`; remembers `params` as
    the anchor of the coming update.
  step(grads_at_half, state) -> (new_params, state): one inner step from the anchor with the gradients taken
    at `params_half`. Named `step`, not `update`: it returns the new parameters, not optax's (updates, state).

  The state is a pytree of arrays (checkpointable, and an argument or result of jit and shard_map like any
  optax state).
  """
  init: Callable[[Any], ExtragradientState]
  extrapolate: Callable[[Any, ExtragradientState, Any], tuple[Any, ExtragradientState]]
  step: Callable[[Any, ExtragradientState], tuple[Any, ExtragradientState]]


def extragradient(inner: optax.GradientTransformation) -> Extragradient:
  """Extragradient steps around any optax transformation (`optax.sgd(lr)` gives the classic extragradient)."""

  def init(params):
    return ExtragradientState(inner=inner.init(params), anchor=params)

  def extrapolate(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    return optax.apply_updates(params, updates), ExtragradientState(inner=inner_state, anchor=params)

  def step(grads_at_half, state):
    updates, inner_state = inner.update(grads_at_half, state.inner, state.anchor)
    new_params = optax.apply_updates(state.anchor, updates)
    # The anchor moves to the new parameters so that a checkpointed state always holds the current point.
    return new_params, ExtragradientState(inner=inner_state, anchor=new_params)

  return Extragradient(init=init, extrapolate=extrapolate, step=step)


def extra_adam(learning_rate, b1=0.0, b2=0.99, eps=1e-8) -> Extragradient:
  """ExtraAdam: extragradient around `adam` (moments updated at both steps, as in Gidel et al.'s code)."""
  return extragradient(adam(learning_rate, b1=b1, b2=b2, eps=eps))
