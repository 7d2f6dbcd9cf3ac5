"""Bag-of-audio-words over frame-level descriptors, as openXBOW computes it for the ExVo baselines.

1. Frames: ComParE_2016 low-level descriptors with deltas (130 per 10 ms frame), standardised with the mean and
   standard deviation of the TRAINING clips' frames.
2. Codebook: N words (125 ... 2000) drawn at random from the training frames ("random sampling"), optionally
   refined by k-means (Lloyd iterations). Learned on training clips only.
3. Assignment: each frame goes to its `num_assignments` nearest words (squared Euclidean distance).
4. Histogram per clip: how many frames each word received (summing to frames x num_assignments), then the
   logarithmic term frequency log(1 + count) (openXBOW's `-log` weighting has this form; the base only rescales).

Distances and assignment are jit-compiled JAX; frames go through in fixed-size chunks so one compilation serves
every clip length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from exvo_jax import runtime

CHUNK_FRAMES = 4096  # frames per assignment call: a fixed shape, compiled once


@dataclasses.dataclass
class Codebook:
  """What a run saves to reuse the representation: frame statistics and the words.

  Attributes:
    mean, std: [D] standardisation of the frame descriptors (training frames).
    words: [N, D] code words in the standardised space.
    num_assignments: words each frame is assigned to.
  """
  mean: np.ndarray
  std: np.ndarray
  words: np.ndarray
  num_assignments: int = 1

  def save(self, path):
    np.savez(path, mean=self.mean, std=self.std, words=self.words, num_assignments=self.num_assignments)

  @classmethod
  def load(cls, path):
    data = np.load(path)
    return cls(data["mean"], data["std"], data["words"], int(data["num_assignments"]))


def squared_distances(frames, words):
  """[T, D], [N, D] -> [T, N] squared Euclidean distances (expanded form, clipped at 0 against rounding)."""
  cross = jnp.matmul(frames, words.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(frames ** 2, axis=1, keepdims=True) - 2.0 * cross + jnp.sum(words ** 2, axis=1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="num_assignments")
def assign(frames, words, num_assignments=1):
  """[T, D] frames -> [T, num_assignments] indices of their nearest words, nearest first."""
  _, indices = jax.lax.top_k(-squared_distances(frames, words), num_assignments)
  return indices


@jax.jit
def _kmeans_step(frames, words):
  nearest = jnp.argmin(squared_distances(frames, words), axis=1)
  one_hot = jax.nn.one_hot(nearest, words.shape[0], dtype=frames.dtype)
  counts = one_hot.sum(0)
  sums = one_hot.T @ frames
  # A word that attracts no frame keeps its position instead of collapsing to the origin.
  return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], words)


def frame_stats(clip_frames):
  """Mean and std [D] over all frames of the (training) clips; a constant descriptor gets std 1.

  Two passes in float64 over `clip_frames` (a sequence of [T_i, D] arrays, possibly read from disk on access), one
  clip in memory at a time: the frames of a full-size corpus (about 4 GB of ComParE LLDs) are never concatenated.
  """
  total, count = None, 0
  for frames in clip_frames:
    part = np.asarray(frames, np.float64).sum(0)
    total = part if total is None else total + part
    count += frames.shape[0]
  mean = total / count
  squares = sum(((np.asarray(frames, np.float64) - mean) ** 2).sum(0) for frames in clip_frames)
  std = np.sqrt(squares / count)
  return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


def _gather(clip_frames, lengths, indices):
  """Rows `indices` of the frames of all clips as if concatenated ([len(indices), D]), reading each clip once."""
  starts = np.concatenate([[0], np.cumsum(lengths)])
  owner = np.searchsorted(starts, indices, side="right") - 1
  rows = None
  for clip in np.unique(owner):
    mine = np.flatnonzero(owner == clip)
    frames = np.asarray(clip_frames[int(clip)])
    if rows is None:
      rows = np.empty((len(indices), frames.shape[1]), frames.dtype)
    rows[mine] = frames[indices[mine] - starts[clip]]
  return rows


def learn_codebook(train_clip_frames, num_words, *, seed=0, kmeans_iterations=0, num_assignments=1,
                   max_kmeans_frames=200_000):
  """Learns the codebook from the training clips' frames.

  Args:
    train_clip_frames: sequence of [T_i, D] descriptor arrays, one per TRAINING clip (a list, or a sequence that
      reads them from disk on access: only the drawn frames are gathered, never all of them).
    num_words: codebook size N.
    seed: which frames are drawn as initial words (and the k-means subsample).
    kmeans_iterations: Lloyd refinements after random sampling (0 = openXBOW's random sampling alone).
    num_assignments: stored with the codebook for `histograms`.
  """
  mean, std = frame_stats(train_clip_frames)
  lengths = np.array([_num_frames(train_clip_frames, i) for i in range(len(train_clip_frames))])
  total = int(lengths.sum())
  rng = np.random.default_rng(seed)
  if total < num_words:
    raise ValueError(f"{total} training frames cannot seed {num_words} words; use a smaller codebook")
  words = (_gather(train_clip_frames, lengths, rng.choice(total, num_words, replace=False)) - mean) / std
  if kmeans_iterations:
    drawn = np.arange(total) if total <= max_kmeans_frames else rng.choice(total, max_kmeans_frames, replace=False)
    subset = (_gather(train_clip_frames, lengths, drawn) - mean) / std
    words_j, subset_j = jnp.asarray(words), jnp.asarray(subset)
    for _ in range(kmeans_iterations):
      words_j = _kmeans_step(subset_j, words_j)
    words = np.asarray(words_j)
  return Codebook(mean, std, words.astype(np.float32), num_assignments)


def _num_frames(clip_frames, index):
  """Frames of clip `index`; sequences read from disk can answer from the file header (`num_frames`)."""
  if hasattr(clip_frames, "num_frames"):
    return clip_frames.num_frames(index)
  return np.shape(clip_frames[index])[0]


def counts(frames, codebook):
  """[T, D] raw descriptors of one clip -> [N] word counts (sum = T x num_assignments)."""
  return histograms([frames], codebook, log_weighting=False)[0]


def histograms(clip_frames, codebook, *, log_weighting=True, group_frames=64 * CHUNK_FRAMES):
  """Bag-of-audio-words of many clips: sequence of [T_i, D] -> [num_clips, N] float32.

  Clips go through in groups of about `group_frames` frames (read on access when `clip_frames` reads from disk), so
  memory does not grow with the corpus; each group's frames are standardised, assigned in fixed-size chunks (one
  compiled shape), and counted per clip.
  """
  num_words = codebook.words.shape[0]
  words = jnp.asarray(codebook.words)
  result = np.zeros((len(clip_frames), num_words), np.float64)
  first = 0
  while first < len(clip_frames):
    runtime.preemption.check(f"bag-of-audio-words stopped at clip {first + 1} of {len(clip_frames)} (the rerun "
                             "counts again from the cached descriptors)", local=True)
    group, size = [], 0
    while first + len(group) < len(clip_frames) and (not group or size < group_frames):
      group.append(np.asarray(clip_frames[first + len(group)]))
      size += group[-1].shape[0]
    lengths = np.array([f.shape[0] for f in group])
    frames = (np.concatenate(group, axis=0) - codebook.mean) / codebook.std if lengths.sum() else \
        np.zeros((0, codebook.words.shape[1]), np.float32)
    owner = first + np.repeat(np.arange(len(group)), lengths)
    for start in range(0, frames.shape[0], CHUNK_FRAMES):
      chunk = frames[start:start + CHUNK_FRAMES]
      padded = np.zeros((CHUNK_FRAMES, frames.shape[1]), np.float32)
      padded[:chunk.shape[0]] = chunk
      nearest = np.asarray(assign(jnp.asarray(padded), words, codebook.num_assignments))[:chunk.shape[0]]
      np.add.at(result, (np.repeat(owner[start:start + chunk.shape[0]], codebook.num_assignments),
                         nearest.reshape(-1)), 1.0)
    first += len(group)
  if log_weighting:
    result = np.log1p(result)
  return result.astype(np.float32)
