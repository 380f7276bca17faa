"""Instance co-segmentation metrics (SPEC §4): mAP^r and CorLoc^r on masks.

Matching follows the DeepCO3 evaluation code: within each image, detections are taken in
descending score order and each is assigned to the not-yet-matched ground-truth instance
of highest mask IoU; it is a true positive if that IoU is > tau. Detections are then
pooled over the images of a category, sorted by score (stable, so ties keep image order),
and AP is the VOC all-point interpolated area under precision/recall, recall being over
all ground-truth instances of the category.
"""
import numpy as np

THRESHOLDS = (0.25, 0.5, 0.75)


def mask_iou(a_NxHxW, b_MxHxW):
  """NxM IoU matrix of two stacks of boolean masks (0 where both masks are empty)."""
  a, b = np.asarray(a_NxHxW, bool), np.asarray(b_MxHxW, bool)
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f'mask sizes differ: {a.shape[1:]} vs {b.shape[1:]}')
  pixels = int(np.prod(a.shape[1:]))
  a, b = a.reshape(len(a), pixels), b.reshape(len(b), pixels)
  inter = a.astype(np.float32) @ b.astype(np.float32).T
  union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
  return inter / np.maximum(union, 1.0)


def _split(dets):
  """(masks KxHxW or None, scores K) of one image's list of (mask, score)."""
  if not dets:
    return None, np.zeros(0, np.float64)
  return np.stack([m for m, _ in dets]), np.asarray([s for _, s in dets], np.float64)


def match_image(det_masks, det_scores, gt_masks, iou_thr):
  """Per detection (in the given order) whether it is a true positive."""
  tp = np.zeros(len(det_scores), bool)
  if det_masks is None or not len(gt_masks):
    return tp
  iou_KxG = mask_iou(det_masks, np.stack(gt_masks))
  free = np.ones(iou_KxG.shape[1], bool)
  for k in np.argsort(-det_scores, kind='stable'):
    if not free.any():
      break
    candidates = np.where(free, iou_KxG[k], -1.0)
    g = int(np.argmax(candidates))
    if candidates[g] > iou_thr:
      tp[k] = True
      free[g] = False
  return tp


def voc_ap(recall, precision):
  """VOC all-point AP: area under the monotone (right-max) precision envelope."""
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  changed = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[changed] - mrec[changed - 1]) * mpre[changed]))


def average_precision(dets, gts, iou_thr):
  """AP of one category.

  Args:
    dets: per image a list of (bool HxW mask, score).
    gts: per image a list of bool HxW ground-truth instance masks.
    iou_thr: a detection is correct if its IoU is > iou_thr.

  Returns:
    AP in [0, 1]; 0 without detections; NaN if there is no ground-truth instance.
  """
  if len(dets) != len(gts):
    raise ValueError(f'{len(dets)} images with detections but {len(gts)} with ground truth')
  num_gt = sum(len(g) for g in gts)
  if num_gt == 0:
    return float('nan')
  scores, labels = [], []
  for d, g in zip(dets, gts):
    masks, s = _split(d)
    scores.append(s)
    labels.append(match_image(masks, s, g, iou_thr))
  scores, labels = np.concatenate(scores), np.concatenate(labels)
  if not len(scores):
    return 0.0
  order = np.argsort(-scores, kind='stable')
  tp = np.cumsum(labels[order])
  fp = np.cumsum(~labels[order])
  return voc_ap(tp / num_gt, tp / (tp + fp))


def map_r(dets_by_category, gts_by_category, thresholds=THRESHOLDS):
  """mAP^r: AP per category at each IoU threshold and the mean over categories.

  Returns:
    {'per_category': {name: {'0.25': ap, ...}}, 'mean': {'0.25': map, ...}}; categories
    without ground truth are NaN and left out of the mean.
  """
  per = {name: {f'{t:g}': average_precision(dets_by_category[name], gts_by_category[name], t)
                for t in thresholds}
         for name in dets_by_category}
  mean = {}
  for t in thresholds:
    values = [v[f'{t:g}'] for v in per.values() if not np.isnan(v[f'{t:g}'])]
    mean[f'{t:g}'] = float(np.mean(values)) if values else float('nan')
  return {'per_category': per, 'mean': mean}


def corloc(dets, gts, iou_thr=0.5):
  """CorLoc^r: fraction of images whose top-scored mask has IoU > iou_thr with a GT instance.

  An image without detections counts as a miss; images without ground truth are skipped.
  """
  hits = []
  for d, g in zip(dets, gts):
    if not len(g):
      continue
    masks, s = _split(d)
    hit = masks is not None and mask_iou(masks[np.argmax(s)][None], np.stack(g)).max() > iou_thr
    hits.append(hit)
  return float(np.mean(hits)) if hits else float('nan')
