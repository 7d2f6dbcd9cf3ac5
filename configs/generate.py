"""ExVo-Generate (Table 3 of the ExVo paper): MSG-GAN on log-mel spectrograms, scored with FID / HEEP / S_GEN.

Variants (combine with ','):
  :mode=train|sample         train the classifier and GAN(s), then sample and score (default); or only sample
                             and score from the GAN(s) trained in the same --workdir
  :generator=conditional|per_emotion
                             one generator for all emotions, conditioned on the emotion vector (default), or the
                             paper's one generator per emotion (bins: clips whose label for it is 1.0)
  :optimiser=adam|extra_adam Adam (alternating D/G steps) or ExtraAdam (extragradient; default adam)
  :steps=N                   GAN training steps
  :width=N                   divide every channel count by N (8 makes a CPU-sized network)
  :augment                   the reference's speed / pitch / shift / noise augmentations
  :num_samples=N             clips generated per emotion (default 100; the paper also reports 1,000)
  :smoke                     tiny demo corpus, tiny networks, a few steps (for tests)
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, mode="train", generator="conditional", optimiser="adam", steps=20_000, width=1,
                         augment=False, num_samples=100, smoke=False)
  config = common.get_config()
  config.task = "generate"
  config.mode = arg.mode
  config.generator = arg.generator
  config.emotions = ()  # empty: all ten (the baseline skipped Triumph)
  config.score = True  # mode=sample also scores (needs the classifier, trained or restored from the workdir)
  config.ratings_csv = ""  # File_ID + mean human intensity ratings of the generated clips -> HEEP and S_GEN

  config.gan = common.ml_collections.ConfigDict()
  config.gan.channels = (512, 512, 512, 512, 256, 128, 64)  # generator scales 2x8 ... 128x512
  config.gan.channel_divisor = arg.width
  config.gan.optimiser = arg.optimiser
  config.gan.generator_learning_rate = 3e-3
  config.gan.discriminator_learning_rate = 3e-4
  config.gan.ema_decay = 0.999  # samples come from an exponential moving average of the generator (warmed up)
  # Conditional generator only: weight of the AC-GAN auxiliary loss (D predicts the emotions of real clips, G is
  # asked to make clips whose predicted emotions are its condition); 0 leaves the projection discriminator alone.
  config.gan.auxiliary_weight = 1.0
  # Conditional generator only: weight of the mode-seeking term (MSGAN, Mao et al. 2019) that keeps one
  # condition's clips apart; 0 turns it off.
  config.gan.diversity_weight = 1.0
  config.gan.batch_size = 16
  config.gan.steps = arg.steps
  config.gan.log_every = 10
  config.gan.log_every_s = 30.0
  config.gan.sample_every = 1_000  # PNG grid of fixed latents
  config.gan.grid_size = 10
  config.gan.checkpoint_every = 500
  # Every eval_every steps (and at the last), eval_per_emotion clips per emotion are scored against the validation
  # bins; the checkpoint with the lowest mean FID is kept as the best and sampled (sample.checkpoint). 0: off.
  config.gan.eval_every = 1_000
  config.gan.eval_per_emotion = 50

  config.augment = common.ml_collections.ConfigDict()
  reference = dict(speed=0.2, pitch_semitones=3.0, shift_seconds=0.2, noise_std=0.01)
  for name, value in reference.items():
    setattr(config.augment, name, value if arg.augment else 0.0)

  # The FID feature extractor: Emo18 trained on Train (256-d LSTM embedding). Set `workdir` to a FewShot run's
  # workdir (same hidden size) to reuse its trained base model instead of training one.
  config.classifier = common.ml_collections.ConfigDict()
  config.classifier.workdir = ""
  config.classifier.hidden = 256
  config.classifier.num_epochs = 6
  config.classifier.learning_rate = 1e-4
  config.classifier.batch_size = 8
  config.classifier.eval_batch_size = 32
  config.classifier.max_seconds = 20.0

  config.sample = common.ml_collections.ConfigDict()
  config.sample.num_per_emotion = arg.num_samples
  config.sample.seed = 0
  config.sample.griffin_lim_iters = 32
  config.sample.batch_size = 25
  config.sample.tensorboard_clips = 2  # generated clips per emotion put in TensorBoard as audio
  config.sample.grid_columns = 8
  # bin_labels: a conditional generator is asked for emotion e with the intensity vectors of e's training clips
  # (one per generated clip, dealt in shuffled rounds); bin_mean: with their mean vector for every clip.
  config.sample.condition = "bin_labels"
  config.sample.checkpoint = "best"  # or "latest": the lowest validation FID (gan.eval_every), or the newest
  config.sample.weights = "ema"  # or "raw": sample the generator's last training weights, not their average
  config.sample.control_shuffles = 5  # label permutations averaged in the shuffled-label control

  if arg.smoke:
    config.data.demo_size = "tiny"
    config.gan.channels = (16, 16, 16, 8, 8, 4, 4)
    config.gan.channel_divisor = 1
    config.gan.batch_size = 8
    config.gan.steps = 4
    config.gan.log_every = 2
    config.gan.sample_every = 2
    config.gan.checkpoint_every = 2
    config.gan.eval_every = 2
    config.gan.eval_per_emotion = 3
    config.gan.log_every_s = 1e9
    config.gan.grid_size = 4
    config.classifier.hidden = 32
    config.classifier.num_epochs = 1
    config.sample.num_per_emotion = min(arg.num_samples, 4)
    config.sample.batch_size = 4
    config.sample.griffin_lim_iters = 4
    config.sample.grid_columns = 4
  return config


def get_sweep():
  """The generator x optimiser grid (launch/sweep.sh TASK=generate runs it)."""
  return [f"generator={g},optimiser={o}" for g in ("conditional", "per_emotion") for o in ("adam", "extra_adam")]
