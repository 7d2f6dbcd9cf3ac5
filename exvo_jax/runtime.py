"""Staying alive: multi-host start-up, workdir checks, preemption (SIGTERM) and the non-finite loss guard.

A run is distributed when `--coordinator_address/--num_processes/--process_id` are given, or when the
environment says so (Slurm with several tasks, a Cloud TPU pod); then every process calls
`jax.distributed.initialize` before any other JAX call. On CPU the processes talk through gloo.

Preemption: TPU VMs and Slurm send SIGTERM before they reclaim a machine. `Preemption` turns that signal into a
flag. The training loop (`loop.py`) asks `should_stop()` between steps (all processes agree, so they stop at the
same step), saves a checkpoint with the data iterator's position and raises `Preempted`; long passes outside
training (feature extraction, prediction, adaptation, sampling) call `check()` before each unit of work and raise
`Preempted` with what they keep (feature caches, trained checkpoints); `main` prints `preempted: ...` and how to
resume and exits 0, and the rerun redoes only the unfinished pass.
"""

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile

import jax
import numpy as np

# Below this much free space in the workdir a run does not start (checkpoints would fail half-written).
MIN_FREE_BYTES = 200 * 2**20


class Preempted(Exception):
  """SIGTERM arrived: raised by the training loop after it saved a checkpoint, or by a long pass (`Preemption.check`)
  at its next unit of work; `main` prints what was kept and exits 0."""


class NonFiniteLoss(FloatingPointError):
  """Raised when a loss is NaN or Inf; the message names the step and the last good checkpoint."""


def detected_cluster():
  """'slurm', 'tpu_pod' or None: an environment that runs one process per host/task with several of them."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu_pod"
  return None


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Starts JAX's multi-process runtime when the run is distributed; returns a line that says what it did.

  Explicit arguments win; without them Slurm and TPU pods are detected (jax.distributed reads their variables).
  Must run before any other JAX call.
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  cluster = None if explicit else detected_cluster()
  if not explicit and cluster is None:
    return "single process"
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or (explicit and "cpu" in os.environ.get("JAX_PLATFORMS", "")):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    missing = [name for name, v in (("--coordinator_address", coordinator_address),
                                    ("--num_processes", num_processes), ("--process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id; "
                       f"missing {', '.join(missing)}")
    # JAX fills local_device_ids from SLURM_LOCALID under Slurm even with explicit flags; launch/slurm.sbatch sets
    # JAX_LOCAL_DEVICE_IDS to the GPUs each task should drive.
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id,
                               local_device_ids=[int(i) for i in local.split(",")] if local else None)
  else:
    jax.distributed.initialize()
  return (f"process {jax.process_index()} of {jax.process_count()} ({cluster or 'explicit flags'}), "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices")


def process_zero_first(build, what):
  """Runs `build()` on process 0 first, then on the others (which then find its result, e.g. a built dataset).

  Builds that write shared folders (the demo corpus, TFDS records, feature caches) would otherwise race between
  processes, and only process 0 writes shared files. When process 0 is preempted during the build, every process
  raises `Preempted`.
  """
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  result, preempted = None, None
  if jax.process_index() == 0:
    try:
      result = build()
    except Preempted as error:
      preempted = error
  stopped = multihost_utils.broadcast_one_to_all(np.int32(preempted is not None))
  if int(stopped):
    raise preempted or Preempted(f"process 0 was stopped while building {what}")
  return result if jax.process_index() == 0 else build()


def from_process_zero(value):
  """A JSON-able `value` as process 0 has it, on every process (e.g. a file only process 0 reads: the workdir of a
  multi-host run need not be shared). Single-process: `value` itself."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  data = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).decode())


def check_workdir(workdir, min_free_bytes=MIN_FREE_BYTES):
  """Fails at start, with the fix, when `workdir` cannot be created or written or has too little free space (URL
  workdirs are refused earlier, by main).

  Process 0 alone creates and probes it (only process 0 writes shared files); the others stop with it.
  """
  problem = _workdir_problem(workdir, min_free_bytes) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if int(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))) and problem is None:
      problem = f"process 0 cannot use workdir {os.path.abspath(workdir)}; its log says why"
  if problem:
    raise SystemExit(problem)


def _workdir_problem(workdir, min_free_bytes):
  """The reason `workdir` cannot hold a run, with the fix; None when it can."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-check-") as probe:
      probe.write(b"x")
      probe.flush()
  except OSError as error:
    return (f"workdir {os.path.abspath(workdir)} is not writable ({error.strerror or error}); choose another "
            "--workdir or fix its permissions")
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    return (f"workdir {os.path.abspath(workdir)} has {free / 2**20:.0f} MiB free, less than the "
            f"{min_free_bytes / 2**20:.0f} MiB a run needs for its checkpoints; free some space or choose another "
            "--workdir")
  return None


def check_finite(losses, *, step, what, checkpointer):
  """Raises NonFiniteLoss when any value of `losses` (a dict of floats) is NaN or Inf.

  Before raising it waits for the checkpointer's pending (asynchronous) saves and closes it, so the last good
  checkpoint named in the message is complete on disk.
  """
  bad = {k: v for k, v in losses.items() if not np.isfinite(v)}
  if bad:
    checkpointer.close()
    last_good_step = checkpointer.latest_step()
    kept = (f"the last good checkpoint (step {last_good_step}) is kept in {checkpointer.directory}"
            if last_good_step is not None else f"no checkpoint had been saved yet in {checkpointer.directory}")
    raise NonFiniteLoss(f"{what} step {step}: non-finite loss {bad}; stopped, {kept}. Lower the learning rate or "
                        "check the input batch, then rerun with the same --workdir to resume from it")


class Preemption:
  """SIGTERM -> a flag that training loops and long passes poll; install once per process (main does).

  `should_stop()` is collective in multi-process runs (every process must call it at the same step): it stops
  all processes when any of them was signalled. `check(what)` raises `Preempted` at the next unit of work of a
  long pass (a prediction batch, a speaker's adaptation, a clip's features, a batch of samples); inside
  `deferred()` (the training loop's evaluations and actions: the loop saves first) it does nothing.
  """

  def __init__(self):
    self.requested = False
    self._deferred = 0

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    print(f"process {jax.process_index()}: received signal {signum}; stopping at the next step or unit of work",
          file=sys.stderr, flush=True)

  def install(self):
    signal.signal(signal.SIGTERM, self._handler)
    return self

  def should_stop(self):
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))

  def check(self, what, *, local=False):
    """Raises Preempted(`what`) when SIGTERM arrived (on any process; `local`: on this one, for work that only this
    process does). Every process must call it equally often unless `local`."""
    if self._deferred:
      return
    if self.requested if local else self.should_stop():
      raise Preempted(what() if callable(what) else what)

  @contextlib.contextmanager
  def deferred(self):
    """Passes inside do not stop: their caller checks afterwards (and saves first)."""
    self._deferred += 1
    try:
      yield
    finally:
      self._deferred -= 1


# The process's preemption flag; main installs the handler. Loops and long passes poll it.
preemption = Preemption()
