"""ExVo-FewShot (Table 4 of the ExVo paper): Emo18 on raw audio, personalised per speaker from 2 labelled clips.

Variants (combine with ','):
  :hidden=64|128|256      LSTM width (Table 4's ablation; default 256)
  :adaptation=MODE        speaker_bn+embedding_norm (the default; embedding_norm with model=ssl), none,
                          finetune, maml, fomaml, speaker_norm, speaker_norm+finetune, refit (the control of
                          speaker_norm: its read-out refit without the speaker's statistics), embedding_norm,
                          speaker_bn, support_bias (exvo_jax/tasks/fewshot.py says what each does)
  :epochs=N               base training epochs
  :model=ssl              a speech encoder in Emo18's place (--config.encoder.checkpoint=FOLDER; without one, a small
                          UNTRAINED random encoder that only exercises the path), fine-tuned with its feature
                          encoder frozen (--config.ssl), head lr 1e-3; adaptations act on its pooling and head
  :emogator               real bursts: the EmoGator folder ($EXVO_EMOGATOR or ../shared/data/emogator), 30-way
                          softmax head, validation UAR
  :compare                every adaptation and control from one trained model on 5 draws of the support clips,
                          with per-speaker counts and the support clips' classes scored apart (docs/results/
                          fewshot.md); --config.compare lists the rows, --config.support_draws the draws
  :smoke                  tiny demo corpus, 1 epoch, small model (for tests)
"""

import os

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, hidden=256, adaptation="", epochs=6, emogator=False, smoke=False,
                         model="emo18", compare=False)
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

  # The default, chosen by the comparison on EmoGator and the demo corpus (docs/results/fewshot.md): each
  # speaker's own BatchNorm statistics, then its embedding restandardised. The speech model has no BatchNorm.
  config.adaptation = arg.adaptation or ("speaker_bn+embedding_norm" if arg.model == "emo18" else "embedding_norm")
  config.num_support = 2
  config.support_seed = 0  # which 2 clips per Val speaker are the support set
  # Parameters that finetune / MAML adapt (top-level names: Emo18's, or the speech model's pooling and head).
  config.adapt_subset = ("lstm", "head") if arg.model != "ssl" else ("pooling", "head")
  config.adapt_query_batch = 16
  config.read_out_l2 = 1.0  # speaker_norm's (and refit's) linear read-out
  # speaker_norm and embedding_norm: each speaker's embedding moments, shrunk toward the training embeddings' as if
  # the speaker had prior_clips more clips with those moments, and no std below min_std_fraction of the training
  # one (0, 0: the speaker's own moments)
  config.speaker_norm = common.ml_collections.ConfigDict()
  config.speaker_norm.prior_clips = 0.0
  config.speaker_norm.min_std_fraction = 0.0
  config.speaker_bn_batch = 64  # speaker_bn: clips per BatchNorm statistics pass (one pass is exact)
  config.support_bias = common.ml_collections.ConfigDict()
  config.support_bias.prior_clips = 2.0  # the offset is the support residuals' sum / (support clips + this)

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
  config.maml.query_other_classes = False  # episodes' query clips from other classes than their support clips'
  config.maml.checkpoint_every = 20
  config.maml.log_every = 5  # meta-steps between reading the outer loss back (and the NaN check)

  # The comparison (:compare): the adaptations in these rows, each on support_draws draws of the support clips.
  config.compare = comparison(arg) if arg.compare else ()
  config.support_draws = 5 if arg.compare else 1

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


def comparison(arg):
  """The rows of the comparison: every adaptation that applies, the controls, and the candidates measured for
  issue 20 (docs/results/fewshot.md), as `MODE[setting=value,...]` strings."""
  shrunk = "speaker_norm.prior_clips=8,speaker_norm.min_std_fraction=0.5"
  rows = ["speaker_norm", "refit", f"speaker_norm[{shrunk}]", "speaker_norm+finetune",
          "embedding_norm", f"embedding_norm[{shrunk}]", "embedding_norm[speaker_norm.prior_clips=16]",
          "finetune", "finetune[finetune.anchor_weight=1.0]",
          "finetune[adapt_subset=head/bias,finetune.learning_rate=0.1,finetune.anchor_weight=1.0]",
          "maml", "maml[maml.query_other_classes=True]"]
  if arg.model == "emo18":  # the speech model has no BatchNorm
    rows += ["speaker_bn", "speaker_bn+embedding_norm", "speaker_bn+embedding_norm[speaker_norm.prior_clips=16]",
             "finetune[adapt_subset=encoder/MaskedBatchNorm+head/bias,finetune.learning_rate=0.01,"
             "finetune.anchor_weight=1.0]"]
  if not arg.emogator:  # a classification has no output offset to estimate, only class priors
    rows += ["support_bias"]
  return tuple(rows)


def get_sweep():
  """Table 4's grid: LSTM width x adaptation (launch/fewshot_table4.sh runs it)."""
  return [f"hidden={h},adaptation={a}" for h in (64, 128, 256)
          for a in ("none", "finetune", "maml", "speaker_norm")]
