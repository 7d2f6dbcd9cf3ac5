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


def read_events(folder):
  """What the TensorBoard event files in `folder` hold, read with TensorBoard's own reader:
  ({scalar tag: [(step, value)]}, image tags, audio tags)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0,
                                                                                "audio": 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
  return scalars, tags["images"], tags["audio"]


def validation_events(folder, history, metric, loss="loss"):
  """Checks that the run's events in `folder` hold the validation `metric` of every evaluation in `history` (the
  loop's, from metrics.json), the training `loss` and a learning rate; returns the scalars."""
  scalars, _, _ = read_events(folder)
  assert f"val/{metric}" in scalars, (folder, sorted(scalars))
  got = dict(scalars[f"val/{metric}"])
  assert sorted(got) == [h["step"] for h in history], (got, history)
  for entry in history:
    assert abs(got[entry["step"]] - entry[metric]) < 1e-5, (entry, got)
  assert f"train/{loss}" in scalars and any(tag.startswith("learning_rate/") for tag in scalars), sorted(scalars)
  steps = [step for step, _ in scalars[f"train/{loss}"]]
  assert steps == sorted(set(steps)), steps  # once per step: a resumed run purged what the stopped one wrote after
  return scalars


def mixed_audio_folder(folder, corpus_root, file_ids):
  """A folder for `predict`: each clip of `file_ids` (the demo corpus's, 16 kHz mono wav) copied as it is, the
  first also resampled to 44.1 kHz stereo wav and encoded as mp3, an empty wav and a text file.
  Returns {file name: File_ID} of the 16 kHz copies."""
  import shutil  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import scipy.signal  # pylint: disable=import-outside-toplevel
  import soundfile  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True)
  copies = {}
  for file_id in file_ids:
    name = f"{file_id.strip('[]')}.wav"
    shutil.copy(pathlib.Path(corpus_root, "wav", name), folder / name)
    copies[name] = file_id
  first, _ = soundfile.read(folder / next(iter(copies)), dtype="float32")
  high = scipy.signal.resample_poly(first, 441, 160)
  soundfile.write(folder / "stereo_44k.wav", np.stack([high, 0.5 * high], axis=1), 44_100, subtype="PCM_16")
  soundfile.write(folder / "burst.mp3", first, 16_000, format="MP3")
  (folder / "empty.wav").write_bytes(b"")
  (folder / "notes.txt").write_text("not audio\n")
  return copies


def read_predictions(out):
  """(header, {file name: row dict}) of predictions.csv and {file name: (problem, reason)} of skipped.csv."""
  import csv  # pylint: disable=import-outside-toplevel
  with open(pathlib.Path(out, "predictions.csv")) as f:
    reader = csv.DictReader(f)
    rows = {pathlib.Path(r["file"]).name: r for r in reader}
    header = reader.fieldnames
  with open(pathlib.Path(out, "skipped.csv")) as f:
    skipped = {pathlib.Path(r["file"]).name: (r["problem"], r["reason"]) for r in csv.DictReader(f)}
  return header, rows, skipped


def check_mixed_predictions(done, header, rows, skipped, copies, columns):
  """The decodable files of `mixed_audio_folder` are predicted with every column named, the two bad ones skipped
  with their reason (in skipped.csv and the log)."""
  assert header == ["file", *columns], header
  assert set(rows) == {*copies, "stereo_44k.wav", "burst.mp3"}, sorted(rows)
  assert skipped == {"empty.wav": ("empty_audio", "audio file is empty (0 bytes)"),
                     "notes.txt": ("unreadable_audio", skipped["notes.txt"][1])}, skipped
  assert "not a readable audio file" in skipped["notes.txt"][1]
  assert "skipped" in done.stdout and "empty.wav" in done.stdout and "notes.txt" in done.stdout
