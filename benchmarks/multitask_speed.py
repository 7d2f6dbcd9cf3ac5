"""Speed of the ExVo-MultiTask pipeline on CPU: openSMILE extraction and the MLP train step (JAX vs PyTorch).

Usage:
  pip install torch==2.13.0     # the reference only; not a dependency of exvo_jax (not in setup.py)
  python benchmarks/multitask_speed.py [--quick] [--clips N] [--omp-wait-policy passive]

What is measured, all in one run so that the ratios compare like with like:

1. Feature extraction: clips/s of `exvo_jax.features.opensmile.extract` for the `compare` (ComParE_2016
   functionals, 6,373 dims) and `egemaps` (eGeMAPSv02 functionals, 88 dims) sets with 1 and 2 processes, on N
   synthetic 16 kHz int16 clips of about 2 s (harmonic bursts with a moving pitch, an envelope and noise). Every
   measurement writes to a fresh temporary cache folder, so nothing is read back from a cache. With more than one
   process, `extract` starts a `spawn` process pool per call, and that start-up (interpreter, numpy and opensmile
   imports, openSMILE configuration in every worker, pool shut-down) is part of the measured time. The same
   start-up is also timed on its own (the same pool on no-op jobs) and subtracted, giving an estimate of the
   steady-state throughput; it is labelled as an estimate in the output.

2. MLP train step: steps/s of one Adam step (lr 1e-3) of `exvo_jax.models.mlp.MultiTaskMLP` with the task's loss
   (`mlp_trainer.losses` + `mlp_trainer.total_loss`: MSE emotions + MSE age + cross-entropy country, summed), as a
   plain single-device `jax.jit` with the train state donated, against the same network written here in PyTorch
   and trained with the standard eager loop (zero_grad / backward / torch.optim.Adam.step). Both start from the
   same weights (the Flax initialisation, copied into the torch modules) and train on the same fixed random batch,
   which stays in memory: only the step is timed, no input pipeline. Before timing, each configuration is checked:
   both implementations give the same initial loss (same network, same loss) and a finite, decreasing loss over a
   few steps, so a broken step is never timed. Then a warm-up (which includes JAX's compilation) and timed blocks
   of up to 200 steps (cut short once a block has taken ~2 s, so that a slow case cannot stretch the run); steps/s
   is the median over 5 blocks. JAX's blocks end by waiting for their last loss (dispatch is asynchronous). The
   blocks of JAX, PyTorch and an extra PyTorch with 1 thread are interleaved, so that a change in background load
   hits all of them alike.

Threads: XLA's CPU backend runs its operations on its own intra-op thread pool (Eigen), sized to the cores this
process may run on (the scheduler affinity mask); it has no runtime setter. PyTorch's intra-op pool (OpenMP) is
therefore set to the same number with `torch.set_num_threads(len(os.sched_getaffinity(0)))`; the two never run at
the same time. libgomp's threads spin while waiting for each other, which costs a great deal when other
processes compete for the same cores: the extra 1-thread column shows how much, and `--omp-wait-policy passive`
(OMP_WAIT_POLICY=PASSIVE, set before torch is imported) makes waiting threads sleep instead. The load average is
printed at the start and at the end: above the core count, the numbers are not those of a quiet machine.

Only the standard library, numpy and `common.py` (shared with emo18_speed.py; it imports no more) are imported at
module level: the `spawn` workers of the extraction re-import this file as their main module, and heavier imports
here would be counted as pool start-up.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import numpy as np

# Python puts a script's own folder on sys.path, but not under `python -P` / PYTHONSAFEPATH nor when the file is
# loaded otherwise (runpy, an import from elsewhere): put it first explicitly, so this folder's common.py is found.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

SAMPLE_RATE = 16_000
FEATURE_SETS = ("compare", "egemaps")
PROCESSES = (1, 2)
MLP_DIMS = (6373, 88)
MLP_BATCHES = (8, 256)
CHECK_STEPS = 10
CHUNK = 5  # steps per run() call in a timed block, and the fewest steps a block has


def _opensmile_version():
  """The opensmile package's version, for the environment table (this benchmark's extra dependency)."""
  import opensmile
  return opensmile.__version__


# ---------------------------------------------------------------------------------------------------------------
# 1. Feature extraction.

def synthetic_clips(n, seed=0):
  """{stem: int16 samples}: n burst-like clips of 1.8-2.2 s (harmonics of a gliding f0, envelope, noise)."""
  rng = np.random.default_rng(seed)
  clips = {}
  for i in range(n):
    length = int(SAMPLE_RATE * rng.uniform(1.8, 2.2))
    t = np.arange(length) / SAMPLE_RATE
    f0 = rng.uniform(120, 400) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.sin(np.pi * t / t[-1]) ** 2
    signal = envelope * voiced + 0.05 * rng.standard_normal(length)
    clips[f"clip{i:04d}"] = np.round(signal / np.abs(signal).max() * 0.7 * 32767).astype(np.int16)
  return clips


def time_extract(clips, feature_set, processes):
  from exvo_jax.features import opensmile as smile_features
  with tempfile.TemporaryDirectory(prefix="exvo_bench_") as cache:  # fresh: nothing cached
    start = time.perf_counter()
    out = smile_features.extract(list(clips), clips.__getitem__, feature_set, cache, processes=processes, log=None)
    elapsed = time.perf_counter() - start
  dims = smile_features.DIMS[feature_set]
  assert len(out) == len(clips) and all(v.shape == (dims,) and np.isfinite(v).all() for v in out.values()), \
      f"{feature_set}: unexpected features"
  return elapsed


def time_pool_startup(feature_set, processes):
  """Seconds for what `extract` pays per call besides the clips: the same spawn pool, started, initialised on
  every worker and shut down, around one no-op job per worker (all workers are spawned: jobs submitted together
  find no idle worker, and the shut-down joins every worker, so each one's start-up is inside the time)."""
  from exvo_jax.features import opensmile as smile_features
  start = time.perf_counter()
  with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=smile_features._init_worker,
                                              initargs=(feature_set,)) as pool:
    for future in [pool.submit(os.getpid) for _ in range(processes)]:
      future.result()
  return time.perf_counter() - start


def benchmark_extraction(num_clips, repeats):
  from exvo_jax.features import opensmile as smile_features
  clips = synthetic_clips(num_clips)
  seconds = sum(len(v) for v in clips.values()) / SAMPLE_RATE
  # Import opensmile and load each configuration once in this process, so the 1-process rows do not pay the
  # one-off Python import (the workers of the 2-process rows do pay it: it is part of their start-up).
  for feature_set in FEATURE_SETS:
    smile_features.make_smile(feature_set)
  # Repeats outermost, cells interleaved: a change in the machine's background load hits every cell alike.
  walls = {(f, p): [] for f in FEATURE_SETS for p in PROCESSES}
  startups = {(f, p): [] for f in FEATURE_SETS for p in PROCESSES if p > 1}
  for _ in range(repeats):
    for feature_set in FEATURE_SETS:
      for processes in PROCESSES:
        walls[feature_set, processes].append(time_extract(clips, feature_set, processes))
        if processes > 1:
          startups[feature_set, processes].append(time_pool_startup(feature_set, processes))
  rows = []
  for feature_set in FEATURE_SETS:
    base = num_clips / statistics.median(walls[feature_set, 1])
    for processes in PROCESSES:
      elapsed = statistics.median(walls[feature_set, processes])
      rate = num_clips / elapsed
      if processes > 1:
        startup = statistics.median(startups[feature_set, processes])
        steady = num_clips / (elapsed - startup) if elapsed > startup else float("nan")
        extra = (f"{startup:.2f}", f"{steady:.1f}", f"{steady / base:.2f}x")
      else:
        extra = ("-", f"{rate:.1f}", "1.00x")
      rows.append((feature_set, processes, f"{elapsed:.2f}", f"{rate:.1f}", f"{rate / base:.2f}x", *extra))
  print(f"## 1. openSMILE feature extraction: {num_clips} synthetic clips ({seconds:.0f} s of 16 kHz int16 audio, "
        f"~2 s each), median of {repeats}\n")
  print(common.markdown_table(("feature set", "processes", "wall s", "clips/s", "speed-up vs 1 process",
                               "pool start-up s (timed apart)", "clips/s excl. start-up (estimate)",
                               "speed-up excl. start-up (estimate)"), rows))
  print("\nclips/s and wall s include everything one `extract` call does. With 2 processes that includes the spawn "
        "pool's start-up (new interpreters importing numpy and opensmile, the openSMILE configuration loaded in "
        "each worker) and its shut-down; with 1 process, loading the configuration. Writing each clip's .npy to "
        "the fresh cache and reading it back are in both. The 'excl. start-up' columns subtract the pool start-up "
        "timed apart (same pool, no-op jobs): an estimate, not a measurement.\n")


# ---------------------------------------------------------------------------------------------------------------
# 2. MLP train step.

def random_batch(dim, batch_size, seed=0):
  """A fully labelled batch (every age and country known), so the masked JAX losses equal plain MSE / CE."""
  rng = np.random.default_rng(seed)
  return {
      "features": rng.standard_normal((batch_size, dim)).astype(np.float32),  # as after standardisation
      "emotions": rng.uniform(0, 1, (batch_size, 10)).astype(np.float32),
      "age": rng.uniform(18, 60, batch_size).astype(np.float32),  # years
      "country": rng.integers(0, 4, batch_size).astype(np.int32),
  }


def make_jax(dim, seed=0):
  """(init_state, step): the task's loss in a plain single-device jitted Adam step that donates the state."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state
  from exvo_jax import mlp_trainer
  from exvo_jax.models import mlp
  from exvo_jax.tasks import multitask

  model = mlp.MultiTaskMLP()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim), jnp.float32))["params"]

  def init_state():
    # A fresh copy each time: the step donates (deletes) the buffers of the state it is given.
    return train_state.TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.array, params),
                                         tx=optax.adam(1e-3))

  def train_step(state, batch):
    def loss_fn(p):
      outputs = model.apply({"params": p}, batch["features"])
      return mlp_trainer.total_loss(mlp_trainer.losses(outputs, batch, multitask.EXVO_TARGETS))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  return params, init_state, jax.jit(train_step, donate_argnums=0)


def make_torch_model(dim, flax_params):
  """The same network in PyTorch, with the Flax weights copied in (Dense kernels [in, out] -> weight [out, in])."""
  import torch
  from torch import nn

  class TorchMultiTaskMLP(nn.Module):
    def __init__(self):
      super().__init__()
      # eps 1e-6: Flax LayerNorm's default (torch's is 1e-5); same network means same normalisation.
      self.dense0, self.norm0 = nn.Linear(dim, 128), nn.LayerNorm(128, eps=1e-6)
      self.dense1, self.norm1 = nn.Linear(128, 64), nn.LayerNorm(64, eps=1e-6)
      self.act = nn.LeakyReLU(0.01)
      self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.01), nn.Linear(32, k))
                                  for name, k in (("emotions", 10), ("age", 1), ("country", 4))})

    def forward(self, x):
      h = self.act(self.norm0(self.dense0(x)))
      h = self.act(self.norm1(self.dense1(h)))
      return {"emotions": torch.sigmoid(self.heads["emotions"](h)), "age": self.heads["age"](h)[..., 0],
              "country": self.heads["country"](h)}

  model = TorchMultiTaskMLP()
  pairs = {"dense0": "Dense_0", "norm0": "LayerNorm_0", "dense1": "Dense_1", "norm1": "LayerNorm_1"}
  for name in ("emotions", "age", "country"):
    pairs[f"heads.{name}.0"] = f"{name}_hidden"
    pairs[f"heads.{name}.2"] = f"{name}_out"
  with torch.no_grad():
    for torch_name, flax_name in pairs.items():
      module, p = model.get_submodule(torch_name), flax_params[flax_name]
      weight = np.asarray(p["kernel"]).T if "kernel" in p else np.asarray(p["scale"])
      module.weight.copy_(torch.from_numpy(np.array(weight)))  # np.array: a writable copy of the JAX buffer
      module.bias.copy_(torch.from_numpy(np.array(p["bias"])))
  return model


def make_torch(dim, flax_params):
  """(init, step): a fresh model + Adam, and the standard eager step returning the loss (a 0-d tensor)."""
  import torch
  import torch.nn.functional as F

  def init():
    model = make_torch_model(dim, flax_params)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)

  def loss_fn(outputs, batch):
    return (F.mse_loss(outputs["emotions"], batch["emotions"]) + F.mse_loss(outputs["age"], batch["age"])
            + F.cross_entropy(outputs["country"], batch["country"]))

  def step(model, optimizer, batch):
    optimizer.zero_grad()
    loss = loss_fn(model(batch["features"]), batch)
    loss.backward()
    optimizer.step()
    return loss

  return init, step


def check_losses(name, losses):
  assert all(np.isfinite(losses)), f"{name}: non-finite loss {losses}"
  assert losses[-1] < losses[0], f"{name}: loss does not decrease over {len(losses)} steps: {losses}"


class JaxRunner:
  def __init__(self, init_state, step, batch):
    self.state, self.step, self.batch = init_state(), step, batch

  def prepare(self):
    pass

  def run(self, steps):
    """Runs `steps` steps; returns the last loss, waiting for it (JAX dispatches asynchronously)."""
    for _ in range(steps):
      self.state, loss = self.step(self.state, self.batch)
    return float(loss)  # blocks until ready


class TorchRunner:
  def __init__(self, init, step, batch, threads):
    (self.model, self.optimizer), self.step, self.batch, self.threads = init(), step, batch, threads

  def prepare(self):
    import torch
    torch.set_num_threads(self.threads)  # the 2-thread and 1-thread runners alternate in one process

  def run(self, steps):
    """Runs `steps` steps; returns the last loss (eager CPU: every step has finished when step() returns)."""
    for _ in range(steps):
      loss = self.step(self.model, self.optimizer, self.batch)
    return loss.detach().item()


def benchmark_mlp(repeats, max_steps, warmup, block_s, threads):
  import jax
  import torch
  rows, checks = [], []
  for dim in MLP_DIMS:
    for batch_size in MLP_BATCHES:
      batch = random_batch(dim, batch_size)
      jax_batch = jax.device_put(batch)
      torch_batch = {k: torch.from_numpy(v.astype(np.int64) if k == "country" else v) for k, v in batch.items()}
      params, jax_init, jax_step = make_jax(dim)
      torch_init, torch_step = make_torch(dim, params)

      # Correctness first: the same initial loss (same network and loss), then finite and decreasing for both.
      jax_check, torch_check = JaxRunner(jax_init, jax_step, jax_batch), TorchRunner(torch_init, torch_step,
                                                                                      torch_batch, threads)
      jax_check.prepare(), torch_check.prepare()
      jax_losses = [jax_check.run(1) for _ in range(CHECK_STEPS)]
      torch_losses = [torch_check.run(1) for _ in range(CHECK_STEPS)]
      del jax_check, torch_check
      check_losses(f"JAX D={dim} B={batch_size}", jax_losses)
      check_losses(f"PyTorch D={dim} B={batch_size}", torch_losses)
      assert abs(jax_losses[0] - torch_losses[0]) <= 1e-4 * abs(jax_losses[0]), \
          f"D={dim} B={batch_size}: initial losses differ: JAX {jax_losses[0]} vs PyTorch {torch_losses[0]}"
      checks.append((dim, batch_size, f"{jax_losses[0]:.3f} -> {jax_losses[-1]:.3f}",
                     f"{torch_losses[0]:.3f} -> {torch_losses[-1]:.3f}"))

      runners = {"jax": JaxRunner(jax_init, jax_step, jax_batch),
                 "torch": TorchRunner(torch_init, torch_step, torch_batch, threads),
                 "torch1": TorchRunner(torch_init, torch_step, torch_batch, 1)}
      # JAX's compilation is in its first step: kept out of the warm-up blocks (up to `warmup` steps each).
      runners["jax"].run(1)
      rates, steps = common.interleaved_rates(runners, repeats, max_steps, block_s, warmup=warmup, chunk=CHUNK)
      torch.set_num_threads(threads)
      med = common.medians(rates)
      rows.append((dim, batch_size, f"{med['jax']:,.0f}", f"{med['torch']:,.0f}", f"{med['jax'] / med['torch']:.2f}",
                   f"{statistics.median(steps['jax']):.0f} / {statistics.median(steps['torch']):.0f}",
                   f"{min(rates['jax']):,.0f}-{max(rates['jax']):,.0f}",
                   f"{min(rates['torch']):,.0f}-{max(rates['torch']):,.0f}", f"{med['torch1']:,.0f}",
                   f"{med['jax'] / med['torch1']:.2f}"))
      print(f"  measured D={dim} B={batch_size}", file=sys.stderr, flush=True)

  print(f"## 2. MultiTaskMLP train step (Adam lr 1e-3, summed MSE + MSE + CE): median of {repeats} timed blocks "
        f"after up to {warmup} warm-up steps, {threads} threads for both\n")
  print(common.markdown_table(("D", "batch", "JAX steps/s", "PyTorch steps/s", "ratio JAX/PyTorch",
                               "median steps per block JAX / PyTorch", "JAX range", "PyTorch range",
                               "PyTorch 1 thread steps/s (extra)",
                               "ratio JAX/PyTorch 1 thread"), rows))
  print(f"\nA block is {max_steps} steps, or fewer (at least {CHUNK}) where the steps so far took over "
        f"{block_s:g} s; ranges are the slowest and fastest blocks. The extra 'PyTorch 1 thread' columns are the "
        "same eager loop with torch.set_num_threads(1), timed in the same interleaved blocks (not part of the "
        "like-for-like comparison).")
  print(f"\nChecked before timing (same Flax initial weights in both; loss over {CHECK_STEPS} steps on the "
        "fixed batch; initial losses equal to 1e-4 relative):\n")
  print(common.markdown_table(("D", "batch", "JAX loss", "PyTorch loss"), checks))
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer clips, repeats and steps (a smoke run)")
  parser.add_argument("--clips", type=int, default=None, help="clips per extraction (default 64, --quick 16)")
  parser.add_argument("--omp-wait-policy", choices=("active", "passive"), default=None,
                      help="set OMP_WAIT_POLICY for PyTorch's OpenMP threads (default: leave it unset, libgomp's "
                      "spin-then-sleep); 'passive' avoids spin-waiting when other processes share the cores")
  args = parser.parse_args()
  if args.omp_wait_policy:
    # libgomp reads it once, when torch loads it: it must be in the environment before `import torch`.
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
  num_clips = args.clips or (16 if args.quick else 64)
  extract_repeats, repeats, steps, warmup, block_s = (1, 3, 50, 10, 0.5) if args.quick else (3, 5, 200, 50, 2.0)

  import torch
  threads = common.usable_cores()
  torch.set_num_threads(threads)  # = XLA's intra-op pool (see the module docstring)
  common.print_environment(threads, extra_rows=[("opensmile", _opensmile_version())])
  start_load = common.load()
  total = time.perf_counter()
  benchmark_extraction(num_clips, extract_repeats)
  benchmark_mlp(repeats, steps, warmup, block_s, threads)
  print(f"total benchmark time {time.perf_counter() - total:.0f} s; load average at start {start_load}, at end "
        f"{common.load()} on {common.usable_cores()} cores (a load above the core count means other processes "
        "competed for the CPUs: the ratios are then less reliable, most of all for multi-threaded PyTorch)")


if __name__ == "__main__":
  main()
