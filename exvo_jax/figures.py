"""Figures of a run, drawn with matplotlib's headless Agg backend: FID matrices, spectrogram grids, per-emotion
bars, training curves.

Each function returns a `matplotlib.figure.Figure` (tests read its Axes: tick labels, titles); `save` writes it as
a PNG on process 0, `to_image` renders it to an RGB array (TensorBoard images). Figures are made
with `matplotlib.figure.Figure`, never `pyplot`, so no window system and no global figure state are involved.
"""

import os

import matplotlib
import numpy as np
from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg

from exvo_jax import writers
from exvo_jax.features import mel

matplotlib.use("Agg")  # no display on a training machine (backend_agg is used directly; this covers pyplot users)

_DPI = 100


def _figure(width, height):
  fig = figure_lib.Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  return fig


def save(fig, path):
  """Writes `fig` as a PNG (process 0 only)."""
  if writers.is_writer():
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=_DPI)


def to_image(fig):
  """`fig` rendered as uint8 [H, W, 3]."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def fid_matrix(matrix, row_names, column_names, *, title, row_label, column_label):
  """A heat map of FIDs [R, C] with the names on both axes, each value in its cell, a colour bar, and each row's
  smallest finite value framed (where that row's set is closest); NaN cells are grey and say 'n/a'."""
  matrix = np.asarray(matrix, np.float64)
  rows, columns = matrix.shape
  fig = _figure(1.0 + 0.75 * columns, 1.0 + 0.6 * rows)
  ax = fig.add_subplot()
  finite = np.isfinite(matrix)
  shown = np.ma.masked_invalid(matrix)
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
  image = ax.imshow(shown, cmap=cmap, aspect="auto")
  fig.colorbar(image, ax=ax, label="FID")
  ax.set_xticks(range(columns), labels=list(column_names), rotation=45, ha="right")
  ax.set_yticks(range(rows), labels=list(row_names))
  ax.set_xlabel(column_label)
  ax.set_ylabel(row_label)
  ax.set_title(f"{title}\n(red frame: each row's minimum)")
  lo, hi = (np.min(matrix[finite]), np.max(matrix[finite])) if finite.any() else (0.0, 1.0)
  for r in range(rows):
    for c in range(columns):
      value = matrix[r, c]
      bright = finite[r, c] and (value - lo) > 0.6 * (hi - lo)  # viridis is light at the top of its range
      ax.text(c, r, f"{value:.1f}" if finite[r, c] else "n/a", ha="center", va="center", fontsize=7,
              color="black" if bright or not finite[r, c] else "white")
    if finite[r].any():
      best = int(np.nanargmin(np.where(finite[r], matrix[r], np.inf)))
      ax.add_patch(matplotlib.patches.Rectangle((best - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red",
                                                linewidth=2))
  return fig


_FREQUENCY_TICKS_HZ = (0, 250, 500, 1000, 2000, 4000, 8000)


def spectrogram_grid(spectrograms, *, row_names=None, names=None, columns=4, vmin=None, vmax=None, title=""):
  """Log-mel spectrograms [N, mels, frames] (the Generate front end's: 16 kHz, hop 128, 128 Slaney mel bands to
  8 kHz) in rows of `columns`, time in seconds across, frequency in Hz up the mel scale, one colour bar;
  `row_names[r]` names row r (e.g. its emotion), `names[i]` titles panel i."""
  spectrograms = np.asarray(spectrograms, np.float64)
  count, bands, frames = spectrograms.shape
  columns = max(1, min(columns, count))
  rows = -(-count // columns)
  lo = np.min(spectrograms) if vmin is None else vmin
  hi = np.max(spectrograms) if vmax is None else vmax
  seconds = frames * mel.HOP / mel.SAMPLE_RATE
  fig = _figure(1.0 + 2.2 * columns, 0.6 + 1.6 * rows)
  axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
  positions = [mel.band_of(hz) for hz in _FREQUENCY_TICKS_HZ]
  image = None
  for i, ax in enumerate(axes.flat):
    if i >= count:
      ax.set_visible(False)
      continue
    image = ax.imshow(spectrograms[i], origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi,
                      extent=(0.0, seconds, -0.5, bands - 0.5))
    r, c = divmod(i, columns)
    if names is not None and i < len(names) and names[i]:
      ax.set_title(names[i], fontsize=9)
    if c == 0:
      ax.set_yticks(positions, labels=[f"{hz / 1000:g}k" if hz >= 1000 else str(hz) for hz in _FREQUENCY_TICKS_HZ])
      name = row_names[r] if row_names is not None and r < len(row_names) else None
      ax.set_ylabel(f"{name}\nfrequency (Hz)" if name else "frequency (Hz)")
    if r == rows - 1:
      ax.set_xlabel("time (s)")
  fig.colorbar(image, ax=axes, label="log mel power / 2", shrink=0.8)
  if title:
    fig.suptitle(title)
  return fig


def bars(values, names, *, title, ylabel):
  """Grouped bars: `values` {series: [one value per name]} side by side for each of `names`."""
  series = list(values)
  width = 0.8 / max(len(series), 1)
  fig = _figure(1.5 + 0.6 * len(names) * max(len(series), 1) ** 0.5, 3.5)
  ax = fig.add_subplot()
  x = np.arange(len(names))
  for k, name in enumerate(series):
    ax.bar(x + (k - (len(series) - 1) / 2) * width, np.asarray(values[name], np.float64), width, label=name)
  ax.set_xticks(x, labels=list(names), rotation=45, ha="right")
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if len(series) > 1:
    ax.legend(fontsize=8)
  return fig


def training_curves(histories, *, metric, mode="max", losses=("train_loss",), title=""):
  """The training losses (left axis: each of `losses`, the loop's means over each evaluation period) and the
  validation `metric` (right axis) against the step of each evaluation, for each run of `histories` ({run name:
  the loop's history, [{'step', metric, losses...}]}), each run's best evaluation (max or min `mode`) starred."""
  fig = _figure(6.5, 3.5)
  ax = fig.add_subplot()
  right = ax.twinx()
  colours = matplotlib.colormaps["tab10"]
  for k, (name, history) in enumerate(histories.items()):
    colour = colours(k % 10)
    steps = np.array([h["step"] for h in history], np.float64)
    for j, loss in enumerate(losses):
      if any(loss in h for h in history):
        ax.plot(steps, [h.get(loss, np.nan) for h in history], color=colour, linestyle=("--", ":", "-.")[j % 3],
                marker=".", label=f"{name} {loss}")
    scores = np.array([np.nan if h.get(metric) is None else h[metric] for h in history], np.float64)
    right.plot(steps, scores, color=colour, marker="o", markersize=3, label=f"{name} val {metric}")
    if np.isfinite(scores).any():
      best = int(np.nanargmax(scores) if mode == "max" else np.nanargmin(scores))
      right.plot([steps[best]], [scores[best]], marker="*", markersize=14, color=colour, linestyle="none",
                 label=f"{name} best (step {int(steps[best])})")
  ax.set_xlabel("step")
  ax.set_ylabel(", ".join(losses))
  right.set_ylabel(f"validation {metric}")
  handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
  if handles:
    right.legend(handles=handles, fontsize=7, loc="best")
  ax.set_title(title or f"training loss and validation {metric}")
  return fig
