"""MAML meta-training of a raw-audio model for FewShot: episodes of one training speaker (2 support clips, Q query
clips), the data-parallel meta step (k inner steps of `adaptation.inner_loop` on a parameter subset, the outer
loss on the query clips, second order or first order), and the trainer it hands to the one loop (`loop.train`).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from exvo_jax import adaptation
from exvo_jax import emo18_trainer
from exvo_jax import loop
from exvo_jax import parallel
from exvo_jax import writers
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.evaluation import personalisation


def rows_by_speaker(speakers, keep=None):
  """{speaker: ascending row indices} of a [N] speaker array (rows where `keep` is True), in O(N log N): a full-size
  split has about 570 speakers, and comparing every row with every speaker costs seconds each call."""
  rows = np.arange(len(speakers)) if keep is None else np.flatnonzero(keep)
  names, owner = np.unique(np.asarray(speakers)[rows], return_inverse=True)
  order = np.argsort(owner, kind="stable")
  bounds = np.searchsorted(owner[order], np.arange(len(names) + 1))
  return {name: rows[order[bounds[k]:bounds[k + 1]]] for k, name in enumerate(names.tolist())}


def make_meta_step(model, target, batch_stats, mask, maml, num_support, first_order):
  """Per-device MAML step over a batch of episodes [E_local, S + Q, ...]; the outer gradient is pmean'ed."""
  loss_fn = adaptation.clip_loss_fn(model, target, batch_stats)

  def episode_loss(params, episode):
    support = jax.tree.map(lambda x: x[:num_support], episode)
    query = jax.tree.map(lambda x: x[num_support:], episode)
    adapted = adaptation.inner_loop(loss_fn, params, support, steps=maml.inner_steps,
                                    learning_rate=maml.inner_learning_rate, mask=mask,
                                    anchor_weight=maml.anchor_weight, first_order=first_order)
    return loss_fn(adapted, query)

  def meta_step(state, episodes):
    def outer(params):
      return jnp.mean(jax.vmap(episode_loss, in_axes=(None, 0))(params, episodes))
    loss, grads = jax.value_and_grad(outer)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    return state.apply_gradients(grads=grads), {"loss": jax.lax.pmean(loss, parallel.DATA_AXIS)}

  return meta_step


def sample_episodes(split, rng, *, num_episodes, num_support, num_query, classes=None):
  """Index arrays [E, S + Q] of episodes: each row one training speaker's support then query clips.

  With `classes` ([N] int, `personalisation.clip_classes`), the query clips are drawn from other classes than the
  support clips': an inner loop that only learned the support clips' classes gains nothing on them.
  """
  rows_of = rows_by_speaker(split.speaker, split.labelled)

  def enough(rows):  # with classes: whatever the support clips, num_query clips of other classes remain
    if classes is None:
      return len(rows) >= num_support + num_query
    largest = np.sort(np.unique(classes[rows], return_counts=True)[1])[::-1][:num_support].sum()
    return len(rows) >= num_support and len(rows) - largest >= num_query

  eligible = sorted(s for s, rows in rows_of.items() if enough(rows))
  if not eligible:
    raise ValueError(f"no training speaker has {num_support + num_query} labelled clips for a MAML episode"
                     + (f" with {num_query} outside any {num_support} support clips' classes; lower "
                        "config.maml.num_query or set --config.maml.query_other_classes=False" if classes is not None
                        else "; lower config.maml.num_query"))
  speakers = rng.choice(eligible, size=num_episodes, replace=len(eligible) < num_episodes)
  if classes is None:
    return np.stack([rng.choice(rows_of[s], size=num_support + num_query, replace=False) for s in speakers])
  episodes = []
  for speaker in speakers:
    rows = rows_of[speaker]
    support = rng.choice(rows, size=num_support, replace=False)
    others = rows[~np.isin(classes[rows], classes[support])]  # enough of them: `enough`
    episodes.append(np.concatenate([support, rng.choice(others, size=num_query, replace=False)]))
  return np.stack(episodes)


class EpisodeBatches:
  """This process's rows of every meta-step's global batch of episodes: {audio, length, labels} [E_local, S + Q,
  ...].

  Every process draws the same global episodes from one seeded generator and reads only the clips of its own
  rows (process p: rows [p * E_local, (p + 1) * E_local)), so the global batch does not depend on the number of
  processes. The position is the number of draws; `set_state` replays them (index draws only, no audio).
  """

  def __init__(self, split, target, *, seed, num_episodes, num_support, num_query, options, classes=None):
    self.split, self.target, self.options, self.classes = split, target, options, classes
    self.num_episodes, self.num_support, self.num_query = num_episodes, num_support, num_query
    self.seed = seed
    self.rng, self.draws = np.random.default_rng(seed), 0
    processes = jax.process_count()
    self.local = num_episodes // processes
    self.first = jax.process_index() * self.local

  def _draw(self):
    self.draws += 1
    return sample_episodes(self.split, self.rng, num_episodes=self.num_episodes, num_support=self.num_support,
                           num_query=self.num_query, classes=self.classes)

  def __iter__(self):
    return self

  def __next__(self):
    episodes = self._draw()[self.first:self.first + self.local]
    batch = emo18_trainer.device_batch(self.split.batch(episodes.reshape(-1), self.options), self.target)
    return jax.tree.map(lambda x: x.reshape(*episodes.shape, *x.shape[1:]), batch)

  def get_state(self):
    return {"draws": self.draws}

  def set_state(self, state):
    self.rng, self.draws = np.random.default_rng(self.seed), 0
    for _ in range(state["draws"]):
      self._draw()


def meta_train(config, model, target, variables, train, mesh, *, first_order, directory, record, log=print):
  """MAML (or first-order MAML) from the trained model on the `train` Split; returns the meta-learned variables.

  Reads the config's `maml` block, `adapt_subset`, `num_support`, `seed` and `log_every_s`. Checkpoints go to
  `directory` (FewShot: `checkpoints/maml` or `checkpoints/fomaml`, which never resume each other's, or a
  comparison row's own folder), with `record`, the configuration that shapes them (`stages`).
  """
  mode = "fomaml" if first_order else "maml"
  maml = config.maml
  workdir = os.path.dirname(os.path.dirname(directory))  # directory: <workdir>/checkpoints/<mode or row folder>
  options = pipeline.AudioOptions(clip_samples=int(maml.clip_seconds * schema.SAMPLE_RATE), random_crop=True)
  mask = adaptation.subset_mask(variables["params"], tuple(config.adapt_subset))
  classes = personalisation.clip_classes(target, train.labels) if maml.query_other_classes else None

  def make_state():
    # A copy: the meta step donates its state, and the trained model's buffers are still needed afterwards.
    own = jax.tree.map(jnp.copy, variables)
    return emo18_trainer.TrainState.create(apply_fn=model.apply, params=own["params"],
                                           batch_stats=own["batch_stats"], tx=optax.adam(maml.outer_learning_rate))

  episodes_per_step = max(maml.episodes_per_step // mesh.size, 1) * mesh.size
  if episodes_per_step % jax.process_count():
    raise ValueError(f"{episodes_per_step} episodes per meta-step are not divisible by the {jax.process_count()} "
                     "processes")
  trainer = loop.Trainer(
      name=f"meta-training ({mode})", directory=directory, init_state=make_state, record=record,
      step=parallel.data_parallel(make_meta_step(model, target, variables["batch_stats"], mask, maml,
                                                 config.num_support, first_order), mesh),
      batches=lambda _: EpisodeBatches(train, target, seed=[config.seed, 7], num_episodes=episodes_per_step,
                                       num_support=config.num_support, num_query=maml.num_query, options=options,
                                       classes=classes),
      to_device=lambda batch: batch, max_to_keep=1, per_item=("episodes", episodes_per_step),
      metrics_log=os.path.join(workdir, f"metrics_log_{os.path.basename(directory)}.jsonl"),
      events=writers.events_folder(workdir, os.path.basename(directory)),
      learning_rates=lambda _: {"outer": maml.outer_learning_rate, "inner": maml.inner_learning_rate},
      progress_every_s=config.log_every_s, log=log)
  schedule = loop.Schedule(total_steps=maml.meta_steps, checkpoint_every=maml.checkpoint_every,
                           log_every=maml.log_every)
  state = loop.train(trainer, schedule, mesh).state
  return {"params": state.params, "batch_stats": variables["batch_stats"]}
