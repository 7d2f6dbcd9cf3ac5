"""Load a user's Hugging Face speech-encoder folder (wav2vec 2.0, HuBERT, WavLM) as Flax parameters.

A folder holds `config.json` and the weights, `model.safetensors` or `pytorch_model.bin` (or a sharded set with its
`*.index.json`), and usually `preprocessor_config.json` (whether clips are normalised). Nothing is downloaded.

- safetensors files are read here, with numpy only (the format is an 8-byte header length, a JSON header of
  name -> dtype, shape, byte offsets, then the raw little-endian data); `.bin` files are PyTorch pickles and need
  torch, which is not a run-time dependency: without it the error says to install it or to convert the folder
  once on a machine that has it (`python -m exvo_jax.models.ssl_checkpoint --to_safetensors FOLDER`).
- The positional convolution's weight norm is stored as `weight_g` / `weight_v` (older files) or as
  `parametrizations.weight.original0` / `original1` (PyTorch's parametrizations, transformers 5.x); both load, and
  so does a plain `weight` (then g = ||weight|| per kernel position).
- Keys of a model with a head (`Wav2Vec2ForCTC`, `...ForSequenceClassification`) carry the prefix `wav2vec2.`,
  `hubert.` or `wavlm.`; the prefix is stripped and the head's own keys are reported as unused.
- Every parameter the config needs must be present with the config's shape; otherwise the error names each key,
  the file and the fix. `masked_spec_embed` (only used by time masking) is initialised when absent, and reported.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import struct
import sys

import jax
import numpy as np

from exvo_jax.models import ssl

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first
BASE_PREFIXES = {"wav2vec2": "wav2vec2.", "hubert": "hubert.", "wavlm": "wavlm."}
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_WEIGHT_NORM_NAMES = {"weight_g": ("weight_g", "parametrizations_weight_original0"),
                      "weight_v": ("weight_v", "parametrizations_weight_original1")}


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be used as it is; the message names the file or key and the fix."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  folder: pathlib.Path
  config: ssl.EncoderConfig
  params: dict  # the Flax parameter tree of ssl.SpeechEncoder, numpy float32
  weights_file: pathlib.Path
  unused_keys: tuple[str, ...]  # in the file, not part of the encoder (a head, a quantiser)
  initialised_keys: tuple[str, ...]  # optional parameters absent from the file, initialised instead


def read_config(folder) -> ssl.EncoderConfig:
  """The architecture from `folder/config.json` (and do_normalize from preprocessor_config.json when present)."""
  folder = pathlib.Path(folder)
  path = folder / CONFIG_FILE
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: no such checkpoint folder; set the encoder's checkpoint to a folder holding "
                          f"{CONFIG_FILE} and the weights (a Hugging Face model folder you downloaded)")
  if not path.is_file():
    raise CheckpointError(f"{path}: missing; a checkpoint folder needs the {CONFIG_FILE} that came with its "
                          f"weights (download it with the weights from the model's Hugging Face page)")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path}: not valid JSON ({error}); download the model's {CONFIG_FILE} again") from None
  return config_from_dict(raw, path, _do_normalize(folder))


def _do_normalize(folder: pathlib.Path) -> bool:
  path = folder / PREPROCESSOR_FILE
  if not path.is_file():
    return True  # the feature extractor's default
  try:
    return bool(json.loads(path.read_text()).get("do_normalize", True))
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path}: not valid JSON ({error}); download it again or delete it (clips are then "
                          f"normalised, the feature extractor's default)") from None


def config_from_dict(raw: dict, source, normalize_waveform: bool = True) -> ssl.EncoderConfig:
  """An EncoderConfig from a parsed config.json; missing keys take transformers' defaults. `source` names the file
  in errors."""
  model_type = raw.get("model_type")
  if model_type not in ssl.SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(ssl.SUPPORTED_MODEL_TYPES)} (wav2vec 2.0, HuBERT, WavLM checkpoints)")
  defaults = ssl.EncoderConfig()
  values = {}
  for field in dataclasses.fields(ssl.EncoderConfig):
    if field.name in ("model_type", "masked_spec_embed", "normalize_waveform"):
      continue
    value = raw.get(field.name, getattr(defaults, field.name))
    values[field.name] = tuple(value) if isinstance(value, list) else value
  masked = float(raw.get("mask_time_prob", 0.05)) > 0 or float(raw.get("mask_feature_prob", 0.0)) > 0
  config = ssl.EncoderConfig(model_type=model_type, masked_spec_embed=masked,
                             normalize_waveform=normalize_waveform, **values)

  def fail(key, problem, fix="use the config.json that came with the weights"):
    raise CheckpointError(f"{source}: {key} {problem}; {fix}")

  for key in ("add_adapter", "conv_pos_batch_norm"):
    if raw.get(key):
      fail(key, "is true, which this encoder does not implement", f"use a checkpoint without it ({key}: false)")
  if config.feat_extract_norm not in ("group", "layer"):
    fail("feat_extract_norm", f"is {config.feat_extract_norm!r}; expected 'group' or 'layer'")
  for key in ("feat_extract_activation", "hidden_act"):
    if getattr(config, key) not in ssl.ACTIVATIONS:
      fail(key, f"is {getattr(config, key)!r}; supported: {', '.join(ssl.ACTIVATIONS)}")
  if not len(config.conv_dim) == len(config.conv_kernel) == len(config.conv_stride):
    fail("conv_dim, conv_kernel, conv_stride", "have different lengths")
  if config.hidden_size % config.num_attention_heads:
    fail("hidden_size", f"{config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}")
  if config.hidden_size % config.num_conv_pos_embedding_groups:
    fail("hidden_size", f"{config.hidden_size} is not a multiple of num_conv_pos_embedding_groups "
                        f"{config.num_conv_pos_embedding_groups}")
  return config


# ---------------------------------------------------------------------------------------------------------- files
def read_safetensors(path) -> dict[str, np.ndarray]:
  """name -> array (read-only view of the file's bytes; bfloat16 as ml_dtypes.bfloat16)."""
  import ml_dtypes  # a dependency of jax

  path = pathlib.Path(path)
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointError(f"{path}: too short to be a safetensors file; download it again")
  (header_size,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8: 8 + header_size])
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise CheckpointError(f"{path}: not a safetensors file (unreadable header); download it again") from None
  dtypes = dict(SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
  arrays, base = {}, 8 + header_size
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in dtypes:
      raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know; "
                            f"save the weights as float32, float16 or bfloat16")
    start, end = entry["data_offsets"]
    dtype = np.dtype(dtypes[entry["dtype"]]).newbyteorder("<")
    if base + end > len(data) or end - start != dtype.itemsize * math.prod(entry["shape"]):
      raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated download?); download it again")
    arrays[name] = np.frombuffer(data, dtype, count=math.prod(entry["shape"]), offset=base + start).reshape(
        entry["shape"])
  return arrays


def write_safetensors(path, arrays: dict[str, np.ndarray]) -> None:
  """Write name -> array as a safetensors file (float32, float16 or integer arrays, C order)."""
  names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for blob in blobs:
      f.write(blob)
  os.replace(temporary, path)  # atomic: an interrupted conversion never leaves a truncated file under the name


def read_torch_bin(path) -> dict[str, np.ndarray]:
  path = pathlib.Path(path)
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path}: a PyTorch pickle, and reading it needs torch, which is not installed. Either pip install torch "
        f"(the CPU build is enough), or convert the folder once on a machine with torch: python -m "
        f"exvo_jax.models.ssl_checkpoint --to_safetensors {path.parent} (writes model.safetensors beside it)") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: tensor.detach().float().numpy() if tensor.is_floating_point() else tensor.numpy()
          for name, tensor in state.items()}


def weight_files(folder) -> list[pathlib.Path]:
  """The weight file(s) of a folder: model.safetensors, else pytorch_model.bin, else the shards of an index."""
  folder = pathlib.Path(folder)
  for name in WEIGHT_FILES:
    if (folder / name).is_file():
      return [folder / name]
    index = folder / f"{name}.index.json"
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError, AttributeError):
        raise CheckpointError(f"{index}: not a shard index (JSON with a 'weight_map'); download it again") from None
      missing = [s for s in shards if not (folder / s).is_file()]
      if missing:
        raise CheckpointError(f"{index}: lists {', '.join(missing)}, not in the folder; download every shard")
      return [folder / s for s in shards]
  raise CheckpointError(f"{folder}: no weights; expected {' or '.join(WEIGHT_FILES)} (or a sharded set with its "
                        f".index.json) beside {CONFIG_FILE}")


def read_weights(folder) -> tuple[dict[str, np.ndarray], list[pathlib.Path]]:
  files = weight_files(folder)
  state = {}
  for path in files:
    state.update(read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path))
  return state, files


# -------------------------------------------------------------------------------------------------------- mapping
def abstract_params(config: ssl.EncoderConfig) -> dict:
  """The encoder's parameter shapes (jax.ShapeDtypeStruct tree), without computing anything."""
  model = ssl.SpeechEncoder(config)
  waveform = jax.ShapeDtypeStruct((1, config.receptive_field), np.float32)
  return jax.eval_shape(model.init, jax.random.key(0), waveform)["params"]


def _flat(tree, prefix=()):
  for name, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _set(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def to_flax(state: dict[str, np.ndarray], config: ssl.EncoderConfig, source: str, seed: int = 0):
  """PyTorch state dict -> (Flax params, unused keys, initialised keys). Raises CheckpointError naming every
  missing key, or the first key whose shape does not match the config."""
  prefix = BASE_PREFIXES[config.model_type]
  if any(k.startswith(prefix) for k in state):  # a model with a head: the encoder's keys carry the prefix
    encoder_keys = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
  else:
    encoder_keys = {k: k for k in state}
  # Underscores for dots on both sides: 'encoder.layers.3.attention.q_proj.weight' and the Flax path
  # ('encoder_layers_3', 'attention', 'q_proj', 'kernel') meet at 'encoder_layers_3_attention_q_proj_weight'.
  by_flat_name = {k.replace(".", "_"): original for k, original in encoder_keys.items()}
  used, missing, initialised, params = set(), [], [], {}

  def take(name):
    key = by_flat_name.get(name)
    if key is not None:
      used.add(key)
      return key, np.asarray(state[key], np.float32)
    return None, None

  for path, spec in _flat(abstract_params(config)):
    module, leaf = "_".join(path[:-1]), path[-1]
    stem = f"{module}_" if module else ""
    if leaf in _WEIGHT_NORM_NAMES:
      key, value = next((r for r in (take(stem + n) for n in _WEIGHT_NORM_NAMES[leaf]) if r[0]), (None, None))
      if key is None:  # a plain weight, without the weight norm's split
        key, value = take(stem + "weight")
        if key is not None:
          value = (np.sqrt(np.sum(np.square(value), axis=(0, 1))) if leaf == "weight_g" else value)
      if value is not None:
        value = value.reshape(-1) if leaf == "weight_g" else value.transpose(2, 1, 0)
    elif leaf == "kernel":
      key, value = take(stem + "weight")
      if value is not None:
        value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
    elif leaf == "scale":
      key, value = take(stem + "weight")
    elif leaf == "rel_attn_embed":
      key, value = take(stem + "rel_attn_embed_weight")
    elif leaf == "gru_rel_pos_const":
      key, value = take(stem + leaf)
      value = None if value is None else value.reshape(-1)
    else:
      key, value = take(stem + leaf)
    torch_name = torch_key(path)
    if value is None:
      if leaf == "masked_spec_embed":
        value = np.random.default_rng(seed).uniform(size=spec.shape).astype(np.float32)
        initialised.append("masked_spec_embed")
      else:
        missing.append(torch_name)
        continue
    elif value.shape != tuple(spec.shape):
      raise CheckpointError(
          f"{source}: {key} has shape {list(np.shape(state[key]))}, but {CONFIG_FILE} makes it "
          f"{_torch_shape(leaf, spec.shape)}; the weights and {CONFIG_FILE} come from different models: use the "
          f"config.json that came with the weights")
    _set(params, path, value)
  if missing:
    raise CheckpointError(
        f"{source}: {len(missing)} parameter(s) the config needs are not in the file: "
        f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; the file is "
        f"incomplete or belongs to another model: use the weights and {CONFIG_FILE} of one checkpoint")
  unused = tuple(sorted(set(state) - used))
  return params, unused, tuple(initialised)


def _torch_shape(leaf, shape):
  if leaf == "weight_g":
    return [1, 1, *shape]
  if leaf == "gru_rel_pos_const":
    return [1, *shape, 1, 1]
  if leaf in ("kernel", "weight_v"):
    return list(reversed(shape)) if len(shape) == 3 else [shape[1], shape[0]]
  return list(shape)


def torch_key(path) -> str:
  """The PyTorch name of a Flax parameter path: ('encoder', 'layers_3', 'attention', 'q_proj', 'kernel') ->
  'encoder.layers.3.attention.q_proj.weight'."""
  modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight", "rel_attn_embed": "rel_attn_embed.weight"}.get(path[-1], path[-1])
  return ".".join(modules + [leaf])


def load(folder, log=print) -> Checkpoint:
  """Read a checkpoint folder; `log` gets one line naming what was read and what was left out."""
  folder = pathlib.Path(folder)
  config = read_config(folder)
  state, files = read_weights(folder)
  source = ", ".join(str(f) for f in files)
  params, unused, initialised = to_flax(state, config, source)
  count = sum(int(np.size(v)) for _, v in _flat(params))
  log(f"encoder: {config.model_type} from {folder} ({count / 1e6:.1f} M parameters, {config.num_hidden_layers} "
      f"layers, {'pre' if config.do_stable_layer_norm else 'post'}-LN, {config.feat_extract_norm}-norm feature "
      f"encoder)")
  if unused:
    log(f"encoder: {len(unused)} key(s) in {source} are not part of the encoder and were not used: "
        f"{', '.join(unused[:12])}{' ...' if len(unused) > 12 else ''}")
  if initialised:
    log(f"encoder: {', '.join(initialised)} not in {source}: initialised (only time masking uses it)")
  return Checkpoint(folder, config, params, files[0], unused, initialised)


def convert_to_safetensors(folder) -> pathlib.Path:
  """Write model.safetensors beside a folder's pytorch_model.bin (needs torch); returns its path."""
  folder = pathlib.Path(folder)
  state, files = read_weights(folder)
  if files[0].suffix == ".safetensors":
    raise CheckpointError(f"{files[0]}: the folder already has safetensors weights; nothing to convert")
  target = folder / "model.safetensors"
  write_safetensors(target, state)
  return target


def check(folder, log=print) -> None:
  """Load a folder and run the encoder on one second of noise: prints what was read and the hidden states' shape."""
  import jax.numpy as jnp
  checkpoint = load(folder, log)
  waveform = np.random.default_rng(0).normal(size=(1, 16_000)).astype(np.float32)
  if checkpoint.config.normalize_waveform:
    waveform = np.asarray(ssl.normalize_waveform(jnp.asarray(waveform)))
  out = ssl.SpeechEncoder(checkpoint.config).apply({"params": checkpoint.params}, jnp.asarray(waveform))
  hidden = out["hidden_states"]
  log(f"encoder: 1 s of audio -> {len(hidden)} hidden states of shape {list(hidden[0].shape[1:])} (frames, width); "
      f"clips {'are' if checkpoint.config.normalize_waveform else 'are not'} normalised (do_normalize)")


USAGE = """usage: python -m exvo_jax.models.ssl_checkpoint --check FOLDER
       python -m exvo_jax.models.ssl_checkpoint --to_safetensors FOLDER
--check loads a Hugging Face model folder and runs the encoder on 1 s of noise; --to_safetensors writes
model.safetensors beside a folder's pytorch_model.bin (needs torch), so that later runs need no torch."""


def main(argv):
  if len(argv) != 3 or argv[1] not in ("--check", "--to_safetensors"):
    print(USAGE, file=sys.stderr)
    return 2
  try:
    if argv[1] == "--check":
      check(argv[2])
    else:
      print(f"wrote {convert_to_safetensors(argv[2])}")
  except CheckpointError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
