"""ExVo-MultiTask (Table 2 of the ExVo paper): openSMILE features + the multi-task MLP.

Variants (combine with ','):
  (none)            ComParE functionals, 6,373 dims, extracted from the audio with opensmile
  :egemaps          eGeMAPS functionals (88)
  :boaw=N           bag-of-audio-words over ComParE LLDs, N in 125, 250, 500, 1000, 2000
  :deepspectrum     DeepSpectrum (4,096), read from the release's feats/ (not extractable offline)
  :fusion=A+B       concatenation of feature sets, e.g. fusion=compare+egemaps
  :ssl              frozen speech-encoder embeddings, by default a learned weighted sum over the layers
                    (--config.encoder.checkpoint=FOLDER, a Hugging Face wav2vec2 / HuBERT / WavLM folder; without
                    one, a small UNTRAINED random encoder that only exercises the path)
  :release          read the feature set from the release's feats/ instead of extracting it
  :uncertainty      learned uncertainty weighting of the three losses instead of their sum
  :seeds=K          number of seeds (default 5)
  :smoke            tiny demo corpus, eGeMAPS, 2 seeds x 2 epochs (for tests)
  :emogator         real bursts: the EmoGator folder ($EXVO_EMOGATOR or ../shared/data/emogator), one 30-way
                    category head on the same trunk, selected on validation UAR (combine with :egemaps)
"""

import os

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, egemaps=False, boaw=0, deepspectrum=False, fusion="", release=False,
                         uncertainty=False, seeds=5, emogator=False, ssl=False)
  config = common.get_config()
  config.task = "multitask"

  config.features = common.ml_collections.ConfigDict()
  config.features.sets = ("compare",)
  config.features.from_release = arg.release
  config.features.boaw_words = arg.boaw or 500
  config.features.boaw_kmeans_iterations = 0  # openXBOW's random sampling; >0 refines with k-means
  config.features.boaw_assignments = 1
  config.features.processes = 0  # feature extraction workers; 0 = one per core
  if arg.egemaps:
    config.features.sets = ("egemaps",)
  if arg.boaw:
    config.features.sets = ("boaw",)
  if arg.deepspectrum:
    config.features.sets = ("deepspectrum",)
  if arg.fusion:
    config.features.sets = tuple(arg.fusion.split("+"))
  if arg.ssl:  # frozen speech-encoder embeddings (config.encoder says which encoder and layer)
    if arg.egemaps or arg.boaw or arg.deepspectrum or arg.fusion or arg.release:
      raise ValueError("config variant ssl chooses the feature set; it does not combine with another set's variant "
                       "(to fuse sets: --config.features.sets and --config.encoder.layer=last)")
    config.features.sets = ("ssl",)
  config.encoder = common.encoder_config()

  config.learning_rate = 1e-3
  config.batch_size = 8
  config.eval_batch_size = 256
  config.num_epochs = 20
  config.patience = 5
  config.num_seeds = arg.seeds
  config.uncertainty_weighting = arg.uncertainty
  # Age output bias starts at the training mean age (the reference starts it at 0, which small corpora never
  # recover from within 20 epochs of lr 1e-3 steps).
  config.age_bias_at_mean = True
  config.team = "exvo_jax"
  config.submission_number = 1
  config.log_every_s = 30.0

  if arg.emogator:
    config.data.dataset = "emogator"
    config.data.root = os.environ.get("EXVO_EMOGATOR", "../shared/data/emogator")
  if arg.smoke:
    config.data.demo_size = "tiny"
    config.features.sets = (("egemaps",) if not (arg.boaw or arg.fusion or arg.release or arg.ssl)
                            else config.features.sets)
    config.num_seeds = 2
    config.num_epochs = 2
  return config


def get_sweep():
  """The rows of Table 2, as config arguments (launch/multitask_table2.sh runs them)."""
  return ["", "egemaps", *(f"boaw={n}" for n in (125, 250, 500, 1000, 2000)), "deepspectrum",
          "fusion=compare+egemaps"]
