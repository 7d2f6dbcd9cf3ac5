"""Inner-loop adaptation: MAML's second-order gradient, masks and anchors, a restart per speaker; speaker
normalisation and the linear read-outs against numpy z-scores, sklearn Ridge and LogisticRegression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model import Ridge

from configs import fewshot as fewshot_config
from exvo_jax import emo18_trainer
from exvo_jax import adaptation
from exvo_jax import personaliser
from exvo_jax import targets
from exvo_jax.models import emo18


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


@pytest.mark.parametrize("steps", [1, 2])
def test_first_and_second_order_meta_gradients_match_the_hand_formula(steps):
  """One weight, support loss a (w - c)^2, query loss b (w_k - d)^2. Each inner step maps w to
  w - lr 2a (w - c), so dw_k/dw = (1 - 2 a lr)^k. MAML's meta-gradient is 2b (w_k - d) (1 - 2 a lr)^k;
  first-order MAML drops the Jacobian: 2b (w_k - d)."""
  a, c, b, d, lr, w = 1.5, 0.4, 0.7, -1.2, 0.1, 2.0
  w_k = w
  for _ in range(steps):
    w_k = w_k - lr * 2 * a * (w_k - c)
  first_order_reference = 2 * b * (w_k - d)
  second_order_reference = first_order_reference * (1 - 2 * a * lr) ** steps

  def loss_fn(params, batch):
    return batch["scale"] * (params["w"] - batch["centre"]) ** 2

  support, query = {"scale": a, "centre": c}, {"scale": b, "centre": d}
  mask = adaptation.subset_mask({"w": 0.0}, ("w",))

  def meta_loss(weight, first_order):
    adapted = adaptation.inner_loop(loss_fn, {"w": weight}, support, steps=steps, learning_rate=lr, mask=mask,
                                    first_order=first_order)
    return loss_fn(adapted, query)

  with jax.enable_x64(True):
    assert float(jax.grad(meta_loss)(jnp.float64(w), False)) == pytest.approx(second_order_reference, rel=1e-12)
    assert float(jax.grad(meta_loss)(jnp.float64(w), True)) == pytest.approx(first_order_reference, rel=1e-12)


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
  sample = split.batch([0], personaliser.audio_options(config))
  variables = model.init(jax.random.PRNGKey(0), sample["audio"], sample["length"])
  before = jax.tree.map(np.array, variables)
  adapter = personaliser.Personaliser(model, target, variables, split, None, None, None, None)
  predictions = adapter.predict(config, "finetune", episodes)
  np.testing.assert_allclose(predictions[2], predictions[8], atol=1e-6)  # B adapted after C: same start as A
  query = split.batch([2], personaliser.audio_options(config))  # the same clip (A's query), before adaptation
  unadapted = np.asarray(model.apply(variables, query["audio"], query["length"])["outputs"][0])
  assert np.abs(predictions[2] - unadapted).max() > 1e-4, "fine-tuning on the support clips changed nothing"
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(variables))  # the trained model is untouched


# ---------------------------------------------------------------------------------------------------------------
# Speaker normalisation and the linear read-out of speaker_norm.


def _z_score_per_speaker(features, speakers):
  """Reference: each row minus its speaker's mean over that speaker's rows, divided by their (population) std; an
  explicit loop over rows in float64."""
  features = np.asarray(features, np.float64)
  out = np.zeros_like(features)
  for i in range(len(features)):
    own = features[[j for j in range(len(features)) if speakers[j] == speakers[i]]]
    out[i] = (features[i] - own.mean(0)) / own.std(0)
  return out


def test_speaker_normalise_is_a_z_score_with_each_speakers_own_statistics():
  rng = np.random.default_rng(0)
  speakers = np.array(["b", "a", "c", "a", "b", "a", "c", "b", "a", "c"])  # interleaved, not sorted
  offset = {"a": 5.0, "b": -3.0, "c": 0.5}
  scale = {"a": 2.0, "b": 0.1, "c": 10.0}
  features = np.stack([offset[s] + scale[s] * rng.normal(size=3) for s in speakers])
  got = adaptation.speaker_normalise(features, speakers)
  assert got.shape == (10, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, _z_score_per_speaker(features, speakers), rtol=1e-5, atol=1e-5)
  for s in "abc":  # each speaker's rows now have mean 0 and std 1
    np.testing.assert_allclose(got[speakers == s].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(got[speakers == s].std(0), 1.0, rtol=1e-5)


def test_speaker_normalise_maps_a_single_clip_or_a_constant_column_to_zero():
  """A speaker with one clip, or a descriptor constant over a speaker's clips, has std 0: the std is floored
  (speaker_statistics' min_std) and the centred value is exactly 0, so the result is 0, not NaN or inf."""
  features = np.array([[1.0, 7.0], [3.0, 7.0], [2.0, 9.0], [4.0, -1.0]])
  speakers = np.array(["a", "a", "a", "solo"])
  got = adaptation.speaker_normalise(features, speakers)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got[3], [0.0, 0.0])
  # Speaker a, column 0: mean 2, population std sqrt(2/3) -> (-1, 1, 0) / sqrt(2/3); column 1: mean 23/3,
  # std sqrt(8/9) = 2 sqrt(2)/3 -> (-2/3, -2/3, 4/3) / (2 sqrt(2)/3) = (-1, -1, 2) / sqrt(2).
  np.testing.assert_allclose(got[:3, 0], np.array([-1, 1, 0]) / np.sqrt(2 / 3), rtol=1e-6)
  np.testing.assert_allclose(got[:3, 1], np.array([-1, -1, 2]) / np.sqrt(2), rtol=1e-6)
  constant = adaptation.speaker_normalise(np.array([[1.0, 5.0], [2.0, 5.0]]), np.array(["x", "x"]))
  np.testing.assert_array_equal(constant[:, 1], [0.0, 0.0])
  np.testing.assert_allclose(constant[:, 0], [-1.0, 1.0], rtol=1e-6)


def test_speaker_normalise_uses_given_statistics():
  features = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])
  speakers = np.array(["a", "b", "a"])
  stats = {"a": (np.array([1.0, 1.0]), np.array([2.0, 4.0])), "b": (np.array([0.0, 0.0]), np.array([3.0, 3.0]))}
  # a: ((1, 2) - 1) / (2, 4) = (0, 0.25), ((5, 5) - 1) / (2, 4) = (2, 1); b: (3, 6) / 3 = (1, 2).
  np.testing.assert_allclose(adaptation.speaker_normalise(features, speakers, stats),
                             [[0.0, 0.25], [1.0, 2.0], [2.0, 1.0]], rtol=1e-7)


def test_ridge_read_out_hand_computed_with_an_unregularised_bias():
  """x = (0, 1, 2), y = 2x + 1, l2 = 1: centred xc = (-1, 0, 1), yc = (-2, 0, 2); w = xc.yc / (xc.xc + l2) =
  4 / 3; the bias is not shrunk: b = mean(y) - mean(x) w = 3 - 4/3 = 5/3."""
  head = adaptation.fit_linear_head(np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [3.0], [5.0]]),
                                    kind="regression", l2=1.0)
  np.testing.assert_allclose(head["kernel"], [[4 / 3]], rtol=1e-6)
  np.testing.assert_allclose(head["bias"], [5 / 3], rtol=1e-6)


@pytest.mark.parametrize("l2", [0.3, 5.0])
def test_ridge_read_out_equals_sklearn_ridge(l2):
  """sklearn's Ridge minimises ||y - Xw - b||^2 + alpha ||w||^2 with an unpenalised intercept: the same objective."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 4)) * [1.0, 3.0, 0.5, 2.0] + [1.0, -2.0, 0.0, 4.0]
  y = x @ rng.normal(size=(4, 3)) + rng.normal(size=(30, 3)) + [10.0, -1.0, 0.5]
  head = adaptation.fit_linear_head(x, y, kind="regression", l2=l2)
  reference = Ridge(alpha=l2).fit(x, y)
  assert head["kernel"].shape == (4, 3) and head["bias"].shape == (3,)
  np.testing.assert_allclose(head["kernel"], reference.coef_.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(head["bias"], reference.intercept_, rtol=1e-5, atol=1e-5)


def _softmax_objective(kernel, bias, x, labels, l2):
  """Mean softmax cross-entropy + l2 ||kernel||^2 / (2N) (the bias is not penalised), written out in numpy."""
  logits = x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
  logits = logits - logits.max(1, keepdims=True)
  cross_entropy = np.log(np.exp(logits).sum(1)) - logits[np.arange(len(labels)), labels]
  return cross_entropy.mean() + 0.5 * l2 * np.sum(np.asarray(kernel, np.float64) ** 2) / len(labels)


def _assert_softmax_solution(head, x, labels, l2):
  """fit_linear_head('classification') minimises mean cross-entropy + l2 ||W||^2 / (2N), bias free; sklearn's
  LogisticRegression(C) minimises C * sum cross-entropy + ||W||^2 / 2 with a free intercept: the same minimiser for
  C = 1/l2. Logits are defined up to a shift common to all classes, so biases are compared after removing their
  mean. Full-batch float32 Adam at a constant step does not settle exactly on the minimum: the weights are compared
  to 1e-2 and the objective must be within 1e-5 of sklearn's minimum (penalising the bias, or penalising by l2
  instead of l2/N, moves the weights by 0.2 or more on these problems)."""
  reference = LogisticRegression(C=1.0 / l2, tol=1e-12, max_iter=10_000).fit(x, labels)
  np.testing.assert_allclose(head["kernel"], reference.coef_.T, atol=1e-2)
  np.testing.assert_allclose(head["bias"] - head["bias"].mean(), reference.intercept_ - reference.intercept_.mean(),
                             atol=1e-2)
  optimum = _softmax_objective(reference.coef_.T, reference.intercept_, x, labels, l2)
  assert _softmax_objective(head["kernel"], head["bias"], x, labels, l2) - optimum < 1e-5


def test_softmax_read_out_matches_sklearn_logistic_regression():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(60, 4))
  # Unbalanced classes (33, 17, 10 clips), so that the free bias matters.
  labels = np.argmax(x @ rng.normal(size=(4, 3)) * 2 + [1.5, 0.0, -1.5] + rng.gumbel(size=(60, 3)), axis=1)
  assert np.bincount(labels).min() >= 5
  head = adaptation.fit_linear_head(x, labels, kind="classification", l2=1.0, num_classes=3)
  assert head["kernel"].shape == (4, 3) and head["bias"].shape == (3,)
  _assert_softmax_solution(head, x, labels, 1.0)


def test_softmax_read_out_separates_separable_classes():
  rng = np.random.default_rng(3)
  centres = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
  labels = np.repeat(np.arange(3), 10)
  x = centres[labels] + rng.uniform(-1, 1, size=(30, 2))
  head = adaptation.fit_linear_head(x, labels, kind="classification", l2=1.0, num_classes=3)
  np.testing.assert_array_equal(np.argmax(x @ head["kernel"] + head["bias"], axis=1), labels)


def _train_split(rng, num_outputs=None):
  """A training Split of 3 speakers (different offsets and scales) with 3 unlabelled clips whose embeddings are far
  off and whose labels are NaN / -1: neither may reach the read-out or the speakers' statistics."""
  speakers = np.array(["s1", "s2", "s1", "s3", "s2", "s1", "s3", "s2", "s3", "s1", "s2", "s3", "s1", "s2"])
  labelled = np.ones(len(speakers), bool)
  labelled[[2, 7, 11]] = False
  offset = {"s1": [0.0, 3.0, -1.0], "s2": [5.0, 0.0, 2.0], "s3": [-4.0, 1.0, 0.0]}
  scale = {"s1": 1.0, "s2": 3.0, "s3": 0.5}
  embeddings = np.stack([np.array(offset[s]) + scale[s] * rng.normal(size=3) for s in speakers])
  embeddings[~labelled] += 100.0
  if num_outputs is None:
    labels = rng.uniform(size=(len(speakers), 10))
    labels[~labelled] = np.nan
  else:
    labels = np.arange(len(speakers)) % num_outputs
    labels[~labelled] = -1
  split = emo18_trainer.Split(source=None, file_id=np.array([f"[{i:05d}]" for i in range(len(speakers))]),
                              speaker=speakers, labels=labels, labelled=labelled)
  return split, embeddings.astype(np.float32)


def _read_out(target, train, embeddings, l2, per_speaker=True):
  """speaker_norm's read-out (per_speaker) or refit's, as FewShot fits it on the training split's embeddings."""
  config = fewshot_config.get_config("smoke")
  config.read_out_l2 = l2
  return personaliser.Personaliser(None, target, None, None, None, None, train, lambda: embeddings).read_out(
      config, per_speaker=per_speaker)


def test_fit_read_out_is_ridge_on_per_speaker_normalised_labelled_training_rows():
  rng = np.random.default_rng(4)
  train, embeddings = _train_split(rng)
  target = emo18_trainer.make_target("hume_vb")
  head = _read_out(target, train, embeddings, 2.0)
  rows = train.labelled
  normalised = _z_score_per_speaker(embeddings[rows], train.speaker[rows])
  reference = Ridge(alpha=2.0).fit(normalised, train.labels[rows])
  assert head["kernel"].shape == (3, 10)
  np.testing.assert_allclose(head["kernel"], reference.coef_.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(head["bias"], reference.intercept_, rtol=1e-4, atol=1e-5)


def test_fit_read_out_for_categories_is_softmax_regression_on_normalised_rows():
  rng = np.random.default_rng(5)
  train, embeddings = _train_split(rng, num_outputs=3)
  target = targets.Target("category", "category", "classification", ("x", "y", "z"), "logits", "uar", ("C",))
  head = _read_out(target, train, embeddings, 1.0)
  rows = train.labelled
  normalised = _z_score_per_speaker(embeddings[rows], train.speaker[rows])
  assert head["kernel"].shape == (3, 3)
  _assert_softmax_solution(head, normalised, train.labels[rows], 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The candidates of issue 20: parameters by path, shrunk statistics, restandardising, the support offset, and
# BatchNorm statistics per speaker.


def test_subset_mask_selects_deeper_parameters_by_their_path():
  params = {"encoder": {"Conv_0": {"kernel": 1.0}, "MaskedBatchNorm_0": {"scale": 1.0, "bias": 1.0},
                        "MaskedBatchNorm_1": {"scale": 1.0, "bias": 1.0}},
            "lstm_0": {"w": 1.0}, "lstm_1": {"w": 1.0}, "head": {"kernel": 1.0, "bias": 1.0}}

  def chosen(prefixes):
    flat = jax.tree_util.tree_flatten_with_path(adaptation.subset_mask(params, prefixes))[0]
    return {"/".join(k.key for k in path) for path, leaf in flat if leaf}

  assert chosen(("head/bias",)) == {"head/bias"}
  assert chosen(("encoder/MaskedBatchNorm", "head/bias")) == {
      "encoder/MaskedBatchNorm_0/scale", "encoder/MaskedBatchNorm_0/bias", "encoder/MaskedBatchNorm_1/scale",
      "encoder/MaskedBatchNorm_1/bias", "head/bias"}
  assert chosen(("lstm", "head")) == {"lstm_0/w", "lstm_1/w", "head/kernel", "head/bias"}  # top-level names as before
  with pytest.raises(ValueError, match="no parameters match"):
    adaptation.subset_mask(params, ("head/scale",))


def test_shrunk_speaker_statistics_by_hand():
  """A speaker with clips 0 and 2 (mean 1, variance 1) and a prior of mean 5, std 3 worth 2 clips: mean
  (2 * 1 + 2 * 5) / 4 = 3, variance (2 * 1 + 2 * 9) / 4 = 5; with a floor of 0.9 of the prior's std, 2.7."""
  features, speakers = np.array([[0.0], [2.0]]), np.array(["a", "a"])
  prior = (np.array([5.0]), np.array([3.0]))
  (mean, std), = adaptation.speaker_statistics(features, speakers, prior=prior, prior_clips=2.0).values()
  np.testing.assert_allclose([mean[0], std[0]], [3.0, np.sqrt(5.0)])
  (mean, std), = adaptation.speaker_statistics(features, speakers, prior=prior, prior_clips=2.0,
                                               min_std_fraction=0.9).values()
  np.testing.assert_allclose([mean[0], std[0]], [3.0, 2.7])
  (mean, std), = adaptation.speaker_statistics(features, speakers).values()  # no prior: the speaker's own
  np.testing.assert_allclose([mean[0], std[0]], [1.0, 1.0])


def test_restandardise_gives_every_speaker_the_reference_moments():
  rng = np.random.default_rng(7)
  speakers = np.repeat(["a", "b", "c"], 20)
  features = rng.normal(size=(60, 4)) * rng.uniform(0.2, 5, (3, 1, 4)).repeat(20, 0).reshape(60, 4) \
      + np.repeat(rng.normal(0, 10, (3, 4)), 20, 0)
  reference = (np.array([1.0, -2.0, 0.0, 3.0]), np.array([0.5, 2.0, 1.0, 4.0]))
  out = adaptation.restandardise(features, speakers, adaptation.speaker_statistics(features, speakers), reference)
  for speaker in "abc":
    rows = out[speakers == speaker].astype(np.float64)
    np.testing.assert_allclose(rows.mean(0), reference[0], atol=1e-5)
    np.testing.assert_allclose(rows.std(0), reference[1], rtol=1e-5)


def test_support_offset_is_the_mean_residual_shrunk_toward_zero():
  residuals = np.array([[1.0, 2.0], [3.0, -2.0]])
  np.testing.assert_allclose(adaptation.support_offset(residuals, prior_clips=2.0), [1.0, 0.0])  # [4, 0] / 4
  np.testing.assert_allclose(adaptation.support_offset(residuals, prior_clips=0.0), [2.0, 0.0])


def _first_conv_moments(model_params, audio, lengths):
  """Reference for the first BatchNorm's input: Emo18's first convolution (kernel 8, padding 3, no bias) applied to
  every valid 1,600-sample frame with numpy's correlate, its mean and population variance per channel over all
  positions of the valid frames."""
  kernel = np.asarray(model_params["encoder"]["Conv_0"]["kernel"], np.float64)[:, 0, :]  # [8, 64]
  outputs = []
  for clip, length in zip(np.asarray(audio, np.float64), lengths):
    for f in range(-(-int(length) // emo18.FRAME_SAMPLES)):
      frame = np.pad(clip[f * emo18.FRAME_SAMPLES:(f + 1) * emo18.FRAME_SAMPLES], 3)
      outputs.append(np.stack([np.correlate(frame, kernel[:, c], "valid") for c in range(kernel.shape[1])], -1))
  outputs = np.concatenate(outputs)
  return outputs.mean(0), outputs.var(0)


def test_batch_norm_statistics_are_the_moments_of_the_speakers_valid_frames():
  model = emo18.Emo18(hidden=8)
  rng = np.random.default_rng(3)
  lengths = np.array([4000, 2500, 4800], np.int32)
  audio = np.zeros((3, 4800), np.float32)
  for i, n in enumerate(lengths):
    audio[i, :n] = rng.normal(0, 0.3, n) + 0.2 * np.sin(np.arange(n) / (5 + i))
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(audio), jnp.asarray(lengths))
  before = jax.tree.map(np.array, variables)
  frames = lambda n: int(np.sum(-(-n // emo18.FRAME_SAMPLES)))
  adapted = adaptation.batch_norm_statistics(model, variables, [(audio, lengths, frames(lengths))])
  mean, var = _first_conv_moments(variables["params"], audio, lengths)
  stats = adapted["batch_stats"]["encoder"]
  np.testing.assert_allclose(stats["MaskedBatchNorm_0"]["mean"], mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["MaskedBatchNorm_0"]["var"], var, rtol=1e-4, atol=1e-7)
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(variables))  # the trained model is untouched
  assert adapted["params"] is variables["params"]
  # In two batches (the third clip alone, padded to 4,800 like the first two), the first layer's moments combine
  # exactly; the deeper layers see inputs normalised per batch, so theirs are close, not equal.
  split = adaptation.batch_norm_statistics(model, variables, [(audio[:2], lengths[:2], frames(lengths[:2])),
                                                               (audio[2:], lengths[2:], frames(lengths[2:]))])
  for moment in ("mean", "var"):
    np.testing.assert_allclose(split["batch_stats"]["encoder"]["MaskedBatchNorm_0"][moment],
                               stats["MaskedBatchNorm_0"][moment], rtol=1e-4, atol=1e-7)
    for layer in ("MaskedBatchNorm_1", "MaskedBatchNorm_2"):
      estimate, exact = split["batch_stats"]["encoder"][layer][moment], stats[layer][moment]
      assert np.corrcoef(estimate, exact)[0, 1] > 0.9, (layer, moment)  # the same statistics, estimated
      assert not np.allclose(exact, before["batch_stats"]["encoder"][layer][moment])  # re-estimated
