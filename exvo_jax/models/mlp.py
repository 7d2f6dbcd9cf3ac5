"""The ExVo-MultiTask baseline network: a shared MLP trunk and one small head per task."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# (name, outputs, kind): kind 'sigmoid' -> intensities in (0, 1); 'scalar' -> [B] linear; 'linear' or 'logits' ->
# [B, k] as they are. exvo_jax/tasks/multitask.py builds the heads from targets (exvo_jax/targets.py).
EXVO_HEADS = (("emotions", 10, "sigmoid"), ("age", 1, "scalar"), ("country", 4, "logits"))


def _leaky(x):
  return nn.leaky_relu(x, negative_slope=0.01)


class MultiTaskMLP(nn.Module):
  """Trunk D -> 128 -> LayerNorm -> LeakyReLU -> 64 -> LayerNorm -> LeakyReLU; each head 64 -> 32 -> k.

  Input [B, D] standardised features. Output: a dict with one entry per head; with the default ExVo heads,
  `emotions` [B, 10] in (0, 1) (sigmoid), `age` [B] in years (linear), `country` [B, 4] logits.
  With `layers` > 1 the input is that many equal blocks, one per encoder layer ([B, layers * P]), first combined
  by a softmax-weighted sum with learned weights (`layer_weights`, starting equal): the frozen-encoder recipe.
  """
  heads: tuple[tuple[str, int, str], ...] = EXVO_HEADS
  trunk: tuple[int, ...] = (128, 64)
  head_hidden: int = 32
  # Starting the age output at the training mean (years) instead of 0 spares hundreds of steps of bias drift on
  # small corpora; 0.0 reproduces the reference initialisation.
  age_bias_init: float = 0.0
  layers: int = 1

  @nn.compact
  def __call__(self, features):
    h = features
    if self.layers > 1:
      weights = jax.nn.softmax(self.param("layer_weights", nn.initializers.zeros, (self.layers,)))
      h = jnp.einsum("l,blp->bp", weights, h.reshape(h.shape[0], self.layers, -1))
    for width in self.trunk:
      h = _leaky(nn.LayerNorm()(nn.Dense(width)(h)))
    outputs = {}
    for name, size, kind in self.heads:
      bias_init = nn.initializers.constant(self.age_bias_init) if name == "age" else nn.initializers.zeros
      hidden = _leaky(nn.Dense(self.head_hidden, name=f"{name}_hidden")(h))
      out = nn.Dense(size, name=f"{name}_out", bias_init=bias_init)(hidden)
      outputs[name] = jax.nn.sigmoid(out) if kind == "sigmoid" else out[..., 0] if kind == "scalar" else out
    return outputs
