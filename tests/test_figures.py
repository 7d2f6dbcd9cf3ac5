"""The figures: what their Axes hold (names, values, marks, axis units), checked before saving, and the PNG files."""

import librosa
import matplotlib.patches
import numpy as np
import pytest

from exvo_jax import figures
from exvo_jax.data import schema
from exvo_jax.features import mel


def _ticks(labels):
  return [t.get_text() for t in labels]


def test_fid_matrix_names_both_axes_writes_every_value_and_frames_each_row_minimum(tmp_path):
  rng = np.random.default_rng(0)
  matrix = rng.uniform(1, 30, size=(10, 10))
  matrix[3, 5] = np.nan
  fig = figures.fid_matrix(matrix, schema.EMOTIONS, schema.EMOTIONS, title="train vs val", row_label="Train bin",
                           column_label="Val bin")
  ax = fig.axes[0]
  assert _ticks(ax.get_xticklabels()) == list(schema.EMOTIONS)
  assert _ticks(ax.get_yticklabels()) == list(schema.EMOTIONS)
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("Val bin", "Train bin")
  assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "FID"  # the colour bar
  cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
  for r in range(10):
    for c in range(10):
      assert cells[r, c] == ("n/a" if (r, c) == (3, 5) else f"{matrix[r, c]:.1f}")
  frames = sorted((round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches
                  if isinstance(p, matplotlib.patches.Rectangle) and not p.get_fill())
  assert frames == [(r, int(np.nanargmin(matrix[r]))) for r in range(10)]
  figures.save(fig, tmp_path / "fid.png")
  assert (tmp_path / "fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = figures.to_image(fig)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_band_of_puts_each_band_centre_on_its_band_as_librosa_spaces_them():
  # librosa's Slaney mel filterbank: N_MELS + 2 edges from 0 Hz to 8 kHz; band i centres on edge i + 1.
  edges = librosa.mel_frequencies(n_mels=mel.N_MELS + 2, fmin=0.0, fmax=mel.SAMPLE_RATE / 2, htk=False)
  for band in (0, 10, 40, 64, 100, 127):
    assert mel.band_of(edges[band + 1]) == pytest.approx(band, abs=1e-6)
  assert mel.band_of(0.0) == -0.5 and mel.band_of(8000.0) == mel.N_MELS - 0.5  # clipped to the image


def test_spectrogram_grid_has_time_and_frequency_axes_and_names_each_row():
  spectrograms = np.random.default_rng(1).normal(size=(6, mel.N_MELS, 100))
  fig = figures.spectrogram_grid(spectrograms, row_names=["Awe", "Fear"], columns=3, title="samples")
  panels = [ax for ax in fig.axes if ax.get_images()]
  assert len(panels) == 6
  first = panels[0]
  assert first.get_ylabel() == "Awe\nfrequency (Hz)" and panels[3].get_ylabel() == "Fear\nfrequency (Hz)"
  assert panels[3].get_xlabel() == "time (s)"
  assert first.get_images()[0].get_extent()[1] == pytest.approx(100 * 128 / 16_000)  # 100 frames of hop 128
  labels = _ticks(first.get_yticklabels())
  assert labels == ["0", "250", "500", "1k", "2k", "4k", "8k"]
  np.testing.assert_allclose(first.get_yticks()[3], mel.band_of(1000.0))
  assert sum(ax.get_ylabel() == "log mel power / 2" for ax in fig.axes) == 1  # one colour bar


def test_bars_draw_each_series_value_under_its_name():
  values = {"none": [0.1, -0.2, 0.3], "adapted": [0.2, 0.0, 0.5]}
  fig = figures.bars(values, ["Awe", "Fear", "Horror"], title="CCC", ylabel="CCC")
  ax = fig.axes[0]
  assert _ticks(ax.get_xticklabels()) == ["Awe", "Fear", "Horror"]
  heights = [p.get_height() for p in ax.patches]
  np.testing.assert_allclose(heights, values["none"] + values["adapted"])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "adapted"]


def test_training_curves_star_each_run_best_evaluation():
  history = [{"step": 10 * k, "train_loss": 1.0 / k, "val_fid": v} for k, v in enumerate([5.0, 3.0, 4.0, 3.5], 1)]
  fig = figures.training_curves({"GAN all": history}, metric="val_fid", mode="min", losses=("train_loss",))
  loss_axis, metric_axis = fig.axes
  stars = [line for line in metric_axis.get_lines() if line.get_marker() == "*"]
  assert len(stars) == 1 and list(stars[0].get_xdata()) == [20.0] and list(stars[0].get_ydata()) == [3.0]
  (loss_line,) = loss_axis.get_lines()
  np.testing.assert_allclose(loss_line.get_ydata(), [1.0, 0.5, 1 / 3, 0.25])
  assert loss_axis.get_xlabel() == "step" and metric_axis.get_ylabel() == "validation val_fid"
