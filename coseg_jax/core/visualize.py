"""Palettes, label PNGs, colour overlays with legends and contact sheets (uint8 RGB)."""
import io

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from scipy import ndimage

from coseg_jax.core import data
from coseg_jax.core import errors
from coseg_jax.core import fileio

_BACKGROUND_GREY = (40, 40, 40)


def palette(n) -> np.ndarray:
  """uint8 [n, 3] PASCAL VOC colour map: 0 black, 1 dark red, 2 dark green, ..."""
  ids = np.arange(n)
  colours = np.zeros((n, 3), np.int64)
  for bit in range(8):
    for channel in range(3):
      colours[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
  return colours.astype(np.uint8)


def label_png(labels_HxW) -> bytes:
  """A palette PNG of a label map: viewers show colours, readers get the ids back."""
  im = Image.fromarray(np.asarray(labels_HxW, np.uint8))
  im.putpalette(palette(256).tobytes())
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return buf.getvalue()


def save_label_png(path, labels_HxW):
  fileio.atomic_write_bytes(path, label_png(labels_HxW))


def overlay(image, labels, *, alpha=0.5, names=()) -> np.ndarray:
  """Labels blended over the image with a legend; 0 stays uncoloured.

  Args:
    image: uint8 HxWx3.
    labels: integer HxW (0 background, 1..K, 255 ignore).
    alpha: colour weight.
    names: optional names of classes 1..K for the legend.
  """
  labels = np.asarray(labels)
  colours = palette(256)
  out = image.astype(np.float32)
  entries = []
  for v in np.unique(labels):
    v = int(v)
    if v == 0:
      continue
    _blend(out, labels == v, colours[v], alpha)
    text = 'ignore' if v == data.IGNORE_LABEL else str(v)
    if v <= len(names):
      text = f'{v} {names[v - 1]}'
    entries.append((colours[v], text))
  return _with_legend(out, entries)


def instance_overlay(image, masks, scores, *, alpha=0.5) -> np.ndarray:
  """Instance masks (bool HxW each) coloured by score rank, outlined, with a legend."""
  colours = palette(len(masks) + 1)
  ranked = np.argsort(-np.asarray(scores, np.float64), kind='stable')
  out = image.astype(np.float32)
  entries = []
  # Lowest score first, so the best instance is drawn on top where masks overlap.
  for rank in range(len(ranked), 0, -1):
    mask = np.asarray(masks[ranked[rank - 1]], bool)
    _blend(out, mask, colours[rank], alpha)
    outline = ndimage.binary_dilation(mask & ~ndimage.binary_erosion(mask))
    out[outline] = colours[rank]
  for rank, i in enumerate(ranked, 1):
    entries.append((colours[rank], f'#{rank} {float(scores[i]):.2f}'))
  return _with_legend(out, entries)


def contact_sheet(rows, *, titles, cell=160, row_names=()) -> np.ndarray:
  """A grid of uint8 images, one row per input (e.g. input | ground truth | prediction).

  Each image is fitted into a `cell` x `cell` square keeping its aspect ratio; a None
  cell (e.g. no ground truth) stays empty. `titles` head the columns; `row_names`
  (e.g. image stems) are written in the first cell of each row.
  """
  font = _font(max(10, cell // 12))
  gap = 2
  header = font.size + 2 * gap
  width = len(titles) * (cell + gap) + gap
  sheet = Image.new('RGB', (width, header + len(rows) * (cell + gap) + gap), _BACKGROUND_GREY)
  draw = ImageDraw.Draw(sheet)
  for c, title in enumerate(titles):
    draw.text((gap + c * (cell + gap) + gap, gap), title, fill=(255, 255, 255), font=font)
  for r, row in enumerate(rows):
    if len(row) != len(titles):
      raise ValueError(f'row {r} has {len(row)} images for {len(titles)} titles')
    y = header + gap + r * (cell + gap)
    for c, img in enumerate(row):
      if img is None:
        continue
      im = Image.fromarray(np.asarray(img, np.uint8))
      scale = cell / max(im.size)
      im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
      x = gap + c * (cell + gap)
      sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
    if r < len(row_names):
      _draw_label(draw, (gap, y), row_names[r], font)
  return np.asarray(sheet)


def _blend(out_HxWx3, region_HxW, colour, alpha):
  out_HxWx3[region_HxW] = (1 - alpha) * out_HxWx3[region_HxW] + alpha * np.asarray(colour, np.float32)


def _font(size):
  return ImageFont.load_default(size=size)


def _draw_label(draw, xy, text, font):
  # A file name may hold a newline (PIL cannot measure multi-line text) or undecodable bytes.
  text = errors.one_line(text)
  x, y = xy
  draw.rectangle([x, y, x + draw.textlength(text, font=font) + 4, y + font.size + 4], fill=(0, 0, 0))
  draw.text((x + 2, y + 2), text, fill=(255, 255, 255), font=font)


def _with_legend(image_float, entries):
  """Rounds to uint8 and draws a swatch + text per entry in the top-left corner."""
  im = Image.fromarray(np.clip(np.round(image_float), 0, 255).astype(np.uint8))
  if not entries:
    return np.asarray(im)
  font = _font(max(10, min(im.size) // 24))
  draw = ImageDraw.Draw(im)
  pad, swatch = 3, font.size
  entries = [(colour, errors.one_line(text)) for colour, text in entries]  # class names
  text_width = max(draw.textlength(text, font=font) for _, text in entries)
  draw.rectangle([0, 0, 3 * pad + swatch + text_width, pad + len(entries) * (swatch + pad)], fill=(0, 0, 0))
  for i, (colour, text) in enumerate(entries):
    y = pad + i * (swatch + pad)
    draw.rectangle([pad, y, pad + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in colour),
                   outline=(255, 255, 255))
    draw.text((2 * pad + swatch, y), text, fill=(255, 255, 255), font=font)
  return np.asarray(im)


def instance_labels(masks_by_rank, shape_hw):
  """uint8 HxW map, instance i (0-based rank) -> i + 1; better ranks win overlaps."""
  labels = np.zeros(shape_hw, np.uint8)
  for i in reversed(range(len(masks_by_rank))):
    labels[masks_by_rank[i]] = i + 1
  return labels
