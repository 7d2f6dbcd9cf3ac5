"""ExVo-FewShot (Table 4 of the ExVo paper): Emo18 on raw audio, personalised per speaker from 2 labelled clips.

Variants (combine with ','):
  :hidden=64|128|256      LSTM width (Table 4's ablation; default 256)
  :adaptation=MODE        none, finetune, maml, fomaml, speaker_norm, speaker_norm+finetune
  :epochs=N               base training epochs
  :model=ssl              a speech encoder in Emo18's place (--config.encoder.checkpoint=FOLDER; without one, a small
                          UNTRAINED random encoder that only exercises the path), fine-tuned with its feature
                          encoder frozen (--config.ssl), head lr 1e-3; adaptations act on its pooling and head
  :emogator               real bursts: the EmoGator folder ($EXVO_EMOGATOR or ../shared/data/emogator), 30-way
                          softmax head, validation UAR
  :smoke                  tiny demo corpus, 1 epoch, small model (for tests)
"""

import os

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, hidden=256, adaptation="speaker_norm", epochs=6, emogator=False, smoke=False,
                         model="emo18")
  config = common.get_config()
  config.task = "fewshot"

  config.model = arg.model  # 'emo18', or 'ssl': a speech encoder (config.encoder, config.ssl)
  config.encoder = common.encoder_config()
  config.ssl = common.ssl_finetune_config()
  config.hidden = arg.hidden
  config.num_layers = 2
  config.learning_rate = 1e-4
  config.batch_size = 8
  config.eval_batch_size = 32
  config.max_seconds = 20.0  # clips longer than this are cut (recipe)
  config.eval_pad_seconds = 1  # adaptation batches are padded to whole seconds: few distinct shapes to compile
  # Base training epochs. The recipe keeps the best epoch by validation mean CCC; 6 epochs fit the demo corpus in
  # the 10-minute CPU budget. On HUME-VB raise it (e.g. --config.num_epochs=30) on an accelerator.
  config.num_epochs = arg.epochs
  config.log_every_s = 30.0

  config.adaptation = arg.adaptation
  config.num_support = 2
  config.support_seed = 0  # which 2 clips per Val speaker are the support set
  # Parameters that finetune / MAML adapt (top-level names: Emo18's, or the speech model's pooling and head).
  config.adapt_subset = ("lstm", "head") if arg.model != "ssl" else ("pooling", "head")
  config.adapt_query_batch = 16
  config.read_out_l2 = 1.0  # speaker_norm's linear read-out

  config.finetune = common.ml_collections.ConfigDict()
  config.finetune.steps = 5
  config.finetune.learning_rate = 1e-3
  config.finetune.anchor_weight = 0.0  # pull toward the trained model during adaptation

  config.maml = common.ml_collections.ConfigDict()
  config.maml.meta_steps = 60
  config.maml.episodes_per_step = 4
  config.maml.num_query = 4
  config.maml.inner_steps = 3
  config.maml.inner_learning_rate = 1e-2
  config.maml.outer_learning_rate = 1e-4
  config.maml.anchor_weight = 0.0
  config.maml.clip_seconds = 3.0  # episodes' clips are cropped/padded to this length
  config.maml.checkpoint_every = 20
  config.maml.log_every = 5  # meta-steps between reading the outer loss back (and the NaN check)

  config.val_split = "validation"
  config.team = "exvo_jax"
  config.submission_number = 1

  if arg.model == "ssl":
    config.learning_rate = 1e-3  # the pooling and head; the encoder's is config.ssl.encoder_learning_rate
    config.max_seconds = 10.0
  if arg.emogator:
    config.data.dataset = "emogator"
    config.data.root = os.environ.get("EXVO_EMOGATOR", "../shared/data/emogator")
    config.val_split = "val"
  if arg.smoke:
    config.data.demo_size = "tiny"
    config.hidden = 32
    config.num_epochs = 1
    config.maml.meta_steps = 2
    config.max_seconds = min(config.max_seconds, 4.0) if arg.model == "ssl" else config.max_seconds
    config.log_every_s = 1e9
  return config


def get_sweep():
  """Table 4's grid: LSTM width x adaptation (launch/fewshot_table4.sh runs it)."""
  return [f"hidden={h},adaptation={a}" for h in (64, 128, 256)
          for a in ("none", "finetune", "maml", "speaker_norm")]
