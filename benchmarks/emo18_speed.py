"""Speed of the Emo18 (CNN-LSTM) train step on CPU: the project's JAX step against the same network in PyTorch.

Usage:
  pip install torch==2.13.0     # the reference only; not a dependency of exvo_jax (not in setup.py)
  python benchmarks/emo18_speed.py [--quick] [--batch 8] [--seconds 2.5] [--omp-wait-policy passive]

Measured in one run: steps/s (and clips/s = steps/s x batch) of one train step on a fixed in-memory batch of
full-length 16 kHz clips (default 8 x 2.5 s = 40,000 samples = 25 frames) with random targets in [0, 1]:
- JAX: the end-to-end step unchanged: `parallel.data_parallel(emo18_trainer.make_train_step(model, target), mesh)` with
  `emo18.Emo18(bn_axis_name="data")`, `emo18_trainer.make_target("hume_vb")` (MSE on 10 outputs), `emo18_trainer.TrainState`
  with optax.adam(1e-4), a one-device mesh, the state donated.
- PyTorch: the same architecture written here, NCW as PyTorch prefers: all frames at once as [B*F, 1, 1600] through
  three Conv1d(bias=False) -> BatchNorm1d(eps 1e-5, momentum 0.1) -> LeakyReLU(0.01) -> MaxPool1d blocks (1->64
  k8 p3 pool 10; 64->128 k6 p2 pool 8; 128->256 k6 p2 pool 8), 256 x 2 -> 512 features per frame, nn.LSTM(512,
  256, num_layers=2, batch_first=True), Linear(256, 10) at the last frame, MSE, the standard eager loop
  (zero_grad / backward / torch.optim.Adam(lr 1e-4).step).

Matching: both start from the Flax initialisation (conv kernels [k, in, out] -> [out, in, k]; LSTM gates in torch's
i, f, g, o order, the first layer's input columns permuted from Flax's position-major flattening of [2, 256] to
torch's channel-major one; Flax's LSTM bias as bias_ih, bias_hh = 0). With every clip full length, Emo18's masked
BatchNorm is a plain training-mode BatchNorm and the last valid frame is the last frame, so both compute the same
loss. Checked before timing: equal initial losses (1e-3 relative), finite and decreasing over a few steps for both,
so a broken step is never timed. Then a warm-up (JAX compiles during the checks, before it) and timed blocks of up
to a number of steps, cut short after a few seconds; steps/s is the median over the blocks. A JAX block waits for
its last loss (asynchronous dispatch). JAX, PyTorch and an extra PyTorch with 1 thread are interleaved block by
block, so that a change in background load hits all of them alike.

Threads, as in multitask_speed.py: XLA's CPU pool is sized to the cores of the affinity mask (counted and printed;
no runtime setter); PyTorch gets torch.set_num_threads(len(os.sched_getaffinity(0))). `--omp-wait-policy passive`
makes libgomp's waiting threads sleep instead of spin. The load average is printed at the start and the end: above
the core count, other processes competed for the CPUs and the numbers are not those of a quiet machine.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

# Python puts a script's own folder on sys.path, but not under `python -P` / PYTHONSAFEPATH nor when the file is
# loaded otherwise (runpy, an import from elsewhere): put it first explicitly, so this folder's common.py is found.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

CHECK_STEPS = 5


def random_batch(batch_size, samples, seed=0):
  rng = np.random.default_rng(seed)
  return {"audio": (0.1 * rng.standard_normal((batch_size, samples))).astype(np.float32),
          "length": np.full(batch_size, samples, np.int32),  # all full length: no padded frames
          "labels": rng.uniform(0, 1, (batch_size, 10)).astype(np.float32)}


def make_jax(batch):
  """(initial variables as numpy, replicated initial state, the project's data-parallel step, sharded batch)."""
  import jax
  import optax
  from exvo_jax import parallel
  from exvo_jax.models import emo18
  from exvo_jax import emo18_trainer
  target = emo18_trainer.make_target("hume_vb")
  model = emo18.Emo18(num_outputs=target.num_outputs, bn_axis_name=parallel.DATA_AXIS)
  mesh = parallel.make_mesh(1)
  variables = model.init(jax.random.PRNGKey(0), batch["audio"][:1], batch["length"][:1], train=False)
  state = emo18_trainer.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=optax.adam(1e-4))
  step = parallel.data_parallel(emo18_trainer.make_train_step(model, target), mesh)  # donates the state
  return (jax.tree.map(np.array, variables), parallel.replicate(state, mesh), step,
          parallel.shard_batch(batch, mesh))


def make_torch_model(flax_params):
  import torch
  from torch import nn
  from exvo_jax.models.emo18 import CONV_BLOCKS, FRAME_SAMPLES

  class TorchEmo18(nn.Module):
    def __init__(self):
      super().__init__()
      layers, channels_in = [], 1
      for channels, kernel, padding, pool in CONV_BLOCKS:
        layers += [nn.Conv1d(channels_in, channels, kernel, padding=padding, bias=False),
                   nn.BatchNorm1d(channels, eps=1e-5, momentum=0.1), nn.LeakyReLU(0.01), nn.MaxPool1d(pool)]
        channels_in = channels
      self.encoder = nn.Sequential(*layers)
      self.lstm = nn.LSTM(512, 256, num_layers=2, batch_first=True)
      self.head = nn.Linear(256, 10)

    def forward(self, audio):  # [B, T] with every clip full length
      b, frames = audio.shape[0], audio.shape[1] // FRAME_SAMPLES
      x = self.encoder(audio.reshape(b * frames, 1, FRAME_SAMPLES)).reshape(b, frames, -1)  # [B, F, 256 * 2]
      return self.head(self.lstm(x)[0][:, -1])

  model, enc = TorchEmo18(), flax_params["encoder"]
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
  with torch.no_grad():
    for i in range(len(CONV_BLOCKS)):
      model.encoder[4 * i].weight.copy_(t(enc[f"Conv_{i}"]["kernel"].transpose(2, 1, 0)))
      model.encoder[4 * i + 1].weight.copy_(t(enc[f"MaskedBatchNorm_{i}"]["scale"]))
      model.encoder[4 * i + 1].bias.copy_(t(enc[f"MaskedBatchNorm_{i}"]["bias"]))
    for layer in range(2):
      p = flax_params[f"lstm_{layer}"]
      w_ih = np.concatenate([p[g]["kernel"] for g in ("ii", "if", "ig", "io")], axis=1)  # [in, 4H]
      if layer == 0:  # Flax flattens [2, 256] (position-major), torch [256, 2] (channel-major)
        w_ih = w_ih.reshape(2, 256, -1).transpose(1, 0, 2).reshape(512, -1)
      getattr(model.lstm, f"weight_ih_l{layer}").copy_(t(w_ih.T))
      getattr(model.lstm, f"weight_hh_l{layer}").copy_(
          t(np.concatenate([p[g]["kernel"] for g in ("hi", "hf", "hg", "ho")], axis=1).T))
      bias = np.concatenate([p[g]["bias"] for g in ("hi", "hf", "hg", "ho")])
      getattr(model.lstm, f"bias_ih_l{layer}").copy_(t(bias))
      getattr(model.lstm, f"bias_hh_l{layer}").zero_()
    model.head.weight.copy_(t(flax_params["head"]["kernel"].T))
    model.head.bias.copy_(t(flax_params["head"]["bias"]))
  return model


class JaxRunner:
  def __init__(self, state, step, batch):
    self.state, self.step, self.batch, self.prepare = state, step, batch, lambda: None

  def run(self, steps):
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    return float(metrics["loss"])  # waits for the last step (asynchronous dispatch)


class TorchRunner:
  def __init__(self, flax_params, batch, threads):
    import torch
    self.model = make_torch_model(flax_params)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
    self.audio, self.labels = torch.from_numpy(batch["audio"]), torch.from_numpy(batch["labels"])
    self.threads = threads

  def prepare(self):
    import torch
    torch.set_num_threads(self.threads)  # the N-thread and 1-thread runners alternate in one process

  def run(self, steps):
    import torch.nn.functional as F
    for _ in range(steps):
      self.optimizer.zero_grad()
      loss = F.mse_loss(self.model(self.audio), self.labels)
      loss.backward()
      self.optimizer.step()
    return loss.item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks (a smoke run)")
  parser.add_argument("--batch", type=int, default=8, help="clips per step (default 8)")
  parser.add_argument("--seconds", type=float, default=2.5, help="clip length, a multiple of 0.1 s (default 2.5)")
  parser.add_argument("--omp-wait-policy", choices=("active", "passive"), default=None,
                      help="set OMP_WAIT_POLICY for PyTorch's OpenMP threads (default: unset)")
  args = parser.parse_args()
  samples = round(args.seconds * 16_000)
  if samples <= 0 or samples % 1_600:
    parser.error(f"--seconds {args.seconds}: use a positive multiple of 0.1 s (whole 1,600-sample frames)")
  if args.omp_wait_policy:  # libgomp reads it once, when torch loads it
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
  repeats, max_steps, warmup, block_s = (3, 4, 2, 1.0) if args.quick else (7, 20, 5, 5.0)

  import torch
  threads = common.usable_cores()
  torch.set_num_threads(threads)  # = XLA's intra-op pool
  common.print_environment(threads)
  start_load, total = common.load(), time.perf_counter()

  batch = random_batch(args.batch, samples)
  variables, state, step, jax_batch = make_jax(batch)
  runners = {"jax": JaxRunner(state, step, jax_batch),
             "torch": TorchRunner(variables["params"], batch, threads),
             "torch1": TorchRunner(variables["params"], batch, 1)}
  # Correctness first (JAX compiles in its first step here): same initial loss, finite and decreasing.
  losses = {}
  for name in ("jax", "torch"):
    runners[name].prepare()
    losses[name] = [runners[name].run(1) for _ in range(CHECK_STEPS)]
    assert all(np.isfinite(losses[name])), f"{name}: non-finite loss {losses[name]}"
    assert losses[name][-1] < losses[name][0], f"{name}: loss does not decrease: {losses[name]}"
  assert abs(losses["jax"][0] - losses["torch"][0]) <= 1e-3 * abs(losses["jax"][0]), \
      f"initial losses differ: JAX {losses['jax'][0]} vs PyTorch {losses['torch'][0]}"
  # Warm-up, then interleaved blocks; an Emo18 step is slow, so the time limit is checked after every step (from 2).
  rates, steps = common.interleaved_rates(runners, repeats, max_steps, block_s, warmup=warmup, chunk=1, min_steps=2)
  torch.set_num_threads(threads)
  med = common.medians(rates)

  print(f"## Emo18 train step: batch {args.batch} x {args.seconds:g} s ({samples:,} samples, {samples // 1600} "
        f"frames per clip), median of {repeats} timed blocks after up to {warmup} warm-up steps, {threads} threads\n")
  labels = {"jax": "JAX (end-to-end train step, 1-device mesh)", "torch": f"PyTorch eager, {threads} threads",
            "torch1": "PyTorch eager, 1 thread (extra)"}
  print(common.markdown_table(("implementation", "steps/s", "clips/s", "range steps/s", "median steps per block",
                               "ratio JAX / this"), [
      (labels[n], f"{med[n]:.2f}", f"{med[n] * args.batch:.1f}", f"{min(rates[n]):.2f}-{max(rates[n]):.2f}",
       f"{statistics.median(steps[n]):.0f}", f"{med['jax'] / med[n]:.2f}") for n in runners]))
  print(f"\nA block is {max_steps} steps, or fewer (at least 2) where the steps so far took over {block_s:g} s; "
        "ranges are the slowest and fastest blocks. The 1-thread row is not part of the like-for-like comparison.")
  print(f"\nChecked before timing (same Flax initial weights; loss over {CHECK_STEPS} steps on the fixed batch; "
        f"initial losses equal to 1e-3 relative): JAX {losses['jax'][0]:.4f} -> {losses['jax'][-1]:.4f}, "
        f"PyTorch {losses['torch'][0]:.4f} -> {losses['torch'][-1]:.4f}\n")
  ratio = med["jax"] / med["torch"]
  print(f"**ratio JAX / PyTorch ({threads} threads): {ratio:.2f}. The JAX step is "
        f"{'at least as fast as' if ratio >= 1 else 'SLOWER than'} PyTorch "
        f"({med['jax']:.2f} vs {med['torch']:.2f} steps/s).**\n")
  print(f"total benchmark time {time.perf_counter() - total:.0f} s; load average at start {start_load}, at end "
        f"{common.load()} on {threads} cores (a load above the core count means other processes competed for the "
        "CPUs: the ratio is then less reliable, most of all for multi-threaded PyTorch)")


if __name__ == "__main__":
  main()
