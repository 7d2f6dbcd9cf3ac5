"""Scale-out and staying alive: 2 processes = 1 process, SIGTERM mid-epoch and resume, corrupt checkpoint
fallback, the NaN guard, the workdir check, and the launch scripts' syntax."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import fewshot as fewshot_config
from exvo_jax import end_to_end
from exvo_jax import checkpoint
from exvo_jax import parallel
from exvo_jax import runtime
from exvo_jax.data import builders
from exvo_jax.data import corpus
from exvo_jax.data import pipeline
from exvo_jax.models import emo18

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = "configs/fewshot.py:smoke"


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _main(workdir, *flags, devices=1, timeout=600):
  command = [sys.executable, "-m", "exvo_jax.main", f"--config={SMOKE}", f"--workdir={workdir}", *flags]
  done = subprocess.run(command, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


def _latest_state(workdir):
  """{path: array} of the newest checkpoint in workdir/checkpoints/base/latest (read without a target)."""
  latest = workdir / "checkpoints" / "base" / "latest"
  step = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(latest / str(step) / "state").item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  tree = checkpointer.restore(latest / str(step) / "state", target)
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_state(a, b, atol=1e-6):
  assert a[0] == b[0]
  assert a[1].keys() == b[1].keys()
  for key in a[1]:
    np.testing.assert_allclose(a[1][key], b[1][key], atol=atol, rtol=1e-5, err_msg=key)


def _results(workdir):
  return json.loads((workdir / "metrics.json").read_text())["results"]


def test_two_processes_match_one_process(tmp_path):
  """launch/local.sh with 2 CPU processes (1 device each) vs 1 process with 2 devices: the same global batches,
  so the same parameters and metrics."""
  one = tmp_path / "one"
  _main(one, devices=2)
  two = tmp_path / "two"
  env = dict(_env(1), NUM_PROCESSES="2", DEVICES_PER_PROCESS="1", CONFIG=SMOKE, WORKDIR=str(two),
             PYTHON=sys.executable)
  done = subprocess.run(["bash", "launch/local.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  logs = "".join(p.read_text()[-2000:] for p in sorted((two / "logs").glob("*.log"))) if (two / "logs").exists() else ""
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
  assert "process 1 of 2" in (two / "logs" / "process_1.log").read_text()
  _assert_same_state(_latest_state(one), _latest_state(two))
  r1, r2 = _results(one), _results(two)
  assert r1.keys() == r2.keys()
  for mode in r1:
    assert r1[mode] == pytest.approx(r2[mode], abs=1e-5)
  # Only process 0 writes the outputs.
  assert (two / "metrics.json").exists() and len(list(two.glob("ExVo-Few_*.csv"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Preemption.

LONG = ("--config.num_epochs=2", "--config.batch_size=2", "--config.log_every_s=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _main(workdir, *LONG)
  return workdir


def _run_until_sigterm(workdir, after_step):
  """Starts the run, sends SIGTERM once its progress line passed `after_step`; returns its stdout."""
  command = [sys.executable, "-m", "exvo_jax.main", f"--config={SMOKE}", f"--workdir={workdir}", *LONG]
  process = subprocess.Popen(command, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  lines = []
  try:
    for line in process.stdout:
      lines.append(line)
      words = line.split()
      if words and "/" in words[0] and words[1:2] == ["steps,"] and int(words[0].split("/")[0]) >= after_step:
        process.send_signal(signal.SIGTERM)
        break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 0, "".join(lines)[-3000:]
  finally:
    if process.poll() is None:
      process.kill()
  return "".join(lines)


@pytest.mark.parametrize("corrupt", [False, True])
def test_sigterm_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path, uninterrupted, corrupt):
  """SIGTERM in the middle of epoch 2: a checkpoint with the iterator position is saved and the run exits 0; the
  rerun resumes at the next batch and ends with the uninterrupted run's parameters. With `corrupt`, the
  mid-epoch checkpoint is damaged before the rerun: it falls back to the end of epoch 1 with a warning, and
  still ends the same (the run is deterministic)."""
  steps_per_epoch = len(uninterrupted_train_clips()) // 2
  out = _run_until_sigterm(tmp_path, after_step=steps_per_epoch + 3)
  assert "preempted: base model saved at epoch 2, step" in out, out[-3000:]
  saved = max(int(p.name) for p in (tmp_path / "checkpoints" / "base" / "latest").iterdir())
  assert steps_per_epoch < saved < 2 * steps_per_epoch  # mid-epoch
  if corrupt:
    for path in (tmp_path / "checkpoints" / "base" / "latest" / str(saved) / "state").rglob("*"):
      if path.is_file() and "metadata" not in path.name and path.stat().st_size:
        path.write_bytes(b"\0" * 3)
  resumed = _main(tmp_path, *LONG)
  if corrupt:
    assert f"checkpoint step {saved}" in resumed and f"falling back to step {steps_per_epoch}" in resumed
    assert "resumed after epoch 1\n" in resumed  # from the end of epoch 1, not mid-epoch
  else:
    assert f"resumed after epoch 1, step {saved - steps_per_epoch} of epoch 2" in resumed
  _assert_same_state(_latest_state(uninterrupted), _latest_state(tmp_path))
  expected = _results(uninterrupted)
  for mode, scores in _results(tmp_path).items():
    assert scores == pytest.approx(expected[mode], abs=1e-6)


def uninterrupted_train_clips():
  config = fewshot_config.get_config("smoke")
  root = corpus.locate("", dataset="hume_vb", demo_size=config.data.demo_size, demo_seed=0)
  builder, _ = builders.prepare("hume_vb", root, config="audio")
  return builders.data_source(builder, "train")


# ---------------------------------------------------------------------------------------------------------------
# Guards.

class _PoisonAfter:
  """A split's records; from access number `after` on, the audio of every record read is NaN."""

  def __init__(self, source, after):
    self.source, self.after, self.reads = source, after, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads += 1
    record = dict(self.source[i])
    if self.reads > self.after:
      record["audio"] = np.full(record["audio"].shape, np.nan)
    return record


def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config = fewshot_config.get_config("smoke")
  config.num_epochs, config.batch_size = 3, 4
  root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
  builder, _ = builders.prepare("hume_vb", root, config="audio")
  target = end_to_end.make_target("hume_vb")
  splits = {s: end_to_end.Split.read(builders.data_source(builder, s), target) for s in ("train", "validation")}
  steps_per_epoch = len(splits["train"].source) // config.batch_size
  # Reads: 1 for the initial shapes, then epoch 1's batches; the NaN comes in the 3rd batch of epoch 2.
  splits["train"].source = _PoisonAfter(splits["train"].source, after=1 + (steps_per_epoch + 2) * 4)
  model = emo18.Emo18(num_outputs=10, hidden=config.hidden, bn_axis_name=parallel.DATA_AXIS)
  mesh = parallel.make_mesh(1)
  with pytest.raises(runtime.NonFiniteLoss) as error:
    end_to_end.train_base(config, model, target, splits, mesh, str(tmp_path), log=lambda *_: None)
  message = str(error.value)
  # grain reads a little ahead, so the poisoned batch is the 3rd of epoch 2 or one of the two before it.
  step = int(message.split(" step ")[1].split(":")[0])
  assert message.startswith("base model epoch 2 step") and steps_per_epoch < step <= steps_per_epoch + 3
  assert f"last good checkpoint (step {steps_per_epoch})" in message and str(tmp_path) in message
  # The last good checkpoint is intact: it restores, finite, at the end of epoch 1.
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints" / "base", best_metric="mean_ccc")
  sample = splits["train"].batch([0], pipeline.AudioOptions())
  variables = model.init(jax.random.PRNGKey(0), sample["audio"], sample["length"], train=False)
  abstract = jax.eval_shape(lambda: end_to_end.TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=optax.adam(config.learning_rate)))
  step, state, extra = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == steps_per_epoch and extra["epoch"] == 1
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))


def test_unwritable_or_full_workdir_fails_at_start(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(SystemExit, match="not writable"):
    runtime.check_workdir(str(blocked / "run"))
  with pytest.raises(SystemExit, match="MiB free"):
    runtime.check_workdir(str(tmp_path / "run"), min_free_bytes=2**62)
  runtime.check_workdir(str(tmp_path / "run"))
  assert not os.listdir(tmp_path / "run")  # the probe file is gone
  done = subprocess.run([sys.executable, "-m", "exvo_jax.main", f"--config={SMOKE}",
                         f"--workdir={blocked / 'run'}"], cwd=REPO, env=_env(1), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0 and "is not writable" in done.stderr and "Traceback" not in done.stderr


def test_cluster_detection(monkeypatch):
  for name in ("SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert runtime.detected_cluster() is None
  assert runtime.initialize() == "single process"  # nothing given, nothing detected: no distributed start-up
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_PROCID", "1")
  assert runtime.detected_cluster() == "slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert runtime.detected_cluster() == "tpu_pod"
  with pytest.raises(ValueError, match="missing --num_processes, --process_id"):
    runtime.initialize(coordinator_address="127.0.0.1:1234")


LAUNCH = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", LAUNCH)
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
  done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (.ci/run installs it from Debian's packages)")
  done = subprocess.run(["shellcheck", script], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout
