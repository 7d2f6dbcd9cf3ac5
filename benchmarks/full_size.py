"""The release's size on this machine: build a full-size synthetic HUME-VB from scratch and run each stage on it.

Not a test and not run by CI (about an hour on 2 cores). Each stage runs as its own process, the way a user runs it,
and is timed with the peak resident memory of its whole process tree (the sum over the process and its workers,
sampled every 0.2 s) and of its largest single process. The same stages run first on the default demo corpus (1,408
clips), the reference measured in the same run: the ratio columns say how time and memory grow with 42x the clips
(memory should not: it is bounded by batch and buffer sizes, not by the corpus).

Stages:
  generate   the demo generator writes the corpus (wav/, data_info.csv, labels/) with one worker per core
  build      `builders.prepare` writes the TFDS array_record records of the audio (no TensorFlow), from scratch
  describe   `configs/describe.py`: reads every split's metadata and prints the summary (records already built)
  fewshot    `configs/fewshot.py:epochs=1,adaptation=none`: one epoch of the Emo18 base model, its validation
             pass, then the Val and Test prediction passes; `first step` is the time from the process start to
             the first training step done (start-up: reading the split metadata, compiling the step)
  egemaps    eGeMAPS functionals of every clip through openSMILE (one worker per core, into a fresh cache)
  multitask  `configs/multitask.py:egemaps,seeds=1`: one MultiTask seed on the cached features

  python benchmarks/full_size.py --out /tmp/full_size            # both sizes, every stage
  python benchmarks/full_size.py --out /tmp/full_size --sizes release --stages fewshot
  python benchmarks/full_size.py --out /tmp/full_size --table    # print the table of the stages measured so far

Each stage's figures are saved as `<out>/<size>/<stage>.json` as soon as it ends, so a run can be continued stage
by stage (a stage with a saved result is skipped unless `--redo`); `--table` prints what is there.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("generate", "build", "describe", "fewshot", "egemaps", "multitask")
SIZES = ("default", "release")
FIRST_STEP = re.compile(r"^\d+/\d+ steps, ")


def _tree_rss(process):
  """(sum of RSS over the process and its descendants, largest single RSS), in bytes."""
  import psutil  # a dependency of tensorflow-datasets and orbax
  total = largest = 0
  try:
    members = [process] + process.children(recursive=True)
  except psutil.Error:
    return 0, 0
  for member in members:
    try:
      rss = member.memory_info().rss
    except psutil.Error:
      continue
    total += rss
    largest = max(largest, rss)
  return total, largest


def run_stage(command, env, log_path):
  """Runs `command`; returns {seconds, peak_tree_bytes, peak_process_bytes, first_step_s}. Raises on failure."""
  import psutil
  start = time.monotonic()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    handle = psutil.Process(proc.pid)
    peaks = {"tree": 0, "process": 0}
    done = threading.Event()

    def sample():
      while not done.is_set():
        tree, largest = _tree_rss(handle)
        peaks["tree"], peaks["process"] = max(peaks["tree"], tree), max(peaks["process"], largest)
        done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first_step = None
    for line in proc.stdout:
      log.write(line)
      log.flush()  # the log can be followed while the stage runs
      if first_step is None and FIRST_STEP.match(line):
        first_step = time.monotonic() - start
    status = proc.wait()
    done.set()
    sampler.join()
  seconds = time.monotonic() - start
  if status != 0:
    raise RuntimeError(f"{' '.join(command)} exited with {status}; see {log_path}")
  return {"seconds": seconds, "peak_tree_bytes": peaks["tree"], "peak_process_bytes": peaks["process"],
          "first_step_s": first_step}


def _du(path):
  return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def stage_command(stage, size, paths, processes):
  python = sys.executable
  root, tfds_dir = os.fspath(paths["root"]), os.fspath(paths["tfds"])
  data = [f"--config.data.root={root}", f"--config.data.tfds_dir={tfds_dir}"]
  main = [python, "-m", "exvo_jax.main"]
  if stage == "generate":
    return [python, "-m", "exvo_jax.data.demo", root, "--size", size, "--processes", str(processes)]
  if stage == "build":
    code = ("from exvo_jax.data import builders\n"
            f"builders.prepare('hume_vb', {root!r}, config='audio', data_dir={tfds_dir!r}, processes={processes})\n")
    return [python, "-c", code]
  if stage == "describe":
    return main + ["--config=configs/describe.py", f"--workdir={paths['work'] / 'describe'}"] + data
  if stage == "fewshot":
    return main + ["--config=configs/fewshot.py:epochs=1,adaptation=none", f"--workdir={paths['work'] / 'fewshot'}",
                   "--config.log_every_s=60"] + data
  if stage == "egemaps":
    code = ("from exvo_jax.data import builders\n"
            "from exvo_jax.features import tables\n"
            f"b, _ = builders.prepare('hume_vb', {root!r}, config='audio', data_dir={tfds_dir!r})\n"
            "sources = {s: builders.data_source(b, s) for s in ('train', 'validation', 'test')}\n"
            f"cache = builders.cache_dir() / 'features' / builders.corpus_key({root!r})\n"  # where multitask looks
            f"tables.from_audio(sources, 'egemaps', cache, processes={processes}, log=lambda m: print(m, flush=True))\n")
    return [python, "-c", code]
  if stage == "multitask":
    return main + ["--config=configs/multitask.py:egemaps,seeds=1", f"--workdir={paths['work'] / 'multitask'}"] + data
  raise ValueError(stage)


def clips_of(size):
  from exvo_jax.data import demo
  return demo.SIZES[size].num_clips


def measure(size, stages, out, processes, redo):
  base = out / size
  paths = {"root": base / "corpus", "tfds": base / "tfds", "work": base / "runs", "cache": base / "cache"}
  paths["features"] = paths["cache"] / "features"
  base.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "EXVO_CACHE": os.fspath(paths["cache"]), "PYTHONUNBUFFERED": "1"}
  for stage in stages:
    result_path = base / f"{stage}.json"
    if result_path.is_file() and not redo:
      print(f"{size}/{stage}: measured before ({result_path}); --redo measures it again")
      continue
    # From scratch: each stage's own output is removed first (the stages after it reuse it).
    for stage_name, folder in (("generate", paths["root"]), ("build", paths["tfds"]), ("egemaps", paths["features"]),
                               ("describe", paths["work"] / "describe"), ("fewshot", paths["work"] / "fewshot"),
                               ("multitask", paths["work"] / "multitask")):
      if stage == stage_name and folder.exists():
        shutil.rmtree(folder)
    print(f"{size}/{stage}: running (log {base / f'{stage}.log'})", flush=True)
    result = run_stage(stage_command(stage, size, paths, processes), env, base / f"{stage}.log")
    result["clips"] = clips_of(size)
    if stage == "build":
      result["records_bytes"] = _du(paths["tfds"])
    if stage == "generate":
      result["corpus_bytes"] = _du(paths["root"])
    result_path.write_text(json.dumps(result, indent=1))
    print(f"{size}/{stage}: {result['seconds']:.0f} s, peak {result['peak_tree_bytes'] / 2**30:.2f} GiB", flush=True)


def table(out):
  results = {}
  for size in SIZES:
    for stage in STAGES:
      path = out / size / f"{stage}.json"
      if path.is_file():
        results[size, stage] = json.loads(path.read_text())
  gib = lambda b: f"{b / 2**30:.2f}"
  rows = []
  for stage in STAGES:
    full, ref = results.get(("release", stage)), results.get(("default", stage))
    if full is None:
      continue
    ratio = lambda key: f"{full[key] / ref[key]:.1f}x" if ref and ref.get(key) else "-"
    first = f"{full['first_step_s']:.0f}" if full.get("first_step_s") else "-"
    rows.append([stage, f"{full['seconds']:.0f}", ratio("seconds"), f"{full['clips'] / full['seconds']:.1f}",
                 gib(full["peak_tree_bytes"]), gib(full["peak_process_bytes"]), ratio("peak_tree_bytes"), first])
  header = ["stage", "wall s", "vs default", "clips/s", "peak RSS, all processes (GiB)", "largest process (GiB)",
            "vs default", "first step s"]
  print(common.markdown_table(header, rows))
  for size in SIZES:
    build = results.get((size, "build"))
    generate = results.get((size, "generate"))
    if build and generate:
      print(f"{size}: {build['clips']} clips, corpus {generate['corpus_bytes'] / 2**30:.2f} GiB, records "
            f"{build['records_bytes'] / 2**30:.2f} GiB on disk")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for corpora, records, runs, logs")
  parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated demo sizes (default first)")
  parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
  parser.add_argument("--processes", type=int, default=common.usable_cores(), help="workers of the parallel stages")
  parser.add_argument("--redo", action="store_true", help="measure stages that have a saved result again")
  parser.add_argument("--table", action="store_true", help="only print the table of the saved results")
  args = parser.parse_args()
  stages = args.stages.split(",")
  unknown = [s for s in stages if s not in STAGES] + [s for s in args.sizes.split(",") if s not in SIZES]
  if unknown:
    parser.error(f"unknown stage or size {unknown}; stages are {', '.join(STAGES)}, sizes {', '.join(SIZES)}")
  if not args.table:
    print(f"load average at start: {common.load()}", flush=True)
    for size in args.sizes.split(","):
      measure(size, stages, args.out, args.processes, args.redo)
    print(f"load average at end: {common.load()}")
  table(args.out)


if __name__ == "__main__":
  main()
