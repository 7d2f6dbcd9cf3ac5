"""The one way tests run `python -m exvo_jax.main` in a subprocess: every task's smoke run, resumes, typos."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def main_env(devices=None, env=None):
  """The environment of a main run: the test session's, on CPU, unbuffered, `devices` virtual CPU devices."""
  result = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  if devices is not None:
    result["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return result


def main_command(config, workdir, *flags, sigterm_at=None):
  """The command line of a main run; `sigterm_at=("module:function", n)`: a real SIGTERM at that function's n-th
  call (tests/sigterm_main.py)."""
  start = [sys.executable, "-m", "exvo_jax.main"] if sigterm_at is None else [
      sys.executable, str(REPO / "tests" / "sigterm_main.py"), sigterm_at[0], str(sigterm_at[1])]
  return [*start, f"--config={config}", f"--workdir={workdir}", *flags]


def run_main(config, workdir, *flags, devices=None, env=None, timeout=900, check=True, sigterm_at=None):
  """Runs main to its end; with `check`, fails the test (showing both streams' ends) unless it exits 0."""
  done = subprocess.run(main_command(config, workdir, *flags, sigterm_at=sigterm_at), cwd=REPO,
                        env=main_env(devices, env), capture_output=True, text=True, timeout=timeout)
  if check:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done
