"""Checkpointer: latest/best round trips, resuming in a fresh instance, sharded restores."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from exvo_jax import parallel
from exvo_jax.checkpoint import Checkpointer, with_sharding


def _make_state():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optax.adam(1e-2))


def _states(n):
  """n states after 1..n Adam steps, so params and optimizer moments all differ."""
  state, states = _make_state(), []
  for i in range(n):
    grads = jax.tree.map(lambda p: jnp.full_like(p, i + 1.0), state.params)
    state = state.apply_gradients(grads=grads)
    states.append(state)
  return states


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _save_three(ckpt, values):
  """Saves _states(3) at steps 1, 2, 3 with metric 'acc' = values[i]; returns the states."""
  states = _states(3)
  for step, (state, value) in enumerate(zip(states, values), start=1):
    ckpt.save(step, state, metrics={"acc": value}, extra={"epoch": step, "pos": 10 * step})
  return states


def test_restore_latest_keeps_types_values_and_extra(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="acc") as ckpt:
    states = _save_three(ckpt, [0.1, 0.2, 0.3])
    step, state, extra = ckpt.restore_latest(jax.eval_shape(_make_state))
  assert step == 3
  assert extra == {"epoch": 3, "pos": 30}
  assert isinstance(state, train_state.TrainState)
  assert isinstance(state.opt_state[0], optax.ScaleByAdamState)
  assert isinstance(state.opt_state[1], optax.EmptyState)
  assert int(state.step) == 3 and int(state.opt_state[0].count) == 3
  _assert_trees_equal(state.params, states[2].params)
  _assert_trees_equal(state.opt_state, states[2].opt_state)
  # Static fields come from the abstract target, so the restored state can keep training.
  assert state.apply_gradients(grads=state.params).step == 4
  # max_to_keep=2 latest, a single best.
  assert sorted(os.listdir(tmp_path / "latest")) == ["2", "3"]
  assert os.listdir(tmp_path / "best") == ["3"]


@pytest.mark.parametrize("mode, values", [("max", [0.5, 0.9, 0.7]), ("min", [0.5, 0.3, 0.4])])
def test_best_is_not_the_latest(tmp_path, mode, values):
  with Checkpointer(tmp_path, best_metric="acc", best_mode=mode) as ckpt:
    states = _save_three(ckpt, values)
    assert ckpt.latest_step() == 3
    assert ckpt.best_step() == 2
    assert ckpt.best_value == pytest.approx(values[1])
    best = ckpt.restore_best(jax.eval_shape(_make_state))
  _assert_trees_equal(best.params, states[1].params)
  _assert_trees_equal(best.opt_state, states[1].opt_state)
  assert os.listdir(tmp_path / "best") == ["2"]


def test_fresh_checkpointer_resumes_latest_and_best(tmp_path):
  with Checkpointer(tmp_path, best_metric="acc") as ckpt:
    states = _save_three(ckpt, [0.5, 0.9, 0.7])
  with Checkpointer(tmp_path, best_metric="acc") as ckpt:
    assert ckpt.latest_step() == 3
    assert ckpt.best_step() == 2
    assert ckpt.best_value == pytest.approx(0.9)
    step, state, extra = ckpt.restore_latest(jax.eval_shape(_make_state))
    assert (step, extra) == (3, {"epoch": 3, "pos": 30})
    _assert_trees_equal(state.params, states[2].params)
    # The persisted best value still rules: 0.8 is no improvement, 0.95 is.
    ckpt.save(4, state, metrics={"acc": 0.8})
    assert ckpt.best_step() == 2
    ckpt.save(5, state, metrics={"acc": 0.95})
    assert ckpt.best_step() == 5
    assert ckpt.best_value == pytest.approx(0.95)
    assert ckpt.latest_step() == 5
    _assert_trees_equal(ckpt.restore_best(jax.eval_shape(_make_state)).params, states[2].params)
    # A save without extra round-trips an empty dict.
    assert ckpt.restore_latest(jax.eval_shape(_make_state))[2] == {}


def test_empty_directory_restores_none(tmp_path):
  with Checkpointer(tmp_path / "fresh", best_metric="acc") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.best_step() is None
    assert ckpt.best_value is None
    assert ckpt.restore_latest(jax.eval_shape(_make_state)) is None
    assert ckpt.restore_best(jax.eval_shape(_make_state)) is None


def test_restore_places_arrays_on_the_mesh(tmp_path):
  mesh = parallel.make_mesh()
  replicated = NamedSharding(mesh, P())
  with Checkpointer(tmp_path) as ckpt:
    [state] = _states(1)
    ckpt.save(1, parallel.replicate(state, mesh))
    _, restored, _ = ckpt.restore_latest(with_sharding(jax.eval_shape(_make_state), replicated))
    with pytest.raises(ValueError, match="best_metric"):
      ckpt.restore_best(jax.eval_shape(_make_state))
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    assert len(leaf.sharding.device_set) == jax.device_count()
  _assert_trees_equal(restored.params, state.params)


def test_async_save_survives_deleting_the_state(tmp_path):
  """A step may donate the state right after `save`: the arrays are on host by then."""
  [state] = _states(1)
  expected = jax.tree.map(np.asarray, state.params)
  on_device = jax.tree.map(jnp.copy, state)
  with Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(1, on_device)
    for leaf in jax.tree.leaves(on_device):
      leaf.delete()
    _, restored, _ = ckpt.restore_latest(jax.eval_shape(_make_state))
  _assert_trees_equal(restored.params, expected)


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with Checkpointer("work", best_metric="acc") as ckpt:
    assert ckpt.directory.is_absolute()
    with pytest.raises(ValueError, match="lack best_metric"):
      ckpt.save(1, _states(1)[0], metrics={"loss": 1.0})
    assert ckpt.latest_step() is None  # Checked before anything is written.
    ckpt.save(1, _states(1)[0], metrics={"acc": 1.0})
  assert os.listdir(tmp_path / "work" / "latest") == ["1"]
  assert os.listdir(tmp_path / "work" / "best") == ["1"]


def test_bad_best_mode_raises(tmp_path):
  with pytest.raises(ValueError, match="best_mode"):
    Checkpointer(tmp_path, best_mode="largest")


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_state", "garble_extra"])
def test_unreadable_latest_falls_back_to_the_previous_one(tmp_path, capsys, damage):
  states = _states(3)
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    for step, state in enumerate(states, start=1):
      ckpt.save(step, state, extra={"step": step})
  latest = tmp_path / "latest" / "3"
  if damage == "truncate_arrays":
    for path in (latest / "state").rglob("*"):
      if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
        path.write_bytes(path.read_bytes()[:5])
  elif damage == "delete_state":
    for path in sorted((latest / "state").rglob("*"), reverse=True):
      path.unlink() if path.is_file() else path.rmdir()
  else:
    (latest / "extra" / "metadata").write_text("{not json")
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    step, state, extra = ckpt.restore_latest(jax.eval_shape(_make_state))
    assert (step, extra) == (2, {"step": 2})
    _assert_trees_equal(state.params, states[1].params)
    assert "checkpoint step 3" in capsys.readouterr().out
    assert (tmp_path / "unreadable" / "3").exists() and not latest.exists()
    assert ckpt.save(3, states[2], extra={"step": 3})  # the step is free again
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(_make_state))[0] == 3
