"""ExVo-FewShot: Emo18, the data-parallel step, the shared inner loop (fine-tuning, MAML) and the end-to-end run."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fewshot as fewshot_config
from exvo_jax import emo18_trainer
from exvo_jax import adaptation
from exvo_jax import parallel
from exvo_jax.data import schema
from exvo_jax.models import emo18
from exvo_jax.tasks import fewshot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _audio(batch, samples, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (batch, samples)).astype(np.float32))


def test_output_shapes_and_frame_features():
  model = emo18.Emo18(num_outputs=10, hidden=64)
  audio = _audio(3, 8 * emo18.FRAME_SAMPLES)
  lengths = jnp.array([8 * 1600, 5000, 1600], jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), audio, lengths)
  out = model.apply(variables, audio, lengths)
  assert out["outputs"].shape == (3, 10) and out["embedding"].shape == (3, 64)
  features = emo18.FrameEncoder(train=False).apply({"params": variables["params"]["encoder"],
                                                    "batch_stats": variables["batch_stats"]["encoder"]},
                                                   audio.reshape(-1, 1600), jnp.ones(24, bool))
  assert features.shape == (24, 512)  # 256 channels x 2 positions per 0.1 s frame
  assert emo18.frames_per_clip(jnp.array([1, 1600, 1601, 0])).tolist() == [1, 1, 2, 1]
  kernel = variables["params"]["encoder"]["Conv_0"]["kernel"]
  assert kernel.shape == (8, 1, 64) and float(jnp.abs(kernel).max()) <= np.sqrt(6 / 8) + 1e-6  # Kaiming uniform
  assert float(jnp.abs(variables["params"]["head"]["bias"]).max()) == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_padded_clip_gives_the_unpadded_output(train):
  """The last valid frame's output does not depend on padding, in training mode (BatchNorm on batch statistics,
  masked) as in evaluation mode."""
  model = emo18.Emo18(hidden=32)
  clip = _audio(1, 4 * 1600)[:, :5000]
  unpadded = jnp.pad(clip, ((0, 0), (0, 4 * 1600 - 5000)))
  padded = jnp.pad(clip, ((0, 0), (0, 9 * 1600 - 5000)))
  length = jnp.array([5000])
  variables = model.init(jax.random.PRNGKey(1), padded, length)
  kwargs = {"mutable": ["batch_stats"]} if train else {}

  def run(audio):
    out = model.apply(variables, audio, length, train=train, **kwargs)
    return out[0] if train else out

  a, b = run(unpadded), run(padded)
  np.testing.assert_allclose(a["outputs"], b["outputs"], atol=1e-6)
  np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-6)
  # In a batch with a longer clip, the short clip's output is still its own.
  pair = jnp.concatenate([padded, _audio(1, 9 * 1600, seed=5)])
  both = model.apply(variables, pair, jnp.array([5000, 9 * 1600]))
  np.testing.assert_allclose(both["outputs"][0], model.apply(variables, padded, length)["outputs"][0], atol=1e-6)


def test_data_parallel_step_equals_single_device_step():
  """8 devices vs 1, two SGD steps: parameters AND BatchNorm running statistics agree (1e-5).

  SGD rather than Adam: Adam divides each update by the gradient's own size, so the few weights whose gradient is
  ~1e-7 (rounding level, where summation order differs between 1 and 8 devices) get full-size random steps."""
  target = emo18_trainer.make_target("hume_vb")
  rng = np.random.default_rng(0)
  lengths = rng.integers(1000, 6 * 1600, size=8).astype(np.int32)  # devices hold different numbers of frames
  audio = rng.uniform(-1, 1, (8, 6 * 1600)).astype(np.float32) * (np.arange(6 * 1600)[None] < lengths[:, None])
  batch = {"audio": audio, "length": lengths, "labels": rng.uniform(0, 1, (8, 10)).astype(np.float32)}
  results = []
  for devices in (1, 8):
    mesh = parallel.make_mesh(devices)
    model = emo18.Emo18(hidden=32, bn_axis_name=parallel.DATA_AXIS)
    variables = model.init(jax.random.PRNGKey(0), audio, lengths)
    state = emo18_trainer.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                      batch_stats=variables["batch_stats"], tx=optax.sgd(0.05))
    step = parallel.data_parallel(emo18_trainer.make_train_step(model, target), mesh)
    state = parallel.replicate(state, mesh)
    for _ in range(2):
      state, step_metrics = step(state, parallel.shard_batch(batch, mesh))
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(step_metrics["loss"])))
  (p1, s1, l1), (p8, s8, l8) = results
  assert l1 == pytest.approx(l8, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), p1, p8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), s1, s8)
  assert float(np.abs(s1["encoder"]["MaskedBatchNorm_0"]["mean"]).sum()) > 0  # running mean moved from its 0 start
  start = model.init(jax.random.PRNGKey(0), audio, lengths)["params"]
  assert float(np.abs(p1["lstm_0"]["ii"]["kernel"] - start["lstm_0"]["ii"]["kernel"]).max()) > 1e-4  # it trained


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


def test_support_and_query_sets():
  target = emo18_trainer.make_target("hume_vb")
  records = [{"audio": np.ones(10, np.int16), "file_id": f"[{i}]", "speaker": str(i // 4),
              "emotions": np.zeros(10, np.float32) if i % 4 < 2 else np.full(10, np.nan, np.float32),
              "labelled": i % 4 < 2} for i in range(8)]
  test = emo18_trainer.Split.read(records, target)
  episodes = fewshot.support_query(test, num_support=2, seed=0)
  assert {s: (sup.tolist(), q.tolist()) for s, (sup, q) in episodes.items()} == {"0": ([0, 1], [2, 3]),
                                                                                 "1": ([4, 5], [6, 7])}
  for r in records:
    r["labelled"], r["emotions"] = True, np.zeros(10, np.float32)
  val = emo18_trainer.Split.read(records, target)
  a = fewshot.support_query(val, num_support=2, seed=3)
  assert {s: e[0].tolist() for s, e in a.items()} == {s: e[0].tolist()
                                                      for s, e in fewshot.support_query(val, num_support=2,
                                                                                        seed=3).items()}
  for support, query in a.values():
    assert len(support) == 2 and len(query) == 2 and not set(support) & set(query)


def test_table4_variants():
  assert fewshot_config.get_config().hidden == 256
  assert fewshot_config.get_config("hidden=64").hidden == 64
  assert fewshot_config.get_config("adaptation=maml").adaptation == "maml"
  config = fewshot_config.get_config()
  assert (config.learning_rate, config.batch_size, config.max_seconds, config.adapt_subset) == \
      (1e-4, 8, 20.0, ("lstm", "head"))
  assert len(fewshot_config.get_sweep()) == 12


def test_smoke_end_to_end_writes_metrics_and_submission(tmp_path):
  out = subprocess.run([sys.executable, "-m", "exvo_jax.main", "--config=configs/fewshot.py:smoke",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "metrics.json").read_text())
  assert set(result["results"]) == {"none", "speaker_norm"}
  for scores in result["results"].values():
    assert set(scores) == {*schema.EMOTIONS, "mean_ccc"} and all(np.isfinite(v) for v in scores.values())
  assert "| none |" in out.stdout and "| speaker_norm |" in out.stdout and "Awe" in out.stdout
  corpus = pathlib.Path(os.environ["EXVO_CACHE"], "demo", "demo-tiny-seed0")
  with open(corpus / "data_info.csv") as f:
    test_rows = [r for r in csv.DictReader(f) if r["Split"] == "Test"]
  query_ids = {r["File_ID"] for r in test_rows if r["Awe"] == ""}
  with open(tmp_path / result["submission"]) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["File_ID", *schema.EMOTIONS]
  assert {r[0] for r in rows[1:]} == query_ids and len(rows) - 1 == len(query_ids)
  assert all(np.isfinite([float(v) for v in r[1:]]).all() for r in rows[1:])


def test_finetune_and_maml_raise_query_ccc_over_none_on_the_demo_corpus(tmp_path):
  """Demo speakers carry personal label biases, so 2 support clips help: both adaptations beat `none` on the same
  query clips (default demo corpus, seed 0, a shortened base training shared by both runs)."""
  results = {}
  for mode in ("maml", "finetune"):
    config = fewshot_config.get_config(f"adaptation={mode},epochs=2")
    config.maml.meta_steps = 30
    config.log_every_s = 1e9
    config.num_devices = 1  # 8 virtual devices on 2 cores only add overhead; the 8-device step is tested above
    results[mode] = fewshot.run(config, str(tmp_path))["results"]  # the second run resumes the base model
  none = results["maml"]["none"]["mean_ccc"]
  assert results["finetune"]["none"]["mean_ccc"] == pytest.approx(none)  # the very same clips and base model
  margins = {mode: results[mode][mode]["mean_ccc"] - none for mode in results}
  print(f"query mean CCC: none {none:.3f}; margins over none: {margins}")
  assert margins["finetune"] > 0.0
  assert margins["maml"] > 0.01


def test_rows_by_speaker_matches_a_scan_per_speaker():
  rng = np.random.default_rng(0)
  speakers = np.array([f"Speaker_{i}" for i in rng.integers(0, 40, 1500)])
  keep = rng.random(1500) > 0.3
  for mask in (None, keep):
    got = fewshot.rows_by_speaker(speakers, mask)
    selected = np.ones(1500, bool) if mask is None else mask
    expected = {s: np.flatnonzero((speakers == s) & selected) for s in set(speakers[selected])}
    assert got.keys() == expected.keys()
    for s in expected:
      np.testing.assert_array_equal(got[s], expected[s])
