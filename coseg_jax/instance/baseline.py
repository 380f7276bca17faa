"""Training-free instance baseline (SPEC §6(b)): the saliency prior's connected components,
with components that hold several instances side by side split by the group's shape."""
import numpy as np
from scipy import ndimage

from coseg_jax.core import saliency

# How a group's components become instances (`saliency.split`): 'aspect' cuts a component
# that is n times wider, for its height, than the group's median component into n side by
# side (`split_by_group_aspect`); 'none' keeps every component whole (SPEC §6(b)).
SPLITS = ('aspect', 'none')


def _by_mass(prior_HxW, masks_KxHxW):
  """(masks, scores) best first, a mask scored by the prior's mass inside it per pixel of
  the image."""
  scores = (np.asarray(prior_HxW, np.float64)[None] * masks_KxHxW).sum((1, 2)) / prior_HxW.size
  order = np.argsort(-scores, kind='stable')
  return masks_KxHxW[order], scores[order]


def saliency_components(prior_HxW, foreground_HxW):
  """§6(b) baseline of one image: (masks, scores) of the connected components of the
  prior's binary foreground (`saliency.foreground`), best first.

  A component is scored by the prior's mass inside it per pixel of the image, so a
  person outranks a speck of equal mean prior; components smaller than one MBD superpixel
  (1 / saliency.MBD_SEGMENTS of the image), which the CRF leaves along colour edges, are
  dropped: the prior has no evidence of its own at that scale.
  """
  labels, n = ndimage.label(foreground_HxW)
  ids = np.arange(1, n + 1)
  area = np.asarray(ndimage.sum(foreground_HxW, labels, ids)) if n else np.zeros(0)
  ids = ids[area >= labels.size / saliency.MBD_SEGMENTS]
  if not len(ids):
    return np.zeros((0,) + labels.shape, bool), np.zeros(0)
  return _by_mass(prior_HxW, labels[None] == ids[:, None, None])


def spread_aspect(mask_HxW):
  """Height over width of a mask as the ratio of its rows' and columns' standard deviations
  (pixels as unit squares, so a one-pixel line has a finite ratio); n equal shapes side by
  side have 1/n of one shape's ratio."""
  ys, xs = np.nonzero(mask_HxW)
  return float(np.sqrt((ys.var() + 1 / 12) / (xs.var() + 1 / 12)))


def cut_side_by_side(mask_HxW, parts):
  """`parts` pieces of a mask cut by vertical lines (1-D k-means of its pixels' columns),
  each reduced to its largest connected piece; empty pieces are left out."""
  ys, xs = np.nonzero(mask_HxW)
  centers = np.quantile(xs, (np.arange(parts) + 0.5) / parts)
  assign = None
  for _ in range(100):
    new = np.argmin(np.abs(xs[:, None] - centers[None]), axis=1)
    if assign is not None and (new == assign).all():
      break
    assign = new
    centers = np.array([xs[assign == k].mean() if (assign == k).any() else centers[k]
                        for k in range(parts)])
  pieces = []
  for k in range(parts):
    piece = np.zeros(mask_HxW.shape, bool)
    piece[ys[assign == k], xs[assign == k]] = True
    labels, n = ndimage.label(piece)
    if n > 1:
      piece = labels == 1 + int(np.argmax(ndimage.sum(piece, labels, np.arange(1, n + 1))))
    if piece.any():
      pieces.append(piece)
  return pieces


def split_by_group_aspect(components, priors):
  """Per image (masks, scores) best first, where each of the group's components (per image
  (masks, scores), as `saliency_components` gives) that is n >= 2 times wider for its height
  than the group's median component is replaced by its n `cut_side_by_side` pieces, each
  scored by the prior's mass inside it.

  Instances of one class share a shape across a group, so the median component (most
  components hold one instance) says what one instance looks like, and the ratio is
  scale-free: near and far people alike. Only widths are counted: things standing on the
  ground merge side by side, and a tall single instance must not be cut in two. Without a
  constant: a group of wide objects (horses) has a wide median and keeps them whole.
  """
  aspects = [[spread_aspect(m) for m in masks] for masks, _ in components]
  if not any(aspects):
    return components
  typical = float(np.median(np.concatenate(aspects)))
  out = []
  for (masks, scores), image_aspects, prior in zip(components, aspects, priors):
    if not len(masks):
      out.append((masks, scores))
      continue
    pieces = []
    for mask, aspect in zip(masks, image_aspects):
      parts = int(round(typical / aspect))
      pieces += cut_side_by_side(mask, parts) if parts >= 2 else [mask]
    out.append(_by_mass(prior, np.stack(pieces)))
  return out


def group_components(priors, foregrounds, split):
  """Per image (masks, scores) of a group: `saliency_components`, then `split` (SPLITS)."""
  components = [saliency_components(p, f) for p, f in zip(priors, foregrounds)]
  return split_by_group_aspect(components, priors) if split == 'aspect' else components
