"""A-VB 2022 (Table 7 of the HUME-VB datasets paper): High, Two, Culture and Type.

Variants (combine with ','):
  :high :two :culture :type   one task (default: high)
  :all              the four jointly: one trunk, one head per task, summed losses, best epoch on the mean of the
                    four tasks' scores
  :model=mlp        the organisers' feature MLP over ComParE functionals (default), 5 seeds
  :model=emo18      End2You's end-to-end CNN-LSTM on the raw waveform: batch 8, lr 1e-4, 30 epochs, best epoch by
                    validation
  :model=ssl        a speech encoder fine-tuned end to end (--config.encoder.checkpoint=FOLDER; without one, a small
                    UNTRAINED random encoder that only exercises the path): attention pooling, a head per task,
                    Adam 1e-3 for the head and --config.ssl.encoder_learning_rate for the encoder, batch 8, 10
                    epochs, best epoch by validation; --config.ssl says what is frozen, layer-wise rates, time
                    masking, the classifier chain, the CCC loss, bfloat16 and rematerialisation
  :egemaps          (mlp) eGeMAPS functionals instead of ComParE; :boaw=N bag-of-audio-words
  :ssl              (mlp) frozen speech-encoder embeddings (--config.encoder.checkpoint=FOLDER; without one, a
                    small UNTRAINED random encoder that only exercises the path)
  :release          (mlp) read the features from the release's features/ (or feats/) instead of extracting them
  :uncertainty      (mlp or ssl, with :all) learned uncertainty weighting of the task losses
  :seeds=K          (mlp) number of seeds (Emo18 trains one, as End2You's recipe)
  :smoke            tiny demo corpus, eGeMAPS, 2 seeds x 2 epochs (mlp) or 1 epoch of a narrow Emo18 or of the
                    random encoder (for tests)

With no data configured, the demo corpus is built in the A-VB release's layout (audio/wav/, labels/*_info.csv).
"""

from configs import common

TASKS = ("high", "two", "culture", "type")


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, model="mlp", all=False, egemaps=False, boaw=0, release=False,
                         uncertainty=False, seeds=5, ssl=False, **{t: False for t in TASKS})
  if arg.model == "emo18" and (arg.egemaps or arg.boaw or arg.release or arg.uncertainty or arg.ssl):
    raise ValueError("config variants egemaps, boaw, ssl, release and uncertainty belong to model=mlp (the feature "
                     "MLP); model=emo18 reads the raw waveform")
  if arg.model == "ssl" and (arg.egemaps or arg.boaw or arg.release or arg.ssl):
    raise ValueError("config variants egemaps, boaw, ssl and release choose the feature MLP's input; model=ssl "
                     "fine-tunes the encoder on the raw waveform (its settings: --config.encoder, --config.ssl)")
  config = common.get_config()
  config.task = "avb"
  config.data.demo_layout = "avb"

  chosen = tuple(t for t in TASKS if arg[t])
  config.tasks = TASKS if arg.all else (chosen or ("high",))
  config.model = arg.model
  config.loss_weights = ()  # one per task; empty: 1 each
  config.uncertainty_weighting = arg.uncertainty
  config.team = "exvo_jax"
  config.submission_number = 1
  config.log_every_s = 30.0
  config.eval_batch_size = 256

  # The feature MLP (model=mlp): the MultiTask recipe.
  config.features = common.ml_collections.ConfigDict()
  config.features.sets = ("egemaps",) if arg.egemaps else ("boaw",) if arg.boaw else ("compare",)
  if arg.ssl:  # frozen speech-encoder embeddings (config.encoder says which encoder and layer)
    if arg.egemaps or arg.boaw or arg.release:
      raise ValueError("config variant ssl chooses the feature set; it does not combine with another set's variant "
                       "(to fuse sets: --config.features.sets and --config.encoder.layer=last)")
    config.features.sets = ("ssl",)
  config.encoder = common.encoder_config()
  config.ssl = common.ssl_finetune_config()
  config.features.from_release = arg.release
  config.features.boaw_words = arg.boaw or 500
  config.features.boaw_kmeans_iterations = 0
  config.features.boaw_assignments = 1
  config.features.processes = 0
  config.num_seeds = arg.seeds
  config.patience = 5
  if arg.model == "emo18":  # End2You's recipe
    config.learning_rate = 1e-4
    config.batch_size = 8
    config.num_epochs = 30
    config.eval_batch_size = 32
  elif arg.model == "ssl":  # fine-tuning: the head's rate here, the encoder's in config.ssl
    config.learning_rate = 1e-3
    config.batch_size = 8
    config.num_epochs = 10
    config.eval_batch_size = 32
  else:
    config.learning_rate = 1e-3
    config.batch_size = 8
    config.num_epochs = 20
  config.hidden = 256  # Emo18's LSTM width
  config.num_layers = 2
  config.max_seconds = 20.0 if arg.model != "ssl" else 10.0  # clips are cut to this length

  if arg.smoke:
    config.data.demo_size = "tiny"
    config.features.sets = ("egemaps",) if not (arg.boaw or arg.release or arg.ssl) else config.features.sets
    config.num_seeds = 2
    config.num_epochs = 2 if arg.model == "mlp" else 1
    config.max_seconds = min(config.max_seconds, 4.0) if arg.model == "ssl" else config.max_seconds
    config.hidden = 32
    config.num_layers = 1
  return config


def get_sweep():
  """The cells of Table 7, as config arguments (launch/avb_table7.sh runs them)."""
  return [f"{task},model={model}" for model in ("mlp", "emo18") for task in TASKS]
