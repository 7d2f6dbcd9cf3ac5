"""Inner-loop adaptation: MAML's second-order gradient, masks and anchors, a restart per speaker."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fewshot as fewshot_config
from exvo_jax import emo18_trainer
from exvo_jax import adaptation
from exvo_jax.models import emo18
from exvo_jax.tasks import fewshot


def _tiny_model_loss():
  """A two-layer model and its squared loss: small enough for a finite-difference check in float64."""
  def apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]

  def loss_fn(params, batch):
    return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2)

  return loss_fn


def test_maml_second_order_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4))), "b1": jnp.asarray(rng.normal(size=4)),
              "w2": jnp.asarray(rng.normal(size=(4, 2)))}
    support = {"x": jnp.asarray(rng.normal(size=(2, 3))), "y": jnp.asarray(rng.normal(size=(2, 2)))}
    query = {"x": jnp.asarray(rng.normal(size=(5, 3))), "y": jnp.asarray(rng.normal(size=(5, 2)))}
    loss_fn = _tiny_model_loss()
    mask = adaptation.subset_mask(params, ("w2", "b1"))

    def meta_loss(p, first_order=False):
      adapted = adaptation.inner_loop(loss_fn, p, support, steps=3, learning_rate=0.3, mask=mask,
                                      first_order=first_order)
      return loss_fn(adapted, query)

    grads = jax.grad(meta_loss)(params)
    eps = 1e-6
    for name in params:
      flat = np.asarray(params[name]).reshape(-1)
      for i in range(flat.size):
        bump = np.zeros_like(flat)
        bump[i] = eps
        plus = {**params, name: jnp.asarray((flat + bump).reshape(params[name].shape))}
        minus = {**params, name: jnp.asarray((flat - bump).reshape(params[name].shape))}
        numeric = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
        assert float(np.asarray(grads[name]).reshape(-1)[i]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-8)
    # First-order MAML drops the second-order terms: a different gradient on the same problem.
    first = jax.grad(lambda p: meta_loss(p, first_order=True))(params)
    assert not np.allclose(first["w1"], grads["w1"], atol=1e-6)


def test_inner_loop_leaves_unselected_parameters_and_respects_the_anchor():
  loss_fn = _tiny_model_loss()
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.zeros(4),
            "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  mask = adaptation.subset_mask(params, ("w2",))
  free = adaptation.inner_loop(loss_fn, params, batch, steps=5, learning_rate=0.1, mask=mask)
  np.testing.assert_array_equal(free["w1"], params["w1"])
  assert float(loss_fn(free, batch)) < float(loss_fn(params, batch))
  held = adaptation.inner_loop(loss_fn, params, batch, steps=5, learning_rate=0.1, mask=mask, anchor_weight=5.0)
  assert float(jnp.abs(held["w2"] - params["w2"]).sum()) < float(jnp.abs(free["w2"] - params["w2"]).sum())
  with pytest.raises(ValueError, match="no parameters match"):
    adaptation.subset_mask(params, ("lstm",))


def test_finetuning_restarts_from_the_same_parameters_for_every_speaker():
  """Two speakers with identical support clips get identical predictions, whatever the order of adaptation."""
  config = fewshot_config.get_config("smoke,adaptation=finetune")
  target = emo18_trainer.make_target("hume_vb")
  model = emo18.Emo18(hidden=16)
  rng = np.random.default_rng(0)
  clips = [rng.integers(-9000, 9000, 4000, dtype=np.int16) for _ in range(3)]
  labels = rng.uniform(0, 1, (3, 10)).astype(np.float32)
  # Speakers A and B: the same two support clips and the same query clip; C in between with other support.
  order = [("A", 0), ("A", 1), ("A", 2), ("C", 2), ("C", 1), ("C", 0), ("B", 0), ("B", 1), ("B", 2)]
  records = [{"audio": clips[c], "file_id": f"[{i}]", "speaker": s, "emotions": labels[c if s != "C" else 2 - c],
              "labelled": True} for i, (s, c) in enumerate(order)]
  split = emo18_trainer.Split.read(records, target)
  episodes = {"A": (np.array([0, 1]), np.array([2])), "C": (np.array([3, 4]), np.array([5])),
              "B": (np.array([6, 7]), np.array([8]))}
  sample = split.batch([0], fewshot._options(config))
  variables = model.init(jax.random.PRNGKey(0), sample["audio"], sample["length"])
  before = jax.tree.map(np.array, variables)
  predictions = fewshot.personalise(config, model, target, variables, "finetune", split, None, None, episodes)
  np.testing.assert_allclose(predictions[2], predictions[8], atol=1e-6)  # B adapted after C: same start as A
  assert not np.allclose(predictions[2], model.apply(variables, sample["audio"], sample["length"])["outputs"][0])
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(variables))  # the trained model is untouched
