"""Speed of the Flax speech encoder (exvo_jax.models.ssl) against the transformers PyTorch model, same weights.

Usage:
  pip install -e '.[test]'       # torch (CPU build) and transformers, the reference only
  python benchmarks/ssl_speed.py [--quick] [--batch 4] [--seconds 3] [--checkpoint FOLDER]

Model: wav2vec 2.0 base as transformers' Wav2Vec2Config defaults describe it (group-norm feature encoder, 12 post-LN
layers of 768, 94.4 M parameters), randomly initialised by PyTorch and loaded into Flax through
`ssl_checkpoint.to_flax`; or, with --checkpoint, a user's folder (its config and weights, on both sides). Dropout
and LayerDrop are off on both sides, and PyTorch's training-mode SpecAugment too, so that both compute the same
function.

Measured in one run, JAX and PyTorch blocks interleaved (background load hits both alike), median over blocks:
- forward: the whole encoder on a batch of full-length clips (default 4 x 3 s), every hidden state computed;
  JAX jitted, PyTorch under inference_mode with transformers' default attention (SDPA), both with as many threads
  as the process has cores (XLA sizes its pool by itself; torch.set_num_threads).
- train step: encoder -> mean over frames of the last hidden state -> Linear(hidden, 10) -> MSE against fixed
  random targets, Adam (lr 1e-5), every parameter trained; JAX a jitted step with the state donated, PyTorch the
  eager zero_grad / backward / step. JAX also with gradient checkpointing per transformer layer (remat).
- embedding extraction: clips/s of the JAX forward with every hidden state mean-pooled over frames (what the frozen
  feature set stores), batch as above.
- memory: XLA's buffer assignment (deterministic, unlike a process's resident size) of the compiled JAX train step
  (arguments + outputs - the donated state's aliases + temporaries) and of the gradient alone (its temporaries: the
  activations kept for the backward pass), with and without remat, and with the feature encoder frozen (gradient
  stopped at its output, as fine-tuning recipes do).
Checked before timing: the last hidden states agree within 1e-3 (forward) and the initial losses within 1e-3
relative; both losses finite and decreasing over a few steps, so a broken step is never timed.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

CHECK_STEPS = 3
NUM_OUTPUTS = 10
LEARNING_RATE = 1e-5


def torch_model(checkpoint, quick):
  """(transformers model in eval mode with dropout off, its config as a dict)."""
  import torch
  import transformers
  overrides = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                   layerdrop=0.0)
  torch.manual_seed(0)
  if checkpoint:
    model = transformers.AutoModel.from_pretrained(checkpoint, **overrides)
  else:
    size = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024) if quick else {}
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**overrides, **size))
  return model.eval(), model.config.to_dict()


def flax_params(model, config_dict):
  from exvo_jax.models import ssl_checkpoint
  config = ssl_checkpoint.config_from_dict(config_dict, "the benchmark's model")
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  params, _, _ = ssl_checkpoint.to_flax(state, config, "the benchmark's model")
  return config, params


class JaxForward:
  def __init__(self, config, params, waveform, pooled=False):
    import jax
    import jax.numpy as jnp
    from exvo_jax.models import ssl
    encoder = ssl.SpeechEncoder(config)

    def forward(params, waveform):
      out = encoder.apply({"params": params}, waveform)
      if pooled:  # every layer's mean over frames: [layers + 1, batch, hidden]
        return jnp.stack([h.mean(axis=1) for h in out["hidden_states"]])
      return out

    self.forward, self.params, self.waveform = jax.jit(forward), jax.device_put(params), jnp.asarray(waveform)
    self.prepare = lambda: None

  def output(self):
    return self.forward(self.params, self.waveform)

  def run(self, steps):
    for _ in range(steps):
      out = self.output()
    leaf = out if not isinstance(out, dict) else out["last_hidden_state"]
    return float(leaf[0, 0, 0]) if leaf.ndim == 3 else float(leaf[0, 0])


class TorchForward:
  def __init__(self, model, waveform, threads):
    import torch
    self.model, self.waveform, self.threads = model, torch.from_numpy(waveform), threads

  def prepare(self):
    import torch
    torch.set_num_threads(self.threads)

  def output(self):
    import torch
    with torch.inference_mode():
      return self.model(self.waveform, output_hidden_states=True)

  def run(self, steps):
    for _ in range(steps):
      out = self.output()
    return float(out.last_hidden_state[0, 0, 0])


def head_init(hidden, seed=0):
  rng = np.random.default_rng(seed)
  return {"kernel": (rng.normal(size=(hidden, NUM_OUTPUTS)) / np.sqrt(hidden)).astype(np.float32),
          "bias": np.zeros(NUM_OUTPUTS, np.float32)}


class JaxTrain:
  def __init__(self, config, params, waveform, labels, remat, freeze_feature_encoder=False):
    import jax
    import jax.numpy as jnp
    import optax
    from exvo_jax.models import ssl
    encoder = ssl.SpeechEncoder(config, remat=remat, freeze_feature_encoder=freeze_feature_encoder)
    tx = optax.adam(LEARNING_RATE)

    def loss_fn(params, waveform, labels):
      pooled = encoder.apply({"params": params["encoder"]}, waveform)["last_hidden_state"].mean(axis=1)
      predictions = pooled @ params["head"]["kernel"] + params["head"]["bias"]
      return jnp.mean(jnp.square(predictions - labels))

    def step(state, waveform, labels):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, waveform, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    all_params = {"encoder": params, "head": head_init(config.hidden_size)}
    self.state = jax.device_put((all_params, tx.init(all_params)))
    self.step = jax.jit(step, donate_argnums=0)
    self.grad = jax.jit(jax.grad(loss_fn))
    self.waveform, self.labels = jnp.asarray(waveform), jnp.asarray(labels)
    self.prepare = lambda: None

  def memory_bytes(self):
    """(the whole step's peak buffers: arguments + outputs - donated aliases + temporaries; the temporaries of the
    gradient alone, i.e. the activations kept for the backward pass), from XLA's buffer assignment."""
    step = self.step.lower(self.state, self.waveform, self.labels).compile().memory_analysis()
    whole = (step.argument_size_in_bytes + step.output_size_in_bytes - step.alias_size_in_bytes
             + step.temp_size_in_bytes)
    grad = self.grad.lower(self.state[0], self.waveform, self.labels).compile().memory_analysis()
    return whole, grad.temp_size_in_bytes

  def run(self, steps):
    for _ in range(steps):
      self.state, loss = self.step(self.state, self.waveform, self.labels)
    return float(loss)


class TorchTrain:
  def __init__(self, model, hidden, waveform, labels, threads):
    import torch
    self.model = model.train()  # dropout and LayerDrop are 0, and SpecAugment is off: the same function as eval
    self.model.config.apply_spec_augment = False
    head = head_init(hidden)
    self.head = torch.nn.Linear(hidden, NUM_OUTPUTS)
    with torch.no_grad():
      self.head.weight.copy_(torch.from_numpy(head["kernel"].T.copy()))
      self.head.bias.zero_()
    self.optimizer = torch.optim.Adam(list(self.model.parameters()) + list(self.head.parameters()),
                                      lr=LEARNING_RATE)
    self.waveform, self.labels, self.threads = torch.from_numpy(waveform), torch.from_numpy(labels), threads

  def prepare(self):
    import torch
    torch.set_num_threads(self.threads)

  def run(self, steps):
    import torch
    for _ in range(steps):
      self.optimizer.zero_grad()
      pooled = self.model(self.waveform).last_hidden_state.mean(dim=1)
      loss = torch.nn.functional.mse_loss(self.head(pooled), self.labels)
      loss.backward()
      self.optimizer.step()
    return loss.item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a 4-layer 256-wide model and short blocks (smoke run)")
  parser.add_argument("--batch", type=int, default=4, help="clips per step (default 4)")
  parser.add_argument("--seconds", type=float, default=3.0, help="clip length in seconds (default 3)")
  parser.add_argument("--checkpoint", default=None, help="a Hugging Face model folder to use instead")
  args = parser.parse_args()
  repeats, max_steps, block_s = (2, 2, 1.0) if args.quick else (5, 3, 6.0)

  import torch
  threads = common.usable_cores()
  torch.set_num_threads(threads)
  import transformers
  common.print_environment(threads, extra_rows=[("transformers", transformers.__version__)])
  start_load, total = common.load(), time.perf_counter()

  rng = np.random.default_rng(0)
  samples = round(args.seconds * 16_000)
  waveform = (0.1 * rng.standard_normal((args.batch, samples))).astype(np.float32)
  labels = rng.uniform(0, 1, (args.batch, NUM_OUTPUTS)).astype(np.float32)
  model, config_dict = torch_model(args.checkpoint, args.quick)
  config, params = flax_params(model, config_dict)
  count = sum(p.numel() for p in model.parameters())
  name = args.checkpoint or f"wav2vec2 {'(quick, small)' if args.quick else 'base'}, random weights"

  # Forward: same function first.
  forward = {"jax": JaxForward(config, params, waveform), "torch": TorchForward(model, waveform, threads)}
  jax_out, torch_out = forward["jax"].output(), forward["torch"].output()
  difference = float(np.max(np.abs(np.asarray(jax_out["last_hidden_state"]) - torch_out.last_hidden_state.numpy())))
  assert difference < 1e-3, f"forward outputs differ by {difference}"
  forward_rates, _ = common.interleaved_rates(forward, repeats, max_steps, block_s, warmup=1)

  extraction = {"jax": JaxForward(config, params, waveform, pooled=True)}
  extraction["jax"].run(1)
  extraction_rates, _ = common.interleaved_rates(extraction, repeats, max_steps, block_s)

  train = {"jax": JaxTrain(config, params, waveform, labels, remat=False),
           "jax_remat": JaxTrain(config, params, waveform, labels, remat=True),
           "torch": TorchTrain(model, config.hidden_size, waveform, labels, threads)}
  memory = {n: train[n].memory_bytes() for n in ("jax", "jax_remat")}
  for remat in (False, True):  # memory only: the feature encoder frozen (its gradient stopped)
    frozen = JaxTrain(config, params, waveform, labels, remat=remat, freeze_feature_encoder=True)
    memory[f"frozen{'_remat' * remat}"] = frozen.memory_bytes()
    del frozen
  losses = {}
  for name_, runner in train.items():
    runner.prepare()
    losses[name_] = [runner.run(1) for _ in range(CHECK_STEPS)]
    assert all(np.isfinite(losses[name_])), f"{name_}: non-finite loss {losses[name_]}"
    assert losses[name_][-1] < losses[name_][0], f"{name_}: loss does not decrease: {losses[name_]}"
  for other in ("jax_remat", "torch"):
    assert abs(losses[other][0] - losses["jax"][0]) <= 1e-3 * abs(losses["jax"][0]), (other, losses)
  train_rates, _ = common.interleaved_rates(train, repeats, max_steps, block_s, min_steps=1)
  torch.set_num_threads(threads)

  fwd, ext, trn = (common.medians(r) for r in (forward_rates, extraction_rates, train_rates))
  print(f"## Speech encoder on CPU: {name}, {count / 1e6:.1f} M parameters; batch {args.batch} x {args.seconds:g} s; "
        f"median of {repeats} interleaved blocks; {threads} threads\n")
  rows = [
      ("forward (every hidden state)", "JAX, jit", f"{fwd['jax']:.3f}", f"{fwd['jax'] * args.batch:.2f}",
       "1.00"),
      ("forward (every hidden state)", "PyTorch, inference_mode, SDPA", f"{fwd['torch']:.3f}",
       f"{fwd['torch'] * args.batch:.2f}", f"{fwd['jax'] / fwd['torch']:.2f}"),
      ("embedding extraction (mean of every layer)", "JAX, jit", f"{ext['jax']:.3f}",
       f"{ext['jax'] * args.batch:.2f}", "-"),
      ("train step (Adam, all parameters)", "JAX, jit, state donated", f"{trn['jax']:.3f}",
       f"{trn['jax'] * args.batch:.2f}", "1.00"),
      ("train step (Adam, all parameters)", "JAX, remat per layer", f"{trn['jax_remat']:.3f}",
       f"{trn['jax_remat'] * args.batch:.2f}", f"{trn['jax'] / trn['jax_remat']:.2f}"),
      ("train step (Adam, all parameters)", "PyTorch eager", f"{trn['torch']:.3f}",
       f"{trn['torch'] * args.batch:.2f}", f"{trn['jax'] / trn['torch']:.2f}"),
  ]
  print(common.markdown_table(("what", "implementation", "steps/s", "clips/s", "ratio JAX / this"), rows))
  print("\n| JAX train step | whole step, MiB | gradient's temporaries (activations), MiB |\n|---|---|---|")
  for key, label in (("jax", "every parameter trained"), ("jax_remat", "every parameter, remat per layer"),
                     ("frozen", "feature encoder frozen"), ("frozen_remat", "feature encoder frozen, remat per layer")):
    print(f"| {label} | {memory[key][0] / 2**20:.0f} | {memory[key][1] / 2**20:.0f} |")
  print(f"\nChecked before timing: last hidden states agree within {difference:.1e}; initial train losses JAX "
        f"{losses['jax'][0]:.5f}, remat {losses['jax_remat'][0]:.5f}, PyTorch {losses['torch'][0]:.5f}, each "
        f"decreasing over {CHECK_STEPS} steps.")
  ratio = fwd["jax"] / fwd["torch"]
  print(f"\n**forward: JAX / PyTorch = {ratio:.2f}; the Flax forward pass is "
        f"{'at least as fast as' if ratio >= 1 else 'SLOWER than'} PyTorch's.**")
  print(f"\nblock steps: up to {max_steps} (at least 1, cut at {block_s:g} s); total benchmark time "
        f"{time.perf_counter() - total:.0f} s; load average at start {start_load}, at end {common.load()} on {threads} "
        "cores (above the core count, other processes competed for the CPUs)")


if __name__ == "__main__":
  main()
