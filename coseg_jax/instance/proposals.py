"""Mask proposals (MCG replacement) and DeepCO3's proposal ranking (SPEC §4, Eq. 7).

Built-in generator: selective-search-style hierarchical grouping (Uijlings et al.,
IJCV 2013). Felzenszwalb segmentations at a few scales are merged greedily, always the
most similar pair of adjacent regions, until one region is left; every region of every
hierarchy is a proposal. Similarity is a sum of colour-histogram intersection (in one
colour space per strategy), gradient-texture histogram intersection, size (small
regions merge first) and fill (regions whose union fills its bounding box merge
first); strategies vary the colour space, the scale and the similarity terms. The
proposals are pooled in selective search's order (a region's depth below the top of
its hierarchy times a seeded random number), filtered by area, near-duplicates (IoU
>= `dedupe_iou` on a 32x32 grid) dropped, and the first `max_count` kept.

Precomputed proposals (`load_proposals`): MATLAB `.mat` files with `masks` (HxWxN
logical, as the DeepCO3 release's MCG files) or MCG's own `superpixels` (HxW, 1-based)
+ `labels` (cell array of superpixel id lists), v5 or v7.3 (HDF5); or `.h5`/`.hdf5`
files with `masks` (NxHxW, C order).

Ranking: R(P) = beta sum(O S P) + sum(O S contour(P)) - gamma sum((1 - S) P); each peak
takes its best proposal, detections go through greedy mask NMS, and the group-level
percentile filter removes weak detections (`drop_low_scores`). By default O is scaled to
unit sum and gamma counts pixels of a `reference_area`-pixel image (`rank_proposals`).
"""
import heapq
import os

import h5py
import numpy as np
from scipy import ndimage
from skimage import color
from skimage import segmentation

from coseg_jax.core import data
from coseg_jax.core.errors import InputError
from coseg_jax.core.saliency import superpixel_graph
from coseg_jax.instance import metrics as instance_metrics

# 'none': no proposals of its own; the candidates are then `proposals.prior_components`'.
SOURCES = ('builtin', 'folder', 'none')
PROPOSAL_EXTENSIONS = ('.mat', '.h5', '.hdf5')
_COLOR_BINS = 25
_ORIENT_BINS, _MAG_BINS = 8, 10
_THUMB = 32

# (colour space, Felzenszwalb scale k, similarity terms) as in selective search "fast".
STRATEGIES = tuple((space, k, sims)
                   for space in ('hsv', 'lab')
                   for k in (50, 100, 200)
                   for sims in ('ctsf', 'tsf'))


def _color_channels(image_uint8, space):
  """HxWx3 in [0, 1] in the strategy's colour space."""
  if space == 'hsv':
    return color.rgb2hsv(image_uint8)
  if space == 'lab':
    lab = color.rgb2lab(image_uint8)
    return np.stack([lab[..., 0] / 100.0, (lab[..., 1] + 128) / 255.0, (lab[..., 2] + 128) / 255.0], -1)
  return image_uint8 / 255.0


def _bins(channels_HxWx3):
  """Per pixel and channel: colour bin, and joint (orientation, magnitude) texture bin."""
  colour = np.minimum((channels_HxWx3 * _COLOR_BINS).astype(int), _COLOR_BINS - 1)
  texture = np.empty(channels_HxWx3.shape, int)
  for c in range(3):
    smooth = ndimage.gaussian_filter(channels_HxWx3[..., c], 1.0)
    gy, gx = np.gradient(smooth)
    orient = ((np.arctan2(gy, gx) + np.pi) / (2 * np.pi) * _ORIENT_BINS).astype(int) % _ORIENT_BINS
    mag = np.hypot(gx, gy)
    mag_bin = np.minimum((mag / max(mag.max(), 1e-12) * _MAG_BINS).astype(int), _MAG_BINS - 1)
    texture[..., c] = orient * _MAG_BINS + mag_bin
  return colour, texture


def _histograms(labels_HxW, n, bins_HxWx3, nbins):
  """L1-normalised per-region histograms over the three channels (n x 3*nbins)."""
  flat = labels_HxW.ravel()
  hist = np.concatenate([
      np.bincount(flat * nbins + bins_HxWx3[..., c].ravel(), minlength=n * nbins).reshape(n, nbins)
      for c in range(3)], axis=1).astype(np.float64)
  return hist / hist.sum(1, keepdims=True)


def _hierarchy(labels_HxW, channels_HxWx3, sims):
  """Member sets (R x n bool, base regions first) of one greedy grouping, in merge order."""
  n = labels_HxW.max() + 1
  h, w = labels_HxW.shape
  image_area = float(h * w)
  colour_bins, texture_bins = _bins(channels_HxWx3)
  colour = list(_histograms(labels_HxW, n, colour_bins, _COLOR_BINS))
  texture = list(_histograms(labels_HxW, n, texture_bins, _ORIENT_BINS * _MAG_BINS))
  size = list(np.bincount(labels_HxW.ravel(), minlength=n).astype(np.float64))
  ys, xs = np.mgrid[:h, :w]
  box = [np.array(b) for b in zip(
      ndimage.minimum(ys, labels_HxW, np.arange(n)), ndimage.minimum(xs, labels_HxW, np.arange(n)),
      ndimage.maximum(ys, labels_HxW, np.arange(n)), ndimage.maximum(xs, labels_HxW, np.arange(n)))]
  neighbours = [set() for _ in range(n)]
  for a, b in superpixel_graph(labels_HxW):
    neighbours[a].add(b)
    neighbours[b].add(a)

  def similarity(a, b):
    s = 1.0 - (size[a] + size[b]) / image_area
    union_box = np.concatenate([np.minimum(box[a][:2], box[b][:2]), np.maximum(box[a][2:], box[b][2:])])
    box_area = (union_box[2] - union_box[0] + 1) * (union_box[3] - union_box[1] + 1)
    s += 1.0 - (box_area - size[a] - size[b]) / image_area
    s += np.minimum(texture[a], texture[b]).sum()
    if 'c' in sims:
      s += np.minimum(colour[a], colour[b]).sum()
    return s

  heap = [(-similarity(a, b), a, b) for a in range(n) for b in neighbours[a] if a < b]
  heapq.heapify(heap)
  members = list(np.eye(n, dtype=bool))
  alive = [True] * n
  while heap:
    _, a, b = heapq.heappop(heap)
    if not (alive[a] and alive[b]):
      continue
    new = len(members)
    total = size[a] + size[b]
    colour.append((size[a] * colour[a] + size[b] * colour[b]) / total)
    texture.append((size[a] * texture[a] + size[b] * texture[b]) / total)
    size.append(total)
    box.append(np.concatenate([np.minimum(box[a][:2], box[b][:2]), np.maximum(box[a][2:], box[b][2:])]))
    members.append(members[a] | members[b])
    alive[a] = alive[b] = False
    alive.append(True)
    nbrs = (neighbours[a] | neighbours[b]) - {a, b}
    neighbours.append(nbrs)
    for c in nbrs:
      neighbours[c] -= {a, b}
      neighbours[c].add(new)
      heapq.heappush(heap, (-similarity(new, c), new, c))
  return np.asarray(members)


def _cell_counts(labels_HxW, n):
  """n x G*G: pixels of each base segment in each cell of a coarse G x G grid."""
  h, w = labels_HxW.shape
  rows = np.arange(h) * _THUMB // h
  cols = np.arange(w) * _THUMB // w
  cell = (rows[:, None] * _THUMB + cols[None, :]).ravel()
  counts = np.bincount(labels_HxW.ravel() * _THUMB ** 2 + cell, minlength=n * _THUMB ** 2)
  return counts.reshape(n, _THUMB ** 2).astype(np.float32)


def greedy_suppress(masks, iou_thr, limit=None):
  """Indices, in order, of up to `limit` masks (N x ...) with IoU < iou_thr to every earlier kept one."""
  iou = instance_metrics.mask_iou(masks, masks)
  keep = []
  for i in range(len(masks)):
    if len(keep) == limit:
      break
    if not keep or iou[i, keep].max() < iou_thr:
      keep.append(i)
  return np.asarray(keep, int)


def area_filter(masks_NxHxW, min_area, max_area):
  """Masks whose area fraction lies in [min_area, max_area]."""
  frac = masks_NxHxW.reshape(len(masks_NxHxW), -1).mean(1)
  return masks_NxHxW[(frac >= min_area) & (frac <= max_area)]


def _scale_candidates(labels_HxW, members_Rxn, priority_R):
  """Regions of all strategies of one scale, unique, in priority order, with area and thumbnails."""
  order = np.argsort(priority_R, kind='stable')
  # Strategies of one scale share base segments: identical member sets are one region.
  first = np.sort(np.unique(np.packbits(members_Rxn[order], axis=1), axis=0, return_index=True)[1])
  members = members_Rxn[order[first]]
  weights = members.astype(np.float32)
  cells = _cell_counts(labels_HxW, members.shape[1])
  return {'members': members, 'priority': priority_R[order[first]],
          'area': weights @ np.bincount(labels_HxW.ravel(), minlength=members.shape[1]) / labels_HxW.size,
          'thumbs': (weights @ cells) * 2 >= np.maximum(cells.sum(0), 1)}


def generate(image_uint8, *, min_area=2e-5, max_area=0.85, max_count=1000, work_size=256,
             dedupe_iou=0.95, seed=0, strategies=STRATEGIES, shape_hw=None):
  """Proposals for one image: bool NxHxW at `shape_hw` (default: the image's size).

  Grouping runs with the image's longer side resized to `work_size`; regions are kept
  as sets of base segments until the final masks are drawn at `shape_hw`, so the cost
  of a large output is one gather (about 1 s for 1000 masks of 512x512 on one core).
  """
  # A fixed working size keeps Felzenszwalb's k (in pixel units) meaningful.
  small = data.resize_long_side(image_uint8, work_size)
  rng = np.random.default_rng(seed)
  base, members, priority = {}, {}, {}
  for space, k, sims in strategies:
    if k not in base:
      labels = segmentation.felzenszwalb(small, scale=k, sigma=0.8, min_size=k)
      base[k] = segmentation.relabel_sequential(labels)[0]
    m = _hierarchy(base[k], _color_channels(small, space), sims)
    depth = np.arange(len(m), 0, -1)  # 1 for the last merge (the whole image)
    members.setdefault(k, []).append(m)
    priority.setdefault(k, []).append(depth * rng.uniform(size=len(m)))
  pool = [_scale_candidates(base[k], np.concatenate(members[k]), np.concatenate(priority[k]))
          for k in base]
  scale_of = np.concatenate([np.full(len(c['members']), i) for i, c in enumerate(pool)])
  row_of = np.concatenate([np.arange(len(c['members'])) for c in pool])
  p, area, thumbs = (np.concatenate([c[key] for c in pool]) for key in ('priority', 'area', 'thumbs'))
  order = np.argsort(p, kind='stable')
  order = order[(area[order] >= min_area) & (area[order] <= max_area)]
  chosen = order[greedy_suppress(thumbs[order], dedupe_iou, max_count)]
  shape_hw = tuple(shape_hw or image_uint8.shape[:2])
  out = np.empty((len(chosen),) + shape_hw, bool)
  for i, (k, c) in enumerate(zip(base, pool)):
    sel = np.flatnonzero(scale_of[chosen] == i)
    out[sel] = c['members'][row_of[chosen[sel]]][:, data.resize_labels(base[k], shape_hw)]
  return out


def _from_superpixels(superpixels_HxW, label_lists, path):
  if superpixels_HxW.ndim != 2:
    raise InputError(f'{path}: superpixels must be 2D, got shape {superpixels_HxW.shape}')
  sp = superpixels_HxW.astype(np.int64)
  members = np.zeros((len(label_lists), sp.max() + 1), bool)
  for i, ids in enumerate(label_lists):
    ids = np.asarray(ids, np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() > sp.max()):
      raise InputError(f'{path}: labels[{i}] names superpixels outside 1..{sp.max()}')
    members[i, ids] = True
  return members[:, sp]


def _read_mat_masks(path):
  variables = data.read_mat(path)
  if 'masks' in variables:
    m = np.asarray(variables['masks'])
    return np.moveaxis(m, -1, 0) if m.ndim == 3 else m[None]
  if 'superpixels' in variables and 'labels' in variables:
    lists = [np.asarray(x).ravel() for x in np.asarray(variables['labels'], object).ravel()]
    return _from_superpixels(np.asarray(variables['superpixels']), lists, path)
  raise InputError(f'{path}: no "masks" (or "superpixels" + "labels") variable; found {sorted(variables)}')


def _read_h5_masks(path):
  try:
    with h5py.File(path, 'r') as f:
      if 'masks' not in f:
        raise InputError(f'{path}: no "masks" dataset; found {sorted(f)}')
      return np.asarray(f['masks'])
  except OSError as e:
    raise InputError(f'{path}: cannot read HDF5 file ({e})') from None


def load_proposals(path, shape_hw):
  """Proposals from a file (layouts in the module docstring): bool NxHxW at `shape_hw`."""
  masks = _read_mat_masks(path) if path.endswith('.mat') else _read_h5_masks(path)
  if masks.ndim != 3 or not masks.shape[0] or masks.dtype.kind not in 'biuf':
    raise InputError(f'{path}: expected a non-empty stack of 2D masks, got {masks.dtype} {masks.shape}')
  h, w = masks.shape[1:]
  if abs(h * shape_hw[1] - w * shape_hw[0]) > 0.05 * w * shape_hw[0]:
    raise InputError(f'{path}: masks are {h}x{w} but the image is {shape_hw[0]}x{shape_hw[1]}')
  return data.resize_labels(masks.astype(bool), shape_hw)


def proposals_for(cfg_proposals, stem, image_uint8):
  """Proposals of one image from the configured source, area-filtered: bool NxHxW."""
  if cfg_proposals.source == 'builtin':
    return generate(image_uint8, min_area=cfg_proposals.min_area, max_area=cfg_proposals.max_area)
  if cfg_proposals.source == 'none':
    return np.zeros((0,) + image_uint8.shape[:2], bool)
  if cfg_proposals.source != 'folder':
    raise ValueError(f'unknown proposal source {cfg_proposals.source!r} ({" | ".join(SOURCES)})')
  folder = cfg_proposals.folder
  if not folder or not os.path.isdir(folder):
    raise InputError(f'{folder}: proposal folder does not exist (config.proposals.folder)')
  paths = [os.path.join(folder, stem + ext) for ext in PROPOSAL_EXTENSIONS]
  found = [p for p in paths if os.path.isfile(p)]
  if not found:
    raise InputError(f'{paths[0]}: no proposal file for image {stem} ({", ".join(PROPOSAL_EXTENSIONS)})')
  masks = load_proposals(found[0], image_uint8.shape[:2])
  return area_filter(masks, cfg_proposals.min_area, cfg_proposals.max_area)


def best_overlaps(masks_NxHxW, gts):
  """Per ground-truth instance, its best IoU over the proposals (0 without proposals)."""
  if not len(gts):
    return np.zeros(0)
  if not len(masks_NxHxW):
    return np.zeros(len(gts))
  return instance_metrics.mask_iou(masks_NxHxW, np.stack(gts)).max(0)


def proposal_quality(masks_per_image, gts_per_image, iou_thr=0.5):
  """Recall at IoU >= iou_thr and average best overlap (ABO), pooled over all GT instances."""
  best = np.concatenate([best_overlaps(m, g) for m, g in zip(masks_per_image, gts_per_image)])
  if not len(best):
    return {f'recall@{iou_thr:g}': float('nan'), 'abo': float('nan'), 'num_gt': 0}
  return {f'recall@{iou_thr:g}': float(np.mean(best >= iou_thr)), 'abo': float(best.mean()),
          'num_gt': int(len(best))}


# --- Ranking (Eq. 7) ---------------------------------------------------------------------


def _window(masks_NxHxW, width, reduce):
  """`reduce` (np.logical_or: dilation, np.logical_and: erosion) over each pixel's width x
  width window clipped to the image; separable shifts of bool arrays, 2-3x faster than
  ndimage's filters on the ~1000 full-resolution proposals an image is ranked over."""
  out = masks_NxHxW
  lo = -(width // 2)
  for axis in (1, 2):
    src, out = out, out.copy()
    n = src.shape[axis]
    for d in range(lo, lo + width):
      if d:
        to, frm = [slice(None)] * 3, [slice(None)] * 3
        to[axis], frm[axis] = slice(max(0, -d), n - max(0, d)), slice(max(0, d), n + min(0, d))
        reduce(out[tuple(to)], src[tuple(frm)], out=out[tuple(to)])
  return out


def contours(masks_NxHxW, width=5):
  """Morphological gradient: width x width dilation != erosion (borders do not erode)."""
  m = np.asarray(masks_NxHxW).astype(bool, copy=False)
  return _window(m, width, np.logical_or) != _window(m, width, np.logical_and)


def proposal_scores(prm_KxHxW, sal_HxW, masks_NxHxW, *, inside_weight=0.8, background_penalty=1e-5,
                    contour_width=5, reference_area=None, chunk=128):
  """R(P) of Eq. 7 of every proposal for every peak: an NxK array (Nx0 or 0xK when either
  is empty).

  Args:
    prm_KxHxW: peak response maps O, one per peak, at the masks' resolution.
    sal_HxW: the full-resolution co-saliency map S, at the masks' resolution.
    masks_NxHxW: candidate proposals.
    reference_area: None ranks with O as given and gamma per pixel of this image: Eq. 7
      literally. A number of pixels scales each O to unit sum and gamma by
      reference_area / (H W). Eq. 7's constants assume both: the PRM rule conserves the
      unit signal through the paper's VGG16 (plain convs, ReLU, max-pool) and its images
      are about 448^2 pixels. Residual blocks (ResNet, EfficientNet) double the signal on
      every skip, and their map's sum drifts with training (0.1 to 3 on the demo), which
      would change how much background a proposal may cover.
  """
  k = len(prm_KxHxW)
  if not len(masks_NxHxW) or not k:
    return np.zeros((len(masks_NxHxW), k))
  prm_KxP = np.asarray(prm_KxHxW, np.float32).reshape(k, -1)
  if reference_area:
    prm_KxP = prm_KxP / np.maximum(prm_KxP.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    background_penalty = background_penalty * reference_area / sal_HxW.size
  weighted_KxP = prm_KxP * np.asarray(sal_HxW, np.float32).reshape(1, -1)
  background_P = (1.0 - np.asarray(sal_HxW, np.float32)).ravel()
  scores_NxK = []
  for start in range(0, len(masks_NxHxW), chunk):
    part = masks_NxHxW[start:start + chunk]
    inside = part.reshape(len(part), -1).astype(np.float32)
    edge = contours(part, contour_width).reshape(len(part), -1)
    scores_NxK.append((inside_weight * inside + edge) @ weighted_KxP.T
                      - background_penalty * (inside @ background_P)[:, None])
  return np.concatenate(scores_NxK)


def rank_proposals(prm_KxHxW, sal_HxW, masks_NxHxW, **score_kwargs):
  """Best proposal per peak under R(P) (Eq. 7; `proposal_scores`' keyword arguments).

  Returns:
    (index K, score K): the best proposal of each peak and its R. With no proposals both
    are empty.
  """
  scores_NxK = proposal_scores(prm_KxHxW, sal_HxW, masks_NxHxW, **score_kwargs)
  if not scores_NxK.size:
    return np.zeros(0, int), np.zeros(0)
  best = np.argmax(scores_NxK, axis=0)
  return best, scores_NxK[best, np.arange(scores_NxK.shape[1])]


def mask_nms(masks_KxHxW, scores_K, iou_thr=0.4):
  """Greedy NMS in descending score order: keep a mask if its IoU with every kept one is < iou_thr."""
  order = np.argsort(-np.asarray(scores_K), kind='stable')
  return order[greedy_suppress(masks_KxHxW[order], iou_thr)]


def drop_low_scores(scores_per_image, percentile=20.0):
  """Per image, indices of detections >= the group's `percentile` of scores.

  The percentile uses MATLAB's prctile definition (numpy method 'hazen'), as the
  authors' code. An image left without detections keeps its best one.
  """
  pooled = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores_per_image])
  if not len(pooled):
    return [np.zeros(0, int) for _ in scores_per_image]
  threshold = np.percentile(pooled, percentile, method='hazen')
  keep = []
  for s in scores_per_image:
    s = np.asarray(s, np.float64)
    idx = np.flatnonzero(s >= threshold)
    if not len(idx) and len(s):
      idx = np.array([np.argmax(s)])
    keep.append(idx)
  return keep


# What becomes a detection (`rank.detections`): 'peaks' (each peak's best proposal under
# Eq. 7, the paper) or 'candidates' (every proposal, scored by its best peak's R).
DETECTIONS = ('peaks', 'candidates')


def select_instances(prm_KxHxW, sal_HxW, masks_NxHxW, *, nms_iou=0.4, detections='peaks',
                     **score_kwargs):
  """One image: the `detections` (DETECTIONS) under Eq. 7 (`proposal_scores`' keyword
  arguments), then NMS.

  Returns (masks MxHxW, scores M) by score.
  """
  if detections == 'candidates':
    chosen = masks_NxHxW if len(prm_KxHxW) else masks_NxHxW[:0]  # no peak to score them by
    scores = proposal_scores(prm_KxHxW, sal_HxW, chosen, **score_kwargs).max(axis=1, initial=-np.inf)
  else:
    best, scores = rank_proposals(prm_KxHxW, sal_HxW, masks_NxHxW, **score_kwargs)
    chosen = masks_NxHxW[best]
  keep = mask_nms(chosen, scores, nms_iou)
  return chosen[keep], scores[keep]
