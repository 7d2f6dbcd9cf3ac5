"""Defaults shared by every task config, and the parser for `:variant` arguments.

A config file is `configs/<task>.py` with `get_config(arg=None)`; the part after ':' on the command line
(`--config=configs/fewshot.py:smoke,hidden=64`) reaches it as `arg` and is read with `parse_arg`.
"""

import ml_collections


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_arg(arg, **defaults):
  """'smoke,hidden=64' -> ConfigDict(smoke=True, hidden=64, <other defaults>).

  Every key must be declared in `defaults` (a typo fails loudly); values take the type of their default, a
  bare name sets a boolean to True, and a boolean takes only true/1/yes or false/0/no (any case).
  """
  result = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config variant {name!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[name]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"config variant {name!r} needs a value ({name}=...)")
      result[name] = True
    elif isinstance(default, bool):
      if value.lower() not in TRUE + FALSE:
        raise ValueError(f"config variant {name}={value!r} is not a boolean; use {'/'.join(TRUE)} or "
                         f"{'/'.join(FALSE)}")
      result[name] = value.lower() in TRUE
    else:
      result[name] = type(default)(value) if default is not None else value
  return result


def get_config():
  """The shared defaults; task configs start from this and override what they need."""
  config = ml_collections.ConfigDict()
  config.task = ""
  config.seed = 0
  config.num_devices = 0  # devices of the data-parallel mesh; 0 = all
  # A stage (base model, seed, GAN...) whose checkpoints in the workdir were made with another configuration stops
  # the run, naming the keys; True deletes those checkpoints and trains the changed stages afresh.
  config.restart_changed = False

  config.data = ml_collections.ConfigDict()
  # Corpus folder. Empty: $EXVO_DATA, and if that is unset too, the demo corpus built in the cache folder.
  config.data.root = ""
  config.data.dataset = "hume_vb"  # or 'emogator'
  config.data.demo_size = "default"  # demo corpus size when no root is given: tiny, small, default, release
  config.data.demo_seed = 0
  config.data.demo_layout = "exvo"  # the demo corpus's folders: exvo (wav/) or avb (audio/wav/, the A-VB release)
  config.data.tfds_dir = ""  # where built array_record files go; empty: a per-corpus folder in the cache
  config.data.strict = False  # any reported bad input fails the run instead of skipping the clip
  config.data.workers = 0  # grain worker processes

  config.log = ml_collections.ConfigDict()
  config.log.tensorboard = True  # event files under <workdir>/tensorboard/ (`tensorboard --logdir runs/`)
  config.log.wandb = False  # also log to Weights & Biases (needs `pip install wandb` and a login)
  config.log.wandb_project = "exvo_jax"
  return config


def encoder_config():
  """The speech encoder of the `ssl` feature set (frozen embeddings; exvo_jax/features/ssl_embeddings.py)."""
  encoder = ml_collections.ConfigDict()
  # A Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin) of wav2vec2, HuBERT or
  # WavLM. Empty: a small randomly initialised encoder, untrained: it exercises the path, it is not a result.
  encoder.checkpoint = ""
  # Which hidden state the MLP reads: 'weighted' (a learned softmax-weighted sum over every layer, the standard
  # frozen-encoder recipe), 'last', or a layer number (0 = the first transformer layer's input, i = layer i's output;
  # for pre-LN models the last one is before the final LayerNorm, as transformers 5.x's hidden_states[-1]).
  encoder.layer = "weighted"
  encoder.pooling = "mean"  # over a clip's frames: 'mean', or 'mean_std' (mean, then standard deviation)
  encoder.batch_size = 8  # clips per extraction batch
  encoder.seed = 0  # initialisation of the random encoder (no checkpoint)
  return encoder


def ssl_finetune_config():
  """How a speech encoder is fine-tuned end to end (`model=ssl`; exvo_jax/ssl_trainer.py says what each key does).
  The encoder itself is `config.encoder` (checkpoint, layer; pooling and batch_size are the feature set's)."""
  ssl = ml_collections.ConfigDict()
  ssl.freeze = "feature_encoder"  # 'none', 'feature_encoder' (the usual recipe) or 'encoder' (train pooling + head)
  ssl.encoder_learning_rate = 5e-5  # the pooling and head take the task's learning_rate
  ssl.layer_decay = 1.0  # layer-wise rates: layer i of L at encoder_learning_rate * layer_decay^(L - i)
  ssl.warmup_steps = 0
  ssl.mask_time_prob = 0.05  # time masking as in pre-training (transformers' fine-tuning default); 0: off
  ssl.chain = False  # a classifier chain over the regression outputs, teacher-forced in training
  ssl.loss = "mse"  # 'mse', 'ccc' (1 - mean CCC of the batch) or 'mse+ccc'
  ssl.dtype = "float32"  # or 'bfloat16' compute
  ssl.remat = False  # recompute each transformer layer in the backward pass
  ssl.pooling_hidden = 128  # attention pooling's scoring width
  return ssl
