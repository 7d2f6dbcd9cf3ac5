"""Frozen speech-encoder embeddings of 16 kHz clips: every layer's hidden state pooled over the clip's frames.

Per clip, `[num_hidden_layers + 1, hidden]` (mean over valid frames) or `[num_hidden_layers + 1, 2 * hidden]`
(mean, then standard deviation), float32, the layers in `SpeechEncoder`'s order (the first transformer layer's
input, then each layer's output). The MultiTask and A-VB MLPs take one layer of it, or learn a softmax-weighted sum
over the layers.

Clips are batched by length (sorted, each batch padded to a multiple of `bucket_samples`, so that few shapes are
compiled) and run under `jit` with the sample mask, which makes every clip's embedding what the clip alone gives.
Clips shorter than the encoder's receptive field (400 samples) are zero-padded to it and reported by name.

Each clip is written to `<cache>/<stem>.npy` as its batch finishes, so an interrupted extraction resumes with the
clips it has not done; SIGTERM stops it between batches with `runtime.Preempted`. A multi-process run splits the
clips between its processes (`extract`). The cache folder is named after
the encoder (`encoder_key`: a hash of its config and parameters) and the pooling, so another checkpoint never reads
these files.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from exvo_jax import runtime
from exvo_jax.models import ssl
from exvo_jax.models import ssl_checkpoint

POOLINGS = ("mean", "mean_std")
# The small untrained encoder used when no checkpoint is configured: the path is exercised end to end on the demo
# corpus, with nothing to download. Standard feature encoder (20 ms frames), a narrow 4-layer transformer.
RANDOM_ENCODER = ssl.EncoderConfig(
    model_type="wav2vec2", conv_dim=(64,) * 7, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=192, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """An encoder ready to run: its config, Flax params, a short description and a key naming its cache."""
  config: ssl.EncoderConfig
  params: dict
  description: str
  key: str
  untrained: bool


def encoder_key(config: ssl.EncoderConfig, params) -> str:
  """12 hex digits of a SHA-256 over the config and every parameter's bytes (in path order)."""
  digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
  for path, value in sorted(ssl_checkpoint._flat(params)):  # pylint: disable=protected-access
    digest.update("/".join(path).encode())
    digest.update(np.ascontiguousarray(value, np.float32).tobytes())
  return digest.hexdigest()[:12]


def load_encoder(checkpoint: str, seed: int = 0, log=print) -> Encoder:
  """The encoder of a checkpoint folder, or with `checkpoint` empty the small random one (announced loudly)."""
  if checkpoint:
    loaded = ssl_checkpoint.load(checkpoint, log=log)
    config, params = loaded.config, loaded.params
    description = f"{config.model_type} from {checkpoint}"
    untrained = False
  else:
    config = RANDOM_ENCODER
    variables = ssl.SpeechEncoder(config).init(jax.random.key(seed), jnp.zeros((1, config.receptive_field)))
    params = jax.tree.map(np.asarray, variables["params"])
    description = f"UNTRAINED random {config.model_type} encoder (seed {seed})"
    untrained = True
    log("!" * 100)
    log(f"encoder: no checkpoint configured (--config.encoder.checkpoint): using a small RANDOMLY INITIALISED, "
        f"UNTRAINED encoder ({config.num_hidden_layers} layers of {config.hidden_size}). It only exercises the "
        f"code path; its scores say nothing about pretrained encoders. Point the run at a Hugging Face model folder "
        f"(wav2vec2 / HuBERT / WavLM) to use a real one.")
    log("!" * 100)
  return Encoder(config, params, description, encoder_key(config, params), untrained)


def cache_folder(root, encoder: Encoder, pooling: str) -> pathlib.Path:
  return pathlib.Path(root) / f"ssl-{encoder.key}-{pooling}"


def make_embed_fn(config: ssl.EncoderConfig, pooling: str):
  """A jitted (params, waveform [B, S] float, num_samples [B] int) -> [B, layers + 1, H or 2H] pooled over each
  clip's valid frames."""
  model = ssl.SpeechEncoder(config)

  @jax.jit
  def embed(params, waveform, num_samples):
    sample_mask = jnp.arange(waveform.shape[1])[None, :] < num_samples[:, None]
    if config.normalize_waveform:
      waveform = ssl.normalize_waveform(waveform, sample_mask)
    out = model.apply({"params": params}, waveform, sample_mask)
    mask = out["frame_mask"][:, None, :, None].astype(jnp.float32)  # [B, 1, T, 1]
    hidden = jnp.stack(out["hidden_states"], axis=1)  # [B, L + 1, T, H]
    count = jnp.maximum(jnp.sum(mask, axis=2), 1.0)
    mean = jnp.sum(hidden * mask, axis=2) / count
    if pooling == "mean":
      return mean
    var = jnp.sum(jnp.square(hidden - mean[:, :, None]) * mask, axis=2) / count
    return jnp.concatenate([mean, jnp.sqrt(var)], axis=-1)

  return embed


def _batches(lengths, batch_size, bucket_samples):
  """Index lists of clips of similar length (sorted), and each batch's padded length (a multiple of the bucket)."""
  order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = int(lengths[rows].max())
    yield rows, int(-(-longest // bucket_samples) * bucket_samples)


def save_batch(cache, stems, pooled):
  """Writes each clip's embedding (rows of `pooled` in `stems`' order) to `<cache>/<stem>.npy`."""
  for stem, values in zip(stems, pooled):
    path = cache / f"{stem}.npy"
    temporary = f"{path}.{os.getpid()}.tmp.npy"  # per process: two runs sharing a cache never clash
    np.save(temporary, values)
    os.replace(temporary, path)  # atomic: a cut-off run never leaves half a file under the final name


def _gather(values):
  """[...] per process -> [processes, ...], the same on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(values))


def extract(stems, lengths, read, encoder: Encoder, cache_dir, *, pooling="mean", batch_size=8,
            bucket_samples=16_000, log=print, every_s=10.0):
  """Computes (or loads from the cache) the pooled embeddings of the clips named `stems`.

  In a multi-process run every process calls it with the same clips: each embeds its share of every round of
  batches (`batch_size` clips per process), the rounds' results are gathered to all processes, and process 0
  alone writes the cache. The cache is meant to be shared (as every feature cache is): a clip is embedded unless
  every process finds it there, so with per-host caches every run embeds the clips again.

  Args:
    stems: clip names; each becomes `<cache_dir>/<stem>.npy`.
    lengths: samples per clip (int, in `stems`' order), to batch clips of similar length without decoding them.
    read: stem -> int16 samples [n] at 16 kHz; called only for clips not yet cached, one batch at a time.
    encoder: from `load_encoder`.
    cache_dir: this encoder's and pooling's folder (`cache_folder`).
  Returns:
    ({stem: [layers + 1, H or 2H] float32}, [stems padded to the receptive field]).
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
  cache = pathlib.Path(cache_dir)
  stems, lengths = list(stems), np.asarray(lengths, np.int64)
  field = encoder.config.receptive_field
  short = [stem for stem, n in zip(stems, lengths) if n < field]
  if short:
    log(f"encoder: {len(short)} clip(s) shorter than the encoder's receptive field ({field} samples = "
        f"{field / 16:.0f} ms) are zero-padded to it: {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}")
  processes, me = jax.process_count(), jax.process_index()
  writer = me == 0
  cached = np.array([(cache / f"{stem}.npy").is_file() for stem in stems], np.int32)
  if processes > 1:
    cached = _gather(cached).min(axis=0)
  cached = cached.astype(bool)
  todo = np.flatnonzero(~cached)
  values = {}
  if len(todo):
    if writer:
      cache.mkdir(parents=True, exist_ok=True)
    share = f" (process {me + 1} of {processes}: {batch_size} clips of each round of {batch_size * processes})"
    log(f"encoder: {len(stems) - len(todo)} of {len(stems)} clips cached, embedding {len(todo)} with "
        f"{encoder.description} into {cache}" + (share if processes > 1 else ""))
    embed = make_embed_fn(encoder.config, pooling)
    params = jax.device_put(encoder.params, jax.local_devices()[0])
    todo_lengths = np.maximum(lengths[todo], field)
    start = last = time.monotonic()
    done = embedded = 0
    for rows, padded in _batches(todo_lengths, batch_size * processes, bucket_samples):
      mine = rows[me * batch_size:(me + 1) * batch_size]  # `padded` fits the round's longest clip
      waveform = np.zeros((batch_size, padded), np.float32)  # a fixed batch size: one compile per bucket
      num_samples = np.full(batch_size, field, np.int32)
      for j, row in enumerate(mine):
        samples = np.asarray(read(stems[todo[row]]), np.float32) / 32768.0
        waveform[j, :len(samples)] = samples
        num_samples[j] = max(len(samples), field)  # a short clip's zero padding counts as its samples
      pooled = np.asarray(embed(params, waveform, num_samples))
      embedded += len(mine)
      if processes > 1:
        pooled = _gather(pooled).reshape(-1, *pooled.shape[1:])[:len(rows)]  # process p's rows are its share
      else:
        pooled = pooled[:len(rows)]
      round_stems = [stems[todo[row]] for row in rows]
      values.update(zip(round_stems, pooled))
      if writer:
        save_batch(cache, round_stems, pooled)
      done += len(rows)
      now = time.monotonic()
      if now - last >= every_s or done == len(todo):
        last = now
        rate = done / max(now - start, 1e-9)
        log(f"encoder: {done}/{len(todo)} clips, {rate:.1f} clips/s, ETA {(len(todo) - done) / max(rate, 1e-9):.0f} s"
            + (f" ({embedded} embedded by this process)" if processes > 1 else ""))
      if done < len(todo):
        runtime.preemption.check(lambda: f"embedding stopped after {done} of {len(todo)} clips; they are cached in "
                                 f"{cache} and the rerun embeds the rest")
  for stem in stems:
    if stem not in values:
      values[stem] = np.load(cache / f"{stem}.npy")
  return {stem: values[stem] for stem in stems}, short
