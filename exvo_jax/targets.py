"""Every label set a model can be trained on, described as data.

A `Target` says where its labels live in a clip record, whether it is a regression or a classification, the names of
its dimensions (or classes), the output activation the feature MLP puts on it, its loss, its metric and the columns
it writes to a submission file. Trainers take a list of targets instead of hard-coding heads, so any trainer trains
on any label set: ExVo's emotions, age and country, the four A-VB tasks, or EmoGator's categories.

Missing labels are part of the data: a regression row with any NaN, or a class below 0, is unknown and is left out
of that target's loss and score only (A-VB's hidden test labels, a clip with no age, a Culture row missing columns).

Metrics are the challenges' own (see exvo_jax/metrics.py): CCC with population moments for every regression of
intensities (the A-VB organisers' code mixes 1/(n-1) variances with a 1/n covariance; that estimator is not
copied), MAE in years for age, UAR (macro recall over the classes present) for classifications.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from exvo_jax import metrics
from exvo_jax.data import schema

REGRESSION, CLASSIFICATION = "regression", "classification"
_ACTIVATIONS = ("sigmoid", "linear", "logits")
# Training objectives of a regression (`Target.objective`): mean squared error, 1 - CCC of the batch (the loss the
# 2022 winners trained on: it optimises the metric itself), or their sum. A classification keeps its cross-entropy.
LOSSES = ("mse", "ccc", "mse+ccc")


@dataclasses.dataclass(frozen=True)
class Target:
  """One label set.

  name: the target's key (model output, config, metrics prefix).
  field: the record field holding its labels ([N, k] float or [N] float for regression, [N] int classes).
  kind: 'regression' or 'classification'.
  names: dimension names (regression) or class names in label order (classification).
  activation: what the feature MLP puts on the head's output: 'sigmoid' (intensities in (0, 1)), 'linear', or
    'logits' (classification).
  metric: the score the task reports and selects on: 'mean_ccc', 'mae' or 'uar'.
  submission: the submission file's columns for this target.
  scalar: a single regression value per clip stored as [N] (age), not [N, 1].
  submit_names: a classification's submission cell is the class name (A-VB Type), else its index (ExVo's country
    code).
  """
  name: str
  field: str
  kind: str
  names: tuple[str, ...]
  activation: str
  metric: str
  submission: tuple[str, ...]
  scalar: bool = False
  submit_names: bool = True

  def __post_init__(self):
    if self.kind not in (REGRESSION, CLASSIFICATION):
      raise ValueError(f"target {self.name}: kind {self.kind!r} is not 'regression' or 'classification'")
    if self.activation not in _ACTIVATIONS or (self.kind == CLASSIFICATION) != (self.activation == "logits"):
      raise ValueError(f"target {self.name}: activation {self.activation!r} does not suit a {self.kind}")

  @property
  def num_outputs(self):
    return len(self.names)

  @property
  def higher_is_better(self):
    return self.metric != "mae"

  def activate(self, outputs):
    """Head output [B, k] -> prediction: sigmoid, identity, or the logits; [B] for a scalar target."""
    outputs = jax.nn.sigmoid(outputs) if self.activation == "sigmoid" else outputs
    return outputs[..., 0] if self.scalar else outputs

  def known(self, labels):
    """[N] bool: which rows carry this target's label (all dimensions finite, or a class >= 0)."""
    labels = jnp.asarray(labels)
    if self.kind == CLASSIFICATION:
      return labels >= 0
    return jnp.isfinite(labels) if self.scalar else jnp.all(jnp.isfinite(labels), axis=-1)

  def loss(self, predictions, labels, masked=True):
    """Mean squared error over the known rows and every dimension (regression), or mean softmax cross-entropy over
    the known rows (classification), of activated predictions; 0 when no row is known.

    masked=False: the caller guarantees that every label is known, and the loss is the plain mean over all rows,
    the recipes' own formula. Its value is the same, but XLA compiles the masked form into another program whose
    float32 rounding differs in the last bits, which hundreds of training steps grow into visible differences: the
    trainers pass False where the labels are all known, so their results stay those of the plain recipes.
    """
    if not masked:
      if self.kind == CLASSIFICATION:
        return optax.softmax_cross_entropy_with_integer_labels(predictions, labels).mean()
      return jnp.mean((predictions - labels) ** 2)
    known = self.known(labels)
    count = jnp.maximum(jnp.sum(known), 1)
    if self.kind == CLASSIFICATION:
      xent = optax.softmax_cross_entropy_with_integer_labels(predictions, jnp.maximum(labels, 0))
      return jnp.sum(jnp.where(known, xent, 0.0)) / count
    known = known if self.scalar else jnp.broadcast_to(known[:, None], labels.shape)
    error = jnp.where(known, predictions - jnp.where(known, labels, 0.0), 0.0)  # NaN labels never reach a gradient
    return jnp.sum(error ** 2) / (count * (1 if self.scalar else self.num_outputs))

  def ccc_loss(self, predictions, labels, masked=True, axis_name=None):
    """1 - the mean over dimensions of the batch's CCC (population moments) on the known rows, for a regression.
    `masked=False`: every label is known. `axis_name`: inside a data-parallel step, the moments are summed over
    that axis, so the CCC is the global batch's (each device's slice alone would give a noisy CCC, a constant with
    no gradient at one clip per device); the step's pmean of the gradients then gives the global batch's gradient."""
    if self.kind != REGRESSION:
      raise ValueError(f"target {self.name} is a classification; a CCC loss needs a regression")
    predictions = predictions.reshape(predictions.shape[0], -1)
    labels = jnp.reshape(labels, (labels.shape[0], -1))
    known = jnp.ones(labels.shape[:1], bool) if not masked else jnp.all(jnp.isfinite(labels), axis=-1)
    weight = known.astype(predictions.dtype)[:, None]
    labels = jnp.where(weight > 0, labels, 0.0)
    sums = [jnp.sum(weight, axis=0)] + [jnp.sum(weight * v, axis=0) for v in (
        predictions, labels, predictions * predictions, labels * labels, predictions * labels)]
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    count = jnp.maximum(sums[0], 1.0)
    mean_p, mean_l, square_p, square_l, product = (v / count for v in sums[1:])
    var_p, var_l = square_p - mean_p ** 2, square_l - mean_l ** 2
    cov = product - mean_p * mean_l
    ccc = 2.0 * cov / (var_p + var_l + (mean_p - mean_l) ** 2 + 1e-8)
    return 1.0 - jnp.mean(ccc)

  def objective(self, predictions, labels, loss="mse", masked=True, axis_name=None):
    """The training loss `loss` (one of LOSSES) of a regression; a classification's is its cross-entropy.
    `axis_name`: the data-parallel axis the CCC's moments are summed over (`ccc_loss`)."""
    if loss not in LOSSES:
      raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    if self.kind == CLASSIFICATION or loss == "mse":
      return self.loss(predictions, labels, masked)
    ccc = self.ccc_loss(predictions, labels, masked, axis_name)
    return ccc if loss == "ccc" else ccc + self.loss(predictions, labels, masked)

  def score(self, predictions, labels):
    """Scores of numpy predictions on the known rows: per-dimension CCC and 'mean_ccc'; 'mae'; or 'uar' and the
    recall of each class present ('recall_<class>'). With no known row, {metric: NaN}."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    known = np.asarray(self.known(labels))
    if not known.any():
      return {self.metric: float("nan")}
    predictions, labels = predictions[known], labels[known]
    if self.metric == "mae":
      return {"mae": float(metrics.mae(predictions, labels))}
    if self.kind == CLASSIFICATION:
      chosen = predictions.argmax(-1)
      recalls = {f"recall_{name}": float(np.mean(chosen[labels == c] == c))
                 for c, name in enumerate(self.names) if np.any(labels == c)}
      return {"uar": float(metrics.uar(chosen, labels, self.num_outputs)), **recalls}
    per = np.asarray(metrics.ccc(predictions, labels))
    return {**{n: float(v) for n, v in zip(self.names, per)}, "mean_ccc": float(per.mean())}

  def labels_of(self, columns):
    """This target's labels from a record's (or a batch's, or metadata's) columns."""
    return np.asarray(columns[self.field])

  def all_known(self, labels):
    """Whether every row carries this target's label (then `loss(..., masked=False)` applies)."""
    return bool(np.all(np.asarray(self.known(labels))))

  def submission_values(self, prediction):
    """One clip's activated prediction -> its submission cells (class name for a classification)."""
    if self.kind == CLASSIFICATION:
      chosen = int(np.argmax(prediction))
      return [self.names[chosen] if self.submit_names else str(chosen)]
    return [f"{float(v):.4f}" for v in np.atleast_1d(prediction)]


class Joint:
  """Several targets trained together on one output vector: each reads its own slice of the outputs (a single linear
  layer of sum(k) outputs is one linear head per target) and its own columns of a packed label array.

  It offers what a trainer uses of a `Target` (`num_outputs`, `labels_of`, `known`, `all_known`, `loss`,
  `score`, `metric`), so a trainer written for one target trains on several. Labels are packed into one float
  array [N, sum of label widths] (a class index as a float, -1 unknown) so that splits index them like any array.

  weights: loss weight per target (default 1 each): the joint loss is sum_i w_i L_i of the targets' own masked
    losses. metric 'mean_score' (the best-epoch choice) is the mean of the targets' own metrics (mean CCC or UAR;
    higher is better for all of them: a target scored by MAE cannot join).
  """
  metric = "mean_score"

  def __init__(self, members, weights=None):
    self.members = tuple(members)
    self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(self.members)
    if len(self.weights) != len(self.members):
      raise ValueError(f"{len(self.weights)} loss weights for {len(self.members)} targets")
    lower = [t.name for t in self.members if not t.higher_is_better]
    if lower:
      raise ValueError(f"targets {', '.join(lower)} are scored lower-is-better; a joint target averages scores")
    self.name = "+".join(t.name for t in self.members)
    bounds = np.cumsum([0] + [t.num_outputs for t in self.members])
    self._outputs = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    widths = [1 if t.kind == CLASSIFICATION or t.scalar else t.num_outputs for t in self.members]
    bounds = np.cumsum([0] + widths)
    self._labels = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

  @property
  def num_outputs(self):
    return self._outputs[-1].stop

  def split_outputs(self, outputs):
    """[..., sum k] -> {target name: [..., k_i]}."""
    return {t.name: outputs[..., s] for t, s in zip(self.members, self._outputs)}

  def unpack(self, packed):
    """Packed labels [N, W] -> {target name: its labels} (class indices as int32)."""
    result = {}
    for t, s in zip(self.members, self._labels):
      column = packed[..., s]
      if t.kind == CLASSIFICATION:
        result[t.name] = column[..., 0].astype("int32")
      else:
        result[t.name] = column[..., 0] if t.scalar else column
    return result

  def labels_of(self, columns):
    """The members' labels from `columns`, packed into one float32 array [N, W]."""
    parts = []
    for t in self.members:
      values = np.asarray(columns[t.field], np.float32)
      parts.append(values.reshape(values.shape[0], -1))
    return np.concatenate(parts, axis=1)

  def known(self, packed):
    """[N] bool: rows that carry the labels of at least one member."""
    labels = self.unpack(packed)
    return np.any([np.asarray(t.known(labels[t.name])) for t in self.members], axis=0)

  def all_known(self, packed):
    """Whether every row carries every member's label."""
    labels = self.unpack(packed)
    return all(t.all_known(labels[t.name]) for t in self.members)

  def losses(self, outputs, packed, masked=True, loss="mse", axis_name=None):
    """{target name: its loss} on the target's slice of the outputs (`Target.objective`)."""
    labels, outputs = self.unpack(packed), self.split_outputs(outputs)
    return {t.name: t.objective(outputs[t.name], labels[t.name], loss, masked, axis_name) for t in self.members}

  def loss(self, outputs, packed, masked=True, loss="mse"):
    parts = self.losses(outputs, packed, masked, loss)
    return sum(w * parts[t.name] for t, w in zip(self.members, self.weights))

  def score(self, outputs, packed):
    """Each target's scores prefixed '<name>/' and 'mean_score', the mean of the metrics of the targets with known
    labels (NaN when none has any)."""
    labels, outputs = self.unpack(np.asarray(packed)), self.split_outputs(np.asarray(outputs))
    result, main = {}, []
    for t in self.members:
      scores = t.score(outputs[t.name], labels[t.name])
      main.append(scores[t.metric])
      result.update({f"{t.name}/{k}": v for k, v in scores.items()})
    known = [m for m in main if np.isfinite(m)]
    return {**result, "mean_score": float(np.mean(known)) if known else float("nan")}

  @property
  def label_width(self):
    """Columns of the packed labels."""
    return self._labels[-1].stop


def _emogator_categories():
  from exvo_jax.data import emogator  # pylint: disable=import-outside-toplevel  (category names only)
  return emogator.CATEGORIES


_CATALOGUE = {
    "emotions": lambda: Target("emotions", "emotions", REGRESSION, schema.EMOTIONS, "sigmoid", "mean_ccc",
                               schema.EMOTIONS),
    "age": lambda: Target("age", "age", REGRESSION, ("Age",), "linear", "mae", ("Age",), scalar=True),
    "country": lambda: Target("country", "country", CLASSIFICATION, schema.COUNTRIES, "logits", "uar",
                              ("Country",), submit_names=False),
    "avb_high": lambda: Target("avb_high", "avb_high", REGRESSION, schema.EMOTIONS, "sigmoid", "mean_ccc",
                               schema.EMOTIONS),
    "avb_two": lambda: Target("avb_two", "avb_two", REGRESSION, schema.AVB_TWO, "sigmoid", "mean_ccc",
                              schema.AVB_TWO),
    "avb_culture": lambda: Target("avb_culture", "avb_culture", REGRESSION, schema.AVB_CULTURE, "sigmoid",
                                  "mean_ccc", schema.AVB_CULTURE),
    "avb_type": lambda: Target("avb_type", "avb_type", CLASSIFICATION, schema.AVB_TYPES, "logits", "uar",
                               ("Voc_Type",)),
    "category": lambda: Target("category", "category", CLASSIFICATION, _emogator_categories(), "logits", "uar",
                               ("Category",)),
}
NAMES = tuple(_CATALOGUE)


def get(name):
  """The target called `name`; an unknown name fails with the list of known ones."""
  if name not in _CATALOGUE:
    raise ValueError(f"unknown target {name!r}; known targets: {', '.join(NAMES)}")
  return _CATALOGUE[name]()
