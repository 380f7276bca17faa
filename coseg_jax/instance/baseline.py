"""Training-free instance baseline (SPEC §6(b)): the saliency prior's connected components."""
import numpy as np
from scipy import ndimage

from coseg_jax.core import saliency


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
  scores = np.asarray(ndimage.sum(prior_HxW, labels, ids)) / labels.size
  order = np.argsort(-scores, kind='stable')
  return labels[None] == ids[order, None, None], scores[order]
