"""openSMILE features of 16 kHz clips through the `opensmile` package, parallel and cached per clip.

Feature sets (the ExVo baselines'): `compare` = ComParE_2016 functionals (6,373 dims), `egemaps` = eGeMAPSv02
functionals (88), and `compare_lld` = ComParE_2016 low-level descriptors with deltas (130 per 10 ms frame), the
input of the bag-of-audio-words. DeepSpectrum is not extracted here (it needs ImageNet CNN weights, which are not
available offline): read it from the release's `feats/DeepSpectrum`.

Each clip's features are written to `<cache>/<stem>.npy` as soon as they are computed, so an interrupted extraction
resumes with the clips it has not done yet. SIGTERM stops it before the next clip (the clips in flight finish) with
`runtime.Preempted`.
"""

import concurrent.futures
import multiprocessing
import os
import pathlib
import time

import signal

import numpy as np

from exvo_jax import cores
from exvo_jax import runtime

FEATURE_SETS = {
    # name: (opensmile FeatureSet name, FeatureLevel name)
    "compare": ("ComParE_2016", "Functionals"),
    "egemaps": ("eGeMAPSv02", "Functionals"),
    "compare_lld": ("ComParE_2016", "LowLevelDescriptors_Deltas"),
}
DIMS = {"compare": 6373, "egemaps": 88, "compare_lld": 130}


def make_smile(feature_set):
  """An `opensmile.Smile` for one of FEATURE_SETS."""
  import opensmile  # imported here: workers and callers that only read caches do not need it
  set_name, level_name = FEATURE_SETS[feature_set]
  return opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, set_name),
                         feature_level=getattr(opensmile.FeatureLevel, level_name))


def int16_to_float(samples):
  """int16 [n] -> float32 [n] in [-1, 1), the scaling audio readers (and openSMILE's own) apply to 16-bit PCM."""
  return np.asarray(samples, np.float32) / 32768.0


def compute(smile, samples, sample_rate=16_000):
  """Features of one clip: [D] for functionals, [frames, D] for low-level descriptors (float32)."""
  frame = smile.process_signal(int16_to_float(samples), sample_rate)
  values = frame.to_numpy(dtype=np.float32)
  return values[0] if smile.feature_level.name == "Functionals" else values


_WORKER_SMILE = None


def _init_worker(feature_set, ignore_sigterm=False):
  global _WORKER_SMILE
  if ignore_sigterm:  # the parent decides when to stop (Slurm signals the whole job): in-flight clips finish
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  _WORKER_SMILE = make_smile(feature_set)


def _work(job):
  stem, samples, path = job
  values = compute(_WORKER_SMILE, samples)
  tmp = f"{path}.tmp.npy"
  np.save(tmp, values)
  os.replace(tmp, path)  # atomic: a cut-off run never leaves half a file under the final name
  return stem


class CachedFeatures:
  """A sequence of clips' features read from their cache files on access: a split's frame-level descriptors
  (about 4 GB of ComParE LLDs at the release's size) need not fit in memory."""

  def __init__(self, paths):
    self.paths = [os.fspath(p) for p in paths]

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    return np.load(self.paths[index])

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def num_frames(self, index):
    """Rows of clip `index`, read from the file's header only."""
    return np.load(self.paths[index], mmap_mode="r").shape[0]


def extract(stems, read, feature_set, cache_dir, *, processes=None, log=print, every_s=10.0, load=True):
  """Computes (or loads from the cache) the features of the clips named `stems`.

  Args:
    stems: clip names (file names without extension); each becomes `<cache_dir>/<stem>.npy`.
    read: stem -> int16 samples [n] at 16 kHz; called only for clips not yet in the cache, a few at a time, so
      a large corpus is never held in memory.
    feature_set: key of FEATURE_SETS.
    cache_dir: the cache folder of this feature set and corpus.
    processes: worker processes (default: the machine's cores); 1 computes in this process.
    log: progress sink (clips/s, ETA); None for silence.
    load: return the features (True) or the paths of their cache files (False), for callers that read them one
      clip at a time (`CachedFeatures`).
  Returns:
    {stem: features} (or {stem: path}) for every stem.
  """
  cache = pathlib.Path(cache_dir)
  stems = list(stems)
  todo = [stem for stem in stems if not (cache / f"{stem}.npy").is_file()]
  if todo:  # only then: a process that finds every clip cached writes nothing
    cache.mkdir(parents=True, exist_ok=True)
  if log and todo:
    log(f"{feature_set}: {len(stems) - len(todo)} of {len(stems)} clips cached, extracting {len(todo)} into {cache}")
  processes = processes or cores.usable()
  jobs = ((stem, read(stem), os.fspath(cache / f"{stem}.npy")) for stem in todo)
  start = last = time.monotonic()

  def report(done):
    nonlocal last
    now = time.monotonic()
    if log and (now - last >= every_s or done == len(todo)):
      last = now
      rate = done / max(now - start, 1e-9)
      log(f"{feature_set}: {done}/{len(todo)} clips, {rate:.1f} clips/s, "
          f"ETA {(len(todo) - done) / max(rate, 1e-9):.0f} s")

  def stop_if_asked(done):
    runtime.preemption.check(lambda: f"{feature_set} extraction stopped after {done} of {len(todo)} clips; they are "
                             f"cached in {cache} and the rerun extracts the rest", local=True)

  if todo and processes == 1:
    _init_worker(feature_set)
    for done, job in enumerate(jobs, start=1):
      _work(job)
      report(done)
      if done < len(todo):
        stop_if_asked(done)
  elif todo:
    # spawn, not fork: the parent may hold JAX's threads, which a fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                                                initargs=(feature_set, True)) as pool:
      pending, done = set(), 0
      for job in jobs:
        if runtime.preemption.requested:
          for future in concurrent.futures.as_completed(pending):  # the clips in flight are kept
            future.result()
            done += 1
          stop_if_asked(done)
        pending.add(pool.submit(_work, job))
        if len(pending) >= 4 * processes:  # a bounded window of clips in flight
          finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
          for future in finished:
            future.result()
            done += 1
            report(done)
      for future in concurrent.futures.as_completed(pending):
        future.result()
        done += 1
        report(done)
  if not load:
    return {stem: cache / f"{stem}.npy" for stem in stems}
  return {stem: np.load(cache / f"{stem}.npy") for stem in stems}
