"""Fine-tuning a speech encoder (wav2vec 2.0, HuBERT, WavLM) end to end on any target, through the one loop.

The model is `models/speech_model.SpeechModel`: the encoder of `config.encoder.checkpoint` (or, with none, the small
random one of the frozen-embedding feature set, announced as untrained), the layer `config.encoder.layer`, attention
pooling and a linear head (or a classifier chain). It has Emo18's call signature and outputs, so it trains with the
raw-audio trainer `emo18_trainer.train_base` (batches, evaluation, best epoch, checkpoints, resume, SIGTERM) given
this module's state and step, and FewShot personalises it like Emo18.

`config.ssl` says how it trains:
  freeze                'feature_encoder' (default: the CNN is not trained, the usual recipe), 'none', or 'encoder'
                        (only the pooling and the head train: a frozen encoder's embeddings)
  encoder_learning_rate Adam's rate for the encoder; the pooling and head take the task's `learning_rate`
  layer_decay           layer-wise rates: transformer layer i of L takes encoder_learning_rate * decay^(L - i), the
                        feature encoder, projection and positional convolution decay^L (1.0: one rate)
  warmup_steps          linear warm-up of every rate from 0
  mask_time_prob        time masking as in pre-training (spans of the checkpoint's mask_time_length frames, each
                        frame starting one with probability mask_time_prob / mask_time_length), in training only;
                        0 turns it off. transformers also forces mask_time_min_masks (2) spans per clip, which on
                        1-3 s bursts masks far more than this share; this sampler has no such minimum
  chain                 a classifier chain over the outputs (regression targets), teacher-forced in training
  loss                  'mse', 'ccc' (1 - the mean CCC of the global batch, its moments summed over the devices)
                        or 'mse+ccc' for regressions (`targets.LOSSES`)
  dtype                 compute type, 'float32' or 'bfloat16' (parameters stay float32)
  remat                 recompute each transformer layer in the backward pass (less memory, more time)
  pooling_hidden        width of the attention pooling's scoring layer
Learned uncertainty weighting across tasks (Kendall et al., as the MLP's) is the task's `uncertainty_weighting`.

Randomness (dropout, time masks) is a function of the seed, the step and the device, so a resumed run takes the
uninterrupted run's steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from exvo_jax import config_check
from exvo_jax import emo18_trainer
from exvo_jax import mlp_trainer
from exvo_jax import parallel
from exvo_jax import stages
from exvo_jax import targets
from exvo_jax.data import pipeline
from exvo_jax.features import ssl_embeddings
from exvo_jax.models import speech_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_config(config, target):
  """Fails before any work: the encoder's settings (its checkpoint's config.json read, not its weights) and the
  fine-tuning keys, for `target` (a Target or Joint)."""
  encoder = mlp_trainer.check_encoder(config)
  s = config.ssl
  config_check.choice(config, "ssl.freeze", speech_model.FREEZE)
  config_check.choice(config, "ssl.loss", targets.LOSSES)
  config_check.choice(config, "ssl.dtype", tuple(DTYPES))
  problems = []
  if not 0 < s.layer_decay <= 1:
    problems.append(f"--config.ssl.layer_decay={s.layer_decay}: expected a value in (0, 1] (1: one rate)")
  if s.encoder_learning_rate < 0 or s.warmup_steps < 0 or s.pooling_hidden < 1:
    problems.append("--config.ssl.encoder_learning_rate and warmup_steps must be >= 0, pooling_hidden >= 1")
  if not 0 <= s.mask_time_prob < 1:
    problems.append(f"--config.ssl.mask_time_prob={s.mask_time_prob}: expected a share in [0, 1)")
  if s.mask_time_prob > 0 and s.freeze != "encoder" and not encoder.masked_spec_embed:
    problems.append("--config.ssl.mask_time_prob > 0 needs the checkpoint's masked_spec_embed, which its config.json "
                    "has none of (mask_time_prob and mask_feature_prob 0): set --config.ssl.mask_time_prob=0")
  members = target.members if isinstance(target, targets.Joint) else (target,)
  if s.chain and any(t.kind != targets.REGRESSION or t.scalar for t in members):
    problems.append(f"--config.ssl.chain=True chains regression outputs; {target.name} has a classification or a "
                    "scalar: leave chain off or choose regression tasks")
  if s.loss != "mse" and not any(t.kind == targets.REGRESSION for t in members):
    problems.append(f"--config.ssl.loss={s.loss}: {target.name} has no regression to take a CCC loss (a "
                    "classification trains on cross-entropy): leave loss at mse")
  if problems:
    raise config_check.ConfigError("; ".join(problems))
  return encoder


def make_model(config, encoder_config, target):
  return speech_model.SpeechModel(
      encoder_config, target.num_outputs, layer=str(config.encoder.layer), pooling_hidden=config.ssl.pooling_hidden,
      chain=config.ssl.chain, freeze=config.ssl.freeze, mask_time_prob=config.ssl.mask_time_prob,
      dtype=DTYPES[config.ssl.dtype], remat=config.ssl.remat,
      loss_scales=len(target.members) if config.get("uncertainty_weighting") else 0)


def record(config):
  """What shapes a fine-tuned model (`stages`): the corpus, the recipe, the encoder's weights (a fingerprint, not
  the path) and settings, and the fine-tuning keys (not `remat`, which changes memory, not the model)."""
  exclude = ["encoder.batch_size", "encoder.pooling", "encoder.checkpoint", "ssl.remat"]
  if config.encoder.checkpoint:
    exclude.append("encoder.seed")
  keys = [k for k in ("learning_rate", "batch_size", "max_seconds", "uncertainty_weighting", "tasks",
                      "loss_weights") if k in config]
  return {**stages.data_record(config), "seed": config.seed, "model": "ssl",
          **stages.pick(config, keys + ["encoder", "ssl"], exclude=exclude),
          "encoder.weights": mlp_trainer.encoder_fingerprint(config.encoder.checkpoint)}


def learning_rates(params, encoder_config, head_rate, encoder_rate, decay):
  """A pytree like `params` of each parameter's learning rate (see the module docstring)."""
  top = encoder_config.num_hidden_layers

  def rate(path, _):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] != "encoder":
      return head_rate
    # Below the first layer: feature encoder, projection, positional convolution, masked_spec_embed, the encoder's
    # own LayerNorm (post-LN models; a pre-LN model's final norm comes after every hidden state the model reads,
    # so it gets no gradient, as in transformers' hidden_states).
    depth = 0
    if len(keys) > 2 and keys[1] == "encoder" and keys[2].startswith("layers_"):
      depth = int(keys[2].split("_")[1]) + 1
    return encoder_rate * decay ** (top - depth)

  return jax.tree_util.tree_map_with_path(rate, params)


def scale_by_tree(factors, warmup_steps=0):
  """An optax transformation multiplying each update by -factor (its learning rate), times a linear warm-up."""

  def init(_):
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    ramp = jnp.minimum((state.count + 1) / warmup_steps, 1.0) if warmup_steps else 1.0
    scaled = jax.tree.map(lambda u, f: -f * ramp * u, updates, factors)
    return scaled, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def scheduled_rates(config, step):
  """{'head': rate, 'encoder_top': rate} at 1-based `step`: the pooling and head's, and the top encoder layer's
  (lower layers take it times layer_decay per layer), with the warm-up of `scale_by_tree`."""
  warmup = config.ssl.warmup_steps
  ramp = min(step / warmup, 1.0) if warmup else 1.0
  frozen = config.ssl.freeze == "encoder"
  return {"head": config.learning_rate * ramp, **({} if frozen else {"encoder_top": config.ssl.encoder_learning_rate
                                                                       * ramp})}


def make_state_fn(config, model, encoder):
  """sample batch -> a fresh TrainState: the model initialised with `config.seed`, the encoder's weights put in."""

  def make_state(sample):
    variables = model.init({"params": jax.random.key(config.seed)}, sample["audio"], sample["length"])
    params = dict(variables["params"])
    params["encoder"] = jax.tree.map(jnp.asarray, encoder.params)
    rates = learning_rates(params, encoder.config, config.learning_rate, config.ssl.encoder_learning_rate,
                           config.ssl.layer_decay)
    tx = optax.chain(optax.scale_by_adam(), scale_by_tree(rates, config.ssl.warmup_steps))
    return emo18_trainer.TrainState.create(apply_fn=model.apply, params=params, batch_stats={}, tx=tx)

  return make_state


def make_train_step(model, target, *, loss, seed, masked):
  """Per-device step: the target's loss (weighted, or uncertainty-weighted when the model has `loss_scales`), the
  classifier chain teacher-forced with the labels, rngs from (seed, step, device)."""
  joint = isinstance(target, targets.Joint)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                             jax.lax.axis_index(parallel.DATA_AXIS))
    mask_rng, dropout_rng = jax.random.split(rng)
    labels = batch["labels"]
    teacher = labels if model.chain else None  # unknown (NaN) values: the chain reads the model's own outputs

    def loss_fn(params):
      out = model.apply({"params": params}, batch["audio"], batch["length"], train=True, teacher=teacher,
                        rngs={"mask": mask_rng, "dropout": dropout_rng})
      if joint:
        parts = target.losses(out["outputs"], labels, masked, loss, parallel.DATA_AXIS)
      else:
        parts = {target.name: target.objective(out["outputs"], labels, loss, masked, parallel.DATA_AXIS)}
      log_sigma = params["log_sigma"] if model.loss_scales else None
      weights = None if log_sigma is not None or not joint else target.weights
      return mlp_trainer.total_loss(parts, log_sigma, weights), parts

    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.DATA_AXIS)
    metrics = {"loss": total, **({f"loss_{k}": v for k, v in parts.items()} if len(parts) > 1 else {})}
    return state.apply_gradients(grads=grads), jax.lax.pmean(metrics, parallel.DATA_AXIS)

  return train_step


def finetune(config, target, train, val, mesh, workdir, *, settings, name="fine-tuned encoder", describe=None,
             log=print):
  """Fine-tunes the configured encoder on `train` (an `emo18_trainer.Split` of `target`'s labels), keeping the epoch
  with the best validation score; returns what `emo18_trainer.train_base` returns (best variables, history,
  predict_fn, best history entry) and the model."""
  encoder = ssl_embeddings.load_encoder(config.encoder.checkpoint, config.encoder.seed, log=log)
  model = make_model(config, encoder.config, target)
  masked = not target.all_known(train.labels)
  variables, history, predict_fn, best = emo18_trainer.train_base(
      settings, model, target, train, val, mesh, workdir, log=log, record=record(config), name=name,
      describe=describe, make_state=make_state_fn(config, model, encoder),
      train_step=make_train_step(model, target, loss=config.ssl.loss, seed=config.seed, masked=masked),
      learning_rates=lambda step: scheduled_rates(config, step))
  return variables, history, predict_fn, best, model


def report_short_clips(splits, encoder_config, log=print):
  """Names the clips shorter than the encoder's receptive field: the model reads them zero-padded to it."""
  field = encoder_config.receptive_field
  for name, split in splits.items():
    lengths = np.asarray(pipeline.metadata(split.source).get("num_samples", np.zeros(0)))
    short = split.file_id[:len(lengths)][lengths < field]
    if len(short):
      log(f"{name}: {len(short)} clip(s) shorter than the encoder's receptive field ({field} samples) are read "
          f"zero-padded to it: {', '.join(short[:20])}{' ...' if len(short) > 20 else ''}")


def summary(config):
  """What metrics.json records of the fine-tuned encoder."""
  return {"encoder": mlp_trainer.encoder_identity(config.encoder), "ssl": dict(config.ssl.items())}
