"""Data-parallel training on 8 virtual CPU devices matches the single-device step."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from exvo_jax import parallel
from exvo_jax.parallel import DATA_AXIS

NUM_DEVICES = 8
GLOBAL_BATCH = 16
NUM_STEPS = 3


class MLP(nn.Module):
  """Dense -> BatchNorm (statistics averaged over DATA_AXIS) -> relu -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool):  # x: [B, 5] -> [B, 2]
    # No bias before BatchNorm: its true gradient is 0, and Adam would amplify the float noise.
    x = nn.Dense(16, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=DATA_AXIS)(x)
    x = nn.relu(x)
    return nn.Dense(2)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


def _init_state():
  model = MLP()
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=optax.adam(1e-2))


def _train_step(state, batch):
  """Per-device step in the pmap style; batch leaves are [B_local, ...]."""

  def loss_fn(params):
    out, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                  batch["x"], train=True, mutable=["batch_stats"])
    return jnp.mean((out - batch["y"]) ** 2), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, DATA_AXIS)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  # grad_norm catches a wrongly scaled gradient, which Adam's update would hide.
  return state, {"loss": jax.lax.pmean(loss, DATA_AXIS), "grad_norm": optax.tree.norm(grads)}


def _batches():
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(GLOBAL_BATCH, 5)).astype(np.float32),
           "y": rng.normal(size=(GLOBAL_BATCH, 2)).astype(np.float32)}
          for _ in range(NUM_STEPS)]


def _train(num_devices):
  mesh = parallel.make_mesh(num_devices)
  step = parallel.data_parallel(_train_step, mesh)
  state = parallel.replicate(_init_state(), mesh)
  history = []
  for batch in _batches():
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append([float(metrics["loss"]), float(metrics["grad_norm"])])
  return state, history


def test_make_mesh():
  assert jax.device_count() == NUM_DEVICES  # conftest's virtual devices.
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (DATA_AXIS,)
  assert mesh.shape[DATA_AXIS] == NUM_DEVICES
  assert parallel.make_mesh(2).shape[DATA_AXIS] == 2
  with pytest.raises(ValueError):
    parallel.make_mesh(NUM_DEVICES + 1)


def test_data_parallel_matches_single_device():
  ref_state, ref_history = _train(1)
  dp_state, dp_history = _train(NUM_DEVICES)
  # Replicated outputs really live on every device of the mesh.
  assert len(jax.tree.leaves(dp_state.params)[0].sharding.device_set) == NUM_DEVICES
  assert int(dp_state.step) == int(ref_state.step) == NUM_STEPS
  np.testing.assert_allclose(dp_history, ref_history, atol=1e-5, rtol=1e-5)
  for name in ("params", "batch_stats"):
    ref, dp = getattr(ref_state, name), getattr(dp_state, name)
    assert jax.tree.structure(ref) == jax.tree.structure(dp)
    for r, d in zip(jax.tree.leaves(ref), jax.tree.leaves(dp)):
      np.testing.assert_allclose(np.asarray(d), np.asarray(r), atol=1e-5, rtol=1e-5)
  # Training moved the parameters, so the comparison above is not vacuous.
  init = _init_state()
  assert not np.allclose(dp_state.params["Dense_0"]["kernel"], init.params["Dense_0"]["kernel"])
  assert not np.allclose(dp_state.batch_stats["BatchNorm_0"]["mean"],
                         init.batch_stats["BatchNorm_0"]["mean"])


def test_state_is_donated():
  mesh = parallel.make_mesh()
  step = parallel.data_parallel(_train_step, mesh)
  state = parallel.replicate(_init_state(), mesh)
  old_leaves = jax.tree.leaves(state)
  new_state, _ = step(state, parallel.shard_batch(_batches()[0], mesh))
  assert all(leaf.is_deleted() for leaf in old_leaves)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


def test_indivisible_batch_raises():
  mesh = parallel.make_mesh()
  step = parallel.data_parallel(_train_step, mesh)
  state = parallel.replicate(_init_state(), mesh)
  batch = {"x": np.zeros((12, 5), np.float32), "y": np.zeros((12, 2), np.float32)}
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    step(state, batch)
  with pytest.raises(ValueError, match="divisible"):
    parallel.shard_batch(batch, mesh)
  # The check runs before the call, so nothing was donated.
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


def test_rng_is_replicated_and_axis_index_makes_it_per_device():
  mesh = parallel.make_mesh()

  def sample(rng, batch):  # batch: [B_local]; returns [NUM_DEVICES] on every device.
    same = jax.random.uniform(rng)
    own = jax.random.uniform(jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS)))
    return (jax.lax.all_gather(same, DATA_AXIS), jax.lax.all_gather(own, DATA_AXIS),
            jax.lax.all_gather(batch[0], DATA_AXIS))

  fn = parallel.data_parallel(sample, mesh, batch_argnums=(1,), donate_argnums=())
  same, own, firsts = fn(jax.random.key(1), np.arange(2 * NUM_DEVICES, dtype=np.float32))
  assert np.unique(np.asarray(same)).size == 1
  assert np.unique(np.asarray(own)).size == NUM_DEVICES
  # Device i sees rows [2i, 2i + 1] of the global batch.
  np.testing.assert_array_equal(firsts, np.arange(0, 2 * NUM_DEVICES, 2))


def test_global_batch_from_local_single_process():
  mesh = parallel.make_mesh()
  local = {"x": np.arange(32, dtype=np.float32).reshape(16, 2)}
  batch = parallel.global_batch_from_local(local, mesh)
  assert batch["x"].shape == (16, 2)
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(DATA_AXIS)
  np.testing.assert_array_equal(batch["x"], local["x"])
  assert len(batch["x"].addressable_shards) == NUM_DEVICES
