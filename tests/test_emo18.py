"""Emo18: output shapes, padding invariance, and the data-parallel step against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exvo_jax import emo18_trainer
from exvo_jax import parallel
from exvo_jax.models import emo18


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
