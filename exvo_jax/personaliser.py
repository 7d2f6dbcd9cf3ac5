"""FewShot's adaptations of one trained model to each speaker of a split (`Personaliser`): what every mode predicts
for a speaker's query clips from its support clips and its unlabelled audio. Reads the adaptation keys of a
FewShot config (`finetune`, `maml`, `speaker_norm`, `support_bias`, `adapt_subset`, `read_out_l2`, the clip
lengths); `exvo_jax/tasks/fewshot.py` says what each mode does.
"""

import jax
import numpy as np

from exvo_jax import adaptation
from exvo_jax import runtime
from exvo_jax.data import pipeline
from exvo_jax.data import schema
from exvo_jax.models import emo18


def audio_options(config):
  """How adaptation reads clips: cut at max_seconds, padded to whole eval_pad_seconds (few shapes to compile)."""
  return pipeline.AudioOptions(max_samples=int(config.max_seconds * schema.SAMPLE_RATE),
                               pad_multiple=config.eval_pad_seconds * schema.SAMPLE_RATE)


def _chunks(indices, size):
  return [indices[i:i + size] for i in range(0, len(indices), size)]


def _moments(x):
  """Mean and std [D] over the rows of x [N, D] (float64)."""
  return x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)


def _standardise(x, moments):
  """x standardised with global `moments`; a constant column (std ~0) is only centred."""
  mean, std = moments
  return ((x - mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)


class Personaliser:
  """Predictions for the query clips of one split under every adaptation of one trained model.

  What adaptations and support draws share is computed once, when first needed: the training embeddings (a pass
  over the Train split) with their moments and read-outs, and each speaker's BatchNorm pass (`speaker_bn` uses no
  labels, so it is the same for every draw).

  Args:
    model, target, variables: the trained model (base or, for maml/fomaml, meta-learned variables come per call).
    split: the split adapted to (Val, Test); outputs, embeddings: the unadapted model's on every clip of it, or
      None and `predictions`, a () -> (outputs, embeddings) callable run when a mode first needs them.
    train, train_embeddings: the Train split and a () -> [N_train, H] callable giving its unadapted embeddings.
  """

  def __init__(self, model, target, variables, split, outputs, embeddings, train, train_embeddings,
               predictions=None):
    self.model, self.target, self.variables, self.split = model, target, variables, split
    self._predicted = None if outputs is None and embeddings is None else (outputs, embeddings)
    self._predictions = predictions
    self.train, self._train_embeddings, self._train_cache = train, train_embeddings, None
    self._read_outs, self._bn_outputs = {}, {}

  @property
  def outputs(self):
    return self._predicted_pair()[0]

  @property
  def embeddings(self):
    return self._predicted_pair()[1]

  def _predicted_pair(self):
    if self._predicted is None:
      self._predicted = self._predictions()
    return self._predicted

  def train_embeddings(self):
    """The labelled training clips' embeddings and their speakers, labels and global moments (mean, std)."""
    if self._train_cache is None:
      rows = self.train.labelled
      embeddings = np.asarray(self._train_embeddings())[rows]
      self._train_cache = (embeddings, self.train.speaker[rows], self.train.labels[rows], _moments(embeddings))
    return self._train_cache

  def _statistics(self, config, features, speakers):
    """Per-speaker moments of `features` with `config.speaker_norm`'s shrinkage toward the training moments."""
    settings = config.speaker_norm
    prior = self.train_embeddings()[3] if settings.prior_clips or settings.min_std_fraction else None
    return adaptation.speaker_statistics(features, speakers, prior=prior, prior_clips=settings.prior_clips,
                                         min_std_fraction=settings.min_std_fraction)

  def read_out(self, config, per_speaker):
    """The linear read-out refit on the training embeddings, normalised per training speaker (speaker_norm) or with
    the training set's global moments (refit, the control that changes nothing but the refit)."""
    key = (per_speaker, config.read_out_l2, *(config.speaker_norm.values() if per_speaker else ()))
    if key not in self._read_outs:
      embeddings, speakers, labels, moments = self.train_embeddings()
      normalised = (adaptation.speaker_normalise(embeddings, speakers, self._statistics(config, embeddings, speakers))
                    if per_speaker else _standardise(embeddings, moments))
      self._read_outs[key] = adaptation.fit_linear_head(normalised, labels, kind=self.target.kind,
                                                        l2=config.read_out_l2, num_classes=self.target.num_outputs)
    return self._read_outs[key]

  def predict(self, config, mode, episodes, variables=None):
    """{query index: prediction} of every query clip of `episodes` ({speaker: (support, query)}) under `mode`."""
    variables = variables or self.variables
    modes = set(mode.split("+"))
    if modes == {"none"}:
      return {i: self.outputs[i] for _, query in episodes.values() for i in query.tolist()}
    if "speaker_bn" in modes:
      outputs, embeddings = self._speaker_bn(config, episodes, variables)
      if modes == {"speaker_bn"}:
        return {i: outputs[i] for _, query in episodes.values() for i in query.tolist()}
      return self._embedding_modes(config, modes - {"speaker_bn"}, episodes,
                                   lambda rows: np.stack([embeddings[i] for i in rows.tolist()]))
    if modes & {"speaker_norm", "refit", "embedding_norm"}:
      return self._embedding_modes(config, modes, episodes, lambda rows: self.embeddings[rows])
    if mode == "support_bias":
      predictions = {}
      for support, query in episodes.values():
        offset = adaptation.support_offset(self.split.labels[support] - self.outputs[support],
                                           config.support_bias.prior_clips)
        predictions.update(zip(query.tolist(), self.outputs[query] + offset))
      return predictions
    return self._inner_loop(config, mode, episodes, variables)

  def _embedding_modes(self, config, modes, episodes, embeddings_of):
    """speaker_norm (+finetune), refit, embedding_norm on the embeddings `embeddings_of(rows)` of a speaker's
    clips (the unadapted model's, or those under the speaker's own BatchNorm statistics)."""
    split, target = self.split, self.target
    steps = config.finetune.steps if "finetune" in modes else 0

    def head_loss(head, batch):
      return target.loss(batch["x"] @ head["kernel"] + head["bias"], batch["labels"], masked=False)

    adapt_head = jax.jit(lambda head, batch: adaptation.inner_loop(
        head_loss, head, batch, steps=steps, learning_rate=config.finetune.learning_rate,
        mask={"kernel": True, "bias": True}, anchor_weight=config.finetune.anchor_weight))
    if "embedding_norm" in modes:  # the model's own linear head on restandardised embeddings
      head = {k: np.asarray(v) for k, v in self.variables["params"]["head"].items()}
    else:
      head = self.read_out(config, per_speaker="speaker_norm" in modes)
    predictions = {}
    for speaker, (support, query) in episodes.items():
      runtime.preemption.check(f"{'+'.join(sorted(modes))} adaptation stopped at speaker {speaker} (the rerun "
                               "adapts again)")
      rows = np.concatenate([support, query])  # all of the speaker's clips; their labels are not used
      features, speakers = embeddings_of(rows), split.speaker[rows]
      if "refit" in modes:
        normalised = _standardise(features, self.train_embeddings()[3])
      elif "embedding_norm" in modes:
        normalised = adaptation.restandardise(features, speakers, self._statistics(config, features, speakers),
                                              self.train_embeddings()[3])
      else:
        normalised = adaptation.speaker_normalise(features, speakers, self._statistics(config, features, speakers))
      adapted = head
      if steps:
        adapted = adapt_head(head, {"x": normalised[:len(support)], "labels": split.labels[support]})
      out = normalised[len(support):] @ np.asarray(adapted["kernel"]) + np.asarray(adapted["bias"])
      predictions.update(zip(query.tolist(), out))
    return predictions

  def _speaker_bn(self, config, episodes, variables):
    """({index: output}, {index: embedding}) of every clip of the episodes' speakers under BatchNorm statistics
    re-estimated over all of that speaker's clips (no labels)."""
    options = audio_options(config)
    predict = jax.jit(lambda v, audio, length: self.model.apply(v, audio, length, train=False))
    outputs, embeddings = {}, {}
    # Passes over the same clips with the same settings are reused (the draws change only which clips are queries).
    settings = (config.speaker_bn_batch, config.max_seconds, config.eval_pad_seconds)
    if variables is not self.variables:  # another model's statistics are never mixed with these
      self._bn_outputs = {}
    for speaker, (support, query) in episodes.items():
      key = (speaker, settings)
      if key not in self._bn_outputs:
        runtime.preemption.check(f"speaker_bn adaptation stopped at speaker {speaker} (the rerun adapts again)")
        rows = np.sort(np.concatenate([support, query]))
        batches = [self.split.batch(chunk, options) for chunk in _chunks(rows, config.speaker_bn_batch)]
        adapted = adaptation.batch_norm_statistics(self.model, variables, (
            (b["audio"], b["length"], int(np.sum(np.asarray(emo18.frames_per_clip(b["length"]))))) for b in batches))
        out = [predict(adapted, b["audio"], b["length"]) for b in batches]
        self._bn_outputs[key] = tuple(
            dict(zip(rows.tolist(), np.concatenate([np.asarray(o[key]) for o in out])))
            for key in ("outputs", "embedding"))
      outputs.update(self._bn_outputs[key][0])
      embeddings.update(self._bn_outputs[key][1])
    return outputs, embeddings

  def _inner_loop(self, config, mode, episodes, variables):
    """finetune, maml, fomaml: the same inner loop, restarted from `variables` for every speaker."""
    settings = config.finetune if mode == "finetune" else config.maml
    steps = settings.steps if mode == "finetune" else config.maml.inner_steps
    learning_rate = settings.learning_rate if mode == "finetune" else config.maml.inner_learning_rate
    mask = adaptation.subset_mask(variables["params"], tuple(config.adapt_subset))
    loss_fn = adaptation.clip_loss_fn(self.model, self.target, variables["batch_stats"])
    adapt = jax.jit(lambda params, support: adaptation.inner_loop(
        loss_fn, params, support, steps=steps, learning_rate=learning_rate, mask=mask,
        anchor_weight=settings.anchor_weight))
    predict = jax.jit(lambda params, batch: self.model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, batch["audio"], batch["length"],
        train=False)["outputs"])
    options = audio_options(config)
    predictions = {}
    for speaker, (support, query) in episodes.items():
      runtime.preemption.check(f"{mode} adaptation stopped at speaker {speaker} (the rerun adapts again)")
      support_batch = self.split.batch(support, options)
      adapted = adapt(variables["params"], {"audio": support_batch["audio"], "length": support_batch["length"],
                                            "labels": self.split.labels[support]})
      for chunk in _chunks(query, config.adapt_query_batch):
        batch = self.split.batch(chunk, options, batch_size=config.adapt_query_batch)
        out = np.asarray(predict(adapted, {"audio": batch["audio"], "length": batch["length"]}))
        predictions.update(zip(chunk.tolist(), out[:len(chunk)]))
    return predictions
