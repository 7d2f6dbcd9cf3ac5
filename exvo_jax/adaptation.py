"""Inner-loop adaptation shared by per-speaker fine-tuning and MAML, and speaker normalisation.

`inner_loop` takes k plain gradient steps on a chosen subset of the parameters, optionally pulled toward the
starting point. Fine-tuning at test time and MAML (in its inner loop, at training and at test time) call this very
function: MAML differentiates through it (second order), first-order MAML stops the gradient of its inner
gradients.

`speaker_normalise` z-normalises features (e.g. the Emo18 embedding) with each speaker's own statistics, estimated
from that speaker's clips without their labels (optionally shrunk toward global statistics); `restandardise` maps
them back onto global moments; `batch_norm_statistics` re-estimates a network's BatchNorm statistics over one
speaker's clips; `support_offset` is a shrunk per-speaker output bias from labelled support clips.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np


def subset_mask(params, prefixes):
  """A pytree of bools over `params`: True for leaves whose path ('/'-joined names) starts with one of `prefixes`.

  E.g. ('lstm', 'head') selects the LSTM layers and the output layer of Emo18, ('head/bias',) the output bias
  alone, ('encoder/MaskedBatchNorm', 'head/bias') the BatchNorm scales and shifts and the output bias; () selects
  everything.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  marks = {path: (not prefixes) or any(path_name(path).startswith(p) for p in prefixes) for path in flat}
  if not any(marks.values()):
    raise ValueError(f"no parameters match {prefixes}; top-level keys are {sorted({p[0] for p in flat})}")
  return flax.traverse_util.unflatten_dict(marks)


def path_name(path):
  """('encoder', 'MaskedBatchNorm_0', 'scale') -> 'encoder/MaskedBatchNorm_0/scale'."""
  return "/".join(str(k) for k in path)


def clip_loss_fn(model, target, batch_stats):
  """(params, batch) -> loss with frozen BatchNorm statistics: the loss every adaptation step minimises. Its clips
  are labelled ones (support, query, episodes), so the loss is the unmasked mean."""
  def loss_fn(params, batch):
    out = model.apply({"params": params, "batch_stats": batch_stats}, batch["audio"], batch["length"], train=False)
    return target.loss(out["outputs"], batch["labels"], masked=False)
  return loss_fn


def inner_loop(loss_fn, params, support, *, steps, learning_rate, mask, anchor_weight=0.0, first_order=False):
  """k steps of gradient descent on the masked parameters.

  Args:
    loss_fn: (params, batch) -> scalar loss.
    params: starting parameters (the trained or meta-learned model).
    support: the batch to adapt on (a speaker's labelled support clips).
    steps: k, a Python int (the loop is unrolled so that MAML can differentiate through it).
    learning_rate: inner step size.
    mask: `subset_mask` of the parameters that adapt; the others stay as they are.
    anchor_weight: weight of ||p - p_start||^2 / 2 added to the loss: adaptation regularised toward the start,
      which keeps 2 support clips from dragging the model to their own classes.
    first_order: stop gradients through the inner gradients (first-order MAML).
  Returns:
    Adapted parameters (same structure as `params`).
  """
  start = params

  def objective(p):
    loss = loss_fn(p, support)
    if anchor_weight:
      loss += 0.5 * anchor_weight * sum(
          jnp.sum(jnp.where(m, a - b, 0.0) ** 2)
          for a, b, m in zip(jax.tree.leaves(p), jax.tree.leaves(start), jax.tree.leaves(mask)))
    return loss

  for _ in range(steps):
    grads = jax.grad(objective)(params)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    params = jax.tree.map(lambda p, g, m: p - learning_rate * g if m else p, params, grads, mask)
  return params


def speaker_statistics(features, speakers, min_std=1e-6, prior=None, prior_clips=0.0, min_std_fraction=0.0):
  """Per-speaker mean and std of features [N, D] over each speaker's clips: {speaker: (mean [D], std [D])}.

  With `prior` = (mean [D], std [D]) (e.g. the training set's) the mean and the variance are each shrunk toward the
  prior's: a weighted average with weight n / (n + k) on the speaker's own (n clips, k = `prior_clips`); and no std
  falls below `min_std_fraction` of the prior's: a speaker with few or alike clips is not blown up along directions
  it barely varies in.
  """
  features = np.asarray(features, np.float64)
  stats = {}
  for speaker in np.unique(speakers):
    rows = features[speakers == speaker]
    mean, var = rows.mean(0), rows.var(0)
    if prior is not None:
      weight = len(rows) / (len(rows) + prior_clips)
      prior_mean, prior_std = (np.asarray(v, np.float64) for v in prior)
      mean = weight * mean + (1 - weight) * prior_mean
      var = weight * var + (1 - weight) * prior_std ** 2
      var = np.maximum(var, (min_std_fraction * prior_std) ** 2)
    stats[speaker] = (mean, np.maximum(np.sqrt(var), min_std))
  return stats


def speaker_normalise(features, speakers, stats=None):
  """features [N, D] -> each row z-normalised with its speaker's statistics (computed here if not given)."""
  stats = stats if stats is not None else speaker_statistics(features, speakers)
  features = np.asarray(features, np.float64)
  out = np.empty_like(features)
  for speaker, (mean, std) in stats.items():
    rows = speakers == speaker
    out[rows] = (features[rows] - mean) / std
  return out.astype(np.float32)


def restandardise(features, speakers, stats, reference):
  """features [N, D] -> each row standardised with its speaker's `stats` and mapped onto `reference` = (mean [D],
  std [D]), e.g. the training embeddings' global moments: a speaker's clips take the spread and centre the model's
  own read-out was trained on, so no read-out is refitted."""
  mean, std = (np.asarray(v, np.float64) for v in reference)
  return (speaker_normalise(features, speakers, stats).astype(np.float64) * std + mean).astype(np.float32)


def support_offset(residuals, prior_clips):
  """A speaker's output offset from its support clips' residuals (labels - predictions) [S, K]: their mean, shrunk
  toward 0 as if `prior_clips` more clips had residual 0 (S / (S + k) of the mean)."""
  residuals = np.asarray(residuals, np.float64)
  return (residuals.sum(0) / (len(residuals) + prior_clips)).astype(np.float32)


def batch_norm_statistics(model, variables, batches):
  """BatchNorm statistics re-estimated over `batches` (e.g. one speaker's clips, labels unused): the running
  statistics of `variables` replaced by the exact mean and variance over every batch's valid frames.

  `model` has a `bn_momentum` attribute (Emo18): a clone with momentum 0 makes one training-mode pass return a
  batch's own statistics; batches are combined by their counts of valid frames (`frames` of each batch). Every
  BatchNorm layer's statistics come from the layers below it normalised batch by batch, so with more than one
  batch the deeper layers' statistics are an estimate; one batch gives them exactly.

  Args:
    batches: iterable of (audio [B, T] float32, lengths [B] int32, frames: valid frames of the batch).
  Returns:
    `variables` with new `batch_stats` (a tree of {'mean', 'var'}).
  """
  collect = _statistics_pass(model.clone(bn_momentum=0.0, bn_axis_name=None))
  total, sums = 0.0, {}
  for audio, lengths, frames in batches:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collect(variables, audio, lengths)))
    for path, value in flat.items():
      layer, moment = path[:-1], path[-1]
      value = np.asarray(value, np.float64)
      if moment == "var":  # combined as E[x^2] = var + mean^2 of each batch
        value = value + np.asarray(flat[(*layer, "mean")], np.float64) ** 2
      sums[path] = sums.get(path, 0.0) + frames * value
    total += frames
  if not total:
    raise ValueError("batch_norm_statistics: no valid frames in the batches")
  new = {}
  for path, value in sums.items():
    value = value / total
    if path[-1] == "var":
      value = np.maximum(value - (sums[(*path[:-1], "mean")] / total) ** 2, 0.0)
    new[path] = value.astype(np.float32)
  return {**variables, "batch_stats": flax.traverse_util.unflatten_dict(new)}


@functools.lru_cache(maxsize=8)
def _statistics_pass(model):
  """The jitted training-mode pass returning `model`'s new batch statistics (one per model: Linen modules hash by
  their fields, so every speaker's call reuses its compilations)."""
  return jax.jit(lambda v, audio, lengths: model.apply(v, audio, lengths, train=True,
                                                       mutable=["batch_stats"])[1]["batch_stats"])


def fit_linear_head(features, targets, *, kind, l2=1.0, steps=300, learning_rate=0.05, num_classes=None):
  """A linear read-out on fixed features: ridge regression (kind 'regression', closed form, targets [N, K]) or
  L2-regularised softmax regression (kind 'classification', integer targets [N], full-batch Adam in JAX).

  Returns {'kernel': [D, K], 'bias': [K]} (numpy float32); the bias is not regularised.
  """
  x = np.asarray(features, np.float64)
  if kind == "regression":
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    kernel = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return {"kernel": kernel.astype(np.float32), "bias": (y_mean - x_mean @ kernel).astype(np.float32)}
  import optax  # only the classification read-out needs an optimiser
  labels = jnp.asarray(targets, jnp.int32)
  x = jnp.asarray(x, jnp.float32)
  params = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
  tx = optax.adam(learning_rate)

  def loss(p):
    logits = x @ p["kernel"] + p["bias"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return xent + 0.5 * l2 * jnp.sum(p["kernel"] ** 2) / x.shape[0]

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, opt = carry
      updates, opt = tx.update(jax.grad(loss)(p), opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return p

  return jax.tree.map(np.asarray, fit(params))
