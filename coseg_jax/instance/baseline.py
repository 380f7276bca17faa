"""Training-free instance baseline (SPEC §6(b)): the saliency prior's connected components."""
import numpy as np
from scipy import ndimage


def saliency_components(prior_HxW):
  """§6(b) baseline of one image: (masks, scores) of the connected components of
  prior > mean(prior), each scored by its mean prior, best first."""
  labels, n = ndimage.label(prior_HxW > prior_HxW.mean())
  if not n:
    return np.zeros((0,) + prior_HxW.shape, bool), np.zeros(0)
  ids = np.arange(1, n + 1)
  scores = np.asarray(ndimage.mean(prior_HxW, labels, ids))
  order = np.argsort(-scores, kind='stable')
  return labels[None] == ids[order, None, None], scores[order]
