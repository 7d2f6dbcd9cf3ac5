"""The multi-task MLP's shapes and output ranges."""

import jax
import jax.numpy as jnp

from exvo_jax.models import mlp


def test_mlp_shapes_and_output_ranges():
  model = mlp.MultiTaskMLP(age_bias_init=30.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 88))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  out = model.apply({"params": params}, x)
  assert out["emotions"].shape == (5, 10) and out["age"].shape == (5,) and out["country"].shape == (5, 4)
  assert bool(jnp.all((out["emotions"] > 0) & (out["emotions"] < 1)))
  assert params["age_out"]["bias"].tolist() == [30.0]
  assert params["Dense_0"]["kernel"].shape == (88, 128) and params["Dense_1"]["kernel"].shape == (128, 64)
  assert set(params) >= {"LayerNorm_0", "LayerNorm_1", "emotions_hidden", "country_out"}
