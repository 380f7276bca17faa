"""Palettes, label PNGs, overlays and contact sheets (coseg_jax.visualize)."""
import os

import numpy as np
from PIL import Image

from coseg_jax.core import data
from coseg_jax.core import fileio
from coseg_jax.core import visualize


def _colour_present(image, colour):
  return bool(np.all(image == np.asarray(colour, np.uint8), axis=-1).any())


def test_palette_is_voc_colour_map():
  colours = visualize.palette(256)
  assert colours.dtype == np.uint8 and colours.shape == (256, 3)
  assert colours[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
  assert colours[15].tolist() == [192, 128, 128]  # VOC person.
  assert colours[255].tolist() == [224, 224, 192]  # VOC ignore border.
  assert len({tuple(c) for c in colours}) == 256


def test_label_png_round_trip(tmp_path):
  labels = np.random.default_rng(0).integers(0, 4, (9, 13)).astype(np.uint8)
  labels[0] = 255
  path = str(tmp_path / 'out' / 'labels.png')
  visualize.save_label_png(path, labels)
  im = Image.open(path)
  assert im.mode == 'P'
  assert im.getpalette()[3:6] == [128, 0, 0]
  np.testing.assert_array_equal(data.read_label_png(path), labels)


def test_overlay_colours_labels_and_draws_legend():
  image = np.full((120, 160, 3), 100, np.uint8)
  labels = np.zeros((120, 160), np.uint8)
  labels[60:100, 20:60] = 1
  labels[60:100, 100:140] = 3
  out = visualize.overlay(image, labels, alpha=0.5, names=('cat', 'cup', 'person'))
  assert out.shape == image.shape and out.dtype == np.uint8
  colours = visualize.palette(4)
  np.testing.assert_array_equal(out[80, 40], np.round(0.5 * 100 + 0.5 * colours[1].astype(float)))
  np.testing.assert_array_equal(out[80, 120], np.round(0.5 * 100 + 0.5 * colours[3].astype(float)))
  np.testing.assert_array_equal(out[110, 80], image[110, 80])  # Background untouched.
  legend = out[:40, :80]
  assert _colour_present(legend, colours[1]) and _colour_present(legend, colours[3])
  assert not _colour_present(legend, colours[2])  # Absent classes are not listed.
  swatch = max(10, 120 // 24)
  assert (out[:40, 2 * 3 + swatch:80] > 128).all(-1).any()  # Legend text right of the swatches.


def test_overlay_of_background_only_is_the_image():
  image = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
  np.testing.assert_array_equal(visualize.overlay(image, np.zeros((30, 40), np.uint8)), image)


def test_instance_overlay_ranks_by_score():
  image = np.full((100, 100, 3), 50, np.uint8)
  low = np.zeros((100, 100), bool)
  low[50:90, 10:40] = True
  high = np.zeros((100, 100), bool)
  high[50:90, 60:90] = True
  out = visualize.instance_overlay(image, [low, high], [0.2, 0.9], alpha=0.5)
  colours = visualize.palette(3)
  # The best instance takes colour 1; its outline is drawn in the full colour.
  np.testing.assert_array_equal(out[70, 75], np.round(0.5 * 50 + 0.5 * colours[1].astype(float)))
  np.testing.assert_array_equal(out[50, 75], colours[1])
  np.testing.assert_array_equal(out[70, 25], np.round(0.5 * 50 + 0.5 * colours[2].astype(float)))
  np.testing.assert_array_equal(out[10, 90], image[10, 90])
  legend = out[:30, :60]
  assert _colour_present(legend, colours[1]) and _colour_present(legend, colours[2])


def test_contact_sheet_layout(tmp_path):
  red = np.full((40, 80, 3), (255, 0, 0), np.uint8)
  blue = np.full((50, 50, 3), (0, 0, 255), np.uint8)
  cell = 64
  sheet = visualize.contact_sheet([[red, None, blue], [blue, red, red]],
                                  titles=('input', 'ground truth', 'prediction'), cell=cell,
                                  row_names=('a', 'b'))
  gap, header = 2, max(10, cell // 12) + 4
  assert sheet.dtype == np.uint8
  assert sheet.shape == (header + 2 * (cell + gap) + gap, 3 * (cell + gap) + gap, 3)
  assert (sheet[:header] > 128).all(-1).any()  # Titles drawn.
  centre = lambda r, c: sheet[header + gap + r * (cell + gap) + cell // 2, gap + c * (cell + gap) + cell // 2]
  np.testing.assert_array_equal(centre(0, 0), (255, 0, 0))
  np.testing.assert_array_equal(centre(0, 2), (0, 0, 255))
  np.testing.assert_array_equal(centre(1, 1), (255, 0, 0))
  np.testing.assert_array_equal(centre(0, 1), (40, 40, 40))  # None stays empty.
  # A wide image keeps its aspect: letterboxed above and below.
  np.testing.assert_array_equal(sheet[header + gap + 2, gap + cell // 2], (40, 40, 40))
  assert (sheet[header + gap:header + gap + 8, gap:gap + 8] == 0).all(-1).any()  # Row name box.
  path = str(tmp_path / 'sheet.png')
  fileio.save_png(path, sheet)
  assert os.path.getsize(path) > 0
  np.testing.assert_array_equal(np.asarray(Image.open(path)), sheet)
