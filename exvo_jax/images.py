"""PNG output without an imaging library: spectrogram grids and heat maps.

Only the standard library's zlib is needed for PNG (8-bit RGB, no interlace), which keeps the dependency set
small. Images are numpy arrays [height, width, 3] uint8, row 0 at the top.
"""

import struct
import zlib

import numpy as np

from exvo_jax import writers

# A perceptually ordered dark-blue -> yellow ramp (anchor colours, linearly interpolated).
_RAMP = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
                  [244, 136, 73], [254, 188, 43], [240, 249, 33]], np.float64)


def colorise(values, vmin=None, vmax=None):
  """float [H, W] -> uint8 [H, W, 3] through the ramp; NaN -> grey. Range defaults to the finite min/max."""
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  lo = np.min(values[finite]) if vmin is None and finite.any() else (vmin or 0.0)
  hi = np.max(values[finite]) if vmax is None and finite.any() else (vmax if vmax is not None else 1.0)
  t = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
  t = np.where(finite, t, 0.0) * (len(_RAMP) - 1)
  low = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
  frac = (t - low)[..., None]
  rgb = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
  rgb[~finite] = 128
  return rgb.round().astype(np.uint8)


def encode_png(image):
  """uint8 [H, W, 3] (or [H, W] grey) -> PNG bytes."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  height, width, _ = image.shape

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))  # filter 0 on every row
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def write_png(path, image):
  """Writes an image (see `encode_png`) on process 0."""
  if writers.is_writer():
    with open(path, "wb") as f:
      f.write(encode_png(image))


def spectrogram_grid(spectrograms, *, columns=4, vmin=None, vmax=None, gap=2):
  """log-mel spectrograms [N, mels, frames] -> one RGB image, low frequencies at the bottom, `columns` per row."""
  spectrograms = np.asarray(spectrograms, np.float64)
  count, height, width = spectrograms.shape
  columns = max(1, min(columns, count))
  rows = -(-count // columns)
  lo = np.min(spectrograms) if vmin is None else vmin
  hi = np.max(spectrograms) if vmax is None else vmax
  canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
  for i, spectrogram in enumerate(spectrograms):
    r, c = divmod(i, columns)
    y, x = r * (height + gap), c * (width + gap)
    canvas[y:y + height, x:x + width] = colorise(spectrogram[::-1], lo, hi)
  return canvas


def heat_map(matrix, *, cell=24, mark_row_minimum=True):
  """A matrix [R, C] as a heat map of cell x cell squares; each row's smallest entry gets a white frame."""
  matrix = np.asarray(matrix, np.float64)
  image = np.repeat(np.repeat(colorise(matrix), cell, axis=0), cell, axis=1)
  if mark_row_minimum:
    for r, c in enumerate(np.nanargmin(np.where(np.isfinite(matrix), matrix, np.inf), axis=1)):
      y, x = r * cell, c * cell
      image[y:y + cell, [x, x + cell - 1]] = 255
      image[[y, y + cell - 1], x:x + cell] = 255
  return image
