"""PNG writer and heat maps."""

import struct
import zlib

import numpy as np

from exvo_jax import images


def _decode_png(data):
  """Minimal PNG reader for what encode_png writes (8-bit RGB, filter 0): -> uint8 [H, W, 3]."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, chunks = 8, {}
  while pos < len(data):
    length, = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    chunks[kind] = chunks.get(kind, b"") + body
    pos += 12 + length
  width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
  assert (depth, color) == (8, 2)
  raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
  assert (raw[:, 0] == 0).all()
  return raw[:, 1:].reshape(height, width, 3)


def test_png_round_trip_and_heat_map_marks_row_minimum():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(images.encode_png(image)), image)
  heat = images.heat_map(np.array([[3.0, 1.0], [0.5, 2.0]]), cell=4)
  assert heat.shape == (8, 8, 3)
  assert (heat[0, 4:8] == 255).all() and (heat[4, 0:4] == 255).all()  # frames on (0, 1) and (1, 0)
  assert not (heat[0, 0:4] == 255).all()
  grid = images.spectrogram_grid(np.zeros((3, 4, 6)), columns=2, gap=1)
  assert grid.shape == (2 * 4 + 1, 2 * 6 + 1, 3)
