"""Sampling: the conditions a generator is asked for, dealt in rounds."""

import numpy as np

from configs import generate as generate_config
from exvo_jax import sampling
from exvo_jax.data import schema


def test_generated_clips_are_asked_for_the_bin_labels_or_their_mean():
  config = generate_config.get_config("smoke")
  labels = np.random.default_rng(0).uniform(size=(9, 10))
  bins = {e: np.array([], int) for e in schema.EMOTIONS}
  bins["Awe"], bins["Fear"] = np.array([0, 3, 5]), np.array([1, 2, 4, 6, 7, 8])
  conditions = sampling.sample_conditions(config.sample.condition, labels, bins)  # default: bin_labels
  np.testing.assert_array_equal(conditions["Awe"], labels[[0, 3, 5]])
  np.testing.assert_array_equal(conditions["Horror"], np.eye(10)[[5]])  # an empty bin: its one-hot vector
  # Dealt in shuffled rounds: every row once per round, so 7 clips use each of 3 rows 2 or 3 times.
  dealt = sampling.deal_conditions(conditions["Awe"], 7, np.random.default_rng(1))
  assert dealt.shape == (7, 10) and dealt.dtype == np.float32
  rows = [int(np.flatnonzero(np.isclose(labels[[0, 3, 5]], d).all(1))[0]) for d in dealt]
  assert sorted(rows[:3]) == [0, 1, 2] and sorted(rows[3:6]) == [0, 1, 2] and rows[6] in (0, 1, 2)
  np.testing.assert_array_equal(sampling.deal_conditions(conditions["Awe"], 7, np.random.default_rng(1)), dealt)
  config.sample.condition = "bin_mean"
  conditions = sampling.sample_conditions(config.sample.condition, labels, bins)
  np.testing.assert_allclose(conditions["Fear"], labels[[1, 2, 4, 6, 7, 8]].mean(0))
  np.testing.assert_allclose(sampling.deal_conditions(conditions["Fear"], 4, None),
                             np.tile(labels[[1, 2, 4, 6, 7, 8]].mean(0), (4, 1)), rtol=1e-6)
