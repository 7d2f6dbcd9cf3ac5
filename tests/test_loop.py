"""The training loop through each of the trainers that use it (MultiTask MLP, Emo18 base training, the fine-tuned
speech encoder, MAML meta-training, the GAN): SIGTERM between evaluations then a rerun ends like an uninterrupted run, a non-finite loss
stops with the last good checkpoint named and restorable; and the loop's own rules on a toy regression."""

import dataclasses
import itertools
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import smoke
from configs import fewshot as fewshot_config
from configs import generate as generate_config
from configs import multitask as multitask_config
from exvo_jax import emo18_trainer
from exvo_jax import gan as gan_lib
from exvo_jax import loop
from exvo_jax import meta_trainer
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax import ssl_trainer
from exvo_jax import stages
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.features import tables as tables_lib
from exvo_jax.models import emo18
from exvo_jax.tasks import fewshot
from exvo_jax.tasks import generate
from exvo_jax.tasks import multitask


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def tiny_splits():
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  builder, _ = builders.prepare("hume_vb", root, config="audio")
  target = emo18_trainer.make_target("hume_vb")
  return {s: emo18_trainer.Split.read(builders.data_source(builder, s), target) for s in ("train", "validation")}


# ---------------------------------------------------------------------------------------------------------------
# The four trainers at toy size. Each returns (final state, evaluation history); steps per run are stated.

def _random_tables():
  rng = np.random.default_rng(0)

  def table(n):
    features = rng.normal(size=(n, 6)).astype(np.float32)
    emotions = 1 / (1 + np.exp(-features @ rng.normal(size=(6, 10)))).astype(np.float32)
    return tables_lib.SplitTable(features, emotions, (30 + 5 * features[:, 0]).astype(np.float32),
                                 (np.arange(n) % 4).astype(np.int32), np.array([f"c{i}" for i in range(n)]),
                                 np.array([f"s{i % 3}" for i in range(n)]), np.ones(n, bool),
                                 np.full(n, -1, np.int32))
  return {"train": table(32), "validation": table(16)}


def run_multitask(workdir, splits):
  """3 epochs of 8 steps (batch 4), evaluation and early-stopping bookkeeping every epoch."""
  del splits
  config = multitask_config.get_config("smoke")
  config.num_epochs, config.batch_size, config.log_every_s = 3, 4, 1e9
  tables = _random_tables()
  objective = multitask.exvo_objective(config, float(np.nanmean(tables["train"].age)))
  mesh = parallel.make_mesh(2)
  params, _, result = mlp_trainer.train_seed(config, objective, tables, 0, str(workdir), mesh, log=_quiet)
  return params, result["history"]


def run_emo18_base(workdir, splits):
  """2 epochs of 12 steps (batch 4) of a hidden-8 Emo18 on the tiny demo corpus."""
  settings = emo18_trainer.BaseSettings(batch_size=4, num_epochs=2, eval_batch_size=8, max_seconds=2.0,
                                        log_every_s=1e9, log_every=5)
  target = emo18_trainer.make_target("hume_vb")
  model = emo18.Emo18(num_outputs=10, hidden=8, bn_axis_name=parallel.DATA_AXIS)
  variables, history, _, _ = emo18_trainer.train_base(settings, model, target, splits["train"], splits["validation"],
                                                   parallel.make_mesh(2), str(workdir), log=_quiet)
  return variables, history


def run_ssl_finetune(workdir, splits):
  """2 epochs of 12 steps (batch 4, 1 s clips) of the random encoder fine-tuned with every option that draws
  randomness or shapes the step: dropout, time masks, the classifier chain, the CCC loss, layer-wise rates and a
  warm-up, on a 2-device mesh (each device draws its own masks)."""
  config = fewshot_config.get_config("smoke,model=ssl")
  config.ssl.update(freeze="none", chain=True, loss="mse+ccc", layer_decay=0.8, warmup_steps=3, mask_time_prob=0.3)
  settings = emo18_trainer.BaseSettings(batch_size=4, num_epochs=2, eval_batch_size=8, max_seconds=1.0,
                                        log_every_s=1e9, log_every=5)
  variables, history, _, _, _ = ssl_trainer.finetune(config, emo18_trainer.make_target("hume_vb"), splits["train"],
                                                     splits["validation"], parallel.make_mesh(2), str(workdir),
                                                     log=_quiet, settings=settings)
  return variables, history


def run_maml(workdir, splits):
  """6 meta-steps of 2 episodes (2 support + 2 query clips of 0.8 s) from an untrained hidden-8 Emo18."""
  config = fewshot_config.get_config("smoke")
  config.maml.meta_steps, config.maml.episodes_per_step, config.maml.num_query = 6, 2, 2
  config.maml.inner_steps, config.maml.clip_seconds, config.maml.checkpoint_every, config.maml.log_every = 1, 0.8, 4, 2
  target = emo18_trainer.make_target("hume_vb")
  model = emo18.Emo18(num_outputs=10, hidden=8, bn_axis_name=parallel.DATA_AXIS)
  sample = splits["train"].batch([0], emo18_trainer.BaseSettings(max_seconds=0.5).audio_options())
  variables = model.init(jax.random.PRNGKey(0), sample["audio"], sample["length"], train=False)
  adapted = meta_trainer.meta_train(config, model, target, variables, splits["train"], parallel.make_mesh(2),
                                    first_order=False, directory=fewshot.meta_directory(str(workdir), "maml"),
                                    record=fewshot.meta_record(config, "maml"), log=_quiet)
  return adapted["params"], []


def run_gan(workdir, splits):
  """6 steps of a tiny conditional GAN (batch 8), a toy evaluation every 2 steps ranking the checkpoints."""
  config = generate_config.get_config("smoke")
  config.gan.steps, config.gan.eval_every, config.gan.checkpoint_every, config.gan.sample_every = 6, 2, 100, 100
  config.gan.log_every = 3
  gan = gan_lib.make_gan(config.gan, conditional=True)
  train = splits["train"]
  source = generate.Subset(train.source, np.flatnonzero(train.labelled))

  def evaluate(state):  # a deterministic function of the weights, so the best step depends on the state only
    return {"val_fid": float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(state.generator_ema)))}

  result = generate.train_gan(config, gan, "all", source, parallel.make_mesh(2), str(workdir),
                              grid_conditions=np.eye(10), evaluate=evaluate, log=_quiet)
  return result.state, result.history


TRAINERS = {"multitask": (run_multitask, 13), "emo18_base": (run_emo18_base, 15),
            "ssl_finetune": (run_ssl_finetune, 15), "maml": (run_maml, 3),
            "gan": (run_gan, 3)}


class _SigtermAt(runtime.Preemption):
  """The real SIGTERM handler, and a real SIGTERM sent to this process at the k-th check (once per step)."""

  def __init__(self, k):
    super().__init__()
    self.calls, self.k = 0, k

  def should_stop(self):
    self.calls += 1
    if self.calls == self.k:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().should_stop()


def _assert_trees_close(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(TRAINERS))
def test_sigterm_then_rerun_ends_like_an_uninterrupted_run(name, tmp_path, tiny_splits, monkeypatch):
  run, stop_step = TRAINERS[name]
  expected_state, expected_history = run(tmp_path / "uninterrupted", tiny_splits)
  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(runtime, "preemption", _SigtermAt(stop_step).install())
  try:
    with pytest.raises(runtime.Preempted, match=rf"saved at step {stop_step} of"):  # main exits 0 on it
      run(tmp_path / "interrupted", tiny_splits)
  finally:
    signal.signal(signal.SIGTERM, previous)
  saved = [p for p in (tmp_path / "interrupted").rglob(str(stop_step)) if p.parent.name == "latest"]
  assert len(saved) == 1, saved  # the checkpoint of the stop
  monkeypatch.setattr(runtime, "preemption", runtime.Preemption())
  state, history = run(tmp_path / "interrupted", tiny_splits)
  _assert_trees_close(state, expected_state)
  assert len(history) == len(expected_history)
  for got, want in zip(history, expected_history):
    assert got.keys() == want.keys()
    for key in want:
      assert got[key] == pytest.approx(want[key], abs=1e-6), key


_LABELS = ("labels", "emotions", "age", "country")


def _poison_from(monkeypatch, first_bad):
  """Every batch from the `first_bad`-th a trainer takes (in this process) is NaN in its float inputs, as a
  diverged model would make its outputs. Labels are left alone: a NaN label means 'unknown' and is masked out of
  the loss (exvo_jax/targets.py)."""
  real_train = loop.train
  count = itertools.count(1)

  def poisoned(trainer, schedule, mesh):
    def to_device(batch):
      out = dict(trainer.to_device(batch))
      if next(count) >= first_bad:
        out = {k: np.full_like(v, np.nan) if np.issubdtype(np.asarray(v).dtype, np.floating) and k not in _LABELS
               else v for k, v in out.items()}
      return out
    return real_train(dataclasses.replace(trainer, to_device=to_device), schedule, mesh)

  monkeypatch.setattr(loop, "train", poisoned)


def _checkpoint_leaves(directory):
  """{path: array} of the checkpoint folder's state, read without a target."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory / "state").item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return jax.tree.leaves(checkpointer.restore(directory / "state", target))


@pytest.mark.parametrize("name", list(TRAINERS))
def test_non_finite_loss_stops_and_names_a_restorable_last_good_checkpoint(name, tmp_path, tiny_splits,
                                                                            monkeypatch):
  run, stop_step = TRAINERS[name]
  first_bad = stop_step + 2  # after at least one save in every trainer's schedule
  _poison_from(monkeypatch, first_bad)
  with pytest.raises(runtime.NonFiniteLoss) as error:
    run(tmp_path, tiny_splits)
  message = str(error.value)
  bad_step = int(re.search(r" step (\d+): non-finite", message).group(1))
  assert bad_step == first_bad  # the first poisoned step, found when the metrics are read back
  good = re.search(r"last good checkpoint \(step (\d+)\) is kept in (\S+)\. ", message)
  assert good, message
  good_step, directory = int(good.group(1)), good.group(2)
  assert 0 < good_step < bad_step
  leaves = _checkpoint_leaves(__import__("pathlib").Path(directory) / "latest" / str(good_step))
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


# ---------------------------------------------------------------------------------------------------------------
# The loop's rules on a toy linear regression (fast).

class _State(train_state.TrainState):
  pass


def _toy_trainer(directory, scores, **overrides):
  """y = 2x on 16 rows, batch 4 (4 steps per epoch); `scores` lists the evaluation results in order."""
  xs = np.linspace(-1, 1, 16, dtype=np.float32)
  answers = iter(scores)

  def step(state, batch):
    def loss_fn(params):
      return jnp.mean((params["w"] * batch["x"] - 2 * batch["x"]) ** 2)
    loss, grad = jax.value_and_grad(loss_fn)(state.params)
    grad, loss = jax.lax.pmean((grad, loss), parallel.DATA_AXIS)
    return state.apply_gradients(grads=grad), {"loss": loss}

  class Batches:
    def __init__(self):
      self.i = 0

    def __iter__(self):
      return self

    def __next__(self):
      self.i += 1
      return {"x": xs[(self.i - 1) * 4 % 16:][:4]}

    def get_state(self):
      return {"i": self.i}

    def set_state(self, state):
      self.i = state["i"]

  mesh = parallel.make_mesh(1)
  fields = dict(name="toy", directory=str(directory),
                init_state=lambda: _State.create(apply_fn=None, params={"w": jnp.zeros(())}, tx=optax.sgd(0.1)),
                step=parallel.data_parallel(step, mesh), batches=lambda _: Batches(), to_device=lambda b: b,
                evaluate=lambda state: {"score": next(answers)}, best_metric="score", log=_quiet)
  fields.update(overrides)
  return loop.Trainer(**fields), mesh


def test_early_stopping_keeps_the_best_evaluation_and_a_rerun_trains_no_more(tmp_path):
  trainer, mesh = _toy_trainer(tmp_path, [0.1, 0.5, 0.4, 0.3, 0.9])
  schedule = loop.Schedule(total_steps=20, steps_per_epoch=4, eval_every=4, patience=2, log_every=3)
  result = loop.train(trainer, schedule, mesh)
  assert [h["score"] for h in result.history] == [0.1, 0.5, 0.4, 0.3]  # two evaluations without a better one
  assert result.step == 16 and result.best_step == 8
  assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
  # The mean training loss of each epoch is the mean of its four steps (read back every 3 steps or at the end).
  w, losses = 0.0, []
  xs = np.linspace(-1, 1, 16, dtype=np.float64)
  for k in range(16):
    x = xs[k * 4 % 16:][:4]
    losses.append(np.mean((w * x - 2 * x) ** 2))
    w -= 0.1 * np.mean(2 * (w * x - 2 * x) * x)
    if k + 1 == 8:
      best_w = w
  np.testing.assert_allclose([h["train_loss"] for h in result.history],
                             np.mean(np.reshape(losses, (4, 4)), axis=1), rtol=1e-5)
  again = loop.train(_toy_trainer(tmp_path, [])[0], schedule, mesh)  # no evaluation left to run: [] suffices
  assert again.step == 16 and again.history == result.history
  assert float(again.best_state.params["w"]) == pytest.approx(best_w, rel=1e-5)  # the best epoch, from disk
  assert float(result.state.params["w"]) == pytest.approx(w, rel=1e-5)


def test_a_nan_evaluation_is_never_the_best(tmp_path):
  trainer, mesh = _toy_trainer(tmp_path, [float("nan"), 0.2, float("nan")])
  result = loop.train(trainer, loop.Schedule(total_steps=12, steps_per_epoch=4, eval_every=4), mesh)
  assert result.best_step == 8


def test_more_steps_continue_a_finished_run_exactly_and_fewer_stop_it(tmp_path):
  """A stage's length is not part of its record: 8 steps then a rerun asking for 12 continue from step 8 and end
  where an uninterrupted 12-step run ends (the same batches, the same optimiser); asking for 4 would return a best
  state from steps that run does not have, so it stops."""
  no_eval = dict(evaluate=None, best_metric=None)
  short, mesh = _toy_trainer(tmp_path / "extended", [], **no_eval)
  loop.train(short, loop.Schedule(total_steps=8, steps_per_epoch=4), mesh)
  extended = loop.train(_toy_trainer(tmp_path / "extended", [], **no_eval)[0],
                        loop.Schedule(total_steps=12, steps_per_epoch=4), mesh)
  straight = loop.train(_toy_trainer(tmp_path / "straight", [], **no_eval)[0],
                        loop.Schedule(total_steps=12, steps_per_epoch=4), mesh)
  assert extended.step == straight.step == 12
  assert float(extended.state.params["w"]) == float(straight.state.params["w"])
  with pytest.raises(stages.StageMismatch, match="holds step 12, past this run's 4 steps"):
    loop.train(_toy_trainer(tmp_path / "extended", [], **no_eval)[0], loop.Schedule(total_steps=4), mesh)


def test_tensorboard_gets_each_read_back_each_evaluation_the_learning_rate_and_the_actions_images(tmp_path):
  drawn = []

  def draw(step, state, events):
    drawn.append(step)
    events.image(step, "grid", np.full((4, 4, 3), step, np.uint8))

  trainer, mesh = _toy_trainer(tmp_path / "checkpoints", [0.3, 0.7], metrics_log=str(tmp_path / "log.jsonl"),
                               learning_rates=lambda step: {"sgd": 0.1}, actions=((4, draw),))
  loop.train(trainer, loop.Schedule(total_steps=8, steps_per_epoch=4, eval_every=4, log_every=1), mesh)
  scalars, images, _ = smoke.read_events(tmp_path / "tensorboard" / "toy")
  # The per-step losses of the toy regression by hand: w starts at 0, SGD 0.1 on mean((w x - 2 x)^2).
  xs, w, losses = np.linspace(-1, 1, 16, dtype=np.float64), 0.0, []
  for k in range(8):
    x = xs[k * 4 % 16:][:4]
    losses.append(np.mean((w * x - 2 * x) ** 2))
    w -= 0.1 * np.mean(2 * (w * x - 2 * x) * x)
  assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-5)
  assert scalars["val/score"] == [(4, pytest.approx(0.3)), (8, pytest.approx(0.7))]
  assert scalars["learning_rate/sgd"] == [(s, pytest.approx(0.1)) for s in range(1, 9)]
  assert drawn == [4, 8] and images == ["grid"]
