"""Inference post-processing (SPEC §3): Eq. 8 normalisation, then argmax (Eq. 9) or dense CRF.

Maps are HxWx(K+1) probabilities with channel 0 = background and 1..K = classes; label maps
come out as uint8 in the same order.
"""
import numpy as np

from coseg_jax.core import crf


def normalize_maps(S_HxWxK1):
  """Eq. 8: every channel divided by its maximum over the image (also works on ...xHxWxK1)."""
  S = np.asarray(S_HxWxK1, np.float32)
  peak = S.max(axis=(-3, -2), keepdims=True)
  # An all-zero channel stays zero instead of becoming NaN.
  return S / np.maximum(peak, np.finfo(np.float32).tiny)


def argmax_labels(S_HxWxK1):
  """Eq. 9: the channel of highest normalised score per pixel."""
  return np.argmax(S_HxWxK1, axis=-1).astype(np.uint8)


METHODS = ('argmax', 'crf')


def labels_from_maps(image_HxWx3, S_HxWxK1, infer_cfg):
  """Eq. 8, then the post-processing named by `infer_cfg.method` (one of METHODS)."""
  if infer_cfg.method not in METHODS:  # the pipeline's check_config names the field
    raise ValueError(f'unknown inference method {infer_cfg.method!r} ({" | ".join(METHODS)})')
  S = normalize_maps(S_HxWxK1)
  if infer_cfg.method == 'argmax':
    return argmax_labels(S)
  return crf.dense_crf_labels(image_HxWx3, S, infer_cfg.crf)


def border_label(labels_list, num_labels):
  """The label that owns most image-border pixels over a group."""
  counts = np.zeros(num_labels, np.int64)
  for labels in labels_list:
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts += np.bincount(border, minlength=num_labels)[:num_labels]
  return int(np.argmax(counts))


def label_consistency(vectors_NxLxD, present_NxL):
  """Per label, the mean cosine similarity of its per-image vectors over the pairs of
  images where it is present (inf where it is present in fewer than two images)."""
  v = np.asarray(vectors_NxLxD, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  present = np.asarray(present_NxL, bool)
  n, num_labels = present.shape
  consistency = np.full(num_labels, np.inf)
  off = ~np.eye(n, dtype=bool)
  for l in range(num_labels):
    pairs = off & present[:, l][:, None] & present[:, l][None, :]
    if pairs.any():
      consistency[l] = (v[:, l] @ v[:, l].T)[pairs].mean()
  return consistency


def label_saliency(labels_list, priors_list, num_labels):
  """Per label, the mean saliency over the group's pixels (labels and priors of each image
  at one size; inf for a label no pixel has)."""
  total, count = np.zeros(num_labels), np.zeros(num_labels)
  for labels, prior in zip(labels_list, priors_list):
    total += np.bincount(labels.ravel(), np.asarray(prior, np.float64).ravel(), num_labels)
    count += np.bincount(labels.ravel(), minlength=num_labels)
  return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def _lowest(values_L):
  """argmin over the finite values; label 0 where none is finite."""
  return int(np.argmin(values_L)) if np.isfinite(values_L).any() else 0


def least_consistent_label(vectors_NxLxD, present_NxL):
  """The label whose per-image vectors agree least across the group (`label_consistency`).

  With f and the pooling of the co-attention loss, this is the criterion the loss encodes:
  classes 1..K are pulled together across images (d+), the background has no such term.
  Labels present in fewer than two images cannot be compared and are never chosen, unless
  no label can be compared (then label 0).
  """
  return _lowest(label_consistency(vectors_NxLxD, present_NxL))


def least_salient_label(labels_list, priors_list, num_labels):
  """The label of lowest mean saliency over the group's pixels (`label_saliency`); a label
  no pixel has is never chosen."""
  return _lowest(label_saliency(labels_list, priors_list, num_labels))


def least_common_label(labels_list, priors_list, vectors_NxLxD, present_NxL):
  """The label with the least evidence of being one of the group's classes: the lowest sum
  of its mean co-saliency and its cross-image consistency, both in [0, 1] and equally
  weighted. A class is either what stands out of the images (an object: salient) or what
  recurs across them (stuff such as sky or grass: consistent, not salient); the background
  is neither. Labels either criterion cannot score are never chosen."""
  num_labels = np.asarray(present_NxL).shape[1]
  return _lowest(label_saliency(labels_list, priors_list, num_labels)
                 + label_consistency(vectors_NxLxD, present_NxL))


def swap_to_background(labels_list, bg, num_labels):
  """Relabels a group so that label `bg` becomes 0 (and 0 becomes `bg`)."""
  swap = np.arange(num_labels, dtype=np.uint8)
  swap[[0, bg]] = swap[[bg, 0]]
  return [swap[labels] for labels in labels_list]


# Rules for which label is background (`infer.background`, BUILD.md): 'consistency' (the
# label least consistent across the group under the loss' f and pooling), 'saliency' (the
# label least salient under the group's co-saliency prior), 'saliency+consistency' (the
# lowest sum of the two), 'channel' (the generator's channel 0 as trained, the thesis),
# 'border' (the label owning most border); 'auto' is 'saliency' for one class and
# 'saliency+consistency' otherwise.
BACKGROUND_RULES = ('auto', 'consistency', 'saliency', 'saliency+consistency', 'channel', 'border')
# The rules that read the group's co-saliency prior.
PRIOR_RULES = ('saliency', 'saliency+consistency')


def background_by_border(labels_list, num_labels):
  """Relabels a group so that label 0 is its `border_label`.

  The co-attention loss constrains only the foreground channels across images, so which
  region the background channel takes is learned, not imposed (BUILD.md); clusters have
  no background at all. Objects rarely fill the frame, so the label that owns most
  border pixels over the whole group is taken as background, without ground truth.
  """
  return swap_to_background(labels_list, border_label(labels_list, num_labels), num_labels)
