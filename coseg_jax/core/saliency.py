"""Unsupervised saliency priors, pluggable: DeepCO3's saliency loss (SPEC §4), and the
multi-class method's one-class groups (the init and the background rule of K = 1).

'mbd': minimum barrier distance (Zhang et al., ICCV 2015) on SLIC superpixels. The
barrier of a path is max - min of the colour along it; a superpixel's distance is the
smallest barrier of any path from the image border, summed over the Lab channels. The
distance is computed from each border side separately and the four maps are combined
as sum - max per superpixel (the backgroundness combination of MB+), so an object that
touches one side is not swallowed by the background. The minimisation is the same
relaxation FastMBD uses (keep the max and min of the current best path, improve it
through neighbours until nothing changes), here on the superpixel adjacency graph.

'ddt_mbd' (default): a co-saliency prior, the product of two training-free cues, one per
image and one per group. MBD (above) says what stands out of its own image; DDT (deep
descriptor transforming, Wei et al., IJCAI 2017 / PR 2019) says what recurs across the
group: the frozen ImageNet backbone's descriptors of all pixels of all images of the
group are centred and projected on their first principal component, and the positive
side is the common object (the sign is chosen so that the positive side covers a smaller
share of the image borders than of the images). The map is max(DDT, 0) upsampled to the
image and scaled to [0, 1] per image, times MBD, scaled to [0, 1] (MBD alone where
DDT is nowhere positive). On real street photos
MBD alone calls every band that is far in colour from the border (hedges, facades)
salient; DDT alone is coarse (stride 32); the product keeps the recurring object that
stands out (BUILD.md, "Real photographs (DeepCO3)").

'folder': precomputed maps, one per image: `<stem>.png` (greyscale; colour is
averaged) or the original dataset's `<stem>.mat` (MATLAB v5 or v7.3/HDF5; the one 2D
numeric variable, or `SalMap` as in the DeepCO3 release when there are several). Maps
are resized to the image (bilinear) and scaled to [0, 1]: PNGs and uint8/uint16 arrays
by their range, other arrays as they are when inside [0, 1], otherwise min-max.
"""
import os

import numpy as np
from skimage import color
from skimage import segmentation

from coseg_jax.core import crf
from coseg_jax.core import data
from coseg_jax.core.errors import InputError

PRIORS = ('ddt_mbd', 'mbd', 'folder')
REFINES = ('crf', 'none')
# SLIC superpixels of the MBD map: nothing smaller than one has MBD evidence of its own.
MBD_SEGMENTS = 300
_MAT_PREFERRED = 'SalMap'


def superpixel_graph(labels_HxW):
  """Unique undirected edges (E x 2, a < b) between 4-connected superpixels."""
  pairs = np.concatenate([
      np.stack([labels_HxW[:, :-1].ravel(), labels_HxW[:, 1:].ravel()], 1),
      np.stack([labels_HxW[:-1].ravel(), labels_HxW[1:].ravel()], 1)])
  pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
  return np.unique(pairs, axis=0)


def barrier_distance(values_N, edges_Ex2, seeds):
  """Minimum barrier (max - min along a path) from any seed node to every node.

  Nodes never reached keep +inf.
  """
  src = np.concatenate([edges_Ex2[:, 0], edges_Ex2[:, 1]])
  dst = np.concatenate([edges_Ex2[:, 1], edges_Ex2[:, 0]])
  hi = values_N.astype(np.float64).copy()
  lo = hi.copy()
  dist = np.full(len(values_N), np.inf)
  dist[seeds] = 0.0
  while True:
    cand_hi = np.maximum(hi[src], values_N[dst])
    cand_lo = np.minimum(lo[src], values_N[dst])
    cand = np.where(np.isfinite(dist[src]), cand_hi - cand_lo, np.inf)
    order = np.lexsort((cand, dst))
    first = order[np.unique(dst[order], return_index=True)[1]]  # best edge into each node
    better = first[cand[first] < dist[dst[first]] - 1e-9]
    if not len(better):
      return dist
    nodes = dst[better]
    dist[nodes], hi[nodes], lo[nodes] = cand[better], cand_hi[better], cand_lo[better]


def mbd_saliency(image_uint8, *, n_segments=MBD_SEGMENTS, compactness=10.0, work_size=320):
  """float32 HxW saliency in [0, 1] at the image's size (computed with the longer side at `work_size`)."""
  h, w = image_uint8.shape[:2]
  small = data.resize_long_side(image_uint8, work_size)
  labels = segmentation.slic(small, n_segments=n_segments, compactness=compactness, start_label=0)
  labels = segmentation.relabel_sequential(labels)[0]
  n = labels.max() + 1
  counts = np.bincount(labels.ravel(), minlength=n)
  lab = color.rgb2lab(small).reshape(-1, 3)
  mean_lab = np.stack([np.bincount(labels.ravel(), lab[:, c], n) for c in range(3)], 1) / counts[:, None]
  edges = superpixel_graph(labels)
  sides = (labels[0], labels[-1], labels[:, 0], labels[:, -1])
  per_side = np.stack([
      sum(barrier_distance(mean_lab[:, c], edges, np.unique(side)) for c in range(3))
      for side in sides])
  sal = per_side.sum(0) - per_side.max(0)
  sal = sal / sal.max() if sal.max() > 0 else np.zeros(n)
  return data.resize_probs(sal[labels].astype(np.float32)[..., None], (h, w))[..., 0].clip(0, 1)


def _to_unit(arr, path):
  if arr.dtype == bool:
    return arr.astype(np.float32)
  if np.issubdtype(arr.dtype, np.integer) and np.iinfo(arr.dtype).max in (255, 65535):
    return (arr / np.iinfo(arr.dtype).max).astype(np.float32)
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)):
    raise InputError(f'{path}: saliency map contains NaN or Inf')
  lo, hi = arr.min(), arr.max()
  if lo < 0 or hi > 1:
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
  return arr.astype(np.float32)


def _read_mat_map(path):
  arrays = {k: np.squeeze(v) for k, v in data.read_mat(path).items()}
  maps = {k: v for k, v in arrays.items() if v.ndim == 2 and v.dtype.kind in 'biuf'}
  if len(maps) > 1 and _MAT_PREFERRED in maps:
    maps = {_MAT_PREFERRED: maps[_MAT_PREFERRED]}
  if len(maps) != 1:
    found = ', '.join(f'{k} {v.shape}' for k, v in arrays.items()) or 'nothing'
    raise InputError(f'{path}: expected one 2D saliency array (or {_MAT_PREFERRED}), found {found}')
  return next(iter(maps.values()))


def read_prior(path, shape_hw):
  """One saliency map file resized to (H, W), float32 in [0, 1]."""
  if path.endswith('.mat'):
    raw = _to_unit(_read_mat_map(path), path)
  else:
    raw = data.read_image(path).astype(np.float32).mean(-1) / 255.0
  if raw.shape != tuple(shape_hw):
    raw = data.resize_probs(raw[..., None], shape_hw)[..., 0]
  return raw.clip(0, 1).astype(np.float32)


def load_prior_folder(folder, stems, shapes):
  """Maps `<stem>.png` (preferred) or `<stem>.mat` under `folder`, one per image."""
  if not folder or not os.path.isdir(folder):
    raise InputError(f'{folder}: saliency folder does not exist (config.saliency.folder)')
  out = []
  for stem, shape in zip(stems, shapes):
    paths = [os.path.join(folder, stem + ext) for ext in ('.png', '.mat')]
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
      raise InputError(f'{paths[0]}: no saliency map for image {stem} (.png or .mat)')
    out.append(read_prior(found[0], shape[:2]))
  return out


# The backbone tap DDT reads ('auto'): the last 192-d stride-32 stage of Lite0 (of blocks
# 5-15 and the head the most object-selective on fudanped24; BUILD.md).
DDT_TAPS = {'vgg16': 'conv5_3', 'resnet50': 'layer4', 'efficientnet_lite0': 'block13'}


def ddt_maps(feats_list):
  """DDT of a group: per image, its descriptors (hxwxC) projected on the group's first
  principal component, signed so that the positive side touches the borders less.

  Returns a list of float32 hxw maps (positive = common object).
  """
  flat = np.concatenate([np.asarray(f, np.float64).reshape(-1, f.shape[-1]) for f in feats_list])
  mean = flat.mean(0)
  centred = flat - mean
  # First right singular vector of the centred descriptors = first principal component.
  _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
  direction = vt[0]
  maps = [((np.asarray(f, np.float64) - mean) @ direction).astype(np.float32) for f in feats_list]
  border = np.concatenate([np.concatenate([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]]) for m in maps])
  every = np.concatenate([m.ravel() for m in maps])
  if np.mean(border > 0) > np.mean(every > 0):
    maps = [-m for m in maps]
  return maps


def ddt_mbd_saliency(images_uint8, feats_list, mbd_maps=None):
  """The 'ddt_mbd' prior of a group (module docstring): HxW maps in [0, 1], one per image."""
  out = []
  mbd_maps = mbd_maps or [mbd_saliency(im) for im in images_uint8]
  for image, common, single in zip(images_uint8, ddt_maps(feats_list), mbd_maps):
    up = data.resize_probs(np.maximum(common, 0)[..., None], image.shape[:2])[..., 0]
    # An image where nothing is on the common side has no co-saliency evidence: MBD alone.
    prior = up / up.max() * single if up.max() > 0 else single
    out.append((prior / prior.max() if prior.max() > 0 else prior).astype(np.float32))
  return out


def saliency_prior(cfg_saliency, group, features=None):
  """Per sample of `group`, its HxW prior in [0, 1] at the image's original size.

  `features(images) -> list of hxwxC` (the frozen backbone's descriptors) is needed by
  'ddt_mbd' only.
  """
  if cfg_saliency.prior == 'mbd':
    return [mbd_saliency(s.image) for s in group.samples]
  if cfg_saliency.prior == 'ddt_mbd':
    images = [s.image for s in group.samples]
    return ddt_mbd_saliency(images, features(images))
  if cfg_saliency.prior == 'folder':
    return load_prior_folder(cfg_saliency.folder, [s.stem for s in group.samples],
                             [s.image.shape for s in group.samples])
  raise ValueError(f'unknown saliency prior {cfg_saliency.prior!r} ({" | ".join(PRIORS)})')


def foreground(image_uint8, prior_HxW, crf_cfg, floor):
  """The prior's binary foreground at the image's size: above the prior's mean (`crf_cfg`
  None), or that split redrawn by the dense CRF `crf_cfg` (core/crf.py). The CRF's unary is the prior
  scaled to 1/2 at its mean and clipped to [floor, 1 - floor]: where the image shows no
  edge the CRF keeps the split, where it does the outline moves to it. The prior is a
  superpixel map times a stride-32 one, so its outline cuts through people and ground
  alike (fudanped: IoU with the union of the people 0.528 -> 0.635; BUILD.md, "Real
  photographs (DeepCO3)"). The prior is 0 wherever the group's DDT is negative, which
  says "not common", not "certainly background": at a floor near 0 those pixels are pinned
  and the CRF cannot move the split at all.
  """
  prior = np.asarray(prior_HxW, np.float64)
  above = prior > prior.mean()
  if crf_cfg is None or not above.any():
    return above
  half = np.clip(prior / (2 * prior.mean()), floor, 1.0 - floor)
  return crf.dense_crf_labels(image_uint8, np.stack([1 - half, half], -1), crf_cfg) == 1
