"""Training-free clustering baseline (SPEC §6a).

k-means of the frozen extractor's dense features into K+1 clusters over the whole group.
Cluster ids are arbitrary; like the method's channels, they go through the group's
background rule (`infer.background`) before scoring, so both name their background the
same way. `center_prior` is the reference that knows nothing about the group;
`saliency_split` of the group's co-saliency prior is the one-class reference.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.cluster import vq

from coseg_jax.core import data

# Independent k-means++ starts; the one of lowest inertia is kept.
_RESTARTS = 4
# Lloyd iterations per start (scipy's kmeans2 runs them all).
_ITERATIONS = 30


def _unit(x_NxC):
  return x_NxC / np.maximum(np.linalg.norm(x_NxC, axis=1, keepdims=True), 1e-12)


def kmeans_group(dense_feats_list, num_clusters, seed):
  """k-means over all pixels of a group: (unit centroids KxC, one uint8 hxw map per image).

  Features (hxwxC each) are L2-normalised per pixel so that clusters follow the feature
  direction, not the activation magnitude. Deterministic for a given seed.
  """
  feats = [np.asarray(f, np.float32) for f in dense_feats_list]
  x_NxC = _unit(np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]))
  rng = np.random.default_rng(seed)
  best_inertia, best = np.inf, None
  for _ in range(_RESTARTS):
    centers_KxC, labels_N = vq.kmeans2(x_NxC, num_clusters, iter=_ITERATIONS, minit='++',
                                       rng=rng)
    inertia = float(((x_NxC - centers_KxC[labels_N]) ** 2).sum())
    if inertia < best_inertia:
      best_inertia, best = inertia, (centers_KxC, labels_N)
  splits = np.cumsum([f.shape[0] * f.shape[1] for f in feats])[:-1]
  return _unit(best[0]), [labels.reshape(f.shape[:2]).astype(np.uint8)
                          for labels, f in zip(np.split(best[1], splits), feats)]


def cluster_group(dense_feats_list, num_clusters, seed):
  """The cluster maps of `kmeans_group`."""
  return kmeans_group(dense_feats_list, num_clusters, seed)[1]


def centroids(dense_feats_list, labels_list, num_labels):
  """LxC unit centroids of the per-pixel unit features of each label (labels at the
  features' grid), as `kmeans_group` would end on that partition."""
  x_NxC = _unit(np.concatenate([np.asarray(f, np.float32).reshape(-1, f.shape[-1])
                                for f in dense_feats_list]))
  labels_N = np.concatenate([np.asarray(l).ravel() for l in labels_list])
  sums_LxC = np.stack([x_NxC[labels_N == l].sum(0) for l in range(num_labels)])
  return _unit(sums_LxC)


def saliency_split(prior_HxW, out_hw):
  """The one-class partition of a saliency prior: 1 where it is above its mean (the
  'saliency' baseline and the K = 1 init), resized (bilinear) to `out_hw` first."""
  prior = np.asarray(prior_HxW, np.float32)
  resized = data.resize_probs(prior[..., None], out_hw)[..., 0]
  return (resized > prior.mean()).astype(np.uint8)


def soft_maps(labels_hxw, num_labels, out_hw):
  """One-hot labels upsampled bilinearly to `out_hw`: HxWxL maps that sum to 1 per pixel."""
  one_hot_hxwxL = np.eye(num_labels, dtype=np.float32)[labels_hxw]
  return data.resize_probs(one_hot_hxwxL, out_hw)


def multiscale(taps_BxhxwxC):
  """Per-pixel unit features of every tap, resized (bilinear) to the finest tap's grid and
  concatenated, so that each tap weighs the same whatever its width or magnitude."""
  h, w = max(t.shape[1] for t in taps_BxhxwxC), max(t.shape[2] for t in taps_BxhxwxC)
  parts = []
  for t in taps_BxhxwxC:
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    parts.append(jax.image.resize(t, (t.shape[0], h, w, t.shape[3]), method='bilinear'))
  return jnp.concatenate(parts, axis=-1)


def split_taps(taps):
  """'stride16+stride32' or a sequence -> tuple of tap names."""
  return tuple(taps.split('+')) if isinstance(taps, str) else tuple(taps)


def select_taps(out, taps):
  """The feature `taps` names in a backbone's output dict: one tap as it is, several
  ('a+b') combined by `multiscale`."""
  taps = split_taps(taps)
  return multiscale([out[t] for t in taps]) if len(taps) > 1 else out[taps[0]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_features(backbone, taps, variables, x_BxSxSx3):
  # Module-level and keyed by the (hashable) backbone: compiled once per run, not per group.
  return select_taps(backbone.apply(variables, x_BxSxSx3, taps=taps), taps)


def dense_features(backbone, variables, images_NxSxSx3, taps):
  """One hxwxC feature per image at the finest tap's grid; several taps
  (`'stride16+stride32'`) are combined by `multiscale`."""
  taps = split_taps(taps)
  return [np.asarray(_dense_features(backbone, taps, variables, image[None]))[0]
          for image in images_NxSxSx3]


def cluster_labels(backbone, variables, images_NxSxSx3, num_classes, seed, taps):
  """k-means (K+1 clusters) of the group's `dense_features`: one hxw map per image."""
  return cluster_group(dense_features(backbone, variables, images_NxSxSx3, taps),
                       num_classes + 1, seed)


def cluster_baseline(backbone, variables, images_NxSxSx3, out_shapes, num_classes, seed, tap):
  """The §6a baseline for one group: HxWx(K+1) soft maps at each image's original size.

  `images_NxSxSx3` is the network input the method itself sees (data.resize_batch);
  `backbone.apply(variables, x01_BxSxSx3, taps=(tap,))[tap]` gives the dense features
  (`tap` may name several, `'stride16+stride32'`: see `cluster_labels`).
  """
  labels = cluster_labels(backbone, variables, images_NxSxSx3, num_classes, seed, tap)
  return [soft_maps(l, num_classes + 1, hw) for l, hw in zip(labels, out_shapes)]


# The centre prior covers this fraction of the image with a centred ellipse.
CENTER_AREA = 0.4


def center_prior(shape_hw, area=CENTER_AREA):
  """uint8 HxW: 1 inside the centred ellipse (same aspect as the image) of `area` of the
  image, 0 outside. The reference every co-segmentation should beat."""
  h, w = shape_hw
  r = np.sqrt(area / np.pi)  # pi * (r W) * (r H) = area * W * H
  yy = (np.arange(h) + 0.5 - h / 2) / (r * h)
  xx = (np.arange(w) + 0.5 - w / 2) / (r * w)
  return ((yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0).astype(np.uint8)
