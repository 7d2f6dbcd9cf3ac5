"""Data parallelism: a one-axis device mesh and a pmap-style step under `jax.shard_map`.

A training step is written once, per device, in the familiar pmap style: it sees
its shard of the batch, calls `jax.lax.pmean(grads, DATA_AXIS)` itself and pmean's
its metrics. `data_parallel` turns it into a jitted function over a mesh whose
single axis is named `DATA_AXIS`:

  mesh = make_mesh()
  step = data_parallel(train_step, mesh)           # train_step(state, batch)
  state = replicate(state, mesh)
  state, metrics = step(state, shard_batch(batch, mesh))

Randomness: an rng passed to the step is replicated, i.e. every device sees the
same key. Per-device randomness (dropout) must fold in the device's position:
`rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))`.

Multi-host: `make_mesh` spans the global devices of all processes; each process
loads its own slice of the global batch and hands it to `global_batch_from_local`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from exvo_jax import runtime

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A one-axis mesh named `DATA_AXIS` over all global devices, or the first `num_devices`.

  The axis is `AxisType.Auto` (not the Explicit default of `jax.make_mesh`): with
  Explicit axes, jit refuses inputs whose sharding differs from `in_specs`
  instead of resharding them, and the pmap-style step needs none of its typing.
  """
  devices = jax.devices()  # Global: every process's devices, for multi-host meshes.
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={num_devices} but there are {len(devices)} devices.")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def _check_divisible(tree: Any, n: int, what: str) -> None:
  """Raises ValueError unless every leaf of `tree` has a leading dim divisible by `n`."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = np.shape(leaf)
    if not shape or shape[0] % n:
      raise ValueError(
          f"{what}{jax.tree_util.keystr(path)} has shape {shape}: its leading (batch) "
          f"dim must be divisible by the {n} devices of the '{DATA_AXIS}' mesh axis.")


def data_parallel(
    step_fn: Callable[..., Any],
    mesh: Mesh,
    *,
    batch_argnums: Sequence[int] = (1,),
    donate_argnums: Sequence[int] = (0,),
    out_specs: Any = P(),
) -> Callable[..., Any]:
  """Runs a pmap-style per-device `step_fn` on every device of `mesh`, jitted.

  Positional arguments listed in `batch_argnums` are split along their leading
  axis (`P(DATA_AXIS)`): a global batch of shape [B, ...] arrives in `step_fn`
  as [B // num_devices, ...], so B must be divisible by the number of devices
  (checked before the call, with a ValueError naming the offending leaf). Every
  other argument (state, rng, ...) is replicated (`P()`). Outputs are
  replicated by default (`out_specs=P()`), which is a promise, not a check:
  `step_fn` must make them equal on all devices (pmean its grads and metrics).

  `step_fn` runs with `check_vma=False`, i.e. with pmap semantics: the gradient
  of a replicated parameter is the per-device one, so the step's own pmean
  averages it. (With `check_vma=True`, autodiff already psums that gradient
  across devices, and a pmean in the step would leave it num_devices too large.)

  Arguments in `donate_argnums` (the state, by default) are donated: their
  buffers are reused for the outputs and deleted, so don't use them after the
  call. Donation only takes effect for inputs already placed as replicated on
  `mesh` (see `replicate`). Only positional arguments are supported.

  Args:
    step_fn: per-device function, e.g. `(state, batch) -> (state, metrics)`.
    mesh: a mesh with a `DATA_AXIS` axis, from `make_mesh`.
    batch_argnums: positions of the arguments to shard on their leading axis.
    donate_argnums: positions of the arguments to donate.
    out_specs: PartitionSpec tree prefix of the outputs.

  Returns:
    A jitted function with the signature of `step_fn` over global arrays; its
    `.jitted` attribute is the underlying `jax.jit` object (for `.lower`).
  """
  batch_argnums = tuple(batch_argnums)
  num_devices = mesh.shape[DATA_AXIS]

  def sharded(*args):
    in_specs = tuple(P(DATA_AXIS) if i in batch_argnums else P() for i in range(len(args)))
    return jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)

  jitted = jax.jit(sharded, donate_argnums=tuple(donate_argnums))

  @functools.wraps(step_fn)
  def wrapped(*args):
    for i in batch_argnums:
      _check_divisible(args[i], num_devices, f"argument {i}")
    return jitted(*args)

  wrapped.jitted = jitted
  wrapped.mesh = mesh
  return wrapped


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a copy of every leaf of `tree` on every device of `mesh` (`P()`)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Splits every leaf [B, ...] of a (single-process) global batch over `DATA_AXIS`.

  B must be divisible by the number of devices. For multi-host, use
  `global_batch_from_local`.
  """
  _check_divisible(batch, mesh.shape[DATA_AXIS], "batch")
  return jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles a global batch from each process's slice of it (multi-host).

  Every process calls this with its own leaves of shape [B_local, ...]; the
  result is a global array [B_local * num_processes, ...] sharded over
  `DATA_AXIS`. B_local must be divisible by the number of local devices. With
  one process it is equivalent to `shard_batch`.
  """
  num_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if not num_local:
    raise ValueError(f"The mesh has no devices of process {jax.process_index()}.")
  _check_divisible(local_batch, num_local, "local batch")
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathered across processes in a multi-process run)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def predict_all(predict: Callable[[Any], Any], num_records: int, mesh: Mesh, *, batch_size: int,
                make_batches: Callable[[int, int, int], Any], fields: Sequence[str],
                outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Runs `predict` over every record of a split, each process on its own shard; all outputs on every process.

  Args:
    predict: `global batch -> dict of [B, ...] arrays` (sharded over `DATA_AXIS`).
    num_records: records in the split.
    mesh: the data-parallel mesh.
    batch_size: global batch; divisible by the number of processes.
    make_batches: `(shard_index, shard_count, local_batch) -> iterable of evaluation batches` of that shard
      (`record shard_index + k * shard_count` is row k of the shard), padded with `valid=False` rows.
    fields: the batch fields `predict` takes.
    outputs: keys of `predict`'s result to return; None: all of them.
  SIGTERM stops the pass before its next batch (`runtime.Preempted`).
  Returns:
    {key: numpy array}, rows in record order.
  """
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"evaluation batch {batch_size} is not divisible by the {count} processes")
  local = batch_size // count
  collected, valid, records = {}, [], []
  num_batches = -(-num_records // batch_size)
  for step, batch in enumerate(make_batches(index, count, local)):
    runtime.preemption.check(f"prediction pass stopped at batch {step + 1} of {num_batches} (it starts over on the "
                             "rerun; trained models are kept)")
    result = to_host({k: v for k, v in predict(global_batch_from_local(
        {f: batch[f] for f in fields}, mesh)).items() if outputs is None or k in outputs})
    for k, v in result.items():
      collected.setdefault(k, []).append(v)
    flags = np.asarray(batch["valid"])
    if count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      flags = np.asarray(multihost_utils.process_allgather(flags, tiled=True))
    valid.append(flags)
    rows = step * local + np.arange(local)  # rows of each process's shard, process-major in the global batch
    records.append((rows[None, :] * count + np.arange(count)[:, None]).reshape(-1))
  valid, records = np.concatenate(valid), np.concatenate(records)
  order = np.argsort(records[valid], kind="stable")
  result = {k: np.concatenate(v)[valid][order] for k, v in collected.items()}
  if len(order) != num_records:
    raise RuntimeError(f"prediction covered {len(order)} of {num_records} records")
  return result
